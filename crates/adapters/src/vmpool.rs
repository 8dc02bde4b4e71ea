//! Warm pools on the clouds: VMs that run attempt after attempt, whatever cloud
//! makes them (EC2, Azure). A provider gives [`Pools`] four things through
//! [`PoolCloud`] — launch the VM of a slot, the state of one VM, the VMs of a pool,
//! terminate — and the records, races and tending are the same everywhere.
//!
//! - **State** lives in the broker's state bucket (which no agent can read), written
//!   with conditional puts:
//!   - one record per pool slot, `pools/<pool>/<slot>.json` with `slot` in
//!     `0..max`: its VM and the attempt it runs. A slot is taken with
//!     `PutMode::Create`, so a pool never has more than `max` VMs however many
//!     dispatchers run; an idle VM is claimed, released or retired with
//!     `PutMode::Update` on the ETag it was read at, so two dispatchers never claim
//!     one VM and a retirement never takes a claimed one;
//!   - one placement per attempt, `pool-placements/<job>.<attempt>`, taken with
//!     `PutMode::Create` before any slot is touched: of two dispatchers placing the
//!     same attempt (a redelivered dispatch, a reconcile tick) one places it, the
//!     other waits for its answer, so an attempt never runs on two VMs. It stays
//!     after the attempt (later asks for that attempt get its ended VM, never a new
//!     one) and is pruned a day later.
//! - **Identity**: a slot's VM has a name, `<pool>-s<slot>-<nonce>`, tagged on the
//!   cloud's VM and named by the VM credential in its boot script. The agent asks
//!   the API for its orders with it (`GET /v1/agent/assignment`); the API reads the
//!   slot ([`Pools::orders`]) and answers with the assigned attempt's own credential
//!   while that attempt is live. A VM whose slot has been retired (or re-taken, with
//!   a new nonce) is told to retire.
//! - **Crash safety**: the slot is written before its VM is launched; a launch
//!   looks the slot's VM up first (EC2 also carries a `ClientToken`, ARM's `PUT` is
//!   by name), so a retried allocation finds the VM instead of making another. A
//!   placement left unfinished by a dead dispatcher is taken over after
//!   [`PLACING`], and the slot it may have claimed is found by its attempt.
//! - **Release** leaves the slot *draining*: its VM takes the next attempt only
//!   after its agent has asked for orders again, which it does once the work folder
//!   is clean; an allocation that finds every VM busy but one draining waits for
//!   it (up to [`DRAIN_WAIT`]) rather than take a capacity miss, which would wait
//!   out a backoff. A VM whose agent never asks again (hung, rebooted, gone) is
//!   retired.
//!   The agent asks during an attempt too, and kills the workload when the orders
//!   stop naming it (cancelled, timed out). An agent whose attempt got a
//!   preemption notice takes no more work.
//! - **Tending** (on the reconcile function's schedule, [`Pools::tend`]): slots
//!   whose VM is gone are freed, idle VMs above `min` retire after `idle`,
//!   interrupted and long-draining ones at once, pool VMs no slot names are
//!   terminated, `min` VMs are kept warm, and old placements pruned.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, UpdateVersion};
use respawn_core::pool::PoolSpec;
use respawn_core::ports::compute::{AllocateRequest, AllocationKey, Error, Orders, Vm, VmState};
use respawn_core::time::{Clock, SystemClock, Timestamp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::cloudvm::{Records, unavailable};

/// How often a claim or release is tried again after losing a race.
const ROUNDS: usize = 8;
/// A pool VM that no slot names is terminated once launched this long ago (its
/// launcher may still be about to record it).
const STRAY_GRACE: Duration = Duration::from_secs(300);
/// A placement unfinished for this long was left by a dispatcher that died.
const PLACING: Duration = Duration::from_secs(60);
/// A released VM whose agent has not asked for work within this long is retired.
const DRAIN_GRACE: Duration = Duration::from_secs(180);
/// How long an allocation that finds every VM busy waits for a draining one (its
/// agent asks for work every 2 s once its work folder is clean) …
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// … looking this often.
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// Placements of attempts placed longer ago than this are pruned (once over).
const PLACEMENT_KEPT: Duration = Duration::from_secs(24 * 3600);

/// One pool slot: its VM and what that VM runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    /// The VM's name (see the module docs).
    vm: String,
    /// The cloud's id of the VM (EC2's instance id, ARM's VM name), set once its
    /// launch answered.
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    launched_at: Option<Timestamp>,
    #[serde(default)]
    current: Option<AllocationKey>,
    /// The attempt it ran before (released).
    #[serde(default)]
    last: Option<AllocationKey>,
    #[serde(default)]
    idle_since: Option<Timestamp>,
    /// Released, and its agent has not asked for work since: not claimable yet.
    #[serde(default)]
    draining: bool,
    /// Interrupted, terminating or retiring: it takes no more attempts.
    #[serde(default)]
    closing: bool,
    created_at: Timestamp,
}

impl Slot {
    fn new(pool: &str, n: u32, current: Option<AllocationKey>, at: Timestamp) -> Slot {
        Slot {
            vm: vm_name(pool, n),
            instance: None,
            launched_at: None,
            idle_since: current.is_none().then_some(at),
            current,
            last: None,
            draining: false,
            closing: false,
            created_at: at,
        }
    }

    fn claimable(&self) -> bool {
        self.current.is_none() && self.instance.is_some() && !self.draining && !self.closing
    }
}

/// Where an attempt was placed: `slot` is `None` while a dispatcher is placing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Placement {
    pool: String,
    #[serde(default)]
    slot: Option<u32>,
    at: Timestamp,
}

/// A record as read, with the version a conditional write needs.
#[derive(Debug, Clone)]
struct Versioned<T> {
    value: T,
    version: UpdateVersion,
}

/// A slot as read.
#[derive(Debug, Clone)]
struct Read {
    pool: String,
    n: u32,
    slot: Slot,
    version: UpdateVersion,
}

/// The pools' records on an object store.
#[derive(Debug, Clone)]
struct PoolState {
    records: Records,
}

fn slot_path(pool: &str, n: u32) -> Path {
    Path::from(format!("pools/{pool}/{n}.json"))
}

fn placement_path(key: &AllocationKey) -> Path {
    Path::from(format!("pool-placements/{}.{}", key.job, key.attempt))
}

fn vm_name(pool: &str, n: u32) -> String {
    // Tells this slot's VM from the slot's earlier ones.
    let nonce: [u8; 4] = rand::random();
    format!("{pool}-s{n}-{}", hex::encode(nonce))
}

/// The pool and slot a VM name is of.
fn parse_vm(vm: &str) -> Option<(&str, u32)> {
    let mut parts = vm.rsplitn(3, '-');
    let (_nonce, slot, pool) = (parts.next()?, parts.next()?, parts.next()?);
    Some((pool, slot.strip_prefix('s')?.parse().ok()?))
}

fn now() -> Timestamp {
    SystemClock.now()
}

impl PoolState {
    fn new(store: Arc<dyn ObjectStore>) -> PoolState {
        PoolState {
            records: Records { store },
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<Versioned<T>>, Error> {
        Ok(self
            .records
            .get(path)
            .await?
            .map(|(value, version)| Versioned { value, version }))
    }

    /// Writes `value` at `path`: only if absent (`None`), or only over `version`.
    /// `false` when that condition failed.
    async fn put<T: Serialize>(
        &self,
        path: &Path,
        value: &T,
        version: Option<&UpdateVersion>,
    ) -> Result<bool, Error> {
        Ok(self.records.put(path, value, version).await?.is_some())
    }

    async fn delete(&self, path: &Path) -> Result<(), Error> {
        self.records.delete(path).await
    }

    async fn slot(&self, pool: &str, n: u32) -> Result<Option<Read>, Error> {
        Ok(self.get::<Slot>(&slot_path(pool, n)).await?.map(|v| Read {
            pool: pool.to_owned(),
            n,
            slot: v.value,
            version: v.version,
        }))
    }

    async fn slots(&self, pool: &str) -> Result<Vec<Read>, Error> {
        let prefix = Path::from(format!("pools/{pool}"));
        let metas: Vec<_> = self
            .records
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(unavailable)?;
        let numbers = metas.iter().filter_map(|m| {
            m.location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
                .and_then(|n| n.parse::<u32>().ok())
        });
        let mut slots: Vec<Read> =
            futures::future::try_join_all(numbers.map(|n| self.slot(pool, n)))
                .await?
                .into_iter()
                .flatten()
                .collect();
        slots.sort_by_key(|r| r.n);
        Ok(slots)
    }

    /// Writes `slot` over `read` if nobody wrote since.
    async fn update(&self, read: &Read, slot: &Slot) -> Result<bool, Error> {
        self.put(&slot_path(&read.pool, read.n), slot, Some(&read.version))
            .await
    }

    /// Applies `change` to slot `read` until it sticks; `Ok(None)` when the slot is
    /// gone or `change` declines (returns `false`) on what it reads.
    async fn change(
        &self,
        mut read: Read,
        change: impl Fn(&mut Slot) -> bool,
    ) -> Result<Option<Slot>, Error> {
        for _ in 0..ROUNDS {
            let mut slot = read.slot.clone();
            if !change(&mut slot) {
                return Ok(None);
            }
            if self.update(&read, &slot).await? {
                return Ok(Some(slot));
            }
            match self.slot(&read.pool, read.n).await? {
                Some(r) => read = r,
                None => return Ok(None),
            }
        }
        Err(Error::Unavailable("pool slot contention".into()))
    }

    /// Prunes placements older than [`PLACEMENT_KEPT`] whose attempt no slot runs.
    async fn prune_placements(&self, live: &BTreeSet<AllocationKey>) -> Result<(), Error> {
        let t = now();
        let old: Vec<Path> = self
            .records
            .store
            .list(Some(&Path::from("pool-placements")))
            .try_filter(|m| {
                let at = Timestamp::from_millis(m.last_modified.timestamp_millis().max(0) as u64);
                futures::future::ready(t.since(at) > PLACEMENT_KEPT)
            })
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(unavailable)?;
        for path in old {
            let running = path
                .filename()
                .and_then(|f| f.rsplit_once('.'))
                .and_then(|(job, attempt)| {
                    Some(AllocationKey {
                        job: job.parse().ok()?,
                        attempt: attempt.parse().ok()?,
                    })
                })
                .is_some_and(|k| live.contains(&k));
            if !running {
                self.delete(&path).await?;
            }
        }
        Ok(())
    }
}

/// One VM of a pool as its cloud lists it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    /// The cloud's id of it (see [`Slot::instance`]).
    pub id: String,
    /// The pool VM name it was launched as (its tag); `None` when it has none.
    pub vm: Option<String>,
    pub state: VmState,
    /// When it was launched, if the cloud says.
    pub launched: Option<Timestamp>,
    /// Ended, yet still there (and billed) until deleted: ARM keeps a VM whose
    /// creation failed, or that stopped.
    pub lingers: bool,
}

/// What a cloud does for its warm pools.
#[async_trait]
pub(crate) trait PoolCloud: Send + Sync {
    /// The VM of pool VM `vm` (booting its agent in pool mode with `vm`'s
    /// credential): the one already launched for it, else a new one. No capacity
    /// is [`Error::Capacity`].
    async fn launch(&self, pool: &PoolSpec, vm: &str) -> Result<Member, Error>;
    /// VM `id`'s state; `None` when the cloud does not list it.
    async fn state(&self, id: &str) -> Result<Option<VmState>, Error>;
    /// The VMs the cloud lists as pool `pool`'s.
    async fn members(&self, pool: &str) -> Result<Vec<Member>, Error>;
    async fn terminate(&self, ids: &[&str]) -> Result<(), Error>;
    /// How long a launched VM may go unlisted before it counts as gone (EC2 lists
    /// a new instance only after a while; ARM at once).
    fn unseen_grace(&self) -> Duration;
}

/// The warm pools of one cloud provider: which pool VM runs which attempt.
#[derive(Debug, Clone)]
pub struct Pools {
    state: PoolState,
    /// Every configured pool (single-use ones only choose where an attempt goes).
    specs: Vec<PoolSpec>,
}

impl Pools {
    /// The pools `specs` with their records in `state`, the broker's state bucket;
    /// `None` when none of them reuses VMs (then nothing is kept, and no call
    /// reads the bucket).
    pub fn new(specs: Vec<PoolSpec>, state: Arc<dyn ObjectStore>) -> Option<Pools> {
        specs.iter().any(|p| p.reuse).then(|| Pools {
            state: PoolState::new(state),
            specs,
        })
    }

    fn pool(&self, name: &str) -> Option<&PoolSpec> {
        self.specs.iter().find(|p| p.name == name && p.reuse)
    }

    fn reused(&self) -> impl Iterator<Item = &PoolSpec> {
        self.specs.iter().filter(|p| p.reuse)
    }

    /// The state of VM `id` as `cloud` sees it; one it does not list, launched
    /// longer than its [`PoolCloud::unseen_grace`] ago, is gone.
    async fn vm_state(
        cloud: &dyn PoolCloud,
        id: &str,
        launched: Option<Timestamp>,
    ) -> Result<VmState, Error> {
        Ok(match cloud.state(id).await? {
            Some(s) => s,
            None => unseen(cloud, launched, now()),
        })
    }

    /// Where `key` was placed, with the slot as it is now (`None` if gone).
    async fn placed(
        &self,
        key: &AllocationKey,
    ) -> Result<Option<(Placement, Option<Read>)>, Error> {
        let Some(p) = self.state.get::<Placement>(&placement_path(key)).await? else {
            return Ok(None);
        };
        let read = match p.value.slot {
            Some(n) => self.state.slot(&p.value.pool, n).await?,
            None => None,
        };
        Ok(Some((p.value, read)))
    }

    /// Runs `req` on a VM of `pool` (see the module docs).
    pub(crate) async fn allocate(
        &self,
        cloud: &dyn PoolCloud,
        req: &AllocateRequest,
        pool: &PoolSpec,
    ) -> Result<Vm, Error> {
        let state = &self.state;
        let key = &req.key;
        let path = placement_path(key);
        for _ in 0..ROUNDS {
            let t = now();
            let mine = Placement {
                pool: pool.name.clone(),
                slot: None,
                at: t,
            };
            match state.get::<Placement>(&path).await? {
                Some(Versioned {
                    value:
                        Placement {
                            pool,
                            slot: Some(n),
                            ..
                        },
                    ..
                }) => {
                    let pool = &pool;
                    let spec = self.pool(pool).unwrap_or(pool_spec_gone());
                    return match state.slot(pool, n).await? {
                        Some(r) if r.slot.current.as_ref() == Some(key) => {
                            self.launched(cloud, spec, r, key).await
                        }
                        // Released (or its VM retired): the attempt is over; no
                        // second VM for it.
                        Some(r) => Ok(slot_vm(spec, &r.slot, key, VmState::Terminated)),
                        None => Ok(ended_vm(pool, n, key, t)),
                    };
                }
                Some(p) if t.since(p.value.at) < PLACING => {
                    return Err(Error::Unavailable(
                        format!("attempt {key} is being placed in pool {}", p.value.pool).into(),
                    ));
                }
                // A placement its dispatcher left unfinished: taken over.
                Some(p) => {
                    if !state.put(&path, &mine, Some(&p.version)).await? {
                        continue;
                    }
                }
                None => {
                    if !state.put(&path, &mine, None).await? {
                        continue;
                    }
                }
            }
            return match self.place(pool, key).await {
                Ok(read) => {
                    let done = Placement {
                        slot: Some(read.n),
                        ..mine
                    };
                    // Only this dispatcher writes a placement it holds (until
                    // PLACING passes); the slot already names the attempt.
                    let body = serde_json::to_vec(&done).unwrap_or_default();
                    state
                        .records
                        .store
                        .put(&path, PutPayload::from(body))
                        .await
                        .map_err(unavailable)?;
                    self.launched(cloud, pool, read, key).await
                }
                Err(e) => {
                    // Nothing placed: a later try starts afresh.
                    state.delete(&path).await?;
                    Err(e)
                }
            };
        }
        Err(Error::Unavailable(
            format!(
                "pool {}: too many dispatchers at once; try again",
                pool.name
            )
            .into(),
        ))
    }

    /// Puts `key` on a slot of `pool`: the one that already names it (a dispatcher
    /// died before finishing the placement), an idle VM, or a new slot.
    async fn place(&self, pool: &PoolSpec, key: &AllocationKey) -> Result<Read, Error> {
        let state = &self.state;
        let until = tokio::time::Instant::now() + DRAIN_WAIT;
        let mut races = 0;
        while races < ROUNDS {
            let slots = state.slots(&pool.name).await?;
            if let Some(r) = slots.iter().find(|r| r.slot.current.as_ref() == Some(key)) {
                return Ok(r.clone());
            }
            if let Some(r) = slots.iter().find(|r| r.slot.claimable()) {
                let mut claimed = r.slot.clone();
                claimed.current = Some(key.clone());
                claimed.idle_since = None;
                if state.update(r, &claimed).await? {
                    info!(job_id = %key.job, attempt = key.attempt, pool = %pool.name, vm = %claimed.vm, instance = ?claimed.instance, "attempt assigned to a warm pool vm");
                    return Ok(Read {
                        slot: claimed,
                        ..r.clone()
                    });
                }
                races += 1;
                continue;
            }
            let taken: BTreeSet<u32> = slots.iter().map(|r| r.n).collect();
            let Some(free) = (0..pool.max as u32).find(|n| !taken.contains(n)) else {
                // A VM whose attempt just ended takes work as soon as its agent
                // asks again (within seconds): worth waiting for, rather than
                // a capacity backoff that is tens of seconds or more.
                let draining = slots
                    .iter()
                    .any(|r| r.slot.current.is_none() && r.slot.draining && !r.slot.closing);
                if draining && tokio::time::Instant::now() < until {
                    tokio::time::sleep(DRAIN_POLL).await;
                    continue;
                }
                return Err(Error::Capacity(format!(
                    "pool {} has all its {} VM(s) busy",
                    pool.name, pool.max
                )));
            };
            let slot = Slot::new(&pool.name, free, Some(key.clone()), now());
            if state.put(&slot_path(&pool.name, free), &slot, None).await?
                && let Some(read) = state.slot(&pool.name, free).await?
            {
                return Ok(read);
            }
            races += 1;
        }
        Err(Error::Unavailable(
            format!(
                "pool {}: too many dispatchers at once; try again",
                pool.name
            )
            .into(),
        ))
    }

    /// The slot's VM as `key`'s, launched if it is not yet (a slot is written first).
    async fn launched(
        &self,
        cloud: &dyn PoolCloud,
        pool: &PoolSpec,
        read: Read,
        key: &AllocationKey,
    ) -> Result<Vm, Error> {
        if let Some(id) = &read.slot.instance {
            let state = Self::vm_state(cloud, id, read.slot.launched_at).await?;
            return Ok(slot_vm(pool, &read.slot, key, state));
        }
        let member = match cloud.launch(pool, &read.slot.vm).await {
            Ok(m) => m,
            Err(e @ Error::Capacity(_)) => {
                // Nothing runs in the slot: it is freed, and the attempt's placement
                // with it, for the next try (under the same attempt: no budget
                // spent). Both conditionally: another dispatcher of the attempt
                // may have met the same miss, and a third placed it anew since.
                if self.free_slot(&read).await? {
                    self.unplace(key, &read).await?;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        info!(job_id = %key.job, attempt = key.attempt, pool = %pool.name, vm = %read.slot.vm, instance = %member.id, spot = pool.spot, "pool vm launched");
        let mut slot = read.slot.clone();
        let read_after = read.clone();
        let id = match self.record_instance(cloud, read, &member.id).await {
            Ok(id) => id,
            Err(e @ Error::Capacity(_)) => {
                self.unplace(key, &read_after).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        slot.instance = Some(id.clone());
        let mut vm = slot_vm(pool, &slot, key, member.state);
        if let Some(at) = member.launched {
            vm.created_at = at;
        }
        Ok(vm)
    }

    /// Frees slot `read` unless it changed since it was read (`false` then): closed
    /// first with a conditional write, so that of two dispatchers freeing it one
    /// does, and nothing claims it meanwhile; then deleted.
    async fn free_slot(&self, read: &Read) -> Result<bool, Error> {
        let mut closing = read.slot.clone();
        closing.closing = true;
        if !self.state.update(read, &closing).await? {
            return Ok(false);
        }
        self.state.delete(&slot_path(&read.pool, read.n)).await?;
        Ok(true)
    }

    /// Undoes `key`'s placement on slot `read`, if it still names that slot: left as
    /// an unfinished placement from long ago, which the next allocation of `key`
    /// takes over (a conditional write: a newer placement is never undone).
    async fn unplace(&self, key: &AllocationKey, read: &Read) -> Result<(), Error> {
        let path = placement_path(key);
        let Some(p) = self.state.get::<Placement>(&path).await? else {
            return Ok(());
        };
        if p.value.pool != read.pool || p.value.slot != Some(read.n) {
            return Ok(());
        }
        let undone = Placement {
            pool: read.pool.clone(),
            slot: None,
            at: Timestamp(0),
        };
        self.state.put(&path, &undone, Some(&p.version)).await?;
        Ok(())
    }

    /// Notes the VM in its slot; the id the slot names in the end (should another
    /// launch have been recorded first, this one is terminated).
    async fn record_instance(
        &self,
        cloud: &dyn PoolCloud,
        read: Read,
        id: &str,
    ) -> Result<String, Error> {
        let vm = read.slot.vm.clone();
        let t = now();
        let recorded = self
            .state
            .change(read, |s| {
                if s.vm != vm || s.instance.is_some() {
                    return false;
                }
                s.instance = Some(id.to_owned());
                s.launched_at = Some(t);
                true
            })
            .await?;
        if recorded.is_some() {
            return Ok(id.to_owned());
        }
        let (pool, n) = parse_vm(&vm).unwrap_or_default();
        let now_there = self.state.slot(pool, n).await?;
        match now_there.and_then(|r| (r.slot.vm == vm).then_some(r.slot.instance)) {
            Some(Some(other)) if other == id => Ok(other),
            Some(Some(other)) => {
                warn!(vm = %vm, instance = id, kept = %other, "a second instance of one pool vm; terminating it");
                cloud.terminate(&[id]).await?;
                Ok(other)
            }
            // Retired meanwhile: the VM is no pool's.
            _ => {
                cloud.terminate(&[id]).await?;
                Err(Error::Capacity("the pool VM was retired".into()))
            }
        }
    }

    /// Ends `key`'s attempt on its pool VM: the slot drains (see the module docs).
    /// Whether `key` was placed in a pool at all.
    pub async fn release(&self, key: &AllocationKey) -> Result<bool, Error> {
        let Some((placement, read)) = self.placed(key).await? else {
            return Ok(false);
        };
        let Some(read) = read else {
            return Ok(placement.slot.is_some());
        };
        let t = now();
        let released = self
            .state
            .change(read, |s| {
                if s.current.as_ref() != Some(key) {
                    return false;
                }
                s.last = s.current.take();
                s.idle_since = Some(t);
                s.draining = true;
                true
            })
            .await?;
        if let Some(s) = released {
            info!(job_id = %key.job, attempt = key.attempt, vm = %s.vm, "attempt released; pool vm drains");
        }
        Ok(true)
    }

    /// `key`'s VM if it was placed in a pool.
    pub(crate) async fn describe(
        &self,
        cloud: &dyn PoolCloud,
        key: &AllocationKey,
    ) -> Result<Option<Vm>, Error> {
        let Some((placement, read)) = self.placed(key).await? else {
            return Ok(None);
        };
        let spec = self.pool(&placement.pool).unwrap_or(pool_spec_gone());
        let Some(read) = read else {
            return Ok(placement
                .slot
                .map(|n| ended_vm(&placement.pool, n, key, placement.at)));
        };
        if read.slot.current.as_ref() != Some(key) {
            return Ok(Some(slot_vm(spec, &read.slot, key, VmState::Terminated)));
        }
        let state = match &read.slot.instance {
            Some(id) => Self::vm_state(cloud, id, read.slot.launched_at).await?,
            None => VmState::Requested,
        };
        Ok(Some(slot_vm(spec, &read.slot, key, state)))
    }

    /// The attempts running on pool VMs, with their VMs' states as `listed` (every
    /// VM the cloud lists, by id) has them.
    pub(crate) async fn list(
        &self,
        cloud: &dyn PoolCloud,
        listed: &BTreeMap<String, VmState>,
    ) -> Result<Vec<Vm>, Error> {
        let t = now();
        let mut vms = Vec::new();
        for pool in self.reused() {
            for r in self.state.slots(&pool.name).await? {
                let Some(key) = &r.slot.current else { continue };
                let vm_state = match r.slot.instance.as_deref() {
                    Some(id) => listed
                        .get(id)
                        .copied()
                        .unwrap_or_else(|| unseen(cloud, r.slot.launched_at, t)),
                    None => VmState::Requested,
                };
                vms.push(slot_vm(pool, &r.slot, key, vm_state));
            }
        }
        Ok(vms)
    }

    /// The attempt pool VM `vm` (cloud id `id`) runs; `None` when idle.
    pub async fn key_of(&self, vm: &str, id: &str) -> Result<Option<AllocationKey>, Error> {
        Ok(self.slot_of(vm, id).await?.and_then(|r| r.slot.current))
    }

    /// The slot of pool VM `vm` while it is cloud VM `id`.
    async fn slot_of(&self, vm: &str, id: &str) -> Result<Option<Read>, Error> {
        let Some((pool, n)) = parse_vm(vm) else {
            return Ok(None);
        };
        Ok(self
            .state
            .slot(pool, n)
            .await?
            .filter(|r| r.slot.vm == vm && r.slot.instance.as_deref() == Some(id)))
    }

    /// The cloud warned of or began the end of pool VM `vm` (cloud id `id`): its
    /// slot takes no more attempts (what it runs now is told by the event, like
    /// any attempt's).
    pub async fn closing(&self, vm: &str, id: &str) -> Result<(), Error> {
        let Some(read) = self.slot_of(vm, id).await? else {
            return Ok(());
        };
        let closed = self
            .state
            .change(read, |s| {
                let first = !s.closing;
                s.closing = true;
                first
            })
            .await?;
        if let Some(s) = closed {
            info!(vm = %s.vm, instance = id, "pool vm closing; it takes no more attempts");
        }
        Ok(())
    }

    /// Keeps every pool's size (see the module docs). Run on a schedule (the
    /// reconcile function). One pool's trouble does not stop the others'.
    pub(crate) async fn tend(&self, cloud: &dyn PoolCloud) -> Result<(), Error> {
        let mut first_error = None;
        let mut running = BTreeSet::new();
        for pool in self.reused() {
            match self.tend_pool(cloud, pool).await {
                Ok(busy) => running.extend(busy),
                Err(e) => {
                    warn!(pool = %pool.name, error = %e, "cannot tend the pool");
                    first_error.get_or_insert(e);
                }
            }
        }
        if first_error.is_none()
            && let Err(e) = self.state.prune_placements(&running).await
        {
            warn!(error = %e, "cannot prune pool placements");
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Tends one pool; the attempts its VMs run.
    async fn tend_pool(
        &self,
        cloud: &dyn PoolCloud,
        pool: &PoolSpec,
    ) -> Result<Vec<AllocationKey>, Error> {
        let state = &self.state;
        // Before the listing: a slot recorded after it is not counted as unlisted.
        let t = now();
        let members: BTreeMap<String, Member> = cloud
            .members(&pool.name)
            .await?
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect();
        let slots = state.slots(&pool.name).await?;
        let mut kept = Vec::new();
        for r in &slots {
            let s = &r.slot;
            let gone = match s.instance.as_deref() {
                Some(id) => match members.get(id) {
                    Some(m) => m.state == VmState::Terminated,
                    None => unseen(cloud, s.launched_at, t) == VmState::Terminated,
                },
                None => false,
            };
            let drained_out = s.draining && s.idle_since.is_some_and(|i| t.since(i) > DRAIN_GRACE);
            if s.current.is_none() && (gone || s.closing || drained_out) {
                if drained_out && !gone {
                    warn!(pool = %pool.name, vm = %s.vm, "the pool vm's agent did not ask for work after its attempt; retiring it");
                }
                self.retire(cloud, r).await?;
            } else if gone {
                // Its attempt learns of the loss from its VM's state; the slot goes
                // once that attempt is released.
                state
                    .change(r.clone(), |s| !std::mem::replace(&mut s.closing, true))
                    .await?;
            } else if s.current.is_none() && s.instance.is_none() {
                // A warm VM whose launch did not finish (its launcher died).
                match self.launched_idle(cloud, pool, r.clone()).await {
                    Ok(()) => kept.push(r),
                    Err(e) => {
                        warn!(pool = %pool.name, vm = %s.vm, error = %e, "cannot launch a warm pool vm")
                    }
                }
            } else {
                kept.push(r);
            }
        }
        // Idle the longest first, while more than `min` are left.
        let mut live = kept.iter().filter(|r| !r.slot.closing).count();
        let mut idle: Vec<&&Read> = kept
            .iter()
            .filter(|r| {
                r.slot.claimable() && r.slot.idle_since.is_some_and(|i| t.since(i) >= pool.idle)
            })
            .collect();
        idle.sort_by_key(|r| r.slot.idle_since);
        for r in idle {
            if live <= pool.min {
                break;
            }
            if self.retire(cloud, r).await? {
                live -= 1;
            }
        }
        // VMs of the pool that no slot names (a launch whose slot was freed or
        // retired before it was recorded) would run on unseen.
        let named: BTreeSet<&str> = slots.iter().map(|r| r.slot.vm.as_str()).collect();
        let strays: Vec<&str> = members
            .values()
            .filter(|m| m.state != VmState::Terminated || m.lingers)
            .filter(|m| m.vm.as_deref().is_none_or(|vm| !named.contains(vm)))
            .filter(|m| m.launched.is_some_and(|at| t.since(at) > STRAY_GRACE))
            .map(|m| m.id.as_str())
            .collect();
        if !strays.is_empty() {
            warn!(pool = %pool.name, instances = ?strays, "terminating pool vms no slot names");
            cloud.terminate(&strays).await?;
        }
        let taken: BTreeSet<u32> = state.slots(&pool.name).await?.iter().map(|r| r.n).collect();
        let mut free = (0..pool.max as u32).filter(|n| !taken.contains(n));
        while live < pool.min {
            let Some(n) = free.next() else { break };
            let slot = Slot::new(&pool.name, n, None, t);
            if state.put(&slot_path(&pool.name, n), &slot, None).await?
                && let Some(read) = state.slot(&pool.name, n).await?
            {
                self.launched_idle(cloud, pool, read).await?;
                live += 1;
            }
        }
        Ok(slots.into_iter().filter_map(|r| r.slot.current).collect())
    }

    async fn launched_idle(
        &self,
        cloud: &dyn PoolCloud,
        pool: &PoolSpec,
        read: Read,
    ) -> Result<(), Error> {
        match cloud.launch(pool, &read.slot.vm).await {
            Ok(m) => {
                info!(pool = %pool.name, vm = %read.slot.vm, instance = %m.id, spot = pool.spot, "warm pool vm launched");
                self.record_instance(cloud, read, &m.id).await.map(drop)
            }
            Err(e @ Error::Capacity(_)) => {
                self.free_slot(&read).await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Terminates an idle slot's VM and frees the slot, unless a dispatcher claims
    /// it first (`false`).
    async fn retire(&self, cloud: &dyn PoolCloud, read: &Read) -> Result<bool, Error> {
        let mut closing = read.slot.clone();
        closing.closing = true;
        if !self.state.update(read, &closing).await? {
            return Ok(false);
        }
        if let Some(id) = &read.slot.instance {
            cloud.terminate(&[id.as_str()]).await?;
        }
        self.state.delete(&slot_path(&read.pool, read.n)).await?;
        info!(pool = %read.pool, vm = %read.slot.vm, instance = ?read.slot.instance, "pool vm retired");
        Ok(true)
    }

    /// What pool VM `vm` is to do: see [`Orders`]. Asking is how a drained VM's
    /// agent says it is clean and alive: its slot becomes claimable.
    pub async fn orders(&self, vm: &str) -> Result<Orders, Error> {
        let Some((pool, n)) = parse_vm(vm) else {
            return Ok(Orders::Retire);
        };
        if self.pool(pool).is_none() {
            return Ok(Orders::Retire);
        }
        let Some(read) = self.state.slot(pool, n).await?.filter(|r| r.slot.vm == vm) else {
            return Ok(Orders::Retire);
        };
        match &read.slot.current {
            Some(key) => return Ok(Orders::Run(key.clone())),
            None if read.slot.closing => return Ok(Orders::Retire),
            None => {}
        }
        if read.slot.draining {
            // A conflict means the slot changed meanwhile (claimed, closed): the
            // next ask sees what it became.
            self.state
                .change(read, |s| {
                    s.current.is_none() && std::mem::take(&mut s.draining)
                })
                .await?;
        }
        Ok(Orders::Wait)
    }
}

/// The state of a launched VM its cloud does not list: gone once launched longer
/// than the cloud's grace ago.
fn unseen(cloud: &dyn PoolCloud, launched: Option<Timestamp>, t: Timestamp) -> VmState {
    // Strictly past: a VM recorded after `t` (after its cloud's listing) is not
    // yet listed, not gone.
    if launched.is_some_and(|at| at < t && t.since(at) >= cloud.unseen_grace()) {
        VmState::Terminated
    } else {
        VmState::Requested
    }
}

/// The settings of a pool no longer configured (its records outlive it).
fn pool_spec_gone() -> &'static PoolSpec {
    static GONE: std::sync::OnceLock<PoolSpec> = std::sync::OnceLock::new();
    GONE.get_or_init(|| PoolSpec::new("gone", 0, 1))
}

/// The VM of `key` on a slot.
fn slot_vm(pool: &PoolSpec, slot: &Slot, key: &AllocationKey, state: VmState) -> Vm {
    Vm {
        id: slot.instance.clone().unwrap_or_else(|| slot.vm.clone()),
        key: key.clone(),
        state,
        spot: pool.spot,
        nodes: 1,
        created_at: slot.created_at,
    }
}

/// The ended VM of an attempt whose slot is gone.
fn ended_vm(pool: &str, n: u32, key: &AllocationKey, at: Timestamp) -> Vm {
    Vm {
        id: format!("{pool}-s{n}"),
        key: key.clone(),
        state: VmState::Terminated,
        spot: true,
        nodes: 1,
        created_at: at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_say_their_pool_and_slot() {
        let name = vm_name("gpu-a10g", 3);
        assert_eq!(parse_vm(&name), Some(("gpu-a10g", 3)));
        assert!(name.starts_with("gpu-a10g-s3-"), "{name}");
        assert_eq!(parse_vm("gpu"), None);
        assert_eq!(parse_vm("gpu-x3-00"), None);
    }
}

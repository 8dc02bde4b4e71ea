//! Warm pools on EC2: instances that run attempt after attempt.
//!
//! - **State** is one record per pool slot in the broker's state bucket (which no
//!   agent can read), `pools/<pool>/<slot>.json` with `slot` in `0..max`, written
//!   with conditional puts. A slot is taken with `PutMode::Create`, so a pool never
//!   has more than `max` VMs however many dispatchers run; an idle VM is claimed,
//!   released or retired with `PutMode::Update` on the ETag it was read at, so two
//!   dispatchers never claim one VM and a retirement never takes a claimed one.
//! - **Identity**: a slot's VM has a name, `<pool>-s<slot>-<nonce>`, tagged on the
//!   instance (`respawn:vm`) and named by the VM credential in its user data. The
//!   agent asks the API for its orders with it (`GET /v1/agent/assignment`); the API
//!   reads the slot ([`Ec2Compute::orders`]) and answers with the assigned attempt's
//!   own credential. A VM whose slot has since been retired (or re-taken, with a new
//!   nonce) is told to retire.
//! - **Crash safety**: the slot is written before its instance is launched; the
//!   launch carries a `ClientToken` from the VM name and is looked up by its tag
//!   first, so a retried allocation finds the instance instead of making another.
//! - **Release** marks the slot idle and keeps the attempt as `last`, so that
//!   `describe` calls it terminated there. The agent, which asks for its orders
//!   during an attempt too, kills the workload when they change.
//! - **Tending** (on the reconcile function's schedule, [`Ec2Compute::tend_pools`]):
//!   slots whose instance is gone are freed, idle VMs above `min` retire after
//!   `idle`, interrupted ones at once, and `min` VMs are kept warm.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use respawn_core::pool::PoolSpec;
use respawn_core::ports::compute::{AllocateRequest, AllocationKey, Error, Orders, Vm, VmState};
use respawn_core::spec::Resources;
use respawn_core::time::{Clock, SystemClock, Timestamp};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Boot, Ec2Compute, Ec2Error, Instance, Launch, TAG_POOL, TAG_VM};

/// How often a claim or release is tried again after losing a race.
const ROUNDS: usize = 8;
/// A slot's instance not seen by `DescribeInstances` for this long is gone (a new
/// one may not be visible at once).
const UNSEEN_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// One pool slot: its VM and what that VM runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Slot {
    /// The VM's name (see the module docs).
    vm: String,
    /// Set once `RunInstances` answered.
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    current: Option<AllocationKey>,
    /// The attempt it ran before (released).
    #[serde(default)]
    last: Option<AllocationKey>,
    #[serde(default)]
    idle_since: Option<Timestamp>,
    /// Interrupted, terminating or retiring: it takes no more attempts.
    #[serde(default)]
    closing: bool,
    created_at: Timestamp,
}

/// A slot as read, with the version a conditional write needs.
#[derive(Debug, Clone)]
struct Read {
    pool: String,
    n: u32,
    slot: Slot,
    version: UpdateVersion,
}

/// The pools' slots on an object store.
#[derive(Debug, Clone)]
pub struct PoolState {
    store: Arc<dyn ObjectStore>,
}

fn slot_path(pool: &str, n: u32) -> Path {
    Path::from(format!("pools/{pool}/{n}.json"))
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable(Box::new(e))
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

impl PoolState {
    pub fn new(store: Arc<dyn ObjectStore>) -> PoolState {
        PoolState { store }
    }

    async fn get(&self, pool: &str, n: u32) -> Result<Option<Read>, Error> {
        let got = match self.store.get(&slot_path(pool, n)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(unavailable)?;
        let slot = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("pool {pool} slot {n}: unreadable record: {e}")))?;
        Ok(Some(Read {
            pool: pool.to_owned(),
            n,
            slot,
            version,
        }))
    }

    async fn list(&self, pool: &str) -> Result<Vec<Read>, Error> {
        let prefix = Path::from(format!("pools/{pool}"));
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut slots = Vec::new();
        for m in metas {
            let n = m
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
                .and_then(|n| n.parse().ok());
            if let Some(n) = n
                && let Some(read) = self.get(pool, n).await?
            {
                slots.push(read);
            }
        }
        slots.sort_by_key(|r| r.n);
        Ok(slots)
    }

    /// Takes slot `n`; `false` if it is taken.
    async fn create(&self, pool: &str, n: u32, slot: &Slot) -> Result<bool, Error> {
        let body = PutPayload::from(serde_json::to_vec(slot).unwrap_or_default());
        match self
            .store
            .put_opts(&slot_path(pool, n), body, PutOptions::from(PutMode::Create))
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Writes `slot` over `read` if nobody wrote since; `false` if somebody did.
    async fn update(&self, read: &Read, slot: &Slot) -> Result<bool, Error> {
        let body = PutPayload::from(serde_json::to_vec(slot).unwrap_or_default());
        let opts = PutOptions::from(PutMode::Update(read.version.clone()));
        match self
            .store
            .put_opts(&slot_path(&read.pool, read.n), body, opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete(&self, pool: &str, n: u32) -> Result<(), Error> {
        match self.store.delete(&slot_path(pool, n)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

fn now() -> Timestamp {
    SystemClock.now()
}

impl Ec2Compute {
    fn pool_state(&self) -> Result<&PoolState, Error> {
        self.pool_state
            .as_ref()
            .ok_or_else(|| Error::Invalid("pools need the broker's state bucket".into()))
    }

    /// The reusable pool `req` runs in, if any.
    pub(super) fn pool_for(&self, req: &AllocateRequest) -> Result<Option<PoolSpec>, Error> {
        Ok(PoolSpec::choose(&self.cfg.pools, req)?
            .filter(|p| p.reuse)
            .cloned())
    }

    /// Every pool's slots, the reusable pools only.
    async fn all_slots(&self) -> Result<Vec<Read>, Error> {
        let state = self.pool_state()?;
        let mut all = Vec::new();
        for pool in self.cfg.pools.iter().filter(|p| p.reuse) {
            all.extend(state.list(&pool.name).await?);
        }
        Ok(all)
    }

    /// The slot whose VM runs (or ran) `key`.
    async fn slot_of(&self, key: &AllocationKey) -> Result<Option<Read>, Error> {
        if self.pool_state.is_none() {
            return Ok(None);
        }
        Ok(self
            .all_slots()
            .await?
            .into_iter()
            .find(|r| r.slot.current.as_ref() == Some(key) || r.slot.last.as_ref() == Some(key)))
    }

    pub(super) async fn allocate_pooled(
        &self,
        req: &AllocateRequest,
        pool: &PoolSpec,
    ) -> Result<Vm, Error> {
        let state = self.pool_state()?;
        let key = &req.key;
        for _ in 0..ROUNDS {
            let slots = state.list(&pool.name).await?;
            if let Some(r) = slots.iter().find(|r| r.slot.current.as_ref() == Some(key)) {
                return self.launched(pool, r.clone(), key).await;
            }
            if let Some(r) = slots.iter().find(|r| r.slot.last.as_ref() == Some(key)) {
                // Released: the attempt is over on that VM; no second VM for it.
                return Ok(slot_vm(pool, &r.slot, key, VmState::Terminated));
            }
            let idle = slots
                .iter()
                .find(|r| r.slot.current.is_none() && r.slot.instance.is_some() && !r.slot.closing);
            if let Some(r) = idle {
                let mut claimed = r.slot.clone();
                claimed.current = Some(key.clone());
                claimed.idle_since = None;
                if state.update(r, &claimed).await? {
                    info!(job_id = %key.job, attempt = key.attempt, pool = %pool.name, vm = %claimed.vm, instance = ?claimed.instance, "attempt assigned to a warm pool vm");
                    return Ok(slot_vm(pool, &claimed, key, VmState::Running));
                }
                continue;
            }
            let taken: BTreeSet<u32> = slots.iter().map(|r| r.n).collect();
            let Some(free) = (0..pool.max as u32).find(|n| !taken.contains(n)) else {
                return Err(Error::Capacity(format!(
                    "pool {} has all its {} VM(s) busy",
                    pool.name, pool.max
                )));
            };
            let slot = Slot {
                vm: vm_name(&pool.name, free),
                instance: None,
                current: Some(key.clone()),
                last: None,
                idle_since: None,
                closing: false,
                created_at: now(),
            };
            if state.create(&pool.name, free, &slot).await? {
                let Some(read) = state.get(&pool.name, free).await? else {
                    continue;
                };
                return self.launched(pool, read, key).await;
            }
        }
        Err(Error::Unavailable(
            format!(
                "pool {}: too many dispatchers at once; try again",
                pool.name
            )
            .into(),
        ))
    }

    /// The slot's VM, launched if it is not yet (a slot is written first).
    async fn launched(
        &self,
        pool: &PoolSpec,
        read: Read,
        key: &AllocationKey,
    ) -> Result<Vm, Error> {
        if let Some(id) = &read.slot.instance {
            let state = self.instance_state(id).await?;
            let mut vm = slot_vm(pool, &read.slot, key, state);
            vm.id.clone_from(id);
            return Ok(vm);
        }
        let instance = match self.launch_pool_vm(pool, &read.slot.vm).await {
            Ok(i) => i,
            Err(e @ Error::Capacity(_)) => {
                // Nothing runs in the slot: free it for the next try.
                self.pool_state()?.delete(&read.pool, read.n).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.record_instance(read, &instance.id).await?;
        let mut vm = instance.to_pool_vm(key)?;
        vm.spot = pool.spot;
        Ok(vm)
    }

    /// Notes the instance in its slot (whoever else wrote it since).
    async fn record_instance(&self, mut read: Read, id: &str) -> Result<(), Error> {
        let state = self.pool_state()?;
        for _ in 0..ROUNDS {
            if read.slot.instance.as_deref() == Some(id) {
                return Ok(());
            }
            let mut slot = read.slot.clone();
            slot.instance = Some(id.to_owned());
            if state.update(&read, &slot).await? {
                return Ok(());
            }
            match state.get(&read.pool, read.n).await? {
                Some(r) if r.slot.vm == read.slot.vm => read = r,
                // Retired meanwhile: the instance is no pool's.
                _ => {
                    self.terminate(&[id])
                        .await
                        .map_err(Ec2Error::into_compute)?;
                    return Err(Error::Capacity("the pool VM was retired".into()));
                }
            }
        }
        Err(Error::Unavailable("pool slot contention".into()))
    }

    /// The instance of VM `vm`: the one already launched for it, else a new one.
    async fn launch_pool_vm(&self, pool: &PoolSpec, vm: &str) -> Result<Instance, Error> {
        let found = self
            .instances(&[(TAG_VM, vm.to_owned())], None)
            .await
            .map_err(Ec2Error::into_compute)?;
        if let Some(i) = found
            .into_iter()
            .min_by(|a, b| a.launch_time.cmp(&b.launch_time))
        {
            return Ok(i);
        }
        let resources = Resources {
            gpus: pool.gpus,
            gpu_type: pool.gpu_type.clone(),
            ..Resources::default()
        };
        let launch = Launch {
            instance_type: self
                .cfg
                .instance_types
                .choose(&resources, &self.cfg.cpu_instance_type)?,
            client_token: super::client_token_of(&self.cfg.stack, vm),
            boot: Boot::Pool(vm),
            tags: vec![(TAG_POOL, pool.name.clone()), (TAG_VM, vm.to_owned())],
            spot: pool.spot,
            max_price: None,
        };
        let instance = self.run_instance(&launch).await?;
        info!(pool = %pool.name, vm, instance = %instance.id, spot = pool.spot, "pool vm launched");
        Ok(instance)
    }

    async fn instance_state(&self, id: &str) -> Result<VmState, Error> {
        match self.instances(&[], Some(id)).await {
            Ok(found) => Ok(found
                .iter()
                .find(|i| i.id == id)
                .map_or(VmState::Requested, Instance::state)),
            Err(e) if e.code.starts_with("InvalidInstanceID") => Ok(VmState::Requested),
            Err(e) => Err(e.into_compute()),
        }
    }

    /// Ends `key`'s attempt on its pool VM: the slot is idle again. `false` when no
    /// pool VM runs it.
    pub(super) async fn release_pooled(&self, key: &AllocationKey) -> Result<bool, Error> {
        let Some(mut read) = self.slot_of(key).await? else {
            return Ok(false);
        };
        let state = self.pool_state()?;
        for _ in 0..ROUNDS {
            if read.slot.current.as_ref() != Some(key) {
                return Ok(true);
            }
            let mut slot = read.slot.clone();
            slot.last = slot.current.take();
            slot.idle_since = Some(now());
            if state.update(&read, &slot).await? {
                info!(job_id = %key.job, attempt = key.attempt, vm = %slot.vm, "attempt released; pool vm idle");
                return Ok(true);
            }
            match state.get(&read.pool, read.n).await? {
                Some(r) => read = r,
                None => return Ok(true),
            }
        }
        Err(Error::Unavailable("pool slot contention".into()))
    }

    pub(super) async fn describe_pooled(&self, key: &AllocationKey) -> Result<Option<Vm>, Error> {
        let Some(read) = self.slot_of(key).await? else {
            return Ok(None);
        };
        let Some(pool) = self.cfg.pools.iter().find(|p| p.name == read.pool) else {
            return Ok(None);
        };
        if read.slot.current.as_ref() != Some(key) {
            return Ok(Some(slot_vm(pool, &read.slot, key, VmState::Terminated)));
        }
        let state = match &read.slot.instance {
            Some(id) => self.instance_state(id).await?,
            None => VmState::Requested,
        };
        Ok(Some(slot_vm(pool, &read.slot, key, state)))
    }

    /// The attempts running on pool VMs, with their instances' states.
    pub(super) async fn list_pooled(&self, instances: &[Instance]) -> Result<Vec<Vm>, Error> {
        if self.pool_state.is_none() {
            return Ok(Vec::new());
        }
        let by_id: BTreeMap<&str, &Instance> =
            instances.iter().map(|i| (i.id.as_str(), i)).collect();
        let mut vms = Vec::new();
        for r in self.all_slots().await? {
            let (Some(key), Some(pool)) = (
                &r.slot.current,
                self.cfg.pools.iter().find(|p| p.name == r.pool),
            ) else {
                continue;
            };
            let state = match r.slot.instance.as_deref().and_then(|id| by_id.get(id)) {
                Some(i) => i.state(),
                None => VmState::Requested,
            };
            vms.push(slot_vm(pool, &r.slot, key, state));
        }
        Ok(vms)
    }

    /// The attempt pool instance `instance_id` runs; `None` when idle or not a pool
    /// VM's.
    pub(super) async fn pooled_key_of(
        &self,
        instance_id: &str,
    ) -> Result<Option<AllocationKey>, Error> {
        Ok(self
            .slot_of_instance(instance_id)
            .await?
            .and_then(|r| r.slot.current))
    }

    async fn slot_of_instance(&self, instance_id: &str) -> Result<Option<Read>, Error> {
        if self.pool_state.is_none() {
            return Ok(None);
        }
        Ok(self
            .all_slots()
            .await?
            .into_iter()
            .find(|r| r.slot.instance.as_deref() == Some(instance_id)))
    }

    /// EC2 warned of or began the end of `instance_id`: its slot takes no more
    /// attempts (what it runs now is told by the event, like any attempt's).
    pub async fn pool_vm_closing(&self, instance_id: &str) -> Result<(), Error> {
        let state = match self.pool_state.as_ref() {
            Some(s) => s,
            None => return Ok(()),
        };
        for _ in 0..ROUNDS {
            let Some(read) = self.slot_of_instance(instance_id).await? else {
                return Ok(());
            };
            if read.slot.closing {
                return Ok(());
            }
            let mut slot = read.slot.clone();
            slot.closing = true;
            if state.update(&read, &slot).await? {
                info!(vm = %slot.vm, instance = instance_id, "pool vm closing; it takes no more attempts");
                return Ok(());
            }
        }
        Err(Error::Unavailable("pool slot contention".into()))
    }

    /// Keeps every pool's size: frees the slots of instances that are gone, retires
    /// idle VMs above `min` after `idle` (and closing ones at once), launches VMs up
    /// to `min`. Run on a schedule (the reconcile function).
    pub async fn tend_pools(&self) -> Result<(), Error> {
        if self.pool_state.is_none() {
            return Ok(());
        }
        for pool in self.cfg.pools.iter().filter(|p| p.reuse) {
            self.tend_pool(pool).await?;
        }
        Ok(())
    }

    async fn tend_pool(&self, pool: &PoolSpec) -> Result<(), Error> {
        let state = self.pool_state()?;
        let instances: BTreeMap<String, Instance> = self
            .instances(&[(TAG_POOL, pool.name.clone())], None)
            .await
            .map_err(Ec2Error::into_compute)?
            .into_iter()
            .map(|i| (i.id.clone(), i))
            .collect();
        let t = now();
        let mut kept = Vec::new();
        for r in state.list(&pool.name).await? {
            let s = &r.slot;
            let gone = match s.instance.as_deref() {
                Some(id) => match instances.get(id) {
                    Some(i) => i.state() == VmState::Terminated,
                    None => t.since(s.created_at) > UNSEEN_GRACE,
                },
                None => false,
            };
            if gone && s.current.is_none() {
                info!(pool = %pool.name, vm = %s.vm, "pool vm gone; slot freed");
                state.delete(&r.pool, r.n).await?;
            } else if gone {
                // Its attempt learns of the loss from its own VM's state; the slot
                // is freed once that attempt is released.
                if !s.closing {
                    let mut closing = s.clone();
                    closing.closing = true;
                    state.update(&r, &closing).await?;
                }
            } else if s.current.is_none() && s.closing {
                self.retire(&r).await?;
            } else {
                if s.current.is_none() && s.instance.is_none() {
                    // A warm VM whose launch did not finish (its launcher died).
                    if let Err(e) = self.launched_idle(pool, r.clone()).await {
                        warn!(pool = %pool.name, vm = %s.vm, error = %e, "cannot launch a warm pool vm");
                        continue;
                    }
                }
                kept.push(r);
            }
        }
        // Idle the longest first, while more than `min` are left.
        let mut live = kept.iter().filter(|r| !r.slot.closing).count();
        let mut idle: Vec<&Read> = kept
            .iter()
            .filter(|r| {
                r.slot.current.is_none()
                    && r.slot.idle_since.is_some_and(|i| t.since(i) >= pool.idle)
            })
            .collect();
        idle.sort_by_key(|r| r.slot.idle_since);
        for r in idle {
            if live <= pool.min {
                break;
            }
            if self.retire(r).await? {
                live -= 1;
            }
        }
        let taken: BTreeSet<u32> = state.list(&pool.name).await?.iter().map(|r| r.n).collect();
        let mut free = (0..pool.max as u32).filter(|n| !taken.contains(n));
        while live < pool.min {
            let Some(n) = free.next() else { break };
            let slot = Slot {
                vm: vm_name(&pool.name, n),
                instance: None,
                current: None,
                last: None,
                idle_since: Some(t),
                closing: false,
                created_at: t,
            };
            if state.create(&pool.name, n, &slot).await?
                && let Some(read) = state.get(&pool.name, n).await?
            {
                self.launched_idle(pool, read).await?;
                live += 1;
            }
        }
        Ok(())
    }

    async fn launched_idle(&self, pool: &PoolSpec, read: Read) -> Result<(), Error> {
        match self.launch_pool_vm(pool, &read.slot.vm).await {
            Ok(i) => self.record_instance(read, &i.id).await,
            Err(e @ Error::Capacity(_)) => {
                self.pool_state()?.delete(&read.pool, read.n).await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Terminates an idle slot's VM, unless a dispatcher claims it first (`false`).
    async fn retire(&self, read: &Read) -> Result<bool, Error> {
        let state = self.pool_state()?;
        let mut closing = read.slot.clone();
        closing.closing = true;
        if !state.update(read, &closing).await? {
            return Ok(false);
        }
        if let Some(id) = &read.slot.instance {
            self.terminate(&[id.as_str()])
                .await
                .map_err(Ec2Error::into_compute)?;
        }
        state.delete(&read.pool, read.n).await?;
        info!(pool = %read.pool, vm = %read.slot.vm, instance = ?read.slot.instance, "idle pool vm retired");
        Ok(true)
    }

    /// What pool VM `vm` is to do: see [`Orders`].
    pub(super) async fn orders_of(&self, vm: &str) -> Result<Orders, Error> {
        let (Some((pool, n)), Some(state)) = (parse_vm(vm), self.pool_state.as_ref()) else {
            return Ok(Orders::Retire);
        };
        if !self.cfg.pools.iter().any(|p| p.name == pool && p.reuse) {
            return Ok(Orders::Retire);
        }
        Ok(match state.get(pool, n).await? {
            Some(r) if r.slot.vm == vm => match r.slot.current {
                Some(key) => Orders::Run(key),
                None if r.slot.closing => Orders::Retire,
                None => Orders::Wait,
            },
            _ => Orders::Retire,
        })
    }
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

//! Pool VMs on the local provider: long-lived agents (`respawn-agent --pool`) that
//! take attempt after attempt. Each VM holds a slot (or GPUs) for its whole life;
//! an attempt is handed to an idle VM over the agent's stdin, and the VM is idle
//! again when the agent says on stdout that the attempt's work folder is gone.
//!
//! Pools grow when a job finds no idle VM (up to `max`, while slots are free), keep
//! `min` VMs running, and retire VMs idle for longer than `idle` (end of input: the
//! agent exits). A VM given a preemption notice takes no more attempts and goes at
//! its deadline; it is not replaced unless a job asks for one (or `min` does).

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use respawn_core::attempt_auth::AgentCredentials;
use respawn_core::pool::{Assignment, Finished, PoolSpec};
use respawn_core::ports::compute::{AllocateRequest, AllocationKey, Error, Vm, VmState};
use respawn_core::time::{Clock, SystemClock};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{LocalCompute, VmRecord};

/// How often pools are sized (idle VMs retired, `min` kept).
const TEND_EVERY: Duration = Duration::from_millis(500);
/// How long an agent may take to wrap up an attempt that was released before its
/// VM is killed instead.
const WRAP_UP: Duration = Duration::from_secs(30);

/// How long the pools' minimum is not refilled after a VM was retired to make room
/// for a job (which asks again within its capacity backoff, at most 2 s).
const REFILL_AFTER_EVICTION: Duration = Duration::from_secs(5);

static NEXT_VM: AtomicU64 = AtomicU64::new(0);

/// A pool VM as the provider keeps it (in memory: the agent leaves with the broker).
#[derive(Debug)]
pub(super) struct PoolVm {
    id: String,
    pool: String,
    gpus: Vec<u32>,
    pid: u32,
    /// Assignments to the agent; dropped to retire the VM.
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    current: Option<AllocationKey>,
    idle_since: Instant,
    noticed: bool,
}

/// The VM an attempt goes to.
struct Picked {
    id: String,
    gpus: Vec<u32>,
    pid: u32,
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

impl PoolVm {
    fn idle(&self) -> bool {
        self.current.is_none() && self.tx.is_some() && !self.noticed
    }
}

impl LocalCompute {
    fn pools(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, PoolVm>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool VMs this provider started (busy, idle or retiring), and the CPU
    /// slots and GPUs they hold.
    pub(super) fn pool_used(&self) -> (std::collections::BTreeSet<String>, usize, Vec<u32>) {
        let vms = self.pools();
        let cpu = vms.values().filter(|v| v.gpus.is_empty()).count();
        let gpus = vms.values().flat_map(|v| v.gpus.clone()).collect();
        (vms.keys().cloned().collect(), cpu, gpus)
    }

    /// CPU slots and GPUs of idle pool VMs, ready for the next job.
    pub(super) fn idle_pool_capacity(&self) -> (usize, usize) {
        let vms = self.pools();
        let idle = vms.values().filter(|v| v.idle());
        idle.fold((0, 0), |(c, g), v| {
            if v.gpus.is_empty() {
                (c + 1, g)
            } else {
                (c, g + v.gpus.len())
            }
        })
    }

    /// Pool VMs: (id, pool, busy with) for each.
    pub fn pool_vms(&self) -> Vec<(String, String, Option<AllocationKey>)> {
        self.pools()
            .values()
            .map(|v| (v.id.clone(), v.pool.clone(), v.current.clone()))
            .collect()
    }

    /// The pool `req` runs in ([`PoolSpec::choose`]); `None` for a single-use VM.
    pub(super) fn pool_for(&self, req: &AllocateRequest) -> Result<Option<PoolSpec>, Error> {
        Ok(PoolSpec::choose(&self.cfg.pools, req)?.cloned())
    }

    /// A capacity miss for a VM with `gpus` GPUs: an idle pool VM holding that kind
    /// of slot is retired to make room (the job gets it when it asks again), and the
    /// pools' minimum is not refilled for a while, so the room goes to the job.
    pub(super) fn no_room(&self, miss: Error, gpus: u32) -> Error {
        let Error::Capacity(why) = miss else {
            return miss;
        };
        let mut vms = self.pools();
        let idlest = vms
            .values_mut()
            .filter(|v| v.idle() && v.gpus.is_empty() == (gpus == 0))
            .min_by_key(|v| v.idle_since);
        let Some(v) = idlest else {
            return Error::Capacity(why);
        };
        info!(vm = %v.id, pool = %v.pool, "retiring an idle pool vm to make room");
        v.tx = None;
        *self.evicted_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Error::Capacity(format!("{why}; an idle pool VM is retiring to make room"))
    }

    /// Runs `req` on an idle VM of `pool`, or on a new one.
    pub(super) fn allocate_pooled(
        &self,
        req: &AllocateRequest,
        pool: &PoolSpec,
    ) -> Result<Vm, Error> {
        let key = &req.key;
        let _one = self.picking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = self.lock().get(key) {
            return Ok(r.vm());
        }
        let picked = {
            let mut vms = self.pools();
            vms.values_mut()
                .filter(|v| v.pool == pool.name && v.idle())
                .max_by_key(|v| v.idle_since)
                .map(|v| {
                    v.current = Some(key.clone());
                    Picked {
                        id: v.id.clone(),
                        gpus: v.gpus.clone(),
                        pid: v.pid,
                        tx: v.tx.clone(),
                    }
                })
        };
        let Picked { id, gpus, pid, tx } = match picked {
            Some(p) => p,
            None => {
                let size = self
                    .pools()
                    .values()
                    .filter(|v| v.pool == pool.name)
                    .count();
                if size >= pool.max {
                    return Err(Error::Capacity(format!(
                        "all {} VMs of pool {} busy",
                        pool.max, pool.name
                    )));
                }
                let gpus = self
                    .pick(pool.gpus)
                    .map_err(|e| self.no_room(e, pool.gpus))?;
                self.spawn_pool_vm(pool, gpus, Some(key.clone()))?
            }
        };
        let rec = VmRecord {
            id: id.clone(),
            key: key.clone(),
            state: VmState::Running,
            gpus,
            spot: pool.spot,
            created_at: SystemClock.now(),
            pid: Some(pid),
            notice_deadline: None,
            released: false,
            pooled: true,
            nodes: Vec::new(),
        };
        self.lock().insert(key.clone(), rec.clone());
        // A restarted broker finds which attempt the VM was running here. Not
        // fsync'd: a power loss takes the VM down with the broker.
        self.persist_unsynced(key);
        let line = Assignment {
            job: key.job.clone(),
            attempt: key.attempt,
            credentials: AgentCredentials {
                api: self.cfg.api.clone(),
                token: self.cfg.attempt_key.credential(&key.job, key.attempt),
            },
        };
        let mut body = serde_json::to_vec(&line).unwrap_or_default();
        body.push(b'\n');
        if tx.is_none_or(|tx| tx.send(body).is_err()) {
            // The agent is gone; its watcher ends the attempt.
            warn!(job_id = %key.job, attempt = key.attempt, vm = %id, "pool vm gone before its assignment");
        }
        debug!(job_id = %key.job, attempt = key.attempt, vm = %id, pool = %pool.name, "attempt assigned to pool vm");
        Ok(rec.vm())
    }

    /// Starts a VM of `pool` on `gpus`, busy with `first` if given. Returns its id,
    /// GPUs, pid and assignment channel.
    fn spawn_pool_vm(
        &self,
        pool: &PoolSpec,
        gpus: Vec<u32>,
        first: Option<AllocationKey>,
    ) -> Result<Picked, Error> {
        let id = format!(
            "pool-{}-{}-{}",
            pool.name,
            SystemClock.now().0,
            NEXT_VM.fetch_add(1, Ordering::Relaxed)
        );
        let unavailable = |e| self.cannot_start(e);
        let dir = self.vm_dir(&id);
        std::fs::create_dir_all(&dir).map_err(unavailable)?;
        let log = std::fs::File::create(dir.join("agent.log")).map_err(unavailable)?;
        let mut cmd = self.agent_command(&id, &gpus);
        cmd.arg("--pool")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().map_err(unavailable)?;
        let pid = child.id().unwrap_or_default();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        // In the map before anything that may see the agent exit.
        self.pools().insert(
            id.clone(),
            PoolVm {
                id: id.clone(),
                pool: pool.name.clone(),
                gpus: gpus.clone(),
                pid,
                tx: Some(tx.clone()),
                current: first,
                idle_since: Instant::now(),
                noticed: false,
            },
        );
        info!(vm = %id, pool = %pool.name, pid, "pool vm started");
        if let Some(mut stdin) = child.stdin.take() {
            tokio::spawn(async move {
                while let Some(line) = rx.recv().await {
                    if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                        return;
                    }
                }
                // Dropping stdin is the end of input: the agent retires.
            });
        }
        if let Some(stdout) = child.stdout.take() {
            let (this, vm) = (self.this.clone(), id.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Some(this) = this.upgrade() else { return };
                    match serde_json::from_str::<Finished>(&line) {
                        Ok(done) => this.pool_finished(&vm, done),
                        Err(e) => warn!(vm = %vm, error = %e, "unreadable line from a pool agent"),
                    }
                }
            });
        }
        {
            let (this, vm) = (self.this.clone(), id.clone());
            tokio::spawn(async move {
                let _ = child.wait().await;
                if let Some(this) = this.upgrade() {
                    this.pool_vm_exited(&vm).await;
                }
            });
        }
        Ok(Picked {
            id,
            gpus,
            pid,
            tx: Some(tx),
        })
    }

    /// The agent of `vm` is done with an attempt: the VM is idle.
    fn pool_finished(&self, vm: &str, done: Finished) {
        let key = AllocationKey {
            job: done.job,
            attempt: done.attempt,
        };
        if let Some(r) = self.lock().get_mut(&key) {
            r.state = VmState::Terminated;
        }
        if let Some(v) = self.pools().get_mut(vm)
            && v.current.as_ref() == Some(&key)
        {
            v.current = None;
            v.idle_since = Instant::now();
        }
        debug!(job_id = %key.job, attempt = key.attempt, vm, "pool vm idle");
        self.freed.notify_one();
    }

    /// The agent of `vm` exited: its attempt (if any) is over, and so is the VM.
    async fn pool_vm_exited(&self, vm: &str) {
        let gone = self.pools().remove(vm);
        let Some(gone) = gone else { return };
        info!(vm, pool = %gone.pool, "pool vm gone");
        match gone.current {
            Some(key) => self.terminated(&key, "agent exited").await,
            None => self.freed.notify_one(),
        }
    }

    /// An attempt on a pool VM is over for the broker. If its agent has not said
    /// so yet (the job was cancelled, or its exit report outran the agent's
    /// clean-up), its workload goes now; an agent that does not wrap up in time
    /// loses its VM.
    pub(super) fn release_pooled(&self, r: &VmRecord) {
        // Checked and marked in one step: once the agent has said it finished, the
        // VM may already run the next attempt, whose workload must be left alone.
        let live = self.lock().get_mut(&r.key).is_some_and(|stored| {
            let live = stored.state != VmState::Terminated;
            stored.state = VmState::Terminated;
            live
        });
        if !live {
            return;
        }
        self.kill_workload_of(&r.id, Some(&r.key));
        let (this, key, vm) = (self.this.clone(), r.key.clone(), r.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(WRAP_UP).await;
            let Some(this) = this.upgrade() else { return };
            let stuck = match this.pools().get(&vm) {
                Some(v) => (v.current.as_ref() == Some(&key)).then_some(v.pid),
                // A VM adopted after a restart takes no new attempts: still there
                // means still on this one.
                None => super::agent_pid(&vm),
            };
            if let Some(pid) = stuck {
                warn!(job_id = %key.job, attempt = key.attempt, vm = %vm, "pool agent did not finish a released attempt; killing its vm");
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        });
    }

    /// VM `vm` has a preemption notice: it takes no more attempts.
    pub(super) fn pool_noticed(&self, vm: &str) {
        if let Some(v) = self.pools().get_mut(vm) {
            v.noticed = true;
        }
    }

    /// Sizes the pools every [`TEND_EVERY`] for as long as the provider lives.
    pub(super) fn tend_pools(&self) {
        if self.cfg.pools.iter().all(|p| !p.reuse) {
            return;
        }
        let this = self.this.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TEND_EVERY);
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                this.tend();
            }
        });
    }

    /// Retires idle VMs beyond `min` (and noticed idle ones), starts VMs up to `min`.
    fn tend(&self) {
        for pool in self.cfg.pools.iter().filter(|p| p.reuse) {
            let size = {
                let mut vms = self.pools();
                let mut size = vms
                    .values()
                    .filter(|v| v.pool == pool.name && v.tx.is_some() && !v.noticed)
                    .count();
                for v in vms.values_mut().filter(|v| v.pool == pool.name) {
                    let idle = v.current.is_none() && v.tx.is_some();
                    if idle && v.noticed {
                        v.tx = None;
                    } else if idle && size > pool.min && v.idle_since.elapsed() >= pool.idle {
                        info!(vm = %v.id, pool = %pool.name, "retiring idle pool vm");
                        v.tx = None;
                        size -= 1;
                    }
                }
                size
            };
            let evicted = *self.evicted_at.lock().unwrap_or_else(|p| p.into_inner());
            if evicted.is_some_and(|at| at.elapsed() < REFILL_AFTER_EVICTION) {
                continue;
            }
            for _ in size..pool.min {
                let _one = self.picking.lock().unwrap_or_else(|p| p.into_inner());
                let started = self
                    .pick(pool.gpus)
                    .and_then(|gpus| self.spawn_pool_vm(pool, gpus, None));
                if let Err(e) = started {
                    debug!(pool = %pool.name, error = %e, "cannot keep the pool's minimum");
                    break;
                }
            }
        }
    }
}

//! The local compute provider: a "VM" is a slot on this machine — one per GPU when
//! `nvidia-smi` reports GPUs, else a configured number of CPU slots — running one
//! `respawn-agent` process. VMs outlive the broker process, as cloud VMs do: each
//! VM's state is kept in `vms/<id>/vm.json`, and a restarted broker adopts the
//! agents still running and reports the ones that died while it was down.
//!
//! The spot simulator preempts VMs the way a cloud does: it writes a notice with a
//! deadline (`vms/<id>/notice.json`, which the agent polls as it would poll EC2's
//! instance metadata), and kills the VM at the deadline if it is still there.
//!
//! Agents run with none of the broker's environment and no access to its store:
//! each gets a credential for its own attempt only (a 0600 file in its VM folder,
//! never on its command line) and reports through the broker's API. Workloads run in
//! a [`Sandbox`] that hides the data folder from them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use respawn_core::attempt_auth::AttemptKey;
use respawn_core::lifecycle::Event;
use respawn_core::messages::Message;
use respawn_core::ports::compute::{AllocateRequest, AllocationKey, Compute, Error, Vm, VmState};
use respawn_core::ports::queue::{Outgoing, Queue};
use respawn_core::time::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{Instrument, info, info_span, warn};

use super::durable;
use super::sandbox::Sandbox;
use respawn_core::pool::PoolSpec;

mod pool;

use respawn_core::time::{Clock, SystemClock};

/// How the local provider runs VMs.
#[derive(Debug, Clone)]
pub struct LocalComputeConfig {
    /// Folder for `vms/<id>/`.
    pub data_dir: PathBuf,
    pub bucket_dir: PathBuf,
    pub agent_bin: PathBuf,
    /// Prepended to the agents' PATH (so workloads find respawn's example binaries),
    /// and readable inside the sandbox.
    pub extra_path: Option<PathBuf>,
    pub cpu_slots: usize,
    /// GPU indices; empty on a machine without GPUs.
    pub gpus: Vec<u32>,
    /// `docker` or `podman` when one works here; jobs with an image need one.
    pub container_runtime: Option<String>,
    /// Where the provider itself reports VMs that went away.
    pub events_queue: String,
    /// The broker's API, where agents report (`http://127.0.0.1:7878`).
    pub api: String,
    /// Signs each agent's credential for its own attempt.
    pub attempt_key: AttemptKey,
    pub heartbeat_secs: u64,
    /// The notice period the simulator gives, told to workloads as RESPAWN_GRACE_SECONDS.
    pub notice: Duration,
    /// How workloads are isolated.
    pub sandbox: Sandbox,
    /// Pools of reusable VMs; a job that fits none gets a single-use VM.
    pub pools: Vec<PoolSpec>,
}

/// Variables of the broker's environment an agent gets; nothing else (tokens, queue
/// URLs with passwords, webhook secrets) reaches it or its workload.
const AGENT_ENV: [&str; 22] = [
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "RESPAWN_LOG",
    "RESPAWN_LOG_FORMAT",
    // Where the agent's spans go (its workload gets none of these).
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "OTEL_BSP_SCHEDULE_DELAY",
    "XDG_RUNTIME_DIR",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "CONTAINER_HOST",
];

pub use respawn_core::attempt_auth::AgentCredentials;

/// The file an agent finds its credentials in.
/// Kills the workload the agent in `vm_dir` runs (its process group, named in
/// `workload.pgid`), if it is `only`'s: on a pool VM the file may already name a
/// later attempt's.
pub fn kill_workload(vm_dir: &std::path::Path, only: Option<&AllocationKey>) {
    let Ok(text) = std::fs::read_to_string(vm_dir.join("workload.pgid")) else {
        return;
    };
    let mut words = text.split_whitespace();
    let pgid = words.next().and_then(|p| p.parse::<i32>().ok());
    let (job, attempt) = (words.next(), words.next());
    let theirs = only.is_none_or(|k| {
        job == Some(k.job.as_str()) && attempt == Some(k.attempt.to_string().as_str())
    });
    if let Some(pgid) = pgid.filter(|p| *p > 1 && theirs) {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

pub fn credentials_path(vm_dir: &std::path::Path) -> PathBuf {
    vm_dir.join("credentials")
}

/// GPUs `nvidia-smi` reports, by index; empty when it is missing or fails.
pub fn detect_gpus() -> Vec<u32> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=index", "--format=csv,noheader"])
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect(),
        _ => Vec::new(),
    }
}

/// The first of podman / docker that answers `info` (a client without a running
/// engine does not count).
pub fn detect_container_runtime() -> Option<String> {
    ["podman", "docker"]
        .into_iter()
        .map(str::to_owned)
        .find(|rt| {
            std::process::Command::new(rt)
                .arg("info")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// A VM as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VmRecord {
    id: String,
    key: AllocationKey,
    state: VmState,
    gpus: Vec<u32>,
    spot: bool,
    created_at: Timestamp,
    #[serde(default)]
    pid: Option<u32>,
    /// When a preemption notice was given: the VM goes away at this time.
    #[serde(default)]
    notice_deadline: Option<Timestamp>,
    #[serde(default)]
    released: bool,
    /// The attempt runs on pool VM `id`, which outlives it.
    #[serde(default)]
    pooled: bool,
    /// A multi-node attempt's other nodes, ranks 1 and up, each a slot and an agent
    /// of its own; `id`, `gpus` and `pid` above are rank 0's. The gang is one VM to
    /// the broker: allocated whole or not at all, ended whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    nodes: Vec<Node>,
}

/// One of a gang's nodes after rank 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Node {
    id: String,
    gpus: Vec<u32>,
    #[serde(default)]
    pid: Option<u32>,
}

impl VmRecord {
    fn vm(&self) -> Vm {
        Vm {
            id: self.id.clone(),
            key: self.key.clone(),
            state: self.state,
            spot: self.spot,
            nodes: 1 + self.nodes.len() as u32,
            created_at: self.created_at,
        }
    }

    /// Every node's VM id, rank 0's first.
    fn node_ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.nodes.iter().map(|n| n.id.as_str()))
    }

    /// Every node's GPUs (empty for a CPU slot), in rank order.
    fn node_gpus(&self) -> impl Iterator<Item = &[u32]> {
        std::iter::once(self.gpus.as_slice()).chain(self.nodes.iter().map(|n| n.gpus.as_slice()))
    }
}

/// Where one agent of a multi-node attempt stands in its gang.
#[derive(Debug, Clone, Copy)]
struct Rank {
    rank: u32,
    nodes: u32,
    master_port: u16,
}

/// The local provider. Create with [`LocalCompute::open`].
#[derive(Debug)]
pub struct LocalCompute {
    cfg: LocalComputeConfig,
    queue: Arc<dyn Queue>,
    vms: Mutex<BTreeMap<AllocationKey, VmRecord>>,
    /// Agents this process started and has not yet reaped, by VM id: their pids
    /// cannot have been reused, even before their command line shows.
    children: Mutex<BTreeMap<String, u32>>,
    /// Held while a VM record is written, so writes land in the order of the
    /// changes they carry.
    writes: Mutex<()>,
    /// Woken whenever a slot frees.
    freed: Notify,
    /// Pool VMs, by id. Locked after `vms` when both are held.
    pool: Mutex<BTreeMap<String, pool::PoolVm>>,
    /// Held while an allocation picks its VM, so two never pick the same.
    picking: Mutex<()>,
    /// When an idle pool VM was last retired to make room for a job.
    evicted_at: Mutex<Option<std::time::Instant>>,
    this: Weak<LocalCompute>,
}

impl LocalCompute {
    /// Opens the provider, adopting VMs left by a previous broker process.
    pub async fn open(
        cfg: LocalComputeConfig,
        queue: Arc<dyn Queue>,
    ) -> std::io::Result<Arc<Self>> {
        let vms_dir = cfg.data_dir.join("vms");
        std::fs::create_dir_all(&vms_dir)?;
        let mut vms = BTreeMap::new();
        for entry in std::fs::read_dir(&vms_dir)? {
            let path = entry?.path().join("vm.json");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match serde_json::from_slice::<VmRecord>(&bytes) {
                Ok(r) => {
                    vms.insert(r.key.clone(), r);
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "skipping unreadable vm record")
                }
            }
        }
        let compute = Arc::new_cyclic(|this| LocalCompute {
            cfg,
            queue,
            vms: Mutex::new(vms),
            children: Mutex::new(BTreeMap::new()),
            writes: Mutex::new(()),
            freed: Notify::new(),
            pool: Mutex::new(BTreeMap::new()),
            picking: Mutex::new(()),
            evicted_at: Mutex::new(None),
            this: this.clone(),
        });
        compute.adopt().await;
        compute.tend_pools();
        Ok(compute)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AllocationKey, VmRecord>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    /// Writes the VM record of `key` as it is now. One writer at a time, each
    /// writing the latest state: two changes racing (a release and the watcher's
    /// termination) can never leave the older one on disk.
    fn persist(&self, key: &AllocationKey) {
        self.persist_with(key, durable::write);
    }

    /// [`Self::persist`] for a record that only matters while its agent runs (a
    /// power loss ends the agent too): replaced atomically, not fsync'd.
    fn persist_unsynced(&self, key: &AllocationKey) {
        self.persist_with(key, durable::write_unsynced);
    }

    fn persist_with(
        &self,
        key: &AllocationKey,
        write: fn(&std::path::Path, &[u8], u32) -> std::io::Result<()>,
    ) {
        let _one = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = self.lock().get(key).cloned() else {
            return;
        };
        let path = self.vm_dir(&r.id).join("vm.json");
        let body = serde_json::to_vec_pretty(&r).unwrap_or_default();
        if let Err(e) = write(&path, &body, 0o644) {
            warn!(job_id = %r.key.job, attempt = r.key.attempt, vm = %r.id, error = %e, "cannot persist vm record");
        }
    }

    /// Waits until a slot frees (or `timeout` passes).
    pub async fn slot_freed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.freed.notified()).await;
    }

    /// Running VMs from before a restart: watch the live ones, report the dead.
    async fn adopt(&self) {
        let live: Vec<VmRecord> = self
            .lock()
            .values()
            .filter(|r| r.state != VmState::Terminated)
            .cloned()
            .collect();
        for r in live {
            // A gang is whole or gone: a node missing now never started, or was lost
            // while the broker was down (its agents stay up until the attempt ends).
            let missing = r
                .nodes
                .iter()
                .position(|n| agent_pid(&n.id).is_none())
                .map(|i| i + 1);
            match agent_pid(&r.id) {
                Some(_) if missing.is_some() => {
                    let rank = missing.unwrap_or_default();
                    self.kill_vm(&r);
                    self.terminated(
                        &r.key,
                        &format!("node {rank} gone while the broker was down"),
                    )
                    .await;
                }
                Some(pid) => {
                    info!(job_id = %r.key.job, attempt = r.key.attempt, vm = %r.id, pid, nodes = r.nodes.len() + 1, "adopted running vm");
                    self.watch(r.key.clone(), None, pid);
                    for (i, node) in r.nodes.iter().enumerate() {
                        if let Some(pid) = agent_pid(&node.id) {
                            self.watch_node(r.key.clone(), i + 1, None, pid);
                        }
                    }
                    if let Some(deadline) = r.notice_deadline {
                        self.arm_deadline(r.key.clone(), deadline);
                    }
                }
                None => {
                    self.terminated(&r.key, "agent gone while the broker was down")
                        .await
                }
            }
        }
    }

    /// Free CPU slots and GPUs: unused ones, and those of idle pool VMs.
    pub fn free(&self) -> (usize, usize) {
        let (cpu, gpus) = self.used();
        let (idle_cpu, idle_gpu) = self.idle_pool_capacity();
        (
            self.cfg.cpu_slots.saturating_sub(cpu) + idle_cpu,
            self.cfg.gpus.len().saturating_sub(gpus.len()) + idle_gpu,
        )
    }

    /// CPU slots and GPUs held by live VMs: single-use ones and every pool VM.
    fn used(&self) -> (usize, Vec<u32>) {
        let mut cpu = 0;
        let mut gpus = Vec::new();
        // An attempt on a pool VM counts through its VM, unless the VM is one a
        // restarted broker adopted (still running the attempt it had, then leaving).
        let (pool_vms, pool_cpu, pool_gpus) = self.pool_used();
        {
            let vms = self.lock();
            for r in vms.values().filter(|r| {
                r.state != VmState::Terminated && !(r.pooled && pool_vms.contains(&r.id))
            }) {
                for node in r.node_gpus() {
                    if node.is_empty() {
                        cpu += 1;
                    }
                    gpus.extend(node);
                }
            }
        }
        (cpu + pool_cpu, [gpus, pool_gpus].concat())
    }

    /// Preempts the VM of `target` (a VM id, or a job id for its live VM) with the
    /// configured notice. Returns the VM id.
    pub fn preempt(&self, target: &str, notice: Option<Duration>) -> Option<String> {
        let notice = notice.unwrap_or(self.cfg.notice);
        let deadline = SystemClock.now().plus(notice);
        let rec = {
            let mut vms = self.lock();
            let r = vms
                .values_mut()
                .filter(|r| r.state != VmState::Terminated && r.notice_deadline.is_none())
                .find(|r| r.node_ids().any(|id| id == target) || r.key.job.as_str() == target)?;
            r.notice_deadline = Some(deadline);
            if r.pooled {
                // Before the lock goes: the VM must not take another attempt, which
                // would find this notice.
                self.pool_noticed(&r.id);
            }
            r.clone()
        };
        self.persist(&rec.key);
        // As a cloud does, the notice goes to the one node reclaimed (rank 0's for a
        // job or VM id); the broker tells the gang's other nodes, which ask it. The
        // whole gang goes at the deadline, as it would once that node's loss ends
        // the attempt.
        let node = rec
            .node_ids()
            .find(|id| *id == target)
            .unwrap_or(&rec.id)
            .to_owned();
        let body = serde_json::json!({ "deadline_ms": deadline.0, "action": "terminate" });
        let notice_file = self.vm_dir(&node).join("notice.json");
        if let Err(e) = std::fs::write(&notice_file, body.to_string()) {
            warn!(job_id = %rec.key.job, attempt = rec.key.attempt, vm = %node, error = %e, "cannot write preemption notice");
        }
        info!(job_id = %rec.key.job, attempt = rec.key.attempt, vm = %node, nodes = rec.nodes.len() + 1, notice_ms = notice.as_millis() as u64, "spot preemption notice");
        self.arm_deadline(rec.key.clone(), deadline);
        Some(rec.id)
    }

    /// Live VMs.
    pub fn running(&self) -> Vec<Vm> {
        self.lock()
            .values()
            .filter(|r| r.state != VmState::Terminated)
            .map(VmRecord::vm)
            .collect()
    }

    fn arm_deadline(&self, key: AllocationKey, deadline: Timestamp) {
        let this = self.this.clone();
        let span = vm_span("reclaim", &key, &respawn_telemetry::context());
        tokio::spawn(
            async move {
                let wait = deadline.since(SystemClock.now());
                tokio::time::sleep(wait).await;
                if let Some(this) = this.upgrade() {
                    let r = this.lock().get(&key).cloned();
                    if let Some(r) = r.filter(|r| r.state != VmState::Terminated) {
                        info!(job_id = %key.job, attempt = key.attempt, vm = %r.id, "reclaiming preempted vm");
                        this.kill_vm(&r);
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Kills every node of the VM: agents and workloads.
    fn kill_vm(&self, r: &VmRecord) {
        for id in r.node_ids() {
            let child = self
                .children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .copied();
            if let Some(pid) = agent_pid(id).or(child) {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            self.kill_workload(id);
        }
    }

    /// The workload runs in its own process group; the agent records it.
    fn kill_workload(&self, id: &str) {
        self.kill_workload_of(id, None);
    }

    /// The agent writes `<pgid> <job> <attempt>`; with `only`, the group is killed
    /// only if it is that attempt's (a pool VM may have moved on to the next).
    fn kill_workload_of(&self, id: &str, only: Option<&AllocationKey>) {
        kill_workload(&self.vm_dir(id), only);
    }

    /// Watches an agent until it exits. `child` when we started it (so it is
    /// reaped), else polls the pid of an adopted one.
    fn watch(&self, key: AllocationKey, child: Option<tokio::process::Child>, pid: u32) {
        let this = self.this.clone();
        let carried = respawn_telemetry::context();
        tokio::spawn(async move {
            match child {
                Some(mut c) => {
                    let _ = c.wait().await;
                    if let Some(this) = this.upgrade() {
                        let r = this.lock().get(&key).map(|r| r.id.clone());
                        if let Some(id) = r {
                            this.children
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&id);
                        }
                    }
                }
                None => {
                    while kill(Pid::from_raw(pid as i32), None).is_ok() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            if let Some(this) = this.upgrade() {
                let span = vm_span("vm terminated", &key, &carried);
                this.terminated(&key, "agent exited").instrument(span).await;
            }
        });
    }

    /// Marks the VM gone, frees its slot, and tells the broker.
    async fn terminated(&self, key: &AllocationKey, why: &str) {
        let Some(r) = self.lock().get_mut(key).map(|r| {
            r.state = VmState::Terminated;
            r.clone()
        }) else {
            return;
        };
        if r.nodes.is_empty() {
            self.kill_workload(&r.id);
        } else {
            // Rank 0 has reported the attempt's end; the other nodes go with it.
            self.kill_vm(&r);
        }
        self.persist(key);
        self.clean_up(&r);
        self.freed.notify_one();
        let reason = if r.released {
            "released".to_owned()
        } else if r.notice_deadline.is_some() {
            "preempted".to_owned()
        } else {
            why.to_owned()
        };
        info!(job_id = %key.job, attempt = key.attempt, vm = %r.id, %reason, "vm terminated");
        let msg = Message::Event {
            job: key.job.clone(),
            at: SystemClock.now(),
            event: Event::VmTerminated {
                attempt: key.attempt,
                reason,
            },
        };
        if let Err(e) = self
            .queue
            .send(
                &self.cfg.events_queue,
                Outgoing::new(msg.to_bytes()).priority(9),
            )
            .await
        {
            // Reconcile finds the job's agent silent and ends the attempt anyway.
            warn!(job_id = %key.job, attempt = key.attempt, error = %e, "cannot report vm termination");
        }
    }

    /// A gone VM's work folder (inputs, checkpoints, outputs, already uploaded by
    /// its agent) and credentials; its record and agent log stay for `respawn show`.
    fn clean_up(&self, r: &VmRecord) {
        for id in r.node_ids() {
            let dir = self.vm_dir(id);
            let _ = std::fs::remove_file(credentials_path(&dir));
            match std::fs::remove_dir_all(dir.join("work")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    warn!(job_id = %r.key.job, attempt = r.key.attempt, vm = %id, error = %e, "cannot remove the vm's work folder");
                }
                _ => {}
            }
        }
    }

    /// The provider is unavailable: the agent (or its VM folder) cannot be made.
    fn cannot_start(&self, e: std::io::Error) -> Error {
        Error::Unavailable(Box::new(std::io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", self.cfg.agent_bin.display()),
        )))
    }

    /// Refuses what this machine can never run.
    fn check(&self, req: &AllocateRequest) -> Result<(), Error> {
        let r = &req.resources;
        if let (Some(image), None) = (&req.image, &self.cfg.container_runtime) {
            return Err(Error::Invalid(format!(
                "the job runs in image {image}, but no container runtime (docker or podman) works on this machine; \
                 install one, or drop `image` to run the command as a process"
            )));
        }
        let nodes = r.nodes.max(1) as usize;
        if r.gpus == 0 && nodes > self.cfg.cpu_slots {
            return Err(Error::Invalid(format!(
                "the job asks for {nodes} nodes; this machine has {} CPU slots",
                self.cfg.cpu_slots
            )));
        }
        if r.gpus as usize * nodes > self.cfg.gpus.len() {
            return Err(Error::Invalid(format!(
                "the job needs {} GPU(s) on each of {nodes} node(s); this machine has {}",
                r.gpus,
                self.cfg.gpus.len()
            )));
        }
        Ok(())
    }

    /// The slot (GPU indices, none for a CPU slot) for one new VM with `gpus` GPUs.
    fn pick(&self, gpus: u32) -> Result<Vec<u32>, Error> {
        Ok(self.pick_gang(1, gpus)?.pop().unwrap_or_default())
    }

    /// Slots for `nodes` new VMs with `gpus` GPUs each, all or none: each node's
    /// GPU indices, none for a CPU slot. A gang that does not fit whole is a
    /// capacity miss, so no node runs (or holds a slot) alone.
    fn pick_gang(&self, nodes: u32, gpus: u32) -> Result<Vec<Vec<u32>>, Error> {
        let (cpu, used) = self.used();
        let gang = if nodes > 1 {
            format!(" for {nodes} nodes")
        } else {
            String::new()
        };
        if gpus == 0 {
            let free = self.cfg.cpu_slots.saturating_sub(cpu);
            if free < nodes as usize {
                return Err(Error::Capacity(format!(
                    "{free} of {} CPU slots free{gang}",
                    self.cfg.cpu_slots
                )));
            }
            return Ok(vec![Vec::new(); nodes as usize]);
        }
        let free: Vec<u32> = self
            .cfg
            .gpus
            .iter()
            .copied()
            .filter(|g| !used.contains(g))
            .collect();
        if free.len() < (gpus * nodes) as usize {
            return Err(Error::Capacity(format!(
                "{} of {} GPUs free{gang}",
                free.len(),
                self.cfg.gpus.len()
            )));
        }
        Ok(free
            .chunks(gpus as usize)
            .take(nodes as usize)
            .map(<[u32]>::to_vec)
            .collect())
    }

    /// Starts the agent of node `id` (rank 0's, or one of a gang's) for attempt `key`.
    fn spawn_agent(
        &self,
        key: &AllocationKey,
        id: &str,
        gpus: &[u32],
        rank: Option<Rank>,
    ) -> std::io::Result<tokio::process::Child> {
        let dir = self.vm_dir(id);
        std::fs::create_dir_all(&dir)?;
        let credentials = AgentCredentials {
            api: self.cfg.api.clone(),
            token: self.cfg.attempt_key.credential(&key.job, key.attempt),
        };
        let body = serde_json::to_vec(&credentials).map_err(std::io::Error::other)?;
        durable::write(&credentials_path(&dir), &body, 0o600)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut cmd = self.agent_command(id, gpus);
        cmd.args(["--job", key.job.as_str()])
            .args(["--attempt", &key.attempt.to_string()]);
        if let Some(r) = rank {
            // The nodes are slots of this machine: they reach each other on loopback.
            let hosts = vec!["127.0.0.1"; r.nodes as usize].join(",");
            cmd.args(["--rank", &r.rank.to_string()])
                .args(["--hosts", &hosts])
                .args(["--master-port", &r.master_port.to_string()]);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn()
    }

    /// Watches node `rank` (1 and up) of a gang: `child` when this process started
    /// it, else its pid. Its agent stays up until the attempt ends, so one that dies
    /// while the attempt is live takes the gang with it, as a lost cloud VM would:
    /// its peers' workloads cannot go on. (One that ends cleanly saw the attempt
    /// end; an adopted one, whose exit status is unknown, counts as lost, which an
    /// ended attempt ignores.)
    fn watch_node(
        &self,
        key: AllocationKey,
        rank: usize,
        child: Option<tokio::process::Child>,
        pid: u32,
    ) {
        let this = self.this.clone();
        let carried = respawn_telemetry::context();
        tokio::spawn(async move {
            let clean = match child {
                Some(mut c) => c.wait().await.is_ok_and(|s| s.success()),
                None => {
                    while kill(Pid::from_raw(pid as i32), None).is_ok() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    false
                }
            };
            let Some(this) = this.upgrade() else {
                return;
            };
            let live = this
                .lock()
                .get(&key)
                .filter(|r| r.state != VmState::Terminated && !r.released)
                .cloned();
            let Some(r) = live else {
                return;
            };
            if let Some(node) = r.nodes.get(rank - 1) {
                this.children
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node.id);
            }
            if clean {
                return;
            }
            let span = vm_span("vm terminated", &key, &carried);
            span.in_scope(|| {
                warn!(job_id = %key.job, attempt = key.attempt, vm = %r.id, rank, "a node of the gang is gone; ending the whole gang");
                this.kill_vm(&r);
            });
            this.terminated(&key, &format!("node {rank} of {} lost", r.nodes.len() + 1))
                .instrument(span)
                .await;
        });
    }

    /// A free TCP port on loopback for rank 0's workload to listen on.
    fn free_port() -> std::io::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    /// The agent of VM `id` on `gpus`, with the provider's settings, none of the
    /// broker's environment, and its own process group (the VM's processes are
    /// killed together).
    fn agent_command(&self, id: &str, gpus: &[u32]) -> tokio::process::Command {
        let dir = self.vm_dir(id);
        let mut cmd = tokio::process::Command::new(&self.cfg.agent_bin);
        cmd.arg("--bucket")
            .arg(&self.cfg.bucket_dir)
            .arg("--vm-dir")
            .arg(&dir)
            .args(["--vm", id])
            .args(["--heartbeat-secs", &self.cfg.heartbeat_secs.to_string()])
            .args(["--grace-secs", &self.cfg.notice.as_secs().to_string()])
            .arg("--sandbox")
            .arg(self.cfg.sandbox.to_arg())
            .args(
                self.cfg
                    .container_runtime
                    .iter()
                    .flat_map(|rt| ["--container-runtime", rt.as_str()]),
            )
            .process_group(0)
            .env_clear();
        if let Some(extra) = &self.cfg.extra_path {
            cmd.arg("--read-only").arg(extra);
        }
        for name in AGENT_ENV {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        if !gpus.is_empty() {
            let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
            cmd.env("CUDA_VISIBLE_DEVICES", list.join(","));
        } else if !self.cfg.gpus.is_empty() {
            // A CPU job on a GPU machine must not grab a GPU another VM owns.
            cmd.env("CUDA_VISIBLE_DEVICES", "");
        }
        if let Some(extra) = &self.cfg.extra_path {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut parts = vec![extra.clone()];
            parts.extend(std::env::split_paths(&path));
            if let Ok(joined) = std::env::join_paths(parts) {
                cmd.env("PATH", joined);
            }
        }
        cmd
    }
}

/// The pid of the agent of VM `id`, found by its command line (so a reused pid is
/// never mistaken for it).
fn agent_pid(id: &str) -> Option<u32> {
    let procs = std::fs::read_dir("/proc").ok()?;
    let needle = format!("--vm\0{id}\0");
    procs.filter_map(Result::ok).find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("respawn-agent") && cmdline.contains(&needle)).then_some(pid)
    })
}

#[async_trait]
impl Compute for LocalCompute {
    async fn allocate(&self, req: &AllocateRequest) -> Result<Vm, Error> {
        if let Some(r) = self.lock().get(&req.key) {
            return Ok(r.vm());
        }
        self.check(req)?;
        let nodes = req.resources.nodes.max(1);
        if let Some(pool) = self.pool_for(req)?.filter(|p| p.reuse) {
            return self.allocate_pooled(req, &pool);
        }
        // Until the record is in: two allocations at once must not take one slot.
        let picking = self.picking.lock().unwrap_or_else(|p| p.into_inner());
        let mut slots = self
            .pick_gang(nodes, req.resources.gpus)
            .map_err(|e| self.no_room(e, req.resources.gpus))?
            .into_iter();
        let master_port = if nodes > 1 {
            Some(Self::free_port().map_err(|e| self.cannot_start(e))?)
        } else {
            None
        };
        let id = format!("local-{}-{}", req.key.job, req.key.attempt);
        let rec = VmRecord {
            id: id.clone(),
            key: req.key.clone(),
            state: VmState::Requested,
            gpus: slots.next().unwrap_or_default(),
            spot: req.placement.spot,
            created_at: SystemClock.now(),
            pid: None,
            notice_deadline: None,
            released: false,
            pooled: false,
            nodes: slots
                .enumerate()
                .map(|(i, gpus)| Node {
                    id: respawn_core::ports::compute::node_id(&id, i as u32 + 1),
                    gpus,
                    pid: None,
                })
                .collect(),
        };
        {
            let mut vms = self.lock();
            // Another caller may have raced us to the same key.
            if let Some(r) = vms.get(&req.key) {
                return Ok(r.vm());
            }
            vms.insert(req.key.clone(), rec.clone());
        }
        drop(picking);
        // On disk before the processes exist: a restarted broker then knows the VM.
        self.persist(&req.key);
        let mut children = Vec::with_capacity(nodes as usize);
        let ranks = rec.node_ids().zip(rec.node_gpus()).enumerate();
        for (rank, (node, gpus)) in ranks {
            let rank = master_port.map(|master_port| Rank {
                rank: rank as u32,
                nodes,
                master_port,
            });
            match self.spawn_agent(&req.key, node, gpus, rank) {
                Ok(child) => {
                    let pid = child.id().unwrap_or_default();
                    self.children
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(node.to_owned(), pid);
                    children.push((child, pid));
                }
                Err(e) => {
                    // All or none: the nodes already started go too.
                    self.kill_vm(&rec);
                    self.lock().remove(&req.key);
                    for node in rec.node_ids() {
                        let _ = std::fs::remove_dir_all(self.vm_dir(node));
                    }
                    return Err(self.cannot_start(e));
                }
            }
        }
        let rec = {
            let mut vms = self.lock();
            let r = vms.get_mut(&req.key).map(|r| {
                r.pid = children.first().map(|c| c.1);
                for (node, (_, pid)) in r.nodes.iter_mut().zip(&children[1..]) {
                    node.pid = Some(*pid);
                }
                r.state = VmState::Running;
                r.clone()
            });
            r.unwrap_or(rec)
        };
        self.persist(&req.key);
        let mut children = children.into_iter();
        if let Some((child, pid)) = children.next() {
            self.watch(req.key.clone(), Some(child), pid);
        }
        for (rank, (child, pid)) in children.enumerate() {
            self.watch_node(req.key.clone(), rank + 1, Some(child), pid);
        }
        Ok(rec.vm())
    }

    async fn release(&self, key: &AllocationKey) -> Result<(), Error> {
        let rec = self.lock().get_mut(key).map(|r| {
            r.released = true;
            r.clone()
        });
        if let Some(r) = rec.as_ref().filter(|r| r.pooled) {
            self.release_pooled(r);
            return Ok(());
        }
        if let Some(r) = rec.filter(|r| r.state != VmState::Terminated) {
            self.kill_vm(&r);
            // SIGKILL is final: the VM is gone now, whenever its watcher notices.
            if let Some(stored) = self.lock().get_mut(key) {
                stored.state = VmState::Terminated;
            }
            self.persist(key);
            self.clean_up(&r);
            self.freed.notify_one();
        }
        Ok(())
    }

    async fn describe(&self, key: &AllocationKey) -> Result<Option<Vm>, Error> {
        Ok(self.lock().get(key).map(VmRecord::vm))
    }

    async fn list(&self) -> Result<Vec<Vm>, Error> {
        Ok(self.lock().values().map(VmRecord::vm).collect())
    }

    async fn roster(&self, key: &AllocationKey) -> Result<Option<Vec<String>>, Error> {
        Ok(self
            .lock()
            .get(key)
            .filter(|r| !r.nodes.is_empty())
            .map(|r| vec!["127.0.0.1".to_owned(); r.nodes.len() + 1]))
    }
}

/// A span for work done later on `key`'s VM (its end, its reclaim at a notice's
/// deadline), in the trace `carried` (the current context when that work was
/// set up: the allocation, or the preemption request).
fn vm_span(
    name: &'static str,
    key: &AllocationKey,
    carried: &BTreeMap<String, String>,
) -> tracing::Span {
    let span = info_span!("vm", otel.name = name, job_id = %key.job, attempt = key.attempt);
    respawn_telemetry::adopt(&span, carried);
    span
}

/// Preempts a random running VM every so often: exponentially distributed gaps
/// with the given mean, as independent spot reclaims are.
pub fn spawn_spot_chaos(
    compute: Arc<LocalCompute>,
    mean_between: Duration,
    notice: Duration,
) -> tokio::task::JoinHandle<()> {
    use rand::Rng;
    tokio::spawn(async move {
        loop {
            let u: f64 = rand::rng().random_range(f64::EPSILON..1.0);
            let gap = mean_between.mul_f64(-u.ln());
            tokio::time::sleep(gap).await;
            let running = compute.running();
            if running.is_empty() {
                continue;
            }
            let i = rand::rng().random_range(0..running.len());
            compute.preempt(&running[i].id, Some(notice));
        }
    })
}

/// Where a workspace binary sits: next to the running executable (or its parent,
/// for test binaries under `deps/`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join(name),
        dir.parent().map(|p| p.join(name)).unwrap_or_default(),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Used by tests to check nothing is left behind.
pub fn vm_process_alive(id: &str) -> bool {
    agent_pid(id).is_some()
}

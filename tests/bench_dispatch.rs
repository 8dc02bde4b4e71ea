//! The broker's own overhead, without VMs in the way: the handlers, the dispatch
//! loop and the durable local ledger and queue of `respawn up` (SQLite, fsync'd),
//! with a compute provider whose VMs start the moment they are asked for.
//!
//! - `overhead [SECONDS] [--traces off|export]`: jobs submitted at a fixed 1,000
//!   per second (default for 60 s); latency from the start of each submission to
//!   its VM's allocation. With `--traces`, the stack runs as `respawn up` runs it
//!   (logs and spans set up, its queue and ledger traced), in a child process;
//!   `export` sends its spans as OTLP/HTTP to an endpoint in this process that
//!   takes them and counts the bytes.
//! - `scale N`: N jobs queued behind 1,000 running; the process's RSS and the
//!   latency of one lifecycle event (a heartbeat of a running job).
//!
//! `cargo bench -p respawn-e2e --bench dispatch -- overhead` (run by `scripts/bench`)
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use respawn_adapters::local::{LocalSecrets, LocalStore};
use respawn_core::handlers::{Submission, job_event, submit};
use respawn_core::job::JobId;
use respawn_core::lifecycle::{Event, Timeouts};
use respawn_core::ports::compute::{AllocateRequest, AllocationKey, Compute, Error, Vm, VmState};
use respawn_core::ports::queue::Receive;
use respawn_core::ports::{Ports, QueueNames};
use respawn_core::spec::{Format, parse};
use respawn_core::time::{Clock, SystemClock};
use tokio::sync::Notify;

/// VMs that exist the moment they are asked for, up to `capacity` at once.
#[derive(Debug)]
struct InstantCompute {
    capacity: usize,
    live: Mutex<HashMap<AllocationKey, Vm>>,
    allocated: Mutex<HashMap<JobId, Instant>>,
    count: AtomicUsize,
    freed: Notify,
}

impl InstantCompute {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(InstantCompute {
            capacity,
            live: Mutex::new(HashMap::new()),
            allocated: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    fn free(&self) -> usize {
        self.capacity
            .saturating_sub(self.live.lock().unwrap().len())
    }
}

#[async_trait]
impl Compute for InstantCompute {
    async fn allocate(&self, req: &AllocateRequest) -> Result<Vm, Error> {
        let mut live = self.live.lock().unwrap();
        if let Some(vm) = live.get(&req.key) {
            return Ok(vm.clone());
        }
        if live.len() >= self.capacity {
            return Err(Error::Capacity("full".into()));
        }
        let vm = Vm {
            id: format!("instant-{}", req.key),
            key: req.key.clone(),
            state: VmState::Running,
            spot: true,
            nodes: 1,
            created_at: SystemClock.now(),
        };
        live.insert(req.key.clone(), vm.clone());
        self.allocated
            .lock()
            .unwrap()
            .insert(req.key.job.clone(), Instant::now());
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(vm)
    }

    async fn release(&self, key: &AllocationKey) -> Result<(), Error> {
        self.live.lock().unwrap().remove(key);
        self.freed.notify_one();
        Ok(())
    }

    async fn describe(&self, key: &AllocationKey) -> Result<Option<Vm>, Error> {
        Ok(self.live.lock().unwrap().get(key).cloned())
    }

    async fn list(&self) -> Result<Vec<Vm>, Error> {
        Ok(self.live.lock().unwrap().values().cloned().collect())
    }
}

fn ports(dir: &std::path::Path, compute: Arc<InstantCompute>) -> Ports {
    let store = LocalStore::open(dir).unwrap();
    Ports {
        ledger: Arc::new(store.ledger()),
        queue: Arc::new(store.queue(5)),
        compute,
        secrets: Arc::new(LocalSecrets::new(dir.join("secrets"))),
        blobs: Arc::new(object_store::memory::InMemory::new()),
        clock: Arc::new(SystemClock),
        timeouts: Timeouts::default(),
        queues: QueueNames::default(),
    }
}

/// The dispatch loop of `respawn up`: as many attempts as there are free VMs,
/// handled together.
fn dispatch(ports: Ports, compute: Arc<InstantCompute>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let free = compute.free();
            if free == 0 {
                let _ = tokio::time::timeout(Duration::from_millis(500), compute.freed.notified())
                    .await;
                continue;
            }
            let opts = Receive {
                max: free.min(64),
                lease: Duration::from_secs(60),
                wait: Duration::from_millis(500),
            };
            if let Ok(got) = ports.queue.receive(&ports.queues.dispatch, opts).await {
                respawn_host::loops::process_together(&ports, got).await;
            }
        }
    })
}

async fn submit_one(ports: &Ports, name: &str) -> JobId {
    let spec = parse(
        &format!("name: {name}\ncommand: [python, train.py]\n"),
        Format::Yaml,
    )
    .unwrap();
    let sub = Submission {
        spec,
        project: "default".into(),
        reply_to: None,
        local_files: false,
    };
    submit(ports, sub).await.unwrap().job.id
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Runs [`overhead`] in a child process (a process's logs and spans are set up
/// once), with spans exported to a sink here when `export`.
async fn overhead_traced(secs: u64, export: bool) {
    let sink = if export {
        Some(respawn_e2e::otlp::Sink::start().await)
    } else {
        None
    };
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["overhead", &secs.to_string()])
        .env("RESPAWN_BENCH_TRACED", "1")
        .env("RESPAWN_LOG", "info")
        .stderr(std::process::Stdio::null());
    if let Some(s) = &sink {
        child.env("OTEL_EXPORTER_OTLP_ENDPOINT", &s.url);
    }
    let status = child.status().await.unwrap();
    assert!(status.success(), "the traced run failed");
    if let Some(s) = &sink {
        let (requests, kib) = s.received();
        assert!(requests > 0, "traces were to be exported, and none came");
        println!("spans exported: {requests} requests, {kib} KiB");
    }
}

async fn overhead(secs: u64, traced: bool) {
    let dir = tempfile::tempdir().unwrap();
    let compute = InstantCompute::new(usize::MAX);
    let mut ports = ports(dir.path(), compute.clone());
    let telemetry = traced.then(|| {
        ports = respawn_host::traced::traced(ports.clone());
        respawn_telemetry::init("respawn", respawn_telemetry::LogFormat::Human)
    });
    let _loop = dispatch(ports.clone(), compute.clone());
    let submitted: Arc<Mutex<HashMap<JobId, Instant>>> = Arc::default();
    // 10 submissions every 10 ms, each on its own task: a fixed offered load that
    // does not slow down when the broker does.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = secs as usize * 1000;
    let cpu_from = respawn_e2e::cpu_time(std::process::id() as i32);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total / 10 {
        tick.tick().await;
        for k in 0..10 {
            let (ports, submitted) = (ports.clone(), submitted.clone());
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let id = submit_one(&ports, &format!("j{i}-{k}")).await;
                submitted.lock().unwrap().insert(id, t);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while compute.count.load(Ordering::Relaxed) < total {
        assert!(Instant::now() < deadline, "not all allocated");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = respawn_e2e::cpu_time(std::process::id() as i32) - cpu_from;
    let submitted = submitted.lock().unwrap();
    let allocated = compute.allocated.lock().unwrap();
    let mut lat: Vec<f64> = submitted
        .iter()
        .map(|(id, t)| allocated[id].duration_since(*t).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    if let Some(t) = &telemetry {
        t.shutdown();
    }
    // The process's CPU per 1,000 jobs, load generator included, with traces.
    let cpu = if traced {
        format!(
            " {:.0} ms |",
            cpu.as_secs_f64() * 1000.0 / (total as f64 / 1000.0)
        )
    } else {
        String::new()
    };
    println!(
        "| 1,000 jobs/s for {secs} s | {total} | {:.2} ms | {:.2} ms | {:.2} ms |{cpu}",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
}

async fn scale(queued: usize) {
    const RUNNING: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let compute = InstantCompute::new(RUNNING);
    let ports = ports(dir.path(), compute.clone());
    let before = rss_kib();
    let _loop = dispatch(ports.clone(), compute.clone());
    let total = queued + RUNNING;
    let mut ids = Vec::with_capacity(total);
    for chunk in 0..total.div_ceil(64) {
        let batch = (chunk * 64..((chunk + 1) * 64).min(total)).map(|i| {
            let ports = ports.clone();
            async move { submit_one(&ports, &format!("s{i}")).await }
        });
        ids.extend(futures::future::join_all(batch).await);
    }
    while compute.count.load(Ordering::Relaxed) < RUNNING {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let running: Vec<JobId> = compute.allocated.lock().unwrap().keys().cloned().collect();
    for id in &running {
        let at = ports.clock.now();
        let ev = Event::WorkloadStarted {
            attempt: 1,
            restored_checkpoint: None,
        };
        job_event(&ports, id, &ev, at).await.unwrap();
    }
    let rss = rss_kib();
    let mut lat = Vec::new();
    for i in 0..2000 {
        let id = &running[i % running.len()];
        let t = Instant::now();
        let at = ports.clock.now();
        job_event(&ports, id, &Event::Heartbeat { attempt: 1 }, at)
            .await
            .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "| {queued} | {RUNNING} | {:.1} MiB | {:.0} B | {:.2} ms | {:.2} ms |",
        rss as f64 / 1024.0,
        (rss.saturating_sub(before) * 1024) as f64 / total as f64,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let n = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("overhead") => {
            let traces = args
                .iter()
                .position(|a| a == "--traces")
                .and_then(|i| args.get(i + 1));
            match traces.map(String::as_str) {
                _ if std::env::var_os("RESPAWN_BENCH_TRACED").is_some() => {
                    overhead(n(1, 60), true).await
                }
                None => overhead(n(1, 60), false).await,
                Some("off") => overhead_traced(n(1, 60), false).await,
                Some("export") => overhead_traced(n(1, 60), true).await,
                Some(other) => panic!("--traces {other}: off or export"),
            }
        }
        Some("scale") => scale(n(1, 1000) as usize).await,
        _ => panic!("usage: dispatch overhead [SECONDS] | scale QUEUED"),
    }
}

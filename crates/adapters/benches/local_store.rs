//! Throughput of the durable local store (SQLite, WAL, synchronous=FULL, group commit).
//!
//! `cargo bench -p respawn-adapters --bench local_store [-- --sizes 1000,100000]`
//!
//! For each size N it fills a fresh store with N jobs (and N waiting messages on
//! another queue), then measures:
//! - ledger transitions/s: read, apply a real lifecycle event, compare-and-swap;
//! - queue round trips/s: send + receive + ack of one message;
//! - listing one page of 100 jobs by state, from the middle of the set.
//!
//! Each throughput is measured with 64 concurrent clients (what group commit is for)
//! and with 1 client (every write waits for its own fsync) for comparison.

use std::sync::Arc;
use std::time::{Duration, Instant};

use respawn_adapters::local::{LocalLedger, LocalQueue, LocalStore};
use respawn_core::job::{JobId, JobState};
use respawn_core::lifecycle::{self, Event, Timeouts};
use respawn_core::ports::ledger::{Ledger, ListQuery};
use respawn_core::ports::queue::{Outgoing, Queue, Receive};
use respawn_core::spec::{self, Format};
use respawn_core::time::Timestamp;

const CLIENTS: usize = 64;
const TRANSITIONS: usize = 20_000;
const ROUND_TRIPS: usize = 20_000;
const QUEUE: &str = "bench.work";

fn main() {
    let sizes = parse_sizes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "| jobs stored | clients | ledger transitions/s | queue round trips/s | list page by state (p50 / p99) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for n in sizes {
        rt.block_on(run_size(n));
    }
}

fn parse_sizes() -> Vec<usize> {
    let args: Vec<String> = std::env::args().collect();
    let pos = args.iter().position(|a| a == "--sizes");
    match pos.and_then(|i| args.get(i + 1)) {
        Some(list) => list
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        None => vec![1_000, 100_000],
    }
}

async fn run_size(n: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path()).expect("open");
    let ledger = Arc::new(store.ledger());
    let queue = Arc::new(store.queue(5));
    let ids = fill(&ledger, &queue, n).await;
    let list = list_pages(&ledger).await;
    for clients in [CLIENTS, 1] {
        let scale = if clients == 1 { 20 } else { 1 };
        let t = transitions(&ledger, &ids, clients, TRANSITIONS / scale).await;
        let q = round_trips(&queue, clients, ROUND_TRIPS / scale).await;
        println!(
            "| {n} | {clients} | {t:.0} | {q:.0} | {:.2} ms / {:.2} ms |",
            ms(list.0),
            ms(list.1)
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn spec() -> respawn_core::JobSpec {
    spec::parse(
        "name: bench\ncommand: [python, train.py]\nresources: { gpus: 1, memory: 16GiB }\nlabels: { team: bench }\n",
        Format::Yaml,
    )
    .expect("spec")
}

/// N jobs (10% left pending, the rest succeeded) and N waiting messages.
async fn fill(ledger: &Arc<LocalLedger>, queue: &Arc<LocalQueue>, n: usize) -> Vec<JobId> {
    let started = Instant::now();
    let spec = spec();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (ledger, queue, spec) = (ledger.clone(), queue.clone(), spec.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (c..n).step_by(CLIENTS) {
                let now = Timestamp(1_700_000_000_000 + i as u64);
                let mut rec = respawn_core::JobRecord::new(
                    JobId::generate(now),
                    "default",
                    spec.clone(),
                    now,
                );
                if i % 10 != 0 {
                    rec.state = JobState::Succeeded;
                }
                let rec = ledger.create(rec).await.expect("create");
                queue
                    .send("bench.backlog", Outgoing::new(vec![0u8; 200]))
                    .await
                    .expect("send");
                if rec.state == JobState::Pending {
                    ids.push(rec.id);
                }
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("fill task"));
    }
    eprintln!("filled {n} jobs + {n} messages in {:?}", started.elapsed());
    ids
}

/// The event that moves a job along a realistic loop of states.
fn next_event(state: JobState, attempt: u32, at: Timestamp) -> Event {
    match state {
        JobState::Pending => Event::Dispatch { attempt, waits: 0 },
        JobState::Allocating => Event::VmAllocated {
            attempt,
            vm: format!("vm-{attempt}"),
            spot: true,
        },
        JobState::Starting => Event::WorkloadStarted {
            attempt,
            restored_checkpoint: None,
        },
        JobState::Running => Event::PreemptionNotice {
            attempt,
            deadline: at.plus(Duration::from_secs(120)),
        },
        _ => Event::VmTerminated {
            attempt,
            reason: "preempted".into(),
        },
    }
}

async fn transitions(
    ledger: &Arc<LocalLedger>,
    ids: &[JobId],
    clients: usize,
    total: usize,
) -> f64 {
    let per_client = total / clients;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let ledger = ledger.clone();
        // Each client owns a disjoint set of jobs, as event handlers mostly do.
        let mine: Vec<JobId> = ids
            .iter()
            .skip(c)
            .step_by(clients)
            .take(50)
            .cloned()
            .collect();
        tasks.push(tokio::spawn(async move {
            let t = Timeouts::default();
            for i in 0..per_client {
                let id = &mine[i % mine.len()];
                let rec = ledger.get(id).await.expect("get");
                let at = Timestamp(rec.updated_at.0 + 1);
                let mut tr =
                    lifecycle::apply(&rec, &next_event(rec.state, rec.attempt, at), at, &t);
                tr.record.outbox.clear();
                ledger.update(tr.record).await.expect("update");
            }
        }));
    }
    for t in tasks {
        t.await.expect("transition task");
    }
    (per_client * clients) as f64 / started.elapsed().as_secs_f64()
}

async fn round_trips(queue: &Arc<LocalQueue>, clients: usize, total: usize) -> f64 {
    let per_client = total / clients;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < per_client {
                queue
                    .send(QUEUE, Outgoing::new(vec![1u8; 200]).priority(5))
                    .await
                    .expect("send");
                let got = queue
                    .receive(
                        QUEUE,
                        Receive {
                            max: 1,
                            lease: Duration::from_secs(60),
                            wait: Duration::from_secs(1),
                        },
                    )
                    .await
                    .expect("receive");
                for d in got {
                    queue.ack(&d).await.expect("ack");
                    done += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("round trip task");
    }
    (per_client * clients) as f64 / started.elapsed().as_secs_f64()
}

/// p50 and p99 time to list one page of 100 jobs in a state, from the middle.
async fn list_pages(ledger: &Arc<LocalLedger>) -> (Duration, Duration) {
    let mut q = ListQuery {
        state: Some(JobState::Succeeded),
        limit: 100,
        ..Default::default()
    };
    let first = ledger.list(&q).await.expect("list");
    let mut samples = Vec::new();
    for _ in 0..200 {
        q.after = first.next.clone();
        let t = Instant::now();
        let page = ledger.list(&q).await.expect("list");
        samples.push(t.elapsed());
        assert_eq!(page.jobs.len(), 100);
    }
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

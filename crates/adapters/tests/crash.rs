//! Crash safety of the durable local store: a child process writes to the ledger and
//! the queue as fast as it can and prints each write once the store acknowledged it;
//! the test kills it with SIGKILL at a random moment, 100 times, and checks that the
//! store opens cleanly and holds every acknowledged write.
//!
//! What this cannot tell: SIGKILL kills the process, not the machine, so whatever
//! the process handed to the kernel survives it whether or not it was fsync'd — the
//! test passes with `synchronous=OFF` too. Power-loss durability rests on
//! `synchronous=FULL` on every connection, which
//! `every_connection_commits_with_fsync` checks (and which fails with `OFF`).
#![cfg(feature = "local")]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use respawn_adapters::local::LocalStore;
use respawn_core::job::{JobId, JobState};
use respawn_core::ports::ledger::Ledger;
use respawn_core::ports::queue::{Outgoing, Queue, Receive};
use respawn_core::time::Timestamp;

const CHILD_ENV: &str = "RESPAWN_CRASH_CHILD_DIR";
const QUEUE: &str = "crash-test";
const KILLS: usize = 100;

/// The child's body. Runs only when the parent test starts this binary with
/// `CHILD_ENV` set; otherwise it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = LocalStore::open(&dir).expect("child opens store");
    let ledger = Arc::new(store.ledger());
    let queue = Arc::new(store.queue(1000));
    let mut tasks = Vec::new();
    // Several writers at once, so that kills land inside group commits.
    for w in 0..8u64 {
        let (ledger, queue) = (ledger.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let now = Timestamp(1_700_000_000_000 + w * 1_000_000 + i);
                let rec = respawn_core::conformance::sample_record("crash", now);
                let stored = ledger.create(rec).await.expect("create");
                say(&format!("L {}", stored.id));
                let mut next = stored.clone();
                next.state = JobState::Running;
                let updated = ledger.update(next).await.expect("update");
                say(&format!("U {} {}", updated.id, updated.version));
                let id = queue
                    .send(QUEUE, Outgoing::new(format!("{w}-{i}")))
                    .await
                    .expect("send");
                say(&format!("Q {id}"));
                if i % 2 == 0 {
                    let got = queue
                        .receive(
                            QUEUE,
                            Receive {
                                max: 1,
                                ..Receive::default()
                            },
                        )
                        .await
                        .expect("receive");
                    for d in got {
                        say(&format!("R {}", d.id));
                        queue.ack(&d).await.expect("ack");
                        say(&format!("A {}", d.id));
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[derive(Default)]
struct Acked {
    created: HashSet<String>,
    versions: HashMap<String, u64>,
    sent: HashSet<String>,
    acked: HashSet<String>,
    /// Received, so possibly acked by a child killed before it could say so.
    received: HashSet<String>,
}

/// Runs a child, kills it after `after`, and returns the ids it created this time.
fn run_child_until_killed(
    dir: &std::path::Path,
    after: Duration,
    acked: &mut Acked,
) -> Vec<String> {
    let mut fresh = Vec::new();
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "crash_child_writer",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    std::thread::sleep(after);
    child.kill().expect("SIGKILL child");
    let _ = child.wait();
    for line in reader.join().expect("reader") {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["L", id] => {
                acked.created.insert((*id).to_owned());
                fresh.push((*id).to_owned());
            }
            ["U", id, v] => {
                acked
                    .versions
                    .insert((*id).to_owned(), v.parse().expect("version"));
            }
            ["Q", id] => {
                acked.sent.insert((*id).to_owned());
            }
            ["R", id] => {
                acked.received.insert((*id).to_owned());
            }
            ["A", id] => {
                acked.acked.insert((*id).to_owned());
            }
            _ => {}
        }
    }
    fresh
}

/// Every acknowledged create (and update) among `ids` is in the ledger.
async fn check_jobs<'a>(
    ledger: &impl Ledger,
    ids: impl Iterator<Item = &'a String>,
    acked: &Acked,
    round: usize,
) {
    for id in ids {
        let id: JobId = id.parse().expect("id");
        let rec = ledger
            .get(&id)
            .await
            .unwrap_or_else(|e| panic!("round {round}: acknowledged create lost: {e}"));
        if let Some(v) = acked.versions.get(id.as_str()) {
            assert!(
                rec.version >= *v,
                "round {round}: acknowledged update of {id} lost"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_loses_acknowledged_writes() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked = Acked::default();
    let mut rng = rand::rng();
    let started = Instant::now();
    for round in 0..KILLS {
        let after = Duration::from_millis(rng.random_range(30..150));
        let fresh = run_child_until_killed(dir.path(), after, &mut acked);

        let store = LocalStore::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: store does not open: {e}"));
        store
            .check()
            .await
            .unwrap_or_else(|e| panic!("round {round}: integrity check failed: {e}"));
        let ledger = store.ledger();
        check_jobs(&ledger, fresh.iter(), &acked, round).await;
        // Everything sent and not acked is still queued; nothing acked came back.
        let queue = store.queue(1000);
        let present: HashSet<String> = queue
            .message_ids(QUEUE)
            .await
            .expect("ids")
            .into_iter()
            .collect();
        for id in acked.sent.difference(&acked.acked) {
            let maybe_acked = acked.received.contains(id);
            assert!(
                present.contains(id) || maybe_acked,
                "round {round}: acknowledged send {id} lost"
            );
        }
        for id in &acked.acked {
            assert!(
                !present.contains(id),
                "round {round}: acked message {id} came back"
            );
        }
        drop(store);
    }
    // Later rounds must not have damaged what earlier ones wrote.
    let store = LocalStore::open(dir.path()).expect("open");
    check_jobs(&store.ledger(), acked.created.iter(), &acked, KILLS).await;
    assert!(
        acked.created.len() > KILLS,
        "the child did real work: {} creates",
        acked.created.len()
    );
    eprintln!(
        "{KILLS} kills in {:?}: {} creates, {} updates, {} sends, {} acks survived",
        started.elapsed(),
        acked.created.len(),
        acked.versions.len(),
        acked.sent.len(),
        acked.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_commits_with_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path()).expect("open");
    let (writer, reader) = store.durability().await.expect("pragmas");
    for (who, d) in [("writer", writer), ("reader", reader)] {
        assert_eq!(d.journal_mode, "wal", "{who}");
        assert_eq!(d.synchronous, 2, "{who}: synchronous is not FULL");
    }
}

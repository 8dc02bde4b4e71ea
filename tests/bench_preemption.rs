//! Preemption notice → the replacement attempt's workload started, on the local
//! stack (real `respawn up`, agents, trainer), over 100 preemptions of one job.
//!
//! `cargo build --release && cargo bench -p respawn-e2e --bench preemption`
//!
//! Measured from just before the notice is given to the moment the replacement's
//! agent has restored the checkpoint and started the workload process (its
//! `workload_started` time), so the workload's own start-up is excluded. Included:
//! the agent noticing, SIGTERM, the trainer's last checkpoint and exit, the upload,
//! the exit report, the broker's transition, dispatch, the new VM's agent starting,
//! the restore.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use respawn_e2e::*;

const PREEMPTIONS: usize = 100;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = std::env::args()
        .skip_while(|a| a != "--preemptions")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(PREEMPTIONS);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate_csv(300, &dir.path().join("p.csv"));
    drop_file(
        &data.join("bucket/in/p.csv"),
        &std::fs::read(dir.path().join("p.csv")).unwrap(),
    );
    let up = Up::start(&data, &["--slots", "2"]).await;
    let spec = "name: long-run\ncommand: [respawn-trainer, --steps, \"100000000\", --checkpoint-every, \"200\", --step-delay-ms, \"2\", --hidden, \"8\"]\ninputs: [\"bucket://in/p.csv\"]\n";
    let id = up.submit(spec).await["id"].as_str().unwrap().to_owned();

    let (mut total, mut to_exit, mut to_dispatch, mut to_start) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let attempt = (i + 1) as u64;
        up.wait_job(&id, Duration::from_secs(60), "running", |j| {
            j["state"] == "running" && j["attempt"].as_u64() == Some(attempt)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t0 = now_ms();
        assert!(up.preempt(&id, Duration::from_secs(10)).await);
        let job = up
            .wait_job(&id, Duration::from_secs(60), "replacement started", |j| {
                j["attempts"]
                    .as_array()
                    .and_then(|a| a.get(i + 1))
                    .is_some_and(|a| a["started_at"].is_u64())
            })
            .await;
        let old = &job["attempts"][i];
        let new = &job["attempts"][i + 1];
        let started = new["started_at"].as_u64().unwrap();
        let ended = old["ended_at"].as_u64().unwrap();
        let dispatched = new["dispatched_at"].as_u64().unwrap();
        total.push(started.saturating_sub(t0));
        to_exit.push(ended.saturating_sub(t0));
        to_dispatch.push(dispatched.saturating_sub(ended));
        to_start.push(started.saturating_sub(dispatched));
    }
    for v in [&mut total, &mut to_exit, &mut to_dispatch, &mut to_start] {
        v.sort_unstable();
    }
    println!("preemptions: {n}");
    println!("| span | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("notice → replacement workload started", &total),
        (
            "notice → old attempt ended (SIGTERM, checkpoint, upload, exit report)",
            &to_exit,
        ),
        ("old attempt ended → replacement dispatched", &to_dispatch),
        (
            "dispatched → workload started (VM, agent, restore)",
            &to_start,
        ),
    ] {
        println!(
            "| {name} | {} ms | {} ms | {} ms |",
            pct(v, 0.5),
            pct(v, 0.99),
            v[v.len() - 1]
        );
    }
}

//! Throughput of the local stack on a real `respawn up` (run by `scripts/bench`):
//!
//! - `e2e JOBS UP-ARGS…`: JOBS jobs whose command is `true`, submitted through the
//!   API by concurrent clients; the span runs from the first submission to the
//!   moment every job has succeeded.
//! - `storm RUNNING PREEMPTED UP-ARGS…`: RUNNING long jobs running, PREEMPTED of
//!   them given a 1 s preemption notice at once; the span runs from the notices to
//!   the moment all RUNNING jobs run again.
//!
//! `cargo build --release && cargo bench -p respawn-e2e --bench throughput -- e2e 1000 --slots 2`
//!
//! Prints one markdown row.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use respawn_e2e::Up;

const CLIENTS: usize = 16;

/// Submits `jobs` jobs running `command`, returns when all are accepted.
async fn submit_all(up: &Up, jobs: usize, command: &'static str) {
    let (base, token) = (up.base.clone(), up.token());
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (base, token) = (base.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in (c..jobs).step_by(CLIENTS) {
                let spec = format!(
                    "{{\"name\": \"bench-{i}\", \"command\": {command}, \"labels\": {{\"bench\": \"throughput\"}}}}"
                );
                let resp = http
                    .post(format!("{base}/v1/jobs"))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(spec)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Submits `jobs` jobs running `true` and waits until they all succeeded.
async fn e2e(jobs: usize, up_args: &[&str]) -> (Duration, usize) {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&dir.path().join("data"), up_args).await;
    let started = Instant::now();
    submit_all(&up, jobs, r#"["true"]"#).await;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // One job per live state is enough to know the run is not over: the
        // broker is not made to list thousands of records while it is measured.
        let mut live = false;
        for state in ["pending", "allocating", "starting", "running", "preempted"] {
            let page = up.get(&format!("/v1/jobs?state={state}&limit=1")).await;
            live = live || page["jobs"].as_array().is_some_and(|j| !j.is_empty());
        }
        if !live {
            let took = started.elapsed();
            let done = up.job_ids(Some("succeeded")).await.len();
            assert_eq!(done, jobs, "jobs not succeeded");
            let failed = up.job_ids(Some("failed")).await.len();
            drop(up);
            return (took, failed);
        }
        assert!(Instant::now() < deadline, "not done in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `running` long jobs, `preempted` of them preempted at once: how long until all
/// run again (each preempted job on a new attempt).
async fn storm(running: usize, preempted: usize, up_args: &[&str]) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&dir.path().join("data"), up_args).await;
    submit_all(&up, running, r#"["sleep", "600"]"#).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut ids: Vec<String> = Vec::new();
    while ids.len() < running {
        ids = up.job_ids(Some("running")).await;
        assert!(
            Instant::now() < deadline,
            "{} of {running} running",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let victims: Vec<String> = ids.into_iter().take(preempted).collect();
    let started = Instant::now();
    let notices = victims
        .iter()
        .map(|id| up.preempt(id, Duration::from_secs(1)));
    futures::future::join_all(notices).await;
    loop {
        let now_running = up.job_ids(Some("running")).await.len();
        // A preempted job runs again once its second attempt has started.
        if now_running == running {
            let mut again = 0;
            for id in &victims {
                let job = up.job(id).await;
                again +=
                    usize::from(job["attempt"].as_u64() == Some(2) && job["state"] == "running");
            }
            if again == preempted {
                let took = started.elapsed();
                drop(up);
                return took;
            }
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(120),
            "{now_running} of {running} running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let number =
        |i: usize| -> usize { args.get(i).and_then(|a| a.parse().ok()).expect("a number") };
    match args.first().map(String::as_str) {
        Some("e2e") => {
            let jobs = number(1);
            let up_args: Vec<&str> = args.iter().skip(2).map(String::as_str).collect();
            let (took, failed) = e2e(jobs, &up_args).await;
            println!(
                "| `{}` | {jobs} | {:.2} s | {:.0} jobs/s | {failed} |",
                up_args.join(" "),
                took.as_secs_f64(),
                jobs as f64 / took.as_secs_f64()
            );
        }
        Some("storm") => {
            let (running, preempted) = (number(1), number(2));
            let up_args: Vec<&str> = args.iter().skip(3).map(String::as_str).collect();
            let took = storm(running, preempted, &up_args).await;
            println!(
                "| `{}` | {running} | {preempted} | {:.2} s |",
                up_args.join(" "),
                took.as_secs_f64()
            );
        }
        _ => panic!("usage: throughput e2e JOBS UP-ARGS… | storm RUNNING PREEMPTED UP-ARGS…"),
    }
}

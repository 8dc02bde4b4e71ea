//! Throughput of the local stack, end to end: N jobs whose command is `true`,
//! submitted through the API by concurrent clients to a real `respawn up`; the span
//! runs from the first submission to the moment every job has succeeded.
//!
//! `cargo build --release && cargo bench -p respawn-e2e --bench throughput -- [JOBS] [--slots N]... [--pool]`
//!
//! Prints one markdown row per configuration.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use respawn_e2e::Up;
use serde_json::Value;

const CLIENTS: usize = 16;

/// Submits `jobs` jobs running `true` and waits until they all succeeded.
async fn run(jobs: usize, up_args: &[&str]) -> (Duration, usize) {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&dir.path().join("data"), up_args).await;
    let (base, token) = (up.base.clone(), up.token());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (base, token) = (base.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in (c..jobs).step_by(CLIENTS) {
                let spec = format!(
                    "{{\"name\": \"true-{i}\", \"command\": [\"true\"], \"labels\": {{\"bench\": \"throughput\"}}}}"
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
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = count(&http, &base, &token, "succeeded").await;
        if done == jobs {
            let took = started.elapsed();
            let failed = count(&http, &base, &token, "failed").await;
            drop(up);
            return (took, failed);
        }
        assert!(Instant::now() < deadline, "{done} of {jobs} succeeded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn count(http: &reqwest::Client, base: &str, token: &str, state: &str) -> usize {
    let mut n = 0;
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/jobs?state={state}&limit=1000");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let page: Value = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        n += page["jobs"].as_array().map_or(0, Vec::len);
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return n,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let jobs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let up_args: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let (took, failed) = run(jobs, &up_args).await;
    println!(
        "| {} | {jobs} | {:.1} s | {:.0} jobs/s | {failed} failed |",
        up_args.join(" "),
        took.as_secs_f64(),
        jobs as f64 / took.as_secs_f64()
    );
}

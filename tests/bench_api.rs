//! API submissions/s and latency: 32 keep-alive clients submitting jobs to a real
//! `respawn up` (durable: every 201 means the job and its dispatch are fsync'd).
//!
//! `cargo build --release && cargo bench -p respawn-e2e --bench api [-- --traces
//! export|sampled] [--metrics off] [--seconds N]`
//!
//! The stack runs with no VM slots, so the jobs wait in the dispatch queue and the
//! machine's 2 cores serve only the API, the ledger and the queue. With `--traces
//! export`, the broker exports its spans as OTLP/HTTP to an endpoint in this
//! process that takes them and counts the bytes (the tracing overhead's cost, on
//! the same 2 cores).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use respawn_e2e::{Up, cpu_time};

const CLIENTS: usize = 32;
const WARMUP: Duration = Duration::from_secs(2);

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let run = Duration::from_secs(flag("--seconds").map_or(15, |s| s.parse().unwrap()));
    // `sampled`: exported, one trace in ten kept (OpenTelemetry's standard
    // sampler settings, which respawn leaves to the SDK).
    let (export, sampled) = match flag("--traces").as_deref() {
        None | Some("off") => (false, false),
        Some("export") => (true, false),
        Some("sampled") => (true, true),
        Some(other) => panic!("--traces {other}: off, export or sampled"),
    };
    let sink = if export {
        Some(respawn_e2e::otlp::Sink::start().await)
    } else {
        None
    };
    let mut env: Vec<(&str, &str)> = match &sink {
        Some(s) => vec![("OTEL_EXPORTER_OTLP_ENDPOINT", s.url.as_str())],
        None => Vec::new(),
    };
    if sampled {
        env.push(("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"));
        env.push(("OTEL_TRACES_SAMPLER_ARG", "0.1"));
    }
    // `--metrics off`: traces alone, to tell their cost from the metrics'.
    if flag("--metrics").as_deref() == Some("off") {
        env.push(("OTEL_METRICS_EXPORTER", "none"));
    }
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start_with_env(&dir.path().join("data"), &["--slots", "0"], &env).await;
    let (base, token) = (up.base.clone(), up.token());
    let started = Instant::now();
    // The broker's CPU time over the measured seconds, read as they begin and end.
    let broker = up.pid().as_raw();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep(WARMUP).await;
        let from = cpu_time(broker);
        tokio::time::sleep(run).await;
        cpu_time(broker) - from
    });
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (base, token) = (base.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            // One client per task: its own keep-alive connection.
            let http = reqwest::Client::new();
            let mut lat = Vec::new();
            let mut i = 0u64;
            loop {
                let t = Instant::now();
                if t.duration_since(started) > WARMUP + run {
                    return lat;
                }
                let spec = format!(
                    "{{\"name\": \"bench-{c}-{i}\", \"command\": [\"python\", \"train.py\"], \"resources\": {{\"gpus\": 0}}, \"labels\": {{\"bench\": \"api\"}}}}"
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
                let _ = resp.bytes().await;
                if t.duration_since(started) > WARMUP {
                    lat.push(t.elapsed());
                }
                i += 1;
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let cpu = cpu.await.unwrap();
    all.sort_unstable();
    let rate = all.len() as f64 / run.as_secs_f64();
    println!(
        "clients: {CLIENTS}, measured: {} s after {} s warm-up",
        run.as_secs(),
        WARMUP.as_secs()
    );
    // Give the exporter its last batch before counting what it sent.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let traces = match &sink {
        Some(s) => {
            let (requests, kib) = s.received();
            assert!(requests > 0, "traces were to be exported, and none came");
            let how = if sampled { "sampled 1/10" } else { "exported" };
            format!("{how} ({requests} requests, {kib} KiB)")
        }
        None => "off".to_owned(),
    };
    println!("| traces | submissions/s | p50 | p99 | max | broker CPU per 1,000 |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| {traces} | {rate:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} ms |",
        pct(&all, 0.5),
        pct(&all, 0.99),
        pct(&all, 1.0),
        cpu.as_secs_f64() * 1000.0 / (all.len() as f64 / 1000.0)
    );
}

//! Function cold starts: process start → first event handled, for each function's
//! release package (`scripts/build-functions`: target/lambda/respawn-<name>/bootstrap)
//! under a local Lambda runtime API, against the AWS emulator; and each package's
//! size. 20 starts per function.
//!
//!   scripts/build-functions
//!   cargo bench -p respawn-e2e --features aws --bench cold_start
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use respawn_e2e::aws::{Emulator, root};
use respawn_e2e::lambda::{self, Function};
use serde_json::{Value, json};

const STARTS: usize = 20;

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(Emulator::fixture(name)).unwrap()).unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let aws = Emulator::start();
    let stack = "bench";
    aws.resources(stack);
    // The emulator builds each service's state on its first call (EC2's takes
    // about a second): made here, so that no function's start pays for it.
    aws.python(
        r#"
import boto3
kw = dict(endpoint_url="{endpoint}", region_name="us-east-1",
          aws_access_key_id="test", aws_secret_access_key="test")
boto3.client("ec2", **kw).describe_instances()
boto3.client("s3", **kw).list_objects_v2(Bucket="bench-state")
boto3.client("sqs", **kw).list_queues()
"#,
    );
    let config = tempfile::tempdir().unwrap();
    let env = lambda::env(&aws.endpoint, stack, config.path());
    let packages = root().join("target/lambda");
    println!(
        "function      starts   init p50 / p99 ms   first event handled p50 / p99 ms   binary MB"
    );
    for name in [
        "submit",
        "dispatch",
        "events",
        "on-upload",
        "notify",
        "reconcile",
        "api",
    ] {
        let bootstrap: PathBuf = packages.join(format!("respawn-{name}/bootstrap"));
        assert!(
            bootstrap.is_file(),
            "{} missing: run scripts/build-functions",
            bootstrap.display()
        );
        let event = match name {
            "reconcile" => fixture("eventbridge-scheduled.json"),
            "api" => fixture("apigw-http-v2-request.json"),
            _ => json!({ "Records": [] }),
        };
        let mut times = Vec::with_capacity(STARTS);
        let mut inits = Vec::with_capacity(STARTS);
        for _ in 0..STARTS {
            let f = Function::start_binary(&bootstrap, name, &env).await;
            let answer = f.invoke(event.clone()).await;
            let took = f.started().elapsed();
            assert!(answer.is_ok(), "{name}: {answer:?}");
            times.push(took);
            inits.push(f.init_time().unwrap());
            drop(f);
        }
        times.sort();
        inits.sort();
        let size = std::fs::metadata(&bootstrap).unwrap().len() as f64 / (1024.0 * 1024.0);
        println!(
            "{name:<12} {STARTS:>6} {:>11.1} / {:>5.1} {:>26.1} / {:>5.1} {size:>11.1}",
            ms(percentile(&inits, 0.5)),
            ms(percentile(&inits, 0.99)),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

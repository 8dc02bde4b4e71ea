//! Submissions through RabbitMQ, end to end: a producer publishes job specs with
//! publisher confirms; `respawn up --queue amqp://…` consumes them, makes each job
//! durable in its ledger, then acks. Measured until the ledger holds every job.
//! Baseline in the same run: raw lapin publish (confirms per batch) + consume with
//! an ack per message, on a plain queue.
//!
//! `cargo build --release && cargo bench -p respawn-e2e --bench amqp_submit`
#![allow(clippy::unwrap_used, non_snake_case)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use respawn_adapters::local::LocalStore;
use respawn_e2e::Up;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Messages per run (`RESPAWN_BENCH_N` overrides).
const N_DEFAULT: usize = 20_000;
const BATCH: usize = 1_000;

fn body(i: usize) -> Vec<u8> {
    format!(r#"{{"spec": {{"name": "bench-{i}", "command": ["python", "train.py"], "labels": {{"bench": "amqp"}}}}}}"#)
        .into_bytes()
}

fn n() -> usize {
    std::env::var("RESPAWN_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(N_DEFAULT)
}

async fn publish_all(ch: &Channel, queue: &str) {
    let N = n();
    let mut pending = Vec::with_capacity(BATCH);
    for i in 0..N {
        let props = BasicProperties::default()
            .with_message_id(format!("b-{i}").as_str().into())
            .with_delivery_mode(2);
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body(i),
                props,
            )
            .await
            .unwrap();
        pending.push(confirm);
        if pending.len() == BATCH {
            for c in pending.drain(..) {
                check(c.await.unwrap());
            }
        }
    }
    for c in pending {
        check(c.await.unwrap());
    }
}

fn check(c: lapin::Confirmation) {
    assert!(
        matches!(c, lapin::Confirmation::Ack(None)),
        "the broker did not take a message: {c:?}"
    );
}

async fn baseline(conn: &Connection) -> (f64, f64) {
    let N = n();
    let q = format!("bench-raw-{}", std::process::id());
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(q.as_str().into(), durable, FieldTable::default())
        .await
        .unwrap();
    let t = Instant::now();
    publish_all(&ch, &q).await;
    let publish = N as f64 / t.elapsed().as_secs_f64();
    let cons = conn.create_channel().await.unwrap();
    cons.basic_qos(256, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = cons
        .basic_consume(
            q.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let t = Instant::now();
    for _ in 0..N {
        let d = consumer.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let consume = N as f64 / t.elapsed().as_secs_f64();
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    (publish, consume)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let N = n();
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let (raw_pub, raw_cons) = baseline(&conn).await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let prefix = format!("bench-{}.", std::process::id());
    let up = Up::start(
        &data,
        &["--queue", URL, "--queue-prefix", &prefix, "--slots", "0"],
    )
    .await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let submit = format!("{prefix}submit");
    let t = Instant::now();
    publish_all(&ch, &submit).await;
    let published = t.elapsed();
    let store = LocalStore::open(&data).unwrap();
    let ledger = store.ledger();
    let mut last = (0, Instant::now());
    loop {
        let c = ledger.count().await.unwrap() as usize;
        if c >= N {
            break;
        }
        if c != last.0 {
            last = (c, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(20) {
            let log = up.log_text();
            let odd: Vec<&str> = log
                .lines()
                .filter(|l| {
                    !l.contains("job submitted")
                        && !l.contains("job updated")
                        && !l.contains("attempt queued")
                        && !l.contains("reconciled")
                })
                .collect();
            let out = std::process::Command::new("rabbitmqctl")
                .args([
                    "list_queues",
                    "-q",
                    "name",
                    "messages",
                    "messages_unacknowledged",
                    "consumers",
                ])
                .output()
                .unwrap();
            panic!(
                "stuck at {c} of {N} jobs for 20 s\n{}\nqueues:\n{}",
                odd.join("\n"),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = t.elapsed();
    drop(up);
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name"])
        .output()
        .unwrap();
    for name in String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(&prefix))
    {
        let _ = ch
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }
    println!("{N} messages, 2 cores, RabbitMQ 3.10 on the same machine");
    println!("| path | messages/s |");
    println!("|---|---:|");
    println!("| raw lapin publish, confirms per {BATCH} (baseline) | {raw_pub:.0} |");
    println!("| raw lapin consume, ack per message (baseline) | {raw_cons:.0} |");
    println!(
        "| respawn: publish → job durable in the ledger → ack, end to end | {:.0} |",
        N as f64 / total.as_secs_f64()
    );
    println!(
        "(publishing alone took {:.2} s of the {:.2} s)",
        published.as_secs_f64(),
        total.as_secs_f64()
    );
}

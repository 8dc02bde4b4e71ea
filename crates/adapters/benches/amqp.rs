//! Throughput of the RabbitMQ queue against raw lapin on the same broker.
//!
//! `cargo bench -p respawn-adapters --features amqp --bench amqp [-- --messages 100000]`
//!
//! Broker: `RESPAWN_AMQP_URL`, or the local one (guest/guest). Queues are durable with
//! `x-max-priority: 9` and messages persistent on both sides; each run uses fresh
//! queues and deletes them.
//!
//! - baseline: raw lapin publishing with confirms awaited in batches of 1,000, then
//!   consuming (prefetch 64) with an ack per message;
//! - `AmqpQueue`: confirmed sends from 32 tasks, then receive + ack from 32 tasks, then
//!   32 clients each doing send + receive + ack round trips (a worker's loop).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use respawn_adapters::amqp::{AmqpOptions, AmqpQueue};
use respawn_core::ports::queue::{Outgoing, Queue, Receive};

const CLIENTS: usize = 32;
const BATCH: usize = 1_000;
/// About the size of a job message (a spec reference and a few ids, as JSON).
const BODY: usize = 256;

fn main() {
    let url = std::env::var("RESPAWN_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n = parse_messages();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let probe = Connection::connect(&url, ConnectionProperties::default()).await;
        if let Err(e) = probe {
            eprintln!("skipping: no RabbitMQ at the URL ({e}); set RESPAWN_AMQP_URL");
            return;
        }
        println!("| path | messages | seconds | messages/s |");
        println!("|---|---:|---:|---:|");
        raw(&url, n).await;
        adapter(&url, n).await;
    });
}

fn parse_messages() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--messages")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

fn row(path: &str, n: usize, took: Duration) {
    println!(
        "| {path} | {n} | {:.2} | {:.0} |",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
}

fn queue_name(what: &str) -> String {
    format!(
        "bench-amqp-{what}-{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    )
}

async fn raw(url: &str, n: usize) {
    let props = ConnectionProperties::default().with_connection_name("respawn-bench-raw".into());
    let conn = Connection::connect(url, props).await.expect("connect");
    let publisher = conn.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let queue = queue_name("raw");
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::LongUInt(9));
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare");

    let body = vec![b'x'; BODY];
    let started = Instant::now();
    for i in 0..n {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ulid::Ulid::generate().to_string().into());
        // Dropping the confirm leaves it to wait_for_confirms.
        drop(
            publisher
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
                .expect("publish"),
        );
        if (i + 1) % BATCH == 0 || i + 1 == n {
            publisher.wait_for_confirms().await.expect("confirms");
        }
    }
    let published = started.elapsed();
    row(
        "raw lapin: publish, confirms awaited per 1,000",
        n,
        published,
    );

    let consumer_channel = conn.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(64, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let started = Instant::now();
    for _ in 0..n {
        let d = consumer
            .next()
            .await
            .expect("stream open")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let consumed = started.elapsed();
    row("raw lapin: consume, ack per message", n, consumed);
    row(
        "raw lapin: both, one after the other",
        n,
        published + consumed,
    );
    publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    let _ = conn.close(200, "bench done".into()).await;
}

async fn adapter(url: &str, n: usize) {
    let options = AmqpOptions {
        connection_name: "respawn-bench".into(),
        ..AmqpOptions::default()
    };
    let q = AmqpQueue::connect(url, options).await.expect("connect");
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
    let lease = Receive {
        max: 1,
        lease: Duration::from_secs(300),
        wait: Duration::from_secs(5),
    };

    // Sends alone, then receives alone.
    let queue = Arc::new(queue_name("split"));
    q.receive(&queue, Receive::default())
        .await
        .expect("declare");
    let took = run_clients(n, {
        let (q, queue, body) = (q.clone(), queue.clone(), body.clone());
        move || {
            let (q, queue, body) = (q.clone(), queue.clone(), body.clone());
            async move {
                q.send(&queue, Outgoing::new(body)).await.expect("send");
            }
        }
    })
    .await;
    row("AmqpQueue: send, 32 tasks", n, took);
    let took = run_clients(n, {
        let (q, queue) = (q.clone(), queue.clone());
        move || {
            let (q, queue) = (q.clone(), queue.clone());
            async move {
                let d = loop {
                    if let Some(d) = q.receive(&queue, lease).await.expect("receive").pop() {
                        break d;
                    }
                };
                q.ack(&d).await.expect("ack");
            }
        }
    })
    .await;
    row("AmqpQueue: receive + ack, 32 tasks", n, took);

    // A worker's loop: send, receive, ack.
    let queue = Arc::new(queue_name("round"));
    q.receive(&queue, Receive::default())
        .await
        .expect("declare");
    let took = run_clients(n, {
        let (q, queue, body) = (q.clone(), queue.clone(), body.clone());
        move || {
            let (q, queue, body) = (q.clone(), queue.clone(), body.clone());
            async move {
                q.send(&queue, Outgoing::new(body)).await.expect("send");
                let d = loop {
                    if let Some(d) = q.receive(&queue, lease).await.expect("receive").pop() {
                        break d;
                    }
                };
                q.ack(&d).await.expect("ack");
            }
        }
    })
    .await;
    row("AmqpQueue: send + receive + ack, 32 clients", n, took);

    for name in q.declared_queues() {
        q.delete_queue(&name).await.expect("delete");
    }
}

/// Runs `op` `n` times over `CLIENTS` tasks; returns the wall time.
async fn run_clients<F, Fut>(n: usize, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let left = Arc::new(AtomicUsize::new(n));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (left, op) = (left.clone(), op.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                    .is_ok()
                {
                    op().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    started.elapsed()
}

//! The RabbitMQ queue against a real broker: `RESPAWN_AMQP_URL`, or the local one at
//! 127.0.0.1:5672 (guest/guest). A broker that does not answer fails these tests (they
//! run in CI, where RabbitMQ is part of the test environment): a test that skipped
//! itself would pass without checking anything. The server is shared: every test uses
//! its own queue and connection names and deletes its queues at the end.
#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used)]

mod redelivery;
mod size;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use respawn_adapters::amqp::{AmqpOptions, AmqpQueue};
use respawn_core::conformance::unique_queue;
use respawn_core::ports::queue::{Error, Outgoing, Queue, Receive};

use support::{
    Proxy, close_connection, connect, host_port, lease, raw_channel, require_broker, url,
    with_cleanup,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let (q, _) = connect("conformance", 3).await;
    with_cleanup(&q, respawn_core::conformance::queue::run(&q, 3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_loses_nothing_and_ends_leases() {
    let (q, name) = connect("reconnect", 5).await;
    let queue = unique_queue("amqp-reconnect");
    with_cleanup(&q, async {
        let mut sent = BTreeSet::new();
        for i in 0..40 {
            sent.insert(
                q.send(&queue, Outgoing::new(format!("m{i}")))
                    .await
                    .unwrap(),
            );
        }
        // Lease 30 of them, and ack 10 before the connection goes.
        let mut held = Vec::new();
        while held.len() < 30 {
            let got = q
                .receive(
                    &queue,
                    Receive {
                        max: 30 - held.len(),
                        ..lease(2_000)
                    },
                )
                .await
                .unwrap();
            assert!(!got.is_empty(), "sent messages arrive");
            held.extend(got);
        }
        let mut acks: BTreeMap<String, u32> = BTreeMap::new();
        for d in held.drain(..10) {
            q.ack(&d).await.unwrap();
            *acks.entry(d.id).or_default() += 1;
        }

        close_connection(&name);
        let started = Instant::now();
        while q.is_connected() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the adapter sees the connection close"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Leases from the dead connection are gone: the broker requeued those messages.
        for d in &held {
            match q.ack(d).await {
                Err(Error::LeaseLost { .. }) => {}
                other => panic!("ack of a lease from a closed connection: {other:?}"),
            }
        }
        // Sending works again (it reconnects).
        for i in 0..10 {
            sent.insert(
                q.send(&queue, Outgoing::new(format!("after-{i}")))
                    .await
                    .unwrap(),
            );
        }
        assert!(q.is_connected(), "the next operation reconnected");

        // Everything not acked comes back; each message is acked exactly once.
        let started = Instant::now();
        while acks.len() < sent.len() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "missing after reconnect: {:?}",
                sent.iter()
                    .filter(|id| !acks.contains_key(*id))
                    .collect::<Vec<_>>()
            );
            for d in q.receive(&queue, lease(1_000)).await.unwrap() {
                assert!(sent.contains(&d.id), "only sent messages arrive");
                q.ack(&d).await.unwrap();
                *acks.entry(d.id).or_default() += 1;
            }
        }
        let extra = q.receive(&queue, lease(1_000)).await.unwrap();
        assert!(
            extra.is_empty(),
            "acked messages do not come back: {extra:?}"
        );
        assert!(acks.values().all(|&n| n == 1), "each acked once: {acks:?}");
        assert_eq!(acks.keys().cloned().collect::<BTreeSet<_>>(), sent);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_pipeline() {
    let (q, _) = connect("burst", 5).await;
    let queue = unique_queue("amqp-burst");
    with_cleanup(&q, async {
        // Declare first, so the timing is of sends alone.
        q.receive(&queue, lease(0)).await.unwrap();
        let started = Instant::now();
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let (q, queue) = (q.clone(), queue.clone());
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    for i in (t..1_000).step_by(32) {
                        ids.push(
                            q.send(&queue, Outgoing::new(format!("b{i}")))
                                .await
                                .unwrap(),
                        );
                    }
                    ids
                })
            })
            .collect();
        let mut sent = BTreeSet::new();
        for t in tasks {
            sent.extend(t.await.unwrap());
        }
        let took = started.elapsed();
        eprintln!("1,000 confirmed sends from 32 tasks: {took:?}");
        assert_eq!(sent.len(), 1_000);
        assert!(took < Duration::from_secs(10), "1,000 sends took {took:?}");

        // All of them are stored.
        let mut got = BTreeSet::new();
        let started = Instant::now();
        while got.len() < sent.len() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "only {} of 1,000 arrived",
                got.len()
            );
            for d in q
                .receive(
                    &queue,
                    Receive {
                        max: 64,
                        ..lease(1_000)
                    },
                )
                .await
                .unwrap()
            {
                q.ack(&d).await.unwrap();
                got.insert(d.id);
            }
        }
        assert_eq!(got, sent);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_and_vanished_queues() {
    let (q, _) = connect("foreign", 5).await;
    let queue = unique_queue("amqp-foreign");
    with_cleanup(&q, async {
        let raw = raw_channel().await;
        assert!(q.receive(&queue, lease(0)).await.unwrap().is_empty());

        // Published by someone else: no id, no headers. Read with defaults, no panic,
        // and given an id of its own.
        raw.basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"foreign",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
        let got = q.receive(&queue, lease(2_000)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].body[..], b"foreign");
        assert_eq!(got[0].deliveries, 1);
        assert!(
            ulid::Ulid::from_string(&got[0].id).is_ok(),
            "a fresh id: {}",
            got[0].id
        );
        assert_eq!(
            got[0].attributes.get("message_id"),
            Some(&got[0].id),
            "consumers see it as the message's id"
        );
        q.retry_later(&got[0], Duration::ZERO).await.unwrap();
        let again = q.receive(&queue, lease(2_000)).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, got[0].id, "a republished message keeps its id");
        assert_eq!(again[0].deliveries, 2);
        q.ack(&again[0]).await.unwrap();

        // The queue is deleted behind the adapter's back (its consumer is cancelled):
        // sends declare it again instead of being dropped as unroutable, and receives
        // open a new consumer.
        raw.queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
        let id = q.send(&queue, Outgoing::new("after delete")).await.unwrap();
        let got = q.receive(&queue, lease(2_000)).await.unwrap();
        assert_eq!(got.len(), 1, "the message sent after the delete is there");
        assert_eq!(got[0].id, id);
        q.ack(&got[0]).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused() {
    let (q, _) = connect("invalid", 5).await;
    for name in ["", "amq.reserved"] {
        assert!(matches!(
            q.send(name, Outgoing::new("x")).await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            q.receive(name, lease(0)).await,
            Err(Error::Invalid(_))
        ));
    }
    let long = "x".repeat(300);
    assert!(matches!(
        q.send(&long, Outgoing::new("x")).await,
        Err(Error::Invalid(_))
    ));
    assert!(q.declared_queues().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_puts_back_what_was_never_handed_out() {
    let (q, _) = connect("close", 5).await;
    let queue = unique_queue("amqp-close");
    with_cleanup(&q, async {
        for i in 0..5 {
            q.send(&queue, Outgoing::new(format!("c{i}")))
                .await
                .unwrap();
        }
        // All five are pushed to the consumer (prefetch 64); one is handed out.
        let leased = q
            .receive(
                &queue,
                Receive {
                    max: 1,
                    ..lease(2_000)
                },
            )
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        q.close().await;
        assert!(!q.is_connected());
        assert!(matches!(
            q.ack(&leased[0]).await,
            Err(Error::LeaseLost { .. })
        ));

        // The queue reconnects. The four never handed out still count no delivery;
        // the leased one went back with the connection and counts its delivery.
        let mut got = Vec::new();
        let started = Instant::now();
        while got.len() < 5 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "got only {got:?}"
            );
            got.extend(q.receive(&queue, lease(1_000)).await.unwrap());
        }
        for d in &got {
            let expected = if d.id == leased[0].id { 2 } else { 1 };
            assert_eq!(d.deliveries, expected, "{d:?}");
            q.ack(d).await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_is_unavailable_then_recovers() {
    let url = url();
    require_broker(&url);
    let proxy = Proxy::start(host_port(&url)).await;
    let options = AmqpOptions {
        connection_name: format!(
            "respawn-test-outage-{}",
            ulid::Ulid::generate().to_string().to_lowercase()
        ),
        ..AmqpOptions::default()
    };
    let q = AmqpQueue::connect(&proxy.url(&url), options).await.unwrap();
    let queue = unique_queue("amqp-outage");
    with_cleanup(&q, async {
        let before = q.send(&queue, Outgoing::new("before")).await.unwrap();

        proxy.down();
        // The first send may fail on the dead connection itself; the second goes
        // through the reconnection attempts (with back-off) and gives up in time.
        for attempt in 0..2 {
            let started = Instant::now();
            match q.send(&queue, Outgoing::new("during")).await {
                Err(Error::Unavailable(e)) => {
                    eprintln!(
                        "send {attempt} during the outage: {e} after {:?}",
                        started.elapsed()
                    );
                }
                other => panic!("a send with the broker away must be Unavailable: {other:?}"),
            }
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(20),
                "gave up in bounded time, not {took:?}"
            );
        }

        proxy.up();
        let started = Instant::now();
        let after = loop {
            match q.send(&queue, Outgoing::new("after")).await {
                Ok(id) => break id,
                Err(Error::Unavailable(_)) if started.elapsed() < Duration::from_secs(30) => {}
                Err(e) => panic!("no reconnection after the outage: {e}"),
            }
        };
        assert!(q.is_connected());
        let mut got = BTreeSet::new();
        while got.len() < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "got only {got:?}"
            );
            for d in q.receive(&queue, lease(1_000)).await.unwrap() {
                q.ack(&d).await.unwrap();
                got.insert(d.id);
            }
        }
        assert_eq!(got, BTreeSet::from([before, after]));
    })
    .await;
}

#[tokio::test]
async fn connect_fails_fast_when_nothing_listens() {
    let options = AmqpOptions::default();
    let started = Instant::now();
    match AmqpQueue::connect("amqp://guest:guest@127.0.0.1:1/%2f", options).await {
        Err(Error::Unavailable(_)) => {}
        other => panic!("connecting to a closed port: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(6));
}

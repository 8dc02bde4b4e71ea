//! The [`Queue`] contract, as tests. Lease and delay checks sleep for real (a few
//! hundred milliseconds): adapters keep time on their own clocks, as a broker does.

use std::time::Duration;

use crate::ports::queue::{Delivery, Error, Outgoing, Queue, Receive, dead_letter_queue};

use super::unique_queue;

/// Runs every check. `max_deliveries` is the adapter's dead-letter threshold.
pub async fn run(q: &dyn Queue, max_deliveries: u32) {
    run_with(q, max_deliveries, Duration::ZERO).await;
}

/// [`run`] for a broker that keeps leases and delays in coarser units: `tick` is
/// its unit (one second for SQS), added to every wait for a lease or delay to end.
pub async fn run_with(q: &dyn Queue, max_deliveries: u32, tick: Duration) {
    send_receive_ack(q).await;
    priority_then_fifo(q).await;
    receive_caps_at_max(q).await;
    delayed_messages_wait(q, tick).await;
    expired_leases_redeliver(q, tick).await;
    retry_later_redelivers_after_delay(q, tick).await;
    explicit_dead_letter(q).await;
    dead_letter_after_max_deliveries(q, max_deliveries).await;
    receive_waits_for_a_message(q).await;
    attributes_travel_with_messages(q).await;
    depth_counts_what_waits(q).await;
}

fn lease(ms: u64) -> Receive {
    Receive {
        max: 10,
        lease: Duration::from_millis(ms),
        wait: Duration::ZERO,
    }
}

async fn recv(q: &dyn Queue, name: &str, opts: Receive) -> Vec<Delivery> {
    q.receive(name, opts).await.expect("receive")
}

async fn send_receive_ack(q: &dyn Queue) {
    let name = unique_queue("conf-basic");
    assert!(
        recv(q, &name, lease(30_000)).await.is_empty(),
        "a new queue is empty"
    );
    let id = q.send(&name, Outgoing::new("hello")).await.expect("send");
    let got = recv(q, &name, lease(30_000)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, id, "the delivery carries the id send returned");
    assert_eq!(&got[0].body[..], b"hello");
    assert_eq!(got[0].deliveries, 1, "first delivery counts 1");
    assert!(
        recv(q, &name, lease(30_000)).await.is_empty(),
        "a leased message is not handed out twice"
    );
    q.ack(&got[0]).await.expect("ack");
    assert!(
        recv(q, &name, lease(30_000)).await.is_empty(),
        "an acked message is gone"
    );
}

async fn priority_then_fifo(q: &dyn Queue) {
    let name = unique_queue("conf-prio");
    for (body, p) in [
        ("low-1", 1),
        ("high-1", 9),
        ("mid", 5),
        ("low-2", 1),
        ("high-2", 9),
    ] {
        q.send(&name, Outgoing::new(body).priority(p))
            .await
            .expect("send");
    }
    let mut order = Vec::new();
    for _ in 0..5 {
        let got = q
            .receive(
                &name,
                Receive {
                    max: 1,
                    ..lease(30_000)
                },
            )
            .await
            .expect("receive");
        assert_eq!(got.len(), 1);
        order.push(String::from_utf8_lossy(&got[0].body).into_owned());
        q.ack(&got[0]).await.expect("ack");
    }
    assert_eq!(
        order,
        ["high-1", "high-2", "mid", "low-1", "low-2"],
        "highest priority first, oldest first within one"
    );
}

async fn receive_caps_at_max(q: &dyn Queue) {
    let name = unique_queue("conf-max");
    for i in 0..7 {
        q.send(&name, Outgoing::new(format!("m{i}")))
            .await
            .expect("send");
    }
    let first = q
        .receive(
            &name,
            Receive {
                max: 3,
                ..lease(30_000)
            },
        )
        .await
        .expect("receive");
    assert_eq!(first.len(), 3, "receive hands out at most `max`");
    let rest = q
        .receive(
            &name,
            Receive {
                max: 10,
                ..lease(30_000)
            },
        )
        .await
        .expect("receive");
    assert_eq!(rest.len(), 4);
    for d in first.iter().chain(&rest) {
        q.ack(d).await.expect("ack");
    }
}

async fn delayed_messages_wait(q: &dyn Queue, tick: Duration) {
    let name = unique_queue("conf-delay");
    q.send(
        &name,
        Outgoing::new("later").delay(Duration::from_millis(600)),
    )
    .await
    .expect("send");
    assert!(
        recv(q, &name, lease(30_000)).await.is_empty(),
        "a delayed message is invisible before its delay"
    );
    tokio::time::sleep(Duration::from_millis(1_100) + tick).await;
    let got = recv(q, &name, lease(30_000)).await;
    assert_eq!(got.len(), 1, "a delayed message is visible after its delay");
    q.ack(&got[0]).await.expect("ack");
}

async fn expired_leases_redeliver(q: &dyn Queue, tick: Duration) {
    let name = unique_queue("conf-lease");
    q.send(&name, Outgoing::new("work")).await.expect("send");
    let first = recv(q, &name, lease(400)).await;
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(1_000) + tick).await;
    let second = recv(q, &name, lease(30_000)).await;
    assert_eq!(
        second.len(),
        1,
        "a message whose lease ended is delivered again"
    );
    assert_eq!(second[0].id, first[0].id);
    assert_eq!(second[0].deliveries, 2, "redelivery counts up");
    match q.ack(&first[0]).await {
        Err(Error::LeaseLost { .. }) => {}
        x => panic!("acking with an ended lease must be LeaseLost, got {x:?}"),
    }
    q.ack(&second[0]).await.expect("ack with the current lease");
    assert!(recv(q, &name, lease(30_000)).await.is_empty());
}

async fn retry_later_redelivers_after_delay(q: &dyn Queue, tick: Duration) {
    let name = unique_queue("conf-retry");
    q.send(&name, Outgoing::new("flaky")).await.expect("send");
    let first = recv(q, &name, lease(30_000)).await;
    q.retry_later(&first[0], Duration::from_millis(600))
        .await
        .expect("retry_later");
    assert!(
        recv(q, &name, lease(30_000)).await.is_empty(),
        "retried message waits for its delay"
    );
    tokio::time::sleep(Duration::from_millis(1_100) + tick).await;
    let again = recv(q, &name, lease(30_000)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].deliveries, 2);
    q.ack(&again[0]).await.expect("ack");
}

async fn explicit_dead_letter(q: &dyn Queue) {
    let name = unique_queue("conf-dlq");
    q.send(&name, Outgoing::new("poison")).await.expect("send");
    let got = recv(q, &name, lease(30_000)).await;
    q.dead_letter(&got[0], "bad spec: resources.gpus")
        .await
        .expect("dead_letter");
    assert!(
        recv(q, &name, lease(30_000)).await.is_empty(),
        "dead-lettered message leaves its queue"
    );
    let dead = recv(q, &dead_letter_queue(&name), lease(30_000)).await;
    assert_eq!(dead.len(), 1, "and lands on the dead-letter queue");
    assert_eq!(&dead[0].body[..], b"poison", "body intact");
    assert_eq!(
        dead[0].reason.as_deref(),
        Some("bad spec: resources.gpus"),
        "with its reason"
    );
    q.ack(&dead[0]).await.expect("ack dead letter");
}

async fn dead_letter_after_max_deliveries(q: &dyn Queue, max: u32) {
    let name = unique_queue("conf-maxdel");
    q.send(&name, Outgoing::new("crashes-handler"))
        .await
        .expect("send");
    for n in 1..=max {
        let got = recv(q, &name, lease(30_000)).await;
        assert_eq!(got.len(), 1, "delivery {n} of {max}");
        assert_eq!(got[0].deliveries, n);
        q.retry_later(&got[0], Duration::ZERO).await.expect("retry");
    }
    // Give brokers that dead-letter asynchronously a moment.
    let mut dead = Vec::new();
    for _ in 0..20 {
        assert!(
            recv(q, &name, lease(30_000)).await.is_empty(),
            "no delivery past max_deliveries"
        );
        dead = recv(q, &dead_letter_queue(&name), lease(30_000)).await;
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "dead-lettered after {max} deliveries");
    assert!(
        dead[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("deliver")),
        "reason says why: {:?}",
        dead[0].reason
    );
    q.ack(&dead[0]).await.expect("ack");
}

async fn receive_waits_for_a_message(q: &dyn Queue) {
    let name = unique_queue("conf-wait");
    let opts = Receive {
        max: 1,
        lease: Duration::from_secs(30),
        wait: Duration::from_secs(5),
    };
    let started = std::time::Instant::now();
    let (got, _) = tokio::join!(q.receive(&name, opts), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        q.send(&name, Outgoing::new("awaited")).await.expect("send");
    });
    let got = got.expect("receive");
    assert_eq!(
        got.len(),
        1,
        "a waiting receive gets a message sent meanwhile"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "without waiting out the whole wait"
    );
    q.ack(&got[0]).await.expect("ack");
}

async fn attributes_travel_with_messages(q: &dyn Queue) {
    let name = unique_queue("conf-attrs");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let out = Outgoing::new("job")
        .attribute("reply_to", "replies-1")
        .attribute("correlation_id", "c-42")
        .attribute("traceparent", traceparent)
        .attribute("tracestate", "rojo=00f067aa0ba902b7");
    q.send(&name, out).await.expect("send");
    let got = recv(q, &name, lease(30_000)).await;
    assert_eq!(
        got[0].attributes.get("reply_to").map(String::as_str),
        Some("replies-1")
    );
    assert_eq!(
        got[0].attributes.get("correlation_id").map(String::as_str),
        Some("c-42")
    );
    for (k, v) in [
        ("traceparent", traceparent),
        ("tracestate", "rojo=00f067aa0ba902b7"),
    ] {
        assert_eq!(
            got[0].attributes.get(k).map(String::as_str),
            Some(v),
            "the W3C trace context travels with the message"
        );
    }
    q.retry_later(&got[0], Duration::ZERO).await.expect("retry");
    let again = recv(q, &name, lease(30_000)).await;
    assert_eq!(
        again[0]
            .attributes
            .get("correlation_id")
            .map(String::as_str),
        Some("c-42"),
        "attributes survive a retry"
    );
    q.ack(&again[0]).await.expect("ack");
}

async fn depth_counts_what_waits(q: &dyn Queue) {
    let name = unique_queue("conf-depth");
    q.declare(&name).await.expect("declare");
    let Some(empty) = q.depth(&name).await.expect("depth") else {
        // This system cannot say; it must not pretend for one queue either.
        assert!(q.depth(&name).await.expect("depth").is_none());
        return;
    };
    assert_eq!(empty.messages, 0, "a new queue holds nothing: {empty:?}");
    assert!(
        empty.oldest.is_none_or(|a| a.is_zero()),
        "nothing waits, so nothing is old: {empty:?}"
    );
    for p in [0, 5, 9] {
        q.send(&name, Outgoing::new("waiting").priority(p))
            .await
            .expect("send");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let waiting = q.depth(&name).await.expect("depth").expect("depth");
    assert_eq!(waiting.messages, 3, "every priority counts: {waiting:?}");
    if let Some(age) = waiting.oldest {
        assert!(
            age >= Duration::from_secs(1) && age < Duration::from_secs(120),
            "the oldest has waited since it was sent: {waiting:?}"
        );
    }
    // One leased: counted or not (RabbitMQ counts ready messages only, and its
    // consumers may hold the other two already), never more than were sent.
    let mut got = recv(
        q,
        &name,
        Receive {
            max: 1,
            ..lease(30_000)
        },
    )
    .await;
    assert_eq!(got.len(), 1);
    let leased = q.depth(&name).await.expect("depth").expect("depth");
    assert!(leased.messages <= 3, "{leased:?}");
    for _ in 0..10 {
        got.extend(recv(q, &name, lease(30_000)).await);
        if got.len() == 3 {
            break;
        }
    }
    assert_eq!(got.len(), 3);
    for d in &got {
        q.ack(d).await.expect("ack");
    }
    let settled = q.depth(&name).await.expect("depth").expect("depth");
    assert_eq!(
        settled.messages, 0,
        "acked messages wait no more: {settled:?}"
    );
    assert!(
        settled.oldest.is_none_or(|a| a.is_zero()),
        "nothing waits, so nothing is old: {settled:?}"
    );
}

//! Sealed queues: the broker's own queues take only what the broker wrote. The
//! decorator passes the queue conformance suite over two adapters, and refuses what
//! it did not seal.
#![cfg(feature = "local")]

use std::sync::Arc;
use std::time::Duration;

use respawn_adapters::local::LocalStore;
use respawn_adapters::memory::MemoryQueue;
use respawn_core::ports::queue::{Outgoing, Queue, Receive, dead_letter_queue};
use respawn_core::seal::SealedQueue;

const KEY: &[u8] = b"the broker's key, thirty-two b..";

fn now() -> Receive {
    Receive {
        max: 10,
        lease: Duration::from_secs(30),
        wait: Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_queue_conformance_suite() {
    let memory: Arc<dyn Queue> = Arc::new(MemoryQueue::new(3));
    respawn_core::conformance::queue::run(&SealedQueue::all(memory, KEY), 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path()).expect("store");
    let local: Arc<dyn Queue> = Arc::new(store.queue(3));
    respawn_core::conformance::queue::run(&SealedQueue::all(local, KEY), 3).await;
}

#[tokio::test]
async fn what_the_broker_did_not_seal_is_dead_lettered_unread() {
    let raw: Arc<dyn Queue> = Arc::new(MemoryQueue::default());
    let events = "respawn.events".to_owned();
    let sealed = SealedQueue::new(raw.clone(), KEY, [events.clone()]);
    let forged = br#"{"type":"event","job":"01abc","at":1,"event":{"type":"workload_exited","attempt":1,"exit_code":0}}"#;

    // Someone else on the queue server: no seal, a seal of another key, a real seal
    // made for another queue, a real seal over a changed body.
    let scratch: Arc<dyn Queue> = Arc::new(MemoryQueue::default());
    let sealed_raw = |q: SealedQueue, queue: &'static str, body: &'static [u8]| {
        let scratch = scratch.clone();
        async move {
            q.send(queue, Outgoing::new(body)).await.expect("send");
            let got = scratch.receive(queue, now()).await.expect("receive");
            got[0].body.to_vec()
        }
    };
    let other_key = SealedQueue::new(
        scratch.clone(),
        b"another key, also 32 bytes long..",
        ["respawn.events".to_owned()],
    );
    let for_dispatch = SealedQueue::new(scratch.clone(), KEY, ["respawn.dispatch".to_owned()]);
    let genuine = SealedQueue::new(scratch.clone(), KEY, ["respawn.events".to_owned()]);
    let mut tampered = sealed_raw(genuine, "respawn.events", b"x").await;
    *tampered.last_mut().expect("byte") = b'y';
    let forgeries = [
        forged.to_vec(),
        sealed_raw(other_key, "respawn.events", forged).await,
        sealed_raw(for_dispatch, "respawn.dispatch", forged).await,
        tampered,
    ];
    for f in forgeries {
        raw.send(&events, Outgoing::new(f)).await.expect("send");
    }

    assert!(
        sealed
            .receive(&events, now())
            .await
            .expect("receive")
            .is_empty(),
        "an unsealed message reached a handler"
    );
    let dead = raw
        .receive(&dead_letter_queue(&events), now())
        .await
        .expect("dead");
    assert_eq!(dead.len(), 4, "{dead:?}");
    for d in &dead {
        assert!(
            d.reason
                .as_deref()
                .is_some_and(|r| r.contains("not sealed by this broker")),
            "{d:?}"
        );
    }

    // The broker's own message goes through, opened; other queues are untouched.
    sealed
        .send(&events, Outgoing::new("mine"))
        .await
        .expect("send");
    let got = sealed.receive(&events, now()).await.expect("receive");
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"mine");
    sealed.ack(&got[0]).await.expect("ack");
    raw.send("respawn.submit", Outgoing::new("outside"))
        .await
        .expect("send");
    let got = sealed
        .receive("respawn.submit", now())
        .await
        .expect("receive");
    assert_eq!(&got[0].body[..], b"outside");
}

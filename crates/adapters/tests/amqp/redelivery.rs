//! Messages the broker redelivers: after a consumer's process died, after a lost
//! connection, and messages from other clients that have no id.

use std::io::Write;
use std::time::Duration;

use respawn_adapters::amqp::AmqpOptions;
use respawn_core::conformance::unique_queue;
use respawn_core::ports::queue::{Outgoing, Queue, Receive, dead_letter_queue};

use super::support::{close_connection, connect, connect_with, lease, raw_channel, with_cleanup};

/// Names the queue for [`crash_child`]; set only by the test that runs it.
const CHILD_QUEUE: &str = "RESPAWN_TEST_CRASH_QUEUE";
/// What [`crash_child`] prints before its report.
const CHILD_SAYS: &str = "crash-child received: ";
const CRASH_MAX_DELIVERIES: u32 = 3;

/// Half of `a_message_that_kills_its_consumer_is_dead_lettered`, run in a process of
/// its own: receives one message and exits without acking or closing anything, as a
/// worker that crashes on it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper: a_message_that_kills_its_consumer_is_dead_lettered runs it"]
async fn crash_child() {
    let queue = std::env::var(CHILD_QUEUE)
        .expect("run by a_message_that_kills_its_consumer_is_dead_lettered, which names the queue");
    let (q, _) = connect("crash-child", CRASH_MAX_DELIVERIES).await;
    let got = q
        .receive(
            &queue,
            Receive {
                max: 1,
                lease: Duration::from_secs(600),
                wait: Duration::from_secs(5),
            },
        )
        .await
        .expect("receive");
    let report = match got.first() {
        Some(d) => format!("{} {}", d.id, d.deliveries),
        None => "nothing".to_owned(),
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{CHILD_SAYS}{report}");
    let _ = out.flush();
    std::process::exit(0);
}

/// Runs [`crash_child`] on `queue`: what it received (id and delivery count), if
/// anything.
async fn run_child(queue: &str) -> Option<(String, u32)> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = tokio::process::Command::new(exe)
        .args([
            "redelivery::crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_QUEUE, queue)
        .output()
        .await
        .expect("the child process runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .find_map(|l| l.strip_prefix(CHILD_SAYS))
        .unwrap_or_else(|| {
            panic!(
                "the child reported nothing:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (id, n) = report.split_once(' ')?;
    Some((id.to_owned(), n.parse().expect("a delivery count")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_its_consumer_is_dead_lettered() {
    let (q, _) = connect("crash", CRASH_MAX_DELIVERIES).await;
    let queue = unique_queue("amqp-crash");
    with_cleanup(&q, async {
        // Only children consume from `queue`; this connection sends and reads the
        // dead letters.
        q.declare(&queue).await.unwrap();
        let id = q
            .send(&queue, Outgoing::new("kills its consumer"))
            .await
            .unwrap();
        let mut counts = Vec::new();
        for _ in 0..CRASH_MAX_DELIVERIES + 2 {
            let Some((got, n)) = run_child(&queue).await else {
                break;
            };
            assert_eq!(got, id, "the same message each time");
            counts.push(n);
        }
        assert_eq!(
            counts,
            (1..=CRASH_MAX_DELIVERIES).collect::<Vec<_>>(),
            "each delivery to a consumer that died counts, and the last one allowed ends it"
        );
        let dead = q
            .receive(&dead_letter_queue(&queue), lease(5_000))
            .await
            .unwrap();
        assert_eq!(dead.len(), 1, "on the dead-letter queue: {dead:?}");
        assert_eq!(dead[0].id, id);
        let reason = dead[0].reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("delivered 3 times without being acknowledged")
                && reason.contains("consumer's connection"),
            "the reason says why: {reason:?}"
        );
        q.ack(&dead[0]).await.unwrap();
    })
    .await;
}

/// Messages from other clients without `message_id`: each gets an id of its own
/// (not one that another message on another connection also gets), and keeps it when
/// the broker redelivers it after a lost connection, so a consumer that dedups by id
/// (the submit queue's) sees one message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_an_id_get_one_that_survives_redelivery() {
    // Prefetch 1: `a` stays with the first connection while `b` goes to the second.
    let one = || AmqpOptions {
        prefetch: 1,
        ..AmqpOptions::default()
    };
    let (q1, name1) = connect_with("noid-1", one()).await;
    let (q2, _) = connect_with("noid-2", one()).await;
    let queue = unique_queue("amqp-noid");
    with_cleanup(&q2, async {
        q2.declare(&queue).await.unwrap();
        let raw = raw_channel().await;
        for body in ["a", "b"] {
            raw.basic_publish(
                "".into(),
                queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
        }
        let first = q1.receive(&queue, lease(5_000)).await.unwrap();
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(&first[0].body[..], b"a");
        let second = q2.receive(&queue, lease(5_000)).await.unwrap();
        assert_eq!(second.len(), 1, "{second:?}");
        assert_eq!(&second[0].body[..], b"b");
        assert_ne!(first[0].id, second[0].id, "two messages, two ids");
        q2.ack(&second[0]).await.unwrap();

        // `a` is handed out, not acked, and its connection goes.
        close_connection(&name1);
        let mut again = Vec::new();
        for _ in 0..10 {
            again.extend(q2.receive(&queue, lease(1_000)).await.unwrap());
            if !again.is_empty() {
                break;
            }
        }
        assert_eq!(again.len(), 1, "a comes back once: {again:?}");
        assert_eq!(&again[0].body[..], b"a");
        assert_eq!(
            again[0].id, first[0].id,
            "with the id it was handed out with"
        );
        assert_eq!(again[0].deliveries, 2);
        q2.ack(&again[0]).await.unwrap();
        let rest = q2.receive(&queue, lease(1_000)).await.unwrap();
        assert!(rest.is_empty(), "nothing else: {rest:?}");
    })
    .await;
}

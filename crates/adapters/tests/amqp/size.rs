//! The size limit on received messages: enforced before the body is buffered.

use respawn_adapters::amqp::DEFAULT_MAX_MESSAGE_BYTES;
use respawn_core::conformance::unique_queue;
use respawn_core::ports::queue::{Queue, dead_letter_queue};

use super::support::{connect, lease, raw_channel, with_cleanup};

async fn publish(raw: &lapin::Channel, queue: &str, body: &[u8], id: &str) {
    raw.basic_publish(
        "".into(),
        queue.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default().with_message_id(id.into()),
    )
    .await
    .unwrap();
}

/// A message over the limit (1 MiB by default) is dead-lettered with a reason that
/// names its size, its body dropped as it arrived; the messages around it are handed
/// out as usual, one exactly at the limit included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_dead_lettered_unread() {
    let (q, _) = connect("size", 5).await;
    let queue = unique_queue("amqp-size");
    with_cleanup(&q, async {
        q.declare(&queue).await.unwrap();
        let raw = raw_channel().await;
        let big = 5 * DEFAULT_MAX_MESSAGE_BYTES;
        publish(&raw, &queue, b"before", "before").await;
        publish(&raw, &queue, &vec![b'x'; big], "big").await;
        publish(
            &raw,
            &queue,
            &vec![b'y'; DEFAULT_MAX_MESSAGE_BYTES],
            "at-limit",
        )
        .await;
        publish(&raw, &queue, b"after", "after").await;

        let mut got = Vec::new();
        for _ in 0..10 {
            got.extend(q.receive(&queue, lease(1_000)).await.unwrap());
            if got.len() >= 3 {
                break;
            }
        }
        let ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["before", "at-limit", "after"], "the others, in order");
        assert_eq!(got[1].body.len(), DEFAULT_MAX_MESSAGE_BYTES);
        for d in &got {
            q.ack(d).await.unwrap();
        }

        let dead = q
            .receive(&dead_letter_queue(&queue), lease(5_000))
            .await
            .unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].id, "big");
        assert!(dead[0].body.is_empty(), "the body was never taken in");
        assert_eq!(
            dead[0].reason.as_deref(),
            Some(
                format!(
                    "message is {big} bytes; the limit is {DEFAULT_MAX_MESSAGE_BYTES} \
                     (its body was dropped unread)"
                )
                .as_str()
            )
        );
        q.ack(&dead[0]).await.unwrap();
    })
    .await;
}

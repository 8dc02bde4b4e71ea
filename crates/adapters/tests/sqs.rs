//! The SQS queue against the local AWS emulator (`localstack/aws-start`, moto
//! server), started for this test: it fails, never skips, when the emulator cannot
//! run (python3 and PyPI are needed the first time).
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use respawn_adapters::sqs::SqsQueue;
use respawn_core::conformance::unique_queue;
use respawn_core::ports::queue::{Outgoing, Queue, Receive, dead_letter_queue};

#[path = "../../../tests/support/aws.rs"]
#[allow(dead_code)]
mod aws;

use aws::Emulator;

fn queue(aws: &Emulator, max_deliveries: u32) -> SqsQueue {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&aws.endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "emulator"))
        .build();
    SqsQueue::new(
        aws_sdk_sqs::Client::from_conf(config),
        "respawn-test-",
        max_deliveries,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let aws = Emulator::start();
    let q = queue(&aws, 3);
    respawn_core::conformance::queue::run_with(&q, 3, Duration::from_secs(1)).await;
}

fn lease(secs: u64) -> Receive {
    Receive {
        max: 10,
        lease: Duration::from_secs(secs),
        wait: Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_sqs_cannot_carry_and_long_delays_arrive_intact() {
    let aws = Emulator::start();
    let q = queue(&aws, 3);
    let name = unique_queue("sqs-bytes");
    let binary: Vec<u8> = (0..=255u8).chain([0, 0xff, 0x1b]).collect();
    let id = q.send(&name, Outgoing::new(binary.clone())).await.unwrap();
    let got = q.receive(&name, lease(30)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].id.as_str(), &got[0].body[..]),
        (id.as_str(), &binary[..])
    );
    q.ack(&got[0]).await.unwrap();

    // A delay past SQS's 15 minutes is held back, however often it is seen.
    q.send(
        &name,
        Outgoing::new("next week").delay(Duration::from_secs(7 * 86_400)),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        assert!(q.receive(&name, lease(30)).await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_oversized_messages_are_refused_with_a_reason() {
    let aws = Emulator::start();
    let q = queue(&aws, 3);
    let e = q.send("has space", Outgoing::new("x")).await.unwrap_err();
    assert!(e.to_string().contains("queue name"), "{e}");
    let e = q
        .send(&"a".repeat(80), Outgoing::new("x"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("too long"), "{e}");
    let name = unique_queue("sqs-big");
    let e = q
        .send(&name, Outgoing::new(vec![b'x'; 300 * 1024]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
}

/// What boto3 or an S3 notification sends has no respawn metadata: its id is SQS's,
/// its string message attributes are its attributes, and it is dead-lettered with
/// its body intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_other_clients_are_read_too() {
    let aws = Emulator::start();
    let q = queue(&aws, 3);
    let name = unique_queue("sqs-foreign");
    q.declare(&name).await.unwrap();
    aws.python(&format!(
        r#"
import boto3
sqs = boto3.client("sqs", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
url = sqs.get_queue_url(QueueName="respawn-test-{name}-lo")["QueueUrl"]
sqs.send_message(QueueUrl=url, MessageBody='{{"spec": "not yet"}}',
                 MessageAttributes={{"reply_to": {{"DataType": "String", "StringValue": "replies-7"}}}})
"#
    ));
    let got = q.receive(&name, lease(30)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], br#"{"spec": "not yet"}"#);
    assert_eq!(
        got[0].attributes.get("reply_to").map(String::as_str),
        Some("replies-7")
    );
    assert!(!got[0].id.is_empty());
    q.dead_letter(&got[0], "spec: expected a mapping")
        .await
        .unwrap();
    let dead = q
        .receive(&dead_letter_queue(&name), lease(30))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, got[0].id);
    assert_eq!(dead[0].reason.as_deref(), Some("spec: expected a mapping"));
    assert_eq!(&dead[0].body[..], &got[0].body[..]);
}

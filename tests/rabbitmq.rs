//! `respawn up --queue amqp://…` against the machine's RabbitMQ: submission by a
//! plain AMQP client with status replies, bad messages, and a consumer whose
//! connection is force-closed in the middle of 1,000 submissions. RabbitMQ must be
//! running there (it is in CI): without it these tests fail, they do not skip.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use respawn_e2e::Up;
use serde_json::Value;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prefix() -> String {
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("e2e-{id:x}.")
}

async fn client() -> (Connection, Channel) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "these tests need RabbitMQ at 127.0.0.1:5672 (guest/guest); \
                 start it with `rabbitmq-server -detached`: {e}"
            )
        });
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

async fn start(data: &std::path::Path, prefix: &str, extra: &[&str]) -> Up {
    let mut args = vec!["--queue", URL, "--queue-prefix", prefix];
    args.extend_from_slice(extra);
    Up::start(data, &args).await
}

/// Deletes every queue whose name starts with `prefix` (the server is shared).
async fn cleanup(ch: &Channel, prefix: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name"])
        .output();
    let Ok(out) = out else { return };
    for name in String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(prefix))
    {
        let _ = ch
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }
}

async fn publish(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_amqp_client_submits_and_follows_its_job_to_the_end() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let p = prefix();
    let (_conn, ch) = client().await;
    let up = start(&dir.path().join("data"), &p, &[]).await;
    // The client's own reply queue, as any AMQP RPC client makes one.
    let reply = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut replies = ch
        .basic_consume(
            reply.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let props = || {
        BasicProperties::default()
            .with_reply_to(reply.name().clone())
            .with_correlation_id("corr-7".into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
    };
    let body = br#"{"spec": {"name": "from-amqp", "command": ["sh", "-c", "echo trained"]}}"#;
    publish(
        &ch,
        &format!("{p}submit"),
        body,
        props().with_message_id("msg-1".into()),
    )
    .await;
    // A bad message: rejected to the sender, dead-lettered, and the consumer goes on.
    let bad = br#"{"spec": {"name": "bad", "command": ["x"], "resources": {"gpus": "two"}}}"#;
    publish(
        &ch,
        &format!("{p}submit"),
        bad,
        props().with_correlation_id("corr-bad".into()),
    )
    .await;
    publish(
        &ch,
        &format!("{p}submit"),
        b"not json at all",
        props().with_correlation_id("corr-junk".into()),
    )
    .await;
    // Over the 1 MiB limit: dead-lettered as it arrives, never buffered whole.
    publish(
        &ch,
        &format!("{p}submit"),
        &vec![b' '; 3 << 20],
        props().with_correlation_id("corr-big".into()),
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut events, mut rejected) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), replies.next()).await
        else {
            continue;
        };
        let corr = d
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default();
        let v: Value = serde_json::from_slice(&d.data).unwrap();
        if corr == "corr-7" {
            events.push(v.clone());
            if v["state"] == "succeeded" {
                break;
            }
        } else {
            rejected.push((corr, v));
        }
    }
    assert_eq!(
        events[0]["type"], "accepted",
        "first the job id: {events:?}"
    );
    let job = events[0]["job_id"].as_str().unwrap().to_owned();
    let states: Vec<&str> = events[1..]
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states.last(),
        Some(&"succeeded"),
        "then every state change to the end: {states:?}"
    );
    assert!(states.contains(&"running"));
    assert!(events[1..].iter().all(|e| e["job_id"] == job.as_str()));
    // The rejections (they may still be on their way).
    while rejected.len() < 2 && Instant::now() < deadline {
        if let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), replies.next()).await
        {
            let corr = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default();
            rejected.push((corr, serde_json::from_slice(&d.data).unwrap()));
        }
    }
    let bad_reply = rejected
        .iter()
        .find(|(c, _)| c == "corr-bad")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(bad_reply["type"], "rejected");
    assert_eq!(
        bad_reply["errors"][0]["path"], "spec.resources.gpus",
        "{bad_reply}"
    );
    assert!(
        rejected
            .iter()
            .any(|(c, v)| c == "corr-junk" && v["type"] == "rejected")
    );
    // The bad messages sit on the dead-letter queue with their reasons.
    let mut reasons = Vec::new();
    while let Some(d) = ch
        .basic_get(
            format!("{p}submit.dead").as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let reason = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-respawn-reason").cloned());
        match reason {
            Some(AMQPValue::LongString(r)) => {
                reasons.push(String::from_utf8_lossy(r.as_bytes()).into_owned());
            }
            other => panic!("a dead letter without its reason: {other:?}"),
        }
    }
    assert_eq!(
        reasons.len(),
        3,
        "bad messages are dead-lettered: {reasons:?}"
    );
    let big = format!("message is {} bytes; the limit is 1048576", 3 << 20);
    assert!(
        reasons.iter().any(|r| r.starts_with(&big)),
        "the oversized one says its size: {reasons:?}"
    );
    assert_eq!(up.jobs().await.len(), 1, "only the good message made a job");
    cleanup(&ch, &p).await;
}

/// The pid of the broker's consumer connection, by the name `respawn up` gives it.
fn connection_pid(name: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(name))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_stream_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let p = prefix();
    let (_conn, ch) = client().await;
    let up = start(&dir.path().join("data"), &p, &["--slots", "0"]).await;
    const N: usize = 1000;
    let name = format!("respawn-up-{}", p.trim_end_matches('.'));
    let submit = format!("{p}submit");
    let mut closed = None;
    for i in 0..N {
        let body = format!(r#"{{"spec": {{"name": "n-{i}", "command": ["true"]}}}}"#);
        let props = BasicProperties::default()
            .with_message_id(format!("m-{i}").as_str().into())
            .with_delivery_mode(2);
        publish(&ch, &submit, body.as_bytes(), props).await;
        if i == N / 3 && closed.is_none() {
            // Let the consumer get going, then cut its connection from the server side.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let pid = connection_pid(&name).expect("the broker's connection is listed");
            let status = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", &pid, "e2e: connection loss"])
                .status()
                .unwrap();
            assert!(status.success());
            closed = Some(pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut jobs = Vec::new();
    while Instant::now() < deadline {
        jobs = all_jobs(&up).await;
        if jobs.len() >= N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A little longer: a duplicate would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs = if jobs.len() >= N {
        all_jobs(&up).await
    } else {
        jobs
    };
    let names: HashSet<String> = jobs
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        jobs.len(),
        N,
        "exactly {N} jobs (none lost, none duplicated)"
    );
    assert_eq!(names.len(), N);
    // The loss really happened and was recovered from: `respawn up` saw its connection
    // go and opened another, which the broker lists under the same name.
    let log = up.log_text();
    assert!(
        log.contains("connection to the broker lost; reconnecting")
            && log.contains("reconnected to the broker"),
        "the broker's log shows the lost connection and the reconnect:\n{log}"
    );
    let old = closed.expect("the connection was closed mid-stream");
    let now = connection_pid(&name).expect("respawn up is connected again");
    assert_ne!(now, old, "a new connection, not the closed one");
    cleanup(&ch, &p).await;
}

/// Submissions without an AMQP `message_id`, with the broker's connection cut while
/// hundreds are in flight (the process frozen meanwhile): each message still makes exactly one job. (The queue
/// adapter gives such a message an id once, atomically, before handing it out, and
/// the id is the job's idempotency key; without that, a message whose job was made
/// but whose ack was lost with the connection made a second job.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_without_a_message_id_make_one_job_each_across_a_connection_loss() {
    let _serial = SERIAL.lock().await;
    let (_conn, ch) = client().await;
    let dir = tempfile::tempdir().unwrap();
    let p = prefix();
    let up = start(&dir.path().join("data"), &p, &["--slots", "0"]).await;
    const N: usize = 4000;
    let name = format!("respawn-up-{}", p.trim_end_matches('.'));
    let submit = format!("{p}submit");
    let pid = connection_pid(&name).expect("the broker's connection is listed");
    // All at once, confirms awaited at the end: the broker then has a backlog, and
    // a full prefetch of messages in flight when its connection is cut.
    let mut confirms = Vec::with_capacity(N);
    for i in 0..N {
        let body = format!(r#"{{"spec": {{"name": "anon-{i}", "command": ["true"]}}}}"#);
        let props = BasicProperties::default().with_delivery_mode(2);
        let confirm = ch
            .basic_publish(
                "".into(),
                submit.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for c in confirms {
        c.await.unwrap();
    }
    let submitted = |up: &Up| up.log_text().matches("job submitted").count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while submitted(&up) < N / 10 {
        assert!(Instant::now() < deadline, "no jobs:\n{}", up.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Frozen while its connection is cut, `respawn up` has hundreds of submissions
    // half done when it wakes up to the loss, however long rabbitmqctl takes.
    nix::sys::signal::kill(up.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let at_cut = submitted(&up);
    let status = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "e2e: connection loss"])
        .status();
    nix::sys::signal::kill(up.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(status.unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut jobs = all_jobs(&up).await;
    while jobs.len() < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        jobs = all_jobs(&up).await;
    }
    // A little longer: a duplicate would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs = all_jobs(&up).await;
    let names: HashSet<String> = jobs
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        at_cut < N,
        "the cut came while submissions were still in flight ({at_cut} of {N} made)"
    );
    let log = up.log_text();
    assert!(
        log.contains("reconnected to the broker"),
        "the cut happened and was recovered from:\n{log}"
    );
    assert_eq!(names.len(), N, "every submission made a job");
    assert_eq!(
        jobs.len(),
        N,
        "and only one: {} duplicates",
        jobs.len().saturating_sub(N)
    );
    cleanup(&ch, &p).await;
}

async fn all_jobs(up: &Up) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let page = up.get(&format!("/v1/jobs?limit=1000{after}")).await;
        out.extend(page["jobs"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(n) => after = format!("&after={n}"),
            None => return out,
        }
    }
}

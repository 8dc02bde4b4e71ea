//! Inbound webhooks end to end on in-memory ports: a correctly signed delivery
//! makes exactly one job, and nothing else (a bad signature, a replay, a filtered
//! event) makes any.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;

use respawn_adapters::memory::{MemoryCompute, MemoryLedger, MemoryQueue, MemorySecrets};
use respawn_core::handlers::{HookError, HookOutcome, webhook};
use respawn_core::job::JobRecord;
use respawn_core::lifecycle::Timeouts;
use respawn_core::ports::ledger::ListQuery;
use respawn_core::ports::{Ports, QueueNames};
use respawn_core::spec::Format;
use respawn_core::time::SystemClock;
use respawn_core::webhook::{self, Hook, HookRequest, github, standard};

const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const NOW: i64 = 1_700_000_000;
const SHA: &str = "6dcb09b5b57875f334f61aebed695e2e4193db5e";

const HOOKS: &str = r#"
hooks:
  - name: pipeline
    kind: standard
    secret_env: PIPELINE_SECRET
    template:
      name: train-${body.model}
      command: [python, train.py, --epochs, "${body.epochs}"]
  - name: on-push
    kind: github
    secret_env: GITHUB_HOOK_SECRET
    on: { events: [push], branches: [main] }
    template:
      name: train-${repo_name}-${short_sha}
      command: [python, train.py, --commit, "${sha}"]
"#;

fn hooks() -> (Hook, Hook) {
    let env = |name: &str| match name {
        "PIPELINE_SECRET" => Some(STANDARD_SECRET.to_owned()),
        "GITHUB_HOOK_SECRET" => Some(GITHUB_SECRET.to_owned()),
        _ => None,
    };
    let mut hooks = webhook::parse_hooks(HOOKS, Format::Yaml, &env).unwrap();
    let github = hooks.pop().unwrap();
    (hooks.pop().unwrap(), github)
}

fn ports() -> Ports {
    Ports {
        ledger: Arc::new(MemoryLedger::new()),
        queue: Arc::new(MemoryQueue::default()),
        compute: Arc::new(MemoryCompute::new(4)),
        secrets: Arc::new(MemorySecrets::new()),
        blobs: Arc::new(object_store::memory::InMemory::new()),
        clock: Arc::new(SystemClock),
        timeouts: Timeouts::default(),
        queues: QueueNames::default(),
    }
}

async fn all_jobs(ports: &Ports) -> Vec<JobRecord> {
    let query = ListQuery {
        limit: 1000,
        ..Default::default()
    };
    ports.ledger.list(&query).await.unwrap().jobs
}

/// A Standard Webhooks delivery signed with `secret` at `timestamp`.
fn standard_delivery(secret: &str, id: &str, timestamp: i64, body: &str) -> HookRequest {
    let secret = standard::Secret::parse(secret).unwrap();
    let signature = standard::sign(&secret, id, timestamp, body.as_bytes());
    let ts = timestamp.to_string();
    HookRequest::from_headers(
        [
            ("webhook-id", id),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", signature.as_str()),
        ],
        body.as_bytes().to_vec(),
    )
}

/// A GitHub delivery of `event`, signed with `secret`.
fn github_delivery(secret: &str, event: &str, delivery: &str, body: &str) -> HookRequest {
    let signature = github::sign(secret.as_bytes(), body.as_bytes());
    HookRequest::from_headers(
        [
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", signature.as_str()),
        ],
        body.as_bytes().to_vec(),
    )
}

fn push_body(git_ref: &str) -> String {
    serde_json::json!({
        "ref": git_ref,
        "after": SHA,
        "repository": { "full_name": "octo/vision-models" },
        "pusher": { "name": "octocat" },
        "head_commit": { "id": SHA, "message": "More epochs" },
    })
    .to_string()
}

fn unauthorized(result: Result<HookOutcome, HookError>) -> String {
    match result {
        Err(HookError::Unauthorized(reason)) => reason,
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}

const BODY: &str = r#"{"model": "resnet50", "epochs": 3}"#;

#[tokio::test]
async fn a_signed_standard_delivery_makes_one_job_and_its_replay_none() {
    let ports = ports();
    let (hook, _) = hooks();
    let request = standard_delivery(STANDARD_SECRET, "msg_1", NOW, BODY);

    let HookOutcome::Submitted(id) = webhook(&ports, &hook, &request, NOW + 3).await.unwrap()
    else {
        panic!("no job");
    };
    let jobs = all_jobs(&ports).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, id);
    assert_eq!(jobs[0].spec.name, "train-resnet50");
    assert_eq!(
        jobs[0].spec.command,
        ["python", "train.py", "--epochs", "3"]
    );
    assert_eq!(jobs[0].spec.labels[webhook::LABEL], "pipeline");
    assert_eq!(
        jobs[0].spec.idempotency_key.as_deref(),
        Some("hook:pipeline:msg_1")
    );

    // The same request again, and the same id re-signed later (as a sender's retry
    // or an attacker with a captured signature would send it): refused.
    let reason = unauthorized(webhook(&ports, &hook, &request, NOW + 10).await);
    assert!(
        reason.starts_with("replayed delivery \"msg_1\""),
        "{reason}"
    );
    let resent = standard_delivery(STANDARD_SECRET, "msg_1", NOW + 60, BODY);
    unauthorized(webhook(&ports, &hook, &resent, NOW + 60).await);
    assert_eq!(all_jobs(&ports).await.len(), 1);

    // A new delivery is a new job.
    let next = standard_delivery(STANDARD_SECRET, "msg_2", NOW, BODY);
    let outcome = webhook(&ports, &hook, &next, NOW).await.unwrap();
    assert!(matches!(outcome, HookOutcome::Submitted(other) if other != id));
    assert_eq!(all_jobs(&ports).await.len(), 2);
}

#[tokio::test]
async fn bad_standard_deliveries_make_nothing() {
    let ports = ports();
    let (hook, _) = hooks();
    let good = standard_delivery(STANDARD_SECRET, "msg_1", NOW, BODY);

    let mut tampered = good.clone();
    tampered.body = BODY.replace('3', "300").into_bytes().into();
    let wrong_secret =
        standard_delivery("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "msg_1", NOW, BODY);
    let mut unsigned = good.clone();
    unsigned.webhook_signature = None;
    let cases = [
        (tampered, NOW, "no signature matches the body"),
        (wrong_secret, NOW, "no signature matches the body"),
        (good.clone(), NOW + 301, "more than 5 minutes in the past"),
        (good.clone(), NOW - 301, "more than 5 minutes in the future"),
        (unsigned, NOW, "missing webhook-signature header"),
    ];
    for (request, now, why) in cases {
        let reason = unauthorized(webhook(&ports, &hook, &request, now).await);
        assert!(reason.ends_with(why), "{reason}");
        assert!(!reason.contains("MfKQ"), "{reason}");
    }
    // Signed, but the body lacks a field the template needs: no job either.
    let partial = standard_delivery(STANDARD_SECRET, "msg_2", NOW, r#"{"model": "m"}"#);
    let e = webhook(&ports, &hook, &partial, NOW).await.unwrap_err();
    assert!(matches!(e, HookError::BadTemplate(_)), "{e}");
    assert!(all_jobs(&ports).await.is_empty());
}

#[tokio::test]
async fn a_github_push_to_main_makes_a_job_with_its_commit() {
    let ports = ports();
    let (_, hook) = hooks();
    let request = github_delivery(GITHUB_SECRET, "push", "d-1", &push_body("refs/heads/main"));

    let outcome = webhook(&ports, &hook, &request, NOW).await.unwrap();
    assert!(matches!(outcome, HookOutcome::Submitted(_)), "{outcome:?}");
    let jobs = all_jobs(&ports).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].spec.name, "train-vision-models-6dcb09b");
    assert_eq!(
        jobs[0].spec.command,
        ["python", "train.py", "--commit", SHA]
    );
    assert_eq!(
        jobs[0].spec.idempotency_key.as_deref(),
        Some("hook:on-push:d-1")
    );

    // GitHub's redelivery keeps the delivery id: a replay.
    let reason = unauthorized(webhook(&ports, &hook, &request, NOW).await);
    assert!(reason.contains("replayed delivery \"d-1\""), "{reason}");
    assert_eq!(all_jobs(&ports).await.len(), 1);
}

#[tokio::test]
async fn other_github_deliveries_make_no_job() {
    let ports = ports();
    let (_, hook) = hooks();

    let dev = github_delivery(GITHUB_SECRET, "push", "d-1", &push_body("refs/heads/dev"));
    let outcome = webhook(&ports, &hook, &dev, NOW).await.unwrap();
    assert!(
        matches!(outcome, HookOutcome::Ignored(ref why) if why.contains("on.branches")),
        "{outcome:?}"
    );

    let ping = github_delivery(
        GITHUB_SECRET,
        "ping",
        "d-2",
        r#"{"zen":"Design for failure.","hook_id":7}"#,
    );
    assert_eq!(
        webhook(&ports, &hook, &ping, NOW).await.unwrap(),
        HookOutcome::Pong
    );

    let issues = github_delivery(GITHUB_SECRET, "issues", "d-3", "{}");
    let outcome = webhook(&ports, &hook, &issues, NOW).await.unwrap();
    assert!(matches!(outcome, HookOutcome::Ignored(_)), "{outcome:?}");

    let forged = github_delivery(
        "not the secret",
        "push",
        "d-4",
        &push_body("refs/heads/main"),
    );
    let reason = unauthorized(webhook(&ports, &hook, &forged, NOW).await);
    assert_eq!(reason, "no signature matches the body");
    let mut unsigned = github_delivery(GITHUB_SECRET, "push", "d-5", &push_body("refs/heads/main"));
    unsigned.hub_signature_256 = None;
    unauthorized(webhook(&ports, &hook, &unsigned, NOW).await);

    // Signed, but not the event its header names.
    let mislabeled = github_delivery(GITHUB_SECRET, "push", "d-6", "{}");
    let e = webhook(&ports, &hook, &mislabeled, NOW).await.unwrap_err();
    assert!(matches!(e, HookError::BadRequest(_)), "{e}");
    let mut anonymous =
        github_delivery(GITHUB_SECRET, "push", "d-7", &push_body("refs/heads/main"));
    anonymous.github_delivery = None;
    let e = webhook(&ports, &hook, &anonymous, NOW).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "bad request: missing X-GitHub-Delivery header"
    );

    assert!(all_jobs(&ports).await.is_empty());
}

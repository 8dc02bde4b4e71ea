//! What the API gives agents and workloads: a credential speaks for its own attempt only; tokens for others need a sandbox.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use respawn_core::handlers::{self, Submission};
use respawn_core::job::JobId;
use respawn_core::lifecycle::{self, Event};
use respawn_core::messages::Message;
use respawn_core::ports::queue::Receive;
use respawn_core::spec::{Format, parse};
use serde_json::json;

use super::tests::{call, fixture, token};
use crate::up::Stack;

/// A job with a secret, dispatched and allocated (attempt 1 is live).
async fn live_job(stack: &Stack) -> JobId {
    let spec = parse(
        "name: a\ncommand: [train]\nsecrets: { API_KEY: v4lue }\n",
        Format::Yaml,
    )
    .unwrap();
    let sub = Submission {
        spec,
        project: "default".into(),
        reply_to: None,
        local_files: false,
    };
    let id = handlers::submit(&stack.ports, sub).await.unwrap().job.id;
    // Straight into the ledger (the fixture has no slots for a real allocation).
    let rec = stack.ports.ledger.get(&id).await.unwrap();
    let dispatch = Event::Dispatch {
        attempt: 1,
        waits: 0,
    };
    let mut next = lifecycle::apply(
        &rec,
        &dispatch,
        stack.ports.clock.now(),
        &Default::default(),
    )
    .record;
    next.outbox.clear();
    stack.ports.ledger.update(next).await.unwrap();
    id
}

async fn queued_events(stack: &Stack) -> Vec<Message> {
    let opts = Receive {
        max: 100,
        lease: Duration::from_secs(30),
        wait: Duration::ZERO,
    };
    stack
        .ports
        .queue
        .receive(&stack.ports.queues.events, opts)
        .await
        .unwrap()
        .iter()
        .map(|d| serde_json::from_slice(&d.body).unwrap())
        .collect()
}

fn report(event: Event) -> String {
    json!({ "event": event }).to_string()
}

#[tokio::test]
async fn a_credential_reports_on_its_own_attempt_only() {
    let f = fixture().await;
    let s = &f.stack;
    let job = live_job(s).await;
    let other = live_job(s).await;
    let mine = s.attempt_key.credential(&job, 1);
    let path = "/v1/agent/events";

    let (status, _) = call(
        s,
        Method::POST,
        path,
        Some(&mine),
        &report(Event::Heartbeat { attempt: 1 }),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    // Another attempt of the same job, an event only the broker may send, no
    // credential, a user's API token, a credential of another key: refused.
    let refused = [
        (
            Some(mine.clone()),
            Event::Heartbeat { attempt: 2 },
            StatusCode::FORBIDDEN,
        ),
        (
            Some(mine.clone()),
            Event::CancelRequested {
                reason: "forged".into(),
            },
            StatusCode::FORBIDDEN,
        ),
        (
            Some(mine.clone()),
            Event::VmTerminated {
                attempt: 1,
                reason: "forged".into(),
            },
            StatusCode::FORBIDDEN,
        ),
        (
            None,
            Event::Heartbeat { attempt: 1 },
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some(token(s, "default", &[respawn_core::ports::tokens::Scope::Admin]).await),
            Event::Heartbeat { attempt: 1 },
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some(
                respawn_core::attempt_auth::AttemptKey::generate()
                    .unwrap()
                    .credential(&job, 1),
            ),
            Event::Heartbeat { attempt: 1 },
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (cred, event, want) in refused {
        let kind = event.kind();
        let (status, body) = call(s, Method::POST, path, cred.as_deref(), &report(event)).await;
        assert_eq!(status, want, "{kind}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let (status, _) = call(s, Method::POST, path, Some(&mine), "not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Only the accepted report reached the events queue, for its own job: the
    // credential names the job, the body cannot.
    let queued = queued_events(s).await;
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert!(matches!(
        &queued[0],
        Message::Event { job: j, event: Event::Heartbeat { attempt: 1 }, .. } if *j == job
    ));
    assert_ne!(job, other);
}

#[tokio::test]
async fn the_spec_goes_to_the_live_attempt_only_without_secret_values() {
    let f = fixture().await;
    let s = &f.stack;
    let job = live_job(s).await;
    let path = "/v1/agent/spec";
    let (status, body) = call(
        s,
        Method::GET,
        path,
        Some(&s.attempt_key.credential(&job, 1)),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let spec: respawn_core::spec::JobSpec = serde_json::from_value(body["spec"].clone()).unwrap();
    assert_eq!(spec, s.ports.ledger.get(&job).await.unwrap().spec);
    assert!(
        !body.to_string().contains("v4lue"),
        "a secret value: {body}"
    );
    for credential in [
        s.attempt_key.credential(&job, 2),
        "not-a-credential".to_owned(),
    ] {
        let (status, _) = call(s, Method::GET, path, Some(&credential), "").await;
        assert!(
            status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED,
            "{status}"
        );
    }
}

/// A pool VM's credential asks for the VM's orders and nothing else; an attempt's
/// credential cannot ask for a VM's orders. (Here the local provider, which hands
/// its pool VMs their attempts over a pipe, tells any asking VM to retire.)
#[tokio::test]
async fn a_pool_vm_credential_only_asks_for_orders() {
    let f = fixture().await;
    let s = &f.stack;
    let job = live_job(s).await;
    let vm = s.attempt_key.vm_credential("warm-s0-0a0b0c0d");
    let path = "/v1/agent/assignment";
    let (status, body) = call(s, Method::GET, path, Some(&vm), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, serde_json::json!({ "orders": "retire" }));
    for (method, path, body) in [
        (Method::GET, "/v1/agent/spec", ""),
        (Method::GET, "/v1/agent/secrets", ""),
        (
            Method::POST,
            "/v1/agent/events",
            r#"{"event": {"type": "heartbeat", "attempt": 1}}"#,
        ),
    ] {
        let (status, _) = call(s, method, path, Some(&vm), body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let mine = s.attempt_key.credential(&job, 1);
    let (status, _) = call(s, Method::GET, path, Some(&mine), "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn secrets_go_to_the_live_attempt_only() {
    let f = fixture().await;
    let s = &f.stack;
    let job = live_job(s).await;
    let path = "/v1/agent/secrets";
    let (status, body) = call(
        s,
        Method::GET,
        path,
        Some(&s.attempt_key.credential(&job, 1)),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let values: BTreeMap<String, String> = serde_json::from_value(body["secrets"].clone()).unwrap();
    assert_eq!(values.get("API_KEY").map(String::as_str), Some("v4lue"));

    // A later attempt's credential before it exists, and this one's once the job
    // has ended: no secrets.
    let (status, _) = call(
        s,
        Method::GET,
        path,
        Some(&s.attempt_key.credential(&job, 2)),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let cancel = Event::CancelRequested {
        reason: "done".into(),
    };
    handlers::job_event(&s.ports, &job, &cancel, s.ports.clock.now())
        .await
        .unwrap();
    let (status, body) = call(
        s,
        Method::GET,
        path,
        Some(&s.attempt_key.credential(&job, 1)),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

#[tokio::test]
async fn without_a_sandbox_no_tokens_for_others_unless_the_operator_says_so() {
    use respawn_core::ports::tokens::Scope;
    let mut f = fixture().await;
    let body = r#"{"name": "ci", "scopes": ["submit", "read"]}"#;
    f.stack.sandboxed = false;
    f.stack.config.isolation = crate::up::Isolation::Auto;
    let admin = token(&f.stack, "default", &[Scope::Admin]).await;
    let (status, answer) = call(&f.stack, Method::POST, "/v1/tokens", Some(&admin), body).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("--isolation none"),
        "{answer}"
    );
    // --isolation none: the operator accepted it.
    f.stack.config.isolation = crate::up::Isolation::None;
    let (status, answer) = call(&f.stack, Method::POST, "/v1/tokens", Some(&admin), body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    // And a sandboxed stack never asks.
    f.stack.config.isolation = crate::up::Isolation::Auto;
    f.stack.sandboxed = true;
    let (status, answer) = call(&f.stack, Method::POST, "/v1/tokens", Some(&admin), body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
}

/// A node of a multi-node attempt learns of a notice given to any node of its gang,
/// while its attempt is live, and only for its own job.
#[tokio::test]
async fn the_gang_answer_carries_the_attempts_notice_to_its_own_credential_only() {
    let f = fixture().await;
    let s = &f.stack;
    let job = live_job(s).await;
    let mine = s.attempt_key.credential(&job, 1);
    let path = "/v1/agent/gang";
    let (status, body) = call(s, Method::GET, path, Some(&mine), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        serde_json::json!({ "nodes": 1, "hosts": null, "notice_deadline_ms": null })
    );

    let rec = s.ports.ledger.get(&job).await.unwrap();
    let notice = Event::PreemptionNotice {
        attempt: 1,
        deadline: respawn_core::time::Timestamp(4_000_000_000_000),
    };
    let next = lifecycle::apply(&rec, &notice, s.ports.clock.now(), &Default::default()).record;
    s.ports.ledger.update(next).await.unwrap();
    let (status, body) = call(s, Method::GET, path, Some(&mine), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["notice_deadline_ms"], 4_000_000_000_000u64, "{body}");

    for credential in [
        s.attempt_key.credential(&job, 2),
        s.attempt_key.vm_credential("warm-s0-0a0b0c0d"),
        "not-a-credential".to_owned(),
    ] {
        let (status, _) = call(s, Method::GET, path, Some(&credential), "").await;
        assert!(
            status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED,
            "{status}"
        );
    }
}

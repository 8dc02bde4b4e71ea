//! Router tests (oneshot), the OpenAPI document against the routes, project
//! isolation, and one test over a real socket.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use respawn_adapters::local::sandbox::Sandbox;
use respawn_adapters::local::{LocalCompute, LocalComputeConfig};
use respawn_adapters::memory::{MemoryLedger, MemoryQueue, MemorySecrets, MemoryTokens};
use respawn_core::attempt_auth::AttemptKey;
use respawn_core::ports::tokens::{Scope, mint};
use respawn_core::ports::{Ports, QueueNames};
use respawn_core::time::{SystemClock, Timestamp};
use serde_json::Value;
use tower::ServiceExt;

use super::{ROUTES, app};
use crate::up::{Stack, UpConfig};

pub(super) struct Fixture {
    pub(super) stack: Stack,
    _dir: tempfile::TempDir,
}

pub(super) async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(MemoryQueue::default());
    // The spot simulator needs a provider; this one never gets to start a VM.
    let compute = LocalCompute::open(
        LocalComputeConfig {
            data_dir: dir.path().to_owned(),
            bucket_dir: dir.path().join("bucket"),
            agent_bin: dir.path().join("no-agent"),
            extra_path: None,
            cpu_slots: 0,
            gpus: Vec::new(),
            container_runtime: None,
            events_queue: "events".into(),
            api: "http://127.0.0.1:9".into(),
            attempt_key: AttemptKey::generate().unwrap(),
            heartbeat_secs: 1,
            notice: Duration::from_secs(1),
            sandbox: Sandbox::None,
            pools: Vec::new(),
        },
        queue.clone(),
    )
    .await
    .unwrap();
    let ports = Ports {
        ledger: Arc::new(MemoryLedger::new()),
        queue,
        compute: compute.clone(),
        secrets: Arc::new(MemorySecrets::new()),
        blobs: Arc::new(object_store::memory::InMemory::new()),
        clock: Arc::new(SystemClock),
        timeouts: Default::default(),
        queues: QueueNames::default(),
    };
    let config = UpConfig {
        data: dir.path().to_owned(),
        triggers: None,
        hooks: None,
        queue_url: None,
        queue_prefix: "respawn.".into(),
        templates: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        cpu_slots: 0,
        notice: Duration::from_secs(1),
        chaos: None,
        heartbeat_secs: 1,
        isolation: crate::up::Isolation::None,
        allow_private_notify: false,
        pools: Vec::new(),
    };
    let stack = Stack {
        replies: Default::default(),
        templates: Default::default(),
        hooks: Default::default(),
        ports,
        tokens: Arc::new(MemoryTokens::new()),
        compute,
        config,
        rules: Default::default(),
        attempt_key: AttemptKey::generate().unwrap(),
        sandboxed: false,
        metrics: Arc::new(respawn_host::metrics::Metrics::new(
            "local",
            Default::default(),
        )),
    };
    Fixture { stack, _dir: dir }
}

pub(super) async fn token(stack: &Stack, project: &str, scopes: &[Scope]) -> String {
    let (record, secret) = mint("t", project, scopes.to_vec(), Timestamp(1));
    stack.tokens.create(&record).await.unwrap();
    secret
}

pub(super) async fn call(
    stack: &Stack,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.starts_with('{') {
        req = req.header("content-type", "application/json");
    }
    let resp = app(stack.clone())
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

pub(super) const SPEC: &str = "name: t\ncommand: [\"true\"]\n";

#[tokio::test]
async fn health_is_open_and_the_rest_needs_a_token() {
    let f = fixture().await;
    let (s, _) = call(&f.stack, Method::GET, "/healthz", None, "").await;
    assert_eq!(s, StatusCode::OK);
    for (s, _) in [
        call(&f.stack, Method::GET, "/v1/jobs", None, "").await,
        call(&f.stack, Method::GET, "/v1/jobs", Some("rsp_made_up"), "").await,
    ] {
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let t = token(&f.stack, "default", &[Scope::Read]).await;
    assert_eq!(
        call(&f.stack, Method::GET, "/v1/jobs", Some(&t), "")
            .await
            .0,
        StatusCode::OK
    );
    let (s, body) = call(&f.stack, Method::POST, "/v1/jobs", Some(&t), SPEC).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "read cannot submit: {body}");
}

#[tokio::test]
async fn submit_is_idempotent_by_header_and_reports_spec_errors_with_paths() {
    let f = fixture().await;
    let t = token(&f.stack, "default", &[Scope::Submit, Scope::Read]).await;
    let req = |key: &'static str| {
        Request::post("/v1/jobs")
            .header("authorization", format!("Bearer {t}"))
            .header("idempotency-key", key)
            .body(Body::from(SPEC))
            .unwrap()
    };
    let first = app(f.stack.clone()).oneshot(req("k-1")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value =
        serde_json::from_slice(&first.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let again = app(f.stack.clone()).oneshot(req("k-1")).await.unwrap();
    assert_eq!(
        again.status(),
        StatusCode::OK,
        "a retry returns the same job"
    );
    let again: Value =
        serde_json::from_slice(&again.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(first["id"], again["id"]);
    let (s, body) = call(
        &f.stack,
        Method::POST,
        "/v1/jobs",
        Some(&t),
        "{\"name\": \"j\", \"command\": [\"x\"], \"resources\": {\"gpus\": \"two\"}}",
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["errors"][0]["path"], "resources.gpus", "{body}");
}

#[tokio::test]
async fn a_project_cannot_see_or_touch_another_projects_jobs() {
    let f = fixture().await;
    let a = token(&f.stack, "proj-a", &[Scope::Admin]).await;
    let b = token(&f.stack, "proj-b", &[Scope::Admin]).await;
    let spec_a = "name: a\ncommand: [\"true\"]\ninputs: [bucket://projects/proj-a/data.csv]\n";
    let (s, job) = call(&f.stack, Method::POST, "/v1/jobs", Some(&a), spec_a).await;
    assert_eq!(s, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap();
    for (method, path) in [
        (Method::GET, format!("/v1/jobs/{id}")),
        (Method::POST, format!("/v1/jobs/{id}/cancel")),
        (Method::GET, format!("/v1/jobs/{id}/logs")),
    ] {
        let (s, _) = call(&f.stack, method.clone(), &path, Some(&b), "").await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path} with B's token");
    }
    let (_, list) = call(&f.stack, Method::GET, "/v1/jobs", Some(&b), "").await;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        0,
        "B lists nothing of A's"
    );
    let (_, list) = call(&f.stack, Method::GET, "/v1/jobs", Some(&a), "").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    // Preempting needs a running VM, which this fixture has none of: see
    // tests/projects.rs for B's preempt and cancel against A's running job.
    let reach = "name: b\ncommand: [\"true\"]\ninputs: [bucket://projects/proj-a/data.csv]\noutputs: s3://models/projects/proj-a/out/\n";
    let (s, body) = call(&f.stack, Method::POST, "/v1/jobs", Some(&b), reach).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a valid spec B may not use: {body}"
    );
    let paths: Vec<_> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["inputs[0].uri", "outputs"], "{body}");
    let dotdot = "name: b\ncommand: [\"true\"]\ninputs: [bucket://projects/proj-b/../proj-a/x]\n";
    assert_eq!(
        call(&f.stack, Method::POST, "/v1/jobs", Some(&b), dotdot)
            .await
            .0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // Tokens, too, stay in their project.
    let (_, toks) = call(&f.stack, Method::GET, "/v1/tokens", Some(&b), "").await;
    assert!(
        toks["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["project"] == "proj-b")
    );
}

#[tokio::test]
async fn revoked_tokens_stop_working() {
    let f = fixture().await;
    let admin = token(&f.stack, "default", &[Scope::Admin]).await;
    let (s, created) = call(
        &f.stack,
        Method::POST,
        "/v1/tokens",
        Some(&admin),
        "{\"name\": \"ci\", \"scopes\": [\"read\"]}",
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let secret = created["token"].as_str().unwrap();
    assert_eq!(
        call(&f.stack, Method::GET, "/v1/jobs", Some(secret), "")
            .await
            .0,
        StatusCode::OK
    );
    let (_, list) = call(&f.stack, Method::GET, "/v1/tokens", Some(&admin), "").await;
    assert!(
        !list.to_string().contains(secret),
        "secrets are never listed"
    );
    let path = format!("/v1/tokens/{}", created["id"].as_str().unwrap());
    assert_eq!(
        call(&f.stack, Method::DELETE, &path, Some(&admin), "")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&f.stack, Method::GET, "/v1/jobs", Some(secret), "")
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
}

fn openapi_routes() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/openapi.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut routes = Vec::new();
    for (p, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push((method.to_uppercase(), p.clone()));
        }
    }
    routes.sort();
    routes
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let mut ours: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    ours.sort();
    assert_eq!(
        openapi_routes(),
        ours,
        "schemas/openapi.json and api::ROUTES disagree"
    );
    // And every listed route is served: the router's fallbacks answer 405, or 404
    // with "no such route".
    let f = fixture().await;
    let admin = token(&f.stack, "default", &[Scope::Admin]).await;
    for (method, path) in ROUTES {
        let concrete = path.replace("{id}", "00000000000000000000000000");
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = call(&f.stack, m, &concrete, Some(&admin), "{}").await;
        let unrouted = body["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("no such route"));
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !unrouted,
            "{method} {path} is not routed ({status})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_a_real_socket() {
    let f = fixture().await;
    let t = token(&f.stack, "default", &[Scope::Admin]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(axum::serve(listener, app(f.stack.clone())).into_future());
    let client = crate::client::Client::new(&format!("http://{addr}"), Some(t), Path::new("."));
    let job: Value = client.post_text("/v1/jobs", SPEC.to_owned()).await.unwrap();
    let id = job["id"].as_str().unwrap();
    let got: Value = client.get(&format!("/v1/jobs/{id}")).await.unwrap();
    assert_eq!(got["spec"]["name"], "t");
    let listed: Value = client.get("/v1/jobs?state=pending").await.unwrap();
    assert_eq!(listed["jobs"][0]["id"], id);
    server.abort();
}

const HOOKS: &str = r#"
hooks:
  - name: ci
    kind: standard
    secret_env: CI_SECRET
    template:
      name: from-ci-${body.run}
      command: [respawn-trainer, --seed, "${body.run}"]
  - name: gh
    kind: github
    secret_env: GH_SECRET
    on: { events: [push], branches: [main] }
    template:
      name: train-${short_sha}
      command: [python, train.py, --commit, "${sha}"]
"#;

const CI_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn hooked() -> Fixture {
    let mut f = fixture().await;
    let env = |k: &str| match k {
        "CI_SECRET" => Some(CI_SECRET.to_owned()),
        "GH_SECRET" => Some("It's a Secret to Everybody".to_owned()),
        _ => None,
    };
    let hooks =
        respawn_core::webhook::parse_hooks(HOOKS, respawn_core::spec::Format::Yaml, &env).unwrap();
    f.stack.hooks = Arc::new(hooks);
    f
}

async fn post_hook(
    stack: &Stack,
    name: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (StatusCode, Value) {
    let mut req =
        Request::post(format!("/v1/hooks/{name}")).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = app(stack.clone())
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn standard_headers(id: &str, ts: i64, body: &str, secret: &str) -> Vec<(&'static str, String)> {
    use respawn_core::webhook::standard::{Secret, sign};
    let sig = sign(&Secret::parse(secret).unwrap(), id, ts, body.as_bytes());
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sig),
    ]
}

async fn job_count(stack: &Stack) -> usize {
    let q = respawn_core::ports::ledger::ListQuery {
        limit: 1000,
        ..Default::default()
    };
    stack.ports.ledger.list(&q).await.unwrap().jobs.len()
}

#[tokio::test]
async fn standard_webhooks_accept_signed_and_reject_the_rest() {
    let f = hooked().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = r#"{"run": "17"}"#;
    let (s, answer) = post_hook(
        &f.stack,
        "ci",
        &standard_headers("msg_1", now, body, CI_SECRET),
        body,
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{answer}");
    assert!(answer["job"].is_string());
    let rejected = [
        (
            "replay",
            standard_headers("msg_1", now, body, CI_SECRET),
            body,
        ),
        (
            "tampered",
            standard_headers("msg_2", now, body, CI_SECRET),
            r#"{"run": "18"}"#,
        ),
        (
            "wrong secret",
            standard_headers(
                "msg_3",
                now,
                body,
                "whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQQ==",
            ),
            body,
        ),
        (
            "stale",
            standard_headers("msg_4", now - 600, body, CI_SECRET),
            body,
        ),
        (
            "unsigned",
            vec![
                ("webhook-id", "msg_5".to_owned()),
                ("webhook-timestamp", now.to_string()),
            ],
            body,
        ),
    ];
    for (what, headers, body) in rejected {
        let (s, _) = post_hook(&f.stack, "ci", &headers, body).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}");
    }
    assert_eq!(
        job_count(&f.stack).await,
        1,
        "no rejected request made a job"
    );
    assert_eq!(
        post_hook(&f.stack, "nope", &[], "{}").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn github_pushes_start_runs_with_the_commit() {
    use respawn_core::webhook::github::sign;
    let f = hooked().await;
    let secret = b"It's a Secret to Everybody";
    let push = r#"{"ref": "refs/heads/main", "after": "0123456789abcdef0123456789abcdef01234567",
        "repository": {"full_name": "acme/models"}, "pusher": {"name": "dev"}, "head_commit": {"message": "tune"}}"#;
    let headers = |event: &str, delivery: &str, body: &str| {
        vec![
            ("x-github-event", event.to_owned()),
            ("x-github-delivery", delivery.to_owned()),
            ("x-hub-signature-256", sign(secret, body.as_bytes())),
        ]
    };
    let (s, answer) = post_hook(&f.stack, "gh", &headers("push", "d-1", push), push).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{answer}");
    let id: respawn_core::JobId = answer["job"].as_str().unwrap().parse().unwrap();
    let job = f.stack.ports.ledger.get(&id).await.unwrap();
    assert_eq!(
        job.spec.command[3],
        "0123456789abcdef0123456789abcdef01234567"
    );
    let ping = r#"{"zen": "Keep it logically awesome."}"#;
    assert_eq!(
        post_hook(&f.stack, "gh", &headers("ping", "d-2", ping), ping)
            .await
            .0,
        StatusCode::OK
    );
    let mut forged = headers("push", "d-3", push);
    forged[2].1 = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".into();
    assert_eq!(
        post_hook(&f.stack, "gh", &forged, push).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(job_count(&f.stack).await, 1);
}

#[tokio::test]
async fn a_sweep_submits_an_array_once() {
    let f = fixture().await;
    let t = token(&f.stack, "default", &[Scope::Submit, Scope::Read]).await;
    let sweep = "name: s\nidempotency_key: s-1\ntemplate:\n  name: \"s-${index}\"\n  command: [respawn-trainer, --lr, \"${param.lr}\"]\n\
                 grid: { lr: [0.1, 0.01], hidden: [4, 8, 16] }\n";
    let (s, first) = call(&f.stack, Method::POST, "/v1/arrays", Some(&t), sweep).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!(first["jobs"].as_array().unwrap().len(), 6);
    let (s, again) = call(&f.stack, Method::POST, "/v1/arrays", Some(&t), sweep).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["array"], first["array"]);
    let (s, progress) = call(
        &f.stack,
        Method::GET,
        &format!("/v1/arrays/{}", first["array"].as_str().unwrap()),
        Some(&t),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(progress["total"], 6);
    assert_eq!(progress["counts"]["pending"], 6, "{progress}");
}

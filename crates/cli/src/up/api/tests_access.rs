//! What each token may do, and that every answer is the documented JSON: the
//! scope matrix, tokens across projects, the bucket's broker-owned and local
//! parts, rejections by axum's extractors, and bounded log pages.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use object_store::ObjectStoreExt;
use respawn_core::layout::{self, Stream};
use respawn_core::ports::tokens::Scope;
use serde_json::Value;
use tower::ServiceExt;

use super::app;
use super::tests::{SPEC, call, fixture, token};
use crate::up::Stack;
use respawn_host::api::{DEFAULT_LOG_BYTES, MAX_LOG_BYTES};

/// A request with headers of our choosing; the status, the `Content-Type` and the
/// body (null unless JSON).
async fn raw(
    stack: &Stack,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Option<String>, Value) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app(stack.clone())
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        ct,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A request: method, path, headers, body, and the status it must get.
type Case<'a> = (
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    &'a [u8],
    StatusCode,
);

#[tokio::test]
async fn every_rejection_is_a_json_error() {
    let f = fixture().await;
    let admin = token(&f.stack, "default", &[Scope::Admin]).await;
    let bearer = format!("Bearer {admin}");
    let auth = ("authorization", bearer.as_str());
    let json = ("content-type", "application/json");
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            "/v1/jobs?state=running&state=failed",
            vec![auth],
            b"",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/jobs?limit=0",
            vec![auth],
            b"",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/jobs?limit=1001",
            vec![auth],
            b"",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/jobs?limit=ten",
            vec![auth],
            b"",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/jobs?stat=running",
            vec![auth],
            b"",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/jobs/00000000000000000000000000/logs?after=-1",
            vec![auth],
            b"",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/tokens",
            vec![auth, json],
            b"not json",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/tokens",
            vec![auth],
            br#"{"name": "x", "scopes": ["read"]}"#,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            Method::POST,
            "/v1/tokens",
            vec![auth, json],
            br#"{"name": "x"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/v1/preempt",
            vec![auth, json],
            br#"{"target": 7}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/v1/jobs",
            vec![auth],
            b"\xff\xfe",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/jobs",
            vec![auth, ("idempotency-key", "a\tb")],
            SPEC.as_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/nothing-here",
            vec![auth],
            b"",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PUT,
            "/v1/jobs",
            vec![auth],
            b"",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::GET,
            "/v1/jobs",
            vec![("authorization", "Basic eDp5")],
            b"",
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (method, path, headers, body, want) in cases {
        let (status, ct, answer) =
            raw(&f.stack, method.clone(), path, &headers, body.to_vec()).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
        assert_eq!(ct.as_deref(), Some("application/json"), "{method} {path}");
        assert!(answer["error"].is_string(), "{method} {path}: {answer}");
    }
    let resp = app(f.stack.clone())
        .oneshot(Request::delete("/v1/jobs").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let allow = resp
        .headers()
        .get(header::ALLOW)
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        allow.is_some_and(|a| a.contains("GET") && a.contains("POST")),
        "405 keeps Allow"
    );
}

/// The routes by the scope they need, with a body each would accept.
fn routes(id: &str) -> Vec<(Scope, Method, String, &'static str)> {
    let sweep =
        "name: s\ntemplate: { name: \"s-${index}\", command: [\"true\"] }\ngrid: { x: [1, 2] }\n";
    vec![
        (Scope::Submit, Method::POST, "/v1/jobs".into(), SPEC),
        (Scope::Submit, Method::POST, "/v1/arrays".into(), sweep),
        (Scope::Read, Method::GET, "/v1/jobs".into(), ""),
        (Scope::Read, Method::GET, format!("/v1/jobs/{id}"), ""),
        (Scope::Read, Method::GET, format!("/v1/jobs/{id}/logs"), ""),
        (Scope::Read, Method::GET, "/v1/arrays/s-1".into(), ""),
        (Scope::Read, Method::GET, "/v1/triggers".into(), ""),
        (Scope::Read, Method::GET, "/v1/hooks".into(), ""),
        (
            Scope::Cancel,
            Method::POST,
            format!("/v1/jobs/{id}/cancel"),
            "",
        ),
        (
            Scope::Admin,
            Method::POST,
            "/v1/tokens".into(),
            r#"{"name": "x", "scopes": ["read"]}"#,
        ),
        (Scope::Admin, Method::GET, "/v1/tokens".into(), ""),
        (Scope::Admin, Method::DELETE, "/v1/tokens/tok_x".into(), ""),
        (
            Scope::Admin,
            Method::POST,
            "/v1/preempt".into(),
            r#"{"target": "vm-1"}"#,
        ),
        (Scope::Admin, Method::GET, "/v1/vms".into(), ""),
    ]
}

#[tokio::test]
async fn each_scope_is_refused_every_route_family_it_lacks() {
    let f = fixture().await;
    let owner = token(&f.stack, "default", &[Scope::Admin]).await;
    let (_, job) = call(&f.stack, Method::POST, "/v1/jobs", Some(&owner), SPEC).await;
    let id = job["id"].as_str().unwrap().to_owned();
    for scope in [Scope::Read, Scope::Submit, Scope::Cancel] {
        let t = token(&f.stack, "default", &[scope]).await;
        for (needs, method, path, body) in routes(&id) {
            let (status, answer) = call(&f.stack, method.clone(), &path, Some(&t), body).await;
            if needs == scope {
                assert_ne!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{scope} may {method} {path}: {answer}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{scope} token, {method} {path}: {answer}"
                );
                assert!(
                    answer["error"].as_str().unwrap().contains(needs.as_str()),
                    "{answer}"
                );
            }
        }
    }
    // An admin lacks only other projects: their tokens are the stack owner's to hand out.
    let vision_admin = token(&f.stack, "vision", &[Scope::Admin]).await;
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/tokens",
            r#"{"name": "x", "scopes": ["read"], "project": "default"}"#,
        ),
        (
            Method::POST,
            "/v1/tokens",
            r#"{"name": "x", "scopes": ["read"], "project": "nlp"}"#,
        ),
        (Method::GET, "/v1/tokens?project=default", ""),
    ] {
        let (status, answer) =
            call(&f.stack, method.clone(), path, Some(&vision_admin), body).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{method} {path} {body}: {answer}"
        );
    }
}

#[tokio::test]
async fn the_owner_mints_and_manages_tokens_for_any_project() {
    let f = fixture().await;
    let owner = token(&f.stack, "default", &[Scope::Admin]).await;
    let mint = |body: &'static str| {
        let stack = f.stack.clone();
        let owner = owner.clone();
        async move { call(&stack, Method::POST, "/v1/tokens", Some(&owner), body).await }
    };
    let (s, ci) =
        mint(r#"{"name": "ci", "scopes": ["submit", "read"], "project": "vision"}"#).await;
    assert_eq!(s, StatusCode::CREATED, "{ci}");
    assert_eq!(ci["project"], "vision");
    let ci_secret = ci["token"].as_str().unwrap().to_owned();
    // The new token works in its project, and sees only it.
    let spec = "name: v\ncommand: [\"true\"]\ninputs: [bucket://projects/vision/x.csv]\n";
    let (s, job) = call(&f.stack, Method::POST, "/v1/jobs", Some(&ci_secret), spec).await;
    assert_eq!(s, StatusCode::CREATED, "{job}");
    assert_eq!(job["project"], "vision");
    call(&f.stack, Method::POST, "/v1/jobs", Some(&owner), SPEC).await;
    let (_, seen) = call(&f.stack, Method::GET, "/v1/jobs", Some(&ci_secret), "").await;
    assert_eq!(seen["jobs"].as_array().unwrap().len(), 1, "{seen}");
    let (s, bad) = mint(r#"{"name": "ci", "scopes": ["read"], "project": "Vision!"}"#).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");

    // A project's admin manages its own project's tokens only.
    let (_, va) = mint(r#"{"name": "va", "scopes": ["admin"], "project": "vision"}"#).await;
    let vision_admin = va["token"].as_str().unwrap().to_owned();
    let (s, own) = call(
        &f.stack,
        Method::POST,
        "/v1/tokens",
        Some(&vision_admin),
        r#"{"name": "mine", "scopes": ["read"]}"#,
    )
    .await;
    assert_eq!(
        (s, own["project"].as_str()),
        (StatusCode::CREATED, Some("vision"))
    );
    let (_, listed) = call(&f.stack, Method::GET, "/v1/tokens", Some(&vision_admin), "").await;
    let projects: Vec<_> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["project"].clone())
        .collect();
    assert!(
        projects.len() >= 3 && projects.iter().all(|p| p == "vision"),
        "{listed}"
    );

    // The owner lists every project's tokens, or one project's.
    let (_, all) = call(&f.stack, Method::GET, "/v1/tokens", Some(&owner), "").await;
    let all = all["tokens"].as_array().unwrap().clone();
    assert!(
        all.iter().any(|t| t["project"] == "default")
            && all.iter().any(|t| t["project"] == "vision")
    );
    let (_, one) = call(
        &f.stack,
        Method::GET,
        "/v1/tokens?project=vision",
        Some(&owner),
        "",
    )
    .await;
    assert!(
        one["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["project"] == "vision")
    );

    // Revoking follows the same rule: vision's admin cannot see a default token.
    let default_token = all.iter().find(|t| t["project"] == "default").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, _) = call(
        &f.stack,
        Method::DELETE,
        &format!("/v1/tokens/{default_token}"),
        Some(&vision_admin),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(
        &f.stack,
        Method::DELETE,
        &format!("/v1/tokens/{}", ci["id"].as_str().unwrap()),
        Some(&owner),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the owner revokes a vision token");
    let (s, _) = call(&f.stack, Method::GET, "/v1/jobs", Some(&ci_secret), "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

fn error_paths(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["path"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn local_files_need_an_admin_of_the_default_project() {
    let f = fixture().await;
    let local = "name: l\ncommand: [\"true\"]\ninputs: [file:///srv/.respawn/admin-token]\noutputs: file:///tmp/out/\n";
    let submit = token(&f.stack, "default", &[Scope::Submit]).await;
    let (s, body) = call(&f.stack, Method::POST, "/v1/jobs", Some(&submit), local).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_paths(&body), ["inputs[0].uri", "outputs"]);
    let vision_admin = token(&f.stack, "vision", &[Scope::Admin]).await;
    let (s, body) = call(
        &f.stack,
        Method::POST,
        "/v1/jobs",
        Some(&vision_admin),
        local,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let sweep = "name: s\ntemplate: { name: \"s-${index}\", command: [\"true\"], inputs: [\"file:///etc/${param.f}\"] }\ngrid: { f: [passwd] }\n";
    let (s, body) = call(&f.stack, Method::POST, "/v1/arrays", Some(&submit), sweep).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_paths(&body), ["template.inputs[0].uri"]);
    let owner = token(&f.stack, "default", &[Scope::Admin]).await;
    let (s, body) = call(&f.stack, Method::POST, "/v1/jobs", Some(&owner), local).await;
    assert_eq!(s, StatusCode::CREATED, "the owner's own files: {body}");
}

#[tokio::test]
async fn no_job_names_another_jobs_files() {
    let f = fixture().await;
    let owner = token(&f.stack, "default", &[Scope::Admin]).await;
    let (_, first) = call(&f.stack, Method::POST, "/v1/jobs", Some(&owner), SPEC).await;
    let other = first["id"].as_str().unwrap();
    let spec = format!(
        "name: peek\ncommand: [\"true\"]\ninputs: [bucket://jobs/{other}/attempts/1/stdout/0000000000]\n\
         outputs: s3://any/jobs/{other}/outputs/\ncheckpoint: {{ uri: bucket://jobs/{other}/checkpoints/ }}\n"
    );
    let (s, body) = call(&f.stack, Method::POST, "/v1/jobs", Some(&owner), &spec).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        error_paths(&body),
        ["inputs[0].uri", "outputs", "checkpoint.uri"]
    );
}

#[tokio::test]
async fn log_pages_are_bounded_and_page_through_every_byte() {
    let f = fixture().await;
    let t = token(&f.stack, "default", &[Scope::Admin]).await;
    let (_, job) = call(&f.stack, Method::POST, "/v1/jobs", Some(&t), SPEC).await;
    let id: respawn_core::JobId = job["id"].as_str().unwrap().parse().unwrap();
    // Three chunks, multi-byte characters across the cuts, one chunk far larger
    // than a page.
    let chunks = [
        "étape 1 ✓\n".repeat(3),
        "ü".repeat(40_000),
        "fin — done\n".to_owned(),
    ];
    for (n, text) in chunks.iter().enumerate() {
        let path = layout::log_chunk(&id, 1, Stream::Stdout, n as u64);
        f.stack
            .ports
            .blobs
            .put(&path, text.clone().into_bytes().into())
            .await
            .unwrap();
    }
    let whole: String = chunks.concat();
    let page_of = |max: u64, after: u64, offset: u64| {
        let stack = f.stack.clone();
        let t = t.clone();
        let path =
            format!("/v1/jobs/{id}/logs?attempt=1&after={after}&offset={offset}&max_bytes={max}");
        async move { call(&stack, Method::GET, &path, Some(&t), "").await }
    };
    for max in [7u64, 1000, 65_536] {
        let (mut after, mut offset, mut got, mut pages) = (0, 0, String::new(), 0);
        loop {
            let (s, page) = page_of(max, after, offset).await;
            assert_eq!(s, StatusCode::OK, "{page}");
            let text = page["text"].as_str().unwrap();
            assert!(
                text.len() as u64 <= max,
                "{} bytes in a page of {max}",
                text.len()
            );
            got.push_str(text);
            after = page["next"].as_u64().unwrap();
            offset = page["offset"].as_u64().unwrap();
            pages += 1;
            if !page["more"].as_bool().unwrap() {
                break;
            }
        }
        assert_eq!(got, whole, "pages of {max} bytes rebuild the log exactly");
        assert!(
            pages as u64 >= whole.len() as u64 / max,
            "{pages} pages of {max}"
        );
    }
    // Without max_bytes a page holds the default at most; past the limit, refused.
    let (_, page) = page_of(MAX_LOG_BYTES, 0, 0).await;
    assert_eq!(
        page["text"].as_str().unwrap(),
        whole,
        "all of it fits in the largest page"
    );
    let (s, _) = page_of(MAX_LOG_BYTES + 1, 0, 0).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, page) = call(
        &f.stack,
        Method::GET,
        &format!("/v1/jobs/{id}/logs?attempt=1"),
        Some(&t),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(page["text"].as_str().unwrap().len() as u64 <= DEFAULT_LOG_BYTES);
}

/// Each operation of `schemas/openapi.json` documents the errors the router can
/// give it, each as the JSON `Error`: 401 and 403 where a token is needed, 400
/// where there is a path, query or body to get wrong, 413 and 422 for bodies and
/// 415 for JSON-only bodies.
#[test]
fn the_document_promises_every_error_status() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/openapi.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let resolve = |r: &Value| -> Value {
        match r["$ref"].as_str() {
            Some(name) => doc["components"]["responses"][name.rsplit('/').next().unwrap()].clone(),
            None => r.clone(),
        }
    };
    for (route, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let label = format!("{} {route}", method.to_uppercase());
            let responses = op["responses"].as_object().unwrap();
            let has = |code: &str| responses.contains_key(code);
            let secured = op
                .get("security")
                .is_none_or(|s| !s.as_array().unwrap().is_empty());
            if secured {
                assert!(has("401") && has("403"), "{label}: 401 and 403");
            }
            let params = op["parameters"].as_array().is_some_and(|p| !p.is_empty());
            if let Some(body) = op.get("requestBody") {
                assert!(
                    has("400") && has("413") && has("422"),
                    "{label}: body errors"
                );
                let types: Vec<_> = body["content"].as_object().unwrap().keys().collect();
                if types == ["application/json"] && route != "/v1/hooks/{name}" {
                    assert!(has("415"), "{label}: 415");
                }
            } else if params && route != "/v1/hooks/{name}" && route != "/v1/tokens/{id}" {
                assert!(has("400"), "{label}: 400");
            }
            for (code, response) in responses {
                if code.starts_with('2') {
                    continue;
                }
                let schema = &resolve(response)["content"]["application/json"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/Error",
                    "{label} {code}"
                );
            }
        }
    }
}

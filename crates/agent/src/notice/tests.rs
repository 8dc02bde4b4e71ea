#![allow(clippy::unwrap_used)]

//! Against an IMDSv2 server with the service's rules: a session token from
//! `PUT /latest/api/token` (with its TTL header) on every read, 401 for a missing
//! or expired token, 404 until something is scheduled.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};

use super::*;

#[derive(Default)]
struct Metadata {
    token: Option<String>,
    tokens_issued: u32,
    reads: u32,
    instance_action: Option<String>,
    rebalance: Option<String>,
}

type Shared = Arc<Mutex<Metadata>>;

async fn token(State(m): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    if !headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
        return (StatusCode::BAD_REQUEST, String::new());
    }
    let mut m = m.lock().unwrap();
    m.tokens_issued += 1;
    let t = format!("token-{}", m.tokens_issued);
    m.token = Some(t.clone());
    (StatusCode::OK, t)
}

fn read(
    m: &Shared,
    headers: &HeaderMap,
    pick: fn(&Metadata) -> Option<String>,
) -> (StatusCode, String) {
    let mut m = m.lock().unwrap();
    m.reads += 1;
    let given = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok());
    if given.is_none() || given != m.token.as_deref() {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    match pick(&m) {
        Some(body) => (StatusCode::OK, body),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}

async fn serve() -> (String, Shared) {
    let m: Shared = Arc::default();
    let app = Router::new()
        .route("/latest/api/token", put(token))
        .route(
            "/latest/meta-data/spot/instance-action",
            get(|State(m): State<Shared>, h: HeaderMap| async move {
                read(&m, &h, |m| m.instance_action.clone())
            }),
        )
        .route(
            "/latest/meta-data/events/recommendations/rebalance",
            get(|State(m): State<Shared>, h: HeaderMap| async move {
                read(&m, &h, |m| m.rebalance.clone())
            }),
        )
        .with_state(m.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), m)
}

#[tokio::test]
async fn an_interruption_becomes_a_notice_with_its_deadline() {
    let (base, m) = serve().await;
    let mut source = Source::Imds(Imds::new(&base, Duration::ZERO));
    assert_eq!(source.poll().await, None, "nothing scheduled yet");
    m.lock().unwrap().rebalance = Some(r#"{"noticeTime":"2026-12-01T08:20:00Z"}"#.into());
    assert_eq!(
        source.poll().await,
        None,
        "a rebalance recommendation is no notice"
    );
    m.lock().unwrap().instance_action =
        Some(r#"{"action":"terminate","time":"2026-12-01T08:22:00Z"}"#.into());
    let notice = source.poll().await.expect("the notice");
    // 2026-12-01T08:22:00Z
    assert_eq!(notice.deadline, Timestamp(1_796_113_320_000));
    assert_eq!(
        m.lock().unwrap().tokens_issued,
        1,
        "one session token serves every read"
    );
}

#[tokio::test]
async fn an_expired_token_is_replaced() {
    let (base, m) = serve().await;
    let mut source = Source::Imds(Imds::new(&base, Duration::ZERO));
    assert_eq!(source.poll().await, None);
    {
        let mut m = m.lock().unwrap();
        m.token = Some("rotated".into());
        m.instance_action = Some(r#"{"action":"stop","time":"2026-12-01T08:22:00Z"}"#.into());
    }
    assert!(source.poll().await.is_some(), "read again with a new token");
    assert_eq!(m.lock().unwrap().tokens_issued, 2);
}

#[tokio::test]
async fn the_service_is_asked_at_most_every_period() {
    let (base, m) = serve().await;
    let mut source = Source::Imds(Imds::new(&base, Duration::from_secs(3600)));
    for _ in 0..10 {
        assert_eq!(source.poll().await, None);
    }
    // One check: the rebalance read and the instance-action read.
    assert_eq!(m.lock().unwrap().reads, 2);
}

#[tokio::test]
async fn an_unreachable_or_odd_service_gives_no_notice() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut source = Source::Imds(Imds::new(
        &format!("http://127.0.0.1:{port}"),
        Duration::ZERO,
    ));
    assert_eq!(source.poll().await, None);
    let (base, m) = serve().await;
    m.lock().unwrap().instance_action = Some("<html>not json</html>".into());
    let mut source = Source::Imds(Imds::new(&base, Duration::ZERO));
    assert_eq!(source.poll().await, None);
}

#[tokio::test]
async fn the_local_simulator_writes_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notice.json");
    let mut source = Source::File(path.clone());
    assert_eq!(source.poll().await, None);
    std::fs::write(&path, r#"{"deadline_ms": 1234}"#).unwrap();
    assert_eq!(
        source.poll().await,
        Some(Notice {
            deadline: Timestamp(1234)
        })
    );
}

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
            deadline: Timestamp(1234),
            ack: None,
        })
    );
}

/// Azure's Scheduled Events as the documentation describes the service: the
/// `Metadata: true` header on every call (400 without it), a document of events
/// with the VMs each concerns, and `StartRequests` to acknowledge one.
mod azure {
    use axum::Json;
    use axum::routing::get;
    use serde_json::{Value, json};

    use super::*;

    #[derive(Default)]
    struct Events {
        doc: Vec<Value>,
        acked: Vec<String>,
    }

    type Shared = Arc<Mutex<Events>>;

    fn metadata(h: &HeaderMap) -> bool {
        h.get("metadata").is_some_and(|v| v == "true")
    }

    async fn serve() -> (String, Shared) {
        let m: Shared = Arc::default();
        let app = Router::new()
            .route(
                "/metadata/scheduledevents",
                get(|State(m): State<Shared>, h: HeaderMap| async move {
                    if !metadata(&h) {
                        return (StatusCode::BAD_REQUEST, Json(json!({})));
                    }
                    let events = m.lock().unwrap().doc.clone();
                    (
                        StatusCode::OK,
                        Json(json!({"DocumentIncarnation": 2, "Events": events})),
                    )
                })
                .post(
                    |State(m): State<Shared>, h: HeaderMap, Json(body): Json<Value>| async move {
                        if !metadata(&h) {
                            return StatusCode::BAD_REQUEST;
                        }
                        for r in body["StartRequests"].as_array().into_iter().flatten() {
                            let id = r["EventId"].as_str().unwrap_or_default().to_owned();
                            m.lock().unwrap().acked.push(id);
                        }
                        StatusCode::OK
                    },
                ),
            )
            .with_state(m.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (
            format!("http://{addr}/metadata/scheduledevents?api-version=2020-07-01"),
            m,
        )
    }

    fn event(id: &str, kind: &str, vm: &str) -> Value {
        json!({
            "EventId": id,
            "EventType": kind,
            "ResourceType": "VirtualMachine",
            "Resources": [vm],
            "EventStatus": "Scheduled",
            "NotBefore": "Tue, 01 Dec 2026 08:22:00 GMT",
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1
        })
    }

    #[tokio::test]
    async fn an_eviction_of_this_vm_is_a_notice_acknowledged_when_asked() {
        let (url, m) = serve().await;
        let mut source = Source::Azure(ScheduledEvents::new(&url, "job-vm-1", Duration::ZERO));
        assert_eq!(source.poll().await, None, "no events");
        m.lock().unwrap().doc = vec![
            event("a", "Preempt", "other-vm"),
            event("b", "Freeze", "job-vm-1"),
        ];
        assert_eq!(
            source.poll().await,
            None,
            "another VM's eviction and a freeze are no notice"
        );
        m.lock()
            .unwrap()
            .doc
            .push(event("c", "Preempt", "job-vm-1"));
        let notice = source.poll().await.expect("the notice");
        // Tue, 01 Dec 2026 08:22:00 GMT
        assert_eq!(notice.deadline, Timestamp(1_796_113_320_000));
        assert!(m.lock().unwrap().acked.is_empty(), "not acknowledged yet");
        notice.ack.expect("an event to acknowledge").send().await;
        assert_eq!(m.lock().unwrap().acked, ["c"]);
    }

    #[tokio::test]
    async fn a_terminate_counts_and_an_event_first_seen_started_is_due_now() {
        let (url, m) = serve().await;
        let mut source = Source::Azure(ScheduledEvents::new(&url, "JOB-VM-2", Duration::ZERO));
        m.lock().unwrap().doc = vec![event("e", "Terminate", "job-vm-2")];
        assert!(source.poll().await.is_some(), "names are case-insensitive");
        let mut started = event("d", "Preempt", "job-vm-2");
        started["EventStatus"] = "Started".into();
        m.lock().unwrap().doc = vec![started];
        let before = respawn_core::time::Clock::now(&respawn_core::time::SystemClock);
        let notice = source.poll().await.expect("a started eviction is a notice");
        assert!(
            notice.deadline >= before,
            "due now, not at its past NotBefore"
        );
    }
}

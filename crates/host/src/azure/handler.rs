//! The Azure Functions custom handler: what the Functions host's invocations do,
//! as one HTTP router.
//!
//! | function (`functions/azure/app/<name>/function.json`) | trigger | does |
//! | --- | --- | --- |
//! | `submit-hi`, `-no`, `-lo` | queue `<stack>-submit-<band>` | job submissions by message |
//! | `dispatch-*` | queue `<stack>-dispatch-<band>` | attempts get their Spot VM |
//! | `events-*` | queue `<stack>-events-<band>` | agents' reports |
//! | `notify-*` | queue `<stack>-notify-<band>` | state changes POSTed to jobs' URLs |
//! | `uploads-no` | queue `<stack>-uploads-no` | Event Grid's BlobCreated events (queue delivery) make jobs |
//! | `eventgrid` | Event Grid | the same, delivered to the function |
//! | `reconcile` | timer, every minute | deadlines, lost VMs, orphans, warm pools' size |
//! | `api` | HTTP, forwarded (`/api/{*path}`) | the API, and `/api/eventgrid` (Event Grid's webhook) |
//!
//! An invocation is `POST /<function>` with `{"Data": {<binding>: …}, "Metadata":
//! {…}}`; the answer is `{"Outputs": {}, "Logs": […], "ReturnValue": …}`, 200 when
//! the work is done (or settled), 500 when the host must try again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use base64::Engine;
use respawn_adapters::azqueue::RawMessage;
use respawn_core::cloud::eventgrid::{self, GridMessage};
use respawn_core::handlers::{self, blob_created};
use respawn_core::ports::Ports;
use respawn_core::ports::queue::Receive;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{Instrument, info, warn};

use super::{AzCloud, UPLOADS, host_value, meta_str};
use crate::invocation::{Outcome, outcome, settle};
use crate::notify::Notifier;
use crate::{intake, loops};

/// How long the Functions host keeps a triggered message invisible while the
/// function runs (its own default is 10 minutes; the handlers settle well before).
const LEASE: Duration = Duration::from_secs(300);

/// The Functions host's request for a non-HTTP trigger.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Invocation {
    #[serde(default)]
    pub data: BTreeMap<String, Value>,
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
}

#[derive(Clone)]
struct Handler {
    cloud: &'static AzCloud,
    notifier: Arc<Notifier>,
}

/// The custom handler's router over `cloud`.
pub fn router(cloud: &'static AzCloud) -> Result<Router, String> {
    let notifier = Arc::new(Notifier::new(
        cloud.broker.notify_secret.clone(),
        cloud.replies(),
        false,
    )?);
    let h = Handler { cloud, notifier };
    let api = crate::api::app(cloud.broker.api());
    let hook = Router::new()
        .route("/eventgrid", any(webhook))
        .with_state(h.clone());
    // Not flushed per invocation: the Functions host does not freeze its
    // custom handler between invocations, so the exporters' own schedule
    // holds; main flushes them when the host stops the handler.
    Ok(Router::new()
        .route("/{function}", post(invoke))
        .with_state(h)
        .nest("/api", hook.merge(api)))
}

/// What the Functions host wants back.
fn answer(status: StatusCode, logs: &[String], value: Value) -> Response {
    (
        status,
        axum::Json(json!({"Outputs": {}, "Logs": logs, "ReturnValue": value})),
    )
        .into_response()
}

fn refuse(why: String) -> Response {
    warn!(%why, "invocation refused");
    answer(StatusCode::BAD_REQUEST, &[why], Value::Null)
}

async fn invoke(
    State(h): State<Handler>,
    Path(function): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let inv: Invocation = match serde_json::from_slice(&body) {
        Ok(i) => i,
        Err(e) => return refuse(format!("{function}: not a Functions host invocation: {e}")),
    };
    match function.as_str() {
        "reconcile" => reconcile(h.cloud).await,
        "eventgrid" => {
            let Some(event) = inv.data.into_values().next() else {
                return refuse("eventgrid: Data holds no event".into());
            };
            // An object, or the JSON text of one.
            let body = match host_value(&event) {
                Value::String(text) => text.into_bytes(),
                other => serde_json::to_vec(&other).unwrap_or_default(),
            };
            match uploaded(h.cloud, &h.cloud.broker.ports, &body).await {
                Outcome::Done => answer(StatusCode::OK, &[], Value::Null),
                Outcome::Retry(why) => {
                    answer(StatusCode::INTERNAL_SERVER_ERROR, &[why], Value::Null)
                }
                // Event Grid retries, then dead-letters it (the subscription's
                // dead-letter container) with this reason.
                Outcome::Refuse(why) => refuse(why),
            }
        }
        f => match f.rsplit_once('-') {
            Some((queue, band))
                if ["hi", "no", "lo"].contains(&band)
                    && ["submit", "dispatch", "events", "notify", UPLOADS].contains(&queue) =>
            {
                queued(&h, queue, band, inv).await
            }
            _ => (
                StatusCode::NOT_FOUND,
                format!("no function {function:?} in this app"),
            )
                .into_response(),
        },
    }
}

async fn reconcile(cloud: &AzCloud) -> Response {
    let report = handlers::reconcile(&cloud.broker.ports).await;
    if respawn_telemetry::metrics_exported() {
        cloud
            .broker
            .metrics
            .sample_queues(&cloud.broker.ports)
            .await;
    }
    // The pools are tended whatever became of the jobs' pass.
    if let Err(e) = cloud.arm.sweep_groups().await {
        warn!(error = %e, "cannot sweep the released gangs' proximity placement groups; the next tick tries again");
    }
    if let Err(e) = cloud.arm.tend_pools().await {
        warn!(error = %e, "cannot tend the warm pools; the next tick tries again");
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            &[e.to_string()],
            Value::Null,
        );
    }
    match report {
        Ok(report) => {
            info!(?report, "reconciled");
            answer(StatusCode::OK, &[], json!(format!("{report:?}")))
        }
        Err(e) => {
            warn!(error = %e, "reconcile failed; the next tick tries again");
            answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &[e.to_string()],
                Value::Null,
            )
        }
    }
}

/// A queue-triggered message, handled as the queue's consumer in `respawn up`
/// would handle it.
async fn queued(h: &Handler, queue: &str, band: &str, inv: Invocation) -> Response {
    let cloud = h.cloud;
    let Some(text) = inv.data.into_values().next() else {
        return refuse(format!("{queue}-{band}: Data holds no message"));
    };
    // The text as sent: the host hands it over JSON-encoded, or parsed.
    let text = match host_value(&text) {
        Value::String(s) => s.into_bytes(),
        other => other.to_string().into_bytes(),
    };
    let field =
        |k: &str| meta_str(&inv.metadata, k).ok_or_else(|| format!("Metadata.{k} is missing"));
    let (id, pop, count) = match (field("Id"), field("PopReceipt"), field("DequeueCount")) {
        (Ok(id), Ok(pop), Ok(count)) => match count.parse::<u32>() {
            Ok(n) => (id, pop, n),
            Err(_) => return refuse(format!("Metadata.DequeueCount: {count:?} is not a count")),
        },
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            return refuse(format!("{queue}-{band}: {e}"));
        }
    };
    let physical = match cloud.queue.physical_queues(queue) {
        Ok(names) => names.into_iter().find(|n| n.ends_with(&format!("-{band}"))),
        Err(e) => return refuse(e.to_string()),
    };
    let Some(physical) = physical else {
        return refuse(format!("queue {queue} has no band {band}"));
    };
    // As stored: the host decoded it from base64.
    let message = RawMessage {
        id: id.clone(),
        pop_receipt: pop,
        dequeue_count: count,
        text: base64::engine::general_purpose::STANDARD.encode(&text),
    };
    let d = match cloud
        .queue
        .triggered(queue, &physical, message, LEASE)
        .await
    {
        Ok(Some(d)) => d,
        // Dead-lettered past its deliveries, or sent on until due.
        Ok(None) => return answer(StatusCode::OK, &[], Value::Null),
        Err(e) => {
            warn!(queue, message_id = %id, error = %e, "cannot take the message; the host tries again");
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &[e.to_string()],
                Value::Null,
            );
        }
    };
    let receipt = d.receipt.clone();
    let (ports, invocation) = cloud.broker.invocation(cloud.queue.clone(), queue);
    invocation.hand(d);
    let opened = match ports.queue.receive(queue, Receive::default()).await {
        Ok(d) => d,
        Err(e) => {
            warn!(queue, message_id = %id, error = %e, "cannot open the message");
            Vec::new()
        }
    };
    match queue {
        "submit" => {
            intake::handle_all(&ports, &cloud.broker.templates, &cloud.replies(), opened).await
        }
        "dispatch" | "events" => loops::process(&ports, opened).await,
        "notify" => h.notifier.handle(&ports, opened).await,
        _ => {
            for d in opened {
                let span = crate::traced::consuming(ports.queue.system(), &d);
                async { settle(&ports, &d, uploaded(cloud, &ports, &d.body).await).await }
                    .instrument(span)
                    .await;
            }
        }
    }
    if invocation.settled().contains(&receipt) {
        answer(StatusCode::OK, &[], Value::Null)
    } else {
        // Kept (retried later, or unsettled): the host must not delete it.
        answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            &["message kept for another delivery".into()],
            Value::Null,
        )
    }
}

/// Event Grid's BlobCreated events for the job container make jobs by the
/// trigger rules; a retried event makes no second job (a job is keyed by rule,
/// blob and write).
async fn uploaded(cloud: &AzCloud, ports: &Ports, body: &[u8]) -> Outcome {
    let blobs = match eventgrid::decode(body) {
        Ok(GridMessage::Created(blobs)) => blobs,
        Ok(GridMessage::Validation { .. }) => {
            return Outcome::Refuse(
                "a subscription validation event belongs to the webhook (/api/eventgrid)".into(),
            );
        }
        Err(e) => return Outcome::Refuse(format!("not an Event Grid BlobCreated event: {e}")),
    };
    for b in blobs {
        if b.container != cloud.container {
            warn!(account = %b.account, container = %b.container, "event for another container; ignored");
            continue;
        }
        if let Err(e) = blob_created(ports, &cloud.broker.rules, &b.blob).await {
            return outcome(e);
        }
    }
    Outcome::Done
}

/// Whether `given` is the webhook's key, compared by digest (no timing to learn
/// from).
fn key_matches(expected: &str, given: Option<&String>) -> bool {
    given.is_some_and(|g| Sha256::digest(g.as_bytes()) == Sha256::digest(expected.as_bytes()))
}

/// Event Grid's webhook: the subscription's validation handshake (Event Grid's
/// `validationCode`, and CloudEvents' `OPTIONS` abuse protection), then
/// deliveries (one event or a batch) handled as the `eventgrid` function's. The
/// key comes in the `X-Respawn-Key` header (a delivery attribute marked secret)
/// or the URL (`?key=`); Entra ID tokens are checked by App Service
/// Authentication in front of the app, where it is turned on.
async fn webhook(
    State(h): State<Handler>,
    method: axum::http::Method,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(key) = &h.cloud.eventgrid_key else {
        return (
            StatusCode::NOT_FOUND,
            "Event Grid's webhook is off (RESPAWN_EVENTGRID_KEY)",
        )
            .into_response();
    };
    // The key in a header (an Event Grid delivery attribute marked secret) stays
    // out of request logs; `?key=` works where headers cannot be set.
    let given = headers
        .get("x-respawn-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| q.get("key").cloned());
    if !key_matches(key, given.as_ref()) {
        return (
            StatusCode::UNAUTHORIZED,
            "the webhook's key is missing or wrong",
        )
            .into_response();
    }
    if method == axum::http::Method::OPTIONS {
        let Some(origin) = headers
            .get("webhook-request-origin")
            .and_then(|v| v.to_str().ok())
        else {
            return (StatusCode::BAD_REQUEST, "WebHook-Request-Origin is missing").into_response();
        };
        return (
            StatusCode::OK,
            [
                ("webhook-allowed-origin", origin.to_owned()),
                ("webhook-allowed-rate", "*".to_owned()),
            ],
        )
            .into_response();
    }
    if method != axum::http::Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if let Ok(GridMessage::Validation { code }) = eventgrid::decode(&body) {
        info!("Event Grid subscription validated");
        return (
            StatusCode::OK,
            axum::Json(json!({ "validationResponse": code })),
        )
            .into_response();
    }
    match uploaded(h.cloud, &h.cloud.broker.ports, &body).await {
        Outcome::Done => StatusCode::OK.into_response(),
        // Event Grid retries 503s with backoff.
        Outcome::Retry(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
        // And dead-letters a 400 at once: it will never be understood.
        Outcome::Refuse(why) => (StatusCode::BAD_REQUEST, why).into_response(),
    }
}

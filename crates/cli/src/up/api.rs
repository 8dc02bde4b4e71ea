//! The HTTP API of the local stack: `app(stack) -> Router`. The CLI talks to it.

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use respawn_core::handlers::{self, Submission};
use respawn_core::job::{JobId, JobRecord, JobState};
use respawn_core::layout::{self, Stream};
use respawn_core::lifecycle::Event;
use respawn_core::ports::ledger::{self, ListQuery};
use respawn_core::spec::{self, Format, SpecError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Stack;

pub fn app(stack: Stack) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/logs", get(logs))
        .route("/v1/preempt", post(preempt))
        .route("/v1/vms", get(vms))
        .with_state(stack)
}

/// An error for API clients: what went wrong, never how the server is built.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Invalid(SpecError),
    NotFound(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({ "error": m })),
            ApiError::Invalid(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "error": "invalid job spec",
                    "errors": e.errors.iter().map(|f| json!({"path": f.path, "message": f.message})).collect::<Vec<_>>(),
                }),
            ),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!({ "error": m })),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "error": "internal error; see the broker's log" }),
                )
            }
        };
        (status, axum::Json(body)).into_response()
    }
}

impl From<handlers::Error> for ApiError {
    fn from(e: handlers::Error) -> Self {
        match e {
            handlers::Error::Ledger(ledger::Error::NotFound { id }) => {
                ApiError::NotFound(format!("no job {id}"))
            }
            handlers::Error::Spec(s) => ApiError::Invalid(s),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ledger::Error> for ApiError {
    fn from(e: ledger::Error) -> Self {
        handlers::Error::from(e).into()
    }
}

fn job_id(s: &str) -> Result<JobId, ApiError> {
    s.parse()
        .map_err(|e: respawn_core::job::BadJobId| ApiError::BadRequest(e.to_string()))
}

/// One line of `respawn jobs`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    pub id: JobId,
    pub name: String,
    pub state: JobState,
    pub attempt: u32,
    pub attempts: usize,
    pub preemptions: usize,
    pub failures: u32,
    pub created_at: respawn_core::time::Timestamp,
    pub updated_at: respawn_core::time::Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<&JobRecord> for Summary {
    fn from(r: &JobRecord) -> Self {
        Summary {
            id: r.id.clone(),
            name: r.spec.name.clone(),
            state: r.state,
            attempt: r.attempt,
            attempts: r.attempts.len(),
            preemptions: r.preemptions(),
            failures: r.failures,
            created_at: r.created_at,
            updated_at: r.updated_at,
            reason: r.reason.clone(),
        }
    }
}

async fn submit(State(stack): State<Stack>, body: String) -> Result<Response, ApiError> {
    let spec = spec::parse(&body, Format::sniff(&body)).map_err(ApiError::Invalid)?;
    let sub = Submission {
        spec,
        project: "default".into(),
    };
    let done = handlers::submit(&stack.ports, sub).await?;
    let status = if done.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(done.job)).into_response())
}

#[derive(Debug, Deserialize)]
struct ListParams {
    state: Option<String>,
    label: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(stack): State<Stack>,
    Query(p): Query<ListParams>,
) -> Result<Response, ApiError> {
    let state = p
        .state
        .as_deref()
        .map(str::parse::<JobState>)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let label = p
        .label
        .as_deref()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| ApiError::BadRequest(format!("label must be key=value, got {l:?}")))
        })
        .transpose()?;
    let query = ListQuery {
        state,
        label,
        project: None,
        after: p.after.as_deref().map(job_id).transpose()?,
        limit: p.limit.unwrap_or(100),
    };
    let page = stack.ports.ledger.list(&query).await?;
    let jobs: Vec<Summary> = page.jobs.iter().map(Summary::from).collect();
    Ok(axum::Json(json!({ "jobs": jobs, "next": page.next })).into_response())
}

async fn show(State(stack): State<Stack>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let rec = stack.ports.ledger.get(&job_id(&id)?).await?;
    Ok(axum::Json(rec).into_response())
}

async fn cancel(State(stack): State<Stack>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let event = Event::CancelRequested {
        reason: "requested through the API".into(),
    };
    let rec = handlers::job_event(&stack.ports, &id, &event, stack.ports.clock.now()).await?;
    Ok(axum::Json(rec).into_response())
}

#[derive(Debug, Deserialize)]
struct LogParams {
    attempt: Option<u32>,
    stream: Option<String>,
    /// First chunk to return (the previous answer's `next`).
    after: Option<u64>,
}

async fn logs(
    State(stack): State<Stack>,
    Path(id): Path<String>,
    Query(p): Query<LogParams>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let rec = stack.ports.ledger.get(&id).await?;
    let attempt = p
        .attempt
        .unwrap_or(rec.attempts.last().map_or(1, |a| a.number));
    let stream = match p.stream.as_deref() {
        None | Some("stdout") => Stream::Stdout,
        Some("stderr") => Stream::Stderr,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "stream must be stdout or stderr, got {other:?}"
            )));
        }
    };
    let from = p.after.unwrap_or(0);
    let prefix = layout::log_prefix(&id, attempt, stream);
    let metas: Vec<_> = stack
        .ports
        .blobs
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut chunks: Vec<(u64, object_store::path::Path)> = metas
        .into_iter()
        .filter_map(|m| Some((m.location.filename()?.parse().ok()?, m.location)))
        .filter(|(n, _)| *n >= from)
        .collect();
    chunks.sort();
    let mut text = Vec::new();
    let mut next = from;
    for (n, path) in chunks {
        let bytes = stack
            .ports
            .blobs
            .get(&path)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .bytes()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        text.extend_from_slice(&bytes);
        next = n + 1;
    }
    let live = rec
        .current()
        .is_some_and(|a| a.number == attempt && a.is_live());
    Ok(axum::Json(json!({
        "job": id,
        "attempt": attempt,
        "attempts": rec.attempts.len(),
        "stream": stream.as_str(),
        "text": String::from_utf8_lossy(&text),
        "next": next,
        "live": live,
        "state": rec.state,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct PreemptBody {
    /// A job id (its live VM) or a VM id.
    target: String,
    notice_secs: Option<f64>,
}

async fn preempt(
    State(stack): State<Stack>,
    axum::Json(b): axum::Json<PreemptBody>,
) -> Result<Response, ApiError> {
    let notice = b
        .notice_secs
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|e| ApiError::BadRequest(format!("notice_secs: {e}")))
        })
        .transpose()?;
    match stack.compute.preempt(&b.target, notice) {
        Some(vm) => Ok(axum::Json(json!({ "vm": vm })).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no running VM for {:?} (already preempted, or not running)",
            b.target
        ))),
    }
}

async fn vms(State(stack): State<Stack>) -> Response {
    axum::Json(stack.compute.running()).into_response()
}

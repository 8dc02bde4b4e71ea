//! Jobs: submit, list, show, cancel, logs — each within the caller's project.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use respawn_core::handlers::{self, Submission};
use respawn_core::job::{JobId, JobRecord, JobState};
use respawn_core::layout::{self, Stream};
use respawn_core::lifecycle::Event;
use respawn_core::ports::ledger::ListQuery;
use respawn_core::ports::tokens::Scope;
use respawn_core::spec::{self, Format};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiError, Caller};
use crate::up::Stack;

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

/// The caller's job, or 404 (also for another project's job: its existence is not
/// the caller's to learn).
async fn own_job(stack: &Stack, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    let id = job_id(id)?;
    match stack.ports.ledger.get(&id).await {
        Ok(rec) if rec.project == caller.project() => Ok(rec),
        Ok(_) => Err(ApiError::NotFound(format!("no job {id}"))),
        Err(e) => Err(e.into()),
    }
}

pub async fn submit(
    State(stack): State<Stack>,
    caller: Caller,
    headers: HeaderMap,
    body: String,
) -> Result<Response, ApiError> {
    caller.require(Scope::Submit)?;
    let mut spec = spec::parse(&body, Format::sniff(&body)).map_err(ApiError::Invalid)?;
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .map_err(|_| ApiError::BadRequest("Idempotency-Key must be visible ASCII".into()))?;
        match &spec.idempotency_key {
            Some(k) if k != key => {
                return Err(ApiError::BadRequest(format!(
                    "Idempotency-Key {key:?} differs from the spec's idempotency_key {k:?}"
                )));
            }
            _ => spec.idempotency_key = Some(key.to_owned()),
        }
    }
    let sub = Submission {
        spec,
        project: caller.project().to_owned(),
        reply_to: None,
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
pub struct ListParams {
    state: Option<String>,
    label: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    State(stack): State<Stack>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
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
        project: Some(caller.project().to_owned()),
        after: p.after.as_deref().map(job_id).transpose()?,
        limit: p.limit.unwrap_or(100),
    };
    let page = stack.ports.ledger.list(&query).await?;
    let jobs: Vec<Summary> = page.jobs.iter().map(Summary::from).collect();
    Ok(axum::Json(json!({ "jobs": jobs, "next": page.next })).into_response())
}

pub async fn show(
    State(stack): State<Stack>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let rec = own_job(&stack, &caller, &id).await?;
    Ok(axum::Json(rec).into_response())
}

pub async fn cancel(
    State(stack): State<Stack>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Cancel)?;
    let id = own_job(&stack, &caller, &id).await?.id;
    let event = Event::CancelRequested {
        reason: "requested through the API".into(),
    };
    let rec = handlers::job_event(&stack.ports, &id, &event, stack.ports.clock.now()).await?;
    Ok(axum::Json(rec).into_response())
}

#[derive(Debug, Deserialize)]
pub struct LogParams {
    attempt: Option<u32>,
    stream: Option<String>,
    /// First chunk to return (the previous answer's `next`).
    after: Option<u64>,
}

pub async fn logs(
    State(stack): State<Stack>,
    caller: Caller,
    Path(id): Path<String>,
    Query(p): Query<LogParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let rec = own_job(&stack, &caller, &id).await?;
    let id = rec.id.clone();
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

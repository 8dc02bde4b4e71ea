//! Jobs: submit, list, show, cancel, logs — each within the caller's project.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use object_store::ObjectStoreExt;
use respawn_core::handlers::{self, Submission};
use respawn_core::job::{JobId, JobRecord, JobState};
use respawn_core::layout::{self, Stream};
use respawn_core::lifecycle::Event;
use respawn_core::ports::ledger::ListQuery;
use respawn_core::ports::tokens::Scope;
use respawn_core::spec;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Api;
use super::extract::{Path, Query, SpecText};
use super::{ApiError, Caller};

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
async fn own_job(stack: &Api, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    let id = job_id(id)?;
    match stack.ports.ledger.get(&id).await {
        Ok(rec) if rec.project == caller.project() => Ok(rec),
        Ok(_) => Err(ApiError::NotFound(format!("no job {id}"))),
        Err(e) => Err(e.into()),
    }
}

pub async fn submit(
    State(stack): State<Api>,
    caller: Caller,
    headers: HeaderMap,
    body: SpecText,
) -> Result<Response, ApiError> {
    caller.require(Scope::Submit)?;
    let mut spec = spec::parse(&body.text, body.format).map_err(ApiError::Invalid)?;
    if let Some(key) = headers.get("idempotency-key") {
        // Visible ASCII, spaces only inside: what the OpenAPI document's pattern says.
        let key = key
            .to_str()
            .ok()
            .filter(|k| k.chars().all(|c| (' '..='~').contains(&c)))
            .filter(|k| !k.starts_with(' ') && !k.ends_with(' '))
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "Idempotency-Key must be visible ASCII, with spaces only inside".into(),
                )
            })?;
        match &spec.idempotency_key {
            Some(k) if k != key => {
                return Err(ApiError::BadRequest(format!(
                    "Idempotency-Key {key:?} differs from the spec's idempotency_key {k:?}"
                )));
            }
            _ => spec.idempotency_key = Some(key.to_owned()),
        }
        // The header bypassed the spec's own check of the key.
        spec::check_idempotency_key(key).map_err(ApiError::Invalid)?;
    }
    let sub = Submission {
        spec,
        project: caller.project().to_owned(),
        reply_to: None,
        local_files: caller.is_admin(),
    };
    let done = handlers::submit(&stack.ports, sub).await?;
    let status = if done.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(done.job)).into_response())
}

/// The largest page of `GET /v1/jobs`, as the OpenAPI document says.
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    state: Option<String>,
    label: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

pub async fn list(
    State(stack): State<Api>,
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
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_LIMIT}, got {limit}"
        )));
    }
    let query = ListQuery {
        state,
        label,
        project: Some(caller.project().to_owned()),
        after: p.after.as_deref().map(job_id).transpose()?,
        limit: limit as usize,
    };
    let page = stack.ports.ledger.list(&query).await?;
    let jobs: Vec<Summary> = page.jobs.iter().map(Summary::from).collect();
    Ok(axum::Json(json!({ "jobs": jobs, "next": page.next })).into_response())
}

pub async fn show(
    State(stack): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let rec = own_job(&stack, &caller, &id).await?;
    Ok(axum::Json(rec).into_response())
}

pub async fn cancel(
    State(stack): State<Api>,
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

/// Bytes of log one request returns unless it asks for fewer.
pub const DEFAULT_LOG_BYTES: u64 = 256 * 1024;
/// The most bytes of log one request may ask for: what a request holds in memory.
pub const MAX_LOG_BYTES: u64 = 1024 * 1024;
/// The most chunks one request looks at (chunks are never empty when the agent
/// writes them, but anyone with the bucket could write empty ones).
const MAX_LOG_CHUNKS: u64 = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    attempt: Option<u32>,
    stream: Option<String>,
    /// The chunk to start in (the previous answer's `next`).
    after: Option<u32>,
    /// Bytes of that chunk already read (the previous answer's `offset`).
    offset: Option<u32>,
    /// At most this many bytes of text in the answer.
    max_bytes: Option<u64>,
}

/// A page of an attempt's output: whole chunks where they fit in the budget, and
/// a part of the chunk that does not, so one request never holds more than
/// `max_bytes` of log however large the log or any chunk of it is.
pub async fn logs(
    State(stack): State<Api>,
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
    if attempt == 0 {
        return Err(ApiError::BadRequest("attempt counts from 1".into()));
    }
    let stream = match p.stream.as_deref() {
        None | Some("stdout") => Stream::Stdout,
        Some("stderr") => Stream::Stderr,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "stream must be stdout or stderr, got {other:?}"
            )));
        }
    };
    let budget = p.max_bytes.unwrap_or(DEFAULT_LOG_BYTES);
    if !(1..=MAX_LOG_BYTES).contains(&budget) {
        return Err(ApiError::BadRequest(format!(
            "max_bytes must be 1 to {MAX_LOG_BYTES}, got {budget}"
        )));
    }
    let from = Cursor {
        chunk: p.after.map_or(0, u64::from),
        offset: p.offset.map_or(0, u64::from),
    };
    let page = read_log(&stack, &id, attempt, stream, from, budget).await?;
    let live = rec
        .current()
        .is_some_and(|a| a.number == attempt && a.is_live());
    Ok(axum::Json(json!({
        "job": id,
        "attempt": attempt,
        "attempts": rec.attempts.len(),
        "stream": stream.as_str(),
        "text": String::from_utf8_lossy(&page.text),
        "next": page.next.chunk,
        "offset": page.next.offset,
        "more": page.more,
        "live": live,
        "state": rec.state,
    }))
    .into_response())
}

/// Where a log read starts: a chunk, and bytes into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    chunk: u64,
    offset: u64,
}

#[derive(Debug)]
struct LogPage {
    text: Vec<u8>,
    next: Cursor,
    /// More text is there now: the caller may ask again straight away.
    more: bool,
}

async fn read_log(
    stack: &Api,
    id: &respawn_core::JobId,
    attempt: u32,
    stream: Stream,
    from: Cursor,
    budget: u64,
) -> Result<LogPage, ApiError> {
    let blobs = &stack.ports.blobs;
    let mut text = Vec::new();
    let mut at = from;
    let mut more = false;
    for _ in 0..MAX_LOG_CHUNKS {
        let path = layout::log_chunk(id, attempt, stream, at.chunk);
        // Chunks are numbered from 0 without gaps: the first missing one is the end.
        let size = match blobs.head(&path).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => break,
            Err(e) => return Err(ApiError::Internal(e.to_string())),
        };
        let left = budget - text.len() as u64;
        if at.offset >= size {
            at = Cursor {
                chunk: at.chunk + 1,
                offset: 0,
            };
            continue;
        }
        if left == 0 {
            more = true;
            break;
        }
        let end = size.min(at.offset + left);
        let bytes = blobs
            .get_range(&path, at.offset..end)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut take = bytes.len();
        if end < size {
            // Cut inside a chunk: end on a whole character, and the next read
            // starts with the rest of it.
            take -= incomplete_tail(&bytes);
            if take == 0 && text.is_empty() {
                // A budget smaller than one character still has to make progress.
                take = bytes.len();
            }
        }
        text.extend_from_slice(&bytes[..take]);
        at.offset += take as u64;
        if at.offset < size {
            more = true;
            break;
        }
        at = Cursor {
            chunk: at.chunk + 1,
            offset: 0,
        };
    }
    Ok(LogPage {
        text,
        next: at,
        more,
    })
}

/// Bytes at the end of `b` that begin a UTF-8 character without finishing it.
fn incomplete_tail(b: &[u8]) -> usize {
    match std::str::from_utf8(b) {
        Err(e) if e.error_len().is_none() => b.len() - e.valid_up_to(),
        _ => 0,
    }
}

//! Parameter sweeps: one request, an array of jobs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use respawn_core::handlers;
use respawn_core::ports::tokens::Scope;
use respawn_core::sweep;

use super::Api;
use super::extract::{Path, SpecText};
use super::{ApiError, Caller, Summary};

pub async fn submit(
    State(stack): State<Api>,
    caller: Caller,
    body: SpecText,
) -> Result<Response, ApiError> {
    caller.require(Scope::Submit)?;
    let spec = sweep::parse_sweep(&body.text, body.format).map_err(ApiError::Invalid)?;
    let done =
        handlers::submit_array(&stack.ports, &spec, caller.project(), caller.is_admin()).await?;
    let status = if done.created > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(done)).into_response())
}

pub async fn progress(
    State(stack): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let p = handlers::array_progress(&stack.ports, &id).await?;
    let jobs: Vec<Summary> = p
        .jobs
        .iter()
        .filter(|j| j.project == caller.project())
        .map(Summary::from)
        .collect();
    if jobs.is_empty() {
        return Err(ApiError::NotFound(format!("no array {id}")));
    }
    Ok(axum::Json(serde_json::json!({
        "array": p.array,
        "total": jobs.len(),
        "counts": p.counts,
        "finished": p.is_finished(),
        "jobs": jobs,
    }))
    .into_response())
}

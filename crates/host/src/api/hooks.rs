//! Inbound webhooks (signed by the sender, no bearer token) and the hooks list.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use respawn_core::handlers::{self, HookError, HookOutcome};
use respawn_core::ports::Retryable;
use respawn_core::ports::tokens::Scope;
use respawn_core::webhook::HookRequest;
use serde_json::json;

use super::Api;
use super::extract::{Path, RawBody};
use super::{ApiError, Caller};

pub async fn receive(
    State(stack): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let Some(hook) = stack.hooks.iter().find(|h| h.name == name) else {
        return Err(ApiError::NotFound(format!("no hook {name:?}")));
    };
    let pairs = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)));
    let request = HookRequest::from_headers(pairs, body);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // Verify, then accept durably (the job record) and answer: the VM and the
    // training happen later, well within a sender's 10-second budget.
    match handlers::webhook(&stack.ports, hook, &request, now).await {
        Ok(HookOutcome::Pong) => Ok(axum::Json(json!({ "pong": true })).into_response()),
        Ok(HookOutcome::Ignored(why)) => {
            Ok((StatusCode::ACCEPTED, axum::Json(json!({ "ignored": why }))).into_response())
        }
        Ok(HookOutcome::Submitted(job)) => {
            tracing::info!(job_id = %job, hook = %name, "job submitted by webhook");
            Ok((StatusCode::ACCEPTED, axum::Json(json!({ "job": job }))).into_response())
        }
        Err(HookError::Unauthorized(why)) => {
            tracing::warn!(hook = %name, reason = %why, "webhook rejected");
            Err(ApiError::Unauthorized(why))
        }
        Err(HookError::BadRequest(why)) => Err(ApiError::BadRequest(why)),
        Err(HookError::BadTemplate(e)) => Err(ApiError::Invalid(e)),
        Err(HookError::Failed(e)) if e.is_retryable() => Err(ApiError::Unavailable(e.to_string())),
        Err(HookError::Failed(e)) => Err(ApiError::Internal(e.to_string())),
    }
}

pub async fn list(State(stack): State<Api>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let hooks: Vec<_> = stack
        .hooks
        .iter()
        .filter(|h| h.project == caller.project())
        .map(|h| json!({ "name": h.name, "kind": h.kind, "project": h.project, "url": format!("/v1/hooks/{}", h.name) }))
        .collect();
    Ok(axum::Json(json!({ "hooks": hooks })).into_response())
}

//! Tokens, trigger rules, VMs and the spot simulator.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use respawn_core::ports::tokens::{self, Scope};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, Caller};
use crate::up::Stack;

pub async fn triggers(State(stack): State<Stack>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let rules = stack.rules.read().map(|r| r.clone()).unwrap_or_default();
    let mine: Vec<_> = rules
        .iter()
        .filter(|r| r.project == caller.project())
        .collect();
    Ok(axum::Json(json!({ "triggers": mine })).into_response())
}

#[derive(Debug, Deserialize)]
pub struct NewToken {
    name: String,
    scopes: Vec<String>,
}

pub async fn create_token(
    State(stack): State<Stack>,
    caller: Caller,
    axum::Json(body): axum::Json<NewToken>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    if !stack.sandboxed && stack.config.isolation != crate::up::Isolation::None {
        // A token is for someone else, whose jobs could then read this user's
        // files (the admin token among them): not without a sandbox, unless the
        // operator says so.
        return Err(ApiError::Forbidden(
            "workloads run unsandboxed on this stack (no bubblewrap), so tokens for others \
             cannot be created; install bubblewrap, or restart respawn up with --isolation none \
             to accept that their jobs can read this user's files"
                .into(),
        ));
    }
    let scopes = body
        .scopes
        .iter()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::BadRequest)?;
    if scopes.is_empty() || body.name.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "a token needs a name and at least one scope".into(),
        ));
    }
    // Tokens are minted in the caller's own project: an admin of one project
    // cannot hand out access to another.
    let (record, secret) = tokens::mint(
        &body.name,
        caller.project(),
        scopes,
        stack.ports.clock.now(),
    );
    stack
        .tokens
        .create(&record)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(token_id = %record.id, project = %record.project, by = %caller.token.id, "token created");
    let body = json!({
        "id": record.id,
        "name": record.name,
        "project": record.project,
        "scopes": record.scopes,
        "token": secret,
    });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

pub async fn list_tokens(State(stack): State<Stack>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let all = stack
        .tokens
        .list(Some(caller.project()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let shown: Vec<_> = all
        .iter()
        .map(|t| {
            json!({"id": t.id, "name": t.name, "project": t.project, "scopes": t.scopes,
                   "created_at": t.created_at, "revoked": t.revoked})
        })
        .collect();
    Ok(axum::Json(json!({ "tokens": shown })).into_response())
}

pub async fn revoke_token(
    State(stack): State<Stack>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let own = stack
        .tokens
        .list(Some(caller.project()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .into_iter()
        .any(|t| t.id == id);
    if !own {
        return Err(ApiError::NotFound(format!("no token {id}")));
    }
    stack
        .tokens
        .revoke(&id)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(token_id = %id, by = %caller.token.id, "token revoked");
    Ok(axum::Json(json!({ "id": id, "revoked": true })).into_response())
}

#[derive(Debug, Deserialize)]
pub struct PreemptBody {
    /// A job id (its live VM) or a VM id.
    target: String,
    notice_secs: Option<f64>,
}

pub async fn preempt(
    State(stack): State<Stack>,
    caller: Caller,
    axum::Json(b): axum::Json<PreemptBody>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let notice = b
        .notice_secs
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|e| ApiError::BadRequest(format!("notice_secs: {e}")))
        })
        .transpose()?;
    let vm = stack
        .compute
        .running()
        .into_iter()
        .find(|v| v.id == b.target || v.key.job.as_str() == b.target);
    let not_found = || ApiError::NotFound(format!("no running VM for {:?}", b.target));
    let vm = vm.ok_or_else(not_found)?;
    let job = stack.ports.ledger.get(&vm.key.job).await?;
    if job.project != caller.project() {
        return Err(not_found());
    }
    match stack.compute.preempt(&vm.id, notice) {
        Some(vm) => Ok(axum::Json(json!({ "vm": vm })).into_response()),
        None => Err(ApiError::NotFound(format!(
            "{} already has a preemption notice",
            vm.id
        ))),
    }
}

pub async fn vms(State(stack): State<Stack>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let mut mine = Vec::new();
    for vm in stack.compute.running() {
        if let Ok(job) = stack.ports.ledger.get(&vm.key.job).await
            && job.project == caller.project()
        {
            mine.push(vm);
        }
    }
    Ok(axum::Json(mine).into_response())
}

//! Tokens, trigger rules, VMs and the spot simulator.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use respawn_core::ports::tokens::{self, Scope};
use respawn_core::project;
use serde::Deserialize;
use serde_json::json;

use super::Api;
use super::extract::{Json, Path, Query};
use super::{ApiError, Caller};

pub async fn triggers(State(stack): State<Api>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let rules = stack.rules.read().map(|r| r.clone()).unwrap_or_default();
    let mine: Vec<_> = rules
        .iter()
        .filter(|r| r.project == caller.project())
        .collect();
    Ok(axum::Json(json!({ "triggers": mine })).into_response())
}

/// The most seconds of notice the spot simulator gives on request (a day).
const MAX_NOTICE_SECS: f64 = 86_400.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
    scopes: Vec<String>,
    /// The project the token is for; the caller's own when absent.
    #[serde(default)]
    project: Option<String>,
}

/// Whether a token name is 1–64 letters, digits, `.`, `_` or `-`.
fn valid_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// The project whose tokens the caller may manage: `wanted`, if the caller may.
/// An admin manages its own project's tokens; only the stack owner (an admin of
/// `default`) manages other projects' too, so no project's admin can hand out
/// access to a project that is not theirs.
fn managed_project(caller: &Caller, wanted: Option<&str>) -> Result<String, ApiError> {
    caller.require(Scope::Admin)?;
    let Some(wanted) = wanted else {
        return Ok(caller.project().to_owned());
    };
    project::check_name(wanted).map_err(|m| ApiError::BadRequest(format!("project: {m}")))?;
    if wanted == caller.project() || caller.is_owner() {
        Ok(wanted.to_owned())
    } else {
        Err(ApiError::Forbidden(format!(
            "an admin of project {} manages only its own tokens; tokens of project {wanted} come from the stack owner (an admin of the default project)",
            caller.project()
        )))
    }
}

pub async fn create_token(
    State(stack): State<Api>,
    caller: Caller,
    Json(body): Json<NewToken>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    if let Some(why) = &stack.others_refused {
        return Err(ApiError::Forbidden(why.clone()));
    }
    let project = managed_project(&caller, body.project.as_deref())?;
    let scopes = body
        .scopes
        .iter()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::BadRequest)?;
    if scopes.is_empty() {
        return Err(ApiError::BadRequest(
            "a token needs at least one scope".into(),
        ));
    }
    if !valid_token_name(&body.name) {
        return Err(ApiError::BadRequest(format!(
            "a token's name is 1 to 64 letters, digits, `.`, `_` or `-`, got {:?}",
            body.name
        )));
    }
    let (record, secret) = tokens::mint(&body.name, &project, scopes, stack.ports.clock.now());
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFilter {
    /// One project's tokens; without it, the caller's project (the owner: every project).
    project: Option<String>,
}

pub async fn list_tokens(
    State(stack): State<Api>,
    caller: Caller,
    Query(filter): Query<TokenFilter>,
) -> Result<Response, ApiError> {
    let project = match filter.project.as_deref() {
        Some(p) => Some(managed_project(&caller, Some(p))?),
        None if caller.is_owner() => None,
        None => Some(managed_project(&caller, None)?),
    };
    let all = stack
        .tokens
        .list(project.as_deref())
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
    State(stack): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    // The owner may revoke any token; another admin only its project's. A token
    // of another project answers as unknown: its existence is not theirs to learn.
    let scope = (!caller.is_owner()).then(|| caller.project());
    let own = stack
        .tokens
        .list(scope)
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
#[serde(deny_unknown_fields)]
pub struct PreemptBody {
    /// A job id (its live VM), a VM id, or a node of a multi-node VM
    /// (`<vm>-n<rank>`).
    target: String,
    notice_secs: Option<f64>,
}

pub async fn preempt(
    State(stack): State<Api>,
    caller: Caller,
    Json(b): Json<PreemptBody>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    if let Some(why) = stack.operator.cannot_preempt() {
        return Err(ApiError::NotSupported(why));
    }
    let notice = match b.notice_secs {
        Some(s) if (0.0..=MAX_NOTICE_SECS).contains(&s) => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(ApiError::BadRequest(format!(
                "notice_secs must be 0 to {MAX_NOTICE_SECS}, got {s}"
            )));
        }
        None => None,
    };
    let vm = stack
        .operator
        .running()
        .await?
        .into_iter()
        .find(|v| v.has_node(&b.target) || v.key.job.as_str() == b.target);
    let not_found = || ApiError::NotFound(format!("no running VM for {:?}", b.target));
    let vm = vm.ok_or_else(not_found)?;
    let job = stack.ports.ledger.get(&vm.key.job).await?;
    if job.project != caller.project() {
        return Err(not_found());
    }
    // A node's own name, so that the notice says which node the cloud reclaims
    // (the whole gang goes either way).
    let target = if vm.has_node(&b.target) {
        &b.target
    } else {
        &vm.id
    };
    match stack.operator.preempt(target, notice).await? {
        Some(vm) => Ok(axum::Json(json!({ "vm": vm })).into_response()),
        None => Err(ApiError::NotFound(format!(
            "{} already has a preemption notice",
            vm.id
        ))),
    }
}

pub async fn vms(State(stack): State<Api>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let mut mine = Vec::new();
    for vm in stack.operator.running().await? {
        if let Ok(job) = stack.ports.ledger.get(&vm.key.job).await
            && job.project == caller.project()
        {
            mine.push(vm);
        }
    }
    Ok(axum::Json(mine).into_response())
}

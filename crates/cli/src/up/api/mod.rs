//! The HTTP API: `app(stack) -> Router`, served by `respawn up` (and, with the same
//! router, by `lambda_http` in the cloud). Every `/v1` route but the signed webhooks
//! needs a bearer token; a token sees only its project.

mod admin;
mod agent;
mod arrays;
mod auth;
mod error;
mod extract;
mod hooks;
mod jobs;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_access;
#[cfg(test)]
mod tests_isolation;

use axum::Router;
use axum::routing::{delete, get, post};

pub use auth::{Caller, admin_token_path, ensure_admin_token};
pub use error::ApiError;
pub use jobs::Summary;

use super::Stack;

/// Every route, as the OpenAPI document lists it: (method, path).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/jobs/{id}/logs"),
    ("POST", "/v1/arrays"),
    ("GET", "/v1/arrays/{id}"),
    ("GET", "/v1/triggers"),
    ("GET", "/v1/hooks"),
    ("POST", "/v1/hooks/{name}"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{id}"),
    ("POST", "/v1/preempt"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/agent/events"),
    ("GET", "/v1/agent/secrets"),
];

pub fn app(stack: Stack) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::show))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/logs", get(jobs::logs))
        .route("/v1/arrays", post(arrays::submit))
        .route("/v1/arrays/{id}", get(arrays::progress))
        .route("/v1/triggers", get(admin::triggers))
        .route("/v1/hooks", get(hooks::list))
        .route("/v1/hooks/{name}", post(hooks::receive))
        .route(
            "/v1/tokens",
            post(admin::create_token).get(admin::list_tokens),
        )
        .route("/v1/tokens/{id}", delete(admin::revoke_token))
        .route("/v1/preempt", post(admin::preempt))
        .route("/v1/vms", get(admin::vms))
        .route("/v1/agent/events", post(agent::report))
        .route("/v1/agent/secrets", get(agent::secrets))
        // Every answer is JSON, the router's own 404 and 405 included (axum adds
        // the Allow header to the 405).
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound("no such route; see schemas/openapi.json".into()) })
        .with_state(stack)
}

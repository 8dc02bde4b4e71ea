//! Errors as API clients see them: what went wrong, never how the server is built.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use respawn_core::handlers;
use respawn_core::ports::{compute, ledger};
use respawn_core::spec::SpecError;
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Invalid(SpecError),
    Unauthorized(String),
    Forbidden(String),
    /// A valid spec that reaches outside what the caller may touch: 403, with paths.
    Denied(SpecError),
    NotFound(String),
    /// The route exists, not with this method.
    MethodNotAllowed,
    /// One of axum's extractors refused the request (bad JSON, query, path, size or
    /// content type); its status and message, in the API's JSON shape.
    Rejected(StatusCode, String),
    /// A passing failure: the caller should retry.
    Unavailable(String),
    /// This host cannot do it (e.g. simulate a preemption on a cloud's VMs).
    NotSupported(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({ "error": m })),
            ApiError::Invalid(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "error": "invalid job spec", "errors": field_errors(&e) }),
            ),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, json!({ "error": m })),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, json!({ "error": m })),
            ApiError::Denied(e) => (
                StatusCode::FORBIDDEN,
                json!({
                    "error": "the spec reaches outside what this token's project may use",
                    "errors": field_errors(&e),
                }),
            ),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!({ "error": m })),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": "method not allowed; the Allow header lists this route's methods" }),
            ),
            ApiError::Rejected(status, m) => (status, json!({ "error": m })),
            ApiError::NotSupported(m) => (StatusCode::NOT_IMPLEMENTED, json!({ "error": m })),
            ApiError::Unavailable(m) => {
                tracing::warn!(error = %m, "request failed; the caller may retry");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": "temporarily unavailable; retry" }),
                )
            }
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

fn field_errors(e: &SpecError) -> Vec<serde_json::Value> {
    e.errors
        .iter()
        .map(|f| json!({"path": f.path, "message": f.message}))
        .collect()
}

impl From<handlers::Error> for ApiError {
    fn from(e: handlers::Error) -> Self {
        match e {
            handlers::Error::Ledger(ledger::Error::NotFound { id }) => {
                ApiError::NotFound(format!("no job {id}"))
            }
            handlers::Error::Spec(s) => ApiError::Invalid(s),
            handlers::Error::Denied(s) => ApiError::Denied(s),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<compute::Error> for ApiError {
    fn from(e: compute::Error) -> Self {
        match e {
            compute::Error::NotSupported(m) => ApiError::NotSupported(m),
            e @ compute::Error::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ledger::Error> for ApiError {
    fn from(e: ledger::Error) -> Self {
        handlers::Error::from(e).into()
    }
}

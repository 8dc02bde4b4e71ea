//! Errors as API clients see them: what went wrong, never how the server is built.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use respawn_core::handlers;
use respawn_core::ports::ledger;
use respawn_core::spec::SpecError;
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Invalid(SpecError),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    /// A passing failure: the caller should retry.
    Unavailable(String),
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
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, json!({ "error": m })),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, json!({ "error": m })),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!({ "error": m })),
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

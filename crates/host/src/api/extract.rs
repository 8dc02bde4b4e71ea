//! axum's extractors, with every rejection answered as the API's JSON error
//! (`{"error": …}`) under the status axum chose (400, 413, 415 or 422), so that no
//! answer of the API is plain text.

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use respawn_core::spec::Format;
use serde::de::DeserializeOwned;

use super::ApiError;

/// A JSON body (`Content-Type: application/json`).
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(e) => Err(rejected(&e)),
        }
    }
}

/// The query string.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(rejected(&e)),
        }
    }
}

/// Path parameters.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(rejected(&e)),
        }
    }
}

/// The body as sent, for signatures over its exact bytes.
#[derive(Debug)]
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|e: BytesRejection| rejected(&e))
    }
}

/// A spec-like body, JSON or YAML: the format follows `Content-Type` when it names
/// one, else the text itself (JSON when it starts with `{`), so that a plain
/// `curl --data-binary @job.yaml` works too.
#[derive(Debug)]
pub struct SpecText {
    pub text: String,
    pub format: Format,
}

impl<S: Send + Sync> FromRequest<S> for SpecText {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(declared_format);
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| rejected(&e))?;
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|e| ApiError::BadRequest(format!("the body is not UTF-8 text: {e}")))?;
        let format = declared.unwrap_or_else(|| Format::sniff(&text));
        Ok(SpecText { text, format })
    }
}

fn declared_format(content_type: &str) -> Option<Format> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Some(Format::Json),
        e if e.ends_with("+json") => Some(Format::Json),
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => {
            Some(Format::Yaml)
        }
        _ => None,
    }
}

/// The JSON error for one of axum's rejections, under its status.
fn rejected(e: &impl RejectionText) -> ApiError {
    ApiError::Rejected(e.status(), e.body_text())
}

trait RejectionText {
    fn status(&self) -> axum::http::StatusCode;
    fn body_text(&self) -> String;
}

macro_rules! rejection_text {
    ($($t:ty),*) => {$(
        impl RejectionText for $t {
            fn status(&self) -> axum::http::StatusCode {
                <$t>::status(self)
            }
            fn body_text(&self) -> String {
                <$t>::body_text(self)
            }
        }
    )*};
}

rejection_text!(JsonRejection, QueryRejection, PathRejection, BytesRejection);

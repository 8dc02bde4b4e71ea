//! The HTTP API: `app(api) -> Router`, served by `respawn up` on a socket and by
//! the `api` function under `lambda_http`. Every `/v1` route but the signed
//! webhooks needs a bearer token; a token sees only its project.

mod admin;
mod agent;
mod arrays;
mod auth;
mod error;
mod extract;
mod hooks;
mod jobs;
mod observe;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::routing::{delete, get, post};
use respawn_core::attempt_auth::AttemptKey;
use respawn_core::ports::compute::{self, Vm};
use respawn_core::ports::{Ports, Tokens};
use respawn_core::trigger::TriggerRule;
use respawn_core::webhook::Hook;

pub use auth::{Caller, mint_first_admin};
pub use error::ApiError;
pub use jobs::{DEFAULT_LOG_BYTES, MAX_LOG_BYTES, Summary};
pub use observe::Status;

/// What the API serves from: the ports, and what the host configured around them.
#[derive(Debug, Clone)]
pub struct Api {
    pub ports: Ports,
    pub tokens: Arc<dyn Tokens>,
    pub hooks: Arc<Vec<Hook>>,
    pub rules: Arc<RwLock<Vec<TriggerRule>>>,
    /// Checks the credentials agents report with.
    pub attempt_key: AttemptKey,
    pub operator: Arc<dyn Operator>,
    /// Why this host refuses tokens for other projects, when it does (workloads
    /// that could read the broker's files).
    pub others_refused: Option<String>,
    /// What this host counts (`GET /metrics`, `GET /v1/status`), when it does.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// The operator's view of the VMs: what runs now, and preemptions on demand (the
/// local provider simulates them; a cloud's VMs cannot be preempted at will).
#[async_trait]
pub trait Operator: Send + Sync + std::fmt::Debug {
    async fn running(&self) -> Result<Vec<Vm>, compute::Error>;
    /// Why this operator cannot preempt on demand, when it cannot.
    fn cannot_preempt(&self) -> Option<String> {
        None
    }
    /// Gives the VM a preemption notice; its id, or `None` when it has one already.
    async fn preempt(
        &self,
        vm: &str,
        notice: Option<Duration>,
    ) -> Result<Option<String>, compute::Error>;
}

/// The operator of a cloud's compute: the running VMs as the provider lists them,
/// and no preemption on demand.
#[derive(Debug)]
pub struct ListedVms(pub Arc<dyn respawn_core::ports::Compute>);

#[async_trait]
impl Operator for ListedVms {
    async fn running(&self) -> Result<Vec<Vm>, compute::Error> {
        let mut vms = self.0.list().await?;
        vms.retain(|v| v.state != compute::VmState::Terminated);
        Ok(vms)
    }

    fn cannot_preempt(&self) -> Option<String> {
        Some(
            "preemption on demand is the local stack's simulator; a cloud's VMs are \
             preempted by the cloud"
                .into(),
        )
    }

    async fn preempt(
        &self,
        _: &str,
        _: Option<Duration>,
    ) -> Result<Option<String>, compute::Error> {
        Err(compute::Error::NotSupported(
            "preemption on demand (only the local provider simulates it)".into(),
        ))
    }
}

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
    ("GET", "/v1/agent/spec"),
    ("GET", "/v1/agent/secrets"),
    ("GET", "/v1/agent/assignment"),
    ("GET", "/v1/agent/gang"),
    ("GET", "/v1/status"),
    ("GET", "/metrics"),
];

pub fn app(api: Api) -> Router {
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
        .route("/v1/agent/spec", get(agent::spec))
        .route("/v1/agent/secrets", get(agent::secrets))
        .route("/v1/agent/assignment", get(agent::assignment))
        .route("/v1/agent/gang", get(agent::gang))
        .route("/v1/status", get(observe::status))
        .route("/metrics", get(observe::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            observe::track,
        ))
        // Every answer is JSON, the router's own 404 and 405 included (axum adds
        // the Allow header to the 405).
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound("no such route; see schemas/openapi.json".into()) })
        .with_state(api)
}

/// On a broker without tokens, mints the admin token of the default project and
/// leaves its secret at `admin-token` in `state` (the broker's own store), for the
/// operator. Of two hosts starting at once, the one whose secret is written first
/// wins; the other revokes its token.
pub async fn leave_first_admin(
    api: &Api,
    state: &respawn_core::ports::Blobs,
) -> Result<(), String> {
    let Some(secret) = mint_first_admin(api).await? else {
        return Ok(());
    };
    let path = object_store::path::Path::from("admin-token");
    let put = state
        .put_opts(
            &path,
            format!("{secret}\n").into(),
            object_store::PutMode::Create.into(),
        )
        .await;
    match put {
        Ok(_) => {
            tracing::info!("admin token written to the state store (admin-token)");
            Ok(())
        }
        Err(object_store::Error::AlreadyExists { .. }) => {
            let hash = respawn_core::ports::tokens::hash_secret(&secret);
            if let Ok(Some(mine)) = api.tokens.find_by_hash(&hash).await {
                let _ = api.tokens.revoke(&mine.id).await;
            }
            Ok(())
        }
        Err(e) => Err(format!("cannot write the admin token: {e}")),
    }
}

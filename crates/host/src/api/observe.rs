//! What the broker counts: `GET /metrics` (Prometheus text) and `GET /v1/status`
//! (one screen for `respawn status`). Both show every project's jobs, so both are
//! for the operator: an admin token of the default project.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use respawn_core::ports::tokens::Scope;
use serde::Serialize;
use tracing::Instrument;

use super::{Api, ApiError, Caller};
use crate::metrics::{Metrics, Preemption, QueueStatus};

fn operator<'a>(api: &'a Api, caller: &Caller) -> Result<&'a Metrics, ApiError> {
    caller.require(Scope::Admin)?;
    if caller.project() != respawn_core::project::DEFAULT {
        return Err(ApiError::Forbidden(format!(
            "the broker's metrics cover every project: an admin token of project {} is needed",
            respawn_core::project::DEFAULT
        )));
    }
    api.metrics.as_deref().filter(|m| m.served()).ok_or_else(|| {
        ApiError::NotSupported(
            "this host's metrics go out over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT), each function instance sending what it counted; respawn up serves them here"
                .into(),
        )
    })
}

pub async fn metrics(State(api): State<Api>, caller: Caller) -> Result<Response, ApiError> {
    let m = operator(&api, &caller)?;
    m.sample_queues(&api.ports).await;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response())
}

/// `respawn status`'s screen.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_s: u64,
    /// The broker's queues and their dead-letter queues.
    pub queues: Vec<QueueStatus>,
    /// Jobs by state, every project.
    pub jobs: BTreeMap<String, i64>,
    /// VMs by state.
    pub vms: BTreeMap<String, usize>,
    /// The last preemptions, newest last, with the work each lost.
    pub preemptions: Vec<Preemption>,
    pub gpu_hours_spot: f64,
    pub gpu_hours_on_demand: f64,
    /// Estimated from `RESPAWN_PRICES`.
    pub spot_saving_dollars: f64,
}

pub async fn status(State(api): State<Api>, caller: Caller) -> Result<Response, ApiError> {
    let m = operator(&api, &caller)?;
    let mut vms = BTreeMap::new();
    for vm in api.operator.running().await? {
        *vms.entry(format!("{:?}", vm.state).to_lowercase())
            .or_insert(0) += 1;
    }
    let (spot, on_demand, saving) = m.spend();
    Ok(axum::Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: m.uptime().as_secs(),
        queues: m.sample_queues(&api.ports).await,
        jobs: m.jobs_by_state(),
        vms,
        preemptions: m.recent_preemptions(),
        gpu_hours_spot: spot,
        gpu_hours_on_demand: on_demand,
        spot_saving_dollars: saving,
    })
    .into_response())
}

/// Times every request to a route, by its pattern (never the path itself: ids
/// would make the label set unbounded).
/// Each in a span of its own, the child of the caller's (`traceparent`: an
/// agent's attempt, or a client's own trace).
pub async fn track(State(api): State<Api>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let carried: std::collections::BTreeMap<String, String> = [
        respawn_telemetry::TRACEPARENT,
        respawn_telemetry::TRACESTATE,
    ]
    .into_iter()
    .filter_map(|h| {
        let v = req.headers().get(h)?.to_str().ok()?;
        Some((h.to_owned(), v.to_owned()))
    })
    .collect();
    respawn_telemetry::adopt(&span, &carried);
    let began = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    if let Some(m) = &api.metrics {
        m.request(&method, &route, status, began.elapsed());
    }
    resp
}

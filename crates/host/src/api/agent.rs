//! The agents' channel: reports and secrets, each for the caller's own attempt.
//!
//! An agent's credential names one job and one attempt (see
//! [`respawn_core::attempt_auth`]); a report on anything else is refused and logged,
//! so a workload that steals its agent's credential can at worst speak for its own
//! attempt. Accepted reports go onto the events queue, where the broker's events
//! loop (or function) applies them like any other.

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use respawn_core::attempt_auth::AttemptRef;
use respawn_core::lifecycle::Event;
use respawn_core::messages::Message;
use respawn_core::pool::PoolOrders;
use respawn_core::ports::compute::Orders;
use respawn_core::ports::queue::Outgoing;
use serde::Deserialize;
use serde_json::json;
use tracing::warn;

use super::Api;
use super::ApiError;
use super::extract::Query;

/// An agent, by the attempt its credential names.
#[derive(Debug, Clone)]
pub struct Agent(AttemptRef);

impl FromRequestParts<Api> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, stack: &Api) -> Result<Self, Self::Rejection> {
        let credential = super::auth::bearer(parts, "agent credential")?;
        stack
            .attempt_key
            .verify(credential)
            .map(Agent)
            .ok_or_else(|| ApiError::Unauthorized("invalid agent credential".into()))
    }
}

/// A cloud pool VM, by the name its VM credential names.
#[derive(Debug, Clone)]
pub struct PoolVm(String);

impl FromRequestParts<Api> for PoolVm {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, stack: &Api) -> Result<Self, Self::Rejection> {
        let credential = super::auth::bearer(parts, "pool VM credential")?;
        stack
            .attempt_key
            .verify_vm(credential)
            .map(PoolVm)
            .ok_or_else(|| ApiError::Unauthorized("invalid pool VM credential".into()))
    }
}

/// A pool VM's orders. The attempt's credential goes out only while the attempt is
/// the job's live one: a VM that asks before the allocation is recorded, or after
/// the attempt ended, is told to wait.
pub async fn assignment(
    State(stack): State<Api>,
    PoolVm(vm): PoolVm,
) -> Result<Response, ApiError> {
    let orders = stack
        .ports
        .compute
        .orders(&vm)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot read the pool's state: {e}")))?;
    let answer = match orders {
        Orders::Run(key) => {
            let live = match stack.ports.ledger.get(&key.job).await {
                Ok(rec) => rec.attempt == key.attempt && rec.state.has_live_attempt(),
                Err(respawn_core::ports::ledger::Error::NotFound { .. }) => false,
                Err(e) => return Err(e.into()),
            };
            if live {
                PoolOrders::Run {
                    token: stack.attempt_key.credential(&key.job, key.attempt),
                    job: key.job,
                    attempt: key.attempt,
                }
            } else {
                PoolOrders::Wait
            }
        }
        Orders::Wait => PoolOrders::Wait,
        Orders::Retire => PoolOrders::Retire,
    };
    Ok(axum::Json(answer).into_response())
}

/// What agents may report; the rest (allocation, termination, cancel, ticks) is
/// the broker's own word.
fn agents_may_report(event: &Event) -> bool {
    matches!(
        event,
        Event::Heartbeat { .. }
            | Event::StartFailed { .. }
            | Event::NodeReady { .. }
            | Event::WorkloadStarted { .. }
            | Event::CheckpointCommitted { .. }
            | Event::PreemptionNotice { .. }
            | Event::WorkloadExited { .. }
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Report {
    event: Event,
}

pub async fn report(
    State(stack): State<Api>,
    Agent(me): Agent,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Report { event } = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"event\": …}}: {e}")))?;
    if !agents_may_report(&event) {
        warn!(job_id = %me.job, attempt = me.attempt, event = event.kind(), "refused an agent report: not an agent's event");
        return Err(ApiError::Forbidden(format!(
            "agents do not report {} events",
            event.kind()
        )));
    }
    if event.attempt() != Some(me.attempt) {
        warn!(job_id = %me.job, attempt = me.attempt, reported_attempt = ?event.attempt(), "refused an agent report on another attempt");
        return Err(ApiError::Forbidden(format!(
            "this credential reports on attempt {} of job {} only",
            me.attempt, me.job
        )));
    }
    let msg = Message::Event {
        job: me.job.clone(),
        // The broker's clock, not the VM's: a report is dated when it arrives.
        at: stack.ports.clock.now(),
        event,
    };
    stack
        .ports
        .queue
        .send(
            &stack.ports.queues.events,
            Outgoing::new(msg.to_bytes()).priority(9),
        )
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot queue a report: {e}")))?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "accepted": true })),
    )
        .into_response())
}

/// The caller's job record, while its attempt is the job's live one.
async fn live_record(
    stack: &Api,
    me: &AttemptRef,
    what: &str,
) -> Result<respawn_core::job::JobRecord, ApiError> {
    let not_live = || {
        warn!(job_id = %me.job, attempt = me.attempt, what, "refused an attempt that is not live");
        ApiError::Forbidden(format!(
            "attempt {} of job {} is not live",
            me.attempt, me.job
        ))
    };
    let rec = match stack.ports.ledger.get(&me.job).await {
        Ok(rec) => rec,
        Err(respawn_core::ports::ledger::Error::NotFound { .. }) => return Err(not_live()),
        Err(e) => return Err(e.into()),
    };
    if rec.attempt != me.attempt || !rec.state.has_live_attempt() {
        return Err(not_live());
    }
    Ok(rec)
}

/// The job's spec (secret values are not in it), from the ledger: agents need no
/// copy of it staged anywhere.
pub async fn spec(State(stack): State<Api>, Agent(me): Agent) -> Result<Response, ApiError> {
    let rec = live_record(&stack, &me, "spec").await?;
    // The job's trace, which the attempt's spans continue.
    Ok(axum::Json(json!({ "spec": rec.spec, "trace": rec.trace })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GangQuery {
    /// Whether to list the nodes' addresses.
    #[serde(default)]
    peers: bool,
}

/// What every node of a multi-node attempt asks while it runs: its peers'
/// addresses (once the provider knows them all) and the notice, if any node of the
/// gang has been given one — a notice to one node stops them all, with one grace.
pub async fn gang(
    State(stack): State<Api>,
    Agent(me): Agent,
    Query(q): Query<GangQuery>,
) -> Result<Response, ApiError> {
    let rec = live_record(&stack, &me, "gang").await?;
    let key = respawn_core::ports::compute::AllocationKey {
        job: me.job.clone(),
        attempt: me.attempt,
    };
    // Asked only while a node waits for its peers: on a cloud the addresses cost
    // a provider call per node, and every node asks for notices every second.
    let hosts = if q.peers {
        stack
            .ports
            .compute
            .roster(&key)
            .await
            .map_err(|e| ApiError::Unavailable(format!("cannot read the gang's nodes: {e}")))?
    } else {
        None
    };
    let deadline = rec.current().and_then(|a| a.preempt_deadline);
    Ok(axum::Json(json!({
        "nodes": rec.spec.resources.nodes,
        "hosts": hosts,
        "notice_deadline_ms": deadline.map(|d| d.0),
    }))
    .into_response())
}

pub async fn secrets(State(stack): State<Api>, Agent(me): Agent) -> Result<Response, ApiError> {
    live_record(&stack, &me, "secrets").await?;
    let values = stack
        .ports
        .secrets
        .get(&me.job)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot read secrets: {e}")))?;
    Ok(axum::Json(json!({ "secrets": values })).into_response())
}

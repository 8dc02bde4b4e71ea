//! Webhook delivered: a signed request to a hook becomes (at most) one job.

use tracing::{info, warn};

use super::Error;
use super::submit::{Submission, submit};
use crate::job::JobId;
use crate::ports::{Ports, Retryable};
use crate::spec::SpecError;
use crate::webhook::github::GithubEvent;
use crate::webhook::{Hook, HookKind, HookRequest, HookVars};

/// Longest delivery id taken; it goes into the job's idempotency key, which has
/// room for 255 characters with the hook's name.
const MAX_DELIVERY_ID: usize = 128;

/// What a delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// A GitHub `ping`: answered, no job.
    Pong,
    /// A delivery the hook does not act on (another event, another branch, a
    /// release not yet published), and why.
    Ignored(String),
    /// The job the delivery made.
    Submitted(JobId),
}

/// Why a delivery was refused. Messages carry no secret material.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The signature does not check out, or the delivery was already taken (a
    /// replay). Nothing was done.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Signed, but not a delivery the hook can read (a missing event header, a
    /// body missing the event's fields).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The hook's template cannot make a valid job from this delivery.
    #[error("the hook's template makes no valid job from this delivery:\n{0}")]
    BadTemplate(SpecError),
    /// The ledger, queue or store failed; the sender may retry.
    #[error(transparent)]
    Failed(Error),
}

impl Retryable for HookError {
    fn is_retryable(&self) -> bool {
        match self {
            HookError::Failed(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl From<Error> for HookError {
    fn from(e: Error) -> Self {
        match e {
            // Submission refused the rendered spec: the template's doing.
            Error::Spec(e) | Error::Denied(e) => HookError::BadTemplate(e),
            e => HookError::Failed(e),
        }
    }
}

/// Handles one delivery to `hook`. The signature is checked first and a failure
/// does nothing else. Then a GitHub `ping` is answered, events the hook does not
/// take are ignored, and any other delivery renders the template and submits the
/// job with the idempotency key `hook:<name>:<delivery id>` (`webhook-id` or
/// `X-GitHub-Delivery`). A delivery id that already made a job is a replay and is
/// refused, which also holds for two copies racing each other. GitHub does not
/// sign `X-GitHub-Delivery`, so for GitHub hooks this stops redeliveries but not
/// a replayer who changes the id. No network call is made besides the ports'.
pub async fn webhook(
    ports: &Ports,
    hook: &Hook,
    request: &HookRequest,
    now_unix_secs: i64,
) -> Result<HookOutcome, HookError> {
    if let Err(e) = hook.verify(request, now_unix_secs) {
        warn!(hook = %hook.name, reason = %e, "webhook delivery refused");
        return Err(HookError::Unauthorized(e.to_string()));
    }
    let (vars, delivery) = match hook.kind {
        HookKind::Github => {
            let event_name = header(&request.github_event, "X-GitHub-Event")?;
            let event = GithubEvent::parse(event_name, &request.body)
                .map_err(|e| HookError::BadRequest(e.to_string()))?;
            if let GithubEvent::Ping { .. } = event {
                info!(hook = %hook.name, "webhook ping");
                return Ok(HookOutcome::Pong);
            }
            if let Err(reason) = hook.accepts(&event) {
                info!(hook = %hook.name, %reason, "webhook delivery ignored");
                return Ok(HookOutcome::Ignored(reason));
            }
            let delivery = delivery_id(&request.github_delivery, "X-GitHub-Delivery")?;
            (HookVars::github(&hook.name, delivery, &event), delivery)
        }
        HookKind::Standard => {
            let delivery = delivery_id(&request.webhook_id, "webhook-id")?;
            let vars = HookVars::standard(&hook.name, delivery, &request.body);
            (vars, delivery)
        }
    };
    let key = hook.idempotency_key(delivery);
    let found = ports
        .ledger
        .find_by_idempotency_key(&hook.project, &key)
        .await
        .map_err(Error::from)?;
    if let Some(job) = found {
        return Err(replayed(hook, delivery, &job));
    }
    let spec = hook
        .render(&vars, delivery)
        .map_err(HookError::BadTemplate)?;
    let sub = submit(
        ports,
        Submission {
            spec,
            project: hook.project.clone(),
            reply_to: None,
            // The template is the operator's; a delivery fills only its placeholders.
            local_files: true,
        },
    )
    .await?;
    if !sub.created {
        // Another copy of this delivery got there between the lookup and the create.
        return Err(replayed(hook, delivery, &sub.job.id));
    }
    info!(hook = %hook.name, delivery = ?delivery, job_id = %sub.job.id, "webhook made a job");
    Ok(HookOutcome::Submitted(sub.job.id))
}

fn replayed(hook: &Hook, delivery: &str, job: &JobId) -> HookError {
    warn!(hook = %hook.name, delivery = ?delivery, job_id = %job, "webhook delivery replayed");
    HookError::Unauthorized(format!(
        "replayed delivery {delivery:?}: it already made job {job}"
    ))
}

fn header<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, HookError> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| HookError::BadRequest(format!("missing {name} header")))
}

/// The delivery id, fit to go into an idempotency key and a log line.
fn delivery_id<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, HookError> {
    let id = header(value, name)?;
    if id.len() > MAX_DELIVERY_ID || id.chars().any(char::is_control) {
        return Err(HookError::BadRequest(format!(
            "{name} must be 1 to {MAX_DELIVERY_ID} characters without control characters"
        )));
    }
    Ok(id)
}

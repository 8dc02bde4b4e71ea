//! The submit queue: job submissions by message. Each message is read as a
//! [`respawn_core::intake::SubmitMessage`]; the job is made durable, then the message
//! acknowledged. Bad messages go to the dead-letter queue with the reason, and a
//! submitter who gave `reply_to` hears `accepted` (then every state change) or
//! `rejected` with the reasons.

use std::sync::Arc;
use std::time::Duration;

use respawn_core::handlers::{self, Submitted};
use respawn_core::intake::{self, Rejection, Templates};
use respawn_core::job::ReplyTo;
use respawn_core::ports::queue::{Delivery, Receive};
use respawn_core::ports::{Ports, Retryable};
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, info, warn};

use crate::replies::Replies;

/// Messages handled at once: each waits for a group commit, so many in flight is
/// what makes the store's batching pay.
const IN_FLIGHT: usize = 256;

pub async fn run(
    ports: Ports,
    templates: Arc<Templates>,
    replies: Replies,
    stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let opts = Receive {
        max: 128,
        lease: Duration::from_secs(60),
        wait: Duration::from_millis(500),
    };
    while !*stop.borrow() {
        let got = match ports.queue.receive(&ports.queues.submit, opts).await {
            Ok(got) => got,
            Err(e) => {
                warn!(error = %e, "cannot read the submit queue");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for d in got {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (ports, templates, replies) = (ports.clone(), templates.clone(), replies.clone());
            tokio::spawn(async move {
                handle(&ports, &templates, &replies, &d).await;
                drop(permit);
            });
        }
    }
}

/// Handles a batch from the submit queue side by side and settles each message;
/// returns when all are done.
pub async fn handle_all(
    ports: &Ports,
    templates: &Arc<Templates>,
    replies: &Replies,
    got: Vec<Delivery>,
) {
    let mut all = tokio::task::JoinSet::new();
    for d in got {
        let (ports, templates, replies) = (ports.clone(), templates.clone(), replies.clone());
        let span = crate::traced::consuming(ports.queue.system(), &d);
        all.spawn(async move { handle(&ports, &templates, &replies, &d).await }.instrument(span));
    }
    while all.join_next().await.is_some() {}
}

fn reply_to(d: &Delivery) -> Option<ReplyTo> {
    let queue = d.attributes.get("reply_to").filter(|q| !q.is_empty())?;
    Some(ReplyTo {
        queue: queue.clone(),
        correlation_id: d.attributes.get("correlation_id").cloned(),
    })
}

async fn handle(ports: &Ports, templates: &Templates, replies: &Replies, d: &Delivery) {
    let reply = reply_to(d);
    let message_id = d.attributes.get("message_id").map(String::as_str);
    let sub = match intake::read(&d.body, message_id, reply.clone(), templates) {
        Ok(sub) => sub,
        Err(rejection) => return reject(ports, replies, d, reply.as_ref(), &rejection).await,
    };
    match handlers::submit(ports, sub).await {
        Ok(Submitted { job, created }) => {
            // A new job's "accepted" comes from its first notification, in order
            // with the state changes; a redelivered message finds its job here.
            if let (Some(r), false) = (&reply, created) {
                let body = json!({ "type": "accepted", "job_id": job.id, "state": job.state, "created": false });
                replies.send(r, &body).await;
            }
            if let Err(e) = ports.queue.ack(d).await {
                warn!(job_id = %job.id, error = %e, "cannot ack a submission; it will come back and find its job");
            }
        }
        Err(e) if e.is_retryable() => {
            warn!(message_id = %d.id, error = %e, "submission failed; will retry");
            let _ = ports.queue.retry_later(d, Duration::from_secs(1)).await;
        }
        Err(respawn_core::handlers::Error::Spec(e)) => {
            reject(ports, replies, d, reply.as_ref(), &Rejection::Invalid(e)).await;
        }
        Err(respawn_core::handlers::Error::Denied(e)) => {
            reject(ports, replies, d, reply.as_ref(), &Rejection::Denied(e)).await;
        }
        Err(e) => {
            let reason = e.to_string();
            warn!(message_id = %d.id, %reason, "submission refused");
            let _ = ports.queue.dead_letter(d, &reason).await;
            if let Some(r) = &reply {
                replies
                    .send(r, &json!({ "type": "rejected", "reason": reason }))
                    .await;
            }
        }
    }
}

async fn reject(
    ports: &Ports,
    replies: &Replies,
    d: &Delivery,
    reply: Option<&ReplyTo>,
    why: &Rejection,
) {
    let reason = why.to_string();
    info!(message_id = %d.id, %reason, "submission rejected; dead-lettered");
    if let Err(e) = ports.queue.dead_letter(d, &reason).await {
        warn!(message_id = %d.id, error = %e, "cannot dead-letter a rejected submission");
    }
    if let Some(r) = reply {
        let errors: Vec<_> = why
            .errors()
            .iter()
            .map(|f| json!({ "path": f.path, "message": f.message }))
            .collect();
        replies
            .send(
                r,
                &json!({ "type": "rejected", "reason": reason, "errors": errors }),
            )
            .await;
    }
}

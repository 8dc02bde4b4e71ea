//! Routing a queue delivery to its handler and settling it: ack after the effect is
//! durable, retry later on a passing failure, dead-letter what can never succeed.

use std::time::Duration;

use tracing::{error, warn};

use super::Error;
use super::apply::job_event;
use crate::lifecycle::Event;
use crate::messages::Message;
use crate::ports::queue::{self, Delivery};
use crate::ports::{Ports, Retryable, ledger};

/// What to do with a delivery once its handler returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    RetryLater(Duration),
    DeadLetter(String),
}

/// Handles one delivery from the dispatch or events queue.
pub async fn handle_delivery(ports: &Ports, d: &Delivery) -> Disposition {
    let msg: Message = match serde_json::from_slice(&d.body) {
        Ok(m) => m,
        Err(e) => {
            warn!(queue = %d.queue, message_id = %d.id, error = %e, "malformed message");
            return Disposition::DeadLetter(format!("not a respawn message: {e}"));
        }
    };
    let result = match &msg {
        Message::Dispatch {
            job,
            attempt,
            waits,
        } => {
            let event = Event::Dispatch {
                attempt: *attempt,
                waits: *waits,
            };
            job_event(ports, job, &event, ports.clock.now()).await
        }
        Message::Event { job, at, event } => job_event(ports, job, event, *at).await,
    };
    match result {
        Ok(_) => Disposition::Ack,
        Err(Error::Ledger(ledger::Error::NotFound { id })) => {
            Disposition::DeadLetter(format!("job {id} does not exist"))
        }
        Err(e) if e.is_retryable() => {
            let delay = backoff(d.deliveries);
            warn!(job_id = %msg.job(), message_id = %d.id, deliveries = d.deliveries, error = %e, "will retry");
            Disposition::RetryLater(delay)
        }
        Err(e) => {
            error!(job_id = %msg.job(), message_id = %d.id, error = %e, "cannot handle message");
            Disposition::DeadLetter(e.to_string())
        }
    }
}

/// Exponential backoff from 1 s, capped at 5 minutes.
fn backoff(deliveries: u32) -> Duration {
    let shift = deliveries.saturating_sub(1).min(9);
    Duration::from_secs(1u64 << shift).min(Duration::from_secs(300))
}

/// Applies a disposition to the delivery on its queue.
pub async fn settle(
    queue: &dyn queue::Queue,
    d: &Delivery,
    disposition: &Disposition,
) -> Result<(), queue::Error> {
    match disposition {
        Disposition::Ack => queue.ack(d).await,
        Disposition::RetryLater(delay) => queue.retry_later(d, *delay).await,
        Disposition::DeadLetter(reason) => queue.dead_letter(d, reason).await,
    }
}

//! Replies to queue submitters (`reply_to` + `correlation_id`, on RabbitMQ or SQS).

use respawn_core::job::ReplyTo;
use serde_json::Value;
use tracing::debug;
#[cfg(any(feature = "amqp", feature = "aws"))]
use tracing::warn;

/// Where replies can go: nowhere without a queue server, else through it.
#[derive(Debug, Clone, Default)]
pub enum Replies {
    #[default]
    None,
    #[cfg(feature = "amqp")]
    Amqp(respawn_adapters::amqp::AmqpQueue),
    /// To the SQS queue (URL or name) the submitter named.
    #[cfg(feature = "aws")]
    Sqs(std::sync::Arc<respawn_adapters::sqs::SqsQueue>),
}

impl Replies {
    /// Sends `body` to the submitter; a reply that cannot be delivered is logged,
    /// never an error for the job (the submitter may be gone).
    pub async fn send(&self, to: &ReplyTo, body: &Value) {
        match self {
            Replies::None => {
                let _ = body;
                debug!(queue = %to.queue, "no queue server for replies")
            }
            #[cfg(feature = "amqp")]
            Replies::Amqp(q) => match q
                .reply(
                    &to.queue,
                    to.correlation_id.as_deref(),
                    body.to_string().as_bytes(),
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => debug!(queue = %to.queue, "reply queue is gone"),
                Err(e) => warn!(queue = %to.queue, error = %e, "cannot send a reply"),
            },
            #[cfg(feature = "aws")]
            Replies::Sqs(q) => match q
                .reply(
                    &to.queue,
                    to.correlation_id.as_deref(),
                    body.to_string().as_bytes(),
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => debug!(queue = %to.queue, "reply queue is gone"),
                Err(e) => warn!(queue = %to.queue, error = %e, "cannot send a reply"),
            },
        }
    }
}

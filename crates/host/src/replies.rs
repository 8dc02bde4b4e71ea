//! Replies to queue submitters (`reply_to` + `correlation_id`, on RabbitMQ, SQS or
//! Storage Queues).

use respawn_core::job::ReplyTo;
use serde_json::Value;
use tracing::debug;
#[cfg(any(feature = "amqp", feature = "aws", feature = "azure"))]
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
    /// To the Storage Queue (of the broker's account) the submitter named.
    #[cfg(feature = "azure")]
    Storage(std::sync::Arc<respawn_adapters::azqueue::StorageQueue>),
}

impl Replies {
    /// Sends `body` to the submitter; a reply that cannot be delivered is logged,
    /// never an error for the job (the submitter may be gone).
    pub async fn send(&self, to: &ReplyTo, body: &Value) {
        let text = body.to_string();
        let correlation = to.correlation_id.as_deref();
        match self {
            Replies::None => {
                let _ = (text, correlation);
                debug!(queue = %to.queue, "no queue server for replies")
            }
            #[cfg(feature = "amqp")]
            Replies::Amqp(q) => told(
                to,
                q.reply(&to.queue, correlation, text.as_bytes())
                    .await
                    .map_err(|e| e.to_string()),
            ),
            #[cfg(feature = "aws")]
            Replies::Sqs(q) => told(
                to,
                q.reply(&to.queue, correlation, text.as_bytes())
                    .await
                    .map_err(|e| e.to_string()),
            ),
            #[cfg(feature = "azure")]
            Replies::Storage(q) => told(
                to,
                q.reply(&to.queue, correlation, text.as_bytes())
                    .await
                    .map_err(|e| e.to_string()),
            ),
        }
    }
}

/// Logs what became of a reply: sent, its queue gone, or not sent.
#[cfg(any(feature = "amqp", feature = "aws", feature = "azure"))]
fn told(to: &ReplyTo, sent: Result<bool, String>) {
    match sent {
        Ok(true) => {}
        Ok(false) => debug!(queue = %to.queue, "reply queue is gone"),
        Err(e) => warn!(queue = %to.queue, error = %e, "cannot send a reply"),
    }
}

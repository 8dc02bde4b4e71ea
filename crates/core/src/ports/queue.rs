//! Message queues: at-least-once delivery with leases, priority and delay.
//!
//! # Contract
//!
//! - [`Queue::send`] returns once the message is durable. It becomes receivable
//!   after `delay`. Queues exist on first use.
//! - [`Queue::receive`] hands out up to `max` visible messages, highest priority
//!   first, oldest first within a priority, each under a lease of `lease`. A leased
//!   message is not handed out again until the lease ends; then it is redelivered
//!   with `deliveries` one higher. With `wait` > 0 it waits that long for a message
//!   when none is visible.
//! - [`Queue::ack`] removes the message for good. Acking, retrying or dead-lettering
//!   with a receipt that is no longer current (the message was handed out again, or
//!   already settled) returns [`Error::LeaseLost`] and changes nothing.
//! - [`Queue::retry_later`] ends the lease; the message is visible again after
//!   `delay`.
//! - [`Queue::dead_letter`] moves the message to the queue's dead-letter queue
//!   ([`dead_letter_queue`]) with a reason. A message received `max_deliveries`
//!   times (an adapter setting) without an ack is dead-lettered instead of being
//!   delivered again, with a reason that says so.
//! - Dead letters are read with `receive` on the dead-letter queue; each carries its
//!   reason.
//! - [`Queue::declare`] makes a queue exist before anything is sent or received
//!   (adapters whose queues always exist keep the default, which does nothing).
//! - [`Queue::depth`] says how many messages wait in a queue: those ready for
//!   delivery, and the leased and delayed ones too where the system counts them
//!   (RabbitMQ does not); an estimate on systems that only estimate (SQS, Azure
//!   Storage Queues). Where the system can tell, also how long the oldest has
//!   waited (zero when none does). `None` where it cannot say at all.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::Retryable;

/// What waits in a queue ([`Queue::depth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    /// Messages waiting: ready, and (where the system counts them) leased or
    /// delayed.
    pub messages: u64,
    /// How long the oldest of them has been in the queue, zero when none is;
    /// `None` where the system does not say (RabbitMQ, SQS) or cannot see one
    /// (Azure: all leased or delayed).
    pub oldest: Option<Duration>,
}

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Deliveries after which a message is dead-lettered, unless an adapter is told otherwise.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lease on message {id} ended; it may be with another receiver")]
    LeaseLost { id: String },
    #[error("invalid queue request: {0}")]
    Invalid(String),
    #[error("queue unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0} is not supported in this build")]
    NotSupported(String),
}

impl Error {
    pub fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Unavailable(Box::new(e))
    }
}

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub body: Bytes,
    /// Metadata that travels with the message (`message_id`, `reply_to`,
    /// `correlation_id` map to AMQP properties). Adapters keep them across retries.
    pub attributes: BTreeMap<String, String>,
    /// 0 (lowest) to 9 (highest).
    pub priority: u8,
    pub delay: Duration,
}

impl Outgoing {
    pub fn new(body: impl Into<Bytes>) -> Self {
        Outgoing {
            body: body.into(),
            attributes: BTreeMap::new(),
            priority: 0,
            delay: Duration::ZERO,
        }
    }

    pub fn priority(mut self, p: u8) -> Self {
        self.priority = p.min(9);
        self
    }

    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }
}

/// How to receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receive {
    pub max: usize,
    pub lease: Duration,
    pub wait: Duration,
}

impl Default for Receive {
    fn default() -> Self {
        Receive {
            max: 1,
            lease: Duration::from_secs(30),
            wait: Duration::ZERO,
        }
    }
}

/// A received message under lease.
#[derive(Clone, PartialEq, Eq)]
pub struct Delivery {
    pub queue: String,
    pub id: String,
    pub body: Bytes,
    pub priority: u8,
    /// 1 on first delivery.
    pub deliveries: u32,
    /// Proves the lease; adapters decide its form.
    pub receipt: String,
    /// Why it was dead-lettered (on dead-letter queues only).
    pub reason: Option<String>,
    /// As sent (see [`Outgoing::attributes`]); from other producers, what the
    /// adapter can read (AMQP `message_id`, `reply_to`, `correlation_id`).
    pub attributes: BTreeMap<String, String>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Bodies may hold specs with secrets in clear: keep them out of logs.
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("id", &self.id)
            .field("bytes", &self.body.len())
            .field("priority", &self.priority)
            .field("deliveries", &self.deliveries)
            .field("reason", &self.reason)
            .finish()
    }
}

#[async_trait]
pub trait Queue: Send + Sync + fmt::Debug {
    async fn send(&self, queue: &str, msg: Outgoing) -> Result<String, Error>;
    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, Error>;
    async fn ack(&self, delivery: &Delivery) -> Result<(), Error>;
    async fn retry_later(&self, delivery: &Delivery, delay: Duration) -> Result<(), Error>;
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), Error>;

    /// Makes `queue` (and its dead-letter queue) exist now, for queues that
    /// producers outside respawn publish to: on a broker that drops messages for
    /// queues that do not exist yet, the first receive would come too late.
    async fn declare(&self, _queue: &str) -> Result<(), Error> {
        Ok(())
    }

    /// What waits in `queue` now; `None` when this system cannot say.
    async fn depth(&self, _queue: &str) -> Result<Option<Depth>, Error> {
        Ok(None)
    }

    /// The messaging system, as OpenTelemetry's `messaging.system` names it.
    fn system(&self) -> &'static str {
        "respawn"
    }
}

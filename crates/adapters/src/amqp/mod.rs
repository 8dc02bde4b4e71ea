//! A [`Queue`] on RabbitMQ (AMQP 0-9-1), for brokers that run many agents.
//!
//! Each logical queue `Q` is a durable classic queue with `x-max-priority: 9`,
//! declared on first use; its dead letters go to the durable queue `Q.dead`.
//! Messages are persistent, and every publish waits for the broker's confirm (or, on
//! a consumer's channel, for the commit of its transaction).
//!
//! - **Delay**: a delayed message waits in `Q.delay.<ms>`, a queue whose
//!   `x-message-ttl` dead-letters it into `Q` when the delay is over. One queue per
//!   distinct delay (rounded up to two significant digits), because per-message TTLs
//!   only expire at the head of a queue; `x-expires` removes unused ones.
//! - **Leases**: messages are consumed (prefetch `AmqpOptions::prefetch` per queue)
//!   and held unacked while leased. The broker has no lease timeout, so a reaper task
//!   ends expired leases here: it republishes the message with its delivery count and
//!   then acks the original. Classic queues do not count deliveries, so the count
//!   travels in the `x-respawn-deliveries` header.
//! - **Transactions**: each consumer's channel runs in an AMQP transaction, so that a
//!   copy published back to the message's own queue and the ack of the original take
//!   effect together (expired leases, retries without delay, and the rewrites below).
//!   An ack returns once the broker committed it; commits are shared by the acks
//!   sent meanwhile.
//! - **Ids and redeliveries**: a message is handed out only if it carries a
//!   `message_id` and the broker did not flag it as redelivered. One without an id
//!   (from another client) is first rewritten with a new one, atomically, so it has
//!   exactly one id however often its connection is lost. One the broker redelivers
//!   was with a consumer whose connection or channel ended before it was acked (a
//!   crashed process, say): it is rewritten with that delivery added to its count, so
//!   a message that keeps killing its consumer reaches the dead-letter queue after
//!   `max_deliveries`. A rewritten message goes to the back of its queue.
//! - **Size**: a received message larger than `AmqpOptions::max_message_bytes` goes
//!   to the dead-letter queue with a reason naming its size. Over `amqp://` its body
//!   frames are dropped as they arrive, so it is never buffered (see `limit.rs`).
//! - **At least once**: every republish to another queue (a delay queue, the
//!   dead-letter queue) is confirmed before the original is acked; a crash in between
//!   duplicates a message but never loses one.
//! - **Connection loss**: the next operation reconnects (back-off 100 ms to 5 s).
//!   Leases taken on the old connection are lost (the broker requeues those
//!   messages, and they count one delivery more, as above; so do messages that were
//!   pushed ahead to this process and never handed out).
//!   [`AmqpQueue::close`] puts back what was prefetched but never handed out, so a
//!   clean shutdown does not count deliveries that never happened.
//! - **Ordering**: highest priority first, then oldest, among the messages the broker
//!   has pushed to this process; a queue shared by several processes is as ordered
//!   as RabbitMQ's round-robin over their consumers makes it.

mod consumer;
mod declare;
mod lease;
mod limit;
mod message;
mod session;
mod settle;
mod tx;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::QueueDeleteOptions;
use respawn_core::ports::queue::{
    DEFAULT_MAX_DELIVERIES, Delivery, Depth, Error, Outgoing, Queue, Receive,
};
use tokio::time::Instant;

use consumer::Waited;
use declare::declare_error;
use lease::Leases;
use session::Link;
use settle::Settle;

/// Settings of an [`AmqpQueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpOptions {
    /// Deliveries after which a message goes to its dead-letter queue.
    pub max_deliveries: u32,
    /// Unacked messages the broker pushes to each queue's consumer: leased ones count.
    pub prefetch: u16,
    /// Shown by the broker (`rabbitmqctl list_connections client_properties`).
    pub connection_name: String,
    /// A received message with a larger body goes to its dead-letter queue instead of
    /// being handed out, with a reason naming its size. Over `amqp://` its body is
    /// dropped as it arrives, never buffered (so the dead letter has an empty body);
    /// over `amqps://` it is checked once received.
    pub max_message_bytes: usize,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        AmqpOptions {
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            prefetch: 64,
            connection_name: "respawn".into(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// The RabbitMQ queue adapter. Clones share one connection.
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// For logs: the URL without its credentials.
    shown_url: String,
    options: AmqpOptions,
    link: Link,
    leases: Arc<Leases>,
    /// Queues declared so far, and when: declarations are idempotent, but one round
    /// trip per send would halve throughput.
    declared: Mutex<HashMap<String, Instant>>,
    declaring: tokio::sync::Mutex<()>,
}

/// The default for [`AmqpOptions::max_message_bytes`]: 1 MiB, the submit queue's
/// limit; the broker's own messages are far smaller.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = respawn_core::intake::MAX_MESSAGE_BYTES;

/// Consumers a single `receive` may reopen (a queue deleted under it, a dropped
/// channel) before it gives up.
const MAX_REOPENS: u32 = 3;

impl AmqpQueue {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`). One attempt: a broker
    /// that is down now is `Unavailable` now. Later operations reconnect by
    /// themselves. Must be called within a Tokio runtime (it starts the lease reaper).
    pub async fn connect(url: &str, options: AmqpOptions) -> Result<AmqpQueue, Error> {
        let options = AmqpOptions {
            max_deliveries: options.max_deliveries.max(1),
            prefetch: options.prefetch.max(1),
            ..options
        };
        let uri: lapin::uri::AMQPUri = url
            .parse()
            .map_err(|e| Error::Invalid(format!("{}: {e}", redact(url))))?;
        let max_bytes = u64::try_from(options.max_message_bytes).unwrap_or(u64::MAX);
        let link = Link::new(uri, &options.connection_name, max_bytes);
        link.connect_once().await?;
        let leases = Arc::new(Leases::default());
        let inner = Arc::new(Inner {
            shown_url: redact(url),
            options,
            link,
            leases: leases.clone(),
            declared: Mutex::new(HashMap::new()),
            declaring: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(lease::reaper(Arc::downgrade(&inner), leases));
        Ok(AmqpQueue { inner })
    }

    /// Whether the current connection is up (without reconnecting).
    pub fn is_connected(&self) -> bool {
        self.inner.link.healthy().is_some()
    }

    /// Messages handed out and not yet settled.
    pub fn leased(&self) -> usize {
        self.inner.leases.len()
    }

    /// Every broker queue this adapter declared (logical, dead-letter and delay
    /// queues), sorted.
    pub fn declared_queues(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.inner.declared).keys().cloned().collect();
        names.sort();
        names
    }

    /// Closes the connection, gracefully. Messages the broker pushed ahead
    /// (prefetch) but that were never handed out are first put back (republished with
    /// their count, then acked): left to the broker, they would come back flagged as
    /// redelivered and count a delivery that never happened. Leased messages go back
    /// to the broker with the connection and do count one. Using the queue after this
    /// reconnects; call it when done, not while other tasks still receive.
    pub async fn close(&self) {
        let Some(session) = self.inner.link.healthy() else {
            return;
        };
        for consumer in session.take_consumers() {
            let pushed = consumer.stop().await;
            let back = pushed.len();
            futures::future::join_all(pushed.into_iter().map(|p| {
                self.inner
                    .put_back(&consumer.queue, session.conn_no, &consumer, p)
            }))
            .await;
            tracing::info!(queue = %consumer.queue, put_back = back, "consumer stopped");
        }
        let _ = session.conn.close(200, "respawn: closed".into()).await;
    }

    /// Deletes a broker queue and the messages in it (for tests and clean-ups).
    /// Returns how many messages it held.
    pub async fn delete_queue(&self, queue: &str) -> Result<u32, Error> {
        let name = message::short(queue)?;
        let session = self.inner.link.session().await?;
        if let Some(c) = session.remove_consumer(queue) {
            c.cancel().await;
        }
        lock(&self.inner.declared).remove(queue);
        let channel = session.conn.create_channel().await.map_err(unavailable)?;
        let n = channel
            .queue_delete(name, QueueDeleteOptions::default())
            .await
            .map_err(unavailable)?;
        let _ = channel.close(200, "respawn: done".into()).await;
        Ok(n)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.leases.close();
    }
}

impl fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpQueue")
            .field("url", &self.inner.shown_url)
            .field("options", &self.inner.options)
            .field("connected", &self.is_connected())
            .field("leased", &self.leased())
            .finish()
    }
}

impl AmqpQueue {
    /// Publishes `body` to a submitter's reply queue (AMQP `reply_to`), with its
    /// correlation id. The queue is the submitter's (often exclusive and
    /// auto-deleted): it is not declared, and `false` says it is gone.
    pub async fn reply(
        &self,
        queue: &str,
        correlation_id: Option<&str>,
        body: &[u8],
    ) -> Result<bool, Error> {
        let mut props = lapin::BasicProperties::default()
            .with_content_type(message::short("application/json")?)
            .with_message_id(message::short(&ulid::Ulid::generate().to_string())?);
        if let Some(c) = correlation_id {
            props = props.with_correlation_id(message::short(c)?);
        }
        let session = self.inner.link.session().await?;
        Ok(session.publish(queue, body, props).await? == session::Published::Stored)
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn declare(&self, queue: &str) -> Result<(), Error> {
        message::queue_name(queue)?;
        let session = self.inner.link.session().await?;
        self.inner.ensure_queue(&session, queue).await
    }

    /// Ready messages only: what this adapter's consumers hold unacknowledged
    /// and what waits in a delay queue are not in RabbitMQ's count, and
    /// RabbitMQ does not say how old a message is.
    async fn depth(&self, queue: &str) -> Result<Option<Depth>, Error> {
        message::queue_name(queue)?;
        Ok(Some(Depth {
            messages: u64::from(self.inner.ready(queue).await?),
            oldest: None,
        }))
    }

    async fn send(&self, queue: &str, msg: Outgoing) -> Result<String, Error> {
        message::queue_name(queue)?;
        let delay = message::delay_ms(msg.delay)?;
        let id = msg
            .attributes
            .get(message::MESSAGE_ID)
            .cloned()
            .unwrap_or_else(|| ulid::Ulid::generate().to_string());
        let props = message::properties(&id, msg.priority, 0, None, &msg.attributes)?;
        self.inner.publish(queue, delay, &msg.body, props).await?;
        Ok(id)
    }

    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, Error> {
        message::queue_name(queue)?;
        let inner = &*self.inner;
        let deadline = after(opts.wait);
        let mut out = Vec::new();
        let mut barrier_done = false;
        let mut reopened = 0;
        while out.len() < opts.max {
            let session = inner.link.session().await?;
            inner.ensure_queue(&session, queue).await?;
            let consumer = session
                .consumer(queue, inner.options.prefetch)
                .await
                .map_err(|e| declare_error(queue, e))?;
            for pushed in consumer.take(opts.max - out.len()) {
                if let Some(d) = inner
                    .hand_out(queue, session.conn_no, &consumer, pushed, opts.lease)
                    .await
                {
                    out.push(d);
                }
            }
            if out.len() >= opts.max {
                break;
            }
            if !out.is_empty() {
                if barrier_done {
                    // Hand out what is here rather than wait to fill `max`.
                    break;
                }
                // A partial batch: the broker may be pushing the rest right now (a
                // new consumer gets the backlog one message at a time). Sync once,
                // so that `max` is filled from everything already sent to us.
                if let Err(e) = consumer.barrier().await {
                    tracing::debug!(queue, error = %e, "consumer channel failed");
                }
                barrier_done = true;
                continue;
            }
            match consumer.wait(deadline).await {
                Waited::Arrived => {}
                Waited::TimedOut if barrier_done => break,
                Waited::TimedOut => {
                    if let Err(e) = consumer.barrier().await {
                        tracing::debug!(queue, error = %e, "consumer channel failed");
                    }
                    barrier_done = true;
                }
                Waited::Ended => {
                    reopened += 1;
                    // Perhaps the queue was deleted: declare it again with the consumer.
                    lock(&inner.declared).remove(queue);
                    session.remove_consumer(queue);
                    if reopened > MAX_REOPENS {
                        return Err(Error::Unavailable(
                            format!("the consumer of {queue} keeps ending").into(),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn ack(&self, d: &Delivery) -> Result<(), Error> {
        self.inner.settle(d, Settle::Ack).await
    }

    async fn retry_later(&self, d: &Delivery, delay: Duration) -> Result<(), Error> {
        let delay = message::delay_ms(delay)?;
        self.inner.settle(d, Settle::Retry(delay)).await
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), Error> {
        self.inner.settle(d, Settle::Dead(reason)).await
    }
}

pub(crate) fn unavailable(e: lapin::Error) -> Error {
    Error::Unavailable(Box::new(e))
}

/// `d` from now, saturating: callers may pass `Duration::MAX` for "forever".
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Poison-tolerant: a panic elsewhere must not wedge the queue.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `amqp://user:secret@host/vhost` → `amqp://***@host/vhost`.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end], &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            super::redact("amqp://guest:s3cret@10.0.0.1:5672/%2f"),
            "amqp://***@10.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact("amqp://localhost"), "amqp://localhost");
        assert_eq!(super::redact("not a url"), "not a url");
    }
}

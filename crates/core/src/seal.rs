//! Sealed queues: the broker's own queues accept only what the broker wrote.
//!
//! The dispatch, events and notify queues steer every job, and the queue server
//! may be reachable by more than the broker — a local workload shares the
//! machine's loopback, where a RabbitMQ with its default guest account answers. A
//! job that could publish `{"type": "event", "event": {"type":
//! "workload_exited", …}}` for another job would end it. So every message the
//! broker sends to these queues carries an HMAC of its queue and body under the
//! broker's key, and a message without a valid one is dead-lettered unread, with
//! the reason, before any handler sees it.
//!
//! [`SealedQueue`] is a decorator: it wraps any [`Queue`] and leaves the queues it is
//! not told about (the submit queue, which outside producers write) as they are. A
//! sealed queue's dead letters are shown opened when their seal holds, and as they
//! are when not (a dead-letter queue is for people to read, never dead-lettered).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hmac::Mac;

use crate::ports::queue::{Delivery, Error, Outgoing, Queue, Receive, dead_letter_queue};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

const PREFIX: &[u8] = b"rsl1.";
/// `rsl1.` + 64 hex digits + `.`
const HEADER: usize = 5 + 64 + 1;

/// A [`Queue`] whose `sealed` queues carry and require the broker's seal.
#[derive(Debug, Clone)]
pub struct SealedQueue {
    inner: Arc<dyn Queue>,
    key: Arc<Key>,
    sealed: Arc<Which>,
}

#[derive(Debug)]
enum Which {
    Only(BTreeSet<String>),
    /// Every queue but dead-letter queues (the conformance suite's unique names).
    All,
}

/// The sealing key. Its `Debug` shows no key material.
struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    fn mac(&self, queue: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        mac.update(queue.as_bytes());
        mac.update(&[0]);
        mac.update(body);
        mac
    }

    fn seal(&self, queue: &str, body: &[u8]) -> Bytes {
        let tag = hex::encode(self.mac(queue, body).finalize().into_bytes());
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(PREFIX);
        out.extend_from_slice(tag.as_bytes());
        out.push(b'.');
        out.extend_from_slice(body);
        Bytes::from(out)
    }

    /// The body inside a valid seal.
    fn open(&self, queue: &str, sealed: &Bytes) -> Option<Bytes> {
        if sealed.len() < HEADER || !sealed.starts_with(PREFIX) || sealed[HEADER - 1] != b'.' {
            return None;
        }
        let tag = hex::decode(&sealed[PREFIX.len()..HEADER - 1]).ok()?;
        let body = sealed.slice(HEADER..);
        self.mac(queue, &body).verify_slice(&tag).ok()?;
        Some(body)
    }
}

impl SealedQueue {
    /// Seals the queues named in `sealed` with `key` (the broker's secret).
    pub fn new(
        inner: Arc<dyn Queue>,
        key: &[u8],
        sealed: impl IntoIterator<Item = String>,
    ) -> SealedQueue {
        SealedQueue {
            inner,
            key: Arc::new(Key(key.to_vec())),
            sealed: Arc::new(Which::Only(sealed.into_iter().collect())),
        }
    }

    /// Seals every queue (but dead-letter queues): for the conformance suite.
    pub fn all(inner: Arc<dyn Queue>, key: &[u8]) -> SealedQueue {
        SealedQueue {
            inner,
            key: Arc::new(Key(key.to_vec())),
            sealed: Arc::new(Which::All),
        }
    }

    fn is_sealed(&self, queue: &str) -> bool {
        match &*self.sealed {
            Which::Only(names) => names.contains(queue),
            Which::All => !queue.ends_with(".dead"),
        }
    }

    /// The sealed queue whose dead letters `queue` holds.
    fn dead_letters_of<'q>(&self, queue: &'q str) -> Option<&'q str> {
        queue
            .strip_suffix(".dead")
            .filter(|origin| self.is_sealed(origin) && dead_letter_queue(origin) == queue)
    }

    /// The delivery as the inner queue handed it out (adapters that settle by
    /// body find the same bytes).
    fn resealed(&self, d: &Delivery) -> Delivery {
        if !self.is_sealed(&d.queue) {
            return d.clone();
        }
        Delivery {
            body: self.key.seal(&d.queue, &d.body),
            ..d.clone()
        }
    }
}

#[async_trait]
impl Queue for SealedQueue {
    async fn send(&self, queue: &str, mut msg: Outgoing) -> Result<String, Error> {
        if self.is_sealed(queue) {
            msg.body = self.key.seal(queue, &msg.body);
        }
        self.inner.send(queue, msg).await
    }

    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, Error> {
        let mut got = self.inner.receive(queue, opts).await?;
        if let Some(origin) = self.dead_letters_of(queue) {
            for d in &mut got {
                if let Some(body) = self.key.open(origin, &d.body) {
                    d.body = body;
                }
            }
            return Ok(got);
        }
        if !self.is_sealed(queue) {
            return Ok(got);
        }
        let mut open = Vec::with_capacity(got.len());
        for mut d in got {
            match self.key.open(queue, &d.body) {
                Some(body) => {
                    d.body = body;
                    open.push(d);
                }
                None => {
                    tracing::warn!(queue, message_id = %d.id, "dead-lettering a message without the broker's seal");
                    let why = "not sealed by this broker: only the broker writes to this queue";
                    if let Err(e) = self.inner.dead_letter(&d, why).await {
                        tracing::warn!(queue, message_id = %d.id, error = %e, "cannot dead-letter an unsealed message");
                    }
                }
            }
        }
        Ok(open)
    }

    async fn ack(&self, d: &Delivery) -> Result<(), Error> {
        self.inner.ack(&self.resealed(d)).await
    }

    async fn retry_later(&self, d: &Delivery, delay: Duration) -> Result<(), Error> {
        self.inner.retry_later(&self.resealed(d), delay).await
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), Error> {
        self.inner.dead_letter(&self.resealed(d), reason).await
    }

    async fn declare(&self, queue: &str) -> Result<(), Error> {
        self.inner.declare(queue).await
    }

    async fn depth(&self, queue: &str) -> Result<Option<crate::ports::queue::Depth>, Error> {
        self.inner.depth(queue).await
    }

    fn system(&self) -> &'static str {
        self.inner.system()
    }
}

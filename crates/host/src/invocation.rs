//! A queue as one function invocation sees it, for hosts whose platform hands a
//! function its messages (Lambda's SQS batches, Azure Functions' queue triggers):
//! `receive` on the invocation's queue hands out those messages; everything else,
//! settling included, goes to the real queue, and what was settled (acked or
//! dead-lettered) is remembered, so the host can tell the platform which messages
//! it must keep.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use respawn_core::ports::queue::{self, Delivery, Outgoing, Queue, Receive};
use respawn_core::ports::{Ports, Retryable};
use tracing::warn;

#[derive(Debug)]
pub struct Invocation {
    inner: Arc<dyn Queue>,
    queue: String,
    handed: Mutex<Vec<Delivery>>,
    /// Receipts of messages deleted (acked or dead-lettered).
    settled: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Invocation {
    /// The invocation of logical queue `queue`, over the queue it came from.
    pub fn new(inner: Arc<dyn Queue>, queue: &str) -> Invocation {
        Invocation {
            inner,
            queue: queue.to_owned(),
            handed: Mutex::new(Vec::new()),
            settled: Mutex::new(Vec::new()),
        }
    }

    /// A message the platform handed this invocation.
    pub fn hand(&self, d: Delivery) {
        lock(&self.handed).push(d);
    }

    /// Receipts of the messages settled so far.
    pub fn settled(&self) -> Vec<String> {
        lock(&self.settled).clone()
    }
}

#[async_trait]
impl Queue for Invocation {
    async fn send(&self, queue: &str, msg: Outgoing) -> Result<String, queue::Error> {
        self.inner.send(queue, msg).await
    }

    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, queue::Error> {
        if queue == self.queue {
            return Ok(std::mem::take(&mut *lock(&self.handed)));
        }
        self.inner.receive(queue, opts).await
    }

    async fn ack(&self, d: &Delivery) -> Result<(), queue::Error> {
        self.inner.ack(d).await?;
        lock(&self.settled).push(d.receipt.clone());
        Ok(())
    }

    async fn retry_later(&self, d: &Delivery, delay: Duration) -> Result<(), queue::Error> {
        // Left in the queue, invisible for the backoff: the platform must not
        // delete it.
        self.inner.retry_later(d, delay).await
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), queue::Error> {
        self.inner.dead_letter(d, reason).await?;
        lock(&self.settled).push(d.receipt.clone());
        Ok(())
    }

    async fn declare(&self, queue: &str) -> Result<(), queue::Error> {
        self.inner.declare(queue).await
    }

    async fn depth(&self, queue: &str) -> Result<Option<queue::Depth>, queue::Error> {
        self.inner.depth(queue).await
    }

    fn system(&self) -> &'static str {
        self.inner.system()
    }
}

/// What became of one message a host handles itself (not through a handler that
/// settles it): done, try again later, or never.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Retry(String),
    Refuse(String),
}

/// Settles `d` as `outcome` says; a failure to settle leaves it to come back.
pub async fn settle(ports: &Ports, d: &Delivery, outcome: Outcome) {
    let result = match outcome {
        Outcome::Done => ports.queue.ack(d).await,
        Outcome::Retry(why) => {
            warn!(queue = %d.queue, message_id = %d.id, %why, "will retry");
            let backoff = Duration::from_secs(1u64 << d.deliveries.min(8));
            ports.queue.retry_later(d, backoff).await
        }
        Outcome::Refuse(why) => {
            warn!(queue = %d.queue, message_id = %d.id, %why, "dead-lettered");
            ports.queue.dead_letter(d, &why).await
        }
    };
    if let Err(e) = result {
        warn!(queue = %d.queue, message_id = %d.id, error = %e, "cannot settle; it comes back");
    }
}

/// A handler's error as an outcome: retried if it may pass, refused if not.
pub fn outcome<E: Retryable + std::fmt::Display>(e: E) -> Outcome {
    if e.is_retryable() {
        Outcome::Retry(e.to_string())
    } else {
        Outcome::Refuse(e.to_string())
    }
}

//! Handing out pushed messages under leases, and settling them: ack, retry,
//! dead-letter, or expiry.
//!
//! A pushed message is handed out only if it carries a message id and was not
//! redelivered by the broker. Otherwise it is rewritten first: a copy with an id and
//! its delivery count is published to its own queue and the original acked, in one
//! transaction on the consumer's channel ([`super::tx`]), and the copy is what gets
//! handed out when it arrives. So
//!
//! - a message without `message_id` gets one exactly once: a connection lost at any
//!   point leaves either the original (no id yet) or the copy (with its id), never
//!   both, so a consumer that dedups by id never sees one message under two ids;
//! - a message the broker redelivers (its consumer's connection or channel ended
//!   before an ack, e.g. its process crashed) has that delivery counted in its
//!   header, so one that keeps killing its consumer reaches the dead-letter queue
//!   after `max_deliveries` like any other.
//!
//! The copy goes to the back of its queue (within its priority).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use respawn_core::ports::queue::{Delivery, Error, dead_letter_queue};
use tokio::time::Instant;

use super::consumer::QueueConsumer;
use super::lease::Lease;
use super::message::{self, Received};
use super::tx::{Failed, Tx};
use super::{Inner, after, unavailable};

impl Inner {
    /// Ends an expired lease: the message goes back to its queue with its count (or
    /// back to the broker, if it cannot be republished).
    pub(super) async fn expire(&self, lease: Lease) {
        if !lease.acker.usable() {
            // Its channel is gone: the broker already requeued it.
            tracing::debug!(queue = %lease.queue, id = %lease.id, "expired lease was on a closed channel");
            return;
        }
        tracing::debug!(queue = %lease.queue, id = %lease.id, deliveries = lease.deliveries, "lease expired; redelivering");
        let reason = lease.reason.as_deref();
        self.replace_or_requeue(&lease, &lease.queue, lease.deliveries, reason)
            .await;
    }

    /// Settles a handed-out message: acks it, or replaces it with a copy (in its
    /// queue, maybe through a delay queue, or in its dead-letter queue).
    pub(super) async fn settle(&self, d: &Delivery, how: Settle<'_>) -> Result<(), Error> {
        let lost = || Error::LeaseLost { id: d.id.clone() };
        let lease = self.leases.claim(&d.receipt, &d.id).map_err(|c| {
            tracing::debug!(queue = %d.queue, id = %d.id, why = ?c, "settling a lost lease");
            lost()
        })?;
        if !lease.acker.usable() || self.link.current_conn_no() != Some(lease.conn_no) {
            // Delivered on a connection or channel that is gone: the broker has
            // requeued it, and it may be with another receiver already.
            return Err(lost());
        }
        // The lease, not the caller's copy of the delivery, says where it belongs.
        let (target, delay, deliveries, reason) = match how {
            Settle::Ack => {
                // Uncommitted when its channel closes, the ack is void and the broker
                // requeues the message: lost, from the caller's point of view.
                return lease.tx.ack(&lease.acker).await.map_err(|_| lost());
            }
            // Same count as handed out: the next delivery counts one more.
            Settle::Retry(delay) => (
                lease.queue.clone(),
                delay,
                lease.deliveries,
                lease.reason.clone(),
            ),
            // A dead letter starts over, as the other adapters do.
            Settle::Dead(reason) => (
                dead_letter_queue(&lease.queue),
                None,
                0,
                Some(reason.to_owned()),
            ),
        };
        match self
            .replace(&lease, &target, delay, deliveries, reason.as_deref())
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                // Nothing changed: the caller may try again while the lease lasts.
                self.leases.restore(d.receipt.clone(), lease);
                Err(e)
            }
        }
    }

    /// Hands out a pushed delivery under a lease; or rewrites it (see the module
    /// docs), or moves it to the dead-letter queue if it has been delivered too
    /// often. None: nothing to hand out now.
    pub(super) async fn hand_out(
        &self,
        queue: &str,
        conn_no: u64,
        consumer: &QueueConsumer,
        pushed: lapin::message::Delivery,
        lease_for: Duration,
    ) -> Option<Delivery> {
        if !pushed.acker.usable() {
            // Pushed on a channel that died since: the broker requeues it.
            return None;
        }
        let tx = consumer.tx();
        let seen = message::read(&pushed.properties);
        if let Some(reason) = self.too_large(consumer, &pushed) {
            self.dead_letter_pushed(queue, conn_no, tx, pushed, seen, &reason)
                .await;
            return None;
        }
        // Deliveries known to have happened. A message the broker flags as
        // redelivered was with a consumer whose channel closed without acking it:
        // that delivery counts too, since it may have been handed out (a handler that
        // crashes its process must not loop forever).
        let before = seen
            .deliveries
            .saturating_add(u32::from(pushed.redelivered));
        if before >= self.options.max_deliveries {
            let mut reason = format!("delivered {before} times without being acknowledged");
            if pushed.redelivered {
                reason.push_str("; the last delivery ended with its consumer's connection");
            }
            self.dead_letter_pushed(queue, conn_no, tx, pushed, seen, &reason)
                .await;
            return None;
        }
        let body = Bytes::from(pushed.data);
        let id = match (&seen.id, pushed.redelivered) {
            (Some(id), false) => id.clone(),
            _ => {
                rewrite(queue, &tx, &pushed.acker, &body, seen, before).await;
                return None;
            }
        };
        let deliveries = before + 1;
        let lease = Lease {
            queue: queue.to_owned(),
            id: id.clone(),
            conn_no,
            until: after(lease_for),
            acker: pushed.acker,
            tx,
            body: body.clone(),
            priority: seen.priority,
            deliveries,
            reason: seen.reason.clone(),
            attributes: seen.attributes.clone(),
        };
        let receipt = self.leases.insert(lease);
        Some(Delivery {
            queue: queue.to_owned(),
            id,
            body,
            priority: seen.priority,
            deliveries,
            receipt,
            reason: seen.reason,
            attributes: seen.attributes,
        })
    }

    /// Puts back what `stop` took from a consumer: pushed, never handed out. Its
    /// count stays as it is; left to the broker, it would come back flagged as
    /// redelivered and count a delivery that never happened.
    pub(super) async fn put_back(
        &self,
        queue: &str,
        conn_no: u64,
        consumer: &QueueConsumer,
        pushed: lapin::message::Delivery,
    ) {
        if !pushed.acker.usable() {
            return;
        }
        let seen = message::read(&pushed.properties);
        if let Some(reason) = self.too_large(consumer, &pushed) {
            // Not back to its queue: its body may be gone (see `limit.rs`).
            self.dead_letter_pushed(queue, conn_no, consumer.tx(), pushed, seen, &reason)
                .await;
            return;
        }
        let before = seen
            .deliveries
            .saturating_add(u32::from(pushed.redelivered));
        let body = Bytes::from(pushed.data);
        rewrite(queue, &consumer.tx(), &pushed.acker, &body, seen, before).await;
    }

    /// Why a pushed message is over the size limit, if it is: its body dropped as it
    /// arrived (plain connections), or received whole (TLS ones).
    fn too_large(
        &self,
        consumer: &QueueConsumer,
        pushed: &lapin::message::Delivery,
    ) -> Option<String> {
        let limit = self.options.max_message_bytes;
        if let Some(bytes) = consumer.dropped_body(pushed.delivery_tag) {
            return Some(format!(
                "message is {bytes} bytes; the limit is {limit} (its body was dropped unread)"
            ));
        }
        let bytes = pushed.data.len();
        (bytes > limit).then(|| format!("message is {bytes} bytes; the limit is {limit}"))
    }

    /// Moves a pushed message, never handed out, to its dead-letter queue with
    /// `reason`.
    async fn dead_letter_pushed(
        &self,
        queue: &str,
        conn_no: u64,
        tx: Arc<Tx>,
        pushed: lapin::message::Delivery,
        seen: Received,
        reason: &str,
    ) {
        tracing::info!(queue, id = ?seen.id, %reason, "dead-lettering a received message");
        let lease = Lease {
            queue: queue.to_owned(),
            id: seen.id.unwrap_or_else(new_id),
            conn_no,
            until: Instant::now(),
            acker: pushed.acker,
            tx,
            body: Bytes::from(pushed.data),
            priority: seen.priority,
            deliveries: 0,
            reason: None,
            attributes: seen.attributes,
        };
        let dlq = dead_letter_queue(queue);
        self.replace_or_requeue(&lease, &dlq, 0, Some(reason)).await;
    }

    /// Publishes a copy of a leased message to `target` and acks the original: in one
    /// transaction when the copy goes straight back to the message's own queue, else
    /// through the confirmed publisher first (a delay or dead-letter queue may have
    /// vanished and need declaring again, which only a confirm with `mandatory`
    /// tells), then the ack.
    async fn replace(
        &self,
        lease: &Lease,
        target: &str,
        delay: Option<u64>,
        deliveries: u32,
        reason: Option<&str>,
    ) -> Result<(), Error> {
        let props = message::properties(
            &lease.id,
            lease.priority,
            deliveries,
            reason,
            &lease.attributes,
        )?;
        if target == lease.queue && delay.is_none() {
            return lease
                .tx
                .replace(&lease.acker, target, &lease.body, props)
                .await
                .map_err(|e| match e {
                    Failed::Unusable => Error::LeaseLost {
                        id: lease.id.clone(),
                    },
                    Failed::Amqp(e) => unavailable(e),
                    Failed::TimedOut => Error::Unavailable(Box::new(Failed::TimedOut)),
                    Failed::Invalid(e) => e,
                });
        }
        self.publish(target, delay, &lease.body, props).await?;
        // If the channel dies before the ack commits, the broker redelivers the
        // original too: a duplicate, never a loss.
        if let Err(e) = lease.tx.ack(&lease.acker).await {
            tracing::warn!(
                queue = %lease.queue,
                id = %lease.id,
                error = %e,
                "copy stored but the original could not be acked; it will be delivered again"
            );
        }
        Ok(())
    }

    /// `replace`, for a message no caller holds: if the copy cannot be stored, the
    /// broker gets the original back rather than it staying unacked on a live channel
    /// (it then counts one more delivery, for its redelivered flag).
    async fn replace_or_requeue(
        &self,
        lease: &Lease,
        target: &str,
        deliveries: u32,
        reason: Option<&str>,
    ) {
        if let Err(e) = self.replace(lease, target, None, deliveries, reason).await {
            tracing::warn!(queue = %lease.queue, id = %lease.id, to = target, error = %e, "could not republish; requeueing");
            requeue(&lease.tx, &lease.acker).await;
        }
    }
}

/// Replaces a pushed message with a copy in its own queue that carries an id (the
/// one it has, or a new one) and `deliveries` as its count, atomically.
async fn rewrite(
    queue: &str,
    tx: &Tx,
    acker: &lapin::Acker,
    body: &[u8],
    seen: Received,
    deliveries: u32,
) {
    let given = seen.id.is_none();
    let id = seen.id.unwrap_or_else(new_id);
    let mut attributes: BTreeMap<String, String> = seen.attributes;
    attributes.insert(message::MESSAGE_ID.to_owned(), id.clone());
    let copied = match message::properties(
        &id,
        seen.priority,
        deliveries,
        seen.reason.as_deref(),
        &attributes,
    ) {
        Ok(props) => tx.replace(acker, queue, body, props).await,
        Err(e) => Err(Failed::Invalid(e)),
    };
    match copied {
        Ok(()) => tracing::debug!(queue, %id, given, deliveries, "rewritten with its id and count"),
        // Its channel is gone: the broker has the original back, unchanged.
        Err(e) if !acker.usable() => {
            tracing::debug!(queue, %id, error = %e, "could not rewrite a delivery; its channel is gone");
        }
        Err(e) => {
            tracing::warn!(queue, %id, error = %e, "could not rewrite a delivery; requeueing");
            requeue(tx, acker).await;
        }
    }
}

/// Gives a delivery back to the broker, unless its channel is gone (then the broker
/// has it back already).
async fn requeue(tx: &Tx, acker: &lapin::Acker) {
    if acker.usable()
        && let Err(e) = tx.requeue(acker).await
    {
        tracing::debug!(error = %e, "could not requeue; its channel is gone");
    }
}

fn new_id() -> String {
    ulid::Ulid::generate().to_string()
}

pub(super) enum Settle<'a> {
    Ack,
    /// After this many milliseconds, if any.
    Retry(Option<u64>),
    Dead(&'a str),
}

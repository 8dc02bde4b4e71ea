//! Handing out pushed messages under leases, and settling them: ack, retry,
//! dead-letter, or expiry.

use std::time::Duration;

use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use respawn_core::ports::queue::{Delivery, Error, dead_letter_queue};
use tokio::time::Instant;

use super::lease::Lease;
use super::{Inner, after, message};

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

    /// Settles a handed-out message: acks it, or first republishes a copy (to its
    /// queue, maybe through a delay queue, or to its dead-letter queue) and acks the
    /// original once the copy is confirmed.
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
                return match lease.acker.ack(BasicAckOptions::default()).await {
                    Ok(true) => Ok(()),
                    // The channel closed under us: the broker requeues the message.
                    Ok(false) | Err(_) => Err(lost()),
                };
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

    /// Hands out a pushed delivery under a lease, or moves it to the dead-letter
    /// queue if it has been delivered too often. None: nothing to hand out.
    pub(super) async fn hand_out(
        &self,
        queue: &str,
        conn_no: u64,
        pushed: lapin::message::Delivery,
        lease_for: Duration,
    ) -> Option<Delivery> {
        if !pushed.acker.usable() {
            // Pushed on a channel that died since: the broker requeues it.
            return None;
        }
        let seen = message::read(&pushed.properties, pushed.delivery_tag);
        // A message the broker redelivered was with a consumer whose channel closed
        // without acking it: count that delivery too, since it may have been handed
        // out (a handler that crashes its process must not loop forever).
        let deliveries = seen
            .deliveries
            .saturating_add(1)
            .saturating_add(u32::from(pushed.redelivered));
        let body = Bytes::from(pushed.data);
        let max = self.options.max_deliveries;
        if deliveries > max {
            let before = deliveries - 1;
            let reason = format!("delivered {before} times without being acknowledged");
            tracing::info!(queue, id = %seen.id, deliveries = before, "dead-lettering after too many deliveries");
            let lease = Lease {
                queue: queue.to_owned(),
                id: seen.id,
                conn_no,
                until: Instant::now(),
                acker: pushed.acker,
                body,
                priority: seen.priority,
                deliveries: 0,
                reason: None,
                attributes: seen.attributes.clone(),
            };
            let dlq = dead_letter_queue(queue);
            self.replace_or_requeue(&lease, &dlq, 0, Some(&reason))
                .await;
            return None;
        }
        let lease = Lease {
            queue: queue.to_owned(),
            id: seen.id.clone(),
            conn_no,
            until: after(lease_for),
            acker: pushed.acker,
            body: body.clone(),
            priority: seen.priority,
            deliveries,
            reason: seen.reason.clone(),
            attributes: seen.attributes.clone(),
        };
        let receipt = self.leases.insert(lease);
        Some(Delivery {
            queue: queue.to_owned(),
            id: seen.id,
            body,
            priority: seen.priority,
            deliveries,
            receipt,
            reason: seen.reason,
            attributes: seen.attributes,
        })
    }

    /// Puts back what `stop` took from a consumer: pushed, never handed out. Its
    /// count stays as it is; the broker would have flagged it as redelivered.
    pub(super) async fn put_back(
        &self,
        queue: &str,
        conn_no: u64,
        pushed: lapin::message::Delivery,
    ) {
        if !pushed.acker.usable() {
            return;
        }
        let seen = message::read(&pushed.properties, pushed.delivery_tag);
        let deliveries = seen
            .deliveries
            .saturating_add(u32::from(pushed.redelivered));
        let lease = Lease {
            queue: queue.to_owned(),
            id: seen.id,
            conn_no,
            until: Instant::now(),
            acker: pushed.acker,
            body: Bytes::from(pushed.data),
            priority: seen.priority,
            deliveries,
            reason: seen.reason,
            attributes: seen.attributes,
        };
        let reason = lease.reason.as_deref();
        self.replace_or_requeue(&lease, queue, deliveries, reason)
            .await;
    }

    /// Publishes a copy of a leased message to `target`, and acks the original once
    /// the copy is confirmed.
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
        self.publish(target, delay, &lease.body, props).await?;
        finish(lease).await;
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
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let _ = lease.acker.nack(requeue).await;
        }
    }
}

pub(super) enum Settle<'a> {
    Ack,
    /// After this many milliseconds, if any.
    Retry(Option<u64>),
    Dead(&'a str),
}

/// Acks the original once its copy is confirmed. If the channel died in between,
/// the broker redelivers the original too: a duplicate, never a loss.
async fn finish(lease: &Lease) {
    match lease.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) | Err(_) => tracing::warn!(
            queue = %lease.queue,
            id = %lease.id,
            "copy stored but the original could not be acked; it will be delivered again"
        ),
    }
}

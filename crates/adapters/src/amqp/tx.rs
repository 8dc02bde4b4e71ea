//! Each consumer's channel runs in an AMQP transaction (`tx.select`), so that the
//! adapter can move a delivered message atomically: a copy published on that channel
//! and the ack of the original take effect together at `tx.commit`, or not at all
//! (a channel or connection that dies first takes both with it). Acks are delivery
//! tags of the channel that received the message, so this has to be the consumer's
//! own channel, not a separate one.
//!
//! Every ack on such a channel waits for a commit. Commits are grouped: one commit
//! covers every operation whose frames went out before it, so concurrent acks share
//! a round trip instead of queueing one commit each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::{Acker, BasicProperties, Channel};

use super::message;

/// An operation (its frames written, then its commit answered) that takes longer than
/// this means the connection is stuck; the heartbeat would notice too, but only after
/// minutes.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a transactional operation did not take effect.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failed {
    /// The delivery was settled already, or its channel is gone (the broker then
    /// requeues it: nothing changed).
    #[error("the delivery's channel is gone or it was settled already")]
    Unusable,
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    Invalid(#[from] respawn_core::ports::queue::Error),
    #[error("no commit within {TIMEOUT:?}; the channel was closed")]
    TimedOut,
}

pub(super) struct Tx {
    channel: Channel,
    /// Shared while an operation sends its frames, exclusive while a commit is sent,
    /// so that a commit never falls between the copy and the ack of one operation.
    sending: tokio::sync::RwLock<()>,
    /// Operations whose frames are on the wire.
    sent: AtomicU64,
    /// Operations covered by a commit the broker answered.
    committed: AtomicU64,
    /// One commit in flight at a time; the others wait and usually find theirs done.
    committing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("channel", &self.channel.id())
            .field("sent", &self.sent.load(Ordering::Relaxed))
            .field("committed", &self.committed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Tx {
    /// Puts `channel` into transaction mode (for good: AMQP has no way back).
    pub async fn select(channel: Channel) -> Result<Tx, lapin::Error> {
        channel.tx_select().await?;
        Ok(Tx {
            channel,
            sending: tokio::sync::RwLock::new(()),
            sent: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            committing: tokio::sync::Mutex::new(()),
        })
    }

    /// Acks a delivery of this channel; returns once the broker committed the ack.
    pub async fn ack(&self, acker: &Acker) -> Result<(), Failed> {
        self.run(async { Ok(acker.ack(BasicAckOptions::default()).await?) })
            .await
    }

    /// Gives a delivery back to the broker, which redelivers it (flagged
    /// `redelivered`).
    pub async fn requeue(&self, acker: &Acker) -> Result<(), Failed> {
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        self.run(async { Ok(acker.nack(requeue).await?) }).await
    }

    /// Publishes `body` with `props` to `queue` and acks `acker`'s delivery, in one
    /// transaction: the broker stores the copy and drops the original together.
    ///
    /// Not `mandatory`: a return would arrive with no confirm to tie it to. Use this
    /// only for the queue the original came from, which then exists (if it was
    /// deleted, the original went with it and nothing is lost).
    pub async fn replace(
        &self,
        acker: &Acker,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), Failed> {
        let routing_key = message::short(queue)?;
        self.run(async {
            if !acker.usable() {
                // Nothing sent yet: a copy without the ack would be a duplicate.
                return Ok(false);
            }
            // Resolves once the frames are written, so they precede any commit sent
            // after this operation leaves `sending`. (The returned confirm is
            // `NotRequested`: there are no confirms in transaction mode.)
            self.channel
                .basic_publish(
                    "".into(),
                    routing_key,
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await?;
            // The acker is ours alone (its lease was claimed), so it is still usable
            // unless the channel died, which discards the copy too.
            Ok(acker.ack(BasicAckOptions::default()).await?)
        })
        .await
    }

    /// Sends an operation's frames, then waits until a commit covers them.
    async fn run(&self, frames: impl Future<Output = Result<bool, Failed>>) -> Result<(), Failed> {
        match tokio::time::timeout(TIMEOUT, self.send_and_commit(frames)).await {
            Ok(done) => done,
            Err(_) => {
                // Part of the operation may be sent (a copy without its ack): close the
                // channel, which discards the transaction, rather than let a later
                // commit on it take effect. The broker then requeues its deliveries.
                let closing = self.channel.close(200, "respawn: transaction stuck".into());
                let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
                Err(Failed::TimedOut)
            }
        }
    }

    async fn send_and_commit(
        &self,
        frames: impl Future<Output = Result<bool, Failed>>,
    ) -> Result<(), Failed> {
        let ticket = {
            let _sending = self.sending.read().await;
            if !frames.await? {
                return Err(Failed::Unusable);
            }
            self.sent.fetch_add(1, Ordering::AcqRel) + 1
        };
        self.commit_through(ticket).await
    }

    async fn commit_through(&self, ticket: u64) -> Result<(), Failed> {
        let _one = self.committing.lock().await;
        if self.committed.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        // No operation is half sent while we hold this, and every one counted in
        // `sent` has its frames on the wire before the commit.
        let _all_sent = self.sending.write().await;
        let upto = self.sent.load(Ordering::Acquire);
        self.channel.tx_commit().await?;
        self.committed.store(upto, Ordering::Release);
        Ok(())
    }
}

//! One consumer per logical queue and connection, with the deliveries it has been
//! pushed but not yet handed out.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::{Stream, StreamExt};
use lapin::message::Delivery as Pushed;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::time::Instant;

use super::limit::Oversized;
use super::lock;
use super::tx::Tx;

pub(super) struct QueueConsumer {
    pub queue: String,
    channel: Channel,
    /// The channel's transaction: every ack on it goes through this.
    tx: Arc<Tx>,
    prefetch: u16,
    tag: String,
    /// Receivers take turns driving the stream: the one holding this waits for the
    /// next push, the others queue here until their own deadline. No pump task, so a
    /// delivery is in `buffer` as soon as anyone looks, in broker order.
    stream: tokio::sync::Mutex<Consumer>,
    buffer: Mutex<Buffer>,
    /// The stream ended: the channel died or the broker cancelled the consumer.
    ended: AtomicBool,
    /// The connection's record of deliveries whose bodies were dropped.
    oversized: Arc<Oversized>,
}

/// Pushed deliveries by priority, oldest first within one. The broker sends in
/// priority order what is in the queue when it sends, but a message that arrives
/// later with a higher priority must still go before what we already hold.
#[derive(Default)]
struct Buffer {
    by_priority: [VecDeque<Pushed>; 10],
}

impl Buffer {
    fn push(&mut self, d: Pushed) {
        let p = usize::from(d.properties.priority().unwrap_or(0).min(9));
        self.by_priority[p].push_back(d);
    }

    fn is_empty(&self) -> bool {
        self.by_priority.iter().all(VecDeque::is_empty)
    }

    fn take(&mut self, max: usize) -> Vec<Pushed> {
        let mut out = Vec::new();
        for q in self.by_priority.iter_mut().rev() {
            while out.len() < max {
                match q.pop_front() {
                    Some(d) => out.push(d),
                    None => break,
                }
            }
        }
        out
    }
}

/// What a wait for pushed deliveries came to.
pub(super) enum Waited {
    /// Something is in the buffer.
    Arrived,
    /// The deadline passed (or another receiver is driving the stream).
    TimedOut,
    /// The consumer is gone; open another.
    Ended,
}

impl QueueConsumer {
    pub async fn open(
        conn: &Connection,
        queue: &str,
        prefetch: u16,
        oversized: Arc<Oversized>,
    ) -> Result<QueueConsumer, lapin::Error> {
        // A channel of its own: prefetch is per channel here, and a channel error on
        // one queue's consumer leaves the others (and their leases) alone.
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let tx = Arc::new(Tx::select(channel.clone()).await?);
        let tag = format!(
            "respawn-{}",
            ulid::Ulid::generate().to_string().to_lowercase()
        );
        let consumer = channel
            .basic_consume(
                super::message::short(queue)
                    .map_err(|e| lapin::Error::from(std::io::Error::other(e)))?,
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(QueueConsumer {
            queue: queue.to_owned(),
            channel,
            tx,
            prefetch,
            tag,
            stream: tokio::sync::Mutex::new(consumer),
            buffer: Mutex::new(Buffer::default()),
            ended: AtomicBool::new(false),
            oversized,
        })
    }

    pub fn tx(&self) -> Arc<Tx> {
        self.tx.clone()
    }

    /// The size announced for a delivery of this consumer whose body was dropped
    /// unread, being over the limit.
    pub fn dropped_body(&self, delivery_tag: u64) -> Option<u64> {
        self.oversized.take(self.channel.id(), delivery_tag)
    }

    pub fn alive(&self) -> bool {
        !self.ended.load(Ordering::Acquire) && self.channel.status().connected()
    }

    /// Up to `max` buffered deliveries, highest priority first.
    pub fn take(&self, max: usize) -> Vec<Pushed> {
        lock(&self.buffer).take(max)
    }

    /// Waits until a delivery is buffered, the consumer ends, or `deadline`.
    pub async fn wait(&self, deadline: Instant) -> Waited {
        // `timeout_at` polls its future once before looking at the clock, so with a
        // deadline already past this still takes an uncontended lock.
        let Ok(mut stream) = tokio::time::timeout_at(deadline, self.stream.lock()).await else {
            return Waited::TimedOut;
        };
        if !lock(&self.buffer).is_empty() {
            // The receiver before us left some.
            return Waited::Arrived;
        }
        if let Some(w) = self.drain(&mut stream) {
            return w;
        }
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(d))) => {
                lock(&self.buffer).push(d);
                self.drain(&mut stream);
                Waited::Arrived
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(queue = %self.queue, error = %e, "consumer failed");
                self.ended.store(true, Ordering::Release);
                Waited::Ended
            }
            Ok(None) => {
                tracing::info!(queue = %self.queue, "consumer cancelled by the broker");
                self.ended.store(true, Ordering::Release);
                Waited::Ended
            }
            Err(_) => Waited::TimedOut,
        }
    }

    /// Makes sure that every delivery the broker had sent this consumer before now is
    /// in the buffer, so that `receive` with no wait sees a message that was stored
    /// before it was called (a publish is confirmed on another channel, so its
    /// confirm may overtake the delivery). A round trip on the consumer's own channel
    /// does it: the broker answers after the deliveries it already sent on it, and
    /// lapin hands frames over in order.
    pub async fn barrier(&self) -> Result<(), lapin::Error> {
        // Re-sending our prefetch is the cheapest round trip, and changes nothing.
        self.channel
            .basic_qos(self.prefetch, BasicQosOptions { global: false })
            .await?;
        // If another receiver holds the stream, it is waiting on it and takes what
        // arrives: nothing is hidden, it just goes to that receiver.
        if let Ok(mut stream) = self.stream.try_lock() {
            self.drain(&mut stream);
        }
        Ok(())
    }

    /// Moves what lapin already has into the buffer, without waiting.
    fn drain(&self, stream: &mut Consumer) -> Option<Waited> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut got = false;
        loop {
            match Pin::new(&mut *stream).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(d))) => {
                    lock(&self.buffer).push(d);
                    got = true;
                }
                Poll::Ready(Some(Err(_)) | None) => {
                    self.ended.store(true, Ordering::Release);
                    return Some(if got { Waited::Arrived } else { Waited::Ended });
                }
                Poll::Pending => return got.then_some(Waited::Arrived),
            }
        }
    }

    /// Stops consuming and returns what was pushed but not handed out, for the
    /// caller to put back.
    pub async fn stop(&self) -> Vec<Pushed> {
        self.ended.store(true, Ordering::Release);
        // After cancel-ok the broker pushes nothing more to this consumer.
        let _ = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
        // A receiver waiting on the stream sees the cancel and lets go.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        if let Ok(mut stream) = tokio::time::timeout_at(deadline, self.stream.lock()).await {
            self.drain(&mut stream);
        }
        self.take(usize::MAX)
    }

    /// Stops consuming (before the queue is deleted). Unacked deliveries go back to
    /// the queue when the channel closes.
    pub async fn cancel(&self) {
        self.ended.store(true, Ordering::Release);
        let _ = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = self
            .channel
            .close(200, "respawn: consumer closed".into())
            .await;
    }
}

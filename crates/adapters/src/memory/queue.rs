use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use respawn_core::ports::queue::{
    DEFAULT_MAX_DELIVERIES, Delivery, Depth, Error, Outgoing, Queue, Receive, dead_letter_queue,
};
use tokio::sync::Notify;

use super::now_ms;

/// A queue in a map, with the same leases, priorities, delays and dead-lettering as
/// the durable ones.
#[derive(Debug)]
pub struct MemoryQueue {
    inner: Mutex<HashMap<String, Vec<Msg>>>,
    seq: AtomicU64,
    max_deliveries: u32,
    arrived: Notify,
}

#[derive(Debug, Clone)]
struct Msg {
    seq: u64,
    body: Bytes,
    priority: u8,
    visible_at: u64,
    /// When it was sent (ms).
    sent_at: u64,
    deliveries: u32,
    /// The delivery count at the time of the current lease, if leased.
    lease: Option<u32>,
    reason: Option<String>,
    attributes: std::collections::BTreeMap<String, String>,
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_DELIVERIES)
    }
}

impl MemoryQueue {
    pub fn new(max_deliveries: u32) -> Self {
        MemoryQueue {
            inner: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(1),
            max_deliveries: max_deliveries.max(1),
            arrived: Notify::new(),
        }
    }

    /// Messages in a queue, leased or not.
    pub fn count(&self, queue: &str) -> usize {
        self.lock().get(queue).map_or(0, Vec::len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Msg>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_receive(&self, queue: &str, opts: &Receive) -> Vec<Delivery> {
        let now = now_ms();
        let mut all = self.lock();
        let msgs = all.entry(queue.to_owned()).or_default();
        msgs.sort_by_key(|m| (std::cmp::Reverse(m.priority), m.seq));
        let mut out = Vec::new();
        let mut dead = Vec::new();
        for m in msgs.iter_mut() {
            if out.len() >= opts.max {
                break;
            }
            if m.visible_at > now {
                continue;
            }
            if m.deliveries >= self.max_deliveries {
                dead.push(m.seq);
                continue;
            }
            m.deliveries += 1;
            m.lease = Some(m.deliveries);
            m.visible_at = now + opts.lease.as_millis() as u64;
            out.push(Delivery {
                queue: queue.to_owned(),
                id: m.seq.to_string(),
                body: m.body.clone(),
                priority: m.priority,
                deliveries: m.deliveries,
                receipt: m.deliveries.to_string(),
                reason: m.reason.clone(),
                attributes: m.attributes.clone(),
            });
        }
        let reason = format!(
            "delivered {} times without being acknowledged",
            self.max_deliveries
        );
        let mut moved = Vec::new();
        msgs.retain(|m| {
            if dead.contains(&m.seq) {
                moved.push(m.clone());
                false
            } else {
                true
            }
        });
        let dlq = all.entry(dead_letter_queue(queue)).or_default();
        for mut m in moved {
            m.deliveries = 0;
            m.lease = None;
            m.visible_at = 0;
            m.reason = Some(reason.clone());
            dlq.push(m);
        }
        out
    }

    /// Runs `f` on the leased message of `d`, if the lease still holds.
    fn with_lease<T>(
        &self,
        d: &Delivery,
        f: impl FnOnce(&mut Vec<Msg>, usize) -> T,
    ) -> Result<T, Error> {
        let mut all = self.lock();
        let lost = || Error::LeaseLost { id: d.id.clone() };
        let msgs = all.get_mut(&d.queue).ok_or_else(lost)?;
        let idx = msgs
            .iter()
            .position(|m| {
                m.seq.to_string() == d.id
                    && m.lease.map(|l| l.to_string()) == Some(d.receipt.clone())
            })
            .ok_or_else(lost)?;
        Ok(f(msgs, idx))
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn send(&self, queue: &str, msg: Outgoing) -> Result<String, Error> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let now = now_ms();
        self.lock().entry(queue.to_owned()).or_default().push(Msg {
            seq,
            body: msg.body,
            priority: msg.priority,
            visible_at: now + msg.delay.as_millis() as u64,
            sent_at: now,
            deliveries: 0,
            lease: None,
            reason: None,
            attributes: msg.attributes,
        });
        self.arrived.notify_waiters();
        Ok(seq.to_string())
    }

    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, Error> {
        let deadline = tokio::time::Instant::now() + opts.wait;
        loop {
            let notified = self.arrived.notified();
            let got = self.try_receive(queue, &opts);
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            // Delayed messages and ended leases do not notify: poll for them too.
            let nap = deadline.min(tokio::time::Instant::now() + Duration::from_millis(50));
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(nap) => {}
            }
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<(), Error> {
        self.with_lease(d, |msgs, i| {
            msgs.remove(i);
        })
    }

    async fn retry_later(&self, d: &Delivery, delay: Duration) -> Result<(), Error> {
        self.with_lease(d, |msgs, i| {
            msgs[i].lease = None;
            msgs[i].visible_at = now_ms() + delay.as_millis() as u64;
        })?;
        self.arrived.notify_waiters();
        Ok(())
    }

    async fn depth(&self, queue: &str) -> Result<Option<Depth>, Error> {
        let all = self.lock();
        let msgs = all.get(queue).map_or(&[][..], Vec::as_slice);
        let now = now_ms();
        Ok(Some(Depth {
            messages: msgs.len() as u64,
            oldest: Some(
                msgs.iter()
                    .map(|m| m.sent_at)
                    .min()
                    .map_or(Duration::ZERO, |t| {
                        Duration::from_millis(now.saturating_sub(t))
                    }),
            ),
        }))
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), Error> {
        let mut m = self.with_lease(d, |msgs, i| msgs.remove(i))?;
        m.deliveries = 0;
        m.lease = None;
        m.visible_at = 0;
        m.reason = Some(reason.to_owned());
        self.lock()
            .entry(dead_letter_queue(&d.queue))
            .or_default()
            .push(m);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        respawn_core::conformance::queue::run(&super::MemoryQueue::new(3), 3).await;
    }
}

use std::time::Duration;

use async_trait::async_trait;
use respawn_core::ports::queue::{
    Delivery, Depth, Error, Outgoing, Queue, Receive, dead_letter_queue,
};
use rusqlite::{Connection, params};
use tokio::sync::Notify;

use super::{LocalStore, now_ms};

/// The durable local queue. Many named queues live in one table.
#[derive(Debug, Clone)]
pub struct LocalQueue {
    store: LocalStore,
    max_deliveries: u32,
    arrived: std::sync::Arc<Notify>,
}

impl LocalQueue {
    pub(super) fn new(store: LocalStore, max_deliveries: u32) -> Self {
        LocalQueue {
            store,
            max_deliveries: max_deliveries.max(1),
            arrived: std::sync::Arc::new(Notify::new()),
        }
    }

    /// Ids of every message in `queue`, leased or not, oldest first (for inspection).
    pub async fn message_ids(&self, queue: &str) -> Result<Vec<String>, Error> {
        let queue = queue.to_owned();
        self.store
            .readers
            .read(move |c| {
                c.prepare_cached("SELECT seq FROM messages WHERE queue = ?1 ORDER BY seq")?
                    .query_map([queue], |r| r.get::<_, i64>(0))?
                    .map(|r| r.map(|n| n.to_string()))
                    .collect()
            })
            .await
            .map_err(Error::unavailable)
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.store
            .writer
            .call(f)
            .await
            .map_err(Error::unavailable)?
    }

    /// Settles a leased message, if `d`'s lease is still current.
    async fn settle(&self, d: &Delivery, how: Settle) -> Result<(), Error> {
        let lost = || Error::LeaseLost { id: d.id.clone() };
        let seq: i64 = d.id.parse().map_err(|_| lost())?;
        let lease: i64 = d.receipt.parse().map_err(|_| lost())?;
        let id = d.id.clone();
        let dlq = dead_letter_queue(&d.queue);
        self.write(move |c| {
            let n = match how {
                Settle::Ack => c
                    .prepare_cached("DELETE FROM messages WHERE seq = ?1 AND lease = ?2")
                    .and_then(|mut s| s.execute(params![seq, lease])),
                Settle::Retry(delay) => c
                    .prepare_cached("UPDATE messages SET lease = NULL, visible_at = ?3 WHERE seq = ?1 AND lease = ?2")
                    .and_then(|mut s| s.execute(params![seq, lease, now_ms() + delay.as_millis() as i64])),
                Settle::Dead(reason) => c
                    .prepare_cached(
                        "UPDATE messages SET queue = ?3, reason = ?4, lease = NULL, visible_at = 0, deliveries = 0, priority = 0
                         WHERE seq = ?1 AND lease = ?2",
                    )
                    .and_then(|mut s| s.execute(params![seq, lease, dlq, reason])),
            }
            .map_err(Error::unavailable)?;
            if n == 1 { Ok(()) } else { Err(Error::LeaseLost { id }) }
        })
        .await
    }
}

enum Settle {
    Ack,
    Retry(Duration),
    Dead(String),
}

/// A ready message as selected: seq, priority, deliveries, dead-letter reason, body,
/// attributes (JSON).
type Row = (i64, i64, i64, Option<String>, Vec<u8>, Option<String>);

fn take(
    c: &Connection,
    queue: &str,
    opts: Receive,
    max_deliveries: u32,
) -> Result<Vec<Delivery>, Error> {
    let now = now_ms();
    let lease_until = now + opts.lease.as_millis() as i64;
    let dlq = dead_letter_queue(queue);
    let reason = format!("delivered {max_deliveries} times without being acknowledged");
    let mut out = Vec::new();
    let rows: Vec<Row> = c
        .prepare_cached(
            "SELECT seq, priority, deliveries, reason, body, attrs FROM messages
             WHERE queue = ?1 AND visible_at <= ?2 ORDER BY priority DESC, seq LIMIT ?3",
        )
        .and_then(|mut s| {
            // Fetch a few extra in case some are past max deliveries and go to the DLQ.
            s.query_map(params![queue, now, (opts.max * 2 + 8) as i64], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect()
        })
        .map_err(Error::unavailable)?;
    for (seq, priority, deliveries, why, body, attrs) in rows {
        if out.len() >= opts.max {
            break;
        }
        if deliveries >= i64::from(max_deliveries) {
            c.prepare_cached(
                "UPDATE messages SET queue = ?2, reason = ?3, lease = NULL, visible_at = 0, deliveries = 0, priority = 0 WHERE seq = ?1",
            )
            .and_then(|mut s| s.execute(params![seq, dlq, reason]))
            .map_err(Error::unavailable)?;
            continue;
        }
        let n = deliveries + 1;
        c.prepare_cached(
            "UPDATE messages SET deliveries = ?2, lease = ?2, visible_at = ?3 WHERE seq = ?1",
        )
        .and_then(|mut s| s.execute(params![seq, n, lease_until]))
        .map_err(Error::unavailable)?;
        out.push(Delivery {
            queue: queue.to_owned(),
            id: seq.to_string(),
            body: body.into(),
            priority: priority as u8,
            deliveries: n as u32,
            receipt: n.to_string(),
            reason: why,
            attributes: attrs
                .and_then(|a| serde_json::from_str(&a).ok())
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

#[async_trait]
impl Queue for LocalQueue {
    fn system(&self) -> &'static str {
        "respawn_local"
    }

    async fn depth(&self, queue: &str) -> Result<Option<Depth>, Error> {
        let queue = queue.to_owned();
        let (messages, oldest): (i64, Option<i64>) = self
            .store
            .readers
            .read(move |c| {
                c.prepare_cached(
                    "SELECT COUNT(*), MIN(COALESCE(sent_at, visible_at)) FROM messages WHERE queue = ?1",
                )?
                .query_row([queue], |r| Ok((r.get(0)?, r.get(1)?)))
            })
            .await
            .map_err(Error::unavailable)?;
        let now = now_ms();
        Ok(Some(Depth {
            messages: messages.max(0) as u64,
            oldest: Some(oldest.map_or(Duration::ZERO, |t| {
                Duration::from_millis(now.saturating_sub(t).max(0) as u64)
            })),
        }))
    }

    async fn send(&self, queue: &str, msg: Outgoing) -> Result<String, Error> {
        if queue.is_empty() {
            return Err(Error::Invalid("queue name is empty".into()));
        }
        let queue = queue.to_owned();
        let now = now_ms();
        let visible = now + msg.delay.as_millis() as i64;
        let attrs = (!msg.attributes.is_empty())
            .then(|| serde_json::to_string(&msg.attributes).unwrap_or_default());
        let id = self
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO messages (queue, priority, visible_at, deliveries, body, attrs, sent_at) VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6)",
                )
                .and_then(|mut s| s.execute(params![queue, msg.priority, visible, &msg.body[..], attrs, now]))
                .map_err(Error::unavailable)?;
                Ok(c.last_insert_rowid())
            })
            .await?;
        self.arrived.notify_waiters();
        Ok(id.to_string())
    }

    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, Error> {
        let deadline = tokio::time::Instant::now() + opts.wait;
        let max_deliveries = self.max_deliveries;
        loop {
            let notified = self.arrived.notified();
            let name = queue.to_owned();
            let got = self
                .write(move |c| take(c, &name, opts, max_deliveries))
                .await?;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            // Sends from this process wake us; delays, ended leases and other
            // processes' sends are found by polling.
            let nap = deadline.min(tokio::time::Instant::now() + Duration::from_millis(50));
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(nap) => {}
            }
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<(), Error> {
        self.settle(d, Settle::Ack).await
    }

    async fn retry_later(&self, d: &Delivery, delay: Duration) -> Result<(), Error> {
        self.settle(d, Settle::Retry(delay)).await?;
        self.arrived.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), Error> {
        self.settle(d, Settle::Dead(reason.to_owned())).await
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::LocalStore::open(dir.path()).expect("open");
        respawn_core::conformance::queue::run(&store.queue(3), 3).await;
    }
}

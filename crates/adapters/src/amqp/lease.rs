//! Leases on handed-out messages, and the task that ends expired ones.
//!
//! The broker knows only "delivered, not acked yet" with no time limit, so leases
//! live here: a receipt names an entry; settling a delivery first removes its entry,
//! so exactly one of the owner (ack, retry, dead-letter) and the reaper settles it.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Weak};

use bytes::Bytes;
use lapin::Acker;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::tx::Tx;
use super::{Inner, lock};

/// A handed-out message, with what it takes to republish it.
#[derive(Debug)]
pub(super) struct Lease {
    pub queue: String,
    pub id: String,
    /// The connection it was delivered on; the acker only works there.
    pub conn_no: u64,
    pub until: Instant,
    pub acker: Acker,
    /// The transaction of the channel it was delivered on: acks go through it.
    pub tx: std::sync::Arc<Tx>,
    pub body: Bytes,
    pub priority: u8,
    /// As handed out: 1 on first delivery.
    pub deliveries: u32,
    /// Kept through retries and expiries (on dead-letter queues).
    pub reason: Option<String>,
    /// `reply_to`, `correlation_id` …: kept through retries and expiries too.
    pub attributes: BTreeMap<String, String>,
}

/// Why a receipt does not settle.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// No such lease (settled, reaped, or never ours).
    Unknown,
    /// The lease exists but its time is up; the reaper will redeliver it.
    Expired,
}

#[derive(Default)]
pub(super) struct Leases {
    by_receipt: Mutex<Table>,
    seq: AtomicU64,
    /// Wakes the reaper when a lease ends before the reaper would wake anyway.
    changed: Notify,
    closed: AtomicBool,
}

#[derive(Default)]
struct Table {
    leases: HashMap<String, Lease>,
    /// When the reaper will next look (None: it waits for a notification).
    reaper_wakes: Option<Instant>,
}

impl Leases {
    /// Records a lease and returns its receipt.
    pub fn insert(&self, lease: Lease) -> String {
        let receipt = format!(
            "{}.{}",
            lease.conn_no,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let until = lease.until;
        let mut t = lock(&self.by_receipt);
        t.leases.insert(receipt.clone(), lease);
        if t.reaper_wakes.is_none_or(|w| until < w) {
            t.reaper_wakes = Some(until);
            self.changed.notify_one();
        }
        receipt
    }

    /// Takes the lease of `receipt` for settling, if it is current and on time.
    pub fn claim(&self, receipt: &str, id: &str) -> Result<Lease, Claim> {
        let mut t = lock(&self.by_receipt);
        match t.leases.get(receipt) {
            None => return Err(Claim::Unknown),
            Some(l) if l.id != id => return Err(Claim::Unknown),
            Some(l) if l.until <= Instant::now() => {
                drop(t);
                self.changed.notify_one();
                return Err(Claim::Expired);
            }
            Some(_) => {}
        }
        t.leases.remove(receipt).ok_or(Claim::Unknown)
    }

    /// Puts back a lease whose settling failed before anything changed, so that the
    /// caller may try again (or the reaper ends it).
    pub fn restore(&self, receipt: String, lease: Lease) {
        lock(&self.by_receipt).leases.insert(receipt, lease);
        self.changed.notify_one();
    }

    /// Removes and returns the leases whose time is up, and when the next one ends.
    fn expired(&self, now: Instant) -> (Vec<Lease>, Option<Instant>) {
        let mut t = lock(&self.by_receipt);
        let due: Vec<String> = t
            .leases
            .iter()
            .filter(|(_, l)| l.until <= now)
            .map(|(r, _)| r.clone())
            .collect();
        let out = due.iter().filter_map(|r| t.leases.remove(r)).collect();
        let next = t.leases.values().map(|l| l.until).min();
        t.reaper_wakes = next;
        (out, next)
    }

    pub fn len(&self) -> usize {
        lock(&self.by_receipt).leases.len()
    }

    /// Stops the reaper (the queue is being dropped).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_one();
    }
}

/// Ends expired leases until the queue is dropped. Holds the queue only while it
/// works, so that dropping the last `AmqpQueue` ends it.
pub(super) async fn reaper(inner: Weak<Inner>, leases: std::sync::Arc<Leases>) {
    loop {
        let (due, next) = leases.expired(Instant::now());
        if !due.is_empty() {
            let Some(inner) = inner.upgrade() else { return };
            // Concurrently, so that their republish confirms pipeline.
            futures::future::join_all(due.into_iter().map(|l| inner.expire(l))).await;
            continue;
        }
        if leases.closed.load(Ordering::Acquire) {
            return;
        }
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = leases.changed.notified() => {}
                }
            }
            None => leases.changed.notified().await,
        }
        if leases.closed.load(Ordering::Acquire) {
            return;
        }
    }
}

//! Outbound notifications: each state change of a job with notify URLs is POSTed to
//! every URL, signed per Standard Webhooks with the stack's notify secret, retried
//! with exponential backoff through the notify queue, and never on the path of the
//! broker's own work. Every try is recorded on the job (`respawn show`).

use std::sync::Arc;
use std::time::Duration;

use respawn_core::handlers::update_job;
use respawn_core::job::{MAX_NOTIFICATIONS, NotificationAttempt, REPLY_SCHEME};
use respawn_core::messages::Notification;
use respawn_core::ports::Ports;
use respawn_core::ports::queue::{Delivery, Receive};
use respawn_core::webhook::standard::{self, Secret};
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, info, warn};

use crate::egress;
use crate::replies::Replies;

/// POSTs in flight at once.
const PARALLEL: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(5);

/// What delivers notifications: the HTTP client under the [`egress`] policy, the
/// signing secret, and the replies to submitters (in order, each once).
#[derive(Debug)]
pub struct Notifier {
    http: reqwest::Client,
    secret: Arc<Secret>,
    replies: Replies,
    allow_private: bool,
    seen: tokio::sync::Mutex<Recent>,
}

impl Notifier {
    /// Job-chosen URLs go through the [`egress`] policy: public addresses only
    /// unless `allow_private`.
    pub fn new(
        secret: Arc<Secret>,
        replies: Replies,
        allow_private: bool,
    ) -> Result<Notifier, String> {
        Ok(Notifier {
            http: egress::client(allow_private, TIMEOUT).map_err(|e| e.to_string())?,
            secret,
            replies,
            allow_private,
            seen: Default::default(),
        })
    }

    /// Handles a batch from the notify queue and settles each message: POSTs run
    /// side by side, replies one at a time in order. Returns when all are done.
    pub async fn handle(self: &Arc<Self>, ports: &Ports, got: Vec<Delivery>) {
        let mut posts = tokio::task::JoinSet::new();
        for d in got {
            if let Some((d, n)) = self.take(ports, d).await {
                let span = span_of(&d, &n);
                let (ports, this) = (ports.clone(), self.clone());
                posts.spawn(async move { this.post(&ports, &d, &n).await }.instrument(span));
            }
        }
        while posts.join_next().await.is_some() {}
    }

    /// Reads a message and settles what needs no POST (replies, in order, one at a
    /// time: a submitter reads them as the job's story; unreadable messages); the
    /// rest is returned to be POSTed.
    async fn take(&self, ports: &Ports, d: Delivery) -> Option<(Delivery, Notification)> {
        let n = self.read(ports, &d).await?;
        if n.url.starts_with(REPLY_SCHEME) {
            let mut seen = self.seen.lock().await;
            reply(ports, &self.replies, &mut seen, &d, &n).await;
            return None;
        }
        Some((d, n))
    }

    async fn read(&self, ports: &Ports, d: &Delivery) -> Option<Notification> {
        match serde_json::from_slice(&d.body) {
            Ok(n) => Some(n),
            Err(e) => {
                let why = format!("not a notification: {e}");
                let _ = ports.queue.dead_letter(d, &why).await;
                None
            }
        }
    }

    async fn post(&self, ports: &Ports, d: &Delivery, n: &Notification) {
        if let Err(why) = egress::check_url(&n.url, self.allow_private) {
            refuse(ports, d, n, why).await;
        } else {
            deliver(ports, &self.http, &self.secret, d, n).await;
        }
    }
}

/// A notification's POST: a child of the state change that sent it.
fn span_of(d: &Delivery, n: &Notification) -> tracing::Span {
    let span = tracing::info_span!(
        "notify",
        otel.kind = "client",
        job_id = %n.job,
        state = %n.state.as_str(),
    );
    respawn_telemetry::adopt(&span, &d.attributes);
    span
}

/// Consumes the notify queue until `stop`.
pub async fn run(
    ports: Ports,
    secret: Arc<Secret>,
    replies: Replies,
    allow_private: bool,
    stop: watch::Receiver<bool>,
) {
    let notifier = match Notifier::new(secret, replies, allow_private) {
        Ok(n) => Arc::new(n),
        Err(e) => {
            warn!(error = %e, "notifications disabled: no HTTP client");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(PARALLEL));
    let opts = Receive {
        max: PARALLEL,
        lease: TIMEOUT * 4,
        wait: Duration::from_millis(500),
    };
    while !*stop.borrow() {
        let got = match ports.queue.receive(&ports.queues.notify, opts).await {
            Ok(got) => got,
            Err(e) => {
                warn!(error = %e, "cannot read the notify queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for d in got {
            let Some((d, n)) = notifier.take(&ports, d).await else {
                continue;
            };
            // A slow endpoint holds one slot, not the queue.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (ports, notifier) = (ports.clone(), notifier.clone());
            let span = span_of(&d, &n);
            tokio::spawn(async move {
                notifier.post(&ports, &d, &n).instrument(span).await;
                drop(permit);
            });
        }
    }
}

/// Notification ids delivered lately: commands run at least once, so the same
/// state change can be queued twice; a submitter should hear it once.
#[derive(Debug, Default)]
struct Recent {
    ids: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Recent {
    const CAPACITY: usize = 10_000;

    /// `true` the first time `id` is seen.
    fn first(&mut self, id: String) -> bool {
        if !self.ids.insert(id.clone()) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

async fn reply(
    ports: &Ports,
    replies: &Replies,
    seen: &mut Recent,
    d: &Delivery,
    n: &Notification,
) {
    let rec = ports.ledger.get(&n.job).await.ok();
    if let Some(to) = rec
        .as_ref()
        .and_then(|r| r.reply_to.clone())
        .filter(|_| seen.first(n.id()))
    {
        // The creation's own notification, told by its time: the record may have
        // moved on by now (a fast job can have ended before its first reply).
        let kind = if n.state == respawn_core::JobState::Pending
            && rec.as_ref().is_some_and(|r| r.created_at == n.at)
        {
            "accepted"
        } else {
            "state"
        };
        let body = json!({
            "type": kind,
            "job_id": n.job,
            "state": n.state,
            "at": n.at.to_string(),
            "attempt": rec.as_ref().map(|r| r.attempt),
            "reason": rec.as_ref().and_then(|r| r.reason.clone()),
        });
        replies.send(&to, &body).await;
    }
    let _ = ports.queue.ack(d).await;
}

async fn deliver(
    ports: &Ports,
    http: &reqwest::Client,
    secret: &Secret,
    d: &Delivery,
    n: &Notification,
) {
    let rec = ports.ledger.get(&n.job).await.ok();
    let body = json!({
        "type": "job.state_changed",
        "timestamp": n.at.to_string(),
        "data": {
            "job_id": n.job,
            "state": n.state,
            "name": rec.as_ref().map(|r| r.spec.name.clone()),
            "project": rec.as_ref().map(|r| r.project.clone()),
            "attempt": rec.as_ref().map(|r| r.attempt),
            "reason": rec.as_ref().and_then(|r| r.reason.clone()),
        }
    })
    .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let id = n.id();
    let signature = standard::sign(secret, &id, now, body.as_bytes());
    let sent = http
        .post(&n.url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    // The status only, never the answer's body: the log is the job owner's to read.
    let (status, error, delivered) = match sent {
        Ok(r) => (Some(r.status().as_u16()), None, r.status().is_success()),
        Err(e) => (None, Some(describe(e)), false),
    };
    let attempt = NotificationAttempt {
        url: n.url.clone(),
        state: n.state,
        try_number: d.deliveries,
        at: ports.clock.now(),
        status,
        error,
        delivered,
    };
    record(ports, n, attempt).await;
    let settled = if delivered {
        info!(job_id = %n.job, url = %egress::redact(&n.url), state = %n.state, "notification delivered");
        ports.queue.ack(d).await
    } else {
        // 2 s, 4 s, 8 s …: the queue dead-letters it after its delivery limit.
        let backoff = Duration::from_secs(1u64 << d.deliveries.min(9));
        warn!(job_id = %n.job, url = %egress::redact(&n.url), try_number = d.deliveries, ?status, "notification failed; will retry");
        ports.queue.retry_later(d, backoff).await
    };
    if let Err(e) = settled {
        warn!(job_id = %n.job, error = %e, "cannot settle notification");
    }
}

/// An error without the URL it names (URLs carry credentials), with its causes:
/// "error sending request: … resolves to a private address".
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A URL the policy refuses: recorded on the job, dead-lettered, never retried
/// (it cannot start to succeed).
async fn refuse(ports: &Ports, d: &Delivery, n: &Notification, why: String) {
    warn!(job_id = %n.job, url = %egress::redact(&n.url), %why, "notification refused");
    let attempt = NotificationAttempt {
        url: n.url.clone(),
        state: n.state,
        try_number: d.deliveries,
        at: ports.clock.now(),
        status: None,
        error: Some(why.clone()),
        delivered: false,
    };
    record(ports, n, attempt).await;
    if let Err(e) = ports.queue.dead_letter(d, &why).await {
        warn!(job_id = %n.job, error = %e, "cannot settle notification");
    }
}

async fn record(ports: &Ports, n: &Notification, attempt: NotificationAttempt) {
    let result = update_job(ports, &n.job, |r| {
        r.notifications.push(attempt.clone());
        let excess = r.notifications.len().saturating_sub(MAX_NOTIFICATIONS);
        r.notifications.drain(..excess);
    })
    .await;
    if let Err(e) = result {
        warn!(job_id = %n.job, error = %e, "cannot record the notification attempt");
    }
}

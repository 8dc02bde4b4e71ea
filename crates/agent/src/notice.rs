//! Where the agent learns that its VM is about to be reclaimed.
//!
//! - Locally, the spot simulator writes `<vm dir>/notice.json`.
//! - On EC2, the instance metadata service (IMDSv2) answers
//!   `meta-data/spot/instance-action` with the action and its time once an
//!   interruption is scheduled (404 before), about two minutes ahead. A rebalance
//!   recommendation (`meta-data/events/recommendations/rebalance`) comes earlier and
//!   is no interruption: it is logged, and the workload keeps running.
//!
//! - On Azure, Scheduled Events (`/metadata/scheduledevents`, with the `Metadata:
//!   true` header) lists a `Preempt` (a Spot eviction, at least 30 s ahead) or a
//!   `Terminate` naming this VM, with its `NotBefore`. The agent acknowledges it
//!   (`StartRequests`) once the attempt's last checkpoint is uploaded, so Azure
//!   need not wait for the deadline.
//!
//! Either way the agent takes the same path: SIGTERM to the workload and a
//! `PreemptionNotice` report with the deadline.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use respawn_core::time::Timestamp;
use serde::Deserialize;
use tracing::{info, warn};

/// A scheduled reclaim of this VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub deadline: Timestamp,
    /// Where to say the VM may go now (Azure's Scheduled Events), if the source
    /// takes that.
    pub ack: Option<Ack>,
}

/// An Azure scheduled event to acknowledge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    url: String,
    event_id: String,
}

impl Ack {
    /// Tells Azure it may go ahead now (the attempt has saved what it could).
    pub async fn send(&self) {
        let body = serde_json::json!({ "StartRequests": [{ "EventId": self.event_id }] });
        let sent = metadata_client()
            .post(&self.url)
            .header("Metadata", "true")
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                info!(event_id = %self.event_id, "scheduled event acknowledged; the VM may go now");
            }
            Ok(r) => {
                warn!(event_id = %self.event_id, status = r.status().as_u16(), "scheduled event not acknowledged")
            }
            Err(e) => {
                warn!(event_id = %self.event_id, error = %e, "scheduled event not acknowledged")
            }
        }
    }
}

/// How a metadata service is polled: at most once per period, and its being
/// unreachable said once (the agent polls every few seconds for hours).
#[derive(Debug)]
struct Pace {
    every: Duration,
    next: Instant,
    unreachable_said: bool,
}

impl Pace {
    fn new(every: Duration) -> Pace {
        Pace {
            every,
            next: Instant::now(),
            unreachable_said: false,
        }
    }

    /// Whether to ask now; if so, the next time is a period away.
    fn due(&mut self) -> bool {
        if Instant::now() < self.next {
            return false;
        }
        self.next = Instant::now() + self.every;
        true
    }

    fn outcome(
        &mut self,
        checked: Result<Option<Notice>, String>,
        service: &str,
        at: &str,
    ) -> Option<Notice> {
        match checked {
            Ok(notice) => notice,
            Err(e) => {
                if !self.unreachable_said {
                    warn!(error = %e, at, "{service} unreachable; no eviction notice until it answers");
                    self.unreachable_said = true;
                }
                None
            }
        }
    }
}

/// A client for link-local metadata services: no proxy (a proxy from the
/// environment must never see their tokens or answers), short timeouts.
fn metadata_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default()
}

/// How often EC2 says to poll the interruption notice.
pub const IMDS_EVERY: Duration = Duration::from_secs(5);
/// IMDSv2 session tokens live this long (the service's maximum is 6 hours).
const TOKEN_TTL_SECS: u32 = 21_600;

#[derive(Debug)]
pub enum Source {
    File(PathBuf),
    Imds(Imds),
    Azure(ScheduledEvents),
}

impl Source {
    /// The notice, once there is one. Cheap to call often: IMDS is asked at most
    /// once per the period given to [`Imds::new`].
    pub async fn poll(&mut self) -> Option<Notice> {
        match self {
            Source::File(path) => {
                #[derive(Deserialize)]
                struct File {
                    deadline_ms: u64,
                }
                let bytes = std::fs::read(path).ok()?;
                let f: File = serde_json::from_slice(&bytes).ok()?;
                Some(Notice {
                    deadline: Timestamp(f.deadline_ms),
                    ack: None,
                })
            }
            Source::Imds(imds) => imds.poll().await,
            Source::Azure(events) => events.poll().await,
        }
    }
}

/// How often to poll Azure's Scheduled Events (a Spot eviction gives 30 s).
pub const SCHEDULED_EVENTS_EVERY: Duration = Duration::from_secs(2);

/// Azure's Scheduled Events for one VM.
#[derive(Debug)]
pub struct ScheduledEvents {
    url: String,
    vm: String,
    http: reqwest::Client,
    pace: Pace,
}

#[derive(Debug, Deserialize)]
struct EventsDocument {
    #[serde(rename = "Events", default)]
    events: Vec<ScheduledEvent>,
}

#[derive(Debug, Deserialize)]
struct ScheduledEvent {
    #[serde(rename = "EventId")]
    id: String,
    #[serde(rename = "EventType")]
    kind: String,
    #[serde(rename = "Resources", default)]
    resources: Vec<String>,
    /// `Scheduled`, then `Started` once Azure acts.
    #[serde(rename = "EventStatus", default)]
    status: String,
    #[serde(rename = "NotBefore", default)]
    not_before: String,
}

impl ScheduledEvents {
    /// `url` is the endpoint with its API version
    /// (`http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01` on
    /// Azure); `vm` this VM's name, as events list it.
    pub fn new(url: &str, vm: &str, every: Duration) -> ScheduledEvents {
        ScheduledEvents {
            url: url.to_owned(),
            vm: vm.to_owned(),
            http: metadata_client(),
            pace: Pace::new(every),
        }
    }

    async fn poll(&mut self) -> Option<Notice> {
        if !self.pace.due() {
            return None;
        }
        let checked = self.check().await;
        self.pace.outcome(checked, "scheduled events", &self.url)
    }

    async fn check(&mut self) -> Result<Option<Notice>, String> {
        let resp = self
            .http
            .get(&self.url)
            .header("Metadata", "true")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let body = resp.text().await.map_err(|e| e.to_string())?;
        let doc: EventsDocument = serde_json::from_str(&body)
            .map_err(|e| format!("not what Scheduled Events sends ({e}): {body:?}"))?;
        let Some(event) = doc.events.into_iter().find(|e| {
            matches!(e.kind.as_str(), "Preempt" | "Terminate")
                && e.resources.iter().any(|r| r.eq_ignore_ascii_case(&self.vm))
        }) else {
            return Ok(None);
        };
        // NotBefore is an HTTP date; an event first seen `Started` (or without
        // one) is due now.
        let now = respawn_core::time::Clock::now(&respawn_core::time::SystemClock);
        let deadline = httpdate::parse_http_date(&event.not_before)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| Timestamp(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
            .filter(|_| event.status != "Started")
            .unwrap_or(now);
        info!(event_id = %event.id, kind = %event.kind, not_before = %event.not_before, "azure scheduled event for this vm");
        Ok(Some(Notice {
            deadline,
            ack: Some(Ack {
                url: self.url.clone(),
                event_id: event.id,
            }),
        }))
    }
}

/// An IMDSv2 client for the two interruption signals.
#[derive(Debug)]
pub struct Imds {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
    rebalance_seen: bool,
    pace: Pace,
}

#[derive(Debug, Deserialize)]
struct InstanceAction {
    action: String,
    time: String,
}

#[derive(Debug, Deserialize)]
struct Rebalance {
    #[serde(rename = "noticeTime")]
    notice_time: String,
}

impl Imds {
    /// `base` is the service's address, `http://169.254.169.254` on EC2.
    pub fn new(base: &str, every: Duration) -> Imds {
        Imds {
            base: base.trim_end_matches('/').to_owned(),
            http: metadata_client(),
            token: None,
            rebalance_seen: false,
            pace: Pace::new(every),
        }
    }

    async fn poll(&mut self) -> Option<Notice> {
        if !self.pace.due() {
            return None;
        }
        let checked = self.check().await;
        self.pace.outcome(checked, "instance metadata", &self.base)
    }

    async fn check(&mut self) -> Result<Option<Notice>, String> {
        if !self.rebalance_seen
            && let Some(body) = self
                .get("meta-data/events/recommendations/rebalance")
                .await?
        {
            self.rebalance_seen = true;
            let at = serde_json::from_str::<Rebalance>(&body)
                .map(|r| r.notice_time)
                .unwrap_or(body);
            info!(notice_time = %at, "rebalance recommendation: this spot VM is at elevated risk of interruption; the workload keeps running");
        }
        let Some(body) = self.get("meta-data/spot/instance-action").await? else {
            return Ok(None);
        };
        let action: InstanceAction = serde_json::from_str(&body)
            .map_err(|e| format!("spot/instance-action is not what EC2 sends ({e}): {body:?}"))?;
        let deadline = Timestamp::parse_rfc3339(&action.time).ok_or_else(|| {
            format!(
                "spot/instance-action time {:?} is not RFC 3339",
                action.time
            )
        })?;
        info!(action = %action.action, time = %action.time, "spot interruption scheduled");
        Ok(Some(Notice {
            deadline,
            ack: None,
        }))
    }

    /// GETs `latest/<path>` with a session token; `None` on 404 (nothing scheduled).
    async fn get(&mut self, path: &str) -> Result<Option<String>, String> {
        for _ in 0..2 {
            let token = match &self.token {
                Some(t) => t.clone(),
                None => self.new_token().await?,
            };
            let resp = self
                .http
                .get(format!("{}/latest/{path}", self.base))
                .header("X-aws-ec2-metadata-token", &token)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            match resp.status().as_u16() {
                200 => return resp.text().await.map(Some).map_err(|e| e.to_string()),
                404 => return Ok(None),
                // The session token expired: get another, once.
                401 => self.token = None,
                s => return Err(format!("{path}: HTTP {s}")),
            }
        }
        Err(format!("{path}: the service refused a fresh token"))
    }

    async fn new_token(&mut self) -> Result<String, String> {
        let resp = self
            .http
            .put(format!("{}/latest/api/token", self.base))
            .header(
                "X-aws-ec2-metadata-token-ttl-seconds",
                TOKEN_TTL_SECS.to_string(),
            )
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("api/token: HTTP {}", resp.status().as_u16()));
        }
        let token = resp.text().await.map_err(|e| e.to_string())?;
        self.token = Some(token.clone());
        Ok(token)
    }
}

#[cfg(test)]
mod tests;

//! Where the agent learns that its VM is about to be reclaimed.
//!
//! - Locally, the spot simulator writes `<vm dir>/notice.json`.
//! - On EC2, the instance metadata service (IMDSv2) answers
//!   `meta-data/spot/instance-action` with the action and its time once an
//!   interruption is scheduled (404 before), about two minutes ahead. A rebalance
//!   recommendation (`meta-data/events/recommendations/rebalance`) comes earlier and
//!   is no interruption: it is logged, and the workload keeps running.
//!
//! Either way the agent takes the same path: SIGTERM to the workload and a
//! `PreemptionNotice` report with the deadline.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use respawn_core::time::Timestamp;
use serde::Deserialize;
use tracing::{info, warn};

/// A scheduled reclaim of this VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    pub deadline: Timestamp,
}

/// How often EC2 says to poll the interruption notice.
pub const IMDS_EVERY: Duration = Duration::from_secs(5);
/// IMDSv2 session tokens live this long (the service's maximum is 6 hours).
const TOKEN_TTL_SECS: u32 = 21_600;

#[derive(Debug)]
pub enum Source {
    File(PathBuf),
    Imds(Imds),
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
                })
            }
            Source::Imds(imds) => imds.poll().await,
        }
    }
}

/// An IMDSv2 client for the two interruption signals.
#[derive(Debug)]
pub struct Imds {
    base: String,
    every: Duration,
    http: reqwest::Client,
    token: Option<String>,
    next: Instant,
    rebalance_seen: bool,
    unreachable_said: bool,
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
            every,
            // No proxy: the metadata service is link-local, and a proxy from the
            // environment must never see its token.
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            token: None,
            next: Instant::now(),
            rebalance_seen: false,
            unreachable_said: false,
        }
    }

    async fn poll(&mut self) -> Option<Notice> {
        if Instant::now() < self.next {
            return None;
        }
        self.next = Instant::now() + self.every;
        match self.check().await {
            Ok(notice) => notice,
            Err(e) => {
                // Said once: the agent polls every few seconds for hours.
                if !self.unreachable_said {
                    warn!(error = %e, base = %self.base, "instance metadata unreachable; no interruption notice until it answers");
                    self.unreachable_said = true;
                }
                None
            }
        }
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
        Ok(Some(Notice { deadline }))
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

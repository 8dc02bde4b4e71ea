//! The agent's channel to the broker: its API, with a credential that names this
//! attempt only (the broker refuses reports on any other). Reports go out in order
//! from a background task that retries through a broker restart, so supervising the
//! workload never waits on the network.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use respawn_core::JobId;
use respawn_core::lifecycle::Event;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a call to the broker did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Worth trying again (broker down or busy).
    #[error("broker unreachable or busy: {0}")]
    Retry(String),
    /// The broker said no; asking again will not change that.
    #[error("broker refused: {0}")]
    Refused(String),
}

/// The broker's API, as this attempt's agent may call it.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    /// The trace context requests carry when no traced span is current (the
    /// reporter's task, which must not hold the attempt's span open).
    parent: BTreeMap<String, String>,
}

impl Api {
    pub fn new(base: &str, token: String) -> Result<Api, Error> {
        // One client for the agent's life: a pool VM's attempts share its
        // connections, and building one (TLS roots) costs milliseconds.
        static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
        let http = match HTTP.get() {
            Some(c) => c.clone(),
            None => {
                let c = reqwest::Client::builder()
                    .timeout(TIMEOUT)
                    .build()
                    .map_err(|e| Error::Refused(format!("no HTTP client: {e}")))?;
                HTTP.get_or_init(|| c).clone()
            }
        };
        Ok(Api {
            parent: BTreeMap::new(),
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    async fn check(
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, Error> {
        // reqwest's errors name the URL, which holds nothing secret here.
        let resp = resp.map_err(|e| Error::Retry(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let msg = format!("{status}: {}", body.trim());
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(Error::Retry(msg))
        } else {
            Err(Error::Refused(msg))
        }
    }

    pub async fn report(&self, event: &Event) -> Result<(), Error> {
        let resp = self
            .traced(
                self.http
                    .post(format!("{}/v1/agent/events", self.base))
                    .bearer_auth(&self.token),
            )
            .json(&json!({ "event": event }))
            .send()
            .await;
        Self::check(resp).await.map(drop)
    }

    /// The job's spec, handed out only while this attempt is live, and the
    /// `traceparent` of the trace the job was submitted in (when traces are on).
    pub async fn spec(&self) -> Result<(respawn_core::spec::JobSpec, Option<String>), Error> {
        #[derive(Deserialize)]
        struct Answer {
            spec: respawn_core::spec::JobSpec,
            #[serde(default)]
            trace: Option<String>,
        }
        let a = self.get::<Answer>("spec").await?;
        Ok((a.spec, a.trace))
    }

    /// The job's secret values, handed out only while this attempt is live.
    pub async fn secrets(&self) -> Result<BTreeMap<String, String>, Error> {
        #[derive(Deserialize)]
        struct Answer {
            secrets: BTreeMap<String, String>,
        }
        Ok(self.get::<Answer>("secrets").await?.secrets)
    }

    /// A multi-node attempt's notice, if any node of its gang was given one, and
    /// with `peers` its nodes' addresses (once the provider knows them all).
    pub async fn gang(&self, peers: bool) -> Result<Gang, Error> {
        self.get(if peers { "gang?peers=true" } else { "gang" })
            .await
    }

    /// A pool VM's orders (this `Api` holds the VM's credential).
    pub async fn orders(&self) -> Result<respawn_core::pool::PoolOrders, Error> {
        self.get("assignment").await
    }

    /// `GET /v1/agent/<what>` with this attempt's credential.
    async fn get<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<T, Error> {
        let resp = self
            .traced(
                self.http
                    .get(format!("{}/v1/agent/{what}", self.base))
                    .bearer_auth(&self.token),
            )
            .send()
            .await;
        Self::check(resp)
            .await?
            .json()
            .await
            .map_err(|e| Error::Retry(format!("unreadable answer to {what}: {e}")))
    }
}

impl Api {
    /// `req` with the current span's trace context (else the one this `Api`
    /// was given), so that the broker's span of it is the attempt's child.
    fn traced(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let mut carried = respawn_telemetry::context();
        if carried.is_empty() {
            carried = self.parent.clone();
        }
        carried
            .into_iter()
            .fold(req, |req, (k, v)| req.header(k, v))
    }
}

/// What the broker says of a multi-node attempt's gang.
#[derive(Debug, Clone, Deserialize)]
pub struct Gang {
    /// The nodes' addresses in rank order, once all have one.
    pub hosts: Option<Vec<String>>,
    /// Set once any node of the gang has been given a preemption notice.
    pub notice_deadline_ms: Option<u64>,
}

enum Item {
    Event(Event),
    Flush(oneshot::Sender<()>),
}

/// Sends this attempt's events to the broker, in order.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Item>,
    heartbeat_queued: Arc<AtomicBool>,
    pub job: JobId,
    pub attempt: u32,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Event(e) => write!(f, "Event({})", e.kind()),
            Item::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Reporter {
    pub fn spawn(api: Api, job: JobId, attempt: u32) -> Reporter {
        let (tx, rx) = mpsc::unbounded_channel();
        let heartbeat_queued = Arc::new(AtomicBool::new(false));
        // Its reports are the attempt's, in the attempt's trace; the task holds
        // the context, not the span, which closes when the attempt's work does.
        let mut api = api;
        api.parent = respawn_telemetry::context();
        tokio::spawn(deliver(
            api,
            rx,
            heartbeat_queued.clone(),
            job.clone(),
            attempt,
        ));
        Reporter {
            tx,
            heartbeat_queued,
            job,
            attempt,
        }
    }

    /// Queues `event`; it is delivered after everything queued before it.
    pub fn send(&self, event: Event) {
        let _ = self.tx.send(Item::Event(event));
    }

    /// Queues a heartbeat unless one is still waiting to go out (a broker that is
    /// down needs one proof of life when it is back, not a backlog).
    pub fn heartbeat(&self) {
        if !self.heartbeat_queued.swap(true, Ordering::SeqCst) {
            self.send(Event::Heartbeat {
                attempt: self.attempt,
            });
        }
    }

    /// Waits until everything queued so far was delivered (or refused), at most
    /// `limit`; `false` when time ran out.
    pub async fn flush(&self, limit: Duration) -> bool {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Item::Flush(done)).is_err() {
            return false;
        }
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

async fn deliver(
    api: Api,
    mut rx: mpsc::UnboundedReceiver<Item>,
    heartbeat_queued: Arc<AtomicBool>,
    job: JobId,
    attempt: u32,
) {
    while let Some(item) = rx.recv().await {
        let event = match item {
            Item::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Item::Event(e) => e,
        };
        if matches!(event, Event::Heartbeat { .. }) {
            heartbeat_queued.store(false, Ordering::SeqCst);
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match api.report(&event).await {
                Ok(()) => {
                    debug!(job_id = %job, attempt, event = event.kind(), "reported");
                    break;
                }
                Err(Error::Refused(why)) => {
                    error!(job_id = %job, attempt, event = event.kind(), %why, "the broker refused a report");
                    break;
                }
                // A heartbeat is only worth its moment; the next one replaces it.
                Err(Error::Retry(_)) if matches!(event, Event::Heartbeat { .. }) => break,
                Err(Error::Retry(why)) => {
                    warn!(job_id = %job, attempt, event = event.kind(), %why, "report failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

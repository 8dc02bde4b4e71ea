//! What a broker counts, as Prometheus text (`GET /metrics`): jobs by state and
//! project, attempts by outcome, preemptions and the work they lost, the time from
//! submission to running and from a notice to the replacement running, dispatch
//! latency, VM time on spot and on demand with the saving estimated from configured
//! prices, checkpoint sizes and upload times, what waits in each of the broker's
//! queues and for how long, and API latency by route and status.
//!
//! Each is also an OpenTelemetry instrument of the global meter provider, which
//! `respawn_telemetry::init` points at the OTLP endpoint when `OTEL_*` names one
//! (and which does nothing otherwise): the functions' metrics go out that way,
//! each instance sending what it counted. The OTLP names follow OpenTelemetry's
//! conventions (`respawn.attempts`, `http.server.request.duration`, …).
//!
//! Nothing here is told what happened: [`MeteredLedger`] sits in front of the
//! ledger and compares each job's version with the one it replaces, so every
//! handler that writes a job is counted, whichever host runs it. Labels are bounded
//! (states, outcomes, projects, routes; never job ids).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter as OtelCounter, Histogram as OtelHistogram, ObservableGauge, UpDownCounter,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use respawn_core::job::{AttemptOutcome, JobId, JobRecord, JobState};
use respawn_core::ports::Ports;
use respawn_core::ports::ledger::{Error, Ledger, ListQuery, MAX_PAGE, Page};
use respawn_core::ports::queue::{Depth, dead_letter_queue};
use serde::Serialize;

/// On-demand and spot prices of one GPU-hour (or VM-hour, for `cpu`), by GPU
/// model: what the saving is estimated from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prices(pub BTreeMap<String, (f64, f64)>);

impl Prices {
    /// `RESPAWN_PRICES`, or none when it is not set.
    pub fn from_env() -> Result<Prices, String> {
        match std::env::var("RESPAWN_PRICES") {
            Ok(p) => p.parse().map_err(|e| format!("RESPAWN_PRICES: {e}")),
            Err(_) => Ok(Prices::default()),
        }
    }
}

impl std::str::FromStr for Prices {
    type Err = String;

    /// `model=SPOT/ON_DEMAND,…` in dollars an hour, e.g. `a10g=0.45/1.21,cpu=0.03/0.09`.
    fn from_str(s: &str) -> Result<Prices, String> {
        let mut by_model = BTreeMap::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let parsed = item.split_once('=').and_then(|(model, prices)| {
                let (spot, on_demand) = prices.split_once('/')?;
                let price = |p: &str| {
                    p.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|p| p.is_finite() && *p >= 0.0)
                };
                Some((model.trim().to_owned(), (price(spot)?, price(on_demand)?)))
            });
            let Some((model, prices)) = parsed.filter(|(m, _)| !m.is_empty()) else {
                return Err(format!(
                    "{item:?}: expected model=SPOT/ON_DEMAND (dollars an hour), e.g. a10g=0.45/1.21"
                ));
            };
            by_model.insert(model, prices);
        }
        Ok(Prices(by_model))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobLabels {
    state: String,
    project: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MarketLabels {
    market: String,
    gpu: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProjectLabels {
    project: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

/// One queue as `respawn status` shows it.
#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub name: String,
    /// Messages waiting (RabbitMQ: ready ones; SQS and Azure: approximate).
    pub messages: u64,
    /// How long the oldest has waited, where the queue says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_s: Option<f64>,
}

/// A preemption, as `respawn status` lists the last ones.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preemption {
    pub job: JobId,
    pub attempt: u32,
    /// When the attempt ended (ms since the epoch).
    pub at: u64,
    /// Seconds the workload ran past its last committed checkpoint.
    pub work_lost_s: Option<f64>,
}

const RECENT: usize = 10;

/// The broker's metrics; one per host process.
pub struct Metrics {
    registry: Registry,
    provider: String,
    prices: Prices,
    started: Instant,
    jobs: Family<JobLabels, Gauge>,
    submitted: Family<ProjectLabels, Counter>,
    attempts: Family<OutcomeLabels, Counter>,
    notices: Family<ProviderLabels, Counter>,
    preemptions: Family<ProviderLabels, Counter>,
    checkpoints: Counter,
    checkpoint_bytes: Histogram,
    checkpoint_upload: Histogram,
    queue_depth: Family<QueueLabels, Gauge>,
    queue_oldest: Family<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    work_lost: Histogram,
    submit_to_running: Histogram,
    dispatch: Histogram,
    notice_to_running: Histogram,
    vm_seconds: Family<MarketLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    saving: Counter<f64, std::sync::atomic::AtomicU64>,
    requests: Family<RequestLabels, Histogram>,
    otel: Otel,
    queues: Samples,
    /// Whether this host serves `/metrics` (one process that counts everything)
    /// or only exports (a function instance counts what it handled).
    served: bool,
    recent: Mutex<Vec<Preemption>>,
    /// GPU seconds on spot and on demand, for `respawn status`.
    spent: Mutex<(f64, f64)>,
    /// The jobs gauge's values by state (the gauge's family cannot be read back).
    by_state: Mutex<BTreeMap<String, i64>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Seconds, from a tenth of one to a day.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    [
        0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0,
        86400.0,
    ]
    .into_iter()
}

/// Bytes, from a kibibyte to a tebibyte by fours.
fn size_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1024.0, 4.0, 16)
}

fn request_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
    ]
    .into_iter()
}

fn outcome_name(o: &AttemptOutcome) -> &'static str {
    match o {
        AttemptOutcome::Succeeded => "succeeded",
        AttemptOutcome::Failed { .. } => "failed",
        AttemptOutcome::TimedOut => "timed_out",
        AttemptOutcome::Preempted => "preempted",
        AttemptOutcome::Lost { .. } => "lost",
        AttemptOutcome::AllocationFailed { .. } => "allocation_failed",
        AttemptOutcome::GangIncomplete { .. } => "gang_incomplete",
        AttemptOutcome::Stopped { .. } => "stopped",
    }
}

/// The same measurements as OpenTelemetry instruments, for OTLP.
struct Otel {
    jobs: UpDownCounter<i64>,
    submitted: OtelCounter<u64>,
    attempts: OtelCounter<u64>,
    notices: OtelCounter<u64>,
    preemptions: OtelCounter<u64>,
    checkpoints: OtelCounter<u64>,
    checkpoint_size: OtelHistogram<u64>,
    checkpoint_upload: OtelHistogram<f64>,
    work_lost: OtelHistogram<f64>,
    submit_to_running: OtelHistogram<f64>,
    dispatch: OtelHistogram<f64>,
    notice_to_running: OtelHistogram<f64>,
    gpu_time: OtelCounter<f64>,
    saving: OtelCounter<f64>,
    requests: OtelHistogram<f64>,
    /// Kept for their callbacks, which read [`Metrics`]'s latest queue samples:
    /// a queue that could not be read is left out, not repeated stale.
    _queue_depth: ObservableGauge<u64>,
    _queue_oldest: ObservableGauge<f64>,
}

/// The latest sample of each queue, by name.
type Samples = Arc<Mutex<BTreeMap<String, Depth>>>;

fn sampled(samples: &Samples) -> BTreeMap<String, Depth> {
    samples.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Otel {
    fn new(samples: &Samples) -> Otel {
        let m = opentelemetry::global::meter("respawn");
        let seconds = |name: &'static str, what: &'static str| {
            m.f64_histogram(name)
                .with_description(what)
                .with_unit("s")
                .with_boundaries(seconds_buckets().collect())
                .build()
        };
        let count = |name: &'static str, what: &'static str| {
            m.u64_counter(name).with_description(what).build()
        };
        Otel {
            jobs: m
                .i64_up_down_counter("respawn.jobs")
                .with_description("Jobs by state and project")
                .build(),
            submitted: count("respawn.jobs.submitted", "Jobs submitted, by project"),
            attempts: count("respawn.attempts", "Attempts ended, by outcome"),
            notices: count(
                "respawn.preemption.notices",
                "Preemption notices, by provider",
            ),
            preemptions: count(
                "respawn.preemptions",
                "Attempts ended by a preemption, by provider",
            ),
            checkpoints: count("respawn.checkpoints", "Checkpoints committed"),
            checkpoint_size: m
                .u64_histogram("respawn.checkpoint.size")
                .with_description("Size of each committed checkpoint")
                .with_unit("By")
                .with_boundaries(size_buckets().collect())
                .build(),
            checkpoint_upload: seconds(
                "respawn.checkpoint.upload.duration",
                "Upload time of each committed checkpoint",
            ),
            work_lost: seconds(
                "respawn.work_lost",
                "Per attempt ended by a preemption or loss: how long its workload ran past its last committed checkpoint",
            ),
            submit_to_running: seconds(
                "respawn.submit_to_running",
                "From a job's submission to its first workload running",
            ),
            dispatch: seconds(
                "respawn.dispatch.duration",
                "From an attempt's dispatch to its VM allocated",
            ),
            notice_to_running: seconds(
                "respawn.notice_to_replacement_running",
                "From a preemption notice to the next attempt's workload running",
            ),
            gpu_time: m
                .f64_counter("respawn.gpu_time")
                .with_description("GPU time of ended attempts, by market")
                .with_unit("s")
                .build(),
            saving: m
                .f64_counter("respawn.spot_saving")
                .with_description("Estimated saving of spot over on-demand prices")
                .with_unit("{USD}")
                .build(),
            requests: m
                .f64_histogram("http.server.request.duration")
                .with_description("API requests by method, route and status")
                .with_unit("s")
                .with_boundaries(request_buckets().collect())
                .build(),
            _queue_depth: {
                let samples = samples.clone();
                m.u64_observable_gauge("respawn.queue.depth")
                    .with_description("Messages waiting in each of the broker's queues")
                    .with_unit("{message}")
                    .with_callback(move |o| {
                        for (q, d) in sampled(&samples) {
                            o.observe(d.messages, &[kv("messaging.destination.name", q)]);
                        }
                    })
                    .build()
            },
            _queue_oldest: {
                let samples = samples.clone();
                m.f64_observable_gauge("respawn.queue.oldest_age")
                    .with_description(
                        "How long the oldest message in each queue has waited, where the queue says",
                    )
                    .with_unit("s")
                    .with_callback(move |o| {
                        for (q, d) in sampled(&samples) {
                            if let Some(age) = d.oldest {
                                o.observe(
                                    age.as_secs_f64(),
                                    &[kv("messaging.destination.name", q)],
                                );
                            }
                        }
                    })
                    .build()
            },
        }
    }
}

fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

impl Metrics {
    /// Metrics of a broker on `provider` (`local`, `ec2`, `azure`), its saving
    /// estimated from `prices`.
    pub fn new(provider: &str, prices: Prices) -> Metrics {
        let mut registry = Registry::with_prefix("respawn");
        let jobs = Family::<JobLabels, Gauge>::default();
        registry.register("jobs", "Jobs by state and project", jobs.clone());
        let submitted = Family::<ProjectLabels, Counter>::default();
        registry.register(
            "jobs_submitted",
            "Jobs submitted, by project",
            submitted.clone(),
        );
        let attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register("attempts", "Attempts ended, by outcome", attempts.clone());
        let notices = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "preemption_notices",
            "Preemption notices, by provider",
            notices.clone(),
        );
        let preemptions = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "preemptions",
            "Attempts ended by a preemption, by provider",
            preemptions.clone(),
        );
        let checkpoints = Counter::default();
        registry.register("checkpoints", "Checkpoints committed", checkpoints.clone());
        let checkpoint_bytes = Histogram::new(size_buckets());
        registry.register_with_unit(
            "checkpoint_size",
            "Size of each committed checkpoint, as its agent uploaded it",
            Unit::Bytes,
            checkpoint_bytes.clone(),
        );
        let checkpoint_upload = Histogram::new(seconds_buckets());
        registry.register_with_unit(
            "checkpoint_upload",
            "Upload time of each committed checkpoint, from its first file to its manifest",
            Unit::Seconds,
            checkpoint_upload.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Messages waiting in each of the broker's queues and their dead-letter queues, when scraped (RabbitMQ: ready ones; SQS and Azure: approximate)",
            queue_depth.clone(),
        );
        let queue_oldest =
            Family::<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "queue_oldest_age",
            "How long the oldest message in each queue has waited, when scraped, where the queue says (0: none waits)",
            Unit::Seconds,
            queue_oldest.clone(),
        );
        let work_lost = Histogram::new(seconds_buckets());
        registry.register_with_unit(
            "work_lost",
            "Per attempt ended by a preemption or loss: how long its workload ran past its last committed checkpoint",
            Unit::Seconds,
            work_lost.clone(),
        );
        let submit_to_running = Histogram::new(seconds_buckets());
        registry.register_with_unit(
            "submit_to_running",
            "From a job's submission to its first workload running",
            Unit::Seconds,
            submit_to_running.clone(),
        );
        let dispatch = Histogram::new(seconds_buckets());
        registry.register_with_unit(
            "dispatch",
            "From an attempt's dispatch to its VM allocated",
            Unit::Seconds,
            dispatch.clone(),
        );
        let notice_to_running = Histogram::new(seconds_buckets());
        registry.register_with_unit(
            "notice_to_replacement_running",
            "From a preemption notice to the next attempt's workload running",
            Unit::Seconds,
            notice_to_running.clone(),
        );
        let vm_seconds =
            Family::<MarketLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "gpu_time",
            "GPU time of ended attempts (VM time for CPU jobs, gpu=\"cpu\"), by market (spot, on_demand)",
            Unit::Seconds,
            vm_seconds.clone(),
        );
        let saving = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "spot_saving_dollars",
            "Estimated saving of spot over on-demand prices (RESPAWN_PRICES) on ended attempts",
            saving.clone(),
        );
        let requests: Family<RequestLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(request_buckets()));
        registry.register_with_unit(
            "api_request_duration",
            "API requests by method, route and status",
            Unit::Seconds,
            requests.clone(),
        );
        let queues = Samples::default();
        Metrics {
            registry,
            provider: provider.to_owned(),
            prices,
            started: Instant::now(),
            jobs,
            submitted,
            attempts,
            notices,
            preemptions,
            checkpoints,
            checkpoint_bytes,
            checkpoint_upload,
            queue_depth,
            queue_oldest,
            work_lost,
            submit_to_running,
            dispatch,
            notice_to_running,
            vm_seconds,
            saving,
            requests,
            otel: Otel::new(&queues),
            queues,
            served: true,
            recent: Mutex::new(Vec::new()),
            spent: Mutex::new((0.0, 0.0)),
            by_state: Mutex::new(BTreeMap::new()),
        }
    }

    /// These metrics, for a host of many instances (the functions): exported
    /// over OTLP, never served, since one instance counts only what it handled.
    pub fn exported_only(mut self) -> Metrics {
        self.served = false;
        self
    }

    /// Whether `/metrics` and `/v1/status` may show these.
    pub fn served(&self) -> bool {
        self.served
    }

    /// Counts the jobs `ledger` holds now, by state and project: the gauge the
    /// changes observed later move.
    pub async fn load(&self, ledger: &dyn Ledger) -> Result<(), Error> {
        let mut query = ListQuery {
            limit: MAX_PAGE,
            ..ListQuery::default()
        };
        loop {
            let Page { jobs, next } = ledger.list(&query).await?;
            for job in &jobs {
                self.count(job, 1);
            }
            match next {
                Some(after) => query.after = Some(after),
                None => return Ok(()),
            }
        }
    }

    /// Moves the count of `job`'s state and project by `by`.
    fn count(&self, job: &JobRecord, by: i64) {
        self.jobs
            .get_or_create(&JobLabels {
                state: job.state.as_str().to_owned(),
                project: job.project.clone(),
            })
            .inc_by(by);
        // Only a host that counted every job first has totals to move; a
        // function instance's moves alone would add up to nothing meaningful.
        if self.served {
            self.otel.jobs.add(
                by,
                &[
                    kv("state", job.state.as_str()),
                    kv("project", job.project.clone()),
                ],
            );
        }
        *self
            .by_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(job.state.as_str().to_owned())
            .or_insert(0) += by;
    }

    /// Jobs by state, every project.
    pub fn jobs_by_state(&self) -> BTreeMap<String, i64> {
        self.by_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What changed from `before` (`None`: a new job) to `after`.
    pub fn observe(&self, before: Option<&JobRecord>, after: &JobRecord) {
        let Some(before) = before else {
            self.submitted
                .get_or_create(&ProjectLabels {
                    project: after.project.clone(),
                })
                .inc();
            self.otel
                .submitted
                .add(1, &[kv("project", after.project.clone())]);
            self.count(after, 1);
            return;
        };
        if before.state != after.state {
            self.count(before, -1);
            self.count(after, 1);
        }
        if before.state == JobState::Allocating
            && after.state == JobState::Starting
            && let Some(a) = after.current()
        {
            let took = after.state_since.since(a.dispatched_at).as_secs_f64();
            self.dispatch.observe(took);
            self.otel.dispatch.record(took, &[]);
        }
        for a in &after.attempts {
            let was = before.attempts.iter().find(|b| b.number == a.number);
            if let Some(at) = a.started_at
                && was.is_none_or(|w| w.started_at.is_none())
            {
                let first = !after
                    .attempts
                    .iter()
                    .any(|b| b.number < a.number && b.started_at.is_some());
                if first {
                    let took = at.since(after.created_at).as_secs_f64();
                    self.submit_to_running.observe(took);
                    self.otel.submit_to_running.record(took, &[]);
                }
                if let Some(d) = after.notice_to_resume(a.number.saturating_sub(1)) {
                    self.notice_to_running.observe(d.as_secs_f64());
                    self.otel.notice_to_running.record(d.as_secs_f64(), &[]);
                }
            }
            if a.noticed_at.is_some() && was.is_none_or(|w| w.noticed_at.is_none()) {
                self.notices.get_or_create(&self.provider_labels()).inc();
                self.otel.notices.add(1, &self.provider_kv());
            }
            if a.last_checkpoint != was.and_then(|w| w.last_checkpoint) {
                self.checkpoints.inc();
                self.otel.checkpoints.add(1, &[]);
                if let Some(u) = a.checkpoint_upload {
                    let took = Duration::from_millis(u.millis).as_secs_f64();
                    self.checkpoint_bytes.observe(u.bytes as f64);
                    self.checkpoint_upload.observe(took);
                    self.otel.checkpoint_size.record(u.bytes, &[]);
                    self.otel.checkpoint_upload.record(took, &[]);
                }
            }
            if let Some(outcome) = &a.outcome
                && was.is_none_or(|w| w.outcome.is_none())
            {
                self.ended(after, a, outcome);
            }
        }
    }

    /// A job's GPU model as a label: one the prices name or a well-known one;
    /// any other (a job names its own, and a label set must stay bounded) is
    /// `other`.
    fn gpu_label(&self, model: Option<&str>) -> String {
        const KNOWN: [&str; 16] = [
            "a10", "a100", "a10g", "b200", "h100", "h200", "k80", "l4", "l40s", "m60", "mi300x",
            "p100", "p4", "t4", "v100", "gpu",
        ];
        let model = model.unwrap_or("gpu").to_ascii_lowercase();
        if KNOWN.contains(&model.as_str()) || self.prices.0.contains_key(&model) {
            model
        } else {
            "other".to_owned()
        }
    }

    fn provider_labels(&self) -> ProviderLabels {
        ProviderLabels {
            provider: self.provider.clone(),
        }
    }

    fn provider_kv(&self) -> [KeyValue; 1] {
        [kv("provider", self.provider.clone())]
    }

    fn ended(&self, job: &JobRecord, a: &respawn_core::job::Attempt, outcome: &AttemptOutcome) {
        self.attempts
            .get_or_create(&OutcomeLabels {
                outcome: outcome_name(outcome).to_owned(),
            })
            .inc();
        self.otel
            .attempts
            .add(1, &[kv("outcome", outcome_name(outcome))]);
        let lost = a.work_lost();
        if let Some(lost) = lost {
            self.work_lost.observe(lost.as_secs_f64());
            self.otel.work_lost.record(lost.as_secs_f64(), &[]);
        }
        if *outcome == AttemptOutcome::Preempted {
            self.preemptions
                .get_or_create(&self.provider_labels())
                .inc();
            self.otel.preemptions.add(1, &self.provider_kv());
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.push(Preemption {
                job: job.id.clone(),
                attempt: a.number,
                at: a.ended_at.map_or(0, |t| t.as_millis()),
                work_lost_s: lost.map(|d| d.as_secs_f64()),
            });
            let excess = recent.len().saturating_sub(RECENT);
            recent.drain(..excess);
        }
        let Some(vm_time) = a.vm_time() else {
            return;
        };
        let r = &job.spec.resources;
        let (model, units) = if r.gpus > 0 {
            (self.gpu_label(r.gpu_type.as_deref()), f64::from(r.gpus))
        } else {
            ("cpu".to_owned(), 1.0)
        };
        let seconds = vm_time.as_secs_f64() * units * f64::from(r.nodes.max(1));
        let market = if a.spot { "spot" } else { "on_demand" };
        {
            let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
            if a.spot {
                spent.0 += seconds;
            } else {
                spent.1 += seconds;
            }
        }
        self.vm_seconds
            .get_or_create(&MarketLabels {
                market: market.to_owned(),
                gpu: model.clone(),
            })
            .inc_by(seconds);
        self.otel
            .gpu_time
            .add(seconds, &[kv("market", market), kv("gpu", model.clone())]);
        if a.spot
            && let Some((spot, on_demand)) = self.prices.0.get(&model)
        {
            let saved = (on_demand - spot).max(0.0) * seconds / 3600.0;
            self.saving.inc_by(saved);
            self.otel.saving.add(saved, &[]);
        }
    }

    /// What waits in each of the broker's queues and their dead-letter queues, now;
    /// the queue gauges set to it. Queues that cannot say are left out.
    pub async fn sample_queues(&self, ports: &Ports) -> Vec<QueueStatus> {
        let q = &ports.queues;
        let names: Vec<String> = [&q.submit, &q.dispatch, &q.events, &q.notify]
            .into_iter()
            .flat_map(|n| [n.clone(), dead_letter_queue(n)])
            .collect();
        let depths = futures::future::join_all(names.iter().map(|n| ports.queue.depth(n))).await;
        let mut out = Vec::new();
        for (name, depth) in names.into_iter().zip(depths) {
            let depth = depth.unwrap_or_else(|e| {
                tracing::warn!(queue = %name, error = %e, "cannot tell what waits in a queue");
                None
            });
            self.queue(&name, depth);
            if let Some(d) = depth {
                out.push(QueueStatus {
                    name,
                    messages: d.messages,
                    oldest_s: d.oldest.map(|a| a.as_secs_f64()),
                });
            }
        }
        out
    }

    /// What waits in the queue named `name` now, as its queue says (`None`
    /// where it cannot, or could not be read: its series are left out, never
    /// kept at an older value); the oldest's age only where the queue says.
    pub fn queue(&self, name: &str, depth: Option<Depth>) {
        let labels = QueueLabels {
            queue: name.to_owned(),
        };
        {
            let mut samples = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            match depth {
                Some(d) => samples.insert(name.to_owned(), d),
                None => samples.remove(name),
            };
        }
        let Some(d) = depth else {
            self.queue_depth.remove(&labels);
            self.queue_oldest.remove(&labels);
            return;
        };
        self.queue_depth
            .get_or_create(&labels)
            .set(i64::try_from(d.messages).unwrap_or(i64::MAX));
        match d.oldest {
            Some(age) => {
                self.queue_oldest
                    .get_or_create(&labels)
                    .set(age.as_secs_f64());
            }
            None => {
                self.queue_oldest.remove(&labels);
            }
        }
    }

    /// One API request answered.
    pub fn request(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .observe(took.as_secs_f64());
        self.otel.requests.record(
            took.as_secs_f64(),
            &[
                kv("http.request.method", method.to_owned()),
                kv("http.route", route.to_owned()),
                kv("http.response.status_code", i64::from(status)),
            ],
        );
    }

    /// The Prometheus text exposition of everything counted.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The last preemptions, oldest first.
    pub fn recent_preemptions(&self) -> Vec<Preemption> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// GPU (or CPU VM) hours so far on spot and on demand, and the estimated
    /// saving in dollars.
    pub fn spend(&self) -> (f64, f64, f64) {
        let (spot, on_demand) = *self.spent.lock().unwrap_or_else(|p| p.into_inner());
        (spot / 3600.0, on_demand / 3600.0, self.saving.get())
    }
}

/// The ledger, every change to a job observed by [`Metrics`] once it is stored.
pub struct MeteredLedger {
    inner: Arc<dyn Ledger>,
    metrics: Arc<Metrics>,
    /// The last version of each live job this ledger handed out or stored: an
    /// update is compared with the version it replaces, which is nearly always
    /// the one just read, without reading it again.
    seen: Mutex<HashMap<JobId, JobRecord>>,
}

impl fmt::Debug for MeteredLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredLedger")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Jobs [`MeteredLedger`] remembers at most; past it, it forgets them all (and
/// reads the earlier version for the next updates).
const SEEN: usize = 4096;

impl MeteredLedger {
    pub fn new(inner: Arc<dyn Ledger>, metrics: Arc<Metrics>) -> MeteredLedger {
        MeteredLedger {
            inner,
            metrics,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn remember(&self, r: &JobRecord) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if r.state.is_terminal() {
            seen.remove(&r.id);
            return;
        }
        if seen.len() >= SEEN && !seen.contains_key(&r.id) {
            seen.clear();
        }
        seen.insert(r.id.clone(), r.clone());
    }

    /// The version `record` was made from: an update succeeds only over it.
    async fn replaced(&self, record: &JobRecord) -> Result<JobRecord, Error> {
        let known = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&record.id)
            .filter(|b| b.version == record.version)
            .cloned();
        match known {
            Some(b) => Ok(b),
            // A read now sees it too, or a later version, in which case the
            // update fails and nothing is observed.
            None => self.inner.get(&record.id).await,
        }
    }
}

#[async_trait]
impl Ledger for MeteredLedger {
    async fn create(&self, record: JobRecord) -> Result<JobRecord, Error> {
        let made = self.inner.create(record).await?;
        self.metrics.observe(None, &made);
        self.remember(&made);
        Ok(made)
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord, Error> {
        let r = self.inner.get(id).await?;
        self.remember(&r);
        Ok(r)
    }

    async fn update(&self, record: JobRecord) -> Result<JobRecord, Error> {
        let before = self.replaced(&record).await;
        let stored = self.inner.update(record).await?;
        match before {
            Ok(before) => self.metrics.observe(Some(&before), &stored),
            // Not a new job: what changed is unknown, so nothing is counted.
            Err(e) => {
                tracing::warn!(job_id = %stored.id, error = %e, "cannot read a job's earlier version; this change is not counted");
            }
        }
        self.remember(&stored);
        Ok(stored)
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        self.inner.list(query).await
    }

    async fn find_by_idempotency_key(
        &self,
        project: &str,
        key: &str,
    ) -> Result<Option<JobId>, Error> {
        self.inner.find_by_idempotency_key(project, key).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_and_say_what_is_wrong() {
        let p: Prices = "a10g=0.45/1.21, cpu=0.03/0.09".parse().unwrap();
        assert_eq!(p.0["a10g"], (0.45, 1.21));
        assert_eq!(p.0["cpu"], (0.03, 0.09));
        assert_eq!("".parse::<Prices>().unwrap(), Prices::default());
        for bad in ["a10g=0.45", "a10g=x/1", "=1/2", "a10g=-1/2", "a10g=1/NaN"] {
            let e = bad.parse::<Prices>().unwrap_err();
            assert!(e.contains("model=SPOT/ON_DEMAND"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_jobs_own_gpu_model_is_no_label_of_its_own() {
        let m = Metrics::new("local", "h9000=1/2".parse().unwrap());
        assert_eq!(m.gpu_label(Some("A100")), "a100");
        assert_eq!(m.gpu_label(Some("h9000")), "h9000", "priced, so known");
        assert_eq!(m.gpu_label(Some("gpu-of-job-01J9")), "other");
        assert_eq!(m.gpu_label(None), "gpu");
    }

    /// Two instances over one ledger (function instances): each counts the
    /// changes it stores, compared with the version it replaced, whether it
    /// read that version itself or not; a stale copy it kept never counts.
    #[tokio::test]
    async fn metered_ledgers_count_each_change_once_whoever_read_it() {
        use respawn_core::spec::{Format, parse};
        use respawn_core::time::Timestamp;

        let shared: Arc<dyn Ledger> = Arc::new(respawn_adapters::memory::MemoryLedger::default());
        let (ma, mb) = (
            Arc::new(Metrics::new("ec2", Prices::default()).exported_only()),
            Arc::new(Metrics::new("ec2", Prices::default()).exported_only()),
        );
        let a = MeteredLedger::new(shared.clone(), ma.clone());
        let b = MeteredLedger::new(shared.clone(), mb.clone());
        let now = Timestamp(1_000);
        let spec = parse("name: counted\ncommand: [\"true\"]\n", Format::Yaml).unwrap();
        let made = a
            .create(JobRecord::new(JobId::generate(now), "default", spec, now))
            .await
            .unwrap();
        // B reads it and moves it on; A still holds the version it made.
        let mut next = b.get(&made.id).await.unwrap();
        next.state = JobState::Allocating;
        b.update(next).await.unwrap();
        // A's update over its stale copy loses the compare-and-swap: not counted.
        let mut stale = made.clone();
        stale.state = JobState::Cancelled;
        assert!(a.update(stale).await.is_err());
        // A reads the current version and moves it on: counted once, from
        // Allocating.
        let mut current = a.get(&made.id).await.unwrap();
        current.state = JobState::Cancelled;
        a.update(current).await.unwrap();
        let a_counts = ma.jobs_by_state();
        assert_eq!(a_counts.get("pending"), Some(&1), "{a_counts:?}");
        assert_eq!(a_counts.get("allocating"), Some(&-1), "{a_counts:?}");
        assert_eq!(a_counts.get("cancelled"), Some(&1), "{a_counts:?}");
        let b_counts = mb.jobs_by_state();
        assert_eq!(b_counts.get("pending"), Some(&-1), "{b_counts:?}");
        assert_eq!(b_counts.get("allocating"), Some(&1), "{b_counts:?}");
        // An update whose earlier version cannot be read (and was not seen)
        // counts nothing: above all, no new submission.
        let mc = Arc::new(Metrics::new("ec2", Prices::default()).exported_only());
        let blind = MeteredLedger::new(Arc::new(NoReads(shared.clone())), mc.clone());
        let mut current = shared.get(&made.id).await.unwrap();
        current.state = JobState::Pending;
        blind.update(current).await.unwrap();
        assert!(mc.jobs_by_state().is_empty(), "{:?}", mc.jobs_by_state());
        assert!(!mc.render().contains("respawn_jobs_submitted_total{"));
    }

    /// A ledger whose reads fail.
    #[derive(Debug)]
    struct NoReads(Arc<dyn Ledger>);

    #[async_trait]
    impl Ledger for NoReads {
        async fn create(&self, r: JobRecord) -> Result<JobRecord, Error> {
            self.0.create(r).await
        }
        async fn get(&self, _: &JobId) -> Result<JobRecord, Error> {
            Err(Error::Unavailable("reads are down".into()))
        }
        async fn update(&self, r: JobRecord) -> Result<JobRecord, Error> {
            self.0.update(r).await
        }
        async fn list(&self, q: &ListQuery) -> Result<Page, Error> {
            self.0.list(q).await
        }
        async fn find_by_idempotency_key(&self, p: &str, k: &str) -> Result<Option<JobId>, Error> {
            self.0.find_by_idempotency_key(p, k).await
        }
    }

    #[test]
    fn the_exposition_names_every_series_with_its_help() {
        let m = Metrics::new("local", Prices::default());
        m.request("GET", "/v1/jobs/{id}", 200, Duration::from_millis(3));
        let text = m.render();
        for series in [
            "# HELP respawn_checkpoints Checkpoints committed.",
            "# TYPE respawn_work_lost_seconds histogram",
            "respawn_api_request_duration_seconds_count{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"200\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(series), "{series}:\n{text}");
        }
    }
}

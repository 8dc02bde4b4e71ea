//! The job record the ledger stores: the redacted spec, the lifecycle state, the
//! attempt history and the outbox of side effects still to be carried out.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::lifecycle::Command;
use crate::spec::JobSpec;
use crate::time::Timestamp;

/// A job's id: a ULID, stable across attempts, sortable by submission time.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A new id whose time part is `now`.
    pub fn generate(now: Timestamp) -> JobId {
        let t = now.to_system_time();
        JobId(ulid::Ulid::from_datetime(t).to_string().to_lowercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a string is not a job id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a job id: {0:?} (expected 26 letters and digits, as `respawn jobs` prints)")]
pub struct BadJobId(String);

impl FromStr for JobId {
    type Err = BadJobId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Ids end up in object keys and file names: admit only what a ULID can hold.
        if s.len() == 26 && s.chars().all(|c| c.is_ascii_alphanumeric()) {
            Ok(JobId(s.to_ascii_lowercase()))
        } else {
            Err(BadJobId(s.to_owned()))
        }
    }
}

/// Where a job is in its lifecycle.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for capacity; the next attempt has not been dispatched yet.
    Pending,
    /// The attempt was dispatched and a VM requested.
    Allocating,
    /// The VM exists; the agent is restoring the checkpoint and starting the workload.
    Starting,
    Running,
    /// A preemption notice arrived; the workload is draining (writing a last checkpoint).
    Preempted,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Allocating,
        JobState::Starting,
        JobState::Running,
        JobState::Preempted,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// States in which an attempt holds (or is getting) a VM.
    pub fn has_live_attempt(self) -> bool {
        matches!(
            self,
            JobState::Allocating | JobState::Starting | JobState::Running | JobState::Preempted
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Allocating => "allocating",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Preempted => "preempted",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown state {s:?}; expected one of pending, allocating, starting, running, preempted, succeeded, failed, cancelled")
            })
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttemptOutcome {
    Succeeded,
    /// The workload exited non-zero: counts against `retry.max_failures`.
    Failed {
        exit_code: i32,
    },
    /// Ran past `limits.max_runtime`: counts against `retry.max_failures`.
    TimedOut,
    /// Preempted after a notice: an infrastructure loss.
    Preempted,
    /// The VM vanished, stopped reporting, or the exit code is listed as infrastructure: an infrastructure loss.
    Lost {
        reason: String,
    },
    /// No VM could be had: an infrastructure loss.
    AllocationFailed {
        reason: String,
    },
    /// A multi-node attempt's nodes did not all come up in `placement.gang_timeout`:
    /// a capacity miss, which spends no budget.
    GangIncomplete {
        reason: String,
    },
    /// The job was cancelled or gave up while this attempt was live.
    Stopped {
        reason: String,
    },
}

impl AttemptOutcome {
    /// Whether this outcome spends the infrastructure budget rather than the user's.
    pub fn is_infra_loss(&self) -> bool {
        matches!(
            self,
            AttemptOutcome::Preempted
                | AttemptOutcome::Lost { .. }
                | AttemptOutcome::AllocationFailed { .. }
        )
    }
}

/// How one checkpoint's upload went, as its agent measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointUpload {
    /// The checkpoint's files, in bytes (the manifest's sizes).
    pub bytes: u64,
    /// From the first file's upload to its manifest written, in milliseconds.
    pub millis: u64,
}

/// One try at running the job, on one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Attempt {
    /// 1, 2, …
    pub number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub dispatched_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Timestamp>,
    /// The checkpoint this attempt resumed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_checkpoint: Option<u64>,
    /// The newest checkpoint this attempt committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<u64>,
    /// When a preemption notice says the VM goes away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempt_deadline: Option<Timestamp>,
    /// When the preemption notice came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noticed_at: Option<Timestamp>,
    /// When `last_checkpoint` was committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointed_at: Option<Timestamp>,
    /// How `last_checkpoint`'s upload went, as the agent measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_upload: Option<CheckpointUpload>,
    /// Whether the attempt's VM is spot (or low-priority) capacity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spot: bool,
    /// The ranks after 0 of a multi-node attempt that reported ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ready_nodes: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptOutcome>,
}

impl Attempt {
    pub fn is_live(&self) -> bool {
        self.outcome.is_none()
    }

    /// The work an attempt ended by the infrastructure lost: the time its
    /// workload ran past its last committed checkpoint (from its start, when it
    /// committed none). `None` for an attempt that did not run, or ended otherwise.
    pub fn work_lost(&self) -> Option<Duration> {
        if !matches!(
            self.outcome,
            Some(AttemptOutcome::Preempted | AttemptOutcome::Lost { .. })
        ) {
            return None;
        }
        let ran_from = self.checkpointed_at.or(self.started_at)?;
        Some(self.ended_at?.since(ran_from))
    }

    /// How long the attempt's VM ran (from allocation to the attempt's end), or
    /// `None` while it is live or when it got no VM.
    pub fn vm_time(&self) -> Option<Duration> {
        self.vm.as_ref()?;
        Some(self.ended_at?.since(self.dispatched_at))
    }
}

/// Everything the ledger knows about one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobRecord {
    pub id: JobId,
    /// Bumped by the ledger on every successful update; the compare-and-swap token.
    pub version: u64,
    /// The project that owns the job.
    pub project: String,
    /// The spec as submitted, secrets redacted.
    pub spec: JobSpec,
    pub state: JobState,
    /// The current attempt's number, or the next one's while pending.
    pub attempt: u32,
    pub attempts: Vec<Attempt>,
    /// User-code failures spent (exit codes, timeouts).
    pub failures: u32,
    /// Infrastructure losses absorbed (preemptions, lost VMs, no capacity).
    pub infra_losses: u32,
    /// Of those, the ones that were not preemptions (lost VMs, agents that could not
    /// start, VM requests never answered): `retry.max_lost` bounds them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost: u32,
    /// Times in a row the current attempt found no capacity; it waits (no budget
    /// spent) and is dispatched again after a backoff that grows with this.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub capacity_waits: u32,
    /// Since when the current attempt has waited for capacity (its first miss):
    /// after `placement.on_demand_after`, it asks for on-demand capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Timestamp>,
    /// The newest complete checkpoint, which the next attempt restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// When the job entered its current state.
    pub state_since: Timestamp,
    /// When the current attempt was last put on the dispatch queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<Timestamp>,
    /// Times reconcile put the current attempt on the dispatch queue again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redispatches: u32,
    /// Why the job ended, for failed and cancelled jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Side effects decided by a transition and not yet confirmed done. Written in the
    /// same compare-and-swap as the transition, so a crash never loses one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Command>,
    /// The latest outbound notification attempts (newest last, at most
    /// [`MAX_NOTIFICATIONS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<NotificationAttempt>,
    /// Where a queue submitter asked for status events (AMQP `reply_to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
    /// The W3C `traceparent` of the span the job was submitted in, when traces
    /// are on: every attempt's agent continues that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// A queue reply address: the submitter's queue and its correlation id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplyTo {
    pub queue: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl ReplyTo {
    /// The pseudo-URL a notification to this address carries.
    pub fn as_url(&self) -> String {
        format!("{REPLY_SCHEME}{}", self.queue)
    }
}

/// Notifications whose URL starts with this go to a queue, not over HTTP.
pub const REPLY_SCHEME: &str = "amqp-reply:";

/// Notification attempts kept per job.
pub const MAX_NOTIFICATIONS: usize = 50;

/// One POST of a state change to a notify URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NotificationAttempt {
    pub url: String,
    pub state: JobState,
    /// 1 for the first try.
    pub try_number: u32,
    pub at: Timestamp,
    /// The HTTP status, when there was an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub delivered: bool,
}

impl JobRecord {
    /// A new pending job. `spec` should already be redacted.
    pub fn new(id: JobId, project: impl Into<String>, spec: JobSpec, now: Timestamp) -> Self {
        JobRecord {
            id,
            version: 0,
            project: project.into(),
            spec,
            state: JobState::Pending,
            attempt: 1,
            attempts: Vec::new(),
            failures: 0,
            infra_losses: 0,
            lost: 0,
            capacity_waits: 0,
            waiting_since: None,
            checkpoint: None,
            created_at: now,
            updated_at: now,
            state_since: now,
            dispatched_at: None,
            redispatches: 0,
            reason: None,
            outbox: Vec::new(),
            notifications: Vec::new(),
            reply_to: None,
            trace: None,
        }
    }

    /// The current attempt, if it has been dispatched.
    /// From attempt `number`'s preemption notice to the next attempt's workload
    /// starting: what the preemption cost in time.
    pub fn notice_to_resume(&self, number: u32) -> Option<Duration> {
        let at = |n: u32| self.attempts.iter().find(|a| a.number == n);
        let noticed = at(number)?.noticed_at?;
        Some(at(number + 1)?.started_at?.since(noticed))
    }

    pub fn current(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.number == self.attempt)
    }

    pub fn current_mut(&mut self) -> Option<&mut Attempt> {
        let n = self.attempt;
        self.attempts.last_mut().filter(|a| a.number == n)
    }

    /// Preemptions among the attempts so far.
    pub fn preemptions(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.outcome == Some(AttemptOutcome::Preempted))
            .count()
    }

    /// The `(project, key)` scope an idempotency key is unique in.
    pub fn idempotency_scope(&self) -> Option<String> {
        self.spec
            .idempotency_key
            .as_ref()
            .map(|k| idempotency_scope(&self.project, k))
    }
}

/// One string for a project-scoped idempotency key.
pub fn idempotency_scope(project: &str, key: &str) -> String {
    format!("{project}\u{1f}{key}")
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

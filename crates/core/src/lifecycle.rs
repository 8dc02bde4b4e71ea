//! The job lifecycle as a pure function: `(record, event, time) → (record, commands)`.
//!
//! ```text
//! Pending ─Dispatch→ Allocating ─VmAllocated→ Starting ─WorkloadStarted→ Running ─exit 0→ Succeeded
//!    ↑     ↑             │                        │                         │
//!    │     └─ same attempt, after a backoff ←─ no capacity (nothing spent)  │
//!    └── new attempt ←── infrastructure loss (preemption; lost VM, while `retry.max_lost` lasts)
//!    └── new attempt ←── user failure (non-zero exit), while `retry.max_failures` lasts → else Failed
//! any non-terminal ─CancelRequested→ Cancelled;  ─past limits.max_wait→ Failed
//! ```
//!
//! Every event names the attempt it concerns; events for an older attempt change
//! nothing, which is what makes redelivery harmless. Time comes from the event, never
//! from a clock, so replaying the same events gives the same record.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::job::{Attempt, AttemptOutcome, CheckpointUpload, JobRecord, JobState};
use crate::time::Timestamp;

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The scheduler took the attempt off the dispatch queue: request a VM.
    Dispatch {
        attempt: u32,
        /// The capacity waits the attempt had when this dispatch was sent: a
        /// dispatch from before a later wait is stale, as one of an older attempt is.
        #[serde(default, skip_serializing_if = "is_zero")]
        waits: u32,
    },
    /// The provider accepted the request for a VM.
    VmAllocated {
        attempt: u32,
        vm: String,
        /// Whether it is spot (or low-priority) capacity, not on-demand.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        spot: bool,
    },
    /// The provider has no capacity for this attempt right now: the attempt waits
    /// and is dispatched again later, without spending a budget.
    AllocationFailed {
        attempt: u32,
        reason: String,
    },
    /// The provider can never run this job as specified (e.g. more GPUs than any VM has).
    Unschedulable {
        attempt: u32,
        reason: String,
    },
    /// The agent on the attempt's VM is alive.
    Heartbeat {
        attempt: u32,
    },
    /// The agent could not set the attempt up (job spec unreadable, work folder or
    /// checkpoint restore failed): the VM is lost for this attempt.
    StartFailed {
        attempt: u32,
        reason: String,
    },
    /// Node `rank` (1 and up) of a multi-node attempt is up, knows its peers and
    /// starts its share of the workload. The attempt runs once rank 0 has started
    /// and every other rank is ready: until then no node runs alone.
    NodeReady {
        attempt: u32,
        rank: u32,
    },
    /// The agent restored the checkpoint (if any) and started the workload.
    WorkloadStarted {
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restored_checkpoint: Option<u64>,
    },
    /// A checkpoint was fully uploaded and its manifest written.
    CheckpointCommitted {
        attempt: u32,
        seq: u64,
        /// Its size and upload time, for the broker's metrics.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload: Option<CheckpointUpload>,
    },
    /// The provider will reclaim the VM at `deadline`.
    PreemptionNotice {
        attempt: u32,
        deadline: Timestamp,
    },
    /// The workload exited (after outputs were uploaded).
    WorkloadExited {
        attempt: u32,
        exit_code: i32,
    },
    /// The VM is gone.
    VmTerminated {
        attempt: u32,
        reason: String,
    },
    CancelRequested {
        reason: String,
    },
    /// Periodic repair: deadlines, lost VMs, lost dispatches.
    ReconcileTick,
}

impl Event {
    /// The attempt the event concerns, if it concerns one.
    pub fn attempt(&self) -> Option<u32> {
        match self {
            Event::Dispatch { attempt, .. }
            | Event::VmAllocated { attempt, .. }
            | Event::AllocationFailed { attempt, .. }
            | Event::Unschedulable { attempt, .. }
            | Event::Heartbeat { attempt }
            | Event::StartFailed { attempt, .. }
            | Event::NodeReady { attempt, .. }
            | Event::WorkloadStarted { attempt, .. }
            | Event::CheckpointCommitted { attempt, .. }
            | Event::PreemptionNotice { attempt, .. }
            | Event::WorkloadExited { attempt, .. }
            | Event::VmTerminated { attempt, .. } => Some(*attempt),
            Event::CancelRequested { .. } | Event::ReconcileTick => None,
        }
    }

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Dispatch { .. } => "dispatch",
            Event::VmAllocated { .. } => "vm_allocated",
            Event::AllocationFailed { .. } => "allocation_failed",
            Event::Unschedulable { .. } => "unschedulable",
            Event::Heartbeat { .. } => "heartbeat",
            Event::StartFailed { .. } => "start_failed",
            Event::NodeReady { .. } => "node_ready",
            Event::WorkloadStarted { .. } => "workload_started",
            Event::CheckpointCommitted { .. } => "checkpoint_committed",
            Event::PreemptionNotice { .. } => "preemption_notice",
            Event::WorkloadExited { .. } => "workload_exited",
            Event::VmTerminated { .. } => "vm_terminated",
            Event::CancelRequested { .. } => "cancel_requested",
            Event::ReconcileTick => "reconcile_tick",
        }
    }
}

/// A side effect a transition asks for. Each is idempotent, so carrying one out
/// twice (after a crash, or by two racing handlers) is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Put the attempt on the dispatch queue, after `delay_ms`.
    Dispatch {
        attempt: u32,
        priority: u8,
        delay_ms: u64,
        /// See [`Event::Dispatch`].
        #[serde(default, skip_serializing_if = "is_zero")]
        waits: u32,
    },
    /// Ask the compute provider for the attempt's VM(s).
    Allocate { attempt: u32 },
    /// Give the attempt's VM(s) back.
    Release { attempt: u32 },
    /// Tell the job's notify URLs that it entered `state`. Added by the handlers
    /// (not by [`apply`]) to every transition of a job that has notify URLs.
    Notify { state: JobState, at: Timestamp },
    /// Delete the job's secret values: it has ended and no attempt will need them.
    DeleteSecrets,
}

/// Deadlines the operator sets (not the user): how long each stage may take before
/// reconcile treats it as lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// A pending attempt is put on the dispatch queue again after this long.
    pub redispatch: Duration,
    /// A VM request not answered after this long is an infrastructure loss.
    pub allocate: Duration,
    /// A VM whose workload has not started after this long is lost.
    pub start: Duration,
    /// An agent silent for this long is lost.
    pub heartbeat: Duration,
    /// How long past a preemption deadline to wait for the VM's last word.
    pub preempt_slack: Duration,
    /// Delay before retrying after a user-code failure, doubled per failure.
    pub failure_backoff: Duration,
    /// Delay before retrying after an infrastructure loss other than a preemption
    /// (which resumes at once), doubled per loss.
    pub infra_backoff: Duration,
    /// Delay before asking again for capacity, doubled per miss in a row …
    pub capacity_backoff: Duration,
    /// … up to this.
    pub capacity_backoff_max: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            redispatch: Duration::from_secs(60),
            allocate: Duration::from_secs(15 * 60),
            start: Duration::from_secs(15 * 60),
            heartbeat: Duration::from_secs(90),
            preempt_slack: Duration::from_secs(30),
            failure_backoff: Duration::from_secs(10),
            infra_backoff: Duration::from_secs(10),
            capacity_backoff: Duration::from_secs(5),
            capacity_backoff_max: Duration::from_secs(60),
        }
    }
}

/// The result of applying an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub record: JobRecord,
    /// New side effects (also appended to `record.outbox`).
    pub commands: Vec<Command>,
    /// Whether the record changed; an unchanged record need not be written.
    pub changed: bool,
}

/// Applies `event`, which happened at `at`, to `record`.
pub fn apply(record: &JobRecord, event: &Event, at: Timestamp, t: &Timeouts) -> Transition {
    let mut next = record.clone();
    let mut cmds = Vec::new();
    if !record.state.is_terminal() {
        step(&mut next, event, at, t, &mut cmds);
    }
    if !record.state.is_terminal() && next.state.is_terminal() && !next.spec.secrets.is_empty() {
        cmds.push(Command::DeleteSecrets);
    }
    let changed = next != *record;
    if changed {
        next.updated_at = next.updated_at.max(at);
        next.outbox.extend(cmds.iter().cloned());
    }
    Transition {
        record: next,
        commands: cmds,
        changed,
    }
}

fn step(r: &mut JobRecord, event: &Event, at: Timestamp, t: &Timeouts, cmds: &mut Vec<Command>) {
    if let Some(n) = event.attempt()
        && n != r.attempt
    {
        // An older attempt's news (or a confused sender's): nothing to change.
        return;
    }
    match event {
        Event::Dispatch { waits, .. } => {
            if *waits == r.capacity_waits {
                on_dispatch(r, at, cmds);
            }
        }
        Event::VmAllocated { vm, spot, .. } => {
            if r.state == JobState::Allocating {
                if let Some(a) = r.current_mut() {
                    a.vm = Some(vm.clone());
                    a.spot = *spot;
                }
                enter(r, JobState::Starting, at);
            }
        }
        Event::AllocationFailed { .. } => {
            if r.state == JobState::Allocating {
                wait_for_capacity(r, at, t, cmds);
            }
        }
        Event::StartFailed { reason, .. } => {
            if matches!(r.state, JobState::Allocating | JobState::Starting) {
                let reason = format!("the agent could not start the attempt: {reason}");
                end_attempt(r, AttemptOutcome::Lost { reason }, at, t, cmds);
            }
        }
        Event::Unschedulable { reason, .. } => {
            if r.state == JobState::Allocating {
                let reason = format!("unschedulable: {reason}");
                finish(r, JobState::Failed, reason, at, cmds);
            }
        }
        Event::Heartbeat { .. } => {
            if matches!(
                r.state,
                JobState::Starting | JobState::Running | JobState::Preempted
            ) && let Some(a) = r.current_mut()
            {
                a.last_heartbeat = Some(a.last_heartbeat.map_or(at, |h| h.max(at)));
            }
        }
        Event::WorkloadStarted {
            restored_checkpoint,
            ..
        } => {
            if matches!(r.state, JobState::Allocating | JobState::Starting) {
                if let Some(a) = r.current_mut() {
                    a.started_at = Some(at);
                    a.restored_checkpoint = *restored_checkpoint;
                    a.last_heartbeat = Some(a.last_heartbeat.map_or(at, |h| h.max(at)));
                }
                enter(r, gang_state(r), at);
            }
        }
        Event::NodeReady { rank, .. } => {
            let nodes = r.spec.resources.nodes;
            if matches!(r.state, JobState::Allocating | JobState::Starting)
                && (1..nodes).contains(rank)
                && let Some(a) = r.current_mut()
                && !a.ready_nodes.contains(rank)
            {
                a.ready_nodes.push(*rank);
                a.ready_nodes.sort_unstable();
                if a.started_at.is_some() {
                    enter(r, gang_state(r), at);
                }
            }
        }
        Event::CheckpointCommitted { seq, upload, .. } => on_checkpoint(r, *seq, *upload, at),
        Event::PreemptionNotice { deadline, .. } => {
            if matches!(
                r.state,
                JobState::Allocating | JobState::Starting | JobState::Running
            ) {
                if let Some(a) = r.current_mut() {
                    a.preempt_deadline = Some(*deadline);
                    a.noticed_at = Some(at);
                }
                enter(r, JobState::Preempted, at);
            }
        }
        Event::WorkloadExited { exit_code, .. } => on_exit(r, *exit_code, at, t, cmds),
        Event::VmTerminated { reason, .. } => {
            if r.state.has_live_attempt() {
                let outcome = if r.state == JobState::Preempted {
                    AttemptOutcome::Preempted
                } else {
                    AttemptOutcome::Lost {
                        reason: reason.clone(),
                    }
                };
                end_attempt(r, outcome, at, t, cmds);
            }
        }
        Event::CancelRequested { reason } => {
            let reason = format!("cancelled: {reason}");
            finish(r, JobState::Cancelled, reason, at, cmds);
        }
        Event::ReconcileTick => reconcile(r, at, t, cmds),
    }
}

fn enter(r: &mut JobRecord, state: JobState, at: Timestamp) {
    if r.state != state {
        r.state = state;
        r.state_since = at;
    }
}

fn on_dispatch(r: &mut JobRecord, at: Timestamp, cmds: &mut Vec<Command>) {
    if r.state != JobState::Pending {
        return;
    }
    r.redispatches = 0;
    r.attempts.push(Attempt {
        number: r.attempt,
        vm: None,
        dispatched_at: at,
        started_at: None,
        ended_at: None,
        last_heartbeat: None,
        restored_checkpoint: None,
        last_checkpoint: None,
        preempt_deadline: None,
        noticed_at: None,
        checkpointed_at: None,
        checkpoint_upload: None,
        spot: false,
        ready_nodes: Vec::new(),
        outcome: None,
    });
    enter(r, JobState::Allocating, at);
    cmds.push(Command::Allocate { attempt: r.attempt });
}

/// No VM for the attempt now: it never started, so it is taken back (the next
/// dispatch makes it again under the same number) and waits, spending nothing.
/// Waiting is a delayed dispatch, not a tight loop: a provider out of capacity
/// would otherwise be asked again at once, forever.
fn wait_for_capacity(r: &mut JobRecord, at: Timestamp, t: &Timeouts, cmds: &mut Vec<Command>) {
    if r.current().is_some_and(|a| a.vm.is_none()) {
        r.attempts.pop();
    }
    let shift = r.capacity_waits.min(16);
    let delay = t
        .capacity_backoff
        .saturating_mul(1 << shift)
        .min(t.capacity_backoff_max);
    r.capacity_waits = r.capacity_waits.saturating_add(1);
    r.waiting_since.get_or_insert(at);
    r.dispatched_at = Some(at);
    r.redispatches = 0;
    enter(r, JobState::Pending, at);
    cmds.push(Command::Dispatch {
        attempt: r.attempt,
        priority: r.spec.priority.level(),
        delay_ms: delay.as_millis() as u64,
        waits: r.capacity_waits,
    });
}

fn on_checkpoint(r: &mut JobRecord, seq: u64, upload: Option<CheckpointUpload>, at: Timestamp) {
    if !r.state.has_live_attempt() {
        return;
    }
    // Sequences only move forward: a late or duplicated commit of an older
    // checkpoint must never make the next attempt resume from further back.
    if r.checkpoint.is_none_or(|c| seq > c) {
        r.checkpoint = Some(seq);
    }
    if let Some(a) = r.current_mut()
        && a.last_checkpoint.is_none_or(|c| seq > c)
    {
        a.last_checkpoint = Some(seq);
        a.checkpointed_at = Some(at);
        a.checkpoint_upload = upload;
    }
}

fn on_exit(r: &mut JobRecord, code: i32, at: Timestamp, t: &Timeouts, cmds: &mut Vec<Command>) {
    if !r.state.has_live_attempt() {
        return;
    }
    if code == 0 {
        if let Some(a) = r.current_mut() {
            a.outcome = Some(AttemptOutcome::Succeeded);
            a.ended_at = Some(at);
        }
        r.reason = None;
        enter(r, JobState::Succeeded, at);
        cmds.push(Command::Release { attempt: r.attempt });
        return;
    }
    let outcome = if r.state == JobState::Preempted {
        // The workload was told to stop; its exit code says nothing about its code.
        AttemptOutcome::Preempted
    } else if r.spec.retry.infra_exit_codes.contains(&code) {
        AttemptOutcome::Lost {
            reason: format!("exit code {code} is listed in retry.infra_exit_codes"),
        }
    } else {
        AttemptOutcome::Failed { exit_code: code }
    };
    end_attempt(r, outcome, at, t, cmds);
}

/// Closes the current attempt and either schedules the next one or fails the job.
fn end_attempt(
    r: &mut JobRecord,
    outcome: AttemptOutcome,
    at: Timestamp,
    t: &Timeouts,
    cmds: &mut Vec<Command>,
) {
    let n = r.attempt;
    let infra = outcome.is_infra_loss();
    let preempted = outcome == AttemptOutcome::Preempted;
    let give_up = if preempted {
        r.infra_losses += 1;
        let preemptions = r.infra_losses - r.lost;
        r.spec
            .retry
            .max_preemptions
            .filter(|max| preemptions > *max)
            .map(|max| {
                format!(
                    "{} (preemptions: {preemptions}, retry.max_preemptions: {max})",
                    describe(&outcome)
                )
            })
    } else if infra {
        r.infra_losses += 1;
        r.lost += 1;
        let max = r.spec.retry.max_lost;
        (r.lost > max).then(|| {
            format!(
                "{} (lost: {}, retry.max_lost: {max})",
                describe(&outcome),
                r.lost
            )
        })
    } else {
        r.failures += 1;
        let max = r.spec.retry.max_failures;
        (r.failures > max).then(|| {
            format!(
                "{} (failures: {}, retry.max_failures: {max})",
                describe(&outcome),
                r.failures
            )
        })
    };
    let had_vm = r.current().is_some();
    if let Some(a) = r.current_mut() {
        a.outcome = Some(outcome);
        a.ended_at = Some(at);
    }
    if had_vm {
        cmds.push(Command::Release { attempt: n });
    }
    if let Some(reason) = give_up {
        r.reason = Some(reason);
        enter(r, JobState::Failed, at);
        return;
    }
    let delay = if preempted {
        // Resuming at once is the point: the checkpoint is fresh.
        Duration::ZERO
    } else if infra {
        let shift = r.lost.saturating_sub(1).min(16);
        (t.infra_backoff * (1u32 << shift)).min(Duration::from_secs(600))
    } else {
        // 1×, 2×, 4× … the backoff, capped so a retry is never more than an hour away.
        let shift = r.failures.saturating_sub(1).min(16);
        (t.failure_backoff * (1u32 << shift)).min(Duration::from_secs(3600))
    };
    r.attempt = n + 1;
    r.dispatched_at = Some(at);
    r.redispatches = 0;
    r.capacity_waits = 0;
    r.waiting_since = None;
    enter(r, JobState::Pending, at);
    cmds.push(Command::Dispatch {
        attempt: r.attempt,
        priority: r.spec.priority.level(),
        delay_ms: delay.as_millis() as u64,
        waits: 0,
    });
}

fn describe(o: &AttemptOutcome) -> String {
    match o {
        AttemptOutcome::Succeeded => "succeeded".into(),
        AttemptOutcome::Failed { exit_code } => format!("workload exited with code {exit_code}"),
        AttemptOutcome::TimedOut => "attempt ran past limits.max_runtime".into(),
        AttemptOutcome::Preempted => "preempted".into(),
        AttemptOutcome::Lost { reason } => format!("VM lost: {reason}"),
        AttemptOutcome::AllocationFailed { reason } => format!("no VM: {reason}"),
        AttemptOutcome::GangIncomplete { reason } => reason.clone(),
        AttemptOutcome::Stopped { reason } => reason.clone(),
    }
}

/// Ends the job for good, stopping a live attempt.
fn finish(
    r: &mut JobRecord,
    state: JobState,
    reason: String,
    at: Timestamp,
    cmds: &mut Vec<Command>,
) {
    if r.state.has_live_attempt() {
        if let Some(a) = r.current_mut() {
            a.outcome = Some(AttemptOutcome::Stopped {
                reason: reason.clone(),
            });
            a.ended_at = Some(at);
        }
        cmds.push(Command::Release { attempt: r.attempt });
    }
    r.reason = Some(reason);
    enter(r, state, at);
}

fn reconcile(r: &mut JobRecord, at: Timestamp, t: &Timeouts, cmds: &mut Vec<Command>) {
    let max_wait = r.spec.limits.max_wait.get();
    if at.since(r.created_at) >= max_wait {
        let reason = format!(
            "gave up after limits.max_wait ({})",
            humantime::format_duration(max_wait)
        );
        finish(r, JobState::Failed, reason, at, cmds);
        return;
    }
    if at <= r.state_since {
        // A tick from no later than the current state's start (one redelivered late)
        // was meant for an earlier state; no deadline of this one can have passed by
        // then. Judged by it, a preemption whose deadline was already past when its
        // notice came would end the attempt before the notice did.
        return;
    }
    let in_state = at.since(r.state_since);
    match r.state {
        JobState::Pending => {
            // The dispatch message may have been lost between the ledger write and the
            // queue send; dispatch is idempotent, so sending it again is safe. A job
            // that is only waiting its turn in a long queue would pile up copies, so
            // the wait doubles with each resend (up to 64×).
            let last = r.dispatched_at.unwrap_or(r.state_since).max(r.state_since);
            let wait = t.redispatch.saturating_mul(1 << r.redispatches.min(6));
            if at.since(last) >= wait {
                r.dispatched_at = Some(at);
                r.redispatches += 1;
                cmds.push(Command::Dispatch {
                    attempt: r.attempt,
                    priority: r.spec.priority.level(),
                    delay_ms: 0,
                    waits: r.capacity_waits,
                });
            }
        }
        JobState::Allocating if in_state >= t.allocate => {
            let reason = format!("no VM after {}", humantime::format_duration(t.allocate));
            end_attempt(r, AttemptOutcome::AllocationFailed { reason }, at, t, cmds);
        }
        JobState::Starting if r.spec.resources.nodes > 1 && in_state >= gang_timeout(r, t) => {
            gang_incomplete(r, at, t, cmds);
        }
        JobState::Starting if r.spec.resources.nodes <= 1 && in_state >= t.start => {
            let reason = format!(
                "workload not started after {}",
                humantime::format_duration(t.start)
            );
            end_attempt(r, AttemptOutcome::Lost { reason }, at, t, cmds);
        }
        JobState::Running => reconcile_running(r, at, t, cmds),
        JobState::Preempted => {
            let deadline = r
                .current()
                .and_then(|a| a.preempt_deadline)
                .unwrap_or(r.state_since);
            if at >= deadline.plus(t.preempt_slack) {
                end_attempt(r, AttemptOutcome::Preempted, at, t, cmds);
            }
        }
        _ => {}
    }
}

fn reconcile_running(r: &mut JobRecord, at: Timestamp, t: &Timeouts, cmds: &mut Vec<Command>) {
    let Some(a) = r.current() else { return };
    let started = a.started_at.unwrap_or(r.state_since);
    if let Some(max) = r.spec.limits.max_runtime
        && at.since(started) >= max.get()
    {
        end_attempt(r, AttemptOutcome::TimedOut, at, t, cmds);
        return;
    }
    let heard = a.last_heartbeat.unwrap_or(started);
    if at.since(heard) >= t.heartbeat {
        let reason = format!(
            "agent silent for {}",
            humantime::format_duration(at.since(heard))
        );
        end_attempt(r, AttemptOutcome::Lost { reason }, at, t, cmds);
    }
}

/// Where an attempt whose rank 0 has started stands: running once every other
/// rank of its gang is ready too, else still starting (the gang timeout then
/// covers a node that never comes).
fn gang_state(r: &JobRecord) -> JobState {
    let nodes = r.spec.resources.nodes.max(1) as usize;
    let ready = r.current().map_or(0, |a| a.ready_nodes.len());
    if ready + 1 >= nodes {
        JobState::Running
    } else {
        JobState::Starting
    }
}

/// How long a multi-node attempt's gang has to come up whole.
fn gang_timeout(r: &JobRecord, t: &Timeouts) -> Duration {
    r.spec.placement.gang_timeout.map_or(t.start, |g| g.get())
}

/// Gangs in a row that did not come up before one more counts as lost: VMs that
/// boot but whose agents never start (a bad image) would otherwise be paid for
/// again and again, spending nothing.
const GANG_MISSES: usize = 3;

/// A gang whose nodes did not all come up (and start the workload) in time: a
/// capacity miss, not a loss. Its VMs go, and the job waits for capacity under the
/// next attempt number (the old key's VMs are never made again), spending nothing.
fn gang_incomplete(r: &mut JobRecord, at: Timestamp, t: &Timeouts, cmds: &mut Vec<Command>) {
    let n = r.attempt;
    let reason = format!(
        "the gang's {} nodes were not all up after {}",
        r.spec.resources.nodes,
        humantime::format_duration(gang_timeout(r, t))
    );
    let before = r.attempts.len().saturating_sub(1);
    let misses = r.attempts[..before]
        .iter()
        .rev()
        .take_while(|a| matches!(a.outcome, Some(AttemptOutcome::GangIncomplete { .. })))
        .count();
    if misses + 1 >= GANG_MISSES {
        let reason = format!("{reason}, {GANG_MISSES} times in a row");
        end_attempt(r, AttemptOutcome::Lost { reason }, at, t, cmds);
        return;
    }
    if let Some(a) = r.current_mut() {
        a.outcome = Some(AttemptOutcome::GangIncomplete { reason });
        a.ended_at = Some(at);
    }
    cmds.push(Command::Release { attempt: n });
    r.attempt = n + 1;
    wait_for_capacity(r, at, t, cmds);
}

/// Removes from `record.outbox` the commands in `done` (after they were carried out).
pub fn clear_outbox(record: &mut JobRecord, done: &[Command]) -> bool {
    let before = record.outbox.len();
    record.outbox.retain(|c| !done.contains(c));
    record.outbox.len() != before
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

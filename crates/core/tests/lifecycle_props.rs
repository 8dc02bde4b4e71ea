//! Properties of the pure lifecycle function `lifecycle::apply`.
//!
//! Random job specs meet random event sequences; after every single step the
//! record must keep the invariants the rest of respawn relies on (one live attempt,
//! two separate retry budgets, monotone checkpoints, final terminal states, an
//! outbox that holds exactly what was decided), and ticking a job long enough must
//! always end it.
//!
//! Events are generated as *templates* whose attempt number is an offset from the
//! record's attempt at the moment they are applied: fully random attempt numbers
//! would almost always be stale and leave the interesting states unvisited.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use respawn_core::job::{AttemptOutcome, JobId, JobRecord, JobState};
use respawn_core::lifecycle::{Command, Event, Timeouts, Transition, apply};
use respawn_core::spec::{self, Format};
use respawn_core::time::Timestamp;

/// Submission time of every generated job (any fixed instant does).
const T0: Timestamp = Timestamp(1_750_000_000_000);

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

/// The spec fields the lifecycle reads; the rest stays at its defaults.
#[derive(Debug, Clone)]
struct SpecParams {
    max_failures: u32,
    max_preemptions: Option<u32>,
    max_lost: u32,
    infra_exit_codes: Vec<i32>,
    max_wait_s: u64,
    max_runtime_s: Option<u64>,
    /// A job with secrets must have them deleted when it ends.
    secrets: bool,
    /// A multi-node job, and how long its gang may take to come up.
    nodes: u32,
    gang_timeout_s: Option<u64>,
}

impl SpecParams {
    /// The spec as a user would write it; going through the parser keeps the test
    /// honest about what a valid spec is.
    fn yaml(&self) -> String {
        let mut y = String::from("name: prop\ncommand: [\"train\"]\nretry:\n");
        y += &format!("  max_failures: {}\n", self.max_failures);
        if let Some(p) = self.max_preemptions {
            y += &format!("  max_preemptions: {p}\n");
        }
        y += &format!("  max_lost: {}\n", self.max_lost);
        y += &format!("  infra_exit_codes: {:?}\n", self.infra_exit_codes);
        y += &format!("limits:\n  max_wait: {}s\n", self.max_wait_s);
        if let Some(r) = self.max_runtime_s {
            y += &format!("  max_runtime: {r}s\n");
        }
        if self.secrets {
            y += "secrets:\n  TOKEN: t0ps3cret\n";
        }
        if self.nodes > 1 {
            y += &format!("resources:\n  nodes: {}\n", self.nodes);
            if let Some(g) = self.gang_timeout_s {
                y += &format!("placement:\n  gang_timeout: {g}s\n");
            }
        }
        y
    }

    fn record(&self) -> JobRecord {
        let spec = spec::parse(&self.yaml(), Format::Yaml).unwrap();
        JobRecord::new(JobId::generate(T0), "default", spec, T0)
    }
}

fn spec_params() -> impl Strategy<Value = SpecParams> {
    (
        0u32..=4,
        prop::option::of(0u32..=5),
        // 1 is in the list now and then: the same code then means "infrastructure".
        prop::sample::subsequence(vec![1, 137, 143], 0..=3),
        // Short enough that the liveness check's one-minute ticks stay cheap.
        (10 * 60u64)..=(4 * 3600),
        prop::option::of(60u64..=3600),
        0u32..=4,
        any::<bool>(),
        (1u32..=3, prop::option::of(60u64..=1800)),
    )
        .prop_map(
            |(
                max_failures,
                max_preemptions,
                infra_exit_codes,
                max_wait_s,
                max_runtime_s,
                max_lost,
                secrets,
                (nodes, gang_timeout_s),
            )| {
                SpecParams {
                    max_failures,
                    max_preemptions,
                    max_lost,
                    infra_exit_codes,
                    max_wait_s,
                    max_runtime_s,
                    secrets,
                    nodes,
                    gang_timeout_s,
                }
            },
        )
}

/// An event with its attempt number left open.
#[derive(Debug, Clone)]
enum Template {
    /// Whatever moves the current attempt along in its present state.
    Progress,
    Dispatch,
    StaleDispatch,
    VmAllocated,
    AllocationFailed,
    Unschedulable,
    Heartbeat,
    StartFailed,
    WorkloadStarted {
        restore: bool,
    },
    /// Node `rank` of a gang ready (out of range now and then).
    NodeReady {
        rank: u32,
    },
    Checkpoint {
        seq: u64,
    },
    /// Deadline relative to the event's time; may lie in the past.
    PreemptionNotice {
        deadline_in_ms: i64,
    },
    Exited {
        exit_code: i32,
    },
    VmTerminated,
    Cancel,
    Tick,
}

/// One generated step: an event template, which attempt it names relative to the
/// record's (-1 stale, 0 current, +1 not yet dispatched), and the time since the
/// previous step.
#[derive(Debug, Clone)]
struct Step {
    template: Template,
    offset: i64,
    dt_ms: u64,
}

fn template() -> impl Strategy<Value = Template> {
    prop_oneof![
        24 => Just(Template::Progress),
        12 => Just(Template::Dispatch),
        2 => Just(Template::StaleDispatch),
        8 => Just(Template::VmAllocated),
        4 => Just(Template::AllocationFailed),
        // These two end the job at once: rare, or few runs would get anywhere.
        1 => Just(Template::Unschedulable),
        1 => Just(Template::Cancel),
        12 => Just(Template::Heartbeat),
        3 => Just(Template::StartFailed),
        8 => any::<bool>().prop_map(|restore| Template::WorkloadStarted { restore }),
        6 => (0u32..=3).prop_map(|rank| Template::NodeReady { rank }),
        12 => (0u64..20).prop_map(|seq| Template::Checkpoint { seq }),
        8 => (-60_000i64..=180_000)
            .prop_map(|deadline_in_ms| Template::PreemptionNotice { deadline_in_ms }),
        12 => prop::sample::select(vec![0, 1, 2, 137, 143, 255, -9])
            .prop_map(|exit_code| Template::Exited { exit_code }),
        8 => Just(Template::VmTerminated),
        16 => Just(Template::Tick),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let offset = prop_oneof![8 => Just(0i64), 1 => Just(-1i64), 1 => Just(1i64)];
    // Mostly seconds apart (heartbeat cadence), sometimes long enough for an
    // operator timeout or limits.max_runtime, rarely hours.
    let dt_ms = prop_oneof![
        3 => Just(0u64),
        10 => 0..=(2 * MINUTE),
        3 => 0..=(30 * MINUTE),
        1 => 0..=(3 * HOUR),
    ];
    (template(), offset, dt_ms).prop_map(|(template, offset, dt_ms)| Step {
        template,
        offset,
        dt_ms,
    })
}

/// Fills in a template against the record it is about to be applied to.
fn resolve(step: &Step, r: &JobRecord, at: Timestamp) -> Event {
    let attempt = u32::try_from(i64::from(r.attempt) + step.offset).unwrap_or(0);
    match &step.template {
        Template::Progress => match r.state {
            JobState::Pending => Event::Dispatch {
                attempt,
                waits: r.capacity_waits,
            },
            JobState::Allocating => Event::VmAllocated {
                attempt,
                vm: format!("vm-{attempt}"),
                spot: true,
            },
            // Rank 0 first, then the other ranks of a gang one by one.
            JobState::Starting => match r.current().filter(|a| a.started_at.is_some()) {
                Some(a) => Event::NodeReady {
                    attempt,
                    rank: (1..r.spec.resources.nodes)
                        .find(|n| !a.ready_nodes.contains(n))
                        .unwrap_or(1),
                },
                None => Event::WorkloadStarted {
                    attempt,
                    restored_checkpoint: r.checkpoint,
                },
            },
            // Keeping the agent alive lets runs reach limits.max_runtime.
            JobState::Running => Event::Heartbeat { attempt },
            JobState::Preempted => Event::VmTerminated {
                attempt,
                reason: "reclaimed".into(),
            },
            _ => Event::ReconcileTick,
        },
        Template::Dispatch => Event::Dispatch {
            attempt,
            waits: r.capacity_waits,
        },
        // A dispatch sent before the attempt's last capacity wait, redelivered.
        Template::StaleDispatch => Event::Dispatch {
            attempt,
            waits: r.capacity_waits.saturating_sub(1),
        },
        Template::VmAllocated => Event::VmAllocated {
            attempt,
            vm: format!("vm-{attempt}"),
            spot: true,
        },
        Template::AllocationFailed => Event::AllocationFailed {
            attempt,
            reason: "no capacity".into(),
        },
        Template::Unschedulable => Event::Unschedulable {
            attempt,
            reason: "too many GPUs".into(),
        },
        Template::Heartbeat => Event::Heartbeat { attempt },
        Template::StartFailed => Event::StartFailed {
            attempt,
            reason: "work folder not creatable".into(),
        },
        Template::WorkloadStarted { restore } => Event::WorkloadStarted {
            attempt,
            restored_checkpoint: r.checkpoint.filter(|_| *restore),
        },
        Template::NodeReady { rank } => Event::NodeReady {
            attempt,
            rank: *rank,
        },
        Template::Checkpoint { seq } => Event::CheckpointCommitted {
            attempt,
            seq: *seq,
            upload: None,
        },
        Template::PreemptionNotice { deadline_in_ms } => Event::PreemptionNotice {
            attempt,
            deadline: Timestamp(at.0.saturating_add_signed(*deadline_in_ms)),
        },
        Template::Exited { exit_code } => Event::WorkloadExited {
            attempt,
            exit_code: *exit_code,
        },
        Template::VmTerminated => Event::VmTerminated {
            attempt,
            reason: "gone".into(),
        },
        Template::Cancel => Event::CancelRequested {
            reason: "user".into(),
        },
        Template::Tick => Event::ReconcileTick,
    }
}

// ---------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------

fn is_user_failure(o: &AttemptOutcome) -> bool {
    matches!(o, AttemptOutcome::Failed { .. } | AttemptOutcome::TimedOut)
}

/// What must hold of any record the lifecycle produces, whatever led to it.
fn check_record(r: &JobRecord) -> Result<(), TestCaseError> {
    // The wait for capacity has a start exactly while the attempt is waiting.
    prop_assert_eq!(
        r.waiting_since.is_some(),
        r.capacity_waits > 0,
        "waiting_since {:?}, capacity_waits {}",
        r.waiting_since,
        r.capacity_waits
    );
    // Attempts are numbered 1, 2, 3 … with no gaps or repeats.
    for (i, a) in r.attempts.iter().enumerate() {
        prop_assert_eq!(
            a.number as usize,
            i + 1,
            "attempt numbers: {:?}",
            r.attempts
        );
        // An attempt has an end time exactly when it has an outcome.
        prop_assert_eq!(a.ended_at.is_some(), a.outcome.is_some(), "attempt {:?}", a);
        prop_assert!(a.last_checkpoint <= r.checkpoint, "attempt {:?}", a);
    }

    // At most one live attempt: the last one, the record's current attempt, and
    // only in a state that has one.
    let live: Vec<_> = r.attempts.iter().filter(|a| a.is_live()).collect();
    if r.state.has_live_attempt() {
        prop_assert_eq!(
            live.len(),
            1,
            "state {} with attempts {:?}",
            r.state,
            r.attempts
        );
        let last = r.attempts.last().unwrap();
        prop_assert!(last.is_live());
        prop_assert_eq!(last.number, r.attempt);
    } else {
        prop_assert!(
            live.is_empty(),
            "state {} with attempts {:?}",
            r.state,
            r.attempts
        );
    }
    // `attempt` names the live attempt, or the next one while pending.
    let dispatched = r.attempts.len() as u32;
    match r.state {
        JobState::Pending => prop_assert_eq!(r.attempt, dispatched + 1),
        s if s.has_live_attempt() => prop_assert_eq!(r.attempt, dispatched),
        _ => prop_assert!(r.attempt == dispatched || r.attempt == dispatched + 1),
    }

    // The counters are exactly the outcomes, split into the two budgets.
    let outcomes: Vec<_> = r
        .attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref())
        .collect();
    let user = outcomes.iter().filter(|o| is_user_failure(o)).count();
    let infra = outcomes.iter().filter(|o| o.is_infra_loss()).count();
    let preempted = outcomes
        .iter()
        .filter(|o| ***o == AttemptOutcome::Preempted)
        .count();
    prop_assert_eq!(r.failures as usize, user, "outcomes {:?}", outcomes);
    prop_assert_eq!(r.infra_losses as usize, infra, "outcomes {:?}", outcomes);
    prop_assert_eq!(
        r.lost as usize,
        infra - preempted,
        "outcomes {:?}",
        outcomes
    );

    // A spent budget fails the job, on the first loss past it.
    let max_failures = r.spec.retry.max_failures;
    prop_assert!(
        r.failures <= max_failures
            || (r.state == JobState::Failed && r.failures == max_failures + 1),
        "failures {} of {} in state {}",
        r.failures,
        max_failures,
        r.state
    );
    let preemptions = preempted as u32;
    if let Some(max) = r.spec.retry.max_preemptions {
        prop_assert!(
            preemptions <= max || (r.state == JobState::Failed && preemptions == max + 1),
            "preemptions {} of {} in state {}",
            preemptions,
            max,
            r.state
        );
    }
    let max_lost = r.spec.retry.max_lost;
    prop_assert!(
        r.lost <= max_lost || (r.state == JobState::Failed && r.lost == max_lost + 1),
        "lost {} of {} in state {}",
        r.lost,
        max_lost,
        r.state
    );

    // Every ended job says why, except a successful one.
    match r.state {
        JobState::Succeeded => {
            prop_assert_eq!(&r.reason, &None);
            prop_assert_eq!(
                r.attempts.last().and_then(|a| a.outcome.clone()),
                Some(AttemptOutcome::Succeeded)
            );
        }
        JobState::Failed | JobState::Cancelled => prop_assert!(r.reason.is_some()),
        _ => {}
    }
    Ok(())
}

/// Whether `ev` at `at` is a user-code failure of `before`'s current attempt: a
/// non-zero exit not listed as infrastructure and not during a preemption drain, or
/// a tick past limits.max_runtime (and not past limits.max_wait, which wins).
fn spends_user_budget(before: &JobRecord, ev: &Event, at: Timestamp) -> bool {
    if !before.state.has_live_attempt() || ev.attempt().is_some_and(|n| n != before.attempt) {
        return false;
    }
    match ev {
        Event::WorkloadExited { exit_code, .. } => {
            *exit_code != 0
                && !before.spec.retry.infra_exit_codes.contains(exit_code)
                && before.state != JobState::Preempted
        }
        Event::ReconcileTick => {
            let max_wait = before.spec.limits.max_wait.get();
            let started = before.current().and_then(|a| a.started_at);
            // A tick no later than the state's start was meant for an earlier
            // state (a gang runs only once its last node is ready, after rank 0
            // started its clock).
            before.state == JobState::Running
                && at > before.state_since
                && at.since(before.created_at) < max_wait
                && matches!(
                    (before.spec.limits.max_runtime, started),
                    (Some(max), Some(s)) if at.since(s) >= max.get()
                )
        }
        _ => false,
    }
}

/// What must hold of one step `before --ev@at--> tr`.
fn check_step(
    before: &JobRecord,
    ev: &Event,
    at: Timestamp,
    tr: &Transition,
    t: &Timeouts,
) -> Result<(), TestCaseError> {
    let after = &tr.record;

    // Pure: the same input gives the same output.
    prop_assert_eq!(&apply(before, ev, at, t), tr);

    // Terminal states are final.
    if before.state.is_terminal() {
        prop_assert!(!tr.changed, "{} changed a {} job", ev.kind(), before.state);
        prop_assert_eq!(after, before);
        prop_assert!(tr.commands.is_empty());
    }

    // `changed` is truthful, and a side effect never comes without a record to
    // write it into (the handler skips the write when nothing changed).
    prop_assert_eq!(tr.changed, after != before);
    if !tr.changed {
        prop_assert!(
            tr.commands.is_empty(),
            "commands {:?} but no change",
            tr.commands
        );
    }

    // The version is the ledger's business; the outbox grows by exactly the commands.
    prop_assert_eq!(after.version, before.version);
    let mut outbox = before.outbox.clone();
    outbox.extend(tr.commands.iter().cloned());
    prop_assert_eq!(&after.outbox, &outbox);
    prop_assert!(after.updated_at >= before.updated_at);

    // Commands name the attempts they concern.
    for c in &tr.commands {
        match c {
            Command::Allocate { attempt } => {
                prop_assert_eq!(before.state, JobState::Pending);
                prop_assert_eq!(*attempt, after.attempt);
            }
            Command::Release { attempt } => {
                prop_assert!(
                    before.state.has_live_attempt(),
                    "release from {}",
                    before.state
                );
                prop_assert_eq!(*attempt, before.attempt);
            }
            Command::Dispatch { attempt, .. } => {
                prop_assert_eq!(after.state, JobState::Pending);
                prop_assert_eq!(*attempt, after.attempt);
            }
            Command::Notify { .. } => {
                prop_assert!(
                    false,
                    "apply never emits notifications; the handlers add them"
                );
            }
            Command::DeleteSecrets => {
                prop_assert!(!before.state.is_terminal() && after.state.is_terminal());
                prop_assert!(!after.spec.secrets.is_empty());
            }
        }
    }

    // The two budgets: preemptions never spend the user's, and each step spends at
    // most one loss from at most one of them.
    prop_assert!(after.failures >= before.failures);
    prop_assert!(after.infra_losses >= before.infra_losses);
    let user_spent = after.failures - before.failures;
    let infra_spent = after.infra_losses - before.infra_losses;
    prop_assert!(
        user_spent + infra_spent <= 1,
        "{} spent two losses",
        ev.kind()
    );
    prop_assert_eq!(
        user_spent == 1,
        spends_user_budget(before, ev, at),
        "{:?} at {} took failures {} -> {} (state {})",
        ev,
        at.0,
        before.failures,
        after.failures,
        before.state
    );
    // No capacity is a wait: no attempt made, nothing spent.
    if matches!(ev, Event::AllocationFailed { .. }) {
        prop_assert_eq!(user_spent + infra_spent, 0);
        prop_assert!(after.attempts.len() <= before.attempts.len());
    }
    if infra_spent == 1 {
        prop_assert!(
            matches!(
                ev,
                Event::StartFailed { .. }
                    | Event::VmTerminated { .. }
                    | Event::WorkloadExited { .. }
                    | Event::ReconcileTick
            ),
            "{} spent the infrastructure budget",
            ev.kind()
        );
    }

    // A committed checkpoint is never given up for an older one.
    prop_assert!(
        after.checkpoint >= before.checkpoint,
        "checkpoint {:?} -> {:?}",
        before.checkpoint,
        after.checkpoint
    );

    // Redelivering the event right away changes nothing.
    let again = apply(after, ev, at, t);
    prop_assert!(
        !again.changed,
        "{:?} applied twice changed the record twice",
        ev
    );

    // Nor does a reconcile tick from no later than the current state's start (one
    // redelivered late was meant for an earlier state), unless it is past
    // limits.max_wait, which holds whatever the state.
    let stale = after.state_since;
    if stale.since(after.created_at) < after.spec.limits.max_wait.get() {
        let tick = apply(after, &Event::ReconcileTick, stale, t);
        prop_assert!(!tick.changed, "a stale tick changed {:?}", tick.record);
    }

    check_record(after)
}

/// Applies `ev` at `at` with every check, returning the new record.
fn checked_apply(
    r: &JobRecord,
    ev: &Event,
    at: Timestamp,
    t: &Timeouts,
) -> Result<JobRecord, TestCaseError> {
    let tr = apply(r, ev, at, t);
    check_step(r, ev, at, &tr, t)?;
    Ok(tr.record)
}

/// Runs the steps from a fresh record, checking every step; returns the record and
/// the time of the last step.
fn run_steps(
    params: &SpecParams,
    steps: &[Step],
    t: &Timeouts,
) -> Result<(JobRecord, Timestamp), TestCaseError> {
    let mut r = params.record();
    check_record(&r)?;
    let mut at = T0;
    for s in steps {
        at = Timestamp(at.0 + s.dt_ms);
        let ev = resolve(s, &r, at);
        r = checked_apply(&r, &ev, at, t)?;
    }
    Ok((r, at))
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    /// Every step of every random history keeps the invariants.
    #[test]
    fn every_step_keeps_the_invariants(
        params in spec_params(),
        steps in prop::collection::vec(step(), 0..60),
    ) {
        run_steps(&params, &steps, &Timeouts::default())?;
    }

    /// Whatever happened before, reconcile alone ends every job by
    /// limits.max_wait: nothing can stay stuck waiting for an event that never comes.
    #[test]
    fn reconcile_alone_ends_every_job(
        params in spec_params(),
        steps in prop::collection::vec(step(), 0..40),
    ) {
        let t = Timeouts::default();
        let (mut r, mut at) = run_steps(&params, &steps, &t)?;
        let max_wait = r.spec.limits.max_wait.get();
        let deadline = r.created_at.plus(max_wait).max(at).plus(Duration::from_secs(60));
        while !r.state.is_terminal() {
            prop_assert!(at <= deadline, "still {} at {} (deadline {})", r.state, at.0, deadline.0);
            at = at.plus(Duration::from_secs(60));
            r = checked_apply(&r, &Event::ReconcileTick, at, &t)?;
        }
    }
}

// ---------------------------------------------------------------------------
// Examples: specific paths, spelled out
// ---------------------------------------------------------------------------

/// A record and a clock, applying events one after the other.
struct Script {
    r: JobRecord,
    at: Timestamp,
    t: Timeouts,
}

impl Script {
    fn new(yaml_extra: &str) -> Script {
        let text = format!("name: example\ncommand: [\"train\"]\n{yaml_extra}");
        let spec = spec::parse(&text, Format::Yaml).unwrap();
        Script {
            r: JobRecord::new(JobId::generate(T0), "default", spec, T0),
            at: T0,
            t: Timeouts::default(),
        }
    }

    /// Applies `ev` ten seconds after the previous event; returns its commands.
    fn on(&mut self, ev: Event) -> Vec<Command> {
        self.at = self.at.plus(Duration::from_secs(10));
        let tr = apply(&self.r, &ev, self.at, &self.t);
        if let Err(e) = check_step(&self.r, &ev, self.at, &tr, &self.t) {
            panic!("{e}");
        }
        self.r = tr.record;
        tr.commands
    }

    /// Dispatches the current attempt and brings it to Running.
    /// Dispatches the next attempt and gives it its VM.
    fn allocate_attempt(&mut self) {
        let n = self.r.attempt;
        assert_eq!(
            self.on(Event::Dispatch {
                attempt: n,
                waits: self.r.capacity_waits
            }),
            vec![Command::Allocate { attempt: n }]
        );
        self.on(Event::VmAllocated {
            attempt: n,
            vm: format!("vm-{n}"),
            spot: true,
        });
    }

    fn start_attempt(&mut self) {
        self.allocate_attempt();
        let n = self.r.attempt;
        self.on(Event::WorkloadStarted {
            attempt: n,
            restored_checkpoint: self.r.checkpoint,
        });
        assert_eq!(self.r.state, JobState::Running);
    }

    fn exit(&mut self, exit_code: i32) -> Vec<Command> {
        let attempt = self.r.attempt;
        self.on(Event::WorkloadExited { attempt, exit_code })
    }

    fn preempt(&mut self) -> Vec<Command> {
        let attempt = self.r.attempt;
        let deadline = self.at.plus(Duration::from_secs(30));
        self.on(Event::PreemptionNotice { attempt, deadline });
        assert_eq!(self.r.state, JobState::Preempted);
        self.on(Event::VmTerminated {
            attempt,
            reason: "spot reclaimed".into(),
        })
    }
}

#[test]
fn happy_path_succeeds() {
    let mut s = Script::new("");
    s.start_attempt();
    s.on(Event::Heartbeat { attempt: 1 });
    s.on(Event::CheckpointCommitted {
        attempt: 1,
        seq: 1,
        upload: None,
    });
    assert_eq!(s.exit(0), vec![Command::Release { attempt: 1 }]);
    assert_eq!(s.r.state, JobState::Succeeded);
    assert_eq!(s.r.attempts.len(), 1);
    assert_eq!(s.r.checkpoint, Some(1));
    assert_eq!(
        s.r.outbox,
        vec![
            Command::Allocate { attempt: 1 },
            Command::Release { attempt: 1 }
        ]
    );
}

#[test]
fn preemptions_do_not_spend_the_failure_budget() {
    // max_failures: 0 — a single user failure would end the job; three
    // preemptions must not.
    let mut s = Script::new("retry:\n  max_failures: 0\n");
    for seq in 1..=3 {
        s.start_attempt();
        let attempt = s.r.attempt;
        s.on(Event::CheckpointCommitted {
            attempt,
            seq,
            upload: None,
        });
        let cmds = s.preempt();
        // Retried at once (infrastructure backoff is zero), resuming from `seq`.
        assert_eq!(
            cmds,
            vec![
                Command::Release { attempt },
                Command::Dispatch {
                    attempt: attempt + 1,
                    priority: 5,
                    delay_ms: 0,
                    waits: 0
                }
            ]
        );
        assert_eq!(s.r.state, JobState::Pending);
        assert_eq!(s.r.checkpoint, Some(seq));
    }
    s.start_attempt();
    assert_eq!(s.r.current().unwrap().restored_checkpoint, Some(3));
    s.exit(0);
    assert_eq!(s.r.state, JobState::Succeeded);
    assert_eq!(s.r.failures, 0);
    assert_eq!(s.r.infra_losses, 3);
    assert_eq!(s.r.preemptions(), 3);
    assert_eq!(s.r.attempts.len(), 4);
}

#[test]
fn exhausted_failure_budget_fails_the_job() {
    let mut s = Script::new("retry:\n  max_failures: 1\n");
    s.start_attempt();
    let cmds = s.exit(1);
    // The first failure is retried after the failure backoff.
    assert_eq!(
        cmds,
        vec![
            Command::Release { attempt: 1 },
            Command::Dispatch {
                attempt: 2,
                priority: 5,
                delay_ms: 10_000,
                waits: 0
            }
        ]
    );
    s.start_attempt();
    assert_eq!(s.exit(2), vec![Command::Release { attempt: 2 }]);
    assert_eq!(s.r.state, JobState::Failed);
    assert_eq!(s.r.failures, 2);
    let reason = s.r.reason.clone().unwrap();
    assert!(reason.contains("retry.max_failures"), "{reason}");
    assert!(reason.contains("code 2"), "{reason}");
}

#[test]
fn infra_exit_codes_and_exits_while_draining_are_infrastructure() {
    let mut s = Script::new("retry:\n  max_failures: 0\n  infra_exit_codes: [137]\n");
    s.start_attempt();
    s.exit(137);
    assert_eq!(s.r.state, JobState::Pending);
    s.start_attempt();
    let attempt = s.r.attempt;
    let deadline = s.at.plus(Duration::from_secs(30));
    s.on(Event::PreemptionNotice { attempt, deadline });
    // Killed by SIGTERM while draining: the code says nothing about the user's code.
    s.exit(143);
    assert_eq!(s.r.state, JobState::Pending);
    assert_eq!((s.r.failures, s.r.infra_losses), (0, 2));
}

#[test]
fn exceeding_max_preemptions_fails_the_job() {
    let mut s = Script::new("retry:\n  max_preemptions: 1\n");
    s.start_attempt();
    s.preempt();
    assert_eq!(s.r.state, JobState::Pending);
    s.start_attempt();
    assert_eq!(s.preempt(), vec![Command::Release { attempt: 2 }]);
    assert_eq!(s.r.state, JobState::Failed);
    assert_eq!(s.r.failures, 0);
    let reason = s.r.reason.clone().unwrap();
    assert!(reason.contains("retry.max_preemptions"), "{reason}");
}

#[test]
fn cancel_from_running_releases_the_vm() {
    let mut s = Script::new("");
    s.start_attempt();
    let cmds = s.on(Event::CancelRequested {
        reason: "not needed".into(),
    });
    assert_eq!(cmds, vec![Command::Release { attempt: 1 }]);
    assert_eq!(s.r.state, JobState::Cancelled);
    assert!(matches!(
        s.r.attempts[0].outcome,
        Some(AttemptOutcome::Stopped { .. })
    ));
    // A late exit of the stopped workload changes nothing.
    assert!(s.exit(0).is_empty());
    assert_eq!(s.r.state, JobState::Cancelled);
}

#[test]
fn a_preemption_records_the_work_it_lost_and_the_time_to_resume() {
    let mut s = Script::new("");
    s.start_attempt(); // started at +30 s
    s.on(Event::Heartbeat { attempt: 1 });
    s.on(Event::CheckpointCommitted {
        attempt: 1,
        seq: 7,
        upload: None,
    }); // +50 s
    s.on(Event::Heartbeat { attempt: 1 });
    s.preempt(); // noticed at +70 s, ended at +80 s
    let first = s.r.attempts[0].clone();
    assert!(first.spot);
    assert_eq!(
        first.checkpointed_at,
        Some(T0.plus(Duration::from_secs(50)))
    );
    assert_eq!(first.noticed_at, Some(T0.plus(Duration::from_secs(70))));
    assert_eq!(first.work_lost(), Some(Duration::from_secs(30)));
    assert_eq!(s.r.notice_to_resume(1), None, "not resumed yet");
    s.start_attempt(); // started at +110 s
    assert_eq!(s.r.notice_to_resume(1), Some(Duration::from_secs(40)));
    // No checkpoint at all: everything since the start is lost.
    s.preempt(); // ended at +130 s
    assert_eq!(s.r.attempts[1].work_lost(), Some(Duration::from_secs(20)));
    // A finished attempt lost nothing.
    s.start_attempt();
    s.exit(0);
    assert_eq!(s.r.attempts[2].work_lost(), None);
}

#[test]
fn events_of_an_older_attempt_are_ignored() {
    let mut s = Script::new("");
    s.start_attempt();
    s.on(Event::CheckpointCommitted {
        attempt: 1,
        seq: 4,
        upload: None,
    });
    s.preempt();
    s.start_attempt();
    assert_eq!(s.r.attempt, 2);
    let before = s.r.clone();
    let stale = [
        Event::Dispatch {
            attempt: 1,
            waits: 0,
        },
        Event::VmAllocated {
            attempt: 1,
            vm: "vm-1".into(),
            spot: true,
        },
        Event::Heartbeat { attempt: 1 },
        Event::CheckpointCommitted {
            attempt: 1,
            seq: 9,
            upload: None,
        },
        Event::PreemptionNotice {
            attempt: 1,
            deadline: s.at,
        },
        Event::WorkloadExited {
            attempt: 1,
            exit_code: 1,
        },
        Event::VmTerminated {
            attempt: 1,
            reason: "late".into(),
        },
    ];
    for ev in stale {
        let tr = apply(&s.r, &ev, s.at.plus(Duration::from_secs(1)), &s.t);
        assert!(!tr.changed, "{ev:?} changed the record");
        assert!(tr.commands.is_empty());
    }
    assert_eq!(s.r, before);
}

#[test]
fn a_redelivered_tick_does_not_judge_a_later_state() {
    let mut s = Script::new("");
    s.start_attempt();
    // A tick while running: nothing is due.
    assert!(s.on(Event::ReconcileTick).is_empty());
    let (tick, tick_at) = (Event::ReconcileTick, s.at);
    // The agent saw the preemption notice late: its deadline has already passed.
    let deadline = Timestamp(s.at.0 - 60_000);
    s.on(Event::PreemptionNotice {
        attempt: 1,
        deadline,
    });
    // The earlier tick, redelivered now, belongs to the running state: it must not
    // end the attempt before the notice arrived (a fresh tick would, rightly).
    let tr = apply(&s.r, &tick, tick_at, &s.t);
    assert!(!tr.changed, "{:?}", tr.record);
    // So the workload's clean exit while draining still counts.
    s.exit(0);
    assert_eq!(s.r.state, JobState::Succeeded);
    assert_eq!(s.r.infra_losses, 0);
}

#[test]
fn no_capacity_waits_without_a_new_attempt_or_spending() {
    let mut s = Script::new("retry:\n  max_failures: 0\n  max_preemptions: 0\n  max_lost: 0\n");
    let mut first_miss = None;
    for wait in 0..8u32 {
        // A dispatch from before this wait changes nothing.
        if wait > 0 {
            assert!(
                s.on(Event::Dispatch {
                    attempt: 1,
                    waits: wait - 1
                })
                .is_empty()
            );
        }
        assert_eq!(
            s.on(Event::Dispatch {
                attempt: 1,
                waits: wait
            }),
            vec![Command::Allocate { attempt: 1 }]
        );
        let cmds = s.on(Event::AllocationFailed {
            attempt: 1,
            reason: "all CPU slots busy".into(),
        });
        // Backoff doubles from 5 s and stops at a minute.
        let delay_ms = (5_000u64 << wait).min(60_000);
        assert_eq!(
            cmds,
            vec![Command::Dispatch {
                attempt: 1,
                priority: 5,
                delay_ms,
                waits: wait + 1
            }]
        );
        assert_eq!(s.r.state, JobState::Pending);
        // The wait started at the first miss and is not moved by the later ones.
        if wait == 0 {
            first_miss = s.r.waiting_since;
        }
        assert!(first_miss.is_some());
        assert_eq!(s.r.waiting_since, first_miss);
        assert!(s.r.attempts.is_empty(), "{:?}", s.r.attempts);
        assert_eq!((s.r.failures, s.r.infra_losses, s.r.lost), (0, 0, 0));
    }
    s.start_attempt();
    // The attempt that ran is still number 1; the record says how often it waited.
    assert_eq!((s.r.attempt, s.r.capacity_waits), (1, 8));
    s.exit(0);
    assert_eq!(s.r.state, JobState::Succeeded);
}

#[test]
fn start_failures_spend_the_lost_budget_with_a_growing_backoff() {
    let mut s = Script::new("retry:\n  max_lost: 2\n");
    for (n, delay_ms) in [(1u32, 10_000u64), (2, 20_000)] {
        s.on(Event::Dispatch {
            attempt: n,
            waits: 0,
        });
        s.on(Event::VmAllocated {
            attempt: n,
            vm: format!("vm-{n}"),
            spot: true,
        });
        let cmds = s.on(Event::StartFailed {
            attempt: n,
            reason: "cannot read the job spec".into(),
        });
        assert_eq!(
            cmds,
            vec![
                Command::Release { attempt: n },
                Command::Dispatch {
                    attempt: n + 1,
                    priority: 5,
                    delay_ms,
                    waits: 0
                }
            ]
        );
    }
    s.on(Event::Dispatch {
        attempt: 3,
        waits: 0,
    });
    s.on(Event::StartFailed {
        attempt: 3,
        reason: "cannot read the job spec".into(),
    });
    assert_eq!(s.r.state, JobState::Failed);
    let reason = s.r.reason.clone().unwrap();
    assert!(reason.contains("cannot read the job spec"), "{reason}");
    assert!(reason.contains("retry.max_lost: 2"), "{reason}");
    assert_eq!((s.r.failures, s.r.lost), (0, 3));
}

#[test]
fn an_ended_job_with_secrets_deletes_them() {
    let mut s = Script::new("secrets:\n  TOKEN: x\n");
    s.start_attempt();
    assert_eq!(
        s.exit(0),
        vec![Command::Release { attempt: 1 }, Command::DeleteSecrets]
    );
    let mut c = Script::new("secrets:\n  TOKEN: x\n");
    let cmds = c.on(Event::CancelRequested {
        reason: "not needed".into(),
    });
    assert_eq!(cmds, vec![Command::DeleteSecrets]);
}

#[test]
fn a_gang_not_up_in_time_is_released_and_waits_for_capacity_spending_nothing() {
    let mut s = Script::new(
        "resources: { nodes: 3 }\nplacement: { gang_timeout: 2m }\nretry:\n  max_failures: 0\n  max_lost: 0\n",
    );
    s.allocate_attempt();
    assert_eq!(s.r.state, JobState::Starting);
    // Within the gang timeout, nothing happens.
    s.at = s.at.plus(Duration::from_secs(60));
    assert!(s.on(Event::ReconcileTick).is_empty());
    s.at = s.at.plus(Duration::from_secs(60));
    let cmds = s.on(Event::ReconcileTick);
    assert_eq!(
        cmds,
        vec![
            Command::Release { attempt: 1 },
            Command::Dispatch {
                attempt: 2,
                priority: 5,
                delay_ms: 5_000,
                waits: 1
            }
        ]
    );
    assert_eq!(s.r.state, JobState::Pending);
    assert!(matches!(
        s.r.attempts[0].outcome,
        Some(AttemptOutcome::GangIncomplete { .. })
    ));
    assert_eq!((s.r.failures, s.r.infra_losses, s.r.lost), (0, 0, 0));
    // The next gang comes up and the job runs on.
    s.allocate_attempt();
    s.on(Event::WorkloadStarted {
        attempt: 2,
        restored_checkpoint: None,
    });
    for rank in [1, 2] {
        s.on(Event::NodeReady { attempt: 2, rank });
    }
    assert_eq!(s.r.state, JobState::Running);
    assert_eq!(s.exit(0)[0], Command::Release { attempt: 2 });
    assert_eq!(s.r.state, JobState::Succeeded);
}

#[test]
fn the_third_gang_in_a_row_not_up_in_time_is_lost() {
    let mut s = Script::new(
        "resources: { nodes: 2 }\nplacement: { gang_timeout: 1m }\nretry:\n  max_lost: 0\n",
    );
    for _ in 0..3 {
        s.allocate_attempt();
        s.at = s.at.plus(Duration::from_secs(61));
        s.on(Event::ReconcileTick);
    }
    assert_eq!(s.r.state, JobState::Failed, "{:?}", s.r.attempts);
    assert!(matches!(
        s.r.attempts[2].outcome,
        Some(AttemptOutcome::Lost { .. })
    ));
    assert_eq!((s.r.failures, s.r.lost), (0, 1));
    let reason = s.r.reason.clone().unwrap();
    assert!(reason.contains("3 times in a row"), "{reason}");
}

#[test]
fn a_gang_runs_once_rank_0_started_and_every_other_rank_is_ready() {
    let mut s = Script::new("resources: { nodes: 3 }\n");
    s.allocate_attempt();
    s.on(Event::NodeReady {
        attempt: 1,
        rank: 2,
    });
    assert_eq!(s.r.state, JobState::Starting);
    s.on(Event::WorkloadStarted {
        attempt: 1,
        restored_checkpoint: None,
    });
    assert_eq!(s.r.state, JobState::Starting, "rank 1 is not ready yet");
    // A rank that is not the gang's, and one ready twice, change nothing.
    for rank in [0, 3, 2] {
        assert!(s.on(Event::NodeReady { attempt: 1, rank }).is_empty());
    }
    assert_eq!(s.r.attempts[0].ready_nodes, vec![2]);
    s.on(Event::NodeReady {
        attempt: 1,
        rank: 1,
    });
    assert_eq!(s.r.state, JobState::Running);
}

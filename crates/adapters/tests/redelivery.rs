//! Acceptance test "Redelivery": queues deliver at least once, so every handler
//! must be safe to run again on a message it already handled, even after other
//! messages were handled in between.
//!
//! For many random job histories, the history is delivered once on fresh in-memory
//! ports, then again on other fresh ports with every event delivered twice (the
//! duplicate at a random later position, carrying its original time). The ledger
//! must end up the same, the broker must have sent the same dispatch messages and
//! hold the same VMs.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use respawn_adapters::memory::{MemoryCompute, MemoryLedger, MemoryQueue};
use respawn_core::handlers::{self, Disposition, Submission};
use respawn_core::job::{JobId, JobRecord, JobState};
use respawn_core::lifecycle::{Event, Timeouts};
use respawn_core::messages::Message;
use respawn_core::ports::queue::{Outgoing, Receive, dead_letter_queue};
use respawn_core::ports::{Ports, Queue, QueueNames};
use respawn_core::spec::{self, Format};
use respawn_core::time::{ManualClock, Timestamp};

/// Histories checked by delivering events straight to the handler.
const DIRECT_CASES: u64 = 2_000;
/// Histories checked through the queue and `handle_delivery` (slower per case).
const QUEUE_CASES: u64 = 500;
/// Longest history, in events.
const MAX_EVENTS: usize = 60;

/// Submission time of every job.
const T0: Timestamp = Timestamp(1_750_000_000_000);

/// A queue the test feeds history events through; kept apart from the broker's
/// own dispatch queue so the two never mix.
const INBOX: &str = "test.inbox";

/// What varies between cases besides the history: the spec's budgets and limits,
/// and how many VMs the provider has (none: every allocation fails).
#[derive(Debug, Clone)]
struct Setup {
    spec_yaml: String,
    vm_slots: usize,
    timeouts: Timeouts,
}

impl Setup {
    fn random(rng: &mut StdRng, timeouts: Timeouts) -> Setup {
        let mut y = String::from("name: redelivery\ncommand: [\"train\"]\nretry:\n");
        y += &format!("  max_failures: {}\n", rng.random_range(0..=3));
        if rng.random_bool(0.6) {
            y += &format!("  max_preemptions: {}\n", rng.random_range(0..=4));
        }
        if rng.random_bool(0.5) {
            y += "  infra_exit_codes: [137]\n";
        }
        y += &format!("limits:\n  max_wait: {}m\n", rng.random_range(60..=12 * 60));
        if rng.random_bool(0.5) {
            y += &format!("  max_runtime: {}m\n", rng.random_range(5..=120));
        }
        Setup {
            spec_yaml: y,
            vm_slots: if rng.random_bool(0.1) { 0 } else { 1 },
            timeouts,
        }
    }
}

/// One broker on fresh in-memory ports, with one submitted job.
struct World {
    ports: Ports,
    ledger: Arc<MemoryLedger>,
    queue: Arc<MemoryQueue>,
    compute: Arc<MemoryCompute>,
    clock: ManualClock,
    id: JobId,
    /// The latest event time delivered so far; the clock shows it.
    latest: Timestamp,
}

/// How events reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `handlers::job_event`, as a host that already decoded the message would.
    Handler,
    /// Encoded as the queue message a host receives, sent, received, handled with
    /// `handlers::handle_delivery` and settled.
    Queue,
}

impl World {
    async fn new(setup: &Setup) -> World {
        let ledger = Arc::new(MemoryLedger::new());
        let queue = Arc::new(MemoryQueue::default());
        let compute = Arc::new(MemoryCompute::new(setup.vm_slots));
        let clock = ManualClock::new(T0);
        let ports = Ports {
            ledger: ledger.clone(),
            queue: queue.clone(),
            compute: compute.clone(),
            secrets: Arc::new(respawn_adapters::memory::MemorySecrets::new()),
            blobs: Arc::new(object_store::memory::InMemory::new()),
            clock: Arc::new(clock.clone()),
            timeouts: setup.timeouts.clone(),
            queues: QueueNames::default(),
        };
        let spec = spec::parse(&setup.spec_yaml, Format::Yaml).unwrap();
        let sub = Submission {
            spec,
            project: "default".into(),
            reply_to: None,
            local_files: false,
        };
        let id = handlers::submit(&ports, sub).await.unwrap().job.id;
        World {
            ports,
            ledger,
            queue,
            compute,
            clock,
            id,
            latest: T0,
        }
    }

    async fn record(&self) -> JobRecord {
        self.ports.ledger.get(&self.id).await.unwrap()
    }

    /// Delivers `ev`, which happened at `at`. The clock shows the latest time
    /// delivered so far, as a host's would: a redelivered old event does not turn
    /// the clock back for the follow-ups (VM allocated, or not) it may cause.
    async fn deliver(&mut self, via: Via, ev: &Event, at: Timestamp) {
        self.latest = self.latest.max(at);
        self.clock.set(self.latest);
        match via {
            Via::Handler => {
                handlers::job_event(&self.ports, &self.id, ev, at)
                    .await
                    .unwrap();
            }
            Via::Queue => {
                // A dispatch travels as the dispatch queue's own message (its time is
                // the handler's clock); everything else as an event message.
                let msg = match ev {
                    Event::Dispatch { attempt, waits } => Message::Dispatch {
                        job: self.id.clone(),
                        attempt: *attempt,
                        waits: *waits,
                    },
                    _ => Message::Event {
                        job: self.id.clone(),
                        at,
                        event: ev.clone(),
                    },
                };
                let q = &*self.queue;
                q.send(INBOX, Outgoing::new(msg.to_bytes())).await.unwrap();
                let d = q.receive(INBOX, Receive::default()).await.unwrap();
                assert_eq!(d.len(), 1, "the message just sent is receivable");
                let disposition = handlers::handle_delivery(&self.ports, &d[0]).await;
                assert_eq!(disposition, Disposition::Ack, "{ev:?}");
                handlers::settle(q, &d[0], &disposition).await.unwrap();
                assert_eq!(q.count(INBOX), 0);
            }
        }
    }

    /// Hands every dispatch message the broker queued to `handle_delivery` twice,
    /// the way a crash between handling and acking would: received under a lease
    /// that ends at once, handled, not acked, received again, handled and acked.
    async fn drain_dispatch_queue_twice(&mut self) {
        let q = &*self.queue;
        let dispatch = self.ports.queues.dispatch.clone();
        let crash = Receive {
            lease: Duration::ZERO,
            ..Receive::default()
        };
        // Only what is queued now: handling may queue more (an allocation that
        // failed queues the next attempt), and with no VMs that would never end.
        for _ in 0..q.count(&dispatch) {
            let Some(first) = q.receive(&dispatch, crash).await.unwrap().pop() else {
                break; // the rest is delayed (a retry's backoff)
            };
            assert_eq!(
                handlers::handle_delivery(&self.ports, &first).await,
                Disposition::Ack
            );
            let again = q.receive(&dispatch, Receive::default()).await.unwrap();
            assert_eq!(again.len(), 1, "an unacked message comes back");
            assert_eq!(again[0].id, first.id);
            assert_eq!(again[0].deliveries, first.deliveries + 1);
            let disposition = handlers::handle_delivery(&self.ports, &again[0]).await;
            assert_eq!(disposition, Disposition::Ack);
            handlers::settle(q, &again[0], &disposition).await.unwrap();
        }
    }

    /// What two worlds must agree on, with this world's job id (which is random)
    /// and the ledger's version counter (which counts writes) taken out.
    fn outcome(&self) -> Outcome {
        let normalize = |s: String| s.replace(self.id.as_str(), "<job>");
        let records = self
            .ledger
            .snapshot()
            .into_iter()
            .map(|mut r| {
                r.version = 0;
                let json = normalize(serde_json::to_string(&r).unwrap());
                serde_json::from_str(&json).unwrap()
            })
            .collect();
        let mut live_vms: Vec<_> = self
            .compute
            .live()
            .into_iter()
            .map(|vm| normalize(format!("{} {}", vm.key, vm.id)))
            .collect();
        live_vms.sort();
        let dispatch = &self.ports.queues.dispatch;
        Outcome {
            records,
            live_vms,
            dispatch_messages: self.queue.count(dispatch),
            dead_letters: self.queue.count(&dead_letter_queue(dispatch))
                + self.queue.count(&dead_letter_queue(INBOX)),
        }
    }
}

#[derive(Debug, PartialEq)]
struct Outcome {
    records: Vec<JobRecord>,
    live_vms: Vec<String>,
    dispatch_messages: usize,
    dead_letters: usize,
}

// ---------------------------------------------------------------------------
// The simulator: plausible events for the job as it stands
// ---------------------------------------------------------------------------

/// Picks what happens next to the job, given its record: what its agent, its VM's
/// provider, its user and the scheduler could plausibly report at this point. The
/// time moves on by seconds mostly, now and then by long enough for an operator
/// timeout, limits.max_runtime or limits.max_wait to pass.
fn next_event(rng: &mut StdRng, r: &JobRecord, now: &mut Timestamp) -> Event {
    let secs = match rng.random_range(0..100) {
        0..10 => 0,
        10..85 => rng.random_range(1..=90),
        85..97 => rng.random_range(60..=30 * 60),
        _ => rng.random_range(30 * 60..=4 * 3600),
    };
    *now = now.plus(Duration::from_secs(secs));
    let attempt = r.attempt;
    let roll = rng.random_range(0..100);

    // Rare everywhere: the user cancels, the scheduler ticks, news of the previous
    // attempt's VM arrives late.
    if roll < 1 {
        return Event::CancelRequested {
            reason: "user".into(),
        };
    }
    if roll < 14 {
        return Event::ReconcileTick;
    }
    if roll < 18 && attempt > 1 {
        let stale = attempt - 1;
        return [
            Event::Heartbeat { attempt: stale },
            Event::WorkloadExited {
                attempt: stale,
                exit_code: 143,
            },
            Event::VmTerminated {
                attempt: stale,
                reason: "late news".into(),
            },
        ]
        .choose(rng)
        .unwrap()
        .clone();
    }

    let seq = r.checkpoint.map_or(1, |c| c + rng.random_range(0..=2));
    let checkpoint = Event::CheckpointCommitted {
        attempt,
        seq,
        upload: None,
    };
    let heartbeat = Event::Heartbeat { attempt };
    // The provider's deadline is normally ahead; an agent that saw the notice late
    // (it was restarting, or polls slowly) reports one that has already passed.
    let deadline = if rng.random_bool(0.8) {
        now.plus(Duration::from_secs(rng.random_range(0..=120)))
    } else {
        Timestamp(now.0.saturating_sub(rng.random_range(0..=300_000)))
    };
    let notice = Event::PreemptionNotice { attempt, deadline };
    let vm_gone = Event::VmTerminated {
        attempt,
        reason: "host failure".into(),
    };
    let exit = |code| Event::WorkloadExited {
        attempt,
        exit_code: code,
    };
    match r.state {
        // Only the scheduler acts on a pending attempt: it takes the dispatch.
        JobState::Pending => Event::Dispatch {
            attempt,
            waits: r.capacity_waits,
        },
        JobState::Starting => match rng.random_range(0..100) {
            0..60 => Event::WorkloadStarted {
                attempt,
                restored_checkpoint: r.checkpoint,
            },
            60..80 => heartbeat,
            80..90 => notice,
            90..95 => vm_gone,
            _ => exit(1),
        },
        JobState::Running => match rng.random_range(0..100) {
            0..40 => heartbeat,
            40..65 => checkpoint,
            65..75 => notice,
            75..88 => exit(*[0, 0, 1, 2, 137].choose(rng).unwrap()),
            _ => vm_gone,
        },
        // Draining: a last checkpoint, then the workload or the VM goes.
        JobState::Preempted => match rng.random_range(0..100) {
            0..30 => checkpoint,
            30..45 => heartbeat,
            45..65 => exit(*[143, 0].choose(rng).unwrap()),
            _ => Event::VmTerminated {
                attempt,
                reason: "spot reclaimed".into(),
            },
        },
        // Allocation is settled within the dispatch with in-memory compute, so a
        // job is only seen here if that changes; then let time decide.
        JobState::Allocating => Event::ReconcileTick,
        // Ended: only late news.
        JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
            [heartbeat, vm_gone, exit(0), Event::ReconcileTick]
                .choose(rng)
                .unwrap()
                .clone()
        }
    }
}

/// Runs a history on `world`, generating it as it goes; returns it.
async fn simulate(rng: &mut StdRng, world: &mut World, via: Via) -> Vec<(Event, Timestamp)> {
    let mut history = Vec::new();
    let mut now = T0;
    let mut after_end = 0;
    while history.len() < MAX_EVENTS && after_end < 3 {
        let r = world.record().await;
        if r.state.is_terminal() {
            after_end += 1;
        }
        let ev = next_event(rng, &r, &mut now);
        world.deliver(via, &ev, now).await;
        history.push((ev, now));
    }
    history
}

/// The history's indices, each twice: the original in place, the duplicate at a
/// random later position.
fn with_duplicates(rng: &mut StdRng, n: usize) -> Vec<usize> {
    let mut order: Vec<(usize, bool)> = (0..n).map(|i| (i, false)).collect();
    for i in 0..n {
        let original = order.iter().position(|&e| e == (i, false)).unwrap();
        let at = rng.random_range(original + 1..=order.len());
        order.insert(at, (i, true));
    }
    order.into_iter().map(|(i, _)| i).collect()
}

/// One case: the history once, then every event of it twice.
async fn check_case(seed: u64, via: Via, timeouts: Timeouts) {
    let mut rng = StdRng::seed_from_u64(seed);
    let setup = Setup::random(&mut rng, timeouts);

    let mut once = World::new(&setup).await;
    let history = simulate(&mut rng, &mut once, via).await;

    let mut twice = World::new(&setup).await;
    let order = with_duplicates(&mut rng, history.len());
    for &i in &order {
        let (ev, at) = &history[i];
        twice.deliver(via, ev, *at).await;
    }

    let context = || {
        let lines: Vec<String> = history
            .iter()
            .enumerate()
            .map(|(i, (ev, at))| format!("  {i:2} +{:>6}s {ev:?}", (at.0 - T0.0) / 1000))
            .collect();
        format!(
            "seed {seed} via {via:?}\nspec:\n{}vm slots: {}\nhistory:\n{}\ndelivery order: {order:?}",
            setup.spec_yaml,
            setup.vm_slots,
            lines.join("\n")
        )
    };
    let expected = once.outcome();
    assert_eq!(twice.outcome(), expected, "{}", context());
    assert_eq!(expected.dead_letters, 0, "{}", context());

    // An ended job holds no VM.
    let rec = once.record().await;
    if rec.state.is_terminal() {
        assert!(expected.live_vms.is_empty(), "{}", context());
    }

    // The dispatch messages the broker itself queued, each handled twice.
    if via == Via::Queue {
        once.drain_dispatch_queue_twice().await;
        twice.drain_dispatch_queue_twice().await;
        assert_eq!(
            twice.outcome(),
            once.outcome(),
            "after draining\n{}",
            context()
        );
    }
}

#[tokio::test]
async fn redelivered_events_change_nothing() {
    for seed in 0..DIRECT_CASES {
        check_case(seed, Via::Handler, Timeouts::default()).await;
    }
}

#[tokio::test]
async fn redelivered_messages_change_nothing() {
    // The in-memory queue delays by the wall clock, which the test does not move:
    // with no failure backoff every retry's dispatch message is receivable at once,
    // so what the drain sees does not depend on how fast the test runs.
    let timeouts = Timeouts {
        failure_backoff: Duration::ZERO,
        ..Timeouts::default()
    };
    for seed in 0..QUEUE_CASES {
        check_case(1_000_000 + seed, Via::Queue, timeouts.clone()).await;
    }
}

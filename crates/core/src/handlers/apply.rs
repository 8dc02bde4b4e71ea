//! Applying events to the ledger and carrying out the outbox.

use std::time::Duration;

use tracing::{debug, info};

use super::Error;
use crate::job::{JobId, JobRecord, ReplyTo};
use crate::lifecycle::{self, Command, Event};
use crate::messages::{Message, Notification};
use crate::ports::compute::{self, AllocateRequest, AllocationKey};
use crate::ports::queue::Outgoing;
use crate::ports::{Ports, ledger};
use crate::spec::Placement;
use crate::time::Timestamp;

/// Compare-and-swap retries before giving up on a hot record.
const CAS_RETRIES: usize = 32;
/// Rounds of command → follow-up event → command in one flush (a chain is ≤ 3 long).
const FLUSH_ROUNDS: usize = 8;

/// Applies `event` (which happened at `at`) to job `id`, stores the result, and
/// carries out the commands it decided. Delivering the same event again is harmless.
#[tracing::instrument(
    name = "job event",
    skip_all,
    fields(otel.name = event.kind(), job_id = %id, attempt = ?event.attempt())
)]
pub async fn job_event(
    ports: &Ports,
    id: &JobId,
    event: &Event,
    at: Timestamp,
) -> Result<JobRecord, Error> {
    let rec = update_with(ports, id, |r| step(r, event, at, &ports.timeouts)).await?;
    flush_outbox(ports, rec).await
}

/// Applies one event in place: the lifecycle's transition, its log line, and a
/// notification command when the state changed and the job has notify URLs.
fn step(r: &mut JobRecord, event: &Event, at: Timestamp, timeouts: &lifecycle::Timeouts) {
    let t = lifecycle::apply(r, event, at, timeouts);
    if !t.changed {
        return;
    }
    log_transition(r, &t.record, event);
    let entered = (t.record.state != r.state).then_some(t.record.state);
    *r = t.record;
    if let Some(state) = entered.filter(|_| !r.spec.notify.is_empty() || r.reply_to.is_some()) {
        r.outbox.push(Command::Notify { state, at });
    }
}

fn log_transition(before: &JobRecord, after: &JobRecord, event: &Event) {
    if before.state != after.state {
        info!(
            job_id = %after.id,
            attempt = after.attempt,
            from = %before.state,
            to = %after.state,
            event = event.kind(),
            reason = after.reason.as_deref().unwrap_or(""),
            "job state changed"
        );
    } else {
        debug!(job_id = %after.id, attempt = after.attempt, event = event.kind(), "job updated");
    }
}

/// Changes job `id` outside the lifecycle (bookkeeping such as notification
/// attempts), by compare-and-swap, reading again on conflict.
pub async fn update_job(
    ports: &Ports,
    id: &JobId,
    f: impl FnMut(&mut JobRecord),
) -> Result<JobRecord, Error> {
    update_with(ports, id, f).await
}

/// Reads job `id`, lets `f` change it, and stores it by compare-and-swap, reading
/// again on conflict. Returns the stored record (unchanged if `f` changed nothing).
pub(crate) async fn update_with(
    ports: &Ports,
    id: &JobId,
    f: impl FnMut(&mut JobRecord),
) -> Result<JobRecord, Error> {
    update_from(ports, id, None, f).await
}

/// [`update_with`], starting from `known` (a record just read or stored) instead of
/// reading it first; a conflict means it was stale, and the loop reads as usual.
async fn update_from(
    ports: &Ports,
    id: &JobId,
    mut known: Option<JobRecord>,
    mut f: impl FnMut(&mut JobRecord),
) -> Result<JobRecord, Error> {
    for _ in 0..CAS_RETRIES {
        let current = match known.take() {
            Some(r) => r,
            None => ports.ledger.get(id).await?,
        };
        let mut next = current.clone();
        f(&mut next);
        if next == current {
            return Ok(current);
        }
        match ports.ledger.update(next).await {
            Ok(stored) => return Ok(stored),
            Err(ledger::Error::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Contended(id.to_string()))
}

/// Carries out the record's outbox and removes what was done, feeding follow-up
/// events (a VM allocated, or not) back through the lifecycle.
pub async fn flush_outbox(ports: &Ports, mut rec: JobRecord) -> Result<JobRecord, Error> {
    for _ in 0..FLUSH_ROUNDS {
        if rec.outbox.is_empty() {
            return Ok(rec);
        }
        let done = rec.outbox.clone();
        let mut follow_ups = Vec::new();
        for cmd in &done {
            if let Some(ev) = execute(ports, &rec, cmd).await? {
                follow_ups.push(ev);
            }
        }
        let at = ports.clock.now();
        let id = rec.id.clone();
        rec = update_from(ports, &id, Some(rec), |r| {
            lifecycle::clear_outbox(r, &done);
            for ev in &follow_ups {
                step(r, ev, at, &ports.timeouts);
            }
        })
        .await?;
    }
    Ok(rec)
}

async fn execute(ports: &Ports, rec: &JobRecord, cmd: &Command) -> Result<Option<Event>, Error> {
    match cmd {
        Command::Dispatch {
            attempt,
            priority,
            delay_ms,
            waits,
        } => {
            let msg = Message::Dispatch {
                job: rec.id.clone(),
                attempt: *attempt,
                waits: *waits,
            };
            send_dispatch(ports, rec, msg, *priority, *delay_ms).await?;
            Ok(None)
        }
        Command::Allocate { attempt } => allocate(ports, rec, *attempt).await,
        Command::Notify { state, at } => {
            // One message per URL, so that each is retried on its own.
            let reply = rec.reply_to.as_ref().map(ReplyTo::as_url);
            for url in rec.spec.notify.iter().chain(reply.iter()) {
                let n = Notification {
                    job: rec.id.clone(),
                    state: *state,
                    at: *at,
                    url: url.clone(),
                };
                ports
                    .queue
                    .send(&ports.queues.notify, Outgoing::new(n.to_bytes()))
                    .await?;
            }
            Ok(None)
        }
        Command::DeleteSecrets => {
            ports.secrets.delete(&rec.id).await?;
            debug!(job_id = %rec.id, attempt = rec.attempt, "secrets deleted");
            Ok(None)
        }
        Command::Release { attempt } => {
            let key = AllocationKey {
                job: rec.id.clone(),
                attempt: *attempt,
            };
            ports.compute.release(&key).await?;
            debug!(job_id = %rec.id, attempt, "vm released");
            Ok(None)
        }
    }
}

/// Puts an attempt's dispatch message on the dispatch queue.
pub(crate) async fn send_dispatch(
    ports: &Ports,
    rec: &JobRecord,
    msg: Message,
    priority: u8,
    delay_ms: u64,
) -> Result<(), Error> {
    let out = Outgoing::new(msg.to_bytes())
        .priority(priority)
        .delay(std::time::Duration::from_millis(delay_ms));
    ports.queue.send(&ports.queues.dispatch, out).await?;
    debug!(job_id = %rec.id, attempt = rec.attempt, delay_ms, "attempt queued for dispatch");
    Ok(())
}

/// The job's placement, on demand once the attempt has waited for spot capacity
/// for `placement.on_demand_after`.
fn placement(rec: &JobRecord, now: Timestamp) -> Placement {
    let mut p = rec.spec.placement.clone();
    let waited = rec
        .waiting_since
        .map(|since| Duration::from_millis(now.0.saturating_sub(since.0)));
    if p.spot
        && let (Some(after), Some(waited)) = (&p.on_demand_after, waited)
        && waited >= after.0
    {
        info!(job_id = %rec.id, attempt = rec.attempt, waited_secs = waited.as_secs(), "no spot capacity for on_demand_after: asking for on-demand");
        p.spot = false;
    }
    p
}

#[tracing::instrument(name = "allocate", skip_all, fields(job_id = %rec.id, attempt))]
async fn allocate(ports: &Ports, rec: &JobRecord, attempt: u32) -> Result<Option<Event>, Error> {
    let req = AllocateRequest {
        key: AllocationKey {
            job: rec.id.clone(),
            attempt,
        },
        project: rec.project.clone(),
        resources: rec.spec.resources.clone(),
        placement: placement(rec, ports.clock.now()),
        image: rec.spec.image.clone(),
    };
    match ports.compute.allocate(&req).await {
        Ok(vm) => {
            info!(job_id = %rec.id, attempt, vm = %vm.id, spot = vm.spot, "vm allocated");
            Ok(Some(Event::VmAllocated {
                attempt,
                vm: vm.id,
                spot: vm.spot,
            }))
        }
        Err(compute::Error::Capacity(reason)) => {
            info!(job_id = %rec.id, attempt, %reason, "no capacity");
            Ok(Some(Event::AllocationFailed { attempt, reason }))
        }
        Err(compute::Error::Invalid(reason)) => Ok(Some(Event::Unschedulable { attempt, reason })),
        Err(compute::Error::NotSupported(what)) => Ok(Some(Event::Unschedulable {
            attempt,
            reason: format!("{what} is not supported in this build"),
        })),
        Err(e @ compute::Error::Unavailable(_)) => Err(e.into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spec::{self, Format};

    fn record(yaml: &str, waiting_since: Option<u64>) -> JobRecord {
        let spec = spec::parse(yaml, Format::Yaml).unwrap();
        let mut r = JobRecord::new(JobId::generate(Timestamp(0)), "default", spec, Timestamp(0));
        r.waiting_since = waiting_since.map(Timestamp);
        r
    }

    #[test]
    fn spot_until_the_attempt_has_waited_on_demand_after() {
        let yaml = "name: j\ncommand: [x]\nplacement:\n  on_demand_after: 10m\n";
        let min = 60_000;
        assert!(placement(&record(yaml, None), Timestamp(60 * min)).spot);
        assert!(placement(&record(yaml, Some(min)), Timestamp(10 * min)).spot);
        assert!(!placement(&record(yaml, Some(min)), Timestamp(11 * min)).spot);
        // Without the setting, spot it stays.
        let plain = "name: j\ncommand: [x]\n";
        assert!(placement(&record(plain, Some(0)), Timestamp(1_000 * min)).spot);
    }
}

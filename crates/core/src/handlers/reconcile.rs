//! The periodic repair: deadlines of every live job, and VMs nobody owns any more.

use tracing::{info, warn};

use super::Error;
use super::apply::job_event;
use crate::job::JobState;
use crate::lifecycle::Event;
use crate::ports::Ports;
use crate::ports::compute::VmState;
use crate::ports::ledger::{self, ListQuery};

/// What one reconcile pass looked at and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub jobs_checked: usize,
    pub jobs_changed: usize,
    pub vms_released: usize,
    pub errors: usize,
}

/// Ticks every non-terminal job, then releases VMs whose attempt is over.
pub async fn reconcile(ports: &Ports) -> Result<ReconcileReport, Error> {
    let mut report = ReconcileReport::default();
    let now = ports.clock.now();
    for state in JobState::ALL.into_iter().filter(|s| !s.is_terminal()) {
        let mut query = ListQuery::in_state(state);
        loop {
            let page = ports.ledger.list(&query).await?;
            for rec in page.jobs {
                report.jobs_checked += 1;
                match job_event(ports, &rec.id, &Event::ReconcileTick, now).await {
                    Ok(after) if after.version != rec.version => report.jobs_changed += 1,
                    Ok(_) => {}
                    Err(e) => {
                        report.errors += 1;
                        warn!(job_id = %rec.id, attempt = rec.attempt, error = %e, "reconcile failed for job");
                    }
                }
            }
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
    }
    release_orphans(ports, &mut report).await?;
    Ok(report)
}

async fn release_orphans(ports: &Ports, report: &mut ReconcileReport) -> Result<(), Error> {
    for vm in ports.compute.list().await? {
        if vm.state == VmState::Terminated {
            continue;
        }
        let orphan = match ports.ledger.get(&vm.key.job).await {
            // A VM may only serve the job's current attempt while that attempt is live.
            Ok(rec) => {
                rec.state.is_terminal()
                    || !rec.state.has_live_attempt()
                    || rec.attempt != vm.key.attempt
            }
            Err(ledger::Error::NotFound { .. }) => true,
            Err(e) => return Err(e.into()),
        };
        if orphan {
            ports.compute.release(&vm.key).await?;
            report.vms_released += 1;
            info!(job_id = %vm.key.job, attempt = vm.key.attempt, vm = %vm.id, "released orphaned vm");
        }
    }
    Ok(())
}

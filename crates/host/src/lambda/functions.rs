//! What each function does with its event, over the [`Cloud`] it built once. The
//! `functions/*` binaries are these, under `lambda_runtime`.

use std::sync::Arc;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use respawn_core::cloud::{ec2, s3};
use respawn_core::handlers::{self, blob_created};
use respawn_core::lifecycle::Event;
use respawn_core::ports::Ports;
use respawn_core::ports::queue::Delivery;
use serde_json::Value;
use tracing::{Instrument, info, warn};

use super::Cloud;
use crate::invocation::{Outcome, outcome, settle};
use crate::notify::Notifier;
use crate::{intake, loops};

/// The logical queue S3 notifications arrive on (`<stack>-uploads-no`).
pub const UPLOADS: &str = "uploads";
/// The logical queue EventBridge puts EC2's spot events on (`<stack>-ec2-no`).
pub const EC2_EVENTS: &str = "ec2";

/// An error Lambda should retry the invocation for (EventBridge and scheduled
/// invocations; SQS batches report per record instead).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// `submit`: job submissions by message (specs or templates), replies to
/// submitters' own queues.
pub async fn submit(cloud: &Cloud, event: SqsEvent, deadline_ms: u64) -> SqsBatchResponse {
    let q = cloud.broker.ports.queues.submit.clone();
    cloud
        .batch(&q, event, deadline_ms, |ports, got| async move {
            intake::handle_all(&ports, &cloud.broker.templates, &cloud.replies, got).await;
        })
        .await
}

/// `dispatch`: attempts taken off the dispatch queue get their VM.
pub async fn dispatch(cloud: &Cloud, event: SqsEvent, deadline_ms: u64) -> SqsBatchResponse {
    let q = cloud.broker.ports.queues.dispatch.clone();
    cloud
        .batch(&q, event, deadline_ms, |ports, got| async move {
            loops::process(&ports, got).await;
        })
        .await
}

/// `events`: agents' reports (the events queue) and EC2's spot events (the queue
/// EventBridge puts them on), told apart by the record's source.
pub async fn events(cloud: &Cloud, event: SqsEvent, deadline_ms: u64) -> SqsBatchResponse {
    let (ec2_records, reports): (Vec<_>, Vec<_>) = event.records.into_iter().partition(|r| {
        r.event_source_arn
            .as_deref()
            .is_some_and(|arn| cloud.is_queue(EC2_EVENTS, arn))
    });
    let mut reported = SqsEvent::default();
    reported.records = reports;
    let mut from_ec2 = SqsEvent::default();
    from_ec2.records = ec2_records;
    let q = cloud.broker.ports.queues.events.clone();
    let mut response = cloud
        .batch(&q, reported, deadline_ms, |ports, got| async move {
            loops::process(&ports, got).await;
        })
        .await;
    let more = cloud
        .batch(EC2_EVENTS, from_ec2, deadline_ms, |ports, got| async move {
            for d in got {
                settle(&ports, &d, ec2_event(cloud, &ports, &d).await).await;
            }
        })
        .await;
    response
        .batch_item_failures
        .extend(more.batch_item_failures);
    response
}

/// An EC2 event for one of the stack's instances, as the attempt's event.
async fn ec2_event(cloud: &Cloud, ports: &Ports, d: &Delivery) -> Outcome {
    let ev = match ec2::decode(&d.body) {
        Ok(Some(ev)) => ev,
        Ok(None) => return Outcome::Done,
        Err(e) => return Outcome::Refuse(format!("not an EC2 event: {e}")),
    };
    let ending = match &ev.kind {
        ec2::Ec2EventKind::Interruption { .. } => true,
        ec2::Ec2EventKind::State(s) => {
            matches!(
                s.as_str(),
                "shutting-down" | "terminated" | "stopping" | "stopped"
            )
        }
        ec2::Ec2EventKind::Rebalance => false,
    };
    if ending && let Err(e) = cloud.ec2.pool_vm_closing(&ev.instance_id).await {
        // A pool VM about to go must take no next attempt.
        return outcome(e);
    }
    let key = match cloud.ec2.key_of(&ev.instance_id).await {
        Ok(Some(key)) => key,
        Ok(None) => {
            info!(instance = %ev.instance_id, "EC2 event for an instance of no attempt of this stack");
            return Outcome::Done;
        }
        Err(e) => return outcome(e),
    };
    let attempt = key.attempt;
    let event = match ev.kind {
        ec2::Ec2EventKind::Interruption { action, deadline } => {
            info!(job_id = %key.job, attempt, instance = %ev.instance_id, %action, "spot interruption warning");
            Event::PreemptionNotice { attempt, deadline }
        }
        ec2::Ec2EventKind::State(state)
            if matches!(state.as_str(), "shutting-down" | "terminated" | "stopped") =>
        {
            Event::VmTerminated {
                attempt,
                reason: format!("instance {} {state}", ev.instance_id),
            }
        }
        ec2::Ec2EventKind::State(_) => return Outcome::Done,
        ec2::Ec2EventKind::Rebalance => {
            // Advice, not a notice: the agent checkpoints on the interruption.
            info!(job_id = %key.job, attempt, instance = %ev.instance_id, "rebalance recommendation");
            return Outcome::Done;
        }
    };
    match handlers::job_event(ports, &key.job, &event, ev.at).await {
        Ok(_) => Outcome::Done,
        Err(e) => outcome(e),
    }
}

/// `notify`: state changes POSTed to the jobs' URLs, replies to submitters.
pub async fn notify(
    cloud: &Cloud,
    notifier: &Arc<Notifier>,
    event: SqsEvent,
    deadline_ms: u64,
) -> SqsBatchResponse {
    let q = cloud.broker.ports.queues.notify.clone();
    cloud
        .batch(&q, event, deadline_ms, |ports, got| async move {
            notifier.handle(&ports, got).await;
        })
        .await
}

/// `on-upload`: S3 notifications (direct, SNS-wrapped or from EventBridge) make
/// jobs by the trigger rules.
pub async fn on_upload(cloud: &Cloud, event: SqsEvent, deadline_ms: u64) -> SqsBatchResponse {
    cloud
        .batch(UPLOADS, event, deadline_ms, |ports, got| async move {
            for d in got {
                let span = crate::traced::consuming(ports.queue.system(), &d);
                async { settle(&ports, &d, upload(cloud, &ports, &d).await).await }
                    .instrument(span)
                    .await;
            }
        })
        .await
}

async fn upload(cloud: &Cloud, ports: &Ports, d: &Delivery) -> Outcome {
    let objects = match s3::decode(&d.body) {
        Ok(s3::S3Message::Test { bucket }) => {
            info!(%bucket, "S3 test event");
            return Outcome::Done;
        }
        Ok(s3::S3Message::Created(objects)) => objects,
        Err(e) => return Outcome::Refuse(format!("not an S3 notification: {e}")),
    };
    for o in objects {
        if o.bucket != cloud.bucket {
            warn!(bucket = %o.bucket, "notification for another bucket; ignored");
            continue;
        }
        if let Err(e) = blob_created(ports, &cloud.broker.rules, &o.blob).await {
            // Each rule's job is keyed by rule, key and version: a retry of the
            // whole message makes no job twice.
            return outcome(e);
        }
    }
    Outcome::Done
}

/// `reconcile`: deadlines, lost VMs and orphans, and the warm pools' size, on a
/// schedule.
pub async fn reconcile(cloud: &Cloud, _event: Value) -> Result<Value, Error> {
    let report = handlers::reconcile(&cloud.broker.ports).await;
    if respawn_telemetry::metrics_exported() {
        cloud
            .broker
            .metrics
            .sample_queues(&cloud.broker.ports)
            .await;
    }
    // The pools are tended, and the security groups of gangs that are over
    // swept, whatever became of the jobs' pass.
    let swept = cloud.ec2.sweep_groups().await;
    let tended = cloud.ec2.tend_pools().await;
    let report = report?;
    info!(?report, "reconciled");
    swept?;
    tended?;
    Ok(serde_json::to_value(format!("{report:?}"))?)
}

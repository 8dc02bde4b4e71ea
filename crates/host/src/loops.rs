//! The broker's queue loops: consume events, reconcile on a timer. Dispatch is the
//! host's own (it takes attempts only while its compute has room).

use std::time::Duration;

use respawn_core::JobId;
use respawn_core::handlers::{self, handle_delivery, settle};
use respawn_core::messages::Message;
use respawn_core::ports::Ports;
use respawn_core::ports::queue::{Delivery, Receive};
use tokio::sync::watch;
use tracing::{Instrument, debug, warn};

const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Handles each delivery and settles it (ack, retry later or dead-letter) as its
/// handler decided.
pub async fn process(ports: &Ports, deliveries: Vec<Delivery>) {
    for d in deliveries {
        process_one(ports, d).await;
    }
}

/// [`process`], all deliveries at once: their writes share the store's commits.
/// For messages whose order does not matter (each dispatch is its own job's).
pub async fn process_together(ports: &Ports, deliveries: Vec<Delivery>) {
    let all = deliveries.into_iter().map(|d| process_one(ports, d));
    futures::future::join_all(all).await;
}

/// [`process`], the messages of different jobs at once and each job's in the
/// order received (a job's reports must not overtake each other).
pub async fn process_by_job(ports: &Ports, deliveries: Vec<Delivery>) {
    let mut groups: Vec<(Option<JobId>, Vec<Delivery>)> = Vec::new();
    for d in deliveries {
        let job = serde_json::from_slice::<Message>(&d.body)
            .ok()
            .map(|m| m.job().clone());
        match groups.iter_mut().find(|(j, _)| job.is_some() && *j == job) {
            Some((_, ds)) => ds.push(d),
            None => groups.push((job, vec![d])),
        }
    }
    let all = groups.into_iter().map(|(_, ds)| async move {
        for d in ds {
            process_one(ports, d).await;
        }
    });
    futures::future::join_all(all).await;
}

async fn process_one(ports: &Ports, d: Delivery) {
    let span = crate::traced::consuming(ports.queue.system(), &d);
    async {
        let disposition = handle_delivery(ports, &d).await;
        if let Err(e) = settle(ports.queue.as_ref(), &d, &disposition).await {
            // The lease ended or the store hiccupped: the message comes back and
            // its handler, being idempotent, does nothing new.
            warn!(queue = %d.queue, message_id = %d.id, error = %e, "cannot settle message");
        }
    }
    .instrument(span)
    .await;
}

/// Handles what is on the events queue now.
pub async fn drain_events(ports: &Ports) {
    let opts = Receive {
        max: 256,
        lease: Duration::from_secs(60),
        wait: Duration::ZERO,
    };
    loop {
        match ports.queue.receive(&ports.queues.events, opts).await {
            Ok(got) if got.is_empty() => return,
            Ok(got) => process(ports, got).await,
            Err(e) => {
                warn!(error = %e, "cannot read events");
                return;
            }
        }
    }
}

/// Reports from agents and the provider.
pub async fn events(ports: Ports, stop: watch::Receiver<bool>) {
    let opts = Receive {
        max: 64,
        lease: Duration::from_secs(60),
        wait: Duration::from_millis(500),
    };
    while !*stop.borrow() {
        match ports.queue.receive(&ports.queues.events, opts).await {
            Ok(got) => process_by_job(&ports, got).await,
            Err(e) => {
                warn!(error = %e, "cannot read events");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What waits in the broker's queues, sampled into `metrics` as often as the
/// reconcile pass runs: for the OTLP export, which no scrape drives (run it
/// only when metrics are exported).
pub async fn sample_queues(
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    ports: Ports,
    stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    while !*stop.borrow() {
        tick.tick().await;
        metrics.sample_queues(&ports).await;
    }
}

pub async fn reconcile(ports: Ports, stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.tick().await;
    while !*stop.borrow() {
        tick.tick().await;
        match handlers::reconcile(&ports).await {
            Ok(report) => debug!(?report, "reconciled"),
            Err(e) => warn!(error = %e, "reconcile failed"),
        }
    }
}

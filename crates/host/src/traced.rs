//! Trace context through the ports, so that a submission and every attempt after
//! it form one trace: each message sent carries the sending span's W3C
//! `traceparent` / `tracestate` as attributes (AMQP headers, SQS message
//! attributes, the Storage Queue envelope, the local queue's columns: every queue
//! adapter carries attributes), and each job records the trace it was submitted
//! in, which its agents continue.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use respawn_core::job::{JobId, JobRecord};
use respawn_core::ports::ledger::{self, Ledger, ListQuery, Page};
use respawn_core::ports::queue::{self, Delivery, Outgoing, Queue, Receive};

/// The queue, each message sent stamped with the current span's context.
#[derive(Debug)]
pub struct TracedQueue(pub Arc<dyn Queue>);

#[async_trait]
impl Queue for TracedQueue {
    async fn send(&self, queue: &str, mut msg: Outgoing) -> Result<String, queue::Error> {
        if !msg.attributes.contains_key(respawn_telemetry::TRACEPARENT) {
            respawn_telemetry::inject(&tracing::Span::current(), &mut msg.attributes);
        }
        self.0.send(queue, msg).await
    }

    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, queue::Error> {
        self.0.receive(queue, opts).await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), queue::Error> {
        self.0.ack(delivery).await
    }

    async fn retry_later(&self, delivery: &Delivery, delay: Duration) -> Result<(), queue::Error> {
        self.0.retry_later(delivery, delay).await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), queue::Error> {
        self.0.dead_letter(delivery, reason).await
    }

    async fn declare(&self, queue: &str) -> Result<(), queue::Error> {
        self.0.declare(queue).await
    }

    async fn depth(&self, queue: &str) -> Result<Option<queue::Depth>, queue::Error> {
        self.0.depth(queue).await
    }

    fn system(&self) -> &'static str {
        self.0.system()
    }
}

/// The ledger, each new job stamped with the trace it is submitted in.
#[derive(Debug)]
pub struct TracedLedger(pub Arc<dyn Ledger>);

#[async_trait]
impl Ledger for TracedLedger {
    async fn create(&self, mut record: JobRecord) -> Result<JobRecord, ledger::Error> {
        if record.trace.is_none() {
            record.trace = respawn_telemetry::traceparent();
        }
        self.0.create(record).await
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord, ledger::Error> {
        self.0.get(id).await
    }

    async fn update(&self, record: JobRecord) -> Result<JobRecord, ledger::Error> {
        self.0.update(record).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, ledger::Error> {
        self.0.list(query).await
    }

    async fn find_by_idempotency_key(
        &self,
        project: &str,
        key: &str,
    ) -> Result<Option<JobId>, ledger::Error> {
        self.0.find_by_idempotency_key(project, key).await
    }
}

/// The span of one message's handling: a consumer span (OpenTelemetry's messaging
/// conventions), the child of the span that sent the message, so that a trace
/// crosses the queue. `system` is the queue's `messaging.system`.
pub fn consuming(system: &'static str, d: &Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("{} process", d.queue),
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.name = %d.queue,
        messaging.operation.type = "process",
        messaging.message.id = %d.id,
        messaging.message.delivery_count = d.deliveries,
    );
    respawn_telemetry::adopt(&span, &d.attributes);
    span
}

/// `ports` with trace context through its queue and ledger.
pub fn traced(mut ports: respawn_core::ports::Ports) -> respawn_core::ports::Ports {
    ports.queue = Arc::new(TracedQueue(ports.queue));
    ports.ledger = Arc::new(TracedLedger(ports.ledger));
    ports
}

/// How long an invocation's answer waits for its spans and metrics to be sent:
/// a collector that is down must not hold every invocation up for the
/// exporter's own timeout (what is not sent by then goes with the next flush).
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `answer`, once the spans and metrics of its invocation are sent: Lambda
/// freezes a function's process the moment an invocation returns, and a frozen
/// exporter sends nothing until the next one, or never.
pub async fn answered<T>(answer: impl Future<Output = T>) -> T {
    let out = answer.await;
    let _ = tokio::time::timeout(FLUSH_WAIT, respawn_telemetry::flushed()).await;
    out
}

/// `router`, each of whose requests is [`answered`]: for Lambda's API function,
/// an HTTP server whose every request is an invocation.
pub fn answering(router: axum::Router) -> axum::Router {
    router.layer(axum::middleware::from_fn(
        |req: axum::extract::Request, next: axum::middleware::Next| answered(next.run(req)),
    ))
}

//! Logs, traces and metrics for every host of respawn (`respawn up`, each cloud
//! function, the agent): one [`init`].
//!
//! - **Logs** go to stderr, human by default or JSON ([`LogFormat::Json`]: one
//!   object per line with `trace_id` and `span_id` when the event is in a traced
//!   span), filtered by `RESPAWN_LOG` (`info` by default).
//! - **Traces** are exported as OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, over HTTP/protobuf unless
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` says otherwise, with the standard `OTEL_*`
//!   variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SDK_DISABLED`, …) honoured by the SDK.
//! - **Metrics** go out as OTLP too, every `OTEL_METRIC_EXPORT_INTERVAL` (60 s by
//!   default), through the global meter provider, unless `OTEL_METRICS_EXPORTER`
//!   is `none`; the instruments are the host's (`respawn_host::metrics`).
//! - **Context** travels as W3C `traceparent` / `tracestate`: [`inject`] writes the
//!   current span's into a message's attributes or a request's headers, [`adopt`]
//!   makes a span the child of what a message or request carried.

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The W3C trace context headers, as message attributes and HTTP headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, its fields after the message.
    #[default]
    Human,
    /// One JSON object per line, with `trace_id` and `span_id`.
    Json,
}

/// What [`init`] set up: shut it down before the process ends ([`flush`] sends
/// what is done so far).
#[derive(Debug, Default)]
pub struct Telemetry(());

impl Telemetry {
    pub fn shutdown(&self) {
        if let Some(p) = EXPORTING.get() {
            let _ = p.shutdown();
        }
        if let Some(m) = METERS.get() {
            let _ = m.shutdown();
        }
    }
}

/// Whether this process exports metrics: what samples only an export reads
/// (a queue's depth, between scrapes) are taken for.
pub fn metrics_exported() -> bool {
    METERS.get().is_some()
}

/// Whether `signal` (`TRACES`, `METRICS`) is to be exported over OTLP.
fn otlp_configured(signal: &str) -> bool {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter = var(&format!("OTEL_{signal}_EXPORTER"));
    !disabled
        && exporter.is_none_or(|e| e != "none")
        && (var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || var(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).is_some())
}

/// The OTLP protocol for `signal`, as the standard variables say.
fn protocol(signal: &str) -> String {
    std::env::var(format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "http/protobuf".into())
}

fn unknown_protocol(other: &str) -> String {
    format!(
        "OTEL_EXPORTER_OTLP_PROTOCOL {other:?}: this build exports http/protobuf{}",
        if cfg!(feature = "grpc") {
            " and grpc"
        } else {
            " (grpc: the grpc feature)"
        }
    )
}

fn metric_exporter() -> Result<opentelemetry_otlp::MetricExporter, String> {
    match protocol("METRICS").as_str() {
        "http/protobuf" => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string()),
        #[cfg(feature = "grpc")]
        "grpc" => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| e.to_string()),
        other => Err(unknown_protocol(other)),
    }
}

fn exporter() -> Result<opentelemetry_otlp::SpanExporter, String> {
    match protocol("TRACES").as_str() {
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string()),
        #[cfg(feature = "grpc")]
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| e.to_string()),
        other => Err(unknown_protocol(other)),
    }
}

/// The cloud and FaaS resource attributes (OpenTelemetry's semantic conventions)
/// of a function host, from what its platform sets in its environment; none
/// elsewhere (an agent on a cloud VM gets its own from its boot script, in
/// `OTEL_RESOURCE_ATTRIBUTES`).
fn platform() -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut out = Vec::new();
    if let Some(name) = var("AWS_LAMBDA_FUNCTION_NAME") {
        out.push(KeyValue::new("cloud.provider", "aws"));
        out.push(KeyValue::new("cloud.platform", "aws_lambda"));
        out.push(KeyValue::new("faas.name", name));
        if let Some(region) = var("AWS_REGION") {
            out.push(KeyValue::new("cloud.region", region));
        }
        if let Some(version) = var("AWS_LAMBDA_FUNCTION_VERSION") {
            out.push(KeyValue::new("faas.version", version));
        }
        if let Some(stream) = var("AWS_LAMBDA_LOG_STREAM_NAME") {
            out.push(KeyValue::new("faas.instance", stream));
        }
    } else if let Some(site) = var("FUNCTIONS_CUSTOMHANDLER_PORT").and(var("WEBSITE_SITE_NAME")) {
        out.push(KeyValue::new("cloud.provider", "azure"));
        out.push(KeyValue::new("cloud.platform", "azure_functions"));
        out.push(KeyValue::new("faas.name", site));
        if let Some(region) = var("REGION_NAME") {
            out.push(KeyValue::new("cloud.region", region));
        }
        if let Some(instance) = var("WEBSITE_INSTANCE_ID") {
            out.push(KeyValue::new("faas.instance", instance));
        }
    }
    out
}

/// This process, unique enough: its start time and pid.
fn instance_id() -> String {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{started:x}-{}", std::process::id())
}

/// Sets up logs, traces and metrics for `service` (the default `service.name`);
/// call once, first thing. Problems with an exporter are reported and leave its
/// signal off: a broker runs without its traces rather than not at all.
pub fn init(service: &str, format: LogFormat) -> Telemetry {
    init_with(service, format, true)
}

/// [`init`] for a process that counts nothing of its own (the agent): logs and
/// traces, no metrics export.
pub fn init_traces(service: &str, format: LogFormat) -> Telemetry {
    init_with(service, format, false)
}

fn init_with(service: &str, format: LogFormat, metrics: bool) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_env("RESPAWN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let mut provider = None;
    let mut problems = Vec::new();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned()),
        )
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        // Many processes of one service (function instances, agents) each send
        // their own cumulative counts: this tells them apart.
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance_id(),
        ))
        .with_attributes(platform())
        .build();
    let export = otlp_configured("TRACES");
    if export {
        match exporter() {
            Ok(exporter) => {
                provider = Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource.clone())
                        .build(),
                );
            }
            Err(e) => problems.push(format!("traces are not exported: {e}")),
        }
    } else if format == LogFormat::Json {
        // No export, but JSON lines carry trace and span ids: spans get them
        // from a provider that sends nowhere.
        provider = Some(SdkTracerProvider::builder().build());
    }
    // What a span carries is kept to what a trace is read for: its own fields,
    // and warnings and errors as its events. Info logs stay in the logs (which
    // carry the trace id), not in every span; no source locations or threads.
    // An export weighs 60 % less so (BENCHMARKS.md, "Tracing overhead").
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("respawn"))
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            .with_context_activation(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                *m.level()
                    <= if m.is_span() {
                        tracing::Level::INFO
                    } else {
                        tracing::Level::WARN
                    }
            }))
    });
    let fmt = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .event_format(json::WithTraceIds(
                tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true),
            ))
            .boxed(),
    };
    // RESPAWN_LOG filters the log lines only: a quieter log keeps its traces.
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter))
        .try_init();
    if metrics && otlp_configured("METRICS") {
        match metric_exporter() {
            Ok(exporter) => {
                let m = SdkMeterProvider::builder()
                    .with_periodic_exporter(exporter)
                    .with_resource(resource)
                    .build();
                opentelemetry::global::set_meter_provider(m.clone());
                let _ = METERS.set(m);
            }
            Err(e) => problems.push(format!("metrics are not exported: {e}")),
        }
    }
    for p in problems {
        tracing::warn!("{p}");
    }
    // The JSON logs' provider sends nowhere: nothing to flush or shut down.
    if let Some(p) = provider.filter(|_| export) {
        let _ = EXPORTING.set(p);
    }
    Telemetry(())
}

/// The providers [`init`] exports through, for [`flush`].
static EXPORTING: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();
static METERS: std::sync::OnceLock<SdkMeterProvider> = std::sync::OnceLock::new();

/// Sends the spans ended and the metrics counted so far, now: before a moment
/// after which the process may be killed (an agent whose attempt is over, a
/// function about to answer).
pub fn flush() {
    if let Some(p) = EXPORTING.get()
        && let Err(e) = p.force_flush()
    {
        tracing::debug!(error = %e, "cannot flush traces");
    }
    if let Some(m) = METERS.get()
        && let Err(e) = m.force_flush()
    {
        tracing::debug!(error = %e, "cannot flush metrics");
    }
}

/// [`flush`], off the async workers: the export blocks its caller until it is
/// sent or times out.
pub async fn flushed() {
    if EXPORTING.get().is_some() || METERS.get().is_some() {
        let _ = tokio::task::spawn_blocking(flush).await;
    }
}

struct Attributes<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Attributes<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Read<'a>(&'a BTreeMap<String, String>);

impl Extractor for Read<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes `span`'s trace context (`traceparent`, `tracestate`) into `into`;
/// nothing when it is not traced.
pub fn inject(span: &tracing::Span, into: &mut BTreeMap<String, String>) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut Attributes(into))
    });
}

/// The current span's context (`traceparent`, `tracestate`), to [`adopt`] later
/// in a task that outlives it; empty when it is not traced.
pub fn context() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    inject(&tracing::Span::current(), &mut m);
    m
}

/// The current span's `traceparent`, if it is traced.
pub fn traceparent() -> Option<String> {
    context().remove(TRACEPARENT)
}

/// Makes `span` the child of the context `from` carries (`traceparent`,
/// `tracestate`); nothing when it carries none.
pub fn adopt(span: &tracing::Span, from: &BTreeMap<String, String>) {
    if !from.contains_key(TRACEPARENT) {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Read(from)));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

mod json {
    use std::fmt;

    use opentelemetry::trace::TraceContextExt;
    use tracing::{Event, Subscriber};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::fmt::FmtContext;
    use tracing_subscriber::fmt::format::{Format, FormatEvent, FormatFields, Json, Writer};
    use tracing_subscriber::registry::LookupSpan;

    /// tracing-subscriber's JSON lines, with the OpenTelemetry `trace_id` and
    /// `span_id` of the event's span added.
    pub struct WithTraceIds(pub Format<Json>);

    impl<S, N> FormatEvent<S, N> for WithTraceIds
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            let mut line = String::new();
            self.0.format_event(ctx, Writer::new(&mut line), event)?;
            let cx = tracing::Span::current().context();
            let sc = cx.span().span_context().clone();
            let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str(&line) else {
                return writer.write_str(&line);
            };
            if sc.is_valid() {
                object.insert("trace_id".into(), sc.trace_id().to_string().into());
                object.insert("span_id".into(), sc.span_id().to_string().into());
            }
            writeln!(writer, "{}", serde_json::Value::Object(object))
        }
    }
}

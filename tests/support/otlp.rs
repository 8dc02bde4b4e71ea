//! A real OTLP receiver for tests: tests/support/otlp-receiver.py decodes what it
//! is sent with the official OpenTelemetry protobuf definitions (PyPI
//! `opentelemetry-proto`) and writes one span per line.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One receiver process; killed when dropped.
#[derive(Debug)]
pub struct Receiver {
    child: Child,
    file: std::path::PathBuf,
    metrics: std::path::PathBuf,
    /// Its OTLP/HTTP endpoint, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub url: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    /// Installs its packages (scripts/obs-install) and starts it, writing under
    /// `dir`.
    pub fn start(dir: &std::path::Path) -> Receiver {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let install = Command::new(root.join("scripts/obs-install"))
            .status()
            .unwrap();
        assert!(install.success(), "scripts/obs-install failed");
        let port = crate::free_port();
        let file = dir.join("spans.jsonl");
        let metrics = dir.join("metrics.jsonl");
        let child = Command::new(root.join(".venv-obs/bin/python"))
            .arg(root.join("tests/support/otlp-receiver.py"))
            .arg(port.to_string())
            .arg(&file)
            .arg(&metrics)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the OTLP receiver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Receiver {
            child,
            file,
            metrics,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Every metric data point received so far, oldest first: `service`,
    /// `instance`, `name`, `unit`, `type`, `attributes`, and `value` (sums and
    /// gauges) or `count` and `sum` (histograms).
    pub fn points(&self) -> Vec<Value> {
        written(&self.metrics)
    }

    /// The newest data point of metric `name` whose attributes include
    /// `attrs`, from service `service`.
    pub fn latest(&self, service: &str, name: &str, attrs: &[(&str, &str)]) -> Option<Value> {
        self.points().into_iter().rev().find(|p| {
            p["service"] == service
                && p["name"] == name
                // Attribute values as text: OTLP's JSON mapping writes 64-bit
                // integers as strings.
                && attrs.iter().all(|(k, v)| {
                    let a = &p["attributes"][k];
                    match a.as_str() {
                        Some(s) => s == *v,
                        None => a.to_string().as_str() == *v,
                    }
                })
        })
    }

    /// Every span received so far: `service`, `resource` (its attributes),
    /// `name`, `kind`, `trace_id`, `span_id`, `parent_span_id`, `attributes`,
    /// `links`.
    pub fn spans(&self) -> Vec<Value> {
        written(&self.file)
    }
}

/// The whole lines of `path` (a batch being written may end in half a one).
fn written(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An OTLP/HTTP endpoint that takes every export (traces and metrics) and keeps
/// only how many requests and bytes came: for benchmarks, where decoding would cost more than
/// the exporter being measured.
#[derive(Debug, Clone)]
pub struct Sink {
    /// For `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub url: String,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Sink {
    /// Serves on a free loopback port, on the current runtime.
    pub async fn start() -> Sink {
        use std::sync::atomic::Ordering;
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (r, b) = (requests.clone(), bytes.clone());
        let take = axum::routing::post(move |body: axum::body::Bytes| async move {
            r.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(body.len() as u64, Ordering::Relaxed);
            // An empty Export…ServiceResponse: all accepted.
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        });
        let app = axum::Router::new()
            .route("/v1/traces", take.clone())
            .route("/v1/metrics", take);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Sink {
            url,
            requests,
            bytes,
        }
    }

    /// `requests, KiB` received so far.
    pub fn received(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed) / 1024,
        )
    }
}

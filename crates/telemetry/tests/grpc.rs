//! The `grpc` feature: with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`, spans and metrics
//! reach a real OTLP gRPC receiver (tests/support/otlp-receiver.py --grpc, the
//! official protobuf definitions served by grpcio). A process sets up its
//! telemetry once, from its environment: the exporting side is this test binary
//! run again as a child.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Run by `exports_spans_and_metrics_over_grpc` in a child process: exports one
/// span and one counter, then shuts down (which sends what is left).
#[test]
fn child() {
    if std::env::var_os("RESPAWN_GRPC_CHILD").is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let telemetry =
            respawn_telemetry::init("respawn-grpc", respawn_telemetry::LogFormat::Human);
        tracing::info_span!("grpc probe").in_scope(|| tracing::warn!("inside the probe"));
        opentelemetry::global::meter("respawn")
            .u64_counter("respawn.grpc.probes")
            .build()
            .add(1, &[]);
        respawn_telemetry::flushed().await;
        telemetry.shutdown();
    });
}

#[test]
fn exports_spans_and_metrics_over_grpc() {
    let install = Command::new(root().join("scripts/obs-install"))
        .status()
        .unwrap();
    assert!(install.success(), "scripts/obs-install failed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let (spans, metrics) = (dir.path().join("spans"), dir.path().join("metrics"));
    let mut receiver = Command::new(root().join(".venv-obs/bin/python"))
        .arg(root().join("tests/support/otlp-receiver.py"))
        .arg(port.to_string())
        .args([&spans, &metrics])
        .arg("--grpc")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the gRPC receiver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture"])
        .env("RESPAWN_GRPC_CHILD", "1")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    let _ = receiver.kill();
    let _ = receiver.wait();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("not exported"), "{log}");
    let spans = std::fs::read_to_string(&spans).unwrap_or_default();
    assert!(
        spans.lines().any(|l| {
            let s: serde_json::Value = serde_json::from_str(l).unwrap();
            s["name"] == "grpc probe" && s["service"] == "respawn-grpc"
        }),
        "no span over gRPC: {spans}\n{log}"
    );
    let metrics = std::fs::read_to_string(&metrics).unwrap_or_default();
    assert!(
        metrics.lines().any(|l| {
            let p: serde_json::Value = serde_json::from_str(l).unwrap();
            p["name"] == "respawn.grpc.probes" && p["value"] == 1
        }),
        "no metric over gRPC: {metrics}\n{log}"
    );
}

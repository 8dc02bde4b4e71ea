//! A real OTLP receiver for tests: tests/support/otlp-receiver.py decodes what it
//! is sent with the official OpenTelemetry protobuf definitions (PyPI
//! `opentelemetry-proto`) and writes one span per line.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One receiver process; killed when dropped.
pub struct Receiver {
    child: Child,
    file: std::path::PathBuf,
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
        let child = Command::new(root.join(".venv-obs/bin/python"))
            .arg(root.join("tests/support/otlp-receiver.py"))
            .arg(port.to_string())
            .arg(&file)
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
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Every span received so far: `service`, `name`, `kind`, `trace_id`,
    /// `span_id`, `parent_span_id`, `attributes`, `links`.
    pub fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

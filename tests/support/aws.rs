//! The local AWS emulator (`localstack/aws-start`, moto server) for one test, and
//! the boto3 drivers under `tests/aws/` that act on it as AWS's own tools would.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root: the first folder up from this crate with `localstack/`
/// (this file is also compiled into crates' own tests, by path).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("localstack/aws-start").is_file())
        .expect("the repository's localstack/ folder")
        .to_owned()
}

/// The emulator on a free port, stopped when dropped. Installs it on first use
/// (python3 and PyPI needed); fails, never skips, when it cannot start.
#[derive(Debug)]
pub struct Emulator {
    dir: tempfile::TempDir,
    pub endpoint: String,
}

impl Emulator {
    pub fn start() -> Emulator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("a temporary folder");
        run(
            Command::new(root().join("localstack/aws-start"))
                .arg(port.to_string())
                .arg(dir.path()),
            "localstack/aws-start",
        );
        Emulator {
            dir,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs `tests/aws/<script>` with the endpoint and `args`; returns the message
    /// bodies it printed (one JSON string a line).
    pub fn drive(&self, script: &str, args: &[&str]) -> Vec<String> {
        let out = run(
            Command::new(root().join(".venv-aws/bin/python"))
                .arg(root().join("tests/aws").join(script))
                .arg(&self.endpoint)
                .args(args),
            &format!("tests/aws/{script}"),
        );
        String::from_utf8_lossy(&out)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON string a line"))
            .collect()
    }

    /// Runs a Python snippet with boto3 at hand; `{endpoint}` in it is the
    /// emulator's address.
    pub fn python(&self, script: &str) {
        run(
            Command::new(root().join(".venv-aws/bin/python"))
                .args(["-c", &script.replace("{endpoint}", &self.endpoint)]),
            "a boto3 snippet",
        );
    }

    /// Runs a Python snippet like [`Emulator::python`]; returns what it printed.
    pub fn drive_python(&self, script: &str) -> String {
        let out = run(
            Command::new(root().join(".venv-aws/bin/python"))
                .args(["-c", &script.replace("{endpoint}", &self.endpoint)]),
            "a boto3 snippet",
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Creates a stack's buckets, queues, notification and rule
    /// (`localstack/aws-resources`).
    pub fn resources(&self, stack: &str) {
        run(
            Command::new(root().join("localstack/aws-resources"))
                .arg(stack)
                .arg(&self.endpoint),
            "localstack/aws-resources",
        );
    }

    /// A file of `schemas/fixtures/aws/`, as a path a driver can read.
    pub fn fixture(name: &str) -> String {
        root()
            .join("schemas/fixtures/aws")
            .join(name)
            .display()
            .to_string()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = Command::new(root().join("localstack/aws-stop"))
            .arg(self.dir.path())
            .status();
    }
}

/// Runs `cmd` to its end; its stdout, or a panic with its stderr when it fails.
fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

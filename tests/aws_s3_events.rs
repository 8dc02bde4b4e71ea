//! S3 notifications as the AWS emulator really sends them (`localstack/aws-start`,
//! moto server), decoded by `respawn_core::cloud::s3`: the test event first, then
//! one object per upload, keys exactly as uploaded — spaces, `+`, `%`, `/` and
//! non-ASCII included. The uploads and the queue are driven by boto3
//! (tests/aws/s3_notifications.py), not by respawn's code. Needs python3 and PyPI
//! (the first run installs the emulator); without them this test fails, never skips.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use respawn_core::cloud::s3::{S3Message, decode};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The emulator on a free port, stopped when dropped.
struct Emulator {
    dir: tempfile::TempDir,
    endpoint: String,
}

impl Emulator {
    fn start() -> Emulator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(root().join("localstack/aws-start"))
            .arg(port.to_string())
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "localstack/aws-start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Emulator {
            dir,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = Command::new(root().join("localstack/aws-stop"))
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn uploads_reach_the_queue_as_objects_with_their_keys() {
    let aws = Emulator::start();
    let keys = [
        "incoming/plain.csv",
        "incoming/day 1/a b.csv",
        "incoming/a+b%20c.csv",
        "incoming/bär/ü 𝄞.csv",
        "incoming/semi;colon=eq&amp?.csv",
    ];
    let bucket = format!("respawn-test-{}", std::process::id());
    let out = Command::new(root().join(".venv-aws/bin/python"))
        .arg(root().join("tests/aws/s3_notifications.py"))
        .args([&aws.endpoint, &bucket, "notifications"])
        .args(keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the boto3 driver failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tests = 0;
    let mut got = BTreeSet::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let body: String = serde_json::from_str(line).unwrap();
        match decode(body.as_bytes()).unwrap_or_else(|e| panic!("{e}: {body}")) {
            S3Message::Test { bucket: b } => {
                assert_eq!(b, bucket);
                tests += 1;
            }
            S3Message::Created(objects) => {
                for o in objects {
                    assert_eq!(o.bucket, bucket);
                    // Each object's body is its key: the size says the key is whole.
                    assert_eq!(o.blob.size, o.blob.key.len() as u64, "{o:?}");
                    assert!(!o.blob.version.is_empty());
                    got.insert(o.blob.key);
                }
            }
        }
    }
    assert_eq!(tests, 1, "S3 checks the destination once");
    let want: BTreeSet<String> = keys.iter().map(|k| k.to_string()).collect();
    assert_eq!(got, want);
}

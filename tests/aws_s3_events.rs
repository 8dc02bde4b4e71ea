//! S3 notifications as the AWS emulator really sends them, decoded by
//! `respawn_core::cloud::s3`: the test event first, then one object per upload, keys
//! exactly as uploaded — spaces, `+`, `%`, `/` and non-ASCII included. Buckets,
//! uploads and the queue are driven by boto3 (tests/aws/s3_notifications.py), not by
//! respawn's code.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use respawn_core::cloud::s3::{S3Message, decode};
use respawn_e2e::aws::Emulator;

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
    let mut args = vec![bucket.as_str(), "notifications"];
    args.extend(keys);
    let mut tests = 0;
    let mut got = BTreeSet::new();
    for body in aws.drive("s3_notifications.py", &args) {
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

//! Trigger rules end to end on in-memory ports: a blob-created event makes one job
//! per matching rule, once per object version, however often it is delivered.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::sync::Arc;

use respawn_adapters::memory::{MemoryCompute, MemoryLedger, MemoryQueue};
use respawn_core::handlers::{BlobCreated, blob_created};
use respawn_core::job::JobRecord;
use respawn_core::lifecycle::Timeouts;
use respawn_core::ports::ledger::ListQuery;
use respawn_core::ports::{Ports, QueueNames};
use respawn_core::spec::Format;
use respawn_core::time::SystemClock;
use respawn_core::trigger::{self, TriggerRule};

const CSV: &str = r#"
name: csv
match: { prefix: projects/vision/incoming/, glob: "*.csv" }
project: vision
template:
  name: train-${stem}
  command: [respawn-trainer, --data, "${input_path}"]
  inputs: ["${uri}"]
"#;

fn ports() -> Ports {
    Ports {
        ledger: Arc::new(MemoryLedger::new()),
        queue: Arc::new(MemoryQueue::default()),
        compute: Arc::new(MemoryCompute::new(4)),
        secrets: std::sync::Arc::new(respawn_adapters::memory::MemorySecrets::new()),
        blobs: Arc::new(object_store::memory::InMemory::new()),
        clock: Arc::new(SystemClock),
        timeouts: Timeouts::default(),
        queues: QueueNames::default(),
    }
}

fn blob(key: &str, version: &str) -> BlobCreated {
    BlobCreated {
        key: key.into(),
        version: version.into(),
        size: 42,
    }
}

async fn all_jobs(ports: &Ports) -> Vec<JobRecord> {
    let query = ListQuery {
        limit: 1000,
        ..Default::default()
    };
    ports.ledger.list(&query).await.unwrap().jobs
}

#[tokio::test]
async fn one_job_per_object_version() {
    let ports = ports();
    let rules = [trigger::parse_rule(CSV, Format::Yaml).unwrap()];
    let event = blob("projects/vision/incoming/iris.csv", "etag-1");

    let first = blob_created(&ports, &rules, &event).await.unwrap();
    assert_eq!(first.len(), 1);
    assert!(first[0].created);
    let job = &first[0].job;
    assert_eq!(job.project, "vision");
    assert_eq!(job.spec.name, "train-iris");
    assert_eq!(
        job.spec.inputs[0].uri,
        "bucket://projects/vision/incoming/iris.csv"
    );
    assert_eq!(job.spec.labels[trigger::LABEL], "csv");

    // The queue delivers at least once: the same event again finds the same job.
    let again = blob_created(&ports, &rules, &event).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(!again[0].created);
    assert_eq!(again[0].job.id, job.id);
    assert_eq!(all_jobs(&ports).await.len(), 1);

    // A new version of the file is new data: a second job.
    let v2 = blob_created(
        &ports,
        &rules,
        &blob("projects/vision/incoming/iris.csv", "etag-2"),
    )
    .await
    .unwrap();
    assert!(v2[0].created);
    assert_ne!(v2[0].job.id, job.id);
    assert_eq!(all_jobs(&ports).await.len(), 2);
}

#[tokio::test]
async fn unmatched_and_unsafe_keys_make_nothing() {
    let ports = ports();
    let rules = [trigger::parse_rule(CSV, Format::Yaml).unwrap()];
    for key in [
        "incoming/iris.json",
        "elsewhere/iris.csv",
        "incoming/sub/iris.csv",
        "incoming/../secrets/x.csv",
        "/incoming/iris.csv",
    ] {
        let out = blob_created(&ports, &rules, &blob(key, "1")).await.unwrap();
        assert!(out.is_empty(), "{key}");
    }
    assert!(
        blob_created(&ports, &[], &blob("incoming/a.csv", "1"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(all_jobs(&ports).await.is_empty());
}

#[tokio::test]
async fn a_broken_rule_does_not_stop_a_good_one() {
    let ports = ports();
    // Decoded without `parse_rule`'s checks, as a host holding a stale rule might:
    // its template names a variable that does not exist.
    let broken: TriggerRule = serde_json::from_value(serde_json::json!({
        "name": "broken",
        "match": { "prefix": "projects/vision/incoming/" },
        "template": { "name": "x", "command": ["${nope}"] },
    }))
    .unwrap();
    assert!(broken.check().is_err());
    // Valid at load time, but no label can hold a key this long: fails for this blob only.
    let too_long = trigger::parse_rule(
        "name: long\nmatch: { prefix: projects/vision/incoming/ }\ntemplate: { name: x, command: [x], labels: { src: \"${key}\" } }\n",
        Format::Yaml,
    )
    .unwrap();
    let good = trigger::parse_rule(CSV, Format::Yaml).unwrap();
    let rules = [broken, too_long, good];

    let key = format!("projects/vision/incoming/{}.csv", "d".repeat(300));
    let out = blob_created(&ports, &rules, &blob(&key, "1"))
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].job.spec.labels[trigger::LABEL], "csv");
    assert_eq!(all_jobs(&ports).await.len(), 1);
}

#[tokio::test]
async fn two_rules_taking_one_file_make_two_jobs() {
    let ports = ports();
    let other = CSV.replace("name: csv", "name: csv-eval");
    let rules = [
        trigger::parse_rule(CSV, Format::Yaml).unwrap(),
        trigger::parse_rule(&other, Format::Yaml).unwrap(),
    ];
    let event = blob("projects/vision/incoming/iris.csv", "1");
    let out = blob_created(&ports, &rules, &event).await.unwrap();
    assert_eq!(out.len(), 2);
    assert_ne!(out[0].job.id, out[1].job.id);
    blob_created(&ports, &rules, &event).await.unwrap();
    assert_eq!(all_jobs(&ports).await.len(), 2);
}

#[tokio::test]
async fn the_example_marker_rule_makes_one_job_per_upload() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/triggers");
    let (rules, errors) = trigger::load_rules_dir(&dir);
    assert!(errors.is_empty(), "{errors:?}");
    let ports = ports();
    for part in ["part-0.csv", "part-1.csv", "_SUCCESS"] {
        blob_created(&ports, &rules, &blob(&format!("uploads/run-7/{part}"), "1"))
            .await
            .unwrap();
    }
    let jobs = all_jobs(&ports).await;
    assert_eq!(jobs.len(), 1, "only the marker makes a job");
    assert_eq!(jobs[0].spec.name, "train-run-7");
    assert_eq!(jobs[0].spec.inputs[0].uri, "bucket://uploads/run-7/");
}

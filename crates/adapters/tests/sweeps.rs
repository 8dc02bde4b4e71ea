//! Parameter sweeps end to end on in-memory ports: one request makes an array of
//! jobs, once per idempotency key, and the array's progress is listed by its label.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::sync::Arc;

use respawn_adapters::memory::{MemoryCompute, MemoryLedger, MemoryQueue, MemorySecrets};
use respawn_core::handlers::{self, array_progress, submit_array};
use respawn_core::job::{JobRecord, JobState};
use respawn_core::lifecycle::Timeouts;
use respawn_core::ports::ledger::ListQuery;
use respawn_core::ports::{Ports, QueueNames};
use respawn_core::spec::Format;
use respawn_core::sweep::{ARRAY_LABEL, INDEX_LABEL, SweepSpec, parse_sweep};
use respawn_core::time::SystemClock;

const SWEEP: &str = r#"
name: lr-sweep
template:
  name: mlp-lr-${param.lr}-bs-${param.batch}
  command: [respawn-trainer, --lr, "${param.lr}", --batch-size, "${param.batch}"]
  inputs: ["bucket://incoming/blobs.csv"]
grid:
  lr: [0.1, 0.03, 0.01]
  batch: [32, 64]
idempotency_key: sweep-2026-11-26
"#;

fn ports() -> Ports {
    Ports {
        ledger: Arc::new(MemoryLedger::new()),
        queue: Arc::new(MemoryQueue::default()),
        compute: Arc::new(MemoryCompute::new(4)),
        secrets: Arc::new(MemorySecrets::new()),
        blobs: Arc::new(object_store::memory::InMemory::new()),
        clock: Arc::new(SystemClock),
        timeouts: Timeouts::default(),
        queues: QueueNames::default(),
    }
}

fn sweep(text: &str) -> SweepSpec {
    parse_sweep(text, Format::Yaml).unwrap()
}

async fn all_jobs(ports: &Ports) -> Vec<JobRecord> {
    let mut query = ListQuery {
        limit: 1000,
        ..Default::default()
    };
    let mut jobs = Vec::new();
    loop {
        let page = ports.ledger.list(&query).await.unwrap();
        jobs.extend(page.jobs);
        match page.next {
            Some(next) => query.after = Some(next),
            None => return jobs,
        }
    }
}

#[tokio::test]
async fn a_grid_makes_one_job_per_combination() {
    let ports = ports();
    let out = submit_array(&ports, &sweep(SWEEP), "default", false)
        .await
        .unwrap();
    assert_eq!(out.jobs.len(), 6);
    assert_eq!(out.created, 6);
    assert!(out.array.starts_with("lr-sweep-"), "{}", out.array);

    let mut seen = BTreeSet::new();
    for (i, id) in out.jobs.iter().enumerate() {
        let job = ports.ledger.get(id).await.unwrap();
        assert_eq!(job.project, "default");
        let spec = &job.spec;
        // The label carries the array id, not just the sweep's name, so that
        // listing by it finds this array and no other.
        assert_eq!(spec.labels[ARRAY_LABEL], out.array);
        assert_eq!(spec.labels[INDEX_LABEL], i.to_string());
        let (lr, batch) = (&spec.env["PARAM_LR"], &spec.env["PARAM_BATCH"]);
        assert_eq!(spec.name, format!("mlp-lr-{lr}-bs-{batch}"));
        assert_eq!(
            spec.argv(),
            ["respawn-trainer", "--lr", lr, "--batch-size", batch]
        );
        assert_eq!(spec.inputs[0].uri, "bucket://incoming/blobs.csv");
        seen.insert((batch.clone(), lr.clone()));
    }
    assert_eq!(seen.len(), 6, "every combination once");
    assert_eq!(all_jobs(&ports).await.len(), 6);
}

#[tokio::test]
async fn resubmitting_with_the_key_returns_the_same_array() {
    let ports = ports();
    let s = sweep(SWEEP);
    let first = submit_array(&ports, &s, "default", false).await.unwrap();
    let again = submit_array(&ports, &s, "default", false).await.unwrap();
    assert_eq!(again.created, 0);
    assert_eq!(again.array, first.array);
    assert_eq!(again.jobs, first.jobs);
    assert_eq!(all_jobs(&ports).await.len(), 6);

    // The same key in another project is another array (the input is left out:
    // it is outside that project's prefix).
    let elsewhere = sweep(&SWEEP.replace("  inputs: [\"bucket://incoming/blobs.csv\"]\n", ""));
    let other = submit_array(&ports, &elsewhere, "research", false)
        .await
        .unwrap();
    assert_eq!(other.created, 6);
    assert_ne!(other.array, first.array);
}

#[tokio::test]
async fn progress_counts_the_array_in_index_order() {
    let ports = ports();
    let out = submit_array(&ports, &sweep(SWEEP), "default", false)
        .await
        .unwrap();
    let progress = array_progress(&ports, &out.array).await.unwrap();
    assert_eq!(progress.array, out.array);
    assert_eq!(progress.total, 6);
    assert_eq!(progress.count(JobState::Pending), 6);
    assert_eq!(progress.counts.len(), 1, "{:?}", progress.counts);
    assert!(!progress.is_finished());
    let ids: Vec<_> = progress.jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(ids, out.jobs, "jobs in index order");

    let unknown = array_progress(&ports, "no-such-array").await.unwrap();
    assert_eq!(unknown.total, 0);
    assert!(!unknown.is_finished());
}

#[tokio::test]
async fn without_a_key_each_submission_is_a_new_array() {
    let ports = ports();
    let s = sweep(&SWEEP.replace("idempotency_key: sweep-2026-11-26", ""));
    let a = submit_array(&ports, &s, "default", false).await.unwrap();
    let b = submit_array(&ports, &s, "default", false).await.unwrap();
    assert_eq!((a.created, b.created), (6, 6));
    assert_ne!(a.array, b.array);
    assert!(a.jobs.iter().all(|id| !b.jobs.contains(id)));
    assert_eq!(all_jobs(&ports).await.len(), 12);
    // Each array lists exactly its own jobs.
    for arr in [&a, &b] {
        let p = array_progress(&ports, &arr.array).await.unwrap();
        let ids: Vec<_> = p.jobs.iter().map(|j| j.id.clone()).collect();
        assert_eq!(&ids, &arr.jobs);
    }
}

#[tokio::test]
async fn progress_pages_through_large_arrays() {
    let ports = ports();
    let a: Vec<String> = (0..35).map(|i| i.to_string()).collect();
    let b: Vec<String> = (0..30).map(|i| i.to_string()).collect();
    let text = format!(
        "name: big\ntemplate: {{ name: j, command: [x] }}\ngrid: {{ a: [{}], b: [{}] }}\nidempotency_key: k\n",
        a.join(","),
        b.join(",")
    );
    let out = submit_array(&ports, &sweep(&text), "default", false)
        .await
        .unwrap();
    assert_eq!(out.created, 1050);
    let progress = array_progress(&ports, &out.array).await.unwrap();
    assert_eq!(progress.total, 1050, "more than one page of the ledger");
    let ids: Vec<_> = progress.jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(ids, out.jobs);
}

#[tokio::test]
async fn a_job_outside_the_project_refuses_the_sweep_whole() {
    let ports = ports();
    // Job 0 stays in the project's prefix, job 1 reaches into another project's.
    let text = "name: s\ntemplate: { name: j, command: [x], inputs: [\"bucket://projects/${param.p}/data.csv\"] }\ngrid: { p: [vision, other] }\n";
    let err = submit_array(&ports, &sweep(text), "vision", false)
        .await
        .unwrap_err();
    assert!(matches!(err, handlers::Error::Denied(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("template.inputs[0].uri") && text.contains("(job 1)"),
        "{text}"
    );
    assert!(all_jobs(&ports).await.is_empty(), "not even job 0");
}

#[tokio::test]
async fn a_sweep_with_a_bad_job_makes_none() {
    let ports = ports();
    // The first job is valid (so the sweep parses); the second is not.
    let text = "name: s\ntemplate: { name: j, command: [x], inputs: [\"${param.uri}\"] }\nlist: [{ uri: \"bucket://a\" }, { uri: nope }]\n";
    let err = submit_array(&ports, &sweep(text), "default", false)
        .await
        .unwrap_err();
    assert!(matches!(err, handlers::Error::Spec(_)), "{err}");
    assert!(err.to_string().contains("template.inputs[0].uri"), "{err}");
    assert!(all_jobs(&ports).await.is_empty());
}

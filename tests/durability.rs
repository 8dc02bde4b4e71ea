//! What "durable" means for the files the broker writes into the bucket: on disk
//! (fsync'd, file and folder) before the API answers, so a job in the ledger never
//! lacks its spec after a power loss. A crash test cannot show fsync (the kernel
//! keeps what a killed process wrote), so this one watches the system calls.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use respawn_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_spec_is_fsynced_with_its_folder_before_the_api_answers() {
    let strace = ["/usr/bin/strace", "/bin/strace"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("strace is needed for this test (apt-get install strace; .ci/run installs it)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let trace = dir.path().join("fsyncs.txt");
    let trace_arg = trace.display().to_string();
    // No slots: the job stays pending, and the trace holds the submission only.
    let wrapper = [
        strace,
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=fsync,fdatasync",
        "-o",
        &trace_arg,
    ];
    let how = How {
        wrapper: &wrapper,
        ..How::default()
    };
    let up = Up::start_how(&data, &["--slots", "0"], how).await;
    let id = up.submit("name: durable\ncommand: ['true']\n").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // strace writes as the calls return; the submission's have returned by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = std::fs::read_to_string(&trace).unwrap();
    let synced = |needle: &str| {
        calls
            .lines()
            .any(|l| (l.contains("fsync(") || l.contains("fdatasync(")) && l.contains(needle))
    };
    assert!(
        synced(&format!("jobs/{id}/spec.json")),
        "spec.json was not fsync'd:\n{calls}"
    );
    assert!(
        synced(&format!("jobs/{id}>")),
        "the job's folder (the spec's name in it) was not fsync'd:\n{calls}"
    );
    assert!(synced("respawn.db"), "the ledger was not fsync'd:\n{calls}");
}

//! What "durable" means for the broker's writes: a submission is in the ledger
//! (fsync'd) before the API answers and before any agent runs for it; agents read
//! the spec from the ledger (through the API), so no staged copy of it is written.
//! A crash test cannot show fsync (the kernel keeps what a killed process wrote),
//! so this one watches the system calls.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use respawn_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_is_fsynced_before_any_agent_runs_and_no_spec_copy_is_written() {
    let strace = ["/usr/bin/strace", "/bin/strace"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("strace is needed for this test (apt-get install strace; .ci/run installs it)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let trace = dir.path().join("fsyncs.txt");
    let trace_arg = trace.display().to_string();
    let wrapper = [
        strace,
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=fsync,fdatasync,execve",
        "-o",
        &trace_arg,
    ];
    let how = How {
        wrapper: &wrapper,
        ..How::default()
    };
    // Unsandboxed: bubblewrap's namespaces and strace's ptrace do not mix everywhere.
    let up = Up::start_how(&data, &["--isolation", "none"], how).await;
    let id = up.submit("name: durable\ncommand: ['true']\n").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&id, Duration::from_secs(60), "succeeded", |j| {
        j["state"] == "succeeded"
    })
    .await;
    // strace writes as the calls return; the job's have returned by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = std::fs::read_to_string(&trace).unwrap();
    let synced = |needle: &str| {
        calls
            .lines()
            .position(|l| (l.contains("fsync(") || l.contains("fdatasync(")) && l.contains(needle))
    };
    let agent = calls
        .lines()
        .position(|l| l.contains("execve(") && l.contains("respawn-agent"));
    assert!(agent.is_some(), "no agent was started:\n{calls}");
    let ledger = synced("respawn.db");
    assert!(
        ledger < agent,
        "an agent started before the ledger was on disk:\n{calls}"
    );
    assert!(
        !data.join(format!("bucket/jobs/{id}/spec.json")).exists(),
        "a staged copy of the spec"
    );
    assert!(
        synced("respawn.db").is_some(),
        "the ledger was not fsync'd:\n{calls}"
    );
}

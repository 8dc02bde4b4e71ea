//! Warm pools on the local stack: VMs that run job after job, grow with the queue,
//! shrink when idle, lose a VM to preemption without losing the job, and survive a
//! `kill -9` of the broker mid-run.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use respawn_adapters::local::vm_process_alive;
use respawn_e2e::*;
use serde_json::Value;

/// These tests start many processes; on 2 cores they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Pool VMs of `data` whose agent is running.
fn live_pool_vms(data: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data.join("vms"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|id| id.starts_with("pool-") && vm_process_alive(id))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not in {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn attempt_vm(job: &Value, n: usize) -> String {
    job["attempts"][n]["vm"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_vm_runs_fifty_jobs_in_a_row_and_none_sees_anything_of_another() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start(&data, &["--slots", "1", "--pool", "cpu:max=1"]).await;
    // Each job lists everything it can see of its work folder, then leaves files
    // in every part of it and a process behind.
    let look = "{ ls -A . | grep -vxE 'checkpoints|input|output|hostfile'; \
                ls -A \"$RESPAWN_CHECKPOINT_DIR\" \"$RESPAWN_INPUT_DIR\" \"$RESPAWN_OUTPUT_DIR\"; } | grep -v ':$' | grep . ; \
                echo vm=$RESPAWN_VM; \
                for d in . \"$RESPAWN_CHECKPOINT_DIR\" \"$RESPAWN_INPUT_DIR\" \"$RESPAWN_OUTPUT_DIR\"; do echo secret > \"$d/left-by-$RESPAWN_JOB_ID\"; done; \
                (sleep 300 &) ; true";
    let mut ids = Vec::new();
    for i in 0..50 {
        let spec = serde_json::json!({
            "name": format!("seq-{i}"),
            "command": ["sh", "-c", look],
        });
        ids.push(
            up.submit(&spec.to_string()).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut vms = BTreeSet::new();
    for id in &ids {
        let job = up
            .wait_job(id, Duration::from_secs(120), "succeeded", |j| {
                j["state"] == "succeeded"
            })
            .await;
        assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
        let out = up.attempt_stdout(id, 1);
        let seen: Vec<&str> = out.lines().filter(|l| !l.starts_with("vm=")).collect();
        assert!(
            seen.is_empty(),
            "job {id} saw what an earlier job left: {seen:?}"
        );
        let vm = out.lines().find_map(|l| l.strip_prefix("vm=")).unwrap();
        assert_eq!(vm, attempt_vm(&job, 0));
        vms.insert(vm.to_owned());
    }
    assert_eq!(vms.len(), 1, "one pool VM ran them all: {vms:?}");
    let vm = vms.into_iter().next().unwrap();
    assert!(vm.starts_with("pool-cpu-"), "{vm}");
    assert!(vm_process_alive(&vm), "the pool VM is still up, warm");
    // No job's process outlived its job.
    let left: Vec<_> = leftovers(&data)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("sleep 300"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let mut up = up;
    assert!(up.interrupt().success());
    assert!(
        wait_no_leftovers(&data, Duration::from_secs(10))
            .await
            .is_empty(),
        "the pool VM retires with the broker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_grows_to_max_under_a_backlog_and_shrinks_to_min_when_idle() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start(
        &data,
        &["--slots", "4", "--pool", "cpu:min=1,max=3,idle=2s"],
    )
    .await;
    wait_for(
        "the pool's minimum of 1 VM",
        Duration::from_secs(10),
        || live_pool_vms(&data).len() == 1,
    )
    .await;

    let mut ids = Vec::new();
    for i in 0..9 {
        let spec = format!("name: backlog-{i}\ncommand: [sleep, \"1\"]\n");
        ids.push(up.submit(&spec).await["id"].as_str().unwrap().to_owned());
    }
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut vms_used = BTreeSet::new();
    loop {
        most = most.max(live_pool_vms(&data).len());
        let jobs = up.jobs().await;
        if jobs.iter().all(|j| j["state"] == "succeeded") {
            break;
        }
        assert!(Instant::now() < deadline, "jobs not done: {jobs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &ids {
        vms_used.insert(attempt_vm(&up.job(id).await, 0));
    }
    assert_eq!(most, 3, "the pool grew to its max of 3, no further");
    assert_eq!(vms_used.len(), 3, "9 jobs on 3 VMs: {vms_used:?}");
    wait_for(
        "the pool back to its minimum of 1 VM after 2 s idle",
        Duration::from_secs(15),
        || live_pool_vms(&data).len() == 1,
    )
    .await;
    // And it stays there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(live_pool_vms(&data).len(), 1);
}

const TRAINER: &str = "command: [respawn-trainer, --steps, \"600\", --checkpoint-every, \"50\", --step-delay-ms, \"10\", --hidden, \"4\"]\ninputs: [\"bucket://shared/points.csv\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_pool_vms_attempt_resumes_on_another_vm_from_its_checkpoint() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate_csv(200, &dir.path().join("points.csv"));
    drop_file(
        &data.join("bucket/shared/points.csv"),
        &std::fs::read(dir.path().join("points.csv")).unwrap(),
    );
    let up = Up::start(&data, &["--slots", "2", "--pool", "cpu:max=2"]).await;
    let id = up.submit(&format!("name: long\n{TRAINER}")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&id, Duration::from_secs(60), "a checkpoint", |j| {
        j["attempts"][0]["last_checkpoint"].as_u64().is_some()
    })
    .await;
    assert!(up.preempt(&id, Duration::from_secs(2)).await);
    let job = up
        .wait_job(&id, Duration::from_secs(120), "succeeded", |j| {
            j["state"] == "succeeded"
        })
        .await;
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    assert_eq!(attempts[0]["outcome"]["kind"], "preempted", "{job:#}");
    assert!(
        attempts[1]["restored_checkpoint"].as_u64().is_some(),
        "{job:#}"
    );
    let (first, second) = (attempt_vm(&job, 0), attempt_vm(&job, 1));
    assert_ne!(first, second, "the replacement ran on another VM");
    assert!(second.starts_with("pool-cpu-"), "{second}");
    wait_for("the preempted VM gone", Duration::from_secs(10), || {
        !vm_process_alive(&first)
    })
    .await;
    assert!(
        data.join(format!("bucket/jobs/{id}/outputs/model.txt"))
            .is_file()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_broker_during_a_thousand_job_run_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Unsandboxed, so that every run of a workload can sign a file outside it.
    let runs = dir.path().join("runs");
    let args = ["--slots", "2", "--pool", "cpu:max=2", "--isolation", "none"];
    let mut up = Up::start(&data, &args).await;
    let record = format!(
        "echo \"$RESPAWN_JOB_ID $RESPAWN_ATTEMPT\" >> {}",
        runs.display()
    );
    let jobs = 1000;
    let mut ids = BTreeSet::new();
    let http = reqwest::Client::new();
    for i in 0..jobs {
        let spec = serde_json::json!({
            "name": format!("run-{i}"),
            "command": ["sh", "-c", record],
            "idempotency_key": format!("run-{i}"),
        });
        let resp = http
            .post(format!("{}/v1/jobs", up.base))
            .bearer_auth(up.token())
            .body(spec.to_string())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        let v: Value = resp.json().await.unwrap();
        ids.insert(v["id"].as_str().unwrap().to_owned());
    }
    wait_for("a third of the jobs run", Duration::from_secs(300), || {
        std::fs::read_to_string(&runs).map_or(0, |s| s.lines().count()) >= jobs / 3
    })
    .await;
    up.kill9();
    let mut up = Up::start(&data, &args).await;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = up.job_ids(Some("succeeded")).await.len();
        if done == jobs {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of {jobs} succeeded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = up.job_ids(None).await.len();
    assert_eq!(all, jobs, "no job lost, none made twice");
    // Every run of a workload is an attempt the ledger knows, and no attempt ran twice.
    let mut seen: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&runs).unwrap().lines() {
        let (job, attempt) = line.split_once(' ').unwrap();
        *seen
            .entry((job.to_owned(), attempt.parse().unwrap()))
            .or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "attempts that ran twice: {twice:?}");
    let jobs_run: BTreeSet<String> = seen.keys().map(|(j, _)| j.clone()).collect();
    assert_eq!(jobs_run, ids, "every job ran");
    for ((job, attempt), _) in seen.iter().filter(|((_, a), _)| *a > 1) {
        // A retry is allowed only for an attempt the crash ended.
        let rec = up.job(job).await;
        let first = &rec["attempts"][0];
        assert_ne!(
            first["outcome"]["kind"], "succeeded",
            "job {job} attempt {attempt} after a success: {rec:#}"
        );
    }
    assert!(up.interrupt().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_on_a_pool_vm_leaves_nothing_and_the_vm_takes_the_next() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start(&data, &["--slots", "1", "--pool", "cpu:max=1"]).await;
    let first = serde_json::json!({
        "name": "cancelled",
        "command": ["sh", "-c", "echo partial > \"$RESPAWN_OUTPUT_DIR/out.txt\"; sleep 300"],
    });
    let first = up.submit(&first.to_string()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&first, Duration::from_secs(60), "running", |j| {
        j["state"] == "running"
    })
    .await;
    // The workload has written its output by the time its stdout shows up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cancel = reqwest::Client::new()
        .post(format!("{}/v1/jobs/{first}/cancel", up.base))
        .bearer_auth(up.token())
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success());
    let second = serde_json::json!({
        "name": "next",
        "command": ["sh", "-c", "ls -A \"$RESPAWN_OUTPUT_DIR\"; echo vm=$RESPAWN_VM"],
    });
    let second = up.submit(&second.to_string()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = up
        .wait_job(&second, Duration::from_secs(60), "succeeded", |j| {
            j["state"] == "succeeded"
        })
        .await;
    let cancelled = up.job(&first).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled:#}");
    assert_eq!(
        attempt_vm(&done, 0),
        attempt_vm(&cancelled, 0),
        "the VM stayed warm and took the next job"
    );
    assert_eq!(
        up.attempt_stdout(&second, 1).trim(),
        format!("vm={}", attempt_vm(&done, 0)),
        "the next job saw nothing of the cancelled one"
    );
    assert!(
        !data
            .join(format!("bucket/jobs/{first}/outputs/out.txt"))
            .exists(),
        "a cancelled attempt uploaded its outputs"
    );
    let left: Vec<_> = leftovers(&data)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("sleep 300"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

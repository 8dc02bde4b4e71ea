//! The local compute provider: the compute conformance suite, preemption through
//! the notice file, and adoption of running VMs by a restarted broker. A stand-in
//! agent (a shell script named `respawn-agent`) keeps these tests independent of
//! the real agent, which the end-to-end tests cover.
#![cfg(feature = "local")]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use respawn_adapters::local::sandbox::Sandbox;
use respawn_adapters::local::{
    AgentCredentials, LocalCompute, LocalComputeConfig, LocalStore, vm_process_alive,
};
use respawn_core::attempt_auth::{AttemptKey, AttemptRef};
use respawn_core::conformance::compute::request;
use respawn_core::job::JobId;
use respawn_core::lifecycle::Event;
use respawn_core::messages::Message;
use respawn_core::ports::Queue;
use respawn_core::ports::compute::{Compute, VmState};
use respawn_core::ports::queue::Receive;
use respawn_core::time::Timestamp;

const EVENTS: &str = "test.events";

fn fake_agent(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("respawn-agent");
    // Records the GPUs it was given, as the real agent hands them to the workload,
    // and what else it was given: its environment and arguments.
    let script = "#!/bin/sh\n\
        echo \"$@\" > /dev/null\n\
        args=\"$*\"\n\
        while [ $# -gt 0 ]; do [ \"$1\" = --vm-dir ] && d=\"$2\"; shift; done\n\
        echo \"$args\" > \"$d/argv\"\n\
        env > \"$d/env\"\n\
        mkdir -p \"$d/work/output\"\n\
        echo \"${CUDA_VISIBLE_DEVICES-unset}\" > \"$d/cuda\"\n\
        sleep 60\n";
    std::fs::write(&path, script).expect("write agent");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn config(dir: &Path, slots: usize) -> LocalComputeConfig {
    LocalComputeConfig {
        data_dir: dir.join("data"),
        bucket_dir: dir.join("data/bucket"),
        agent_bin: fake_agent(dir),
        extra_path: None,
        cpu_slots: slots,
        gpus: Vec::new(),
        container_runtime: None,
        events_queue: EVENTS.into(),
        api: "http://127.0.0.1:7878".into(),
        attempt_key: key(),
        heartbeat_secs: 1,
        notice: Duration::from_millis(300),
        sandbox: Sandbox::None,
        pools: Vec::new(),
    }
}

/// One key for all the tests' providers: a restarted provider must keep it.
fn key() -> AttemptKey {
    AttemptKey::from_bytes(b"a test key of thirty-two bytes..").expect("key")
}

/// Waits until `path` exists (the stand-in agent writes it after it starts).
async fn appears(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never appeared", path.display());
}

async fn terminations(queue: &dyn Queue) -> Vec<(JobId, u32, String)> {
    let got = queue
        .receive(
            EVENTS,
            Receive {
                max: 100,
                lease: Duration::from_secs(30),
                wait: Duration::ZERO,
            },
        )
        .await
        .expect("receive");
    got.iter()
        .filter_map(|d| match serde_json::from_slice::<Message>(&d.body).ok()? {
            Message::Event {
                job,
                event: Event::VmTerminated { attempt, reason },
                ..
            } => Some((job, attempt, reason)),
            _ => None,
        })
        .collect()
}

/// A stand-in pool agent: takes assignments on stdin and says each is finished.
fn fake_pool_agent(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("respawn-pool-agent");
    let script = "#!/bin/sh\n\
        while IFS= read -r line; do\n\
          job=$(printf '%s' \"$line\" | sed 's/.*\"job\":\"\\([^\"]*\\)\".*/\\1/')\n\
          attempt=$(printf '%s' \"$line\" | sed 's/.*\"attempt\":\\([0-9]*\\).*/\\1/')\n\
          sleep 0.2\n\
          printf '{\"job\":\"%s\",\"attempt\":%s}\\n' \"$job\" \"$attempt\"\n\
        done\n";
    std::fs::write(&path, script).expect("write agent");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_passes_the_compute_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let cfg = LocalComputeConfig {
        agent_bin: fake_pool_agent(dir.path()),
        pools: vec![respawn_core::pool::PoolSpec::new("cpu", 0, 2)],
        ..config(dir.path(), 2)
    };
    let compute = LocalCompute::open(cfg, Arc::new(store.queue(5)))
        .await
        .expect("open");
    respawn_core::conformance::compute::run(compute.as_ref()).await;
    // Attempts ran on pool VMs, which outlive them.
    let vms = compute.pool_vms();
    assert!(
        !vms.is_empty()
            && vms
                .iter()
                .all(|(id, pool, _)| id.starts_with("pool-cpu-") && pool == "cpu"),
        "{vms:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_compute_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let compute = LocalCompute::open(config(dir.path(), 2), Arc::new(store.queue(5)))
        .await
        .expect("open");
    respawn_core::conformance::compute::run(compute.as_ref()).await;
    for vm in compute.list().await.expect("list") {
        compute.release(&vm.key).await.expect("release");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_and_unschedulable_requests_are_told_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let compute = LocalCompute::open(config(dir.path(), 1), Arc::new(store.queue(5)))
        .await
        .expect("open");
    let job = JobId::generate(Timestamp(1));
    let first = compute.allocate(&request(&job, 1)).await.expect("allocate");
    let other = JobId::generate(Timestamp(2));
    let busy = compute.allocate(&request(&other, 1)).await;
    assert!(
        matches!(busy, Err(respawn_core::ports::compute::Error::Capacity(_))),
        "{busy:?}"
    );
    let mut gpu = request(&other, 1);
    gpu.resources.gpus = 1;
    let never = compute.allocate(&gpu).await;
    assert!(
        matches!(&never, Err(respawn_core::ports::compute::Error::Invalid(m)) if m.contains("GPU")),
        "a GPU job on a machine without GPUs can never run: {never:?}"
    );
    compute.release(&first.key).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_writes_a_notice_then_reclaims_the_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let queue = Arc::new(store.queue(5));
    let compute = LocalCompute::open(config(dir.path(), 2), queue.clone())
        .await
        .expect("open");
    let job = JobId::generate(Timestamp(1));
    let vm = compute.allocate(&request(&job, 1)).await.expect("allocate");
    assert_eq!(
        compute.preempt(job.as_str(), None).as_deref(),
        Some(vm.id.as_str())
    );
    let notice = dir.path().join(format!("data/vms/{}/notice.json", vm.id));
    let body: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&notice).expect("notice file")).expect("json");
    assert!(body["deadline_ms"].as_u64().is_some());
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(!vm_process_alive(&vm.id), "reclaimed at the deadline");
    let described = compute
        .describe(&vm.key)
        .await
        .expect("describe")
        .expect("known");
    assert_eq!(described.state, VmState::Terminated);
    let reported = terminations(queue.as_ref()).await;
    assert_eq!(
        reported,
        vec![(job, 1, "preempted".to_owned())],
        "the broker is told"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_provider_adopts_running_vms_and_reports_dead_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let queue = Arc::new(store.queue(5));
    let compute = LocalCompute::open(config(dir.path(), 3), queue.clone())
        .await
        .expect("open");
    let (a, b) = (JobId::generate(Timestamp(1)), JobId::generate(Timestamp(2)));
    let vm_a = compute.allocate(&request(&a, 1)).await.expect("allocate a");
    let vm_b = compute.allocate(&request(&b, 1)).await.expect("allocate b");
    // The broker goes away; VM b dies while it is down.
    drop(compute);
    let pid_b = std::fs::read_to_string(dir.path().join(format!("data/vms/{}/vm.json", vm_b.id)))
        .expect("vm.json");
    let pid_b: serde_json::Value = serde_json::from_str(&pid_b).expect("json");
    let pid_b = pid_b["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_b),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill b");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = terminations(queue.as_ref()).await;

    let compute = LocalCompute::open(config(dir.path(), 3), queue.clone())
        .await
        .expect("reopen");
    let running: Vec<_> = compute.running().into_iter().map(|v| v.id).collect();
    assert_eq!(
        running,
        vec![vm_a.id.clone()],
        "a is adopted, b is known dead"
    );
    let reported = terminations(queue.as_ref()).await;
    assert!(
        reported.iter().any(|(j, _, _)| j == &b),
        "b's death is reported: {reported:?}"
    );
    compute.release(&vm_a.key).await.expect("release a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!vm_process_alive(&vm_a.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_gpu_vm_gets_its_own_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let mut cfg = config(dir.path(), 1);
    cfg.gpus = vec![0, 1];
    let compute = LocalCompute::open(cfg, Arc::new(store.queue(5)))
        .await
        .expect("open");
    let mut seen = Vec::new();
    for i in 0..2 {
        let mut req = request(&JobId::generate(Timestamp(i)), 1);
        req.resources.gpus = 1;
        let vm = compute.allocate(&req).await.expect("allocate gpu vm");
        let file = dir.path().join(format!("data/vms/{}/cuda", vm.id));
        for _ in 0..100 {
            if file.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen.push(
            std::fs::read_to_string(&file)
                .expect("cuda file")
                .trim()
                .to_owned(),
        );
    }
    assert_eq!(seen, ["0", "1"], "one GPU per VM, each its own");
    let mut third = request(&JobId::generate(Timestamp(9)), 1);
    third.resources.gpus = 1;
    assert!(matches!(
        compute.allocate(&third).await,
        Err(respawn_core::ports::compute::Error::Capacity(_))
    ));
    let cpu = compute
        .allocate(&request(&JobId::generate(Timestamp(10)), 1))
        .await
        .expect("cpu vm");
    let file = dir.path().join(format!("data/vms/{}/cuda", cpu.id));
    for _ in 0..100 {
        if file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&file).expect("cuda file").trim(),
        "",
        "a CPU VM sees no GPU"
    );
    for vm in compute.running() {
        compute.release(&vm.key).await.expect("release");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_without_a_container_runtime_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let compute = LocalCompute::open(config(dir.path(), 1), Arc::new(store.queue(5)))
        .await
        .expect("open");
    let mut req = request(&JobId::generate(Timestamp(1)), 1);
    req.image = Some("pytorch/pytorch:2.4".into());
    match compute.allocate(&req).await {
        Err(respawn_core::ports::compute::Error::Invalid(m)) => {
            assert!(
                m.contains("pytorch/pytorch:2.4") && m.contains("container runtime"),
                "{m}"
            )
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_their_attempt_credential_in_a_private_file_and_nothing_of_the_broker() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let compute = LocalCompute::open(config(dir.path(), 1), Arc::new(store.queue(5)))
        .await
        .expect("open");
    let job = JobId::generate(Timestamp(1));
    let vm = compute.allocate(&request(&job, 2)).await.expect("allocate");
    let vm_dir = dir.path().join(format!("data/vms/{}", vm.id));
    // The stand-in writes `cuda` last, after argv and env are whole.
    appears(&vm_dir.join("cuda")).await;

    let file = vm_dir.join("credentials");
    let mode = std::fs::metadata(&file)
        .expect("credentials")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let creds: AgentCredentials =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
    assert_eq!(
        key().verify(&creds.token),
        Some(AttemptRef {
            job: job.clone(),
            attempt: 2
        }),
        "a credential for this attempt, and only this one"
    );
    let argv = std::fs::read_to_string(vm_dir.join("argv")).expect("argv");
    assert!(
        !argv.contains(&creds.token),
        "the credential is not on the command line"
    );
    // This test's own environment (CARGO_*, RUST_*, whatever CI sets) stands for
    // the broker's: none of it may reach the agent but the allow-list.
    let env = std::fs::read_to_string(vm_dir.join("env")).expect("env");
    let allowed = [
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "LC_ALL",
        "TZ",
        "RESPAWN_LOG",
        "XDG_RUNTIME_DIR",
        "DOCKER_HOST",
        "DOCKER_CONFIG",
        "DOCKER_CONTEXT",
        "CONTAINER_HOST",
        "CUDA_VISIBLE_DEVICES", // set by the provider
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD", // set by the stand-in agent's shell
    ];
    for line in env.lines() {
        let name = line.split('=').next().unwrap_or_default();
        assert!(
            allowed.contains(&name),
            "the agent got {name} from the broker:\n{env}"
        );
    }
    assert!(env.contains("PATH="), "{env}");

    // When the VM goes, its work folder and credentials go with it.
    compute.release(&vm.key).await.expect("release");
    assert!(!vm_dir.join("work").exists(), "work folder left behind");
    assert!(!file.exists(), "credentials left behind");
    assert!(
        vm_dir.join("vm.json").exists(),
        "the record stays for respawn show"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_releases_and_exits_leave_every_vm_record_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path().join("data")).expect("store");
    let compute = LocalCompute::open(config(dir.path(), 16), Arc::new(store.queue(5)))
        .await
        .expect("open");
    let mut keys = Vec::new();
    for i in 0..16 {
        let vm = compute
            .allocate(&request(&JobId::generate(Timestamp(i)), 1))
            .await
            .expect("allocate");
        keys.push(vm.key);
    }
    // Each release kills its agent, whose watcher then records the termination too:
    // two writers of one record at once.
    let releases = keys.iter().map(|k| compute.release(k));
    for r in futures::future::join_all(releases).await {
        r.expect("release");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for entry in std::fs::read_dir(dir.path().join("data/vms")).expect("vms") {
        let vm_dir = entry.expect("entry").path();
        let names: Vec<String> = std::fs::read_dir(&vm_dir)
            .expect("vm dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.ends_with(".tmp")),
            "a temporary file was left: {names:?}"
        );
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(vm_dir.join("vm.json")).expect("vm.json"))
                .expect("a whole record");
        assert_eq!(record["state"], "terminated");
    }
    let reopened = LocalCompute::open(config(dir.path(), 16), Arc::new(store.queue(5)))
        .await
        .expect("reopen");
    assert_eq!(
        reopened.list().await.expect("list").len(),
        16,
        "every record read back"
    );
}

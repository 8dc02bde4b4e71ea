//! Multi-node jobs on the local stack: a gang of local slots, one agent per node,
//! the trainer's ranks all-reducing over loopback every step.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use respawn_adapters::local::vm_process_alive;
use respawn_e2e::*;
use serde_json::Value;

/// These tests start many processes; on 2 cores they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three ranks: long enough to be preempted mid-run, short enough for CI.
fn gang_job(name: &str) -> String {
    format!(
        "name: {name}\n\
         command: [respawn-trainer, --steps, \"600\", --checkpoint-every, \"25\", --batch-size, \"15\", --hidden, \"8\", --seed, \"11\", --step-delay-ms, \"8\", --log-every, \"1\"]\n\
         inputs: [\"bucket://shared/points.csv\"]\n\
         resources: {{ nodes: 3 }}\n"
    )
}

/// The step `line_prefix N` names in `stdout`, e.g. `resumed from step N`.
fn step_after(stdout: &str, prefix: &str) -> Option<u64> {
    stdout.lines().find_map(|l| {
        l.strip_prefix(prefix)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn stack_with_points(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("data");
    generate_csv(300, &dir.join("points.csv"));
    drop_file(
        &data.join("bucket/shared/points.csv"),
        &std::fs::read(dir.join("points.csv")).unwrap(),
    );
    data
}

fn model(data: &std::path::Path, job: &str) -> Vec<u8> {
    std::fs::read(data.join(format!("bucket/jobs/{job}/outputs/model.txt"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_job_preempted_on_rank_1_resumes_on_a_new_gang_to_the_same_model() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = stack_with_points(dir.path());
    let up = Up::start(&data, &["--slots", "3"]).await;

    // The uninterrupted run.
    let whole = up.submit(&gang_job("whole")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = up
        .wait_job(&whole, Duration::from_secs(120), "succeeded", |j| {
            j["state"] == "succeeded"
        })
        .await;
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    assert_eq!(
        job["attempts"][0]["ready_nodes"],
        serde_json::json!([1, 2]),
        "every rank after 0 reported ready before the gang ran: {job:#}"
    );
    for rank in 1..3 {
        let out = up.node_stdout(&whole, 1, rank);
        assert!(
            out.contains(&format!("rank {rank} of 3")) && out.contains("done: steps=600"),
            "rank {rank} ran its share: {out}"
        );
    }

    // The same job, preempted on rank 1 once every rank has passed a checkpoint.
    let id = up.submit(&gang_job("preempted")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&id, Duration::from_secs(60), "a checkpoint", |j| {
        j["attempts"][0]["last_checkpoint"].as_u64() >= Some(50)
    })
    .await;
    let rank1 = format!("local-{id}-1-n1");
    assert!(
        vm_process_alive(&rank1),
        "rank 1 runs on a VM of its own: {rank1}"
    );
    assert!(
        up.preempt(&rank1, Duration::from_secs(5)).await,
        "preempt rank 1"
    );
    let job = up
        .wait_job(&id, Duration::from_secs(120), "succeeded", |j| {
            j["state"] == "succeeded"
        })
        .await;
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "one preemption, two attempts: {job:#}");
    assert_eq!(attempts[0]["outcome"]["kind"], "preempted", "{job:#}");
    assert_eq!(job["failures"], 0, "{job:#}");
    assert_eq!(job["infra_losses"], 1, "{job:#}");

    // Every rank stopped at the same step, rank 0 checkpointed it, and every rank
    // of the new gang resumed from it.
    let checkpointed = step_after(&up.node_stdout(&id, 1, 0), "checkpointed step ")
        .expect("rank 0 checkpointed on SIGTERM");
    for rank in 1..3 {
        let out = up.node_stdout(&id, 1, rank);
        assert_eq!(
            step_after(&out, "stopped at step "),
            Some(checkpointed),
            "rank {rank} stopped where rank 0 checkpointed: {out}"
        );
    }
    assert_eq!(
        attempts[1]["restored_checkpoint"].as_u64(),
        Some(checkpointed),
        "{job:#}"
    );
    for rank in 0..3 {
        let out = up.node_stdout(&id, 2, rank);
        assert_eq!(
            step_after(&out, "resumed from step "),
            Some(checkpointed),
            "rank {rank} of the new gang resumed from the checkpoint: {out}"
        );
    }
    let (first, second) = (
        attempts[0]["vm"].as_str().unwrap(),
        attempts[1]["vm"].as_str().unwrap(),
    );
    assert_ne!(first, second, "a new gang");
    assert!(
        model(&data, &id) == model(&data, &whole),
        "the model after a preemption on rank 1 differs from the uninterrupted run's"
    );
    // No node of either gang is left.
    for vm in [first, second] {
        for node in [vm.to_owned(), format!("{vm}-n1"), format!("{vm}-n2")] {
            assert!(!vm_process_alive(&node), "{node} still runs");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_that_does_not_fit_waits_whole_spending_nothing_and_starts_when_a_slot_frees() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = stack_with_points(dir.path());
    let up = Up::start(&data, &["--slots", "3"]).await;

    // One slot taken for a while: room for two nodes of three.
    let blocker = up
        .submit(
            "name: blocker\ncommand: [respawn-trainer, --steps, \"400\", --checkpoint-every, \"100\", --step-delay-ms, \"15\"]\ninputs: [\"bucket://shared/points.csv\"]\n",
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&blocker, Duration::from_secs(60), "running", |j| {
        j["state"] == "running"
    })
    .await;
    let gang = up.submit(&gang_job("gang")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // While the blocker runs, no node of the gang runs alone.
    let mut waited: Option<Value> = None;
    let until = Instant::now() + Duration::from_secs(60);
    while up.job(&blocker).await["state"] == "running" {
        assert!(Instant::now() < until, "the blocker never finished");
        let job = up.job(&gang).await;
        let vms: Vec<_> = std::fs::read_dir(data.join("vms"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(&gang))
            .collect();
        if up.job(&blocker).await["state"] != "running" {
            break;
        }
        assert!(vms.is_empty(), "a node of the gang started: {vms:?}");
        assert_ne!(job["state"], "running", "{job:#}");
        waited = Some(job);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = waited.expect("the gang was seen waiting");
    assert_eq!(waited["failures"], 0, "{waited:#}");
    assert_eq!(waited["infra_losses"], 0, "{waited:#}");
    assert!(
        waited["capacity_waits"].as_u64() > Some(0),
        "the gang waited as a capacity miss: {waited:#}"
    );

    let job = up
        .wait_job(&gang, Duration::from_secs(120), "succeeded", |j| {
            j["state"] == "succeeded"
        })
        .await;
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "waiting made no attempt: {job:#}");
    assert_eq!(job["failures"], 0, "{job:#}");
    assert_eq!(job["infra_losses"], 0, "{job:#}");
    assert!(
        data.join(format!("bucket/jobs/{gang}/outputs/model.txt"))
            .is_file()
    );
}

/// The pid of the agent of node `node` (found by its command line, as the local
/// provider finds it).
fn agent_pid_of(node: &str) -> Option<i32> {
    let needle = format!("--vm\0{node}\0");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains("respawn-agent") && cmdline.contains(&needle)).then_some(pid)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nodes_failure_spends_one_failure_and_one_nodes_loss_ends_the_whole_gang() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start(&data, &["--slots", "3"]).await;

    // Rank 1 of the first attempt fails on its own; the other ranks would succeed.
    // Rank 0 finishes last: its exit ends the attempt and its gang, so the other
    // ranks print first, and rank 1's failure (reported once rank 1 has seen that
    // no peer had a notice, within 3 s) comes first.
    let failing = up
        .submit(
            "name: rank-1-fails\n\
             command: [sh, -c, 'if [ \"$RESPAWN_NODE_RANK\" = 1 ] && [ \"$RESPAWN_ATTEMPT\" = 1 ]; then exit 3; fi; if [ \"$RESPAWN_NODE_RANK\" = 0 ]; then sleep 8; else sleep 1; fi; echo \"rank $RESPAWN_NODE_RANK of $RESPAWN_NUM_NODES: $WORLD_SIZE $NODE_RANK $NNODES $MASTER_ADDR:$MASTER_PORT\"; cat \"$RESPAWN_HOSTFILE\"']\n\
             resources: { nodes: 3 }\n\
             retry: { max_failures: 1 }\n",
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = up
        .wait_job(&failing, Duration::from_secs(60), "succeeded", |j| {
            j["state"] == "succeeded"
        })
        .await;
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    assert_eq!(attempts[0]["outcome"]["kind"], "failed", "{job:#}");
    assert_eq!(attempts[0]["outcome"]["exit_code"], 3, "{job:#}");
    assert_eq!(
        job["failures"], 1,
        "one node's failure is one failure: {job:#}"
    );
    let out = up.attempt_stdout(&failing, 2);
    assert!(out.starts_with("rank 0 of 3: 3 0 3 127.0.0.1:"), "{out}");
    assert_eq!(
        out.matches("127.0.0.1 slots=1\n").count(),
        3,
        "a hostfile line per node: {out}"
    );
    let rank2 = up.node_stdout(&failing, 2, 2);
    assert!(
        rank2.starts_with("rank 2 of 3: 3 2 3 127.0.0.1:"),
        "{rank2}"
    );

    // A node that dies (its agent killed, as a VM that vanished) takes the gang.
    let lost = up
        .submit("name: node-lost\ncommand: [sleep, \"60\"]\nresources: { nodes: 3 }\n")
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&lost, Duration::from_secs(60), "running", |j| {
        j["state"] == "running"
    })
    .await;
    let rank2 = format!("local-{lost}-1-n2");
    let mut pid = None;
    for _ in 0..100 {
        pid = agent_pid_of(&rank2);
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = pid.expect("rank 2's agent runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let job = up
        .wait_job(&lost, Duration::from_secs(30), "a second attempt", |j| {
            j["attempt"].as_u64() == Some(2) && j["state"] == "running"
        })
        .await;
    assert_eq!(job["attempts"][0]["outcome"]["kind"], "lost", "{job:#}");
    assert_eq!(job["failures"], 0, "{job:#}");
    assert_eq!(job["infra_losses"], 1, "{job:#}");
    for node in [
        format!("local-{lost}-1"),
        format!("local-{lost}-1-n1"),
        rank2,
    ] {
        assert!(
            !vm_process_alive(&node),
            "{node} of the lost gang still runs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_to_one_node_reaches_every_node_through_the_broker() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start(&data, &["--slots", "3"]).await;
    // Workloads that know nothing of each other: only the agents can stop them all.
    let id = up
        .submit("name: apart\ncommand: [sleep, \"120\"]\nresources: { nodes: 3 }\n")
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&id, Duration::from_secs(60), "running", |j| {
        j["state"] == "running"
    })
    .await;
    let rank2 = format!("local-{id}-1-n2");
    let noticed = Instant::now();
    assert!(up.preempt(&rank2, Duration::from_secs(20)).await);
    let job = up
        .wait_job(&id, Duration::from_secs(15), "a second attempt", |j| {
            j["attempt"].as_u64() == Some(2) && j["state"] == "running"
        })
        .await;
    assert!(
        noticed.elapsed() < Duration::from_secs(15),
        "the gang stopped on the notice, not at its deadline"
    );
    assert_eq!(
        job["attempts"][0]["outcome"]["kind"], "preempted",
        "{job:#}"
    );
    assert_eq!(job["failures"], 0, "{job:#}");
    // Rank 0 had no notice of its own: the broker's word stopped its workload. (The
    // other ranks may be ended by the gang's release before they hear it.)
    let log = std::fs::read_to_string(data.join(format!("vms/local-{id}-1/agent.log"))).unwrap();
    assert!(
        log.contains("preemption notice; forwarding SIGTERM"),
        "rank 0 did not stop its workload on rank 2's notice:\n{log}"
    );
    assert!(
        !data.join(format!("vms/local-{id}-1/notice.json")).exists(),
        "the notice went to rank 2 only"
    );
}

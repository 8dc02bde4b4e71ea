//! Workloads are untrusted code: what they can reach of the broker (nothing), what
//! becomes of them when their agent dies (they die), what the agent uploads for them
//! (nothing outside their folders), and what happens when an agent cannot start
//! an attempt (a reported, bounded loss).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use respawn_e2e::*;

/// These tests start many processes; on 2 cores they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn queue_prefix() -> String {
    format!("respawn-e2e-iso-{}.", std::process::id())
}

/// What a hostile workload tries: every file of the broker it could name (by
/// absolute path, derived from its own contract paths, and by relative path from
/// its working directory), its parent's command line, every process's environment,
/// its own environment.
const SNOOP: &str = r#"
data="${RESPAWN_CHECKPOINT_DIR%/vms/*}"
echo "data=$data"
for f in "$data/admin-token" "$data/agent-key" "$data/notify-secret" "$data/respawn.db" \
         "$data"/secrets/* "$data"/vms/*/credentials "$data"/vms/*/agent.log \
         ../../../admin-token ../../../agent-key ../../../secrets/* ../credentials \
         /proc/1/cmdline /proc/$PPID/cmdline /proc/*/environ "$HOME/../credentials" /etc/shadow; do
  echo "== $f"; cat "$f" 2>&1 | tr '\0' ' '; echo
done
echo "== ls"; ls -la "$data" "$data/vms" ../.. 2>&1
echo "== env"; env
echo "== ps"; ps -ef 2>&1 || ls /proc
echo snooped
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_job_gets_nothing_of_the_broker() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let queue_url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let prefix = queue_prefix();
    let up = Up::start_with_env(
        &data,
        &["--queue", queue_url, "--queue-prefix", &prefix],
        &[
            ("BROKER_ONLY_VARIABLE", "broker-env-value-91c2"),
            ("GITHUB_HOOK_SECRET", "hook-secret-5d1e"),
        ],
    )
    .await;
    // Another job, live, with a secret of its own.
    let other = up
        .submit("name: other\ncommand: [sleep, '60']\nsecrets: { OTHER: other-job-secret-7f3a }\n")
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&other, Duration::from_secs(30), "running", |j| {
        j["state"] == "running"
    })
    .await;
    let spec = serde_json::json!({
        "name": "snoop",
        "command": ["sh", "-c", SNOOP],
        "secrets": { "MINE": "my-own-secret-0b77" },
    });
    let id = up.submit(&spec.to_string()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = up
        .wait_job(&id, Duration::from_secs(60), "ended", |j| {
            matches!(j["state"].as_str(), Some("succeeded" | "failed"))
        })
        .await;
    let out = up.attempt_stdout(&id, 1) + &up.attempt_log(&id, 1, "stderr");
    assert!(out.contains("snooped"), "the script ran: {done:#}\n{out}");
    // The script printed its environment: its own secret proves it did.
    assert!(out.contains("MINE=my-own-secret-0b77"), "{out}");
    assert!(out.contains(&format!("RESPAWN_JOB_ID={id}")), "{out}");
    // Root-only system files are masked (the broker runs as root in CI).
    assert!(
        !out.lines().any(|l| l.starts_with("root:")),
        "the workload read /etc/shadow:\n{out}"
    );

    let admin_token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let notify_secret = std::fs::read_to_string(data.join("notify-secret")).unwrap();
    let agent_key = std::fs::read(data.join("agent-key")).unwrap();
    let needles = [
        ("the admin token", admin_token.trim().to_owned()),
        ("the notify secret", notify_secret.trim().to_owned()),
        (
            "the agent key",
            String::from_utf8_lossy(&agent_key).into_owned(),
        ),
        ("another job's secret", "other-job-secret-7f3a".into()),
        ("a broker variable", "broker-env-value-91c2".into()),
        ("a broker variable", "BROKER_ONLY_VARIABLE".into()),
        ("a hook secret", "hook-secret-5d1e".into()),
        ("the queue URL", "amqp://".into()),
        ("an agent credential", "rat1.".into()),
        ("the store", "SQLite format".into()),
        ("the broker's listen address", up.base.clone()),
    ];
    for (what, needle) in needles {
        assert!(!out.contains(&needle), "the job's logs hold {what}:\n{out}");
    }
    // Its environment is the allow-list, its job's own and the contract.
    let env: Vec<&str> = out
        .split("== env\n")
        .nth(1)
        .unwrap()
        .split("== ps")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for name in env {
        assert!(
            [
                "PATH", "LANG", "LC_ALL", "TZ", "HOME", "MINE", "PWD", "SHLVL", "_", "OLDPWD"
            ]
            .contains(&name)
                || name.starts_with("RESPAWN_"),
            "the workload got {name}:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_dies_with_its_agent_sandboxed_or_not() {
    let _serial = SERIAL.lock().await;
    for isolation in ["auto", "none"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let up = Up::start(&data, &["--isolation", isolation]).await;
        // A workload with a child of its own in another process group: only a
        // namespace or the kernel's parent-death signal reaches both.
        let spec = "name: orphan\ncommand: [sh, -c, 'setsid sleep 300 & sleep 300']\n";
        let id = up.submit(spec).await["id"].as_str().unwrap().to_owned();
        up.wait_job(&id, Duration::from_secs(30), "running", |j| {
            j["state"] == "running"
        })
        .await;
        let vm: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(data.join(format!("vms/local-{id}-1/vm.json"))).unwrap(),
        )
        .unwrap();
        let agent = vm["pid"].as_i64().unwrap() as i32;
        let sleepers = || {
            leftovers(&data)
                .into_iter()
                .filter(|(_, cmd)| cmd.starts_with("sleep 300"))
                .count()
        };
        // "running" is reported when the workload is spawned, a moment before its
        // shell has started the sleepers.
        let mut running = sleepers();
        for _ in 0..100 {
            if running >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            running = sleepers();
        }
        assert!(running >= 1, "the workload runs ({isolation})");
        // The broker is gone too: nothing but the kernel may clean up after the agent.
        let mut up = up;
        up.kill9();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let mut left = sleepers();
        for _ in 0..50 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = sleepers();
        }
        assert_eq!(
            left,
            0,
            "{isolation}: the workload outlived its agent: {:?}",
            leftovers(&data)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_do_not_follow_links_out_of_the_output_folder() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let outside = dir.path().join("host-secret.txt");
    std::fs::write(&outside, "host-only-content-3c9d").unwrap();
    // --isolation none: the link's target is visible to the workload too, so only
    // the agent's refusal to follow it keeps the file out of the bucket.
    let up = Up::start(&data, &["--isolation", "none"]).await;
    let spec = format!(
        "name: links\ncommand: [sh, -c, 'echo ok > $RESPAWN_OUTPUT_DIR/model.txt; ln -s {} $RESPAWN_OUTPUT_DIR/leak.txt; ln -s / $RESPAWN_OUTPUT_DIR/root']\n",
        outside.display()
    );
    let id = up.submit(&spec).await["id"].as_str().unwrap().to_owned();
    let done = up
        .wait_job(&id, Duration::from_secs(30), "ended", |j| {
            matches!(j["state"].as_str(), Some("succeeded" | "failed"))
        })
        .await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let outputs = data.join(format!("bucket/jobs/{id}/outputs"));
    assert_eq!(
        std::fs::read_to_string(outputs.join("model.txt")).unwrap(),
        "ok\n"
    );
    assert!(
        !outputs.join("leak.txt").exists(),
        "a link's target was uploaded"
    );
    assert!(
        !outputs.join("root").exists(),
        "a linked folder was uploaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_start_the_attempt_reports_why_within_a_budget() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start(&data, &["--slots", "1"]).await;
    // Hold the only slot, so the next job waits for dispatch while its spec is spoilt.
    let blocker = up.submit("name: blocker\ncommand: [sleep, '60']\n").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.wait_job(&blocker, Duration::from_secs(30), "running", |j| {
        j["state"] == "running"
    })
    .await;
    let id = up
        .submit("name: bad-checkpoint\ncommand: ['true']\nretry: { max_lost: 1 }\n")
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A complete checkpoint whose file is missing from the bucket: every attempt's
    // restore fails before its workload can start.
    let ckpt = data.join(format!("bucket/jobs/{id}/checkpoints/{:020}", 1));
    std::fs::create_dir_all(&ckpt).unwrap();
    let manifest = serde_json::json!({
        "seq": 1,
        "attempt": 1,
        "files": [{ "path": "weights.bin", "size": 3, "sha256": "00" }],
    });
    std::fs::write(ckpt.join("MANIFEST.json"), manifest.to_string()).unwrap();
    let cancel = reqwest::Client::new()
        .post(format!("{}/v1/jobs/{blocker}/cancel", up.base))
        .bearer_auth(up.token())
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success());
    let done = up
        .wait_job(&id, Duration::from_secs(60), "failed", |j| {
            j["state"] == "failed"
        })
        .await;
    let reason = done["reason"].as_str().unwrap();
    assert!(
        reason.contains("cannot restore the newest checkpoint"),
        "{done:#}"
    );
    assert!(reason.contains("retry.max_lost: 1"), "{done:#}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        2,
        "one loss absorbed, then the budget: {done:#}"
    );
    assert_eq!(done["failures"], 0, "not the user's budget");
    assert!(
        up.attempt_log(&id, 1, "stderr")
            .contains("respawn: cannot restore the newest checkpoint"),
        "the reason is in the attempt's stderr"
    );
}

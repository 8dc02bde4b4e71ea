//! `GET /metrics` and `respawn status` on the real `respawn up`: a job preempted
//! once, with a notice too short for a last checkpoint, read back through the
//! official Prometheus client's parser (not respawn's own).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use respawn_e2e::*;
use serde_json::Value;

/// The series, as `prometheus_client.parser` reads them: one JSON object per
/// sample, `{name, labels, value}`.
fn parse(text: &str) -> Vec<Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let install = Command::new(root.join("scripts/obs-install"))
        .status()
        .unwrap();
    assert!(install.success(), "scripts/obs-install failed");
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(json.dumps({"name": s.name, "labels": s.labels, "value": s.value}))
"#;
    let mut child = Command::new(root.join(".venv-obs/bin/python"))
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Value> = samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][k] == *v))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0]["value"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_one_preemption_two_attempts_and_the_work_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start_with_env(&data, &[], &[("RESPAWN_PRICES", "cpu=0.03/0.09")]).await;
    // A workload that checkpoints every 3 s (a step a second) and does nothing
    // on SIGTERM: a 1 s notice ends it with the work since its last checkpoint
    // lost.
    let job = up
        .submit(
            r#"name: metered
command:
  - sh
  - -c
  - |
    trap '' TERM
    dir="$RESPAWN_CHECKPOINT_DIR"
    i=$(ls "$dir" 2>/dev/null | sort -n | tail -1)
    i=${i:-0}
    while [ "$i" -lt 8 ]; do
      sleep 1
      i=$((i + 1))
      if [ $((i % 3)) -eq 0 ]; then
        mkdir -p "$dir/$i" && echo "$i" >"$dir/$i/step" && touch "$dir/$i/.complete"
      fi
    done
"#,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    up.wait_job(&id, Duration::from_secs(60), "a checkpoint", |j| {
        j["state"] == "running" && j["checkpoint"].as_u64().is_some()
    })
    .await;
    // Mid-interval: past a checkpoint, before the next.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(up.preempt(&id, Duration::from_secs(1)).await);
    let done = up
        .wait_job(&id, Duration::from_secs(120), "success", |j| {
            j["state"] == "succeeded"
        })
        .await;
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{done:#}");
    assert_eq!(attempts[0]["outcome"]["kind"], "preempted", "{done:#}");
    assert_eq!(attempts[0]["spot"], true, "local slots are spot: {done:#}");

    let http = reqwest::Client::new();
    let scrape = |token: Option<String>| {
        let req = http.get(format!("{}/metrics", up.base));
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        async move { req.send().await.unwrap() }
    };
    assert_eq!(scrape(None).await.status(), 401, "metrics need a token");
    let resp = scrape(Some(up.token())).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let samples = parse(&text);

    assert_eq!(
        value(
            &samples,
            "respawn_jobs",
            &[("state", "succeeded"), ("project", "default")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "respawn_jobs_submitted_total",
            &[("project", "default")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "respawn_attempts_total",
            &[("outcome", "preempted")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "respawn_attempts_total",
            &[("outcome", "succeeded")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "respawn_preemptions_total",
            &[("provider", "local")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "respawn_preemption_notices_total",
            &[("provider", "local")]
        ),
        1.0
    );
    assert_eq!(value(&samples, "respawn_work_lost_seconds_count", &[]), 1.0);
    let lost = value(&samples, "respawn_work_lost_seconds_sum", &[]);
    assert!(
        lost > 1.0,
        "the notice was shorter than a checkpoint interval: work was lost ({lost} s)"
    );
    assert_eq!(
        value(
            &samples,
            "respawn_notice_to_replacement_running_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        value(&samples, "respawn_submit_to_running_seconds_count", &[]),
        1.0
    );
    assert_eq!(value(&samples, "respawn_dispatch_seconds_count", &[]), 2.0);
    // Each committed checkpoint's size and upload time, as its agent measured.
    let committed = value(&samples, "respawn_checkpoints_total", &[]);
    assert!(
        committed >= 2.0,
        "one checkpoint or more per attempt: {committed}"
    );
    assert_eq!(
        value(&samples, "respawn_checkpoint_size_bytes_count", &[]),
        committed
    );
    let bytes = value(&samples, "respawn_checkpoint_size_bytes_sum", &[]);
    // Each checkpoint is one file `step` holding its number and a newline.
    assert!(
        bytes >= 2.0 * committed && bytes <= 3.0 * committed,
        "{bytes} bytes in {committed} checkpoints"
    );
    assert_eq!(
        value(&samples, "respawn_checkpoint_upload_seconds_count", &[]),
        committed
    );
    // Nothing waits now: the broker's queues are empty, and say so.
    assert_eq!(
        value(
            &samples,
            "respawn_queue_depth",
            &[("queue", "respawn.dispatch")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &samples,
            "respawn_queue_oldest_age_seconds",
            &[("queue", "respawn.dispatch")]
        ),
        0.0
    );
    let spot = value(
        &samples,
        "respawn_gpu_time_seconds_total",
        &[("market", "spot"), ("gpu", "cpu")],
    );
    assert!(spot > 5.0, "two attempts of VM time: {spot}");
    let saving = value(&samples, "respawn_spot_saving_dollars_total", &[]);
    assert!(
        (saving - spot * 0.06 / 3600.0).abs() < 1e-9,
        "{saving} for {spot} s"
    );
    assert!(
        value(
            &samples,
            "respawn_api_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/v1/jobs"), ("status", "201")]
        ) >= 1.0,
        "{text}"
    );

    // respawn status, as a user types it.
    let out = Command::new(binary("respawn"))
        .args([
            "--endpoint",
            &up.base,
            "--token",
            &up.token(),
            "--output",
            "json",
            "status",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["jobs"]["succeeded"], 1, "{status:#}");
    let preemptions = status["preemptions"].as_array().unwrap();
    assert_eq!(preemptions.len(), 1, "{status:#}");
    assert_eq!(preemptions[0]["job"], id.as_str());
    assert!(preemptions[0]["work_lost_s"].as_f64().unwrap() > 1.0);
    let screen = Command::new(binary("respawn"))
        .args(["--endpoint", &up.base, "--token", &up.token(), "status"])
        .output()
        .unwrap();
    let screen = String::from_utf8(screen.stdout).unwrap();
    assert!(
        screen.contains("PREEMPTED JOB") && screen.contains(&id),
        "{screen}"
    );
}

/// Jobs that cannot get a VM wait in the dispatch queue: /metrics and
/// `respawn status` say how many and for how long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_and_the_oldest_message_age_show_what_waits() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&dir.path().join("data"), &["--slots", "0"]).await;
    for i in 0..3 {
        up.submit(&format!("name: waits-{i}\ncommand: [\"true\"]\n"))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", up.base))
        .bearer_auth(up.token())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = parse(&text);
    let dispatch = [("queue", "respawn.dispatch")];
    assert_eq!(
        value(&samples, "respawn_queue_depth", &dispatch),
        3.0,
        "{text}"
    );
    let age = value(&samples, "respawn_queue_oldest_age_seconds", &dispatch);
    assert!((1.4..60.0).contains(&age), "oldest waited {age} s");
    assert_eq!(
        value(
            &samples,
            "respawn_queue_depth",
            &[("queue", "respawn.dispatch.dead")]
        ),
        0.0
    );
    let out = Command::new(binary("respawn"))
        .args(["--endpoint", &up.base, "--token", &up.token(), "status"])
        .output()
        .unwrap();
    let screen = String::from_utf8(out.stdout).unwrap();
    let line = screen
        .lines()
        .find(|l| l.starts_with("queues"))
        .unwrap_or_else(|| panic!("{screen}"));
    assert!(line.contains("respawn.dispatch 3, oldest "), "{screen}");
}

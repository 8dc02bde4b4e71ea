//! The embedded default end to end: the real `respawn up`, agents and trainer.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;
use respawn_e2e::*;
use serde_json::Value;

/// These tests start many processes; on 2 cores they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const K: u64 = 50;
const TRAINER_ARGS: [&str; 8] = [
    "--steps",
    "1200",
    "--checkpoint-every",
    "50",
    "--hidden",
    "8",
    "--seed",
    "11",
];

fn rule() -> String {
    format!(
        r#"name: train-on-csv
match:
  prefix: incoming/
  glob: "*.csv"
template:
  name: train-${{stem}}
  command: [respawn-trainer, {}, --step-delay-ms, "5", --log-every, "1"]
  inputs: ["${{uri}}"]
"#,
        TRAINER_ARGS.map(|a| format!("\"{a}\"")).join(", ")
    )
}

fn outcome(a: &Value) -> &str {
    a["outcome"]["kind"].as_str().unwrap_or("live")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_csv_trains_through_three_preemptions_to_the_same_model() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("triggers")).unwrap();
    std::fs::write(data.join("triggers/train.yaml"), rule()).unwrap();
    let csv = dir.path().join("points.csv");
    generate_csv(400, &csv);
    let expected = baseline_model(&csv, &TRAINER_ARGS);

    let up = Up::start(&data, &["--slots", "2"]).await;
    drop_file(
        &data.join("bucket/incoming/points.csv"),
        &std::fs::read(&csv).unwrap(),
    );

    // Exactly one job from the file.
    let mut jobs = Vec::new();
    for _ in 0..200 {
        jobs = up.jobs().await;
        if !jobs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(jobs.len(), 1, "one job per dropped file");
    let id = jobs[0]["id"].as_str().unwrap().to_owned();

    // Three preemptions at random points: two with a notice longer than a
    // checkpoint takes, one with a notice too short for the SIGTERM checkpoint.
    let notices = [
        Duration::from_secs(5),
        Duration::from_millis(150),
        Duration::from_secs(5),
    ];
    let mut rng = rand::rng();
    for (i, notice) in notices.iter().enumerate() {
        let attempt = (i + 1) as u64;
        up.wait_job(&id, Duration::from_secs(60), "running", |j| {
            j["state"] == "running" && j["attempt"].as_u64() == Some(attempt)
        })
        .await;
        if i == 1 {
            // A torn upload in the bucket, newer than anything real: no attempt may restore it.
            drop_file(
                &data.join(format!(
                    "bucket/jobs/{id}/checkpoints/{:020}/state.txt",
                    99_999
                )),
                b"torn",
            );
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        assert!(up.preempt(&id, *notice).await, "preempt attempt {attempt}");
        up.wait_job(&id, Duration::from_secs(30), "next attempt", |j| {
            j["attempt"].as_u64() > Some(attempt)
        })
        .await;
    }
    let job = up
        .wait_job(&id, Duration::from_secs(120), "succeeded", |j| {
            j["state"] == "succeeded"
        })
        .await;

    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        4,
        "three preemptions, four attempts: {job:#}"
    );
    assert_eq!(
        job["failures"], 0,
        "preemptions never spend the failure budget"
    );
    assert_eq!(job["infra_losses"], 3);
    let mut committed: HashSet<u64> = HashSet::new();
    for (i, a) in attempts.iter().enumerate() {
        let n = a["number"].as_u64().unwrap();
        let restored = a["restored_checkpoint"].as_u64();
        if let Some(r) = restored {
            assert!(
                committed.contains(&r),
                "attempt {n} restored {r}, which no attempt committed"
            );
            assert_ne!(r, 99_999, "the torn checkpoint was restored");
        }
        if let Some(c) = a["last_checkpoint"].as_u64() {
            committed.insert(c);
        }
        let Some(next) = attempts.get(i + 1) else {
            break;
        };
        assert!(
            matches!(outcome(a), "preempted" | "lost"),
            "attempt {n}: {a}"
        );
        let stdout = up.attempt_stdout(&id, n);
        let resumed = next["restored_checkpoint"].as_u64().unwrap_or(0);
        let reached = last_step(&stdout).unwrap_or(0);
        let redone = reached.saturating_sub(resumed);
        assert!(
            redone <= K,
            "attempt {n}: reached step {reached}, next resumed from {resumed}: {redone} steps redone"
        );
        if notices[i] > Duration::from_secs(1) {
            let at = sigterm_step(&stdout).expect("the trainer checkpointed on SIGTERM");
            assert_eq!(
                resumed, at,
                "with a long notice the next attempt resumes where this one stopped"
            );
            assert_eq!(reached, at, "and nothing is redone");
        }
    }
    let model = std::fs::read(data.join(format!("bucket/jobs/{id}/outputs/model.txt"))).unwrap();
    assert!(
        model == expected,
        "the model after 3 preemptions differs from an uninterrupted run"
    );
    assert_eq!(up.jobs().await.len(), 1, "still exactly one job");
}

fn quick_job(i: usize) -> String {
    format!(
        "name: burst-{i}\ncommand: [respawn-trainer, --steps, \"300\", --checkpoint-every, \"50\", --step-delay-ms, \"10\", --hidden, \"4\"]\n\
         inputs: [\"bucket://shared/points.csv\"]\nidempotency_key: burst-{i}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_broker_with_twenty_jobs_running_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate_csv(200, &dir.path().join("points.csv"));
    drop_file(
        &data.join("bucket/shared/points.csv"),
        &std::fs::read(dir.path().join("points.csv")).unwrap(),
    );

    let mut up = Up::start(&data, &["--slots", "20"]).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            up.submit(&quick_job(i)).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Kill the broker while the jobs are in flight.
    for _ in 0..100 {
        let running = up
            .jobs()
            .await
            .iter()
            .filter(|j| j["state"] == "running")
            .count();
        if running >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    up.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut up = Up::start(&data, &["--slots", "20"]).await;
    // Resubmitting (a client retrying after the crash) must not make new jobs.
    for (i, id) in ids.iter().enumerate() {
        let again = up.submit(&quick_job(i)).await;
        assert_eq!(again["id"].as_str().unwrap(), id);
    }
    for id in &ids {
        up.wait_job(id, Duration::from_secs(120), "terminal", |j| {
            matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
        .await;
    }
    let jobs = up.jobs().await;
    assert_eq!(jobs.len(), 20, "exactly the 20 jobs, none duplicated");
    for id in &ids {
        let job = up.job(id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        let attempts = job["attempts"].as_array().unwrap();
        let succeeded = attempts
            .iter()
            .filter(|a| outcome(a) == "succeeded")
            .count();
        assert_eq!(succeeded, 1, "completed exactly once: {job:#}");
        for pair in attempts.windows(2) {
            let ended = pair[0]["ended_at"].as_u64().unwrap();
            let next = pair[1]["dispatched_at"].as_u64().unwrap();
            assert!(next >= ended, "two live attempts at once: {job:#}");
        }
        assert!(
            data.join(format!("bucket/jobs/{id}/outputs/model.txt"))
                .is_file()
        );
    }
    let left = wait_no_leftovers(&data, Duration::from_secs(10)).await;
    let left: Vec<_> = left
        .into_iter()
        .filter(|(pid, _)| *pid != up.pid().as_raw())
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(up.interrupt().success(), "clean exit on Ctrl-C");
    assert!(
        wait_no_leftovers(&data, Duration::from_secs(5))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_and_unmatched_files_are_reported_and_the_broker_keeps_serving() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let triggers = data.join("triggers");
    std::fs::create_dir_all(&triggers).unwrap();
    std::fs::write(
        triggers.join("broken-yaml.yaml"),
        "name: broken\nmatch: [unclosed\n",
    )
    .unwrap();
    std::fs::write(
        triggers.join("bad-template.yaml"),
        "name: bad-template\nmatch: { prefix: incoming/, glob: \"*.csv\" }\ntemplate:\n  name: t\n  command: [x]\n  resources: { gpus: two }\n",
    )
    .unwrap();
    std::fs::write(triggers.join("good.yaml"), rule()).unwrap();
    let up = Up::start(&data, &[]).await;

    drop_file(
        &data.join("bucket/unmatched/readme.txt"),
        b"nothing to train on",
    );
    let csv = dir.path().join("p.csv");
    generate_csv(100, &csv);
    drop_file(
        &data.join("bucket/incoming/p.csv"),
        &std::fs::read(&csv).unwrap(),
    );
    let mut jobs = Vec::new();
    for _ in 0..200 {
        jobs = up.jobs().await;
        if !jobs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        jobs.len(),
        1,
        "the good rule still makes its job:\n{}",
        up.log_text()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = up.log_text();
    assert!(
        log.contains("broken-yaml.yaml"),
        "the malformed rule file is named:\n{log}"
    );
    assert!(
        log.contains("bad-template") && log.contains("template.resources.gpus"),
        "the bad template is named with its field:\n{log}"
    );
    assert!(
        log.contains("no trigger rule matches") && log.contains("unmatched/readme.txt"),
        "the unmatched file is reported:\n{log}"
    );
    assert_eq!(
        up.get("/v1/jobs").await["jobs"].as_array().unwrap().len(),
        1,
        "API still serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_workload_and_nothing_else() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start(&data, &[]).await;
    let spec = "name: uses-a-secret\n\
                command: [sh, -c, 'test \"$(printf %s \"$API_TOKEN\" | sha256sum | cut -c1-16)\" = 8fc72cfd7a91177d && echo token-ok']\n\
                secrets: { API_TOKEN: s3cr3t-v4lue }\n";
    let job = up.submit(spec).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let done = up
        .wait_job(&id, Duration::from_secs(30), "terminal", |j| {
            matches!(j["state"].as_str(), Some("succeeded" | "failed"))
        })
        .await;
    assert_eq!(
        done["state"], "succeeded",
        "the workload saw the secret: {done:#}"
    );
    assert!(up.attempt_stdout(&id, 1).contains("token-ok"));
    assert!(
        done["spec"]["secrets"]["API_TOKEN"]["redacted"] == true,
        "{done:#}"
    );
    let needle = b"s3cr3t-v4lue";
    let leaks = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(
        !leaks(job.to_string().as_bytes()) && !leaks(done.to_string().as_bytes()),
        "API shows the value"
    );
    assert!(
        !leaks(up.log_text().as_bytes()),
        "the broker's log shows the value"
    );
    for f in ["respawn.db", "respawn.db-wal"] {
        let bytes = std::fs::read(data.join(f)).unwrap_or_default();
        assert!(!leaks(&bytes), "{f} holds the value in clear");
    }
    let in_bucket: Vec<_> = walk(&data.join(format!("bucket/jobs/{id}")))
        .into_iter()
        .filter(|f| leaks(&std::fs::read(f).unwrap_or_default()))
        .collect();
    assert!(
        in_bucket.is_empty(),
        "the bucket holds the value: {in_bucket:?}"
    );
    // An ended job needs its secrets no more: they are deleted, and the VM's work
    // folder (and the credentials of its agent) with them.
    let gone = wait_until(Duration::from_secs(10), || {
        !data.join(format!("secrets/{id}.json")).exists()
    })
    .await;
    assert!(gone, "the ended job's secrets are still on disk");
    let vm = data.join(format!("vms/local-{id}-1"));
    assert!(vm.join("vm.json").exists());
    assert!(
        !vm.join("work").exists(),
        "the VM's work folder was left behind"
    );
    assert!(!vm.join("credentials").exists());
}

async fn wait_until(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// What a notify receiver saw: (headers, body) per request.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>;

/// A webhook receiver that fails its first request, then accepts.
async fn receiver() -> (String, Seen) {
    use axum::http::{HeaderMap, StatusCode};
    let seen: Seen = Default::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let s = s.clone();
            async move {
                let mut all = s.lock().unwrap();
                all.push((headers, body));
                if all.len() == 1 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_are_posted_signed_and_retried() {
    use respawn_core::webhook::standard::{self, Headers, Secret};
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (url, seen) = receiver().await;
    // The receiver is on loopback, which only local development may notify.
    let up = Up::start(&data, &["--allow-private-notify"]).await;
    let spec = format!("name: notifies\ncommand: [\"true\"]\nnotify: [\"{url}\"]\n");
    let id = up.submit(&spec).await["id"].as_str().unwrap().to_owned();
    let job = up
        .wait_job(&id, Duration::from_secs(60), "succeeded and told", |j| {
            j["notifications"].as_array().is_some_and(|n| {
                n.iter()
                    .any(|a| a["state"] == "succeeded" && a["delivered"] == true)
            })
        })
        .await;
    let attempts = job["notifications"].as_array().unwrap();
    assert!(
        attempts
            .iter()
            .any(|a| a["delivered"] == false && a["status"] == 503),
        "the failed first try is recorded: {attempts:#?}"
    );
    let secret = Secret::parse(
        std::fs::read_to_string(data.join("notify-secret"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let seen = seen.lock().unwrap().clone();
    let mut states = Vec::new();
    for (h, body) in &seen {
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let headers = Headers {
            id: get("webhook-id"),
            timestamp: get("webhook-timestamp"),
            signature: get("webhook-signature"),
        };
        standard::verify(&secret, &headers, body.as_bytes(), now).expect("every POST is signed");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["data"]["job_id"], id.as_str());
        states.push(v["data"]["state"].as_str().unwrap().to_owned());
    }
    for s in ["allocating", "starting", "running", "succeeded"] {
        assert!(states.iter().any(|x| x == s), "{s} was posted: {states:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_urls_reach_no_private_address_and_follow_no_redirect() {
    use axum::http::{StatusCode, header};
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // Something on the machine a job must not make the broker call, and a public
    // looking receiver that redirects there.
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new()
        .route(
            "/internal",
            axum::routing::any(move || {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { "internal secret" }
            }),
        )
        .route(
            "/redirect",
            axum::routing::any(|| async { (StatusCode::FOUND, [(header::LOCATION, "/internal")]) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // Without --allow-private-notify: loopback (by address or by name) is refused.
    let up = Up::start(&dir.path().join("a"), &[]).await;
    let spec = format!(
        "name: ssrf\ncommand: [\"true\"]\nnotify: [\"http://{addr}/internal?token=SEKRIT\", \"http://localhost:{}/internal\"]\n",
        addr.port()
    );
    let id = up.submit(&spec).await["id"].as_str().unwrap().to_owned();
    let job = up
        .wait_job(&id, Duration::from_secs(30), "notifications refused", |j| {
            j["notifications"]
                .as_array()
                .is_some_and(|n| n.iter().filter(|a| a["state"] == "succeeded").count() >= 2)
        })
        .await;
    for a in job["notifications"].as_array().unwrap() {
        assert_eq!(a["delivered"], false, "{a:#}");
        assert!(a["status"].is_null(), "no request was made: {a:#}");
        let error = a["error"].as_str().unwrap_or_default();
        assert!(error.contains("private"), "{error}");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(
        !up.log_text().contains("SEKRIT"),
        "the broker's log shows a notify URL's query"
    );
    drop(up);

    // With it (local development), a redirect is still not followed.
    let up = Up::start(&dir.path().join("b"), &["--allow-private-notify"]).await;
    let spec =
        format!("name: redirected\ncommand: [\"true\"]\nnotify: [\"http://{addr}/redirect\"]\n");
    let id = up.submit(&spec).await["id"].as_str().unwrap().to_owned();
    let job = up
        .wait_job(&id, Duration::from_secs(30), "notification tried", |j| {
            j["notifications"]
                .as_array()
                .is_some_and(|n| n.iter().any(|a| a["state"] == "succeeded"))
        })
        .await;
    let tried = &job["notifications"].as_array().unwrap()[0];
    assert_eq!(tried["status"], 302, "{tried:#}");
    assert_eq!(tried["delivered"], false);
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files
}

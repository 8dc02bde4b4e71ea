//! Project isolation on the real stack: with project A's job actually running on a
//! VM, project B's tokens can neither see, preempt nor cancel it.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use respawn_e2e::*;
use serde_json::{Value, json};

/// A client of the stack under one token.
struct As<'a> {
    up: &'a Up,
    token: String,
    http: reqwest::Client,
}

impl As<'_> {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.up.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn submit(&self, spec: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/v1/jobs", self.up.base))
            .bearer_auth(&self.token)
            .body(spec.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

async fn mint<'a>(up: &'a Up, name: &str, project: &str, scopes: &[&str]) -> As<'a> {
    let owner = As {
        up,
        token: up.token(),
        http: reqwest::Client::new(),
    };
    let body = json!({ "name": name, "project": project, "scopes": scopes });
    let (status, created) = owner
        .send(reqwest::Method::POST, "/v1/tokens", Some(body))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["project"], project);
    As {
        up,
        token: created["token"].as_str().unwrap().to_owned(),
        http: reqwest::Client::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_project_cannot_touch_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let csv = dir.path().join("a.csv");
    generate_csv(200, &csv);
    drop_file(
        &data.join("bucket/projects/proj-a/a.csv"),
        &std::fs::read(&csv).unwrap(),
    );
    let up = Up::start(&data, &["--slots", "2"]).await;
    let a = mint(&up, "a", "proj-a", &["submit", "read", "cancel"]).await;
    // B gets every scope of its own project: admin, the one that may preempt.
    let b = mint(&up, "b", "proj-b", &["admin"]).await;

    let spec = "name: long-a\ncommand: [respawn-trainer, --steps, \"100000\", --step-delay-ms, \"5\"]\n\
                inputs: [bucket://projects/proj-a/a.csv]\n";
    let (status, job) = a.submit(spec).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/jobs/{id}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = loop {
        let (_, job) = a.send(reqwest::Method::GET, &path, None).await;
        if job["state"] == "running" {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "A's job never ran: {job:#}\n{}",
            up.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let vm = running["attempts"][0]["vm"].as_str().unwrap().to_owned();

    // B, by job id and by VM id: not found, and nothing happens to A's job.
    for target in [&id, &vm] {
        let (status, answer) = b
            .send(
                reqwest::Method::POST,
                "/v1/preempt",
                Some(json!({ "target": target, "notice_secs": 1 })),
            )
            .await;
        assert_eq!(status, 404, "B preempting {target}: {answer}");
    }
    for (method, p) in [
        (reqwest::Method::POST, format!("{path}/cancel")),
        (reqwest::Method::GET, path.clone()),
        (reqwest::Method::GET, format!("{path}/logs")),
    ] {
        let (status, answer) = b.send(method.clone(), &p, None).await;
        assert_eq!(status, 404, "B: {method} {p}: {answer}");
    }
    let (_, vms) = b.send(reqwest::Method::GET, "/v1/vms", None).await;
    assert_eq!(vms, json!([]), "B sees no VM of A's");
    // Long enough for a notice of 1s, or a cancel, to have shown in the record.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, after) = a.send(reqwest::Method::GET, &path, None).await;
    assert_eq!(after["state"], "running", "A's job still runs: {after:#}");
    assert_eq!(after["attempts"].as_array().unwrap().len(), 1, "{after:#}");
    assert!(after["attempts"][0]["outcome"].is_null(), "{after:#}");

    // A itself may cancel it.
    let (status, cancelled) = a
        .send(reqwest::Method::POST, &format!("{path}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{cancelled}");
}

/// `respawn logs -f` follows a job across a preemption: what it prints is every
/// attempt's output, in order, and it ends when the job does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_a_job_across_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let csv = dir.path().join("x.csv");
    generate_csv(200, &csv);
    drop_file(
        &data.join("bucket/data/x.csv"),
        &std::fs::read(&csv).unwrap(),
    );
    let up = Up::start(&data, &["--slots", "2", "--notice", "2s"]).await;
    let job = up
        .submit(
            "name: followed\ncommand: [respawn-trainer, --steps, \"600\", --checkpoint-every, \"50\", \
             --step-delay-ms, \"5\", --log-every, \"1\"]\ninputs: [bucket://data/x.csv]\n",
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let follower = tokio::process::Command::new(binary("respawn"))
        .args([
            "logs",
            &id,
            "-f",
            "--endpoint",
            &up.base,
            "--token",
            &up.token(),
        ])
        .output();
    let follower = tokio::spawn(follower);
    up.wait_job(&id, Duration::from_secs(60), "running", |j| {
        j["state"] == "running"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(up.preempt(&id, Duration::from_secs(1)).await, "preempted");
    let done = up
        .wait_job(&id, Duration::from_secs(120), "the end", |j| {
            j["state"] == "succeeded" || j["state"] == "failed"
        })
        .await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let attempts = done["attempts"].as_array().unwrap().len() as u64;
    assert!(attempts >= 2, "{done:#}");
    let out = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("respawn logs -f ends with the job")
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let shipped: String = (1..=attempts).map(|n| up.attempt_stdout(&id, n)).collect();
    assert_eq!(printed, shipped, "every attempt's output, in order");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--- attempt 2 ---"), "{stderr}");
}

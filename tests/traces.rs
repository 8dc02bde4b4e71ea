//! One trace per job, across every hop: `respawn up` on RabbitMQ exports OTLP
//! to a receiver that decodes with the official OpenTelemetry protobuf
//! definitions (tests/support/otlp-receiver.py, PyPI `opentelemetry-proto`), a job
//! is preempted once and notifies a webhook, and its spans — the API request,
//! submit, both attempts' dispatch and allocation, the agents' attempt, restore,
//! run and checkpoint uploads, their reports, the notification — are one trace
//! whose parents are all in it, across the queue hops.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use respawn_e2e::otlp;
use respawn_e2e::*;
use serde_json::Value;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The spans of trace `trace_id`.
fn in_trace<'a>(all: &'a [Value], trace_id: &str) -> Vec<&'a Value> {
    all.iter().filter(|s| s["trace_id"] == trace_id).collect()
}

/// How many of `spans` are `name` from `service`.
fn count(spans: &[&Value], name: &str, service: &str) -> usize {
    spans
        .iter()
        .filter(|s| s["name"] == name && s["service"] == service)
        .count()
}

/// `(service, name)` of each span, for a failure's message.
fn named<'a>(spans: impl Iterator<Item = &'a Value>) -> BTreeSet<(String, String)> {
    spans
        .map(|s| {
            (
                s["service"].as_str().unwrap_or("?").to_owned(),
                s["name"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

/// A webhook receiver that accepts everything.
async fn hook() -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async { axum::http::StatusCode::NO_CONTENT }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_job_is_one_trace_across_rabbitmq_and_its_agents() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let otlp = otlp::Receiver::start(dir.path());
    let hook = hook().await;
    let prefix = format!(
        "e2e-trace-{:x}.",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let up = Up::start_with_env(
        &data,
        &[
            "--queue",
            URL,
            "--queue-prefix",
            &prefix,
            "--allow-private-notify",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ],
    )
    .await;
    let job = up
        .submit(&format!(
            r#"name: traced
notify: ["{hook}"]
command:
  - sh
  - -c
  - |
    test -n "$TRACEPARENT" || exit 9
    dir="$RESPAWN_CHECKPOINT_DIR"
    i=$(ls "$dir" 2>/dev/null | sort -n | tail -1)
    i=${{i:-0}}
    while [ "$i" -lt 6 ]; do
      sleep 1
      i=$((i + 1))
      if [ $((i % 2)) -eq 0 ]; then
        mkdir -p "$dir/$i" && echo "$i" >"$dir/$i/step" && touch "$dir/$i/.complete"
      fi
    done
"#
        ))
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    up.wait_job(&id, Duration::from_secs(60), "a checkpoint", |j| {
        j["state"] == "running" && j["checkpoint"].as_u64().is_some()
    })
    .await;
    assert!(up.preempt(&id, Duration::from_secs(2)).await);
    let done = up
        .wait_job(&id, Duration::from_secs(120), "success", |j| {
            j["state"] == "succeeded"
        })
        .await;
    assert_eq!(done["attempts"].as_array().unwrap().len(), 2, "{done:#}");
    let trace = done["trace"]
        .as_str()
        .expect("the job records its trace")
        .to_owned();
    let trace_id = trace.split('-').nth(1).unwrap().to_owned();
    // `respawn show` names the trace, as a tracing UI searches for it.
    let shown = std::process::Command::new(binary("respawn"))
        .args(["--endpoint", &up.base, "--token", &up.token(), "show", &id])
        .output()
        .unwrap();
    let shown = String::from_utf8(shown.stdout).unwrap();
    assert!(
        shown
            .lines()
            .any(|l| l == format!("trace       {trace_id}")),
        "{shown}"
    );

    // Spans arrive in batches; the agents flush theirs as they exit.
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = |all: &[Value]| {
        let ours = in_trace(all, &trace_id);
        count(&ours, "attempt", "respawn-agent") >= 2
            && count(&ours, "notify", "respawn") >= 1
            && count(&ours, "run", "respawn-agent") >= 2
    };
    let mut all = otlp.spans();
    while !wanted(&all) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        all = otlp.spans();
    }
    let ours = in_trace(&all, &trace_id);
    let names = named(ours.iter().copied());
    let everything = named(all.iter());
    let describe = || {
        format!(
            "in the trace: {names:#?}\nin any trace: {everything:#?}\nlog:\n{}",
            up.log_text()
        )
    };
    let count = |name: &str, service: &str| count(&ours, name, service);
    // The submission: the API request and the submit handler.
    assert_eq!(count("POST /v1/jobs", "respawn"), 1, "{}", describe());
    assert_eq!(count("submit", "respawn"), 1, "{}", describe());
    // Both attempts: dispatched through RabbitMQ, allocated, run by an agent.
    assert!(count("dispatch", "respawn") >= 2, "{}", describe());
    assert!(count("allocate", "respawn") >= 2, "{}", describe());
    for name in ["attempt", "restore", "run"] {
        assert_eq!(count(name, "respawn-agent"), 2, "{name}: {}", describe());
    }
    assert!(
        count("checkpoint upload", "respawn-agent") >= 2,
        "{}",
        describe()
    );
    // The agents' reports, received by the API and applied from the events queue.
    for event in [
        "workload_started",
        "preemption_notice",
        "checkpoint_committed",
        "workload_exited",
    ] {
        assert!(count(event, "respawn") >= 1, "{event}: {}", describe());
    }
    assert!(count("notify", "respawn") >= 1, "{}", describe());
    let consumers = ours.iter().filter(|s| s["kind"] == 5).count();
    assert!(
        consumers >= 4,
        "queue hops as consumer spans: {}",
        describe()
    );

    // Every span but the root has its parent in the trace: no hop broke it.
    let ids: BTreeMap<&str, &Value> = ours
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap(), *s))
        .collect();
    let roots: Vec<&&Value> = ours.iter().filter(|s| s["parent_span_id"] == "").collect();
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    assert_eq!(roots[0]["name"], "POST /v1/jobs");
    for s in &ours {
        let parent = s["parent_span_id"].as_str().unwrap();
        assert!(
            parent.is_empty() || ids.contains_key(parent),
            "{} ({}) has a parent outside the trace",
            s["name"],
            s["service"]
        );
    }
    // The agents' attempts hang off the job's trace; a consumer span's parent is
    // the span that sent its message (a producer on the other side of a queue).
    let attempt = ours.iter().find(|s| s["name"] == "attempt").unwrap();
    assert_eq!(attempt["parent_span_id"], trace.split('-').nth(2).unwrap());

    // The same counts go out as OTLP metrics, cumulative: the newest point of
    // each series holds the job's whole story.
    let dispatch = format!("{prefix}dispatch");
    let want = |name: &str, attrs: &[(&str, &str)], at_least: f64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = otlp.latest("respawn", name, attrs);
            let v = got.as_ref().and_then(|p| {
                p["value"]
                    .as_f64()
                    .or_else(|| p["value"].as_str()?.parse().ok())
                    .or_else(|| p["count"].as_str()?.parse().ok())
                    .or_else(|| p["count"].as_f64())
            });
            if v.is_some_and(|v| v >= at_least) {
                return v.unwrap_or_default();
            }
            assert!(
                Instant::now() < deadline,
                "{name} {attrs:?} ≥ {at_least}: {got:?}\n{:#?}",
                otlp.points()
                    .iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect::<BTreeSet<_>>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(
        want("respawn.attempts", &[("outcome", "preempted")], 1.0),
        1.0
    );
    assert_eq!(
        want("respawn.attempts", &[("outcome", "succeeded")], 1.0),
        1.0
    );
    assert_eq!(
        want("respawn.preemptions", &[("provider", "local")], 1.0),
        1.0
    );
    assert!(want("respawn.checkpoint.size", &[], 2.0) >= 2.0);
    assert_eq!(want("respawn.work_lost", &[], 1.0), 1.0);
    want(
        "http.server.request.duration",
        &[
            ("http.route", "/v1/jobs"),
            ("http.request.method", "POST"),
            ("http.response.status_code", "201"),
        ],
        1.0,
    );
    // Sampled as often as reconcile runs: it exists, whatever its value now.
    want(
        "respawn.queue.depth",
        &[("messaging.destination.name", &dispatch)],
        0.0,
    );
}

/// `--log-format json`: every line of the broker's log is one JSON object, and
/// the lines about a job carry the trace id it was submitted in and a span id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_trace_and_span_ids_on_every_line_about_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&dir.path().join("data"), &["--log-format", "json"]).await;
    let job = up.submit("name: logged\ncommand: [\"true\"]\n").await;
    let id = job["id"].as_str().unwrap().to_owned();
    let done = up
        .wait_job(&id, Duration::from_secs(60), "success", |j| {
            j["state"] == "succeeded"
        })
        .await;
    let trace = done["trace"]
        .as_str()
        .expect("a trace, though none is exported");
    let trace_id = trace.split('-').nth(1).unwrap();
    let log = up.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let about: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["job_id"] == id.as_str())
        .collect();
    assert!(!about.is_empty(), "no line names the job:\n{log}");
    let hex = |v: &Value, n: usize| {
        v.as_str()
            .is_some_and(|s| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    for l in &about {
        assert!(hex(&l["trace_id"], 32) && hex(&l["span_id"], 16), "{l}");
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    assert!(
        about.iter().any(|l| l["trace_id"] == trace_id),
        "no line about the job is in its trace {trace_id}:\n{log}"
    );
}

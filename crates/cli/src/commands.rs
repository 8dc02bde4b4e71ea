//! The CLI commands that talk to a running broker.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use respawn_core::job::{JobRecord, JobState};
use respawn_core::time::{Clock, SystemClock, Timestamp};
use serde_json::{Value, json};

use crate::client::Client;
use crate::{Output, TokenAction};
use respawn_host::api::Summary;

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn submit(
    client: &Client,
    file: &Path,
    wait: bool,
    out: Output,
) -> Result<ExitCode, String> {
    let json_out = out == Output::Json;
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if is_sweep(&text) {
        return submit_sweep(client, file, text, wait, out).await;
    }
    let job: JobRecord = client
        .post_text("/v1/jobs", text)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if json_out {
        print_json(&job);
    } else {
        println!("{}", job.id);
    }
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait_for(client, job.id.as_str(), json_out).await
}

/// A sweep has a template and a grid or list of parameter sets.
fn is_sweep(text: &str) -> bool {
    let doc: Option<Value> = serde_yaml_ng::from_str(text).ok();
    doc.is_some_and(|d| {
        d.get("template").is_some() && (d.get("grid").is_some() || d.get("list").is_some())
    })
}

async fn submit_sweep(
    client: &Client,
    file: &Path,
    text: String,
    wait: bool,
    out: Output,
) -> Result<ExitCode, String> {
    let done: Value = client
        .post_text("/v1/arrays", text)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let array = done["array"].as_str().unwrap_or_default().to_owned();
    if out == Output::Json {
        print_json(&done);
    } else {
        let n = done["jobs"].as_array().map_or(0, Vec::len);
        println!("{array}");
        eprintln!(
            "{n} jobs ({} new); follow with: respawn jobs --array {array}",
            done["created"]
        );
    }
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        let p: Value = client.get(&format!("/v1/arrays/{array}")).await?;
        if p["finished"].as_bool().unwrap_or(false) {
            let total = p["total"].as_u64().unwrap_or(0);
            let ok = p["counts"]["succeeded"].as_u64().unwrap_or(0);
            eprintln!("{array}: {ok} of {total} succeeded");
            return Ok(if ok == total {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn array(client: &Client, id: &str, out: Output) -> Result<ExitCode, String> {
    let p: Value = client.get(&format!("/v1/arrays/{id}")).await?;
    if out == Output::Json {
        print_json(&p);
        return Ok(ExitCode::SUCCESS);
    }
    let counts: Vec<String> = p["counts"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("array {id}: {} jobs: {}", p["total"], counts.join(", "));
    let jobs: Vec<Summary> =
        serde_json::from_value(p["jobs"].clone()).map_err(|e| e.to_string())?;
    print_table(&jobs);
    Ok(ExitCode::SUCCESS)
}

fn print_table(jobs: &[Summary]) {
    println!(
        "{:<26}  {:<24}  {:<10}  {:>8}  {:>11}  AGE",
        "ID", "NAME", "STATE", "ATTEMPTS", "PREEMPTIONS"
    );
    for j in jobs {
        println!(
            "{:<26}  {:<24}  {:<10}  {:>8}  {:>11}  {}",
            j.id.as_str(),
            truncate(&j.name, 24),
            j.state.as_str(),
            j.attempts,
            j.preemptions,
            age(j.created_at)
        );
    }
}

/// Shows each change of state until the job ends; the exit status is the job's.
async fn wait_for(client: &Client, id: &str, quiet: bool) -> Result<ExitCode, String> {
    let mut last = None;
    loop {
        let job: JobRecord = client.get(&format!("/v1/jobs/{id}")).await?;
        let now = (job.state, job.attempt, job.checkpoint);
        if last != Some(now) && !quiet {
            let ckpt = job
                .checkpoint
                .map(|c| format!(", checkpoint {c}"))
                .unwrap_or_default();
            eprintln!("{id}: attempt {} {}{ckpt}", job.attempt, job.state);
        }
        last = Some(now);
        if job.state.is_terminal() {
            if let Some(r) = &job.reason {
                eprintln!("{id}: {r}");
            }
            return Ok(if job.state == JobState::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn token(client: &Client, action: TokenAction, out: Output) -> Result<ExitCode, String> {
    let answer: Value = match action {
        TokenAction::Create {
            name,
            scopes,
            project,
        } => {
            let mut body = json!({ "name": name, "scopes": scopes });
            if let Some(p) = project {
                body["project"] = json!(p);
            }
            let created: Value = client.post_json("/v1/tokens", &body).await?;
            if out == Output::Table {
                eprintln!(
                    "token {} for project {} (shown once; keep it secret):",
                    created["id"], created["project"]
                );
                println!("{}", created["token"].as_str().unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            created
        }
        TokenAction::List { project } => {
            let path = match project {
                Some(p) => format!("/v1/tokens?project={p}"),
                None => "/v1/tokens".to_owned(),
            };
            client.get(&path).await?
        }
        TokenAction::Revoke { id } => client.delete(&format!("/v1/tokens/{id}")).await?,
    };
    if out == Output::Json {
        print_json(&answer);
    } else if let Some(list) = answer["tokens"].as_array() {
        println!(
            "{:<30}  {:<16}  {:<12}  {:<24}  REVOKED",
            "ID", "NAME", "PROJECT", "SCOPES"
        );
        for t in list {
            let scopes: Vec<&str> = t["scopes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            println!(
                "{:<30}  {:<16}  {:<12}  {:<24}  {}",
                t["id"].as_str().unwrap_or_default(),
                t["name"].as_str().unwrap_or_default(),
                t["project"].as_str().unwrap_or_default(),
                scopes.join(","),
                t["revoked"].as_bool().unwrap_or(false)
            );
        }
    } else {
        println!("{} revoked", answer["id"].as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

fn age(t: Timestamp) -> String {
    let d = SystemClock.now().since(t);
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

pub async fn jobs(
    client: &Client,
    state: Option<String>,
    label: Option<String>,
    limit: usize,
    out: Output,
) -> Result<ExitCode, String> {
    let json_out = out == Output::Json;
    let mut path = format!("/v1/jobs?limit={limit}");
    if let Some(s) = state {
        path.push_str(&format!("&state={s}"));
    }
    if let Some(l) = label {
        path.push_str(&format!("&label={l}"));
    }
    let page: Value = client.get(&path).await?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&page).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let jobs: Vec<Summary> =
        serde_json::from_value(page["jobs"].clone()).map_err(|e| e.to_string())?;
    print_table(&jobs);
    Ok(ExitCode::SUCCESS)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

pub async fn show(client: &Client, id: &str, out: Output) -> Result<ExitCode, String> {
    let json_out = out == Output::Json;
    let job: JobRecord = client.get(&format!("/v1/jobs/{id}")).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&job).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!("job         {}", job.id);
    println!("name        {}", job.spec.name);
    println!(
        "state       {}{}",
        job.state,
        job.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!(
        "created     {} ({} ago)",
        job.created_at,
        age(job.created_at)
    );
    println!(
        "budgets     failures {}/{}, infrastructure losses {}{}",
        job.failures,
        job.spec.retry.max_failures,
        job.infra_losses,
        job.spec
            .retry
            .max_preemptions
            .map(|m| format!("/{m}"))
            .unwrap_or_default()
    );
    println!(
        "checkpoint  {}",
        job.checkpoint.map_or("none".into(), |c| c.to_string())
    );
    // The trace id alone (the traceparent's second field): what a tracing UI
    // searches by.
    if let Some(trace) = job.trace.as_deref().and_then(|t| t.split('-').nth(1)) {
        println!("trace       {trace}");
    }
    println!();
    println!(
        "{:>7}  {:<36}  {:<24}  {:>8}  {:>10}  {:>9}  {:>9}  OUTCOME",
        "ATTEMPT", "VM", "STARTED", "RESTORED", "CHECKPOINT", "LOST", "RESUMED"
    );
    let secs = |d: Option<std::time::Duration>| {
        d.map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64()))
    };
    for a in &job.attempts {
        let outcome = match &a.outcome {
            None => "live".to_owned(),
            Some(o) => serde_json::to_value(o)
                .ok()
                .map(|v| describe_outcome(&v))
                .unwrap_or_default(),
        };
        // LOST: how long the workload ran past its last checkpoint when the
        // infrastructure ended it; RESUMED: from its notice to the next attempt
        // running.
        println!(
            "{:>7}  {:<36}  {:<24}  {:>8}  {:>10}  {:>9}  {:>9}  {}",
            a.number,
            a.vm.as_deref().unwrap_or("-"),
            a.started_at.map_or("-".into(), |t| t.to_string()),
            a.restored_checkpoint.map_or("-".into(), |c| c.to_string()),
            a.last_checkpoint.map_or("-".into(), |c| c.to_string()),
            secs(a.work_lost()),
            secs(job.notice_to_resume(a.number)),
            outcome
        );
    }
    if !job.notifications.is_empty() {
        println!();
        println!(
            "{:<10}  {:>3}  {:<24}  {:<10}  URL",
            "STATE", "TRY", "AT", "RESULT"
        );
        for n in &job.notifications {
            let result = match (n.delivered, n.status, &n.error) {
                (true, Some(s), _) => format!("ok {s}"),
                (false, Some(s), _) => format!("http {s}"),
                (_, None, Some(e)) => format!("error: {e}"),
                _ => "?".into(),
            };
            println!(
                "{:<10}  {:>3}  {:<24}  {:<10}  {}",
                n.state.as_str(),
                n.try_number,
                n.at.to_string(),
                result,
                n.url
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_outcome(v: &Value) -> String {
    let kind = v["kind"].as_str().unwrap_or("?");
    match kind {
        "failed" => format!("failed (exit code {})", v["exit_code"]),
        "lost" | "allocation_failed" | "stopped" => {
            format!("{kind}: {}", v["reason"].as_str().unwrap_or(""))
        }
        other => other.to_owned(),
    }
}

pub async fn logs(
    client: &Client,
    id: &str,
    follow: bool,
    attempt: Option<u32>,
    stderr: bool,
) -> Result<ExitCode, String> {
    use std::io::Write;
    let stream = if stderr { "stderr" } else { "stdout" };
    let mut attempt = attempt;
    let (mut after, mut offset) = (0u64, 0u64);
    loop {
        let mut path = format!("/v1/jobs/{id}/logs?stream={stream}&after={after}&offset={offset}");
        if let Some(a) = attempt {
            path.push_str(&format!("&attempt={a}"));
        }
        let page: Value = client.get(&path).await?;
        print!("{}", page["text"].as_str().unwrap_or_default());
        let _ = std::io::stdout().flush();
        after = page["next"].as_u64().unwrap_or(after);
        offset = page["offset"].as_u64().unwrap_or(0);
        let this = page["attempt"].as_u64().unwrap_or(1) as u32;
        attempt = Some(this);
        if page["more"].as_bool().unwrap_or(false) {
            // Each answer is bounded; what is already there comes page by page.
            continue;
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        let state: Option<JobState> = serde_json::from_value(page["state"].clone()).ok();
        let attempts = page["attempts"].as_u64().unwrap_or(0) as u32;
        if !page["live"].as_bool().unwrap_or(false) {
            if attempts > this {
                // Follow across attempts: the job moved on; show the next one.
                eprintln!("--- attempt {} ---", this + 1);
                attempt = Some(this + 1);
                (after, offset) = (0, 0);
                continue;
            }
            if state.is_some_and(JobState::is_terminal) {
                return Ok(ExitCode::SUCCESS);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn cancel(client: &Client, id: &str) -> Result<ExitCode, String> {
    let job: JobRecord = client
        .post_text(&format!("/v1/jobs/{id}/cancel"), String::new())
        .await?;
    println!("{} {}", job.id, job.state);
    Ok(ExitCode::SUCCESS)
}

pub async fn preempt(
    client: &Client,
    target: &str,
    notice: Option<Duration>,
) -> Result<ExitCode, String> {
    let body = json!({ "target": target, "notice_secs": notice.map(|d| d.as_secs_f64()) });
    let answer: Value = client.post_json("/v1/preempt", &body).await?;
    println!(
        "preemption notice sent to {}",
        answer["vm"].as_str().unwrap_or(target)
    );
    Ok(ExitCode::SUCCESS)
}

/// `respawn status`: the broker at a glance.
pub async fn status(client: &Client, out: Output) -> Result<ExitCode, String> {
    let s: serde_json::Value = client.get("/v1/status").await?;
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let counts = |v: &serde_json::Value| {
        let parts: Vec<String> = v
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_i64() != Some(0))
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    };
    let uptime = s["uptime_s"].as_u64().unwrap_or(0);
    println!(
        "respawn {}, up {}h {:02}m {:02}s",
        s["version"].as_str().unwrap_or("?"),
        uptime / 3600,
        uptime / 60 % 60,
        uptime % 60
    );
    println!("jobs        {}", counts(&s["jobs"]));
    println!("vms         {}", counts(&s["vms"]));
    let queues = s["queues"].as_array().cloned().unwrap_or_default();
    let waiting: Vec<String> = queues
        .iter()
        .filter(|q| q["messages"].as_u64().unwrap_or(0) > 0)
        .map(|q| {
            let age = q["oldest_s"]
                .as_f64()
                .map_or(String::new(), |a| format!(", oldest {a:.0}s"));
            format!(
                "{} {}{age}",
                q["name"].as_str().unwrap_or("?"),
                q["messages"]
            )
        })
        .collect();
    println!(
        "queues      {}",
        if waiting.is_empty() {
            format!("{} queues, nothing waiting", queues.len())
        } else {
            waiting.join("; ")
        }
    );
    println!(
        "gpu hours   spot {:.2}, on demand {:.2}; saving ${:.2} (RESPAWN_PRICES)",
        s["gpu_hours_spot"].as_f64().unwrap_or(0.0),
        s["gpu_hours_on_demand"].as_f64().unwrap_or(0.0),
        s["spot_saving_dollars"].as_f64().unwrap_or(0.0)
    );
    let preemptions = s["preemptions"].as_array().cloned().unwrap_or_default();
    if preemptions.is_empty() {
        println!("preemptions none since the broker started");
    } else {
        println!();
        println!(
            "{:<26}  {:>7}  {:<24}  LOST",
            "PREEMPTED JOB", "ATTEMPT", "AT"
        );
        for p in preemptions.iter().rev() {
            let at = respawn_core::time::Timestamp::from_millis(p["at"].as_u64().unwrap_or(0));
            println!(
                "{:<26}  {:>7}  {:<24}  {}",
                p["job"].as_str().unwrap_or("?"),
                p["attempt"],
                at.to_string(),
                p["work_lost_s"]
                    .as_f64()
                    .map_or("-".into(), |l| format!("{l:.1}s"))
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

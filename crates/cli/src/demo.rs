//! `respawn demo`: the product in one minute. A fresh local stack, a CSV dropped
//! into its bucket, a training job made from it by a trigger rule, two spot
//! preemptions, two resumes from checkpoint, and the final model.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use respawn_adapters::local::sibling_binary;
use respawn_core::job::{AttemptOutcome, JobRecord, JobState};
use respawn_core::ports::ledger::ListQuery;
use tokio::sync::watch;

use crate::up::{self, Stack, UpConfig};

/// The rule the demo installs: train the example trainer on any CSV under `incoming/`.
const RULE: &str = r#"name: train-on-csv
match:
  prefix: incoming/
  glob: "*.csv"
template:
  name: train-${stem}
  command: [respawn-trainer, --steps, "3000", --checkpoint-every, "100", --step-delay-ms, "3"]
  inputs: ["${uri}"]
  labels: { demo: "true" }
"#;

/// Fractions of training after which the demo preempts the job's VM.
const PREEMPT_AT: [u64; 2] = [900, 1900];
const NOTICE: Duration = Duration::from_secs(3);

fn say(msg: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\x1b[1m▶\x1b[0m {msg}");
    } else {
        println!("▶ {msg}");
    }
}

/// Left in a folder the demo made, so that it empties only folders of its own.
const MARKER: &str = ".respawn-demo";

/// Empties `data` for a fresh run, if the demo made it (or it is empty or missing).
fn fresh_folder(data: &Path) -> Result<(), String> {
    let made_by_demo = data.join(MARKER).is_file();
    let empty = std::fs::read_dir(data).map_or(true, |mut d| d.next().is_none());
    if data.exists() && !made_by_demo && !empty {
        return Err(format!(
            "{} exists and was not made by respawn demo; refusing to empty it (pass another --data, or remove it yourself)",
            data.display()
        ));
    }
    if data.exists() {
        std::fs::remove_dir_all(data)
            .map_err(|e| format!("cannot empty {}: {e}", data.display()))?;
    }
    std::fs::create_dir_all(data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    std::fs::write(
        data.join(MARKER),
        "made by respawn demo; emptied by the next run\n",
    )
    .map_err(|e| format!("cannot write in {}: {e}", data.display()))
}

/// The broker's own log goes to a file: the terminal tells the story.
fn log_to(path: &Path) -> Result<(), String> {
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RESPAWN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .try_init();
    Ok(())
}

/// `path` as the user would type it from here: relative when it is below the
/// working directory.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_owned())
        .display()
        .to_string()
}

pub async fn run(data: PathBuf, listen: SocketAddr) -> Result<ExitCode, String> {
    let data = std::path::absolute(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    fresh_folder(&data)?;
    let log = data.join("respawn.log");
    log_to(&log)?;
    let triggers = data.join("triggers");
    std::fs::create_dir_all(&triggers).map_err(|e| e.to_string())?;
    std::fs::write(triggers.join("train-on-csv.yaml"), RULE).map_err(|e| e.to_string())?;
    let config = UpConfig {
        data: data.clone(),
        triggers: Some(triggers),
        hooks: None,
        queue_url: None,
        queue_prefix: "respawn.".into(),
        templates: None,
        listen,
        cpu_slots: 2,
        notice: NOTICE,
        chaos: None,
        heartbeat_secs: 1,
        isolation: up::Isolation::Auto,
        allow_private_notify: false,
        pools: Vec::new(),
    };
    let stack = up::open(config).await.map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(up::run(stack.clone(), stop_rx));
    say(&format!(
        "local stack up: data in {}, API on http://{listen}, broker log in {}",
        shown(&data),
        shown(&log)
    ));

    let csv =
        drop_csv(&data.join("bucket")).map_err(|e| format!("cannot write the sample CSV: {e}"))?;
    say(&format!("dropped {} into the bucket", csv.display()));
    let result = follow(&stack).await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    match result {
        Ok(job) => {
            summary(&data, &job);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e),
    }
}

fn drop_csv(bucket: &Path) -> std::io::Result<PathBuf> {
    let trainer = sibling_binary("respawn-trainer").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "respawn-trainer not built (run cargo build)",
        )
    })?;
    let out = std::process::Command::new(trainer)
        .args(["--generate-csv", "600"])
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let dir = bucket.join("incoming");
    std::fs::create_dir_all(&dir)?;
    // Write aside, then rename: the watcher sees one complete file.
    let tmp = dir.join(".blobs.csv.partial");
    std::fs::write(&tmp, &out.stdout)?;
    let dest = dir.join("blobs.csv");
    std::fs::rename(&tmp, &dest)?;
    Ok(PathBuf::from("incoming/blobs.csv"))
}

async fn follow(stack: &Stack) -> Result<JobRecord, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut last: Option<(JobState, u32, Option<u64>)> = None;
    // Attempts whose end was told: an attempt can end and the next start between
    // two looks at the job, so ends are read from the attempts, not the state.
    let mut ended = 0;
    let mut preempted = 0;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let page = stack
            .ports
            .ledger
            .list(&ListQuery {
                label: Some(("demo".into(), "true".into())),
                limit: 10,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let Some(job) = page.jobs.into_iter().next() else {
            continue;
        };
        let now = (job.state, job.attempt, job.checkpoint);
        if last.is_none() {
            say(&format!(
                "trigger rule train-on-csv made job {} ({})",
                job.id, job.spec.name
            ));
        }
        for a in &job.attempts {
            if a.number <= ended {
                continue;
            }
            let Some(outcome) = &a.outcome else { break };
            say(&format!("attempt {}: {}", a.number, outcome_text(outcome)));
            ended = a.number;
        }
        if job.state == JobState::Running && last.map(|l| (l.0, l.1)) != Some((now.0, now.1)) {
            let from = match job.current().and_then(|a| a.restored_checkpoint) {
                Some(c) => format!("resumed from checkpoint {c}"),
                None => "from scratch".to_owned(),
            };
            say(&format!("attempt {}: running, {from}", job.attempt));
        }
        last = Some(now);
        if job.state == JobState::Running
            && preempted < PREEMPT_AT.len()
            && job.checkpoint.unwrap_or(0) >= PREEMPT_AT[preempted]
        {
            preempted += 1;
            say(&format!(
                "spot preemption #{preempted}: notice to the VM of attempt {}, {}s to go (newest checkpoint: step {})",
                job.attempt,
                NOTICE.as_secs(),
                job.checkpoint.unwrap_or(0)
            ));
            stack.compute.preempt(job.id.as_str(), Some(NOTICE));
        }
        match job.state {
            JobState::Succeeded => return Ok(job),
            JobState::Failed | JobState::Cancelled => {
                return Err(format!(
                    "job {} ended {}: {}",
                    job.id,
                    job.state,
                    job.reason.unwrap_or_default()
                ));
            }
            _ => {}
        }
    }
    Err("the demo job did not finish within 3 minutes".into())
}

fn outcome_text(outcome: &AttemptOutcome) -> String {
    match outcome {
        AttemptOutcome::Succeeded => "succeeded".into(),
        AttemptOutcome::Failed { exit_code } => format!("failed with exit code {exit_code}"),
        AttemptOutcome::TimedOut => "ran past limits.max_runtime".into(),
        AttemptOutcome::Preempted => "preempted".into(),
        AttemptOutcome::Lost { reason } => format!("lost: {reason}"),
        AttemptOutcome::AllocationFailed { reason } => format!("no VM: {reason}"),
        AttemptOutcome::GangIncomplete { reason } => format!("gang incomplete: {reason}"),
        AttemptOutcome::Stopped { reason } => format!("stopped: {reason}"),
    }
}

fn summary(data: &Path, job: &JobRecord) {
    say(&format!(
        "job {} succeeded after {} attempts, {} preemptions",
        job.id,
        job.attempts.len(),
        job.preemptions()
    ));
    for a in &job.attempts {
        let outcome = a
            .outcome
            .as_ref()
            .map_or("live".into(), |o| format!("{o:?}"));
        println!(
            "    attempt {}: restored {:>5}  last checkpoint {:>5}  {}",
            a.number,
            a.restored_checkpoint.map_or("-".into(), |c| c.to_string()),
            a.last_checkpoint.map_or("-".into(), |c| c.to_string()),
            outcome
        );
    }
    let outputs = data
        .join("bucket")
        .join(respawn_core::layout::outputs(&job.id).to_string());
    let metrics = std::fs::read_to_string(outputs.join("metrics.json")).unwrap_or_default();
    say(&format!("model: {}", shown(&outputs.join("model.txt"))));
    say(&format!("metrics: {}", metrics.trim()));
    say(&format!(
        "logs of every attempt: respawn logs {} --data {} (while respawn up --data {} runs)",
        job.id,
        shown(data),
        shown(data)
    ));
}

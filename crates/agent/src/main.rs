//! `respawn-agent`: runs one attempt of a job on one VM.
//!
//! It restores the newest complete checkpoint, stages inputs, runs the workload,
//! ships its logs to the bucket, uploads each checkpoint the workload completes,
//! forwards a preemption notice as SIGTERM, uploads outputs, and reports each step
//! (started, checkpoint, notice, exit, heartbeats) on the broker's events queue.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use respawn_core::JobId;

mod run;
mod ship;
mod stage;
mod workload;

/// Where this agent's VM, job and broker are. The compute provider passes these.
#[derive(Debug, Parser)]
#[command(name = "respawn-agent", version, about)]
pub struct Args {
    /// The broker's data folder (its durable queue lives there).
    #[arg(long)]
    pub store: PathBuf,
    /// The bucket's root folder.
    #[arg(long)]
    pub bucket: PathBuf,
    /// This VM's own folder: work space and the preemption notice file.
    #[arg(long)]
    pub vm_dir: PathBuf,
    #[arg(long)]
    pub vm: String,
    #[arg(long)]
    pub job: JobId,
    #[arg(long)]
    pub attempt: u32,
    /// The broker's queue server (amqp://…), when it is not the local store.
    #[arg(long)]
    pub queue_url: Option<String>,
    /// The broker's events queue.
    #[arg(long, default_value = "respawn.events")]
    pub events_queue: String,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_secs: u64,
    /// The container runtime (docker / podman) for jobs with an image.
    #[arg(long)]
    pub container_runtime: Option<String>,
    /// Notice the provider gives before reclaiming the VM, told to the workload.
    #[arg(long, default_value_t = 30)]
    pub grace_secs: u64,
}

impl Args {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RESPAWN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("respawn-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            ExitCode::FAILURE
        }
    }
}

//! `respawn-agent`: runs one attempt of a job on one VM, or (`--pool`) attempt after
//! attempt on a pool VM.
//!
//! It restores the newest complete checkpoint, stages inputs, runs the workload,
//! ships its logs to the bucket, uploads each checkpoint the workload completes,
//! forwards a preemption notice as SIGTERM, uploads outputs, and reports each step
//! (started, checkpoint, notice, exit, heartbeats) to the broker's API with a
//! credential good for this attempt only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use respawn_core::JobId;

mod notice;
mod pool;
mod report;
mod run;
mod ship;
mod stage;
mod workload;

/// Where this agent's VM, job and broker are. The compute provider passes these;
/// the credential for reporting comes in a file (`<vm dir>/credentials`), never here.
#[derive(Debug, Clone, Parser)]
#[command(name = "respawn-agent", version, about)]
pub struct Args {
    /// The bucket: its root folder, `s3://name` (an agent built with feature `aws`) or
    /// `az://container@account` (feature `azure`).
    #[arg(long)]
    pub bucket: String,
    /// This VM's own folder: work space, credentials and the preemption notice file.
    #[arg(long)]
    pub vm_dir: PathBuf,
    #[arg(long)]
    pub vm: String,
    /// The job of the one attempt this VM runs (a single-use VM).
    #[arg(long, required_unless_present_any = ["pool", "pool_api"], requires = "attempt")]
    pub job: Option<JobId>,
    #[arg(long, requires = "job")]
    pub attempt: Option<u32>,
    /// A pool VM: runs attempt after attempt, each assigned by the provider as one
    /// JSON line on stdin (job, attempt, and that attempt's credentials), and
    /// answers each with a line on stdout once its work folder is clean.
    #[arg(long, conflicts_with_all = ["job", "attempt", "pool_api"])]
    pub pool: bool,
    /// A cloud pool VM: asks the broker's API for attempt after attempt with the
    /// VM credential in `<vm dir>/credentials`, until told to retire.
    #[arg(long, conflicts_with_all = ["job", "attempt"])]
    pub pool_api: bool,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_secs: u64,
    /// The container runtime (docker / podman) for jobs with an image.
    #[arg(long)]
    pub container_runtime: Option<String>,
    /// Notice the provider gives before reclaiming the VM, told to the workload.
    #[arg(long, default_value_t = 30)]
    pub grace_secs: u64,
    /// How the workload is isolated: the path of bubblewrap, or `none`.
    #[arg(long, default_value = "none")]
    pub sandbox: String,
    /// Folders the workload may read besides the system's (e.g. respawn's binaries).
    #[arg(long)]
    pub read_only: Vec<PathBuf>,
    /// The uid (and gid) the sandboxed workload runs as, outside its sandbox: on a
    /// cloud VM the agent is root, and bubblewrap's user namespace maps the
    /// workload to whoever starts it, so without this a firewall rule by owner
    /// (the instance metadata, root only) could not tell the workload from the
    /// agent. Its work folder is handed to this uid; needs setpriv (util-linux).
    #[arg(long)]
    pub workload_uid: Option<u32>,
    /// The instance metadata service to poll for spot interruptions (IMDSv2), e.g.
    /// `http://169.254.169.254` on EC2; without it, the local simulator's notice file.
    #[arg(long, conflicts_with = "scheduled_events")]
    pub imds: Option<String>,
    /// This node's rank in a multi-node attempt. Rank 0 reports the attempt and
    /// uploads its checkpoints and outputs; the others run their share of the
    /// workload and report only a failure of their own.
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// How many nodes a multi-node attempt runs on, when `--hosts` does not say:
    /// the agent then asks the broker for its peers' addresses.
    #[arg(long, default_value_t = 1, conflicts_with = "hosts")]
    pub nodes: u32,
    /// The addresses of a multi-node attempt's nodes in rank order, comma-separated:
    /// rank 0's is MASTER_ADDR, all of them go into the hostfile.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["pool", "pool_api"])]
    pub hosts: Vec<String>,
    /// The port rank 0's workload listens on for its peers (MASTER_PORT).
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Azure's Scheduled Events endpoint to poll for evictions, e.g.
    /// `http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01`;
    /// events naming `--vm` count.
    #[arg(long)]
    pub scheduled_events: Option<String>,
}

impl Args {
    /// Where the preemption notice comes from on this VM.
    pub fn notice_source(&self) -> notice::Source {
        match (&self.imds, &self.scheduled_events) {
            (Some(base), _) => notice::Source::Imds(notice::Imds::new(base, notice::IMDS_EVERY)),
            (None, Some(url)) => notice::Source::Azure(notice::ScheduledEvents::new(
                url,
                &self.vm,
                notice::SCHEDULED_EVENTS_EVERY,
            )),
            (None, None) => notice::Source::File(self.vm_dir.join("notice.json")),
        }
    }

    /// How many nodes the attempt runs on.
    pub fn nodes(&self) -> u32 {
        if self.hosts.is_empty() {
            self.nodes.max(1)
        } else {
            self.hosts.len() as u32
        }
    }

    /// What clap cannot check alone.
    pub fn check(&self) -> Result<(), String> {
        if self.rank >= self.nodes() {
            return Err(format!(
                "--rank {} is not one of the {} nodes (--hosts or --nodes)",
                self.rank,
                self.nodes()
            ));
        }
        Ok(())
    }

    /// Whether this agent is rank 0, the one that speaks for the attempt.
    pub fn leads(&self) -> bool {
        self.rank == 0
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }
}

fn main() -> ExitCode {
    // The launcher of an unsandboxed workload: it must not outlive its agent.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == workload::LAUNCH)
    {
        return workload::launch();
    }
    let args = Args::parse();
    if let Err(why) = args.check() {
        eprintln!("respawn-agent: {why}");
        return ExitCode::from(2);
    }
    // `RESPAWN_LOG_FORMAT=json` as `respawn --log-format json`; traces go where
    // the broker's do (OTEL_*), each attempt continuing its job's trace.
    let format = match std::env::var("RESPAWN_LOG_FORMAT").as_deref() {
        Ok("json") => respawn_telemetry::LogFormat::Json,
        _ => respawn_telemetry::LogFormat::Human,
    };
    let telemetry = respawn_telemetry::init_traces("respawn-agent", format);
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
    let outcome = match (&args.job, args.attempt) {
        (Some(job), Some(attempt)) => {
            let task = run::Task {
                job: job.clone(),
                attempt,
            };
            rt.block_on(run::run(&args, &task))
        }
        _ if args.pool_api => rt.block_on(pool::serve_api(&args)),
        _ => rt.block_on(pool::serve(&args)),
    };
    let code = match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            ExitCode::FAILURE
        }
    };
    // The attempt's spans, before the VM goes.
    telemetry.shutdown();
    code
}

//! The attempt, from restore to exit report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::local::LocalFileSystem;
use object_store::{ObjectStore, ObjectStoreExt};
use respawn_adapters::local::{LocalSecrets, LocalStore};
use respawn_core::lifecycle::Event;
use respawn_core::messages::Message;
use respawn_core::ports::Secrets;
use respawn_core::ports::queue::{Outgoing, Queue};
use respawn_core::spec::JobSpec;
use respawn_core::time::{Clock, SystemClock, Timestamp};
use respawn_core::{checkpoint, layout};
use serde::Deserialize;
use tracing::{info, warn};

use crate::Args;
use crate::ship::{CheckpointShipper, LogShipper};
use crate::stage;
use crate::workload::{Workload, WorkloadDirs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {what}: {message}")]
    Open { what: &'static str, message: String },
    #[error("cannot report to the broker: {0}")]
    Report(String),
    #[error("cannot read the job spec: {0}")]
    Spec(String),
    #[error("{0}")]
    Io(String),
}

/// Sends this attempt's events to the broker.
#[derive(Debug, Clone)]
pub struct Reporter {
    queue: Arc<dyn Queue>,
    name: String,
    job: respawn_core::JobId,
    attempt: u32,
}

impl Reporter {
    pub async fn send(&self, event: Event) -> Result<(), Error> {
        let msg = Message::Event {
            job: self.job.clone(),
            at: SystemClock.now(),
            event,
        };
        // Retry a while: a report that never arrives costs the attempt (reconcile
        // would declare the VM lost), so it is worth waiting for a busy store.
        let mut delay = Duration::from_millis(50);
        for _ in 0..10 {
            match self
                .queue
                .send(&self.name, Outgoing::new(msg.to_bytes()).priority(9))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    warn!(job_id = %self.job, attempt = self.attempt, error = %e, "report failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        Err(Error::Report(format!("gave up reporting {:?}", msg)))
    }
}

/// The provider's preemption notice, as the local spot simulator writes it.
#[derive(Debug, Deserialize)]
struct Notice {
    deadline_ms: u64,
}

fn read_notice(vm_dir: &Path) -> Option<Notice> {
    let bytes = std::fs::read(vm_dir.join("notice.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub async fn run(args: Args) -> Result<(), Error> {
    let store = LocalStore::open(&args.store).map_err(|e| Error::Open {
        what: "the broker's store",
        message: e.to_string(),
    })?;
    let bucket: Arc<dyn ObjectStore> = Arc::new(
        LocalFileSystem::new_with_prefix(&args.bucket).map_err(|e| Error::Open {
            what: "the bucket",
            message: e.to_string(),
        })?,
    );
    let reporter = Reporter {
        queue: events_queue(&args, &store).await?,
        name: args.events_queue.clone(),
        job: args.job.clone(),
        attempt: args.attempt,
    };
    let (job, attempt) = (args.job.clone(), args.attempt);
    info!(job_id = %job, attempt, vm = %args.vm, "agent starting");

    let spec = read_spec(bucket.as_ref(), &job).await?;
    let dirs = WorkloadDirs::create(&args.vm_dir).map_err(|e| Error::Io(e.to_string()))?;
    let restored = checkpoint::restore_newest(bucket.as_ref(), &job, &dirs.checkpoints)
        .await
        .map_err(|e| Error::Io(format!("restoring checkpoint: {e}")))?
        .map(|m| m.seq);
    info!(job_id = %job, attempt, restored = ?restored, "checkpoint restored");

    let stdout = LogShipper::new(bucket.clone(), &job, attempt, layout::Stream::Stdout);
    let stderr = LogShipper::new(bucket.clone(), &job, attempt, layout::Stream::Stderr);
    if let Err(e) = stage::inputs(bucket.as_ref(), &spec, &dirs.inputs).await {
        // A job whose inputs cannot be staged cannot run: fail the attempt, in the
        // user's budget (it is the spec's inputs that are wrong), with the reason
        // in the attempt's stderr.
        let why = format!("cannot stage inputs: {e}");
        return fail_attempt(&reporter, &stderr, &why, 126).await;
    }

    let secrets = match LocalSecrets::new(args.store.join("secrets"))
        .get(&job)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot read the job's secrets: {e}");
            return fail_attempt(&reporter, &stderr, &why, 126).await;
        }
    };
    let mut workload = match Workload::spawn(&spec, &secrets, &args, &dirs) {
        Ok(w) => w,
        Err(e) => {
            let why = format!("cannot start the workload: {e}");
            return fail_attempt(&reporter, &stderr, &why, 127).await;
        }
    };
    reporter
        .send(Event::WorkloadStarted {
            attempt,
            restored_checkpoint: restored,
        })
        .await?;
    info!(job_id = %job, attempt, pid = workload.pid(), "workload started");
    let out_task = stdout.pump(workload.take_stdout());
    let err_task = stderr.clone().pump(workload.take_stderr());

    let keep = spec.checkpoint.keep_last as usize;
    let mut ckpts = CheckpointShipper::new(
        bucket.clone(),
        job.clone(),
        attempt,
        dirs.checkpoints.clone(),
        restored,
        keep,
    );
    let code = supervise(&args, &reporter, &mut workload, &mut ckpts).await?;

    // The last checkpoint (the one written on SIGTERM) must be in the bucket before
    // the exit is reported: the next attempt is dispatched on that report.
    ship_checkpoints(&reporter, &mut ckpts).await;
    let _ = out_task.await;
    let _ = err_task.await;
    if let Err(e) = stage::outputs(bucket.as_ref(), &spec, &job, &dirs.outputs).await {
        stderr
            .write_line(&format!("respawn: cannot upload outputs: {e}"))
            .await;
    }
    stderr.close().await;
    info!(job_id = %job, attempt, exit_code = code, "workload exited");
    reporter
        .send(Event::WorkloadExited {
            attempt,
            exit_code: code,
        })
        .await
}

/// Ends an attempt that could not run its workload: the reason goes to the
/// attempt's stderr, the exit code to the broker (a user failure: it is the spec
/// that asks for what cannot be done).
async fn fail_attempt(
    reporter: &Reporter,
    stderr: &LogShipper,
    why: &str,
    code: i32,
) -> Result<(), Error> {
    stderr.write_line(&format!("respawn: {why}")).await;
    stderr.close().await;
    let attempt = reporter.attempt;
    reporter
        .send(Event::WorkloadExited {
            attempt,
            exit_code: code,
        })
        .await
}

/// Where reports go: the broker's RabbitMQ when it runs on one, else its local store.
async fn events_queue(args: &Args, store: &LocalStore) -> Result<Arc<dyn Queue>, Error> {
    let Some(url) = &args.queue_url else {
        return Ok(Arc::new(
            store.queue(respawn_core::ports::queue::DEFAULT_MAX_DELIVERIES),
        ));
    };
    #[cfg(feature = "amqp")]
    {
        use respawn_adapters::amqp::{AmqpOptions, AmqpQueue};
        let options = AmqpOptions {
            connection_name: format!("respawn-agent-{}", args.vm),
            ..AmqpOptions::default()
        };
        let q = AmqpQueue::connect(url, options)
            .await
            .map_err(|e| Error::Open {
                what: "the broker's RabbitMQ",
                message: e.to_string(),
            })?;
        Ok(Arc::new(q))
    }
    #[cfg(not(feature = "amqp"))]
    {
        Err(Error::Open {
            what: "the broker's queue",
            message: format!("{url}: RabbitMQ is not supported in this build (feature amqp)"),
        })
    }
}

async fn read_spec(bucket: &dyn ObjectStore, job: &respawn_core::JobId) -> Result<JobSpec, Error> {
    let bytes = bucket
        .get(&layout::spec(job))
        .await
        .map_err(|e| Error::Spec(e.to_string()))?
        .bytes()
        .await
        .map_err(|e| Error::Spec(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Spec(e.to_string()))
}

async fn ship_checkpoints(reporter: &Reporter, ckpts: &mut CheckpointShipper) {
    match ckpts.ship_new().await {
        Ok(seqs) => {
            for seq in seqs {
                let _ = reporter
                    .send(Event::CheckpointCommitted {
                        attempt: reporter.attempt,
                        seq,
                    })
                    .await;
            }
        }
        Err(e) => {
            warn!(job_id = %reporter.job, attempt = reporter.attempt, error = %e, "checkpoint upload failed")
        }
    }
}

/// Runs until the workload exits; returns its exit code (128 + signal if killed).
async fn supervise(
    args: &Args,
    reporter: &Reporter,
    workload: &mut Workload,
    ckpts: &mut CheckpointShipper,
) -> Result<i32, Error> {
    let mut heartbeat = tokio::time::interval(args.heartbeat());
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut noticed = false;
    loop {
        tokio::select! {
            code = workload.wait() => return Ok(code),
            _ = heartbeat.tick() => {
                let _ = reporter.send(Event::Heartbeat { attempt: args.attempt }).await;
            }
            _ = poll.tick() => {
                if !noticed
                    && let Some(notice) = read_notice(&args.vm_dir) {
                        noticed = true;
                        on_notice(args, reporter, workload, notice).await;
                    }
                ship_checkpoints(reporter, ckpts).await;
            }
        }
    }
}

async fn on_notice(args: &Args, reporter: &Reporter, workload: &mut Workload, notice: Notice) {
    let deadline = Timestamp(notice.deadline_ms);
    let left = deadline.since(SystemClock.now());
    info!(job_id = %args.job, attempt = args.attempt, seconds_left = left.as_secs_f64(), "preemption notice; forwarding SIGTERM");
    workload.terminate();
    let _ = reporter
        .send(Event::PreemptionNotice {
            attempt: args.attempt,
            deadline,
        })
        .await;
}

/// The agent's folders inside the VM dir.
pub fn work_root(vm_dir: &Path) -> PathBuf {
    vm_dir.join("work")
}

//! The attempt, from restore to exit report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use respawn_adapters::local::AgentCredentials;
use respawn_core::lifecycle::Event;
use respawn_core::spec::JobSpec;
use respawn_core::time::{Clock, SystemClock, Timestamp};
use respawn_core::{checkpoint, layout};
use tracing::{Instrument, info, warn};

use crate::Args;
use crate::report::{self, Api, Reporter};
use crate::ship::{CheckpointShipper, LogShipper};
use crate::stage;
use crate::workload::{Workload, WorkloadDirs};

/// How long the last reports may wait for a broker that is down (restarting).
const LAST_WORD: Duration = Duration::from_secs(600);
/// How long to keep asking a broker that is down for the job's spec and secrets.
const PATIENCE: Duration = Duration::from_secs(120);
/// How often a node of a multi-node attempt asks the broker whether any node of its
/// gang was given notice (and, before its workload starts, for its peers).
const GANG_EVERY: Duration = Duration::from_secs(1);
/// Longest a node waits for its peers' addresses; the broker's gang timeout ends
/// an attempt whose nodes do not all come up well before this.
const PEERS_WAIT: Duration = Duration::from_secs(30 * 60);
/// How long a node whose workload failed without a notice of its own looks for a
/// peer's before it reports the failure.
const LATE_NOTICE: Duration = Duration::from_secs(3);
/// Longest a node after rank 0 stays up once its workload is done, waiting for the
/// attempt to end (see [`Ended::last_word`]).
const LINGER: Duration = Duration::from_secs(24 * 3600);
/// As long as a workload may run: the watch for a peer's notice ends with it.
const WHILE_IT_RUNS: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {what}: {message}")]
    Open { what: &'static str, message: String },
}

/// Reads the agent's credentials and removes the file: a workload that escaped
/// its sandbox finds nothing there later.
pub fn credentials(vm_dir: &Path) -> Result<AgentCredentials, Error> {
    let path = respawn_adapters::local::credentials_path(vm_dir);
    let open = |message: String| Error::Open {
        what: "the agent's credentials",
        message,
    };
    let bytes = std::fs::read(&path).map_err(|e| open(format!("{}: {e}", path.display())))?;
    let creds = serde_json::from_slice(&bytes).map_err(|e| open(e.to_string()))?;
    let _ = std::fs::remove_file(&path);
    Ok(creds)
}

/// What the attempt needs before its workload can start.
struct Ready {
    spec: JobSpec,
    dirs: WorkloadDirs,
    restored: Option<u64>,
    secrets: BTreeMap<String, String>,
}

/// The bucket: a folder (the local provider's), `s3://name` on EC2 (feature
/// `aws`; credentials from the instance profile, or the environment), or
/// `az://container@account` on Azure (feature `azure`; the VM's managed identity,
/// or the environment's `AZURE_*`).
pub fn open_bucket(bucket: &str) -> Result<Arc<dyn ObjectStore>, String> {
    if let Some(_rest) = bucket.strip_prefix("az://") {
        #[cfg(feature = "azure")]
        {
            let rest = _rest.trim_end_matches('/');
            let (container, account) = match rest.split_once('@') {
                Some((c, a)) => (c, Some(a)),
                None => (rest, None),
            };
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(container);
            if let Some(account) = account {
                b = b.with_account(account);
            }
            return Ok(Arc::new(b.build().map_err(|e| e.to_string())?));
        }
        #[cfg(not(feature = "azure"))]
        return Err(format!(
            "{bucket}: Azure Blob storage is not supported in this build of the agent (feature azure)"
        ));
    }
    if let Some(_name) = bucket.strip_prefix("s3://") {
        #[cfg(feature = "aws")]
        {
            let name = _name;
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(name.trim_end_matches('/'));
            if let Ok(endpoint) =
                std::env::var("AWS_ENDPOINT_URL_S3").or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            {
                b = b
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_endpoint(endpoint);
            }
            return Ok(Arc::new(b.build().map_err(|e| e.to_string())?));
        }
        #[cfg(not(feature = "aws"))]
        return Err(format!(
            "{bucket}: S3 is not supported in this build of the agent (feature aws)"
        ));
    }
    // Checkpoints and logs are fsync'd like the broker's own writes: a checkpoint
    // reported complete must survive a power loss.
    Ok(Arc::new(
        LocalFileSystem::new_with_prefix(bucket)
            .map_err(|e| e.to_string())?
            .with_fsync(true),
    ))
}

/// The attempt an agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub job: respawn_core::JobId,
    pub attempt: u32,
}

/// Runs the single attempt of a single-use VM, with the credentials the provider
/// left in the VM folder.
pub async fn run(args: &Args, task: &Task) -> Result<(), Error> {
    let creds = credentials(&args.vm_dir)?;
    let bucket = open_bucket(&args.bucket).map_err(|message| Error::Open {
        what: "the bucket",
        message,
    })?;
    attempt(args, task, creds, bucket).await?.last_word().await;
    Ok(())
}

/// Runs one attempt: restore, stage, run, checkpoint, outputs, reports. The work
/// folder is gone when it returns; the reports may still be on their way (see
/// [`last_word`]).
pub async fn attempt(
    args: &Args,
    task: &Task,
    creds: AgentCredentials,
    bucket: Arc<dyn ObjectStore>,
) -> Result<Ended, Error> {
    let api = Api::new(&creds.api, creds.token).map_err(|e| Error::Open {
        what: "the broker's API",
        message: e.to_string(),
    })?;
    // The spec first: it names the job's trace, which every span of this attempt
    // continues.
    let spec = patiently(|| api.spec()).await;
    let span = tracing::info_span!(
        "attempt",
        job_id = %task.job,
        attempt = task.attempt,
        rank = args.rank,
        vm = %args.vm,
    );
    if let Ok((_, Some(trace))) = &spec {
        let carried = [(respawn_telemetry::TRACEPARENT.to_owned(), trace.clone())].into();
        respawn_telemetry::adopt(&span, &carried);
    }
    let ended = run_attempt(args, task, bucket, api, spec.map(|(s, _)| s))
        .instrument(span)
        .await;
    // The broker may end this VM as soon as the last report lands.
    respawn_telemetry::flushed().await;
    ended
}

async fn run_attempt(
    args: &Args,
    task: &Task,
    bucket: Arc<dyn ObjectStore>,
    api: Api,
    spec: Result<respawn_core::spec::JobSpec, report::Error>,
) -> Result<Ended, Error> {
    let (job, attempt) = (task.job.clone(), task.attempt);
    // The sandbox's masks are looked up while the attempt is prepared.
    let sandboxed = !respawn_adapters::local::sandbox::Sandbox::from_arg(&args.sandbox).is_none();
    let masked = sandboxed
        .then(|| tokio::task::spawn_blocking(respawn_adapters::local::sandbox::masked_files));
    let reporter = Reporter::spawn(api.clone(), job.clone(), attempt);
    let (rank, leads) = (args.rank, args.leads());
    info!(job_id = %job, attempt, vm = %args.vm, rank, nodes = args.nodes(), "agent starting");

    let stdout = LogShipper::new(bucket.clone(), &job, attempt, rank, layout::Stream::Stdout);
    let stderr = LogShipper::new(bucket.clone(), &job, attempt, rank, layout::Stream::Stderr);
    let ready = match prepare(args, task, bucket.as_ref(), &api, spec).await {
        Ok(r) => r,
        Err(why) => {
            // Not the workload's doing: the attempt is lost, with the reason, and
            // the broker's budget for lost VMs decides whether to try again.
            warn!(job_id = %job, attempt, %why, "cannot start the attempt");
            stderr.write_line(&format!("respawn: {why}")).await;
            stderr.close().await;
            reporter.send(Event::StartFailed {
                attempt,
                reason: why,
            });
            return Ok(Ended::quietly(reporter));
        }
    };
    let Ready {
        spec,
        dirs,
        restored,
        secrets,
    } = ready;
    info!(job_id = %job, attempt, restored = ?restored, "checkpoint restored");
    // A node told only its rank learns its peers from the broker, once the provider
    // knows every node's address.
    let with_peers;
    let args = if args.nodes() > 1 && args.hosts.is_empty() {
        match peers(&api, args.nodes()).await {
            Ok(hosts) => {
                info!(job_id = %job, attempt, rank, hosts = ?hosts, "the gang's nodes are up");
                with_peers = Args {
                    hosts,
                    ..args.clone()
                };
                &with_peers
            }
            Err(why) => {
                warn!(job_id = %job, attempt, rank, %why, "no peers; not starting the workload");
                stderr.close().await;
                finish(&reporter, &dirs);
                return Ok(Ended::quietly(reporter));
            }
        }
    } else {
        args
    };

    if let Err(e) = stage::inputs(bucket.as_ref(), &args.bucket, &spec, &dirs.inputs).await {
        // A job whose inputs cannot be staged cannot run: fail the attempt, in the
        // user's budget (it is the spec's inputs that are wrong), with the reason
        // in the attempt's stderr.
        let why = format!("cannot stage inputs: {e}");
        fail_attempt(&reporter, &stderr, &dirs, &why, 126).await;
        return Ok(Ended::quietly(reporter));
    }
    // The workload's life, from its start to its exit; it gets this span's
    // context as TRACEPARENT.
    let run_span = tracing::info_span!(
        "run",
        pid = tracing::field::Empty,
        exit_code = tracing::field::Empty
    );
    let masked = masks(masked).await;
    let spawned = run_span.in_scope(|| Workload::spawn(&spec, &secrets, args, task, &dirs, masked));
    let mut workload = match spawned {
        Ok(w) => w,
        Err(e) => {
            let why = format!("cannot start the workload: {e}");
            fail_attempt(&reporter, &stderr, &dirs, &why, 127).await;
            return Ok(Ended::quietly(reporter));
        }
    };
    drop(secrets);
    if leads {
        reporter.send(Event::WorkloadStarted {
            attempt,
            restored_checkpoint: restored,
        });
    } else {
        reporter.send(Event::NodeReady { attempt, rank });
    }
    info!(job_id = %job, attempt, rank, pid = workload.pid(), "workload started");
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
    run_span.record("pid", workload.pid());
    let (code, mut notice) = supervise(args, &api, &reporter, &mut workload, &mut ckpts)
        .instrument(run_span.clone())
        .await;
    run_span.record("exit_code", code);
    drop(run_span);
    if notice.is_none() && code != 0 && args.nodes() > 1 && (leads || code < 128) {
        // A peer's notice may have stopped this node's workload (frameworks stop
        // every rank together, or fail when a peer goes) before the broker's word of
        // it arrived here: the exit is then the gang's preemption, not a failure.
        if let Some(deadline) = late_gang_notice(&api).await {
            info!(job_id = %job, attempt, rank, exit_code = code, "the workload stopped on a peer's notice");
            reporter.send(Event::PreemptionNotice { attempt, deadline });
            notice = Some(crate::notice::Notice {
                deadline,
                ack: None,
            });
        }
    }
    // Nothing the workload started outlives it: on a pool VM the next job's
    // workload comes next.
    workload.kill_group();
    let _ = std::fs::remove_file(args.vm_dir.join("workload.pgid"));
    // Killed by a signal: preempted (ship what it saved) or stopped by the broker
    // (cancelled, timed out, lost): then nothing of it goes to the bucket, where a
    // newer attempt's outputs may already be. Only rank 0 ships anything.
    let ended_by_broker =
        leads && code >= 128 && matches!(api.spec().await, Err(report::Error::Refused(_)));
    if ended_by_broker {
        info!(job_id = %job, attempt, "attempt no longer live; not uploading its checkpoints or outputs");
    } else if leads {
        // The last checkpoint (the one written on SIGTERM) must be in the bucket
        // before the exit is reported: the next attempt is dispatched on that report.
        ship_checkpoints(&reporter, &mut ckpts).await;
    }
    let _ = out_task.await;
    let _ = err_task.await;
    if leads
        && !ended_by_broker
        && let Err(e) =
            stage::outputs(bucket.as_ref(), &args.bucket, &spec, &job, &dirs.outputs).await
    {
        stderr
            .write_line(&format!("respawn: cannot upload outputs: {e}"))
            .await;
    }
    stderr.close().await;
    info!(job_id = %job, attempt, rank, exit_code = code, "workload exited");
    // Rank 0 speaks for the attempt. Another rank reports only a failure of its own
    // (one budget for the attempt, not one per node); a signal means the gang is
    // going, which rank 0 reports.
    if leads || (code != 0 && code < 128 && notice.is_none()) {
        reporter.send(Event::WorkloadExited {
            attempt,
            exit_code: code,
        });
    }
    finish(&reporter, &dirs);
    Ok(Ended {
        reporter,
        noticed: notice.is_some(),
        ack: notice.and_then(|n| n.ack),
        linger: (!leads).then_some(api),
    })
}

/// An attempt whose work is over; its last reports (and the provider's notice, to
/// acknowledge) may still be on their way.
pub struct Ended {
    reporter: Reporter,
    /// The provider gave notice that the VM goes.
    noticed: bool,
    ack: Option<crate::notice::Ack>,
    /// A node after rank 0: it stays up until the attempt ends (asking the broker
    /// with this).
    linger: Option<Api>,
}

impl Ended {
    fn quietly(reporter: Reporter) -> Ended {
        Ended {
            reporter,
            noticed: false,
            ack: None,
            linger: None,
        }
    }

    /// Whether the provider gave notice that the VM goes (a pool VM then takes no
    /// more work).
    pub fn noticed(&self) -> bool {
        self.noticed
    }

    /// Delivers the last reports, then tells the provider the VM may go: by then
    /// checkpoints, outputs, logs and the exit are all with the broker.
    ///
    /// A node after rank 0 then waits for the attempt to end: its VM shutting down
    /// on its own would read as the gang's loss (a cloud reports each node's
    /// instance), while rank 0 may still be uploading. The broker ends the gang.
    pub async fn last_word(self) {
        last_word(&self.reporter).await;
        if let Some(ack) = self.ack {
            ack.send().await;
        }
        if let Some(api) = self.linger {
            let (job, attempt) = (&self.reporter.job, self.reporter.attempt);
            info!(job_id = %job, attempt, "this node's part is done; waiting for the attempt to end");
            let _: Result<Option<()>, String> =
                ask_gang(&api, false, GANG_EVERY * 2, LINGER, |_| None).await;
        }
    }
}

/// Reads the spec, makes the work folder, restores the newest checkpoint and
/// fetches the secrets; the reason when one of them fails.
async fn prepare(
    args: &Args,
    task: &Task,
    bucket: &dyn ObjectStore,
    api: &Api,
    spec: Result<respawn_core::spec::JobSpec, report::Error>,
) -> Result<Ready, String> {
    let spec = spec.map_err(|e| format!("cannot read the job spec: {e}"))?;
    let dirs = WorkloadDirs::create(&args.vm_dir)
        .map_err(|e| format!("cannot create the work folder: {e}"))?;
    let restored = checkpoint::restore_newest(bucket, &task.job, &dirs.checkpoints)
        .instrument(tracing::info_span!("restore", otel.kind = "client"))
        .await
        .map_err(|e| format!("cannot restore the newest checkpoint: {e}"))?
        .map(|m| m.seq);
    // Only the names are in the spec; the values come from the broker, to this
    // attempt only, while it is live.
    let secrets = if spec.secrets.is_empty() {
        BTreeMap::new()
    } else {
        patiently(|| api.secrets())
            .await
            .map_err(|e| format!("cannot get the job's secrets: {e}"))?
    };
    Ok(Ready {
        spec,
        dirs,
        restored,
        secrets,
    })
}

/// Asks the broker until it answers (it may be restarting), for up to
/// [`PATIENCE`].
async fn patiently<T, F: Future<Output = Result<T, report::Error>>>(
    mut ask: impl FnMut() -> F,
) -> Result<T, report::Error> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut backoff = Duration::from_millis(100);
    loop {
        match ask().await {
            Err(report::Error::Retry(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// The masks looked up in the background; `None` (look them up now) if that failed.
async fn masks(lookup: Option<tokio::task::JoinHandle<Vec<PathBuf>>>) -> Option<Vec<PathBuf>> {
    lookup?.await.ok()
}

/// The attempt is over: its work folder goes (outputs and checkpoints are in the
/// bucket by now).
fn finish(reporter: &Reporter, dirs: &WorkloadDirs) {
    if let Err(e) = std::fs::remove_dir_all(&dirs.root) {
        warn!(job_id = %reporter.job, attempt = reporter.attempt, error = %e, "cannot remove the work folder");
    }
}

/// Waits until the attempt's reports are delivered (through a broker restart, for
/// up to [`LAST_WORD`]).
async fn last_word(reporter: &Reporter) {
    if !reporter.flush(LAST_WORD).await {
        warn!(job_id = %reporter.job, attempt = reporter.attempt, "the broker did not take the last reports in time");
    }
}

/// Ends an attempt that could not run its workload: the reason goes to the
/// attempt's stderr, the exit code to the broker (a user failure: it is the spec
/// that asks for what cannot be done).
async fn fail_attempt(
    reporter: &Reporter,
    stderr: &LogShipper,
    dirs: &WorkloadDirs,
    why: &str,
    code: i32,
) {
    warn!(job_id = %reporter.job, attempt = reporter.attempt, %why, exit_code = code, "the attempt failed before its workload ran");
    stderr.write_line(&format!("respawn: {why}")).await;
    stderr.close().await;
    reporter.send(Event::WorkloadExited {
        attempt: reporter.attempt,
        exit_code: code,
    });
    finish(reporter, dirs);
}

async fn ship_checkpoints(reporter: &Reporter, ckpts: &mut CheckpointShipper) {
    match ckpts.ship_new().await {
        Ok(shipped) => {
            for (seq, upload) in shipped {
                reporter.send(Event::CheckpointCommitted {
                    attempt: reporter.attempt,
                    seq,
                    upload: Some(upload),
                });
            }
        }
        Err(e) => {
            warn!(job_id = %reporter.job, attempt = reporter.attempt, error = %e, "checkpoint upload failed")
        }
    }
}

/// Asks the broker about this multi-node attempt's gang (with `peers`, its nodes'
/// addresses too) every `every` until `pick` finds what is waited for, the attempt
/// ends (`Err`, the broker's refusal), or `within` passes (`Ok(None)`). A broker
/// that does not answer is asked again.
async fn ask_gang<T>(
    api: &Api,
    peers: bool,
    every: Duration,
    within: Duration,
    mut pick: impl FnMut(report::Gang) -> Option<T>,
) -> Result<Option<T>, String> {
    let until = tokio::time::Instant::now() + within;
    loop {
        match api.gang(peers).await {
            Ok(gang) => {
                if let Some(found) = pick(gang) {
                    return Ok(Some(found));
                }
            }
            Err(report::Error::Refused(why)) => return Err(why),
            Err(report::Error::Retry(_)) => {}
        }
        if tokio::time::Instant::now() + every > until {
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}

/// The addresses of the attempt's `nodes` nodes in rank order, from the broker,
/// once it has them all; why not if the attempt ended first.
async fn peers(api: &Api, nodes: u32) -> Result<Vec<String>, String> {
    let hosts = ask_gang(api, true, GANG_EVERY, PEERS_WAIT, |g| g.hosts)
        .await?
        .ok_or_else(|| format!("the other nodes were not up after {PEERS_WAIT:?}"))?;
    if hosts.len() != nodes as usize {
        return Err(format!(
            "the broker lists {} nodes; this agent was started for {nodes}",
            hosts.len()
        ));
    }
    Ok(hosts)
}

/// A notice given to another node of the gang, asked for a few times over
/// [`LATE_NOTICE`]: its report may still be on its way to the broker.
async fn late_gang_notice(api: &Api) -> Option<Timestamp> {
    ask_gang(api, false, GANG_EVERY / 2, LATE_NOTICE, |g| {
        g.notice_deadline_ms.map(Timestamp)
    })
    .await
    .ok()
    .flatten()
}

/// Runs until the workload exits; returns its exit code (128 + signal if killed)
/// and the preemption notice, if one came.
async fn supervise(
    args: &Args,
    api: &Api,
    reporter: &Reporter,
    workload: &mut Workload,
    ckpts: &mut CheckpointShipper,
) -> (i32, Option<crate::notice::Notice>) {
    let mut heartbeat = tokio::time::interval(args.heartbeat());
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut notices = args.notice_source();
    let mut noticed = None;
    // On a cloud each VM hears only of its own reclaim: the other nodes of a gang
    // learn of it from the broker, which they ask every second.
    let gang_notice = async {
        if args.nodes() > 1 {
            ask_gang(api, false, GANG_EVERY, WHILE_IT_RUNS, |g| {
                g.notice_deadline_ms.map(Timestamp)
            })
            .await
        } else {
            std::future::pending().await
        }
    };
    tokio::pin!(gang_notice);
    let mut asking = true;
    loop {
        tokio::select! {
            code = workload.wait() => return (code, noticed),
            found = &mut gang_notice, if asking => {
                asking = false;
                if let (Ok(Some(deadline)), None) = (found, &noticed) {
                    let notice = crate::notice::Notice { deadline, ack: None };
                    on_notice(args, reporter, workload, &notice).await;
                    noticed = Some(notice);
                }
            }
            _ = heartbeat.tick() => if args.leads() { reporter.heartbeat() },
            _ = poll.tick() => {
                if noticed.is_none()
                    && let Some(notice) = notices.poll().await {
                        on_notice(args, reporter, workload, &notice).await;
                        noticed = Some(notice);
                    }
                if args.leads() {
                    ship_checkpoints(reporter, ckpts).await;
                }
            }
        }
    }
}

async fn on_notice(
    args: &Args,
    reporter: &Reporter,
    workload: &mut Workload,
    notice: &crate::notice::Notice,
) {
    let deadline = notice.deadline;
    let left = deadline.since(SystemClock.now());
    info!(job_id = %reporter.job, attempt = reporter.attempt, rank = args.rank, seconds_left = left.as_secs_f64(), "preemption notice; forwarding SIGTERM");
    // Every node reports its notice: on a cloud the reclaimed VM may be any rank's,
    // and the broker tells the others (see `supervise`). Queued before the
    // signal, so that the report leaves ahead of whatever the signal sets off.
    reporter.send(Event::PreemptionNotice {
        attempt: reporter.attempt,
        deadline,
    });
    workload.terminate();
}

/// The agent's folders inside the VM dir.
pub fn work_root(vm_dir: &Path) -> PathBuf {
    vm_dir.join("work")
}

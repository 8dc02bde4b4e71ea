//! A pool VM's agent: attempt after attempt, each with a clean work folder.
//!
//! - On the local provider ([`serve`]) each attempt is assigned as one JSON line on
//!   stdin and answered by one line on stdout once its work folder is gone. stdin
//!   is a pipe only the provider holds, so an attempt's credential is never on
//!   disk; end of input retires the VM (after the attempt it is running).
//! - On a cloud ([`serve_api`]) the agent asks the broker's API for its orders with
//!   the VM's credential, and gets each attempt's own credential in the answer.
//!   While an attempt runs it keeps asking: orders that no longer name the attempt
//!   (the broker released it: cancelled, timed out) kill its workload.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use respawn_core::attempt_auth::AgentCredentials;
use respawn_core::pool::{Assignment, Finished, PoolOrders};
use respawn_core::ports::compute::AllocationKey;

use crate::Args;
use crate::report::{self, Api};
use crate::run::{self, Error, Task};

/// How often an idle cloud pool VM asks for work, and a busy one whether its
/// attempt is still its own.
const ASK_EVERY: Duration = Duration::from_secs(2);

fn open_bucket(args: &Args) -> Result<Arc<dyn ObjectStore>, Error> {
    run::open_bucket(&args.bucket).map_err(|message| Error::Open {
        what: "the bucket",
        message,
    })
}

/// Not dumpable: a process of the same user (an unsandboxed workload) cannot open
/// this agent's /proc files: its pipes and memory hold later attempts' credentials.
fn undumpable(args: &Args) {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        warn!(vm = %args.vm, error = %e, "cannot make the agent undumpable");
    }
}

/// Runs one attempt to its end and cleans the work folder: the next job must find
/// nothing of this one (or the VM goes: an error ends the agent). Whether the
/// provider gave notice that the VM goes.
async fn run_one(
    args: &Args,
    task: &Task,
    creds: AgentCredentials,
    bucket: Arc<dyn ObjectStore>,
    last_words: &mut JoinSet<()>,
) -> Result<bool, Error> {
    let ended = match run::attempt(args, task, creds, bucket).await {
        Ok(e) => e,
        Err(e) => {
            drain(last_words).await;
            return Err(e);
        }
    };
    let noticed = ended.noticed();
    // The VM takes the next attempt while this one's last reports go out.
    last_words.spawn(ended.last_word());
    while last_words.try_join_next().is_some() {}
    let root = run::work_root(&args.vm_dir);
    if let Err(e) = std::fs::remove_dir_all(&root)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        drain(last_words).await;
        return Err(Error::Open {
            what: "a clean work folder",
            message: format!("{}: {e}", root.display()),
        });
    }
    Ok(noticed)
}

pub async fn serve(args: &Args) -> Result<(), Error> {
    let bucket = open_bucket(args)?;
    undumpable(args);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    info!(vm = %args.vm, "pool vm ready");
    let mut ran = 0u64;
    let mut last_words = JoinSet::new();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                error!(vm = %args.vm, error = %e, "cannot read assignments");
                break;
            }
        };
        let a: Assignment = match serde_json::from_str(&line) {
            Ok(a) => a,
            Err(e) => {
                // Only the provider writes here; a line it did not mean is skipped.
                warn!(vm = %args.vm, error = %e, "unreadable assignment");
                continue;
            }
        };
        let task = Task {
            job: a.job,
            attempt: a.attempt,
        };
        run_one(args, &task, a.credentials, bucket.clone(), &mut last_words).await?;
        ran += 1;
        let done = Finished {
            job: task.job.clone(),
            attempt: task.attempt,
        };
        let mut body = serde_json::to_vec(&done).unwrap_or_default();
        body.push(b'\n');
        if out.write_all(&body).await.is_err() || out.flush().await.is_err() {
            // The provider is gone (a broker restart): nothing more will come.
            break;
        }
        info!(job_id = %task.job, attempt = task.attempt, vm = %args.vm, ran, "attempt finished; vm idle");
    }
    info!(vm = %args.vm, ran, "pool vm retiring");
    drain(&mut last_words).await;
    Ok(())
}

/// A cloud pool VM: orders from the API until told to retire (or refused: the
/// credential is no longer good).
pub async fn serve_api(args: &Args) -> Result<(), Error> {
    let creds = run::credentials(&args.vm_dir)?;
    let bucket = open_bucket(args)?;
    undumpable(args);
    let api = Api::new(&creds.api, creds.token).map_err(|e| Error::Open {
        what: "the broker's API",
        message: e.to_string(),
    })?;
    info!(vm = %args.vm, "pool vm ready; asking for work");
    let mut ran = 0u64;
    let mut last_words = JoinSet::new();
    // The attempt run last: its orders stand until the broker has taken its end.
    let mut done: Option<AllocationKey> = None;
    let mut backoff = ASK_EVERY;
    loop {
        let (job, attempt, token) = match api.orders().await {
            Ok(PoolOrders::Run {
                job,
                attempt,
                token,
            }) => (job, attempt, token),
            Ok(PoolOrders::Wait) => {
                tokio::time::sleep(ASK_EVERY).await;
                continue;
            }
            Ok(PoolOrders::Retire) => break,
            Err(report::Error::Refused(why)) => {
                warn!(vm = %args.vm, %why, "the broker refused this vm; retiring");
                break;
            }
            Err(report::Error::Retry(why)) => {
                warn!(vm = %args.vm, %why, "cannot ask for work; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = ASK_EVERY;
        let key = AllocationKey { job, attempt };
        if done.as_ref() == Some(&key) {
            tokio::time::sleep(ASK_EVERY).await;
            continue;
        }
        let task = Task {
            job: key.job.clone(),
            attempt: key.attempt,
        };
        let watch = tokio::spawn(watch_orders(api.clone(), args.vm_dir.clone(), key.clone()));
        let creds = AgentCredentials {
            api: creds.api.clone(),
            token,
        };
        let outcome = run_one(args, &task, creds, bucket.clone(), &mut last_words).await;
        watch.abort();
        let noticed = outcome?;
        ran += 1;
        if noticed {
            // The VM goes (preempted): no next attempt may start on it.
            info!(job_id = %key.job, attempt = key.attempt, vm = %args.vm, ran, "the vm was given notice; taking no more work");
            break;
        }
        info!(job_id = %key.job, attempt = key.attempt, vm = %args.vm, ran, "attempt finished; vm idle");
        done = Some(key);
    }
    info!(vm = %args.vm, ran, "pool vm retiring");
    drain(&mut last_words).await;
    Ok(())
}

/// Kills `key`'s workload once the VM's orders stop naming it, and again each
/// time round (it may not have started yet), until the attempt is over.
async fn watch_orders(api: Api, vm_dir: std::path::PathBuf, key: AllocationKey) {
    let mut released = false;
    loop {
        tokio::time::sleep(ASK_EVERY).await;
        if released {
            respawn_adapters::local::kill_workload(&vm_dir, Some(&key));
            continue;
        }
        released = !match api.orders().await {
            Ok(PoolOrders::Run { job, attempt, .. }) => job == key.job && attempt == key.attempt,
            Ok(PoolOrders::Wait | PoolOrders::Retire) | Err(report::Error::Refused(_)) => false,
            Err(report::Error::Retry(_)) => true,
        };
        if released {
            info!(job_id = %key.job, attempt = key.attempt, "the broker released this attempt; killing its workload");
            respawn_adapters::local::kill_workload(&vm_dir, Some(&key));
        }
    }
}

/// Waits for the attempts' last reports before the agent goes.
async fn drain(last_words: &mut tokio::task::JoinSet<()>) {
    while last_words.join_next().await.is_some() {}
}

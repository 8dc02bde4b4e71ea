//! A pool VM's agent: attempt after attempt, each assigned by the provider as one
//! JSON line on stdin, each answered by one line on stdout once its work folder is
//! gone. stdin is a pipe only the provider holds, so an attempt's credential is never
//! on disk; end of input retires the VM (after the attempt it is running).

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{error, info, warn};

use respawn_core::pool::{Assignment, Finished};

use crate::Args;
use crate::run::{self, Error, Task};

pub async fn serve(args: &Args) -> Result<(), Error> {
    let bucket = run::open_bucket(&args.bucket).map_err(|message| Error::Open {
        what: "the bucket",
        message,
    })?;
    // Not dumpable: a process of the same user (an unsandboxed workload) cannot
    // open this agent's /proc files, its pipes among them (the next attempts'
    // credentials arrive on stdin).
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        warn!(vm = %args.vm, error = %e, "cannot make the agent undumpable");
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    info!(vm = %args.vm, "pool vm ready");
    let mut ran = 0u64;
    let mut last_words = tokio::task::JoinSet::new();
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
        let reporter = match run::attempt(args, &task, a.credentials, bucket.clone()).await {
            Ok(r) => r,
            Err(e) => {
                drain(&mut last_words).await;
                return Err(e);
            }
        };
        // The VM takes the next attempt while this one's last reports go out.
        last_words.spawn(async move { run::last_word(&reporter).await });
        while last_words.try_join_next().is_some() {}
        // The next job must find nothing of this one: the work folder goes, or the
        // VM does (the provider replaces it).
        let root = run::work_root(&args.vm_dir);
        if let Err(e) = std::fs::remove_dir_all(&root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            drain(&mut last_words).await;
            return Err(Error::Open {
                what: "a clean work folder",
                message: format!("{}: {e}", root.display()),
            });
        }
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

/// Waits for the attempts' last reports before the agent goes.
async fn drain(last_words: &mut tokio::task::JoinSet<()>) {
    while last_words.join_next().await.is_some() {}
}

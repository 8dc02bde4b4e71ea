//! Dispatch on the local stack: attempts are taken off the dispatch queue only while
//! a local slot is free.

use std::sync::Arc;
use std::time::Duration;

use respawn_adapters::local::LocalCompute;
use respawn_core::ports::Ports;
use respawn_core::ports::queue::Receive;
use respawn_host::loops::process_together;
use tokio::sync::watch;
use tracing::warn;

/// Takes attempts off the dispatch queue only while a slot is free, so waiting for
/// capacity is waiting in the queue (by priority), not a failed allocation.
pub async fn dispatch(ports: Ports, compute: Arc<LocalCompute>, stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let (cpu, gpu) = compute.free();
        if cpu + gpu == 0 {
            // Woken by the slot that frees; the timeout only guards against a
            // wake-up lost to a race with the check above.
            compute.slot_freed(Duration::from_millis(500)).await;
            continue;
        }
        // As many as there are free slots, handled together: their ledger writes
        // and queue acks share commits.
        let opts = Receive {
            max: (cpu + gpu).min(64),
            lease: Duration::from_secs(60),
            wait: Duration::from_millis(500),
        };
        match ports.queue.receive(&ports.queues.dispatch, opts).await {
            Ok(got) => process_together(&ports, got).await,
            Err(e) => {
                warn!(error = %e, "cannot read the dispatch queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use respawn_adapters::local::sandbox::Sandbox;
    use respawn_adapters::local::{LocalComputeConfig, LocalSecrets};
    use respawn_adapters::memory::{MemoryLedger, MemoryQueue};
    use respawn_core::attempt_auth::AttemptKey;
    use respawn_core::handlers::{Submission, submit};
    use respawn_core::job::{JobId, JobState};
    use respawn_core::ports::compute::AllocationKey;
    use respawn_core::ports::{Compute, QueueNames};
    use respawn_core::spec::{Format, parse};
    use respawn_core::time::SystemClock;

    use super::*;

    /// A stack whose VMs never finish by themselves: a stand-in agent that sleeps.
    async fn stack(dir: &std::path::Path) -> (Ports, Arc<LocalCompute>) {
        let agent = dir.join("respawn-agent");
        std::fs::write(&agent, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let queue = Arc::new(MemoryQueue::default());
        let compute = LocalCompute::open(
            LocalComputeConfig {
                data_dir: dir.to_owned(),
                bucket_dir: dir.join("bucket"),
                agent_bin: agent,
                extra_path: None,
                cpu_slots: 1,
                // A GPU slot stays free: the dispatcher sees free capacity, but
                // none that fits a CPU job.
                gpus: vec![0],
                container_runtime: None,
                events_queue: "events".into(),
                api: "http://127.0.0.1:9".into(),
                attempt_key: AttemptKey::generate().unwrap(),
                heartbeat_secs: 1,
                notice: Duration::from_secs(1),
                sandbox: Sandbox::None,
                pools: Vec::new(),
            },
            queue.clone(),
        )
        .await
        .unwrap();
        let ports = Ports {
            ledger: Arc::new(MemoryLedger::new()),
            queue,
            compute: compute.clone(),
            secrets: Arc::new(LocalSecrets::new(dir.join("secrets"))),
            blobs: Arc::new(object_store::memory::InMemory::new()),
            clock: Arc::new(SystemClock),
            timeouts: crate::up::local_timeouts(1),
            queues: QueueNames::default(),
        };
        (ports, compute)
    }

    async fn job(ports: &Ports, name: &str) -> JobId {
        let spec = parse(&format!("name: {name}\ncommand: [train]\n"), Format::Yaml).unwrap();
        let sub = Submission {
            spec,
            project: "default".into(),
            reply_to: None,
            local_files: false,
        };
        submit(ports, sub).await.unwrap().job.id
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_fits_no_free_slot_waits_without_attempts_and_starts_when_one_frees() {
        let dir = tempfile::tempdir().unwrap();
        let (ports, compute) = stack(dir.path()).await;
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(dispatch(ports.clone(), compute.clone(), stop));

        let first = job(&ports, "first").await;
        let running = |id: &JobId| {
            let ports = ports.clone();
            let id = id.clone();
            async move { ports.ledger.get(&id).await.unwrap() }
        };
        for _ in 0..100 {
            if running(&first).await.state == JobState::Starting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(running(&first).await.state, JobState::Starting);

        let second = job(&ports, "second").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let waiting = running(&second).await;
        assert!(
            matches!(waiting.state, JobState::Pending | JobState::Allocating),
            "{waiting:?}"
        );
        assert!(waiting.attempts.len() <= 1, "{:?}", waiting.attempts);
        assert_eq!((waiting.failures, waiting.infra_losses), (0, 0));
        // A hot loop would have written it thousands of times by now; the backoff
        // (250 ms doubling to 2 s) a handful.
        assert!(waiting.version < 40, "written {} times", waiting.version);

        compute
            .release(&AllocationKey {
                job: first.clone(),
                attempt: 1,
            })
            .await
            .unwrap();
        let mut started = running(&second).await;
        for _ in 0..150 {
            if started.state == JobState::Starting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            started = running(&second).await;
        }
        assert_eq!(started.state, JobState::Starting, "{started:?}");
        assert_eq!((started.attempt, started.attempts.len()), (1, 1));
        for vm in compute.running() {
            compute.release(&vm.key).await.unwrap();
        }
    }
}

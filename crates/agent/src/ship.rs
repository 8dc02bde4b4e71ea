//! Shipping to the bucket: log chunks and completed checkpoints.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use respawn_core::job::CheckpointUpload;
use respawn_core::layout::{self, Stream};
use respawn_core::{JobId, checkpoint};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Bytes past which a chunk is shipped without waiting for the timer.
const CHUNK_BYTES: usize = 64 * 1024;
/// Longest a line waits before it is visible in the bucket.
const FLUSH_EVERY: Duration = Duration::from_millis(300);

/// Streams one of the workload's outputs to numbered chunk objects.
#[derive(Debug, Clone)]
pub struct LogShipper {
    bucket: Arc<dyn ObjectStore>,
    job: JobId,
    attempt: u32,
    /// The node of a multi-node attempt (0 for the only one).
    rank: u32,
    stream: Stream,
    state: Arc<Mutex<(Vec<u8>, u64)>>,
}

impl LogShipper {
    pub fn new(
        bucket: Arc<dyn ObjectStore>,
        job: &JobId,
        attempt: u32,
        rank: u32,
        stream: Stream,
    ) -> Self {
        LogShipper {
            bucket,
            job: job.clone(),
            attempt,
            rank,
            stream,
            state: Arc::new(Mutex::new((Vec::new(), 0))),
        }
    }

    async fn flush(&self) {
        let mut state = self.state.lock().await;
        if state.0.is_empty() {
            return;
        }
        let body = std::mem::take(&mut state.0);
        let path = layout::node_log_chunk(&self.job, self.attempt, self.rank, self.stream, state.1);
        match self.bucket.put(&path, PutPayload::from(body.clone())).await {
            Ok(_) => state.1 += 1,
            Err(e) => {
                // Keep the bytes for the next flush rather than lose them.
                tracing::warn!(job_id = %self.job, attempt = self.attempt, error = %e, "log upload failed");
                state.0 = body;
            }
        }
    }

    async fn append(&self, bytes: &[u8]) -> bool {
        let mut state = self.state.lock().await;
        state.0.extend_from_slice(bytes);
        state.0.len() >= CHUNK_BYTES
    }

    /// A line of the agent's own (e.g. why the workload could not start).
    pub async fn write_line(&self, line: &str) {
        self.append(format!("{line}\n").as_bytes()).await;
    }

    pub async fn close(&self) {
        self.flush().await;
    }

    /// Copies `pipe` into chunks until it closes.
    pub fn pump(self, pipe: Option<impl AsyncRead + Unpin + Send + 'static>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let Some(mut pipe) = pipe else { return };
            let mut buf = vec![0u8; 16 * 1024];
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            loop {
                tokio::select! {
                    n = pipe.read(&mut buf) => match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if self.append(&buf[..n]).await {
                                self.flush().await;
                            }
                        }
                    },
                    _ = tick.tick() => self.flush().await,
                }
            }
            self.flush().await;
        })
    }
}

/// Uploads checkpoints the workload marks complete (`<seq>/.complete`).
#[derive(Debug)]
pub struct CheckpointShipper {
    bucket: Arc<dyn ObjectStore>,
    job: JobId,
    attempt: u32,
    dir: PathBuf,
    last: Option<u64>,
    keep: usize,
}

impl CheckpointShipper {
    pub fn new(
        bucket: Arc<dyn ObjectStore>,
        job: JobId,
        attempt: u32,
        dir: PathBuf,
        restored: Option<u64>,
        keep: usize,
    ) -> Self {
        CheckpointShipper {
            bucket,
            job,
            attempt,
            dir,
            last: restored,
            keep: keep.max(1),
        }
    }

    /// The newest complete local checkpoint newer than the last shipped one.
    fn newest_complete(&self) -> Option<u64> {
        let entries = std::fs::read_dir(&self.dir).ok()?;
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
            .filter(|seq| self.dir.join(seq.to_string()).join(".complete").exists())
            .filter(|seq| self.last.is_none_or(|l| *seq > l))
            .max()
    }

    /// Ships the newest new checkpoint, if any; returns what was committed, with
    /// its size and upload time. Older unshipped ones are skipped: only the
    /// newest matters for resuming.
    pub async fn ship_new(&mut self) -> Result<Vec<(u64, CheckpointUpload)>, checkpoint::Error> {
        let Some(seq) = self.newest_complete() else {
            return Ok(Vec::new());
        };
        let dir = self.dir.join(seq.to_string());
        let span = tracing::info_span!(
            "checkpoint upload",
            otel.kind = "client",
            seq,
            bytes = tracing::field::Empty
        );
        let began = std::time::Instant::now();
        let manifest = checkpoint::upload(self.bucket.as_ref(), &self.job, self.attempt, seq, &dir)
            .instrument(span.clone())
            .await?;
        let upload = CheckpointUpload {
            bytes: manifest.files.iter().map(|f| f.size).sum(),
            millis: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        span.record("bytes", upload.bytes);
        self.last = Some(seq);
        tracing::info!(job_id = %self.job, attempt = self.attempt, seq, bytes = upload.bytes, millis = upload.millis, "checkpoint committed");
        checkpoint::prune(self.bucket.as_ref(), &self.job, self.keep).await?;
        Ok(vec![(seq, upload)])
    }
}

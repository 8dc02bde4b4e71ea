//! Where a job's things live in the bucket. Everything a job owns is under
//! `jobs/<id>/`, so any S3 / Azure tool can inspect or delete it.
//!
//! ```text
//! jobs/<id>/state                              the ledger record (object-store ledger only)
//! jobs/<id>/attempts/<n>/stdout/<chunk>        log chunks, numbered from 0, in order
//! jobs/<id>/attempts/<n>/stderr/<chunk>
//! jobs/<id>/attempts/<n>/nodes/<rank>/stdout/<chunk>   ranks after 0 of a multi-node attempt
//! jobs/<id>/attempts/<n>/nodes/<rank>/stderr/<chunk>
//! jobs/<id>/checkpoints/<seq>/<files…>         a checkpoint's files
//! jobs/<id>/checkpoints/<seq>/MANIFEST.json    written last: the checkpoint is complete
//! jobs/<id>/outputs/<files…>                   RESPAWN_OUTPUT_DIR after the attempt
//! ```
//!
//! The spec is not here: agents ask the broker's API for it (the ledger holds it),
//! with their attempt's credential.

use object_store::path::Path;

use crate::job::JobId;

pub fn job_prefix(id: &JobId) -> Path {
    Path::from(format!("jobs/{id}"))
}

/// Which log stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

pub fn log_prefix(id: &JobId, attempt: u32, stream: Stream) -> Path {
    Path::from(format!("jobs/{id}/attempts/{attempt}/{}", stream.as_str()))
}

/// Chunk names sort in write order.
pub fn log_chunk(id: &JobId, attempt: u32, stream: Stream, chunk: u64) -> Path {
    Path::from(format!(
        "jobs/{id}/attempts/{attempt}/{}/{chunk:010}",
        stream.as_str()
    ))
}

/// [`log_chunk`] of node `rank` of a multi-node attempt: rank 0's logs are the
/// attempt's own, the others' sit beside them under `nodes/<rank>/`.
pub fn node_log_chunk(id: &JobId, attempt: u32, rank: u32, stream: Stream, chunk: u64) -> Path {
    if rank == 0 {
        return log_chunk(id, attempt, stream, chunk);
    }
    Path::from(format!(
        "jobs/{id}/attempts/{attempt}/nodes/{rank}/{}/{chunk:010}",
        stream.as_str()
    ))
}

pub fn checkpoints(id: &JobId) -> Path {
    Path::from(format!("jobs/{id}/checkpoints"))
}

pub fn checkpoint_dir(id: &JobId, seq: u64) -> Path {
    Path::from(format!("jobs/{id}/checkpoints/{seq:020}"))
}

pub fn outputs(id: &JobId) -> Path {
    Path::from(format!("jobs/{id}/outputs"))
}

pub const MANIFEST: &str = "MANIFEST.json";

//! The functions: plain async fns over [`Ports`], shared by every host (the local
//! `respawn up` process, Lambda functions). Each is idempotent under redelivery:
//! lifecycle events for an older attempt change nothing, side effects go through the
//! record's outbox and are themselves idempotent.

mod apply;
mod blob;
mod hook;
mod message;
mod reconcile;
mod submit;
mod sweep;

pub use apply::{flush_outbox, job_event, update_job};
pub use blob::{BlobCreated, blob_created};
pub use hook::{HookError, HookOutcome, webhook};
pub use message::{Disposition, handle_delivery, settle};
pub use reconcile::{ReconcileReport, reconcile};
pub use submit::{Submission, Submitted, submit};
pub use sweep::{ArrayProgress, ArraySubmitted, array_progress, submit_array};

use crate::ports::{Retryable, compute, ledger, queue, secrets};
use crate::spec::SpecError;

/// Why a handler failed. [`Retryable::is_retryable`] tells the host whether to
/// retry the message later or dead-letter it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ledger(#[from] ledger::Error),
    #[error(transparent)]
    Queue(#[from] queue::Error),
    #[error(transparent)]
    Compute(#[from] compute::Error),
    #[error(transparent)]
    Secrets(#[from] secrets::Error),
    #[error("invalid job spec:\n{0}")]
    Spec(#[from] SpecError),
    /// A valid spec naming what its submitter may not touch (another project's
    /// keys, the broker's `jobs/`, local files).
    #[error("not allowed:\n{0}")]
    Denied(SpecError),
    #[error("malformed message: {0}")]
    BadMessage(String),
    #[error("object store: {0}")]
    Blobs(String),
    #[error("job {0} kept changing under concurrent updates; try again")]
    Contended(String),
}

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        match self {
            Error::Ledger(e) => e.is_retryable(),
            Error::Queue(e) => e.is_retryable(),
            Error::Compute(e) => e.is_retryable(),
            Error::Secrets(e) => e.is_retryable(),
            Error::Spec(_) | Error::Denied(_) | Error::BadMessage(_) => false,
            Error::Contended(_) | Error::Blobs(_) => true,
        }
    }
}

//! The job ledger: durable job records with compare-and-swap updates.
//!
//! # Contract
//!
//! - [`Ledger::create`] is atomic create-if-absent on the job id **and** on the
//!   record's idempotency scope (project + key): if either exists it stores nothing
//!   and returns [`Error::AlreadyExists`] naming the existing job. The stored record
//!   has `version == 1`.
//! - [`Ledger::get`] returns the newest stored record or [`Error::NotFound`].
//! - [`Ledger::update`] is a compare-and-swap: it stores `record` only if the stored
//!   version equals `record.version`, and returns the record as stored, with
//!   `version + 1`. Otherwise it stores nothing and returns [`Error::Conflict`]
//!   (or [`Error::NotFound`]). Of two racing updates from the same version, exactly
//!   one wins.
//! - Once a call returns `Ok`, its effect survives a crash of the process (and, for
//!   durable adapters, of the machine).
//! - [`Ledger::list`] pages through jobs in id order (= submission order), filtered by
//!   state, project and label; `next` is `Some` while more may follow. A page's cost
//!   must not grow with the number of jobs in other states.

use std::fmt;

use async_trait::async_trait;

use super::Retryable;
use crate::job::{JobId, JobRecord, JobState};

/// A ledger error. Callers branch on the kind, never on the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("job {id} not found")]
    NotFound { id: JobId },
    #[error("job {id} already exists")]
    AlreadyExists { id: JobId },
    #[error("job {id} changed since version {expected}; read it again")]
    Conflict { id: JobId, expected: u64 },
    #[error("stored record of job {id} is unreadable: {message}")]
    Corrupt { id: String, message: String },
    #[error("ledger unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0} is not supported in this build")]
    NotSupported(String),
}

impl Error {
    pub fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Unavailable(Box::new(e))
    }
}

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Conflict { .. })
    }
}

/// Which jobs to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub state: Option<JobState>,
    pub project: Option<String>,
    /// Only jobs carrying this label with this value.
    pub label: Option<(String, String)>,
    /// Continue after this job id (the previous page's `next`).
    pub after: Option<JobId>,
    /// Page size; adapters cap it at [`MAX_PAGE`].
    pub limit: usize,
}

pub const MAX_PAGE: usize = 1000;

impl ListQuery {
    pub fn in_state(state: JobState) -> Self {
        ListQuery {
            state: Some(state),
            limit: 100,
            ..Default::default()
        }
    }

    pub fn page_size(&self) -> usize {
        self.limit.clamp(1, MAX_PAGE)
    }

    /// Whether `r` passes the filters (not the paging).
    pub fn matches(&self, r: &JobRecord) -> bool {
        self.state.is_none_or(|s| r.state == s)
            && self.project.as_ref().is_none_or(|p| &r.project == p)
            && self
                .label
                .as_ref()
                .is_none_or(|(k, v)| r.spec.labels.get(k) == Some(v))
    }
}

/// One page of jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub jobs: Vec<JobRecord>,
    /// Pass as `after` to get the next page.
    pub next: Option<JobId>,
}

impl Page {
    /// A page from up to `limit + 1` matching jobs in id order: the extra one only
    /// tells that more follow.
    pub fn from_overfetch(mut jobs: Vec<JobRecord>, limit: usize) -> Page {
        let next = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|r| r.id.clone())
        } else {
            None
        };
        Page { jobs, next }
    }
}

#[async_trait]
pub trait Ledger: Send + Sync + fmt::Debug {
    async fn create(&self, record: JobRecord) -> Result<JobRecord, Error>;
    async fn get(&self, id: &JobId) -> Result<JobRecord, Error>;
    async fn update(&self, record: JobRecord) -> Result<JobRecord, Error>;
    async fn list(&self, query: &ListQuery) -> Result<Page, Error>;
    /// The job holding an idempotency key in a project, if any.
    async fn find_by_idempotency_key(
        &self,
        project: &str,
        key: &str,
    ) -> Result<Option<JobId>, Error>;
}

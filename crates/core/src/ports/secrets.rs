//! Secret values of jobs, kept apart from the ledger so that records, API answers
//! and logs never hold them.
//!
//! # Contract
//!
//! - [`Secrets::put`] stores a job's values durably, replacing any earlier ones;
//!   it is idempotent.
//! - [`Secrets::get`] returns them, or an empty map for a job without secrets.
//! - [`Secrets::delete`] removes them; deleting what is not there is `Ok`.
//! - Adapters keep values readable only by the broker and its agents (file
//!   permissions, a secrets manager, encryption at rest).

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;

use super::Retryable;
use crate::job::JobId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("secret store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        true
    }
}

#[async_trait]
pub trait Secrets: Send + Sync + fmt::Debug {
    async fn put(&self, job: &JobId, values: &BTreeMap<String, String>) -> Result<(), Error>;
    async fn get(&self, job: &JobId) -> Result<BTreeMap<String, String>, Error>;
    async fn delete(&self, job: &JobId) -> Result<(), Error>;
}

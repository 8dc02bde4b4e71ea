//! Compute providers: VMs (or local slots) for attempts.
//!
//! # Contract
//!
//! - VMs are keyed by [`AllocationKey`] (job + attempt). [`Compute::allocate`] is
//!   idempotent per key: asking again returns the VM already allocated for it, never
//!   a second one.
//! - `allocate` returns once the provider has accepted the request; the VM may still
//!   be booting. No capacity is [`Error::Capacity`] (an infrastructure loss, retried
//!   as a new attempt), a request the provider can never satisfy is
//!   [`Error::Invalid`].
//! - [`Compute::release`] terminates the key's VM; releasing an unknown or released
//!   key is `Ok`. After release, `allocate` on the same key does not make a new VM:
//!   a new attempt has a new key.
//! - [`Compute::describe`] and [`Compute::list`] report VMs the provider knows,
//!   including terminated ones it still remembers.
//! - A provider with warm pools may run many attempts, one after another, on one
//!   VM ([`Vm::id`] repeats across keys): for it, `release` ends the key's attempt
//!   on that VM (its workload killed, the VM itself kept for the next attempt once
//!   its agent has cleaned up) and `describe` reports the attempt's VM as
//!   terminated once the attempt is over there.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::Retryable;
use crate::job::JobId;
use crate::spec::{Placement, Resources};
use crate::time::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AllocationKey {
    pub job: JobId,
    pub attempt: u32,
}

impl fmt::Display for AllocationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.job, self.attempt)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AllocateRequest {
    pub key: AllocationKey,
    /// The job's project (cloud providers tag its VMs with it).
    pub project: String,
    pub resources: Resources,
    pub placement: Placement,
    pub image: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Accepted, booting.
    Requested,
    Running,
    Terminated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub key: AllocationKey,
    pub state: VmState,
    pub spot: bool,
    pub nodes: u32,
    pub created_at: Timestamp,
}

impl Vm {
    /// Whether `name` is this VM or one of its nodes (see [`node_id`]).
    pub fn has_node(&self, name: &str) -> bool {
        (0..self.nodes.max(1)).any(|r| node_id(&self.id, r) == name)
    }
}

/// The name of node `rank` of the VM named `vm`: a multi-node attempt's gang is one
/// VM to the broker, whose id is rank 0's; rank r's is `<vm>-n<r>`.
pub fn node_id(vm: &str, rank: u32) -> String {
    if rank == 0 {
        vm.to_owned()
    } else {
        format!("{vm}-n{rank}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no capacity: {0}")]
    Capacity(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("compute provider unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0} is not supported in this build")]
    NotSupported(String),
}

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// What a pool VM that asks the broker for work is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Orders {
    /// Run this attempt (once the previous one is cleaned up).
    Run(AllocationKey),
    /// Nothing yet: ask again.
    Wait,
    /// This VM is no longer the pool's: end.
    Retire,
}

#[async_trait]
pub trait Compute: Send + Sync + fmt::Debug {
    async fn allocate(&self, request: &AllocateRequest) -> Result<Vm, Error>;
    async fn release(&self, key: &AllocationKey) -> Result<(), Error>;
    async fn describe(&self, key: &AllocationKey) -> Result<Option<Vm>, Error>;
    async fn list(&self) -> Result<Vec<Vm>, Error>;

    /// What pool VM `vm` (named by its VM credential) is to do now. Providers whose
    /// pool VMs get their work another way (the local provider writes it to the
    /// agent's stdin) have none that ask.
    async fn orders(&self, _vm: &str) -> Result<Orders, Error> {
        Ok(Orders::Retire)
    }

    /// The addresses of the nodes of `key`'s multi-node VM in rank order, once
    /// every node has one; `None` while some are still booting, for a single node,
    /// or for a provider that tells its agents their peers when it starts them.
    async fn roster(&self, _key: &AllocationKey) -> Result<Option<Vec<String>>, Error> {
        Ok(None)
    }
}

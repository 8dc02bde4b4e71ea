//! The ports: small traits the handlers are written against, each with a written
//! contract and a conformance suite (in [`crate::conformance`]) every adapter passes.

pub mod compute;
pub mod ledger;
pub mod queue;
pub mod secrets;
pub mod tokens;

use std::sync::Arc;

pub use compute::Compute;
pub use ledger::Ledger;
pub use queue::Queue;
pub use secrets::Secrets;
pub use tokens::Tokens;

use crate::lifecycle::Timeouts;
use crate::time::Clock;

/// Object storage: the `object_store` crate's trait is the port.
pub type Blobs = Arc<dyn object_store::ObjectStore>;

/// Everything a handler may touch, built once by the host (CLI, Lambda `main`).
#[derive(Debug, Clone)]
pub struct Ports {
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
    pub compute: Arc<dyn Compute>,
    pub secrets: Arc<dyn Secrets>,
    pub blobs: Blobs,
    pub clock: Arc<dyn Clock>,
    pub timeouts: Timeouts,
    pub queues: QueueNames,
}

/// The queues the functions talk through. Prefixed so several brokers (or test
/// runs) can share one queue server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// Job submissions from outside.
    pub submit: String,
    /// Attempts waiting for capacity, by priority.
    pub dispatch: String,
    /// Reports from agents and providers (started, checkpoint, notice, exit, …).
    pub events: String,
    /// Outbound state-change notifications, one message per URL.
    pub notify: String,
}

impl QueueNames {
    pub fn with_prefix(prefix: &str) -> Self {
        QueueNames {
            submit: format!("{prefix}submit"),
            dispatch: format!("{prefix}dispatch"),
            events: format!("{prefix}events"),
            notify: format!("{prefix}notify"),
        }
    }
}

impl Default for QueueNames {
    fn default() -> Self {
        QueueNames::with_prefix("respawn.")
    }
}

/// Whether an error is worth retrying as is.
pub trait Retryable {
    /// `true` when the same call may succeed later (timeouts, throttling, lost
    /// connections); `false` when only a different request could.
    fn is_retryable(&self) -> bool;
}

//! respawn's core: job specs, the job lifecycle, the ports the functions are written
//! against, the functions themselves, and the conformance suites adapters must pass.
//!
//! Nothing here does I/O of its own; hosts (the `respawn` CLI, Lambda functions)
//! build [`ports::Ports`] from adapters and call [`handlers`].

pub mod attempt_auth;
pub mod beneath;
pub mod blob_uri;
pub mod checkpoint;
pub mod cloud;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod handlers;
pub mod intake;
pub mod job;
pub mod layout;
pub mod lifecycle;
pub mod messages;
pub mod pool;
pub mod ports;
pub mod project;
pub mod schema;
pub mod seal;
pub mod spec;
pub mod sweep;
pub mod time;
pub mod trigger;
pub mod units;
pub mod webhook;

pub use job::{JobId, JobRecord, JobState};
pub use spec::JobSpec;

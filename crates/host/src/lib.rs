//! The host layer: what every host of respawn's handlers runs around them, over the
//! same [`respawn_core::ports::Ports`] — `respawn up` in one process today, each
//! cloud function on its own next.
//!
//! - [`api`]: the HTTP API's router over the ports (a socket in `respawn up`,
//!   `lambda_http` in the `api` function);
//! - [`loops`]: consume the events queue, settle each message after its handler,
//!   reconcile on a timer;
//! - [`intake`]: the submit queue (specs or templates by message, replies in order);
//! - [`notify`]: state changes POSTed to the jobs' `notify` URLs, signed, retried,
//!   through the [`egress`] policy (public addresses only, no redirects, redacted);
//! - [`replies`]: answers to queue submitters;
//! - [`traced`]: trace context through the queue and the ledger;
//! - [`metrics`]: what the broker counts, from every change to a job, for
//!   `GET /metrics` and `respawn status`.
//!
//! Hosts build the ports once and choose where each loop runs; nothing here knows
//! which compute provider or data folder is behind them.

pub mod api;
#[cfg(feature = "azure")]
pub mod azure;
#[cfg(any(feature = "aws", feature = "azure"))]
pub mod cloud;
pub mod egress;
pub mod intake;
#[cfg(any(feature = "aws", feature = "azure"))]
pub mod invocation;
#[cfg(feature = "aws")]
pub mod lambda;
pub mod loops;
pub mod metrics;
pub mod notify;
pub mod replies;
pub mod traced;

//! Adapters for respawn's ports. One module per backend:
//!
//! - [`memory`]: in-memory ledger, queue and compute, for tests and simulations.
//! - [`local`] (feature `local`, default): the durable ledger and queue of the
//!   embedded default, in SQLite files under a data folder.
//! - [`objstore`]: a ledger on any `object_store` (S3, Azure Blob, GCS, in-memory),
//!   compare-and-swap by conditional put.
//! - [`amqp`] (feature `amqp`): a queue on RabbitMQ.
//! - [`sqs`] (feature `aws`): a queue on Amazon SQS.
//! - [`azqueue`] and [`azvm`] (feature `azure`): a queue on Storage Queues, Spot
//!   VMs through Azure Resource Manager.
//! - [`vmpool`] (either cloud): warm pools of cloud VMs, their records in the
//!   broker's state bucket.

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "azure")]
pub mod azqueue;
#[cfg(feature = "azure")]
pub mod azvm;
#[cfg(any(feature = "aws", feature = "azure"))]
mod bands;
#[cfg(any(feature = "aws", feature = "azure"))]
pub mod cloudvm;
#[cfg(feature = "aws")]
pub mod ec2;
#[cfg(feature = "local")]
pub mod local;
pub mod memory;
pub mod objstore;
#[cfg(feature = "aws")]
pub mod sqs;
#[cfg(any(feature = "aws", feature = "azure"))]
pub mod vmpool;

//! `events`: agents' reports from the events queue, and EC2's spot interruption
//! warnings, rebalance recommendations and state changes that EventBridge puts on
//! the EC2 events queue, each applied to its job.

use respawn_host::lambda::{self, functions};

#[tokio::main]
async fn main() -> Result<(), lambda::lambda_runtime::Error> {
    lambda::serve_sqs(functions::events).await
}

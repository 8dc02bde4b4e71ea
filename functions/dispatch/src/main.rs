//! `dispatch`: each attempt taken off the dispatch queue gets its EC2 spot
//! instance (one per job + attempt, however often the message comes).

use respawn_host::lambda::{self, functions};

#[tokio::main]
async fn main() -> Result<(), lambda::lambda_runtime::Error> {
    lambda::serve_sqs(functions::dispatch).await
}

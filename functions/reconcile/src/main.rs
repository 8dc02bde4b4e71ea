//! `reconcile`: on a schedule, repairs what no message will: deadlines passed
//! (allocation, start, heartbeat), VMs lost without a word, dispatches lost,
//! instances of finished attempts still running.

use respawn_host::lambda::lambda_runtime::{self, LambdaEvent, service_fn};
use respawn_host::lambda::{self, functions};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let cloud = lambda::start().await?;
    lambda_runtime::run(service_fn(|e: LambdaEvent<serde_json::Value>| {
        respawn_host::traced::answered(functions::reconcile(cloud, e.payload))
    }))
    .await
}

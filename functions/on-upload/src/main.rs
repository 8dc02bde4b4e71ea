//! `on-upload`: S3 notifications (direct, SNS-wrapped or from EventBridge, through
//! SQS) make jobs by the packaged trigger rules.

use respawn_host::lambda::{self, functions};

#[tokio::main]
async fn main() -> Result<(), lambda::lambda_runtime::Error> {
    lambda::serve_sqs(functions::on_upload).await
}

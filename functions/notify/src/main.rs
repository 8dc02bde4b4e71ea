//! `notify`: each state change of a job with notify URLs is POSTed to them, signed
//! (Standard Webhooks), public addresses only; failures are retried with backoff by
//! the queue. Replies to submitters go out in order.

use std::sync::Arc;

use respawn_host::lambda::lambda_runtime::{self, LambdaEvent, service_fn};
use respawn_host::lambda::{self, aws_lambda_events::sqs::SqsEvent, functions};
use respawn_host::notify::Notifier;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let cloud = lambda::start().await?;
    let notifier = Arc::new(Notifier::new(
        cloud.broker.notify_secret.clone(),
        cloud.replies.clone(),
        false,
    )?);
    lambda_runtime::run(service_fn(|e: LambdaEvent<SqsEvent>| {
        let notifier = notifier.clone();
        Box::pin(async move {
            let deadline = e.context.deadline;
            Ok::<_, lambda_runtime::Error>(
                respawn_host::traced::answered(functions::notify(
                    cloud, &notifier, e.payload, deadline,
                ))
                .await,
            )
        })
    }))
    .await
}

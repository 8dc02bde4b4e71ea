//! `api`: respawn's HTTP API (the router `respawn up` serves) behind a function URL
//! or API Gateway (HTTP API payload 2.0): jobs, logs, tokens, webhooks, and the
//! agents' reports.

use respawn_host::api;
use respawn_host::lambda;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let cloud = lambda::start().await?;
    cloud.broker.first_admin().await?;
    lambda_http::run(respawn_host::traced::answering(api::app(
        cloud.broker.api(),
    )))
    .await
}

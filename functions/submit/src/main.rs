//! `submit`: messages on the submit queue (a spec, or a template and its
//! parameters) become jobs; a submitter that names a reply queue hears back there.

use respawn_host::lambda::{self, functions};

#[tokio::main]
async fn main() -> Result<(), lambda::lambda_runtime::Error> {
    lambda::serve_sqs(functions::submit).await
}

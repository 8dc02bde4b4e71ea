//! `respawn-azure`: the Azure Functions custom handler. The Functions host starts
//! it beside itself and calls it on `FUNCTIONS_CUSTOMHANDLER_PORT` for every
//! function in `app/` (see `respawn_host::azure::handler`).

use std::process::ExitCode;

use respawn_host::azure;

#[tokio::main]
async fn main() -> ExitCode {
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("respawn-azure: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> Result<(), String> {
    let port: u16 = match std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| format!("FUNCTIONS_CUSTOMHANDLER_PORT: {p:?} is not a port"))?,
        Err(_) => 8080,
    };
    let cloud = azure::start().await?;
    let app = azure::handler::router(cloud)?;
    // Only the Functions host, beside it, calls the handler.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    axum::serve(listener, app)
        .await
        .map_err(|e| format!("serving: {e}"))
}

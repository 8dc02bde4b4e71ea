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
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(stopped())
        .await
        .map_err(|e| format!("serving: {e}"));
    // What the exporters hold goes out before the process does.
    respawn_telemetry::flushed().await;
    served
}

/// The Functions host stops its custom handler with SIGTERM (a scale-in, a
/// deployment); Ctrl-C when run by hand.
async fn stopped() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut t) => {
                t.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

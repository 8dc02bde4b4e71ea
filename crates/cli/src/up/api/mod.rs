//! The API of `respawn up`: the host layer's router over the local stack, with the
//! admin token kept in the data folder and preemptions simulated on local VMs.

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_access;
#[cfg(test)]
mod tests_isolation;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use respawn_adapters::local::LocalCompute;
use respawn_core::ports::compute::{self, Vm};
use respawn_host::api::{self, Api, Operator};

pub use respawn_host::api::ROUTES;

use super::{Isolation, Stack};

pub fn app(stack: Stack) -> Router {
    api::app(stack.api())
}

impl Stack {
    /// The API's view of the stack.
    pub fn api(&self) -> Api {
        Api {
            ports: self.ports.clone(),
            tokens: self.tokens.clone(),
            hooks: self.hooks.clone(),
            rules: self.rules.clone(),
            attempt_key: self.attempt_key.clone(),
            operator: Arc::new(LocalOperator(self.compute.clone())),
            // A token is for someone else, whose jobs could then read this user's
            // files (the admin token among them): not without a sandbox, unless the
            // operator says so.
            others_refused: (!self.sandboxed && self.config.isolation != Isolation::None).then(
                || {
                    "workloads run unsandboxed on this stack (no bubblewrap), so tokens for \
                     others cannot be created; install bubblewrap, or restart respawn up with \
                     --isolation none to accept that their jobs can read this user's files"
                        .to_owned()
                },
            ),
            metrics: Some(self.metrics.clone()),
        }
    }
}

#[derive(Debug)]
struct LocalOperator(Arc<LocalCompute>);

#[async_trait]
impl Operator for LocalOperator {
    async fn running(&self) -> Result<Vec<Vm>, compute::Error> {
        Ok(self.0.running())
    }

    async fn preempt(
        &self,
        vm: &str,
        notice: Option<Duration>,
    ) -> Result<Option<String>, compute::Error> {
        Ok(self.0.preempt(vm, notice))
    }
}

/// Where `respawn up` leaves the admin token of a new data folder.
pub fn admin_token_path(data: &Path) -> PathBuf {
    data.join("admin-token")
}

/// On a data folder without tokens, mints an admin token for the default project and
/// writes it (mode 0600) where the CLI finds it.
pub async fn ensure_admin_token(stack: &Stack) -> Result<(), String> {
    let Some(secret) = api::mint_first_admin(&stack.api()).await? else {
        return Ok(());
    };
    let path = admin_token_path(&stack.config.data);
    respawn_adapters::local::durable::write(&path, format!("{secret}\n").as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "admin token written");
    Ok(())
}

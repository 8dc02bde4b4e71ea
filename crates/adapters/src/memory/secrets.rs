use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use respawn_core::JobId;
use respawn_core::ports::secrets::{Error, Secrets};

/// Secrets in a map.
#[derive(Debug, Default)]
pub struct MemorySecrets {
    values: Mutex<HashMap<JobId, BTreeMap<String, String>>>,
}

impl MemorySecrets {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, BTreeMap<String, String>>> {
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Secrets for MemorySecrets {
    async fn put(&self, job: &JobId, values: &BTreeMap<String, String>) -> Result<(), Error> {
        self.lock().insert(job.clone(), values.clone());
        Ok(())
    }

    async fn get(&self, job: &JobId) -> Result<BTreeMap<String, String>, Error> {
        Ok(self.lock().get(job).cloned().unwrap_or_default())
    }

    async fn delete(&self, job: &JobId) -> Result<(), Error> {
        self.lock().remove(job);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        respawn_core::conformance::secrets::run(&super::MemorySecrets::new()).await;
    }
}

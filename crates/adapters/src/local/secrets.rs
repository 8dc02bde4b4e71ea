//! Job secrets as files only the broker's user can read: `<dir>/<job>.json`, mode
//! 0600, in a 0700 folder, apart from the ledger.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use async_trait::async_trait;
use respawn_core::JobId;
use respawn_core::ports::secrets::{Error, Secrets};

#[derive(Debug, Clone)]
pub struct LocalSecrets {
    dir: PathBuf,
}

impl LocalSecrets {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalSecrets { dir: dir.into() }
    }

    fn path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.json"))
    }
}

fn unavailable(e: std::io::Error) -> Error {
    Error::Unavailable(Box::new(e))
}

#[async_trait]
impl Secrets for LocalSecrets {
    async fn put(&self, job: &JobId, values: &BTreeMap<String, String>) -> Result<(), Error> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(unavailable)?;
        let body = serde_json::to_vec(values).map_err(|e| unavailable(std::io::Error::other(e)))?;
        super::durable::write(&self.path(job), &body, 0o600).map_err(unavailable)
    }

    async fn get(&self, job: &JobId) -> Result<BTreeMap<String, String>, Error> {
        match std::fs::read(self.path(job)) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| unavailable(std::io::Error::other(e)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete(&self, job: &JobId) -> Result<(), Error> {
        match std::fs::remove_file(self.path(job)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(unavailable(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn conformance_and_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LocalSecrets::new(dir.path().join("secrets"));
        respawn_core::conformance::secrets::run(&s).await;
        let job = JobId::generate(respawn_core::time::Timestamp(9));
        s.put(&job, &BTreeMap::from([("K".into(), "v".into())]))
            .await
            .expect("put");
        let mode = std::fs::metadata(s.path(&job))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner reads secrets");
    }
}

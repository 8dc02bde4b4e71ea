//! API tokens and job secrets on an object store, beside the object-store ledger,
//! for hosts without a database (the AWS functions keep them in the broker's state
//! bucket, which no agent can read).
//!
//! ```text
//! tokens/by-hash/<sha256 of the secret>   the TokenRecord (JSON)
//! tokens/by-id/<sha256(id)>               the hash of the token's secret
//! secrets/<job id>                        the job's secret values (JSON)
//! ```
//!
//! A token is created id first (`PutMode::Create`, so an id is never taken twice),
//! then its record; a crash between the two leaves an id with no record, which
//! authenticates nobody and is listed by no one.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use respawn_core::job::JobId;
use respawn_core::ports::Blobs;
use respawn_core::ports::secrets::{self, Secrets};
use respawn_core::ports::tokens::{Error, TokenRecord, Tokens};
use sha2::{Digest, Sha256};

/// Tokens on an object store.
#[derive(Debug, Clone)]
pub struct ObjectStoreTokens {
    store: Blobs,
}

impl ObjectStoreTokens {
    pub fn new(store: Blobs) -> Self {
        ObjectStoreTokens { store }
    }

    async fn record(&self, hash: &str) -> Result<Option<TokenRecord>, Error> {
        match self.store.get(&by_hash(hash)).await {
            Ok(got) => {
                let bytes = got.bytes().await.map_err(unavailable)?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(unavailable)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn write(&self, t: &TokenRecord) -> Result<(), Error> {
        let body = serde_json::to_vec(t).map_err(unavailable)?;
        self.store
            .put(&by_hash(&t.hash), PutPayload::from(body))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn by_hash(hash: &str) -> Path {
    // The hash is hex already; hashing again keeps any input a single path part.
    Path::from(format!(
        "tokens/by-hash/{}",
        hex::encode(Sha256::digest(hash))
    ))
}

fn by_id(id: &str) -> Path {
    Path::from(format!("tokens/by-id/{}", hex::encode(Sha256::digest(id))))
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable(Box::new(e))
}

#[async_trait]
impl Tokens for ObjectStoreTokens {
    async fn create(&self, token: &TokenRecord) -> Result<(), Error> {
        if self.record(&token.hash).await?.is_some() {
            return Err(Error::AlreadyExists(token.id.clone()));
        }
        match self
            .store
            .put_opts(
                &by_id(&token.id),
                PutPayload::from(token.hash.clone()),
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(Error::AlreadyExists(token.id.clone()));
            }
            Err(e) => return Err(unavailable(e)),
        }
        self.write(token).await
    }

    async fn find_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, Error> {
        self.record(hash).await
    }

    async fn revoke(&self, id: &str) -> Result<(), Error> {
        let hash = match self.store.get(&by_id(id)).await {
            Ok(got) => got.bytes().await.map_err(unavailable)?,
            Err(object_store::Error::NotFound { .. }) => return Err(Error::NotFound(id.into())),
            Err(e) => return Err(unavailable(e)),
        };
        let hash = String::from_utf8_lossy(&hash).into_owned();
        let mut record = self
            .record(&hash)
            .await?
            .ok_or_else(|| Error::NotFound(id.into()))?;
        record.revoked = true;
        self.write(&record).await
    }

    async fn list(&self, project: Option<&str>) -> Result<Vec<TokenRecord>, Error> {
        let metas: Vec<_> = self
            .store
            .list(Some(&Path::from("tokens/by-hash")))
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for m in metas {
            let bytes = match self.store.get(&m.location).await {
                Ok(got) => got.bytes().await.map_err(unavailable)?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(unavailable(e)),
            };
            let t: TokenRecord = serde_json::from_slice(&bytes).map_err(unavailable)?;
            if project.is_none_or(|p| t.project == p) {
                out.push(t);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }
}

/// Job secrets on an object store.
#[derive(Debug, Clone)]
pub struct ObjectStoreSecrets {
    store: Blobs,
}

impl ObjectStoreSecrets {
    pub fn new(store: Blobs) -> Self {
        ObjectStoreSecrets { store }
    }
}

fn secrets_path(job: &JobId) -> Path {
    Path::from(format!("secrets/{job}"))
}

fn secret_err(e: impl std::error::Error + Send + Sync + 'static) -> secrets::Error {
    secrets::Error::Unavailable(Box::new(e))
}

#[async_trait]
impl Secrets for ObjectStoreSecrets {
    async fn put(
        &self,
        job: &JobId,
        values: &BTreeMap<String, String>,
    ) -> Result<(), secrets::Error> {
        let body = serde_json::to_vec(values).map_err(secret_err)?;
        self.store
            .put(&secrets_path(job), PutPayload::from(body))
            .await
            .map_err(secret_err)?;
        Ok(())
    }

    async fn get(&self, job: &JobId) -> Result<BTreeMap<String, String>, secrets::Error> {
        match self.store.get(&secrets_path(job)).await {
            Ok(got) => {
                let bytes = got.bytes().await.map_err(secret_err)?;
                serde_json::from_slice(&bytes).map_err(secret_err)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(BTreeMap::new()),
            Err(e) => Err(secret_err(e)),
        }
    }

    async fn delete(&self, job: &JobId) -> Result<(), secrets::Error> {
        match self.store.delete(&secrets_path(job)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(secret_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::*;

    #[tokio::test]
    async fn tokens_pass_their_conformance_suite() {
        let t = ObjectStoreTokens::new(Arc::new(InMemory::new()));
        respawn_core::conformance::tokens::run(&t).await;
    }

    #[tokio::test]
    async fn secrets_pass_their_conformance_suite() {
        let s = ObjectStoreSecrets::new(Arc::new(InMemory::new()));
        respawn_core::conformance::secrets::run(&s).await;
    }
}

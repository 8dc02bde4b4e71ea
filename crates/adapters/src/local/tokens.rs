use async_trait::async_trait;
use respawn_core::ports::tokens::{Error, TokenRecord, Tokens};
use rusqlite::{OptionalExtension, params};

use super::LocalStore;

/// API tokens in the local store (hashes only).
#[derive(Debug, Clone)]
pub struct LocalTokens {
    store: LocalStore,
}

impl LocalTokens {
    pub(super) fn new(store: LocalStore) -> Self {
        LocalTokens { store }
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable(Box::new(e))
}

fn decode(body: &str) -> Result<TokenRecord, Error> {
    serde_json::from_str(body).map_err(unavailable)
}

#[async_trait]
impl Tokens for LocalTokens {
    async fn create(&self, token: &TokenRecord) -> Result<(), Error> {
        let t = token.clone();
        let body = serde_json::to_string(&t).map_err(unavailable)?;
        self.store
            .writer
            .call(move |c| {
                let exists: Option<String> = c
                    .query_row(
                        "SELECT id FROM tokens WHERE id = ?1 OR hash = ?2",
                        params![t.id, t.hash],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(unavailable)?;
                if exists.is_some() {
                    return Err(Error::AlreadyExists(t.id.clone()));
                }
                c.execute(
                    "INSERT INTO tokens (id, hash, project, record) VALUES (?1, ?2, ?3, ?4)",
                    params![t.id, t.hash, t.project, body],
                )
                .map_err(unavailable)?;
                Ok(())
            })
            .await
            .map_err(unavailable)?
    }

    async fn find_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, Error> {
        let hash = hash.to_owned();
        let body: Option<String> = self
            .store
            .readers
            .read(move |c| {
                c.prepare_cached("SELECT record FROM tokens WHERE hash = ?1")?
                    .query_row([hash], |r| r.get(0))
                    .optional()
            })
            .await
            .map_err(unavailable)?;
        body.as_deref().map(decode).transpose()
    }

    async fn revoke(&self, id: &str) -> Result<(), Error> {
        let id = id.to_owned();
        self.store
            .writer
            .call(move |c| {
                let body: Option<String> = c
                    .query_row("SELECT record FROM tokens WHERE id = ?1", [&id], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(unavailable)?;
                let mut t = decode(&body.ok_or_else(|| Error::NotFound(id.clone()))?)?;
                t.revoked = true;
                let body = serde_json::to_string(&t).map_err(unavailable)?;
                c.execute(
                    "UPDATE tokens SET record = ?2 WHERE id = ?1",
                    params![id, body],
                )
                .map_err(unavailable)?;
                Ok(())
            })
            .await
            .map_err(unavailable)?
    }

    async fn list(&self, project: Option<&str>) -> Result<Vec<TokenRecord>, Error> {
        let project = project.map(str::to_owned);
        let rows: Vec<String> = self
            .store
            .readers
            .read(move |c| {
                c.prepare_cached(
                    "SELECT record FROM tokens WHERE ?1 IS NULL OR project = ?1 ORDER BY id",
                )?
                .query_map([project], |r| r.get(0))?
                .collect()
            })
            .await
            .map_err(unavailable)?;
        rows.iter().map(|b| decode(b)).collect()
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::LocalStore::open(dir.path()).expect("open");
        respawn_core::conformance::tokens::run(&store.tokens()).await;
    }
}

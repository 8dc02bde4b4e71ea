use std::sync::Mutex;

use async_trait::async_trait;
use respawn_core::ports::tokens::{Error, TokenRecord, Tokens};

/// Tokens in a list.
#[derive(Debug, Default)]
pub struct MemoryTokens {
    tokens: Mutex<Vec<TokenRecord>>,
}

impl MemoryTokens {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TokenRecord>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Tokens for MemoryTokens {
    async fn create(&self, token: &TokenRecord) -> Result<(), Error> {
        let mut all = self.lock();
        if all.iter().any(|t| t.id == token.id || t.hash == token.hash) {
            return Err(Error::AlreadyExists(token.id.clone()));
        }
        all.push(token.clone());
        Ok(())
    }

    async fn find_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, Error> {
        Ok(self.lock().iter().find(|t| t.hash == hash).cloned())
    }

    async fn revoke(&self, id: &str) -> Result<(), Error> {
        let mut all = self.lock();
        let t = all
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        t.revoked = true;
        Ok(())
    }

    async fn list(&self, project: Option<&str>) -> Result<Vec<TokenRecord>, Error> {
        Ok(self
            .lock()
            .iter()
            .filter(|t| project.is_none_or(|p| t.project == p))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        respawn_core::conformance::tokens::run(&super::MemoryTokens::new()).await;
    }
}

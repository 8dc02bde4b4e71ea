use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use respawn_core::job::{JobId, JobRecord};
use respawn_core::ports::ledger::{Error, Ledger, ListQuery, Page};

/// A ledger in a map.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<JobId, JobRecord>,
    keys: HashMap<String, JobId>,
}

impl MemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record, in id order (for tests comparing whole ledgers).
    pub fn snapshot(&self) -> Vec<JobRecord> {
        self.lock().jobs.values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the maps consistent
        // (every mutation is a single insert), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn create(&self, mut record: JobRecord) -> Result<JobRecord, Error> {
        let mut inner = self.lock();
        if inner.jobs.contains_key(&record.id) {
            return Err(Error::AlreadyExists { id: record.id });
        }
        let scope = record.idempotency_scope();
        if let Some(holder) = scope.as_ref().and_then(|s| inner.keys.get(s)) {
            return Err(Error::AlreadyExists { id: holder.clone() });
        }
        record.version = 1;
        if let Some(s) = scope {
            inner.keys.insert(s, record.id.clone());
        }
        inner.jobs.insert(record.id.clone(), record.clone());
        Ok(record)
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord, Error> {
        self.lock()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound { id: id.clone() })
    }

    async fn update(&self, mut record: JobRecord) -> Result<JobRecord, Error> {
        let mut inner = self.lock();
        let Some(current) = inner.jobs.get_mut(&record.id) else {
            return Err(Error::NotFound { id: record.id });
        };
        if current.version != record.version {
            return Err(Error::Conflict {
                id: record.id,
                expected: record.version,
            });
        }
        record.version += 1;
        *current = record.clone();
        Ok(record)
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        let inner = self.lock();
        let limit = query.page_size();
        let start = match &query.after {
            Some(after) => std::ops::Bound::Excluded(after.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let jobs: Vec<JobRecord> = inner
            .jobs
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, r)| r)
            .filter(|r| query.matches(r))
            .take(limit + 1)
            .cloned()
            .collect();
        Ok(Page::from_overfetch(jobs, limit))
    }

    async fn find_by_idempotency_key(
        &self,
        project: &str,
        key: &str,
    ) -> Result<Option<JobId>, Error> {
        let scope = respawn_core::job::idempotency_scope(project, key);
        Ok(self.lock().keys.get(&scope).cloned())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        respawn_core::conformance::ledger::run(&super::MemoryLedger::new()).await;
    }
}

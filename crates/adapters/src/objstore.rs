//! A ledger on any object store (S3, Azure Blob, GCS; `object_store`'s InMemory in
//! tests), for hosts without a database: Lambda functions keep their job records
//! in the job bucket itself.
//!
//! Layout, under the store's root:
//!
//! ```text
//! jobs/<id>/state                         the JobRecord (JSON); compare-and-swap by ETag
//! ledger/keys/<sha256(project, key)>      the job id holding an idempotency key
//! ledger/by-state/<state>/<id>/<version>  index entries for listing by state
//! ledger/by-label/<sha256(k=v)>/<id>      index entries for listing by label
//! ```
//!
//! The record is the truth; index entries are hints. An update writes the index
//! entry for its new state *before* the conditional put of the record and deletes
//! the entry for the old version after it, so a record is never missing from the
//! index of its state, and a stale entry (a crash between the two) is skipped when
//! the listing reads the record. Entries carry the version so that deleting an old
//! one can never remove a newer one.
//!
//! Needs conditional puts (`PutMode::Create` and `PutMode::Update`): S3, Azure, GCS
//! and InMemory have them; `LocalFileSystem` has no `Update` and answers
//! `NotSupported` on update (use the local SQLite ledger there).

mod keys;

use std::collections::BTreeSet;

use async_trait::async_trait;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use respawn_core::job::{JobId, JobRecord, JobState, idempotency_scope};
use respawn_core::ports::Blobs;
use respawn_core::ports::ledger::{Error, Ledger, ListQuery, Page};
use sha2::{Digest, Sha256};

pub use keys::{ObjectStoreSecrets, ObjectStoreTokens};

/// The object-store ledger.
#[derive(Debug, Clone)]
pub struct ObjectStoreLedger {
    store: Blobs,
}

impl ObjectStoreLedger {
    pub fn new(store: Blobs) -> Self {
        ObjectStoreLedger { store }
    }
}

fn record_path(id: &JobId) -> Path {
    Path::from(format!("jobs/{id}/state"))
}

fn key_path(scope: &str) -> Path {
    Path::from(format!(
        "ledger/keys/{}",
        hex::encode(Sha256::digest(scope.as_bytes()))
    ))
}

fn state_prefix(state: JobState) -> String {
    format!("ledger/by-state/{state}")
}

fn state_entry(r: &JobRecord) -> Path {
    Path::from(format!("{}/{}/{}", state_prefix(r.state), r.id, r.version))
}

fn label_prefix(k: &str, v: &str) -> String {
    let h = Sha256::digest(format!("{k}={v}").as_bytes());
    format!("ledger/by-label/{}", hex::encode(h))
}

fn store_err(e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotImplemented { .. } => {
            Error::NotSupported(format!("conditional update on this object store ({e})"))
        }
        other => Error::unavailable(other),
    }
}

fn encode(r: &JobRecord) -> Result<PutPayload, Error> {
    serde_json::to_vec(r)
        .map(PutPayload::from)
        .map_err(|e| Error::Corrupt {
            id: r.id.to_string(),
            message: e.to_string(),
        })
}

impl ObjectStoreLedger {
    /// The record and its ETag, or `None` when absent.
    async fn read(&self, id: &JobId) -> Result<Option<(JobRecord, UpdateVersion)>, Error> {
        let got = match self.store.get(&record_path(id)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err(e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(store_err)?;
        let record = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            id: id.to_string(),
            message: e.to_string(),
        })?;
        Ok(Some((record, version)))
    }

    async fn touch(&self, path: &Path) -> Result<(), Error> {
        self.store
            .put(path, PutPayload::new())
            .await
            .map(drop)
            .map_err(store_err)
    }

    /// Claims an idempotency key for `id`; `Err(AlreadyExists)` names the holder.
    async fn claim_key(&self, scope: &str, id: &JobId) -> Result<(), Error> {
        let path = key_path(scope);
        let opts = PutOptions::from(PutMode::Create);
        match self
            .store
            .put_opts(&path, id.to_string().into(), opts)
            .await
        {
            Ok(_) => return Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(store_err(e)),
        }
        let got = self.store.get(&path).await.map_err(store_err)?;
        let etag = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let holder =
            String::from_utf8_lossy(&got.bytes().await.map_err(store_err)?).parse::<JobId>();
        let holder = match holder {
            Ok(h) if &h == id => return Ok(()),
            Ok(h) => h,
            Err(_) => id.clone(),
        };
        if self.read(&holder).await?.is_some() {
            return Err(Error::AlreadyExists { id: holder });
        }
        // The holder died between claiming the key and writing its record: take the
        // claim over, by compare-and-swap so only one taker wins.
        let opts = PutOptions::from(PutMode::Update(etag));
        match self
            .store
            .put_opts(&path, id.to_string().into(), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::Precondition { .. }) => Err(Error::Conflict {
                id: id.clone(),
                expected: 0,
            }),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Ids with an index entry under `prefix`, after `after`, in order; at most `n`.
    async fn index_ids(
        &self,
        prefix: &str,
        after: Option<&JobId>,
        n: usize,
    ) -> Result<Vec<JobId>, Error> {
        let prefix_path = Path::from(prefix);
        let mut stream = match after {
            // Entries of `after` are `<after>/…`; '0' sorts right after '/', so this
            // offset skips them all and nothing else (ids have a fixed length).
            Some(a) => self
                .store
                .list_with_offset(Some(&prefix_path), &Path::from(format!("{prefix}/{a}0"))),
            None => self.store.list(Some(&prefix_path)),
        };
        let mut ids = BTreeSet::new();
        while let Some(meta) = stream.try_next().await.map_err(store_err)? {
            let rest = meta
                .location
                .as_ref()
                .strip_prefix(prefix)
                .unwrap_or_default();
            if let Some(id) = rest
                .trim_start_matches('/')
                .split('/')
                .next()
                .and_then(|s| s.parse().ok())
            {
                ids.insert(id);
            }
            if ids.len() >= n {
                break;
            }
        }
        Ok(ids.into_iter().collect())
    }
}

#[async_trait]
impl Ledger for ObjectStoreLedger {
    async fn create(&self, mut record: JobRecord) -> Result<JobRecord, Error> {
        record.version = 1;
        if let Some(scope) = record.idempotency_scope() {
            self.claim_key(&scope, &record.id).await?;
        }
        self.touch(&state_entry(&record)).await?;
        for (k, v) in &record.spec.labels {
            self.touch(&Path::from(format!("{}/{}", label_prefix(k, v), record.id)))
                .await?;
        }
        let opts = PutOptions::from(PutMode::Create);
        match self
            .store
            .put_opts(&record_path(&record.id), encode(&record)?, opts)
            .await
        {
            Ok(_) => Ok(record),
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(Error::AlreadyExists { id: record.id })
            }
            Err(e) => Err(store_err(e)),
        }
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord, Error> {
        self.read(id)
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| Error::NotFound { id: id.clone() })
    }

    async fn update(&self, mut record: JobRecord) -> Result<JobRecord, Error> {
        let Some((current, etag)) = self.read(&record.id).await? else {
            return Err(Error::NotFound { id: record.id });
        };
        let expected = record.version;
        if current.version != expected {
            return Err(Error::Conflict {
                id: record.id,
                expected,
            });
        }
        record.version = expected + 1;
        let new_entry = state_entry(&record);
        self.touch(&new_entry).await?;
        let opts = PutOptions::from(PutMode::Update(etag));
        match self
            .store
            .put_opts(&record_path(&record.id), encode(&record)?, opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::Precondition { .. }) => {
                let _ = self.store.delete(&new_entry).await;
                return Err(Error::Conflict {
                    id: record.id,
                    expected,
                });
            }
            Err(e) => return Err(store_err(e)),
        }
        // Best effort: a leftover entry is skipped by listings.
        let _ = self.store.delete(&state_entry(&current)).await;
        Ok(record)
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        let limit = query.page_size();
        let prefix = match (&query.label, query.state) {
            (Some((k, v)), _) => label_prefix(k, v),
            (None, Some(s)) => state_prefix(s),
            (None, None) => "jobs".to_owned(),
        };
        let mut jobs = Vec::new();
        let mut after = query.after.clone();
        // Stale index entries are skipped, so a page may need several index reads.
        loop {
            let ids = self.index_ids(&prefix, after.as_ref(), limit + 1).await?;
            let exhausted = ids.len() < limit + 1;
            for id in &ids {
                if let Some((r, _)) = self.read(id).await?
                    && query.matches(&r)
                {
                    jobs.push(r);
                }
                after = Some(id.clone());
                if jobs.len() > limit {
                    break;
                }
            }
            if jobs.len() > limit || exhausted {
                break;
            }
        }
        Ok(Page::from_overfetch(jobs, limit))
    }

    async fn find_by_idempotency_key(
        &self,
        project: &str,
        key: &str,
    ) -> Result<Option<JobId>, Error> {
        let path = key_path(&idempotency_scope(project, key));
        let got = match self.store.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err(e)),
        };
        let bytes = got.bytes().await.map_err(store_err)?;
        let Ok(id) = String::from_utf8_lossy(&bytes).parse::<JobId>() else {
            return Ok(None);
        };
        // A claim without a record is an interrupted create, not a job.
        Ok(self.read(&id).await?.map(|_| id))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use respawn_core::ports::ledger::Ledger;

    use super::*;

    #[tokio::test]
    async fn conformance_on_in_memory_store() {
        let ledger = ObjectStoreLedger::new(Arc::new(InMemory::new()));
        respawn_core::conformance::ledger::run(&ledger).await;
    }

    #[tokio::test]
    async fn local_filesystem_says_update_is_not_supported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("fs");
        let ledger = ObjectStoreLedger::new(Arc::new(fs));
        let rec = respawn_core::conformance::sample_record("fs", respawn_core::time::Timestamp(1));
        let stored = ledger
            .create(rec)
            .await
            .expect("create works (PutMode::Create)");
        match ledger.update(stored).await {
            Err(Error::NotSupported(msg)) => assert!(msg.contains("conditional update"), "{msg}"),
            other => panic!("expected NotSupported, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn stale_index_entries_are_skipped() {
        let store: Blobs = Arc::new(InMemory::new());
        let ledger = ObjectStoreLedger::new(store.clone());
        let rec =
            respawn_core::conformance::sample_record("stale", respawn_core::time::Timestamp(1));
        let stored = ledger.create(rec).await.expect("create");
        // A crash after the write-ahead index entry, before the record's update.
        let mut moved = stored.clone();
        moved.state = JobState::Running;
        moved.version = 2;
        store
            .put(&state_entry(&moved), PutPayload::new())
            .await
            .expect("put");
        let page = ledger
            .list(&ListQuery::in_state(JobState::Running))
            .await
            .expect("list");
        assert!(
            page.jobs.is_empty(),
            "the record is still pending; the entry is stale"
        );
        let page = ledger
            .list(&ListQuery::in_state(JobState::Pending))
            .await
            .expect("list");
        assert_eq!(page.jobs.len(), 1);
    }
}

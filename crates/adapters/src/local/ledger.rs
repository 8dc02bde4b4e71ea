use async_trait::async_trait;
use respawn_core::job::{JobId, JobRecord, idempotency_scope};
use respawn_core::ports::ledger::{Error, Ledger, ListQuery, Page};
use rusqlite::{Connection, OptionalExtension, params};

use super::LocalStore;
use super::writer::WriteError;

/// The durable local ledger.
#[derive(Debug, Clone)]
pub struct LocalLedger {
    store: LocalStore,
}

impl LocalLedger {
    pub(super) fn new(store: LocalStore) -> Self {
        LocalLedger { store }
    }

    /// Jobs stored, in all states.
    pub async fn count(&self) -> Result<u64, Error> {
        self.store
            .readers
            .read(|c| c.query_row("SELECT count(*) FROM jobs", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
            .map_err(Error::unavailable)
    }
}

fn unavailable(e: WriteError) -> Error {
    Error::unavailable(e)
}

fn encode(r: &JobRecord) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(r).map_err(|e| Error::Corrupt {
        id: r.id.to_string(),
        message: e.to_string(),
    })
}

fn decode(id: &str, bytes: &[u8]) -> Result<JobRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        id: id.to_owned(),
        message: e.to_string(),
    })
}

fn sql(e: rusqlite::Error) -> Error {
    Error::unavailable(e)
}

fn insert(c: &Connection, r: &JobRecord, body: &[u8]) -> Result<(), Error> {
    let scope = r.idempotency_scope();
    let holder: Option<String> = c
        .query_row(
            "SELECT id FROM jobs WHERE id = ?1 OR (?2 IS NOT NULL AND idem = ?2) LIMIT 1",
            params![r.id.as_str(), scope],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql)?;
    if let Some(holder) = holder {
        let id = holder.parse().unwrap_or_else(|_| r.id.clone());
        return Err(Error::AlreadyExists { id });
    }
    c.prepare_cached("INSERT INTO jobs (id, version, state, project, idem, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .and_then(|mut s| {
            s.execute(params![
                r.id.as_str(),
                r.version as i64,
                r.state.as_str(),
                r.project,
                scope,
                body
            ])
        })
        .map_err(sql)?;
    for (k, v) in &r.spec.labels {
        c.prepare_cached("INSERT OR IGNORE INTO job_labels (key, value, id) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![k, v, r.id.as_str()]))
            .map_err(sql)?;
    }
    Ok(())
}

fn compare_and_swap(
    c: &Connection,
    r: &JobRecord,
    expected: u64,
    body: &[u8],
) -> Result<(), Error> {
    let changed = c
        .prepare_cached(
            "UPDATE jobs SET version = ?1, state = ?2, project = ?3, record = ?4 WHERE id = ?5 AND version = ?6",
        )
        .and_then(|mut s| {
            s.execute(params![
                r.version as i64,
                r.state.as_str(),
                r.project,
                body,
                r.id.as_str(),
                expected as i64
            ])
        })
        .map_err(sql)?;
    if changed == 1 {
        return Ok(());
    }
    let exists: Option<i64> = c
        .query_row(
            "SELECT version FROM jobs WHERE id = ?1",
            [r.id.as_str()],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql)?;
    match exists {
        None => Err(Error::NotFound { id: r.id.clone() }),
        Some(_) => Err(Error::Conflict {
            id: r.id.clone(),
            expected,
        }),
    }
}

#[async_trait]
impl Ledger for LocalLedger {
    async fn create(&self, mut record: JobRecord) -> Result<JobRecord, Error> {
        record.version = 1;
        let body = encode(&record)?;
        let r = record.clone();
        self.store
            .writer
            .call(move |c| insert(c, &r, &body))
            .await
            .map_err(unavailable)??;
        Ok(record)
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord, Error> {
        let key = id.to_string();
        let body: Option<Vec<u8>> = self
            .store
            .readers
            .read(move |c| {
                c.prepare_cached("SELECT record FROM jobs WHERE id = ?1")?
                    .query_row([key], |row| row.get(0))
                    .optional()
            })
            .await
            .map_err(sql)?;
        match body {
            Some(b) => decode(id.as_str(), &b),
            None => Err(Error::NotFound { id: id.clone() }),
        }
    }

    async fn update(&self, mut record: JobRecord) -> Result<JobRecord, Error> {
        let expected = record.version;
        record.version += 1;
        let body = encode(&record)?;
        let r = record.clone();
        self.store
            .writer
            .call(move |c| compare_and_swap(c, &r, expected, &body))
            .await
            .map_err(unavailable)??;
        Ok(record)
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        let q = query.clone();
        let limit = query.page_size();
        let rows: Vec<(String, Vec<u8>)> = self
            .store
            .readers
            .read(move |c| select_page(c, &q, limit))
            .await
            .map_err(sql)?;
        let jobs = rows
            .iter()
            .map(|(id, body)| decode(id, body))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(jobs, limit))
    }

    async fn find_by_idempotency_key(
        &self,
        project: &str,
        key: &str,
    ) -> Result<Option<JobId>, Error> {
        let scope = idempotency_scope(project, key);
        let id: Option<String> = self
            .store
            .readers
            .read(move |c| {
                c.prepare_cached("SELECT id FROM jobs WHERE idem = ?1")?
                    .query_row([scope], |row| row.get(0))
                    .optional()
            })
            .await
            .map_err(sql)?;
        Ok(id.and_then(|s| s.parse().ok()))
    }
}

/// One page plus one row (to tell whether more follow), each filter served by an
/// index so a page costs the same however many jobs are stored.
fn select_page(
    c: &Connection,
    q: &ListQuery,
    limit: usize,
) -> rusqlite::Result<Vec<(String, Vec<u8>)>> {
    let after = q.after.as_ref().map(|a| a.to_string()).unwrap_or_default();
    let state = q.state.map(|s| s.as_str());
    let project = q.project.clone();
    let n = (limit + 1) as i64;
    let map = |row: &rusqlite::Row<'_>| Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?));
    if let Some((k, v)) = &q.label {
        let mut s = c.prepare_cached(
            "SELECT j.id, j.record FROM job_labels l JOIN jobs j ON j.id = l.id
             WHERE l.key = ?1 AND l.value = ?2 AND l.id > ?3
               AND (?4 IS NULL OR j.state = ?4) AND (?5 IS NULL OR j.project = ?5)
             ORDER BY l.id LIMIT ?6",
        )?;
        return s
            .query_map(params![k, v, after, state, project, n], map)?
            .collect();
    }
    if let Some(state) = state {
        let mut s = c.prepare_cached(
            "SELECT id, record FROM jobs WHERE state = ?1 AND id > ?2 AND (?3 IS NULL OR project = ?3)
             ORDER BY id LIMIT ?4",
        )?;
        return s
            .query_map(params![state, after, project, n], map)?
            .collect();
    }
    if let Some(project) = project {
        let mut s = c.prepare_cached(
            "SELECT id, record FROM jobs WHERE project = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        return s.query_map(params![project, after, n], map)?.collect();
    }
    let mut s =
        c.prepare_cached("SELECT id, record FROM jobs WHERE id > ?1 ORDER BY id LIMIT ?2")?;
    s.query_map(params![after, n], map)?.collect()
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::LocalStore::open(dir.path()).expect("open");
        respawn_core::conformance::ledger::run(&store.ledger()).await;
    }
}

//! The durable local ledger and queue of the embedded default: SQLite in WAL mode
//! with `synchronous=FULL`, under one data folder.
//!
//! Writes go through one writer thread that commits whatever requests have queued
//! up in one transaction (group commit) and answers each request only after that
//! commit returned: an `Ok` means the change is on disk, and many concurrent
//! callers share one fsync. Reads use their own connections and never wait for the
//! writer.

mod compute;
pub mod durable;
mod ledger;
mod queue;
pub mod sandbox;
mod secrets;
mod tokens;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use compute::{
    AgentCredentials, LocalCompute, LocalComputeConfig, credentials_path, detect_container_runtime,
    detect_gpus, kill_workload, sibling_binary, spawn_spot_chaos, vm_process_alive,
};
pub use ledger::LocalLedger;
pub use queue::LocalQueue;
pub use secrets::LocalSecrets;
pub use tokens::LocalTokens;
use writer::{Readers, Writer};

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the local store at {path}: {source}")]
pub struct OpenError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

/// The data folder's database, shared by the ledger and the queue.
#[derive(Debug, Clone)]
pub struct LocalStore {
    writer: Arc<Writer>,
    readers: Arc<Readers>,
    _checkpoints: Arc<writer::Checkpointer>,
}

const DB_FILE: &str = "respawn.db";

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS jobs (
    id       TEXT PRIMARY KEY,
    version  INTEGER NOT NULL,
    state    TEXT NOT NULL,
    project  TEXT NOT NULL,
    idem     TEXT UNIQUE,
    record   BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_by_project ON jobs (project, id);
CREATE TABLE IF NOT EXISTS job_labels (
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    id    TEXT NOT NULL,
    PRIMARY KEY (key, value, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    queue      TEXT NOT NULL,
    priority   INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    lease      INTEGER,
    reason     TEXT,
    body       BLOB NOT NULL,
    attrs      TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    id      TEXT PRIMARY KEY,
    hash    TEXT NOT NULL UNIQUE,
    project TEXT NOT NULL,
    record  TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, priority DESC, seq, visible_at);
";

impl LocalStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, OpenError> {
        let dir = dir.as_ref();
        let path = dir.join(DB_FILE);
        let err = |source| OpenError {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let conn = writer::connect(&path).map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        migrate(&conn).map_err(err)?;
        // The WAL is copied into the database by a connection of its own, so that
        // no commit waits for that copy (and its fsync).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(err)?;
        let checkpoints =
            writer::Checkpointer::start(writer::connect(&path).map_err(err)?).map_err(err)?;
        let writer = Writer::start(conn).map_err(err)?;
        Ok(LocalStore {
            writer: Arc::new(writer),
            readers: Arc::new(Readers::new(path)),
            _checkpoints: Arc::new(checkpoints),
        })
    }

    pub fn ledger(&self) -> LocalLedger {
        LocalLedger::new(self.clone())
    }

    pub fn tokens(&self) -> LocalTokens {
        LocalTokens::new(self.clone())
    }

    pub fn queue(&self, max_deliveries: u32) -> LocalQueue {
        LocalQueue::new(self.clone(), max_deliveries)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Brings a store made by an older respawn up to this schema.
fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let has_attrs: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'attrs'")?
        .exists([])?;
    if !has_attrs {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN attrs TEXT")?;
    }
    // When a message was sent, for the age of a queue's oldest (NULL in rows
    // sent before it was kept: their visible_at stands in).
    let has_sent_at: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'sent_at'")?
        .exists([])?;
    if !has_sent_at {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN sent_at INTEGER")?;
    }
    Ok(())
}

/// How durably a store connection writes, as SQLite reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// `wal`.
    pub journal_mode: String,
    /// 2 is `FULL`: every commit fsync'd before it returns.
    pub synchronous: i64,
}

fn durability_of(c: &rusqlite::Connection) -> rusqlite::Result<Durability> {
    Ok(Durability {
        journal_mode: c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?,
        synchronous: c.query_row("PRAGMA synchronous", [], |r| r.get(0))?,
    })
}

impl LocalStore {
    /// The settings of the writer's connection and of a reader's (which must not
    /// differ: a reader may be the one that checkpoints the WAL).
    pub async fn durability(&self) -> Result<(Durability, Durability), String> {
        let writer = self
            .writer
            .call(durability_of)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let reader = self
            .readers
            .read(durability_of)
            .await
            .map_err(|e| e.to_string())?;
        Ok((writer, reader))
    }

    /// Runs SQLite's integrity check; `Ok` when the file is sound.
    pub async fn check(&self) -> Result<(), String> {
        let verdict = self
            .readers
            .read(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)))
            .await
            .map_err(|e| e.to_string())?;
        if verdict == "ok" {
            Ok(())
        } else {
            Err(verdict)
        }
    }
}

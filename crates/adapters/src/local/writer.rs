//! Group commit: one thread owns the write connection and commits queued requests
//! together.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::thread;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

/// Requests committed in one transaction at most. Bounds the latency a request
/// waits behind others.
const MAX_BATCH: usize = 1024;

/// Opens a connection with the pragmas every connection needs.
pub(super) fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // WAL: readers never block the writer. synchronous=FULL: a commit is on disk
    // (fsync'd) before it returns, so nothing acknowledged is lost, even on power loss.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

/// How often the WAL is checkpointed (copied into the database file).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Checkpoints the WAL from its own thread and connection (the writer's has
/// `wal_autocheckpoint` off) until dropped. PASSIVE: it never blocks a commit; pages
/// a reader still needs wait for the next round.
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Checkpointer {
    pub(super) fn start(conn: Connection) -> rusqlite::Result<Self> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        thread::Builder::new()
            .name("respawn-store-checkpoint".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    thread::sleep(CHECKPOINT_EVERY);
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed");
                    }
                }
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer { stop })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A request: run on the connection (or, with `None`, told it could not run) and
/// give back whether it succeeded and how to answer its caller after the commit.
type Op = Box<dyn FnOnce(Option<&Connection>) -> (bool, Reply) + Send>;

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
#[error("local store write failed: {0}")]
pub(super) struct WriteError(pub String);

#[derive(Debug)]
pub(super) struct Writer {
    tx: Mutex<Option<mpsc::Sender<Op>>>,
}

impl Writer {
    pub(super) fn start(conn: Connection) -> rusqlite::Result<Self> {
        let (tx, rx) = mpsc::channel::<Op>();
        thread::Builder::new()
            .name("respawn-store-writer".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Writer {
            tx: Mutex::new(Some(tx)),
        })
    }

    /// Runs `f` inside the next group transaction and returns its result once that
    /// transaction is committed. If `f` fails, its own changes are rolled back and the
    /// others in the group still commit.
    pub(super) async fn call<T, E>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<Result<T, E>, WriteError>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel();
        let op: Op = Box::new(move |conn: Option<&Connection>| {
            let Some(conn) = conn else {
                let reply: Reply = Box::new(move |why: Result<(), String>| {
                    let why = why.err().unwrap_or_else(|| "not run".into());
                    let _ = done_tx.send(Err(why));
                });
                return (false, reply);
            };
            let result = f(conn);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |committed: Result<(), String>| {
                let _ = done_tx.send(committed.map(|()| result));
            });
            (ok, reply)
        });
        let sender = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| WriteError("store closed".into()))?;
        sender
            .send(op)
            .map_err(|_| WriteError("writer thread stopped".into()))?;
        match done_rx.await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(WriteError(e)),
            Err(_) => Err(WriteError("writer thread stopped".into())),
        }
    }
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, batch);
    }
}

fn commit_batch(conn: &mut Connection, batch: Vec<Op>) {
    let mut replies = Vec::with_capacity(batch.len());
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "cannot begin a transaction");
            // Never run a request outside a transaction; tell its caller instead.
            for op in batch {
                let (_, reply) = op(None);
                reply(Err(e.to_string()));
            }
            return;
        }
    };
    for op in batch {
        if let Err(e) = tx.execute_batch("SAVEPOINT op") {
            let (_, reply) = op(None);
            reply(Err(e.to_string()));
            continue;
        }
        let (ok, reply) = op(Some(&tx));
        let end = if ok {
            tx.execute_batch("RELEASE op")
        } else {
            tx.execute_batch("ROLLBACK TO op; RELEASE op")
        };
        if let Err(e) = end {
            tracing::error!(error = %e, "savepoint failed");
        }
        replies.push(reply);
    }
    let committed = tx.commit().map_err(|e| e.to_string());
    if let Err(e) = &committed {
        tracing::error!(error = %e, "group commit failed");
    }
    for reply in replies {
        reply(committed.clone());
    }
}

/// A small pool of read connections.
#[derive(Debug)]
pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub(super) fn new(path: PathBuf) -> Self {
        Readers {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on a read connection, off the async threads.
    pub(super) async fn read<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> rusqlite::Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match conn {
                Some(c) => c,
                None => connect(&this.path)?,
            };
            let out = f(&conn);
            this.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
            out
        })
        .await
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?
    }
}

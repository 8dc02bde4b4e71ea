//! The local bucket folder as an event source: new files raise blob-created events,
//! through a file watcher, plus a scan at start (files dropped while the broker was
//! down) and a periodic rescan (events a watcher can drop under load). Trigger rules'
//! idempotency keys (rule + key + version) make seeing a file twice harmless.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use notify::{RecursiveMode, Watcher};
use respawn_core::handlers::{BlobCreated, blob_created};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::Stack;

const RESCAN_EVERY: Duration = Duration::from_secs(30);
/// A file must be unchanged this long before it counts as complete.
const SETTLE: Duration = Duration::from_millis(300);

/// Keys the broker writes itself; never a trigger.
fn is_internal(key: &str) -> bool {
    key.starts_with("jobs/")
        || key.starts_with("ledger/")
        || key.contains("/.")
        || key.starts_with('.')
}

fn key_of(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let key = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/");
    (!key.is_empty() && !is_internal(&key)).then_some(key)
}

/// The version of a file: its size and modification time, as a local ETag.
fn version(path: &Path) -> Option<(String, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some((format!("{:x}-{:x}", mtime, meta.len()), meta.len()))
}

fn scan(root: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if !p.file_name().is_some_and(|n| n == "jobs" || n == "ledger") {
                scan(&p, out);
            }
        } else {
            out.push(p);
        }
    }
}

async fn handle(stack: &Stack, root: &Path, path: &Path, seen: &mut HashMap<String, String>) {
    let Some(key) = key_of(root, path) else {
        return;
    };
    let Some((version, size)) = version(path) else {
        return;
    };
    if seen.get(&key) == Some(&version) {
        return;
    }
    let rules = stack.rules.read().map(|r| r.clone()).unwrap_or_default();
    let event = BlobCreated {
        key: key.clone(),
        version: version.clone(),
        size,
    };
    match blob_created(&stack.ports, &rules, &event).await {
        Ok(submitted) => {
            seen.insert(key.clone(), version);
            for s in submitted.iter().filter(|s| s.created) {
                info!(job_id = %s.job.id, attempt = s.job.attempt, key = %key, "job created from bucket event");
            }
        }
        Err(e) => {
            warn!(key = %key, error = %e, "cannot handle bucket event; will retry on the next scan")
        }
    }
}

/// Watches the bucket folder until `stop`.
pub async fn watch(stack: Stack, mut stop: watch::Receiver<bool>) {
    let root = stack.config.data.join("bucket");
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && matches!(
                ev.kind,
                notify::EventKind::Create(_) | notify::EventKind::Modify(_)
            )
        {
            for p in ev.paths {
                let _ = tx.send(p);
            }
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&root, RecursiveMode::Recursive) {
            Ok(()) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch the bucket; relying on rescans");
                None
            }
        },
        Err(e) => {
            warn!(error = %e, "no file watcher; relying on rescans");
            None
        }
    };
    let mut seen = HashMap::new();
    let mut pending: HashMap<PathBuf, tokio::time::Instant> = HashMap::new();
    let mut all = Vec::new();
    scan(&root, &mut all);
    for p in all {
        handle(&stack, &root, &p, &mut seen).await;
    }
    let mut rescan = tokio::time::interval(RESCAN_EVERY);
    let mut settle_tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
            Some(p) = rx.recv() => {
                // Wait for writes to settle: a file being copied in raises many events.
                pending.insert(p, tokio::time::Instant::now() + SETTLE);
            }
            _ = settle_tick.tick() => {
                let now = tokio::time::Instant::now();
                let ready: Vec<PathBuf> = pending.iter().filter(|(_, t)| **t <= now).map(|(p, _)| p.clone()).collect();
                for p in ready {
                    pending.remove(&p);
                    // A new folder: files written into it before the watcher
                    // covered it raise no events of their own.
                    let mut files = Vec::new();
                    if p.is_dir() {
                        scan(&p, &mut files);
                    } else {
                        files.push(p);
                    }
                    for f in files {
                        handle(&stack, &root, &f, &mut seen).await;
                    }
                }
            }
            _ = rescan.tick() => {
                let mut all = Vec::new();
                scan(&root, &mut all);
                for p in all {
                    handle(&stack, &root, &p, &mut seen).await;
                }
            }
        }
    }
}

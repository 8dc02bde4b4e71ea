//! Checkpoints in object storage: a checkpoint is complete only when its manifest,
//! written after every file, exists and every file matches it. A torn upload (a VM
//! killed mid-way) has no manifest, or files that disagree with it, and is never
//! restored.

use std::path::{Path as FsPath, PathBuf};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::JobId;
use crate::layout;

/// The last object of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub seq: u64,
    pub attempt: u32,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {seq}: {message}")]
    Invalid { seq: u64, message: String },
}

fn io(path: &FsPath) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Files under `dir`, relative, sorted; skips names starting with `.`.
fn rel_key(p: &FsPath) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Uploads `dir` as checkpoint `seq` of `job`: every file, then the manifest.
pub async fn upload(
    store: &dyn ObjectStore,
    job: &JobId,
    attempt: u32,
    seq: u64,
    dir: &FsPath,
) -> Result<Manifest, Error> {
    let base = layout::checkpoint_dir(job, seq);
    let mut files = Vec::new();
    // The workload wrote this folder: links in it are not followed out of it.
    for rel in crate::beneath::files(dir, true).map_err(io(dir))? {
        let abs = dir.join(&rel);
        let bytes = crate::beneath::read(dir, &rel).map_err(io(&abs))?;
        let key = rel_key(&rel);
        files.push(FileEntry {
            path: key.clone(),
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        });
        store
            .put(
                &Path::from(format!("{base}/{key}")),
                PutPayload::from(bytes),
            )
            .await?;
    }
    let manifest = Manifest {
        seq,
        attempt,
        files,
    };
    let body = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Invalid {
        seq,
        message: e.to_string(),
    })?;
    store
        .put(
            &Path::from(format!("{base}/{}", layout::MANIFEST)),
            body.into(),
        )
        .await?;
    Ok(manifest)
}

/// Sequence numbers that have a manifest, newest first.
pub async fn committed(store: &dyn ObjectStore, job: &JobId) -> Result<Vec<u64>, Error> {
    let prefix = layout::checkpoints(job);
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    let mut seqs: Vec<u64> = metas
        .iter()
        .filter(|m| m.location.filename() == Some(layout::MANIFEST))
        .filter_map(|m| {
            let parts: Vec<_> = m.location.parts().collect();
            parts
                .get(parts.len().checked_sub(2)?)?
                .as_ref()
                .parse()
                .ok()
        })
        .collect();
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    Ok(seqs)
}

async fn read_manifest(store: &dyn ObjectStore, job: &JobId, seq: u64) -> Result<Manifest, Error> {
    let path = Path::from(format!(
        "{}/{}",
        layout::checkpoint_dir(job, seq),
        layout::MANIFEST
    ));
    let bytes = store.get(&path).await?.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Invalid {
        seq,
        message: format!("unreadable manifest: {e}"),
    })
}

/// Downloads checkpoint `seq` into `into/<seq>/`, verifying every file against the
/// manifest, and marks it complete with `.complete` last.
pub async fn download(
    store: &dyn ObjectStore,
    job: &JobId,
    seq: u64,
    into: &FsPath,
) -> Result<Manifest, Error> {
    let manifest = read_manifest(store, job, seq).await?;
    let dest = into.join(seq.to_string());
    let staging = into.join(format!(".{seq}.partial"));
    let _ = tokio::fs::remove_dir_all(&staging).await;
    let base = layout::checkpoint_dir(job, seq);
    for f in &manifest.files {
        if f.path.split('/').any(|s| s == ".." || s.is_empty()) {
            return Err(Error::Invalid {
                seq,
                message: format!("unsafe path {:?} in manifest", f.path),
            });
        }
        let bytes = store
            .get(&Path::from(format!("{base}/{}", f.path)))
            .await?
            .bytes()
            .await?;
        if bytes.len() as u64 != f.size || hex::encode(Sha256::digest(&bytes)) != f.sha256 {
            return Err(Error::Invalid {
                seq,
                message: format!("{} does not match the manifest", f.path),
            });
        }
        let path = staging.join(&f.path);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(parent))?;
        }
        tokio::fs::write(&path, &bytes).await.map_err(io(&path))?;
    }
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(io(&staging))?;
    let _ = tokio::fs::remove_dir_all(&dest).await;
    tokio::fs::rename(&staging, &dest)
        .await
        .map_err(io(&dest))?;
    let marker = dest.join(".complete");
    tokio::fs::write(&marker, b"").await.map_err(io(&marker))?;
    Ok(manifest)
}

/// Restores the newest checkpoint that downloads and verifies; `None` when there is none.
pub async fn restore_newest(
    store: &dyn ObjectStore,
    job: &JobId,
    into: &FsPath,
) -> Result<Option<Manifest>, Error> {
    for seq in committed(store, job).await? {
        match download(store, job, seq, into).await {
            Ok(m) => return Ok(Some(m)),
            Err(e @ Error::Invalid { .. }) => {
                tracing::warn!(job_id = %job, seq, error = %e, "skipping a checkpoint that does not verify");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Deletes all but the newest `keep` committed checkpoints (manifest first, so a
/// half-deleted one is never taken for complete).
pub async fn prune(store: &dyn ObjectStore, job: &JobId, keep: usize) -> Result<(), Error> {
    for seq in committed(store, job).await?.into_iter().skip(keep) {
        let base = layout::checkpoint_dir(job, seq);
        store
            .delete(&Path::from(format!("{base}/{}", layout::MANIFEST)))
            .await?;
        let rest: Vec<_> = store.list(Some(&base)).try_collect().await?;
        for m in rest {
            store.delete(&m.location).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::*;
    use crate::time::Timestamp;

    #[tokio::test]
    async fn round_trip_and_torn_uploads() {
        let store = Arc::new(InMemory::new());
        let job = JobId::generate(Timestamp(1));
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("weights.bin"), b"abc").unwrap();
        std::fs::write(src.path().join("sub/opt.bin"), b"defg").unwrap();
        std::fs::write(src.path().join(".complete"), b"").unwrap();
        upload(store.as_ref(), &job, 1, 100, src.path())
            .await
            .unwrap();
        // A torn upload: files of 200 but no manifest.
        store
            .put(
                &Path::from(format!("{}/weights.bin", layout::checkpoint_dir(&job, 200))),
                "x".into(),
            )
            .await
            .unwrap();
        assert_eq!(committed(store.as_ref(), &job).await.unwrap(), vec![100]);
        let dst = tempfile::tempdir().unwrap();
        let m = restore_newest(store.as_ref(), &job, dst.path())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.seq, 100);
        assert_eq!(
            std::fs::read(dst.path().join("100/sub/opt.bin")).unwrap(),
            b"defg"
        );
        assert!(dst.path().join("100/.complete").exists());
        assert_eq!(m.files.len(), 2, "dot files are not part of a checkpoint");
    }

    #[tokio::test]
    async fn links_in_a_checkpoint_are_not_uploaded() {
        let store = Arc::new(InMemory::new());
        let job = JobId::generate(Timestamp(1));
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("admin-token"), b"secret").unwrap();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("w"), b"one").unwrap();
        std::os::unix::fs::symlink(outside.path().join("admin-token"), src.path().join("token"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), src.path().join("up")).unwrap();
        let m = upload(store.as_ref(), &job, 1, 1, src.path())
            .await
            .unwrap();
        let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["w"]);
        // A checkpoint folder that is itself a link is refused outright.
        let link = src.path().join("linked");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        assert!(upload(store.as_ref(), &job, 1, 2, &link).await.is_err());
    }

    #[tokio::test]
    async fn corrupt_files_fall_back_to_an_older_checkpoint() {
        let store = Arc::new(InMemory::new());
        let job = JobId::generate(Timestamp(1));
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("w"), b"one").unwrap();
        upload(store.as_ref(), &job, 1, 1, src.path())
            .await
            .unwrap();
        std::fs::write(src.path().join("w"), b"two").unwrap();
        upload(store.as_ref(), &job, 1, 2, src.path())
            .await
            .unwrap();
        store
            .put(
                &Path::from(format!("{}/w", layout::checkpoint_dir(&job, 2))),
                "tw".into(),
            )
            .await
            .unwrap();
        let dst = tempfile::tempdir().unwrap();
        let m = restore_newest(store.as_ref(), &job, dst.path())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.seq, 1);
        prune(store.as_ref(), &job, 1).await.unwrap();
        assert_eq!(committed(store.as_ref(), &job).await.unwrap(), vec![2]);
    }
}

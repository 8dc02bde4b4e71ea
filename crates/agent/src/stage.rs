//! Inputs in, outputs out.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use respawn_core::blob_uri::Store;
use respawn_core::spec::JobSpec;
use respawn_core::{JobId, layout};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{uri}: {message}")]
    Uri { uri: String, message: String },
    #[error("{0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A URI's place: a key in the respawn bucket, or a local path.
enum Location {
    Bucket(String),
    File(PathBuf),
}

/// Where `uri` is: `bucket://` and a URI naming the agent's own bucket (`own`,
/// its `--bucket`: `s3://name`, `az://container@account`) are keys in it, in any
/// of the forms [`respawn_core::blob_uri`] reads; `file://` a local path.
fn locate(uri: &str, own: &str) -> Result<Location, Error> {
    let parsed = respawn_core::blob_uri::parse(uri).map_err(|message| Error::Uri {
        uri: uri.to_owned(),
        message,
    })?;
    let own = respawn_core::blob_uri::parse(own).ok();
    match parsed.store {
        Store::Bucket => Ok(Location::Bucket(parsed.key.to_owned())),
        Store::File => Ok(Location::File(PathBuf::from(parsed.key))),
        _ if own.as_ref().is_some_and(|o| parsed.is_in(o)) => {
            Ok(Location::Bucket(parsed.key.to_owned()))
        }
        _ => Err(Error::Uri {
            uri: uri.to_owned(),
            message: "names another bucket than the job's: put it in the job's bucket (bucket://KEY names a key there)".into(),
        }),
    }
}

fn last_segment(s: &str) -> String {
    s.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Stages every input into `into`.
pub async fn inputs(
    bucket: &dyn ObjectStore,
    own: &str,
    spec: &JobSpec,
    into: &Path,
) -> Result<(), Error> {
    for input in &spec.inputs {
        let name = input
            .path
            .clone()
            .unwrap_or_else(|| last_segment(&input.uri));
        let dest = into.join(&name);
        match locate(&input.uri, own)? {
            Location::Bucket(key) => copy_from_bucket(bucket, &input.uri, &key, &dest).await?,
            Location::File(path) => copy_local(&path, &dest)?,
        }
    }
    Ok(())
}

async fn copy_from_bucket(
    bucket: &dyn ObjectStore,
    uri: &str,
    key: &str,
    dest: &Path,
) -> Result<(), Error> {
    if !key.ends_with('/') {
        match bucket.get(&Key::from(key)).await {
            Ok(got) => return write(dest, &got.bytes().await?).await,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // A folder: every object under it.
    let prefix = Key::from(key.trim_end_matches('/'));
    let objects: Vec<_> = bucket.list(Some(&prefix)).try_collect().await?;
    if objects.is_empty() {
        return Err(Error::Uri {
            uri: uri.to_owned(),
            message: "no such object or folder in the bucket".into(),
        });
    }
    for meta in objects {
        let rel = meta.location.prefix_match(&prefix).map(|parts| {
            parts
                .map(|p| p.as_ref().to_owned())
                .collect::<Vec<_>>()
                .join("/")
        });
        let Some(rel) = rel else { continue };
        let bytes = bucket.get(&meta.location).await?.bytes().await?;
        write(&dest.join(rel), &bytes).await?;
    }
    Ok(())
}

async fn write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io(parent))?;
    }
    tokio::fs::write(path, bytes).await.map_err(io(path))
}

fn copy_local(from: &Path, to: &Path) -> Result<(), Error> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(io(to))?;
        for entry in std::fs::read_dir(from).map_err(io(from))? {
            let entry = entry.map_err(io(from))?;
            copy_local(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::copy(from, to).map(drop).map_err(io(from))
    }
}

/// `file://` outputs: the same walk as to the bucket, into a local folder.
fn outputs_to_folder(from: &Path, to: &Path) -> Result<(), Error> {
    for rel in respawn_core::beneath::files(from, false).map_err(io(from))? {
        let bytes = respawn_core::beneath::read(from, &rel).map_err(io(&from.join(&rel)))?;
        let dest = to.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&dest, bytes).map_err(io(&dest))?;
    }
    Ok(())
}

fn rel_key(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Uploads everything in `from` to the spec's outputs (default: the job's prefix).
pub async fn outputs(
    bucket: &dyn ObjectStore,
    own: &str,
    spec: &JobSpec,
    job: &JobId,
    from: &Path,
) -> Result<(), Error> {
    let base = match &spec.outputs {
        Some(uri) => match locate(uri, own)? {
            Location::Bucket(key) => key.trim_end_matches('/').to_owned(),
            Location::File(path) => return outputs_to_folder(from, &path),
        },
        None => layout::outputs(job).to_string(),
    };
    // The workload wrote this folder: its links are not followed out of it (an
    // `output/x -> /etc/shadow` is skipped, an `output` that is a link refused).
    for rel in respawn_core::beneath::files(from, false).map_err(io(from))? {
        let bytes = respawn_core::beneath::read(from, &rel).map_err(io(&from.join(&rel)))?;
        let key = format!("{base}/{}", rel_key(&rel));
        bucket.put(&Key::from(key), PutPayload::from(bytes)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uri: &str, own: &str) -> Option<String> {
        match locate(uri, own) {
            Ok(Location::Bucket(k)) => Some(k),
            _ => None,
        }
    }

    #[test]
    fn the_jobs_own_bucket_is_a_key_in_any_form() {
        let own = "az://jobs@acct";
        for uri in [
            "bucket://projects/p/a.csv",
            "az://jobs/projects/p/a.csv",
            "abfss://jobs@acct.dfs.core.windows.net/projects/p/a.csv",
            "https://acct.blob.core.windows.net/jobs/projects/p/a.csv",
        ] {
            assert_eq!(key(uri, own).as_deref(), Some("projects/p/a.csv"), "{uri}");
        }
        assert_eq!(
            key("s3://data/projects/p/a.csv", "s3://data").as_deref(),
            Some("projects/p/a.csv")
        );
    }

    #[test]
    fn another_bucket_is_refused_with_what_to_do() {
        for (uri, own) in [
            (
                "https://other.blob.core.windows.net/jobs/a.csv",
                "az://jobs@acct",
            ),
            ("az://elsewhere/a.csv", "az://jobs@acct"),
            ("s3://other/a.csv", "s3://data"),
            ("s3://data/a.csv", "/var/lib/respawn/bucket"),
        ] {
            match locate(uri, own) {
                Err(Error::Uri { message, .. }) => {
                    assert!(message.contains("bucket://"), "{uri}: {message}")
                }
                _ => panic!("{uri} from {own}: expected a refusal"),
            }
        }
    }
}

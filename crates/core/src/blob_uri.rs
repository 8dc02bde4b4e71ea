//! The blob URIs a spec may name, parsed once for everyone who reads them: the
//! validator (what is wrong, and where), the project rules (which key a URI
//! reaches) and the agent (whether it is the job's own bucket).
//!
//! | form | store |
//! | --- | --- |
//! | `bucket://KEY` | the broker's bucket, whatever it is |
//! | `s3://BUCKET/KEY` | an S3 bucket |
//! | `az://CONTAINER/KEY`, `azure://…` | an Azure Blob storage container (`CONTAINER@ACCOUNT` names the account) |
//! | `abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/KEY`, `abfs://…` | the same, as Data Lake Storage names it |
//! | `https://ACCOUNT.blob.core.windows.net/CONTAINER/KEY` | the same, as a blob's URL |
//! | `gs://BUCKET/KEY` | a Google Cloud Storage bucket |
//! | `file:///PATH` | a path on the broker's host |

/// Which kind of store a URI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The broker's own bucket (`bucket://`).
    Bucket,
    S3,
    Azure,
    Gcs,
    File,
}

/// A blob URI's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobUri<'a> {
    pub store: Store,
    /// The bucket or container (empty for `bucket://` and `file://`).
    pub container: &'a str,
    /// The Azure storage account, where the URI names one.
    pub account: Option<&'a str>,
    /// The key within it (the path, for `file://`), without a leading `/`.
    pub key: &'a str,
}

/// The first segment of `rest` and what follows it.
fn first_segment(rest: &str) -> (&str, &str) {
    rest.split_once('/').unwrap_or((rest, ""))
}

/// `name@account` (the account optional).
fn with_account(s: &str) -> (&str, Option<&str>) {
    match s.split_once('@') {
        Some((name, account)) => (name, Some(account)),
        None => (s, None),
    }
}

/// Parses `uri`, or says what is wrong with it.
pub fn parse(uri: &str) -> Result<BlobUri<'_>, String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| format!("expected a URI such as s3://bucket/key, got {uri:?}"))?;
    let parsed = match scheme {
        "bucket" => BlobUri {
            store: Store::Bucket,
            container: "",
            account: None,
            key: rest.trim_start_matches('/'),
        },
        "file" => BlobUri {
            store: Store::File,
            container: "",
            account: None,
            key: rest,
        },
        "s3" | "gs" => {
            let (bucket, key) = first_segment(rest);
            BlobUri {
                store: if scheme == "s3" {
                    Store::S3
                } else {
                    Store::Gcs
                },
                container: bucket,
                account: None,
                key,
            }
        }
        "az" | "azure" => {
            let (first, key) = first_segment(rest);
            let (container, account) = with_account(first);
            BlobUri {
                store: Store::Azure,
                container,
                account,
                key,
            }
        }
        "abfss" | "abfs" => {
            let (first, key) = first_segment(rest);
            let (container, host) = with_account(first);
            let account = host.and_then(|h| h.split_once(".dfs.")).map(|(a, _)| a);
            if account.is_none_or(str::is_empty) || container.is_empty() {
                return Err(format!(
                    "expected {scheme}://CONTAINER@ACCOUNT.dfs.core.windows.net/KEY, got {uri:?}"
                ));
            }
            BlobUri {
                store: Store::Azure,
                container,
                account,
                key,
            }
        }
        "https" => {
            let (host, path) = first_segment(rest);
            let account = host.split_once(".blob.").map(|(a, _)| a);
            let (container, key) = first_segment(path);
            if account.is_none_or(str::is_empty) || container.is_empty() {
                return Err(format!(
                    "https:// URIs name Azure Blob storage: expected https://ACCOUNT.blob.core.windows.net/CONTAINER/KEY, got {uri:?}"
                ));
            }
            BlobUri {
                store: Store::Azure,
                container,
                account,
                key,
            }
        }
        other => {
            return Err(format!(
                "unsupported scheme {other:?}; expected one of bucket, s3, az, abfss, https (Azure Blob storage), gs, file"
            ));
        }
    };
    if parsed.store != Store::Bucket && parsed.store != Store::File && parsed.container.is_empty() {
        return Err(format!("expected a bucket or container in {uri:?}"));
    }
    Ok(BlobUri {
        key: if parsed.store == Store::File {
            parsed.key
        } else {
            parsed.key.trim_start_matches('/')
        },
        ..parsed
    })
}

impl BlobUri<'_> {
    /// Whether this URI is in the store `bucket` names (both parsed): the same
    /// kind and bucket or container, and the same account where both name one.
    pub fn is_in(&self, bucket: &BlobUri<'_>) -> bool {
        self.store == bucket.store
            && self.container == bucket.container
            && match (self.account, bucket.account) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_form_names_its_store_and_key() {
        let cases = [
            (
                "bucket://incoming/a.csv",
                Store::Bucket,
                "",
                None,
                "incoming/a.csv",
            ),
            (
                "s3://data/incoming/a.csv",
                Store::S3,
                "data",
                None,
                "incoming/a.csv",
            ),
            (
                "az://jobs/incoming/a.csv",
                Store::Azure,
                "jobs",
                None,
                "incoming/a.csv",
            ),
            (
                "az://jobs@acct/incoming/a.csv",
                Store::Azure,
                "jobs",
                Some("acct"),
                "incoming/a.csv",
            ),
            (
                "abfss://jobs@acct.dfs.core.windows.net/incoming/a.csv",
                Store::Azure,
                "jobs",
                Some("acct"),
                "incoming/a.csv",
            ),
            (
                "https://acct.blob.core.windows.net/jobs/incoming/a.csv",
                Store::Azure,
                "jobs",
                Some("acct"),
                "incoming/a.csv",
            ),
            ("gs://data/x", Store::Gcs, "data", None, "x"),
            ("file:///data/x", Store::File, "", None, "/data/x"),
        ];
        for (uri, store, container, account, key) in cases {
            let p = parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(
                (p.store, p.container, p.account, p.key),
                (store, container, account, key),
                "{uri}"
            );
        }
    }

    #[test]
    fn malformed_uris_say_what_is_expected() {
        for (uri, says) in [
            ("https://example.com/x", "ACCOUNT.blob.core.windows.net"),
            ("abfss://jobs/x", "CONTAINER@ACCOUNT.dfs.core.windows.net"),
            ("ftp://x/y", "unsupported scheme"),
            ("s3:///key", "bucket or container"),
            ("data/x", "expected a URI"),
        ] {
            let e = parse(uri).expect_err(uri);
            assert!(e.contains(says), "{uri}: {e}");
        }
    }

    #[test]
    fn a_uri_is_in_its_own_container_only() {
        let own = parse("az://jobs@acct").unwrap();
        for (uri, inside) in [
            ("az://jobs/x", true),
            ("https://acct.blob.core.windows.net/jobs/x", true),
            ("abfss://jobs@acct.dfs.core.windows.net/x", true),
            ("https://other.blob.core.windows.net/jobs/x", false),
            ("az://other/x", false),
            ("s3://jobs/x", false),
        ] {
            assert_eq!(parse(uri).unwrap().is_in(&own), inside, "{uri}");
        }
    }
}

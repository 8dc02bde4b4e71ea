//! Blob created: a file appeared in the bucket; every trigger rule it matches makes a job.

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Error;
use super::submit::{Submission, Submitted, submit};
use crate::ports::Ports;
use crate::trigger::{TriggerRule, check_key};

/// A new object (or a new version of one) in the bucket, from an S3 notification,
/// an Event Grid `BlobCreated` event or the local bucket folder's watcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobCreated {
    /// The object's key. Untrusted: whoever can write to the bucket chooses it.
    pub key: String,
    /// What identifies this version of the object (ETag, version id, or mtime and
    /// size for a local file). A new version makes new jobs; the same one, none.
    pub version: String,
    pub size: u64,
}

/// Submits one job per trigger rule that takes the blob, in rule order, and returns
/// the submissions. Delivering the same event again finds the jobs it made (each
/// job's idempotency key is derived from rule, key and version), so a host may retry
/// the whole event after an error; that is also why a failing submission stops here
/// with its error rather than being skipped. A rule whose template cannot make a
/// valid job from this blob is logged and skipped, leaving the other rules to run.
pub async fn blob_created(
    ports: &Ports,
    rules: &[TriggerRule],
    event: &BlobCreated,
) -> Result<Vec<Submitted>, Error> {
    if let Err(reason) = check_key(&event.key) {
        // Debug formatting escapes whatever the key holds, so it cannot forge log lines.
        warn!(key = ?event.key, version = ?event.version, %reason, "blob key refused; no job made");
        return Ok(Vec::new());
    }
    let key = &event.key;
    let mut submitted = Vec::new();
    let mut matched = false;
    for rule in rules {
        let Some(bindings) = rule.matches(event) else {
            continue;
        };
        matched = true;
        let spec = match rule.render(&bindings) {
            Ok(spec) => spec,
            Err(e) => {
                warn!(rule = %rule.name, key = %key, error = %e, "trigger rule cannot make a job from this blob; rule skipped");
                continue;
            }
        };
        let sub = submit(
            ports,
            Submission {
                spec,
                project: rule.project.clone(),
                reply_to: None,
                // Trigger rules are the operator's files.
                local_files: true,
            },
        )
        .await?;
        info!(
            rule = %rule.name,
            key = %key,
            version = ?event.version,
            job_id = %sub.job.id,
            created = sub.created,
            "blob triggered a job"
        );
        submitted.push(sub);
    }
    if !matched {
        info!(key = %key, version = ?event.version, "no trigger rule matches");
    }
    Ok(submitted)
}

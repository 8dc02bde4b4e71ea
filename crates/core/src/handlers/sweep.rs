//! Parameter sweeps: submit an array of jobs, and see how far it got.

use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::info;

use super::Error;
use super::submit::{Submission, submit};
use crate::job::{JobId, JobRecord, JobState};
use crate::ports::Ports;
use crate::ports::ledger::{ListQuery, MAX_PAGE};
use crate::sweep::{ARRAY_LABEL, INDEX_LABEL, SweepSpec};
use crate::time::Timestamp;

/// Submissions in flight at once: enough that a 10,000-job sweep is not 10,000
/// round trips end to end and that the ledger's group commit gets full batches,
/// few enough not to flood a cloud ledger. A 10,000-job sweep through a debug
/// `respawn up` took 2.9 s at 16 and 1.4–1.8 s at 128 (512 was no faster); the API
/// fuzzer's 10 s response limit failed at 16 on a loaded CI machine.
const CONCURRENCY: usize = 128;

/// The array a sweep made, or found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArraySubmitted {
    /// The array's id: what its jobs carry in the `respawn.array` label.
    pub array: String,
    /// The jobs in index order.
    pub jobs: Vec<JobId>,
    /// How many of them this call made; the others already existed.
    pub created: usize,
}

/// Where an array's jobs are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArrayProgress {
    pub array: String,
    pub total: usize,
    /// Jobs per state; states no job is in are absent.
    pub counts: BTreeMap<JobState, usize>,
    /// The jobs in index order.
    pub jobs: Vec<JobRecord>,
}

impl ArrayProgress {
    /// Jobs in `state`.
    pub fn count(&self, state: JobState) -> usize {
        self.counts.get(&state).copied().unwrap_or(0)
    }

    /// Whether every job has ended (`false` for an array with no jobs found).
    pub fn is_finished(&self) -> bool {
        self.total > 0 && self.jobs.iter().all(|j| j.state.is_terminal())
    }
}

/// Submits every job of `sweep` to `project` with [`submit`], so each is
/// idempotent on its own.
///
/// With a sweep `idempotency_key` the array id is derived from the project, name
/// and key, and so are the jobs' keys: calling again (after a timeout, say) returns
/// the same array and jobs and makes only what an interrupted call did not. A
/// resubmission whose parameters changed gets the jobs made first for the indexes
/// they share. Without a key every call makes a new array.
///
/// The whole sweep is expanded and validated (the project's access rules included)
/// before the first job is submitted, so a bad parameter set refuses the sweep
/// rather than leaving half an array.
pub async fn submit_array(
    ports: &Ports,
    sweep: &SweepSpec,
    project: &str,
    local_files: bool,
) -> Result<ArraySubmitted, Error> {
    let array = array_id(sweep, project, ports.clock.now());
    let specs = sweep.expand_as(&array)?;
    // `submit` checks this too, but job by job: checked here first, a parameter
    // that points one job outside the project refuses the sweep whole.
    let who = crate::project::Submitter {
        project,
        job: None,
        local_files,
    };
    for (i, spec) in specs.iter().enumerate() {
        crate::project::check_access(spec, who).map_err(|e| {
            let mut e = e.nested("template");
            for err in &mut e.errors {
                err.message = format!("{} (job {i})", err.message);
            }
            Error::Denied(e)
        })?;
    }
    let submitted: Vec<_> = futures::stream::iter(specs)
        .map(|spec| {
            submit(
                ports,
                Submission {
                    spec,
                    project: project.to_owned(),
                    reply_to: None,
                    local_files,
                },
            )
        })
        // `buffered` keeps index order in the results.
        .buffered(CONCURRENCY)
        .try_collect()
        .await?;
    let created = submitted.iter().filter(|s| s.created).count();
    let jobs: Vec<JobId> = submitted.into_iter().map(|s| s.job.id).collect();
    info!(array = %array, project, jobs = jobs.len(), created, "array submitted");
    Ok(ArraySubmitted {
        array,
        jobs,
        created,
    })
}

/// The jobs labelled with `array`, counted by state, in index order.
pub async fn array_progress(ports: &Ports, array: &str) -> Result<ArrayProgress, Error> {
    let mut query = ListQuery {
        label: Some((ARRAY_LABEL.to_owned(), array.to_owned())),
        limit: MAX_PAGE,
        ..Default::default()
    };
    let mut jobs = Vec::new();
    loop {
        let page = ports.ledger.list(&query).await?;
        jobs.extend(page.jobs);
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    // Ids follow submission time, which concurrent submission does not keep in
    // index order; a job without a readable index (labelled by hand) goes last.
    jobs.sort_by_cached_key(|j| {
        let index = j
            .spec
            .labels
            .get(INDEX_LABEL)
            .and_then(|i| i.parse::<usize>().ok());
        (index.unwrap_or(usize::MAX), j.id.clone())
    });
    let mut counts = BTreeMap::new();
    for j in &jobs {
        *counts.entry(j.state).or_insert(0) += 1;
    }
    Ok(ArrayProgress {
        array: array.to_owned(),
        total: jobs.len(),
        counts,
        jobs,
    })
}

/// `<name>-<16 hex>` of the project and key when the sweep has a key, so retries
/// find the same array; otherwise `<name>-<ulid>`, unique per call. Either way a
/// label value (at most 91 characters) that no other array shares.
fn array_id(sweep: &SweepSpec, project: &str, now: Timestamp) -> String {
    match &sweep.idempotency_key {
        Some(key) => {
            let mut h = Sha256::new();
            // Length-prefixed so that no (project, key) pair can be read as another.
            h.update((project.len() as u64).to_be_bytes());
            h.update(project.as_bytes());
            h.update(key.as_bytes());
            let digest = h.finalize();
            format!("{}-{}", sweep.name, hex::encode(&digest[..8]))
        }
        None => {
            let ulid = ulid::Ulid::from_datetime(now.to_system_time());
            format!("{}-{}", sweep.name, ulid.to_string().to_lowercase())
        }
    }
}

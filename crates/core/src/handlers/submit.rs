//! Job submitted: create the record and queue the first attempt.

use std::collections::BTreeMap;

use tracing::info;

use super::Error;
use super::apply::{flush_outbox, send_dispatch};
use crate::job::{JobId, JobRecord, ReplyTo};
use crate::lifecycle::Command;
use crate::ports::{Ports, ledger};
use crate::spec::JobSpec;

/// A validated spec on its way in.
#[derive(Debug, Clone)]
pub struct Submission {
    pub spec: JobSpec,
    pub project: String,
    /// Where to send the job's status events (a queue reply address).
    pub reply_to: Option<ReplyTo>,
    /// Whether the spec may name `file://` URIs, which the agent reads and writes on
    /// the host as the broker's user: `true` only when the spec's text comes from the
    /// operator (trigger rules, hook templates, queue templates from the operator's
    /// folder) or from an admin token; never for a spec sent whole by a submitter.
    pub local_files: bool,
}

/// The job a submission made, or found.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub job: JobRecord,
    /// `false` when an idempotency key (or a retried create) matched an existing job.
    pub created: bool,
}

/// Creates the job (unless its idempotency key already made one) and puts attempt 1
/// on the dispatch queue. Safe to call again with the same submission.
#[tracing::instrument(name = "submit", skip_all, fields(project = %sub.project, job = %sub.spec.name))]
pub async fn submit(ports: &Ports, sub: Submission) -> Result<Submitted, Error> {
    // Whatever the way in (API, trigger, hook, queue), a job touches only its
    // project's part of the bucket; with its id known, it may name its own outputs.
    let now = ports.clock.now();
    let id = JobId::generate(now);
    let who = crate::project::Submitter {
        project: &sub.project,
        job: Some(&id),
        local_files: sub.local_files,
    };
    crate::project::check_access(&sub.spec, who).map_err(Error::Denied)?;
    if let Some(key) = &sub.spec.idempotency_key
        && let Some(id) = ports
            .ledger
            .find_by_idempotency_key(&sub.project, key)
            .await?
    {
        return existing(ports, &id).await;
    }
    // Secret values go to the secret store, and only their names to the ledger.
    let values: BTreeMap<String, String> = sub
        .spec
        .secrets
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.expose()?.to_owned())))
        .collect();
    if !values.is_empty() {
        ports.secrets.put(&id, &values).await?;
    }
    // The record holds the spec; agents ask the API for it (`GET /v1/agent/spec`),
    // so a submission costs one ledger commit and no copy anywhere else.
    let mut rec = JobRecord::new(id, sub.project, sub.spec.redacted(), now);
    rec.reply_to = sub.reply_to;
    rec.dispatched_at = Some(now);
    let priority = rec.spec.priority.level();
    let follow = rec.reply_to.is_some();
    if follow {
        // A followed job's first notification ("accepted") and first dispatch ride
        // in the outbox of the create itself, in that order, so the submitter hears
        // "accepted" before any state change the dispatch leads to.
        rec.outbox.push(Command::Notify {
            state: rec.state,
            at: now,
        });
        rec.outbox.push(Command::Dispatch {
            attempt: 1,
            priority,
            delay_ms: 0,
            waits: 0,
        });
    }
    let stored = match ports.ledger.create(rec).await {
        Ok(stored) => stored,
        Err(ledger::Error::AlreadyExists { id }) => return existing(ports, &id).await,
        Err(e) => return Err(e.into()),
    };
    info!(job_id = %stored.id, attempt = 1, name = %stored.spec.name, project = %stored.project, "job submitted");
    let job = if follow {
        flush_outbox(ports, stored).await?
    } else {
        // Otherwise the dispatch is sent straight away, saving a ledger write per
        // job: if this process dies before sending it, reconcile finds the job
        // pending with no dispatch since `dispatched_at` and sends it again.
        let msg = crate::messages::Message::Dispatch {
            job: stored.id.clone(),
            attempt: 1,
            waits: 0,
        };
        send_dispatch(ports, &stored, msg, priority, 0).await?;
        stored
    };
    Ok(Submitted { job, created: true })
}

async fn existing(ports: &Ports, id: &JobId) -> Result<Submitted, Error> {
    let rec = ports.ledger.get(id).await?;
    info!(job_id = %rec.id, attempt = rec.attempt, "submission matched an existing job");
    let job = flush_outbox(ports, rec).await?;
    Ok(Submitted {
        job,
        created: false,
    })
}

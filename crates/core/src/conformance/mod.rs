//! Conformance suites: one per port, `pub async fn`s over `&dyn Port`. Every adapter
//! calls its port's suite from its tests; an adapter is done when the suite passes.
//! Failures panic with a message that says which promise of the contract broke.
#![allow(clippy::unwrap_used)]

pub mod blobs;
pub mod compute;
pub mod ledger;
pub mod queue;
pub mod secrets;
pub mod tokens;

use crate::job::{JobId, JobRecord};
use crate::spec::{self, Format};
use crate::time::Timestamp;

/// A small valid record for suites, with a fresh id.
pub fn sample_record(name: &str, now: Timestamp) -> JobRecord {
    let text = format!("name: {name}\ncommand: [\"true\"]\n");
    let spec = spec::parse(&text, Format::Yaml).expect("a fixed, valid spec parses");
    JobRecord::new(JobId::generate(now), "default", spec, now)
}

/// A queue name no other run on the same server uses.
pub fn unique_queue(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    )
}

//! JSON Schemas generated from the Rust types; the checked-in copies under
//! `schemas/` are compared with these in tests.

use crate::spec::JobSpec;
use crate::sweep::SweepSpec;
use crate::trigger::TriggerRule;

/// The job spec schema, pretty-printed as checked in.
pub fn job_spec() -> String {
    let schema = schemars::schema_for!(JobSpec);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

/// The trigger rule schema; its template is described by the job spec schema.
pub fn trigger_rule() -> String {
    let schema = schemars::schema_for!(TriggerRule);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

/// The parameter sweep schema; its template is described by the job spec schema.
pub fn sweep() -> String {
    let schema = schemars::schema_for!(SweepSpec);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

/// Every generated schema with its file name under `schemas/`.
pub fn all() -> Vec<(&'static str, String)> {
    vec![
        ("job-spec.schema.json", job_spec()),
        ("trigger-rule.schema.json", trigger_rule()),
        ("sweep.schema.json", sweep()),
        ("submit-message.schema.json", crate::intake::schema()),
    ]
}

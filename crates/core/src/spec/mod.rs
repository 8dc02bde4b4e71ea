//! The job spec: what a user writes to describe a training job.
//!
//! It covers Azure Batch AI's job definition (image, command, resources, mounted
//! inputs and outputs, priority) plus what spot training needs (placement, checkpoint
//! and retry policy, limits). Specs are read from YAML or JSON with [`parse`]; every
//! problem comes back as a [`SpecError`] naming the field path.

mod de;
pub mod examples;
pub mod grammar;
mod parse;
mod validate;

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

pub(crate) use de::whole;
pub use parse::{Format, parse, parse_file, parse_json_value, yaml_document};
pub use validate::{FieldError, SpecError, check_idempotency_key};

/// A training job, as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "respawn job spec",
    // `command` may be left out only when the image has an entrypoint to run.
    extend("anyOf" = [
        { "required": ["image"], "properties": { "image": { "type": "string" } } },
        { "required": ["command"], "properties": { "command": { "minItems": 1 } } }
    ]),
    example = examples::minimal(),
    example = examples::full()
)]
pub struct JobSpec {
    /// A name for people: letters, digits, `.`, `_`, `-`; at most 128 characters.
    #[schemars(extend("pattern" = grammar::NAME))]
    pub name: String,
    /// Container image to run the command in. Without it the command runs as a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = grammar::IMAGE))]
    pub image: Option<String>,
    /// The program and its arguments (`["python", "train.py"]`). May be omitted when the image has an entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("prefixItems" = [{ "type": "string", "pattern": grammar::PROGRAM }]))]
    pub command: Vec<String>,
    /// Extra arguments appended to `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Working directory of the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Environment variables. Names starting with `RESPAWN_` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": grammar::ENV_NAME, "not": { "pattern": grammar::RESERVED_ENV } }))]
    pub env: BTreeMap<String, String>,
    /// Secret environment variables: their values never appear in logs, API output or the ledger. A secret overrides an `env` entry of the same name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": grammar::ENV_NAME, "not": { "pattern": grammar::RESERVED_ENV } }))]
    pub secrets: BTreeMap<String, Secret>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub priority: Priority,
    /// Object-store URIs staged into `RESPAWN_INPUT_DIR` before the workload starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Input>,
    /// Where `RESPAWN_OUTPUT_DIR` is synced to (default: the job's `outputs/` prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = grammar::URI, "not" = { "type": "string", "pattern": grammar::DOTDOT }))]
    pub outputs: Option<String>,
    #[serde(default)]
    pub checkpoint: CheckpointPolicy,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default)]
    pub limits: Limits,
    /// Free-form key/value labels, for listing and filtering.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "propertyNames" = { "pattern": grammar::LABEL_KEY },
        "additionalProperties" = { "type": "string", "maxLength": grammar::MAX_LABEL_VALUE }
    ))]
    pub labels: BTreeMap<String, String>,
    /// Submitting the same key twice returns the first job instead of making a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub idempotency_key: Option<String>,
    /// URLs that receive the job's state changes (signed webhooks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = { "type": "string", "pattern": grammar::URL }))]
    pub notify: Vec<String>,
}

/// What the job needs per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend(
    // A GPU model without GPUs is a mistake worth catching.
    "if" = { "required": ["gpu_type"], "properties": { "gpu_type": { "type": "string" } } },
    "then" = { "required": ["gpus"], "properties": { "gpus": { "minimum": 1 } } }
))]
pub struct Resources {
    /// GPUs per node.
    #[serde(default, deserialize_with = "de::count")]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: u32,
    /// GPU model, e.g. `a100`, `h100`, `t4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// CPU cores per node; fractions allowed.
    #[serde(default = "default_cpus", deserialize_with = "de::positive_f64")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub cpus: f64,
    /// Memory per node (`16GiB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Nodes for a multi-node job.
    #[serde(default = "one", deserialize_with = "de::count")]
    #[schemars(range(min = 1, max = 1024))]
    pub nodes: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            gpus: 0,
            gpu_type: None,
            cpus: default_cpus(),
            memory: None,
            nodes: 1,
        }
    }
}

/// Where the job may run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend(
    // On-demand fallbacks and spot prices mean nothing off spot.
    "if" = { "required": ["spot"], "properties": { "spot": { "const": false } } },
    "then" = { "properties": { "on_demand_after": { "type": "null" }, "max_price": { "type": "null" } } }
))]
pub struct Placement {
    /// Run on spot / low-priority capacity.
    #[serde(default = "yes")]
    pub spot: bool,
    /// After waiting this long for spot capacity, run on demand instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_after: Option<HumanDuration>,
    /// Highest price per node-hour to pay for spot capacity, in the provider's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub max_price: Option<f64>,
    /// Provider region or zone, when it matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The broker's pool to run on (a warm pool reuses VMs between jobs); without
    /// it, the first pool whose VMs fit the job's resources, else a single-use VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^[a-z][a-z0-9-]{0,62}$"))]
    pub pool: Option<String>,
    /// A multi-node job: how long its nodes may take to all come up and start the
    /// workload before the gang is released and the job waits for capacity again,
    /// spending nothing (default: the broker's start timeout, 15 minutes). Ignored
    /// for a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang_timeout: Option<HumanDuration>,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            spot: true,
            on_demand_after: None,
            max_price: None,
            region: None,
            pool: None,
            gang_timeout: None,
        }
    }
}

/// Queue priority: `low`, `normal`, `high`, or an integer 0 (lowest) to 9 (highest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Priority {
    Named(PriorityName),
    Level(#[schemars(range(min = 0, max = 9))] u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PriorityName {
    Low,
    Normal,
    High,
}

impl Priority {
    pub const MAX_LEVEL: u8 = 9;

    /// The queue level, 0..=9, higher first.
    pub fn level(self) -> u8 {
        match self {
            Priority::Named(PriorityName::Low) => 2,
            Priority::Named(PriorityName::Normal) => 5,
            Priority::Named(PriorityName::High) => 8,
            Priority::Level(n) => n.min(Self::MAX_LEVEL),
        }
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::Named(PriorityName::Normal)
    }
}

/// One input to stage: a URI, optionally with the path under `RESPAWN_INPUT_DIR`.
/// Written as a plain URI string or as `{uri, path}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Input {
    /// `s3://…`, `az://…`, `gs://…`, `file://…` or a key in the respawn bucket (`bucket://…`).
    pub uri: String,
    /// Destination relative to `RESPAWN_INPUT_DIR` (default: the URI's last segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// How checkpoints are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPolicy {
    /// Where checkpoints go (default: the job's `checkpoints/` prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = grammar::URI, "not" = { "type": "string", "pattern": grammar::DOTDOT }))]
    pub uri: Option<String>,
    /// Complete checkpoints to keep; older ones are deleted.
    #[serde(default = "three", deserialize_with = "de::count")]
    #[schemars(range(min = 1, max = 4_294_967_295u32))]
    pub keep_last: u32,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            uri: None,
            keep_last: 3,
        }
    }
}

/// The two retry budgets: user-code failures and infrastructure losses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts that may fail by the workload's own exit code before the job fails.
    #[serde(default = "two", deserialize_with = "de::count")]
    #[schemars(range(max = 4_294_967_295u32))]
    pub max_failures: u32,
    /// Exit codes that mean "the machine was lost", not "the code failed" (e.g. 137 from an OOM-killed host).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "de::exit_codes"
    )]
    #[schemars(extend("items" = {
        "type": "integer", "minimum": i32::MIN, "maximum": i32::MAX, "not": { "const": 0 }
    }))]
    pub infra_exit_codes: Vec<i32>,
    /// Spot preemptions to absorb; absent means unlimited (bounded by `limits.max_wait`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::opt_count"
    )]
    #[schemars(range(max = 4_294_967_295u32))]
    pub max_preemptions: Option<u32>,
    /// Other infrastructure losses to absorb (a VM that vanished or went silent, an
    /// agent that could not start the attempt, an exit code listed in
    /// `infra_exit_codes`), each retried after a growing backoff.
    #[serde(default = "five", deserialize_with = "de::count")]
    #[schemars(range(max = 4_294_967_295u32))]
    pub max_lost: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_failures: 2,
            infra_exit_codes: Vec::new(),
            max_preemptions: None,
            max_lost: 5,
        }
    }
}

/// Time limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Longest one attempt may run before it is stopped and counted as a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runtime: Option<HumanDuration>,
    /// Longest the job may take overall, queueing and retries included, before it fails.
    #[serde(default = "default_max_wait")]
    pub max_wait: HumanDuration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_runtime: None,
            max_wait: default_max_wait(),
        }
    }
}

/// A secret value: given in clear on submission, stored and shown only as `{"redacted": true}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Option<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Some(value.into()))
    }

    /// The value, if this copy still holds it (one read back from the ledger does not).
    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// A copy without the value.
    pub fn redacted(&self) -> Self {
        Secret(None)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn default_cpus() -> f64 {
    1.0
}
fn one() -> u32 {
    1
}
fn five() -> u32 {
    5
}

fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}
fn yes() -> bool {
    true
}
fn default_max_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 24 * 3600))
}

impl JobSpec {
    /// The whole command line: `command` followed by `args`.
    pub fn argv(&self) -> Vec<String> {
        self.command.iter().chain(&self.args).cloned().collect()
    }

    /// This spec with every secret value removed, as the ledger and API store it.
    pub fn redacted(&self) -> JobSpec {
        let mut s = self.clone();
        for v in s.secrets.values_mut() {
            *v = v.redacted();
        }
        s
    }
}

#[cfg(test)]
mod tests;

//! Trigger rules: a file dropped into the bucket whose key matches a rule becomes a
//! job made from the rule's template.
//!
//! ```yaml
//! name: train-on-csv            # letters, digits, `.`, `_`, `-`; at most 64
//! match:
//!   prefix: incoming/           # a folder ending in `/`, or "" for the whole bucket
//!   glob: "*.csv"               # on the key relative to the prefix (default `**`)
//!   marker: _SUCCESS            # optional: one job per folder, when this file appears
//! project: default              # optional
//! template:                     # a job spec whose strings may hold ${var}
//!   name: train-${stem}
//!   command: [respawn-trainer, --data, "${input_path}"]
//!   inputs: ["${uri}"]
//! ```
//!
//! Variables (see [`Bindings`]): `${key}`, `${uri}`, `${prefix}`, `${basename}`,
//! `${stem}`, `${ext}`, `${rule}`, `${version}`, `${input_path}`; `$${` is a
//! literal `${`. They are replaced in every string of the template, map keys
//! included. Values substituted into `name` are sanitized so any key gives a valid
//! job name: characters outside `[A-Za-z0-9._-]` become `-`, and the name is cut to
//! 128 characters. Elsewhere values go in as they are: keys are checked first
//! ([`check_key`]) and commands are run without a shell.
//!
//! `*` does not cross `/`: `*.csv` under `incoming/` takes `incoming/a.csv` but not
//! `incoming/day1/a.csv`; `**/*.csv` takes both (see [`Glob`]).
//!
//! A marker rule makes one job for a multi-file upload: only the marker file itself
//! triggers it, its glob selects the marker's folder (relative to the prefix), and
//! the job's input is that folder (see [`TriggerRule::matches`]).
//!
//! Rules are checked when loaded ([`parse_rule`], [`load_rules_dir`]): besides the
//! rule's own fields, the template is rendered with placeholder values and validated
//! as a job spec, so a broken template is reported then, not when a file arrives.
//! The template may not set `idempotency_key`: the trigger sets it (see
//! [`TriggerRule::render`]) so each object version makes one job.

mod glob;
mod load;
mod matching;
mod render;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::{FieldError, JobSpec, SpecError};

pub use glob::Glob;
pub use load::{load_rules_dir, parse_rule};
pub use matching::{Bindings, VARIABLES, check_key};
pub use render::idempotency_key;
// The `${var}` substitution, shared with parameter sweeps.
pub(crate) use render::{Variables, substitute_value};

/// The label every triggered job carries, naming its rule.
pub const LABEL: &str = "respawn.trigger";

const MAX_NAME: usize = 64;
/// Longest `name` a template may render with placeholder values (a job name's limit).
const MAX_JOB_NAME: usize = 128;

/// A rule: which new blobs it takes, and the job each one makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "respawn trigger rule")]
pub struct TriggerRule {
    /// The rule's name: letters, digits, `.`, `_`, `-`; at most 64 characters. Unique among loaded rules.
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9._-]+$"))]
    pub name: String,
    /// Which blobs the rule takes (`match` in the file; a keyword in Rust).
    #[serde(rename = "match")]
    pub when: BlobMatch,
    /// The project the jobs belong to.
    #[serde(default = "default_project")]
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9._-]+$"))]
    pub project: String,
    /// A job spec whose strings may hold `${key}`, `${uri}`, `${prefix}`, `${basename}`, `${stem}`, `${ext}`, `${rule}`, `${version}`, `${input_path}`; `$${` is a literal `${`.
    #[schemars(with = "JobSpec")]
    pub template: serde_json::Value,
}

/// Which blobs a rule takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlobMatch {
    /// A folder of the bucket, ending in `/`; empty for the whole bucket.
    #[serde(default)]
    pub prefix: String,
    /// Glob on the key relative to the prefix (`*`, `?`, `[abc]`, `**`); `*` does not cross `/`. For marker rules it selects the marker's folder. Default `**`.
    #[serde(default)]
    #[schemars(with = "String")]
    pub glob: Glob,
    /// A file name that completes a multi-file upload: only it triggers the rule, and the job takes its whole folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
}

impl Serialize for Glob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Glob::new(&s).map_err(serde::de::Error::custom)
    }
}

fn default_project() -> String {
    "default".into()
}

impl TriggerRule {
    /// Everything about the rule that its type does not enforce, reported at once.
    pub fn check(&self) -> Result<(), SpecError> {
        let mut errors = Vec::new();
        let mut push = |path: &str, message: String| {
            errors.push(FieldError {
                path: path.to_owned(),
                message,
            })
        };
        if let Err(m) = check_name(&self.name) {
            push("name", m);
        }
        // The rule `submit` applies, so what loads can also submit.
        if let Err(m) = crate::project::check_name(&self.project) {
            push("project", m);
        }
        let prefix = &self.when.prefix;
        if !prefix.is_empty() && (!prefix.ends_with('/') || check_key(prefix).is_err()) {
            push(
                "match.prefix",
                format!(
                    "expected a folder such as incoming/ (relative, ending in `/`, without `.` or `..` segments), or \"\" for the whole bucket, got {prefix:?}"
                ),
            );
        }
        if let Some(marker) = &self.when.marker
            && (marker.is_empty() || marker.contains(['/', '\\']) || check_key(marker).is_err())
        {
            push(
                "match.marker",
                format!("expected a file name such as _SUCCESS (no `/`), got {marker:?}"),
            );
        }
        errors.extend(self.check_template());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecError { errors })
        }
    }

    /// Renders the template with placeholder values: unknown variables and anything
    /// that would make an invalid spec for every blob show up now.
    fn check_template(&self) -> Vec<FieldError> {
        if !self.template.is_object() {
            // A job spec would also deserialize from a list (by position): say what is meant.
            return vec![FieldError {
                path: "template".into(),
                message: "expected a job spec (a map with name, command, …)".into(),
            }];
        }
        let b = self.placeholder();
        let mut errors = Vec::new();
        let _ = render::substitute_value(&self.template, &b, "", &mut errors);
        if errors.is_empty() {
            if let Some(key) = self.template.get("idempotency_key") {
                errors.push(FieldError {
                    path: "idempotency_key".into(),
                    message: format!(
                        "set by the trigger (one job per object version), so a template cannot set it; got {key}"
                    ),
                });
            }
            if let Some(serde_json::Value::String(name)) = self.template.get("name")
                && let Ok(name) = render::substitute(name, &b, true)
                && name.chars().count() > MAX_JOB_NAME
            {
                errors.push(FieldError {
                    path: "name".into(),
                    message: format!(
                        "expected at most {MAX_JOB_NAME} characters besides the variables, got {}",
                        name.chars().count()
                    ),
                });
            }
        }
        if errors.is_empty()
            && let Err(e) = self.render(&b)
        {
            return e.errors;
        }
        SpecError { errors }.nested("template").errors
    }

    /// Bindings shaped like a real match of this rule, for the load-time check.
    fn placeholder(&self) -> Bindings {
        let prefix = &self.when.prefix;
        match &self.when.marker {
            Some(marker) => {
                let folder = format!("{prefix}example/");
                Bindings::for_folder(&self.name, &folder, &format!("{folder}{marker}"), "1")
            }
            None => Bindings::for_object(&self.name, &format!("{prefix}example.dat"), "1"),
        }
    }
}

/// Names of rules and hooks: letters, digits, `.`, `_`, `-`; at most 64.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        Err(format!(
            "expected 1 to {MAX_NAME} characters, got {}",
            name.len()
        ))
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        Err(format!(
            "expected letters, digits, `.`, `_` or `-`, got {name:?}"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_load;

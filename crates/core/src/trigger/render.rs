//! Turning a rule's template and a blob's bindings into a job spec.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::matching::{Bindings, VARIABLES};
use super::{LABEL, TriggerRule};
use crate::spec::{self, FieldError, JobSpec, SpecError};

/// Longest job name; longer rendered names are cut (see [`TriggerRule::render`]).
const MAX_NAME: usize = 128;

impl TriggerRule {
    /// Makes the job spec for one matched blob: every `${var}` in every string of the
    /// template (map keys included) is replaced by its binding, the result is
    /// validated as a job spec, and errors come back under `template.`.
    ///
    /// In `name`, substituted values have every character outside `[A-Za-z0-9._-]`
    /// replaced by `-`, and a name longer than 128 characters is cut to 128, so that
    /// any key makes a valid job name. Other fields take values as they are.
    ///
    /// The spec gets the label `respawn.trigger=<rule>` and an idempotency key
    /// derived from the rule, the key (for marker rules, the folder) and the object
    /// version, so one version of one object makes at most one job per rule however
    /// often its event is delivered.
    pub fn render(&self, b: &Bindings) -> Result<JobSpec, SpecError> {
        if !self.template.is_object() {
            return Err(SpecError::one("template", "expected a job spec (a map)"));
        }
        let mut errors = Vec::new();
        let mut value = substitute_value(&self.template, b, "", &mut errors);
        if !errors.is_empty() {
            return Err(SpecError { errors }.nested("template"));
        }
        if let Value::Object(doc) = &mut value {
            if let Some(Value::String(name)) = doc.get_mut("name")
                && let Some((cut, _)) = name.char_indices().nth(MAX_NAME)
            {
                name.truncate(cut);
            }
            doc.insert(
                "idempotency_key".into(),
                Value::String(idempotency_key(&self.name, b)),
            );
            // A template without labels gets a map; one with labels of the wrong
            // type is left for validation to report.
            if let Value::Object(labels) = doc
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()))
            {
                labels.insert(LABEL.into(), Value::String(self.name.clone()));
            }
        }
        spec::parse_json_value(value).map_err(|e| e.nested("template"))
    }
}

/// `trigger:<rule>:<sha256 of subject and version>`: stable across calls and hosts,
/// at most 137 characters whatever the key's length, and scoped by rule so two rules
/// taking the same object each make their job.
pub fn idempotency_key(rule: &str, b: &Bindings) -> String {
    let mut h = Sha256::new();
    // Length-prefixed so that no (subject, version) pair can be read as another.
    h.update((b.subject.len() as u64).to_be_bytes());
    h.update(b.subject.as_bytes());
    h.update(b.version.as_bytes());
    format!("trigger:{rule}:{}", hex::encode(h.finalize()))
}

/// What `${name}` may stand for in a template: a matched blob's [`Bindings`] here,
/// a parameter set in [`crate::sweep`]. One substitution serves both, so the two
/// kinds of template share their syntax, escaping and name sanitizing.
pub(crate) trait Variables {
    /// A variable's value; `None` when `name` is not a variable.
    fn value(&self, name: &str) -> Option<&str>;
    /// The variables there are, listed in the unknown-variable error.
    fn known(&self) -> String;
}

impl Variables for Bindings {
    fn value(&self, name: &str) -> Option<&str> {
        self.get(name)
    }

    fn known(&self) -> String {
        VARIABLES.join(", ")
    }
}

/// Substitutes through a JSON value; problems are pushed with their paths.
pub(crate) fn substitute_value<V: Variables + ?Sized>(
    v: &Value,
    b: &V,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Value {
    match v {
        Value::String(s) => match substitute(s, b, path == "name") {
            Ok(out) => Value::String(out),
            Err(message) => {
                errors.push(FieldError {
                    path: path.to_owned(),
                    message,
                });
                Value::Null
            }
        },
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| substitute_value(item, b, &format!("{path}[{i}]"), errors))
                .collect(),
        ),
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, item) in map {
                // Paths name keys as written, which is what the user can find.
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let key = match substitute(k, b, false) {
                    Ok(key) => key,
                    Err(message) => {
                        errors.push(FieldError {
                            path: child,
                            message,
                        });
                        continue;
                    }
                };
                let rendered = substitute_value(item, b, &child, errors);
                if out.insert(key.clone(), rendered).is_some() {
                    errors.push(FieldError {
                        path: child,
                        message: format!("another key here also renders to {key:?}"),
                    });
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Replaces `${var}` in one string; `$${` is a literal `${`, any other `$` is itself.
/// With `sanitize`, substituted values keep only `[A-Za-z0-9._-]` (others become `-`).
pub(super) fn substitute<V: Variables + ?Sized>(
    s: &str,
    b: &V,
    sanitize: bool,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err(format!(
                    "unclosed `${{` in {s:?} (write `$${{` for a literal `${{`)"
                ));
            };
            let var = &after[..end];
            let Some(value) = b.value(var) else {
                return Err(format!("unknown variable ${{{var}}}; known: {}", b.known()));
            };
            if sanitize {
                out.extend(value.chars().map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '-'
                    }
                }));
            } else {
                out.push_str(value);
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

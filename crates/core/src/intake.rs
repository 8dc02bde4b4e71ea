//! Submission by message: what a producer puts on the submit queue, and how it
//! becomes a [`Submission`] — or a rejection that says what is wrong and where.
//!
//! A message body is JSON, either a whole job spec or a named template with
//! parameters:
//!
//! ```json
//! {"spec": {"name": "mlp", "command": ["respawn-trainer"]}}
//! {"template": "train-mlp", "params": {"lr": 0.1, "steps": 2000}}
//! ```
//!
//! The AMQP `message_id` makes redelivery harmless: it becomes the job's idempotency
//! key unless the spec has one. `reply_to` + `correlation_id` receive the status
//! events (accepted, each state change, or rejected).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::handlers::Submission;
use crate::job::ReplyTo;
use crate::spec::{self, FieldError, SpecError};
pub use crate::sweep::ParamValue;
use crate::trigger::{Variables, substitute_value};

/// Bodies larger than this are rejected unread.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// The body of a message on the submit queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "respawn submit message")]
pub struct SubmitMessage {
    /// A job spec (see job-spec.schema.json). Exactly one of `spec` and `template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Value>,
    /// The name of a job template the broker knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Values for the template's `${param.<name>}` placeholders.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, ParamValue>,
    /// The project the job belongs to (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// Why a message makes no job. Sent back to the submitter and kept with the dead
/// letter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("message is {bytes} bytes; the limit is {MAX_MESSAGE_BYTES}")]
    TooLarge { bytes: usize },
    #[error("not a submit message: {0}")]
    Malformed(SpecError),
    #[error("unknown template {name:?}; known: {known}")]
    UnknownTemplate { name: String, known: String },
    #[error("invalid job spec:\n{0}")]
    Invalid(SpecError),
    #[error("not allowed:\n{0}")]
    Denied(SpecError),
}

impl Rejection {
    /// The field errors, for a machine-readable reply.
    pub fn errors(&self) -> &[FieldError] {
        match self {
            Rejection::Malformed(e) | Rejection::Invalid(e) | Rejection::Denied(e) => &e.errors,
            _ => &[],
        }
    }
}

/// Job templates by name: job specs whose strings may hold `${param.<name>}`.
#[derive(Debug, Clone, Default)]
pub struct Templates(BTreeMap<String, Value>);

impl Templates {
    /// Every `*.yaml`, `*.yml` and `*.json` in `dir`, named by file stem. Files that
    /// cannot be read are returned with their error; the rest still load.
    pub fn load_dir(dir: &Path) -> (Templates, Vec<(PathBuf, String)>) {
        let mut map = BTreeMap::new();
        let mut errors = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return (Templates(map), errors);
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            if !matches!(ext, "yaml" | "yml" | "json") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_yaml_ng::from_str::<Value>(&t).map_err(|e| e.to_string()));
            match parsed {
                Ok(v) if v.is_object() => {
                    map.insert(name, v);
                }
                Ok(_) => errors.push((path, "a template must be a mapping (a job spec)".into())),
                Err(e) => errors.push((path, e)),
            }
        }
        (Templates(map), errors)
    }

    pub fn insert(&mut self, name: impl Into<String>, template: Value) {
        self.0.insert(name.into(), template);
    }

    pub fn names(&self) -> String {
        self.0.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

struct Params(BTreeMap<String, String>);

impl Variables for Params {
    fn value(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn known(&self) -> String {
        self.0.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Reads one message body into a submission.
pub fn read(
    body: &[u8],
    message_id: Option<&str>,
    reply_to: Option<ReplyTo>,
    templates: &Templates,
) -> Result<Submission, Rejection> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::TooLarge { bytes: body.len() });
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| Rejection::Malformed(SpecError::one("", format!("not UTF-8 text: {e}"))))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let msg: SubmitMessage = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| Rejection::Malformed(SpecError::from_path_error(e)))?;
    // A template is the operator's file; a spec sent whole is the submitter's own
    // text and may not name the broker host's files.
    let (value, local_files) = match (msg.spec, msg.template) {
        (Some(spec), None) => (spec, false),
        (None, Some(name)) => (render(templates, &name, &msg.params)?, true),
        _ => {
            let e = SpecError::one("", "expected exactly one of `spec` and `template`");
            return Err(Rejection::Malformed(e));
        }
    };
    let mut spec =
        spec::parse_json_value(value).map_err(|e| Rejection::Invalid(e.nested("spec")))?;
    if spec.idempotency_key.is_none() {
        // Redelivery of the same message must not make a second job.
        spec.idempotency_key = message_id.filter(|id| !id.is_empty()).map(|id| {
            let key = format!("amqp:{id}");
            key.chars().take(255).collect()
        });
    }
    Ok(Submission {
        spec,
        project: msg
            .project
            .unwrap_or_else(|| crate::project::DEFAULT.to_owned()),
        reply_to,
        local_files,
    })
}

fn render(
    templates: &Templates,
    name: &str,
    params: &BTreeMap<String, ParamValue>,
) -> Result<Value, Rejection> {
    let Some(template) = templates.0.get(name) else {
        return Err(Rejection::UnknownTemplate {
            name: name.to_owned(),
            known: templates.names(),
        });
    };
    let vars = Params(
        params
            .iter()
            .map(|(k, v)| (format!("param.{k}"), v.to_string()))
            .collect(),
    );
    let mut errors = Vec::new();
    let value = substitute_value(template, &vars, "", &mut errors);
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(Rejection::Invalid(SpecError { errors }.nested("template")))
    }
}

/// The submit message schema, as checked in under `schemas/`.
pub fn schema() -> String {
    let schema = schemars::schema_for!(SubmitMessage);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn templates() -> Templates {
        let mut t = Templates::default();
        t.insert(
            "mlp",
            serde_json::json!({"name": "mlp-${param.lr}", "command": ["respawn-trainer", "--lr", "${param.lr}"]}),
        );
        t
    }

    #[test]
    fn a_spec_message_takes_its_message_id_as_idempotency_key() {
        let body = br#"{"spec": {"name": "j", "command": ["true"]}}"#;
        let sub = read(body, Some("m-1"), None, &templates()).unwrap();
        assert_eq!(sub.spec.idempotency_key.as_deref(), Some("amqp:m-1"));
        assert_eq!(sub.project, "default");
    }

    #[test]
    fn only_templates_may_name_local_files() {
        // A spec sent whole is the submitter's text; a template is the operator's.
        let body =
            br#"{"spec": {"name": "j", "command": ["true"], "inputs": ["file:///etc/passwd"]}}"#;
        assert!(!read(body, None, None, &templates()).unwrap().local_files);
        let body = br#"{"template": "mlp", "params": {"lr": 0.01}}"#;
        assert!(read(body, None, None, &templates()).unwrap().local_files);
    }

    #[test]
    fn a_template_message_fills_its_params() {
        let body = br#"{"template": "mlp", "params": {"lr": 0.01}}"#;
        let sub = read(body, None, None, &templates()).unwrap();
        assert_eq!(sub.spec.command, ["respawn-trainer", "--lr", "0.01"]);
        assert_eq!(sub.spec.name, "mlp-0.01");
    }

    #[test]
    fn rejections_say_what_and_where() {
        let t = templates();
        assert!(matches!(
            read(b"not json", None, None, &t),
            Err(Rejection::Malformed(_))
        ));
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            read(&big, None, None, &t),
            Err(Rejection::TooLarge { .. })
        ));
        match read(br#"{"template": "nope"}"#, None, None, &t) {
            Err(Rejection::UnknownTemplate { known, .. }) => assert_eq!(known, "mlp"),
            other => panic!("{other:?}"),
        }
        match read(
            br#"{"spec": {"name": "j", "command": ["x"], "resources": {"gpus": "two"}}}"#,
            None,
            None,
            &t,
        ) {
            Err(Rejection::Invalid(e)) => assert_eq!(e.errors[0].path, "spec.resources.gpus"),
            other => panic!("{other:?}"),
        }
        match read(br#"{"template": "mlp"}"#, None, None, &t) {
            Err(Rejection::Invalid(e)) => assert!(e.to_string().contains("param.lr"), "{e}"),
            other => panic!("{other:?}"),
        }
        match read(br#"{"spec": {}, "template": "mlp"}"#, None, None, &t) {
            Err(Rejection::Malformed(e)) => assert!(e.to_string().contains("exactly one")),
            other => panic!("{other:?}"),
        }
        match read(br#"{"spek": {}}"#, None, None, &t) {
            Err(Rejection::Malformed(e)) => assert!(e.to_string().contains("unknown field"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}

//! The hooks file: reading it, resolving each hook's secret and checking each
//! hook, its template included, before any delivery arrives.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tracing::warn;

use super::standard::Secret;
use crate::spec::{FieldError, Format, SpecError};
use crate::trigger::Glob;
use crate::trigger::check_name;

/// Longest hook or project name.
/// The GitHub events that can make a job, and so may be named in `on.events`.
pub(super) const JOB_EVENTS: [&str; 2] = ["push", "release"];

/// Which signature scheme and payloads a hook speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// GitHub: `X-Hub-Signature-256`, `X-GitHub-Event`, `X-GitHub-Delivery`.
    Github,
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    Standard,
}

/// Which GitHub deliveries make jobs (`on` in the file).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubFilter {
    /// `push` and/or `release`; empty for both.
    #[serde(default)]
    pub events: Vec<String>,
    /// Globs on the branch a push goes to (`main`, `release/*`); empty for any ref.
    /// Pushes only: releases are not filtered by branch.
    #[serde(default)]
    pub branches: Vec<Glob>,
}

/// A checked hook, its secret resolved. `Debug` shows no secret.
#[derive(Debug, Clone)]
pub struct Hook {
    /// Unique among the loaded hooks; names the label and idempotency keys of its jobs.
    pub name: String,
    pub kind: HookKind,
    /// The project its jobs belong to.
    pub project: String,
    /// For `github` hooks; always empty (take everything) for `standard` ones.
    pub on: GithubFilter,
    /// A job spec whose strings may hold `${var}`.
    pub template: Value,
    pub(super) secret: Secret,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HooksFile {
    hooks: Vec<HookConfig>,
}

/// One hook as written, before its secret is looked up.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HookConfig {
    name: String,
    kind: HookKind,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default = "default_project")]
    project: String,
    #[serde(default)]
    on: Option<GithubFilter>,
    template: Value,
}

fn default_project() -> String {
    "default".into()
}

/// Reads a hooks file (YAML unless it ends in `.json`), taking secrets named by
/// `secret_env` from the process environment.
pub fn load_hooks(path: &Path) -> Result<Vec<Hook>, SpecError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SpecError::one("", format!("cannot read {}: {e}", path.display())))?;
    parse_hooks(&text, Format::from_path(path), &|name| {
        std::env::var(name).ok()
    })
}

/// Parses and checks a hooks file; `env` looks up the variables `secret_env` names.
/// Every problem of every hook is reported at once, each under its field path
/// (`hooks[1].template.resources.gpus`).
pub fn parse_hooks(
    text: &str,
    format: Format,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Hook>, SpecError> {
    let file: HooksFile = match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let file =
                serde_path_to_error::deserialize(&mut de).map_err(SpecError::from_path_error)?;
            de.end().map_err(|e| SpecError::one("", e.to_string()))?;
            file
        }
        Format::Yaml => {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(SpecError::from_path_error)?
        }
    };
    let mut hooks = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, config) in file.hooks.into_iter().enumerate() {
        let at = format!("hooks[{i}]");
        if let Some(first) = seen.insert(config.name.clone(), i) {
            errors.push(FieldError {
                path: format!("{at}.name"),
                message: format!(
                    "hook {:?} is already defined at hooks[{first}]",
                    config.name
                ),
            });
        }
        match config.resolve(env) {
            Ok(hook) => hooks.push(hook),
            Err(e) => errors.extend(e.nested(&at).errors),
        }
    }
    if errors.is_empty() {
        Ok(hooks)
    } else {
        Err(SpecError { errors })
    }
}

impl HookConfig {
    /// The hook, once its fields, secret and template check out.
    fn resolve(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Hook, SpecError> {
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
        let secret = match self.secret(env) {
            Ok(secret) => Some(secret),
            Err(e) => {
                errors.extend(e.errors);
                None
            }
        };
        let on = match (self.kind, self.on) {
            (HookKind::Standard, Some(_)) => {
                errors.push(FieldError {
                    path: "on".into(),
                    message: "only github hooks take filters; a standard hook makes a job from every delivery".into(),
                });
                GithubFilter::default()
            }
            (_, on) => on.unwrap_or_default(),
        };
        for (k, event) in on.events.iter().enumerate() {
            if !JOB_EVENTS.contains(&event.as_str()) {
                errors.push(FieldError {
                    path: format!("on.events[{k}]"),
                    message: format!("expected push or release, got {event:?}"),
                });
            }
        }
        let mut hook = Hook {
            name: self.name,
            kind: self.kind,
            project: self.project,
            on,
            template: self.template,
            secret: Secret::from_bytes(Vec::new()),
        };
        errors.extend(hook.check_template());
        match secret {
            Some(secret) if errors.is_empty() => {
                hook.secret = secret;
                Ok(hook)
            }
            _ => Err(SpecError { errors }),
        }
    }

    /// The secret from `secret_env` or `secret`. Messages name the variable, never
    /// the value.
    fn secret(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, SpecError> {
        let (path, text) = match (&self.secret_env, &self.secret) {
            (Some(var), None) => match env(var).filter(|v| !v.is_empty()) {
                Some(text) => ("secret_env", text),
                None => {
                    return Err(SpecError::one(
                        "secret_env",
                        format!("environment variable {var:?} is not set or empty"),
                    ));
                }
            },
            (None, Some(text)) => {
                warn!(hook = %self.name, "hook secret written in the hooks file; prefer secret_env");
                ("secret", text.clone())
            }
            _ => {
                return Err(SpecError::one(
                    "",
                    "expected exactly one of secret_env (preferred) or secret",
                ));
            }
        };
        match self.kind {
            HookKind::Github => Ok(Secret::from_bytes(text.into_bytes())),
            HookKind::Standard => Secret::parse(&text).map_err(|_| {
                SpecError::one(
                    path,
                    "not a Standard Webhooks secret (expected whsec_ followed by base64)",
                )
            }),
        }
    }
}

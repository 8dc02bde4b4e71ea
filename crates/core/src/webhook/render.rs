//! Which deliveries a hook takes, and the job spec it makes from one.

use serde_json::{Map, Value};

use super::LABEL;
use super::github::GithubEvent;
use super::hooks::{Hook, HookKind, JOB_EVENTS};
use super::vars::HookVars;
use crate::spec::{self, FieldError, JobSpec, SpecError};
use crate::trigger::substitute_value;

/// Longest job name; longer rendered names are cut, as trigger rules do.
const MAX_JOB_NAME: usize = 128;

/// Values tried for `${body.<field>}` when a `standard` template is checked at
/// load: the body is unknown until a delivery comes, so a field is reported only
/// when none of these (a word, a bucket URI, a URL) makes it valid.
const BODY_PLACEHOLDERS: [&str; 3] = ["example", "bucket://example/data", "https://example.com/x"];

impl Hook {
    /// `hook:<name>:<delivery id>`: a delivery makes at most one job per hook, and
    /// the same id again is recognised as a replay.
    pub fn idempotency_key(&self, delivery: &str) -> String {
        format!("hook:{}:{delivery}", self.name)
    }

    /// Whether a GitHub event makes a job: `Err` says why not. Pings and events
    /// other than push and release never do; a release only when published; a push
    /// only when it does not delete its ref. Then `on.events` and, for pushes,
    /// `on.branches` must take it.
    pub fn accepts(&self, event: &GithubEvent) -> Result<(), String> {
        let name = event.name();
        if !JOB_EVENTS.contains(&name) {
            return Err(format!("event {name:?} makes no job"));
        }
        if !self.on.events.is_empty() && !self.on.events.iter().any(|e| e == name) {
            return Err(format!("event {name:?} is not in on.events"));
        }
        match event {
            GithubEvent::Push(push) => {
                if push.deleted {
                    return Err(format!("push deleting {:?}", push.git_ref));
                }
                let branches = &self.on.branches;
                let taken = branches.is_empty()
                    || push
                        .branch()
                        .is_some_and(|b| branches.iter().any(|g| g.is_match(b)));
                if taken {
                    Ok(())
                } else {
                    Err(format!(
                        "push to {:?} is not on a branch in on.branches",
                        push.git_ref
                    ))
                }
            }
            GithubEvent::Release(release) if release.action != "published" => Err(format!(
                "release action {:?}; only \"published\" makes a job",
                release.action
            )),
            _ => Ok(()),
        }
    }

    /// The job spec for one delivery: every `${var}` in every string of the
    /// template (map keys included) replaced, `name` sanitized and cut to 128
    /// characters, the idempotency key and the label `respawn.hook=<name>` set, and
    /// the result validated. Errors come back under `template.`.
    pub fn render(&self, vars: &HookVars, delivery: &str) -> Result<JobSpec, SpecError> {
        if !self.template.is_object() {
            return Err(SpecError::one("template", "expected a job spec (a map)"));
        }
        let mut errors = Vec::new();
        let mut value = substitute_value(&self.template, vars, "", &mut errors);
        if !errors.is_empty() {
            return Err(SpecError { errors }.nested("template"));
        }
        if let Value::Object(doc) = &mut value {
            if let Some(Value::String(name)) = doc.get_mut("name")
                && let Some((cut, _)) = name.char_indices().nth(MAX_JOB_NAME)
            {
                name.truncate(cut);
            }
            doc.insert(
                "idempotency_key".into(),
                Value::String(self.idempotency_key(delivery)),
            );
            // Labels of the wrong type are left for validation to report.
            if let Value::Object(labels) = doc
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()))
            {
                labels.insert(LABEL.into(), Value::String(self.name.clone()));
            }
        }
        spec::parse_json_value(value).map_err(|e| e.nested("template"))
    }

    /// Renders the template with placeholder values, so that unknown variables and
    /// anything that would make an invalid spec for every delivery show up at load.
    pub(super) fn check_template(&self) -> Vec<FieldError> {
        if !self.template.is_object() {
            // A job spec would also deserialize from a list (by position): say what is meant.
            return vec![FieldError {
                path: "template".into(),
                message: "expected a job spec (a map with name, command, …)".into(),
            }];
        }
        let passes: Vec<HookVars> = match self.kind {
            HookKind::Github => vec![HookVars::github_placeholder(&self.name)],
            HookKind::Standard => BODY_PLACEHOLDERS
                .iter()
                .map(|body| HookVars::standard_placeholder(&self.name, body))
                .collect(),
        };
        let mut found: Vec<Vec<FieldError>> = passes.iter().map(|v| self.check_with(v)).collect();
        let first = found.remove(0);
        // Only what fails whatever the body holds.
        first
            .into_iter()
            .filter(|e| {
                found
                    .iter()
                    .all(|errs| errs.iter().any(|o| o.path == e.path))
            })
            .collect()
    }

    fn check_with(&self, vars: &HookVars) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let _ = substitute_value(&self.template, vars, "", &mut errors);
        if errors.is_empty() {
            if let Some(key) = self.template.get("idempotency_key") {
                errors.push(FieldError {
                    path: "idempotency_key".into(),
                    message: format!(
                        "set by the hook (one job per delivery), so a template cannot set it; got {key}"
                    ),
                });
            }
            if let Some(name @ Value::String(_)) = self.template.get("name")
                && let Value::String(name) = substitute_value(name, vars, "name", &mut errors)
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
            && let Err(e) = self.render(vars, "placeholder-delivery")
        {
            return e.errors;
        }
        SpecError { errors }.nested("template").errors
    }
}

//! Checks that types alone cannot express, collected so a user sees every problem at once.

use std::fmt;

use super::JobSpec;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path from the spec's root (`resources.gpus`, `inputs[2].uri`); empty for the root.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a spec was rejected: one line per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub errors: Vec<FieldError>,
}

impl SpecError {
    pub fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            errors: vec![FieldError {
                path: path.into(),
                message: message.into(),
            }],
        }
    }

    /// The same errors with `prefix` in front of every path (`template.` + `resources.gpus`).
    pub fn nested(mut self, prefix: &str) -> Self {
        for e in &mut self.errors {
            e.path = if e.path.is_empty() {
                prefix.to_owned()
            } else if e.path.starts_with('[') {
                format!("{prefix}{}", e.path)
            } else {
                format!("{prefix}.{}", e.path)
            };
        }
        self
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

use super::grammar;

const MAX_GPUS: u32 = 64;
const MAX_NODES: u32 = 1024;

/// Every rule here is one `schemas/job-spec.schema.json` states too (a pattern, a
/// bound, an `if`/`then`), so whatever the schema admits this admits, and the
/// other way round; `spec/tests.rs` holds them to it.
pub(super) fn validate(spec: &JobSpec) -> Result<(), SpecError> {
    let mut errs = Errors(Vec::new());
    check_name(&mut errs, &spec.name);
    if spec.command.is_empty() && spec.image.is_none() {
        errs.push(
            "command",
            "required unless `image` is set (a job must run something)",
        );
    }
    if let Some(c) = spec.command.first().filter(|c| !grammar::is_program(c)) {
        errs.push("command[0]", format!("expected a program name, got {c:?}"));
    }
    if let Some(img) = &spec.image
        && !grammar::is_image(img)
    {
        errs.push(
            "image",
            format!(
                "expected an image reference such as pytorch/pytorch:2.4 (letters, digits and \
                 ._/:@-, starting with a letter or digit), got {img:?}"
            ),
        );
    }
    for k in spec.env.keys() {
        check_env_name(&mut errs, &format!("env.{k}"), k);
    }
    // A name in both `env` and `secrets` gets the secret's value (the agent sets
    // secrets last); no JSON Schema could refuse the pair, so neither does this.
    for k in spec.secrets.keys() {
        check_env_name(&mut errs, &format!("secrets.{k}"), k);
    }
    check_resources(&mut errs, spec);
    check_placement(&mut errs, spec);
    for (i, input) in spec.inputs.iter().enumerate() {
        check_uri(&mut errs, &format!("inputs[{i}].uri"), &input.uri);
        if let Some(p) = &input.path {
            check_relative(&mut errs, &format!("inputs[{i}].path"), p);
        }
    }
    if let Some(o) = &spec.outputs {
        check_uri(&mut errs, "outputs", o);
    }
    if let Some(u) = &spec.checkpoint.uri {
        check_uri(&mut errs, "checkpoint.uri", u);
    }
    if spec.checkpoint.keep_last == 0 {
        errs.push(
            "checkpoint.keep_last",
            "expected at least 1, got 0 (the newest checkpoint is needed to resume)",
        );
    }
    for (i, code) in spec.retry.infra_exit_codes.iter().enumerate() {
        if *code == 0 {
            errs.push(
                format!("retry.infra_exit_codes[{i}]"),
                "0 means success and cannot mean an infrastructure loss",
            );
        }
    }
    for (k, v) in &spec.labels {
        if !grammar::is_label_key(k) {
            errs.push(
                format!("labels.{k}"),
                "expected a label name of 1 to 63 letters, digits, `.`, `_`, `-`, `/`",
            );
        }
        let len = v.chars().count();
        if len > grammar::MAX_LABEL_VALUE {
            errs.push(
                format!("labels.{k}"),
                format!(
                    "expected at most {} characters, got {len}",
                    grammar::MAX_LABEL_VALUE
                ),
            );
        }
    }
    if let Some(k) = &spec.idempotency_key
        && let Err(e) = check_idempotency_key(k)
    {
        errs.0.extend(e.errors);
    }
    for (i, url) in spec.notify.iter().enumerate() {
        if !grammar::is_url(url) {
            errs.push(
                format!("notify[{i}]"),
                format!("expected an http(s) URL such as https://example.com/hook, got {url:?}"),
            );
        }
    }
    if errs.0.is_empty() {
        Ok(())
    } else {
        Err(SpecError { errors: errs.0 })
    }
}

/// An idempotency key's length: 1 to 255 characters.
pub fn check_idempotency_key(k: &str) -> Result<(), SpecError> {
    let len = k.chars().count();
    if (1..=grammar::MAX_IDEMPOTENCY_KEY).contains(&len) {
        Ok(())
    } else {
        Err(SpecError::one(
            "idempotency_key",
            format!(
                "expected 1 to {} characters, got {len}",
                grammar::MAX_IDEMPOTENCY_KEY
            ),
        ))
    }
}

fn check_name(errs: &mut Errors, name: &str) {
    let max = grammar::MAX_NAME;
    if name.is_empty() {
        errs.push("name", "expected a name, got an empty string");
    } else if name.len() > max {
        errs.push(
            "name",
            format!("expected at most {max} characters, got {}", name.len()),
        );
    } else if !grammar::is_name(name) {
        errs.push(
            "name",
            format!("expected letters, digits, `.`, `_` or `-`, got {name:?}"),
        );
    }
}

fn check_env_name(errs: &mut Errors, path: &str, name: &str) {
    if !grammar::is_env_name(name) {
        errs.push(
            path,
            format!("expected a variable name of letters, digits and `_`, got {name:?}"),
        );
    } else if name.starts_with("RESPAWN_") {
        errs.push(
            path,
            "names starting with RESPAWN_ are set by respawn and cannot be overridden",
        );
    }
}

fn check_resources(errs: &mut Errors, spec: &JobSpec) {
    let r = &spec.resources;
    if r.gpus > MAX_GPUS {
        errs.push(
            "resources.gpus",
            format!("expected at most {MAX_GPUS} per node, got {}", r.gpus),
        );
    }
    if r.nodes == 0 || r.nodes > MAX_NODES {
        errs.push(
            "resources.nodes",
            format!("expected 1 to {MAX_NODES}, got {}", r.nodes),
        );
    }
    if r.gpu_type.is_some() && r.gpus == 0 {
        errs.push("resources.gpu_type", "set, but `resources.gpus` is 0");
    }
}

fn check_placement(errs: &mut Errors, spec: &JobSpec) {
    let p = &spec.placement;
    if let Some(problem) = p.pool.as_deref().and_then(crate::pool::name_problem) {
        errs.push("placement.pool", problem);
    }
    if p.on_demand_after.is_some() && !p.spot {
        errs.push(
            "placement.on_demand_after",
            "only meaningful with `spot: true`",
        );
    }
    if let Some(price) = p.max_price {
        if !(price > 0.0 && price.is_finite()) {
            errs.push(
                "placement.max_price",
                format!("expected a positive price, got {price}"),
            );
        }
        if !p.spot {
            errs.push("placement.max_price", "only meaningful with `spot: true`");
        }
    }
}

fn check_uri(errs: &mut Errors, path: &str, uri: &str) {
    if let Some(problem) = grammar::uri_problem(uri) {
        errs.push(path, problem);
    } else if grammar::has_dotdot(uri) {
        errs.push(path, format!("`..` is not allowed in URIs, got {uri:?}"));
    }
}

fn check_relative(errs: &mut Errors, path: &str, p: &str) {
    if !grammar::is_relative(p) {
        errs.push(
            path,
            format!("expected a relative path without `..`, got {p:?}"),
        );
    }
}

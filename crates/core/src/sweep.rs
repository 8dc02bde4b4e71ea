//! Parameter sweeps: one spec that stands for an array of jobs, one per parameter
//! set (like Azure Batch AI parameter sweeps and AWS Batch array jobs).
//!
//! ```yaml
//! name: lr-sweep                     # letters, digits, `.`, `_`, `-`; at most 64
//! template:                          # a job spec whose strings may hold ${param.<name>} and ${index}
//!   name: mlp-lr-${param.lr}-bs-${param.batch}
//!   command: [respawn-trainer, --lr, "${param.lr}", --batch-size, "${param.batch}"]
//! grid:                              # every combination of the values …
//!   lr: [0.1, 0.03, 0.01]
//!   batch: [32, 64]
//! # … or instead of grid, the parameter sets one by one:
//! # list:
//! #   - { lr: 0.1, batch: 32 }
//! #   - { lr: 0.01, batch: 128 }
//! idempotency_key: sweep-2026-11-26  # optional: resubmitting returns the same array
//! ```
//!
//! A grid makes the cartesian product of its value lists, taking the parameters in
//! name order (sorted, as in every other map of a spec) with the first name varying
//! slowest, and each list in the order written: the grid above makes
//! `batch=32 lr=0.1`, `batch=32 lr=0.03`, `batch=32 lr=0.01`, `batch=64 lr=0.1`, ….
//! A list makes its entries in order. Job `i` of the array (from 0) is the
//! template with
//!
//! - `${param.<name>}` replaced by the parameter's value and `${index}` by `i`, in
//!   every string, map keys included, with the trigger rules' syntax (`$${` is a
//!   literal `${`; values in `name` are sanitized and the name is cut to 128
//!   characters, see [`crate::trigger`]). Values go in as text (`0.1`, `32`,
//!   `true`), so parameters belong in string fields: the command, args, env,
//!   inputs, labels, the name;
//! - `PARAM_<NAME>` (upper-cased) in `env` for every parameter;
//! - the labels [`ARRAY_LABEL`] (the array) and [`INDEX_LABEL`] (`i`); the node
//!   agent gives the workload `RESPAWN_ARRAY_INDEX` from the latter;
//! - with a sweep `idempotency_key`, an idempotency key made from it, the sweep's
//!   name and `i`, so resubmitting the sweep finds the jobs made the first time.
//!
//! [`parse_sweep`] checks everything it can, the template included (by expanding
//! the first parameter set), and names the field of every problem.
//! [`crate::handlers::submit_array`] submits the jobs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use schemars::JsonSchema;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::spec::{self, FieldError, Format, JobSpec, SpecError};
use crate::trigger::{Variables, substitute_value};

/// The label naming the array a job belongs to. [`SweepSpec::expand`] sets it to
/// the sweep's name; [`crate::handlers::submit_array`] to the array's id, which
/// is what jobs are listed by.
pub const ARRAY_LABEL: &str = "respawn.array";
/// The label holding a job's index in its array (`0`, `1`, …).
pub const INDEX_LABEL: &str = "respawn.array_index";
/// Most jobs one sweep may make.
pub const MAX_JOBS: usize = 10_000;

const MAX_NAME: usize = 64;
const MAX_PARAM: usize = 32;
const MAX_KEY: usize = 255;
/// A job name's limit; rendered names are cut to it (as trigger rules do).
const MAX_JOB_NAME: usize = 128;
/// Longest value quoted in an error's "in job i: …" context.
const MAX_QUOTED: usize = 40;

/// An array of jobs made from one template and a set of parameter values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "respawn parameter sweep",
    // Exactly one of them, and not null (which reads as absent).
    extend("oneOf" = [
        { "required": ["grid"], "properties": { "grid": { "type": "object" } } },
        { "required": ["list"], "properties": { "list": { "type": "array" } } }
    ])
)]
pub struct SweepSpec {
    /// The sweep's name: letters, digits, `.`, `_`, `-`; at most 64 characters. It starts the array's id.
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9._-]+$"))]
    pub name: String,
    /// A job spec whose strings may hold `${param.<name>}` and `${index}`; `$${` is a literal `${`.
    #[schemars(schema_with = "template_schema")]
    pub template: Value,
    /// Parameter name → values; the sweep makes every combination. Names: a letter, then letters, digits, `_`; at most 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend(
        "propertyNames" = { "pattern": "^[A-Za-z][A-Za-z0-9_]{0,31}$" },
        "minProperties" = 1,
        "additionalProperties" = { "type": "array", "minItems": 1, "items": { "$ref": "#/$defs/ParamValue" } }
    ))]
    pub grid: Option<BTreeMap<String, Vec<ParamValue>>>,
    /// The parameter sets one by one, each with the same parameter names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 10000),
        extend("items" = {
            "type": "object",
            "propertyNames": { "pattern": "^[A-Za-z][A-Za-z0-9_]{0,31}$" },
            "additionalProperties": { "$ref": "#/$defs/ParamValue" }
        })
    )]
    pub list: Option<Vec<BTreeMap<String, ParamValue>>>,
    /// Submitting the same key again (in the same project, with the same name) returns the same array instead of making another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub idempotency_key: Option<String>,
}

/// A job spec, less `idempotency_key`, which the sweep sets for each job.
fn template_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let spec = generator.subschema_for::<JobSpec>();
    schemars::json_schema!({
        "allOf": [spec, { "not": { "required": ["idempotency_key"] } }]
    })
}

/// One value of a parameter: a string, a number or a boolean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    String(String),
    Number(serde_json::Number),
    Bool(bool),
}

impl fmt::Display for ParamValue {
    /// The text substituted for the value: a string as is, a number as JSON writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::String(s) => f.write_str(s),
            ParamValue::Number(n) => write!(f, "{n}"),
            ParamValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Parses and checks a sweep. Every error names a field path (`grid.lr[2]`,
/// `list[3]`, `template.resources.gpus`), and a template that cannot make a valid
/// job from the first parameter set is an error now rather than at submission.
pub fn parse_sweep(text: &str, format: Format) -> Result<SweepSpec, SpecError> {
    let sweep: SweepSpec = match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let sweep =
                serde_path_to_error::deserialize(&mut de).map_err(SpecError::from_path_error)?;
            de.end().map_err(|e| SpecError::one("", e.to_string()))?;
            sweep
        }
        Format::Yaml => {
            // As for job specs: the JSON document the YAML stands for.
            let doc = spec::yaml_document(text)?;
            serde_path_to_error::deserialize(doc).map_err(SpecError::from_path_error)?
        }
    };
    sweep.check()?;
    Ok(sweep)
}

impl SweepSpec {
    /// Everything [`parse_sweep`] checks after decoding: the sweep's own fields, then
    /// the template, rendered with the first parameter set.
    pub fn check(&self) -> Result<(), SpecError> {
        let errors = self.check_shape();
        if !errors.is_empty() {
            // Without sound parameters the template's errors would be guesses.
            return Err(SpecError { errors });
        }
        self.render(0, &self.name).map(|_| ())
    }

    /// How many jobs the sweep makes (saturating; see [`MAX_JOBS`]).
    pub fn job_count(&self) -> usize {
        match (&self.grid, &self.list) {
            (Some(grid), None) => grid_size(grid).unwrap_or(usize::MAX),
            (None, Some(list)) => list.len(),
            _ => 0,
        }
    }

    /// The jobs, in index order, labelled with the sweep's name as the array.
    pub fn expand(&self) -> Result<Vec<JobSpec>, SpecError> {
        self.expand_as(&self.name)
    }

    /// The jobs, in index order, with `array` in their [`ARRAY_LABEL`].
    pub fn expand_as(&self, array: &str) -> Result<Vec<JobSpec>, SpecError> {
        // A sweep built in code or decoded without `parse_sweep` is checked here,
        // before anything is sized by its parameters.
        let errors = self.check_shape();
        if !errors.is_empty() {
            return Err(SpecError { errors });
        }
        (0..self.job_count())
            .map(|i| self.render(i, array))
            .collect()
    }

    /// Parameter set `index` as (name, value) pairs in name order. Only for an index
    /// below [`Self::job_count`] of a sweep whose shape is checked.
    fn params(&self, index: usize) -> Vec<(&str, &ParamValue)> {
        match (&self.grid, &self.list) {
            (Some(grid), _) => {
                // Mixed radix, the last name the fastest digit.
                let mut rest = index;
                let mut out: Vec<_> = grid
                    .iter()
                    .rev()
                    .filter_map(|(name, values)| {
                        let len = values.len().max(1);
                        let value = values.get(rest % len)?;
                        rest /= len;
                        Some((name.as_str(), value))
                    })
                    .collect();
                out.reverse();
                out
            }
            (None, Some(list)) => list
                .get(index)
                .map(|set| set.iter().map(|(k, v)| (k.as_str(), v)).collect())
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    /// The sweep's own fields: name, key, parameters, size.
    fn check_shape(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        if self.name.is_empty()
            || self.name.len() > MAX_NAME
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            errs.push(
                "name",
                format!(
                    "expected 1 to {MAX_NAME} letters, digits, `.`, `_` or `-`, got {:?}",
                    self.name
                ),
            );
        }
        if let Some(k) = &self.idempotency_key
            && !(1..=MAX_KEY).contains(&k.chars().count())
        {
            errs.push(
                "idempotency_key",
                format!(
                    "expected 1 to {MAX_KEY} characters, got {}",
                    k.chars().count()
                ),
            );
        }
        match (&self.grid, &self.list) {
            (Some(_), Some(_)) => errs.push(
                "",
                "set either `grid` (every combination of values) or `list` (parameter sets), not both",
            ),
            (None, None) => errs.push(
                "",
                "expected `grid` (every combination of values) or `list` (parameter sets)",
            ),
            (Some(grid), None) => check_grid(&mut errs, grid),
            (None, Some(list)) => check_list(&mut errs, list),
        }
        if !self.template.is_object() {
            // A job spec would also decode from a list (by position): say what is meant.
            errs.push(
                "template",
                "expected a job spec (a map with name, command, …)",
            );
        } else if let Some(key) = self.template.get("idempotency_key") {
            errs.push(
                "template.idempotency_key",
                format!(
                    "set by the sweep for each job (from the sweep's own `idempotency_key`), so a template cannot set it; got {key}"
                ),
            );
        }
        errs.0
    }

    /// Job `index`: the template rendered with its parameters, the sweep's env,
    /// labels and key added, validated as a job spec.
    fn render(&self, index: usize, array: &str) -> Result<JobSpec, SpecError> {
        let params = self.params(index);
        let vars = Params::new(index, &params);
        let mut errors = Vec::new();
        let mut value = substitute_value(&self.template, &vars, "", &mut errors);
        if !errors.is_empty() {
            return Err(SpecError { errors }.nested("template"));
        }
        if let Value::Object(doc) = &mut value {
            if let Some(Value::String(name)) = doc.get_mut("name")
                && let Some((cut, _)) = name.char_indices().nth(MAX_JOB_NAME)
            {
                name.truncate(cut);
            }
            let env = params
                .iter()
                .map(|(name, v)| (env_name(name), v.to_string(), format!("parameter {name}")));
            add_entries(doc, "env", env, &mut errors);
            let labels = [
                (ARRAY_LABEL.to_owned(), array.to_owned(), "sweep".to_owned()),
                (
                    INDEX_LABEL.to_owned(),
                    index.to_string(),
                    "sweep".to_owned(),
                ),
            ];
            add_entries(doc, "labels", labels, &mut errors);
            if let Some(key) = &self.idempotency_key {
                doc.insert(
                    "idempotency_key".into(),
                    Value::String(job_key(&self.name, key, index)),
                );
            }
        }
        if !errors.is_empty() {
            return Err(SpecError { errors }.nested("template"));
        }
        spec::parse_json_value(value).map_err(|e| {
            // Validation failures may hold for some values only: say which job.
            let context = describe(index, &params);
            let mut e = e.nested("template");
            for err in &mut e.errors {
                err.message = format!("{} ({context})", err.message);
            }
            e
        })
    }
}

/// The variables of one job: `index` and `param.<name>` for each parameter.
struct Params(BTreeMap<String, String>);

impl Params {
    fn new(index: usize, params: &[(&str, &ParamValue)]) -> Self {
        let mut vars: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (format!("param.{k}"), v.to_string()))
            .collect();
        vars.insert("index".into(), index.to_string());
        Params(vars)
    }
}

impl Variables for Params {
    fn value(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn known(&self) -> String {
        self.0
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The environment variable carrying a parameter.
fn env_name(param: &str) -> String {
    format!("PARAM_{}", param.to_ascii_uppercase())
}

/// `sweep:<name>:<sha256 of the key>:<index>`: stable across calls and hosts, at
/// most 139 characters whatever the key's length, and scoped by the sweep's name
/// like the array id is, so a resubmission finds exactly the jobs of its array.
fn job_key(name: &str, key: &str, index: usize) -> String {
    format!(
        "sweep:{name}:{}:{index}",
        hex::encode(Sha256::digest(key.as_bytes()))
    )
}

/// Adds `(name, value, owner)` entries to the map at `doc[field]`; one the template
/// already has is an error, as silently overriding either would lose what was meant.
fn add_entries(
    doc: &mut Map<String, Value>,
    field: &str,
    entries: impl IntoIterator<Item = (String, String, String)>,
    errors: &mut Vec<FieldError>,
) {
    // A field of the wrong type is left for validation to report.
    let Value::Object(map) = doc
        .entry(field)
        .or_insert_with(|| Value::Object(Map::new()))
    else {
        return;
    };
    for (name, value, owner) in entries {
        if map.contains_key(&name) {
            errors.push(FieldError {
                path: format!("{field}.{name}"),
                message: format!("set by the sweep ({owner}), so the template cannot set it"),
            });
        } else {
            map.insert(name, Value::String(value));
        }
    }
}

/// `job 3: batch=64, lr=0.1`, values cut short.
fn describe(index: usize, params: &[(&str, &ParamValue)]) -> String {
    let mut out = format!("job {index}");
    for (i, (k, v)) in params.iter().enumerate() {
        let v = v.to_string();
        let v = match v.char_indices().nth(MAX_QUOTED) {
            Some((cut, _)) => format!("{}…", &v[..cut]),
            None => v,
        };
        out.push_str(if i == 0 { ": " } else { ", " });
        out.push_str(&format!("{k}={v}"));
    }
    out
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// The product of the value lists' lengths; `None` past `usize`.
fn grid_size(grid: &BTreeMap<String, Vec<ParamValue>>) -> Option<usize> {
    grid.values()
        .try_fold(1usize, |n, values| n.checked_mul(values.len()))
}

fn check_grid(errs: &mut Errors, grid: &BTreeMap<String, Vec<ParamValue>>) {
    if grid.is_empty() {
        errs.push("grid", "expected at least one parameter");
        return;
    }
    check_param_names(errs, "grid", grid.keys());
    for (name, values) in grid {
        if values.is_empty() {
            errs.push(format!("grid.{name}"), "expected at least one value");
        }
        // The same value twice would make the same job twice.
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, v) in values.iter().enumerate() {
            let text = v.to_string();
            if let Some(first) = seen.get(&text) {
                errs.push(
                    format!("grid.{name}[{i}]"),
                    format!("repeats grid.{name}[{first}] ({text:?})"),
                );
            } else {
                seen.insert(text, i);
            }
        }
    }
    if grid.values().any(Vec::is_empty) {
        return;
    }
    let size = grid_size(grid);
    if size.is_none_or(|n| n > MAX_JOBS) {
        let dims: Vec<String> = grid
            .iter()
            .map(|(name, values)| format!("{} {name}", values.len()))
            .collect();
        let count = size.map_or_else(|| format!("more than {}", usize::MAX), |n| n.to_string());
        errs.push(
            "grid",
            format!(
                "the grid makes {count} jobs ({}); a sweep makes at most {MAX_JOBS}",
                dims.join(" × ")
            ),
        );
    }
}

fn check_list(errs: &mut Errors, list: &[BTreeMap<String, ParamValue>]) {
    let Some(first) = list.first() else {
        errs.push("list", "expected at least one parameter set");
        return;
    };
    if list.len() > MAX_JOBS {
        errs.push(
            "list",
            format!(
                "the list makes {} jobs; a sweep makes at most {MAX_JOBS}",
                list.len()
            ),
        );
    }
    // Only the first entry's names are checked: every other entry must match it.
    check_param_names(errs, "list[0]", first.keys());
    let names: BTreeSet<&String> = first.keys().collect();
    for (i, set) in list.iter().enumerate().skip(1) {
        let these: BTreeSet<&String> = set.keys().collect();
        if these == names {
            continue;
        }
        let join = |s: BTreeSet<&&String>| {
            s.into_iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let missing = join(names.difference(&these).collect());
        let extra = join(these.difference(&names).collect());
        let mut message = String::from("expected the parameters of list[0]");
        if !missing.is_empty() {
            message.push_str(&format!("; missing {missing}"));
        }
        if !extra.is_empty() {
            message.push_str(&format!("; not in list[0]: {extra}"));
        }
        errs.push(format!("list[{i}]"), message);
    }
}

/// Names must be usable in `${param.<name>}` and as `PARAM_<NAME>`, and no two may
/// share that variable.
fn check_param_names<'a>(errs: &mut Errors, at: &str, names: impl Iterator<Item = &'a String>) {
    let mut vars: BTreeMap<String, &str> = BTreeMap::new();
    for name in names {
        let valid = name.len() <= MAX_PARAM
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            errs.push(
                format!("{at}.{name}"),
                format!(
                    "expected a parameter name of a letter, then letters, digits or `_`, at most {MAX_PARAM} in all, got {name:?}"
                ),
            );
            continue;
        }
        let var = env_name(name);
        if let Some(other) = vars.get(&var) {
            errs.push(
                format!("{at}.{name}"),
                format!("both this and parameter {other} would set {var}"),
            );
        } else {
            vars.insert(var, name);
        }
    }
}

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "expected a string, number or boolean";
        impl<'de> Visitor<'de> for V {
            type Value = ParamValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ParamValue, E> {
                Ok(ParamValue::String(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<ParamValue, E> {
                Ok(ParamValue::String(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ParamValue, E> {
                Ok(ParamValue::Bool(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ParamValue, E> {
                Ok(ParamValue::Number(v.into()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ParamValue, E> {
                Ok(ParamValue::Number(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ParamValue, E> {
                serde_json::Number::from_f64(v)
                    .map(ParamValue::Number)
                    .ok_or_else(|| E::custom(format!("expected a finite number, got {v}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ParamValue, E> {
                Err(E::custom(format!("{EXPECTED}, got null")))
            }
            fn visit_none<E: de::Error>(self) -> Result<ParamValue, E> {
                self.visit_unit()
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<ParamValue, A::Error> {
                Err(de::Error::custom(format!("{EXPECTED}, got a list")))
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<ParamValue, A::Error> {
                Err(de::Error::custom(format!("{EXPECTED}, got a map")))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for ParamValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ParamValue".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A parameter value, substituted as text: a string, a number or a boolean.",
            "type": ["string", "number", "boolean"]
        })
    }
}

#[cfg(test)]
mod tests;

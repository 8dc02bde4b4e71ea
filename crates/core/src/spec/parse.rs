//! Reading specs from YAML or JSON, with the field path in every error.

use std::path::Path;

use super::JobSpec;
use super::validate::{FieldError, SpecError};

/// The text format of a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// From a file name; YAML unless it ends in `.json`.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }

    /// From the text itself: JSON when it starts with `{`.
    pub fn sniff(text: &str) -> Format {
        if text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

/// Parses and validates a spec. Every error names a field path.
pub fn parse(text: &str, format: Format) -> Result<JobSpec, SpecError> {
    let spec = match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let spec = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
            de.end().map_err(|e| SpecError::one("", e.to_string()))?;
            spec
        }
        Format::Yaml => {
            // Read as the JSON document the YAML stands for (`0` is a number, `null`
            // is null), so that a YAML spec means what the same spec in JSON means
            // and the JSON Schema judges both alike; serde_yaml alone would take
            // `name: 0` as the string "0".
            let doc = yaml_document(text)?;
            serde_path_to_error::deserialize(doc).map_err(path_error)?
        }
    };
    super::validate::validate(&spec)?;
    Ok(spec)
}

/// A YAML text as the JSON value it stands for.
pub fn yaml_document(text: &str) -> Result<serde_json::Value, SpecError> {
    serde_yaml_ng::from_str(text).map_err(|e| SpecError::one("", e.to_string()))
}

/// Parses a spec already decoded into JSON (e.g. from a queue message or request body).
pub fn parse_json_value(value: serde_json::Value) -> Result<JobSpec, SpecError> {
    let spec = serde_path_to_error::deserialize(value).map_err(path_error)?;
    super::validate::validate(&spec)?;
    Ok(spec)
}

/// Reads, parses and validates a spec file; the format follows the extension.
pub fn parse_file(path: &Path) -> Result<JobSpec, SpecError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SpecError::one("", format!("cannot read {}: {e}", path.display())))?;
    parse(&text, Format::from_path(path))
}

impl SpecError {
    /// The field path and message of a decoding error, from any of the readers
    /// (specs, trigger rules, hooks, sweeps).
    pub fn from_path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> SpecError {
        path_error(e)
    }
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> SpecError {
    SpecError {
        errors: vec![FieldError::from_path_error(e)],
    }
}

impl FieldError {
    /// The field path and message of a decoding error, from any JSON or YAML reader.
    pub fn from_path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> FieldError {
        let path = e.path().to_string();
        // serde_path_to_error writes the document root as ".".
        let path = if path == "." { String::new() } else { path };
        // YAML puts (part of) the path in front of its message; it is said once already.
        let message = e.inner().to_string();
        let message = match message.split_once(": ") {
            Some((head, rest))
                if !head.is_empty()
                    && (path == head
                        || path.starts_with(&format!("{head}."))
                        || path.starts_with(&format!("{head}["))) =>
            {
                rest.to_owned()
            }
            _ => message,
        };
        FieldError { path, message }
    }
}

//! Projects: who may touch which part of the bucket.
//!
//! Project `P` owns the keys under `projects/P/` in every bucket its jobs name
//! (`bucket://projects/P/…`, `s3://<bucket>/projects/P/…`). The `default` project
//! owns everything outside `projects/`. A job may read inputs from and write outputs
//! and checkpoints to its own project's keys only; local files (`file://`) only in the
//! `default` project, which is the single user's local stack.

use crate::spec::{FieldError, JobSpec, SpecError};

pub const DEFAULT: &str = "default";

/// Whether `name` can be a project: 1–64 of `a-z`, `0-9`, `-`, `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// [`valid_name`], with a message that says what is expected.
pub fn check_name(name: &str) -> Result<(), String> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "expected 1 to 64 lowercase letters, digits, `-` or `_`, got {name:?}"
        ))
    }
}

/// The object key a URI points at, without its bucket.
fn key_of(uri: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = uri.split_once("://")?;
    let key = match scheme {
        "bucket" | "file" => rest,
        _ => rest.split_once('/').map_or("", |(_, k)| k),
    };
    Some((scheme, key.trim_start_matches('/')))
}

fn check_uri(project: &str, path: &str, uri: &str, errs: &mut Vec<FieldError>) {
    let mut deny = |message: String| {
        errs.push(FieldError {
            path: path.to_owned(),
            message,
        })
    };
    let Some((scheme, key)) = key_of(uri) else {
        return deny(format!("expected a URI, got {uri:?}"));
    };
    if key.split('/').any(|s| s == "..") {
        return deny(format!("`..` is not allowed in URIs, got {uri:?}"));
    }
    if scheme == "file" {
        if project != DEFAULT {
            deny(format!(
                "file:// URIs are only for the default project; project {project} uses its bucket prefix projects/{project}/"
            ));
        }
        return;
    }
    let own = format!("projects/{project}/");
    if project == DEFAULT {
        if key.starts_with("projects/") {
            deny(format!(
                "{uri} is inside another project's prefix (projects/…)"
            ));
        }
    } else if !key.starts_with(&own) {
        deny(format!("{uri} is outside project {project}'s prefix {own}"));
    }
}

/// Rejects a spec whose URIs reach outside `project`'s keys.
pub fn check_access(spec: &JobSpec, project: &str) -> Result<(), SpecError> {
    let mut errs = Vec::new();
    if let Err(message) = check_name(project) {
        errs.push(FieldError {
            path: String::new(),
            message: format!("project: {message}"),
        });
    }
    for (i, input) in spec.inputs.iter().enumerate() {
        check_uri(project, &format!("inputs[{i}].uri"), &input.uri, &mut errs);
    }
    if let Some(o) = &spec.outputs {
        check_uri(project, "outputs", o, &mut errs);
    }
    if let Some(c) = &spec.checkpoint.uri {
        check_uri(project, "checkpoint.uri", c, &mut errs);
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(SpecError { errors: errs })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::spec::{Format, parse};

    fn spec(inputs: &[&str], outputs: Option<&str>) -> JobSpec {
        let mut text = String::from("name: j\ncommand: [x]\ninputs:\n");
        for i in inputs {
            text.push_str(&format!("  - {i}\n"));
        }
        if inputs.is_empty() {
            text = String::from("name: j\ncommand: [x]\n");
        }
        if let Some(o) = outputs {
            text.push_str(&format!("outputs: {o}\n"));
        }
        parse(&text, Format::Yaml).unwrap()
    }

    #[test]
    fn projects_stay_in_their_prefix() {
        assert!(
            check_access(
                &spec(
                    &["bucket://projects/a/data.csv"],
                    Some("s3://b/projects/a/out/")
                ),
                "a"
            )
            .is_ok()
        );
        let e = check_access(&spec(&["bucket://projects/b/data.csv"], None), "a").unwrap_err();
        assert_eq!(e.errors[0].path, "inputs[0].uri");
        assert!(e.errors[0].message.contains("outside project a"));
        let e = check_access(&spec(&[], Some("s3://b/projects/ab/x")), "a").unwrap_err();
        assert_eq!(
            e.errors[0].path, "outputs",
            "a prefix of another project's name is not the project"
        );
        assert!(check_access(&spec(&["file:///etc/passwd"], None), "a").is_err());
        assert!(
            check_access(&spec(&["bucket://projects/a"], None), "a").is_err(),
            "the folder itself, no slash"
        );
    }

    #[test]
    fn the_default_project_owns_all_but_projects() {
        assert!(
            check_access(
                &spec(&["bucket://incoming/x.csv", "file:///data/x"], None),
                DEFAULT
            )
            .is_ok()
        );
        assert!(check_access(&spec(&["bucket://projects/a/x.csv"], None), DEFAULT).is_err());
    }
}

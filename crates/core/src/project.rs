//! Projects: who may touch which part of the bucket.
//!
//! Project `P` owns the keys under `projects/P/` in every bucket its jobs name
//! (`bucket://projects/P/…`, `s3://<bucket>/projects/P/…`). `jobs/` belongs to the
//! broker: it holds every job's spec, checkpoints, logs and outputs, so no job may
//! name it — except its own outputs, `jobs/<its id>/outputs/…`, once its id is
//! known. The `default` project owns the rest, outside `projects/` and `jobs/`.
//!
//! Local files (`file://`) are read and written on the host by the agent, as the
//! broker's user, who can read every token and secret of the stack. They are only
//! for the `default` project, and only for specs whose text the operator wrote
//! (trigger rules, hook templates, queue templates from the operator's folders) or
//! an admin token sent; see [`crate::handlers::Submission::local_files`].

use crate::job::JobId;
use crate::spec::{FieldError, JobSpec, SpecError};

pub const DEFAULT: &str = "default";

/// The broker's own prefix in the bucket.
pub const BROKER_PREFIX: &str = "jobs/";

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
    let scheme = uri.split_once("://")?.0;
    let parsed = crate::blob_uri::parse(uri).ok()?;
    Some((scheme, parsed.key.trim_start_matches('/')))
}

/// Who is submitting, as far as the bucket is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Submitter<'a> {
    pub project: &'a str,
    /// The job's id when known: its own outputs may be named under `jobs/<id>/outputs/`.
    pub job: Option<&'a JobId>,
    /// Whether `file://` may be named (the spec's text is the operator's).
    pub local_files: bool,
}

/// Which field names a URI: what may be there differs for outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Input,
    Outputs,
    Checkpoint,
}

fn check_uri(who: Submitter<'_>, field: Field, path: &str, uri: &str, errs: &mut Vec<FieldError>) {
    let project = who.project;
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
    if scheme != "file" {
        // A store names keys, not paths: `.` or an empty segment would be a second
        // spelling of a key the prefix rules below never see, and no key at all is
        // the whole bucket, every job's files in it.
        let segments: Vec<&str> = key.split('/').collect();
        let last = segments.len() - 1;
        if key.is_empty()
            || segments
                .iter()
                .enumerate()
                .any(|(i, s)| *s == "." || (s.is_empty() && i != last))
        {
            return deny(format!(
                "expected a key inside the bucket without empty or `.` segments, got {uri:?}"
            ));
        }
    }
    if scheme == "file" {
        if project != DEFAULT {
            deny(format!(
                "file:// URIs are only for the default project; project {project} uses its bucket prefix projects/{project}/"
            ));
        } else if !who.local_files {
            deny(
                "file:// URIs are read and written on the broker's host, so only specs from the operator (trigger rules, hook and queue templates) or an admin token may name them; use the bucket (bucket://…)"
                    .to_owned(),
            );
        }
        return;
    }
    if key.starts_with(BROKER_PREFIX) || key == "jobs" {
        let own_outputs = who
            .job
            .map(|id| format!("{BROKER_PREFIX}{id}/outputs/"))
            .filter(|own| field == Field::Outputs && key.starts_with(own.as_str()));
        if own_outputs.is_none() {
            deny(format!(
                "{uri} is in jobs/, which belongs to the broker (every job's spec, checkpoints, logs and outputs); a job may name only its own jobs/<id>/outputs/"
            ));
        }
        return;
    }
    let own = format!("projects/{project}/");
    if project == DEFAULT {
        if key == "projects" || key.starts_with("projects/") {
            deny(format!(
                "{uri} is inside another project's prefix (projects/…)"
            ));
        }
    } else if !key.starts_with(&own) {
        deny(format!("{uri} is outside project {project}'s prefix {own}"));
    }
}

/// Rejects a spec whose URIs reach outside what `who` may touch, naming each field.
pub fn check_access(spec: &JobSpec, who: Submitter<'_>) -> Result<(), SpecError> {
    let mut errs = Vec::new();
    if let Err(message) = check_name(who.project) {
        errs.push(FieldError {
            path: String::new(),
            message: format!("project: {message}"),
        });
    }
    for (i, input) in spec.inputs.iter().enumerate() {
        let path = format!("inputs[{i}].uri");
        check_uri(who, Field::Input, &path, &input.uri, &mut errs);
    }
    if let Some(o) = &spec.outputs {
        check_uri(who, Field::Outputs, "outputs", o, &mut errs);
    }
    if let Some(c) = &spec.checkpoint.uri {
        check_uri(who, Field::Checkpoint, "checkpoint.uri", c, &mut errs);
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
        let mut text = String::from("name: j\ncommand: [x]\n");
        if !inputs.is_empty() {
            text.push_str("inputs:\n");
        }
        for i in inputs {
            text.push_str(&format!("  - {i}\n"));
        }
        if let Some(o) = outputs {
            text.push_str(&format!("outputs: {o}\n"));
        }
        parse(&text, Format::Yaml).unwrap()
    }

    fn api(project: &str) -> Submitter<'_> {
        Submitter {
            project,
            job: None,
            local_files: false,
        }
    }

    fn operator(project: &str) -> Submitter<'_> {
        Submitter {
            local_files: true,
            ..api(project)
        }
    }

    #[test]
    fn no_uri_reaches_the_whole_bucket_or_spells_a_key_twice() {
        for uri in [
            "bucket:///",
            "az://jobs",
            "https://acct.blob.core.windows.net/jobs",
            "abfss://jobs@acct.dfs.core.windows.net",
            "bucket://./jobs/01j/spec.json",
            "bucket://data//x",
            "bucket://projects",
        ] {
            for who in [api("default"), api("a")] {
                let as_output = check_access(&spec(&[], Some(uri)), who);
                assert!(as_output.is_err(), "{uri} as outputs, for {}", who.project);
            }
        }
        assert!(check_access(&spec(&["bucket://data/x/"], None), api("default")).is_ok());
    }

    #[test]
    fn azure_blob_uris_keep_to_the_project_prefix_in_every_form() {
        for uri in [
            "az://jobs/projects/a/x.csv",
            "abfss://jobs@acct.dfs.core.windows.net/projects/a/x.csv",
            "https://acct.blob.core.windows.net/jobs/projects/a/x.csv",
        ] {
            assert!(check_access(&spec(&[uri], None), api("a")).is_ok(), "{uri}");
            let other = uri.replace("projects/a/", "projects/b/");
            let e = check_access(&spec(&[&other], None), api("a")).unwrap_err();
            assert!(e.errors[0].message.contains("outside project a"), "{other}");
            let broker = uri.replace("projects/a/x.csv", "jobs/01j/outputs/x");
            assert!(
                check_access(&spec(&[&broker], None), api("a")).is_err(),
                "{broker}"
            );
        }
    }

    #[test]
    fn projects_stay_in_their_prefix() {
        let ok = spec(
            &["bucket://projects/a/data.csv"],
            Some("s3://b/projects/a/out/"),
        );
        assert!(check_access(&ok, api("a")).is_ok());
        let e = check_access(&spec(&["bucket://projects/b/data.csv"], None), api("a")).unwrap_err();
        assert_eq!(e.errors[0].path, "inputs[0].uri");
        assert!(e.errors[0].message.contains("outside project a"));
        let e = check_access(&spec(&[], Some("s3://b/projects/ab/x")), api("a")).unwrap_err();
        assert_eq!(
            e.errors[0].path, "outputs",
            "a prefix of another project's name is not the project"
        );
        assert!(check_access(&spec(&["file:///etc/passwd"], None), operator("a")).is_err());
        assert!(
            check_access(&spec(&["bucket://projects/a"], None), api("a")).is_err(),
            "the folder itself, no slash"
        );
    }

    #[test]
    fn the_default_project_owns_all_but_projects_and_jobs() {
        let mine = spec(&["bucket://incoming/x.csv", "s3://b/data/y"], None);
        assert!(check_access(&mine, api(DEFAULT)).is_ok());
        assert!(check_access(&spec(&["bucket://projects/a/x.csv"], None), api(DEFAULT)).is_err());
    }

    #[test]
    fn jobs_belongs_to_the_broker_but_for_a_jobs_own_outputs() {
        let id: JobId = "01hzzzzzzzzzzzzzzzzzzzzzzz".parse().unwrap();
        let other: JobId = "01hyyyyyyyyyyyyyyyyyyyyyyy".parse().unwrap();
        for project in [DEFAULT, "a"] {
            let reach = spec(
                &[&format!(
                    "bucket://jobs/{other}/attempts/1/stdout/0000000000"
                )],
                Some(&format!("s3://b/jobs/{other}/outputs/")),
            );
            let e = check_access(&reach, operator(project)).unwrap_err();
            let paths: Vec<_> = e.errors.iter().map(|e| e.path.as_str()).collect();
            assert_eq!(paths, ["inputs[0].uri", "outputs"], "{project}: {e}");
            let ckpt = parse(
                "name: j\ncommand: [x]\ncheckpoint: { uri: bucket://jobs/x/checkpoints/ }\n",
                Format::Yaml,
            )
            .unwrap();
            let e = check_access(&ckpt, operator(project)).unwrap_err();
            assert_eq!(e.errors[0].path, "checkpoint.uri");
        }
        let own = spec(&[], Some(&format!("bucket://jobs/{id}/outputs/model/")));
        let known = Submitter {
            job: Some(&id),
            ..api(DEFAULT)
        };
        assert!(
            check_access(&own, known).is_ok(),
            "its own outputs, id known"
        );
        assert!(
            check_access(&own, api(DEFAULT)).is_err(),
            "id not yet known"
        );
        let own_input = spec(&[&format!("bucket://jobs/{id}/outputs/x")], None);
        assert!(
            check_access(&own_input, known).is_err(),
            "outputs only, not inputs"
        );
    }

    #[test]
    fn local_files_only_from_the_operator_in_the_default_project() {
        let local = spec(&["file:///data/x"], Some("file:///data/out/"));
        assert!(check_access(&local, operator(DEFAULT)).is_ok());
        let e = check_access(&local, api(DEFAULT)).unwrap_err();
        let paths: Vec<_> = e.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["inputs[0].uri", "outputs"]);
        assert!(e.errors[0].message.contains("operator"), "{e}");
        assert!(check_access(&local, operator("a")).is_err());
    }
}

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use proptest::prelude::*;

use super::*;
use crate::handlers::BlobCreated;
use crate::spec::Format;

pub(super) const CSV: &str = r#"
name: train-on-csv
match:
  prefix: incoming/
  glob: "*.csv"
template:
  name: train-${stem}
  command: [respawn-trainer, --data, "${input_path}"]
  inputs: ["${uri}"]
  labels: { team: vision }
"#;

pub(super) const MARKER: &str = r#"
name: on-upload
match:
  prefix: uploads/
  marker: _SUCCESS
project: research
template:
  name: train-${basename}
  command: [respawn-trainer, --data, "${input_path}"]
  inputs: [{ uri: "${uri}", path: "${input_path}" }]
"#;

pub(super) fn blob(key: &str, version: &str) -> BlobCreated {
    BlobCreated {
        key: key.into(),
        version: version.into(),
        size: 10,
    }
}

/// A rule whose template is `template` (YAML flow map), taking every key.
pub(super) fn rule_with(template: &str) -> Result<TriggerRule, SpecError> {
    parse_rule(
        &format!("name: r\nmatch: {{ glob: \"**\" }}\ntemplate: {template}\n"),
        Format::Yaml,
    )
}

pub(super) fn error_lines(e: &SpecError) -> Vec<String> {
    e.errors.iter().map(ToString::to_string).collect()
}

#[test]
fn a_matching_file_makes_a_spec() {
    let rule = parse_rule(CSV, Format::Yaml).unwrap();
    assert_eq!(rule.project, "default");
    let b = rule.matches(&blob("incoming/iris.csv", "etag-1")).unwrap();
    let spec = rule.render(&b).unwrap();
    assert_eq!(spec.name, "train-iris");
    assert_eq!(spec.command, ["respawn-trainer", "--data", "iris.csv"]);
    assert_eq!(spec.inputs[0].uri, "bucket://incoming/iris.csv");
    assert_eq!(spec.labels["respawn.trigger"], "train-on-csv");
    assert_eq!(spec.labels["team"], "vision", "template labels are kept");
    assert!(
        spec.idempotency_key
            .unwrap()
            .starts_with("trigger:train-on-csv:")
    );
}

#[test]
fn prefix_and_glob_decide_what_matches() {
    let rule = parse_rule(CSV, Format::Yaml).unwrap();
    for (key, yes) in [
        ("incoming/a.csv", true),
        ("incoming/.a.csv", true),
        ("incoming/day1/a.csv", false),
        ("incoming/a.json", false),
        ("other/a.csv", false),
        ("incoming-old/a.csv", false),
        ("a.csv", false),
        ("incoming/", false),
    ] {
        assert_eq!(rule.matches(&blob(key, "1")).is_some(), yes, "{key}");
    }
    let deep = rule_with("{ name: x, command: [x] }").unwrap();
    assert!(deep.matches(&blob("a/b/c/d.bin", "1")).is_some());
    assert!(
        deep.matches(&blob("a/b/", "1")).is_none(),
        "folder placeholders are not files"
    );
}

#[test]
fn every_variable_is_bound() {
    let b = Bindings::for_object("r", "incoming/day 1/data.tar.gz", "v7");
    let expect = [
        ("key", "incoming/day 1/data.tar.gz"),
        ("uri", "bucket://incoming/day 1/data.tar.gz"),
        ("prefix", "incoming/day 1/"),
        ("basename", "data.tar.gz"),
        ("stem", "data.tar"),
        ("ext", "gz"),
        ("rule", "r"),
        ("version", "v7"),
        ("input_path", "data.tar.gz"),
    ];
    assert_eq!(expect.len(), VARIABLES.len());
    for (var, value) in expect {
        assert_eq!(b.get(var), Some(value), "${{{var}}}");
    }
    assert_eq!(b.get("nope"), None);

    let all: Vec<String> = VARIABLES.iter().map(|v| format!("{v}=${{{v}}}")).collect();
    let rule = rule_with(&format!(
        "{{ name: x, command: [run], env: {{ ALL: {:?} }} }}",
        all.join(" ")
    ))
    .unwrap();
    let spec = rule.render(&b).unwrap();
    assert_eq!(
        spec.env["ALL"],
        "key=incoming/day 1/data.tar.gz uri=bucket://incoming/day 1/data.tar.gz \
         prefix=incoming/day 1/ basename=data.tar.gz stem=data.tar ext=gz rule=r \
         version=v7 input_path=data.tar.gz"
    );
}

#[test]
fn names_without_an_extension_or_at_the_root() {
    let b = Bindings::for_object("r", "README", "1");
    assert_eq!(
        (b.prefix.as_str(), b.stem.as_str(), b.ext.as_str()),
        ("", "README", "")
    );
    let b = Bindings::for_object("r", "x/.env", "1");
    assert_eq!((b.stem.as_str(), b.ext.as_str()), (".env", ""));
}

#[test]
fn marker_rules_make_one_job_per_folder() {
    let rule = parse_rule(MARKER, Format::Yaml).unwrap();
    assert_eq!(rule.project, "research");
    for key in [
        "uploads/run-1/part-0.csv",
        "uploads/run-1/part-1.csv",
        "uploads/run-1/x_SUCCESS",
    ] {
        assert!(
            rule.matches(&blob(key, "1")).is_none(),
            "{key} is not the marker"
        );
    }
    let b = rule.matches(&blob("uploads/run-1/_SUCCESS", "m1")).unwrap();
    assert_eq!(b.key, "uploads/run-1/_SUCCESS");
    assert_eq!(b.uri, "bucket://uploads/run-1/");
    assert_eq!(b.prefix, "uploads/run-1/");
    assert_eq!(b.input_path, "run-1");
    assert_eq!(
        (b.basename.as_str(), b.stem.as_str(), b.ext.as_str()),
        ("run-1", "run-1", "")
    );
    let spec = rule.render(&b).unwrap();
    assert_eq!(spec.name, "train-run-1");
    assert_eq!(spec.inputs[0].path.as_deref(), Some("run-1"));

    // Deeper folders and the prefix itself count (the default glob is `**`).
    assert!(rule.matches(&blob("uploads/a/b/_SUCCESS", "1")).is_some());
    let b = rule.matches(&blob("uploads/_SUCCESS", "1")).unwrap();
    assert_eq!(b.uri, "bucket://uploads/");
    assert!(rule.matches(&blob("elsewhere/run/_SUCCESS", "1")).is_none());
}

#[test]
fn a_marker_rules_glob_selects_folders() {
    let text = MARKER.replace("marker: _SUCCESS", "marker: _SUCCESS\n  glob: \"run-*\"");
    let rule = parse_rule(&text, Format::Yaml).unwrap();
    assert!(rule.matches(&blob("uploads/run-1/_SUCCESS", "1")).is_some());
    assert!(
        rule.matches(&blob("uploads/test-1/_SUCCESS", "1"))
            .is_none()
    );
    assert!(
        rule.matches(&blob("uploads/run-1/sub/_SUCCESS", "1"))
            .is_none()
    );
}

#[test]
fn a_marker_at_the_bucket_root_takes_nothing() {
    let rule = parse_rule(
        &MARKER.replace("prefix: uploads/", "prefix: \"\""),
        Format::Yaml,
    )
    .unwrap();
    assert!(rule.matches(&blob("_SUCCESS", "1")).is_none());
    assert!(rule.matches(&blob("x/_SUCCESS", "1")).is_some());
}

#[test]
fn dollar_dollar_brace_is_a_literal() {
    let rule =
        rule_with(r#"{ name: x, command: [sh, -c, "echo $${HOME} ${stem} $5 $$x $"] }"#).unwrap();
    let spec = rule
        .render(&Bindings::for_object("r", "a.csv", "1"))
        .unwrap();
    assert_eq!(spec.command[2], "echo ${HOME} a $5 $$x $");
}

#[test]
fn keys_and_nested_values_are_substituted() {
    let rule = rule_with(
        r#"{ name: x, command: [x], env: { "${ext}_FILE": "${key}" }, labels: { "src-${ext}": "${stem}" } }"#,
    )
    .unwrap();
    let spec = rule
        .render(&Bindings::for_object("r", "d/t.csv", "1"))
        .unwrap();
    assert_eq!(spec.env["csv_FILE"], "d/t.csv");
    assert_eq!(spec.labels["src-csv"], "t");
}

#[test]
fn substituted_names_are_sanitized_and_cut() {
    let rule = rule_with("{ name: \"job_${stem}.v1\", command: [x] }").unwrap();
    let spec = rule
        .render(&Bindings::for_object("r", "in/my data (2)+ü.csv", "1"))
        .unwrap();
    assert_eq!(spec.name, "job_my-data--2---.v1");
    let long = format!("in/{}.csv", "a".repeat(600));
    let spec = rule.render(&Bindings::for_object("r", &long, "1")).unwrap();
    assert_eq!(spec.name.len(), 128);
    // Only `name` is sanitized: elsewhere the value is passed through.
    let rule = rule_with("{ name: x, command: [x, \"${stem}\"] }").unwrap();
    let spec = rule
        .render(&Bindings::for_object("r", "in/my data.csv", "1"))
        .unwrap();
    assert_eq!(spec.command[1], "my data");
}

#[test]
fn idempotency_keys_are_stable_per_version() {
    let rule = parse_rule(CSV, Format::Yaml).unwrap();
    let spec = |key: &str, version: &str| {
        let b = rule.matches(&blob(key, version)).unwrap();
        rule.render(&b).unwrap().idempotency_key.unwrap()
    };
    let k = spec("incoming/a.csv", "v1");
    assert_eq!(k, spec("incoming/a.csv", "v1"));
    // A rule loaded again (another process, another day) derives the same key.
    let again = parse_rule(CSV, Format::Yaml).unwrap();
    let b = again.matches(&blob("incoming/a.csv", "v1")).unwrap();
    assert_eq!(k, again.render(&b).unwrap().idempotency_key.unwrap());
    assert_ne!(k, spec("incoming/a.csv", "v2"));
    assert_ne!(k, spec("incoming/b.csv", "v1"));
    assert!(k.len() <= 255);
    let long = format!("incoming/{}.csv", "x".repeat(1000));
    assert_eq!(spec(&long, "v1").len(), k.len(), "long keys are hashed");
    // Another rule taking the same object makes its own job.
    let other = parse_rule(
        &CSV.replace("name: train-on-csv", "name: other"),
        Format::Yaml,
    )
    .unwrap();
    let b = other.matches(&blob("incoming/a.csv", "v1")).unwrap();
    assert_ne!(k, other.render(&b).unwrap().idempotency_key.unwrap());
    // The split between key and version cannot be moved.
    let a = Bindings::for_object("r", "ab", "c");
    let b = Bindings::for_object("r", "a", "bc");
    assert_ne!(idempotency_key("r", &a), idempotency_key("r", &b));
}

#[test]
fn marker_idempotency_is_per_folder_and_version() {
    let rule = parse_rule(MARKER, Format::Yaml).unwrap();
    let key = |k: &str, v: &str| {
        let b = rule.matches(&blob(k, v)).unwrap();
        rule.render(&b).unwrap().idempotency_key.unwrap()
    };
    assert_eq!(
        key("uploads/r/_SUCCESS", "1"),
        key("uploads/r/_SUCCESS", "1")
    );
    assert_ne!(
        key("uploads/r/_SUCCESS", "1"),
        key("uploads/r/_SUCCESS", "2")
    );
    assert_ne!(
        key("uploads/r/_SUCCESS", "1"),
        key("uploads/s/_SUCCESS", "1")
    );
}

#[test]
fn unsafe_keys_are_refused() {
    let rule = rule_with("{ name: x, command: [x] }").unwrap();
    for key in [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./x",
        "a\\..\\x",
        "a//b",
        "a\nb",
        "a\u{0}b",
        &"k".repeat(1025),
    ] {
        assert!(check_key(key).is_err(), "{key:?}");
        assert!(rule.matches(&blob(key, "1")).is_none(), "{key:?}");
    }
    for key in ["a", "a/b.csv", "a..b/c", "x/..y", "sp ace/ü.csv", "dir/"] {
        assert!(check_key(key).is_ok(), "{key:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Any key and version: a match or not, a spec or an error, never a panic; a
    /// spec always carries a valid name, the trigger label and the idempotency key.
    #[test]
    fn render_never_panics(
        key in "[a-z./_\\\\ ü$%{}*?-]{0,40}|\\PC{0,80}",
        version in any::<String>(),
        marker in any::<bool>(),
    ) {
        let rule = parse_rule(if marker { MARKER } else { CSV }, Format::Yaml).unwrap();
        let every_key = CSV
            .replace("glob: \"*.csv\"", "glob: \"**\"")
            .replace("incoming/", "\"\"");
        let any = parse_rule(&every_key, Format::Yaml).unwrap();
        let event = blob(&key, &version);
        for rule in [&rule, &any] {
            if let Some(b) = rule.matches(&event) {
                prop_assert!(check_key(&key).is_ok());
                if let Ok(spec) = rule.render(&b) {
                    prop_assert!(!spec.name.is_empty() && spec.name.len() <= 128);
                    prop_assert_eq!(spec.labels.get(LABEL), Some(&rule.name));
                    prop_assert!(spec.idempotency_key.is_some());
                }
            }
        }
        // Bindings straight from arbitrary strings, unchecked, must not panic either.
        let b = Bindings::for_object("r", &key, &version);
        let _ = any.render(&b);
        let b = Bindings::for_folder("r", &key, &key, &version);
        let _ = rule.render(&b);
    }
}

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::handlers::BlobCreated;
use crate::spec::Format;

const CSV: &str = r#"
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

const MARKER: &str = r#"
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

fn blob(key: &str, version: &str) -> BlobCreated {
    BlobCreated {
        key: key.into(),
        version: version.into(),
        size: 10,
    }
}

/// A rule whose template is `template` (YAML flow map), taking every key.
fn rule_with(template: &str) -> Result<TriggerRule, SpecError> {
    parse_rule(
        &format!("name: r\nmatch: {{ glob: \"**\" }}\ntemplate: {template}\n"),
        Format::Yaml,
    )
}

fn error_lines(e: &SpecError) -> Vec<String> {
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
fn unknown_variables_are_errors_with_paths() {
    let e = rule_with("{ name: x, command: [a, b, \"--x=${foo}\"] }").unwrap_err();
    assert_eq!(
        error_lines(&e),
        [
            "template.command[2]: unknown variable ${foo}; known: key, uri, prefix, basename, stem, ext, rule, version, input_path"
        ]
    );
    let e =
        rule_with("{ name: x, command: [x], env: { \"${bar}\": v, B: \"${oops\" } }").unwrap_err();
    let lines = error_lines(&e);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("template.env.${bar}: unknown variable ${bar}"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("template.env.B: unclosed `${`"),
        "{lines:?}"
    );
    let e = rule_with("{ name: \"${}\", command: [x] }").unwrap_err();
    assert!(error_lines(&e)[0].starts_with("template.name: unknown variable ${}"));
}

#[test]
fn malformed_rules_name_the_field() {
    let cases = [
        // Bad YAML: the message says where.
        ("name: x\nmatch: {\n", ""),
        (
            "name: x\nmatch: { prefix: a/, globb: \"*\" }\ntemplate: { name: x, command: [x] }\n",
            "match.globb",
        ),
        (
            "name: x\nmatch: { glob: \"a**\" }\ntemplate: { name: x, command: [x] }\n",
            "match.glob",
        ),
        (
            "name: x\nmatch: {}\ntemplate: { name: x, command: [x], resources: { gpus: two } }\n",
            "template.resources.gpus",
        ),
        ("name: x\nmatch: {}\n", "template"),
        ("name: x\nmatch: {}\ntemplate: [name, x]\n", "template"),
        (
            "name: x\nmatch: {}\ntemplate: { name: x, command: [x] }\nextra: 1\n",
            "extra",
        ),
    ];
    for (text, path) in cases {
        let e = parse_rule(text, Format::Yaml).unwrap_err();
        assert_eq!(e.errors.len(), 1, "{text}: {e}");
        let err = &e.errors[0];
        if path.is_empty() {
            assert!(
                err.message.contains("line"),
                "a syntax error says where: {e}"
            );
        } else {
            assert!(
                err.path == path || (path == "template" && err.message.contains("`template`")),
                "{text}: expected {path}, got {e}"
            );
        }
    }
    let e = parse_rule(
        "name: x\nmatch: {}\ntemplate: { name: x, command: [x], resources: { gpus: two } }\n",
        Format::Yaml,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "template.resources.gpus: expected a non-negative integer, got \"two\""
    );
}

#[test]
fn rule_fields_are_checked_together() {
    let text = "name: \"bad name\"\nproject: \"\"\nmatch: { prefix: incoming, marker: a/b }\n\
                template: { name: x, command: [x], resources: { nodes: 0 } }\n";
    let e = parse_rule(text, Format::Yaml).unwrap_err();
    let paths: Vec<_> = e.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "name",
            "project",
            "match.prefix",
            "match.marker",
            "template.resources.nodes"
        ]
    );
    for prefix in ["/abs/", "a/../b/", "./x/"] {
        let e = parse_rule(&CSV.replace("incoming/", prefix), Format::Yaml).unwrap_err();
        assert_eq!(e.errors[0].path, "match.prefix", "{prefix}");
    }
}

#[test]
fn templates_that_never_make_a_valid_job_fail_at_load() {
    // A URI built from a variable that is not a URI.
    let e = rule_with("{ name: x, command: [x], inputs: [\"${key}\"] }").unwrap_err();
    assert_eq!(e.errors[0].path, "template.inputs[0].uri");
    let e = rule_with("{ name: x, command: [x], idempotency_key: \"${key}\" }").unwrap_err();
    assert_eq!(e.errors[0].path, "template.idempotency_key");
    let e = rule_with(&format!("{{ name: {}, command: [x] }}", "n".repeat(129))).unwrap_err();
    assert_eq!(e.errors[0].path, "template.name");
    let e = rule_with("{ name: x, command: [x], env: { \"${ext}\": a, dat: b } }").unwrap_err();
    assert!(e.to_string().contains("also renders to \"dat\""), "{e}");
}

#[test]
fn json_rules_read_like_yaml_ones() {
    let v: serde_json::Value = serde_yaml_ng::from_str(CSV).unwrap();
    let from_json = parse_rule(&v.to_string(), Format::Json).unwrap();
    assert_eq!(from_json, parse_rule(CSV, Format::Yaml).unwrap());
    let e = parse_rule(r#"{"name": "x", "match": {"glob": 5}}"#, Format::Json).unwrap_err();
    assert_eq!(e.errors[0].path, "match.glob");
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

#[test]
fn a_folder_of_rules_loads_what_it_can() {
    let dir = std::env::temp_dir().join(format!("respawn-trigger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), CSV).unwrap();
    std::fs::write(dir.join("b.yml"), MARKER).unwrap();
    std::fs::write(dir.join("c.json"), "{\"name\": \"bad\"}").unwrap();
    std::fs::write(dir.join("d.yaml"), CSV).unwrap(); // the same name again
    std::fs::write(dir.join("notes.txt"), "not a rule").unwrap();
    let (rules, errors) = load_rules_dir(&dir);
    let names: Vec<_> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["train-on-csv", "on-upload"]);
    let failed: Vec<_> = errors
        .iter()
        .map(|(p, e)| {
            (
                p.file_name().unwrap().to_str().unwrap(),
                e.errors[0].path.as_str(),
            )
        })
        .collect();
    assert_eq!(failed, [("c.json", ""), ("d.yaml", "name")]);
    assert!(errors[1].1.to_string().contains("already defined in"));
    std::fs::remove_dir_all(&dir).unwrap();

    let (rules, errors) = load_rules_dir(&dir);
    assert!(rules.is_empty());
    assert_eq!(errors.len(), 1, "a missing folder is one error");
}

#[test]
fn the_example_rules_load_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/triggers");
    let (rules, errors) = load_rules_dir(&dir);
    assert!(errors.is_empty(), "{errors:?}");
    let names: Vec<_> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["train-on-csv", "train-on-upload-marker"]);
    let spec = rules[0]
        .render(&rules[0].matches(&blob("incoming/iris.csv", "e1")).unwrap())
        .unwrap();
    assert_eq!(spec.name, "train-iris");
    let b = rules[1]
        .matches(&blob("uploads/run-7/_SUCCESS", "e1"))
        .unwrap();
    assert_eq!(
        rules[1].render(&b).unwrap().inputs[0].uri,
        "bucket://uploads/run-7/"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Any key and version: a match or not, a spec or an error, never a panic; a
    /// spec always carries a valid name, the trigger label and the idempotency key.
    #[test]
    fn render_never_panics(key in "[a-z./_\\\\ ü$%{}*?-]{0,40}|\\PC{0,80}", version in "\\PC{0,20}", marker in any::<bool>()) {
        let rule = parse_rule(if marker { MARKER } else { CSV }, Format::Yaml).unwrap();
        let any = parse_rule(&CSV.replace("glob: \"*.csv\"", "glob: \"**\"").replace("incoming/", "\"\""), Format::Yaml).unwrap();
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

//! Loading rules: every problem reported with its field path, at load time.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use super::tests::{CSV, MARKER, blob, error_lines, rule_with};
use super::*;
use crate::spec::Format;

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

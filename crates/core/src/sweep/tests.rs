#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use proptest::prelude::*;

use super::*;

const GRID: &str = r#"
name: lr-sweep
template:
  name: mlp-lr-${param.lr}-bs-${param.batch}
  command: [respawn-trainer, --lr, "${param.lr}", --batch-size, "${param.batch}"]
  args: ["--seed=${index}"]
  labels: { team: vision }
grid:
  lr: [0.1, 0.03, 0.01]
  batch: [32, 64]
idempotency_key: sweep-2026-11-26
"#;

const LIST: &str = r#"
name: pairs
template:
  name: run-${index}
  command: [train, "${param.lr}", "${param.batch}"]
list:
  - { lr: 0.1, batch: 32 }
  - { lr: 0.01, batch: 128 }
  - { lr: "1e-3", batch: 256 }
"#;

fn error_lines(e: &SpecError) -> Vec<String> {
    e.errors.iter().map(ToString::to_string).collect()
}

/// The single error of parsing `text`, as `path: message`.
fn one_error(text: &str) -> FieldError {
    let e = parse_sweep(text, Format::Yaml).unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    e.errors[0].clone()
}

/// A sweep with `body` (the grid or list part) and a minimal template.
fn with(body: &str) -> String {
    format!("name: s\ntemplate: {{ name: j, command: [x] }}\n{body}\n")
}

#[test]
fn a_grid_is_the_product_in_name_order_then_value_order() {
    let sweep = parse_sweep(GRID, Format::Yaml).unwrap();
    assert_eq!(sweep.job_count(), 6);
    let jobs = sweep.expand().unwrap();
    let pairs: Vec<(&str, &str)> = jobs
        .iter()
        .map(|j| (j.env["PARAM_BATCH"].as_str(), j.env["PARAM_LR"].as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("32", "0.1"),
            ("32", "0.03"),
            ("32", "0.01"),
            ("64", "0.1"),
            ("64", "0.03"),
            ("64", "0.01"),
        ],
        "batch (first by name) varies slowest, each list in the order written"
    );
}

#[test]
fn params_and_index_are_substituted() {
    let jobs = parse_sweep(GRID, Format::Yaml).unwrap().expand().unwrap();
    let j = &jobs[4];
    assert_eq!(j.name, "mlp-lr-0.03-bs-64");
    assert_eq!(
        j.argv(),
        [
            "respawn-trainer",
            "--lr",
            "0.03",
            "--batch-size",
            "64",
            "--seed=4"
        ]
    );
}

#[test]
fn every_job_gets_param_env_labels_and_a_key() {
    let sweep = parse_sweep(GRID, Format::Yaml).unwrap();
    let jobs = sweep.expand().unwrap();
    let mut keys = BTreeSet::new();
    for (i, j) in jobs.iter().enumerate() {
        assert_eq!(j.env.len(), 2, "{:?}", j.env);
        assert!(j.env.contains_key("PARAM_LR") && j.env.contains_key("PARAM_BATCH"));
        assert_eq!(j.labels[ARRAY_LABEL], "lr-sweep");
        assert_eq!(j.labels[INDEX_LABEL], i.to_string());
        assert_eq!(j.labels["team"], "vision", "the template's labels stay");
        let key = j.idempotency_key.clone().unwrap();
        assert!(key.starts_with("sweep:lr-sweep:") && key.ends_with(&format!(":{i}")));
        assert!(key.len() <= 255);
        keys.insert(key);
    }
    assert_eq!(keys.len(), 6, "one key per job");
    // The same sweep gives the same keys (which is what makes resubmission find them)…
    assert_eq!(sweep.expand().unwrap(), jobs);
    // … and a labelled array id changes the label only.
    let as_array = sweep.expand_as("lr-sweep-0123456789abcdef").unwrap();
    assert_eq!(as_array[0].labels[ARRAY_LABEL], "lr-sweep-0123456789abcdef");
    assert_eq!(as_array[0].idempotency_key, jobs[0].idempotency_key);
    // Another key, other job keys; no key, no job keys.
    let other = parse_sweep(&GRID.replace("sweep-2026-11-26", "other"), Format::Yaml).unwrap();
    assert_ne!(
        other.expand().unwrap()[0].idempotency_key,
        jobs[0].idempotency_key
    );
    let keyless = parse_sweep(LIST, Format::Yaml).unwrap().expand().unwrap();
    assert!(keyless.iter().all(|j| j.idempotency_key.is_none()));
}

#[test]
fn a_list_makes_its_entries_in_order() {
    let jobs = parse_sweep(LIST, Format::Yaml).unwrap().expand().unwrap();
    let argv: Vec<Vec<String>> = jobs.iter().map(JobSpec::argv).collect();
    assert_eq!(
        argv,
        [
            ["train", "0.1", "32"],
            ["train", "0.01", "128"],
            ["train", "1e-3", "256"],
        ]
    );
    let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["run-0", "run-1", "run-2"]);
}

#[test]
fn values_go_in_as_text() {
    let text = with("grid: { a: [\"x y/z\", 0.5, -3, true, 1e-3] }").replace(
        "name: j,",
        "name: \"j-${param.a}\", env: { RAW: \"${param.a}\" },",
    );
    let jobs = parse_sweep(&text, Format::Yaml).unwrap().expand().unwrap();
    let raw: Vec<&str> = jobs.iter().map(|j| j.env["RAW"].as_str()).collect();
    assert_eq!(raw, ["x y/z", "0.5", "-3", "true", "0.001"]);
    assert_eq!(jobs[0].env["PARAM_A"], "x y/z");
    assert_eq!(jobs[0].name, "j-x-y-z", "values in the name are sanitized");
    // `$${` stays a literal `${`, as in trigger rules.
    let text = with("grid: { a: [1] }").replace("command: [x]", "command: [x, \"$${param.a}\"]");
    let jobs = parse_sweep(&text, Format::Yaml).unwrap().expand().unwrap();
    assert_eq!(jobs[0].argv(), ["x", "${param.a}"]);
}

#[test]
fn long_names_are_cut_to_a_job_names_limit() {
    let long = "v".repeat(200);
    let text =
        with(&format!("grid: {{ a: [{long}] }}")).replace("name: j,", "name: \"j-${param.a}\",");
    let jobs = parse_sweep(&text, Format::Yaml).unwrap().expand().unwrap();
    assert_eq!(jobs[0].name.len(), 128);
}

#[test]
fn json_and_yaml_agree() {
    let y = parse_sweep(GRID, Format::Yaml).unwrap();
    let v: serde_json::Value = serde_yaml_ng::from_str(GRID).unwrap();
    let j = parse_sweep(&v.to_string(), Format::Json).unwrap();
    assert_eq!(y, j);
    // And a sweep round-trips through its serialized form.
    let back = parse_sweep(&serde_json::to_string(&y).unwrap(), Format::Json).unwrap();
    assert_eq!(back, y);
}

#[test]
fn the_size_cap_says_how_many_the_grid_makes() {
    let a: Vec<String> = (0..101).map(|i| i.to_string()).collect();
    let b: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let text = with(&format!(
        "grid: {{ a: [{}], b: [{}] }}",
        a.join(","),
        b.join(",")
    ));
    let e = one_error(&text);
    assert_eq!(e.path, "grid");
    assert_eq!(
        e.message,
        "the grid makes 10100 jobs (101 a × 100 b); a sweep makes at most 10000"
    );
    // Exactly at the cap is fine.
    let text = with(&format!(
        "grid: {{ a: [{}], b: [{}] }}",
        a[..100].join(","),
        b.join(",")
    ));
    assert_eq!(
        parse_sweep(&text, Format::Yaml)
            .unwrap()
            .expand()
            .unwrap()
            .len(),
        10_000
    );
    let entries = vec!["{ a: 1 }"; 10_001].join(", ");
    let e = one_error(&with(&format!("list: [{entries}]")));
    assert_eq!(e.path, "list");
    assert!(e.message.contains("10001 jobs"), "{e}");
}

#[test]
fn a_grid_too_big_for_memory_is_refused_without_overflow() {
    // 40 parameters of 4 values: 4^40 overflows 64 bits.
    let params: Vec<String> = (0..40).map(|i| format!("p{i}: [1, 2, 3, 4]")).collect();
    let e = one_error(&with(&format!("grid: {{ {} }}", params.join(", "))));
    assert_eq!(e.path, "grid");
    assert!(e.message.starts_with("the grid makes more than"), "{e}");
}

#[test]
fn grid_or_list_is_required_and_not_both() {
    let e = one_error(&with(""));
    assert_eq!(e.path, "");
    assert!(
        e.message.contains("`grid`") && e.message.contains("`list`"),
        "{e}"
    );
    let e = one_error(&with("grid: { a: [1] }\nlist: [{ a: 1 }]"));
    assert_eq!(e.path, "");
    assert!(e.message.contains("not both"), "{e}");
}

#[test]
fn every_problem_names_its_field() {
    let cases: &[(&str, &str)] = &[
        // Values: strings, numbers or booleans only.
        ("grid: { lr: [0.1, 0.2, null] }", "grid.lr[2]"),
        ("grid: { lr: [0.1, 0.2, [1]] }", "grid.lr[2]"),
        ("grid: { lr: [0.1, 0.2, { a: 1 }] }", "grid.lr[2]"),
        ("grid: { lr: [0.1, .inf] }", "grid.lr[1]"),
        ("list: [{ lr: 1 }, { lr: ~ }]", "list[1].lr"),
        ("grid: { lr: 0.1 }", "grid.lr"),
        // Parameter names.
        ("grid: { 1lr: [1] }", "grid.1lr"),
        ("grid: { l-r: [1] }", "grid.l-r"),
        (
            &format!("grid: {{ {}: [1] }}", "a".repeat(33)),
            &format!("grid.{}", "a".repeat(33)),
        ),
        ("list: [{ \"a b\": 1 }]", "list[0].a b"),
        ("grid: { LR: [1], lr: [2] }", "grid.lr"),
        // Shapes.
        ("grid: {}", "grid"),
        ("grid: { lr: [] }", "grid.lr"),
        ("grid: { lr: [0.1, 0.2, 0.1] }", "grid.lr[2]"),
        ("list: []", "list"),
        (
            "list: [{ a: 1, b: 2 }, { a: 1, b: 2 }, { a: 1, b: 2 }, { a: 1 }]",
            "list[3]",
        ),
        ("list: [{ a: 1 }, { a: 1, c: 2 }]", "list[1]"),
        // The sweep's own fields.
        ("grid: { a: [1] }\nidempotency_key: \"\"", "idempotency_key"),
        ("grid: { a: [1] }\nextra: 1", "extra"),
    ];
    for (body, path) in cases {
        let e = one_error(&with(body));
        assert_eq!(&e.path, path, "{body}: {e}");
        assert!(!e.message.is_empty());
    }
    let e = one_error("name: \"a b\"\ntemplate: { name: j, command: [x] }\ngrid: { a: [1] }\n");
    assert_eq!(e.path, "name");
    let e = one_error(&format!(
        "name: {}\ntemplate: {{ name: j, command: [x] }}\ngrid: {{ a: [1] }}\n",
        "n".repeat(65)
    ));
    assert_eq!(e.path, "name");
}

#[test]
fn messages_say_what_is_wrong() {
    let e = one_error(&with("grid: { lr: [0.1, 0.2, null] }"));
    // YAML adds where in the text the value is.
    assert!(
        e.message
            .starts_with("expected a string, number or boolean, got null"),
        "{e}"
    );
    let e = one_error(&with("list: [{ a: 1, b: 2 }, { a: 1, c: 3 }]"));
    assert_eq!(
        e.message,
        "expected the parameters of list[0]; missing b; not in list[0]: c"
    );
    let e = one_error(&with("grid: { LR: [1], lr: [2] }"));
    assert_eq!(e.message, "both this and parameter LR would set PARAM_LR");
    let e = one_error(&with("grid: { lr: [0.1, 0.2, 0.1] }"));
    assert_eq!(e.message, "repeats grid.lr[0] (\"0.1\")");
}

#[test]
fn the_template_is_checked_at_parse_time() {
    let sweep = |template: &str| {
        parse_sweep(
            &format!("name: s\ntemplate: {template}\ngrid: {{ lr: [0.1, 0.2] }}\n"),
            Format::Yaml,
        )
    };
    let e = sweep("{ name: j, command: [x, \"${param.rl}\"] }").unwrap_err();
    assert_eq!(
        error_lines(&e),
        ["template.command[1]: unknown variable ${param.rl}; known: index, param.lr"]
    );
    let e = sweep("{ name: j, command: [x], resources: { gpus: two } }").unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(e.errors[0].path, "template.resources.gpus");
    let e = sweep("{ name: j, command: [\"\"] }").unwrap_err();
    assert_eq!(e.errors[0].path, "template.command[0]");
    assert!(e.errors[0].message.ends_with("(job 0: lr=0.1)"), "{e}");
    let e = sweep("{ name: j, command: [x], idempotency_key: k }").unwrap_err();
    assert_eq!(e.errors[0].path, "template.idempotency_key");
    let e = sweep("{ name: j, command: [x], env: { PARAM_LR: \"1\" } }").unwrap_err();
    assert_eq!(
        error_lines(&e),
        ["template.env.PARAM_LR: set by the sweep (parameter lr), so the template cannot set it"]
    );
    let e = sweep("{ name: j, command: [x], labels: { respawn.array: a } }").unwrap_err();
    assert_eq!(e.errors[0].path, "template.labels.respawn.array");
    let e = sweep("[name, j]").unwrap_err();
    assert_eq!(e.errors[0].path, "template");
    // A template that is fine for some values only fails when expanded, naming the job.
    let text = "name: s\ntemplate: { name: j, command: [x], inputs: [\"${param.uri}\"] }\nlist: [{ uri: \"bucket://a\" }, { uri: nope }]\n";
    let sweep = parse_sweep(text, Format::Yaml).unwrap();
    let e = sweep.expand().unwrap_err();
    assert_eq!(e.errors[0].path, "template.inputs[0].uri");
    assert!(e.errors[0].message.ends_with("(job 1: uri=nope)"), "{e}");
}

#[test]
fn expand_checks_a_sweep_built_in_code() {
    let sweep = SweepSpec {
        name: "s".into(),
        template: serde_json::json!({"name": "j", "command": ["x"]}),
        grid: None,
        list: None,
        idempotency_key: None,
    };
    assert!(sweep.expand().is_err());
    let sweep = SweepSpec {
        list: Some(vec![BTreeMap::new(), BTreeMap::new()]),
        ..sweep
    };
    let jobs = sweep.expand().unwrap();
    assert_eq!(
        jobs.len(),
        2,
        "a list of empty sets runs the template n times"
    );
    assert_eq!(jobs[1].labels[INDEX_LABEL], "1");
}

#[test]
fn the_example_sweep_makes_nine_jobs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sweeps/lr-sweep.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let jobs = parse_sweep(&text, Format::Yaml).unwrap().expand().unwrap();
    assert_eq!(jobs.len(), 9);
    assert_eq!(jobs[1].name, "mlp-lr-0.03-h-8");
    assert_eq!(
        jobs[1].argv()[..5],
        ["respawn-trainer", "--lr", "0.03", "--hidden", "8"]
    );
    assert_eq!(jobs[1].inputs[0].uri, "bucket://incoming/blobs.csv");
}

fn param_value() -> impl Strategy<Value = ParamValue> {
    prop_oneof![
        "\\PC{0,12}".prop_map(ParamValue::String),
        "[a-z0-9.$/{} -]{0,6}".prop_map(ParamValue::String),
        any::<i64>().prop_map(|n| ParamValue::Number(n.into())),
        any::<f64>()
            .prop_filter_map("finite", serde_json::Number::from_f64)
            .prop_map(ParamValue::Number),
        any::<bool>().prop_map(ParamValue::Bool),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Any grid, valid or not, with a template using its names or not: jobs or an
    /// error, never a panic; jobs are always as many as the product and each carries
    /// its labels and parameter variables.
    #[test]
    fn expand_never_panics_on_arbitrary_grids(
        grid in prop::collection::btree_map(
            "[A-Za-z_][A-Za-z0-9_]{0,4}|\\PC{0,8}",
            prop::collection::vec(param_value(), 0..5),
            0..4,
        ),
        in_name in any::<bool>(),
        key in prop::option::of("\\PC{0,300}"),
    ) {
        let uses: Vec<String> = grid.keys().map(|k| format!("${{param.{k}}}")).collect();
        let name = if in_name { format!("j-{}", uses.join("-")) } else { "j".into() };
        let sweep = SweepSpec {
            name: "p".into(),
            template: serde_json::json!({
                "name": name,
                "command": ["x", uses.join(" "), "${index}"],
            }),
            grid: Some(grid.clone()),
            list: None,
            idempotency_key: key,
        };
        if let Ok(jobs) = sweep.expand() {
            let product: usize = grid.values().map(Vec::len).product();
            prop_assert_eq!(jobs.len(), product);
            for (i, j) in jobs.iter().enumerate() {
                prop_assert_eq!(&j.labels[INDEX_LABEL], &i.to_string());
                prop_assert_eq!(&j.command[2], &i.to_string());
                prop_assert_eq!(j.env.len(), grid.len());
                prop_assert!(!j.name.is_empty() && j.name.len() <= 128);
            }
        }
        // The same document through the text reader must not panic either.
        if let Ok(text) = serde_json::to_string(&sweep) {
            let _ = parse_sweep(&text, Format::Json);
        }
    }
}

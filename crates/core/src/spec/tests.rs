#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

const FULL: &str = r#"
name: mlp
image: pytorch/pytorch:2.4
command: [python, train.py]
args: [--lr, "0.1"]
working_dir: /work
env: { SEED: "7" }
secrets: { TOKEN: hunter2 }
resources: { gpus: 2, gpu_type: a100, cpus: 8.5, memory: 16GiB, nodes: 2 }
placement: { spot: true, on_demand_after: 30m, max_price: 1.25, region: us-east-1 }
priority: high
inputs: [s3://data/train.csv, { uri: "az://c/val.csv", path: val/val.csv }]
outputs: s3://models/mlp/
checkpoint: { uri: s3://ckpt/mlp/, keep_last: 2 }
retry: { max_failures: 1, infra_exit_codes: [137], max_preemptions: 10 }
limits: { max_runtime: 2h, max_wait: 1d }
labels: { team: vision }
idempotency_key: run-1
notify: [https://example.com/hook]
"#;

#[test]
fn a_full_spec_parses_with_units() {
    let s = parse(FULL, Format::Yaml).unwrap();
    assert_eq!(s.resources.memory, Some(ByteSize(16 << 30)));
    assert_eq!(s.limits.max_runtime, Some(HumanDuration::from_secs(7200)));
    assert_eq!(s.priority.level(), 8);
    assert_eq!(s.inputs[1].path.as_deref(), Some("val/val.csv"));
    assert_eq!(s.argv(), ["python", "train.py", "--lr", "0.1"]);
    assert_eq!(s.secrets["TOKEN"].expose(), Some("hunter2"));
}

#[test]
fn defaults_fill_a_minimal_spec() {
    let s = parse("name: x\ncommand: [run]\n", Format::Yaml).unwrap();
    assert_eq!(s.resources.nodes, 1);
    assert!(
        s.placement.spot,
        "spot is the default: it is what respawn is for"
    );
    assert_eq!(
        s.retry.max_preemptions, None,
        "unlimited preemptions by default"
    );
    assert_eq!(
        s.limits.max_wait.get(),
        std::time::Duration::from_secs(7 * 86400)
    );
}

#[test]
fn stored_form_round_trips_without_secrets() {
    let s = parse(FULL, Format::Yaml).unwrap();
    let json = serde_json::to_string(&s).unwrap();
    assert!(
        !json.contains("hunter2"),
        "serialized specs never hold secret values"
    );
    let back = parse(&json, Format::Json).unwrap();
    assert_eq!(
        back,
        s.redacted(),
        "what the ledger stores reads back as the redacted spec"
    );
    assert_eq!(format!("{:?}", s.secrets["TOKEN"]), "Secret(<redacted>)");
}

#[test]
fn json_and_yaml_agree() {
    let y = parse(FULL, Format::Yaml).unwrap();
    let v: serde_json::Value = serde_yaml_ng::from_str(FULL).unwrap();
    let j = parse(&v.to_string(), Format::Json).unwrap();
    assert_eq!(y, j);
    assert_eq!(parse_json_value(v).unwrap(), y);
}

#[test]
fn all_semantic_problems_are_reported_at_once() {
    let text =
        "name: \"a b\"\ncommand: [x]\nresources: { nodes: 0 }\ncheckpoint: { keep_last: 0 }\n";
    let e = parse(text, Format::Yaml).unwrap_err();
    let paths: Vec<_> = e.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["name", "resources.nodes", "checkpoint.keep_last"]);
}

#[test]
fn a_gang_timeout_parses_as_a_duration() {
    // Ignored on one node, as the schema lets it be.
    let one = "name: a\ncommand: [x]\nplacement: { gang_timeout: 5m }\n";
    assert!(parse(one, Format::Yaml).is_ok());
    let bad = "name: a\ncommand: [x]\nplacement: { gang_timeout: soon }\n";
    let e = parse(bad, Format::Yaml).unwrap_err();
    assert_eq!(e.errors[0].path, "placement.gang_timeout", "{e}");
    let many = "name: a\ncommand: [x]\nresources: { nodes: 4 }\nplacement: { gang_timeout: 5m }\n";
    let spec = parse(many, Format::Yaml).unwrap();
    assert_eq!(
        spec.placement.gang_timeout.map(|g| g.get()),
        Some(std::time::Duration::from_secs(300))
    );
}

#[test]
fn nested_errors_get_a_prefix() {
    let e = SpecError::one("resources.gpus", "bad").nested("template");
    assert_eq!(e.to_string(), "template.resources.gpus: bad");
}

/// Any JSON value at any field: a clear error or a spec, never a panic, and a type
/// error always names where it is.
fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "[a-z0-9 ./:-]{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::json!([1, "a"])),
        Just(serde_json::json!({"k": 1})),
    ]
}

const FIELDS: [&str; 17] = [
    "name",
    "command",
    "env",
    "resources.gpus",
    "resources.cpus",
    "resources.memory",
    "resources.nodes",
    "placement.spot",
    "placement.max_price",
    "priority",
    "inputs",
    "checkpoint.keep_last",
    "retry.max_failures",
    "retry.max_preemptions",
    "retry.max_lost",
    "limits.max_runtime",
    "limits.max_wait",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_value_anywhere_is_handled(field in 0..FIELDS.len(), value in json_leaf()) {
        let mut doc = serde_json::json!({"name": "p", "command": ["x"]});
        let path = FIELDS[field];
        let mut cursor = &mut doc;
        let parts: Vec<_> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            cursor = cursor.as_object_mut().unwrap().entry(*part).or_insert_with(|| serde_json::json!({}));
        }
        cursor.as_object_mut().unwrap().insert(parts[parts.len() - 1].to_owned(), value);
        let text = doc.to_string();
        if let Err(e) = parse(&text, Format::Json) {
            prop_assert!(!e.errors.is_empty());
            for err in &e.errors {
                prop_assert!(!err.message.is_empty());
                prop_assert!(err.path.starts_with(parts[0]) || err.path.is_empty(),
                    "error at {path} reported at {:?}: {}", err.path, err.message);
            }
        }
        // And YAML of the same document behaves the same way.
        let yaml = serde_yaml_ng::to_string(&doc).unwrap();
        let _ = parse(&yaml, Format::Yaml);
    }
}

/// The published schema and the validator give the same verdict: on the schema's
/// own examples, on the example specs, on the broken specs of `tests/fixtures`, and
/// on generated specs with any field changed to any value.
mod agreement {
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    fn schema() -> Value {
        serde_json::from_str(&crate::schema::job_spec()).unwrap()
    }

    fn validator() -> &'static jsonschema::Validator {
        static V: std::sync::LazyLock<jsonschema::Validator> =
            std::sync::LazyLock::new(|| jsonschema::validator_for(&schema()).unwrap());
        &V
    }

    fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
    }

    /// (schema says valid, validator says valid) for a spec file's text.
    fn verdicts(v: &jsonschema::Validator, path: &Path) -> (bool, bool) {
        let text = std::fs::read_to_string(path).unwrap();
        let format = Format::from_path(path);
        let ours = parse(&text, format).is_ok();
        let value: Option<Value> = match format {
            Format::Json => serde_json::from_str(&text).ok(),
            Format::Yaml => serde_yaml_ng::from_str(&text).ok(),
        };
        // Text that is not YAML or JSON at all has no document for the schema to admit.
        (value.is_some_and(|d| v.is_valid(&d)), ours)
    }

    #[test]
    fn the_schemas_examples_pass_both() {
        let v = validator();
        let examples = schema()["examples"].as_array().cloned().unwrap();
        assert!(examples.len() >= 2);
        for ex in examples {
            let errors: Vec<String> = v.iter_errors(&ex).map(|e| e.to_string()).collect();
            assert!(
                errors.is_empty(),
                "schema refuses its example {ex}: {errors:?}"
            );
            parse_json_value(ex.clone()).unwrap_or_else(|e| panic!("validator refuses {ex}: {e}"));
        }
    }

    #[test]
    fn the_example_specs_pass_both() {
        let v = validator();
        let mut seen = 0;
        for entry in std::fs::read_dir(repo("examples/specs")).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(verdicts(v, &path), (true, true), "{}", path.display());
            seen += 1;
        }
        assert!(seen > 0);
    }

    #[test]
    fn the_bad_specs_fail_both() {
        let v = validator();
        let mut seen = 0;
        for entry in std::fs::read_dir(repo("tests/fixtures/bad-specs")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "txt") {
                continue;
            }
            assert_eq!(verdicts(v, &path), (false, false), "{}", path.display());
            seen += 1;
        }
        assert!(seen >= 15);
    }

    const PATHS: [&str; 35] = [
        "name",
        "image",
        "command",
        "command.0",
        "args",
        "working_dir",
        "env",
        "env.SEED",
        "secrets",
        "secrets.TOKEN",
        "resources.gpus",
        "resources.gpu_type",
        "resources.cpus",
        "resources.memory",
        "resources.nodes",
        "placement.spot",
        "placement.on_demand_after",
        "placement.max_price",
        "placement.region",
        "priority",
        "inputs",
        "inputs.0",
        "outputs",
        "checkpoint.uri",
        "checkpoint.keep_last",
        "retry.max_failures",
        "retry.infra_exit_codes",
        "retry.max_preemptions",
        "retry.max_lost",
        "limits.max_runtime",
        "limits.max_wait",
        "labels",
        "idempotency_key",
        "notify",
        "notify.0",
    ];

    const STRINGS: [&str; 49] = [
        "",
        " ",
        "x",
        "a b",
        "mlp-1.0_x",
        "python",
        " python",
        "\tpython",
        "pytorch/pytorch:2.4",
        "-img",
        "RESPAWN_X",
        "SEED",
        "9LIVES",
        "s3://b/k",
        "s3://",
        "s3://b/../k",
        "s3://b/..",
        "s3://b/x\ny",
        "bucket://projects/a/x",
        "https://acct.blob.core.windows.net/jobs/k",
        "https://acct.blob.core.windows.net/",
        "https://acct.blob.core.windows.net//k",
        "abfss://jobs@acct.dfs.core.windows.net/k",
        "abfss://@acct.dfs.core.windows.net/k",
        "abfs://jobs@acct.blob.core.windows.net/k",
        "abfss://jobs@a@b.dfs.core.windows.net/k",
        "https://acct.blob.core.windows.net/jobs/k?sig=x",
        "abfss://jobs@acct.dfs.core.windows.net/k#f",
        "file:///etc/passwd",
        "ftp://x/y",
        "data.csv",
        "../up",
        "/abs",
        "https://ci.example.com/h?x=1",
        "http://[::1]:8080/",
        "https://a",
        "http://a b",
        "https://h:99999/x",
        "16GiB",
        "0.5 kb",
        "0B",
        "30m",
        "1h 30m",
        "0s",
        "1.5h",
        "low",
        "urgent",
        "team",
        "${x}",
    ];

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            prop::sample::select(vec![
                0i64,
                1,
                2,
                9,
                10,
                63,
                64,
                65,
                137,
                1024,
                1025,
                -1,
                4_294_967_295,
                4_294_967_296,
                -2_147_483_649,
                1 << 60,
                (1 << 60) + 1,
            ])
            .prop_map(Value::from),
            prop::sample::select(vec![
                0.0f64, -0.0, 0.0005, 0.001, 0.5, 1.0, 2.0, 8.5, -3.0, 1e17, 1e18
            ])
            .prop_map(Value::from),
            prop::sample::select(STRINGS.to_vec()).prop_map(Value::from),
            "[ -~]{0,6}".prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map(
                    prop::sample::select(STRINGS.to_vec()).prop_map(str::to_owned),
                    inner,
                    0..3
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn base() -> Value {
        json!({
            "name": "p",
            "command": ["x"],
            "env": {"SEED": "7"},
            "secrets": {"TOKEN": "t"},
            "inputs": ["s3://b/in"],
            "notify": ["https://example.com/h"],
        })
    }

    /// Sets `path` (dots; numbers index arrays) in `doc` to `value`; a path through
    /// something that is not a map or a long enough list is left alone.
    fn set(doc: &mut Value, path: &str, value: Value) {
        let mut cursor = doc;
        let parts: Vec<&str> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            let next = match (part.parse::<usize>(), cursor) {
                (Ok(i), Value::Array(a)) => a.get_mut(i),
                (Err(_), Value::Object(m)) => Some(m.entry(*part).or_insert_with(|| json!({}))),
                _ => None,
            };
            let Some(next) = next else { return };
            cursor = next;
        }
        let last = parts[parts.len() - 1];
        match (last.parse::<usize>(), cursor) {
            (Ok(i), Value::Array(a)) if i < a.len() => a[i] = value,
            (Err(_), Value::Object(m)) => {
                m.insert(last.to_owned(), value);
            }
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        #[test]
        fn any_change_gets_the_same_verdict(
            changes in prop::collection::vec((prop::sample::select(PATHS.to_vec()), value()), 1..3)
        ) {
            let v = validator();
            let mut doc = base();
            for (path, value) in changes {
                set(&mut doc, path, value);
            }
            let schema_ok = v.is_valid(&doc);
            let ours = parse_json_value(doc.clone());
            prop_assert_eq!(
                schema_ok,
                ours.is_ok(),
                "{} — schema: {:?}; validator: {:?}",
                doc,
                v.iter_errors(&doc).map(|e| e.to_string()).collect::<Vec<_>>(),
                ours.err().map(|e| e.to_string())
            );
        }
    }
}

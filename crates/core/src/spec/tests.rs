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

const FIELDS: [&str; 16] = [
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

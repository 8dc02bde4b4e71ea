//! The specs `schemas/job-spec.schema.json` shows as its `examples`; tests feed them
//! through both the schema and the validator, which must accept them.

use serde_json::{Value, json};

/// The least a job needs: a name and something to run.
pub fn minimal() -> Value {
    json!({ "name": "mlp", "command": ["respawn-trainer", "--steps", "2000"] })
}

/// Every field, as the README's spec shows it.
pub fn full() -> Value {
    json!({
        "name": "mlp-iris",
        "image": "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
        "command": ["python", "train.py"],
        "args": ["--lr", "0.01"],
        "working_dir": "/work",
        "env": { "SEED": "7" },
        "secrets": { "WANDB_API_KEY": "secret-value" },
        "resources": { "gpus": 1, "gpu_type": "a100", "cpus": 8, "memory": "16GiB", "nodes": 1 },
        "placement": { "spot": true, "on_demand_after": "30m", "max_price": 1.25 },
        "priority": "high",
        "inputs": ["s3://datasets/iris.csv", { "uri": "s3://datasets/val.csv", "path": "val/val.csv" }],
        "outputs": "s3://models/mlp/",
        "checkpoint": { "keep_last": 3 },
        "retry": { "max_failures": 2, "infra_exit_codes": [137], "max_preemptions": 20 },
        "limits": { "max_runtime": "2h", "max_wait": "1d" },
        "labels": { "team": "vision" },
        "idempotency_key": "nightly-2026-11-26",
        "notify": ["https://ci.example.com/hooks/respawn"]
    })
}

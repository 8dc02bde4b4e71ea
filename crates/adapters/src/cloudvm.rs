//! What the cloud VM providers share: how the agent on a new VM is started, and
//! which instance type (VM size) a job's GPUs need.

use std::collections::BTreeMap;

use respawn_core::attempt_auth::AttemptKey;
use respawn_core::ports::compute::Error;
use respawn_core::spec::Resources;

/// How the agent on a new instance is started.
#[derive(Debug, Clone)]
pub struct AgentBoot {
    /// The broker's API, where agents report (`/v1/agent/events`).
    pub api: String,
    /// The bucket, as the agent addresses it (`s3://name`).
    pub bucket: String,
    pub attempt_key: AttemptKey,
    pub heartbeat_secs: u64,
    /// SIGTERM → SIGKILL for the workload; under EC2's two-minute notice.
    pub grace_secs: u64,
}

/// GPU instance types by GPU model and count per instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTypes {
    /// `(model, gpus) → type`.
    pub gpu: BTreeMap<(String, u32), String>,
    /// The model of jobs that name none.
    pub default_gpu: String,
}

impl Default for InstanceTypes {
    fn default() -> Self {
        let table = [
            ("t4", 1, "g4dn.xlarge"),
            ("t4", 4, "g4dn.12xlarge"),
            ("t4", 8, "g4dn.metal"),
            ("a10g", 1, "g5.xlarge"),
            ("a10g", 4, "g5.12xlarge"),
            ("a10g", 8, "g5.48xlarge"),
            ("l4", 1, "g6.xlarge"),
            ("l4", 4, "g6.12xlarge"),
            ("l4", 8, "g6.48xlarge"),
            ("v100", 1, "p3.2xlarge"),
            ("v100", 4, "p3.8xlarge"),
            ("v100", 8, "p3.16xlarge"),
            ("a100", 8, "p4d.24xlarge"),
            ("h100", 8, "p5.48xlarge"),
        ];
        InstanceTypes {
            gpu: table
                .into_iter()
                .map(|(m, n, t)| ((m.to_owned(), n), t.to_owned()))
                .collect(),
            default_gpu: "a10g".into(),
        }
    }
}

impl InstanceTypes {
    /// Parses `model:gpus=type,…` (e.g. `t4:1=g4dn.xlarge,a100:8=p4d.24xlarge`),
    /// replacing the built-in table.
    pub fn parse(s: &str, default_gpu: &str) -> Result<InstanceTypes, String> {
        let mut gpu = BTreeMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (left, ty) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?}: expected model:gpus=type"))?;
            let (model, n) = left
                .split_once(':')
                .ok_or_else(|| format!("{entry:?}: expected model:gpus=type"))?;
            let n: u32 = n
                .parse()
                .map_err(|_| format!("{entry:?}: {n:?} is not a GPU count"))?;
            gpu.insert((model.to_ascii_lowercase(), n), ty.to_owned());
        }
        Ok(InstanceTypes {
            gpu,
            default_gpu: default_gpu.to_ascii_lowercase(),
        })
    }

    /// The smallest instance with enough GPUs of the model asked for.
    pub(crate) fn choose(&self, r: &Resources, cpu_type: &str) -> Result<String, Error> {
        if r.gpus == 0 {
            return Ok(cpu_type.to_owned());
        }
        let model = r
            .gpu_type
            .as_deref()
            .unwrap_or(&self.default_gpu)
            .to_ascii_lowercase();
        self.gpu
            .iter()
            .filter(|((m, n), _)| *m == model && *n >= r.gpus)
            .min_by_key(|((_, n), _)| *n)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no instance type with {} {model} GPU(s) is configured",
                    r.gpus
                ))
            })
    }
}

/// `s` as one word for `sh`, whatever it holds.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

//! Warm pools: named sets of VMs of one shape that run job after job.
//!
//! A pool VM's agent is long-lived: the provider assigns it one attempt at a time
//! ([`Assignment`]) and the agent answers [`Finished`] once that attempt's work folder
//! is gone, when the VM can take the next. Pools grow with the queue up to `max`,
//! keep `min` VMs warm, and retire VMs idle for longer than `idle`. A single-use pool
//! (`single-use`) gives each attempt a fresh VM, thrown away after it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::JobId;
use crate::ports::compute::{AllocateRequest, Error as ComputeError};

/// One pool's shape and size, e.g. `cpu:max=8,min=1,idle=60s` or
/// `a100:gpus=1,max=4,on-demand`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    /// GPUs per VM; 0 is a CPU VM.
    pub gpus: u32,
    /// The GPU model of its VMs (`gpu=a10g`); a job naming another model does not
    /// fit. Cloud providers choose the instance type by it.
    pub gpu_type: Option<String>,
    /// Spot (low-priority) VMs, or on-demand ones.
    pub spot: bool,
    pub min: usize,
    pub max: usize,
    /// An idle VM above `min` is retired after this long.
    pub idle: Duration,
    /// VMs take attempt after attempt; `false`: a fresh VM for each (single-use).
    pub reuse: bool,
}

impl PoolSpec {
    /// A pool of `max` reusable VMs of `gpus` GPUs, none kept warm.
    pub fn new(name: &str, gpus: u32, max: usize) -> PoolSpec {
        PoolSpec {
            name: name.to_owned(),
            gpus,
            gpu_type: None,
            spot: true,
            min: 0,
            max,
            idle: Duration::from_secs(60),
            reuse: true,
        }
    }

    /// Whether a job asking for `gpus` GPUs (of `model`, if it names one) on `spot`
    /// capacity fits this pool's VMs.
    pub fn fits(&self, gpus: u32, model: Option<&str>, spot: bool) -> bool {
        self.gpus == gpus && self.spot == spot && self.takes_model(model)
    }

    fn takes_model(&self, model: Option<&str>) -> bool {
        match (model, &self.gpu_type) {
            (Some(asked), Some(ours)) => asked.eq_ignore_ascii_case(ours),
            // A pool that names no model takes any (the provider's default type).
            (Some(_), None) => true,
            (None, _) => true,
        }
    }

    /// The pool `req` runs in, among `pools`: the one it names, else the first whose
    /// VMs fit it; `None` for a single-use VM. A pool VM runs one single-node
    /// attempt at a time, so a multi-node attempt is never placed in a pool that
    /// reuses its VMs.
    pub fn choose<'a>(
        pools: &'a [PoolSpec],
        req: &AllocateRequest,
    ) -> Result<Option<&'a PoolSpec>, ComputeError> {
        let r = &req.resources;
        let model = r.gpu_type.as_deref();
        let gang = r.nodes > 1;
        let Some(name) = &req.placement.pool else {
            return Ok(pools
                .iter()
                .find(|p| p.fits(r.gpus, model, req.placement.spot) && !(gang && p.reuse)));
        };
        let Some(pool) = pools.iter().find(|p| &p.name == name) else {
            let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
            return Err(ComputeError::Invalid(format!(
                "placement.pool: no pool named {name:?} here; pools: [{}]",
                known.join(", ")
            )));
        };
        if pool.gpus != r.gpus {
            return Err(ComputeError::Invalid(format!(
                "placement.pool: pool {name:?} has VMs with {} GPU(s); the job asks for {}",
                pool.gpus, r.gpus
            )));
        }
        if !pool.takes_model(model) {
            return Err(ComputeError::Invalid(format!(
                "placement.pool: pool {name:?} has {} GPUs; the job asks for {}",
                pool.gpu_type.as_deref().unwrap_or_default(),
                model.unwrap_or_default()
            )));
        }
        if gang && pool.reuse {
            return Err(ComputeError::Invalid(format!(
                "placement.pool: pool {name:?} runs single-node attempts; this job asks for {} nodes",
                r.nodes
            )));
        }
        Ok(Some(pool))
    }
}

/// Why a pool setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pool {spec:?}: {problem}")]
pub struct PoolSpecError {
    pub spec: String,
    pub problem: String,
}

/// Whether `name` can name a pool: 1 to 63 of `a-z`, `0-9`, `-`, starting with a
/// letter (it becomes part of VM names and cloud tags).
pub fn name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    (!ok).then(|| {
        format!("a pool name is 1 to 63 of a-z, 0-9 and '-', starting with a letter; got {name:?}")
    })
}

impl FromStr for PoolSpec {
    type Err = PoolSpecError;

    fn from_str(s: &str) -> Result<PoolSpec, PoolSpecError> {
        let err = |problem: String| PoolSpecError {
            spec: s.to_owned(),
            problem,
        };
        let (name, settings) = s.split_once(':').unwrap_or((s, ""));
        if let Some(p) = name_problem(name) {
            return Err(err(p));
        }
        let mut pool = PoolSpec::new(name, 0, 1);
        let mut max = None;
        for setting in settings.split(',').filter(|x| !x.is_empty()) {
            let (key, value) = setting.split_once('=').unwrap_or((setting, ""));
            let number = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| err(format!("{key} must be a whole number, got {v:?}")))
            };
            match (key, value) {
                ("min", v) => pool.min = number(v)?,
                ("max", v) => max = Some(number(v)?),
                ("gpus", v) => {
                    pool.gpus = u32::try_from(number(v)?)
                        .map_err(|_| err(format!("gpus out of range: {v}")))?
                }
                ("idle", v) => {
                    pool.idle = humantime::parse_duration(v)
                        .map_err(|e| err(format!("idle must be a duration like 60s: {e}")))?
                }
                ("gpu", v) if !v.is_empty() => pool.gpu_type = Some(v.to_ascii_lowercase()),
                ("single-use", "") => pool.reuse = false,
                ("on-demand", "") => pool.spot = false,
                ("spot", "") => pool.spot = true,
                _ => {
                    return Err(err(format!(
                        "unknown setting {setting:?}; expected min=N, max=N, gpus=N, gpu=MODEL, idle=DURATION, single-use, spot or on-demand"
                    )));
                }
            }
        }
        pool.max = max.unwrap_or(pool.min.max(1));
        if pool.max == 0 || pool.min > pool.max {
            return Err(err(format!(
                "needs 0 <= min <= max and max >= 1, got min={} max={}",
                pool.min, pool.max
            )));
        }
        Ok(pool)
    }
}

impl fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:gpus={},min={},max={},idle={}s",
            self.name,
            self.gpus,
            self.min,
            self.max,
            self.idle.as_secs()
        )?;
        if let Some(model) = &self.gpu_type {
            write!(f, ",gpu={model}")?;
        }
        if !self.spot {
            f.write_str(",on-demand")?;
        }
        if !self.reuse {
            f.write_str(",single-use")?;
        }
        Ok(())
    }
}

/// The provider → pool agent message: run this attempt, reporting with this
/// credential (good for this attempt only). Sent over a channel only the provider
/// and the agent hold, never written to disk.
#[derive(Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub job: JobId,
    pub attempt: u32,
    pub credentials: crate::attempt_auth::AgentCredentials,
}

impl fmt::Debug for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assignment")
            .field("job", &self.job)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// The pool agent → provider message: this attempt is over and its work folder is
/// gone; the VM can take the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub job: JobId,
    pub attempt: u32,
}

/// The broker's answer to a cloud pool VM asking for work
/// (`GET /v1/agent/assignment`, with its VM credential).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "orders", rename_all = "snake_case")]
pub enum PoolOrders {
    /// Run this attempt, reporting with `token` (good for this attempt only).
    Run {
        job: JobId,
        attempt: u32,
        token: String,
    },
    /// Nothing for this VM now; ask again.
    Wait,
    /// This VM is no longer the pool's: finish and end.
    Retire,
}

impl fmt::Debug for PoolOrders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolOrders::Run { job, attempt, .. } => f
                .debug_struct("Run")
                .field("job", job)
                .field("attempt", attempt)
                .finish_non_exhaustive(),
            PoolOrders::Wait => f.write_str("Wait"),
            PoolOrders::Retire => f.write_str("Retire"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_print() {
        let p: PoolSpec = "cpu:max=8,min=1,idle=90s".parse().unwrap();
        assert_eq!(
            (p.min, p.max, p.gpus, p.reuse, p.spot),
            (1, 8, 0, true, true)
        );
        assert_eq!(p.idle, Duration::from_secs(90));
        let q: PoolSpec = "a100:gpus=1,on-demand,single-use".parse().unwrap();
        assert_eq!(
            (q.min, q.max, q.gpus, q.reuse, q.spot),
            (0, 1, 1, false, false)
        );
        assert_eq!(q.to_string().parse::<PoolSpec>().unwrap(), q);
        assert_eq!(p.to_string().parse::<PoolSpec>().unwrap(), p);
    }

    #[test]
    fn jobs_go_to_the_pool_they_name_or_the_first_that_fits() {
        use crate::job::JobId;
        use crate::ports::compute::AllocationKey;
        use crate::spec::{Placement, Resources};
        use crate::time::Timestamp;
        let pools: Vec<PoolSpec> = ["cpu:max=2", "a10g:gpus=1,gpu=a10g", "any:gpus=1"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let req = |gpus, model: Option<&str>, pool: Option<&str>| AllocateRequest {
            key: AllocationKey {
                job: JobId::generate(Timestamp(1)),
                attempt: 1,
            },
            project: "default".into(),
            resources: Resources {
                gpus,
                gpu_type: model.map(str::to_owned),
                ..Resources::default()
            },
            placement: Placement {
                pool: pool.map(str::to_owned),
                ..Placement::default()
            },
            image: None,
        };
        let gang = |pool: Option<&str>| {
            let mut r = req(0, None, pool);
            r.resources.nodes = 3;
            r
        };
        let name = |r| {
            PoolSpec::choose(&pools, &r)
                .unwrap()
                .map(|p| p.name.clone())
        };
        assert_eq!(name(req(0, None, None)).as_deref(), Some("cpu"));
        assert_eq!(name(req(1, Some("A10G"), None)).as_deref(), Some("a10g"));
        assert_eq!(name(req(1, Some("t4"), None)).as_deref(), Some("any"));
        assert_eq!(name(req(2, None, None)), None);
        assert_eq!(name(req(1, None, Some("any"))).as_deref(), Some("any"));
        // A multi-node attempt gets single-use VMs, never a pool VM.
        assert_eq!(name(gang(None)), None);
        for (r, says) in [
            (gang(Some("cpu")), "runs single-node attempts"),
            (req(1, None, Some("gpu")), "no pool named"),
            (req(0, None, Some("a10g")), "1 GPU(s)"),
            (req(1, Some("t4"), Some("a10g")), "has a10g GPUs"),
        ] {
            let e = PoolSpec::choose(&pools, &r).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        let p: PoolSpec = "x:gpus=1,gpu=L4".parse().unwrap();
        assert_eq!(p.gpu_type.as_deref(), Some("l4"));
        assert_eq!(p.to_string().parse::<PoolSpec>().unwrap(), p);
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        for (s, says) in [
            ("Cpu", "pool name"),
            ("cpu:max=0", "max >= 1"),
            ("cpu:min=3,max=2", "min <= max"),
            ("cpu:max=two", "whole number"),
            ("cpu:idle=soon", "duration"),
            ("cpu:size=3", "unknown setting"),
        ] {
            let e = s.parse::<PoolSpec>().unwrap_err().to_string();
            assert!(e.contains(says), "{s}: {e}");
        }
    }
}

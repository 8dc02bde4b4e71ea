//! What the cloud hosts (the Lambda functions, the Azure function app) share
//! besides the handlers: the [`Broker`] each builds once (ports over an object
//! store, a queue and a compute provider; tokens; the operator's rules, templates
//! and hooks), VM deadlines, and the invocation ports of a triggered message.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use respawn_adapters::objstore::{ObjectStoreLedger, ObjectStoreSecrets, ObjectStoreTokens};
use respawn_core::attempt_auth::AttemptKey;
use respawn_core::intake::Templates;
use respawn_core::lifecycle::Timeouts;
use respawn_core::pool::PoolSpec;
use respawn_core::ports::{Blobs, Compute, Ports, Queue, QueueNames};
use respawn_core::seal::SealedQueue;
use respawn_core::time::SystemClock;
use respawn_core::trigger::TriggerRule;
use respawn_core::webhook::Hook;
use respawn_core::webhook::standard::Secret;
use tracing::warn;

use crate::api::{Api, ListedVms};
use crate::invocation::Invocation;
use crate::metrics::{MeteredLedger, Metrics, Prices};

/// An environment variable that must be set and not empty.
pub fn var(name: &str) -> Result<String, String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{name} is not set"))
}

/// The warm pools in variable `name`: pools separated by `;` (a pool's settings
/// use `,`), e.g. `cpu:max=4,idle=10m;a10g:gpus=1,max=8`.
pub fn pools_from_env(name: &str) -> Result<Vec<PoolSpec>, String> {
    let mut pools: Vec<PoolSpec> = Vec::new();
    for spec in std::env::var(name)
        .unwrap_or_default()
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let pool: PoolSpec = spec.parse().map_err(|e| format!("{name}: {e}"))?;
        if pools.iter().any(|p| p.name == pool.name) {
            return Err(format!("{name}: pool {:?} twice", pool.name));
        }
        pools.push(pool);
    }
    Ok(pools)
}

/// The broker's secret, `RESPAWN_KEY` (hex, at least 32 bytes): agent credentials,
/// queue seals, notification signatures.
pub fn key_from_env() -> Result<AttemptKey, String> {
    let key = hex::decode(var("RESPAWN_KEY")?)
        .ok()
        .and_then(|k| (k.len() >= 32).then_some(k))
        .ok_or("RESPAWN_KEY: expected at least 32 bytes, hex")?;
    AttemptKey::from_bytes(&key).ok_or_else(|| "RESPAWN_KEY is too short".into())
}

/// The operator's configuration folder: `RESPAWN_CONFIG`, else `config/` in the
/// folder `root_var` names (where the platform unpacked the function), else
/// `config/` here.
pub fn config_dir(root_var: &str) -> PathBuf {
    std::env::var_os("RESPAWN_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os(root_var).map(|r| PathBuf::from(r).join("config")))
        .unwrap_or_else(|| PathBuf::from("config"))
}

/// What a cloud host builds once, whatever the cloud.
#[derive(Clone)]
pub struct Broker {
    /// The ports, with the broker's queues sealed.
    pub ports: Ports,
    pub tokens: Arc<ObjectStoreTokens>,
    pub attempt_key: AttemptKey,
    pub notify_secret: Arc<Secret>,
    pub rules: Arc<Vec<TriggerRule>>,
    pub templates: Arc<Templates>,
    pub hooks: Arc<Vec<Hook>>,
    /// The state store (records, tokens, secrets, the first admin token).
    pub state: Blobs,
    /// What this instance counts, exported over OTLP.
    pub metrics: Arc<Metrics>,
    seal: Vec<u8>,
}

impl std::fmt::Debug for Broker {
    // Neither the seal nor any key: logs and panics print this.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("ports", &self.ports)
            .field("rules", &self.rules.len())
            .field("templates", &self.templates)
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Records, tokens and secrets in `state`; the jobs' files in `blobs`; the
    /// broker's queues on `queue`, sealed; VMs from `compute` (of `provider`,
    /// as the metrics name it); the rules, templates and hooks in `config`.
    pub fn new(
        provider: &str,
        attempt_key: AttemptKey,
        state: Blobs,
        blobs: Blobs,
        queue: Arc<dyn Queue>,
        compute: Arc<dyn Compute>,
        config: &Path,
    ) -> Result<Broker, String> {
        let queues = QueueNames::with_prefix("");
        let seal = attempt_key.derive("respawn queue seal");
        let metrics = Arc::new(Metrics::new(provider, Prices::from_env()?).exported_only());
        let ports = crate::traced::traced(Ports {
            ledger: Arc::new(MeteredLedger::new(
                Arc::new(ObjectStoreLedger::new(state.clone())),
                metrics.clone(),
            )),
            queue: Arc::new(SealedQueue::new(queue, &seal, sealed(&queues))),
            compute,
            secrets: Arc::new(ObjectStoreSecrets::new(state.clone())),
            blobs,
            clock: Arc::new(SystemClock),
            timeouts: cloud_timeouts(),
            queues,
        });
        let (rules, templates, hooks) = load_config(config)?;
        Ok(Broker {
            ports,
            tokens: Arc::new(ObjectStoreTokens::new(state.clone())),
            notify_secret: Arc::new(Secret::from_bytes(attempt_key.derive("respawn notify"))),
            attempt_key,
            rules: Arc::new(rules),
            templates: Arc::new(templates),
            hooks: Arc::new(hooks),
            state,
            metrics,
            seal,
        })
    }

    /// The API's view of the broker.
    pub fn api(&self) -> Api {
        Api {
            ports: self.ports.clone(),
            tokens: self.tokens.clone(),
            hooks: self.hooks.clone(),
            rules: Arc::new(RwLock::new(self.rules.as_ref().clone())),
            attempt_key: self.attempt_key.clone(),
            operator: Arc::new(ListedVms(self.ports.compute.clone())),
            // Workloads run on VMs of their own, never beside the broker.
            others_refused: None,
            metrics: Some(self.metrics.clone()),
        }
    }

    /// On a broker without tokens, mints the admin token of the default project
    /// and leaves its secret at `admin-token` in the state store, for the
    /// operator.
    pub async fn first_admin(&self) -> Result<(), String> {
        crate::api::leave_first_admin(&self.api(), &self.state).await
    }

    /// The ports of one invocation that the platform handed messages of logical
    /// queue `queue`, read from `inner`: the handlers receive them from the
    /// invocation (unsealed as always) and settle them through `inner`; the
    /// invocation tells afterwards which were settled.
    pub fn invocation(&self, inner: Arc<dyn Queue>, queue: &str) -> (Ports, Arc<Invocation>) {
        let invocation = Arc::new(Invocation::new(inner, queue));
        let ports = Ports {
            queue: Arc::new(crate::traced::TracedQueue(Arc::new(SealedQueue::new(
                invocation.clone(),
                &self.seal,
                sealed(&self.ports.queues),
            )))),
            ..self.ports.clone()
        };
        (ports, invocation)
    }
}

/// The queues only the broker writes.
fn sealed(q: &QueueNames) -> [String; 3] {
    [q.dispatch.clone(), q.events.clone(), q.notify.clone()]
}

/// Deadlines for cloud VMs: minutes to boot, heartbeats every 30 s.
pub fn cloud_timeouts() -> Timeouts {
    Timeouts {
        redispatch: Duration::from_secs(120),
        allocate: Duration::from_secs(300),
        start: Duration::from_secs(900),
        heartbeat: Duration::from_secs(180),
        preempt_slack: Duration::from_secs(60),
        failure_backoff: Duration::from_secs(10),
        infra_backoff: Duration::from_secs(10),
        capacity_backoff: Duration::from_secs(30),
        capacity_backoff_max: Duration::from_secs(600),
    }
}

/// The trigger rules, templates and hooks in `dir` (each optional); a rejected rule
/// or template is logged and left out, bad hooks stop the host.
fn load_config(dir: &std::path::Path) -> Result<(Vec<TriggerRule>, Templates, Vec<Hook>), String> {
    let triggers = dir.join("triggers");
    let (rules, errors) = if triggers.is_dir() {
        respawn_core::trigger::load_rules_dir(&triggers)
    } else {
        Default::default()
    };
    for (path, e) in errors {
        for err in &e.errors {
            warn!(file = %path.display(), "trigger rule rejected: {err}");
        }
    }
    let templates_dir = dir.join("templates");
    let templates = if templates_dir.is_dir() {
        let (t, errors) = Templates::load_dir(&templates_dir);
        for (path, e) in errors {
            warn!(file = %path.display(), "job template rejected: {e}");
        }
        t
    } else {
        Templates::default()
    };
    let hooks_file = dir.join("hooks.yaml");
    let hooks = if hooks_file.is_file() {
        respawn_core::webhook::load_hooks(&hooks_file)
            .map_err(|e| format!("hooks in {}:\n{e}", hooks_file.display()))?
    } else {
        Vec::new()
    };
    Ok((rules, templates, hooks))
}

//! What the cloud VM providers share: how the agent on a new VM is started,
//! which instance type (VM size) a job's GPUs need, and the records they keep in
//! the broker's state store.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use respawn_core::attempt_auth::{AgentCredentials, AttemptKey};
use respawn_core::ports::compute::{Error, Vm, VmState};
use respawn_core::spec::Resources;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable(Box::new(e))
}

/// JSON records in the broker's state store (which no agent can read), each
/// written only where absent or over the version it was read at: what the cloud
/// providers keep that their clouds forget (VM records, pool slots, placements).
#[derive(Debug, Clone)]
pub(crate) struct Records {
    pub store: Arc<dyn ObjectStore>,
}

impl Records {
    /// The record at `path` and its version; one that does not parse is
    /// [`Error::Invalid`].
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &Path,
    ) -> Result<Option<(T, UpdateVersion)>, Error> {
        let got = match self.store.get(path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(unavailable)?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("{path}: unreadable record: {e}")))?;
        Ok(Some((value, version)))
    }

    /// Writes `value` at `path`: only if absent (`None`), or only over `version`.
    /// Its new version; `None` when that condition failed.
    pub async fn put<T: Serialize>(
        &self,
        path: &Path,
        value: &T,
        version: Option<&UpdateVersion>,
    ) -> Result<Option<UpdateVersion>, Error> {
        let body = PutPayload::from(serde_json::to_vec(value).map_err(unavailable)?);
        let mode = match version {
            None => PutMode::Create,
            Some(v) => PutMode::Update(v.clone()),
        };
        match self
            .store
            .put_opts(path, body, PutOptions::from(mode))
            .await
        {
            Ok(r) => Ok(Some(UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            })),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotFound { .. },
            ) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Deletes the record at `path`; one already gone is fine.
    pub async fn delete(&self, path: &Path) -> Result<(), Error> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

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
    /// Where the agents send their spans (`OTEL_EXPORTER_OTLP_ENDPOINT` on the
    /// VM; `RESPAWN_AGENT_OTLP_ENDPOINT` of the functions, read by
    /// [`otlp_endpoint`]): a collector the VMs reach, and only root on them (the
    /// workload could write into other jobs' traces). No headers: the user data
    /// is no place for an API key.
    pub otlp: Option<String>,
}

/// A collector's OTLP/HTTP endpoint for the agents, as
/// `RESPAWN_AGENT_OTLP_ENDPOINT` gives it: `http(s)://HOST[:PORT][/…]`; `None`
/// when empty. Its host and port are what the boot script keeps from the
/// workload.
pub fn otlp_endpoint(value: &str) -> Result<Option<String>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    collector(value)
        .map(|_| Some(value.to_owned()))
        .ok_or_else(|| {
            format!("RESPAWN_AGENT_OTLP_ENDPOINT {value:?}: expected http(s)://HOST[:PORT], e.g. http://10.0.0.5:4318")
        })
}

/// The host and port of an `http(s)://` URL; `None` for anything else, or a
/// host that is not a plain name or address.
fn collector(url: &str) -> Option<(String, u16)> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("http://") {
        (r, 80)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, 443)
    } else {
        return None;
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            (host, after.strip_prefix(':'))
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    let plain = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    plain.then(|| (host.to_owned(), port))
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

/// The uid the workload runs as on a cloud VM (outside its sandbox): not root,
/// so that the firewall keeps it from the instance metadata, where the VM's
/// credentials are. No user needs to exist for it.
pub const WORKLOAD_UID: u32 = 64000;

/// What differs between clouds in a VM's first-boot script.
pub(crate) struct Cloud<'a> {
    /// Shell that sets `$vm`, the VM's name or id, from the metadata at `$imds`.
    pub vm_id: &'a str,
    /// The agent's flag for the preemption notice (with `$imds`).
    pub notice: &'a str,
    /// Addresses only root may reach (the metadata service, the host agent's).
    pub root_only: &'a [&'a str],
    /// OpenTelemetry's `cloud.*` resource attributes of the agents' spans.
    pub resource: &'a str,
}

/// The script a cloud VM runs at first boot (as root): finds its VM name or id
/// in the metadata, keeps the metadata (the VM's credentials are there) and
/// whatever else `cloud.root_only` names from every user but root — the workload
/// runs as [`WORKLOAD_UID`], containers through FORWARD — leaves `token` where
/// only root can read it, runs the agent with `role` (`--job … --attempt …`, or
/// `--pool-api`), and shuts the VM down when the agent is done or anything
/// before it failed. The image may set `RESPAWN_AGENT_ARGS` (e.g.
/// `--container-runtime docker`); the emulated VMs of the tests set it and the
/// metadata address.
pub(crate) fn boot_script(
    agent: &AgentBoot,
    cloud: &Cloud<'_>,
    what: &str,
    token: &str,
    role: &str,
) -> String {
    let credentials = AgentCredentials {
        api: agent.api.clone(),
        token: token.to_owned(),
    };
    let credentials = serde_json::to_string(&credentials).unwrap_or_default();
    let mut firewall = String::new();
    for addr in cloud.root_only {
        firewall.push_str(&format!(
            "iptables -I OUTPUT -d {addr} -m owner ! --uid-owner 0 -j REJECT\niptables -I FORWARD -d {addr} -j REJECT\n"
        ));
    }
    // The agents' collector takes what it is sent without a key: the workload
    // must not write into other jobs' traces.
    if let Some((host, port)) = agent.otlp.as_deref().and_then(collector) {
        let host = shell_quote(&host);
        firewall.push_str(&format!(
            "iptables -I OUTPUT -d {host} -p tcp --dport {port} -m owner ! --uid-owner 0 -j REJECT\niptables -I FORWARD -d {host} -p tcp --dport {port} -j REJECT\n"
        ));
    }
    format!(
        r#"#!/bin/bash
# respawn: {what}
set -euo pipefail
trap 'shutdown -h now' EXIT
imds=${{RESPAWN_IMDS:-http://169.254.169.254}}
root=${{RESPAWN_VM_ROOT:-/var/lib/respawn}}
{firewall}{vm_id}
dir="$root/$vm"
# The workload reaches its work folder below; nothing else here is its own.
install -d -m 0711 "$dir"
(umask 077; printf '%s' {credentials} > "$dir/credentials")
{otlp}# shellcheck disable=SC2086
respawn-agent --bucket {bucket} --vm-dir "$dir" --vm "$vm" {role} {notice} --heartbeat-secs {heartbeat} --grace-secs {grace} --sandbox bwrap --workload-uid {uid} ${{RESPAWN_AGENT_ARGS:-}} || true
"#,
        vm_id = cloud.vm_id,
        notice = cloud.notice,
        uid = WORKLOAD_UID,
        credentials = shell_quote(&credentials),
        bucket = shell_quote(&agent.bucket),
        heartbeat = agent.heartbeat_secs,
        grace = agent.grace_secs,
        otlp = agent
            .otlp
            .as_deref()
            .map(|e| {
                format!(
                    "export OTEL_EXPORTER_OTLP_ENDPOINT={}\nexport OTEL_RESOURCE_ATTRIBUTES=\"{},host.id=$vm\"\n",
                    shell_quote(e),
                    cloud.resource
                )
            })
            .unwrap_or_default(),
    )
}

/// A gang of `nodes` as its attempt sees it, from the states of the nodes known:
/// gone once any node is, running once all are, else still coming up.
pub(crate) fn gang_state(nodes: u32, known: &[VmState]) -> VmState {
    if known.contains(&VmState::Terminated) {
        VmState::Terminated
    } else if known.len() == nodes as usize && known.iter().all(|s| *s == VmState::Running) {
        VmState::Running
    } else {
        VmState::Requested
    }
}

/// A gang as a provider's `list` shows it: one VM, named as its lowest rank (rank 0
/// while it is there), live while any node is: what the sweep for orphans must see,
/// since a node left when rank 0 is gone is still billed. `nodes` are `(rank, VM)`.
pub(crate) fn listed_gang(mut nodes: Vec<(u32, Vm)>) -> Option<Vm> {
    nodes.sort_by_key(|(rank, _)| *rank);
    let live = |s: VmState| nodes.iter().any(|(_, v)| v.state == s);
    let state = if live(VmState::Running) {
        VmState::Running
    } else if live(VmState::Requested) {
        VmState::Requested
    } else {
        VmState::Terminated
    };
    let (_, mut first) = nodes.into_iter().next()?;
    first.state = state;
    Some(first)
}

/// `s` as one word for `sh`, whatever it holds.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

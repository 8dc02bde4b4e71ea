//! A [`Compute`] provider on Azure Spot VMs, through the Azure Resource Manager
//! REST API (no maintained Rust crate creates VMs), for the Azure deployment.
//!
//! - **One VM per job + attempt.** A VM's name is derived from stack, job and
//!   attempt, and an ARM `PUT` of a name that exists changes nothing: a retried
//!   allocation finds the VM it made. What became of each attempt's VM is kept in
//!   the broker's state store (`azure-vms/<name>.json`): `putting` before the `PUT`,
//!   `created` once ARM accepted it, `released` once the broker let it go. A VM
//!   that is gone after `created` was evicted (Spot VMs here are deleted on
//!   eviction) and is never made again; the same key after `released` is never
//!   made again either.
//! - **Spot**: `priority: Spot`, `evictionPolicy: Delete`, `billingProfile.maxPrice`
//!   from the job's placement (`-1`: up to the on-demand price). Its OS disk and
//!   NIC are deleted with it.
//! - **Capacity misses** (no budget spent): `SkuNotAvailable`,
//!   `OverconstrainedAllocationRequest`, `AllocationFailed`, `ZonalAllocationFailed`
//!   and the quota errors, whether the `PUT` answers them or its long-running
//!   operation ends with them. A VM whose creation failed is deleted.
//! - **Long-running operations** are followed through `Azure-AsyncOperation`
//!   (a while after the `PUT`, to see a fast failure; after that `describe` tells).
//! - **Throttling**: a 429 is retried after its `Retry-After`.
//! - **Custom data** starts the agent with its attempt's credential
//!   ([`custom_data`]): cloud-init runs it as root at first boot.
//! - **Tags**: `respawn-stack` (scopes `list`), `respawn-job`, `respawn-attempt`,
//!   `respawn-project` (`-`, not EC2's `:`, which some Azure services refuse in
//!   tag names).
//! - **Credentials**: [`credential_from_env`] (`azure_identity`): workload
//!   identity, a client secret, or the managed identity.
//! - **Multi-node attempts** (`resources.nodes` > 1): a gang of VMs, node r named
//!   `<vm name>-n<r>` (rank 0 is the attempt's VM name), each with its own record
//!   and custom data (`--rank r --nodes N`), all in one proximity placement group
//!   `<vm name>-ppg`. They are created together; a capacity miss on any node deletes
//!   the nodes made (their records unmade, so that the attempt's next try makes
//!   them again) and is the gang's miss. The gang is one VM to the broker: gone when
//!   any node is. Agents learn their peers' private addresses through the broker
//!   ([`Compute::roster`]: each node's primary NIC).
//! - **A gang's network**: the agents' NSG denies traffic between agents, so that
//!   no job reaches another's VM. A gang's NICs join an application security group
//!   of their own, `<vm name>-asg`, and a rule `<vm name>-gang` in the NSG allows
//!   traffic from that group to that group alone, at a priority between
//!   [`GANG_PRIORITIES`]'s bounds (first choice from the name, the next on a
//!   `SecurityRuleConflict`). A release deletes the rule, the group and the
//!   proximity group; what ARM refuses while nodes are still being deleted, the
//!   reconcile timer deletes later ([`ArmCompute::sweep_groups`]).
//! - **Warm pools** (`RESPAWN_AZURE_POOLS`): VMs that run attempt after attempt,
//!   as on EC2 ([`crate::vmpool`]): named `<stack>-p<16 hex>` from their pool VM
//!   name, tagged `respawn-pool` and `respawn-vm`, their agent asking the API for
//!   its orders with the VM's own credential.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use base64::Engine;
use object_store::path::Path;
use object_store::{ObjectStore, UpdateVersion};
use respawn_core::job::JobId;
use respawn_core::pool::PoolSpec;
use respawn_core::ports::compute::{
    AllocateRequest, AllocationKey, Compute, Error, Orders, Vm, VmState,
};
use respawn_core::spec::Resources;
use respawn_core::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub use crate::cloudvm::{AgentBoot, InstanceTypes};
use crate::cloudvm::{Cloud, Records, boot_script};
use crate::vmpool::{Member, PoolCloud, Pools};

pub const TAG_STACK: &str = "respawn-stack";
pub const TAG_JOB: &str = "respawn-job";
pub const TAG_ATTEMPT: &str = "respawn-attempt";
pub const TAG_PROJECT: &str = "respawn-project";
/// A pool VM's pool and name (it has no job or attempt tags: it runs many).
pub const TAG_POOL: &str = "respawn-pool";
pub const TAG_VM: &str = "respawn-vm";
/// A gang node's rank and the gang's size (multi-node attempts only).
pub const TAG_RANK: &str = "respawn-rank";
pub const TAG_NODES: &str = "respawn-nodes";
const API_VERSION: &str = "2024-07-01";
const NETWORK_API_VERSION: &str = "2024-05-01";
const SCOPE: &str = "https://management.azure.com/.default";
/// How often a step re-reads a record another writer changed before giving up
/// (the message comes back).
const RACES: u32 = 5;
/// How many throttled answers one call waits out before it gives up (the next
/// delivery of its message tries again).
const THROTTLE_TRIES: u32 = 4;
/// The longest `Retry-After` waited out in one call.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The image VMs boot: `publisher:offer:sku:version`, or a resource id (a custom
/// image or a gallery image version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    Marketplace {
        publisher: String,
        offer: String,
        sku: String,
        version: String,
    },
    Id(String),
}

impl std::str::FromStr for Image {
    type Err = String;

    fn from_str(s: &str) -> Result<Image, String> {
        if s.starts_with('/') {
            return Ok(Image::Id(s.to_owned()));
        }
        match s.split(':').collect::<Vec<_>>()[..] {
            [publisher, offer, sku, version]
                if [publisher, offer, sku, version]
                    .iter()
                    .all(|p| !p.is_empty()) =>
            {
                Ok(Image::Marketplace {
                    publisher: publisher.into(),
                    offer: offer.into(),
                    sku: sku.into(),
                    version: version.into(),
                })
            }
            _ => Err(format!(
                "{s:?}: expected publisher:offer:sku:version or an image's resource id"
            )),
        }
    }
}

impl Image {
    fn reference(&self) -> Value {
        match self {
            Image::Marketplace {
                publisher,
                offer,
                sku,
                version,
            } => json!({"publisher": publisher, "offer": offer, "sku": sku, "version": version}),
            Image::Id(id) => json!({ "id": id }),
        }
    }
}

/// The VMs this broker creates.
#[derive(Debug, Clone)]
pub struct ArmConfig {
    /// The broker's name: prefixes its VMs' names, tags them and scopes `list`.
    pub stack: String,
    /// `https://management.azure.com`, or a harness.
    pub endpoint: String,
    pub subscription: String,
    pub resource_group: String,
    pub location: String,
    /// The subnet the VMs' NICs join (a resource id).
    pub subnet: String,
    /// The network security group on that subnet (a resource id), which denies
    /// traffic between agents; a gang's rule there lets its nodes reach each
    /// other. `None`: no rule is made (the subnet's own rules decide).
    pub nsg: Option<String>,
    pub image: Image,
    /// The user-assigned identity the VMs get (the job container, nothing else).
    pub agent_identity: Option<String>,
    pub cpu_size: String,
    pub sizes: InstanceTypes,
    /// A Spot VM's price cap when the job names none (`-1`: the on-demand price).
    pub max_price: f64,
    pub agent: AgentBoot,
    /// How long `allocate` follows the creation before it answers (a fast
    /// capacity failure is a capacity miss; a later one is a lost VM).
    pub follow: Duration,
    /// Warm pools; their records are in the state store.
    pub pools: Vec<PoolSpec>,
}

/// GPU VM sizes by GPU model and count (NVIDIA models only: the agent's images
/// carry CUDA).
pub fn default_sizes() -> InstanceTypes {
    let table = [
        ("t4", 1, "Standard_NC4as_T4_v3"),
        ("t4", 4, "Standard_NC64as_T4_v3"),
        ("v100", 1, "Standard_NC6s_v3"),
        ("v100", 2, "Standard_NC12s_v3"),
        ("v100", 4, "Standard_NC24s_v3"),
        ("a100", 1, "Standard_NC24ads_A100_v4"),
        ("a100", 2, "Standard_NC48ads_A100_v4"),
        ("a100", 4, "Standard_NC96ads_A100_v4"),
        ("a100", 8, "Standard_ND96asr_v4"),
        ("h100", 1, "Standard_NC40ads_H100_v5"),
        ("h100", 2, "Standard_NC80adis_H100_v5"),
        ("h100", 8, "Standard_ND96isr_H100_v5"),
    ];
    InstanceTypes {
        gpu: table
            .into_iter()
            .map(|(m, n, t)| ((m.to_owned(), n), t.to_owned()))
            .collect(),
        default_gpu: "t4".into(),
    }
}

/// An Entra ID credential from the environment, as `azure_identity` reads it:
/// workload identity where `AZURE_FEDERATED_TOKEN_FILE` is set, a client secret
/// where `AZURE_CLIENT_SECRET` is, else the managed identity (`AZURE_CLIENT_ID`
/// picks a user-assigned one; App Service's endpoint where Functions run, IMDS on
/// a VM).
pub fn credential_from_env() -> Result<Arc<dyn TokenCredential>, String> {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    if var("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        let c = azure_identity::WorkloadIdentityCredential::new(None)
            .map_err(|e| format!("workload identity: {e}"))?;
        return Ok(c);
    }
    if let Some(secret) = var("AZURE_CLIENT_SECRET") {
        let tenant = var("AZURE_TENANT_ID").ok_or("AZURE_CLIENT_SECRET needs AZURE_TENANT_ID")?;
        let client = var("AZURE_CLIENT_ID").ok_or("AZURE_CLIENT_SECRET needs AZURE_CLIENT_ID")?;
        let c = azure_identity::ClientSecretCredential::new(&tenant, client, secret.into(), None)
            .map_err(|e| format!("client secret credential: {e}"))?;
        return Ok(c);
    }
    let options = azure_identity::ManagedIdentityCredentialOptions {
        user_assigned_id: var("AZURE_CLIENT_ID").map(azure_identity::UserAssignedId::ClientId),
        ..Default::default()
    };
    let c = azure_identity::ManagedIdentityCredential::new(Some(options))
        .map_err(|e| format!("managed identity: {e}"))?;
    Ok(c)
}

/// What the broker knows of an attempt's VM, kept where ARM forgets (a deleted VM
/// is gone from ARM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stage {
    /// A `PUT` may be on its way: a missing VM may still be made.
    Putting,
    /// ARM accepted the VM: once missing, it was evicted or deleted.
    Created,
    /// The broker let it go.
    Released,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    job: JobId,
    attempt: u32,
    stage: Stage,
    /// Whether ARM ever accepted the VM (a key released before it was made has
    /// no VM to describe).
    #[serde(default)]
    made: bool,
    spot: bool,
    created_at: Timestamp,
    /// The gang's size, on every node's record (1: a single VM).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    nodes: u32,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Spot VMs over ARM.
pub struct ArmCompute {
    http: reqwest_aws::Client,
    credential: Arc<dyn TokenCredential>,
    cfg: ArmConfig,
    /// What ARM forgets, in the broker's state store.
    records: Records,
    pools: Option<Pools>,
}

impl fmt::Debug for ArmCompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArmCompute")
            .field("endpoint", &self.cfg.endpoint)
            .field("resource_group", &self.cfg.resource_group)
            .field("stack", &self.cfg.stack)
            .finish_non_exhaustive()
    }
}

/// An ARM answer that was not a success.
#[derive(Debug)]
struct ArmError {
    /// 0: no answer.
    status: u16,
    code: String,
    message: String,
}

impl ArmError {
    fn transport(message: String) -> ArmError {
        ArmError {
            status: 0,
            code: String::new(),
            message,
        }
    }

    fn from_body(status: u16, body: &str) -> ArmError {
        let parsed: Option<ErrorBody> = serde_json::from_str(body).ok();
        match parsed.and_then(|b| b.error) {
            Some(e) => ArmError {
                status,
                code: e.code.clone(),
                message: e.describe(),
            },
            None => ArmError {
                status,
                code: String::new(),
                message: body.chars().take(500).collect(),
            },
        }
    }

    fn is_capacity(&self) -> bool {
        is_capacity(&self.code, &self.message)
    }

    fn into_compute(self) -> Error {
        let what = format!("{} ({}): {}", self.code, self.status, self.message);
        if self.is_capacity() {
            Error::Capacity(what)
        } else if self.status == 0
            || self.status >= 500
            || matches!(self.status, 401 | 403 | 404 | 408 | 409 | 429)
        {
            // Not the job's fault: a role not yet granted, a resource group being
            // made, a conflicting operation in flight. Tried again later.
            Error::Unavailable(what.into())
        } else {
            Error::Invalid(what)
        }
    }
}

/// Codes of a failed operation that no retry mends: the request was wrong.
const PERMANENT: &[&str] = &[
    "InvalidParameter",
    "BadRequest",
    "ImageNotFound",
    "PlatformImageNotFound",
    "InvalidResourceReference",
    "VMMarketplaceInvalidInput",
    "OperationNotAllowed",
];

/// Whether an ARM error code (or one of its details) means no Spot capacity or
/// quota now.
fn is_capacity(code: &str, message: &str) -> bool {
    const CAPACITY: &[&str] = &[
        "SkuNotAvailable",
        "OverconstrainedAllocationRequest",
        "OverconstrainedZonalAllocationRequest",
        "AllocationFailed",
        "ZonalAllocationFailed",
        "QuotaExceeded",
        "LowPriorityQuotaExceeded",
        "SpotQuotaExceeded",
    ];
    CAPACITY.contains(&code)
        || (code == "OperationNotAllowed" && message.to_ascii_lowercase().contains("quota"))
        || CAPACITY.iter().any(|c| message.contains(c))
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: Option<ErrorDetail>,
}

#[derive(Debug, Clone, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

impl ErrorDetail {
    /// The message with the details' codes, where capacity errors often are.
    fn describe(&self) -> String {
        let mut s = self.message.clone();
        for d in &self.details {
            s.push_str(&format!(" [{}: {}]", d.code, d.message));
        }
        s
    }
}

/// A long-running operation's status (`Azure-AsyncOperation`).
#[derive(Debug, Deserialize)]
struct Operation {
    status: String,
    #[serde(default)]
    error: Option<ErrorDetail>,
}

/// A VM as ARM describes it (the fields respawn reads).
#[derive(Debug, Deserialize)]
struct ArmVm {
    name: String,
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    properties: ArmVmProperties,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArmVmProperties {
    #[serde(default)]
    provisioning_state: String,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    time_created: Option<String>,
    #[serde(default)]
    instance_view: Option<InstanceView>,
    #[serde(default)]
    network_profile: Option<NetworkProfile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkProfile {
    /// The NICs ARM made from the VM's network interface configurations.
    #[serde(default)]
    network_interfaces: Vec<ResourceRef>,
}

#[derive(Debug, Default, Deserialize)]
struct ResourceRef {
    #[serde(default)]
    id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Nic {
    #[serde(default)]
    properties: NicProperties,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NicProperties {
    #[serde(default)]
    ip_configurations: Vec<IpConfiguration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpConfiguration {
    #[serde(default)]
    properties: IpConfigurationProperties,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpConfigurationProperties {
    #[serde(default, rename = "privateIPAddress")]
    private_ip_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct InstanceView {
    #[serde(default)]
    statuses: Vec<Status>,
}

#[derive(Debug, Default, Deserialize)]
struct Status {
    #[serde(default)]
    code: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmList {
    #[serde(default)]
    value: Vec<ArmVm>,
    #[serde(default)]
    next_link: Option<String>,
}

impl ArmVm {
    fn state(&self) -> VmState {
        // A VM whose OS shut down is stopped, not gone: still billed, and no
        // agent runs on it.
        let stopped = self.properties.instance_view.as_ref().is_some_and(|v| {
            v.statuses.iter().any(|s| {
                matches!(
                    s.code.as_str(),
                    "PowerState/stopped"
                        | "PowerState/stopping"
                        | "PowerState/deallocated"
                        | "PowerState/deallocating"
                )
            })
        });
        match self.properties.provisioning_state.as_str() {
            _ if stopped => VmState::Terminated,
            "Succeeded" => VmState::Running,
            "Failed" | "Deleting" | "Canceled" => VmState::Terminated,
            // Creating, Updating, Migrating: not yet.
            _ => VmState::Requested,
        }
    }

    /// Whether ARM itself ended this VM's creation (failed, cancelled, or being
    /// deleted after): not a VM that ran and stopped.
    fn creation_failed(&self) -> bool {
        matches!(
            self.properties.provisioning_state.as_str(),
            "Failed" | "Canceled" | "Deleting"
        )
    }

    fn key(&self) -> Option<AllocationKey> {
        Some(AllocationKey {
            job: self.tags.get(TAG_JOB)?.parse().ok()?,
            attempt: self.tags.get(TAG_ATTEMPT)?.parse().ok()?,
        })
    }

    fn to_member(&self) -> Member {
        Member {
            id: self.name.clone(),
            vm: self.tags.get(TAG_VM).cloned(),
            state: self.state(),
            launched: self
                .properties
                .time_created
                .as_deref()
                .and_then(Timestamp::parse_rfc3339),
            // ARM keeps a VM that failed or stopped until it is deleted.
            lingers: true,
        }
    }

    /// A gang node's rank (0 for a single VM).
    fn rank(&self) -> u32 {
        self.tags
            .get(TAG_RANK)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0)
    }

    fn to_vm(&self) -> Option<Vm> {
        Some(Vm {
            id: self.name.clone(),
            key: self.key()?,
            state: self.state(),
            spot: self.properties.priority.as_deref() == Some("Spot"),
            nodes: self
                .tags
                .get(TAG_NODES)
                .and_then(|n| n.parse().ok())
                .unwrap_or(1),
            created_at: self
                .properties
                .time_created
                .as_deref()
                .and_then(Timestamp::parse_rfc3339)
                .unwrap_or(Timestamp(0)),
        })
    }
}

/// What a gang has besides its VMs, each named after its rank 0 VM, `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GangPart {
    /// Its proximity placement group: the nodes close together.
    Placement,
    /// Its application security group: the nodes' NICs, which the gang's rule in
    /// the agents' NSG lets reach each other.
    Peers,
}

impl GangPart {
    const ALL: [GangPart; 2] = [GangPart::Placement, GangPart::Peers];

    fn resource_type(self) -> &'static str {
        match self {
            GangPart::Placement => "Microsoft.Compute/proximityPlacementGroups",
            GangPart::Peers => "Microsoft.Network/applicationSecurityGroups",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            GangPart::Placement => API_VERSION,
            GangPart::Peers => NETWORK_API_VERSION,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            GangPart::Placement => "-ppg",
            GangPart::Peers => "-asg",
        }
    }
}

/// The priorities gang rules take in the agents' NSG: above (before) the
/// template's deny rules at 4095 and 4096, below (after) 1000, which leaves the
/// first numbers to an operator's own rules.
pub const GANG_PRIORITIES: std::ops::Range<u32> = 1000..4000;

/// Priorities a gang's rule tries before its allocation gives up for now.
const PRIORITY_TRIES: u32 = 32;

/// The name of the rule that lets gang `base`'s nodes reach each other.
fn rule_name(base: &str) -> String {
    format!("{base}-gang")
}

/// The first priority gang `base`'s rule tries: spread by the name, so that gangs
/// allocated at once rarely try the same one.
fn first_priority(base: &str) -> u32 {
    let digest = Sha256::digest(base.as_bytes());
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    GANG_PRIORITIES.start + n % GANG_PRIORITIES.len() as u32
}

/// A gang as the broker sees it: one VM, named as its rank 0, gone once any node
/// is, running once all are. `vms` holds what is known of each node (none: a gang
/// released before any was made).
fn gang_vm(base: &str, key: &AllocationKey, nodes: u32, vms: &[Option<Vm>]) -> Vm {
    let known: Vec<&Vm> = vms.iter().flatten().collect();
    let state = if vms.is_empty() {
        VmState::Terminated
    } else {
        let states: Vec<VmState> = known.iter().map(|v| v.state).collect();
        crate::cloudvm::gang_state(nodes, &states)
    };
    Vm {
        id: base.to_owned(),
        key: key.clone(),
        state,
        spot: known.first().is_some_and(|v| v.spot),
        nodes,
        created_at: known
            .iter()
            .map(|v| v.created_at)
            .min()
            .unwrap_or(Timestamp(crate::bands::now_ms())),
    }
}

/// The name of an attempt's VM: `<stack>-<16 hex>` (the same for every try).
pub fn vm_name(stack: &str, key: &AllocationKey) -> String {
    let digest = Sha256::digest(format!("{stack}\n{}\n{}", key.job, key.attempt));
    format!("{stack}-{}", &hex::encode(digest)[..16])
}

impl ArmCompute {
    /// VMs as `cfg` says, with what ARM forgets kept in `state` (the broker's
    /// state container).
    pub fn new(
        cfg: ArmConfig,
        credential: Arc<dyn TokenCredential>,
        state: Arc<dyn ObjectStore>,
    ) -> Result<ArmCompute, String> {
        let stack_ok = (1..=40).contains(&cfg.stack.len())
            && cfg.stack.starts_with(|c: char| c.is_ascii_lowercase())
            && cfg
                .stack
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !stack_ok {
            return Err(format!(
                "stack {:?}: VM names start with it, so 1 to 40 of a-z, 0-9 and '-', starting with a letter",
                cfg.stack
            ));
        }
        let http = reqwest_aws::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let mut cfg = cfg;
        for pool in &mut cfg.pools {
            // A pool with GPUs and no model gets the default model's size.
            if pool.gpus > 0 && pool.gpu_type.is_none() {
                pool.gpu_type = Some(cfg.sizes.default_gpu.clone());
            }
            cfg.sizes
                .choose(&pool_resources(pool), &cfg.cpu_size)
                .map_err(|e| format!("pool {}: {e}", pool.name))?;
        }
        Ok(ArmCompute {
            http,
            credential,
            pools: Pools::new(cfg.pools.clone(), state.clone()),
            cfg: ArmConfig {
                endpoint: cfg.endpoint.trim_end_matches('/').to_owned(),
                ..cfg
            },
            records: Records { store: state },
        })
    }

    fn vms_url(&self) -> String {
        format!(
            "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines",
            self.cfg.endpoint, self.cfg.subscription, self.cfg.resource_group
        )
    }

    fn vm_url(&self, name: &str) -> String {
        format!("{}/{name}?api-version={API_VERSION}", self.vms_url())
    }

    /// The VM with its instance view (its power state).
    fn vm_view_url(&self, name: &str) -> String {
        format!("{}&$expand=instanceView", self.vm_url(name))
    }

    /// One ARM call with a bearer token; a 429 is waited out (its `Retry-After`).
    /// Answers the status, the `Azure-AsyncOperation` header and the body.
    async fn call(
        &self,
        method: reqwest_aws::Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Option<String>, String), ArmError> {
        let mut throttled = 0;
        loop {
            let token = self
                .credential
                .get_token(&[SCOPE], None)
                .await
                .map_err(|e| ArmError::transport(format!("no Entra ID token for ARM: {e}")))?;
            let mut req = self
                .http
                .request(method.clone(), url)
                .bearer_auth(token.token.secret());
            if let Some(body) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| ArmError::transport(format!("{method} {url}: {e}")))?;
            let status = resp.status().as_u16();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let operation = header("azure-asyncoperation");
            let retry_after = header("retry-after");
            let text = resp
                .text()
                .await
                .map_err(|e| ArmError::transport(format!("{method} {url}: {e}")))?;
            if status == 429 && throttled < THROTTLE_TRIES {
                throttled += 1;
                let wait = retry_after
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map_or(Duration::from_secs(5), Duration::from_secs)
                    .min(MAX_RETRY_AFTER);
                info!(%url, wait_s = wait.as_secs(), "ARM throttled the call; waiting as asked");
                tokio::time::sleep(wait).await;
                continue;
            }
            if (200..300).contains(&status) {
                return Ok((status, operation, text));
            }
            return Err(ArmError::from_body(status, &text));
        }
    }

    async fn get_vm(&self, name: &str) -> Result<Option<ArmVm>, ArmError> {
        match self
            .call(reqwest_aws::Method::GET, &self.vm_view_url(name), None)
            .await
        {
            Ok((_, _, body)) => serde_json::from_str(&body)
                .map(Some)
                .map_err(|e| ArmError::transport(format!("GET VM {name}: {e}"))),
            Err(e) if e.status == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn delete_vm(&self, name: &str) -> Result<(), ArmError> {
        match self
            .call(reqwest_aws::Method::DELETE, &self.vm_url(name), None)
            .await
        {
            Err(e) if e.status != 404 => Err(e),
            _ => Ok(()),
        }
    }

    /// Follows a long-running operation for up to `cfg.follow`: `Some(Ok)` once it
    /// succeeded, `Some(Err)` once it failed, `None` while it runs on.
    async fn follow(&self, url: &str) -> Option<Result<(), ArmError>> {
        let until = tokio::time::Instant::now() + self.cfg.follow;
        let mut pause = Duration::from_millis(200);
        loop {
            match self.call(reqwest_aws::Method::GET, url, None).await {
                Ok((_, _, body)) => match serde_json::from_str::<Operation>(&body) {
                    Ok(op) if op.status == "Succeeded" => return Some(Ok(())),
                    Ok(op) if matches!(op.status.as_str(), "Failed" | "Canceled") => {
                        let e = op.error.unwrap_or(ErrorDetail {
                            code: op.status.clone(),
                            message: String::new(),
                            details: Vec::new(),
                        });
                        // The request was taken, so a failure is the platform's
                        // unless its code says the request itself was wrong.
                        let status = if PERMANENT.contains(&e.code.as_str()) {
                            400
                        } else {
                            500
                        };
                        return Some(Err(ArmError {
                            status,
                            code: e.code.clone(),
                            message: e.describe(),
                        }));
                    }
                    Ok(_) => {}
                    Err(e) => warn!(%url, error = %e, "unreadable operation status"),
                },
                Err(e) => warn!(%url, error = %e.message, "cannot read the operation's status"),
            }
            if tokio::time::Instant::now() + pause > until {
                return None;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    fn record_path(name: &str) -> Path {
        Path::from(format!("azure-vms/{name}.json"))
    }

    /// The record of VM `name` and its version, for a conditional write.
    async fn record(&self, name: &str) -> Result<Option<(Record, UpdateVersion)>, Error> {
        // Unreadable is the store's trouble, not the request's: tried again.
        self.records
            .get(&Self::record_path(name))
            .await
            .map_err(|e| match e {
                Error::Invalid(why) => Error::Unavailable(why.into()),
                e => e,
            })
    }

    /// Writes `record` if the stored one is still the version `seen` (none yet:
    /// `None`); its new version, or `None` when another wrote first.
    async fn put_record(
        &self,
        name: &str,
        record: &Record,
        seen: Option<&UpdateVersion>,
    ) -> Result<Option<UpdateVersion>, Error> {
        self.records
            .put(&Self::record_path(name), record, seen)
            .await
    }

    /// One try at `req`'s VM: `None` when the record changed under it (try again).
    async fn allocate_once(
        &self,
        req: &AllocateRequest,
        name: &str,
        size: &str,
        rank: u32,
    ) -> Result<Option<Vm>, Error> {
        let current = self.record(name).await?;
        let terminated = |r: &Record| Vm {
            id: name.to_owned(),
            key: req.key.clone(),
            state: VmState::Terminated,
            spot: r.spot,
            nodes: 1,
            created_at: r.created_at,
        };
        if let Some((r, _)) = &current
            && r.stage == Stage::Released
        {
            return Ok(Some(terminated(r)));
        }
        if let Some(found) = self.get_vm(name).await.map_err(ArmError::into_compute)? {
            let made = current.as_ref().is_some_and(|(r, _)| r.made);
            if !made && found.creation_failed() {
                // A creation that failed, still being deleted: it never ran, and
                // the attempt waits (no budget) until the name is free.
                let _ = self.delete_vm(name).await;
                return Err(Error::Capacity(format!(
                    "VM {name}: an earlier creation failed and is being deleted"
                )));
            }
            if !made {
                // Made by a PUT whose answer never got written down.
                let r = Record {
                    stage: Stage::Created,
                    made: true,
                    ..self.new_record(req)
                };
                if self
                    .put_record(name, &r, current.as_ref().map(|(_, v)| v))
                    .await?
                    .is_none()
                {
                    return Ok(None);
                }
            }
            return found
                .to_vm()
                .map(Some)
                .ok_or_else(|| Error::Invalid(format!("VM {name} has no respawn tags")));
        }
        if let Some((r, _)) = &current
            && r.made
        {
            // Made once and gone since: evicted. Never made twice.
            return Ok(Some(terminated(r)));
        }
        if self.cfg.agent.api.is_empty() {
            return Err(Error::Unavailable(
                "no API address for agents to report to (RESPAWN_API_URL)".into(),
            ));
        }
        let putting = self.new_record(req);
        let Some(version) = self
            .put_record(name, &putting, current.as_ref().map(|(_, v)| v))
            .await?
        else {
            return Ok(None);
        };
        let body = self.attempt_body(req, name, size, rank);
        let (_, operation, answer) = match self
            .call(reqwest_aws::Method::PUT, &self.vm_url(name), Some(&body))
            .await
        {
            Ok(ok) => ok,
            Err(e) => {
                if e.is_capacity() {
                    info!(job_id = %req.key.job, attempt = req.key.attempt, vm = %name, code = %e.code, "no Spot capacity");
                }
                return Err(e.into_compute());
            }
        };
        let created = Record {
            stage: Stage::Created,
            made: true,
            ..putting.clone()
        };
        let Some(version) = self.put_record(name, &created, Some(&version)).await? else {
            // Changed while the PUT was on its way: by a release (what it made
            // goes), or by another dispatcher of the attempt (the next try finds
            // the VM and its record).
            let released = self
                .record(name)
                .await?
                .is_some_and(|(r, _)| r.stage == Stage::Released);
            if !released {
                return Ok(None);
            }
            warn!(job_id = %req.key.job, attempt = req.key.attempt, vm = %name, "released during its creation; deleting it");
            self.delete_vm(name).await.map_err(ArmError::into_compute)?;
            return Ok(Some(terminated(&putting)));
        };
        info!(job_id = %req.key.job, attempt = req.key.attempt, vm = %name, %size, spot = req.placement.spot, "VM requested");
        let mut vm: Vm = serde_json::from_str::<ArmVm>(&answer)
            .ok()
            .and_then(|v| v.to_vm())
            .unwrap_or(Vm {
                id: name.to_owned(),
                key: req.key.clone(),
                state: VmState::Requested,
                spot: req.placement.spot,
                nodes: 1,
                created_at: putting.created_at,
            });
        if let Some(url) = operation {
            match self.follow(&url).await {
                Some(Ok(())) => vm.state = VmState::Running,
                Some(Err(e)) => {
                    warn!(job_id = %req.key.job, attempt = req.key.attempt, vm = %name, code = %e.code, error = %e.message, "VM creation failed; deleting it");
                    // It never ran: recorded as not made before it goes, so that
                    // nothing reads its absence as an eviction; the attempt is
                    // retried under its number and may make it again (once the
                    // failed one is gone). A release since keeps its mark.
                    self.put_record(name, &putting, Some(&version)).await?;
                    if let Err(d) = self.delete_vm(name).await {
                        warn!(job_id = %req.key.job, attempt = req.key.attempt, vm = %name, error = %d.message, "cannot delete the failed VM; the next allocation tries again");
                    }
                    return Err(e.into_compute());
                }
                None => {}
            }
        }
        Ok(Some(vm))
    }

    fn new_record(&self, req: &AllocateRequest) -> Record {
        Record {
            job: req.key.job.clone(),
            attempt: req.key.attempt,
            stage: Stage::Putting,
            made: false,
            spot: req.placement.spot,
            created_at: Timestamp(crate::bands::now_ms()),
            nodes: req.resources.nodes.max(1),
        }
    }

    /// The `PUT` body of `req`'s VM (node `rank` of its gang).
    fn attempt_body(&self, req: &AllocateRequest, name: &str, size: &str, rank: u32) -> Value {
        let nodes = req.resources.nodes.max(1);
        let mut tags = json!({
            TAG_STACK: self.cfg.stack,
            TAG_JOB: req.key.job.to_string(),
            TAG_ATTEMPT: req.key.attempt.to_string(),
            TAG_PROJECT: req.project,
        });
        let gang = (nodes > 1).then_some((rank, nodes));
        if gang.is_some() {
            tags[TAG_RANK] = json!(rank.to_string());
            tags[TAG_NODES] = json!(nodes.to_string());
        }
        let script = custom_data(&self.cfg.agent, &req.key, gang);
        let spot = req.placement.spot.then_some(req.placement.max_price);
        let mut body = self.vm_body(name, size, tags, &script, spot);
        if gang.is_some() {
            let base = vm_name(&self.cfg.stack, &req.key);
            body["properties"]["proximityPlacementGroup"] =
                json!({ "id": self.part_id(GangPart::Placement, &base) });
            if self.cfg.nsg.is_some() {
                body["properties"]["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]
                    ["ipConfigurations"][0]["properties"]["applicationSecurityGroups"] =
                    json!([{ "id": self.part_id(GangPart::Peers, &base) }]);
            }
        }
        body
    }

    /// The resource id of gang `base`'s `part`.
    fn part_id(&self, part: GangPart, base: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/{}/{base}{}",
            self.cfg.subscription,
            self.cfg.resource_group,
            part.resource_type(),
            part.suffix()
        )
    }

    fn part_url(&self, part: GangPart, base: &str) -> String {
        format!(
            "{}{}?api-version={}",
            self.cfg.endpoint,
            self.part_id(part, base),
            part.api_version()
        )
    }

    /// The URL of gang `base`'s rule in `nsg`.
    fn rule_url(&self, nsg: &str, base: &str) -> String {
        format!(
            "{}{nsg}/securityRules/{}?api-version={NETWORK_API_VERSION}",
            self.cfg.endpoint,
            rule_name(base)
        )
    }

    /// `PUT`s `body` at `url` and follows the operation ARM answers with, if any,
    /// until it ends or `cfg.follow` passes (the resource is usable meanwhile).
    async fn put_followed(&self, url: &str, body: &Value) -> Result<(), ArmError> {
        let (_, operation, _) = self.call(reqwest_aws::Method::PUT, url, Some(body)).await?;
        match operation {
            Some(op) => self.follow(&op).await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// What gang `base` needs before its nodes: a proximity placement group, so
    /// that nodes that talk every step are close together, and (with an NSG) the
    /// application security group of its NICs and the rule that lets them reach
    /// each other. Every `PUT` of something that exists is a no-op.
    async fn put_gang_parts(&self, req: &AllocateRequest, base: &str) -> Result<(), Error> {
        let tags = json!({
            TAG_STACK: self.cfg.stack,
            TAG_JOB: req.key.job.to_string(),
            TAG_ATTEMPT: req.key.attempt.to_string(),
        });
        let placement = json!({
            "location": self.cfg.location,
            "tags": tags,
            "properties": { "proximityPlacementGroupType": "Standard" },
        });
        self.put_followed(&self.part_url(GangPart::Placement, base), &placement)
            .await
            .map_err(ArmError::into_compute)?;
        let Some(nsg) = &self.cfg.nsg else {
            return Ok(());
        };
        let peers = json!({ "location": self.cfg.location, "tags": tags, "properties": {} });
        self.put_followed(&self.part_url(GangPart::Peers, base), &peers)
            .await
            .map_err(ArmError::into_compute)?;
        self.put_rule(nsg, base).await
    }

    /// The rule in `nsg` that lets gang `base`'s nodes, and no other VM, reach
    /// each other.
    async fn put_rule(&self, nsg: &str, base: &str) -> Result<(), Error> {
        let group = json!([{ "id": self.part_id(GangPart::Peers, base) }]);
        let url = self.rule_url(nsg, base);
        let first = first_priority(base) - GANG_PRIORITIES.start;
        let span = GANG_PRIORITIES.len() as u32;
        for i in 0..PRIORITY_TRIES {
            let priority = GANG_PRIORITIES.start + (first + i) % span;
            let rule = json!({"properties": {
                "description": format!("respawn: the nodes of gang {base} reach each other"),
                "priority": priority,
                "direction": "Inbound",
                "access": "Allow",
                "protocol": "*",
                "sourceApplicationSecurityGroups": group,
                "destinationApplicationSecurityGroups": group,
                "sourcePortRange": "*",
                "destinationPortRange": "*",
            }});
            match self.put_followed(&url, &rule).await {
                Ok(()) => return Ok(()),
                // Another rule (another gang's, or an operator's) has it.
                Err(e) if e.code == "SecurityRuleConflict" => continue,
                Err(e) => return Err(e.into_compute()),
            }
        }
        Err(Error::Capacity(format!(
            "no free priority for the gang's rule in the agents' NSG after {PRIORITY_TRIES} tries (at most {span} gangs at once)"
        )))
    }

    /// Makes live gang `base`'s rule again if it is gone: a deployment of the
    /// template replaces the NSG's rules with its own, and the nodes of a gang
    /// running meanwhile would stop reaching each other.
    async fn heal_rule(&self, nsg: &str, base: &str) -> Result<(), Error> {
        let url = self.rule_url(nsg, base);
        match self.call(reqwest_aws::Method::GET, &url, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.status == 404 => {
                warn!(vm = %base, "the gang's rule is gone from the agents' NSG; making it again");
                self.put_rule(nsg, base).await
            }
            Err(e) => Err(e.into_compute()),
        }
    }

    /// Deletes what gang `base` has besides its VMs: its rule first (it names the
    /// application security group), then the groups. ARM refuses to delete a
    /// group while a node that is still being deleted is in it; returns whether
    /// everything is gone.
    async fn drop_gang_parts(&self, base: &str) -> Result<bool, Error> {
        let mut urls = Vec::new();
        if let Some(nsg) = &self.cfg.nsg {
            urls.push(self.rule_url(nsg, base));
        }
        urls.extend(GangPart::ALL.map(|part| self.part_url(part, base)));
        let mut all = true;
        for url in urls {
            match self.call(reqwest_aws::Method::DELETE, &url, None).await {
                Ok(_) => {}
                Err(e) if e.status == 404 => {}
                // In use: ARM answers 409 for a proximity group and 400 for an
                // application security group still on a NIC.
                Err(e) if matches!(e.status, 400 | 409) => {
                    info!(vm = %base, code = %e.code, error = %e.message, "a part of the gang cannot be deleted yet");
                    all = false;
                }
                Err(e) => return Err(e.into_compute()),
            }
        }
        Ok(all)
    }

    /// Allocates `req`'s gang of `resources.nodes` VMs, all or none.
    async fn allocate_gang(&self, req: &AllocateRequest, size: &str) -> Result<Vm, Error> {
        let nodes = req.resources.nodes;
        let base = vm_name(&self.cfg.stack, &req.key);
        // Rank 0's record is written before any node is asked for: a release that
        // comes later reads the gang's size there and releases every node.
        let mut reserved = false;
        for _ in 0..RACES {
            match self.record(&base).await? {
                // A released gang makes nothing, not even its group.
                Some((r, _)) if r.stage == Stage::Released => {
                    return Ok(gang_vm(&base, &req.key, nodes, &[]));
                }
                Some(_) => reserved = true,
                None => {
                    reserved = self
                        .put_record(&base, &self.new_record(req), None)
                        .await?
                        .is_some();
                }
            }
            if reserved {
                break;
            }
        }
        if !reserved {
            return Err(Error::Unavailable(
                format!("VM {base}: its record kept changing under this allocation").into(),
            ));
        }
        self.put_gang_parts(req, &base).await?;
        let tries = (0..nodes).map(|rank| self.allocate_node(req, &base, size, rank));
        let results = futures::future::join_all(tries).await;
        let miss = results.iter().find_map(|r| match r {
            Err(Error::Capacity(why)) => Some(why.clone()),
            _ => None,
        });
        if let Some(why) = miss {
            // No node runs alone: the ones made go, and may be made again by the
            // attempt's next try.
            for rank in 0..nodes {
                self.unmake(&respawn_core::ports::compute::node_id(&base, rank))
                    .await?;
            }
            info!(job_id = %req.key.job, attempt = req.key.attempt, vm = %base, nodes, %why, "no capacity for the whole gang; its nodes deleted");
            return Err(Error::Capacity(format!("a gang of {nodes} VMs: {why}")));
        }
        let vms = results
            .into_iter()
            .map(|r| r.map(Some))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(gang_vm(&base, &req.key, nodes, &vms))
    }

    /// Node `rank` of `req`'s gang (rank 0: its only VM, or the gang's first).
    /// Every step re-reads what it acts on: a release, or another dispatcher of the
    /// same attempt, may have moved the record since.
    async fn allocate_node(
        &self,
        req: &AllocateRequest,
        base: &str,
        size: &str,
        rank: u32,
    ) -> Result<Vm, Error> {
        let name = respawn_core::ports::compute::node_id(base, rank);
        for _ in 0..RACES {
            if let Some(vm) = self.allocate_once(req, &name, size, rank).await? {
                return Ok(vm);
            }
        }
        Err(Error::Unavailable(
            format!("VM {name}: its record kept changing under this allocation").into(),
        ))
    }

    /// Takes back node `name` of a gang that did not come up whole: recorded as
    /// never made (unless released meanwhile), then deleted.
    async fn unmake(&self, name: &str) -> Result<(), Error> {
        for _ in 0..RACES {
            let Some((r, version)) = self.record(name).await? else {
                return Ok(());
            };
            if r.stage != Stage::Released {
                let unmade = Record {
                    stage: Stage::Putting,
                    made: false,
                    ..r
                };
                if self
                    .put_record(name, &unmade, Some(&version))
                    .await?
                    .is_none()
                {
                    continue;
                }
            }
            return self.delete_vm(name).await.map_err(ArmError::into_compute);
        }
        Err(Error::Unavailable(
            format!("VM {name}: its record kept changing while the gang was undone").into(),
        ))
    }

    /// The private address of VM `name`'s primary NIC, once it has one.
    async fn private_ip(&self, name: &str) -> Result<Option<String>, Error> {
        let Some(vm) = self.get_vm(name).await.map_err(ArmError::into_compute)? else {
            return Ok(None);
        };
        let nic = vm
            .properties
            .network_profile
            .as_ref()
            .and_then(|p| p.network_interfaces.first())
            .map(|n| n.id.clone());
        let Some(nic) = nic.filter(|id| id.starts_with("/subscriptions/")) else {
            return Ok(None);
        };
        let url = format!(
            "{}{nic}?api-version={NETWORK_API_VERSION}",
            self.cfg.endpoint
        );
        let (_, _, body) = self
            .call(reqwest_aws::Method::GET, &url, None)
            .await
            .map_err(ArmError::into_compute)?;
        let nic: Nic = serde_json::from_str(&body)
            .map_err(|e| Error::Unavailable(format!("GET {nic}: {e}").into()))?;
        Ok(nic
            .properties
            .ip_configurations
            .into_iter()
            .find_map(|c| c.properties.private_ip_address))
    }

    /// The `PUT` body of a VM: Spot with `spot`'s price cap (`Some(None)`: the
    /// default cap), else a regular one.
    fn vm_body(
        &self,
        name: &str,
        size: &str,
        tags: Value,
        script: &str,
        spot: Option<Option<f64>>,
    ) -> Value {
        // Never used: the NSG admits no SSH, and no one keeps it. ARM wants either a
        // password or a key for a Linux VM.
        let password = format!("Rs1!{}", hex::encode(rand::random::<[u8; 24]>()));
        let mut properties = json!({
            "hardwareProfile": {"vmSize": size},
            "storageProfile": {
                "imageReference": self.cfg.image.reference(),
                "osDisk": {
                    "createOption": "FromImage",
                    "deleteOption": "Delete",
                    "managedDisk": {"storageAccountType": "StandardSSD_LRS"},
                },
            },
            "osProfile": {
                "computerName": name,
                "adminUsername": "respawn",
                "adminPassword": password,
                "customData": base64::engine::general_purpose::STANDARD.encode(script),
                "linuxConfiguration": {"disablePasswordAuthentication": false},
            },
            "networkProfile": {
                "networkApiVersion": "2020-11-01",
                "networkInterfaceConfigurations": [{
                    "name": format!("{name}-nic"),
                    "properties": {
                        "primary": true,
                        "deleteOption": "Delete",
                        "ipConfigurations": [{
                            "name": "ipconfig",
                            "properties": {"subnet": {"id": self.cfg.subnet}},
                        }],
                    },
                }],
            },
            "securityProfile": {"encryptionAtHost": false},
            "diagnosticsProfile": {"bootDiagnostics": {"enabled": true}},
        });
        if let Some(max_price) = spot {
            properties["priority"] = json!("Spot");
            properties["evictionPolicy"] = json!("Delete");
            properties["billingProfile"] =
                json!({"maxPrice": max_price.unwrap_or(self.cfg.max_price)});
        } else {
            properties["priority"] = json!("Regular");
        }
        let mut body = json!({
            "location": self.cfg.location,
            "tags": tags,
            "properties": properties,
        });
        if let Some(identity) = &self.cfg.agent_identity {
            body["identity"] = json!({
                "type": "UserAssigned",
                "userAssignedIdentities": {identity: {}},
            });
        }
        body
    }
}

#[async_trait]
impl Compute for ArmCompute {
    async fn allocate(&self, req: &AllocateRequest) -> Result<Vm, Error> {
        // Every pool setting is checked, reusable pools or not (a pool the job
        // names must exist and fit it).
        if let Some(pool) = PoolSpec::choose(&self.cfg.pools, req)?.filter(|p| p.reuse)
            && let Some(pools) = &self.pools
        {
            return pools.allocate(self, req, pool).await;
        }
        let size = self.cfg.sizes.choose(&req.resources, &self.cfg.cpu_size)?;
        if req.resources.nodes > 1 {
            return self.allocate_gang(req, &size).await;
        }
        self.allocate_node(req, &vm_name(&self.cfg.stack, &req.key), &size, 0)
            .await
    }

    async fn release(&self, key: &AllocationKey) -> Result<(), Error> {
        // An attempt placed in a pool has no VM of its own: no record to write
        // and no VM to delete.
        if let Some(pools) = &self.pools
            && pools.release(key).await?
        {
            return Ok(());
        }
        let base = vm_name(&self.cfg.stack, key);
        let nodes = self.release_vm(key, &base, 1).await?;
        if nodes > 1 {
            for rank in 1..nodes {
                let node = respawn_core::ports::compute::node_id(&base, rank);
                self.release_vm(key, &node, nodes).await?;
            }
            // What ARM refuses now, sweep_groups deletes later.
            if !self.drop_gang_parts(&base).await? {
                info!(job_id = %key.job, attempt = key.attempt, vm = %base, "the gang's groups are left to the reconcile timer");
            }
        }
        Ok(())
    }

    async fn describe(&self, key: &AllocationKey) -> Result<Option<Vm>, Error> {
        if let Some(pools) = &self.pools
            && let Some(vm) = pools.describe(self, key).await?
        {
            return Ok(Some(vm));
        }
        let base = vm_name(&self.cfg.stack, key);
        let (nodes, vm) = self.describe_vm(key, &base).await?;
        if nodes <= 1 {
            return Ok(vm);
        }
        let mut vms = vec![vm];
        for rank in 1..nodes {
            let node = respawn_core::ports::compute::node_id(&base, rank);
            vms.push(self.describe_vm(key, &node).await?.1);
        }
        Ok(Some(gang_vm(&base, key, nodes, &vms)))
    }

    async fn list(&self) -> Result<Vec<Vm>, Error> {
        let all = self.stack_vms().await?;
        // A pool VM (no job tags) is listed by its slot, as the VM of the attempt
        // it runs; a gang once, live while any node is.
        let mut vms = Vec::new();
        let mut gangs: std::collections::BTreeMap<AllocationKey, Vec<(u32, Vm)>> =
            Default::default();
        for v in &all {
            let Some(vm) = v.to_vm() else { continue };
            if vm.nodes > 1 {
                gangs
                    .entry(vm.key.clone())
                    .or_default()
                    .push((v.rank(), vm));
            } else {
                vms.push(vm);
            }
        }
        vms.extend(gangs.into_values().filter_map(crate::cloudvm::listed_gang));
        if let Some(pools) = &self.pools {
            let listed = all.iter().map(|v| (v.name.clone(), v.state())).collect();
            vms.extend(pools.list(self, &listed).await?);
        }
        Ok(vms)
    }

    async fn roster(&self, key: &AllocationKey) -> Result<Option<Vec<String>>, Error> {
        let base = vm_name(&self.cfg.stack, key);
        let nodes = match self.record(&base).await? {
            Some((r, _)) if r.nodes > 1 && r.stage != Stage::Released => r.nodes,
            _ => return Ok(None),
        };
        let mut hosts = Vec::with_capacity(nodes as usize);
        for rank in 0..nodes {
            let node = respawn_core::ports::compute::node_id(&base, rank);
            match self.private_ip(&node).await? {
                Some(ip) => hosts.push(ip),
                None => return Ok(None),
            }
        }
        Ok(Some(hosts))
    }

    async fn orders(&self, vm: &str) -> Result<Orders, Error> {
        match &self.pools {
            Some(pools) => pools.orders(vm).await,
            None => Ok(Orders::Retire),
        }
    }
}

impl ArmCompute {
    /// Marks VM `name` of `key` released and deletes it; the gang's size its record
    /// gave (`nodes` where it had none).
    async fn release_vm(&self, key: &AllocationKey, name: &str, nodes: u32) -> Result<u32, Error> {
        let name = name.to_owned();
        // Marked first (conditionally: no allocation's write is lost), so that an
        // allocation that comes later makes nothing, or deletes what it made.
        let mut marked = false;
        let mut made = false;
        let mut size = nodes;
        for _ in 0..RACES {
            let current = self.record(&name).await?;
            made = current.as_ref().is_some_and(|(r, _)| r.made);
            if let Some((r, _)) = &current {
                size = r.nodes;
            }
            if current
                .as_ref()
                .is_some_and(|(r, _)| r.stage == Stage::Released)
            {
                marked = true;
                break;
            }
            let released = Record {
                job: key.job.clone(),
                attempt: key.attempt,
                stage: Stage::Released,
                made: current.as_ref().is_some_and(|(r, _)| r.made),
                spot: current.as_ref().is_some_and(|(r, _)| r.spot),
                created_at: current
                    .as_ref()
                    .map_or_else(|| Timestamp(crate::bands::now_ms()), |(r, _)| r.created_at),
                nodes: size,
            };
            if self
                .put_record(&name, &released, current.as_ref().map(|(_, v)| v))
                .await?
                .is_some()
            {
                marked = true;
                break;
            }
        }
        if !marked {
            return Err(Error::Unavailable(
                format!("VM {name}: its record kept changing under this release").into(),
            ));
        }
        // Deleted even when no record says it was made: a VM found unrecorded
        // counts as made.
        self.delete_vm(&name)
            .await
            .map_err(ArmError::into_compute)?;
        if made {
            info!(job_id = %key.job, attempt = key.attempt, vm = %name, "VM deleted");
        }
        Ok(size)
    }

    /// VM `name` of `key` as ARM and its record tell, and the gang's size.
    async fn describe_vm(
        &self,
        key: &AllocationKey,
        name: &str,
    ) -> Result<(u32, Option<Vm>), Error> {
        let name = name.to_owned();
        let record = self.record(&name).await?.map(|(r, _)| r);
        let nodes = record.as_ref().map_or(1, |r| r.nodes);
        let found = self.get_vm(&name).await.map_err(ArmError::into_compute)?;
        let mut vm = found.as_ref().and_then(ArmVm::to_vm);
        match (&record, &mut vm) {
            (Some(r), Some(vm)) if r.stage == Stage::Released => vm.state = VmState::Terminated,
            (Some(r), None) if r.made => {
                let gone = Vm {
                    id: name,
                    key: key.clone(),
                    state: VmState::Terminated,
                    spot: r.spot,
                    nodes: 1,
                    created_at: r.created_at,
                };
                return Ok((nodes, Some(gone)));
            }
            _ => {}
        }
        Ok((nodes, vm))
    }
}

impl ArmCompute {
    /// Every VM of the resource group that is this stack's.
    async fn stack_vms(&self) -> Result<Vec<ArmVm>, Error> {
        let mut url = Some(format!("{}?api-version={API_VERSION}", self.vms_url()));
        let mut vms = Vec::new();
        while let Some(next) = url.take() {
            let (_, _, body) = self
                .call(reqwest_aws::Method::GET, &next, None)
                .await
                .map_err(ArmError::into_compute)?;
            let page: VmList = serde_json::from_str(&body)
                .map_err(|e| Error::Unavailable(format!("VM list: {e}").into()))?;
            vms.extend(
                page.value
                    .into_iter()
                    .filter(|v| v.tags.get(TAG_STACK) == Some(&self.cfg.stack)),
            );
            url = page.next_link.filter(|l| !l.is_empty());
        }
        Ok(vms)
    }

    /// Keeps every warm pool's size; run on the reconcile function's schedule.
    pub async fn tend_pools(&self) -> Result<(), Error> {
        match &self.pools {
            Some(pools) => pools.tend(self).await,
            None => Ok(()),
        }
    }

    /// Deletes what released gangs left: their rules, application security
    /// groups and proximity placement groups. A release asks for their deletion at
    /// once, which ARM refuses while the nodes' own deletions run; the reconcile
    /// timer comes back for them here. Returns how many gangs' parts all went.
    pub async fn sweep_groups(&self) -> Result<usize, Error> {
        #[derive(Deserialize)]
        struct Group {
            name: String,
            #[serde(default)]
            tags: std::collections::BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Groups {
            #[serde(default)]
            value: Vec<Group>,
            #[serde(default)]
            next_link: Option<String>,
        }
        let mut bases = std::collections::BTreeSet::new();
        for part in GangPart::ALL {
            let mut url = Some(format!(
                "{}/subscriptions/{}/resourceGroups/{}/providers/{}?api-version={}",
                self.cfg.endpoint,
                self.cfg.subscription,
                self.cfg.resource_group,
                part.resource_type(),
                part.api_version()
            ));
            while let Some(next) = url.take() {
                let (_, _, body) = self
                    .call(reqwest_aws::Method::GET, &next, None)
                    .await
                    .map_err(ArmError::into_compute)?;
                let page: Groups = serde_json::from_str(&body).map_err(|e| {
                    Error::Unavailable(format!("{}: {e}", part.resource_type()).into())
                })?;
                bases.extend(page.value.into_iter().filter_map(|g| {
                    let base = g.name.strip_suffix(part.suffix())?;
                    (g.tags.get(TAG_STACK) == Some(&self.cfg.stack)).then(|| base.to_owned())
                }));
                url = page.next_link.filter(|l| !l.is_empty());
            }
        }
        let mut gone = 0;
        for base in bases {
            let released = self
                .record(&base)
                .await?
                .is_some_and(|(r, _)| r.stage == Stage::Released);
            if released {
                if self.drop_gang_parts(&base).await? {
                    gone += 1;
                }
            } else if let Some(nsg) = &self.cfg.nsg {
                self.heal_rule(nsg, &base).await?;
            }
        }
        Ok(gone)
    }
}

/// Pool VMs are VMs tagged with their pool and VM name; see [`crate::vmpool`].
#[async_trait]
impl PoolCloud for ArmCompute {
    async fn launch(&self, pool: &PoolSpec, vm: &str) -> Result<Member, Error> {
        let name = pool_vm_name(&self.cfg.stack, vm);
        if let Some(found) = self.get_vm(&name).await.map_err(ArmError::into_compute)? {
            if !found.creation_failed() {
                return Ok(found.to_member());
            }
            // Its creation failed: it goes, and the next try makes it anew.
            self.delete_vm(&name)
                .await
                .map_err(ArmError::into_compute)?;
            return Err(Error::Unavailable(
                format!("pool VM {name}: its creation had failed; deleted").into(),
            ));
        }
        if self.cfg.agent.api.is_empty() {
            return Err(Error::Unavailable(
                "no API address for agents to ask for work (RESPAWN_API_URL)".into(),
            ));
        }
        let size = self
            .cfg
            .sizes
            .choose(&pool_resources(pool), &self.cfg.cpu_size)?;
        let tags = json!({
            TAG_STACK: self.cfg.stack,
            TAG_POOL: pool.name,
            TAG_VM: vm,
        });
        let script = pool_custom_data(&self.cfg.agent, vm);
        let body = self.vm_body(&name, &size, tags, &script, pool.spot.then_some(None));
        let (_, operation, answer) = self
            .call(reqwest_aws::Method::PUT, &self.vm_url(&name), Some(&body))
            .await
            .map_err(|e| {
                if e.is_capacity() {
                    info!(pool = %pool.name, vm, name = %name, code = %e.code, "no capacity for a pool VM");
                }
                e.into_compute()
            })?;
        let mut member = serde_json::from_str::<ArmVm>(&answer)
            .map(|v| v.to_member())
            .unwrap_or(Member {
                id: name.clone(),
                vm: Some(vm.to_owned()),
                state: VmState::Requested,
                launched: None,
                lingers: true,
            });
        if let Some(url) = operation {
            match self.follow(&url).await {
                Some(Ok(())) => member.state = VmState::Running,
                Some(Err(e)) => {
                    warn!(pool = %pool.name, vm, name = %name, code = %e.code, error = %e.message, "pool VM creation failed; deleting it");
                    if let Err(d) = self.delete_vm(&name).await {
                        warn!(pool = %pool.name, vm, name = %name, error = %d.message, "cannot delete the failed pool VM; tending deletes it");
                    }
                    return Err(e.into_compute());
                }
                None => {}
            }
        }
        Ok(member)
    }

    async fn state(&self, id: &str) -> Result<Option<VmState>, Error> {
        Ok(self
            .get_vm(id)
            .await
            .map_err(ArmError::into_compute)?
            .map(|v| v.state()))
    }

    async fn members(&self, pool: &str) -> Result<Vec<Member>, Error> {
        Ok(self
            .stack_vms()
            .await?
            .iter()
            .filter(|v| v.tags.get(TAG_POOL).is_some_and(|p| p == pool))
            .map(ArmVm::to_member)
            .collect())
    }

    async fn terminate(&self, ids: &[&str]) -> Result<(), Error> {
        for id in ids {
            self.delete_vm(id).await.map_err(ArmError::into_compute)?;
            info!(vm = %id, "pool VM deleted");
        }
        Ok(())
    }

    fn unseen_grace(&self) -> Duration {
        // A VM ARM does not find after its PUT was answered is gone.
        Duration::ZERO
    }
}

/// What a pool's VMs are made for.
fn pool_resources(pool: &PoolSpec) -> Resources {
    Resources {
        gpus: pool.gpus,
        gpu_type: pool.gpu_type.clone(),
        ..Resources::default()
    }
}

/// The ARM name of pool VM `vm`: `<stack>-p<16 hex>` (pool names may be long;
/// ARM's are at most 64 characters).
pub fn pool_vm_name(stack: &str, vm: &str) -> String {
    let digest = Sha256::digest(format!("{stack}\npool vm\n{vm}"));
    format!("{stack}-p{}", &hex::encode(digest)[..16])
}

/// What Azure's first-boot script does its own way: the VM's name from the
/// instance metadata, evictions from Scheduled Events; the wire server (the host
/// agent's address) is root's too.
const AZURE: Cloud<'static> = Cloud {
    vm_id: r#"vm=$(curl -sf --retry 5 -H 'Metadata: true' "$imds/metadata/instance/compute/name?api-version=2021-02-01&format=text")"#,
    notice: r#"--scheduled-events "$imds/metadata/scheduledevents?api-version=2020-07-01""#,
    root_only: &["169.254.169.254", "168.63.129.16"],
    resource: "cloud.provider=azure,cloud.platform=azure_vm",
};

/// The script cloud-init runs at first boot ([`boot_script`]) for `key`'s
/// attempt. The VM's managed identity (the job container, nothing else) is
/// behind the instance metadata, which only root reaches.
/// With `gang` (rank, nodes), node `rank` of a multi-node attempt: its agent asks
/// the broker for its peers.
pub fn custom_data(agent: &AgentBoot, key: &AllocationKey, gang: Option<(u32, u32)>) -> String {
    let mut role = format!("--job {} --attempt {}", key.job, key.attempt);
    let mut what = format!("job {}, attempt {}", key.job, key.attempt);
    if let Some((rank, nodes)) = gang {
        role.push_str(&format!(" --rank {rank} --nodes {nodes}"));
        what.push_str(&format!(", node {rank} of {nodes}"));
    }
    boot_script(
        agent,
        &AZURE,
        &what,
        &agent.attempt_key.credential(&key.job, key.attempt),
        &role,
    )
}

/// The first-boot script of pool VM `vm`: as [`custom_data`], but the credential
/// is the VM's, and the agent asks the API for attempt after attempt until it is
/// told to retire.
pub fn pool_custom_data(agent: &AgentBoot, vm: &str) -> String {
    boot_script(
        agent,
        &AZURE,
        &format!("pool vm {vm}"),
        &agent.attempt_key.vm_credential(vm),
        "--pool-api",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_errors_are_told_from_refusals() {
        let e = |status, code: &str, message: &str| ArmError {
            status,
            code: code.into(),
            message: message.into(),
        };
        for code in [
            "SkuNotAvailable",
            "OverconstrainedAllocationRequest",
            "AllocationFailed",
            "ZonalAllocationFailed",
        ] {
            assert!(
                matches!(e(409, code, "").into_compute(), Error::Capacity(_)),
                "{code}"
            );
        }
        let quota = e(
            409,
            "OperationNotAllowed",
            "Operation could not be completed as it results in exceeding approved LowPriorityCores quota.",
        );
        assert!(matches!(quota.into_compute(), Error::Capacity(_)));
        // A capacity code among the details.
        let nested = e(200, "Conflict", " [AllocationFailed: no room]");
        assert!(matches!(nested.into_compute(), Error::Capacity(_)));
        assert!(matches!(
            e(400, "InvalidParameter", "bad vmSize").into_compute(),
            Error::Invalid(_)
        ));
        for status in [0, 401, 403, 429, 500, 503] {
            assert!(
                matches!(e(status, "X", "").into_compute(), Error::Unavailable(_)),
                "{status}"
            );
        }
    }

    #[test]
    fn a_vm_name_is_the_attempts_and_fits_azure() {
        let job = JobId::generate(Timestamp(1));
        let k = |attempt| AllocationKey {
            job: job.clone(),
            attempt,
        };
        let name = vm_name("respawn", &k(1));
        assert_eq!(name, vm_name("respawn", &k(1)));
        assert_ne!(name, vm_name("respawn", &k(2)));
        assert_ne!(name, vm_name("other", &k(1)));
        assert!(name.len() <= 64 && name.starts_with("respawn-"));
    }

    #[test]
    fn images_parse() {
        assert_eq!(
            "Canonical:ubuntu-24_04-lts:server:latest".parse::<Image>(),
            Ok(Image::Marketplace {
                publisher: "Canonical".into(),
                offer: "ubuntu-24_04-lts".into(),
                sku: "server".into(),
                version: "latest".into()
            })
        );
        assert!(matches!(
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/images/i"
                .parse::<Image>(),
            Ok(Image::Id(_))
        ));
        assert!("ubuntu".parse::<Image>().is_err());
        assert!("a::c:d".parse::<Image>().is_err());
    }
}

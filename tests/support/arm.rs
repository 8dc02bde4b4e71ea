//! A harness for the part of Azure Resource Manager respawn uses, built from its
//! documented REST contract (nothing emulates ARM): virtual machines created,
//! read, listed and deleted (`PUT`/`GET`/`DELETE …/virtualMachines/{name}`,
//! `api-version` required), long-running operations behind
//! `Azure-AsyncOperation`, error bodies `{"error": {"code", "message",
//! "details"}}`, throttling (429 with `Retry-After`), and Bearer tokens from App
//! Service's managed identity endpoint (`IDENTITY_ENDPOINT`, `X-IDENTITY-HEADER`),
//! the one `azure_identity` asks inside a function app.
//!
//! Proximity placement groups and application security groups (`PUT`/`GET`/
//! `DELETE` one, `GET` the list; a VM may name one that exists, which cannot be
//! deleted while a VM, or for an application security group a security rule,
//! names it), the security rules of one network security group ([`Arm::nsg`]:
//! `PUT`/`GET`/`DELETE …/securityRules/{name}`, a long-running operation each;
//! two inbound rules with one priority are a `SecurityRuleConflict`) and each
//! VM's network interface (`GET …/networkInterfaces/{name}`, its private address
//! loopback, where the harness's VMs meet) are there too.
//!
//! With [`Boot`], every VM created boots: its custom data runs on this machine
//! (as cloud-init would run it) with an instance metadata service of its own —
//! the VM's name and Scheduled Events — and shims for `iptables` and `shutdown`.
//! [`Arm::preempt`] schedules a `Preempt` event as Azure does before evicting a
//! Spot VM; once the agent acknowledges it (or its `NotBefore` passes) the VM is
//! evicted: its process group killed and the VM deleted (`evictionPolicy:
//! Delete`).

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use base64::Engine;
use serde_json::{Value, json};

pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000000aa";
pub const RESOURCE_GROUP: &str = "respawn-rg";
pub const LOCATION: &str = "westeurope";
/// What `X-IDENTITY-HEADER` must carry (`IDENTITY_HEADER`).
pub const IDENTITY_HEADER: &str = "harness-identity-secret";

/// What the next VM creation meets, in order.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429, `Retry-After` seconds.
    Throttle(u64),
    /// The `PUT` refused at once: status, code (e.g. `SkuNotAvailable`), message.
    Refuse(u16, String, String),
    /// The `PUT` accepted, its operation then failing with this code (e.g.
    /// `AllocationFailed`).
    FailLater(String),
}

/// How long a deleted VM stays `Deleting` (GETs that still find it), as on Azure,
/// where a delete takes minutes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlowDelete(pub u32);

/// How VMs boot, when they do.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Folders put first on the VM's `PATH` (respawn-agent's, the trainer's).
    pub path: Vec<PathBuf>,
    /// What every VM's processes get besides the custom data (the storage
    /// endpoint a managed identity would reach, …).
    pub env: Vec<(String, String)>,
    /// Appended to the agent's command line (`RESPAWN_AGENT_ARGS`).
    pub agent_args: String,
}

#[derive(Debug)]
struct VmRecord {
    body: Value,
    provisioning: String,
    created_at: u64,
    events: Vec<Value>,
    child: Option<Child>,
}

#[derive(Debug)]
struct Operation {
    /// Polls left before it ends.
    polls: u32,
    vm: String,
    failure: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    vms: BTreeMap<String, VmRecord>,
    ops: BTreeMap<String, Operation>,
    faults: VecDeque<Fault>,
    token: String,
    /// Every VM ever created (names), in order.
    created: Vec<String>,
    deleted: Vec<String>,
    evicted: Vec<String>,
    /// `(vm, event id)` of acknowledged Scheduled Events.
    acked: Vec<(String, String)>,
    /// Requests answered 429.
    throttled: u32,
    /// Every `PUT` body, in order.
    puts: Vec<Value>,
    page_size: usize,
    next_op: u64,
    /// GETs a deleted VM survives (see [`SlowDelete`]).
    slow_delete: u32,
    /// VMs being deleted, with the GETs left before they are gone.
    deleting: BTreeMap<String, u32>,
    /// Proximity placement and application security groups, by kind and name,
    /// with their `PUT` bodies.
    groups: BTreeMap<(Group, String), Value>,
    /// Every group ever deleted.
    groups_deleted: Vec<(Group, String)>,
    /// The NSG's security rules, by name, with their `PUT` bodies.
    rules: BTreeMap<String, Value>,
    /// Rule `PUT`s left to answer `SecurityRuleConflict` whatever their priority
    /// (as if another broker had just taken it).
    rule_conflicts: u32,
}

/// The kinds of group a VM may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// `Microsoft.Compute/proximityPlacementGroups`.
    Placement,
    /// `Microsoft.Network/applicationSecurityGroups`.
    Peers,
}

impl Group {
    fn id(self, name: &str) -> String {
        let provider = match self {
            Group::Placement => "Microsoft.Compute/proximityPlacementGroups",
            Group::Peers => "Microsoft.Network/applicationSecurityGroups",
        };
        format!(
            "/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/{provider}/{name}"
        )
    }

    /// The ids of this kind of group `vm` names.
    fn named_by(self, vm: &Value) -> Vec<String> {
        let p = &vm["properties"];
        let ids: Vec<&Value> = match self {
            Group::Placement => vec![&p["proximityPlacementGroup"]["id"]],
            Group::Peers => p["networkProfile"]["networkInterfaceConfigurations"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|n| {
                    n["properties"]["ipConfigurations"]
                        .as_array()
                        .into_iter()
                        .flatten()
                })
                .flat_map(|c| {
                    c["properties"]["applicationSecurityGroups"]
                        .as_array()
                        .into_iter()
                        .flatten()
                })
                .map(|g| &g["id"])
                .collect(),
        };
        ids.into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// Group `name` of this kind, from its id, if the id is of this kind here.
    fn name_of(self, id: &str) -> Option<&str> {
        id.strip_prefix(&self.id(""))
            .filter(|n| !n.is_empty() && !n.contains('/'))
    }
}

const NSG_NAME: &str = "agents-nsg";

type Shared = Arc<Mutex<Inner>>;

/// The harness, serving on a port of its own until dropped (VMs' processes are
/// killed then).
#[derive(Debug, Clone)]
pub struct Arm {
    pub url: String,
    inner: Shared,
    boot: Option<Boot>,
    root: Arc<tempfile::TempDir>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"error": {"code": code, "message": message, "details": []}}).to_string(),
    )
        .into_response()
}

fn json_response(status: StatusCode, body: Value, headers: &[(&'static str, String)]) -> Response {
    let mut r = (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response();
    for (k, v) in headers {
        r.headers_mut()
            .insert(*k, axum::http::HeaderValue::from_str(v).unwrap());
    }
    r
}

impl Arm {
    /// A harness whose VMs do not boot (the provider's contract alone).
    pub async fn start() -> Arm {
        Arm::start_with(None).await
    }

    pub async fn start_with(boot: Option<Boot>) -> Arm {
        let mut inner = Inner::default();
        inner.page_size = 2;
        let inner: Shared = Arc::new(Mutex::new(inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let root = tempfile::tempdir().unwrap();
        // As /var/lib/respawn on a VM: the workload (another uid) passes through.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let arm = Arm {
            url: url.clone(),
            inner: inner.clone(),
            boot,
            root: Arc::new(root),
        };
        let app = Router::new()
            .route("/msi/token", get(token))
            .route(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines",
                get(list),
            )
            .route(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}",
                any(vm),
            )
            .route(
                "/subscriptions/{sub}/providers/Microsoft.Compute/locations/{loc}/operations/{id}",
                get(operation),
            )
            .route(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/proximityPlacementGroups/{name}",
                any(|s, m, p, h, q, b| group(Group::Placement, s, m, p, h, q, b)),
            )
            .route(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/proximityPlacementGroups",
                get(|s, h, q| groups(Group::Placement, s, h, q)),
            )
            .route(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/applicationSecurityGroups/{name}",
                any(|s, m, p, h, q, b| group(Group::Peers, s, m, p, h, q, b)),
            )
            .route(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/applicationSecurityGroups",
                get(|s, h, q| groups(Group::Peers, s, h, q)),
            )
            .route(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/networkSecurityGroups/{nsg}/securityRules/{name}",
                any(rule),
            )
            .route(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces/{name}",
                get(nic),
            )
            .route("/vms/{name}/metadata/instance/compute/name", get(imds_name))
            .route("/vms/{name}/metadata/scheduledevents", any(scheduled_events))
            .with_state(arm.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        arm
    }

    /// The environment `azure_identity`'s managed identity credential reads in a
    /// function app.
    pub fn identity_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "IDENTITY_ENDPOINT".into(),
                format!("{}/msi/token", self.url),
            ),
            ("IDENTITY_HEADER".into(), IDENTITY_HEADER.into()),
        ]
    }

    pub fn subnet(&self) -> String {
        format!(
            "/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/virtualNetworks/agents/subnets/agents"
        )
    }

    /// The agents' network security group (a resource id).
    pub fn nsg(&self) -> String {
        format!(
            "/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/networkSecurityGroups/{NSG_NAME}"
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues what the next VM creations meet.
    pub fn fault(&self, f: Fault) {
        self.lock().faults.push_back(f);
    }

    /// Deletes from now on leave the VM `Deleting` for this many GETs.
    pub fn slow_delete(&self, d: SlowDelete) {
        self.lock().slow_delete = d.0;
    }

    /// The VMs that exist now, by name.
    pub fn vms(&self) -> Vec<String> {
        self.lock().vms.keys().cloned().collect()
    }

    /// Every VM ever created, in order.
    pub fn created(&self) -> Vec<String> {
        self.lock().created.clone()
    }

    pub fn deleted(&self) -> Vec<String> {
        self.lock().deleted.clone()
    }

    pub fn evicted(&self) -> Vec<String> {
        self.lock().evicted.clone()
    }

    pub fn throttled(&self) -> u32 {
        self.lock().throttled
    }

    /// Every `PUT` body the harness accepted or refused, in order.
    pub fn puts(&self) -> Vec<Value> {
        self.lock().puts.clone()
    }

    /// Scheduled Events acknowledged, as `(vm, event id)`.
    /// The groups of `kind` there are now, by name.
    pub fn groups(&self, kind: Group) -> Vec<String> {
        let inner = self.lock();
        inner
            .groups
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The groups of `kind` ever deleted, in order.
    pub fn groups_deleted(&self, kind: Group) -> Vec<String> {
        let inner = self.lock();
        inner
            .groups_deleted
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The NSG's security rules now, by name, as `PUT`.
    pub fn rules(&self) -> BTreeMap<String, Value> {
        self.lock().rules.clone()
    }

    /// Puts a rule there as an operator would (or a deployment's own).
    pub fn put_rule(&self, name: &str, rule: Value) {
        self.lock().rules.insert(name.to_owned(), rule);
    }

    /// Deletes a rule as a deployment of the template would (it replaces the
    /// NSG's rules with its own).
    pub fn drop_rule(&self, name: &str) {
        self.lock().rules.remove(name);
    }

    /// The next `n` rule `PUT`s meet `SecurityRuleConflict`.
    pub fn conflict_rules(&self, n: u32) {
        self.lock().rule_conflicts = n;
    }

    pub fn acked(&self) -> Vec<(String, String)> {
        self.lock().acked.clone()
    }

    /// A VM's tags.
    pub fn tags(&self, name: &str) -> Option<Value> {
        self.lock().vms.get(name).map(|v| v.body["tags"].clone())
    }

    /// Azure's eviction notice for Spot VM `name`: a `Preempt` Scheduled Event,
    /// due in `notice`. The VM is evicted when the agent acknowledges it or when
    /// it is due, whichever is first.
    pub fn preempt(&self, name: &str, notice: Duration) {
        let not_before = httpdate::fmt_http_date(SystemTime::now() + notice);
        let id = format!("evict-{name}");
        {
            let mut inner = self.lock();
            let vm = inner.vms.get_mut(name).expect("a VM to preempt");
            vm.events.push(json!({
                "EventId": id,
                "EventType": "Preempt",
                "ResourceType": "VirtualMachine",
                "Resources": [name],
                "EventStatus": "Scheduled",
                "NotBefore": not_before,
                "Description": "Virtual machine is being preempted.",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            }));
        }
        let arm = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(notice).await;
            arm.evict(&name);
        });
    }

    /// Evicts `name` now: its processes killed, the VM deleted.
    pub fn evict(&self, name: &str) {
        let mut inner = self.lock();
        if let Some(mut vm) = inner.vms.remove(name) {
            kill(&mut vm);
            inner.evicted.push(name.to_owned());
        }
    }

    /// What VM `name` printed (its custom data and agent).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// What every VM printed.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in self.lock().created.clone() {
            out.push_str(&format!("--- {name}\n{}", self.log(&name)));
        }
        out
    }

    fn boot(&self, name: &str, body: &Value) -> Option<Child> {
        let boot = self.boot.as_ref()?;
        let script = base64::engine::general_purpose::STANDARD
            .decode(body["properties"]["osProfile"]["customData"].as_str()?)
            .ok()?;
        let root = self.root.path();
        let shims = root.join("shims");
        crate::vm_shims(&shims);
        let custom = root.join(format!("{name}.custom-data"));
        std::fs::write(&custom, script).unwrap();
        let path = std::env::join_paths(
            std::iter::once(shims)
                .chain(boot.path.iter().cloned())
                .chain(std::env::split_paths(
                    &std::env::var_os("PATH").unwrap_or_default(),
                )),
        )
        .unwrap();
        let log = std::fs::File::create(root.join(format!("{name}.log"))).unwrap();
        Command::new("bash")
            .arg("-x")
            .arg(&custom)
            .env_clear()
            .env("PATH", path)
            .env("RESPAWN_IMDS", format!("{}/vms/{name}", self.url))
            .env("RESPAWN_VM_ROOT", root)
            .env("RESPAWN_AGENT_ARGS", &boot.agent_args)
            .envs(boot.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .ok()
    }
}

fn kill(vm: &mut VmRecord) {
    if let Some(c) = vm.child.as_mut() {
        let pid = nix::unistd::Pid::from_raw(-(c.id() as i32));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = c.wait();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for vm in self.vms.values_mut() {
            kill(vm);
        }
    }
}

async fn token(
    State(arm): State<Arm>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if h.get("x-identity-header").and_then(|v| v.to_str().ok()) != Some(IDENTITY_HEADER) {
        return error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "X-IDENTITY-HEADER missing or wrong",
        );
    }
    let Some(resource) = q.get("resource") else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "resource is required",
        );
    };
    // One token for the harness's life, as a managed identity's is cached.
    let token = {
        let mut inner = arm.lock();
        if inner.token.is_empty() {
            inner.token = format!("harness-token-{}", rand::random::<u64>());
        }
        inner.token.clone()
    };
    json_response(
        StatusCode::OK,
        json!({
            "access_token": token,
            "expires_on": (now_s() + 3600).to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
        &[],
    )
}

/// The request's problem with its token or api-version, if any.
fn refused(arm: &Arm, h: &HeaderMap, q: &BTreeMap<String, String>) -> Option<Response> {
    let token = arm.lock().token.clone();
    let auth = h.get("authorization").and_then(|v| v.to_str().ok());
    if token.is_empty() || auth != Some(&format!("Bearer {token}")) {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing or invalid.",
        ));
    }
    if !q.contains_key("api-version") {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    }
    None
}

fn vm_json(arm: &Arm, name: &str, v: &VmRecord) -> Value {
    let mut properties = v.body["properties"].clone();
    properties["provisioningState"] = json!(v.provisioning);
    properties["timeCreated"] = json!(
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(v.created_at))
            .to_string()
    );
    if let Some(os) = properties
        .get_mut("osProfile")
        .and_then(Value::as_object_mut)
    {
        // ARM never returns secrets or custom data.
        os.remove("adminPassword");
        os.remove("customData");
    }
    // The NICs ARM made from the network interface configurations.
    properties["networkProfile"]["networkInterfaces"] = json!([{
        "id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/networkInterfaces/{name}-nic-7f3a"),
        "properties": {"primary": true},
    }]);
    json!({
        "name": name,
        "id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Compute/virtualMachines/{name}"),
        "type": "Microsoft.Compute/virtualMachines",
        "location": v.body["location"],
        "tags": v.body["tags"],
        "identity": v.body.get("identity").cloned().unwrap_or(Value::Null),
        "properties": properties,
        "_harness": arm.url,
    })
}

/// What is wrong with a VM's `PUT` body, by the documented schema (the fields
/// respawn must send).
fn invalid(body: &Value) -> Option<String> {
    let p = &body["properties"];
    if !body["location"].is_string() {
        return Some("location is required".into());
    }
    if !p["hardwareProfile"]["vmSize"].is_string() {
        return Some("properties.hardwareProfile.vmSize is required".into());
    }
    if !p["storageProfile"]["imageReference"].is_object() {
        return Some("properties.storageProfile.imageReference is required".into());
    }
    let data = p["osProfile"]["customData"].as_str().unwrap_or("");
    if base64::engine::general_purpose::STANDARD
        .decode(data)
        .is_err()
        || data.len() > 87380
    {
        return Some(
            "properties.osProfile.customData must be base64, at most 87380 characters".into(),
        );
    }
    if p["networkProfile"]["networkInterfaceConfigurations"]
        .as_array()
        .is_none_or(Vec::is_empty)
        && p["networkProfile"]["networkInterfaces"]
            .as_array()
            .is_none_or(Vec::is_empty)
    {
        return Some("properties.networkProfile needs a network interface".into());
    }
    match p["priority"].as_str() {
        Some("Spot" | "Low") => {
            if !matches!(p["evictionPolicy"].as_str(), Some("Delete" | "Deallocate")) {
                return Some(
                    "properties.evictionPolicy must be Delete or Deallocate for Spot VMs".into(),
                );
            }
            let price = p["billingProfile"]["maxPrice"].as_f64();
            if price.is_none_or(|m| m != -1.0 && m <= 0.0) {
                return Some("properties.billingProfile.maxPrice must be -1 or above 0".into());
            }
        }
        Some("Regular") | None => {
            if !p["evictionPolicy"].is_null() {
                return Some("properties.evictionPolicy is only for Spot VMs".into());
            }
        }
        Some(other) => {
            return Some(format!(
                "properties.priority {other:?} is not one of Regular, Low, Spot"
            ));
        }
    }
    None
}

async fn list(
    State(arm): State<Arm>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = refused(&arm, &h, &q) {
        return r;
    }
    let inner = arm.lock();
    let skip: usize = q
        .get("$skipToken")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let names: Vec<&String> = inner.vms.keys().collect();
    let page: Vec<Value> = names
        .iter()
        .skip(skip)
        .take(inner.page_size)
        .map(|n| vm_json(&arm, n, &inner.vms[*n]))
        .collect();
    let mut body = json!({ "value": page });
    if skip + inner.page_size < names.len() {
        body["nextLink"] = json!(format!(
            "{}/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Compute/virtualMachines?api-version={}&$skipToken={}",
            arm.url,
            q["api-version"],
            skip + inner.page_size
        ));
    }
    json_response(StatusCode::OK, body, &[])
}

fn new_operation(
    arm: &Arm,
    inner: &mut Inner,
    vm: &str,
    polls: u32,
    failure: Option<String>,
) -> String {
    inner.next_op += 1;
    let id = format!("op-{}", inner.next_op);
    inner.ops.insert(
        id.clone(),
        Operation {
            polls,
            vm: vm.to_owned(),
            failure,
        },
    );
    format!(
        "{}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/locations/{LOCATION}/operations/{id}?api-version=2024-07-01",
        arm.url
    )
}

async fn vm(
    State(arm): State<Arm>,
    method: Method,
    Path((sub, rg, name)): Path<(String, String, String)>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&arm, &h, &q) {
        return r;
    }
    if sub != SUBSCRIPTION || rg != RESOURCE_GROUP {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceGroupNotFound",
            &format!("Resource group '{rg}' could not be found."),
        );
    }
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!(
                "The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource group '{rg}' was not found."
            ),
        )
    };
    match method {
        Method::GET => {
            let mut inner = arm.lock();
            if let Some(left) = inner.deleting.get_mut(&name) {
                if *left == 0 {
                    inner.deleting.remove(&name);
                    inner.vms.remove(&name);
                } else {
                    *left -= 1;
                }
            }
            match inner.vms.get_mut(&name) {
                Some(v) => {
                    let mut body = vm_json(&arm, &name, v);
                    if q.get("$expand").is_some_and(|e| e == "instanceView") {
                        // The guest shut down when its custom data ended: the VM
                        // is stopped (and still billed), not gone.
                        let ended = v
                            .child
                            .as_mut()
                            .is_some_and(|c| c.try_wait().ok().flatten().is_some());
                        let power = match v.provisioning.as_str() {
                            "Succeeded" if ended => "PowerState/stopped",
                            "Succeeded" => "PowerState/running",
                            _ => "PowerState/starting",
                        };
                        body["properties"]["instanceView"] = json!({"statuses": [
                            {"code": format!("ProvisioningState/{}", v.provisioning.to_lowercase())},
                            {"code": power},
                        ]});
                    }
                    json_response(StatusCode::OK, body, &[])
                }
                None => not_found(),
            }
        }
        Method::DELETE => {
            let mut inner = arm.lock();
            if inner.slow_delete > 0
                && let Some(v) = inner.vms.get_mut(&name)
            {
                // Still there a while, Deleting; a second DELETE changes nothing.
                v.provisioning = "Deleting".into();
                kill(v);
                let polls = inner.slow_delete;
                inner.deleting.entry(name.clone()).or_insert(polls);
                if !inner.deleted.contains(&name) {
                    inner.deleted.push(name.clone());
                }
                let op = new_operation(&arm, &mut inner, &name, 0, None);
                return json_response(
                    StatusCode::ACCEPTED,
                    Value::Null,
                    &[("azure-asyncoperation", op)],
                );
            }
            match inner.vms.remove(&name) {
                Some(mut v) => {
                    kill(&mut v);
                    inner.deleted.push(name.clone());
                    let op = new_operation(&arm, &mut inner, &name, 0, None);
                    json_response(
                        StatusCode::ACCEPTED,
                        Value::Null,
                        &[("azure-asyncoperation", op)],
                    )
                }
                None => StatusCode::NO_CONTENT.into_response(),
            }
        }
        Method::PUT => {
            let Ok(body) = serde_json::from_slice::<Value>(&body) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContent",
                    "The request content was invalid and could not be deserialized.",
                );
            };
            let mut inner = arm.lock();
            inner.puts.push(body.clone());
            if inner.deleting.contains_key(&name) {
                return error(
                    StatusCode::CONFLICT,
                    "OperationNotAllowed",
                    "Operation 'PUT' is not allowed on VM while it is being deleted.",
                );
            }
            if let Some(v) = inner.vms.get(&name) {
                // A PUT of an existing VM updates it; respawn never changes one.
                return json_response(StatusCode::OK, vm_json(&arm, &name, v), &[]);
            }
            if let Some(why) = invalid(&body) {
                return error(StatusCode::BAD_REQUEST, "InvalidParameter", &why);
            }
            for kind in [Group::Placement, Group::Peers] {
                for id in kind.named_by(&body) {
                    let known = kind
                        .name_of(&id)
                        .is_some_and(|n| inner.groups.contains_key(&(kind, n.to_owned())));
                    if !known {
                        return error(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            &format!("Resource {id} not found."),
                        );
                    }
                }
            }
            let mut failure = None;
            match inner.faults.pop_front() {
                Some(Fault::Throttle(secs)) => {
                    inner.throttled += 1;
                    let mut r = error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "TooManyRequests",
                        "The request is being throttled.",
                    );
                    r.headers_mut().insert("retry-after", secs.into());
                    return r;
                }
                Some(Fault::Refuse(status, code, message)) => {
                    return error(StatusCode::from_u16(status).unwrap(), &code, &message);
                }
                Some(Fault::FailLater(code)) => failure = Some(code),
                None => {}
            }
            let record = VmRecord {
                body: body.clone(),
                provisioning: "Creating".into(),
                created_at: now_s(),
                events: Vec::new(),
                child: None,
            };
            let answer = vm_json(&arm, &name, &record);
            inner.vms.insert(name.clone(), record);
            inner.created.push(name.clone());
            let op = new_operation(&arm, &mut inner, &name, 1, failure);
            drop(inner);
            json_response(StatusCode::CREATED, answer, &[("azure-asyncoperation", op)])
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not a VM method",
        ),
    }
}

async fn group(
    kind: Group,
    State(arm): State<Arm>,
    method: Method,
    Path((sub, rg, name)): Path<(String, String, String)>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&arm, &h, &q) {
        return r;
    }
    if sub != SUBSCRIPTION || rg != RESOURCE_GROUP {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceGroupNotFound",
            "no such group",
        );
    }
    let id = kind.id(&name);
    let key = (kind, name.clone());
    let mut inner = arm.lock();
    match method {
        Method::PUT => {
            let Ok(body) = serde_json::from_slice::<Value>(&body) else {
                return error(StatusCode::BAD_REQUEST, "InvalidRequestContent", "not JSON");
            };
            if !body["location"].is_string() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "LocationRequired",
                    "location is required",
                );
            }
            let created = inner.groups.insert(key, body.clone()).is_none();
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json_response(
                status,
                json!({"id": id, "name": name, "location": body["location"], "properties": body["properties"]}),
                &[],
            )
        }
        Method::GET => match inner.groups.get(&key) {
            Some(body) => json_response(
                StatusCode::OK,
                json!({"id": id, "name": name, "properties": body["properties"]}),
                &[],
            ),
            None => error(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                &format!("{id} was not found."),
            ),
        },
        Method::DELETE => {
            let on_vm = inner
                .vms
                .values()
                .any(|v| kind.named_by(&v.body).contains(&id));
            let in_rule = inner.rules.values().any(|r| {
                [
                    "sourceApplicationSecurityGroups",
                    "destinationApplicationSecurityGroups",
                ]
                .iter()
                .flat_map(|k| r["properties"][k].as_array().into_iter().flatten())
                .any(|g| g["id"].as_str() == Some(id.as_str()))
            });
            match kind {
                Group::Placement if on_vm => {
                    return error(
                        StatusCode::CONFLICT,
                        "OperationNotAllowed",
                        "The proximity placement group cannot be deleted while virtual machines are in it.",
                    );
                }
                Group::Peers if on_vm || in_rule => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "InUseApplicationSecurityGroupCannotBeDeleted",
                        &format!(
                            "Application Security Group {name} cannot be deleted because it is referenced by IpConfiguration(s) or security rule(s)."
                        ),
                    );
                }
                _ => {}
            }
            match inner.groups.remove(&key) {
                Some(_) => {
                    inner.groups_deleted.push(key);
                    StatusCode::OK.into_response()
                }
                None => StatusCode::NO_CONTENT.into_response(),
            }
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not a group method",
        ),
    }
}

async fn groups(
    kind: Group,
    State(arm): State<Arm>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = refused(&arm, &h, &q) {
        return r;
    }
    let inner = arm.lock();
    let value: Vec<Value> = inner
        .groups
        .iter()
        .filter(|((k, _), _)| *k == kind)
        .map(|((_, name), body)| json!({"name": name, "tags": body["tags"], "properties": body["properties"]}))
        .collect();
    json_response(StatusCode::OK, json!({ "value": value }), &[])
}

/// What is wrong with a security rule's `PUT` body, by the documented schema.
fn invalid_rule(inner: &Inner, body: &Value) -> Option<(StatusCode, String, String)> {
    let bad = |code: &str, m: String| Some((StatusCode::BAD_REQUEST, code.to_owned(), m));
    let p = &body["properties"];
    let Some(priority) = p["priority"].as_u64() else {
        return bad(
            "SecurityRuleInvalidPriority",
            "properties.priority is required".into(),
        );
    };
    if !(100..=4096).contains(&priority) {
        return bad(
            "SecurityRuleInvalidPriority",
            format!(
                "Security rule has invalid Priority. Value provided: {priority} Allowed values are from 100 to 4096."
            ),
        );
    }
    for (field, allowed) in [
        ("direction", &["Inbound", "Outbound"][..]),
        ("access", &["Allow", "Deny"][..]),
        ("protocol", &["*", "Tcp", "Udp", "Icmp", "Esp", "Ah"][..]),
    ] {
        if !p[field].as_str().is_some_and(|v| allowed.contains(&v)) {
            return bad(
                "InvalidRequestFormat",
                format!("properties.{field} must be one of {allowed:?}"),
            );
        }
    }
    for side in ["source", "destination"] {
        let prefix = p[format!("{side}AddressPrefix")].is_string();
        let groups = p[format!("{side}ApplicationSecurityGroups")].as_array();
        if prefix == groups.is_some() {
            return bad(
                "InvalidRequestFormat",
                format!(
                    "exactly one of properties.{side}AddressPrefix and properties.{side}ApplicationSecurityGroups"
                ),
            );
        }
        for g in groups.into_iter().flatten() {
            let id = g["id"].as_str().unwrap_or_default();
            let known = Group::Peers
                .name_of(id)
                .is_some_and(|n| inner.groups.contains_key(&(Group::Peers, n.to_owned())));
            if !known {
                return Some((
                    StatusCode::NOT_FOUND,
                    "NotFound".into(),
                    format!("Resource {id} not found."),
                ));
            }
        }
        if !p[format!("{side}PortRange")].is_string() {
            return bad(
                "InvalidRequestFormat",
                format!("properties.{side}PortRange is required"),
            );
        }
    }
    None
}

async fn rule(
    State(arm): State<Arm>,
    method: Method,
    Path((sub, rg, nsg, name)): Path<(String, String, String, String)>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&arm, &h, &q) {
        return r;
    }
    if sub != SUBSCRIPTION || rg != RESOURCE_GROUP || nsg != NSG_NAME {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("NSG {nsg} was not found."),
        );
    }
    let mut inner = arm.lock();
    match method {
        Method::PUT => {
            let Ok(body) = serde_json::from_slice::<Value>(&body) else {
                return error(StatusCode::BAD_REQUEST, "InvalidRequestContent", "not JSON");
            };
            if let Some((status, code, message)) = invalid_rule(&inner, &body) {
                return error(status, &code, &message);
            }
            let p = &body["properties"];
            let taken = inner.rules.iter().find(|(other, r)| {
                **other != name
                    && r["properties"]["priority"] == p["priority"]
                    && r["properties"]["direction"] == p["direction"]
            });
            let clash = match (taken, inner.rule_conflicts) {
                (Some((other, _)), _) => Some(other.clone()),
                (None, 0) => None,
                (None, _) => {
                    inner.rule_conflicts -= 1;
                    Some("a-rule-made-meanwhile".into())
                }
            };
            if let Some(other) = clash {
                return error(
                    StatusCode::BAD_REQUEST,
                    "SecurityRuleConflict",
                    &format!(
                        "Security rule {name} conflicts with rule {other}. Rules cannot have the same Priority and Direction."
                    ),
                );
            }
            let created = inner.rules.insert(name.clone(), body.clone()).is_none();
            let op = new_operation(&arm, &mut inner, "", 1, None);
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json_response(
                status,
                json!({"name": name, "properties": body["properties"]}),
                &[("azure-asyncoperation", op)],
            )
        }
        Method::GET => match inner.rules.get(&name) {
            Some(body) => json_response(
                StatusCode::OK,
                json!({"name": name, "properties": body["properties"]}),
                &[],
            ),
            None => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("Security rule {name} was not found."),
            ),
        },
        Method::DELETE => match inner.rules.remove(&name) {
            Some(_) => StatusCode::OK.into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        },
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not a rule method",
        ),
    }
}

/// A VM's NIC (named `<vm>-nic-<suffix>`, as ARM names the ones it makes): its
/// private address is loopback, where the harness's VMs reach each other.
async fn nic(
    State(arm): State<Arm>,
    Path((sub, rg, name)): Path<(String, String, String)>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = refused(&arm, &h, &q) {
        return r;
    }
    let vm = name.rsplit_once("-nic-").map(|(vm, _)| vm.to_owned());
    let exists = sub == SUBSCRIPTION
        && rg == RESOURCE_GROUP
        && vm
            .as_ref()
            .is_some_and(|vm| arm.lock().vms.contains_key(vm));
    if !exists {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("NIC {name} was not found."),
        );
    }
    json_response(
        StatusCode::OK,
        json!({
            "name": name,
            "properties": {"ipConfigurations": [{
                "name": "ipconfig",
                "properties": {"privateIPAddress": "127.0.0.1", "privateIPAllocationMethod": "Dynamic"},
            }]},
        }),
        &[],
    )
}

async fn operation(
    State(arm): State<Arm>,
    Path((_sub, _loc, id)): Path<(String, String, String)>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = refused(&arm, &h, &q) {
        return r;
    }
    let mut boot_vm = None;
    let answer = {
        let mut inner = arm.lock();
        let Some(op) = inner.ops.get_mut(&id) else {
            return error(StatusCode::NOT_FOUND, "NotFound", "no such operation");
        };
        if op.polls > 0 {
            op.polls -= 1;
            json!({"name": id, "status": "InProgress", "startTime": "2026-01-01T00:00:00Z"})
        } else {
            let vm = op.vm.clone();
            let failure = op.failure.clone();
            let state = if failure.is_some() {
                "Failed"
            } else {
                "Succeeded"
            };
            if let Some(v) = inner.vms.get_mut(&vm)
                && v.provisioning == "Creating"
            {
                v.provisioning = state.into();
                if failure.is_none() {
                    boot_vm = Some((vm.clone(), v.body.clone()));
                }
            }
            match failure {
                Some(code) => json!({"name": id, "status": "Failed", "error": {
                    "code": code,
                    "message": "Allocation failed.",
                    "details": [{"code": code, "message": "Allocation failed. We do not have sufficient capacity for the requested VM size in this region."}],
                }}),
                None => json!({"name": id, "status": "Succeeded"}),
            }
        }
    };
    if let Some((name, body)) = boot_vm {
        let child = arm.boot(&name, &body);
        if let Some(v) = arm.lock().vms.get_mut(&name) {
            v.child = child;
        }
    }
    json_response(StatusCode::OK, answer, &[])
}

fn metadata(h: &HeaderMap) -> bool {
    h.get("metadata").and_then(|v| v.to_str().ok()) == Some("true")
}

async fn imds_name(State(arm): State<Arm>, Path(name): Path<String>, h: HeaderMap) -> Response {
    if !metadata(&h) {
        return (
            StatusCode::BAD_REQUEST,
            "Required metadata header not specified",
        )
            .into_response();
    }
    if arm.lock().vms.contains_key(&name) {
        name.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn scheduled_events(
    State(arm): State<Arm>,
    method: Method,
    Path(name): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if !metadata(&h) {
        return (
            StatusCode::BAD_REQUEST,
            "Required metadata header not specified",
        )
            .into_response();
    }
    match method {
        Method::GET => {
            let inner = arm.lock();
            let events = inner
                .vms
                .get(&name)
                .map(|v| v.events.clone())
                .unwrap_or_default();
            json_response(
                StatusCode::OK,
                json!({"DocumentIncarnation": events.len(), "Events": events}),
                &[],
            )
        }
        Method::POST => {
            let Ok(req) = serde_json::from_slice::<Value>(&body) else {
                return StatusCode::BAD_REQUEST.into_response();
            };
            let ids: Vec<String> = req["StartRequests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["EventId"].as_str().map(str::to_owned))
                .collect();
            let mut evict = false;
            {
                let mut inner = arm.lock();
                for id in &ids {
                    inner.acked.push((name.clone(), id.clone()));
                    evict |= id.starts_with("evict-");
                }
            }
            if evict {
                // Approved early: Azure goes ahead with the eviction.
                let arm = arm.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    arm.evict(&name);
                });
            }
            StatusCode::OK.into_response()
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

//! A [`Compute`] provider on EC2 spot instances, for the AWS deployment.
//!
//! - **One instance per job + attempt.** `RunInstances` carries a `ClientToken`
//!   derived from stack, job and attempt, so EC2 itself returns the first instance to
//!   a retried call. Not every EC2 honours it (the local emulator does not), so the
//!   attempt's instance is first looked up by its tags; should two ever exist, the
//!   oldest is kept and the others terminated.
//! - **Tags**: `respawn:stack` (which broker owns it: `list` sees only these),
//!   `respawn:job`, `respawn:attempt`, `respawn:project`, on the instance and its
//!   volumes.
//! - **Spot**: one-time spot requests that terminate on interruption (the job
//!   resumes on a new instance, from its checkpoint), `MaxPrice` from the job's
//!   placement. `InsufficientInstanceCapacity`, `SpotMaxPriceTooLow` and the spot
//!   quota errors are capacity misses: no budget spent, retried with backoff.
//! - **User data** starts the agent with its attempt's credential (see
//!   [`user_data`]); IMDSv2 is required and its hop limit is 1, so containers on the
//!   VM behind a bridge cannot reach the instance's metadata.
//! - **Multi-node attempts** (`resources.nodes` > 1): one `RunInstances` with
//!   `MinCount` = `MaxCount` = N, which EC2 fulfils whole or not at all
//!   (`InsufficientInstanceCapacity`: a capacity miss), in the stack's cluster
//!   placement group when one is configured. Every node boots the same user data;
//!   its rank is its `ami-launch-index`, and its agent asks the broker for its peers'
//!   private addresses. The gang is one VM to the broker (rank 0's instance id), gone
//!   when any node is; an interruption of any node is the attempt's.
//! - **A gang's network**: the stack's security groups admit nothing from other
//!   agents, so that no job reaches another's instance. A gang's instances also
//!   get a security group of their own, `<client token>-gang`, which admits
//!   traffic from its own members alone (its egress, too, only to them, so that it
//!   widens nothing the stack's groups restrict). It is deleted once every node is
//!   terminated, by the reconcile timer ([`Ec2Compute::sweep_groups`]): EC2 refuses
//!   while a node's network interface still exists.
//! - **Warm pools** (`RESPAWN_EC2_POOLS`): instances that run attempt after attempt,
//!   their state in the broker's state bucket; see [`crate::vmpool`].
//! - **Why the Query API**: the provider needs a dozen EC2 actions. `aws-sdk-ec2` is
//!   ~1.2 M lines (minutes and ~9 GB of memory to compile on two cores); signing the
//!   few form-encoded calls with `aws-sigv4` costs a few hundred lines here.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine;
use object_store::ObjectStore;

pub use crate::cloudvm::{AgentBoot, InstanceTypes};
use crate::cloudvm::{Cloud, boot_script};
use crate::vmpool::{Member, PoolCloud, Pools};
use respawn_core::job::JobId;
use respawn_core::pool::PoolSpec;
use respawn_core::ports::compute::{
    AllocateRequest, AllocationKey, Compute, Error, Orders, Vm, VmState,
};
use respawn_core::spec::Resources;
use respawn_core::time::Timestamp;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub const TAG_STACK: &str = "respawn:stack";
pub const TAG_JOB: &str = "respawn:job";
pub const TAG_ATTEMPT: &str = "respawn:attempt";
pub const TAG_PROJECT: &str = "respawn:project";
/// A pool VM's pool and name (it has no job or attempt tags: it runs many).
pub const TAG_POOL: &str = "respawn:pool";
pub const TAG_VM: &str = "respawn:vm";
/// A gang's size, on each of its instances (multi-node attempts only).
pub const TAG_NODES: &str = "respawn:nodes";
/// When a gang's security group was made (Unix seconds): one whose gang never
/// launched is deleted after [`UNLAUNCHED_GROUP_AGE`].
pub const TAG_CREATED: &str = "respawn:created";
/// How long a gang's security group may stand with no instance of its attempt
/// (a launch that never came: the broker died between the two calls, or the
/// attempt went) before the reconcile timer deletes it. Far longer than the
/// moment between the two calls, and than `DescribeInstances`'s lag.
pub const UNLAUNCHED_GROUP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);
const API_VERSION: &str = "2016-11-15";

/// The instances this broker launches.
#[derive(Debug, Clone)]
pub struct Ec2Config {
    /// The broker's name: tags its instances and scopes `list`.
    pub stack: String,
    /// An image with `respawn-agent`, bubblewrap and the container runtime.
    pub image_id: String,
    pub cpu_instance_type: String,
    pub instance_types: InstanceTypes,
    pub subnet_id: Option<String>,
    /// The VPC of `subnet_id`, where gangs' security groups are made (`None`: the
    /// default VPC).
    pub vpc_id: Option<String>,
    /// The stack's security groups, on every instance: they should admit nothing
    /// from other agents (the template's admit nothing at all).
    pub security_group_ids: Vec<String>,
    /// The agent's instance profile (the bucket's job prefixes, nothing else).
    pub instance_profile: Option<String>,
    /// A launch template (id) for what every agent shares.
    pub launch_template: Option<String>,
    pub agent: AgentBoot,
    /// Warm pools; their state lives in [`Ec2Compute::with_pools`]'s store.
    pub pools: Vec<PoolSpec>,
    /// The cluster placement group multi-node attempts launch in (the stack's:
    /// one, so that none is left behind per job).
    pub placement_group: Option<String>,
}

/// The EC2 Query API, signed with the SDK's credentials.
#[derive(Clone)]
pub struct Ec2Compute {
    http: reqwest_aws::Client,
    endpoint: String,
    region: String,
    credentials: SharedCredentialsProvider,
    cfg: Ec2Config,
    pools: Option<Pools>,
}

impl fmt::Debug for Ec2Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2Compute")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("stack", &self.cfg.stack)
            .finish_non_exhaustive()
    }
}

impl Ec2Compute {
    /// From the SDK's configuration: its region and credentials, and its endpoint
    /// (`AWS_ENDPOINT_URL_EC2` / `AWS_ENDPOINT_URL`) where one is set.
    pub fn new(sdk: &aws_config::SdkConfig, cfg: Ec2Config) -> Result<Ec2Compute, String> {
        let region = sdk
            .region()
            .map(|r| r.to_string())
            .ok_or("no AWS region configured (AWS_REGION)")?;
        let credentials = sdk
            .credentials_provider()
            .ok_or("no AWS credentials provider configured")?;
        let endpoint = std::env::var("AWS_ENDPOINT_URL_EC2")
            .ok()
            .or_else(|| sdk.endpoint_url().map(str::to_owned))
            .unwrap_or_else(|| format!("https://ec2.{region}.amazonaws.com"));
        let http = reqwest_aws::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Ec2Compute {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned() + "/",
            region,
            credentials,
            cfg,
            pools: None,
        })
    }

    /// Keeps the pools' state (which VM runs what) in `state`, the broker's state
    /// bucket. A pool with GPUs and no model gets the default model's instance type.
    /// Without a pool that reuses VMs nothing is kept, and no call reads the bucket.
    pub fn with_pools(mut self, state: Arc<dyn ObjectStore>) -> Result<Ec2Compute, String> {
        for pool in &mut self.cfg.pools {
            if pool.gpus > 0 && pool.gpu_type.is_none() {
                pool.gpu_type = Some(self.cfg.instance_types.default_gpu.clone());
            }
            let resources = Resources {
                gpus: pool.gpus,
                gpu_type: pool.gpu_type.clone(),
                ..Resources::default()
            };
            self.cfg
                .instance_types
                .choose(&resources, &self.cfg.cpu_instance_type)
                .map_err(|e| format!("pool {}: {e}", pool.name))?;
        }
        self.pools = Pools::new(self.cfg.pools.clone(), state);
        Ok(self)
    }

    async fn call(&self, action: &str, params: &[(String, String)]) -> Result<String, Ec2Error> {
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("Action", action)
                .append_pair("Version", API_VERSION);
            for (k, v) in params {
                form.append_pair(k, v);
            }
            form.finish()
        };
        let creds = self
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| Ec2Error::transport(format!("no AWS credentials: {e}")))?;
        let identity = creds.into();
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| Ec2Error::transport(format!("cannot sign: {e}")))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            &self.endpoint,
            [("content-type", content_type)].into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| Ec2Error::transport(format!("cannot sign: {e}")))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| Ec2Error::transport(format!("cannot sign: {e}")))?
            .into_parts();
        let mut req = self
            .http
            .post(&self.endpoint)
            .header("content-type", content_type)
            .body(body);
        for (name, value) in instructions.headers() {
            req = req.header(name, value);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Ec2Error::transport(format!("{action}: {e}")))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Ec2Error::transport(format!("{action}: {e}")))?;
        if status.is_success() {
            return Ok(text);
        }
        let parsed: Option<ErrorResponse> = quick_xml::de::from_str(&text).ok();
        let first = parsed.and_then(|p| p.errors.error.into_iter().next());
        Err(Ec2Error {
            status: status.as_u16(),
            code: first.as_ref().map_or_else(String::new, |e| e.code.clone()),
            message: first.map_or(text, |e| e.message),
        })
    }

    /// The stack's instances matching `filters` (tag name → value), or the one
    /// instance `id`; every page.
    async fn instances(
        &self,
        filters: &[(&str, String)],
        id: Option<&str>,
    ) -> Result<Vec<Instance>, Ec2Error> {
        let mut params = self.stack_filter(filters.iter().map(|(t, v)| (format!("tag:{t}"), v)));
        if let Some(id) = id {
            params.push(("InstanceId.1".to_owned(), id.to_owned()));
        }
        let pages: Vec<Describe> = self.every_page("DescribeInstances", params).await?;
        Ok(pages
            .into_iter()
            .flat_map(|p| p.reservations.item)
            .flat_map(|r| r.instances.item)
            .collect())
    }

    /// `Filter.N` parameters: the stack's tag, then `filters` (name → value).
    fn stack_filter<'a>(
        &'a self,
        filters: impl Iterator<Item = (String, &'a String)>,
    ) -> Vec<(String, String)> {
        let stack = (format!("tag:{TAG_STACK}"), &self.cfg.stack);
        std::iter::once(stack)
            .chain(filters)
            .enumerate()
            .flat_map(|(i, (name, value))| {
                [
                    (format!("Filter.{}.Name", i + 1), name),
                    (format!("Filter.{}.Value.1", i + 1), value.clone()),
                ]
            })
            .collect()
    }

    /// Every page of a `Describe…` call's answer.
    async fn every_page<P: Paged>(
        &self,
        action: &str,
        params: Vec<(String, String)>,
    ) -> Result<Vec<P>, Ec2Error> {
        let mut pages = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut page = params.clone();
            if let Some(token) = &next {
                page.push(("NextToken".to_owned(), token.clone()));
            }
            let xml = self.call(action, &page).await?;
            let parsed: P = quick_xml::de::from_str(&xml)
                .map_err(|e| Ec2Error::transport(format!("{action}: {e}")))?;
            next = parsed
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            pages.push(parsed);
            if next.is_none() {
                return Ok(pages);
            }
        }
    }

    /// The job and attempt an instance of this stack runs; `None` for an instance
    /// that is not the stack's (or no longer known).
    pub async fn key_of(&self, instance_id: &str) -> Result<Option<AllocationKey>, Error> {
        let found = match self.instances(&[], Some(instance_id)).await {
            Ok(found) => found,
            Err(e) if e.code.starts_with("InvalidInstanceID") => return Ok(None),
            Err(e) => return Err(e.into_compute()),
        };
        let Some(instance) = found.iter().find(|i| i.id == instance_id) else {
            return Ok(None);
        };
        if instance.tag(TAG_POOL).is_some() {
            let (Some(pools), Some(vm)) = (&self.pools, instance.tag(TAG_VM)) else {
                return Ok(None);
            };
            return pools.key_of(vm, &instance.id).await;
        }
        Ok(instance.to_vm().ok().map(|vm| vm.key))
    }

    /// The attempt's instances, oldest first.
    async fn of_attempt(&self, key: &AllocationKey) -> Result<Vec<Instance>, Error> {
        let mut found = self
            .instances(
                &[
                    (TAG_JOB, key.job.to_string()),
                    (TAG_ATTEMPT, key.attempt.to_string()),
                ],
                None,
            )
            .await
            .map_err(Ec2Error::into_compute)?;
        found.sort_by(|a, b| (&a.launch_time, &a.id).cmp(&(&b.launch_time, &b.id)));
        Ok(found)
    }

    async fn terminate(&self, ids: &[&str]) -> Result<(), Ec2Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let params: Vec<(String, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (format!("InstanceId.{}", i + 1), (*id).to_owned()))
            .collect();
        match self.call("TerminateInstances", &params).await {
            Err(e) if e.code.starts_with("InvalidInstanceID.NotFound") => Ok(()),
            other => other.map(drop),
        }
    }
}

/// What a new instance is for.
enum Boot<'a> {
    /// One attempt (a single-use VM), on this many nodes.
    Attempt(&'a AllocationKey, u32),
    /// A pool VM, by name: it asks the API for its attempts.
    Pool(&'a str),
}

/// One `RunInstances` call.
struct Launch<'a> {
    instance_type: String,
    client_token: String,
    boot: Boot<'a>,
    /// Besides the stack's.
    tags: Vec<(&'static str, String)>,
    /// Security groups besides the stack's (a gang's own).
    groups: Vec<String>,
    spot: bool,
    max_price: Option<f64>,
}

/// The launch of a single-use VM for `req`'s attempt.
fn attempt_launch<'a>(cfg: &Ec2Config, req: &'a AllocateRequest) -> Result<Launch<'a>, Error> {
    Ok(Launch {
        instance_type: cfg
            .instance_types
            .choose(&req.resources, &cfg.cpu_instance_type)?,
        client_token: client_token(&cfg.stack, &req.key),
        boot: Boot::Attempt(&req.key, req.resources.nodes.max(1)),
        tags: std::iter::once((TAG_JOB, req.key.job.to_string()))
            .chain([
                (TAG_ATTEMPT, req.key.attempt.to_string()),
                (TAG_PROJECT, req.project.clone()),
            ])
            .chain((req.resources.nodes > 1).then(|| (TAG_NODES, req.resources.nodes.to_string())))
            .collect(),
        groups: Vec::new(),
        spot: req.placement.spot,
        max_price: req.placement.max_price,
    })
}

/// `RunInstances`'s parameters.
fn run_params(cfg: &Ec2Config, launch: &Launch<'_>) -> Vec<(String, String)> {
    let (user_data, nodes) = match launch.boot {
        Boot::Attempt(key, nodes) => (user_data(&cfg.agent, key, nodes), nodes),
        Boot::Pool(vm) => (pool_user_data(&cfg.agent, vm), 1),
    };
    let mut p: Vec<(String, String)> = vec![
        ("ImageId".into(), cfg.image_id.clone()),
        ("InstanceType".into(), launch.instance_type.clone()),
        // All of a gang or none of it.
        ("MinCount".into(), nodes.to_string()),
        ("MaxCount".into(), nodes.to_string()),
        ("ClientToken".into(), launch.client_token.clone()),
        (
            "UserData".into(),
            base64::engine::general_purpose::STANDARD.encode(user_data),
        ),
        ("MetadataOptions.HttpTokens".into(), "required".into()),
        ("MetadataOptions.HttpPutResponseHopLimit".into(), "1".into()),
        (
            "InstanceInitiatedShutdownBehavior".into(),
            "terminate".into(),
        ),
    ];
    let tags: Vec<(&str, String)> = std::iter::once((TAG_STACK, cfg.stack.clone()))
        .chain(launch.tags.iter().cloned())
        .collect();
    for (s, resource) in ["instance", "volume"].into_iter().enumerate() {
        let spec = format!("TagSpecification.{}", s + 1);
        p.push((format!("{spec}.ResourceType"), resource.into()));
        for (t, (k, v)) in tags.iter().enumerate() {
            p.push((format!("{spec}.Tag.{}.Key", t + 1), (*k).to_owned()));
            p.push((format!("{spec}.Tag.{}.Value", t + 1), v.clone()));
        }
    }
    if launch.spot {
        let spot = "InstanceMarketOptions.SpotOptions";
        p.push(("InstanceMarketOptions.MarketType".into(), "spot".into()));
        p.push((format!("{spot}.SpotInstanceType"), "one-time".into()));
        p.push((
            format!("{spot}.InstanceInterruptionBehavior"),
            "terminate".into(),
        ));
        if let Some(price) = launch.max_price {
            p.push((format!("{spot}.MaxPrice"), format!("{price}")));
        }
    }
    if let Some(subnet) = &cfg.subnet_id {
        p.push(("SubnetId".into(), subnet.clone()));
    }
    if nodes > 1
        && let Some(group) = &cfg.placement_group
    {
        p.push(("Placement.GroupName".into(), group.clone()));
    }
    // The call's groups replace the launch template's: the stack's are named too.
    for (i, sg) in cfg
        .security_group_ids
        .iter()
        .chain(&launch.groups)
        .enumerate()
    {
        p.push((format!("SecurityGroupId.{}", i + 1), sg.clone()));
    }
    if let Some(profile) = &cfg.instance_profile {
        p.push(("IamInstanceProfile.Name".into(), profile.clone()));
    }
    if let Some(template) = &cfg.launch_template {
        // What the stack fixed for every agent (instance profile, security
        // groups, metadata options, disks); this call's parameters win.
        p.push(("LaunchTemplate.LaunchTemplateId".into(), template.clone()));
        p.push(("LaunchTemplate.Version".into(), "$Latest".into()));
    }
    p
}

/// The name of the security group of `key`'s gang.
fn gang_group_name(stack: &str, key: &AllocationKey) -> String {
    format!("{}-gang", client_token(stack, key))
}

impl Ec2Compute {
    /// The security group of `key`'s gang (its id), made if need be: it admits
    /// traffic from its members alone, and (where the stack names its own
    /// groups, whose egress it would otherwise widen) lets them send only to each
    /// other. Every step may be retried.
    async fn gang_group(&self, key: &AllocationKey) -> Result<String, Error> {
        let name = gang_group_name(&self.cfg.stack, key);
        let mut params = vec![
            ("GroupName".to_owned(), name.clone()),
            (
                "GroupDescription".to_owned(),
                format!(
                    "respawn: the nodes of job {} attempt {}",
                    key.job, key.attempt
                ),
            ),
            (
                "TagSpecification.1.ResourceType".to_owned(),
                "security-group".to_owned(),
            ),
        ];
        if let Some(vpc) = &self.cfg.vpc_id {
            params.push(("VpcId".to_owned(), vpc.clone()));
        }
        let now = crate::bands::now_ms() / 1000;
        let tags = [
            (TAG_STACK, self.cfg.stack.clone()),
            (TAG_JOB, key.job.to_string()),
            (TAG_ATTEMPT, key.attempt.to_string()),
            (TAG_CREATED, now.to_string()),
        ];
        for (t, (k, v)) in tags.iter().enumerate() {
            params.push((
                format!("TagSpecification.1.Tag.{}.Key", t + 1),
                (*k).to_owned(),
            ));
            params.push((format!("TagSpecification.1.Tag.{}.Value", t + 1), v.clone()));
        }
        let id = match self.call("CreateSecurityGroup", &params).await {
            Ok(xml) => {
                let made: CreatedGroup = quick_xml::de::from_str(&xml)
                    .map_err(|e| Error::Unavailable(format!("CreateSecurityGroup: {e}").into()))?;
                made.group_id
            }
            // A retried allocation: the group is there.
            Err(e) if e.code == "InvalidGroup.Duplicate" => self
                .groups(&[("group-name", name.clone())])
                .await
                .map_err(Ec2Error::into_compute)?
                .into_iter()
                .next()
                .map(|g| g.id)
                .ok_or_else(|| {
                    Error::Unavailable(format!("security group {name}: made, not yet seen").into())
                })?,
            Err(e) => return Err(e.into_compute()),
        };
        let members = vec![
            ("GroupId".to_owned(), id.clone()),
            ("IpPermissions.1.IpProtocol".to_owned(), "-1".to_owned()),
            ("IpPermissions.1.Groups.1.GroupId".to_owned(), id.clone()),
        ];
        let mut steps = vec![("AuthorizeSecurityGroupIngress", members.clone())];
        if !self.cfg.security_group_ids.is_empty() {
            steps.push(("AuthorizeSecurityGroupEgress", members));
            steps.push((
                "RevokeSecurityGroupEgress",
                vec![
                    ("GroupId".to_owned(), id.clone()),
                    ("IpPermissions.1.IpProtocol".to_owned(), "-1".to_owned()),
                    (
                        "IpPermissions.1.IpRanges.1.CidrIp".to_owned(),
                        "0.0.0.0/0".to_owned(),
                    ),
                ],
            ));
        }
        for (action, params) in steps {
            match self.call(action, &params).await {
                Ok(_) => {}
                // Done by an earlier try.
                Err(e)
                    if e.code == "InvalidPermission.Duplicate"
                        || e.code == "InvalidPermission.NotFound" => {}
                Err(e) => return Err(e.into_compute()),
            }
        }
        Ok(id)
    }

    /// The stack's security groups matching `filters` (name → value).
    async fn groups(&self, filters: &[(&str, String)]) -> Result<Vec<SecurityGroup>, Ec2Error> {
        let params = self.stack_filter(filters.iter().map(|(n, v)| ((*n).to_owned(), v)));
        let pages: Vec<DescribeGroups> = self.every_page("DescribeSecurityGroups", params).await?;
        Ok(pages.into_iter().flat_map(|p| p.groups.item).collect())
    }

    async fn delete_group(&self, id: &str) -> Result<(), Ec2Error> {
        match self
            .call(
                "DeleteSecurityGroup",
                &[("GroupId".to_owned(), id.to_owned())],
            )
            .await
        {
            Err(e) if e.code == "InvalidGroup.NotFound" => Ok(()),
            other => other.map(drop),
        }
    }

    /// Deletes the security groups of gangs that are over: every instance of
    /// the attempt terminated, or none launched after [`UNLAUNCHED_GROUP_AGE`].
    /// EC2 refuses (`DependencyViolation`) while a terminated node's network
    /// interface is still there; the next pass tries again. Returns how many went.
    pub async fn sweep_groups(&self) -> Result<usize, Error> {
        let now = crate::bands::now_ms() / 1000;
        let mut gone = 0;
        let groups = self
            .groups(&[("tag-key", TAG_CREATED.to_owned())])
            .await
            .map_err(Ec2Error::into_compute)?;
        for g in groups {
            let (Some(job), Some(attempt), Some(created)) = (
                g.tag(TAG_JOB).and_then(|j| j.parse::<JobId>().ok()),
                g.tag(TAG_ATTEMPT).and_then(|a| a.parse::<u32>().ok()),
                g.tag(TAG_CREATED).and_then(|c| c.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let key = AllocationKey { job, attempt };
            let instances = self.of_attempt(&key).await?;
            let over = if instances.is_empty() {
                now.saturating_sub(created) >= UNLAUNCHED_GROUP_AGE.as_secs()
            } else {
                instances.iter().all(|i| i.state() == VmState::Terminated)
            };
            if !over {
                continue;
            }
            match self.delete_group(&g.id).await {
                Ok(()) => {
                    info!(job_id = %key.job, attempt = key.attempt, group = %g.id, "the gang's security group deleted");
                    gone += 1;
                }
                Err(e) if e.code == "DependencyViolation" => {}
                Err(e) => return Err(e.into_compute()),
            }
        }
        Ok(gone)
    }

    /// Launches one instance.
    async fn run_instance(&self, launch: &Launch<'_>) -> Result<Instance, Error> {
        self.run_instances(launch)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Unavailable("RunInstances returned no instance".into()))
    }

    /// `instances`, one per rank of a gang of `nodes` (the oldest where a retried
    /// launch made two of a rank, the others terminated), as one VM.
    async fn gang(
        &self,
        key: &AllocationKey,
        nodes: u32,
        instances: Vec<Instance>,
    ) -> Result<Vm, Error> {
        let (ranks, extra) = by_rank(instances);
        if !extra.is_empty() {
            warn!(job_id = %key.job, attempt = key.attempt, extra = ?extra, "terminating duplicate instances of the gang");
            let ids: Vec<&str> = extra.iter().map(String::as_str).collect();
            self.terminate(&ids).await.map_err(Ec2Error::into_compute)?;
        }
        let first = ranks
            .first()
            .ok_or_else(|| Error::Unavailable("RunInstances returned no instance".into()))?;
        let states: Vec<VmState> = ranks.iter().map(Instance::state).collect();
        // The key is known (RunInstances's answer may omit the tags).
        Ok(Vm {
            id: first.id.clone(),
            key: key.clone(),
            state: crate::cloudvm::gang_state(nodes, &states),
            spot: first.lifecycle.as_deref() == Some("spot"),
            nodes,
            created_at: Timestamp::parse_rfc3339(&first.launch_time).unwrap_or(Timestamp(0)),
        })
    }

    /// Launches the instances of `launch`.
    async fn run_instances(&self, launch: &Launch<'_>) -> Result<Vec<Instance>, Error> {
        if self.cfg.agent.api.is_empty() {
            return Err(Error::Unavailable(
                "no API address for agents to report to (RESPAWN_API_URL)".into(),
            ));
        }
        let xml = self
            .call("RunInstances", &run_params(&self.cfg, launch))
            .await
            .map_err(Ec2Error::into_compute)?;
        let ran: Reservation = quick_xml::de::from_str(&xml)
            .map_err(|e| Error::Unavailable(format!("RunInstances: {e}").into()))?;
        Ok(ran.instances.item)
    }
}

#[async_trait]
impl Compute for Ec2Compute {
    async fn allocate(&self, req: &AllocateRequest) -> Result<Vm, Error> {
        let nodes = req.resources.nodes.max(1);
        // Every pool setting is checked, reusable pools or not (a pool the job
        // names must exist and fit it).
        if let Some(pool) = PoolSpec::choose(&self.cfg.pools, req)?.filter(|p| p.reuse) {
            let Some(pools) = &self.pools else {
                return Err(Error::Invalid(
                    "pools need the broker's state bucket".into(),
                ));
            };
            return pools.allocate(self, req, pool).await;
        }
        let found = self.of_attempt(&req.key).await?;
        if nodes > 1 && !found.is_empty() {
            return self.gang(&req.key, nodes, found).await;
        }
        if nodes > 1 {
            let mut launch = attempt_launch(&self.cfg, req)?;
            let group = self.gang_group(&req.key).await?;
            launch.groups.push(group.clone());
            let instances = match self.run_instances(&launch).await {
                Ok(instances) => instances,
                Err(e) => {
                    // All or none: none launched, so the group stands empty; a
                    // next try makes it again.
                    if let Err(d) = self.delete_group(&group).await {
                        info!(job_id = %req.key.job, attempt = req.key.attempt, group = %group, error = %d.message, "the gang's security group is left to the reconcile timer");
                    }
                    return Err(e);
                }
            };
            info!(job_id = %req.key.job, attempt = req.key.attempt, nodes, instances = ?instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), spot = req.placement.spot, "gang launched");
            return self.gang(&req.key, nodes, instances).await;
        }
        if let Some(first) = found.first() {
            // A retried allocation, or a race the ClientToken did not settle: the
            // oldest instance is the attempt's; the others go.
            let extra: Vec<&str> = found[1..]
                .iter()
                .filter(|i| i.state() != VmState::Terminated)
                .map(|i| i.id.as_str())
                .collect();
            if !extra.is_empty() {
                warn!(job_id = %req.key.job, attempt = req.key.attempt, extra = ?extra, "terminating duplicate instances of the attempt");
                self.terminate(&extra)
                    .await
                    .map_err(Ec2Error::into_compute)?;
            }
            return first.to_vm();
        }
        let launch = attempt_launch(&self.cfg, req)?;
        let instance = self.run_instance(&launch).await?;
        info!(job_id = %req.key.job, attempt = req.key.attempt, instance = %instance.id, spot = req.placement.spot, "instance launched");
        let mut vm = instance.to_vm()?;
        // RunInstances's answer may omit the tags; the key is known.
        vm.key = req.key.clone();
        Ok(vm)
    }

    async fn release(&self, key: &AllocationKey) -> Result<(), Error> {
        // Both kinds: an attempt placed in a pool, and one (placed before the pool
        // settings changed) on a single-use instance.
        if let Some(pools) = &self.pools {
            // Also a single-use instance below: one made before the pool settings
            // changed.
            pools.release(key).await?;
        }
        let live: Vec<String> = self
            .of_attempt(key)
            .await?
            .into_iter()
            .filter(|i| i.state() != VmState::Terminated)
            .map(|i| i.id)
            .collect();
        let ids: Vec<&str> = live.iter().map(String::as_str).collect();
        self.terminate(&ids).await.map_err(Ec2Error::into_compute)?;
        if !ids.is_empty() {
            info!(job_id = %key.job, attempt = key.attempt, instances = ?ids, "instances terminated");
        }
        Ok(())
    }

    async fn describe(&self, key: &AllocationKey) -> Result<Option<Vm>, Error> {
        if let Some(pools) = &self.pools
            && let Some(vm) = pools.describe(self, key).await?
        {
            return Ok(Some(vm));
        }
        let found = self.of_attempt(key).await?;
        let nodes = found.iter().filter_map(Instance::nodes).max().unwrap_or(1);
        if nodes > 1 {
            return self.gang(key, nodes, found).await.map(Some);
        }
        found.first().map(Instance::to_vm).transpose()
    }

    async fn roster(&self, key: &AllocationKey) -> Result<Option<Vec<String>>, Error> {
        let found = self.of_attempt(key).await?;
        let Some(nodes) = found.iter().filter_map(Instance::nodes).max() else {
            return Ok(None);
        };
        let (ranks, _) = by_rank(found);
        if ranks.len() != nodes as usize {
            return Ok(None);
        }
        Ok(ranks
            .into_iter()
            .map(|i| i.private_ip.filter(|ip| !ip.is_empty()))
            .collect())
    }

    async fn list(&self) -> Result<Vec<Vm>, Error> {
        let instances = self
            .instances(&[], None)
            .await
            .map_err(Ec2Error::into_compute)?;
        // An instance without respawn's tags (made by hand in the stack, or a pool
        // VM, listed by its slot) is not a VM of any attempt.
        let mut vms = Vec::new();
        let mut gangs: std::collections::BTreeMap<AllocationKey, Vec<(u32, Vm)>> =
            Default::default();
        for i in &instances {
            let Ok(vm) = i.to_vm() else { continue };
            if vm.nodes > 1 {
                gangs
                    .entry(vm.key.clone())
                    .or_default()
                    .push((i.launch_index, vm));
            } else {
                vms.push(vm);
            }
        }
        vms.extend(gangs.into_values().filter_map(crate::cloudvm::listed_gang));
        if let Some(pools) = &self.pools {
            let listed = instances
                .iter()
                .map(|i| (i.id.clone(), i.state()))
                .collect();
            vms.extend(pools.list(self, &listed).await?);
        }
        Ok(vms)
    }

    async fn orders(&self, vm: &str) -> Result<Orders, Error> {
        match &self.pools {
            Some(pools) => pools.orders(vm).await,
            None => Ok(Orders::Retire),
        }
    }
}

/// The idempotency token of an attempt's `RunInstances` (at most 64 ASCII characters).
pub fn client_token(stack: &str, key: &AllocationKey) -> String {
    let digest = Sha256::digest(format!("{stack}\n{}\n{}", key.job, key.attempt));
    hex::encode(digest)
}

/// The idempotency token of a pool VM's `RunInstances`.
fn client_token_of(stack: &str, vm: &str) -> String {
    hex::encode(Sha256::digest(format!("{stack}\npool vm\n{vm}")))
}

/// What EC2's first-boot script does its own way: the instance id from IMDSv2,
/// interruptions from IMDSv2.
const EC2: Cloud<'static> = Cloud {
    vm_id: r#"token=$(curl -sf --retry 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$imds/latest/api/token")
vm=$(curl -sf --retry 5 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/instance-id")"#,
    notice: r#"--imds "$imds""#,
    root_only: &["169.254.169.254"],
    resource: "cloud.provider=aws,cloud.platform=aws_ec2",
};

/// The script EC2 runs at first boot ([`boot_script`]); the instance shuts down,
/// so terminates, when the agent is done.
/// Every node of a gang of `nodes` boots the same script: its rank is its
/// `ami-launch-index`, read from the metadata (a failed read leaves the agent
/// without a rank: it refuses to start, the instance shuts down, and the gang is
/// lost and replaced).
pub fn user_data(agent: &AgentBoot, key: &AllocationKey, nodes: u32) -> String {
    let mut role = format!("--job {} --attempt {}", key.job, key.attempt);
    let mut what = format!("job {}, attempt {}", key.job, key.attempt);
    if nodes > 1 {
        role.push_str(&format!(
            r#" --nodes {nodes} --rank "$(curl -sf --retry 5 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/ami-launch-index")""#
        ));
        what.push_str(&format!(", one of {nodes} nodes"));
    }
    boot_script(
        agent,
        &EC2,
        &what,
        &agent.attempt_key.credential(&key.job, key.attempt),
        &role,
    )
}

/// The first-boot script of pool VM `vm`: as [`user_data`], but the credential
/// is the VM's, and the agent asks the API for attempt after attempt until it is
/// told to retire.
pub fn pool_user_data(agent: &AgentBoot, vm: &str) -> String {
    boot_script(
        agent,
        &EC2,
        &format!("pool vm {vm}"),
        &agent.attempt_key.vm_credential(vm),
        "--pool-api",
    )
}

/// An EC2 API error: its code decides capacity miss, passing failure or refusal.
#[derive(Debug)]
struct Ec2Error {
    /// 0: no answer (network, signing).
    status: u16,
    code: String,
    message: String,
}

impl Ec2Error {
    fn transport(message: String) -> Ec2Error {
        Ec2Error {
            status: 0,
            code: String::new(),
            message,
        }
    }

    fn into_compute(self) -> Error {
        const CAPACITY: &[&str] = &[
            "InsufficientInstanceCapacity",
            "InsufficientHostCapacity",
            "InsufficientCapacity",
            "SpotMaxPriceTooLow",
            "MaxSpotInstanceCountExceeded",
            "InstanceLimitExceeded",
            "VcpuLimitExceeded",
            "InsufficientFreeAddressesInSubnet",
        ];
        const PASSING: &[&str] = &[
            "RequestLimitExceeded",
            "Throttling",
            "InternalError",
            "InternalFailure",
            "ServiceUnavailable",
            "Unavailable",
            "IdempotentParameterMismatch",
        ];
        let what = format!("{}: {}", self.code, self.message);
        if CAPACITY.contains(&self.code.as_str()) {
            Error::Capacity(what)
        } else if self.status == 0
            || self.status >= 500
            || PASSING.contains(&self.code.as_str())
            || self.code.starts_with("InvalidInstanceID.NotFound")
        {
            // A new instance is not visible to Describe at once (eventual
            // consistency): try again, not a refusal.
            Error::Unavailable(what.into())
        } else {
            Error::Invalid(what)
        }
    }
}

#[derive(Debug, Deserialize)]
struct ErrorResponse {
    #[serde(rename = "Errors")]
    errors: ErrorList,
}

#[derive(Debug, Deserialize)]
struct ErrorList {
    #[serde(rename = "Error", default)]
    error: Vec<ErrorItem>,
}

#[derive(Debug, Deserialize)]
struct ErrorItem {
    #[serde(rename = "Code")]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct Items<T> {
    #[serde(default = "Vec::new")]
    item: Vec<T>,
}

impl<T> Default for Items<T> {
    fn default() -> Self {
        Items { item: Vec::new() }
    }
}

#[derive(Debug, Deserialize)]
struct Describe {
    #[serde(rename = "reservationSet", default)]
    reservations: Items<Reservation>,
    #[serde(rename = "nextToken", default)]
    next_token: Option<String>,
}

/// A reservation; also the shape of `RunInstances`'s answer.
#[derive(Debug, Deserialize)]
struct Reservation {
    #[serde(rename = "instancesSet", default)]
    instances: Items<Instance>,
}

#[derive(Debug, Deserialize)]
struct Instance {
    #[serde(rename = "instanceId")]
    id: String,
    #[serde(rename = "instanceState")]
    state: InstanceState,
    #[serde(rename = "launchTime", default)]
    launch_time: String,
    #[serde(rename = "instanceLifecycle", default)]
    lifecycle: Option<String>,
    #[serde(rename = "tagSet", default)]
    tags: Items<Tag>,
    /// Its place among the instances of one `RunInstances`: a gang node's rank.
    #[serde(rename = "amiLaunchIndex", default)]
    launch_index: u32,
    #[serde(rename = "privateIpAddress", default)]
    private_ip: Option<String>,
}

/// A gang's instances (oldest first) by rank: the oldest of each launch index, and
/// the live others (a retried launch the `ClientToken` did not settle).
fn by_rank(instances: Vec<Instance>) -> (Vec<Instance>, Vec<String>) {
    let mut ranks: std::collections::BTreeMap<u32, Instance> = std::collections::BTreeMap::new();
    let mut extra = Vec::new();
    for i in instances {
        match ranks.entry(i.launch_index) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(i);
            }
            std::collections::btree_map::Entry::Occupied(_) => {
                if i.state() != VmState::Terminated {
                    extra.push(i.id);
                }
            }
        }
    }
    (ranks.into_values().collect(), extra)
}

/// A page of a `Describe…` answer.
trait Paged: serde::de::DeserializeOwned {
    fn next_token(&self) -> Option<&str>;
}

impl Paged for Describe {
    fn next_token(&self) -> Option<&str> {
        self.next_token.as_deref()
    }
}

impl Paged for DescribeGroups {
    fn next_token(&self) -> Option<&str> {
        self.next_token.as_deref()
    }
}

#[derive(Debug, Deserialize)]
struct CreatedGroup {
    #[serde(rename = "groupId")]
    group_id: String,
}

#[derive(Debug, Deserialize)]
struct DescribeGroups {
    #[serde(rename = "securityGroupInfo", default)]
    groups: Items<SecurityGroup>,
    #[serde(rename = "nextToken", default)]
    next_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SecurityGroup {
    #[serde(rename = "groupId")]
    id: String,
    #[serde(rename = "tagSet", default)]
    tags: Items<Tag>,
}

impl SecurityGroup {
    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key)
    }
}

impl Items<Tag> {
    fn get(&self, key: &str) -> Option<&str> {
        self.item
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }
}

#[derive(Debug, Deserialize)]
struct InstanceState {
    name: String,
}

#[derive(Debug, Deserialize)]
struct Tag {
    key: String,
    #[serde(default)]
    value: String,
}

impl Instance {
    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key)
    }

    fn state(&self) -> VmState {
        match self.state.name.as_str() {
            "pending" => VmState::Requested,
            "running" => VmState::Running,
            // Stopping, stopped, shutting-down, terminated: gone for the attempt
            // (a spot instance that stops on interruption does not come back).
            _ => VmState::Terminated,
        }
    }

    /// The size of the gang it is a node of (`None`: a single instance).
    fn nodes(&self) -> Option<u32> {
        self.tag(TAG_NODES).and_then(|n| n.parse().ok())
    }

    fn to_vm(&self) -> Result<Vm, Error> {
        let job = self
            .tag(TAG_JOB)
            .and_then(|j| j.parse::<JobId>().ok())
            .ok_or_else(|| Error::Invalid(format!("{} has no {TAG_JOB} tag", self.id)))?;
        let attempt = self
            .tag(TAG_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| Error::Invalid(format!("{} has no {TAG_ATTEMPT} tag", self.id)))?;
        Ok(Vm {
            id: self.id.clone(),
            key: AllocationKey { job, attempt },
            state: self.state(),
            spot: self.lifecycle.as_deref() == Some("spot"),
            nodes: self.nodes().unwrap_or(1),
            created_at: Timestamp::parse_rfc3339(&self.launch_time).unwrap_or(Timestamp(0)),
        })
    }
}

#[cfg(test)]
mod tests;

/// Pool VMs are instances tagged with their pool and VM name; see [`crate::vmpool`].
#[async_trait]
impl PoolCloud for Ec2Compute {
    async fn launch(&self, pool: &PoolSpec, vm: &str) -> Result<Member, Error> {
        let found = self
            .instances(&[(TAG_VM, vm.to_owned())], None)
            .await
            .map_err(Ec2Error::into_compute)?;
        let instance = match found
            .into_iter()
            .filter(|i| i.state() != VmState::Terminated)
            .min_by(|a, b| a.launch_time.cmp(&b.launch_time))
        {
            Some(i) => i,
            None => {
                let resources = Resources {
                    gpus: pool.gpus,
                    gpu_type: pool.gpu_type.clone(),
                    ..Resources::default()
                };
                let launch = Launch {
                    instance_type: self
                        .cfg
                        .instance_types
                        .choose(&resources, &self.cfg.cpu_instance_type)?,
                    client_token: client_token_of(&self.cfg.stack, vm),
                    boot: Boot::Pool(vm),
                    tags: vec![(TAG_POOL, pool.name.clone()), (TAG_VM, vm.to_owned())],
                    groups: Vec::new(),
                    spot: pool.spot,
                    max_price: None,
                };
                self.run_instance(&launch).await?
            }
        };
        Ok(instance.to_member())
    }

    async fn state(&self, id: &str) -> Result<Option<VmState>, Error> {
        match self.instances(&[], Some(id)).await {
            Ok(found) => Ok(found.into_iter().find(|i| i.id == id).map(|i| i.state())),
            Err(e) if e.code.starts_with("InvalidInstanceID") => Ok(None),
            Err(e) => Err(e.into_compute()),
        }
    }

    async fn members(&self, pool: &str) -> Result<Vec<Member>, Error> {
        Ok(self
            .instances(&[(TAG_POOL, pool.to_owned())], None)
            .await
            .map_err(Ec2Error::into_compute)?
            .iter()
            .map(Instance::to_member)
            .collect())
    }

    async fn terminate(&self, ids: &[&str]) -> Result<(), Error> {
        Ec2Compute::terminate(self, ids)
            .await
            .map_err(Ec2Error::into_compute)
    }

    fn unseen_grace(&self) -> std::time::Duration {
        // DescribeInstances may not list a new instance for a while.
        std::time::Duration::from_secs(300)
    }
}

impl Ec2Compute {
    /// EC2 warned of or began the end of `instance_id`: if it is a pool VM, its
    /// slot takes no more attempts.
    pub async fn pool_vm_closing(&self, instance_id: &str) -> Result<(), Error> {
        let Some(pools) = &self.pools else {
            return Ok(());
        };
        let found = match self.instances(&[], Some(instance_id)).await {
            Ok(found) => found,
            Err(e) if e.code.starts_with("InvalidInstanceID") => return Ok(()),
            Err(e) => return Err(e.into_compute()),
        };
        match found
            .iter()
            .find(|i| i.id == instance_id)
            .and_then(|i| i.tag(TAG_VM))
        {
            Some(vm) => pools.closing(vm, instance_id).await,
            None => Ok(()),
        }
    }

    /// Keeps every warm pool's size; run on the reconcile function's schedule.
    pub async fn tend_pools(&self) -> Result<(), Error> {
        match &self.pools {
            Some(pools) => pools.tend(self).await,
            None => Ok(()),
        }
    }
}

impl Instance {
    fn to_member(&self) -> Member {
        Member {
            id: self.id.clone(),
            vm: self.tag(TAG_VM).map(str::to_owned),
            state: self.state(),
            launched: Timestamp::parse_rfc3339(&self.launch_time),
            // A terminated instance is gone; shutdown terminates pool instances.
            lingers: false,
        }
    }
}

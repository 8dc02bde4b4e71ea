//! The Spot VM provider on Azure Resource Manager, against the ARM harness built
//! from ARM's documented REST contract (support/arm.rs): the compute contract,
//! what respawn asks ARM for, throttling, capacity misses (refused at once or
//! failing later), evicted VMs, paging, and Entra ID tokens from `azure_identity`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use base64::Engine;
use object_store::memory::InMemory;
use respawn_adapters::azvm::{self, AgentBoot, ArmCompute, ArmConfig};
use respawn_core::attempt_auth::AttemptKey;
use respawn_core::conformance::compute::{request, run};
use respawn_core::job::JobId;
use respawn_core::ports::compute::{Compute, Error, VmState};
use respawn_core::time::Timestamp;
use respawn_e2e::arm::{self, Arm, Fault, Group, SlowDelete};
use serde_json::json;

/// The harness's tokens, fetched as App Service's managed identity endpoint
/// hands them out (the test of `azure_identity` itself is
/// [`azure_identitys_managed_identity_gets_the_token`]).
#[derive(Debug)]
struct HarnessToken(String);

#[async_trait::async_trait]
impl TokenCredential for HarnessToken {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let resource = scopes[0].trim_end_matches("/.default");
        let got: serde_json::Value = reqwest::Client::new()
            .get(format!(
                "{}/msi/token?api-version=2019-08-01&resource={resource}",
                self.0
            ))
            .header("x-identity-header", arm::IDENTITY_HEADER)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Ok(AccessToken::new(
            got["access_token"].as_str().unwrap().to_owned(),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

fn config(arm: &Arm) -> ArmConfig {
    ArmConfig {
        stack: "rs-test".into(),
        endpoint: arm.url.clone(),
        subscription: arm::SUBSCRIPTION.into(),
        resource_group: arm::RESOURCE_GROUP.into(),
        location: arm::LOCATION.into(),
        subnet: arm.subnet(),
        nsg: Some(arm.nsg()),
        image: "Canonical:ubuntu-24_04-lts:server:latest".parse().unwrap(),
        agent_identity: Some("/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/agent".into()),
        cpu_size: "Standard_D2s_v5".into(),
        sizes: azvm::default_sizes(),
        max_price: -1.0,
        agent: AgentBoot {
            api: "https://broker.example/api".into(),
            bucket: "az://jobs".into(),
            attempt_key: AttemptKey::from_bytes(&[7; 32]).unwrap(),
            heartbeat_secs: 30,
            grace_secs: 25,
            otlp: None,
        },
        follow: Duration::from_secs(5),
        pools: Vec::new(),
    }
}

fn provider(arm: &Arm) -> ArmCompute {
    ArmCompute::new(
        config(arm),
        Arc::new(HarnessToken(arm.url.clone())),
        Arc::new(InMemory::new()),
    )
    .unwrap()
}

fn spot(job: &JobId, attempt: u32) -> respawn_core::ports::compute::AllocateRequest {
    let mut r = request(job, attempt);
    r.placement.spot = true;
    r
}

#[tokio::test]
async fn spot_vms_on_arm_pass_the_compute_conformance_suite() {
    let arm = Arm::start().await;
    run(&provider(&arm)).await;
    assert!(
        arm.vms().is_empty(),
        "every VM released is deleted: {:?}",
        arm.vms()
    );
}

#[tokio::test]
async fn a_spot_vm_is_what_arm_documents_and_carries_its_attempt() {
    let arm = Arm::start().await;
    let c = provider(&arm);
    let job = JobId::generate(Timestamp(5));
    let mut req = spot(&job, 3);
    req.placement.max_price = Some(0.42);
    req.resources.gpus = 1;
    req.project = "vision".into();
    let vm = c.allocate(&req).await.unwrap();
    assert_eq!(
        vm.state,
        VmState::Running,
        "the creation was followed to its end"
    );
    assert!(vm.spot);
    assert_eq!(arm.created(), vec![vm.id.clone()]);
    let put = &arm.puts()[0];
    let p = &put["properties"];
    assert_eq!(p["priority"], "Spot");
    assert_eq!(p["evictionPolicy"], "Delete");
    assert_eq!(p["billingProfile"]["maxPrice"], 0.42);
    assert_eq!(p["hardwareProfile"]["vmSize"], "Standard_NC4as_T4_v3");
    assert_eq!(p["storageProfile"]["osDisk"]["deleteOption"], "Delete");
    assert_eq!(
        p["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]["deleteOption"],
        "Delete"
    );
    assert_eq!(put["identity"]["type"], "UserAssigned");
    let tags = arm.tags(&vm.id).unwrap();
    assert_eq!(tags["respawn-stack"], "rs-test");
    assert_eq!(tags["respawn-job"], job.to_string());
    assert_eq!(tags["respawn-attempt"], "3");
    assert_eq!(tags["respawn-project"], "vision");
    let script = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(p["osProfile"]["customData"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let credential = AttemptKey::from_bytes(&[7; 32])
        .unwrap()
        .credential(&job, 3);
    assert!(script.contains(&credential), "the attempt's own credential");
    assert!(script.contains(&format!("--job {job} --attempt 3")));
    assert!(script.contains("--scheduled-events"));
    assert!(script.contains("--bucket 'az://jobs'"));
    assert!(script.contains("iptables -I OUTPUT -d 169.254.169.254"));

    // An on-demand job: a Regular VM, no eviction policy.
    let mut on_demand = request(&job, 4);
    on_demand.placement.spot = false;
    let regular = c.allocate(&on_demand).await.unwrap();
    assert!(!regular.spot);
    assert_eq!(arm.puts()[1]["properties"]["priority"], "Regular");
    assert!(arm.puts()[1]["properties"]["evictionPolicy"].is_null());
}

#[tokio::test]
async fn throttling_is_waited_out_and_capacity_misses_spend_nothing() {
    let arm = Arm::start().await;
    let c = provider(&arm);
    let job = JobId::generate(Timestamp(9));

    arm.fault(Fault::Throttle(1));
    let vm = c.allocate(&spot(&job, 1)).await.unwrap();
    assert_eq!(arm.throttled(), 1);
    assert_eq!(arm.created(), vec![vm.id.clone()], "one VM after the 429");

    let misses = [
        (
            "SkuNotAvailable",
            "The requested size for resource is currently not available in location 'westeurope'.",
        ),
        (
            "OverconstrainedAllocationRequest",
            "Allocation failed. VM(s) with the following constraints cannot be allocated.",
        ),
        (
            "OperationNotAllowed",
            "Operation could not be completed as it results in exceeding approved LowPriorityCores quota.",
        ),
    ];
    for (attempt, (code, message)) in (2..).zip(misses) {
        arm.fault(Fault::Refuse(409, code.into(), message.into()));
        match c.allocate(&spot(&job, attempt)).await {
            Err(Error::Capacity(why)) => assert!(why.contains(code), "{why}"),
            other => panic!("{code}: expected a capacity miss, got {other:?}"),
        }
    }
    arm.fault(Fault::Refuse(
        400,
        "InvalidParameter".into(),
        "The value of parameter imageReference is invalid.".into(),
    ));
    assert!(
        matches!(c.allocate(&spot(&job, 6)).await, Err(Error::Invalid(_))),
        "a bad request is a refusal, not a capacity miss"
    );

    arm.fault(Fault::FailLater("AllocationFailed".into()));
    match c.allocate(&spot(&job, 7)).await {
        Err(Error::Capacity(why)) => assert!(why.contains("AllocationFailed"), "{why}"),
        other => panic!("expected a capacity miss, got {other:?}"),
    }
    let failed = azvm::vm_name("rs-test", &spot(&job, 7).key);
    assert!(arm.deleted().contains(&failed), "the failed VM is deleted");
    assert_eq!(
        arm.vms(),
        vec![vm.id],
        "only the one VM that was made is left"
    );
}

#[tokio::test]
async fn an_evicted_vm_is_terminated_and_never_made_again() {
    let arm = Arm::start().await;
    let c = provider(&arm);
    let job = JobId::generate(Timestamp(11));
    let vm = c.allocate(&spot(&job, 1)).await.unwrap();
    arm.evict(&vm.id);
    let gone = c.describe(&vm.key).await.unwrap().unwrap();
    assert_eq!(gone.state, VmState::Terminated);
    let again = c.allocate(&spot(&job, 1)).await.unwrap();
    assert_eq!(again.state, VmState::Terminated);
    assert_eq!(
        arm.created().len(),
        1,
        "a retried allocation made no second VM"
    );
    c.release(&vm.key).await.unwrap();

    // A key never allocated is unknown.
    assert!(c.describe(&request(&job, 9).key).await.unwrap().is_none());
}

#[tokio::test]
async fn list_reads_every_page_and_only_this_stacks_vms() {
    let arm = Arm::start().await;
    let c = provider(&arm);
    let mut other_cfg = config(&arm);
    other_cfg.stack = "other".into();
    let other = ArmCompute::new(
        other_cfg,
        Arc::new(HarnessToken(arm.url.clone())),
        Arc::new(InMemory::new()),
    )
    .unwrap();
    let job = JobId::generate(Timestamp(13));
    for attempt in 1..=3 {
        c.allocate(&spot(&job, attempt)).await.unwrap();
    }
    other.allocate(&spot(&job, 1)).await.unwrap();
    let mut listed: Vec<u32> = c
        .list()
        .await
        .unwrap()
        .iter()
        .map(|v| v.key.attempt)
        .collect();
    listed.sort();
    assert_eq!(listed, vec![1, 2, 3], "three of four VMs, over two pages");
}

/// `azure_identity` reads its environment when a credential is made, and this
/// process's environment is not the test's to change: the allocation runs in a
/// child (this test binary again) with App Service's variables set.
#[tokio::test]
async fn azure_identitys_managed_identity_gets_the_token() {
    let arm = Arm::start().await;
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "managed_identity_allocates",
            "--ignored",
            "--nocapture",
        ])
        .envs(arm.identity_env())
        .env("RESPAWN_TEST_ARM", &arm.url)
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("1 passed"),
        "the child ran the allocation: {text}"
    );
    assert_eq!(
        arm.created().len(),
        1,
        "the VM was made with azure_identity's token"
    );
}

#[tokio::test]
#[ignore = "run by azure_identitys_managed_identity_gets_the_token, with IDENTITY_ENDPOINT set"]
async fn managed_identity_allocates() {
    let url = std::env::var("RESPAWN_TEST_ARM").unwrap();
    let mut cfg = config(&Arm::start().await);
    cfg.endpoint = url;
    let credential = azvm::credential_from_env().unwrap();
    let c = ArmCompute::new(cfg, credential, Arc::new(InMemory::new())).unwrap();
    c.allocate(&spot(&JobId::generate(Timestamp(17)), 1))
        .await
        .unwrap();
}

/// A release racing an allocation of the same attempt (a cancel while dispatch
/// runs): whichever comes first, no VM of the released attempt is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_racing_an_allocation_leaves_no_vm() {
    let arm = Arm::start().await;
    let c = Arc::new(provider(&arm));
    let job = JobId::generate(Timestamp(19));
    for attempt in 1..=8 {
        let req = spot(&job, attempt);
        let (a, r) = (c.clone(), c.clone());
        let (key, req2) = (req.key.clone(), req.clone());
        let allocating = tokio::spawn(async move { a.allocate(&req2).await });
        let releasing = tokio::spawn(async move { r.release(&key).await });
        let _ = allocating.await.unwrap();
        releasing.await.unwrap().unwrap();
        // The allocation may still be on its way when release returns; once both
        // are done, nothing of the attempt runs.
        assert!(
            !arm.vms().contains(&azvm::vm_name("rs-test", &req.key)),
            "attempt {attempt}: a released attempt's VM is left: {:?}",
            arm.vms()
        );
        assert_eq!(
            c.allocate(&req).await.unwrap().state,
            VmState::Terminated,
            "and is never made again"
        );
    }
}

/// A VM made by a PUT whose answer was never written down (the dispatcher died
/// after it) is taken as made by the next allocation: once evicted, it is not made
/// a second time.
#[tokio::test]
async fn a_vm_found_unrecorded_counts_as_made() {
    let arm = Arm::start().await;
    let first = provider(&arm);
    let job = JobId::generate(Timestamp(23));
    let vm = first.allocate(&spot(&job, 1)).await.unwrap();
    // Another dispatcher whose state store never saw the answer.
    let second = provider(&arm);
    assert_eq!(second.allocate(&spot(&job, 1)).await.unwrap().id, vm.id);
    arm.evict(&vm.id);
    assert_eq!(
        second.allocate(&spot(&job, 1)).await.unwrap().state,
        VmState::Terminated
    );
    assert_eq!(arm.created().len(), 1, "one VM for the attempt, ever");
}

/// A creation that failed is deleted, and on Azure that takes a while: the
/// attempt, retried under its number meanwhile, is a capacity miss (no budget),
/// and once the name is free its VM is made.
#[tokio::test]
async fn a_failed_creation_still_being_deleted_is_waited_out() {
    let arm = Arm::start().await;
    arm.slow_delete(SlowDelete(3));
    let c = provider(&arm);
    let job = JobId::generate(Timestamp(29));
    arm.fault(Fault::FailLater("AllocationFailed".into()));
    assert!(matches!(
        c.allocate(&spot(&job, 1)).await,
        Err(Error::Capacity(_))
    ));
    let mut waits = 0;
    let vm = loop {
        match c.allocate(&spot(&job, 1)).await {
            Err(Error::Capacity(why)) => {
                assert!(why.contains("being deleted"), "{why}");
                waits += 1;
                assert!(waits < 10, "the failed VM never went");
            }
            Ok(vm) => break vm,
            Err(e) => panic!("expected a capacity miss while it is deleted: {e}"),
        }
    };
    assert!(waits >= 1, "the retry met the VM still being deleted");
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(arm.created().len(), 2, "the failed VM, then the attempt's");
}

fn pooled(arm: &Arm, pools: &[&str]) -> ArmCompute {
    let mut cfg = config(arm);
    cfg.pools = pools.iter().map(|p| p.parse().unwrap()).collect();
    ArmCompute::new(
        cfg,
        Arc::new(HarnessToken(arm.url.clone())),
        Arc::new(InMemory::new()),
    )
    .unwrap()
}

/// The pool VM name a VM of the harness was made as (its `respawn-vm` tag).
fn pool_vm_of(arm: &Arm, name: &str) -> String {
    arm.tags(name).unwrap()["respawn-vm"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn pooled_spot_vms_on_arm_pass_the_compute_conformance_suite() {
    let arm = Arm::start().await;
    let c = pooled(&arm, &["warm:max=4"]);
    run(&c).await;
    // The suite's attempts ran on pool VMs: tagged with the pool, not a job.
    let vms = arm.vms();
    assert!(!vms.is_empty());
    for vm in &vms {
        let tags = arm.tags(vm).unwrap();
        assert_eq!(tags["respawn-pool"], "warm", "{tags}");
        assert!(tags.get("respawn-job").is_none(), "{tags}");
    }
}

/// A warm pool on Azure: attempts in a row run on one VM, made once, whose
/// custom data boots the agent in pool mode with the VM's own credential; the
/// pool never grows past `max`; an evicted pool VM ends its attempt and its slot;
/// idle VMs retire after the idle timeout; a capacity miss on a pool VM frees its
/// slot for the next try.
#[tokio::test]
async fn a_pool_vm_on_arm_runs_attempt_after_attempt_and_retires_when_idle() {
    let arm = Arm::start().await;
    let c = pooled(&arm, &["warm:max=2,idle=1s"]);
    let jobs: Vec<JobId> = (0..5)
        .map(|i| JobId::generate(Timestamp(900 + i)))
        .collect();

    let first = c.allocate(&spot(&jobs[0], 1)).await.unwrap();
    assert_eq!(arm.created(), vec![first.id.clone()]);
    let vm = pool_vm_of(&arm, &first.id);
    let put = &arm.puts()[0];
    assert_eq!(put["properties"]["priority"], "Spot");
    assert_eq!(put["tags"]["respawn-pool"], "warm");
    let script = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(
                put["properties"]["osProfile"]["customData"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap(),
    )
    .unwrap();
    assert!(script.contains("--pool-api"), "{script}");
    assert!(script.contains(&format!("pool vm {vm}")), "{script}");
    use respawn_core::ports::compute::Orders;
    assert_eq!(c.orders(&vm).await.unwrap(), Orders::Run(first.key.clone()));

    // Released: the VM drains until its agent asks again, then takes the next.
    c.release(&first.key).await.unwrap();
    assert_eq!(
        c.describe(&first.key).await.unwrap().map(|v| v.state),
        Some(VmState::Terminated)
    );
    assert_eq!(arm.vms(), vec![first.id.clone()], "the VM is kept");
    assert_eq!(c.orders(&vm).await.unwrap(), Orders::Wait);
    let second = c.allocate(&spot(&jobs[1], 1)).await.unwrap();
    assert_eq!(second.id, first.id, "the next attempt took the warm VM");
    assert_eq!(
        c.orders(&vm).await.unwrap(),
        Orders::Run(second.key.clone())
    );
    assert_eq!(arm.created().len(), 1, "no VM made for it");

    // A second VM while the first is busy; no third (max=2).
    let third = c.allocate(&spot(&jobs[2], 1)).await.unwrap();
    assert_ne!(third.id, first.id);
    assert!(matches!(
        c.allocate(&spot(&jobs[3], 1)).await,
        Err(Error::Capacity(_))
    ));
    assert_eq!(arm.vms().len(), 2);

    // Evicted under its attempt: the attempt's VM is gone at once (ARM forgets a
    // deleted VM), and once released its slot is freed by tending.
    arm.evict(&first.id);
    assert_eq!(
        c.describe(&second.key).await.unwrap().map(|v| v.state),
        Some(VmState::Terminated)
    );
    c.release(&second.key).await.unwrap();
    c.release(&third.key).await.unwrap();
    assert_eq!(
        c.orders(&pool_vm_of(&arm, &third.id)).await.unwrap(),
        Orders::Wait
    );
    c.tend_pools().await.unwrap();
    assert_eq!(arm.vms(), vec![third.id.clone()], "not idle for 1 s yet");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    c.tend_pools().await.unwrap();
    assert!(arm.vms().is_empty(), "the idle VM retired: {:?}", arm.vms());
    assert!(arm.deleted().contains(&third.id));
    assert_eq!(c.orders(&vm).await.unwrap(), Orders::Retire);

    // No capacity for a new pool VM: a capacity miss, and the slot is free again.
    arm.fault(Fault::Refuse(
        409,
        "SkuNotAvailable".into(),
        "The requested size is not available.".into(),
    ));
    assert!(matches!(
        c.allocate(&spot(&jobs[4], 1)).await,
        Err(Error::Capacity(_))
    ));
    let retried = c.allocate(&spot(&jobs[4], 1)).await.unwrap();
    assert_eq!(arm.vms(), vec![retried.id.clone()]);
    c.release(&retried.key).await.unwrap();
}

/// Tending keeps `min` VMs warm before any job, and the next job takes one.
#[tokio::test]
async fn tending_keeps_min_pool_vms_warm_on_arm() {
    let arm = Arm::start().await;
    let c = pooled(&arm, &["warm:min=1,max=2,idle=1s"]);
    c.tend_pools().await.unwrap();
    let warm = arm.vms();
    assert_eq!(warm.len(), 1, "min=1 is made before any job");
    c.tend_pools().await.unwrap();
    assert_eq!(arm.vms(), warm, "tending again makes nothing more");
    let job = JobId::generate(Timestamp(950));
    let vm = c.allocate(&spot(&job, 1)).await.unwrap();
    assert_eq!(vm.id, warm[0], "the job took the warm VM");
    // Evicted while idle: tending frees the slot and makes a new one for min.
    c.release(&vm.key).await.unwrap();
    assert_eq!(
        c.orders(&pool_vm_of(&arm, &vm.id)).await.unwrap(),
        respawn_core::ports::compute::Orders::Wait
    );
    arm.evict(&vm.id);
    c.tend_pools().await.unwrap();
    let now = arm.vms();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], vm.id, "a new VM keeps the minimum");
}

/// Pool settings are checked whatever pools are configured: a job naming a pool
/// that does not exist is refused, one naming a single-use pool gets a VM of its
/// own.
#[tokio::test]
async fn a_named_pool_must_exist_even_among_single_use_pools() {
    let arm = Arm::start().await;
    let c = pooled(&arm, &["cold:single-use"]);
    let job = JobId::generate(Timestamp(970));
    let mut req = spot(&job, 1);
    req.placement.pool = Some("nope".into());
    assert!(
        matches!(c.allocate(&req).await, Err(Error::Invalid(_))),
        "an unknown pool is refused"
    );
    req.placement.pool = Some("cold".into());
    let vm = c.allocate(&req).await.unwrap();
    let tags = arm.tags(&vm.id).unwrap();
    assert_eq!(tags["respawn-job"], job.to_string(), "{tags}");
    assert!(tags.get("respawn-pool").is_none(), "{tags}");
    c.release(&vm.key).await.unwrap();
    assert!(arm.vms().is_empty());
}

#[tokio::test]
async fn a_gang_is_allocated_whole_in_one_proximity_group_reaching_only_itself_and_released_whole()
{
    let arm = Arm::start().await;
    let c = provider(&arm);
    let job = JobId::generate(Timestamp(21));
    let mut req = spot(&job, 1);
    req.resources.nodes = 3;
    let base = azvm::vm_name("rs-test", &req.key);
    let nodes: Vec<String> = (0..3)
        .map(|r| respawn_core::ports::compute::node_id(&base, r))
        .collect();

    // One node meets no capacity: none is left, and the miss spends nothing.
    arm.fault(Fault::Refuse(
        409,
        "SkuNotAvailable".into(),
        "The requested size for resource is currently not available in location 'westeurope'."
            .into(),
    ));
    match c.allocate(&req).await {
        Err(Error::Capacity(why)) => assert!(why.contains("a gang of 3"), "{why}"),
        other => panic!("expected a capacity miss for the gang, got {other:?}"),
    }
    assert!(arm.vms().is_empty(), "no node runs alone: {:?}", arm.vms());
    assert_eq!(arm.created().len(), 2, "two nodes were made, then deleted");

    // The attempt's next try makes all three, in one proximity placement group;
    // the priority its rule tried first was just taken, twice.
    arm.conflict_rules(2);
    let vm = c.allocate(&req).await.unwrap();
    assert_eq!(
        (vm.id.as_str(), vm.nodes, vm.state),
        (base.as_str(), 3, VmState::Running)
    );
    let mut live = arm.vms();
    live.sort();
    assert_eq!(live, nodes);
    assert_eq!(arm.groups(Group::Placement), vec![format!("{base}-ppg")]);
    assert_eq!(arm.groups(Group::Peers), vec![format!("{base}-asg")]);
    // The agents' NSG denies traffic between VMs; the gang's rule lets its NICs,
    // and no others, reach each other.
    let rules = arm.rules();
    let rule = &rules[&format!("{base}-gang")]["properties"];
    let asg = format!("/applicationSecurityGroups/{base}-asg");
    for side in ["source", "destination"] {
        let groups = rule[format!("{side}ApplicationSecurityGroups")]
            .as_array()
            .unwrap();
        assert_eq!(groups.len(), 1, "{rule}");
        assert!(groups[0]["id"].as_str().unwrap().ends_with(&asg), "{rule}");
        assert!(rule[format!("{side}AddressPrefix")].is_null(), "{rule}");
    }
    assert_eq!(
        (&rule["direction"], &rule["access"]),
        (&json!("Inbound"), &json!("Allow"))
    );
    let priority = rule["priority"].as_u64().unwrap() as u32;
    assert!(azvm::GANG_PRIORITIES.contains(&priority), "{priority}");
    let credential = AttemptKey::from_bytes(&[7; 32])
        .unwrap()
        .credential(&job, 1);
    for put in arm.puts().iter().rev().take(3) {
        let p = &put["properties"];
        assert!(
            p["proximityPlacementGroup"]["id"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/proximityPlacementGroups/{base}-ppg")),
            "{p}"
        );
        let nic = &p["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]["ipConfigurations"]
            [0]["properties"];
        assert!(
            nic["applicationSecurityGroups"][0]["id"]
                .as_str()
                .unwrap()
                .ends_with(&asg),
            "{nic}"
        );
        let rank: u32 = put["tags"]["respawn-rank"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(put["tags"]["respawn-nodes"], "3");
        let script = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(p["osProfile"]["customData"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert!(script.contains(&format!("--job {job} --attempt 1 --rank {rank} --nodes 3")));
        assert!(
            script.contains(&credential),
            "each node reports for the attempt"
        );
    }
    assert_eq!(
        c.roster(&req.key).await.unwrap(),
        Some(vec!["127.0.0.1".to_owned(); 3]),
        "the nodes' private addresses, from their NICs, in rank order"
    );
    let listed: Vec<_> = c
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.key == req.key)
        .collect();
    assert_eq!(
        listed.len(),
        1,
        "a gang is one VM to the broker: {listed:?}"
    );
    assert_eq!(listed[0].nodes, 3);
    // Asked again, the same gang.
    assert_eq!(c.allocate(&req).await.unwrap().id, base);
    assert_eq!(arm.created().len(), 5);

    // Another gang's rule never takes this one's priority, even when it tries
    // that one first.
    let other_job = JobId::generate(Timestamp(22));
    let mut other = spot(&other_job, 1);
    other.resources.nodes = 2;
    let other_base = azvm::vm_name("rs-test", &other.key);
    arm.put_rule(
        "an-operators-rule",
        json!({"properties": {"priority": priority + 1, "direction": "Inbound"}}),
    );
    c.allocate(&other).await.unwrap();
    let rules = arm.rules();
    let other_priority = &rules[&format!("{other_base}-gang")]["properties"]["priority"];
    assert_ne!(other_priority, &json!(priority));
    assert_ne!(other_priority, &json!(priority + 1));
    c.release(&other.key).await.unwrap();
    assert!(!arm.rules().contains_key(&format!("{other_base}-gang")));

    // A deployment of the template replaced the NSG's rules: the reconcile
    // timer's sweep makes the live gang's rule again.
    arm.drop_rule(&format!("{base}-gang"));
    c.sweep_groups().await.unwrap();
    assert!(arm.rules().contains_key(&format!("{base}-gang")));

    // Rank 0 evicted: the gang is gone for its attempt, but listed live while
    // nodes of it are (still billed: the sweep for orphans must find them).
    arm.evict(&nodes[0]);
    assert_eq!(
        c.describe(&req.key).await.unwrap().unwrap().state,
        VmState::Terminated
    );
    let listed: Vec<_> = c
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.key == req.key)
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].id.as_str(), listed[0].state),
        (nodes[1].as_str(), VmState::Running)
    );

    // Released whole: every node goes, and nothing is made again. As on Azure the
    // nodes take a while to delete, and ARM refuses the group's deletion meanwhile:
    // the reconcile timer's sweep deletes it once they are gone.
    arm.slow_delete(SlowDelete(2));
    c.release(&req.key).await.unwrap();
    assert!(
        !arm.rules().contains_key(&format!("{base}-gang")),
        "the rule goes at once"
    );
    assert_eq!(
        arm.groups(Group::Placement),
        vec![format!("{base}-ppg")],
        "refused while in use"
    );
    assert_eq!(arm.groups(Group::Peers), vec![format!("{base}-asg")]);
    assert_eq!(c.sweep_groups().await.unwrap(), 0, "still in use");
    // Each GET of a node counts its deletion down.
    for _ in 0..3 {
        c.describe(&req.key).await.unwrap();
    }
    assert!(arm.vms().is_empty(), "{:?}", arm.vms());
    assert_eq!(c.sweep_groups().await.unwrap(), 1);
    assert!(
        arm.groups(Group::Placement).is_empty() && arm.groups(Group::Peers).is_empty(),
        "both groups are deleted"
    );
    assert_eq!(
        arm.groups_deleted(Group::Peers),
        vec![format!("{other_base}-asg"), format!("{base}-asg")]
    );
    let again = c.allocate(&req).await.unwrap();
    assert_eq!(again.state, VmState::Terminated);
    assert_eq!(
        arm.created().len(),
        7,
        "a released gang is never made again"
    );
}

//! The EC2 spot provider against the local AWS emulator (`localstack/aws-start`,
//! moto server), started for this test: it fails, never skips, when the emulator
//! cannot run. The emulator ignores `ClientToken`, so these runs also show that the
//! tag lookup alone keeps an attempt to one instance.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used)]

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use respawn_adapters::ec2::{AgentBoot, Ec2Compute, Ec2Config, InstanceTypes};
use respawn_core::attempt_auth::AttemptKey;
use respawn_core::conformance::compute::request;
use respawn_core::job::JobId;
use respawn_core::pool::PoolSpec;
use respawn_core::ports::compute::{
    AllocateRequest, AllocationKey, Compute, Error, Orders, VmState,
};
use respawn_core::spec::{Placement, Resources};
use respawn_core::time::Timestamp;

#[path = "../../../tests/support/aws.rs"]
#[allow(dead_code)]
mod aws;

use aws::Emulator;

fn compute(aws: &Emulator, stack: &str) -> Ec2Compute {
    ec2_config(aws, stack, Vec::new(), Vec::new())
}

/// A provider with warm `pools`, their state in a bucket of the emulator's S3.
fn pooled(aws: &Emulator, stack: &str, pools: &[&str]) -> Ec2Compute {
    let pools = pools.iter().map(|p| p.parse().unwrap()).collect();
    let state = format!("{stack}-state");
    aws.python(&format!(
        "import boto3; boto3.client('s3', endpoint_url='{{endpoint}}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='{state}')"
    ));
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&aws.endpoint)
        .with_allow_http(true)
        .with_bucket_name(state)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    ec2_config(aws, stack, pools, Vec::new())
        .with_pools(std::sync::Arc::new(store))
        .unwrap()
}

fn ec2_config(
    aws: &Emulator,
    stack: &str,
    pools: Vec<PoolSpec>,
    security_groups: Vec<String>,
) -> Ec2Compute {
    let sdk = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&aws.endpoint)
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "test", "test", None, None, "emulator",
        )))
        .build();
    Ec2Compute::new(
        &sdk,
        Ec2Config {
            stack: stack.into(),
            image_id: "ami-12c6146b".into(),
            cpu_instance_type: "c6i.large".into(),
            instance_types: InstanceTypes::default(),
            subnet_id: None,
            vpc_id: None,
            security_group_ids: security_groups,
            instance_profile: None,
            launch_template: None,
            agent: AgentBoot {
                api: "https://api.example".into(),
                bucket: "s3://respawn-test".into(),
                attempt_key: AttemptKey::from_bytes(&[9; 32]).unwrap(),
                heartbeat_secs: 30,
                grace_secs: 100,
                otlp: None,
            },
            pools,
            placement_group: Some(format!("{stack}-gangs")),
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let aws = Emulator::start();
    respawn_core::conformance::compute::run(&compute(&aws, "conformance")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_instance_with_the_attempts_tags_user_data_and_imdsv2() {
    let aws = Emulator::start();
    let ec2 = compute(&aws, "tags");
    let job = JobId::generate(Timestamp(5_000));
    let vm = ec2
        .allocate(&AllocateRequest {
            key: AllocationKey {
                job: job.clone(),
                attempt: 2,
            },
            project: "vision".into(),
            resources: Resources {
                gpus: 1,
                gpu_type: Some("t4".into()),
                ..Resources::default()
            },
            placement: Placement {
                max_price: Some(0.35),
                ..Placement::default()
            },
            image: None,
        })
        .await
        .unwrap();
    assert!(vm.id.starts_with("i-"), "{vm:?}");
    let credential = AttemptKey::from_bytes(&[9; 32])
        .unwrap()
        .credential(&job, 2);
    // Read back as AWS's own SDK sees it.
    aws.python(&format!(
        r#"
import base64, boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
i = ec2.describe_instances(InstanceIds=["{id}"])["Reservations"][0]["Instances"][0]
tags = {{t["Key"]: t["Value"] for t in i["Tags"]}}
want = {{"respawn:stack": "tags", "respawn:job": "{job}", "respawn:attempt": "2", "respawn:project": "vision"}}
assert tags == want, tags
assert i["InstanceType"] == "g4dn.xlarge", i["InstanceType"]
assert i.get("InstanceLifecycle") == "spot", i.get("InstanceLifecycle")
assert i["MetadataOptions"]["HttpTokens"] == "required", i["MetadataOptions"]
ud = ec2.describe_instance_attribute(InstanceId="{id}", Attribute="userData")["UserData"]["Value"]
script = base64.b64decode(ud).decode()
assert "{credential}" in script, script
assert "--job {job} --attempt 2" in script, script
"#,
        id = vm.id,
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_of_an_attempt_is_terminated_and_the_first_kept() {
    let aws = Emulator::start();
    let ec2 = compute(&aws, "race");
    let job = JobId::generate(Timestamp(6_000));
    // Two launches of attempt 1 that a lost ClientToken let through.
    aws.python(&format!(
        r#"
import boto3, time
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
tags = [{{"ResourceType": "instance", "Tags": [
    {{"Key": "respawn:stack", "Value": "race"}}, {{"Key": "respawn:job", "Value": "{job}"}},
    {{"Key": "respawn:attempt", "Value": "1"}}]}}]
for _ in range(2):
    ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, TagSpecifications=tags)
    time.sleep(1.1)
"#
    ));
    let key = AllocationKey {
        job: job.clone(),
        attempt: 1,
    };
    let before = ec2.list().await.unwrap();
    assert_eq!(before.len(), 2, "{before:?}");
    let oldest = before
        .iter()
        .min_by_key(|v| v.created_at)
        .unwrap()
        .id
        .clone();
    let vm = ec2
        .allocate(&AllocateRequest {
            key: key.clone(),
            project: "default".into(),
            resources: Resources::default(),
            placement: Placement::default(),
            image: None,
        })
        .await
        .unwrap();
    assert_eq!(vm.id, oldest, "the oldest instance is the attempt's");
    let after = ec2.list().await.unwrap();
    let live: Vec<_> = after
        .iter()
        .filter(|v| v.state != VmState::Terminated)
        .collect();
    assert_eq!(live.len(), 1, "{after:?}");
    assert_eq!(live[0].id, oldest);
    // Another broker's instances are not this one's.
    assert!(compute(&aws, "other").list().await.unwrap().is_empty());
}

/// The stack's pool instances as EC2 lists them: id → (state, `respawn:vm` tag).
/// The instances not ended (nor ending).
fn live(found: Vec<(String, String, String)>) -> Vec<(String, String, String)> {
    found
        .into_iter()
        .filter(|(_, state, _)| state != "terminated" && state != "shutting-down")
        .collect()
}

fn pool_instances(aws: &Emulator, stack: &str) -> Vec<(String, String, String)> {
    let out = aws.drive_python(&format!(
        r#"
import boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
found = ec2.describe_instances(Filters=[{{"Name": "tag:respawn:stack", "Values": ["{stack}"]}},
                                        {{"Name": "tag-key", "Values": ["respawn:pool"]}}])
for r in found["Reservations"]:
    for i in r["Instances"]:
        tags = {{t["Key"]: t["Value"] for t in i.get("Tags", [])}}
        assert "respawn:job" not in tags, tags
        print(i["InstanceId"], i["State"]["Name"], tags["respawn:vm"])
"#
    ));
    let mut found: Vec<(String, String, String)> = out
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace().map(str::to_owned);
            (w.next().unwrap(), w.next().unwrap(), w.next().unwrap())
        })
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_ec2_pool_passes_the_compute_conformance_suite() {
    let aws = Emulator::start();
    let ec2 = pooled(&aws, "poolconf", &["warm:max=2"]);
    respawn_core::conformance::compute::run(&ec2).await;
    // The suite's attempts ran on pool VMs: instances tagged with the pool, not
    // with a job.
    assert!(!pool_instances(&aws, "poolconf").is_empty());
}

/// A pool VM takes attempt after attempt: the second job gets the first's instance
/// once it is released, the VM's orders follow, and a VM credential names nothing
/// else; a pool at `max` is a capacity miss, not a new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_vm_runs_attempt_after_attempt_and_a_full_pool_is_a_capacity_miss() {
    let aws = Emulator::start();
    let ec2 = pooled(&aws, "reuse", &["warm:max=1"]);
    let (a, b) = (
        JobId::generate(Timestamp(7_000)),
        JobId::generate(Timestamp(7_001)),
    );
    let first = ec2.allocate(&request(&a, 1)).await.unwrap();
    let full = ec2.allocate(&request(&b, 1)).await;
    assert!(matches!(full, Err(Error::Capacity(_))), "{full:?}");
    let vms = pool_instances(&aws, "reuse");
    assert_eq!(vms.len(), 1, "{vms:?}");
    let (instance, _, vm) = vms[0].clone();
    assert_eq!(first.id, instance);
    assert_eq!(
        ec2.key_of(&instance).await.unwrap(),
        Some(first.key.clone())
    );
    assert_eq!(
        ec2.orders(&vm).await.unwrap(),
        Orders::Run(first.key.clone())
    );
    // The VM's user data holds its VM credential and asks for work; nothing of a job.
    aws.python(&format!(
        r#"
import base64, boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
ud = ec2.describe_instance_attribute(InstanceId="{instance}", Attribute="userData")["UserData"]["Value"]
script = base64.b64decode(ud).decode()
assert "{cred}" in script, script
assert "--pool-api" in script and "--job" not in script, script
"#,
        cred = AttemptKey::from_bytes(&[9; 32]).unwrap().vm_credential(&vm),
    ));

    ec2.release(&first.key).await.unwrap();
    // Released, the VM drains: it takes the next job only once its agent has asked
    // for work again (which it does with a clean work folder).
    let draining = ec2.allocate(&request(&b, 1)).await;
    assert!(matches!(draining, Err(Error::Capacity(_))), "{draining:?}");
    assert_eq!(ec2.orders(&vm).await.unwrap(), Orders::Wait);
    assert_eq!(ec2.key_of(&instance).await.unwrap(), None);
    let second = ec2.allocate(&request(&b, 1)).await.unwrap();
    assert_eq!(second.id, instance, "the warm VM took the next job");
    assert_eq!(second.state, VmState::Running);
    assert_eq!(
        ec2.orders(&vm).await.unwrap(),
        Orders::Run(second.key.clone())
    );
    assert_eq!(
        ec2.describe(&first.key).await.unwrap().map(|v| v.state),
        Some(VmState::Terminated),
        "the first attempt is over on the VM"
    );
    assert_eq!(pool_instances(&aws, "reuse").len(), 1);
    // Another slot's name, an old nonce, an unknown pool: not this pool's VM.
    for other in [
        vm.replace("-s0-", "-s1-"),
        format!("{}-ffffffff", vm.rsplit_once('-').unwrap().0),
        vm.replacen("warm", "cold", 1),
    ] {
        if other != vm {
            assert_eq!(ec2.orders(&other).await.unwrap(), Orders::Retire, "{other}");
        }
    }
}

/// Dispatchers racing for a pool never put two attempts on one VM, nor make more
/// than `max` VMs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_dispatchers_share_no_pool_vm_and_never_pass_max() {
    let aws = Emulator::start();
    let ec2 = pooled(&aws, "racing", &["warm:max=2"]);
    let jobs: Vec<JobId> = (0..6)
        .map(|i| JobId::generate(Timestamp(8_000 + i)))
        .collect();
    let got = futures::future::join_all(jobs.iter().map(|j| {
        let ec2 = ec2.clone();
        let req = request(j, 1);
        async move { ec2.allocate(&req).await }
    }))
    .await;
    let placed: Vec<String> = got
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|v| v.id.clone())
        .collect();
    for r in &got {
        assert!(
            matches!(r, Ok(_) | Err(Error::Capacity(_) | Error::Unavailable(_))),
            "{r:?}"
        );
    }
    let mut distinct = placed.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        placed.len(),
        "two attempts on one VM: {got:?}"
    );
    assert!(placed.len() <= 2 && !placed.is_empty(), "{got:?}");
    let vms = live(pool_instances(&aws, "racing"));
    assert!(vms.len() <= 2, "more than max VMs: {vms:?}");

    // One attempt placed by several dispatchers at once (a redelivered dispatch,
    // a reconcile tick) runs on one VM.
    let aws = Emulator::start();
    let ec2 = pooled(&aws, "same", &["warm:max=3"]);
    let job = JobId::generate(Timestamp(8_100));
    let got = futures::future::join_all((0..4).map(|_| {
        let ec2 = ec2.clone();
        let req = request(&job, 1);
        async move { ec2.allocate(&req).await }
    }))
    .await;
    let mut ids: Vec<String> = got
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|v| v.id.clone())
        .collect();
    for r in &got {
        assert!(matches!(r, Ok(_) | Err(Error::Unavailable(_))), "{r:?}");
    }
    ids.dedup();
    assert!(ids.len() <= 1, "one attempt on two VMs: {got:?}");
    let again = ec2.allocate(&request(&job, 1)).await.unwrap();
    assert!(ids.iter().all(|i| *i == again.id), "{got:?} then {again:?}");
    // Two dispatchers may both launch before either records its instance (EC2's
    // ClientToken settles that; the emulator ignores it): the second instance is
    // terminated at once, and one lives.
    assert_eq!(live(pool_instances(&aws, "same")).len(), 1);
}

/// Tending keeps `min` warm, retires idle VMs above it after the idle timeout, and
/// retires at once a VM EC2 is about to reclaim (replacing it only to keep `min`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tending_keeps_min_warm_retires_idle_vms_and_replaces_a_reclaimed_one() {
    let aws = Emulator::start();
    let ec2 = pooled(&aws, "tend", &["warm:min=1,max=2,idle=4s"]);
    let running = |aws: &Emulator| -> Vec<String> {
        pool_instances(aws, "tend")
            .into_iter()
            .filter(|(_, state, _)| state == "running" || state == "pending")
            .map(|(id, _, _)| id)
            .collect()
    };
    ec2.tend_pools().await.unwrap();
    let warm = running(&aws);
    assert_eq!(warm.len(), 1, "min=1 is launched before any job");
    ec2.tend_pools().await.unwrap();
    assert_eq!(running(&aws), warm, "tending again launches nothing more");

    let (a, b) = (
        JobId::generate(Timestamp(9_000)),
        JobId::generate(Timestamp(9_001)),
    );
    let first = ec2.allocate(&request(&a, 1)).await.unwrap();
    assert_eq!(first.id, warm[0], "the job took the warm VM");
    let second = ec2.allocate(&request(&b, 1)).await.unwrap();
    assert_ne!(second.id, first.id);
    assert_eq!(running(&aws).len(), 2, "the pool grew to max");
    ec2.release(&first.key).await.unwrap();
    ec2.release(&second.key).await.unwrap();
    // Their agents ask for work again: both VMs are idle.
    for (_, _, vm) in pool_instances(&aws, "tend") {
        assert_eq!(ec2.orders(&vm).await.unwrap(), Orders::Wait);
    }
    ec2.tend_pools().await.unwrap();
    assert_eq!(
        running(&aws).len(),
        2,
        "not idle for 4 s yet (the calls since the release take a while on a loaded machine)"
    );
    tokio::time::sleep(std::time::Duration::from_millis(4_200)).await;
    ec2.tend_pools().await.unwrap();
    let left = running(&aws);
    assert_eq!(left.len(), 1, "scaled in to min");

    // EC2 warns that the last one is reclaimed: it takes no more attempts, is
    // retired, and a new VM keeps the minimum.
    ec2.pool_vm_closing(&left[0]).await.unwrap();
    let c = JobId::generate(Timestamp(9_002));
    let third = ec2.allocate(&request(&c, 1)).await.unwrap();
    assert_ne!(third.id, left[0], "a closing VM takes no attempt");
    ec2.release(&third.key).await.unwrap();
    ec2.tend_pools().await.unwrap();
    let now = running(&aws);
    assert!(
        !now.contains(&left[0]),
        "the reclaimed VM is retired: {now:?}"
    );
    assert_eq!(now.len(), 1, "{now:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_is_launched_whole_reaching_only_itself_listed_once_and_terminated_whole() {
    let aws = Emulator::start();
    // The stack's group, as the template makes it: no inbound at all.
    let stack_group = aws.drive_python(
        r#"
import boto3
ec2 = boto3.client("ec2", endpoint_url="{endpoint}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
print(ec2.create_security_group(GroupName="gang-agents", Description="agents")["GroupId"])
"#,
    );
    let stack_group = stack_group.trim().to_owned();
    let ec2 = ec2_config(&aws, "gang", Vec::new(), vec![stack_group.clone()]);
    let job = JobId::generate(Timestamp(7_000));
    let key = AllocationKey {
        job: job.clone(),
        attempt: 1,
    };
    let req = AllocateRequest {
        key: key.clone(),
        project: "vision".into(),
        resources: Resources {
            nodes: 3,
            ..Resources::default()
        },
        placement: Placement::default(),
        image: None,
    };
    let vm = ec2.allocate(&req).await.unwrap();
    assert_eq!(vm.nodes, 3, "{vm:?}");
    // Asked again (a retried dispatch): the same gang, no new instance.
    assert_eq!(ec2.allocate(&req).await.unwrap().id, vm.id);
    let hosts = ec2
        .roster(&key)
        .await
        .unwrap()
        .expect("every node has an address");
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    let listed: Vec<_> = ec2
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.key == key)
        .collect();
    assert_eq!(
        listed.len(),
        1,
        "a gang is one VM to the broker: {listed:?}"
    );
    assert_eq!(
        (listed[0].id.as_str(), listed[0].nodes),
        (vm.id.as_str(), 3)
    );
    // As AWS's own SDK sees them: three instances of one launch, ranks 0 to 2,
    // rank 0's the gang's id, each with the same user data naming the gang's size.
    aws.python(&format!(
        r#"
import base64, boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
rs = ec2.describe_instances(Filters=[{{"Name": "tag:respawn:job", "Values": ["{job}"]}}])["Reservations"]
assert len(rs) == 1, rs
found = sorted(rs[0]["Instances"], key=lambda i: i["AmiLaunchIndex"])
assert [i["AmiLaunchIndex"] for i in found] == [0, 1, 2], found
assert found[0]["InstanceId"] == "{id}", found
for i in found:
    tags = {{t["Key"]: t["Value"] for t in i["Tags"]}}
    assert tags["respawn:nodes"] == "3", tags
    ud = ec2.describe_instance_attribute(InstanceId=i["InstanceId"], Attribute="userData")["UserData"]["Value"]
    assert "--nodes 3 --rank" in base64.b64decode(ud).decode()
assert [i["PrivateIpAddress"] for i in found] == {hosts:?}, (found, "the roster is in rank order")

# Every node is in the stack's group and the gang's own, which admits its members
# alone and lets them send only to each other.
gangs = ec2.describe_security_groups(Filters=[{{"Name": "tag:respawn:job", "Values": ["{job}"]}}])["SecurityGroups"]
assert len(gangs) == 1, gangs
gang = gangs[0]
for i in found:
    assert sorted(g["GroupId"] for g in i["SecurityGroups"]) == sorted(["{stack_group}", gang["GroupId"]]), i["SecurityGroups"]
def only_members(perms):
    assert len(perms) == 1, perms
    p = perms[0]
    assert p["IpProtocol"] == "-1" and not p.get("IpRanges") and not p.get("Ipv6Ranges"), p
    assert [g["GroupId"] for g in p["UserIdGroupPairs"]] == [gang["GroupId"]], p
only_members(gang["IpPermissions"])
only_members(gang["IpPermissionsEgress"])
tags = {{t["Key"]: t["Value"] for t in gang["Tags"]}}
assert tags["respawn:stack"] == "gang" and tags["respawn:attempt"] == "1", tags

# Groups of gangs that never launched: one made two hours ago (the broker died
# before its launch), one made now (its launch about to come).
import time
for name, age in (("stale", 7200), ("fresh", 0)):
    ec2.create_security_group(GroupName=name, Description=name, TagSpecifications=[{{
        "ResourceType": "security-group",
        "Tags": [{{"Key": "respawn:stack", "Value": "gang"}},
                 {{"Key": "respawn:job", "Value": "{other}"}},
                 {{"Key": "respawn:attempt", "Value": "1" if name == "stale" else "2"}},
                 {{"Key": "respawn:created", "Value": str(int(time.time()) - age)}}],
    }}])
"#,
        id = vm.id,
        hosts = hosts,
        other = JobId::generate(Timestamp(7_001)),
    ));
    assert_eq!(
        ec2.sweep_groups().await.unwrap(),
        1,
        "only the stale group goes: the live gang's and the fresh one stay"
    );
    ec2.release(&key).await.unwrap();
    assert_eq!(
        ec2.sweep_groups().await.unwrap(),
        1,
        "the released gang's group goes"
    );
    assert_eq!(
        ec2.describe(&key).await.unwrap().map(|v| v.state),
        Some(VmState::Terminated),
        "released whole"
    );
    aws.python(&format!(
        r#"
import boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
rs = ec2.describe_instances(Filters=[{{"Name": "tag:respawn:job", "Values": ["{job}"]}}])["Reservations"]
states = [i["State"]["Name"] for r in rs for i in r["Instances"]]
assert len(states) == 3 and all(s in ("shutting-down", "terminated") for s in states), states
names = sorted(g["GroupName"] for g in ec2.describe_security_groups(
    Filters=[{{"Name": "tag:respawn:stack", "Values": ["gang"]}}])["SecurityGroups"])
assert names == ["fresh"], names
"#
    ));
}

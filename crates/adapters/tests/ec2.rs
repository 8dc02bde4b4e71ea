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
use respawn_core::job::JobId;
use respawn_core::ports::compute::{AllocateRequest, AllocationKey, Compute, VmState};
use respawn_core::spec::{Placement, Resources};
use respawn_core::time::Timestamp;

#[path = "../../../tests/support/aws.rs"]
#[allow(dead_code)]
mod aws;

use aws::Emulator;

fn compute(aws: &Emulator, stack: &str) -> Ec2Compute {
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
            security_group_ids: Vec::new(),
            instance_profile: None,
            launch_template: None,
            agent: AgentBoot {
                api: "https://api.example".into(),
                bucket: "s3://respawn-test".into(),
                attempt_key: AttemptKey::from_bytes(&[9; 32]).unwrap(),
                heartbeat_secs: 30,
                grace_secs: 100,
            },
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

#![allow(clippy::unwrap_used)]

use super::*;
use respawn_core::attempt_auth::AttemptKey;

/// `DescribeInstances`'s answer, trimmed from the EC2 API reference's example.
const DESCRIBE: &str = r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>8f7724cf-496f-496e-8fe3-example</requestId>
  <reservationSet>
    <item>
      <reservationId>r-1234567890abcdef0</reservationId>
      <instancesSet>
        <item>
          <instanceId>i-1234567890abcdef0</instanceId>
          <imageId>ami-bff32ccc</imageId>
          <instanceState><code>16</code><name>running</name></instanceState>
          <instanceType>g5.xlarge</instanceType>
          <launchTime>2026-11-30T12:00:00.000Z</launchTime>
          <instanceLifecycle>spot</instanceLifecycle>
          <tagSet>
            <item><key>respawn:stack</key><value>prod</value></item>
            <item><key>respawn:job</key><value>01jdz8q7r8v3k2m4n5p6q7r8s9</value></item>
            <item><key>respawn:attempt</key><value>2</value></item>
          </tagSet>
        </item>
      </instancesSet>
    </item>
  </reservationSet>
  <nextToken>page-2</nextToken>
</DescribeInstancesResponse>"#;

#[test]
fn describe_answers_become_vms() {
    let d: Describe = quick_xml::de::from_str(DESCRIBE).unwrap();
    assert_eq!(d.next_token.as_deref(), Some("page-2"));
    let i = &d.reservations.item[0].instances.item[0];
    let vm = i.to_vm().unwrap();
    assert_eq!(vm.id, "i-1234567890abcdef0");
    assert_eq!(vm.key.job.as_str(), "01jdz8q7r8v3k2m4n5p6q7r8s9");
    assert_eq!(vm.key.attempt, 2);
    assert_eq!(vm.state, VmState::Running);
    assert!(vm.spot);
    assert_eq!(
        vm.created_at,
        Timestamp::parse_rfc3339("2026-11-30T12:00:00Z").unwrap()
    );
}

#[test]
fn an_empty_answer_has_no_instances() {
    let d: Describe = quick_xml::de::from_str(
        r#"<DescribeInstancesResponse><requestId>x</requestId><reservationSet/></DescribeInstancesResponse>"#,
    )
    .unwrap();
    assert!(d.reservations.item.is_empty());
    assert!(d.next_token.is_none());
}

#[test]
fn an_instance_without_respawn_tags_is_no_vm() {
    let i = Instance {
        id: "i-1".into(),
        state: InstanceState {
            name: "running".into(),
        },
        launch_time: String::new(),
        lifecycle: None,
        tags: Items::default(),
        launch_index: 0,
        private_ip: None,
    };
    assert!(matches!(i.to_vm(), Err(Error::Invalid(_))));
}

#[test]
fn error_codes_decide_capacity_passing_or_refusal() {
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>We currently do not have sufficient g5.xlarge capacity</Message></Error></Errors><RequestID>ea966190</RequestID></Response>"#;
    let parsed: ErrorResponse = quick_xml::de::from_str(xml).unwrap();
    assert_eq!(parsed.errors.error[0].code, "InsufficientInstanceCapacity");
    let err = |status, code: &str| Ec2Error {
        status,
        code: code.into(),
        message: "m".into(),
    };
    for code in [
        "InsufficientInstanceCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
    ] {
        assert!(
            matches!(err(400, code).into_compute(), Error::Capacity(_)),
            "{code}"
        );
    }
    for (status, code) in [
        (503, "Unavailable"),
        (400, "RequestLimitExceeded"),
        (0, ""),
        (500, "X"),
    ] {
        assert!(
            matches!(err(status, code).into_compute(), Error::Unavailable(_)),
            "{code}"
        );
    }
    for code in [
        "InvalidParameterValue",
        "InvalidAMIID.NotFound",
        "UnauthorizedOperation",
    ] {
        assert!(
            matches!(err(400, code).into_compute(), Error::Invalid(_)),
            "{code}"
        );
    }
}

#[test]
fn instance_types_by_gpu_model_and_count() {
    let t = InstanceTypes::default();
    let r = |gpus, model: Option<&str>| Resources {
        gpus,
        gpu_type: model.map(str::to_owned),
        ..Resources::default()
    };
    assert_eq!(t.choose(&r(0, None), "c6i.large").unwrap(), "c6i.large");
    assert_eq!(t.choose(&r(1, None), "c").unwrap(), "g5.xlarge");
    assert_eq!(t.choose(&r(2, Some("T4")), "c").unwrap(), "g4dn.12xlarge");
    assert_eq!(t.choose(&r(8, Some("h100")), "c").unwrap(), "p5.48xlarge");
    assert!(matches!(
        t.choose(&r(16, Some("h100")), "c"),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        t.choose(&r(1, Some("tpu")), "c"),
        Err(Error::Invalid(_))
    ));

    let custom = InstanceTypes::parse("t4:1=g4dn.2xlarge, a100:8=p4de.24xlarge", "t4").unwrap();
    assert_eq!(custom.choose(&r(1, None), "c").unwrap(), "g4dn.2xlarge");
    assert_eq!(
        custom.choose(&r(4, Some("a100")), "c").unwrap(),
        "p4de.24xlarge"
    );
    for bad in ["t4=g4dn", "t4:x=g4dn", "t4:1"] {
        assert!(InstanceTypes::parse(bad, "t4").is_err(), "{bad}");
    }
}

#[test]
fn the_client_token_is_per_stack_job_and_attempt_and_fits_ec2() {
    let job: JobId = "01jdz8q7r8v3k2m4n5p6q7r8s9".parse().unwrap();
    let key = |attempt| AllocationKey {
        job: job.clone(),
        attempt,
    };
    let t = client_token("prod", &key(1));
    assert_eq!(t.len(), 64);
    assert!(t.is_ascii());
    assert_eq!(t, client_token("prod", &key(1)));
    assert_ne!(t, client_token("prod", &key(2)));
    assert_ne!(t, client_token("dev", &key(1)));
}

#[test]
fn user_data_starts_the_agent_with_its_attempts_credential_quoted() {
    let job: JobId = "01jdz8q7r8v3k2m4n5p6q7r8s9".parse().unwrap();
    let key = AllocationKey {
        job: job.clone(),
        attempt: 3,
    };
    let attempt_key = AttemptKey::from_bytes(&[7; 32]).unwrap();
    let agent = AgentBoot {
        api: "https://api.example/it's".into(),
        bucket: "s3://bucket".into(),
        attempt_key: attempt_key.clone(),
        heartbeat_secs: 30,
        grace_secs: 100,
        otlp: None,
    };
    let script = user_data(&agent, &key, 1);
    assert!(script.starts_with("#!/bin/bash\n"));
    let credential = attempt_key.credential(&job, 3);
    assert!(script.contains(&credential));
    // The quote in the URL cannot end the shell's string early.
    assert!(script.contains(r"it'\''s"));
    assert!(script.contains(&format!("--job {job} --attempt 3 --imds")));
    assert!(script.contains("--bucket 's3://bucket'"));
    // The instance shuts down however the script ends.
    assert!(script.contains("trap 'shutdown -h now' EXIT"));
    // The workload runs as a uid of its own, which the firewall keeps from the
    // instance metadata (the instance profile's credentials).
    assert!(script.contains(&format!("--workload-uid {}", crate::cloudvm::WORKLOAD_UID)));
    assert!(
        script.contains("iptables -I OUTPUT -d 169.254.169.254 -m owner ! --uid-owner 0 -j REJECT")
    );
    assert!(!script.contains("OTEL_"), "no collector named, no export");
    // A collector named: the agent's spans go there.
    let traced = AgentBoot {
        otlp: Some("http://collector.internal:4318".into()),
        ..agent
    };
    let script = user_data(&traced, &key, 1);
    let export = "export OTEL_EXPORTER_OTLP_ENDPOINT='http://collector.internal:4318'\n";
    let at = script.find(export).expect("the endpoint exported");
    assert!(script.contains(
        "export OTEL_RESOURCE_ATTRIBUTES=\"cloud.provider=aws,cloud.platform=aws_ec2,host.id=$vm\"\n"
    ));
    assert!(at < script.find("respawn-agent --bucket").unwrap());
    // Only root (the agent) reaches it: the workload could forge other jobs'
    // spans.
    assert!(script.contains(
        "iptables -I OUTPUT -d 'collector.internal' -p tcp --dport 4318 -m owner ! --uid-owner 0 -j REJECT"
    ));
    assert!(
        script
            .contains("iptables -I FORWARD -d 'collector.internal' -p tcp --dport 4318 -j REJECT")
    );
}

#[test]
fn agents_collector_endpoints_are_checked() {
    use crate::cloudvm::otlp_endpoint;
    assert_eq!(otlp_endpoint("  "), Ok(None));
    assert_eq!(
        otlp_endpoint("http://10.0.0.5:4318").unwrap().as_deref(),
        Some("http://10.0.0.5:4318")
    );
    assert!(otlp_endpoint("https://otel.example/v1").unwrap().is_some());
    assert!(otlp_endpoint("http://[fd00::5]:4318").unwrap().is_some());
    for bad in [
        "10.0.0.5:4318",
        "ftp://x",
        "http://",
        "http://a b",
        "http://h:port",
        "http://$(id)",
    ] {
        assert!(otlp_endpoint(bad).is_err(), "{bad}");
    }
}

fn config() -> Ec2Config {
    Ec2Config {
        stack: "prod".into(),
        image_id: "ami-1".into(),
        cpu_instance_type: "c6i.large".into(),
        instance_types: InstanceTypes::default(),
        subnet_id: Some("subnet-1".into()),
        vpc_id: Some("vpc-1".into()),
        security_group_ids: vec!["sg-1".into(), "sg-2".into()],
        instance_profile: Some("agents".into()),
        launch_template: None,
        agent: AgentBoot {
            api: "https://api.example".into(),
            bucket: "s3://b".into(),
            attempt_key: AttemptKey::from_bytes(&[1; 32]).unwrap(),
            heartbeat_secs: 30,
            grace_secs: 100,
            otlp: None,
        },
        pools: Vec::new(),
        placement_group: Some("rs-gangs".into()),
    }
}

fn allocation(spot: bool, max_price: Option<f64>) -> AllocateRequest {
    AllocateRequest {
        key: AllocationKey {
            job: "01jdz8q7r8v3k2m4n5p6q7r8s9".parse().unwrap(),
            attempt: 1,
        },
        project: "vision".into(),
        resources: Resources::default(),
        placement: respawn_core::spec::Placement {
            spot,
            max_price,
            ..Default::default()
        },
        image: None,
    }
}

fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter()
        .find(|(name, _)| name == k)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_gang_is_one_launch_of_all_its_nodes_in_the_placement_group() {
    let mut req = allocation(true, None);
    req.resources.nodes = 4;
    let mut launch = attempt_launch(&config(), &req).unwrap();
    launch.groups.push("sg-gang".into());
    let p = run_params(&config(), &launch);
    assert_eq!(get(&p, "MinCount"), Some("4"), "all of the gang or none");
    // The call's groups replace the launch template's: the stack's stay named.
    assert_eq!(
        [
            "SecurityGroupId.1",
            "SecurityGroupId.2",
            "SecurityGroupId.3"
        ]
        .map(|k| get(&p, k)),
        [Some("sg-1"), Some("sg-2"), Some("sg-gang")]
    );
    assert_eq!(get(&p, "MaxCount"), Some("4"));
    assert_eq!(get(&p, "Placement.GroupName"), Some("rs-gangs"));
    assert_eq!(get(&p, "TagSpecification.1.Tag.5.Key"), Some(TAG_NODES));
    assert_eq!(get(&p, "TagSpecification.1.Tag.5.Value"), Some("4"));
    let script = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(get(&p, "UserData").unwrap())
            .unwrap(),
    )
    .unwrap();
    assert!(script.contains("--nodes 4 --rank \"$(curl"), "{script}");
    assert!(script.contains("meta-data/ami-launch-index"), "{script}");

    // A single node: one instance, no group.
    let p = run_params(
        &config(),
        &attempt_launch(&config(), &allocation(true, None)).unwrap(),
    );
    assert_eq!(get(&p, "MinCount"), Some("1"));
    assert_eq!(get(&p, "Placement.GroupName"), None);
    assert!(!p.iter().any(|(_, v)| v == TAG_NODES));
}

#[test]
fn run_parameters_carry_spot_tags_network_and_the_launch_template() {
    let req = allocation(true, Some(0.5));
    let p = run_params(&config(), &attempt_launch(&config(), &req).unwrap());
    assert_eq!(get(&p, "InstanceMarketOptions.MarketType"), Some("spot"));
    assert_eq!(
        get(&p, "InstanceMarketOptions.SpotOptions.MaxPrice"),
        Some("0.5")
    );
    assert_eq!(get(&p, "SubnetId"), Some("subnet-1"));
    assert_eq!(get(&p, "SecurityGroupId.2"), Some("sg-2"));
    assert_eq!(get(&p, "IamInstanceProfile.Name"), Some("agents"));
    assert_eq!(get(&p, "TagSpecification.1.Tag.4.Key"), Some(TAG_PROJECT));
    assert_eq!(get(&p, "TagSpecification.1.Tag.4.Value"), Some("vision"));
    assert_eq!(get(&p, "TagSpecification.2.ResourceType"), Some("volume"));
    assert_eq!(get(&p, "MetadataOptions.HttpTokens"), Some("required"));
    assert_eq!(get(&p, "LaunchTemplate.LaunchTemplateId"), None);

    // On demand (the placement fell back): no market options at all.
    let req = allocation(false, None);
    let p = run_params(&config(), &attempt_launch(&config(), &req).unwrap());
    assert!(
        p.iter()
            .all(|(k, _)| !k.starts_with("InstanceMarketOptions"))
    );

    let mut cfg = config();
    cfg.launch_template = Some("lt-0abc".into());
    let req = allocation(true, None);
    let p = run_params(&cfg, &attempt_launch(&cfg, &req).unwrap());
    assert_eq!(get(&p, "LaunchTemplate.LaunchTemplateId"), Some("lt-0abc"));
    assert_eq!(get(&p, "LaunchTemplate.Version"), Some("$Latest"));
}

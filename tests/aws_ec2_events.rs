//! EC2's spot events as an EventBridge rule delivers them to SQS on the AWS
//! emulator, injected with PutEvents as the test harness will inject interruptions
//! (tests/aws/eventbridge_to_sqs.py, boto3), decoded by `respawn_core::cloud::ec2`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use respawn_core::cloud::ec2::{Ec2EventKind, INTERRUPTION_NOTICE, decode};
use respawn_core::time::{Clock, SystemClock};
use respawn_e2e::aws::Emulator;

#[test]
fn interruptions_rebalances_and_state_changes_arrive_decodable() {
    let aws = Emulator::start();
    let files = [
        "eventbridge-ec2-spot-interruption.json",
        "eventbridge-ec2-rebalance.json",
        "eventbridge-ec2-state-change.json",
    ]
    .map(Emulator::fixture);
    let mut args = vec!["ec2-events"];
    args.extend(files.iter().map(String::as_str));
    let now = SystemClock.now();
    let mut kinds = Vec::new();
    for body in aws.drive("eventbridge_to_sqs.py", &args) {
        let e = decode(body.as_bytes())
            .unwrap_or_else(|e| panic!("{e}: {body}"))
            .unwrap_or_else(|| panic!("an event respawn acts on: {body}"));
        // EventBridge stamps the time it took the event.
        assert!(
            e.at.since(now) < Duration::from_secs(60) && now.since(e.at) < Duration::from_secs(60),
            "{e:?}"
        );
        match &e.kind {
            Ec2EventKind::Interruption { action, deadline } => {
                assert_eq!(e.instance_id, "i-1234567890abcdef0");
                assert_eq!(action, "terminate");
                assert_eq!(*deadline, e.at.plus(INTERRUPTION_NOTICE));
                kinds.push("interruption");
            }
            Ec2EventKind::Rebalance => {
                assert_eq!(e.instance_id, "i-1234567890abcdef0");
                kinds.push("rebalance");
            }
            Ec2EventKind::State(state) => {
                assert_eq!(e.instance_id, "i-abcd1111");
                assert_eq!(state, "terminated");
                kinds.push("state");
            }
        }
    }
    kinds.sort_unstable();
    assert_eq!(kinds, ["interruption", "rebalance", "state"]);
}

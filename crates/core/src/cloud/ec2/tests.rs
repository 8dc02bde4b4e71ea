use super::*;
use crate::cloud::fixture;

fn event(name: &str) -> Ec2Event {
    decode(&fixture(name))
        .expect("decodes")
        .expect("an event respawn acts on")
}

#[test]
fn an_interruption_warning_gives_two_minutes_from_its_time() {
    let e = event("eventbridge-ec2-spot-interruption.json");
    assert_eq!(e.instance_id, "i-1234567890abcdef0");
    let at = Timestamp::parse_rfc3339("2026-12-01T08:20:00Z").expect("time");
    assert_eq!(e.at, at);
    assert_eq!(
        e.kind,
        Ec2EventKind::Interruption {
            action: "terminate".into(),
            deadline: Timestamp::parse_rfc3339("2026-12-01T08:22:00Z").expect("time"),
        }
    );
}

#[test]
fn rebalance_and_state_changes() {
    assert_eq!(
        event("eventbridge-ec2-rebalance.json").kind,
        Ec2EventKind::Rebalance
    );
    let e = event("eventbridge-ec2-state-change.json");
    assert_eq!(e.instance_id, "i-abcd1111");
    assert_eq!(e.kind, Ec2EventKind::State("terminated".into()));
}

#[test]
fn other_ec2_events_are_not_acted_on() {
    let body = String::from_utf8(fixture("eventbridge-ec2-rebalance.json"))
        .expect("UTF-8")
        .replace(
            "EC2 Instance Rebalance Recommendation",
            "EC2 AMI State Change",
        );
    assert_eq!(decode(body.as_bytes()).expect("decodes"), None);
}

#[test]
fn what_is_wrong_is_said_with_its_path() {
    let err = |body: &str| decode(body.as_bytes()).expect_err("refused");
    let spot = String::from_utf8(fixture("eventbridge-ec2-spot-interruption.json")).expect("UTF-8");
    assert_eq!(err("{}").path, "");
    assert!(err("{}").message.contains("source"), "{}", err("{}"));
    assert_eq!(err(&spot.replace("aws.ec2", "aws.s3")).path, "source");
    assert_eq!(
        err(&spot.replace("2026-12-01T08:20:00Z", "yesterday")).path,
        "time"
    );
    let e = err(&spot.replace("\"instance-id\"", "\"id\""));
    assert_eq!(e.path, "detail", "{e}");
    assert!(e.message.contains("instance-id"), "{e}");
    let e = err(&spot.replace("\"instance-action\": \"terminate\"", "\"x\": 1"));
    assert!(e.message.contains("instance-action"), "{e}");
    let e = err(&spot.replace(
        "\"instance-id\": \"i-1234567890abcdef0\"",
        "\"instance-id\": 7",
    ));
    assert_eq!(e.path, "detail.instance-id", "{e}");
}

proptest::proptest! {
    #[test]
    fn any_body_is_decoded_or_refused(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
        let _ = decode(&body);
    }
}

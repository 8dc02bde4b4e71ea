use proptest::prelude::*;

use super::*;
use crate::cloud::fixture;

fn created(body: &[u8]) -> Vec<S3Object> {
    match decode(body) {
        Ok(S3Message::Created(objects)) => objects,
        other => panic!("expected objects, got {other:?}"),
    }
}

fn error(body: &str) -> EventError {
    decode(body.as_bytes()).expect_err("refused")
}

#[test]
fn a_notification_gives_the_decoded_key_and_the_sequencer() {
    let objects = created(&fixture("s3-object-created.json"));
    assert_eq!(
        objects,
        [S3Object {
            bucket: "DOC-EXAMPLE-BUCKET".into(),
            blob: BlobCreated {
                key: "incoming/day 1/bär + baz.csv".into(),
                version: "s:0C0F6F405D6ED209E1".into(),
                size: 1_305_107,
            },
        }]
    );
}

#[test]
fn sns_wraps_the_same_notification() {
    assert_eq!(
        created(&fixture("sns-s3-object-created.json")),
        created(&fixture("s3-object-created.json"))
    );
}

#[test]
fn eventbridge_keys_are_taken_as_they_are_and_versions_win() {
    let objects = created(&fixture("eventbridge-s3-object-created.json"));
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].bucket, "DOC-EXAMPLE-BUCKET1");
    assert_eq!(objects[0].blob.key, "incoming/day 1/example-key+1.csv");
    assert_eq!(
        objects[0].blob.version,
        "v:IYV3p45BT0ac8hjHg1houSdS1a.Mro8e"
    );
    assert_eq!(objects[0].blob.size, 5);
}

#[test]
fn the_test_event_and_removals_make_nothing() {
    assert_eq!(
        decode(&fixture("s3-test-event.json")).expect("the test event"),
        S3Message::Test {
            bucket: "DOC-EXAMPLE-BUCKET".into()
        }
    );
    assert!(created(&fixture("s3-object-removed.json")).is_empty());
    let deleted = String::from_utf8(fixture("eventbridge-s3-object-created.json"))
        .expect("UTF-8")
        .replace("Object Created", "Object Deleted");
    assert!(created(deleted.as_bytes()).is_empty());
}

#[test]
fn without_a_version_id_the_sequencer_then_the_etag_tells_uploads_apart() {
    let body = |object: &str| {
        format!(
            r#"{{"Records":[{{"eventSource":"aws:s3","eventName":"ObjectCreated:Put",
            "s3":{{"bucket":{{"name":"b"}},"object":{{"key":"k",{object}}}}}}}]}}"#
        )
    };
    let version = |object: &str| created(body(object).as_bytes())[0].blob.version.clone();
    assert_eq!(
        version(r#""versionId":"null","sequencer":"0A","eTag":"e1""#),
        "s:0A"
    );
    assert_eq!(version(r#""eTag":"\"e1\"""#), "e:e1");
    let e = error(&body(r#""size":1"#));
    assert_eq!(e.path, "Records[0].s3.object");
}

#[test]
fn what_is_wrong_is_said_with_its_path() {
    assert!(error("{").message.starts_with("not JSON"));
    assert!(error("[]").message.contains("not an S3 notification"));
    assert!(
        error(r#"{"detail-type":"Object Created","source":"aws.ec2"}"#)
            .message
            .contains("not an S3 notification")
    );
    let e = error(
        r#"{"Records":[{"eventSource":"aws:sqs","eventName":"x","s3":{"bucket":{"name":"b"},"object":{"key":"k"}}}]}"#,
    );
    assert_eq!(e.path, "Records[0].eventSource");
    let e = error(
        r#"{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{}}}]}"#,
    );
    assert_eq!(e.path, "Records[0].s3.object");
    assert!(e.message.contains("key"), "{e}");
    let e = error(
        r#"{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"%FF","eTag":"e"}}}]}"#,
    );
    assert_eq!(e.path, "Records[0].s3.object.key");
    let inner = r#"{\"Records\":[{\"eventSource\":\"aws:s3\"}]}"#;
    let e = error(&format!(r#"{{"Type":"Notification","Message":"{inner}"}}"#));
    assert!(e.path.starts_with("Message.Records[0]"), "{e}");
    assert!(e.to_string().starts_with("Message.Records[0]"), "{e}");
    let e = error(
        r#"{"Type":"Notification","Message":"{\"Type\":\"Notification\",\"Message\":\"{}\"}"}"#,
    );
    assert_eq!(e.path, "Message", "SNS inside SNS is refused: {e}");
}

/// How S3 spells a key in a notification: everything but unreserved characters and
/// `/` percent-encoded, a space as `+`.
fn s3_encode(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b' ' => out.push('+'),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

proptest! {
    #[test]
    fn any_key_comes_back_as_it_was_uploaded(key in "\\PC{1,64}") {
        let body = serde_json::json!({"Records": [{
            "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "b"}, "object": {"key": s3_encode(&key), "sequencer": "01"}}
        }]});
        let objects = created(body.to_string().as_bytes());
        prop_assert_eq!(&objects[0].blob.key, &key);
    }

    #[test]
    fn any_body_is_decoded_or_refused(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&body);
    }

    #[test]
    fn any_json_is_decoded_or_refused(
        records in proptest::option::of(proptest::collection::vec(any::<Option<String>>(), 0..4)),
        ty in proptest::option::of("Notification|x"),
        message in proptest::option::of(".{0,40}"),
    ) {
        let mut body = serde_json::json!({});
        if let Some(r) = records { body["Records"] = serde_json::json!(r); }
        if let Some(t) = ty { body["Type"] = t.into(); }
        if let Some(m) = message { body["Message"] = m.into(); }
        let _ = decode(body.to_string().as_bytes());
    }
}

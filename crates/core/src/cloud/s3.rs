//! S3 "object created" notifications, in each form they reach a queue or a function:
//!
//! - an S3 event notification (`{"Records": [...]}`), sent by S3 to SQS, SNS or
//!   Lambda; its keys are URL-encoded, with `+` for a space;
//! - the `s3:TestEvent` S3 sends when a notification is configured;
//! - an SNS notification whose `Message` holds one of these (SNS → SQS without raw
//!   delivery);
//! - an EventBridge event from `aws.s3` (`detail-type: Object Created`), whose keys are
//!   not encoded.
//!
//! Other S3 events (`ObjectRemoved:*`, `Object Deleted`, …) decode to no object: a
//! trigger rule reacts to new objects only.

use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::{EventError, at, typed, within};
use crate::handlers::BlobCreated;

/// What one message body said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Message {
    /// S3 checking that it can deliver to the destination: nothing to do.
    Test { bucket: String },
    /// Objects created (none when every record was another kind of event).
    Created(Vec<S3Object>),
}

/// A new object, or a new version of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    pub bucket: String,
    /// Key (decoded), size, and the version that identifies this upload: the object's
    /// version id on a versioned bucket, else the event's `sequencer` (unique per
    /// write of a key, the same when a notification is delivered again), else its ETag.
    pub blob: BlobCreated,
}

/// Decodes one message body.
pub fn decode(body: &[u8]) -> Result<S3Message, EventError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| at("", format!("not JSON: {e}")))?;
    decode_value(value, true)
}

fn decode_value(value: serde_json::Value, unwrap_sns: bool) -> Result<S3Message, EventError> {
    let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
    if value.get("Records").is_some() {
        let n: Notification = typed(value)?;
        return n.objects().map(S3Message::Created);
    }
    if field("Event") == Some("s3:TestEvent") {
        let t: TestEvent = typed(value)?;
        return Ok(S3Message::Test { bucket: t.bucket });
    }
    if unwrap_sns && field("Type") == Some("Notification") {
        let message = field("Message")
            .ok_or_else(|| at("Message", "an SNS notification without a Message"))?;
        let inner: serde_json::Value =
            serde_json::from_str(message).map_err(|e| at("Message", format!("not JSON: {e}")))?;
        // One level: SNS does not wrap SNS.
        return decode_value(inner, false).map_err(|e| within(e, "Message"));
    }
    if field("source") == Some("aws.s3") && value.get("detail-type").is_some() {
        let e: Bridge = typed(value)?;
        return Ok(S3Message::Created(e.object()?.into_iter().collect()));
    }
    Err(at(
        "",
        "not an S3 notification: expected `Records`, an `s3:TestEvent`, an SNS \
         notification holding one, or an EventBridge event from `aws.s3`",
    ))
}

#[derive(Deserialize)]
struct TestEvent {
    #[serde(rename = "Bucket")]
    bucket: String,
}

#[derive(Deserialize)]
struct Notification {
    #[serde(rename = "Records")]
    records: Vec<Record>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    event_source: String,
    event_name: String,
    s3: RecordS3,
}

#[derive(Deserialize)]
struct RecordS3 {
    bucket: Bucket,
    object: RecordObject,
}

#[derive(Deserialize)]
struct Bucket {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordObject {
    key: String,
    #[serde(default)]
    size: u64,
    #[serde(default, rename = "eTag")]
    e_tag: Option<String>,
    #[serde(default)]
    version_id: Option<String>,
    #[serde(default)]
    sequencer: Option<String>,
}

impl Notification {
    fn objects(self) -> Result<Vec<S3Object>, EventError> {
        let mut out = Vec::new();
        for (i, r) in self.records.into_iter().enumerate() {
            let field = |name: &str| format!("Records[{i}].{name}");
            if r.event_source != "aws:s3" {
                return Err(at(
                    field("eventSource"),
                    format!("expected \"aws:s3\", got {:?}", r.event_source),
                ));
            }
            if !r.event_name.starts_with("ObjectCreated:") {
                continue;
            }
            let o = r.s3.object;
            let key = decode_key(&o.key).map_err(|m| at(field("s3.object.key"), m))?;
            let version = version(o.version_id, o.sequencer, o.e_tag)
                .ok_or_else(|| at(field("s3.object"), NO_VERSION))?;
            out.push(S3Object {
                bucket: r.s3.bucket.name,
                blob: BlobCreated {
                    key,
                    version,
                    size: o.size,
                },
            });
        }
        Ok(out)
    }
}

#[derive(Deserialize)]
struct Bridge {
    #[serde(rename = "detail-type")]
    detail_type: String,
    detail: BridgeDetail,
}

#[derive(Deserialize)]
struct BridgeDetail {
    bucket: Bucket,
    object: BridgeObject,
}

#[derive(Deserialize)]
struct BridgeObject {
    key: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default, rename = "version-id")]
    version_id: Option<String>,
    #[serde(default)]
    sequencer: Option<String>,
}

impl Bridge {
    fn object(self) -> Result<Option<S3Object>, EventError> {
        if self.detail_type != "Object Created" {
            return Ok(None);
        }
        let o = self.detail.object;
        let version = version(o.version_id, o.sequencer, o.etag)
            .ok_or_else(|| at("detail.object", NO_VERSION))?;
        Ok(Some(S3Object {
            bucket: self.detail.bucket.name,
            blob: BlobCreated {
                // EventBridge gives keys as they are.
                key: o.key,
                version,
                size: o.size,
            },
        }))
    }
}

const NO_VERSION: &str = "no versionId, sequencer or eTag to tell this upload from another";

fn version(
    version_id: Option<String>,
    sequencer: Option<String>,
    etag: Option<String>,
) -> Option<String> {
    // Unversioned buckets report the version id "null".
    let some = |s: Option<String>| s.filter(|s| !s.is_empty() && s != "null");
    some(version_id)
        .map(|v| format!("v:{v}"))
        .or_else(|| some(sequencer).map(|s| format!("s:{s}")))
        .or_else(|| some(etag).map(|e| format!("e:{}", e.trim_matches('"'))))
}

/// A key as S3 notifications spell it: URL-encoded, `+` for a space.
fn decode_key(raw: &str) -> Result<String, String> {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|_| format!("the key {raw:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests;

//! Azure Blob storage's "blob created" events, as Event Grid delivers them to a
//! Storage Queue (one event a message) or to a webhook (a batch):
//!
//! - the Event Grid schema (`eventType`, `topic`, `eventTime`, …), one event or an
//!   array;
//! - the CloudEvents 1.0 schema (`specversion`, `type`, `source`, …), one event or an
//!   array (`application/cloudevents-batch+json`);
//! - Event Grid's subscription validation event, which a webhook answers with its
//!   `validationCode` (CloudEvents endpoints are validated with an HTTP `OPTIONS`
//!   handshake instead, which the host answers).
//!
//! Other events (`BlobDeleted`, …) decode to no blob, and so does the `CreateFile`
//! of a hierarchical-namespace account: its content comes with the `FlushWithClose`
//! that follows.

use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::{EventError, at, typed, within};
use crate::handlers::BlobCreated;

const BLOB_CREATED: &str = "Microsoft.Storage.BlobCreated";
const VALIDATION: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";

/// What one delivery said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GridMessage {
    /// Event Grid asks a new webhook subscription to prove it is the endpoint's:
    /// answer `{"validationResponse": code}`.
    Validation { code: String },
    /// Blobs created (none when every event was another kind).
    Created(Vec<GridBlob>),
}

/// A new blob, or a new version of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GridBlob {
    /// The storage account (from the event's topic or source).
    pub account: String,
    pub container: String,
    /// Name, size, and the version that identifies this write: the event's
    /// `sequencer` (unique per write of a blob, the same when the event is delivered
    /// again), else its ETag.
    pub blob: BlobCreated,
}

/// One event in either schema.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    /// Event Grid schema.
    #[serde(default)]
    event_type: Option<String>,
    #[serde(default)]
    topic: Option<String>,
    /// CloudEvents.
    #[serde(default, rename = "type")]
    ce_type: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    specversion: Option<String>,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    data: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Validation {
    validation_code: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    #[serde(default)]
    api: String,
    #[serde(default)]
    e_tag: Option<String>,
    #[serde(default)]
    content_length: u64,
    #[serde(default)]
    sequencer: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

/// Decodes one delivery (a queue message's body, or a webhook request's).
pub fn decode(body: &[u8]) -> Result<GridMessage, EventError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| at("", format!("not JSON: {e}")))?;
    let (events, batch) = match value {
        serde_json::Value::Array(items) => (items, true),
        one => (vec![one], false),
    };
    let mut blobs = Vec::new();
    for (i, value) in events.into_iter().enumerate() {
        let path = |p: &str| match (batch, p.is_empty()) {
            (true, true) => format!("[{i}]"),
            (true, false) => format!("[{i}].{p}"),
            (false, _) => p.to_owned(),
        };
        let event: Event = typed(value).map_err(|e| within(e, &path("")))?;
        let (kind, origin) = match (&event.event_type, &event.ce_type) {
            (Some(kind), _) => (kind.as_str(), event.topic.as_deref()),
            (None, Some(kind)) if event.specversion.as_deref() == Some("1.0") => {
                (kind.as_str(), event.source.as_deref())
            }
            _ => {
                return Err(at(
                    path(""),
                    "not an Event Grid event: expected `eventType` (Event Grid schema) \
                     or `type` with `specversion: \"1.0\"` (CloudEvents)",
                ));
            }
        };
        match kind {
            VALIDATION => {
                let v: Validation = typed(event.data).map_err(|e| within(e, &path("data")))?;
                return Ok(GridMessage::Validation {
                    code: v.validation_code,
                });
            }
            BLOB_CREATED => {}
            _ => continue,
        }
        let data: Created = typed(event.data).map_err(|e| within(e, &path("data")))?;
        if data.api == "CreateFile" {
            continue;
        }
        let account = origin
            .and_then(|o| o.rsplit_once("/storageAccounts/"))
            .map(|(_, a)| a.trim_end_matches('/').to_owned())
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| {
                at(
                    path(if event.topic.is_some() {
                        "topic"
                    } else {
                        "source"
                    }),
                    "expected …/providers/Microsoft.Storage/storageAccounts/<account>",
                )
            })?;
        let (container, name) = blob_of(&event.subject, data.url.as_deref()).ok_or_else(|| {
            at(
                path("subject"),
                format!(
                    "expected /blobServices/default/containers/<container>/blobs/<name>, got {:?}",
                    event.subject
                ),
            )
        })?;
        let some = |s: Option<String>| s.filter(|s| !s.is_empty());
        let version = some(data.sequencer)
            .map(|s| format!("s:{s}"))
            .or_else(|| some(data.e_tag).map(|e| format!("e:{}", e.trim_matches('"'))))
            .ok_or_else(|| {
                at(
                    path("data"),
                    "no sequencer or eTag to tell this write from another",
                )
            })?;
        blobs.push(GridBlob {
            account,
            container,
            blob: BlobCreated {
                key: name,
                version,
                size: data.content_length,
            },
        });
    }
    Ok(GridMessage::Created(blobs))
}

/// The container and blob name of an event: from its subject (the name as it is),
/// else from the blob's URL (percent-encoded). A subject with U+FFFD lost characters
/// on the way (Event Grid has been seen to replace some), so the URL is asked then.
fn blob_of(subject: &str, url: Option<&str>) -> Option<(String, String)> {
    if !subject.contains('\u{FFFD}')
        && let Some(rest) = subject.strip_prefix("/blobServices/default/containers/")
        && let Some((container, name)) = rest.split_once("/blobs/")
        && !container.is_empty()
        && !name.is_empty()
    {
        return Some((container.to_owned(), name.to_owned()));
    }
    // https://<account>.blob.core.windows.net/<container>/<name>
    let path = url?.split_once("://")?.1.split_once('/')?.1;
    let path = path.split(['?', '#']).next()?;
    let (container, name) = path.split_once('/')?;
    let name = percent_decode_str(name).decode_utf8().ok()?;
    (!container.is_empty() && !name.is_empty()).then(|| (container.to_owned(), name.into_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../../schemas/fixtures/azure/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn created(body: &[u8]) -> Vec<GridBlob> {
        match decode(body) {
            Ok(GridMessage::Created(blobs)) => blobs,
            other => panic!("expected blobs, got {other:?}"),
        }
    }

    fn the_blob() -> GridBlob {
        GridBlob {
            account: "my-storage-account".into(),
            container: "test-container".into(),
            blob: BlobCreated {
                key: "incoming/day 1/bär + baz.csv".into(),
                version: "s:00000000000004420000000000028963".into(),
                size: 524_288,
            },
        }
    }

    #[test]
    fn both_schemas_give_the_same_blob_one_event_or_a_batch() {
        let grid = fixture("eventgrid-blob-created.json");
        let cloud = fixture("cloudevents-blob-created.json");
        assert_eq!(created(&grid), [the_blob()]);
        assert_eq!(created(&cloud), [the_blob()]);
        // A queue message holds one event, not an array.
        let one: serde_json::Value = serde_json::from_slice(&grid).unwrap();
        assert_eq!(created(one[0].to_string().as_bytes()), [the_blob()]);
        let batch = format!("[{}]", String::from_utf8(cloud).unwrap());
        assert_eq!(created(batch.as_bytes()), [the_blob()]);
    }

    #[test]
    fn the_validation_event_gives_its_code() {
        assert_eq!(
            decode(&fixture("eventgrid-subscription-validation.json")).unwrap(),
            GridMessage::Validation {
                code: "512d38b6-c7b8-40c8-89fe-f46f9e9622b6".into()
            }
        );
    }

    #[test]
    fn deletions_and_create_file_make_nothing() {
        assert_eq!(created(&fixture("eventgrid-blob-deleted.json")), []);
        let mut e: serde_json::Value =
            serde_json::from_slice(&fixture("eventgrid-blob-created.json")).unwrap();
        e[0]["data"]["api"] = "CreateFile".into();
        assert_eq!(created(e.to_string().as_bytes()), []);
    }

    #[test]
    fn without_a_sequencer_the_etag_and_without_a_subject_the_url() {
        let mut e: serde_json::Value =
            serde_json::from_slice(&fixture("cloudevents-blob-created.json")).unwrap();
        e["data"]["sequencer"] = serde_json::Value::Null;
        e["subject"] = "".into();
        let got = created(e.to_string().as_bytes());
        assert_eq!(got[0].blob.version, "e:0x8D4BCC2E4835CD0");
        assert_eq!(got[0].blob.key, "incoming/day 1/bär + baz.csv");
        assert_eq!(got[0].container, "test-container");
        e["subject"] = "/blobServices/default/containers/test-container/blobs/incoming/day 1/b\u{FFFD}r + baz.csv".into();
        e["data"]["url"] = "https://a.blob.core.windows.net/test-container/%F0%9F%93%88.csv".into();
        assert_eq!(
            created(e.to_string().as_bytes())[0].blob.key,
            "📈.csv",
            "the URL when the subject lost characters"
        );
    }

    #[test]
    fn what_is_wrong_is_said_with_its_path() {
        let mut e: serde_json::Value =
            serde_json::from_slice(&fixture("eventgrid-blob-created.json")).unwrap();
        e[0]["data"]["contentLength"] = "big".into();
        let err = decode(e.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.path, "[0].data.contentLength", "{err}");
        e[0]["data"]["contentLength"] = 1.into();
        e[0]["topic"] = "/subscriptions/x".into();
        let err = decode(e.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.path, "[0].topic", "{err}");
        let err = decode(br#"{"hello": 1}"#).unwrap_err();
        assert!(err.message.contains("not an Event Grid event"), "{err}");
        let err = decode(b"not json").unwrap_err();
        assert!(err.message.contains("not JSON"), "{err}");
    }

    proptest! {
        #[test]
        fn any_blob_name_comes_back_as_it_was_written(name in "[^\\x00-\\x1f\\x{FFFD}]{1,64}") {
            let mut e: serde_json::Value =
                serde_json::from_slice(&fixture("cloudevents-blob-created.json")).unwrap();
            e["subject"] = format!("/blobServices/default/containers/c/blobs/{name}").into();
            let got = created(e.to_string().as_bytes());
            prop_assert_eq!(&got[0].blob.key, &name);
        }

        #[test]
        fn any_body_is_decoded_or_refused(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&body);
        }
    }
}

//! The object-store ledger, tokens and secrets on Azure Blob storage, and the queue
//! on Storage Queues, against the
//! Azure storage emulator (`localstack/azurite-start`, Azurite) this test process
//! starts: it fails, never skips, when the emulator cannot run.
#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use object_store::azure::MicrosoftAzureBuilder;
use respawn_adapters::azqueue::{SharedKey, StorageQueue};
use respawn_adapters::objstore::{ObjectStoreLedger, ObjectStoreSecrets, ObjectStoreTokens};
use respawn_core::ports::Blobs;
use respawn_core::ports::queue::{Queue, Receive};

#[path = "../../../tests/support/azure.rs"]
#[allow(dead_code)]
mod azure;

/// A new container of the emulator's development account, opened in
/// `object_store`'s emulator mode.
fn container(prefix: &str) -> Blobs {
    let name = azure::unique(prefix);
    azure::azurite().container(&name);
    Arc::new(
        MicrosoftAzureBuilder::new()
            .with_use_emulator(true)
            .with_container_name(name)
            .build()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_passes_its_conformance_suite_on_blob_storage() {
    let ledger = ObjectStoreLedger::new(container("ledger"));
    respawn_core::conformance::ledger::run(&ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_secrets_pass_their_conformance_suites_on_blob_storage() {
    let state = container("state");
    respawn_core::conformance::tokens::run(&ObjectStoreTokens::new(state.clone())).await;
    respawn_core::conformance::secrets::run(&ObjectStoreSecrets::new(state)).await;
}

/// What the ledger's compare-and-swap stands on: Blob storage refuses a create
/// over an existing blob (`If-None-Match: *`) and an update from a stale ETag
/// (`If-Match`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_are_enforced() {
    let blobs = container("conditional");
    respawn_core::conformance::blobs::conditional_writes(blobs.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_queues_pass_the_queue_conformance_suite() {
    // The suite's queue names are unique already (and a name has 63 characters at
    // most); visibility timeouts are whole seconds.
    let q = StorageQueue::new(
        &azure::azurite().queue,
        SharedKey::new(azure::ACCOUNT, azure::KEY).unwrap(),
        "",
        3,
    )
    .unwrap();
    respawn_core::conformance::queue::run_with(&q, 3, Duration::from_secs(1)).await;
}

/// What other clients put on a queue: Azure's own SDK with the base64 encoding the
/// Azure Functions host expects, and plain text; and a dead letter is on the
/// band's `-poison` queue, where the Functions host would put it, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_azures_sdk_arrive_and_dead_letters_go_to_poison_queues() {
    let prefix = azure::unique("p");
    let q = StorageQueue::new(
        &azure::azurite().queue,
        SharedKey::new(azure::ACCOUNT, azure::KEY).unwrap(),
        &format!("{prefix}-"),
        5,
    )
    .unwrap();
    q.declare("submit").await.unwrap();
    azure::azurite().python(&format!(
        r#"
from azure.storage.queue import QueueClient, BinaryBase64EncodePolicy
b64 = QueueClient.from_connection_string("{{conn}}", "{prefix}-submit-no",
                                         message_encode_policy=BinaryBase64EncodePolicy())
b64.send_message(b'{{"spec": {{"name": "from-azure"}}}}')
plain = QueueClient.from_connection_string("{{conn}}", "{prefix}-submit-lo")
plain.send_message("plain text")
"#
    ));
    let got = q
        .receive(
            "submit",
            Receive {
                max: 10,
                lease: Duration::from_secs(30),
                wait: Duration::from_secs(2),
            },
        )
        .await
        .unwrap();
    let bodies: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        [r#"{"spec": {"name": "from-azure"}}"#, "plain text"],
        "normal band first; base64 decoded, plain text kept"
    );
    assert_eq!(got[0].deliveries, 1);
    assert_eq!(got[0].attributes.get("message_id"), Some(&got[0].id));
    q.dead_letter(&got[0], "spec.command: missing")
        .await
        .unwrap();
    q.ack(&got[1]).await.unwrap();
    let poison = azure::azurite().python(&format!(
        r#"
import base64, json
from azure.storage.queue import QueueClient
c = QueueClient.from_connection_string("{{conn}}", "{prefix}-submit-no-poison")
for m in c.receive_messages():
    env = json.loads(base64.b64decode(m.content))
    print(env["reason"], base64.b64decode(env["body"]).decode())
"#
    ));
    assert_eq!(
        poison.trim(),
        r#"spec.command: missing {"spec": {"name": "from-azure"}}"#
    );
}

/// An upload trigger on Azure: a blob uploaded with Azure's own SDK, and its
/// `BlobCreated` event (built from the Azure documentation's examples, with the
/// blob's real ETag and size) put on a Storage Queue as Event Grid delivers it, in
/// both schemas and the first one twice, make one job whose input is that blob. The
/// ports are those of an Azure host: ledger and secrets on Blob storage, the
/// queue on Storage Queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_blob_and_its_event_grid_events_make_one_job() {
    use respawn_core::cloud::eventgrid::{self, GridMessage};
    use respawn_core::ports::ledger::ListQuery;

    let data = azure::unique("data");
    let blobs = {
        azure::azurite().container(&data);
        Arc::new(
            MicrosoftAzureBuilder::new()
                .with_use_emulator(true)
                .with_container_name(&data)
                .build()
                .unwrap(),
        )
    };
    let state = container("state");
    let prefix = format!("{}-", azure::unique("s"));
    let queue = Arc::new(
        StorageQueue::new(
            &azure::azurite().queue,
            SharedKey::new(azure::ACCOUNT, azure::KEY).unwrap(),
            &prefix,
            5,
        )
        .unwrap(),
    );
    let ports = respawn_core::ports::Ports {
        ledger: Arc::new(ObjectStoreLedger::new(state.clone())),
        queue: queue.clone(),
        compute: Arc::new(respawn_adapters::memory::MemoryCompute::new(1)),
        secrets: Arc::new(ObjectStoreSecrets::new(state)),
        blobs,
        clock: Arc::new(respawn_core::time::SystemClock),
        timeouts: respawn_core::lifecycle::Timeouts::default(),
        queues: respawn_core::ports::QueueNames::default(),
    };
    let rules = [respawn_core::trigger::parse_rule(
        "name: csv\nmatch: { prefix: incoming/, glob: \"*.csv\" }\ntemplate:\n  name: train-${stem}\n  command: [train]\n  inputs: [\"${uri}\"]\n",
        respawn_core::spec::Format::Yaml,
    )
    .unwrap()];

    let root = azure::root();
    let fixtures = root.join("schemas/fixtures/azure");
    azure::azurite().python(&format!(
        r#"
import json, copy
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient, BinaryBase64EncodePolicy
blob = BlobServiceClient.from_connection_string("{{conn}}").get_blob_client("{data}", "incoming/points.csv")
blob.upload_blob(b"x,y\n1,2\n")
props = blob.get_blob_properties()
def event(path):
    e = json.load(open(path))
    e = e[0] if isinstance(e, list) else e
    e["subject"] = "/blobServices/default/containers/{data}/blobs/incoming/points.csv"
    e["data"]["url"] = blob.url
    e["data"]["eTag"] = props.etag
    e["data"]["contentLength"] = props.size
    del e["data"]["sequencer"]  # Azurite's blobs have none; the ETag tells writes apart
    return json.dumps(e).encode()
q = QueueClient.from_connection_string("{{conn}}", "{prefix}uploads-no",
                                       message_encode_policy=BinaryBase64EncodePolicy())
q.create_queue()
grid = event("{grid}")
for body in (grid, grid, event("{cloud}")):
    q.send_message(body)
"#,
        grid = fixtures.join("eventgrid-blob-created.json").display(),
        cloud = fixtures.join("cloudevents-blob-created.json").display(),
    ));

    // What the host's upload handler does with each message.
    let mut handled = 0;
    while handled < 3 {
        let got = queue
            .receive(
                "uploads",
                Receive {
                    max: 10,
                    lease: Duration::from_secs(30),
                    wait: Duration::from_secs(5),
                },
            )
            .await
            .unwrap();
        assert!(!got.is_empty(), "the three events arrive");
        for d in got {
            let GridMessage::Created(created) = eventgrid::decode(&d.body).unwrap() else {
                panic!("a BlobCreated event");
            };
            for b in created.iter().filter(|b| b.container == data) {
                respawn_core::handlers::blob_created(&ports, &rules, &b.blob)
                    .await
                    .unwrap();
            }
            queue.ack(&d).await.unwrap();
            handled += 1;
        }
    }
    let jobs = ports
        .ledger
        .list(&ListQuery {
            limit: 10,
            ..ListQuery::default()
        })
        .await
        .unwrap()
        .jobs;
    assert_eq!(
        jobs.len(),
        1,
        "one job for one write, however often told: {jobs:?}"
    );
    assert_eq!(jobs[0].spec.name, "train-points");
    assert_eq!(jobs[0].spec.inputs[0].uri, "bucket://incoming/points.csv");
}

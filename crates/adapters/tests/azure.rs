//! The object-store ledger, tokens and secrets on Azure Blob storage, against the
//! Azure storage emulator (`localstack/azurite-start`, Azurite) this test process
//! starts: it fails, never skips, when the emulator cannot run.
#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use object_store::azure::MicrosoftAzureBuilder;
use respawn_adapters::objstore::{ObjectStoreLedger, ObjectStoreSecrets, ObjectStoreTokens};
use respawn_core::ports::Blobs;

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

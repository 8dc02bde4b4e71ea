//! The object-store ledger and blobs on S3, against the local AWS emulator
//! (`localstack/aws-start`, moto server, which enforces `If-Match` and
//! `If-None-Match` as S3 does), started for this test: it fails, never skips, when
//! the emulator cannot run.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use respawn_adapters::objstore::{ObjectStoreLedger, ObjectStoreSecrets, ObjectStoreTokens};
use respawn_core::ports::Blobs;

#[path = "../../../tests/support/aws.rs"]
#[allow(dead_code)]
mod aws;

use aws::Emulator;

fn bucket(aws: &Emulator, name: &str) -> Blobs {
    aws.python(&format!(
        "import boto3; boto3.client('s3', endpoint_url='{{endpoint}}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='{name}')"
    ));
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&aws.endpoint)
            .with_allow_http(true)
            .with_bucket_name(name)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_passes_its_conformance_suite_on_s3() {
    let aws = Emulator::start();
    let ledger = ObjectStoreLedger::new(bucket(&aws, "respawn-ledger"));
    respawn_core::conformance::ledger::run(&ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_secrets_pass_their_conformance_suites_on_s3() {
    let aws = Emulator::start();
    let state = bucket(&aws, "respawn-state");
    respawn_core::conformance::tokens::run(&ObjectStoreTokens::new(state.clone())).await;
    respawn_core::conformance::secrets::run(&ObjectStoreSecrets::new(state)).await;
}

/// What the ledger's compare-and-swap stands on: S3 refuses a create over an
/// existing key and an update from a stale ETag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_are_enforced() {
    let aws = Emulator::start();
    let blobs = bucket(&aws, "respawn-conditional");
    respawn_core::conformance::blobs::conditional_writes(blobs.as_ref()).await;
}

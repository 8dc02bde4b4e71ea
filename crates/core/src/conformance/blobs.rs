//! What the object-store ledger, tokens and secrets stand on: an object store that
//! refuses a create over an existing object and an update from a stale version.

use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

/// Runs every check on an empty store.
pub async fn conditional_writes(blobs: &dyn ObjectStore) {
    let path = object_store::path::Path::from("jobs/x/state");
    let create = PutOptions::from(PutMode::Create);
    let first = blobs
        .put_opts(&path, PutPayload::from("v1"), create.clone())
        .await
        .expect("a create where nothing is");
    let again = blobs
        .put_opts(&path, PutPayload::from("v1"), create)
        .await
        .expect_err("a create over an existing object is refused");
    assert!(
        matches!(again, object_store::Error::AlreadyExists { .. }),
        "a create over an existing object: {again}"
    );
    let update = |e_tag: Option<String>| {
        PutOptions::from(PutMode::Update(UpdateVersion {
            e_tag,
            version: None,
        }))
    };
    let second = blobs
        .put_opts(&path, PutPayload::from("v2"), update(first.e_tag.clone()))
        .await
        .expect("an update from the current version");
    assert_ne!(second.e_tag, first.e_tag, "an update makes a new version");
    let stale = blobs
        .put_opts(&path, PutPayload::from("v3"), update(first.e_tag))
        .await
        .expect_err("an update from a stale version is refused");
    assert!(
        matches!(stale, object_store::Error::Precondition { .. }),
        "an update from a stale version: {stale}"
    );
    let now = blobs.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&now[..], b"v2", "the refused writes changed nothing");
}

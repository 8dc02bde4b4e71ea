//! The [`Tokens`] contract, as tests.

use crate::ports::tokens::{Error, Scope, Tokens, hash_secret, mint};
use crate::time::Timestamp;

pub async fn run(t: &dyn Tokens) {
    let (a, secret) = mint(
        "ci",
        "proj-a",
        vec![Scope::Submit, Scope::Read],
        Timestamp(1),
    );
    t.create(&a).await.expect("create");
    assert!(matches!(t.create(&a).await, Err(Error::AlreadyExists(_))));
    let found = t
        .find_by_hash(&hash_secret(&secret))
        .await
        .expect("find")
        .expect("found");
    assert_eq!(found, a);
    assert!(
        t.find_by_hash(&hash_secret("rsp_wrong"))
            .await
            .expect("find")
            .is_none()
    );
    let (b, _) = mint("ops", "proj-b", vec![Scope::Admin], Timestamp(2));
    t.create(&b).await.expect("create b");
    let ids: Vec<_> = t
        .list(Some("proj-a"))
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec![a.id.clone()], "list is per project");
    assert_eq!(t.list(None).await.expect("list all").len(), 2);
    t.revoke(&a.id).await.expect("revoke");
    t.revoke(&a.id).await.expect("revoke twice");
    let revoked = t
        .find_by_hash(&a.hash)
        .await
        .expect("find")
        .expect("still there");
    assert!(
        revoked.revoked && !revoked.allows(Scope::Read),
        "a revoked token allows nothing"
    );
    assert!(matches!(
        t.revoke("tok_missing").await,
        Err(Error::NotFound(_))
    ));
    assert!(b.allows(Scope::Cancel), "admin allows every scope");
}

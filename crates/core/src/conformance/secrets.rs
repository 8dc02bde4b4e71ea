//! The [`Secrets`] contract, as tests.

use std::collections::BTreeMap;

use crate::job::JobId;
use crate::ports::secrets::Secrets;
use crate::time::Timestamp;

pub async fn run(s: &dyn Secrets) {
    let job = JobId::generate(Timestamp(1));
    assert!(
        s.get(&job).await.expect("get").is_empty(),
        "no secrets: an empty map"
    );
    let mut values = BTreeMap::from([("TOKEN".to_owned(), "hunter2".to_owned())]);
    s.put(&job, &values).await.expect("put");
    s.put(&job, &values).await.expect("put is idempotent");
    assert_eq!(s.get(&job).await.expect("get"), values);
    values.insert("OTHER".into(), "x".into());
    s.put(&job, &values).await.expect("put replaces");
    assert_eq!(s.get(&job).await.expect("get"), values);
    let other = JobId::generate(Timestamp(2));
    assert!(
        s.get(&other).await.expect("get").is_empty(),
        "secrets are per job"
    );
    s.delete(&job).await.expect("delete");
    s.delete(&job).await.expect("delete is idempotent");
    assert!(s.get(&job).await.expect("get").is_empty());
}

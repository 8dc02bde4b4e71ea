//! The [`Ledger`] contract, as tests.

use crate::job::{JobId, JobState};
use crate::ports::ledger::{Error, Ledger, ListQuery};
use crate::time::Timestamp;

use super::sample_record;

/// Runs every check on an empty ledger.
pub async fn run(l: &dyn Ledger) {
    create_then_get(l).await;
    create_is_create_if_absent(l).await;
    idempotency_keys_are_unique_per_project(l).await;
    update_is_compare_and_swap(l).await;
    racing_updates_have_one_winner(l).await;
    missing_jobs_are_not_found(l).await;
    list_pages_by_state(l).await;
    list_filters_by_label_and_project(l).await;
}

async fn create_then_get(l: &dyn Ledger) {
    let r = sample_record("create-get", Timestamp(1_000));
    let stored = l.create(r.clone()).await.expect("create");
    assert_eq!(stored.version, 1, "a created record has version 1");
    let got = l.get(&r.id).await.expect("get after create");
    assert_eq!(got, stored, "get returns what create stored");
}

async fn create_is_create_if_absent(l: &dyn Ledger) {
    let r = sample_record("twice", Timestamp(2_000));
    l.create(r.clone()).await.expect("first create");
    let mut other = r.clone();
    other.spec.name = "overwritten".into();
    match l.create(other).await {
        Err(Error::AlreadyExists { id }) => assert_eq!(id, r.id),
        x => panic!("second create of the same id must be AlreadyExists, got {x:?}"),
    }
    assert_eq!(
        l.get(&r.id).await.expect("get").spec.name,
        "twice",
        "a refused create stores nothing"
    );
}

async fn idempotency_keys_are_unique_per_project(l: &dyn Ledger) {
    let mut a = sample_record("key-a", Timestamp(3_000));
    a.spec.idempotency_key = Some("build-42".into());
    l.create(a.clone()).await.expect("create a");
    let mut b = sample_record("key-b", Timestamp(3_001));
    b.spec.idempotency_key = Some("build-42".into());
    match l.create(b.clone()).await {
        Err(Error::AlreadyExists { id }) => {
            assert_eq!(id, a.id, "AlreadyExists names the job holding the key")
        }
        x => panic!("same idempotency key in the same project must be AlreadyExists, got {x:?}"),
    }
    assert!(
        matches!(l.get(&b.id).await, Err(Error::NotFound { .. })),
        "refused create stores nothing"
    );
    assert_eq!(
        l.find_by_idempotency_key("default", "build-42")
            .await
            .expect("find"),
        Some(a.id.clone())
    );
    assert_eq!(
        l.find_by_idempotency_key("default", "build-43")
            .await
            .expect("find"),
        None
    );
    let mut c = sample_record("key-c", Timestamp(3_002));
    c.project = "other".into();
    c.spec.idempotency_key = Some("build-42".into());
    l.create(c)
        .await
        .expect("the same key in another project is another job");
}

async fn update_is_compare_and_swap(l: &dyn Ledger) {
    let r = l
        .create(sample_record("cas", Timestamp(4_000)))
        .await
        .expect("create");
    let mut v1 = r.clone();
    v1.state = JobState::Allocating;
    let stored = l
        .update(v1.clone())
        .await
        .expect("update from the current version");
    assert_eq!(stored.version, 2, "update bumps the version");
    assert_eq!(stored.state, JobState::Allocating);
    let mut stale = r.clone();
    stale.state = JobState::Cancelled;
    match l.update(stale).await {
        Err(Error::Conflict { id, expected }) => {
            assert_eq!(id, r.id);
            assert_eq!(expected, 1);
        }
        x => panic!("update from a stale version must be Conflict, got {x:?}"),
    }
    let got = l.get(&r.id).await.expect("get");
    assert_eq!(
        got.state,
        JobState::Allocating,
        "a refused update stores nothing"
    );
    assert_eq!(got.version, 2);
}

async fn racing_updates_have_one_winner(l: &dyn Ledger) {
    let r = l
        .create(sample_record("race", Timestamp(5_000)))
        .await
        .expect("create");
    let mut a = r.clone();
    a.state = JobState::Running;
    let mut b = r.clone();
    b.state = JobState::Cancelled;
    let (ra, rb) = futures_join(l.update(a), l.update(b)).await;
    let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|w| **w).count();
    assert_eq!(
        wins, 1,
        "exactly one of two racing updates wins: {ra:?} / {rb:?}"
    );
    let loser = if ra.is_ok() { rb } else { ra };
    assert!(
        matches!(loser, Err(Error::Conflict { .. })),
        "the loser gets Conflict"
    );
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

async fn missing_jobs_are_not_found(l: &dyn Ledger) {
    let missing = JobId::generate(Timestamp(6_000));
    assert!(matches!(l.get(&missing).await, Err(Error::NotFound { .. })));
    let mut ghost = sample_record("ghost", Timestamp(6_001));
    ghost.version = 1;
    assert!(
        matches!(
            l.update(ghost).await,
            Err(Error::NotFound { .. } | Error::Conflict { .. })
        ),
        "updating a job that does not exist fails"
    );
}

async fn list_pages_by_state(l: &dyn Ledger) {
    let mut running = Vec::new();
    for i in 0..25u64 {
        let rec = l
            .create(sample_record(&format!("page-{i}"), Timestamp(10_000 + i)))
            .await
            .expect("create");
        if i % 3 == 0 {
            let mut r = rec.clone();
            r.state = JobState::Succeeded;
            l.update(r).await.expect("update");
        } else {
            let mut r = rec.clone();
            r.state = JobState::Preempted;
            let r = l.update(r).await.expect("update");
            running.push(r.id);
        }
    }
    let mut seen = Vec::new();
    let mut q = ListQuery {
        state: Some(JobState::Preempted),
        limit: 4,
        ..Default::default()
    };
    let mut pages = 0;
    loop {
        let page = l.list(&q).await.expect("list");
        pages += 1;
        assert!(page.jobs.len() <= 4, "a page holds at most `limit` jobs");
        for j in &page.jobs {
            assert_eq!(j.state, JobState::Preempted, "list filters by state");
        }
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        match page.next {
            Some(n) => q.after = Some(n),
            None => break,
        }
        assert!(pages < 100, "paging must end");
    }
    assert_eq!(
        seen, running,
        "pages cover every job in the state once, in id order"
    );
}

async fn list_filters_by_label_and_project(l: &dyn Ledger) {
    let mut a = sample_record("label-a", Timestamp(20_000));
    a.spec.labels.insert("team".into(), "vision".into());
    a.project = "proj-x".into();
    let mut b = sample_record("label-b", Timestamp(20_001));
    b.spec.labels.insert("team".into(), "speech".into());
    b.project = "proj-x".into();
    let mut c = sample_record("label-c", Timestamp(20_002));
    c.spec.labels.insert("team".into(), "vision".into());
    c.project = "proj-y".into();
    for r in [&a, &b, &c] {
        l.create(r.clone()).await.expect("create");
    }
    let q = ListQuery {
        label: Some(("team".into(), "vision".into())),
        limit: 100,
        ..Default::default()
    };
    let ids: Vec<_> = l
        .list(&q)
        .await
        .expect("list")
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![a.id.clone(), c.id.clone()], "label filter");
    let q = ListQuery {
        project: Some("proj-x".into()),
        limit: 100,
        ..Default::default()
    };
    let ids: Vec<_> = l
        .list(&q)
        .await
        .expect("list")
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![a.id, b.id], "project filter");
}

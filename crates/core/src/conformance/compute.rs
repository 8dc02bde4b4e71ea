//! The [`Compute`] contract, as tests.

use crate::job::JobId;
use crate::ports::compute::{AllocateRequest, AllocationKey, Compute, VmState};
use crate::spec::{Placement, Resources};
use crate::time::Timestamp;

/// A request for `job`'s `attempt` with default resources and placement.
pub fn request(job: &JobId, attempt: u32) -> AllocateRequest {
    AllocateRequest {
        key: AllocationKey {
            job: job.clone(),
            attempt,
        },
        project: "default".into(),
        resources: Resources::default(),
        placement: Placement::default(),
        image: None,
    }
}

/// Runs every check; the provider needs capacity for at least two VMs.
pub async fn run(c: &dyn Compute) {
    let job = JobId::generate(Timestamp(1_000));
    let first = c.allocate(&request(&job, 1)).await.expect("allocate");
    let again = c.allocate(&request(&job, 1)).await.expect("allocate again");
    assert_eq!(first.id, again.id, "allocate is idempotent per job+attempt");
    assert_eq!(first.key.attempt, 1);
    let described = c
        .describe(&first.key)
        .await
        .expect("describe")
        .expect("allocated VM is known");
    assert_eq!(described.id, first.id);
    assert!(
        c.list()
            .await
            .expect("list")
            .iter()
            .any(|v| v.id == first.id),
        "list shows the VM"
    );

    c.release(&first.key).await.expect("release");
    c.release(&first.key).await.expect("release is idempotent");
    let gone = c.describe(&first.key).await.expect("describe");
    assert!(
        gone.is_none_or(|v| v.state == VmState::Terminated),
        "a released VM is terminated"
    );
    let after = c.allocate(&request(&job, 1)).await;
    assert!(
        after.as_ref().map_or(true, |v| v.id == first.id),
        "allocate after release never makes a second VM for the same key: {after:?}"
    );

    let second = c
        .allocate(&request(&job, 2))
        .await
        .expect("allocate attempt 2");
    // A pool may run the next attempt on the same VM, but only once the earlier
    // attempt is over there.
    if second.id == first.id {
        let earlier = c.describe(&first.key).await.expect("describe");
        assert!(
            earlier
                .as_ref()
                .is_none_or(|v| v.state == VmState::Terminated),
            "two live attempts on one VM: {earlier:?}"
        );
    }
    assert_eq!(second.key.attempt, 2);
    c.release(&second.key).await.expect("release 2");

    let unknown = AllocationKey {
        job: JobId::generate(Timestamp(2_000)),
        attempt: 7,
    };
    c.release(&unknown)
        .await
        .expect("releasing an unknown key is ok");
    assert!(c.describe(&unknown).await.expect("describe").is_none());
}

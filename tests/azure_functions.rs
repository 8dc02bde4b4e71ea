//! The Azure function app: the custom handler (`respawn-azure`) under the Azure
//! Functions host's part (support/functions_host.rs), its storage on Azurite, its
//! VMs on the ARM harness (support/arm.rs), which boots each Spot VM's custom data
//! with Scheduled Events of its own.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use object_store::azure::MicrosoftAzureBuilder;
use respawn_adapters::azqueue::{SharedKey, StorageQueue};
use respawn_adapters::objstore::ObjectStoreLedger;
use respawn_core::job::{AttemptOutcome, JobRecord, JobState};
use respawn_core::ports::Ledger;
use respawn_core::ports::ledger::ListQuery;
use respawn_e2e::arm::{self, Arm, Boot, Fault};
use respawn_e2e::azure;
use respawn_e2e::functions_host::FunctionsHost;
use serde_json::{Value, json};

use respawn_e2e::CLOUD_TRAINER_ARGS as TRAINER_ARGS;

/// A function app of its own: stack, containers and queues no other test uses.
struct App {
    stack: String,
    data: String,
    state: String,
    arm: Arm,
    host: FunctionsHost,
    eventgrid_key: String,
    _dir: tempfile::TempDir,
}

fn queue_client(prefix: &str) -> StorageQueue {
    StorageQueue::new(
        &azure::azurite().queue,
        SharedKey::new(azure::ACCOUNT, azure::KEY).unwrap(),
        prefix,
        5,
    )
    .unwrap()
}

fn store(container: &str) -> Arc<dyn object_store::ObjectStore> {
    Arc::new(
        MicrosoftAzureBuilder::new()
            .with_use_emulator(true)
            .with_container_name(container)
            .build()
            .unwrap(),
    )
}

impl App {
    async fn start(rule: &str) -> App {
        App::start_with(rule, &[]).await
    }

    /// The app with `extra` app settings besides the test's own.
    async fn start_with(rule: &str, extra: &[(&str, &str)]) -> App {
        let stack = azure::unique("fn");
        let data = azure::unique("jobs");
        let state = azure::unique("state");
        azure::azurite().container(&data);
        azure::azurite().container(&state);
        let bin = respawn_e2e::binary("respawn-agent");
        let bin_dir = bin.parent().unwrap().to_owned();
        let arm = Arm::start_with(Some(Boot {
            path: vec![bin_dir.clone()],
            // The VM's identity reaches the job container; here, Azurite.
            env: vec![("AZURE_STORAGE_USE_EMULATOR".into(), "true".into())],
            agent_args: format!("--read-only {}", bin_dir.display()),
        }))
        .await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir_all(config.join("triggers")).unwrap();
        std::fs::write(config.join("triggers/train.yaml"), rule).unwrap();
        let port = respawn_e2e::free_port();
        let eventgrid_key = format!("k{}", rand::random::<u64>());
        let mut settings: Vec<(String, String)> = vec![
            ("RESPAWN_STACK", stack.clone()),
            ("RESPAWN_KEY", "ab".repeat(32)),
            ("RESPAWN_STORAGE_EMULATOR", "1".into()),
            ("RESPAWN_STORAGE_ACCOUNT", azure::ACCOUNT.into()),
            ("RESPAWN_STATE_CONTAINER", state.clone()),
            ("RESPAWN_CONTAINER", data.clone()),
            ("RESPAWN_API_URL", format!("http://127.0.0.1:{port}/api")),
            ("RESPAWN_AZURE_SUBSCRIPTION", arm::SUBSCRIPTION.into()),
            ("RESPAWN_AZURE_RESOURCE_GROUP", arm::RESOURCE_GROUP.into()),
            ("RESPAWN_AZURE_LOCATION", arm::LOCATION.into()),
            ("RESPAWN_AZURE_SUBNET", arm.subnet()),
            ("RESPAWN_AZURE_NSG", arm.nsg()),
            ("RESPAWN_ARM_ENDPOINT", arm.url.clone()),
            ("RESPAWN_EVENTGRID_KEY", eventgrid_key.clone()),
            ("RESPAWN_CONFIG", config.display().to_string()),
            ("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string()),
            ("RUST_LOG", "info".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .collect();
        settings.extend(arm.identity_env());
        let host = FunctionsHost::start(
            &respawn_e2e::binary("respawn-azure"),
            &azure::root().join("functions/azure/app"),
            &settings,
            queue_client(""),
            dir.path().join("handler.log"),
        )
        .await;
        App {
            stack,
            data,
            state,
            arm,
            host,
            eventgrid_key,
            _dir: dir,
        }
    }

    /// The first admin token, which the handler's first start left in the state
    /// container for the operator.
    async fn admin_token(&self) -> String {
        let got = store(&self.state)
            .get(&"admin-token".into())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        String::from_utf8(got.to_vec()).unwrap().trim().to_owned()
    }

    async fn jobs(&self) -> Vec<JobRecord> {
        ObjectStoreLedger::new(store(&self.state))
            .list(&ListQuery {
                limit: 100,
                ..ListQuery::default()
            })
            .await
            .unwrap()
            .jobs
    }

    /// Uploads `bytes` to `name` in the job container with Azure's Python SDK.
    fn upload(&self, name: &str, bytes: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("upload");
        std::fs::write(&file, bytes).unwrap();
        azure::azurite().python(&format!(
            r#"
from azure.storage.blob import BlobServiceClient
blob = BlobServiceClient.from_connection_string("{{conn}}").get_blob_client("{data}", "{name}")
blob.upload_blob(open("{file}", "rb").read())
"#,
            data = self.data,
            file = file.display(),
        ));
    }

    /// The BlobCreated event of blob `name` as it is now, after the documented
    /// example in `fixture` (Event Grid or CloudEvents schema).
    fn event_of(&self, fixture: &str, name: &str) -> Value {
        let path = azure::root().join("schemas/fixtures/azure").join(fixture);
        let out = azure::azurite().python(&format!(
            r#"
import json
from azure.storage.blob import BlobServiceClient
blob = BlobServiceClient.from_connection_string("{{conn}}").get_blob_client("{data}", "{name}")
props = blob.get_blob_properties()
e = json.load(open("{path}"))
e = e[0] if isinstance(e, list) else e
e["subject"] = "/blobServices/default/containers/{data}/blobs/{name}"
e["data"]["url"] = blob.url
e["data"]["eTag"] = props.etag
e["data"]["contentLength"] = props.size
del e["data"]["sequencer"]  # Azurite's blobs have none; the ETag tells writes apart
print(json.dumps(e))
"#,
            data = self.data,
            path = path.display(),
        ));
        serde_json::from_str(out.trim()).unwrap()
    }

    /// Event Grid's delivery of `event` to the uploads queue (base64, as the
    /// Storage Queue destination writes it).
    async fn deliver_to_queue(&self, event: &Value) {
        use base64::Engine;
        queue_client("")
            .put_message(
                &format!("{}-uploads-no", self.stack),
                &base64::engine::general_purpose::STANDARD.encode(event.to_string()),
            )
            .await
            .unwrap();
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api{path}", self.host.url)
    }

    /// Runs the function app — its queues pumped, `reconcile` ticked every 2 s —
    /// handing the jobs to `check` until it returns something.
    async fn drive<T>(&self, what: &str, mut check: impl FnMut(&[JobRecord]) -> Option<T>) -> T {
        let deadline = respawn_e2e::e2e_deadline(Duration::from_secs(300));
        let mut last_tick = Instant::now();
        loop {
            assert!(
                Instant::now() < deadline,
                "{what}: not in time: {:?}\nhandler: {}\nVMs: {}",
                self.jobs().await,
                self.host.log(),
                self.arm.logs()
            );
            self.host.pump().await;
            if last_tick.elapsed() > Duration::from_secs(2) {
                self.host.tick("reconcile").await;
                last_tick = Instant::now();
            }
            if let Some(t) = check(&self.jobs().await) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Drives the first job to success, preempting its VM with `notice` once it
    /// has uploaded a checkpoint: the job, the preempted VM, and the uids its
    /// workload was seen running as.
    async fn train_through_a_preemption(&self, notice: Duration) -> (JobRecord, String, Vec<u32>) {
        let mut evicted: Option<String> = None;
        let mut workload_uids = Vec::new();
        let job = self
            .drive("the training job succeeded", |jobs| {
                let job = jobs.first()?;
                if job.state == JobState::Succeeded {
                    return Some(job.clone());
                }
                assert!(
                    !job.state.is_terminal(),
                    "{job:?}\nVMs: {}",
                    self.arm.logs()
                );
                if job.state == JobState::Running && workload_uids.is_empty() {
                    workload_uids = respawn_e2e::workload_uids(&job.id.to_string());
                }
                if evicted.is_none()
                    && job.state == JobState::Running
                    && job
                        .attempts
                        .last()
                        .is_some_and(|a| a.last_checkpoint.is_some())
                    && let Some(vm) = job.attempts.last().and_then(|a| a.vm.clone())
                    && self.arm.vms().contains(&vm)
                {
                    self.arm.preempt(&vm, notice);
                    evicted = Some(vm);
                }
                None
            })
            .await;
        (
            job,
            evicted.expect("the first VM was preempted"),
            workload_uids,
        )
    }

    /// The model job `job` wrote to the job container.
    async fn model(&self, job: &JobRecord) -> Vec<u8> {
        store(&self.data)
            .get(&format!("jobs/{}/outputs/model.txt", job.id).as_str().into())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    }

    /// Submits `spec` through the API as the first admin.
    async fn submit(&self, spec: &Value) -> String {
        let r = reqwest::Client::new()
            .post(self.api("/v1/jobs"))
            .bearer_auth(self.admin_token().await)
            .json(spec)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{r:?}");
        let body: Value = r.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }
}

fn fixture(name: &str) -> Value {
    let path = azure::root()
        .join("schemas/fixtures/azure/functions")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn train_rule() -> String {
    format!(
        "name: train-on-csv\nmatch:\n  prefix: incoming/\n  glob: \"*.csv\"\ntemplate:\n  name: train-${{stem}}\n  command: [respawn-trainer, {}]\n  inputs: [\"${{uri}}\"]\n",
        TRAINER_ARGS.map(|a| format!("\"{a}\"")).join(", ")
    )
}

/// Each trigger's documented request payload, answered: a queue message that is no
/// job spec goes to the poison queue with the reason; the Event Grid trigger's
/// BlobCreated makes one job however often it comes; the timer runs reconcile;
/// HTTP requests reach the API; Event Grid's webhook answers both validation
/// handshakes, checks its key, and makes no second job for the same write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_handler_answers_each_triggers_documented_payload() {
    let app = App::start(&train_rule()).await;
    let http = reqwest::Client::new();
    let names: Vec<&String> = app.host.functions.keys().collect();
    for f in [
        "api",
        "eventgrid",
        "reconcile",
        "submit-no",
        "dispatch-hi",
        "events-lo",
        "notify-no",
        "uploads-no",
    ] {
        assert!(
            app.host.functions.contains_key(f),
            "function {f} in the app: {names:?}"
        );
    }

    // Queue trigger: the documented example's text, put on the real submit queue;
    // Id and PopReceipt as Get Messages gave them.
    let mut payload = fixture("queue-trigger.json");
    let text = payload["Data"]["myQueueItem"].as_str().unwrap().to_owned();
    let q = queue_client("");
    let physical = format!("{}-submit-no", app.stack);
    use base64::Engine;
    q.put_message(
        &physical,
        &base64::engine::general_purpose::STANDARD.encode(&text),
    )
    .await
    .unwrap();
    let got = q
        .get_messages(&physical, 1, Duration::from_secs(60))
        .await
        .unwrap();
    payload["Metadata"]["Id"] = json!(got[0].id);
    payload["Metadata"]["PopReceipt"] = json!(got[0].pop_receipt);
    let (status, answer) = app.host.invoke("submit-no", &payload).await;
    assert_eq!(status, 200, "{answer}\n{}", app.host.log());
    assert!(
        answer.get("Outputs").is_some(),
        "the custom handler's answer: {answer}"
    );
    let poison = q
        .get_messages(&format!("{physical}-poison"), 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(poison.len(), 1, "the bad submission is in the poison queue");
    let env = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(&poison[0].text)
            .unwrap(),
    )
    .unwrap();
    assert!(env.contains("reason"), "with its reason: {env}");
    assert!(
        q.get_messages(&physical, 1, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty()
    );
    // A trigger payload without the message's metadata is refused, with the field.
    let mut bad = fixture("queue-trigger.json");
    bad["Metadata"]
        .as_object_mut()
        .unwrap()
        .remove("PopReceipt");
    let (status, answer) = app.host.invoke("submit-no", &bad).await;
    assert_eq!(status, 400);
    assert!(
        answer.to_string().contains("Metadata.PopReceipt"),
        "{answer}"
    );

    // Event Grid trigger: the documented BlobCreated event, for a blob uploaded
    // by Azure's SDK; twice, and as CloudEvents through the webhook: one job.
    app.upload("incoming/points.csv", b"x,y\n1,2\n");
    let mut grid = fixture("eventgrid-trigger.json");
    grid["Data"]["event"] = app.event_of("eventgrid-blob-created.json", "incoming/points.csv");
    let (status, answer) = app.host.invoke("eventgrid", &grid).await;
    assert_eq!(status, 200, "{answer}\n{}", app.host.log());
    // Again, as the JSON text of the event (how the host passes a value that is
    // not an object).
    let mut as_text = grid.clone();
    as_text["Data"]["event"] = json!(grid["Data"]["event"].to_string());
    let (status, answer) = app.host.invoke("eventgrid", &as_text).await;
    assert_eq!(status, 200, "{answer}\n{}", app.host.log());
    let hook = app.api("/eventgrid");
    let cloud = app.event_of("cloudevents-blob-created.json", "incoming/points.csv");
    let r = http
        .post(format!("{hook}?key={}", app.eventgrid_key))
        .json(&cloud)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let jobs = app.jobs().await;
    assert_eq!(jobs.len(), 1, "one job for one write: {jobs:?}");
    assert_eq!(jobs[0].spec.name, "train-points");
    assert_eq!(jobs[0].spec.inputs[0].uri, "bucket://incoming/points.csv");

    // The webhook's handshakes, and its key.
    let validation: Value = serde_json::from_str(
        &std::fs::read_to_string(
            azure::root().join("schemas/fixtures/azure/eventgrid-subscription-validation.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let code = validation[0]["data"]["validationCode"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = http
        .post(format!("{hook}?key={}", app.eventgrid_key))
        .json(&validation)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["validationResponse"], code);
    let r = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{hook}?key={}", app.eventgrid_key),
        )
        .header("WebHook-Request-Origin", "eventgrid.azure.net")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["webhook-allowed-origin"], "eventgrid.azure.net");
    for url in [format!("{hook}?key=wrong"), hook.clone()] {
        let r = http.post(&url).json(&validation).send().await.unwrap();
        assert_eq!(r.status(), 401, "{url}");
    }
    // The key as a delivery attribute header.
    let r = http
        .post(&hook)
        .header("X-Respawn-Key", &app.eventgrid_key)
        .json(&validation)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{hook}?key={}", app.eventgrid_key))
        .body("{\"not\": \"an event\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        400,
        "a delivery that is no event is refused (Event Grid dead-letters it)"
    );

    // A submission by message, with its reply queue: the submitter hears that
    // its job was accepted, with its correlation id, on its own queue.
    let replies = azure::unique("replies");
    q.put_message(&replies, "x").await.unwrap();
    for m in q
        .get_messages(&replies, 1, Duration::from_secs(1))
        .await
        .unwrap()
    {
        q.delete_message(&replies, &m.id, &m.pop_receipt)
            .await
            .unwrap();
    }
    let broker = queue_client(&format!("{}-", app.stack));
    let mut msg = respawn_core::ports::queue::Outgoing::new(
        json!({"spec": {"name": "by-message", "command": ["true"]}}).to_string(),
    );
    msg.attributes.insert("reply_to".into(), replies.clone());
    msg.attributes
        .insert("correlation_id".into(), "corr-7".into());
    respawn_core::ports::Queue::send(&broker, "submit", msg)
        .await
        .unwrap();
    let mut heard = None;
    for _ in 0..50 {
        app.host.pump().await;
        if let Some(m) = q
            .get_messages(&replies, 1, Duration::from_secs(30))
            .await
            .unwrap()
            .pop()
        {
            heard = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let heard = heard.unwrap_or_else(|| panic!("no reply\n{}", app.host.log()));
    let reply: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(&heard.text)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(reply["type"], "accepted", "{reply}");
    assert_eq!(reply["correlation_id"], "corr-7", "{reply}");
    // A reply can never be aimed at the broker's own queues.
    assert!(
        broker
            .reply(&format!("{}-dispatch-no", app.stack), None, b"{}")
            .await
            .is_err()
    );

    // Timer trigger.
    let (status, answer) = app
        .host
        .invoke("reconcile", &fixture("timer-trigger.json"))
        .await;
    assert_eq!(status, 200, "{answer}");

    // HTTP, forwarded: the API with the first admin token.
    let token = app.admin_token().await;
    let r = http
        .get(app.api(&format!("/v1/jobs/{}", jobs[0].id)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(app.api("/v1/jobs")).send().await.unwrap();
    assert_eq!(r.status(), 401, "the API wants a token");
}

/// The whole Azure path with the custom handler as the only host: a file
/// uploaded with Azure's SDK and its BlobCreated event on the uploads queue make
/// a job; its first Spot VM meets a 429 and then no capacity (SkuNotAvailable),
/// both survived; the VM that runs it boots from its custom data, and a Preempt
/// Scheduled Event makes the agent checkpoint and acknowledge; the VM is evicted;
/// the job resumes on a new VM from that checkpoint and its model lands in the
/// job container, equal to an uninterrupted run's; no VM is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_file_trains_on_azure_spot_through_an_eviction_to_the_same_model() {
    let app = App::start(&train_rule()).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("points.csv");
    respawn_e2e::generate_csv(300, &csv);
    let expected = respawn_e2e::baseline_model(&csv, &TRAINER_ARGS);

    app.arm.fault(Fault::Throttle(1));
    app.arm.fault(Fault::Refuse(
        409,
        "SkuNotAvailable".into(),
        "The requested size for resource is currently not available in location 'westeurope' zones '' for subscription.".into(),
    ));
    app.upload("incoming/points.csv", &std::fs::read(&csv).unwrap());
    app.deliver_to_queue(&app.event_of("eventgrid-blob-created.json", "incoming/points.csv"))
        .await;

    let (job, first, workload_uids) = app
        .train_through_a_preemption(Duration::from_secs(30))
        .await;
    respawn_e2e::assert_workload_uid(&workload_uids);
    assert!(app.arm.throttled() >= 1, "the 429 was met");
    assert_eq!(
        app.arm.acked(),
        vec![(first.clone(), format!("evict-{first}"))],
        "the agent acknowledged the eviction"
    );
    // Gone: evicted by Azure, or deleted by the broker first once the attempt
    // ended preempted.
    assert!(
        app.arm.evicted().contains(&first) || app.arm.deleted().contains(&first),
        "the preempted VM is gone"
    );
    let ran: Vec<&_> = job.attempts.iter().collect();
    assert_eq!(ran.len(), 2, "the capacity miss spent no attempt: {job:?}");
    assert_eq!(ran[0].outcome, Some(AttemptOutcome::Preempted), "{job:?}");
    assert!(
        ran[1].restored_checkpoint.is_some(),
        "attempt 2 resumed from a checkpoint: {job:?}"
    );
    assert_eq!(
        ran[1].restored_checkpoint, ran[0].last_checkpoint,
        "from the checkpoint uploaded before the eviction"
    );
    assert!(
        app.model(&job).await == expected,
        "the model differs from an uninterrupted run's"
    );
    // The finished job's VM is deleted by the broker; none is left.
    for _ in 0..40 {
        app.host.pump().await;
        if app.arm.vms().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        app.arm.vms(),
        Vec::<String>::new(),
        "VMs left:\n{}",
        app.arm.logs()
    );
    assert_eq!(
        app.arm.created().len(),
        2,
        "one VM per attempt that ran: {:?}",
        app.arm.created()
    );
}

/// A warm pool on Azure through the function app (`max=1`): an uploaded file's
/// training job runs on a pool VM; a Preempt Scheduled Event on that VM makes its
/// agent checkpoint, acknowledge and take no more work; the job resumes on a new
/// pool VM from that checkpoint to the same model. Jobs after it run on that same
/// VM, each finding nothing the one before left; idle past the pool's timeout,
/// `reconcile` retires the VM and its agent ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_on_azure_runs_jobs_in_a_row_and_survives_an_eviction() {
    let app = App::start_with(
        &train_rule(),
        &[("RESPAWN_AZURE_POOLS", "warm:max=1,idle=15s")],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("points.csv");
    respawn_e2e::generate_csv(300, &csv);
    let expected = respawn_e2e::baseline_model(&csv, &TRAINER_ARGS);
    app.upload("incoming/points.csv", &std::fs::read(&csv).unwrap());
    app.deliver_to_queue(&app.event_of("eventgrid-blob-created.json", "incoming/points.csv"))
        .await;

    let (job, first, workload_uids) = app
        .train_through_a_preemption(Duration::from_secs(10))
        .await;
    respawn_e2e::assert_workload_uid(&workload_uids);
    assert_eq!(
        app.arm.tags(&job.attempts[1].vm.clone().unwrap()).unwrap()["respawn-pool"],
        "warm",
        "the job ran on pool VMs"
    );
    assert_eq!(
        app.arm.acked(),
        vec![(first.clone(), format!("evict-{first}"))],
        "the agent acknowledged the eviction"
    );
    assert!(
        app.arm
            .log(&first)
            .contains("the vm was given notice; taking no more work"),
        "{}",
        app.arm.log(&first)
    );
    assert_eq!(job.attempts.len(), 2, "{job:?}");
    assert_eq!(job.attempts[0].outcome, Some(AttemptOutcome::Preempted));
    assert_ne!(job.attempts[1].vm.as_ref(), Some(&first), "{job:?}");
    assert_eq!(
        job.attempts[1].restored_checkpoint, job.attempts[0].last_checkpoint,
        "resumed from the checkpoint uploaded on the notice: {job:?}"
    );
    assert!(
        app.model(&job).await == expected,
        "the model differs from an uninterrupted run's"
    );
    let warm = job.attempts[1].vm.clone().unwrap();

    // Jobs in a row on the one warm VM, each submitted as soon as the one before
    // is done (the VM still draining: the allocation waits for it); each fails if
    // anything of an earlier one is in its folders, and leaves some behind.
    let look = r#"test ! -e left && test ! -e "$RESPAWN_OUTPUT_DIR/left" && touch left "$RESPAWN_OUTPUT_DIR/left""#;
    for n in 0..2 {
        let id = app
            .submit(&json!({"name": format!("warm-{n}"), "command": ["sh", "-c", look]}))
            .await;
        let done = app
            .drive(&format!("warm-{n} succeeded"), |jobs| {
                let j = jobs.iter().find(|j| j.id.to_string() == id)?;
                assert!(
                    !j.state.is_terminal() || j.state == JobState::Succeeded,
                    "{j:?}\nVMs: {}",
                    app.arm.logs()
                );
                (j.state == JobState::Succeeded).then(|| j.clone())
            })
            .await;
        assert_eq!(done.attempts.len(), 1, "{done:?}");
        assert_eq!(
            done.attempts[0].vm.as_ref(),
            Some(&warm),
            "{done:?}\nhandler: {}\nVMs: {}",
            app.host.log(),
            app.arm.logs()
        );
    }
    assert_eq!(app.arm.created().len(), 2, "{:?}", app.arm.created());

    // Idle past 15 s (long enough for the jobs above to find it warm), reconcile
    // retires the VM.
    app.drive("the idle pool VM retired", |_| {
        app.arm.vms().is_empty().then_some(())
    })
    .await;
    assert!(app.arm.deleted().contains(&warm));
}

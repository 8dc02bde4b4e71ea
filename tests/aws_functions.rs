//! The AWS functions as Lambda runs them, on a machine without Lambda: each
//! function binary under a local runtime API, fed by an SQS event source that
//! receives from the emulator's queues, invokes with the batch and deletes what
//! succeeded (tests/support/lambda.rs). Messages are sent by boto3, as a user's
//! code would. Fails, never skips, when the emulator cannot run.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use respawn_adapters::objstore::ObjectStoreLedger;
use respawn_adapters::sqs::SqsQueue;
use respawn_core::job::{JobRecord, JobState};
use respawn_core::ports::Ledger;
use respawn_core::ports::ledger::ListQuery;
use respawn_core::ports::queue::{Queue, Receive};
use respawn_e2e::CLOUD_TRAINER_ARGS as TRAINER_ARGS;
use respawn_e2e::aws::Emulator;
use respawn_e2e::lambda::{self, Function};
use serde_json::{Value, json};

struct Stack {
    aws: Emulator,
    name: String,
    config: tempfile::TempDir,
    sqs: aws_sdk_sqs::Client,
}

impl Stack {
    fn new(name: &str) -> Stack {
        Stack::with_rule(
            name,
            "name: csv\nmatch:\n  prefix: incoming/\n  glob: \"*.csv\"\ntemplate:\n  name: train-${stem}\n  command: [train, --data, \"${uri}\"]\n",
        )
    }

    fn with_rule(name: &str, rule: &str) -> Stack {
        let aws = Emulator::start();
        aws.resources(name);
        let config = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(config.path().join("triggers")).unwrap();
        std::fs::write(config.path().join("triggers/csv.yaml"), rule).unwrap();
        let sqs = lambda::sqs_client(&aws.endpoint);
        Stack {
            aws,
            name: name.to_owned(),
            config,
            sqs,
        }
    }

    async fn function(&self, name: &str) -> Function {
        Function::start(
            name,
            &lambda::env(&self.aws.endpoint, &self.name, self.config.path()),
        )
        .await
    }

    /// A function whose agents report to `api_url`.
    async fn function_with_api(&self, name: &str, api_url: &str) -> Function {
        self.function_with(name, api_url, &[]).await
    }

    /// A function whose agents report to `api_url`, with `more` environment.
    async fn function_with(&self, name: &str, api_url: &str, more: &[(&str, &str)]) -> Function {
        let mut env = lambda::env(&self.aws.endpoint, &self.name, self.config.path());
        for (k, v) in &mut env {
            if k == "RESPAWN_API_URL" {
                *v = api_url.to_owned();
            }
        }
        env.extend(more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Function::start(name, &env).await
    }

    /// Emulated VMs for the stack's instances, with the S3 access an instance
    /// profile would give.
    fn vms(&self) -> respawn_e2e::vm::Vms {
        respawn_e2e::vm::Vms::new(
            &self.name,
            [
                ("AWS_ENDPOINT_URL", self.aws.endpoint.as_str()),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .to_vec(),
        )
    }

    /// The first admin token, which the `api` function's first start left in the
    /// state bucket for the operator.
    fn admin_token(&self) -> String {
        self.aws.drive_python(&format!(
            r#"
import boto3
s3 = boto3.client("s3", endpoint_url="{{endpoint}}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
print(s3.get_object(Bucket="{}-state", Key="admin-token")["Body"].read().decode().strip())
"#,
            self.name
        ))
    }

    /// The ids and states of the stack's pool instances.
    fn pool_instances(&self) -> Vec<(String, String)> {
        let out = self.aws.drive_python(&format!(
            r#"
import boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
found = ec2.describe_instances(Filters=[{{"Name": "tag:respawn:stack", "Values": ["{}"]}},
                                        {{"Name": "tag-key", "Values": ["respawn:pool"]}}])
for r in found["Reservations"]:
    for i in r["Instances"]:
        print(i["InstanceId"], i["State"]["Name"])
"#,
            self.name
        ));
        out.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(id, state)| (id.to_owned(), state.to_owned()))
            .collect()
    }

    /// The SQS queues of a logical queue, highest band first.
    fn bands(&self, logical: &str) -> Vec<String> {
        ["hi", "no", "lo"]
            .iter()
            .map(|b| format!("{}-{logical}-{b}", self.name))
            .collect()
    }

    fn ledger(&self) -> ObjectStoreLedger {
        ObjectStoreLedger::new(Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.aws.endpoint)
                .with_allow_http(true)
                .with_bucket_name(format!("{}-state", self.name))
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .build()
                .unwrap(),
        ))
    }

    async fn jobs(&self) -> Vec<JobRecord> {
        self.ledger()
            .list(&ListQuery {
                limit: 100,
                ..ListQuery::default()
            })
            .await
            .unwrap()
            .jobs
    }

    /// The first message on `queue` (an SQS queue's name), as Lambda's event
    /// source would hand it to a function.
    async fn record(&self, queue: &str) -> Value {
        let (url, arn) = lambda::queue(&self.sqs, queue).await.unwrap();
        let got = self
            .sqs
            .receive_message()
            .queue_url(&url)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .wait_time_seconds(2)
            .send()
            .await
            .unwrap();
        lambda::record(&got.messages()[0], &arn)
    }

    /// Sends raw bodies (with string attributes) to a queue, as boto3 does.
    fn send(&self, queue: &str, messages: &[(&str, &[(&str, &str)])]) {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(body, attrs)| {
                json!({
                    "body": body,
                    "attrs": attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
                })
            })
            .collect();
        self.aws.python(&format!(
            r#"
import json, boto3
sqs = boto3.client("sqs", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
url = sqs.get_queue_url(QueueName="{queue}")["QueueUrl"]
for m in json.loads({messages:?}):
    attrs = {{k: {{"DataType": "String", "StringValue": v}} for k, v in m["attrs"].items()}}
    sqs.send_message(QueueUrl=url, MessageBody=m["body"], MessageAttributes=attrs)
"#,
            messages = serde_json::to_string(&messages).unwrap(),
        ));
    }

    /// The ids of the job's instances that are not terminated (of one attempt).
    fn instances(&self, job: &str, attempt: Option<&str>) -> Vec<String> {
        let filter = attempt.map_or(String::new(), |a| {
            format!(r#", {{"Name": "tag:respawn:attempt", "Values": ["{a}"]}}"#)
        });
        let out = self.aws.drive_python(&format!(
            r#"
import boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
found = ec2.describe_instances(Filters=[{{"Name": "tag:respawn:job", "Values": ["{job}"]}}{filter}])
for r in found["Reservations"]:
    for i in r["Instances"]:
        if i["State"]["Name"] not in ("shutting-down", "terminated"):
            print(i["InstanceId"])
"#
        ));
        let mut ids: Vec<String> = out.lines().map(str::to_owned).collect();
        ids.sort();
        ids
    }

    /// An EC2 event, put on the default event bus as EC2 would.
    fn put_ec2_event(&self, detail_type: &str, detail: Value) {
        self.aws.python(&format!(
            r#"
import json, boto3
events = boto3.client("events", endpoint_url="{{endpoint}}", region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
out = events.put_events(Entries=[{{"Source": "aws.ec2", "DetailType": "{detail_type}",
                                   "Detail": json.dumps({detail})}}])
assert not out.get("FailedEntryCount"), out
"#,
            detail = serde_json::to_string(&detail.to_string()).unwrap(),
        ));
    }

    /// Pumps `queues` into `f` until `done` holds of the ledger's jobs.
    async fn pump_until(
        &self,
        f: &Function,
        queues: &[String],
        what: &str,
        done: impl Fn(&[JobRecord]) -> bool,
    ) -> (Vec<JobRecord>, Vec<Value>) {
        let mut answers = Vec::new();
        for _ in 0..60 {
            answers.extend(f.pump(&self.sqs, queues).await);
            let jobs = self.jobs().await;
            if done(&jobs) {
                return (jobs, answers);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{what}: not reached; jobs {:?}", self.jobs().await);
    }
}

const SPEC: &str = r#"{"spec": {"name": "by-boto3", "command": ["train"], "resources": {"gpus": 1, "gpu_type": "t4"}}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boto3_submission_makes_a_job_that_gets_a_tagged_spot_instance_and_bad_ones_are_dead_lettered_with_the_reason()
 {
    let stack = Stack::new("fnsubmit");
    stack.send(
        &format!("{}-submit-no", stack.name),
        &[
            (SPEC, &[("correlation_id", "c-1")]),
            (r#"{"spec": {"name": "bad", "command": "not a list"}}"#, &[]),
            ("this is not json", &[]),
        ],
    );
    let submit = stack.function("submit").await;
    let (jobs, answers) = stack
        .pump_until(&submit, &stack.bands("submit"), "a job", |jobs| {
            !jobs.is_empty()
        })
        .await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = &jobs[0];
    assert_eq!(job.spec.name, "by-boto3");
    for a in &answers {
        assert_eq!(a["batchItemFailures"], json!([]), "{a}");
    }

    // The malformed ones are in the submit queue's dead letters, with why.
    let queue = SqsQueue::new(stack.sqs.clone(), &format!("{}-", stack.name), 5);
    let mut dead = Vec::new();
    for _ in 0..20 {
        dead.extend(
            queue
                .receive(
                    "submit.dead",
                    Receive {
                        max: 10,
                        lease: Duration::from_secs(30),
                        wait: Duration::ZERO,
                    },
                )
                .await
                .unwrap(),
        );
        if dead.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut reasons: Vec<String> = dead.iter().filter_map(|d| d.reason.clone()).collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{dead:?}");
    assert!(
        reasons.iter().any(|r| r.contains("spec.command")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("not a submit message")),
        "{reasons:?}"
    );

    // The job's dispatch message goes to the dispatch function: one spot
    // instance, tagged with the job, however often the message comes.
    let dispatch = stack.function("dispatch").await;
    let (jobs, _) = stack
        .pump_until(&dispatch, &stack.bands("dispatch"), "a VM", |jobs| {
            jobs.iter().any(|j| j.state != JobState::Pending)
        })
        .await;
    let job = jobs.iter().find(|j| j.id == job.id).unwrap();
    assert!(
        matches!(job.state, JobState::Allocating | JobState::Starting),
        "{job:?}"
    );
    stack.aws.python(&format!(
        r#"
import boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
found = ec2.describe_instances(Filters=[{{"Name": "tag:respawn:job", "Values": ["{id}"]}}])
instances = [i for r in found["Reservations"] for i in r["Instances"]]
assert len(instances) == 1, instances
tags = {{t["Key"]: t["Value"] for t in instances[0]["Tags"]}}
assert tags["respawn:stack"] == "{stack}" and tags["respawn:attempt"] == "1", tags
assert tags["respawn:project"] == "default", tags
assert instances[0]["InstanceType"] == "g4dn.xlarge", instances[0]["InstanceType"]
assert instances[0].get("InstanceLifecycle") == "spot", instances[0]
"#,
        id = job.id,
        stack = stack.name,
    ));

    // EC2 warns of the interruption, then terminates the instance: EventBridge
    // puts both on the stack's EC2 queue, the events function applies them.
    let first = stack.instances(&job.id.to_string(), None);
    assert_eq!(first.len(), 1, "{first:?}");
    stack.put_ec2_event(
        "EC2 Spot Instance Interruption Warning",
        json!({ "instance-id": first[0], "instance-action": "terminate" }),
    );
    let events = stack.function("events").await;
    let ec2_queue = vec![format!("{}-ec2-no", stack.name)];
    let id = job.id.clone();
    stack
        .pump_until(&events, &ec2_queue, "the notice", |jobs| {
            jobs.iter()
                .any(|j| j.id == id && j.state == JobState::Preempted)
        })
        .await;
    stack.put_ec2_event(
        "EC2 Instance State-change Notification",
        json!({ "instance-id": first[0], "state": "terminated" }),
    );
    let (jobs, _) = stack
        .pump_until(&events, &ec2_queue, "the attempt's end", |jobs| {
            jobs.iter().any(|j| j.id == id && j.attempt == 2)
        })
        .await;
    let job = jobs.iter().find(|j| j.id == id).unwrap();
    assert_eq!(
        job.attempts[0].outcome,
        Some(respawn_core::job::AttemptOutcome::Preempted),
        "{job:?}"
    );

    // The job resumes under the same id on a new instance; the preempted one is
    // terminated.
    stack
        .pump_until(
            &dispatch,
            &stack.bands("dispatch"),
            "attempt 2's VM",
            |jobs| {
                jobs.iter()
                    .any(|j| j.id == id && j.state != JobState::Pending)
            },
        )
        .await;
    let second = stack.instances(&id.to_string(), Some("2"));
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second[0], first[0]);
    let live = stack.instances(&id.to_string(), None);
    assert_eq!(live, second, "only attempt 2's instance runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_record_fails_alone_and_the_rest_of_its_batch_is_done() {
    let stack = Stack::new("fnbatch");
    stack.send(&format!("{}-submit-no", stack.name), &[(SPEC, &[])]);
    let submit = stack.function("submit").await;
    let good = stack.record(&format!("{}-submit-no", stack.name)).await;
    // A record from a queue that is not the function's: it cannot be taken, so it
    // is reported, and only it.
    let mut stray = good.clone();
    stray["messageId"] = json!("stray-1");
    stray["eventSourceARN"] = json!("arn:aws:sqs:us-east-1:123456789012:somewhere-else");
    let answer = submit
        .invoke(json!({ "Records": [good, stray] }))
        .await
        .unwrap();
    assert_eq!(
        answer,
        json!({ "batchItemFailures": [{ "itemIdentifier": "stray-1" }] })
    );
    let jobs = stack.jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
}

/// Lambda freezes a function the moment it answers, so its spans and metrics
/// must be sent before: with the exporter's own schedule 10 minutes away, they are in the
/// receiver when the answer arrives. The consumer span continues the trace the
/// message carried (`traceparent`, an SQS message attribute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_sends_its_spans_before_it_answers_in_the_trace_its_message_carried() {
    let stack = Stack::new("fntrace");
    let dir = tempfile::tempdir().unwrap();
    let otlp = respawn_e2e::otlp::Receiver::start(dir.path());
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace}-{parent}-01");
    let queue = format!("{}-submit-no", stack.name);
    stack.send(&queue, &[(SPEC, &[("traceparent", &traceparent)])]);
    let mut env = lambda::env(&stack.aws.endpoint, &stack.name, stack.config.path());
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), otlp.url.clone()));
    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "600000".into()));
    let submit = Function::start("submit", &env).await;
    let record = stack.record(&queue).await;
    let answer = submit.invoke(json!({ "Records": [record] })).await.unwrap();
    assert_eq!(answer, json!({ "batchItemFailures": [] }));
    let spans = otlp.spans();
    let consumer = spans
        .iter()
        // Named by the logical queue, whichever band's SQS queue held it.
        .find(|s| s["name"] == "submit process")
        .unwrap_or_else(|| panic!("no consumer span in {spans:#?}"));
    assert_eq!(consumer["service"], "respawn-submit");
    // Where it ran, in OpenTelemetry's terms.
    assert_eq!(consumer["resource"]["cloud.provider"], "aws");
    assert_eq!(consumer["resource"]["cloud.platform"], "aws_lambda");
    assert_eq!(consumer["resource"]["faas.name"], "respawn-submit");
    assert_eq!(consumer["trace_id"], trace);
    assert_eq!(consumer["parent_span_id"], parent);
    assert_eq!(consumer["attributes"]["messaging.system"], "aws_sqs");
    let submitted = spans
        .iter()
        .find(|s| s["name"] == "submit")
        .unwrap_or_else(|| panic!("no submit span in {spans:#?}"));
    assert_eq!(submitted["trace_id"], trace);
    assert_eq!(stack.jobs().await.len(), 1);
    // Its metrics went out with its spans: what this instance counted.
    let counted = otlp
        .latest(
            "respawn-submit",
            "respawn.jobs.submitted",
            &[("project", "default")],
        )
        .unwrap_or_else(|| panic!("no metrics: {:#?}", otlp.points()));
    assert_eq!(counted["value"], 1, "{counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_the_bucket_makes_a_job_by_the_trigger_rule() {
    let stack = Stack::new("fnupload");
    stack.aws.python(&format!(
        r#"
import boto3
s3 = boto3.client("s3", endpoint_url="{{endpoint}}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
s3.put_object(Bucket="{stack}-data", Key="incoming/flowers 2026.csv", Body=b"x,y\n1,2\n")
"#,
        stack = stack.name
    ));
    let on_upload = stack.function("on-upload").await;
    let uploads = vec![format!("{}-uploads-no", stack.name)];
    let (jobs, _) = stack
        .pump_until(&on_upload, &uploads, "a job from the upload", |j| {
            !j.is_empty()
        })
        .await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].spec.name, "train-flowers-2026");
    assert_eq!(
        jobs[0].spec.command.last().unwrap(),
        // The stack's own bucket, as every host names it to the agent.
        "bucket://incoming/flowers 2026.csv"
    );
}

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(Emulator::fixture(name)).unwrap()).unwrap()
}

/// An HTTP API (payload 2.0) request, from the fixture.
fn request(method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Value {
    let mut e = fixture("apigw-http-v2-request.json");
    e["rawPath"] = json!(path);
    e["requestContext"]["http"]["method"] = json!(method);
    e["requestContext"]["http"]["path"] = json!(path);
    if let Some(t) = token {
        e["headers"]["authorization"] = json!(format!("Bearer {t}"));
    }
    if let Some(b) = body {
        let kind = if b.starts_with('{') {
            "application/json"
        } else {
            "application/yaml"
        };
        e["headers"]["content-type"] = json!(kind);
        e["headers"]["content-length"] = json!(b.len().to_string());
        e["body"] = json!(b);
    }
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_function_url_requests_the_cli_works_against_it_and_reconcile_and_notify_run()
 {
    let stack = Stack::new("fnapi");
    let cell = Arc::new(tokio::sync::OnceCell::new());
    let url = lambda::function_url(cell.clone()).await;
    cell.set(stack.function("api").await).unwrap();
    let api = cell.get().unwrap();
    let ok = api
        .invoke(fixture("apigw-http-v2-request.json"))
        .await
        .unwrap();
    assert_eq!(ok["statusCode"], 200, "{ok}");
    assert_eq!(ok["body"], "ok", "{ok}");

    let denied = api
        .invoke(request("GET", "/v1/jobs", None, None))
        .await
        .unwrap();
    assert_eq!(denied["statusCode"], 401, "{denied}");

    // The first start left the admin token in the state bucket, for the operator.
    let token = stack.admin_token();
    let token = token.trim();
    let created = api
        .invoke(request(
            "POST",
            "/v1/jobs",
            Some(token),
            Some("name: by-api\ncommand: [train]\n"),
        ))
        .await
        .unwrap();
    assert_eq!(created["statusCode"], 201, "{created}");
    let body: Value = serde_json::from_str(created["body"].as_str().unwrap()).unwrap();
    let jobs = stack.jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id.to_string(), body["id"].as_str().unwrap());

    // Preemption on demand is the local simulator's; a cloud says so.
    let preempt = api
        .invoke(request(
            "POST",
            "/v1/preempt",
            Some(token),
            Some("{\"target\": \"x\"}"),
        ))
        .await
        .unwrap();
    assert_eq!(preempt["statusCode"], 501, "{preempt}");

    // The same CLI as locally, against the function URL.
    let out = tokio::process::Command::new(respawn_e2e::binary("respawn"))
        .args([
            "--endpoint",
            &url,
            "--token",
            token,
            "jobs",
            "--output",
            "json",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        listed.to_string().contains(body["id"].as_str().unwrap()),
        "{listed}"
    );

    // A job whose notify URL is private: cancelling it notifies, and the notify
    // function refuses the URL (public addresses only), records why on the job
    // and dead-letters the message.
    let noted = api
        .invoke(request(
            "POST",
            "/v1/jobs",
            Some(token),
            Some("name: noted\ncommand: [train]\nnotify: [\"http://127.0.0.1:9/hook\"]\n"),
        ))
        .await
        .unwrap();
    assert_eq!(noted["statusCode"], 201, "{noted}");
    let noted: Value = serde_json::from_str(noted["body"].as_str().unwrap()).unwrap();
    let id = noted["id"].as_str().unwrap().to_owned();
    let cancelled = api
        .invoke(request(
            "POST",
            &format!("/v1/jobs/{id}/cancel"),
            Some(token),
            Some("{}"),
        ))
        .await
        .unwrap();
    assert!(
        cancelled["statusCode"].as_u64().unwrap() < 300,
        "{cancelled}"
    );
    let notify = stack.function("notify").await;
    let (jobs, answers) = stack
        .pump_until(
            &notify,
            &stack.bands("notify"),
            "the refusal on the job",
            |jobs| {
                jobs.iter()
                    .any(|j| j.id.to_string() == id && !j.notifications.is_empty())
            },
        )
        .await;
    let job = jobs.iter().find(|j| j.id.to_string() == id).unwrap();
    let n = &job.notifications[0];
    assert!(!n.delivered, "{n:?}");
    assert!(
        n.error.as_deref().unwrap_or_default().contains("private"),
        "{n:?}"
    );
    for a in &answers {
        assert_eq!(a["batchItemFailures"], json!([]), "{a}");
    }

    let reconcile = stack.function("reconcile").await;
    reconcile
        .invoke(fixture("eventbridge-scheduled.json"))
        .await
        .unwrap_or_else(|e| panic!("reconcile failed: {e}"));
}

/// The whole AWS path with the function binaries as the only hosts: the AWS CLI
/// copies a file into the bucket, S3 notifies, `on-upload` makes the job,
/// `dispatch` launches a spot instance, the emulated VM runs the instance's user
/// data (the agent, on S3), EC2 warns of the interruption, the job resumes from its
/// checkpoint on a new instance and its model lands in S3, equal to an
/// uninterrupted run's; no instance is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_copied_with_the_aws_cli_trains_on_spot_through_an_interruption_to_the_same_model() {
    let rule = format!(
        "name: train-on-csv\nmatch:\n  prefix: incoming/\n  glob: \"*.csv\"\ntemplate:\n  name: train-${{stem}}\n  command: [respawn-trainer, {}]\n  inputs: [\"${{uri}}\"]\n",
        TRAINER_ARGS.map(|a| format!("\"{a}\"")).join(", ")
    );
    let stack = Stack::with_rule("fne2e", &rule);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("points.csv");
    respawn_e2e::generate_csv(300, &csv);
    let expected = respawn_e2e::baseline_model(&csv, &TRAINER_ARGS);

    let api = Arc::new(tokio::sync::OnceCell::new());
    let url = lambda::function_url(api.clone()).await;
    api.set(stack.function_with_api("api", &url).await).unwrap();
    let on_upload = stack.function("on-upload").await;
    let dispatch = stack.function_with_api("dispatch", &url).await;
    let events = stack.function("events").await;
    let mut vms = stack.vms();

    let copied = std::process::Command::new(respawn_e2e::aws::root().join(".venv-aws/bin/aws"))
        .args(["s3", "cp"])
        .arg(&csv)
        .arg(format!("s3://{}-data/incoming/points.csv", stack.name))
        .args(["--endpoint-url", &stack.aws.endpoint])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .unwrap();
    assert!(copied.status.success(), "{copied:?}");

    let uploads = vec![format!("{}-uploads-no", stack.name)];
    let mut event_queues = stack.bands("events");
    event_queues.push(format!("{}-ec2-no", stack.name));
    let deadline = respawn_e2e::e2e_deadline(Duration::from_secs(240));
    let mut interrupted: Option<String> = None;
    let mut workload_uids = Vec::new();
    let job = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "not done in time: {:?}\nVMs: {}",
            stack.jobs().await,
            vms.logs()
        );
        on_upload.pump(&stack.sqs, &uploads).await;
        dispatch.pump(&stack.sqs, &stack.bands("dispatch")).await;
        events.pump(&stack.sqs, &event_queues).await;
        vms.step(&stack.aws).await;
        let jobs = stack.jobs().await;
        let Some(job) = jobs.first() else { continue };
        if job.state == JobState::Succeeded {
            break job.clone();
        }
        assert!(!job.state.is_terminal(), "{job:?}");
        if job.state == JobState::Running && workload_uids.is_empty() {
            workload_uids = respawn_e2e::workload_uids(&job.id.to_string());
        }
        if interrupted.is_none()
            && job.attempt == 1
            && job.state == JobState::Running
            && job.attempts[0].last_checkpoint.is_some()
        {
            let first = stack.instances(&job.id.to_string(), Some("1"));
            if first.len() == 1 && vms.running().contains(&first[0]) {
                vms.interrupt(&stack.aws, &first[0]);
                interrupted = Some(first[0].clone());
            }
        }
    };
    let first = interrupted.expect("the first instance was interrupted");
    respawn_e2e::assert_workload_uid(&workload_uids);
    assert_eq!(job.attempts.len(), 2, "{job:?}");
    assert_eq!(
        job.attempts[0].outcome,
        Some(respawn_core::job::AttemptOutcome::Preempted),
        "{job:?}"
    );
    assert!(
        job.attempts[1].restored_checkpoint.is_some(),
        "attempt 2 resumed from a checkpoint: {job:?}"
    );
    // The model in S3 is the uninterrupted run's, byte for byte.
    let model = stack.aws.drive_python(&format!(
        r#"
import base64, boto3
s3 = boto3.client("s3", endpoint_url="{{endpoint}}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
print(base64.b64encode(s3.get_object(Bucket="{stack}-data", Key="jobs/{id}/outputs/model.txt")["Body"].read()).decode())
"#,
        stack = stack.name,
        id = job.id
    ));
    use base64::Engine;
    let model = base64::engine::general_purpose::STANDARD
        .decode(model.trim())
        .unwrap();
    assert!(
        model == expected,
        "the model differs from an uninterrupted run's"
    );
    // Nothing runs for the finished job; the preempted instance is gone.
    for _ in 0..20 {
        vms.step(&stack.aws).await;
        if stack.instances(&job.id.to_string(), None).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        stack.instances(&job.id.to_string(), None),
        Vec::<String>::new()
    );
    assert!(!vms.running().contains(&first));
}

/// The functions a pool test pumps, and its emulated VMs.
struct Pumped<'a> {
    stack: &'a Stack,
    submit: Function,
    dispatch: Function,
    events: Function,
    vms: respawn_e2e::vm::Vms,
}

impl Pumped<'_> {
    fn event_queues(&self) -> Vec<String> {
        let mut q = self.stack.bands("events");
        q.push(format!("{}-ec2-no", self.stack.name));
        q
    }

    /// Pumps every queue and steps the VMs until job `name` satisfies `done`.
    async fn until(
        &mut self,
        name: &str,
        what: &str,
        done: impl Fn(&JobRecord) -> bool,
    ) -> JobRecord {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: not {what}: {:?}\nVMs: {}",
                self.stack.jobs().await,
                self.vms.logs()
            );
            let stack = self.stack;
            self.submit.pump(&stack.sqs, &stack.bands("submit")).await;
            self.dispatch
                .pump(&stack.sqs, &stack.bands("dispatch"))
                .await;
            self.events.pump(&stack.sqs, &self.event_queues()).await;
            self.vms.step(&stack.aws).await;
            if let Some(j) = stack.jobs().await.into_iter().find(|j| j.spec.name == name) {
                if done(&j) {
                    return j;
                }
                assert!(!j.state.is_terminal(), "{j:?}\nVMs: {}", self.vms.logs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn submit(&self, name: &str, script: &str) {
        let spec = json!({"spec": {"name": name, "command": ["sh", "-c", script]}});
        self.stack.send(
            &format!("{}-submit-no", self.stack.name),
            &[(&spec.to_string(), &[])],
        );
    }
}

/// A warm pool on EC2 through the functions: jobs in a row run on one instance
/// (the pool's `max` is 1), each finding nothing the one before left in its
/// folders; a cancelled job's workload is killed on the VM, which takes the next
/// job; once idle past the pool's timeout, `reconcile` retires the instance and
/// its agent ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_a_row_run_on_one_warm_instance_that_retires_when_idle() {
    let stack = Stack::new("fnpool");
    let pools = [("RESPAWN_EC2_POOLS", "warm:max=1,idle=1s")];
    let cell = Arc::new(tokio::sync::OnceCell::new());
    let url = lambda::function_url(cell.clone()).await;
    cell.set(stack.function_with("api", &url, &pools).await)
        .unwrap();
    let api = cell.get().unwrap();
    let reconcile = stack.function_with("reconcile", &url, &pools).await;
    let mut p = Pumped {
        stack: &stack,
        submit: stack.function_with("submit", &url, &pools).await,
        dispatch: stack.function_with("dispatch", &url, &pools).await,
        events: stack.function_with("events", &url, &pools).await,
        vms: stack.vms(),
    };
    // Fails if anything of an earlier job is in its folders; leaves some behind.
    let look = r#"test ! -e left && test ! -e "$RESPAWN_OUTPUT_DIR/left" && touch left "$RESPAWN_OUTPUT_DIR/left""#;
    let succeeded = |j: &JobRecord| j.state == JobState::Succeeded;
    let mut done: Vec<JobRecord> = Vec::new();
    for n in 0..3 {
        p.submit(&format!("warm-{n}"), look);
        done.push(p.until(&format!("warm-{n}"), "succeeded", succeeded).await);
    }

    // A cancelled job: the VM's orders change, its agent kills the workload, and
    // the VM takes the next job.
    p.submit("long", &format!("{look}; sleep 300"));
    let long = p
        .until("long", "running", |j| {
            j.attempts.first().is_some_and(|a| a.started_at.is_some())
        })
        .await;
    let token = stack.admin_token();
    let cancelled = api
        .invoke(request(
            "POST",
            &format!("/v1/jobs/{}/cancel", long.id),
            Some(token.trim()),
            None,
        ))
        .await
        .unwrap();
    assert_eq!(cancelled["statusCode"], 200, "{cancelled}");
    p.until("long", "cancelled", |j| j.state == JobState::Cancelled)
        .await;
    p.submit("after", look);
    done.push(p.until("after", "succeeded", succeeded).await);

    let instances = stack.pool_instances();
    assert_eq!(instances.len(), 1, "one pool instance: {instances:?}");
    let instance = instances[0].0.clone();
    for job in done.iter().chain([&long]) {
        assert_eq!(job.attempts.len(), 1, "{job:?}");
        assert_eq!(job.attempts[0].vm.as_ref(), Some(&instance), "{job:?}");
    }
    assert!(
        p.vms.log(&instance).contains("killing its workload"),
        "{}",
        p.vms.log(&instance)
    );

    // Idle past 1 s, reconcile retires the VM and its agent, told to retire, ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle pool VM was not retired: {:?}\nVMs: {}",
            stack.pool_instances(),
            p.vms.logs()
        );
        p.events.pump(&stack.sqs, &p.event_queues()).await;
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        reconcile
            .invoke(fixture("eventbridge-scheduled.json"))
            .await
            .unwrap_or_else(|e| panic!("reconcile failed: {e}"));
        p.vms.step(&stack.aws).await;
        let gone = stack
            .pool_instances()
            .iter()
            .all(|(_, state)| state == "terminated" || state == "shutting-down");
        if gone && p.vms.running().is_empty() {
            break;
        }
    }
    assert!(
        p.vms.log(&instance).contains("pool vm retiring"),
        "{}",
        p.vms.log(&instance)
    );
}

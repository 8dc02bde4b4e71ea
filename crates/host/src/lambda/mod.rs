//! The AWS host (feature `aws`): the ports a Lambda function builds once from its
//! environment, and SQS batches handed to the same handlers `respawn up`'s loops
//! run, answered with partial batch failures.
//!
//! An SQS event is turned into deliveries as [`SqsQueue::receive`] would make them
//! (receive counts, dead-lettering past the limit, long delays sent on), then
//! opened by the [`SealedQueue`] (a broker queue's unsealed message is
//! dead-lettered unread), and the handlers settle each one through the queue as
//! always: ack and dead-letter delete it, retry-later sets its visibility. A record
//! not deleted by its handler is reported in `batchItemFailures`, so Lambda keeps
//! it (its visibility set by the handler's backoff) instead of deleting it with the
//! batch, and one bad message never replays the others.
//!
//! # Environment
//!
//! | variable | what |
//! | --- | --- |
//! | `RESPAWN_STACK` | the broker's name: tags its instances, prefixes its queues |
//! | `RESPAWN_STATE_BUCKET` | job records, tokens, secrets (no agent can read it) |
//! | `RESPAWN_BUCKET` | the job bucket: inputs, checkpoints, logs, outputs |
//! | `RESPAWN_KEY` | the broker's secret, hex (≥ 32 bytes): agent credentials, queue seals, notification signatures |
//! | `RESPAWN_API_URL` | where agents report (all but the `api` function) |
//! | `RESPAWN_EC2_IMAGE` | the agent's image (AMI) |
//! | `RESPAWN_EC2_CPU_TYPE`, `RESPAWN_EC2_INSTANCE_TYPES`, `RESPAWN_EC2_DEFAULT_GPU` | instance types ([`InstanceTypes::parse`]) |
//! | `RESPAWN_EC2_SUBNET`, `RESPAWN_EC2_VPC` (the subnet's, where gangs' security groups go), `RESPAWN_EC2_SECURITY_GROUPS`, `RESPAWN_EC2_INSTANCE_PROFILE`, `RESPAWN_EC2_LAUNCH_TEMPLATE`, `RESPAWN_EC2_PLACEMENT_GROUP` (multi-node attempts) | where instances run, as whom |
//! | `RESPAWN_EC2_POOLS` | warm pools, `;`-separated [`PoolSpec`](respawn_core::pool::PoolSpec)s (e.g. `cpu:max=4,idle=10m;a10g:gpus=1,max=8`); their state is in the state bucket |
//! | `RESPAWN_CONFIG` | a folder with `triggers/`, `templates/` and `hooks.yaml` (default: `config/` beside the function) |
//!
//! and the AWS SDK's own (`AWS_REGION`, credentials, `AWS_ENDPOINT_URL` for an
//! emulator).

use std::future::Future;
use std::sync::Arc;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use object_store::aws::AmazonS3Builder;
use respawn_adapters::ec2::{AgentBoot, Ec2Compute, Ec2Config, InstanceTypes};
use respawn_adapters::sqs::{Received, SqsQueue};
use respawn_core::ports::queue::{self, Delivery, Receive};
use respawn_core::ports::{Blobs, Ports};
use tracing::{info, warn};

pub mod functions;

pub use aws_lambda_events;
pub use lambda_runtime;
use lambda_runtime::{LambdaEvent, service_fn};

use crate::cloud::{Broker, config_dir, key_from_env, pools_from_env, var};
use crate::replies::Replies;

/// What a function builds once per process.
#[derive(Debug, Clone)]
pub struct Cloud {
    pub broker: Broker,
    pub sqs: Arc<SqsQueue>,
    pub ec2: Arc<Ec2Compute>,
    pub replies: Replies,
    /// The job bucket's name.
    pub bucket: String,
}

fn bucket(name: &str) -> Result<Blobs, String> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(name);
    if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL_S3").or_else(|_| var("AWS_ENDPOINT_URL"))
    {
        b = b
            .with_allow_http(endpoint.starts_with("http://"))
            .with_endpoint(endpoint);
    }
    Ok(Arc::new(
        b.build().map_err(|e| format!("bucket {name}: {e}"))?,
    ))
}

impl Cloud {
    /// The ports from the environment (see the module's table).
    pub async fn from_env() -> Result<Cloud, String> {
        let stack = var("RESPAWN_STACK")?;
        let attempt_key = key_from_env()?;
        let sdk = aws_config::load_from_env().await;
        let state = bucket(&var("RESPAWN_STATE_BUCKET")?)?;
        let data_bucket = var("RESPAWN_BUCKET")?;
        let blobs = bucket(&data_bucket)?;
        let sqs = Arc::new(SqsQueue::from_config(
            &sdk,
            &format!("{stack}-"),
            queue::DEFAULT_MAX_DELIVERIES,
        ));
        let instance_types = match std::env::var("RESPAWN_EC2_INSTANCE_TYPES") {
            Ok(table) if !table.is_empty() => InstanceTypes::parse(
                &table,
                &var("RESPAWN_EC2_DEFAULT_GPU").unwrap_or_else(|_| "a10g".into()),
            )
            .map_err(|e| format!("RESPAWN_EC2_INSTANCE_TYPES: {e}"))?,
            _ => InstanceTypes::default(),
        };
        let ec2 = Arc::new(
            Ec2Compute::new(
                &sdk,
                Ec2Config {
                    stack: stack.clone(),
                    image_id: var("RESPAWN_EC2_IMAGE")?,
                    cpu_instance_type: var("RESPAWN_EC2_CPU_TYPE")
                        .unwrap_or_else(|_| "c6i.large".into()),
                    instance_types,
                    subnet_id: var("RESPAWN_EC2_SUBNET").ok(),
                    vpc_id: var("RESPAWN_EC2_VPC").ok(),
                    security_group_ids: var("RESPAWN_EC2_SECURITY_GROUPS")
                        .map(|s| s.split(',').map(|g| g.trim().to_owned()).collect())
                        .unwrap_or_default(),
                    instance_profile: var("RESPAWN_EC2_INSTANCE_PROFILE").ok(),
                    launch_template: var("RESPAWN_EC2_LAUNCH_TEMPLATE").ok(),
                    agent: AgentBoot {
                        // The api function's own URL; it allocates no VM, so it has none.
                        api: var("RESPAWN_API_URL").unwrap_or_default(),
                        bucket: format!("s3://{data_bucket}"),
                        attempt_key: attempt_key.clone(),
                        heartbeat_secs: 30,
                        grace_secs: 100,
                        otlp: respawn_adapters::cloudvm::otlp_endpoint(
                            &var("RESPAWN_AGENT_OTLP_ENDPOINT").unwrap_or_default(),
                        )?,
                    },
                    pools: pools_from_env("RESPAWN_EC2_POOLS")?,
                    placement_group: var("RESPAWN_EC2_PLACEMENT_GROUP").ok(),
                },
            )?
            .with_pools(state.clone())?,
        );
        let broker = Broker::new(
            "ec2",
            attempt_key,
            state,
            blobs,
            sqs.clone(),
            ec2.clone(),
            &config_dir("LAMBDA_TASK_ROOT"),
        )?;
        Ok(Cloud {
            broker,
            replies: Replies::Sqs(sqs.clone()),
            sqs,
            ec2,
            bucket: data_bucket,
        })
    }

    /// Whether `arn` is one of logical queue `queue`'s SQS queues.
    pub fn is_queue(&self, queue: &str, arn: &str) -> bool {
        self.sqs.is_source(queue, arn)
    }

    /// Hands the records of `event`, from logical queue `queue`, to `handle` (which
    /// settles each delivery through the ports' queue) and reports the records it
    /// did not delete as failures. `deadline_ms` (the invocation's) bounds the
    /// leases: an event source mapping's visibility timeout outlasts it.
    pub async fn batch<F, Fut>(
        &self,
        queue: &str,
        event: SqsEvent,
        deadline_ms: u64,
        handle: F,
    ) -> SqsBatchResponse
    where
        F: FnOnce(Ports, Vec<Delivery>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let (ports, invocation) = self.broker.invocation(self.sqs.clone(), queue);
        let mut records = Vec::new();
        for r in event.records {
            let id = r.message_id.clone().unwrap_or_default();
            let source = r.event_source_arn.clone().unwrap_or_default();
            let received = Received {
                message_id: id.clone(),
                receipt_handle: r.receipt_handle.clone().unwrap_or_default(),
                body: r.body.clone().unwrap_or_default(),
                receive_count: r
                    .attributes
                    .get("ApproximateReceiveCount")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1),
                attributes: r
                    .message_attributes
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.string_value.clone()?)))
                    .collect(),
            };
            match self
                .sqs
                .delivery(queue, &source, received, deadline_ms)
                .await
            {
                Ok(Some(d)) => {
                    records.push((id, Some(d.receipt.clone())));
                    invocation.hand(d);
                }
                // Settled by the adapter (dead-lettered, or sent on until due).
                Ok(None) => records.push((id, None)),
                Err(e) => {
                    warn!(queue, message_id = %id, source, error = %e, "cannot take an SQS record; left for redelivery");
                    records.push((id, Some(String::new())));
                }
            }
        }
        let opened = match ports.queue.receive(queue, Receive::default()).await {
            Ok(d) => d,
            Err(e) => {
                warn!(queue, error = %e, "cannot open the batch");
                Vec::new()
            }
        };
        handle(ports, opened).await;
        let settled = invocation.settled();
        let mut response = SqsBatchResponse::default();
        for (id, receipt) in records {
            if let Some(receipt) = receipt
                && !settled.contains(&receipt)
            {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = id;
                response.batch_item_failures.push(failure);
            }
        }
        if !response.batch_item_failures.is_empty() {
            info!(
                queue,
                failures = response.batch_item_failures.len(),
                "records left for redelivery"
            );
        }
        response
    }
}

/// Logs for CloudWatch (JSON lines with trace and span ids; `RESPAWN_LOG`
/// filters, `info` by default) and traces over OTLP when `OTEL_*` says where,
/// then the ports from the environment: what every function does first.
pub async fn start() -> Result<&'static Cloud, lambda_runtime::Error> {
    let service = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "respawn".into());
    // Never shut down: the process ends when Lambda retires it, and each
    // invocation flushes its spans before it answers (`traced::answered`).
    respawn_telemetry::init(&service, respawn_telemetry::LogFormat::Json);
    let cloud = Cloud::from_env().await?;
    // Built once per process, used by every invocation until the process ends.
    Ok(Box::leak(Box::new(cloud)))
}

/// Runs an SQS-fed function: `handle` gets each batch and the invocation's deadline.
pub async fn serve_sqs<F, Fut>(handle: F) -> Result<(), lambda_runtime::Error>
where
    F: Fn(&'static Cloud, SqsEvent, u64) -> Fut,
    Fut: Future<Output = SqsBatchResponse> + Send + 'static,
{
    let cloud = start().await?;
    lambda_runtime::run(service_fn(|e: LambdaEvent<SqsEvent>| {
        let deadline = e.context.deadline;
        // Boxed: the handlers' futures are deep, too deep to be laid out inline
        // in the runtime's.
        let answer = Box::pin(handle(cloud, e.payload, deadline));
        async move { Ok::<_, lambda_runtime::Error>(crate::traced::answered(answer).await) }
    }))
    .await
}

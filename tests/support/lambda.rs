//! What Lambda does between the AWS emulator and respawn's functions, for tests on
//! a machine without Lambda: the [`Runtime`] API a function binary polls for
//! invocations (the documented `2018-06-01` runtime interface), and the SQS event
//! source ([`Function::pump`]): receive a batch, invoke the function with it as an
//! SQS event, delete what succeeded and leave the reported failures for
//! redelivery.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// How long an invocation may run (the function's timeout).
pub const TIMEOUT: Duration = Duration::from_secs(60);

type Answer = Result<Value, Value>;

#[derive(Clone)]
struct Shared {
    /// When the function first asked for an invocation: its init was done.
    first_poll: Arc<Mutex<Option<std::time::Instant>>>,
    next: Arc<tokio::sync::Mutex<mpsc::Receiver<(String, Value)>>>,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Answer>>>>,
    init_error: Arc<Mutex<Option<Value>>>,
}

/// One function binary under a local Lambda runtime API.
#[derive(Debug)]
pub struct Function {
    name: String,
    child: Child,
    invoke: mpsc::Sender<(String, Value)>,
    shared_waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Answer>>>>,
    init_error: Arc<Mutex<Option<Value>>>,
    first_poll: Arc<Mutex<Option<std::time::Instant>>>,
    started: std::time::Instant,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

async fn next(State(s): State<Shared>) -> impl IntoResponse {
    s.first_poll
        .lock()
        .unwrap()
        .get_or_insert_with(std::time::Instant::now);
    let got = s.next.lock().await.recv().await;
    let Some((id, event)) = got else {
        return (StatusCode::GONE, HeaderMap::new(), String::new());
    };
    let deadline = SystemTime::now()
        .checked_add(TIMEOUT)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis());
    let mut h = HeaderMap::new();
    h.insert("lambda-runtime-aws-request-id", id.parse().unwrap());
    h.insert(
        "lambda-runtime-deadline-ms",
        deadline.to_string().parse().unwrap(),
    );
    h.insert(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:123456789012:function:respawn"
            .parse()
            .unwrap(),
    );
    h.insert(
        "lambda-runtime-trace-id",
        "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"
            .parse()
            .unwrap(),
    );
    (StatusCode::OK, h, event.to_string())
}

async fn answer(s: &Shared, id: &str, body: &[u8], ok: bool) -> StatusCode {
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    match s.waiting.lock().unwrap().remove(id) {
        Some(tx) => {
            let _ = tx.send(if ok { Ok(value) } else { Err(value) });
            StatusCode::ACCEPTED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

impl Function {
    /// Starts `respawn-<name>` (the workspace's build) with `env` and a runtime API
    /// of its own.
    pub async fn start(name: &str, env: &[(String, String)]) -> Function {
        Function::start_binary(&crate::binary(&format!("respawn-{name}")), name, env).await
    }

    /// Starts the function binary at `bin` (a package's `bootstrap`) as function `name`.
    pub async fn start_binary(bin: &Path, name: &str, env: &[(String, String)]) -> Function {
        let (tx, rx) = mpsc::channel(1);
        let shared = Shared {
            first_poll: Arc::default(),
            next: Arc::new(tokio::sync::Mutex::new(rx)),
            waiting: Arc::default(),
            init_error: Arc::default(),
        };
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(
                    |State(s): State<Shared>,
                     UrlPath(id): UrlPath<String>,
                     body: axum::body::Bytes| async move {
                        answer(&s, &id, &body, true).await
                    },
                ),
            )
            .route(
                "/2018-06-01/runtime/invocation/{id}/error",
                post(
                    |State(s): State<Shared>,
                     UrlPath(id): UrlPath<String>,
                     body: axum::body::Bytes| async move {
                        answer(&s, &id, &body, false).await
                    },
                ),
            )
            .route(
                "/2018-06-01/runtime/init/error",
                post(
                    |State(s): State<Shared>, body: axum::body::Bytes| async move {
                        *s.init_error.lock().unwrap() =
                            Some(Value::String(String::from_utf8_lossy(&body).into_owned()));
                        StatusCode::ACCEPTED
                    },
                ),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let started = std::time::Instant::now();
        let child = Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", format!("respawn-{name}"))
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/respawn-{name}"),
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Function {
            name: name.to_owned(),
            child,
            invoke: tx,
            shared_waiting: shared.waiting,
            init_error: shared.init_error,
            first_poll: shared.first_poll,
            started,
        }
    }

    /// Process start → the first poll for an invocation (its init done).
    pub fn init_time(&self) -> Option<std::time::Duration> {
        self.first_poll
            .lock()
            .unwrap()
            .map(|t| t.duration_since(self.started))
    }

    /// When the process was started.
    pub fn started(&self) -> std::time::Instant {
        self.started
    }

    /// Invokes the function with `event`: its answer, or the error it reported.
    pub async fn invoke(&self, event: Value) -> Answer {
        let id = ulid_like();
        let (tx, rx) = oneshot::channel();
        self.shared_waiting.lock().unwrap().insert(id.clone(), tx);
        self.invoke.send((id, event)).await.unwrap();
        match tokio::time::timeout(TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            _ => panic!(
                "{} did not answer within {TIMEOUT:?} (init error: {:?})",
                self.name,
                self.init_error.lock().unwrap()
            ),
        }
    }

    /// One round of the SQS event source: a batch from each of `queues` (SQS names)
    /// that has messages is invoked, successes deleted, failures left. Returns the
    /// answers.
    pub async fn pump(&self, sqs: &Client, queues: &[String]) -> Vec<Value> {
        let mut answers = Vec::new();
        for name in queues {
            let Some((url, arn)) = queue(sqs, name).await else {
                continue;
            };
            let got = sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .visibility_timeout(TIMEOUT.as_secs() as i32 * 6)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send()
                .await
                .unwrap();
            let messages = got.messages();
            if messages.is_empty() {
                continue;
            }
            let records: Vec<Value> = messages.iter().map(|m| record(m, &arn)).collect();
            let answer = self
                .invoke(json!({ "Records": records }))
                .await
                .unwrap_or_else(|e| panic!("{} failed the batch: {e}", self.name));
            let failed: Vec<&str> = answer["batchItemFailures"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .filter_map(|i| i["itemIdentifier"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            for m in messages {
                if !failed.contains(&m.message_id().unwrap_or_default()) {
                    // Deleted already by the function (acked): SQS answers OK.
                    let _ = sqs
                        .delete_message()
                        .queue_url(&url)
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .send()
                        .await;
                }
            }
            answers.push(answer);
        }
        answers
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ulid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "req-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The queue's URL and ARN; `None` when it does not exist (yet).
pub async fn queue(sqs: &Client, name: &str) -> Option<(String, String)> {
    let url = sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .ok()?
        .queue_url()?
        .to_owned();
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .ok()?;
    let arn = attrs
        .attributes()?
        .get(&QueueAttributeName::QueueArn)?
        .clone();
    Some((url, arn))
}

/// An SQS message as Lambda puts it in an event's `Records`.
pub fn record(m: &aws_sdk_sqs::types::Message, arn: &str) -> Value {
    let attributes: serde_json::Map<String, Value> = m
        .attributes()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str().to_owned(), Value::String(v.clone())))
        .collect();
    let message_attributes: serde_json::Map<String, Value> = m
        .message_attributes()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.clone(),
                json!({
                    "stringValue": v.string_value(),
                    "stringListValues": [],
                    "binaryListValues": [],
                    "dataType": v.data_type(),
                }),
            )
        })
        .collect();
    json!({
        "messageId": m.message_id(),
        "receiptHandle": m.receipt_handle(),
        "body": m.body(),
        "attributes": attributes,
        "messageAttributes": message_attributes,
        "md5OfBody": m.md5_of_body(),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": "us-east-1",
    })
}

/// An SQS client for the emulator.
pub fn sqs_client(endpoint: &str) -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "emulator",
        ))
        .build();
    Client::from_conf(config)
}

/// The environment of a function of stack `stack` on the emulator at `endpoint`,
/// with its configuration folder `config`.
pub fn env(endpoint: &str, stack: &str, config: &Path) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("RESPAWN_STACK", stack.into()),
        ("RESPAWN_STATE_BUCKET", format!("{stack}-state")),
        ("RESPAWN_BUCKET", format!("{stack}-data")),
        ("RESPAWN_KEY", "ab".repeat(32)),
        ("RESPAWN_API_URL", "http://127.0.0.1:9".into()),
        ("RESPAWN_EC2_IMAGE", "ami-12c6146b".into()),
        ("RESPAWN_CONFIG", config.display().to_string()),
        ("RESPAWN_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A function URL for the `api` function: each HTTP request becomes a payload 2.0
/// event, the function's answer the HTTP response. Its address; the function may
/// be set later (agents learn the address before the function starts).
pub async fn function_url(api: Arc<tokio::sync::OnceCell<Function>>) -> String {
    use axum::body::Bytes;
    use axum::http::{Method, Uri};
    let app = Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let api = api.clone();
            async move {
                let Some(f) = api.get() else {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        HeaderMap::new(),
                        Vec::new(),
                    );
                };
                let mut h = serde_json::Map::new();
                for (k, v) in &headers {
                    h.insert(k.as_str().to_owned(), json!(v.to_str().unwrap_or_default()));
                }
                let event = json!({
                    "version": "2.0",
                    "routeKey": "$default",
                    "rawPath": uri.path(),
                    "rawQueryString": uri.query().unwrap_or_default(),
                    "headers": h,
                    "requestContext": {
                        "accountId": "123456789012",
                        "apiId": "emulated",
                        "domainName": "emulated.lambda-url.us-east-1.on.aws",
                        "http": {
                            "method": method.as_str(),
                            "path": uri.path(),
                            "protocol": "HTTP/1.1",
                            "sourceIp": "127.0.0.1",
                            "userAgent": "respawn-test"
                        },
                        "requestId": ulid_like(),
                        "routeKey": "$default",
                        "stage": "$default",
                        "timeEpoch": 0
                    },
                    "body": base64_encode(&body),
                    "isBase64Encoded": true,
                });
                let answer = f
                    .invoke(event)
                    .await
                    .unwrap_or_else(|e| json!({"statusCode": 502, "body": e.to_string()}));
                let status =
                    StatusCode::from_u16(answer["statusCode"].as_u64().unwrap_or(502) as u16)
                        .unwrap_or(StatusCode::BAD_GATEWAY);
                let mut out = HeaderMap::new();
                if let Some(hs) = answer["headers"].as_object() {
                    for (k, v) in hs {
                        if let (Ok(name), Some(Ok(value))) = (
                            axum::http::HeaderName::from_bytes(k.as_bytes()),
                            v.as_str().map(axum::http::HeaderValue::from_str),
                        ) {
                            out.insert(name, value);
                        }
                    }
                }
                let text = answer["body"].as_str().unwrap_or_default();
                let body = if answer["isBase64Encoded"] == true {
                    base64_decode(text)
                } else {
                    text.as_bytes().to_vec()
                };
                (status, out, body)
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default()
}

//! The Azure Functions host's part of a function app, for tests: Azure Functions
//! Core Tools cannot be installed here, so this does what the host documents for
//! a custom handler. It reads the app's `host.json` and `function.json` files,
//! starts the handler (`respawn-azure`) with `FUNCTIONS_CUSTOMHANDLER_PORT`, and
//! for each queue-triggered function reads its queue (`%SETTING%` in queue names
//! resolved from the app settings), decodes each message from base64
//! (`messageEncoding`), POSTs `{"Data": {<binding>: text}, "Metadata": {Id,
//! PopReceipt, DequeueCount, …}}` to `/<function>`, deletes the message on a 2xx,
//! makes it visible again after `visibilityTimeout` otherwise, and moves it to
//! `<queue>-poison` once it was dequeued `maxDequeueCount` times. Timer and Event
//! Grid functions are invoked on demand; HTTP requests go to the handler as they
//! came (`enableForwardingHttpRequest`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use respawn_adapters::azqueue::StorageQueue;
use serde_json::{Value, json};

/// A queue-triggered function.
#[derive(Debug, Clone)]
struct QueueFunction {
    name: String,
    binding: String,
    queue: String,
}

/// The handler process and the host's view of the app.
#[derive(Debug)]
pub struct FunctionsHost {
    /// The handler's address (`http://127.0.0.1:<port>`).
    pub url: String,
    child: Child,
    queues: Vec<QueueFunction>,
    /// Every function by name, with its trigger's type.
    pub functions: BTreeMap<String, String>,
    storage: StorageQueue,
    http: reqwest::Client,
    max_dequeue: u32,
    visibility: Duration,
    log: PathBuf,
}

/// `hh:mm:ss` as host.json writes durations.
fn duration(s: &str) -> Duration {
    let parts: Vec<u64> = s.split(':').filter_map(|p| p.parse().ok()).collect();
    match parts[..] {
        [h, m, sec] => Duration::from_secs(h * 3600 + m * 60 + sec),
        _ => Duration::from_secs(0),
    }
}

fn resolve(name: &str, settings: &[(String, String)]) -> String {
    let mut out = name.to_owned();
    for (k, v) in settings {
        out = out.replace(&format!("%{k}%"), v);
    }
    assert!(!out.contains('%'), "an app setting in {name:?} is not set");
    out
}

impl FunctionsHost {
    /// Starts the handler `binary` for the app in `app` with `settings` (the app
    /// settings: its environment); `storage` reads the app's queues (the
    /// `AzureWebJobsStorage` account).
    pub async fn start(
        binary: &Path,
        app: &Path,
        settings: &[(String, String)],
        storage: StorageQueue,
        log: PathBuf,
    ) -> FunctionsHost {
        let host: Value =
            serde_json::from_str(&std::fs::read_to_string(app.join("host.json")).unwrap()).unwrap();
        assert_eq!(host["customHandler"]["enableForwardingHttpRequest"], true);
        let q = &host["extensions"]["queues"];
        assert_eq!(q["messageEncoding"], "base64");
        let mut queues = Vec::new();
        let mut functions = BTreeMap::new();
        for entry in std::fs::read_dir(app).unwrap() {
            let dir = entry.unwrap().path();
            let Ok(text) = std::fs::read_to_string(dir.join("function.json")) else {
                continue;
            };
            let f: Value = serde_json::from_str(&text).unwrap();
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let trigger = f["bindings"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["type"].as_str().unwrap().ends_with("Trigger"))
                .expect("a trigger binding")
                .clone();
            functions.insert(name.clone(), trigger["type"].as_str().unwrap().to_owned());
            if trigger["type"] == "queueTrigger" {
                queues.push(QueueFunction {
                    name,
                    binding: trigger["name"].as_str().unwrap().to_owned(),
                    queue: resolve(trigger["queueName"].as_str().unwrap(), settings),
                });
            }
        }
        // The app's own address may be in its settings (the API URL agents use).
        let port = settings
            .iter()
            .find(|(k, _)| k == "FUNCTIONS_CUSTOMHANDLER_PORT")
            .map_or_else(crate::free_port, |(_, p)| p.parse().unwrap());
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("AzureWebJobsScriptRoot", app)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let host = FunctionsHost {
            url: format!("http://127.0.0.1:{port}"),
            child,
            queues,
            functions,
            storage,
            http: reqwest::Client::new(),
            max_dequeue: q["maxDequeueCount"].as_u64().unwrap() as u32,
            visibility: duration(q["visibilityTimeout"].as_str().unwrap()),
            log,
        };
        for _ in 0..200 {
            if host
                .http
                .get(format!("{}/api/healthz", host.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return host;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the custom handler did not start:\n{}", host.log());
    }

    /// What the handler printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Invokes `function` with `payload` as the host would; its status and answer.
    pub async fn invoke(&self, function: &str, payload: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/{function}", self.url))
            .json(payload)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// The timer trigger's invocation of `function`.
    pub async fn tick(&self, function: &str) -> (u16, Value) {
        assert_eq!(
            self.functions.get(function).map(String::as_str),
            Some("timerTrigger")
        );
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let payload = json!({
            "Data": {"timer": {"Schedule": {"AdjustForDST": true}, "ScheduleStatus": {"Last": now, "Next": now, "LastUpdated": now}, "IsPastDue": false}},
            "Metadata": {"sys": {"MethodName": function, "UtcNow": now, "RandGuid": "00000000-0000-0000-0000-000000000000"}},
        });
        self.invoke(function, &payload).await
    }

    /// Moves `m` from `queue` to `poison` (a copy first, as the host does).
    async fn move_to(&self, poison: &str, queue: &str, m: &respawn_adapters::azqueue::RawMessage) {
        self.storage.put_message(poison, &m.text).await.unwrap();
        let _ = self
            .storage
            .delete_message(queue, &m.id, &m.pop_receipt)
            .await;
    }

    /// The host's `maxDequeueCount` (host.json).
    pub fn max_dequeue(&self) -> u32 {
        self.max_dequeue
    }

    /// One pass over every queue-triggered function's queue; the messages handed
    /// to the handler.
    pub async fn pump(&self) -> usize {
        let mut handed = 0;
        for f in &self.queues {
            let got = self
                .storage
                .get_messages(&f.queue, 16, Duration::from_secs(600))
                .await
                .unwrap();
            for m in got {
                handed += 1;
                let poison = format!("{}-poison", f.queue);
                let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(m.text.trim())
                else {
                    // The host cannot decode it: poison at once.
                    self.move_to(&poison, &f.queue, &m).await;
                    continue;
                };
                let now =
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
                // As the host encodes each value (azure-functions-host,
                // GetHttpScriptInvocationContextValue): what is not an object goes
                // through JsonConvert.SerializeObject, so a string arrives as the
                // JSON text of that string and a number as its text.
                let enc = |s: &str| serde_json::to_string(s).unwrap();
                let payload = json!({
                    "Data": {f.binding.clone(): enc(&String::from_utf8_lossy(&bytes))},
                    "Metadata": {
                        "DequeueCount": m.dequeue_count.to_string(),
                        "ExpirationTime": "9999-12-31T23:59:59+00:00",
                        "Id": enc(&m.id),
                        "InsertionTime": now,
                        "NextVisibleTime": now,
                        "PopReceipt": enc(&m.pop_receipt),
                        "sys": {"MethodName": f.name, "UtcNow": now, "RandGuid": "00000000-0000-0000-0000-000000000000"},
                    },
                });
                let (status, _) = self.invoke(&f.name, &payload).await;
                // The handler may have settled the message itself: a stale pop
                // receipt here is logged by the host and let be.
                if (200..300).contains(&status) {
                    let _ = self
                        .storage
                        .delete_message(&f.queue, &m.id, &m.pop_receipt)
                        .await;
                } else if m.dequeue_count >= self.max_dequeue {
                    // Failed its last allowed time: the host moves it to poison.
                    self.move_to(&poison, &f.queue, &m).await;
                } else {
                    let _ = self
                        .storage
                        .hide_message(&f.queue, &m.id, &m.pop_receipt, self.visibility)
                        .await;
                }
            }
        }
        handed
    }
}

impl Drop for FunctionsHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

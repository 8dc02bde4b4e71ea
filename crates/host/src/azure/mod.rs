//! The Azure host (feature `azure`): the ports a function app builds once from its
//! environment (Blob storage, Storage Queues, Spot VMs through ARM), and the
//! Azure Functions custom handler's invocations handed to the same handlers
//! `respawn up` and the Lambda functions run.
//!
//! The Functions host calls the custom handler (`functions/azure`, one small HTTP
//! server) with `POST /<function>` and `{"Data": {…}, "Metadata": {…}}` for queue,
//! Event Grid and timer triggers, and forwards HTTP requests as they came
//! (`enableForwardingHttpRequest`) to the API. See [`handler`].
//!
//! A queue-triggered message becomes the delivery the Storage Queue adapter would
//! have handed out ([`StorageQueue::triggered`]): the handlers settle it through
//! the queue as always (ack and dead-letter delete it with the host's pop receipt,
//! retry-later sets its visibility). The handler answers 200 when the message was
//! settled and 500 when it was not, so that the Functions host never deletes a
//! message the handlers kept (its own delete or update then fails on a stale pop
//! receipt, which it logs and lets be).
//!
//! # Environment
//!
//! | variable | what |
//! | --- | --- |
//! | `RESPAWN_STACK` | the broker's name: prefixes its queues and VMs, tags its VMs |
//! | `RESPAWN_KEY` | the broker's secret, hex (≥ 32 bytes; a Key Vault reference) |
//! | `RESPAWN_STORAGE_ACCOUNT` | the storage account of queues and containers |
//! | `RESPAWN_STORAGE_KEY` | its shared key; unset: Entra ID tokens (the function app's identity) |
//! | `RESPAWN_STORAGE_EMULATOR` | `1`: Azurite on its default ports (tests) |
//! | `RESPAWN_STATE_CONTAINER` | job records, tokens, secrets (no agent can read it) |
//! | `RESPAWN_CONTAINER` | the job container: inputs, checkpoints, logs, outputs |
//! | `RESPAWN_API_URL` | where agents report (the function app's `https://…/api`) |
//! | `RESPAWN_AZURE_SUBSCRIPTION`, `RESPAWN_AZURE_RESOURCE_GROUP`, `RESPAWN_AZURE_LOCATION` | where VMs are made |
//! | `RESPAWN_AZURE_SUBNET` | the agents' subnet (a resource id) |
//! | `RESPAWN_AZURE_NSG` | the NSG on that subnet (a resource id), where a multi-node attempt's rule lets its nodes reach each other; unset: no rule |
//! | `RESPAWN_AZURE_IMAGE` | `publisher:offer:sku:version` or an image's resource id |
//! | `RESPAWN_AZURE_AGENT_IDENTITY` | the user-assigned identity VMs get (the job container only) |
//! | `RESPAWN_AZURE_CPU_SIZE`, `RESPAWN_AZURE_VM_SIZES`, `RESPAWN_AZURE_DEFAULT_GPU` | VM sizes (`model:gpus=size,…`) |
//! | `RESPAWN_AZURE_MAX_PRICE` | Spot price cap when a job names none (default `-1`: on-demand price) |
//! | `RESPAWN_AZURE_POOLS` | warm pools, `;`-separated [`PoolSpec`](respawn_core::pool::PoolSpec)s (e.g. `cpu:max=4,idle=10m`); their records are in the state container |
//! | `RESPAWN_ARM_ENDPOINT` | ARM (default `https://management.azure.com`) |
//! | `RESPAWN_EVENTGRID_KEY` | the secret Event Grid's webhook URL carries (`?key=`); unset: no webhook |
//! | `RESPAWN_CONFIG` | `triggers/`, `templates/`, `hooks.yaml` (default: `config/` beside the app) |
//!
//! and `azure_identity`'s own (`AZURE_CLIENT_ID`, App Service's `IDENTITY_ENDPOINT`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use object_store::azure::{AzureCredential, MicrosoftAzureBuilder};
use respawn_adapters::azqueue::{Auth, SharedKey, StorageQueue};
use respawn_adapters::azvm::{self, AgentBoot, ArmCompute, ArmConfig};
use respawn_core::ports::Blobs;
use respawn_core::ports::queue::{self};
use tracing::{info, warn};

pub mod handler;

use crate::cloud::{Broker, config_dir, key_from_env, pools_from_env, var};
use crate::replies::Replies;

/// The logical queue Event Grid puts BlobCreated events on (`<stack>-uploads-no`).
pub const UPLOADS: &str = "uploads";

/// What the function app builds once per process.
#[derive(Debug, Clone)]
pub struct AzCloud {
    pub broker: Broker,
    pub queue: Arc<StorageQueue>,
    pub arm: Arc<ArmCompute>,
    /// The job container's name.
    pub container: String,
    /// What Event Grid's webhook URL must carry, if it is on.
    pub eventgrid_key: Option<String>,
}

/// Blob storage with the function app's Entra ID tokens.
#[derive(Debug)]
struct EntraBlobs(Arc<dyn TokenCredential>);

#[async_trait]
impl object_store::CredentialProvider for EntraBlobs {
    type Credential = AzureCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AzureCredential>> {
        let token = self
            .0
            .get_token(&["https://storage.azure.com/.default"], None)
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "MicrosoftAzure",
                source: Box::new(e),
            })?;
        Ok(Arc::new(AzureCredential::BearerToken(
            token.token.secret().to_owned(),
        )))
    }
}

/// How the storage account is reached.
struct Storage {
    account: String,
    emulator: bool,
    key: Option<String>,
    credential: Option<Arc<dyn TokenCredential>>,
}

impl Storage {
    fn container(&self, name: &str) -> Result<Blobs, String> {
        let mut b = MicrosoftAzureBuilder::new().with_container_name(name);
        if self.emulator {
            b = b.with_use_emulator(true);
        } else {
            b = b.with_account(&self.account);
            b = match (&self.key, &self.credential) {
                (Some(key), _) => b.with_access_key(key),
                (None, Some(c)) => b.with_credentials(Arc::new(EntraBlobs(c.clone()))),
                (None, None) => b,
            };
        }
        Ok(Arc::new(
            b.build().map_err(|e| format!("container {name}: {e}"))?,
        ))
    }

    fn queue_endpoint(&self) -> String {
        if self.emulator {
            std::env::var("AZURITE_QUEUE_STORAGE_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:10001".into())
                .trim_end_matches('/')
                .to_owned()
                + "/devstoreaccount1"
        } else {
            format!("https://{}.queue.core.windows.net", self.account)
        }
    }

    fn queue_auth(&self) -> Result<Auth, String> {
        match (&self.key, &self.credential) {
            (Some(key), _) => Ok(SharedKey::new(&self.account, key)?.into()),
            (None, Some(c)) => Ok(Auth::Entra(c.clone())),
            (None, None) => Err("no storage credential".into()),
        }
    }
}

/// Azurite's development account and its well-known key (public, in Azure's docs).
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl AzCloud {
    /// The ports from the environment (see the module's table).
    pub async fn from_env() -> Result<AzCloud, String> {
        let stack = var("RESPAWN_STACK")?;
        let attempt_key = key_from_env()?;
        let credential = azvm::credential_from_env()?;
        let emulator = std::env::var("RESPAWN_STORAGE_EMULATOR").is_ok_and(|v| v == "1");
        let storage = if emulator {
            Storage {
                account: EMULATOR_ACCOUNT.into(),
                emulator,
                key: Some(EMULATOR_KEY.into()),
                credential: None,
            }
        } else {
            Storage {
                account: var("RESPAWN_STORAGE_ACCOUNT")?,
                emulator,
                key: var("RESPAWN_STORAGE_KEY").ok(),
                credential: Some(credential.clone()),
            }
        };
        let state = storage.container(&var("RESPAWN_STATE_CONTAINER")?)?;
        let container = var("RESPAWN_CONTAINER")?;
        let blobs = storage.container(&container)?;
        let queue = Arc::new(StorageQueue::new(
            &storage.queue_endpoint(),
            storage.queue_auth()?,
            &format!("{stack}-"),
            queue::DEFAULT_MAX_DELIVERIES,
        )?);
        let sizes = match std::env::var("RESPAWN_AZURE_VM_SIZES") {
            Ok(table) if !table.is_empty() => azvm::InstanceTypes::parse(
                &table,
                &var("RESPAWN_AZURE_DEFAULT_GPU").unwrap_or_else(|_| "t4".into()),
            )
            .map_err(|e| format!("RESPAWN_AZURE_VM_SIZES: {e}"))?,
            _ => azvm::default_sizes(),
        };
        let max_price = match var("RESPAWN_AZURE_MAX_PRICE") {
            Ok(p) => p
                .parse()
                .map_err(|_| format!("RESPAWN_AZURE_MAX_PRICE: {p:?} is not a number"))?,
            Err(_) => -1.0,
        };
        let arm = Arc::new(ArmCompute::new(
            ArmConfig {
                stack: stack.clone(),
                endpoint: var("RESPAWN_ARM_ENDPOINT")
                    .unwrap_or_else(|_| "https://management.azure.com".into()),
                subscription: var("RESPAWN_AZURE_SUBSCRIPTION")?,
                resource_group: var("RESPAWN_AZURE_RESOURCE_GROUP")?,
                location: var("RESPAWN_AZURE_LOCATION")?,
                subnet: var("RESPAWN_AZURE_SUBNET")?,
                nsg: var("RESPAWN_AZURE_NSG").ok(),
                image: var("RESPAWN_AZURE_IMAGE")
                    .unwrap_or_else(|_| "Canonical:ubuntu-24_04-lts:server:latest".into())
                    .parse()
                    .map_err(|e| format!("RESPAWN_AZURE_IMAGE: {e}"))?,
                agent_identity: var("RESPAWN_AZURE_AGENT_IDENTITY").ok(),
                cpu_size: var("RESPAWN_AZURE_CPU_SIZE")
                    .unwrap_or_else(|_| "Standard_D2s_v5".into()),
                sizes,
                max_price,
                agent: AgentBoot {
                    // The API's own host allocates no VM, so it needs none.
                    api: var("RESPAWN_API_URL").unwrap_or_default(),
                    bucket: format!("az://{container}@{}", storage.account),
                    attempt_key: attempt_key.clone(),
                    heartbeat_secs: 30,
                    // Under Azure's 30 s eviction notice.
                    grace_secs: 25,
                    otlp: respawn_adapters::cloudvm::otlp_endpoint(
                        &var("RESPAWN_AGENT_OTLP_ENDPOINT").unwrap_or_default(),
                    )?,
                },
                follow: Duration::from_secs(20),
                pools: pools_from_env("RESPAWN_AZURE_POOLS")?,
            },
            credential,
            state.clone(),
        )?);
        let broker = Broker::new(
            "azure",
            attempt_key,
            state,
            blobs,
            queue.clone(),
            arm.clone(),
            &config_dir("AzureWebJobsScriptRoot"),
        )?;
        Ok(AzCloud {
            broker,
            queue,
            arm,
            container,
            eventgrid_key: var("RESPAWN_EVENTGRID_KEY").ok(),
        })
    }

    /// Replies to queue submitters: to the Storage Queue (of this account) a
    /// submission names in `reply_to`.
    pub fn replies(&self) -> Replies {
        Replies::Storage(self.queue.clone())
    }
}

/// Logs as the Functions host collects them (stderr, JSON lines with trace and
/// span ids; `RESPAWN_LOG` filters, `info` by default) and traces over OTLP when
/// `OTEL_*` says where, then the ports from the environment.
pub async fn start() -> Result<&'static AzCloud, String> {
    let service = std::env::var("WEBSITE_SITE_NAME").unwrap_or_else(|_| "respawn".into());
    // Sent on the exporters' schedule, and flushed when the Functions host
    // stops the handler (functions/azure).
    respawn_telemetry::init(&service, respawn_telemetry::LogFormat::Json);
    let cloud = AzCloud::from_env().await?;
    if let Err(e) = cloud.broker.first_admin().await {
        warn!(error = %e, "cannot mint the first admin token; the next start tries again");
    } else {
        info!(stack = ?cloud.arm, "azure host ready");
    }
    Ok(Box::leak(Box::new(cloud)))
}

/// A value as the Functions host sends it, as the value it stands for. The host
/// passes each binding's value through `JsonConvert.SerializeObject` unless it
/// is an object (azure-functions-host, `GetHttpScriptInvocationContextValue`):
/// a string arrives as the JSON text of that string (`"\"abc\""`), a number as
/// its text (`"1"`). The documentation's examples show them plain; both are
/// taken.
pub(crate) fn host_value(v: &serde_json::Value) -> serde_json::Value {
    match v {
        // Exactly a JSON string literal, nothing around it.
        serde_json::Value::String(s) if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') => {
            match serde_json::from_str::<String>(s) {
                Ok(inner) => serde_json::Value::String(inner),
                Err(_) => v.clone(),
            }
        }
        other => other.clone(),
    }
}

/// Trigger metadata `key` as text (see [`host_value`]).
fn meta_str(meta: &BTreeMap<String, serde_json::Value>, key: &str) -> Option<String> {
    match host_value(meta.get(key)?) {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn host_values_are_taken_as_sent_and_as_documented() {
        let meta: BTreeMap<String, serde_json::Value> = [
            ("Id".to_owned(), json!("\"5d0d\"")),
            ("PopReceipt".to_owned(), json!("AgAA+w==")),
            ("DequeueCount".to_owned(), json!("2")),
            ("Plain".to_owned(), json!(3)),
        ]
        .into_iter()
        .collect();
        assert_eq!(meta_str(&meta, "Id").as_deref(), Some("5d0d"));
        assert_eq!(meta_str(&meta, "PopReceipt").as_deref(), Some("AgAA+w=="));
        assert_eq!(meta_str(&meta, "DequeueCount").as_deref(), Some("2"));
        assert_eq!(meta_str(&meta, "Plain").as_deref(), Some("3"));
        // A message whose text is JSON arrives as the JSON text of that text.
        let sent = r#"{"a":"b"}"#;
        let encoded = json!(serde_json::to_string(sent).unwrap());
        assert_eq!(host_value(&encoded), json!(sent));
        assert_eq!(host_value(&json!(sent)), json!(sent));
        // Only a literal with nothing around it is unwrapped.
        assert_eq!(host_value(&json!(" \"abc\" ")), json!(" \"abc\" "));
    }
}

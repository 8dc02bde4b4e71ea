//! A [`Queue`] on Azure Storage Queues, for the Azure deployment.
//!
//! - **Priorities**: Storage Queues have none. Each logical queue `Q` is three
//!   queues, `<prefix>q-hi`, `-no` and `-lo` (levels 7–9, 4–6 and 0–3), read highest
//!   first. A name is lowercased and a `.` or `_` becomes `-` (queue names allow
//!   lowercase letters, digits and single hyphens).
//! - **Leases** are visibility timeouts in whole seconds (rounded up). Azure accepts
//!   a pop receipt until the message is handed out again, even after its timeout,
//!   so the lease's end is kept in the receipt and checked here: settling after it
//!   answers `LeaseLost`.
//! - **Deliveries** are Azure's `DequeueCount`; past `max_deliveries` a message goes
//!   to the dead-letter queue with the reason.
//! - **Dead letters** follow Azure Functions' convention: a message of `<name>` goes
//!   to `<name>-poison`. The logical dead-letter queue `Q.dead` reads the three
//!   bands' poison queues.
//! - **Bodies** are base64, as the Azure Functions host expects by default. A
//!   message respawn sends is base64 of a JSON envelope with its metadata (id,
//!   priority, attributes, reason: Storage Queues carry nothing besides the text).
//!   A message from another client (an Event Grid delivery, Azure's own SDK) is
//!   base64 if it decodes as such, else the text itself; its id is Azure's message
//!   id.
//! - **Delays** beyond Azure's longest visibility (7 days) are sent on, 7 days at a
//!   time, until due.
//! - **Auth**: the account's shared key (the Storage REST API's `SharedKey`
//!   scheme), or an Entra ID token (`azure_identity`: a managed identity with
//!   *Storage Queue Data Contributor*), where shared keys are turned off.
//! - **Azure Functions**: a message the Functions host hands a queue-triggered
//!   function becomes the same delivery ([`StorageQueue::triggered`]), settled
//!   through the same calls.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use hmac::Mac;
use respawn_core::ports::queue::{
    Delivery, Depth, Error, Outgoing, Queue, Receive, dead_letter_queue,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::bands::{Band, now_ms, seconds};

const API_VERSION: &str = "2021-12-02";
/// Azure's longest visibility timeout (a delay or a lease).
const MAX_VISIBILITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Azure's message size limit, for the base64 text.
const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Azure hands out at most 32 messages at a time.
const MAX_BATCH: usize = 32;
/// How often an empty queue is asked again while `receive` waits (Azure has no
/// long polling).
const POLL: Duration = Duration::from_millis(200);

/// What respawn's messages carry besides the body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Envelope {
    /// Marks respawn's own envelope.
    respawn: u8,
    id: String,
    #[serde(default)]
    priority: u8,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Not to be handed out before this (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    due_ms: Option<u64>,
    /// Deliveries of earlier copies of this message.
    #[serde(default)]
    earlier_deliveries: u32,
    /// The body, base64.
    body: String,
}

/// The account a queue client signs for.
#[derive(Clone)]
pub struct SharedKey {
    pub account: String,
    key: Vec<u8>,
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedKey")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl SharedKey {
    /// `key` as the portal shows it (base64).
    pub fn new(account: &str, key: &str) -> Result<SharedKey, String> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|e| format!("the storage account key is not base64: {e}"))?;
        Ok(SharedKey {
            account: account.to_owned(),
            key,
        })
    }

    /// The `Authorization` header of a request (the Storage REST API's SharedKey
    /// scheme). `path` is the URL's path, `query` its decoded parameters, `ms` the
    /// `x-ms-*` headers.
    fn authorization(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        ms: &[(&str, String)],
        content_length: usize,
        content_type: &str,
    ) -> String {
        let mut headers: Vec<(String, &str)> = ms
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
            .collect();
        headers.sort();
        let mut params: Vec<(String, &str)> = query
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
            .collect();
        params.sort();
        let length = if content_length == 0 {
            String::new()
        } else {
            content_length.to_string()
        };
        let mut to_sign = format!("{method}\n\n\n{length}\n\n{content_type}\n\n\n\n\n\n\n");
        for (k, v) in &headers {
            to_sign.push_str(&format!("{k}:{v}\n"));
        }
        to_sign.push_str(&format!("/{}{path}", self.account));
        for (k, v) in &params {
            to_sign.push_str(&format!("\n{k}:{v}"));
        }
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        format!("SharedKey {}:{sig}", self.account)
    }
}

/// How requests are authorized.
#[derive(Debug, Clone)]
pub enum Auth {
    SharedKey(SharedKey),
    /// Bearer tokens for `https://storage.azure.com/.default`.
    Entra(std::sync::Arc<dyn azure_core::credentials::TokenCredential>),
}

impl From<SharedKey> for Auth {
    fn from(k: SharedKey) -> Auth {
        Auth::SharedKey(k)
    }
}

/// A queue on Azure Storage Queues.
pub struct StorageQueue {
    http: reqwest_aws::Client,
    /// The account's queue endpoint: `https://<account>.queue.core.windows.net`, or
    /// Azurite's `http://127.0.0.1:10001/devstoreaccount1`.
    endpoint: String,
    key: Auth,
    prefix: String,
    max_deliveries: u32,
}

impl fmt::Debug for StorageQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageQueue")
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .field("max_deliveries", &self.max_deliveries)
            .finish()
    }
}

fn unavailable(what: String) -> Error {
    Error::unavailable(std::io::Error::other(what))
}

/// Where a leased message is: its band and physical queue, when its lease ends,
/// Azure's id and pop receipt.
struct Receipt {
    band: Band,
    until_ms: u64,
    message_id: String,
    pop: String,
}

impl Receipt {
    fn encode(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.band.suffix(),
            self.until_ms,
            self.message_id,
            self.pop
        )
    }

    fn decode(s: &str) -> Result<Receipt, Error> {
        let bad = || Error::Invalid(format!("not a receipt of this queue: {s:?}"));
        let mut parts = s.splitn(4, '|');
        let band = parts.next().and_then(Band::from_suffix).ok_or_else(bad)?;
        let until_ms = parts.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let message_id = parts.next().ok_or_else(bad)?.to_owned();
        let pop = parts.next().ok_or_else(bad)?.to_owned();
        Ok(Receipt {
            band,
            until_ms,
            message_id,
            pop,
        })
    }
}

/// A message as Storage Queues stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub id: String,
    pub pop_receipt: String,
    pub dequeue_count: u32,
    /// As stored (base64 where the sender encoded it).
    pub text: String,
}

/// One message as Get Messages lists it.
#[derive(Debug, Default, Deserialize)]
struct Listed {
    #[serde(rename = "QueueMessage", default)]
    messages: Vec<Got>,
}

#[derive(Debug, Deserialize)]
struct Got {
    #[serde(rename = "MessageId")]
    id: String,
    #[serde(rename = "PopReceipt")]
    pop: String,
    #[serde(rename = "DequeueCount", default)]
    dequeue_count: u32,
    #[serde(rename = "MessageText", default)]
    text: String,
}

/// Messages as Peek Messages lists them: only when each was put matters here.
#[derive(Debug, Default, Deserialize)]
struct Peeked {
    #[serde(rename = "QueueMessage", default)]
    messages: Vec<PeekedMessage>,
}

#[derive(Debug, Deserialize)]
struct PeekedMessage {
    #[serde(rename = "InsertionTime")]
    inserted: String,
}

/// Whether Azure said the pop receipt is no longer current: the message was handed
/// out again (`PopReceiptMismatch`) or is gone (`MessageNotFound`).
fn lease_lost((status, text): &(u16, String)) -> bool {
    *status == 404 || (*status == 400 && text.contains("<Code>PopReceiptMismatch</Code>"))
}

/// Whether `name` is a Storage Queue's name of at most `max` characters: a-z,
/// 0-9 and single '-', starting and ending with a letter or digit.
fn is_queue_name(name: &str, max: usize) -> bool {
    (3..=max).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("--")
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl StorageQueue {
    /// Queues of the account at `endpoint`, signed with `key`; physical names start
    /// with `prefix` (e.g. the stack's name and a `-`).
    pub fn new(
        endpoint: &str,
        key: impl Into<Auth>,
        prefix: &str,
        max_deliveries: u32,
    ) -> Result<StorageQueue, String> {
        let http = reqwest_aws::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(StorageQueue {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            key: key.into(),
            prefix: prefix.to_ascii_lowercase(),
            max_deliveries: max_deliveries.max(1),
        })
    }

    /// The physical queue of logical `queue`'s `band` (its poison queue for a
    /// dead-letter queue's).
    fn physical(&self, queue: &str, band: Band) -> Result<String, Error> {
        let (base, poison) = match queue.strip_suffix(".dead") {
            Some(q) => (q, true),
            None => (queue, false),
        };
        let mut name: String = format!("{}{}-{}", self.prefix, base, band.suffix())
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c == '.' || c == '_' { '-' } else { c })
            .collect();
        if poison {
            name.push_str("-poison");
        }
        // A queue's poison queue must fit too.
        let room = if poison { 63 } else { 63 - "-poison".len() };
        if !is_queue_name(&name, room) {
            return Err(Error::Invalid(format!(
                "queue {queue:?} makes the Storage Queue name {name:?}: names are 3 to 63 of a-z, 0-9 and single '-' (56 for a queue, whose poison queue adds \"-poison\")"
            )));
        }
        Ok(name)
    }

    /// One signed request; the response when Azure answered 2xx.
    async fn call(
        &self,
        method: reqwest_aws::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<String>,
    ) -> Result<reqwest_aws::Response, (u16, String)> {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let ms = [
            ("x-ms-date", date),
            ("x-ms-version", API_VERSION.to_owned()),
        ];
        let body = body.unwrap_or_default();
        let content_type = if body.is_empty() {
            ""
        } else {
            "application/xml"
        };
        // The signed path is the URL's (Azurite's includes the account).
        let mut url = reqwest_aws::Url::parse(&format!("{}{path}", self.endpoint))
            .map_err(|e| (0, format!("bad queue URL: {e}")))?;
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let auth = match &self.key {
            Auth::SharedKey(key) => key.authorization(
                method.as_str(),
                url.path(),
                query,
                &ms,
                body.len(),
                content_type,
            ),
            Auth::Entra(credential) => {
                let token = credential
                    .get_token(&["https://storage.azure.com/.default"], None)
                    .await
                    .map_err(|e| (0, format!("no Entra ID token for Storage Queues: {e}")))?;
                format!("Bearer {}", token.token.secret())
            }
        };
        let mut req = self.http.request(method, url).header("authorization", auth);
        for (k, v) in &ms {
            req = req.header(*k, v);
        }
        if !body.is_empty() {
            req = req.header("content-type", content_type);
        }
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| (0, e.to_string()))?;
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        Err((status, text))
    }

    fn failed(what: &str, (status, text): (u16, String)) -> Error {
        let code = text
            .split("<Code>")
            .nth(1)
            .and_then(|r| r.split("</Code>").next())
            .unwrap_or("")
            .to_owned();
        if status == 400 && !code.is_empty() && code != "PopReceiptMismatch" {
            Error::Invalid(format!("Storage Queues: {what}: {code}"))
        } else {
            unavailable(format!("Storage Queues: {what}: {status} {code}"))
        }
    }

    async fn create(&self, name: &str) -> Result<(), Error> {
        match self
            .call(reqwest_aws::Method::PUT, &format!("/{name}"), &[], None)
            .await
        {
            Ok(_) | Err((409, _)) => Ok(()),
            Err(e) => Err(Self::failed(&format!("create {name}"), e)),
        }
    }

    /// Puts one message's text, visible after `delay`; creates the queue on first
    /// use.
    async fn put(&self, name: &str, text: &str, delay: Duration) -> Result<(), Error> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(Error::Invalid(format!(
                "a message of {} bytes (base64) is over Storage Queues' limit of {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        let body = format!(
            "<QueueMessage><MessageText>{}</MessageText></QueueMessage>",
            xml_escape(text)
        );
        let query = [
            ("messagettl", "-1".to_owned()),
            (
                "visibilitytimeout",
                seconds(delay, MAX_VISIBILITY).to_string(),
            ),
        ];
        let path = format!("/{name}/messages");
        match self
            .call(reqwest_aws::Method::POST, &path, &query, Some(body.clone()))
            .await
        {
            Ok(_) => Ok(()),
            Err((404, _)) => {
                self.create(name).await?;
                self.call(reqwest_aws::Method::POST, &path, &query, Some(body))
                    .await
                    .map(drop)
                    .map_err(|e| Self::failed(&format!("put to {name}"), e))
            }
            Err(e) => Err(Self::failed(&format!("put to {name}"), e)),
        }
    }

    async fn send_envelope(
        &self,
        queue: &str,
        mut env: Envelope,
        delay: Duration,
    ) -> Result<(), Error> {
        let name = self.physical(queue, Band::of(env.priority))?;
        if delay > MAX_VISIBILITY {
            env.due_ms =
                Some(now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)));
        }
        let json = serde_json::to_vec(&env).map_err(|e| Error::Invalid(e.to_string()))?;
        let text = base64::engine::general_purpose::STANDARD.encode(json);
        self.put(&name, &text, delay).await
    }

    /// Get Messages (or Peek Messages, as `query` says) on queue `name`, read
    /// as `T`; none (`T::default()`) from a queue that does not exist. `what`
    /// names the call in errors.
    async fn messages<T: serde::de::DeserializeOwned + Default>(
        &self,
        name: &str,
        query: &[(&str, String)],
        what: &str,
    ) -> Result<T, Error> {
        let resp = match self
            .call(
                reqwest_aws::Method::GET,
                &format!("/{name}/messages"),
                query,
                None,
            )
            .await
        {
            Ok(r) => r,
            Err((404, _)) => return Ok(T::default()),
            Err(e) => return Err(Self::failed(&format!("{what} {name}"), e)),
        };
        let xml = resp
            .text()
            .await
            .map_err(|e| unavailable(format!("{what} {name}: {e}")))?;
        quick_xml::de::from_str(&xml)
            .map_err(|e| unavailable(format!("{what} {name}: unreadable answer: {e}")))
    }

    /// One band's approximate count (`x-ms-approximate-messages-count`, leased
    /// and delayed messages included) and when its first visible message was
    /// put; nothing for a queue that does not exist.
    async fn band_depth(&self, name: &str) -> Result<(u64, Option<std::time::SystemTime>), Error> {
        let meta = match self
            .call(
                reqwest_aws::Method::GET,
                &format!("/{name}"),
                &[("comp", "metadata".to_owned())],
                None,
            )
            .await
        {
            Ok(r) => r,
            Err((404, _)) => return Ok((0, None)),
            Err(e) => return Err(Self::failed(&format!("count {name}"), e)),
        };
        let count = meta
            .headers()
            .get("x-ms-approximate-messages-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if count == 0 {
            return Ok((0, None));
        }
        let query = [
            ("peekonly", "true".to_owned()),
            ("numofmessages", "1".to_owned()),
        ];
        let peeked: Peeked = self.messages(name, &query, "peek at").await?;
        let first = peeked
            .messages
            .first()
            .and_then(|m| httpdate::parse_http_date(&m.inserted).ok());
        Ok((count, first))
    }

    async fn delete(&self, name: &str, r: &Receipt) -> Result<(), Error> {
        match self
            .call(
                reqwest_aws::Method::DELETE,
                &format!("/{name}/messages/{}", r.message_id),
                &[("popreceipt", r.pop.clone())],
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if lease_lost(&e) => Err(Error::LeaseLost {
                id: r.message_id.clone(),
            }),
            Err(e) => Err(Self::failed(&format!("delete from {name}"), e)),
        }
    }

    /// The receipt of a delivery whose lease is still on, and its physical queue.
    fn leased(&self, d: &Delivery) -> Result<(Receipt, String), Error> {
        let r = Receipt::decode(&d.receipt)?;
        if now_ms() >= r.until_ms {
            return Err(Error::LeaseLost { id: d.id.clone() });
        }
        let name = self.physical(&d.queue, r.band)?;
        Ok((r, name))
    }

    fn envelope_of(d: &Delivery) -> Envelope {
        Envelope {
            respawn: 1,
            id: d.id.clone(),
            priority: d.priority,
            attributes: d.attributes.clone(),
            reason: d.reason.clone(),
            due_ms: None,
            earlier_deliveries: d.deliveries,
            body: base64::engine::general_purpose::STANDARD.encode(&d.body),
        }
    }

    /// Reads one band: up to `max` messages, each handed out, held back (not due
    /// yet) or dead-lettered.
    async fn take_band(
        &self,
        queue: &str,
        band: Band,
        max: usize,
        visibility: u64,
    ) -> Result<Vec<Delivery>, Error> {
        let name = self.physical(queue, band)?;
        let until_ms = now_ms().saturating_add(visibility * 1000);
        let query = [
            ("numofmessages", max.clamp(1, MAX_BATCH).to_string()),
            ("visibilitytimeout", visibility.to_string()),
        ];
        let listed: Listed = self.messages(&name, &query, "get from").await?;
        let mut out = Vec::new();
        for m in listed.messages {
            let receipt = Receipt {
                band,
                until_ms,
                message_id: m.id.clone(),
                pop: m.pop.clone(),
            };
            let id = m.id.clone();
            match self.take(queue, band, &name, m, receipt).await {
                Ok(Some(d)) => out.push(d),
                Ok(None) => {}
                // One message that cannot be moved (sent on, dead-lettered) stays
                // leased and comes back; the others are handed out.
                Err(e) => {
                    warn!(queue, message_id = %id, error = %e, "cannot take a message; it comes back after its lease")
                }
            }
        }
        Ok(out)
    }

    async fn take(
        &self,
        queue: &str,
        band: Band,
        name: &str,
        m: Got,
        receipt: Receipt,
    ) -> Result<Option<Delivery>, Error> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let decoded = b64.decode(m.text.trim()).ok();
        let env = decoded
            .as_deref()
            .and_then(|d| serde_json::from_slice::<Envelope>(d).ok())
            .filter(|e| e.respawn == 1);
        let (env, body, undecodable) = match env {
            Some(env) => match b64.decode(&env.body) {
                Ok(body) => (env, Bytes::from(body), None),
                Err(e) => (
                    env,
                    Bytes::from(m.text.clone()),
                    Some(format!("an envelope whose body does not decode: {e}")),
                ),
            },
            // Another client's message: base64 as Azure Functions writes them, or
            // the text as it is.
            None => {
                let body = decoded.map_or_else(|| Bytes::from(m.text.clone()), Bytes::from);
                let env = Envelope {
                    respawn: 1,
                    id: m.id.clone(),
                    priority: band.level(),
                    attributes: BTreeMap::from([("message_id".to_owned(), m.id.clone())]),
                    ..Envelope::default()
                };
                (env, body, None)
            }
        };
        let now = now_ms();
        if undecodable.is_none()
            && let Some(due) = env.due_ms
            && due > now
        {
            // Not due: on again, up to Azure's longest delay.
            let mut again = env;
            again.due_ms = None;
            self.send_envelope(queue, again, Duration::from_millis(due - now))
                .await?;
            self.delete(name, &receipt).await?;
            return Ok(None);
        }
        let dead_queue = queue.ends_with(".dead");
        let deliveries = env
            .earlier_deliveries
            .saturating_add(m.dequeue_count.max(1));
        let why = undecodable.or_else(|| {
            (deliveries > self.max_deliveries && !dead_queue).then(|| {
                format!(
                    "delivered {deliveries} times without being settled (max_deliveries {})",
                    self.max_deliveries
                )
            })
        });
        let delivery = Delivery {
            queue: queue.to_owned(),
            id: env.id,
            body,
            priority: env.priority,
            deliveries,
            receipt: receipt.encode(),
            reason: env.reason.or_else(|| {
                // Moved by another (the Azure Functions host) without saying why.
                dead_queue.then(|| "moved to the poison queue".to_owned())
            }),
            attributes: env.attributes,
        };
        if let Some(why) = why {
            warn!(queue, id = %delivery.id, deliveries, reason = %why, "message dead-lettered");
            self.dead_letter(&delivery, &why).await?;
            return Ok(None);
        }
        Ok(Some(delivery))
    }
}

impl StorageQueue {
    /// The delivery of message `m` that the Azure Functions host handed a
    /// function triggered by physical queue `physical` (one of logical `queue`'s
    /// bands), as [`Queue::receive`] would hand it out; `lease` is how long the host
    /// keeps it invisible. `None` when it was settled here (dead-lettered past
    /// `max_deliveries`, or sent on until due).
    pub async fn triggered(
        &self,
        queue: &str,
        physical: &str,
        m: RawMessage,
        lease: Duration,
    ) -> Result<Option<Delivery>, Error> {
        let band = Band::ALL
            .into_iter()
            .find(|b| self.physical(queue, *b).is_ok_and(|n| n == physical))
            .ok_or_else(|| {
                Error::Invalid(format!("{physical:?} is not one of queue {queue:?}'s"))
            })?;
        let receipt = Receipt {
            band,
            until_ms: now_ms().saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)),
            message_id: m.id.clone(),
            pop: m.pop_receipt.clone(),
        };
        let got = Got {
            id: m.id,
            pop: m.pop_receipt,
            dequeue_count: m.dequeue_count,
            text: m.text,
        };
        self.take(queue, band, physical, got, receipt).await
    }

    /// Up to `max` messages of physical queue `physical`, as Get Messages hands
    /// them out (the text as stored), invisible for `visibility`: what the Azure
    /// Functions host reads before it triggers a function.
    pub async fn get_messages(
        &self,
        physical: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<RawMessage>, Error> {
        let query = [
            ("numofmessages", max.clamp(1, MAX_BATCH).to_string()),
            (
                "visibilitytimeout",
                seconds(visibility, MAX_VISIBILITY).max(1).to_string(),
            ),
        ];
        let listed: Listed = self.messages(physical, &query, "get from").await?;
        Ok(listed
            .messages
            .into_iter()
            .map(|m| RawMessage {
                id: m.id,
                pop_receipt: m.pop,
                dequeue_count: m.dequeue_count,
                text: m.text,
            })
            .collect())
    }

    /// Deletes a message by id and pop receipt; `LeaseLost` when the receipt is
    /// stale (another deleted or updated it).
    pub async fn delete_message(&self, physical: &str, id: &str, pop: &str) -> Result<(), Error> {
        self.delete(
            physical,
            &Receipt {
                band: Band::ALL[0],
                until_ms: u64::MAX,
                message_id: id.to_owned(),
                pop: pop.to_owned(),
            },
        )
        .await
    }

    /// Makes a message visible again after `after` (Update Message).
    pub async fn hide_message(
        &self,
        physical: &str,
        id: &str,
        pop: &str,
        after: Duration,
    ) -> Result<(), Error> {
        let query = [
            ("popreceipt", pop.to_owned()),
            (
                "visibilitytimeout",
                seconds(after, MAX_VISIBILITY).to_string(),
            ),
        ];
        match self
            .call(
                reqwest_aws::Method::PUT,
                &format!("/{physical}/messages/{id}"),
                &query,
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if lease_lost(&e) => Err(Error::LeaseLost { id: id.to_owned() }),
            Err(e) => Err(Self::failed(&format!("update in {physical}"), e)),
        }
    }

    /// Puts `text` (as stored: base64 for the Functions host) on physical queue
    /// `physical`.
    pub async fn put_message(&self, physical: &str, text: &str) -> Result<(), Error> {
        self.put(physical, text, Duration::ZERO).await
    }

    /// Sends `body` (JSON) to a submitter's own queue `to` (its name, in this
    /// account), base64 as the Functions host and Azure's SDKs read it, with
    /// `correlation_id` added to the object; `Ok(false)` when that queue does not
    /// exist. The broker's own queues (its prefix) are never a reply's.
    pub async fn reply(
        &self,
        to: &str,
        correlation_id: Option<&str>,
        body: &[u8],
    ) -> Result<bool, Error> {
        if !self.prefix.is_empty() && to.to_ascii_lowercase().starts_with(&self.prefix) {
            return Err(Error::Invalid(format!(
                "{to:?} is one of the broker's queues, not a reply queue"
            )));
        }
        if !is_queue_name(to, 63) {
            return Err(Error::Invalid(format!(
                "{to:?} is not a Storage Queue name (3 to 63 of a-z, 0-9 and single '-')"
            )));
        }
        let mut value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| Error::Invalid(e.to_string()))?;
        if let (Some(id), Some(obj)) = (correlation_id, value.as_object_mut()) {
            obj.insert("correlation_id".into(), id.into());
        }
        let text = base64::engine::general_purpose::STANDARD.encode(value.to_string());
        let xml = format!(
            "<QueueMessage><MessageText>{}</MessageText></QueueMessage>",
            xml_escape(&text)
        );
        match self
            .call(
                reqwest_aws::Method::POST,
                &format!("/{to}/messages"),
                &[("messagettl", "-1".to_owned())],
                Some(xml),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err((404, _)) => Ok(false),
            Err(e) => Err(Self::failed(&format!("reply to {to}"), e)),
        }
    }

    /// The physical queues of logical `queue`, highest band first (what a function
    /// app's queue triggers name).
    pub fn physical_queues(&self, queue: &str) -> Result<Vec<String>, Error> {
        Band::ALL
            .into_iter()
            .map(|b| self.physical(queue, b))
            .collect()
    }
}

#[async_trait]
impl Queue for StorageQueue {
    fn system(&self) -> &'static str {
        "azure_storage_queue"
    }

    async fn send(&self, queue: &str, msg: Outgoing) -> Result<String, Error> {
        let id = ulid::Ulid::generate().to_string().to_lowercase();
        let env = Envelope {
            respawn: 1,
            id: id.clone(),
            priority: msg.priority,
            attributes: msg.attributes,
            body: base64::engine::general_purpose::STANDARD.encode(&msg.body),
            ..Envelope::default()
        };
        self.send_envelope(queue, env, msg.delay).await?;
        Ok(id)
    }

    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, Error> {
        let deadline = tokio::time::Instant::now() + opts.wait;
        let visibility = seconds(opts.lease, MAX_VISIBILITY).max(1);
        let mut out = Vec::new();
        loop {
            for band in Band::ALL {
                while out.len() < opts.max {
                    let got = self
                        .take_band(queue, band, opts.max - out.len(), visibility)
                        .await?;
                    if got.is_empty() {
                        break;
                    }
                    out.extend(got);
                }
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<(), Error> {
        let (r, name) = self.leased(d)?;
        self.delete(&name, &r).await
    }

    /// Azure's approximate counts of every band; the age of the oldest message
    /// that is visible now (Peek Messages sees no leased or delayed one).
    async fn depth(&self, queue: &str) -> Result<Option<Depth>, Error> {
        let mut messages = 0;
        let mut first: Option<std::time::SystemTime> = None;
        for band in Band::ALL {
            let (n, at) = self.band_depth(&self.physical(queue, band)?).await?;
            messages += n;
            first = match (first, at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(Some(Depth {
            messages,
            oldest: if messages == 0 {
                Some(Duration::ZERO)
            } else {
                first.map(|t| t.elapsed().unwrap_or_default())
            },
        }))
    }

    async fn retry_later(&self, d: &Delivery, delay: Duration) -> Result<(), Error> {
        let (r, name) = self.leased(d)?;
        if delay > MAX_VISIBILITY {
            // Past Azure's visibility limit: a new copy, which keeps the count.
            self.send_envelope(&d.queue, Self::envelope_of(d), delay)
                .await?;
            return self.delete(&name, &r).await;
        }
        let query = [
            ("popreceipt", r.pop.clone()),
            (
                "visibilitytimeout",
                seconds(delay, MAX_VISIBILITY).to_string(),
            ),
        ];
        match self
            .call(
                reqwest_aws::Method::PUT,
                &format!("/{name}/messages/{}", r.message_id),
                &query,
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if lease_lost(&e) => Err(Error::LeaseLost { id: d.id.clone() }),
            Err(e) => Err(Self::failed(&format!("update in {name}"), e)),
        }
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), Error> {
        let (r, name) = self.leased(d)?;
        let mut env = Self::envelope_of(d);
        env.reason = Some(reason.to_owned());
        env.earlier_deliveries = 0;
        // Copied first, then deleted: a crash between leaves a duplicate, never a loss.
        let json = serde_json::to_vec(&env).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut text = base64::engine::general_purpose::STANDARD.encode(json);
        if text.len() > MAX_TEXT_BYTES {
            // Too big with its envelope: the body alone, as the Functions host moves
            // a poison message; the reason is in the log.
            warn!(queue = %d.queue, id = %d.id, %reason, "dead letter too big for its reason; moved without it");
            text = base64::engine::general_purpose::STANDARD.encode(&d.body);
        }
        let poison = self.physical(&dead_letter_queue(&d.queue), r.band)?;
        self.put(&poison, &text, Duration::ZERO).await?;
        self.delete(&name, &r).await
    }

    async fn declare(&self, queue: &str) -> Result<(), Error> {
        for band in Band::ALL {
            self.create(&self.physical(queue, band)?).await?;
            self.create(&self.physical(&dead_letter_queue(queue), band)?)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn queue() -> StorageQueue {
        StorageQueue::new(
            "http://127.0.0.1:10001/devstoreaccount1",
            SharedKey::new("devstoreaccount1", "a2V5").unwrap(),
            "stack-",
            5,
        )
        .unwrap()
    }

    #[test]
    fn names_follow_azure_rules_and_the_poison_convention() {
        let q = queue();
        assert_eq!(q.physical("events", Band::High).unwrap(), "stack-events-hi");
        assert_eq!(
            q.physical("submit.dead", Band::Normal).unwrap(),
            "stack-submit-no-poison"
        );
        assert_eq!(q.physical("Conf_X", Band::Low).unwrap(), "stack-conf-x-lo");
        assert!(q.physical("a--b", Band::Low).is_err());
        assert!(q.physical(&"x".repeat(70), Band::Low).is_err());
        // Its poison queue would not fit.
        assert!(q.physical(&"x".repeat(50), Band::Low).is_err());
        assert!(q.physical(&"x".repeat(47), Band::Low).is_ok());
    }

    #[test]
    fn receipts_round_trip_and_refuse_garbage() {
        let r = Receipt {
            band: Band::Normal,
            until_ms: 42,
            message_id: "m-1".into(),
            pop: "AgAAAA|odd".into(),
        };
        let back = Receipt::decode(&r.encode()).unwrap();
        assert_eq!(
            (
                back.band,
                back.until_ms,
                back.message_id.as_str(),
                back.pop.as_str()
            ),
            (Band::Normal, 42, "m-1", "AgAAAA|odd")
        );
        for bad in ["", "xx|1|a|b", "hi|soon|a|b", "hi|1|a"] {
            assert!(Receipt::decode(bad).is_err(), "{bad}");
        }
    }

    /// The example of the Storage REST API's docs' shape: method, empty standard
    /// headers, the x-ms headers sorted, the account and path, the query sorted.
    #[test]
    fn shared_key_signs_the_canonical_request() {
        let key = SharedKey::new("acct", "a2V5").unwrap();
        let auth = key.authorization(
            "GET",
            "/q/messages",
            &[
                ("visibilitytimeout", "30".into()),
                ("numofmessages", "2".into()),
            ],
            &[
                ("x-ms-version", API_VERSION.into()),
                ("x-ms-date", "d".into()),
            ],
            0,
            "",
        );
        let to_sign = format!(
            "GET\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:d\nx-ms-version:{API_VERSION}\n/acct/q/messages\nnumofmessages:2\nvisibilitytimeout:30"
        );
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(b"key").unwrap();
        mac.update(to_sign.as_bytes());
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(auth, format!("SharedKey acct:{want}"));
    }
}

//! A [`Queue`] on Amazon SQS (standard queues), for the AWS deployment.
//!
//! - **Priorities**: SQS has none; AWS's advice is a queue per priority. Each logical
//!   queue `Q` is three SQS queues, `<prefix>Q-hi`, `-no` and `-lo` (levels 7–9, 4–6
//!   and 0–3: respawn's named priorities high, normal and low fall one in each), read
//!   highest first. Levels within one band are served in arrival order. A `.` in a
//!   logical name becomes `_` (SQS allows letters, digits, `-` and `_`).
//! - **Leases** are visibility timeouts, in whole seconds (rounded up). SQS deletes a
//!   message even for a receipt whose visibility ended, so the lease's end is kept in
//!   the receipt and checked here: settling after it answers `LeaseLost`.
//! - **Deliveries** come from `ApproximateReceiveCount`; past `max_deliveries` a
//!   message goes to `Q.dead` with the reason. Each band also has an SQS redrive
//!   policy to the dead-letter queue a few receives later, for consumers that die
//!   before they can move it (its reason then says so).
//! - **Delays** over SQS's 15 minutes: the message carries its due time and is sent
//!   on again, 15 minutes at a time, until due; a retry later than the 12-hour
//!   visibility limit is a new copy that keeps the count of deliveries.
//! - **Metadata** (id, priority, attributes, reason) travels in one message attribute,
//!   `respawn`, as JSON: SQS allows ten attributes, and a message's id must survive
//!   the copies above. A message from another client (an S3 notification, a
//!   submission sent with boto3) has none: its id is the SQS message id and its string
//!   message attributes are its attributes.
//! - **Bodies** that SQS cannot carry as text (not UTF-8, or characters outside XML's)
//!   are sent as base64 and decoded on receipt.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use base64::Engine;
use bytes::Bytes;
use respawn_core::ports::queue::{
    DEFAULT_MAX_DELIVERIES, Delivery, Depth, Error, Outgoing, Queue, Receive, dead_letter_queue,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::bands::{Band, now_ms};

/// SQS's longest `DelaySeconds`.
const MAX_DELAY: Duration = Duration::from_secs(900);
/// SQS's longest visibility timeout.
const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
/// SQS's message size limit (256 KiB, attributes included); the body gets the rest.
const MAX_BODY_BYTES: usize = 256 * 1024 - 8 * 1024;
/// SQS queue names are at most 80 characters.
const MAX_NAME: usize = 80;
/// Receives a consumer that died may take before SQS's redrive policy moves the
/// message, beyond `max_deliveries` (after which this adapter moves it itself).
const REDRIVE_SLACK: u32 = 3;
const META: &str = "respawn";

/// What travels with each message, in the `respawn` attribute.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    id: String,
    #[serde(default)]
    priority: u8,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Not to be handed out before this (ms since the epoch): delays past SQS's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    due_ms: Option<u64>,
    /// Deliveries of earlier copies of this message.
    #[serde(default, skip_serializing_if = "is_zero")]
    earlier_deliveries: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    base64: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A message as SQS hands it to a consumer: by `ReceiveMessage`, or in the records
/// of a Lambda function's SQS event.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    /// `ApproximateReceiveCount`.
    pub receive_count: u32,
    /// String message attributes by name (respawn's own `respawn` among them).
    pub attributes: BTreeMap<String, String>,
}

impl Received {
    fn of(m: &aws_sdk_sqs::types::Message) -> Received {
        Received {
            message_id: m.message_id().unwrap_or_default().to_owned(),
            receipt_handle: m.receipt_handle().unwrap_or_default().to_owned(),
            body: m.body().unwrap_or_default().to_owned(),
            receive_count: m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1),
            attributes: m
                .message_attributes()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.string_value()?.to_owned())))
                .collect(),
        }
    }
}

/// A queue on SQS.
pub struct SqsQueue {
    client: Client,
    prefix: String,
    max_deliveries: u32,
    urls: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for SqsQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsQueue")
            .field("prefix", &self.prefix)
            .field("max_deliveries", &self.max_deliveries)
            .finish()
    }
}

/// Whole seconds, rounded up, at most `max`, as SQS takes them.
fn seconds(d: Duration, max: Duration) -> i32 {
    i32::try_from(crate::bands::seconds(d, max)).unwrap_or(i32::MAX)
}

fn sdk_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static, R>(
    e: SdkError<E, R>,
) -> Error
where
    R: fmt::Debug + Send + Sync + 'static,
{
    match &e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            let message = s.err().message().unwrap_or("");
            if code.starts_with("Invalid") || code == "MissingParameter" {
                Error::Invalid(format!("SQS {code}: {message}"))
            } else {
                Error::unavailable(std::io::Error::other(format!("SQS {code}: {message}")))
            }
        }
        _ => Error::unavailable(e),
    }
}

/// Where a leased message is: the band it came from, when its lease ends, and SQS's
/// receipt handle.
struct Receipt<'a> {
    band: Band,
    until_ms: u64,
    handle: &'a str,
}

impl Receipt<'_> {
    fn encode(band: Band, until_ms: u64, handle: &str) -> String {
        format!("{}|{until_ms}|{handle}", band.suffix())
    }

    fn decode(s: &str) -> Result<Receipt<'_>, Error> {
        let bad = || Error::Invalid(format!("not a receipt of this queue: {s:?}"));
        let mut parts = s.splitn(3, '|');
        let band = parts.next().and_then(Band::from_suffix).ok_or_else(bad)?;
        let until_ms = parts.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let handle = parts.next().ok_or_else(bad)?;
        Ok(Receipt {
            band,
            until_ms,
            handle,
        })
    }
}

impl SqsQueue {
    /// A queue over `client`; SQS queue names start with `prefix` (e.g. the stack's
    /// name and a `-`).
    pub fn new(client: Client, prefix: &str, max_deliveries: u32) -> SqsQueue {
        SqsQueue {
            client,
            prefix: prefix.to_owned(),
            max_deliveries: max_deliveries.max(1),
            urls: Mutex::new(HashMap::new()),
        }
    }

    /// With the SDK's configuration from the environment (region, credentials, and
    /// `AWS_ENDPOINT_URL_SQS` or `AWS_ENDPOINT_URL` for an emulator).
    /// On the SDK configuration a host loaded once.
    pub fn from_config(sdk: &aws_config::SdkConfig, prefix: &str, max_deliveries: u32) -> SqsQueue {
        SqsQueue::new(Client::new(sdk), prefix, max_deliveries)
    }

    pub async fn from_env(prefix: &str) -> SqsQueue {
        let config = aws_config::load_from_env().await;
        SqsQueue::new(Client::new(&config), prefix, DEFAULT_MAX_DELIVERIES)
    }

    /// A message of logical queue `queue` that reached the host by other means than
    /// [`Queue::receive`] (a Lambda event), from the SQS queue named or ARN'd by
    /// `source`, leased until `until_ms`. As `receive` would: `None` when it is
    /// dead-lettered (delivered too often, undecodable) or not due yet (sent on).
    /// Whether `source` (an SQS queue's name or ARN) is one of logical queue `queue`'s.
    pub fn is_source(&self, queue: &str, source: &str) -> bool {
        self.band_of(queue, source).is_some()
    }

    fn band_of(&self, queue: &str, source: &str) -> Option<Band> {
        let name = source.rsplit(':').next().unwrap_or(source);
        Band::ALL
            .into_iter()
            .find(|b| self.physical(queue, *b).is_ok_and(|p| p == name))
    }

    pub async fn delivery(
        &self,
        queue: &str,
        source: &str,
        m: Received,
        until_ms: u64,
    ) -> Result<Option<Delivery>, Error> {
        let band = self.band_of(queue, source).ok_or_else(|| {
            Error::Invalid(format!("{source} is not one of queue {queue}'s SQS queues"))
        })?;
        self.take(queue, band, m, until_ms).await
    }

    /// Sends `body` to a submitter's own SQS queue (its URL or name), with
    /// `correlation_id` as a message attribute; `Ok(false)` when that queue does not
    /// exist.
    pub async fn reply(
        &self,
        to: &str,
        correlation_id: Option<&str>,
        body: &[u8],
    ) -> Result<bool, Error> {
        let url = if to.starts_with("https://") || to.starts_with("http://") {
            to.to_owned()
        } else {
            match self.client.get_queue_url().queue_name(to).send().await {
                Ok(got) => got.queue_url().unwrap_or_default().to_owned(),
                Err(e)
                    if e.code() == Some("AWS.SimpleQueueService.NonExistentQueue")
                        || e.code() == Some("QueueDoesNotExist") =>
                {
                    return Ok(false);
                }
                Err(e) => return Err(sdk_error(e)),
            }
        };
        let mut send = self
            .client
            .send_message()
            .queue_url(url)
            .message_body(String::from_utf8_lossy(body));
        if let Some(id) = correlation_id {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(id)
                .build()
                .map_err(|e| Error::Invalid(e.to_string()))?;
            send = send.message_attributes("correlation_id", value);
        }
        match send.send().await {
            Ok(_) => Ok(true),
            Err(e)
                if e.code() == Some("AWS.SimpleQueueService.NonExistentQueue")
                    || e.code() == Some("QueueDoesNotExist") =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_error(e)),
        }
    }

    fn physical(&self, queue: &str, band: Band) -> Result<String, Error> {
        if queue.is_empty()
            || !queue
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(Error::Invalid(format!(
                "queue name {queue:?}: expected letters, digits, '.', '_' or '-'"
            )));
        }
        let name = format!(
            "{}{}-{}",
            self.prefix,
            queue.replace('.', "_"),
            band.suffix()
        );
        if name.len() > MAX_NAME {
            return Err(Error::Invalid(format!(
                "queue name {queue:?} is too long for SQS ({} of {MAX_NAME} characters with prefix and band)",
                name.len()
            )));
        }
        Ok(name)
    }

    /// The URL of a band's SQS queue, creating it (and, for a queue that is not a
    /// dead-letter queue, its dead-letter queue and redrive policy) when missing.
    async fn url(&self, queue: &str, band: Band) -> Result<String, Error> {
        let name = self.physical(queue, band)?;
        if let Some(url) = self.urls.lock().map_err(poisoned)?.get(&name) {
            return Ok(url.clone());
        }
        let url = match self.client.get_queue_url().queue_name(&name).send().await {
            Ok(out) => out.queue_url().unwrap_or_default().to_owned(),
            Err(SdkError::ServiceError(e)) if e.err().is_queue_does_not_exist() => {
                self.create(queue, band, &name).await?
            }
            Err(e) => return Err(sdk_error(e)),
        };
        self.urls
            .lock()
            .map_err(poisoned)?
            .insert(name, url.clone());
        Ok(url)
    }

    async fn create(&self, queue: &str, band: Band, name: &str) -> Result<String, Error> {
        let mut create = self
            .client
            .create_queue()
            .queue_name(name)
            // Longest retention: a job may wait days for capacity.
            .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600");
        if !queue.ends_with(".dead") {
            let dead = Box::pin(self.url(&dead_letter_queue(queue), band)).await?;
            let arn = self
                .client
                .get_queue_attributes()
                .queue_url(&dead)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(sdk_error)?
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
                .unwrap_or_default();
            let policy = serde_json::json!({
                "deadLetterTargetArn": arn,
                "maxReceiveCount": self.max_deliveries + REDRIVE_SLACK,
            });
            create = create.attributes(QueueAttributeName::RedrivePolicy, policy.to_string());
        }
        let out = create.send().await.map_err(sdk_error)?;
        Ok(out.queue_url().unwrap_or_default().to_owned())
    }

    async fn send_meta(
        &self,
        queue: &str,
        body: &[u8],
        mut meta: Meta,
        delay: Duration,
    ) -> Result<(), Error> {
        let band = Band::of(meta.priority);
        let url = self.url(queue, band).await?;
        let text = match std::str::from_utf8(body) {
            Ok(s) if s.chars().all(sqs_char) => {
                meta.base64 = false;
                s.to_owned()
            }
            _ => {
                meta.base64 = true;
                base64::engine::general_purpose::STANDARD.encode(body)
            }
        };
        if text.len() > MAX_BODY_BYTES {
            return Err(Error::Invalid(format!(
                "a message of {} bytes is over SQS's limit ({MAX_BODY_BYTES} bytes for the body)",
                body.len()
            )));
        }
        if delay > MAX_DELAY {
            meta.due_ms =
                Some(now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)));
        }
        let attr = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(serde_json::to_string(&meta).map_err(|e| Error::Invalid(e.to_string()))?)
            .build()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        self.client
            .send_message()
            .queue_url(url)
            .message_body(text)
            .delay_seconds(seconds(delay, MAX_DELAY))
            .message_attributes(META, attr)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn delete(&self, queue: &str, band: Band, handle: &str) -> Result<(), Error> {
        let url = self.url(queue, band).await?;
        self.client
            .delete_message()
            .queue_url(url)
            .receipt_handle(handle)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    /// The receipt of a delivery whose lease is still on.
    fn leased<'a>(&self, d: &'a Delivery) -> Result<Receipt<'a>, Error> {
        let r = Receipt::decode(&d.receipt)?;
        if now_ms() >= r.until_ms {
            return Err(Error::LeaseLost { id: d.id.clone() });
        }
        Ok(r)
    }

    fn meta_of(d: &Delivery) -> Meta {
        Meta {
            id: d.id.clone(),
            priority: d.priority,
            attributes: d.attributes.clone(),
            reason: d.reason.clone(),
            due_ms: None,
            earlier_deliveries: d.deliveries,
            base64: false,
        }
    }

    /// One message as received from a band: handed out, held back (not due yet),
    /// or moved to the dead-letter queue (delivered too often, or undecodable).
    async fn take(
        &self,
        queue: &str,
        band: Band,
        m: Received,
        until_ms: u64,
    ) -> Result<Option<Delivery>, Error> {
        let handle = m.receipt_handle.as_str();
        let received = m.receive_count.max(1);
        let meta = m
            .attributes
            .get(META)
            .and_then(|s| serde_json::from_str::<Meta>(s).ok());
        let meta = meta.unwrap_or_else(|| {
            // The SQS message id names a message sent once, redelivered or not: a
            // submission's idempotency key unless the sender chose one.
            let mut attributes = m.attributes.clone();
            attributes
                .entry("message_id".into())
                .or_insert_with(|| m.message_id.clone());
            Meta {
                id: m.message_id.clone(),
                priority: band.level(),
                attributes,
                ..Meta::default()
            }
        });
        let raw = m.body.as_str();
        // A base64 body that does not decode is dead-lettered as the text it is.
        let (body, undecodable) = match meta.base64 {
            true => match base64::engine::general_purpose::STANDARD.decode(raw) {
                Ok(b) => (Bytes::from(b), None),
                Err(e) => (
                    Bytes::copy_from_slice(raw.as_bytes()),
                    Some(format!("a base64 body that does not decode: {e}")),
                ),
            },
            false => (Bytes::copy_from_slice(raw.as_bytes()), None),
        };
        let now = now_ms();
        if undecodable.is_none()
            && let Some(due) = meta.due_ms
            && due > now
        {
            // Not due: on again, up to SQS's longest delay.
            let mut again = meta;
            again.due_ms = None;
            self.send_meta(queue, &body, again, Duration::from_millis(due - now))
                .await?;
            self.delete(queue, band, handle).await?;
            return Ok(None);
        }
        let dead_queue = queue.ends_with(".dead");
        let deliveries = meta.earlier_deliveries.saturating_add(received);
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
            id: meta.id,
            body,
            priority: meta.priority,
            deliveries,
            receipt: Receipt::encode(band, until_ms, handle),
            // This adapter dead-letters with a reason; a message without one was
            // moved by the queue's redrive policy.
            reason: meta.reason.or_else(|| {
                dead_queue.then(|| {
                    format!(
                        "moved by SQS's redrive policy after more than {} receives",
                        self.max_deliveries + REDRIVE_SLACK
                    )
                })
            }),
            attributes: meta.attributes,
        };
        if let Some(why) = why {
            warn!(queue, id = %delivery.id, deliveries, reason = %why, "message dead-lettered");
            self.dead_letter(&delivery, &why).await?;
            return Ok(None);
        }
        Ok(Some(delivery))
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> Error {
    Error::unavailable(std::io::Error::other("queue URL cache poisoned"))
}

/// Characters an SQS message body may hold (XML's, less some).
fn sqs_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

#[async_trait]
impl Queue for SqsQueue {
    fn system(&self) -> &'static str {
        "aws_sqs"
    }

    /// SQS's approximate counts of every band: visible, in flight and delayed.
    /// The age of the oldest is CloudWatch's (`ApproximateAgeOfOldestMessage`),
    /// not the queue's to say.
    async fn depth(&self, queue: &str) -> Result<Option<Depth>, Error> {
        let counts = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ];
        let mut messages = 0;
        for band in Band::ALL {
            let url = self.url(queue, band).await?;
            let got = self
                .client
                .get_queue_attributes()
                .queue_url(&url)
                .set_attribute_names(Some(counts.to_vec()))
                .send()
                .await
                .map_err(sdk_error)?;
            let attrs = got.attributes();
            for c in &counts {
                messages += attrs
                    .and_then(|a| a.get(c))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Ok(Some(Depth {
            messages,
            oldest: None,
        }))
    }

    async fn send(&self, queue: &str, msg: Outgoing) -> Result<String, Error> {
        let id = ulid::Ulid::generate().to_string().to_lowercase();
        let meta = Meta {
            id: id.clone(),
            priority: msg.priority,
            attributes: msg.attributes,
            ..Meta::default()
        };
        self.send_meta(queue, &msg.body, meta, msg.delay).await?;
        Ok(id)
    }

    async fn receive(&self, queue: &str, opts: Receive) -> Result<Vec<Delivery>, Error> {
        let deadline = tokio::time::Instant::now() + opts.wait;
        let visibility = seconds(opts.lease, MAX_VISIBILITY).max(1);
        let mut urls = Vec::new();
        for band in Band::ALL {
            urls.push((band, self.url(queue, band).await?));
        }
        let mut out = Vec::new();
        loop {
            for (band, url) in &urls {
                while out.len() < opts.max {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    // Long-poll the last band only, a second at most, so that a message
                    // arriving meanwhile in a higher one waits no longer than that.
                    let wait = if *band == Band::Low && out.is_empty() {
                        seconds(left.min(Duration::from_secs(1)), MAX_DELAY)
                    } else {
                        0
                    };
                    let want = i32::try_from((opts.max - out.len()).min(10)).unwrap_or(10);
                    let until_ms =
                        now_ms().saturating_add(u64::try_from(visibility).unwrap_or(0) * 1000);
                    let got = self
                        .client
                        .receive_message()
                        .queue_url(url)
                        .max_number_of_messages(want)
                        .visibility_timeout(visibility)
                        .wait_time_seconds(wait)
                        .message_system_attribute_names(
                            MessageSystemAttributeName::ApproximateReceiveCount,
                        )
                        .message_attribute_names("All")
                        .send()
                        .await
                        .map_err(sdk_error)?;
                    let messages = got.messages();
                    if messages.is_empty() {
                        break;
                    }
                    for m in messages {
                        if let Some(d) = self.take(queue, *band, Received::of(m), until_ms).await? {
                            out.push(d);
                        }
                    }
                }
            }
            if !out.is_empty() || out.len() >= opts.max || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<(), Error> {
        let r = self.leased(d)?;
        self.delete(&d.queue, r.band, r.handle).await
    }

    async fn retry_later(&self, d: &Delivery, delay: Duration) -> Result<(), Error> {
        let r = self.leased(d)?;
        if delay > MAX_VISIBILITY {
            // Past SQS's visibility limit: a new copy, which keeps the count.
            self.send_meta(&d.queue, &d.body, Self::meta_of(d), delay)
                .await?;
            return self.delete(&d.queue, r.band, r.handle).await;
        }
        let url = self.url(&d.queue, r.band).await?;
        match self
            .client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(r.handle)
            .visibility_timeout(seconds(delay, MAX_VISIBILITY))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e))
                if matches!(
                    e.err().code(),
                    Some("ReceiptHandleIsInvalid" | "MessageNotInflight")
                ) =>
            {
                Err(Error::LeaseLost { id: d.id.clone() })
            }
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), Error> {
        let r = self.leased(d)?;
        let mut meta = Self::meta_of(d);
        meta.reason = Some(reason.to_owned());
        meta.earlier_deliveries = 0;
        // Copied first, then deleted: a crash between leaves a duplicate, never a loss.
        self.send_meta(&dead_letter_queue(&d.queue), &d.body, meta, Duration::ZERO)
            .await?;
        self.delete(&d.queue, r.band, r.handle).await
    }

    async fn declare(&self, queue: &str) -> Result<(), Error> {
        for band in Band::ALL {
            self.url(queue, band).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip_and_refuse_garbage() {
        let s = Receipt::encode(Band::Normal, 42, "AQE|x|y");
        let r = Receipt::decode(&s).expect("decodes");
        assert_eq!(
            (r.band, r.until_ms, r.handle),
            (Band::Normal, 42, "AQE|x|y")
        );
        assert!(Receipt::decode("zz|1|h").is_err());
        assert!(Receipt::decode("hi|x|h").is_err());
        assert!(Receipt::decode("hi|1").is_err());
    }

    #[test]
    fn bodies_sqs_cannot_carry_as_text_are_spotted() {
        assert!("job {\"a\": 1}\n\tü𝄞".chars().all(sqs_char));
        assert!(!"\u{0}".chars().all(sqs_char));
        assert!(!"\u{1b}[31m".chars().all(sqs_char));
        assert!(!"\u{FFFE}".chars().all(sqs_char));
    }
}

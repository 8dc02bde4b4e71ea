//! What a message carries on the wire: properties, our headers, queue names.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use respawn_core::ports::queue::Error;

/// How many times the message was handed out before it was last published. Classic
/// queues do not count deliveries, so we carry the count ourselves.
pub(super) const DELIVERIES: &str = "x-respawn-deliveries";
/// Why a message sits on a dead-letter queue.
pub(super) const REASON: &str = "x-respawn-reason";
/// Attribute names that map to AMQP properties.
pub(super) const MESSAGE_ID: &str = "message_id";
pub(super) const REPLY_TO: &str = "reply_to";
pub(super) const CORRELATION_ID: &str = "correlation_id";

/// Room kept after a logical queue name for `.delay.<ms>` and `.dead` suffixes, so
/// that every derived name still fits AMQP's 255-byte short strings.
const MAX_QUEUE_NAME: usize = 200;

/// The longest delay we accept: TTL and expiry arguments are 32-bit milliseconds on
/// the broker, and the delay queue's expiry adds a minute to the delay.
const MAX_DELAY_MS: u64 = u32::MAX as u64 - 120_000;

/// Checks a logical queue name and makes it an AMQP short string.
pub(super) fn queue_name(queue: &str) -> Result<ShortString, Error> {
    if queue.is_empty() {
        return Err(Error::Invalid("queue name is empty".into()));
    }
    if queue.len() > MAX_QUEUE_NAME {
        return Err(Error::Invalid(format!(
            "queue name is {} bytes; at most {MAX_QUEUE_NAME}",
            queue.len()
        )));
    }
    if queue.starts_with("amq.") {
        return Err(Error::Invalid(format!(
            "queue name {queue:?}: names starting with \"amq.\" are reserved by the broker"
        )));
    }
    short(queue)
}

pub(super) fn short(s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s).map_err(|e| Error::Invalid(e.to_string()))
}

/// The delay actually used for `delay`, in milliseconds, or `None` for no delay.
///
/// Each distinct delay gets its own queue (per-message TTL only expires at a queue's
/// head, so one shared queue would hold short delays behind long ones). Rounding up
/// to two significant digits bounds how many such queues jittered back-offs create
/// (at most 90 per decade) while never making a message visible early.
pub(super) fn delay_ms(delay: Duration) -> Result<Option<u64>, Error> {
    if delay.is_zero() {
        return Ok(None);
    }
    let ms = u64::try_from(delay.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if ms > MAX_DELAY_MS {
        return Err(Error::Invalid(format!(
            "delay of {delay:?} is longer than the broker's {MAX_DELAY_MS} ms"
        )));
    }
    let mut scale = 1;
    while ms / scale >= 100 {
        scale *= 10;
    }
    Ok(Some(ms.div_ceil(scale) * scale))
}

/// The queue that holds messages for `queue` during a delay of `ms`.
pub(super) fn delay_queue(queue: &str, ms: u64) -> String {
    format!("{queue}.delay.{ms}")
}

/// Properties of a message we publish: persistent, with its id, priority and our
/// headers. Built fresh each time, so that broker-added headers (`x-death`) do not
/// pile up on messages that go round the delay queues many times.
pub(super) fn properties(
    id: &str,
    priority: u8,
    deliveries: u32,
    reason: Option<&str>,
    attributes: &BTreeMap<String, String>,
) -> Result<BasicProperties, Error> {
    let mut headers = FieldTable::default();
    headers.insert(DELIVERIES.into(), AMQPValue::LongUInt(deliveries));
    if let Some(reason) = reason {
        headers.insert(
            REASON.into(),
            AMQPValue::LongString(LongString::from(reason.as_bytes())),
        );
    }
    for name in TRACE_CONTEXT {
        if let Some(v) = attributes.get(name) {
            headers.insert(
                name.into(),
                AMQPValue::LongString(LongString::from(v.as_bytes())),
            );
        }
    }
    let mut props = BasicProperties::default()
        .with_message_id(short(id)?)
        .with_priority(priority.min(9))
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(r) = attributes.get(REPLY_TO) {
        props = props.with_reply_to(short(r)?);
    }
    if let Some(c) = attributes.get(CORRELATION_ID) {
        props = props.with_correlation_id(short(c)?);
    }
    Ok(props)
}

/// What we read back from a delivered message. Anything we did not write ourselves
/// (a message published by another client) gets defaults rather than an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Received {
    /// The AMQP `message_id`; None when the publisher gave none (the adapter then
    /// gives the message one before handing it out, see `settle.rs`).
    pub id: Option<String>,
    pub priority: u8,
    /// Deliveries before this one, from our header (0 when absent).
    pub deliveries: u32,
    pub reason: Option<String>,
    /// `message_id`, `reply_to`, `correlation_id` when the message has them.
    pub attributes: BTreeMap<String, String>,
}

pub(super) fn read(props: &BasicProperties) -> Received {
    let headers = props.headers().as_ref();
    let get = |key: &str| headers.and_then(|h| h.inner().get(key));
    let attributes = attributes(props);
    Received {
        id: attributes.get(MESSAGE_ID).cloned(),
        priority: props.priority().unwrap_or(0).min(9),
        deliveries: get(DELIVERIES).and_then(count).unwrap_or(0),
        reason: get(REASON).and_then(text),
        attributes,
    }
}

fn attributes(props: &BasicProperties) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let fields = [
        (MESSAGE_ID, props.message_id()),
        (REPLY_TO, props.reply_to()),
        (CORRELATION_ID, props.correlation_id()),
    ];
    for (name, value) in fields {
        if let Some(v) = value.as_ref().map(|s| s.as_str()).filter(|s| !s.is_empty()) {
            out.insert(name.to_owned(), v.to_owned());
        }
    }
    let headers = props.headers().as_ref();
    for name in TRACE_CONTEXT {
        if let Some(v) = headers.and_then(|h| h.inner().get(name)).and_then(text) {
            out.insert(name.to_owned(), v);
        }
    }
    out
}

/// The W3C trace context, as headers of those names (the AMQP binding of W3C
/// Trace Context): what a message's consumer continues.
const TRACE_CONTEXT: [&str; 2] = ["traceparent", "tracestate"];

fn count(v: &AMQPValue) -> Option<u32> {
    let n: i128 = match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok()?,
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).trim().parse().ok()?,
        _ => return None,
    };
    Some(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_two_significant_digits() {
        let ms = |d: u64| delay_ms(Duration::from_millis(d)).expect("valid");
        assert_eq!(ms(0), None);
        assert_eq!(ms(1), Some(1));
        assert_eq!(ms(99), Some(99));
        assert_eq!(ms(600), Some(600));
        assert_eq!(ms(1_234), Some(1_300));
        assert_eq!(ms(61_001), Some(62_000));
        assert_eq!(
            delay_ms(Duration::from_micros(1_500)).expect("valid"),
            Some(2)
        );
        assert!(delay_ms(Duration::from_secs(100 * 86_400)).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(queue_name("").is_err());
        assert!(queue_name("amq.gen-x").is_err());
        assert!(queue_name(&"x".repeat(201)).is_err());
        assert!(queue_name("jobs").is_ok());
    }

    #[test]
    fn foreign_messages_read_with_defaults() {
        let got = read(&BasicProperties::default());
        assert_eq!(
            got,
            Received {
                id: None,
                priority: 0,
                deliveries: 0,
                reason: None,
                attributes: BTreeMap::new(),
            }
        );
        let mut h = FieldTable::default();
        h.insert(DELIVERIES.into(), AMQPValue::LongLongInt(-3));
        h.insert(REASON.into(), AMQPValue::Boolean(true));
        let props = BasicProperties::default()
            .with_headers(h)
            .with_priority(200);
        let got = read(&props);
        assert_eq!((got.deliveries, got.priority, got.reason), (0, 9, None));
    }

    #[test]
    fn our_properties_read_back() {
        let attrs = BTreeMap::from([(REPLY_TO.to_owned(), "amq.gen-1".to_owned())]);
        let props = properties("01ID", 5, 3, Some("bad spec"), &attrs).expect("props");
        let got = read(&props);
        assert_eq!(
            got.attributes[REPLY_TO], "amq.gen-1",
            "attributes survive a republish"
        );
        assert_eq!(got.id.as_deref(), Some("01ID"));
        assert_eq!(got.priority, 5);
        assert_eq!(got.deliveries, 3);
        assert_eq!(got.reason.as_deref(), Some("bad spec"));
        assert_eq!(props.delivery_mode(), &Some(2));
    }
}

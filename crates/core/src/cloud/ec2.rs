//! EC2's EventBridge events about spot instances, as an EventBridge rule delivers
//! them to an SQS queue (the event itself is the message body):
//!
//! - `EC2 Spot Instance Interruption Warning`: the instance is reclaimed two minutes
//!   after the event's `time`;
//! - `EC2 Instance Rebalance Recommendation`: the instance is at elevated risk; no
//!   interruption yet;
//! - `EC2 Instance State-change Notification`: `pending`, `running`, `stopping`,
//!   `stopped`, `shutting-down`, `terminated`.
//!
//! Other EC2 events decode to `None`: the rule may be broad.

use std::time::Duration;

use serde::Deserialize;

use super::{EventError, at, typed, within};
use crate::time::Timestamp;

/// How long EC2 gives between the interruption warning and the reclaim.
pub const INTERRUPTION_NOTICE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Event {
    pub instance_id: String,
    /// When EC2 emitted the event.
    pub at: Timestamp,
    pub kind: Ec2EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2EventKind {
    /// `action` is `terminate`, `stop` or `hibernate`.
    Interruption {
        action: String,
        deadline: Timestamp,
    },
    Rebalance,
    State(String),
}

#[derive(Deserialize)]
struct Envelope {
    source: String,
    #[serde(rename = "detail-type")]
    detail_type: String,
    time: String,
    detail: serde_json::Value,
}

#[derive(Deserialize)]
struct Detail {
    #[serde(rename = "instance-id")]
    instance_id: String,
    #[serde(default, rename = "instance-action")]
    instance_action: Option<String>,
    #[serde(default)]
    state: Option<String>,
}

/// Decodes one message body; `Ok(None)` for an EC2 event respawn does not act on.
pub fn decode(body: &[u8]) -> Result<Option<Ec2Event>, EventError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let env: Envelope =
        serde_path_to_error::deserialize(&mut de).map_err(EventError::from_path_error)?;
    if env.source != "aws.ec2" {
        return Err(at(
            "source",
            format!("expected \"aws.ec2\", got {:?}", env.source),
        ));
    }
    const INTERRUPTION: &str = "EC2 Spot Instance Interruption Warning";
    const REBALANCE: &str = "EC2 Instance Rebalance Recommendation";
    const STATE: &str = "EC2 Instance State-change Notification";
    if ![INTERRUPTION, REBALANCE, STATE].contains(&env.detail_type.as_str()) {
        return Ok(None);
    }
    let at_time = Timestamp::parse_rfc3339(&env.time).ok_or_else(|| {
        at(
            "time",
            format!("expected an RFC 3339 time, got {:?}", env.time),
        )
    })?;
    let detail: Detail = typed(env.detail).map_err(|e| within(e, "detail"))?;
    let missing = |field: &str| at("detail", format!("missing field `{field}`"));
    let kind = match env.detail_type.as_str() {
        INTERRUPTION => Ec2EventKind::Interruption {
            action: detail
                .instance_action
                .ok_or_else(|| missing("instance-action"))?,
            deadline: at_time.plus(INTERRUPTION_NOTICE),
        },
        REBALANCE => Ec2EventKind::Rebalance,
        _ => Ec2EventKind::State(detail.state.ok_or_else(|| missing("state"))?),
    };
    Ok(Some(Ec2Event {
        instance_id: detail.instance_id,
        at: at_time,
        kind,
    }))
}

#[cfg(test)]
mod tests;

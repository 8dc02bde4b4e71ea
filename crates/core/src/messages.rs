//! What travels on respawn's own queues, as JSON.

use serde::{Deserialize, Serialize};

use crate::job::{JobId, JobState};
use crate::lifecycle::Event;
use crate::time::Timestamp;

/// A message on the dispatch or events queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// An attempt waiting for capacity (dispatch queue).
    Dispatch {
        job: JobId,
        attempt: u32,
        /// See [`Event::Dispatch`].
        #[serde(default, skip_serializing_if = "is_zero")]
        waits: u32,
    },
    /// Something that happened to a job (events queue).
    Event {
        job: JobId,
        at: Timestamp,
        event: Event,
    },
}

impl Message {
    pub fn to_bytes(&self) -> Vec<u8> {
        // A Message holds only strings, numbers and enums: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn job(&self) -> &JobId {
        match self {
            Message::Dispatch { job, .. } | Message::Event { job, .. } => job,
        }
    }
}

/// A state change to tell one of a job's notify URLs (notify queue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    pub job: JobId,
    pub state: JobState,
    pub at: Timestamp,
    pub url: String,
}

impl Notification {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The delivery id receivers deduplicate on: the same for every retry.
    pub fn id(&self) -> String {
        format!("{}-{}-{}", self.job, self.state, self.at.0)
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

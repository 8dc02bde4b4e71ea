//! What the cloud queues share: a queue without priorities is three queues, one per
//! band of priority levels, read highest first; leases and delays in whole seconds.

use std::time::Duration;

use respawn_core::time::{Clock, SystemClock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Band {
    High,
    Normal,
    Low,
}

impl Band {
    pub(crate) const ALL: [Band; 3] = [Band::High, Band::Normal, Band::Low];

    /// Levels 7–9, 4–6 and 0–3: respawn's named priorities high, normal and low
    /// fall one in each.
    pub(crate) fn of(priority: u8) -> Band {
        match priority {
            7.. => Band::High,
            4..=6 => Band::Normal,
            _ => Band::Low,
        }
    }

    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Band::High => "hi",
            Band::Normal => "no",
            Band::Low => "lo",
        }
    }

    pub(crate) fn from_suffix(s: &str) -> Option<Band> {
        Band::ALL.into_iter().find(|b| b.suffix() == s)
    }

    /// The priority of a message that did not say (another client's).
    pub(crate) fn level(self) -> u8 {
        match self {
            Band::High => 8,
            Band::Normal => 5,
            Band::Low => 2,
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemClock.now().as_millis()
}

/// Whole seconds, rounded up, at most `max`.
pub(crate) fn seconds(d: Duration, max: Duration) -> u64 {
    let d = d.min(max);
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_fall_into_three_bands() {
        let bands: Vec<Band> = (0..=9).map(Band::of).collect();
        assert_eq!(bands[..4], [Band::Low; 4]);
        assert_eq!(bands[4..7], [Band::Normal; 3]);
        assert_eq!(bands[7..], [Band::High; 3]);
        for b in Band::ALL {
            assert_eq!(Band::of(b.level()), b);
            assert_eq!(Band::from_suffix(b.suffix()), Some(b));
        }
    }

    #[test]
    fn durations_round_up_to_whole_seconds() {
        let max = Duration::from_secs(900);
        assert_eq!(seconds(Duration::ZERO, max), 0);
        assert_eq!(seconds(Duration::from_millis(1), max), 1);
        assert_eq!(seconds(Duration::from_millis(1_000), max), 1);
        assert_eq!(seconds(Duration::from_millis(1_001), max), 2);
        assert_eq!(seconds(Duration::from_secs(5_000), max), 900);
    }
}

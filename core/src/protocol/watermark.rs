//! Event time and watermarks of one shard, as pure rules.
//!
//! A shard's watermark `W` starts unset. Each record is judged by `W` as it was just before
//! the record (its *arrival watermark*), so what is late depends only on the shard's record
//! order, never on how reads cut it into epochs, and a replay judges every record as the
//! first run did. A record raises `W` to its event time minus the out-of-orderness bound if
//! its event time is *timely*: within the valid range and at most the maximum skew ahead of
//! the time the stream received it. A record whose event time is outside the valid range (a
//! garbage timestamp, `i64::MIN`/`MAX`) is a bad record: it goes to the dead-letter policy
//! before any operator (`is_valid_event_time`). An untimely one (a producer with a clock
//! hours ahead) never moves `W`, and its arrival watermark is `EventTime::MAX`: late for every
//! window.
//!
//! A quiet shard's last windows would wait for its next record for ever. With an idleness
//! timeout (off by default, as Flink's `withIdleness`), a shard that read nothing for that
//! long advances its watermark as if a record stamped with the current time had arrived (to
//! the time minus the out-of-orderness bound): event time is taken to follow the stream's
//! clock. That is a decision on processing time, so the runtime records it in the lease
//! (`WatermarkAdvance`) before anything derived from it is written, and a replay makes it again
//! after the same record instead of asking the clock.

use std::time::Duration;

use crate::position::EventTime;

/// Event times beyond this distance from the Unix epoch (2^61 - 1 ms, about 73 million years)
/// are invalid.
pub const MAX_VALID_EVENT_TIME: EventTime = EventTime::MAX / 4;

/// Whether an event time is within the valid range: one outside it is garbage, and its record
/// goes to the dead-letter policy.
pub fn is_valid_event_time(event_time: EventTime) -> bool {
    (-MAX_VALID_EVENT_TIME..=MAX_VALID_EVENT_TIME).contains(&event_time)
}

/// The maximum skew of event time ahead of arrival a topology gets unless it sets its own:
/// producer clocks run minutes wrong, not hours.
pub const DEFAULT_MAX_SKEW_MS: i64 = 3_600_000;

/// How a shard's watermark follows its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatermarkRules {
    /// How far the watermark trails the largest timely event time, in milliseconds.
    pub out_of_orderness_ms: i64,
    /// How far ahead of its arrival a record's event time may be and still count.
    pub max_skew_ms: i64,
    /// How long a shard may read nothing before its watermark advances on the clock (off:
    /// `None`).
    pub idleness: Option<Duration>,
}

impl WatermarkRules {
    /// Whether a record with `event_time`, received at `arrival_ms`, is timely.
    pub fn is_timely(&self, event_time: EventTime, arrival_ms: EventTime) -> bool {
        is_valid_event_time(event_time) && event_time <= arrival_ms.saturating_add(self.max_skew_ms)
    }

    /// Judges one record against the shard's watermark `watermark` (updated for the next
    /// record): returns the record's arrival watermark, `EventTime::MAX` if it is untimely.
    pub fn observe(
        &self,
        watermark: &mut Option<EventTime>,
        event_time: EventTime,
        arrival_ms: EventTime,
    ) -> EventTime {
        if !self.is_timely(event_time, arrival_ms) {
            return EventTime::MAX;
        }
        let before = watermark.unwrap_or(EventTime::MIN);
        let after = event_time.saturating_sub(self.out_of_orderness_ms);
        *watermark = Some(watermark.map_or(after, |w| w.max(after)));
        before
    }
}

impl WatermarkRules {
    /// The watermark a shard that read nothing for `quiet` (since its last record or its last
    /// advance) advances to at `now_ms`, if it does: with an idleness timeout that `quiet`
    /// reached, to `now_ms` minus the out-of-orderness bound, when that is beyond `watermark`.
    pub fn idle_advance(
        &self,
        watermark: Option<EventTime>,
        now_ms: EventTime,
        quiet: Duration,
    ) -> Option<EventTime> {
        let idleness = self.idleness?;
        let target = now_ms.saturating_sub(self.out_of_orderness_ms);
        (quiet >= idleness && watermark.is_none_or(|w| target > w)).then_some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: WatermarkRules = WatermarkRules {
        out_of_orderness_ms: 100,
        max_skew_ms: 1_000,
        idleness: None,
    };

    #[test]
    fn a_shard_quiet_for_the_idleness_timeout_advances_on_the_clock() {
        let rules = WatermarkRules {
            idleness: Some(Duration::from_secs(5)),
            ..RULES
        };
        let quiet = Duration::from_secs(5);
        assert_eq!(rules.idle_advance(Some(1_000), 10_000, quiet), Some(9_900));
        assert_eq!(
            rules.idle_advance(Some(1_000), 10_000, quiet - Duration::from_millis(1)),
            None,
            "not quiet long enough"
        );
        assert_eq!(
            rules.idle_advance(Some(9_900), 10_000, quiet),
            None,
            "no further"
        );
        assert_eq!(RULES.idle_advance(Some(1_000), 10_000, quiet), None, "off");
    }

    #[test]
    fn each_record_is_judged_by_the_watermark_before_it() {
        let mut w = None;
        assert_eq!(RULES.observe(&mut w, 5_000, 5_000), EventTime::MIN);
        assert_eq!(w, Some(4_900));
        assert_eq!(RULES.observe(&mut w, 4_000, 5_000), 4_900, "older: W stays");
        assert_eq!(w, Some(4_900));
        assert_eq!(RULES.observe(&mut w, 6_000, 6_000), 4_900);
        assert_eq!(w, Some(5_900));
    }

    #[test]
    fn untimely_records_are_late_everywhere_and_never_move_the_watermark() {
        let mut w = Some(1_000);
        for (t, arrival) in [
            (5_000, 3_000),
            (EventTime::MAX, 3_000),
            (EventTime::MIN, 3_000),
            (MAX_VALID_EVENT_TIME + 1, EventTime::MAX),
        ] {
            assert_eq!(RULES.observe(&mut w, t, arrival), EventTime::MAX, "{t}");
            assert_eq!(w, Some(1_000));
        }
        assert_eq!(
            RULES.observe(&mut w, 4_000, 3_000),
            1_000,
            "within the skew"
        );
    }
}

//! What a worker does with a shard whose sink (or dead-letter sink) failed after the sink's
//! own retries: the shard backs off and starts again from its checkpoint, with doubling
//! pauses; a shard that fails `attempts` times in a row without its checkpoint moving is let
//! go (its lease no longer renewed, so another worker takes it once it expired) and this
//! worker leaves it alone for a cool-down. Never the run: a long throttle on one table must not take a worker down, move
//! its shards, and take the next worker down with them.

use std::time::Duration;

use crate::lease::CheckpointPosition;

/// The backoff rules for shards whose sinks fail (part of `RuntimeConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkBackoff {
    /// The pause after a shard's first failure; it doubles with each failure in a row.
    pub first_pause: Duration,
    /// The longest pause.
    pub max_pause: Duration,
    /// Failures in a row, without the checkpoint moving, before the shard is let go.
    pub attempts: u32,
    /// How long this worker leaves a shard it let go before it may take it again.
    pub cool_down: Duration,
}

impl Default for SinkBackoff {
    fn default() -> Self {
        Self {
            first_pause: Duration::from_secs(1),
            max_pause: Duration::from_secs(60),
            attempts: 8,
            cool_down: Duration::from_secs(300),
        }
    }
}

/// A shard's failures in a row, and where its checkpoint stood at the last one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureStreak {
    /// Failures in a row.
    pub failures: u32,
    /// The committed position at the last failure: a shard that got past it since is on a
    /// new streak.
    pub committed: CheckpointPosition,
}

/// The decision after a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterSinkFailure {
    /// Start the shard again from its checkpoint after this pause (before jitter).
    Retry {
        /// The pause.
        pause: Duration,
    },
    /// Stop renewing the lease (another worker takes it once it expired) and leave the shard
    /// alone for this long.
    LetGo {
        /// The cool-down.
        cool_down: Duration,
    },
}

/// The decision for a shard whose sink failed at checkpoint `committed`, after `streak`, and
/// the streak to remember.
pub fn after_sink_failure(
    rules: &SinkBackoff,
    streak: Option<&FailureStreak>,
    committed: &CheckpointPosition,
) -> (AfterSinkFailure, Option<FailureStreak>) {
    let failures = match streak {
        Some(s) if s.committed == *committed => s.failures + 1,
        _ => 1,
    };
    if failures > rules.attempts {
        // After the cool-down the shard gets its whole budget again.
        let decision = AfterSinkFailure::LetGo {
            cool_down: rules.cool_down,
        };
        return (decision, None);
    }
    let doublings = (failures - 1).min(31);
    let pause = rules
        .first_pause
        .saturating_mul(1 << doublings)
        .min(rules.max_pause);
    let streak = FailureStreak {
        failures,
        committed: committed.clone(),
    };
    (AfterSinkFailure::Retry { pause }, Some(streak))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::{RecordPosition, SequenceNumber};

    fn at(n: u128) -> CheckpointPosition {
        CheckpointPosition::At(RecordPosition::new(SequenceNumber::from_u128(n)))
    }

    #[test]
    fn pauses_double_up_to_the_cap_then_the_shard_is_let_go() {
        let rules = SinkBackoff {
            first_pause: Duration::from_secs(1),
            max_pause: Duration::from_secs(5),
            attempts: 4,
            cool_down: Duration::from_secs(60),
        };
        let mut streak = None;
        let mut pauses = Vec::new();
        loop {
            let (decision, next) = after_sink_failure(&rules, streak.as_ref(), &at(7));
            match decision {
                AfterSinkFailure::Retry { pause } => pauses.push(pause.as_secs()),
                AfterSinkFailure::LetGo { cool_down } => {
                    assert_eq!(cool_down, Duration::from_secs(60));
                    assert_eq!(next, None, "the budget is whole again after the cool-down");
                    break;
                }
            }
            streak = next;
        }
        assert_eq!(pauses, [1, 2, 4, 5]);
    }

    #[test]
    fn a_shard_whose_checkpoint_moved_since_its_last_failure_starts_a_new_streak() {
        let rules = SinkBackoff::default();
        let (_, streak) = after_sink_failure(&rules, None, &at(7));
        let (_, streak) = after_sink_failure(&rules, streak.as_ref(), &at(7));
        assert_eq!(streak.as_ref().map(|s| s.failures), Some(2));
        let (decision, streak) = after_sink_failure(&rules, streak.as_ref(), &at(9));
        assert_eq!(streak.map(|s| s.failures), Some(1));
        assert_eq!(
            decision,
            AfterSinkFailure::Retry {
                pause: rules.first_pause
            }
        );
    }

    #[test]
    fn huge_streaks_do_not_overflow() {
        let rules = SinkBackoff {
            attempts: u32::MAX,
            ..SinkBackoff::default()
        };
        let streak = FailureStreak {
            failures: 1000,
            committed: at(1),
        };
        let (decision, _) = after_sink_failure(&rules, Some(&streak), &at(1));
        assert_eq!(
            decision,
            AfterSinkFailure::Retry {
                pause: rules.max_pause
            }
        );
    }
}

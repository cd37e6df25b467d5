//! What the dead-letter policy does with a record that failed to decode or whose user function
//! failed.

use std::time::Duration;

use crate::dead_letter::DeadLetter;

/// The decision for one failed attempt at one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Call the user function again after this wait.
    Retry(Duration),
    /// Write the record to the dead-letter sink; the checkpoint passes it once that is durable.
    DeadLetter,
    /// Stop the shard before the record: its checkpoint stays before it.
    StopShard,
    /// A replayed record: the run that committed it dead-lettered it (or stopped); nothing more.
    Replayed,
}

/// The decision for the `attempt`-th failure (from 0) of a record under `policy`.
/// `retryable` is false where trying again fails the same way (decoding); `replay` says whether
/// the record is replayed (its outputs and dead letters were committed by an earlier run). A
/// replay retries as the first run did: a record its function handled after a retry must
/// rebuild the state it built then.
pub fn on_failure(policy: &DeadLetter, attempt: u32, retryable: bool, replay: bool) -> OnFailure {
    let mut policy = policy;
    if let DeadLetter::Retry { max, backoff, then } = policy {
        if retryable && attempt < *max {
            return OnFailure::Retry(backoff.saturating_mul(1 << attempt.min(16)));
        }
        policy = then;
    }
    if replay {
        return OnFailure::Replayed;
    }
    match policy {
        DeadLetter::To(_) => OnFailure::DeadLetter,
        DeadLetter::StopShard | DeadLetter::Retry { .. } => OnFailure::StopShard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_then_the_fallback_applies() {
        let policy = DeadLetter::retry(2, Duration::from_millis(10), DeadLetter::StopShard);
        assert_eq!(
            on_failure(&policy, 0, true, false),
            OnFailure::Retry(Duration::from_millis(10))
        );
        assert_eq!(
            on_failure(&policy, 1, true, false),
            OnFailure::Retry(Duration::from_millis(20))
        );
        assert_eq!(on_failure(&policy, 2, true, false), OnFailure::StopShard);
        assert_eq!(on_failure(&policy, 0, false, false), OnFailure::StopShard);
    }
}

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
    /// A replayed record under a stopping policy: the run that committed it got past it, so
    /// it never stopped there; nothing more.
    Replayed,
}

/// The decision for the `attempt`-th failure (from 0) of a record under `policy`.
/// `retryable` is false where trying again fails the same way (decoding); `replay` says whether
/// the record is replayed (its outputs and dead letters were committed by an earlier run). A
/// replay retries as the first run did: a record its function handled after a retry must
/// rebuild the state it built then. A replayed record is dead-lettered again: the dead-letter
/// sink's emitter drops what the earlier run committed, and a sink that gathers dead letters
/// into units (S3 objects) needs those after its last stored unit written again.
pub fn on_failure(policy: &DeadLetter, attempt: u32, retryable: bool, replay: bool) -> OnFailure {
    let mut policy = policy;
    if let DeadLetter::Retry { max, backoff, then } = policy {
        if retryable && attempt < *max {
            return OnFailure::Retry(backoff.saturating_mul(1 << attempt.min(16)));
        }
        policy = then;
    }
    match policy {
        DeadLetter::To(_) => OnFailure::DeadLetter,
        DeadLetter::StopShard | DeadLetter::Retry { .. } if replay => OnFailure::Replayed,
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

    #[test]
    fn a_replay_retries_as_before_and_dead_letters_again_but_never_stops() {
        let policy = DeadLetter::retry(1, Duration::from_millis(10), DeadLetter::StopShard);
        assert_eq!(
            on_failure(&policy, 0, true, true),
            OnFailure::Retry(Duration::from_millis(10))
        );
        assert_eq!(on_failure(&policy, 1, true, true), OnFailure::Replayed);
        assert_eq!(
            on_failure(&DeadLetter::StopShard, 0, false, true),
            OnFailure::Replayed
        );
        let letters = DeadLetter::to(crate::sink::MemorySink::new("letters"));
        assert_eq!(on_failure(&letters, 0, true, true), OnFailure::DeadLetter);
        let retried = DeadLetter::retry(1, Duration::from_millis(10), letters);
        assert_eq!(on_failure(&retried, 1, true, true), OnFailure::DeadLetter);
    }
}

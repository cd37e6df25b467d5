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
        DeadLetter::To(_) | DeadLetter::ToWithOverflow { .. } => OnFailure::DeadLetter,
        DeadLetter::StopShard | DeadLetter::Retry { .. } if replay => OnFailure::Replayed,
        DeadLetter::StopShard | DeadLetter::Retry { .. } => OnFailure::StopShard,
    }
}

/// The decision for a record a keyed operator panicked on in this run (quarantined), met again
/// before `key_by`: dead-lettered if the policy ends in a sink (in a replay too: the emitter
/// drops what an earlier life committed), and otherwise the shard stops, in a replay too.
/// Under a stopping policy no earlier life dead-lettered the record, so one that committed past
/// it processed it without the panic: the state cannot be rebuilt as it was, and skipping the
/// record silently (`Replayed`) would change later results unseen.
pub fn on_quarantined(policy: &DeadLetter) -> OnFailure {
    match policy.sink() {
        Some(_) => OnFailure::DeadLetter,
        None => OnFailure::StopShard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarantined_record_is_never_skipped_as_replayed() {
        let to = DeadLetter::to(crate::sink::MemorySink::<
            crate::dead_letter::DeadLetterRecord,
        >::new("d"));
        assert_eq!(on_quarantined(&to), OnFailure::DeadLetter);
        let retry = DeadLetter::retry(3, Duration::from_millis(1), to);
        assert_eq!(
            on_quarantined(&retry),
            OnFailure::DeadLetter,
            "a panic is not retried"
        );
        assert_eq!(on_quarantined(&DeadLetter::StopShard), OnFailure::StopShard);
    }

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

//! The lease update rules every store applies, as pure functions: which conditional updates
//! succeed and what they leave, and when a held lease is due for renewal.

use std::time::Duration;

use crate::error::LeaseError;
use crate::lease::{Lease, LeaseUpdate};

/// Applies `update` to `current` if the conditions hold: the rule every store implements with
/// its own atomic read-modify-write (a lock, a file lock, a DynamoDB condition expression).
///
/// - `Take` requires `counter == expected_counter`; a mismatch is `ConditionFailed`.
/// - `Renew`, `Checkpoint`, `Release` also require `owner` to be the current owner; a mismatch
///   is `LeaseLost`, the error that stops a shard's pipeline.
/// - `Reset` requires the counter and no owner; otherwise `ConditionFailed`.
pub fn apply_update(
    current: &Lease,
    expected_counter: u64,
    update: &LeaseUpdate,
) -> Result<Lease, LeaseError> {
    let mut next = current.clone();
    next.counter = current.counter + 1;
    match update {
        LeaseUpdate::Take { owner } => {
            if current.counter != expected_counter {
                return Err(LeaseError::ConditionFailed {
                    lease_key: current.key.clone(),
                    reason: "lease counter changed since it was read",
                });
            }
            if current.owner.as_deref() != Some(owner.as_str()) {
                next.owner_switches_since_checkpoint += 1;
            }
            next.owner = Some(owner.clone());
        }
        LeaseUpdate::Reset { checkpoint } => {
            if current.counter != expected_counter {
                return Err(LeaseError::ConditionFailed {
                    lease_key: current.key.clone(),
                    reason: "lease counter changed since it was read",
                });
            }
            if current.owner.is_some() {
                return Err(LeaseError::ConditionFailed {
                    lease_key: current.key.clone(),
                    reason: "lease is owned by a worker: stop the workers before a reset",
                });
            }
            next.checkpoint = checkpoint.clone();
            next.owner_switches_since_checkpoint = 0;
        }
        LeaseUpdate::Renew { owner }
        | LeaseUpdate::Checkpoint { owner, .. }
        | LeaseUpdate::Release { owner } => {
            if current.counter != expected_counter
                || current.owner.as_deref() != Some(owner.as_str())
            {
                return Err(LeaseError::LeaseLost {
                    lease_key: current.key.clone(),
                });
            }
            match update {
                LeaseUpdate::Checkpoint { checkpoint, .. } => {
                    next.checkpoint = checkpoint.clone();
                    next.owner_switches_since_checkpoint = 0;
                }
                LeaseUpdate::Release { .. } => next.owner = None,
                LeaseUpdate::Take { .. }
                | LeaseUpdate::Renew { .. }
                | LeaseUpdate::Reset { .. } => {}
            }
        }
    }
    Ok(next)
}

/// Checks that `current` may be deleted by a caller that last saw `expected_counter`: the
/// delete rule every store applies, like [`apply_update`] for updates.
pub fn check_delete(current: &Lease, expected_counter: u64) -> Result<(), LeaseError> {
    if current.counter == expected_counter {
        Ok(())
    } else {
        Err(LeaseError::ConditionFailed {
            lease_key: current.key.clone(),
            reason: "lease counter changed since it was read",
        })
    }
}

/// Whether a worker that last renewed its leases `since` ago renews them now: every third of a
/// lease duration, so that two renewals can fail before other workers may take the lease.
pub fn renewal_due(since: Duration, lease_duration: Duration) -> bool {
    since >= lease_duration / 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::ShardCheckpoint;

    #[test]
    fn take_bumps_counter_and_counts_owner_switches() {
        let lease = Lease::new("s1", vec![]);
        let taken = apply_update(&lease, 0, &LeaseUpdate::Take { owner: "a".into() }).unwrap();
        assert_eq!((taken.counter, taken.owner.as_deref()), (1, Some("a")));
        assert_eq!(taken.owner_switches_since_checkpoint, 1);
        let again = apply_update(&taken, 1, &LeaseUpdate::Take { owner: "a".into() }).unwrap();
        assert_eq!(again.owner_switches_since_checkpoint, 1);
    }

    #[test]
    fn renew_fails_after_lease_was_stolen() {
        let lease = Lease::new("s1", vec![]);
        let a = apply_update(&lease, 0, &LeaseUpdate::Take { owner: "a".into() }).unwrap();
        let b = apply_update(&a, 1, &LeaseUpdate::Take { owner: "b".into() }).unwrap();
        let err = apply_update(&b, 1, &LeaseUpdate::Renew { owner: "a".into() }).unwrap_err();
        assert!(matches!(err, LeaseError::LeaseLost { .. }));
        // Right owner, stale counter: lost too.
        let err = apply_update(&b, 1, &LeaseUpdate::Renew { owner: "b".into() }).unwrap_err();
        assert!(matches!(err, LeaseError::LeaseLost { .. }));
    }

    #[test]
    fn reset_moves_an_unowned_lease_and_refuses_an_owned_one() {
        let mut lease = Lease::new("s", vec![]);
        lease.checkpoint = ShardCheckpoint::shard_end();
        let reset = LeaseUpdate::Reset {
            checkpoint: ShardCheckpoint::initial(),
        };
        let moved = apply_update(&lease, 0, &reset).unwrap();
        assert_eq!(moved.checkpoint, ShardCheckpoint::initial());
        assert_eq!(moved.counter, 1);
        let owned = apply_update(&moved, 1, &LeaseUpdate::Take { owner: "w".into() }).unwrap();
        assert!(matches!(
            apply_update(&owned, 2, &reset),
            Err(LeaseError::ConditionFailed { .. })
        ));
        assert!(matches!(
            apply_update(&moved, 0, &reset),
            Err(LeaseError::ConditionFailed { .. })
        ));
    }

    #[test]
    fn checkpoint_resets_owner_switches() {
        let lease = Lease::new("s1", vec![]);
        let a = apply_update(&lease, 0, &LeaseUpdate::Take { owner: "a".into() }).unwrap();
        let cp = LeaseUpdate::Checkpoint {
            owner: "a".into(),
            checkpoint: ShardCheckpoint::shard_end(),
        };
        let done = apply_update(&a, 1, &cp).unwrap();
        assert!(done.checkpoint.is_shard_end());
        assert_eq!(done.owner_switches_since_checkpoint, 0);
    }
}

//! The lease update rules every store applies, as pure functions: which conditional updates
//! succeed and what they leave, what a write whose reply went missing did, and when a held
//! lease is due for renewal.

use std::time::Duration;

use crate::error::LeaseError;
use crate::lease::{Lease, LeaseUpdate};

/// Applies `update` to `current` if the conditions hold: the rule every store implements with
/// its own atomic read-modify-write (a lock, a file lock, a DynamoDB condition expression).
///
/// - `Take` requires `counter == expected_counter`; a mismatch is `ConditionFailed`. It clears
///   a pending handoff request.
/// - `Renew`, `Checkpoint`, `Release` also require `owner` to be the current owner; a mismatch
///   is `LeaseLost`, the error that stops a shard's pipeline. They keep a pending handoff
///   request (a release leaves the lease to its requester).
/// - `RequestHandoff` requires the counter and an owner other than the requester; otherwise
///   `ConditionFailed`.
/// - `Reset` requires the counter and no owner; otherwise `ConditionFailed`. It clears a
///   handoff request.
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
            next.handoff_to = None;
        }
        LeaseUpdate::RequestHandoff { requester } => {
            if current.counter != expected_counter {
                return Err(LeaseError::ConditionFailed {
                    lease_key: current.key.clone(),
                    reason: "lease counter changed since it was read",
                });
            }
            if current.owner.is_none() || current.owner.as_deref() == Some(requester.as_str()) {
                return Err(LeaseError::ConditionFailed {
                    lease_key: current.key.clone(),
                    reason: "a handoff is asked of another worker's lease",
                });
            }
            next.handoff_to = Some(requester.clone());
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
            next.handoff_to = None;
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
                | LeaseUpdate::RequestHandoff { .. }
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

/// What a worker's own write did, judged from the lease read after it (see [`judge_unclear`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnclearWrite {
    /// The write landed: the lease is what it would leave.
    Landed,
    /// It did not: the lease is as the writer last saw it, and trying again is safe.
    NotLanded,
    /// Someone else wrote since: the writer lost the lease (or, for a take, the race).
    Lost,
}

/// Judges a write of `update` by `owner` at `expected_counter` whose outcome is unclear (a
/// timeout or a lost reply; or a refused condition, which after the client's own retry of a
/// write that landed is what the retry sees) from the lease `now` read after it. The KCL
/// re-reads too, instead of taking the error for a loss.
///
/// `Landed` needs the counter one past the expected one and the lease as the write leaves it:
/// the owner (or none, for a release) and, for a checkpoint, the checkpoint. Only this writer
/// could have left that, since every other writer's take names itself, unless two live
/// processes share one worker id, which the docs forbid.
pub fn judge_unclear(
    expected_counter: u64,
    owner: &str,
    update: &LeaseUpdate,
    now: Option<&Lease>,
) -> UnclearWrite {
    let Some(now) = now else {
        return UnclearWrite::Lost;
    };
    let ours = now.owner.as_deref() == Some(owner);
    if now.counter == expected_counter {
        let unchanged = matches!(
            update,
            LeaseUpdate::Take { .. }
                | LeaseUpdate::Reset { .. }
                | LeaseUpdate::RequestHandoff { .. }
        ) || ours;
        return if unchanged {
            UnclearWrite::NotLanded
        } else {
            UnclearWrite::Lost
        };
    }
    // A pending handoff request moves the counter too: an owner's write is known to have
    // landed only if the lease shows no request (one, if any, came after: see
    // `handoff_asked`, which writes again).
    let unasked = now.handoff_to.is_none();
    let left_as_written = now.counter == expected_counter + 1
        && match update {
            LeaseUpdate::Take { .. } | LeaseUpdate::Renew { .. } => ours && unasked,
            LeaseUpdate::Checkpoint { checkpoint, .. } => {
                ours && unasked && now.checkpoint == *checkpoint
            }
            LeaseUpdate::Release { .. } => now.owner.is_none(),
            LeaseUpdate::RequestHandoff { requester } => {
                now.handoff_to.as_deref() == Some(requester.as_str())
            }
            LeaseUpdate::Reset { checkpoint } => {
                now.owner.is_none() && now.checkpoint == *checkpoint
            }
        };
    if left_as_written {
        UnclearWrite::Landed
    } else {
        UnclearWrite::Lost
    }
}

/// Whether `owner`'s write at `expected` was refused only because another worker asked for a
/// handoff since (see `LeaseUpdate::RequestHandoff`), judged from the lease `now` read after
/// the refusal: the owner is still `owner`, a handoff is pending, and the counter moved on.
/// The lease is still the owner's: it adopts the new counter, writes again, and winds the
/// shard down to hand it over. Anything else that moved the counter names another owner.
pub fn handoff_asked(owner: &str, expected: u64, now: &Lease) -> bool {
    now.owner.as_deref() == Some(owner) && now.handoff_to.is_some() && now.counter > expected
}

/// Whether a worker that last renewed its leases `since` ago renews them now: every third of a
/// lease duration, so that two renewals can fail before other workers may take the lease.
pub fn renewal_due(since: Duration, lease_duration: Duration) -> bool {
    since >= lease_duration / 3
}

/// How often a worker reads the leases it asked for (for a lease duration after asking): a
/// quarter of the checkpoint interval, and no more often than every 10 ms. A released lease is
/// then taken within about that long. The owner's part of a handoff (noticing the request at
/// its next checkpoint write, finishing its in-flight epochs, releasing) usually takes about
/// one interval more, longer while its sinks are slow.
pub fn request_poll_interval(checkpoint_interval: Duration) -> Duration {
    (checkpoint_interval / 4).max(Duration::from_millis(10))
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
    fn a_handoff_request_marks_the_lease_and_leaves_it_to_the_requester_on_release() {
        let lease = Lease::new("s1", vec![]);
        let a = apply_update(&lease, 0, &LeaseUpdate::Take { owner: "a".into() }).unwrap();
        let ask = LeaseUpdate::RequestHandoff {
            requester: "b".into(),
        };
        let asked = apply_update(&a, 1, &ask).unwrap();
        assert_eq!(
            (
                asked.counter,
                asked.owner.as_deref(),
                asked.handoff_to.as_deref()
            ),
            (2, Some("a"), Some("b"))
        );
        assert!(matches!(
            apply_update(&a, 0, &ask),
            Err(LeaseError::ConditionFailed { .. })
        ));
        let own = LeaseUpdate::RequestHandoff {
            requester: "a".into(),
        };
        assert!(
            apply_update(&a, 1, &own).is_err(),
            "nobody asks itself for its own lease"
        );
        assert!(
            apply_update(&lease, 0, &ask).is_err(),
            "a free lease is taken, not asked for"
        );
        // The owner's renewal at its old counter is refused; it sees why and adopts the new one.
        let renew = LeaseUpdate::Renew { owner: "a".into() };
        assert!(apply_update(&asked, 1, &renew).is_err());
        assert!(handoff_asked("a", 1, &asked));
        assert!(!handoff_asked("b", 1, &asked), "only the owner's");
        let renewed = apply_update(&asked, 2, &renew).unwrap();
        assert_eq!(renewed.handoff_to.as_deref(), Some("b"), "renewals keep it");
        let released =
            apply_update(&renewed, 3, &LeaseUpdate::Release { owner: "a".into() }).unwrap();
        assert_eq!(
            (released.owner.as_deref(), released.handoff_to.as_deref()),
            (None, Some("b"))
        );
        let taken = apply_update(&released, 4, &LeaseUpdate::Take { owner: "b".into() }).unwrap();
        assert_eq!(taken.handoff_to, None, "a take clears it");
        // The request's own bump is not the owner's renewal landing.
        assert_eq!(
            judge_unclear(1, "a", &renew, Some(&asked)),
            UnclearWrite::Lost
        );
        // A steal also moves the counter, but names another owner: that is a loss.
        let stolen = apply_update(&a, 1, &LeaseUpdate::Take { owner: "c".into() }).unwrap();
        assert!(!handoff_asked("a", 1, &stolen));
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
    fn an_unclear_write_is_judged_by_what_the_lease_shows_after_it() {
        let mut before = Lease::new("s", vec![]);
        before.counter = 4;
        before.owner = Some("me".into());
        let renew = LeaseUpdate::Renew { owner: "me".into() };
        let landed = apply_update(&before, 4, &renew).unwrap();
        assert_eq!(
            judge_unclear(4, "me", &renew, Some(&landed)),
            UnclearWrite::Landed
        );
        assert_eq!(
            judge_unclear(4, "me", &renew, Some(&before)),
            UnclearWrite::NotLanded
        );
        let stolen = apply_update(
            &before,
            4,
            &LeaseUpdate::Take {
                owner: "thief".into(),
            },
        )
        .unwrap();
        assert_eq!(
            judge_unclear(4, "me", &renew, Some(&stolen)),
            UnclearWrite::Lost
        );
        assert_eq!(judge_unclear(4, "me", &renew, None), UnclearWrite::Lost);
        // Renewed, then stolen: two writes past the expected counter.
        let later = apply_update(
            &landed,
            5,
            &LeaseUpdate::Take {
                owner: "thief".into(),
            },
        )
        .unwrap();
        assert_eq!(
            judge_unclear(4, "me", &renew, Some(&later)),
            UnclearWrite::Lost
        );

        let checkpoint = LeaseUpdate::Checkpoint {
            owner: "me".into(),
            checkpoint: ShardCheckpoint::shard_end(),
        };
        let written = apply_update(&before, 4, &checkpoint).unwrap();
        assert_eq!(
            judge_unclear(4, "me", &checkpoint, Some(&written)),
            UnclearWrite::Landed
        );
        // Our renewal landed instead (the same counter): not this checkpoint.
        assert_eq!(
            judge_unclear(4, "me", &checkpoint, Some(&landed)),
            UnclearWrite::Lost
        );

        let release = LeaseUpdate::Release { owner: "me".into() };
        let released = apply_update(&before, 4, &release).unwrap();
        assert_eq!(
            judge_unclear(4, "me", &release, Some(&released)),
            UnclearWrite::Landed
        );
        assert_eq!(
            judge_unclear(4, "me", &renew, Some(&released)),
            UnclearWrite::Lost
        );

        let mut free = before;
        free.owner = None;
        let take = LeaseUpdate::Take { owner: "me".into() };
        let taken = apply_update(&free, 4, &take).unwrap();
        assert_eq!(
            judge_unclear(4, "me", &take, Some(&taken)),
            UnclearWrite::Landed
        );
        assert_eq!(
            judge_unclear(4, "me", &take, Some(&free)),
            UnclearWrite::NotLanded
        );
        let other = apply_update(&free, 4, &LeaseUpdate::Take { owner: "b".into() }).unwrap();
        assert_eq!(
            judge_unclear(4, "me", &take, Some(&other)),
            UnclearWrite::Lost
        );
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

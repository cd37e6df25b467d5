//! What the worker does with a shard after its task ends, and when a run is over.

use crate::protocol::checkpoint::Epoch;

/// How a shard task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskEnd {
    /// Read to the end (closed shard) or to the tip (bounded run); `last_epoch` is final.
    Finished {
        /// The shard's last epoch in this run.
        last_epoch: Epoch,
        /// Whether the shard is closed and fully read.
        shard_end: bool,
    },
    /// Stopped on request (shutdown, a lost lease, another shard's failure) after `last_epoch`.
    Cancelled {
        /// The last epoch the task handed on.
        last_epoch: Epoch,
        /// Whether it dropped the shard's state without a word more (`Control::Release`: its
        /// lease may have moved, by its own guard) rather than letting the keyed workers
        /// finish it (`Control::Stop`): then they report nothing more of it either.
        released: bool,
    },
    /// A sink refused a write as stale: a newer lease epoch owns the shard.
    Fenced,
    /// The dead-letter policy stopped the shard at a bad record.
    Stopped,
    /// A sink or the dead-letter sink failed after its own retries (on the shard's path, or
    /// a keyed path dropped the shard for it).
    SinkFailed,
    /// Any other error.
    Failed,
}

/// What the worker does with a shard whose task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterTask {
    /// Wait until every path committed `last_epoch`, write the final checkpoint, free the shard.
    Finish {
        /// The epoch every path must have committed.
        last_epoch: Epoch,
        /// Whether the final checkpoint is `SHARD_END`.
        shard_end: bool,
    },
    /// The lease is gone: forget the shard without writing anything more. `resync`: look at the
    /// lease table again at once (after a fence the lease may still be this worker's).
    Forget {
        /// Run a shard sync at once.
        resync: bool,
        /// Count it as a lost lease (a fence is learned here; a lost renewal was counted then).
        count_lost: bool,
    },
    /// Stopped by the dead-letter policy: not started again in this run, reported at its end.
    Stop,
    /// Back off (`protocol::sink_failure`): the shard starts again from its checkpoint after a
    /// pause, or is let go.
    BackOff,
    /// The run fails: every shard is cancelled and no new one starts.
    FailRun,
}

/// The decision for a shard whose task ended with `end`; `lease_lost` says whether the worker
/// learned meanwhile that its lease moved (a cancelled task then writes nothing more).
pub fn after_task(end: TaskEnd, lease_lost: bool) -> AfterTask {
    match end {
        // Read to its end, but its life was dropped meanwhile (the lease moved, or a keyed
        // path dropped it when its guard ran out): the paths never report its last epochs, so
        // a final checkpoint would wait forever. The table says whose it is now.
        TaskEnd::Finished { .. } if lease_lost => AfterTask::Forget {
            resync: true,
            count_lost: false,
        },
        TaskEnd::Finished {
            last_epoch,
            shard_end,
        } => AfterTask::Finish {
            last_epoch,
            shard_end,
        },
        TaskEnd::Cancelled {
            last_epoch,
            released: false,
        } if !lease_lost => AfterTask::Finish {
            last_epoch,
            shard_end: false,
        },
        TaskEnd::Cancelled { .. } => AfterTask::Forget {
            resync: false,
            count_lost: false,
        },
        TaskEnd::Fenced => AfterTask::Forget {
            resync: true,
            count_lost: true,
        },
        TaskEnd::Stopped => AfterTask::Stop,
        // Whether or not the lease moved meanwhile: this worker pauses before it takes the
        // shard again, and writes nothing more of this life.
        TaskEnd::SinkFailed => AfterTask::BackOff,
        TaskEnd::Failed => AfterTask::FailRun,
    }
}

/// What a finished shard counts as once its final checkpoint was tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// The final checkpoint was refused (the lease moved meanwhile): nothing of the end is
    /// recorded, so the shard is not done. The lease is forgotten and the table looked at
    /// again: the new owner finishes it, or, if that owner is gone too, this worker takes it
    /// again once it expired and replays from the last checkpoint.
    NotRecorded,
    /// Closed and fully read: reported, and a shard sync is owed (its children may start).
    Ended,
    /// Read to its tip in a bounded run.
    CaughtUp,
    /// Stopped for shutdown (or cancelled): nothing to report.
    Released,
}

/// How a shard that finished counts, given whether its final checkpoint was `recorded`,
/// whether it reached `shard_end`, whether the run is `bounded` (`RunMode::UntilCaughtUp`) and
/// whether it is `shutting_down`.
pub fn finished(recorded: bool, shard_end: bool, bounded: bool, shutting_down: bool) -> Finished {
    if !recorded && shutting_down {
        Finished::Released
    } else if !recorded {
        Finished::NotRecorded
    } else if shard_end {
        Finished::Ended
    } else if bounded && !shutting_down {
        Finished::CaughtUp
    } else {
        Finished::Released
    }
}

/// Whether a run is over: nothing runs or finishes, and it was asked to stop, failed, or (a
/// bounded run) has no shard sync owed that could start more shards.
pub fn run_over(
    idle: bool,
    bounded: bool,
    sync_owed: bool,
    shutting_down: bool,
    failed: bool,
) -> bool {
    idle && ((bounded && !sync_owed) || shutting_down || failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_shard_finishes_unless_its_lease_was_lost() {
        let cancelled = TaskEnd::Cancelled {
            last_epoch: 4,
            released: false,
        };
        assert_eq!(
            after_task(
                TaskEnd::Cancelled {
                    last_epoch: 4,
                    released: true
                },
                false
            ),
            AfterTask::Forget {
                resync: false,
                count_lost: false
            },
            "released: its keyed workers report nothing more, so no final checkpoint waits"
        );
        assert_eq!(
            after_task(cancelled, false),
            AfterTask::Finish {
                last_epoch: 4,
                shard_end: false
            }
        );
        assert!(matches!(
            after_task(cancelled, true),
            AfterTask::Forget { resync: false, .. }
        ));
        assert!(matches!(
            after_task(TaskEnd::Fenced, false),
            AfterTask::Forget { resync: true, .. }
        ));
    }

    #[test]
    fn a_shard_read_to_its_end_after_its_life_was_dropped_is_looked_at_again() {
        let finished = TaskEnd::Finished {
            last_epoch: 8,
            shard_end: true,
        };
        assert_eq!(
            after_task(finished, false),
            AfterTask::Finish {
                last_epoch: 8,
                shard_end: true
            }
        );
        // Simulation seed 3327: a keyed path dropped the life (its guard ran out while a sink
        // stalled through a cut-off) just before the task reported its end; waiting for the
        // dropped epochs kept the shard from ever ending.
        assert_eq!(
            after_task(finished, true),
            AfterTask::Forget {
                resync: true,
                count_lost: false
            }
        );
    }

    #[test]
    fn a_bounded_run_ends_only_when_no_sync_is_owed() {
        assert!(!run_over(true, true, true, false, false));
        assert!(run_over(true, true, false, false, false));
        assert!(!run_over(false, true, false, true, true));
        assert!(!run_over(true, false, false, false, false));
    }

    #[test]
    fn a_shard_whose_final_checkpoint_was_refused_is_not_done() {
        assert_eq!(finished(false, true, false, false), Finished::NotRecorded);
        assert_eq!(finished(false, false, true, false), Finished::NotRecorded);
        assert_eq!(finished(true, true, false, false), Finished::Ended);
        assert_eq!(finished(true, false, true, false), Finished::CaughtUp);
        assert_eq!(
            finished(false, true, false, true),
            Finished::Released,
            "a worker that stops leaves it to the next owner either way"
        );
    }
}

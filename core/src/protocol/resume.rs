//! Where a shard resumes and where its replay ends, from the checkpoint it resumes from.
//!
//! Reading restarts after `rebuild_from`; records up to `committed` were processed and their
//! outputs committed by an earlier run, so they only rebuild operator state (a replay). The
//! first record after `committed` is live again.

use crate::lease::{CheckpointPosition, ShardCheckpoint};
use crate::position::{RecordPosition, StartPosition};
use crate::record::RawBatch;

/// How a shard task starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumePlan {
    /// The shard was read to its end by an earlier run: nothing to read.
    Finished,
    /// Read from `start`; records up to `replay_until` only rebuild state.
    Read {
        /// Where reading starts.
        start: StartPosition,
        /// The last record of the replay, if there is one.
        replay_until: Option<RecordPosition>,
    },
}

/// The plan for a shard resumed from `checkpoint`, in a topology whose shards start at
/// `initial` when nothing was processed.
pub fn plan_resume(checkpoint: &ShardCheckpoint, initial: &StartPosition) -> ResumePlan {
    let start = match &checkpoint.rebuild_from {
        CheckpointPosition::Initial => initial.clone(),
        CheckpointPosition::TrimHorizon => StartPosition::TrimHorizon,
        CheckpointPosition::AtTimestamp(ms) => StartPosition::AtTimestamp(*ms),
        CheckpointPosition::At(p) => StartPosition::After(p.clone()),
        CheckpointPosition::ShardEnd => return ResumePlan::Finished,
    };
    let replay_until = match (&checkpoint.committed, &checkpoint.rebuild_from) {
        (CheckpointPosition::At(c), CheckpointPosition::At(r)) if c > r => Some(c.clone()),
        (CheckpointPosition::At(c), r) if r.is_unprocessed() => Some(c.clone()),
        _ => None,
    };
    ResumePlan::Read {
        start,
        replay_until,
    }
}

/// How a read batch divides at the end of a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplaySplit {
    /// The first this many records only rebuild state; the rest are live.
    pub replayed: usize,
    /// Whether the replay is over after them.
    pub done: bool,
}

/// Divides `batch` for a replay that lasts through `until`.
pub fn split_replay(batch: &RawBatch, until: &RecordPosition) -> ReplaySplit {
    let replayed = batch.iter().take_while(|r| r.position <= until).count();
    let done = replayed < batch.len() || batch.last_position() == Some(until);
    ReplaySplit { replayed, done }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::position::SequenceNumber;

    fn pos(n: u128) -> RecordPosition {
        RecordPosition::new(SequenceNumber::from_u128(n))
    }

    fn batch(seqs: &[u128]) -> RawBatch {
        let mut b = RawBatch::default();
        for s in seqs {
            b.push(pos(*s), 0, b"k", b"v");
        }
        b
    }

    #[test]
    fn a_shard_resumes_after_its_rebuild_point_and_replays_through_its_commit() {
        let cp = ShardCheckpoint {
            committed: CheckpointPosition::At(pos(30)),
            committed_watermark: None,
            rebuild_from: CheckpointPosition::At(pos(10)),
            rebuild_watermark: None,
            sinks: BTreeMap::new(),
        };
        assert_eq!(
            plan_resume(&cp, &StartPosition::Latest),
            ResumePlan::Read {
                start: StartPosition::After(pos(10)),
                replay_until: Some(pos(30)),
            }
        );
        let fresh = plan_resume(&ShardCheckpoint::initial(), &StartPosition::Latest);
        assert_eq!(
            fresh,
            ResumePlan::Read {
                start: StartPosition::Latest,
                replay_until: None
            }
        );
        assert_eq!(
            plan_resume(&ShardCheckpoint::shard_end(), &StartPosition::Latest),
            ResumePlan::Finished
        );
    }

    #[test]
    fn a_batch_divides_at_the_last_replayed_record() {
        let until = pos(20);
        let cases = [
            (vec![5, 10], 2, false),
            (vec![15, 20], 2, true),
            (vec![15, 20, 25], 2, true),
            (vec![25, 30], 0, true),
        ];
        for (seqs, replayed, done) in cases {
            assert_eq!(
                split_replay(&batch(&seqs), &until),
                ReplaySplit { replayed, done },
                "{seqs:?}"
            );
        }
    }
}

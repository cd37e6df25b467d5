//! Where a shard resumes and where its replay ends, from the checkpoint it resumes from.
//!
//! Reading restarts after `rebuild_from`; records up to `committed` were processed and their
//! outputs committed by an earlier run, so they only rebuild operator state (a replay). The
//! first record after `committed` is live again.

use crate::lease::{CheckpointPosition, ShardCheckpoint, WatermarkAdvance};
use crate::position::{RecordPosition, StartPosition};
use crate::record::RawBatch;

/// How a shard task starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumePlan {
    /// The shard was read to its end by an earlier run: nothing to read.
    Finished,
    /// Read from `start`; records up to `replay_until` only rebuild state; the recorded
    /// watermark `advances` are made again after their records.
    Read {
        /// Where reading starts.
        start: StartPosition,
        /// The last record of the replay, if there is one.
        replay_until: Option<RecordPosition>,
        /// Watermark advances decided on processing time by earlier runs, oldest first.
        advances: Vec<WatermarkAdvance>,
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
        advances: checkpoint.advances.clone(),
    }
}

/// How many of `batch`'s records make its next epoch: up to the first of `limits` (the end of
/// the replay, the next recorded watermark advance) that lies inside the batch, so that the
/// epoch ends right there; all of them if none does.
pub fn next_epoch_len<'a>(
    batch: &RawBatch,
    limits: impl IntoIterator<Item = &'a RecordPosition>,
) -> usize {
    limits
        .into_iter()
        .map(|limit| batch.iter().take_while(|r| r.position <= limit).count())
        .filter(|n| *n > 0)
        .min()
        .unwrap_or(batch.len())
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
            advances: Vec::new(),
            snapshot: None,
        };
        assert_eq!(
            plan_resume(&cp, &StartPosition::Latest),
            ResumePlan::Read {
                start: StartPosition::After(pos(10)),
                replay_until: Some(pos(30)),
                advances: Vec::new(),
            }
        );
        let fresh = plan_resume(&ShardCheckpoint::initial(), &StartPosition::Latest);
        assert_eq!(
            fresh,
            ResumePlan::Read {
                start: StartPosition::Latest,
                replay_until: None,
                advances: Vec::new(),
            }
        );
        assert_eq!(
            plan_resume(&ShardCheckpoint::shard_end(), &StartPosition::Latest),
            ResumePlan::Finished
        );
    }

    #[test]
    fn an_epoch_ends_at_the_first_limit_inside_its_batch() {
        let b = batch(&[15, 20, 25, 30]);
        assert_eq!(
            next_epoch_len(&b, [&pos(20)]),
            2,
            "through the replay's end"
        );
        assert_eq!(
            next_epoch_len(&b, [&pos(27), &pos(15)]),
            1,
            "the first limit"
        );
        assert_eq!(
            next_epoch_len(&b, [&pos(10)]),
            4,
            "a limit before the batch"
        );
        assert_eq!(next_epoch_len(&b, [&pos(40)]), 4);
        assert_eq!(next_epoch_len(&b, []), 4);
    }
}

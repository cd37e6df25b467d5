//! The checks that keep what a sink writer holds back (`SinkWriter::held`) visible to the
//! checkpoint: a writer that holds outputs where nothing tracks them, or tracks them without
//! saying so, would let a restart resume at the wrong place and lose or repeat records.

use crate::error::{Error, HoldingContract, SinkError};
use crate::position::ShardId;
use crate::sink::{Held, Sink, SinkWriter};

/// What the emitter just did with the writer.
#[derive(Clone, Copy)]
pub(crate) enum After<'a> {
    /// Wrote a batch; `records_of` names the shard if the batch held outputs of records.
    Write { records_of: Option<&'a ShardId> },
    /// Committed.
    Commit,
    /// Told it that the shard's input ended.
    EndShard(&'a ShardId),
}

/// Refuses, before any hold report reaches the checkpoint, a writer that breaks the contract
/// of [`Sink::holds_record_outputs`] and [`SinkWriter::held`]. `tracked` says whether what the
/// writer holds reaches the shard's checkpoint (a shard's own path) or nothing does (after
/// `key_by`).
pub(crate) fn check<T: 'static>(
    sink: &dyn Sink<T>,
    writer: &dyn SinkWriter<T>,
    tracked: bool,
    after: After<'_>,
) -> Result<(), Error> {
    let declared = sink.holds_record_outputs();
    let (operation, broken) = match after {
        After::Write { records_of } => ("write", broken(writer, declared, tracked, records_of)),
        After::Commit => ("commit", broken(writer, declared, tracked, None)),
        After::EndShard(shard) => {
            let buffered = writer.held().iter().any(|(s, h)| s == shard && h.buffered);
            let broken = buffered.then(|| HoldingContract::NotDrained {
                shard: shard.clone(),
            });
            ("end shard", broken)
        }
    };
    match broken {
        None => Ok(()),
        Some(broken) => Err(SinkError {
            sink: sink.name().to_owned(),
            operation,
            retryable: false,
            source: Box::new(broken),
        }
        .into()),
    }
}

/// Which rule, if any, the writer broke after a write (of `records_of`'s records) or commit.
fn broken<T: 'static>(
    writer: &dyn SinkWriter<T>,
    declared: bool,
    tracked: bool,
    records_of: Option<&ShardId>,
) -> Option<HoldingContract> {
    let held = writer.held();
    let holds = held.iter().any(|(_, h)| *h != Held::default());
    if holds && !tracked {
        return Some(HoldingContract::AfterKeyBy);
    }
    if holds && !declared {
        return Some(HoldingContract::Undeclared);
    }
    match records_of {
        Some(shard) if declared && tracked && !held.iter().any(|(s, _)| s == shard) => {
            Some(HoldingContract::Unreported {
                shard: shard.clone(),
            })
        }
        _ => None,
    }
}

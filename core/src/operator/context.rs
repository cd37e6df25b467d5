//! What an operator knows about the record it handles and the epoch it belongs to.

use std::sync::Arc;

use crate::lease::{LeaseEpoch, SnapshotRef};
use crate::position::{EventTime, RecordPosition, ShardId};
use crate::protocol::checkpoint::Epoch;
use crate::record::RawBatch;
use crate::sink::{KeyId, Window};

/// The watermark before any record was seen.
pub const NO_WATERMARK: EventTime = EventTime::MIN;

/// What an operator knows about the record it handles.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordCx {
    /// The record's event time.
    pub event_time: EventTime,
    /// The shard's watermark when the record arrived: records of windows that ended (plus the
    /// allowed lateness) before it are late. `EventTime::MAX` for a record whose event time is
    /// too far ahead of its arrival (`protocol::watermark`): late for every window. (One outside
    /// the valid range never gets here: it is dead-lettered.)
    pub watermark: EventTime,
    /// What the output's identity derives from.
    pub ident: Ident,
}

/// The source of an output's identity.
#[derive(Clone, Debug, PartialEq)]
pub enum Ident {
    /// The record at `index` of its epoch's batch; `fanout` numbers the outputs the
    /// `flat_map`s after the source made of it (see [`RecordCx::nth_output`]).
    Record {
        /// Index in the epoch's raw batch.
        index: u32,
        /// Which output of the record.
        fanout: u64,
    },
    /// A keyed (and possibly windowed) result; `fanout` numbers the outputs the `flat_map`s
    /// after the keyed operator made of it.
    Keyed {
        /// The key, rendered.
        key: KeyId,
        /// The window, if any.
        window: Option<Window>,
        /// Which output of the result.
        fanout: u64,
    },
}

impl Ident {
    /// A keyed result's identity before any `flat_map`.
    pub fn keyed(key: KeyId, window: Option<Window>) -> Self {
        Self::Keyed {
            key,
            window,
            fanout: 0,
        }
    }
}

impl RecordCx {
    /// The context of the `n`-th output (from 0) a fanning-out operator makes of this one:
    /// each level of `flat_map` shifts the fanout left by `bits` (64 divided by the deepest
    /// chain of `flat_map`s in the topology, so that no level is ever shifted out) and adds
    /// `n`. `None` if `n` does not fit in `bits`: the output would overwrite another.
    pub fn nth_output(&self, n: u64, bits: u32) -> Option<RecordCx> {
        if bits < 64 && n >> bits != 0 {
            return None;
        }
        let mut cx = self.clone();
        let (Ident::Record { fanout, .. } | Ident::Keyed { fanout, .. }) = &mut cx.ident;
        *fanout = if bits >= 64 { n } else { (*fanout << bits) | n };
        Some(cx)
    }
}

/// What a flush is about: one epoch of one shard.
#[derive(Clone, Debug)]
pub struct EpochCx {
    /// The source shard.
    pub shard: ShardId,
    /// The worker's lease epoch for the shard (the fencing token sinks receive).
    pub lease_epoch: LeaseEpoch,
    /// The epoch.
    pub epoch: Epoch,
    /// The epoch's raw records (resolves `Ident::Record` to positions).
    pub raw: Arc<RawBatch>,
    /// The shard's watermark after the epoch, once any record was seen.
    pub watermark: Option<EventTime>,
    /// Whether the epoch is live or only rebuilds state.
    pub mode: Mode,
    /// What else the epoch says about the shard.
    pub control: Control,
    /// What keyed workers do with the shard's keyed state at this epoch.
    pub(crate) state: StateOrder,
}

/// A snapshot to restore, and the last record whose effect it holds (the resume point).
#[derive(Clone, Debug)]
pub struct Restore {
    /// The snapshot.
    pub snapshot: SnapshotRef,
    /// The last record it holds the effect of (`None` before the shard's first record).
    pub after: Option<RecordPosition>,
}

/// What keyed workers do with a shard's keyed state at an epoch (`state(Snapshot)`).
#[derive(Clone, Debug, Default)]
pub enum StateOrder {
    /// Nothing.
    #[default]
    Keep,
    /// The first epoch of a life resumed from a snapshot: each worker loads its keys from the
    /// snapshot's parts before the epoch's records.
    Restore(Arc<Restore>),
    /// Each worker commits at once after the epoch and stores its part of a snapshot under
    /// the shard's prefix (`state_store::shard_prefix`) before it reports the epoch.
    Take(Arc<str>),
}

impl EpochCx {
    /// A replay epoch only rebuilds state: its outputs were committed by an earlier run.
    pub fn replay(&self) -> bool {
        self.mode == Mode::Rebuild
    }
}

/// How records of an epoch are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Normal processing.
    Live,
    /// The records were processed and their outputs committed by an earlier run; they only
    /// rebuild operator state. Operators handle them exactly as live ones (each record judged
    /// by its arrival watermark, windows fired and closed as the watermark passes them): the
    /// runtime drops what they emit.
    Rebuild,
}

/// What an epoch says about its shard beyond its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Nothing: more epochs follow.
    Continue,
    /// A bounded run reached the tip: emit what open windows hold, but keep them (a later run
    /// may refine them).
    EndOfInput,
    /// The shard is closed and fully read: close every window and drop the shard's state.
    ShardEnd,
    /// The worker stops processing the shard in an orderly way (shutdown, the run ending or
    /// failing elsewhere) while its lease is surely still the worker's: emit what the state
    /// owes (running results not yet emitted), commit, report, then drop the state.
    Stop,
    /// The shard is no longer ours (lease lost, fenced, stopped at a bad record): drop its
    /// state without output; the next owner emits what is owed.
    Release,
}

//! What an operator knows about the record it handles and the epoch it belongs to.

use std::sync::Arc;

use crate::lease::LeaseEpoch;
use crate::position::{EventTime, ShardId};
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
    /// allowed lateness) before it are late.
    pub watermark: EventTime,
    /// What the output's identity derives from.
    pub ident: Ident,
}

/// The source of an output's identity.
#[derive(Clone, Debug, PartialEq)]
pub enum Ident {
    /// The record at `index` of its epoch's batch; `fanout` numbers the outputs `flat_map`
    /// made of it (16 bits per level).
    Record {
        /// Index in the epoch's raw batch.
        index: u32,
        /// Which output of the record.
        fanout: u32,
    },
    /// A keyed (and possibly windowed) result.
    Keyed {
        /// The key, rendered.
        key: KeyId,
        /// The window, if any.
        window: Option<Window>,
    },
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
}

impl EpochCx {
    /// A replay epoch only rebuilds state: its outputs were committed by an earlier run.
    pub fn replay(&self) -> bool {
        matches!(self.mode, Mode::Rebuild { .. })
    }
}

/// How records of an epoch are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Normal processing.
    Live,
    /// The records were processed and their outputs committed by an earlier run; they only
    /// rebuild operator state. Windows that had closed by `committed_watermark` are final.
    Rebuild {
        /// The watermark at the committed checkpoint.
        committed_watermark: EventTime,
    },
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
    /// The shard is no longer ours (lease lost, stopped): drop its state without output.
    Release,
}

//! The `Emit` trait: a consumer of values in a fused push chain.

use async_trait::async_trait;

use crate::error::Error;
use crate::operator::context::{EpochCx, RecordCx};
use crate::position::ShardId;
use crate::sink::Held;

/// A consumer of values in a fused chain. `emit` is synchronous and buffers; `flush` and
/// `commit` do the I/O once per epoch.
#[async_trait]
pub trait Emit<T>: Send {
    /// Takes one value.
    fn emit(&mut self, cx: &RecordCx, value: T);
    /// Writes what the epoch produced.
    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error>;
    /// Makes everything written durable.
    async fn commit(&mut self) -> Result<(), Error>;
    /// Drops what was buffered for the current epoch (the shard stops before it).
    fn discard(&mut self);
    /// Adds what this consumer's sinks hold back after a commit, by sink name and shard (see
    /// `SinkWriter::held`).
    fn held(&self, _out: &mut Vec<(String, ShardId, Held)>) {}
    /// Calls parked user functions whose wait is over, then passes the call down.
    fn resume(&mut self) {}
    /// Adds the keyed results a sink refused (`Sink::check`) since the last call, one per
    /// life and sink: (shard, lease epoch, reason). After `key_by` no input record stands
    /// behind a result, so its shard stops instead (`ShardStopped::RefusedOutput`).
    fn take_refused(&mut self, _out: &mut Vec<Refused>) {}
}

/// A keyed result a sink refused: its shard, the life, and the sink's reason.
pub type Refused = (ShardId, crate::lease::LeaseEpoch, String);

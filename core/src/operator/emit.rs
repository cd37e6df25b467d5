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
    /// Adds the keyed results a sink refused (`Sink::check`) in live epochs flushed since the
    /// last call. After `key_by` no input record stands behind a result: the keyed worker
    /// dead-letters each as a keyed dead letter, or stops its shard
    /// (`ShardStopped::KeyedPath`) if the dead-letter policy has no sink that takes it.
    fn take_refused(&mut self, _out: &mut Vec<Refused>) {}
}

/// A keyed result a sink refused (`Sink::check`), with what a keyed dead letter says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The source shard whose state made it.
    pub shard: ShardId,
    /// The life it was made in.
    pub lease_epoch: crate::lease::LeaseEpoch,
    /// The sink that refused it.
    pub sink: String,
    /// Its identity in that sink (key, window, index; the position of a late record on a
    /// keyed path's side output).
    pub identity: crate::sink::OutputId,
    /// The sink's reason: kinds and sizes, never values.
    pub reason: String,
    /// Its encoded size, if the sink says (`Sink::size_of`).
    pub size: Option<u64>,
}

//! Error types: one narrow enum per operation callers branch on, each convertible into [`Error`].

use crate::position::{RecordPosition, ShardId};

/// A boxed error from an implementation (an SDK, the file system).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Reading a stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The stream does not exist.
    #[error("stream {stream:?} not found: create it first or check the name")]
    StreamNotFound {
        /// The stream name.
        stream: String,
    },
    /// The shard does not exist (or was trimmed away entirely by retention).
    #[error("shard {shard} of stream {stream:?} not found")]
    ShardNotFound {
        /// The stream name.
        stream: String,
        /// The shard.
        shard: ShardId,
    },
    /// The stream was deleted and created again during this run: this run's leases are of the
    /// old stream; a new run takes the new stream's shards under keys of its own.
    #[error("stream {stream:?} was created again during this run (created at {was_secs} s, now {now_secs} s since the epoch): restart to process the new stream")]
    StreamRecreated {
        /// The stream.
        stream: String,
        /// The creation time this run worked under.
        was_secs: i64,
        /// The creation time the stream reports now.
        now_secs: i64,
    },
    /// The service asked us to slow down; retry after a backoff.
    #[error("reads of shard {shard} throttled")]
    Throttled {
        /// The shard.
        shard: ShardId,
    },
    /// Any other failure. `retryable` says whether trying again may help.
    #[error("reading {what} failed: {source}")]
    Other {
        /// What was being read.
        what: String,
        /// Whether trying again may help.
        retryable: bool,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

impl SourceError {
    /// Whether the operation may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Throttled { .. } => true,
            Self::Other { retryable, .. } => *retryable,
            Self::StreamNotFound { .. }
            | Self::ShardNotFound { .. }
            | Self::StreamRecreated { .. } => false,
        }
    }
}

/// Writing to a sink failed.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink:?} failed to {operation}: {source}")]
pub struct SinkError {
    /// The sink's name.
    pub sink: String,
    /// What it was doing (`write`, `commit`, `open`).
    pub operation: &'static str,
    /// Whether trying again may help.
    pub retryable: bool,
    /// The cause.
    #[source]
    pub source: BoxError,
}

impl SinkError {
    /// Whether the sink refused the write because a newer lease epoch already wrote (part of)
    /// it: this writer's lease moved on, and its shard must stop (see [`Fenced`]).
    pub fn is_fenced(&self) -> bool {
        self.fenced().is_some()
    }

    /// Whether nothing was written because the shard's lease guard ran out first (see
    /// [`GuardExpired`]).
    pub fn is_guard_expired(&self) -> bool {
        self.source.downcast_ref::<GuardExpired>().is_some()
    }

    /// The fencing refusal, naming the shard and the refused writer's epoch, if this is one.
    pub fn fenced(&self) -> Option<&Fenced> {
        self.source.downcast_ref::<Fenced>()
    }

    /// Whether the runtime found the sink breaking its contract ([`HoldingContract`]): a bug
    /// in the sink, which no backoff cures; the run fails.
    pub fn is_contract_breach(&self) -> bool {
        self.source.downcast_ref::<HoldingContract>().is_some()
    }

    /// Whether this is a sink failing to store outputs (after its own retries): the shards
    /// whose outputs it held back off and start again (`protocol::sink_failure`). Not a
    /// fencing refusal or an expired guard (the lease moved), nor a contract breach.
    pub fn is_failed_store(&self) -> bool {
        !self.is_fenced() && !self.is_guard_expired() && !self.is_contract_breach()
    }
}

/// A fencing sink refused a write: a newer lease epoch of the shard already wrote the output,
/// or (a sink that writes on a condition, such as S3) another writer changed it since this
/// writer read it. Either way another owner of the shard is or was writing. Carried as the
/// source of a [`SinkError`]; test with [`SinkError::is_fenced`].
#[derive(Debug, thiserror::Error)]
#[error(
    "a write of output {} of shard {shard} under lease epoch {epoch} was refused: another \
     owner of the shard wrote it",
    crate::redact::output_path(output)
)]
pub struct Fenced {
    /// The source shard.
    pub shard: ShardId,
    /// The output's identity path.
    pub output: String,
    /// The refused writer's epoch.
    pub epoch: crate::lease::LeaseEpoch,
}

/// A shard's lease guard ran out while its epoch's outputs were on their way to a sink (a
/// sink call that stalled past the lease): the lease may have moved, so nothing more of the
/// shard is written and the shard stops like a lost lease. Carried as the source of a
/// [`SinkError`]; test with [`SinkError::is_guard_expired`].
#[derive(Debug, thiserror::Error)]
#[error("the lease guard of shard {shard} ran out before its outputs reached sink {sink}")]
pub struct GuardExpired {
    /// The source shard.
    pub shard: ShardId,
    /// The sink that was not called.
    pub sink: String,
}

/// A sink writer broke the contract of what it holds back
/// ([`Sink::holds_record_outputs`](crate::sink::Sink::holds_record_outputs),
/// [`SinkWriter::held`](crate::sink::SinkWriter::held)), typically a sink or writer that wraps
/// another and forwards only part of it. What it holds would not reach the checkpoint as it
/// must, and a restart would resume at the wrong place, losing or repeating records; so the run
/// stops at the first write, commit or shard end that shows it, before any checkpoint moves.
/// Carried as the source of a [`SinkError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HoldingContract {
    /// The writer holds outputs back but the sink does not declare `holds_record_outputs`.
    #[error(
        "its writer holds outputs back (SinkWriter::held) but the sink does not declare \
         holds_record_outputs: a sink that wraps another must forward both"
    )]
    Undeclared,
    /// The writer holds outputs back after `key_by`, where nothing tracks what it holds.
    #[error(
        "its writer holds outputs back (SinkWriter::held) after key_by, where no checkpoint \
         tracks them: only sinks on a shard's own path may hold outputs"
    )]
    AfterKeyBy,
    /// The sink declares `holds_record_outputs` but its writer reported nothing for a shard
    /// right after it was given the shard's records.
    #[error(
        "the sink declares holds_record_outputs but its writer reports nothing held for shard \
         {shard} after writing its records (SinkWriter::held): a writer that wraps another must \
         forward held, end_shard and release_shard"
    )]
    Unreported {
        /// The source shard.
        shard: ShardId,
    },
    /// The writer still buffers outputs of a shard after it was told the shard ended.
    #[error(
        "its writer still buffers outputs of shard {shard} after end_shard: a writer that wraps \
         another must forward end_shard"
    )]
    NotDrained {
        /// The source shard.
        shard: ShardId,
    },
}

/// A lease operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The lease changed under us (another owner, or a newer counter): we no longer own it.
    #[error("lease {lease_key:?} lost: another worker took it or its counter moved on")]
    LeaseLost {
        /// The lease key.
        lease_key: String,
    },
    /// A conditional write's condition did not hold (for operations other than an owner's update,
    /// such as creating a lease that already exists).
    #[error("conditional update of lease {lease_key:?} failed: {reason}")]
    ConditionFailed {
        /// The lease key.
        lease_key: String,
        /// Which condition failed.
        reason: &'static str,
    },
    /// No lease with this key.
    #[error("lease {lease_key:?} not found")]
    NotFound {
        /// The lease key.
        lease_key: String,
    },
    /// The store itself failed (I/O, network, service).
    #[error("lease store failed during {operation}: {source}")]
    Store {
        /// The operation.
        operation: &'static str,
        /// Whether trying again may help.
        retryable: bool,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

impl LeaseError {
    /// Whether the operation may succeed if tried again: only a store failure marked so (a
    /// lost lease or a failed condition will not change by retrying).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Store {
                retryable: true,
                ..
            }
        )
    }
}

/// A payload could not be decoded into the stream's record type.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot decode record as {format}: {message}")]
pub struct DecodeError {
    /// The format (`json`, `bincode`, ...).
    pub format: &'static str,
    /// What the decoder said.
    pub message: String,
}

/// A user function returned an error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("user function {operator} failed: {message}")]
pub struct UserError {
    /// The operator's name.
    pub operator: &'static str,
    /// The error's text.
    pub message: String,
}

/// A topology that cannot run as declared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The topology takes snapshots of keyed state and an operator cannot save its state.
    #[error(
        "topology {topology:?} takes snapshots (state(Snapshot)) but operator {operator:?} cannot \
         save its state (KeyedOperator::SNAPSHOTS is false): implement save and restore, or use \
         state(Replay)"
    )]
    NoSnapshots {
        /// The topology.
        topology: String,
        /// The operator.
        operator: String,
    },
    /// Two operators were given one name with `.name(..)`.
    #[error(
        "topology {topology:?} names two operators {name:?}: give each its own name (names \
         label metrics and logs)"
    )]
    NameTwice {
        /// The topology.
        topology: String,
        /// The name given twice.
        name: String,
    },
    /// One operator named twice (`.name(..)` on two clones of its stream).
    #[error(
        "topology {topology:?} names one operator twice, {first:?} and {second:?}: name it once"
    )]
    NamedTwice {
        /// The topology.
        topology: String,
        /// The first name.
        first: String,
        /// The second name.
        second: String,
    },
    /// `.name(..)` right after the source, or after a stream that is no operator's output.
    #[error(
        "topology {topology:?}: .name({name:?}) follows no operator; put it right after the \
         operator it names (map, filter, aggregate, ...)"
    )]
    NameWithoutOperator {
        /// The topology.
        topology: String,
        /// The name.
        name: String,
    },
    /// The topology has no sink, so it would compute nothing anyone can see.
    #[error("topology {topology:?} has no sink: add .sink(...) to at least one branch")]
    NoSink {
        /// The topology name.
        topology: String,
    },
    /// The topology name cannot name output files, lease tables or metrics.
    #[error(
        "topology name {name:?} is invalid: use 1 to 100 characters from a-z, A-Z, 0-9, '-', '_' and '.'"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// A sink that gathers record outputs into units across commits takes records after
    /// `key_by`, where several keyed workers write one shard's records.
    #[error(
        "sink {sink:?} of topology {topology:?} gathers record outputs into units across commits, \
         which after key_by several keyed workers would cut differently in every run: archive \
         records before key_by, or send late records to a sink that stores each output on its own"
    )]
    HoldingSinkAfterKeyBy {
        /// The topology name.
        topology: String,
        /// The sink's name.
        sink: String,
    },
    /// Two sinks that gather record outputs into units (the dead-letter sink among them) share
    /// a name: a shard's checkpoint keeps each one's position by name.
    #[error(
        "two sinks of topology {topology:?} that gather record outputs into units are named \
         {sink:?}: each resumes after its own last stored unit, kept by name in the checkpoint; \
         give them names of their own"
    )]
    HoldingSinkNamedTwice {
        /// The topology name.
        topology: String,
        /// The shared name.
        sink: String,
    },
    /// More fanning-out operators (`flat_map`s) on one path than output identities can number.
    #[error(
        "topology {topology:?} chains {depth} flat_maps on one path; at most {max} fit in output identities"
    )]
    FanOutTooDeep {
        /// The topology name.
        topology: String,
        /// The deepest chain.
        depth: usize,
        /// The most allowed.
        max: usize,
    },
    /// A configuration value is out of range.
    #[error("invalid value for {field}: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is allowed.
        reason: String,
    },
}

/// Why a shard's pipeline stopped without finishing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardStopped {
    /// The dead-letter policy is `StopShard` and a record was bad.
    #[error("shard {shard} stopped at record {position}: {reason}")]
    BadRecord {
        /// The shard.
        shard: ShardId,
        /// The record's position; the checkpoint stays before it.
        position: RecordPosition,
        /// What was wrong.
        reason: String,
    },
    /// A keyed path could not go on with the shard, and no input record stands behind what
    /// failed: a sink refused a keyed result (`Sink::check`) and the dead-letter policy has
    /// no sink that takes its keyed dead letter, or a keyed operator panicked outside any
    /// record (closing a window, emitting running results). The shard stops with its
    /// checkpoint before the epoch that failed; the other shards go on.
    #[error("shard {shard} stopped on a keyed path: {reason}")]
    KeyedPath {
        /// The shard.
        shard: ShardId,
        /// What failed: kinds and sizes, never values.
        reason: String,
    },
    /// The lease was lost; another worker continues from the last checkpoint.
    #[error(transparent)]
    LeaseLost(#[from] LeaseError),
}

impl ShardStopped {
    /// The shard a policy stop holds (its lease stays with the worker), if it is one.
    pub fn held_shard(&self) -> Option<&ShardId> {
        match self {
            Self::BadRecord { shard, .. } | Self::KeyedPath { shard, .. } => Some(shard),
            Self::LeaseLost(_) => None,
        }
    }
}

/// The umbrella error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// See [`SourceError`].
    #[error(transparent)]
    Source(#[from] SourceError),
    /// See [`SinkError`].
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// See [`LeaseError`].
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// See [`BuildError`].
    #[error(transparent)]
    Build(#[from] BuildError),
    /// See [`ShardStopped`].
    #[error(transparent)]
    ShardStopped(#[from] ShardStopped),
    /// A task of the runtime panicked or was cancelled unexpectedly.
    #[error("runtime task failed: {0}")]
    Task(String),
}

impl Error {
    /// Whether the operation may succeed if tried again (a throttled or unavailable service).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Source(e) => e.is_retryable(),
            Self::Sink(e) => e.retryable,
            Self::Lease(e) => e.is_retryable(),
            Self::Build(_) | Self::ShardStopped(_) | Self::Task(_) => false,
        }
    }
}

/// Shorthand for results with the umbrella error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Keyed operators: the `KeyedOperator` primitive that windows and reductions implement, the
//! records they receive and the output they emit into.

use crate::operator::context::{Ident, Mode, RecordCx};
use crate::operator::emit::Emit;
use crate::position::EventTime;
use crate::protocol::checkpoint::Epoch;

/// A record after `key_by`, on its way to the keyed worker that owns its key.
#[derive(Clone, Debug)]
pub struct KeyedRecord<K, T> {
    /// The key.
    pub key: K,
    /// The value.
    pub value: T,
    /// The event time.
    pub event_time: EventTime,
    /// The shard's watermark when the record arrived.
    pub watermark: EventTime,
    index: u32,
    fanout: u64,
}

impl<K, T> KeyedRecord<K, T> {
    /// A keyed record of the input record at `index` of its epoch (output `fanout` of it).
    pub(crate) fn of_input(key: K, value: T, cx: &RecordCx, index: u32, fanout: u64) -> Self {
        Self {
            key,
            value,
            event_time: cx.event_time,
            watermark: cx.watermark,
            index,
            fanout,
        }
    }

    /// The index of its input record in its epoch's batch.
    pub(crate) fn input_index(&self) -> u32 {
        self.index
    }

    /// A record of input record 0 of its epoch (for tests; the exchange makes real ones).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn new(key: K, value: T, event_time: EventTime, watermark: EventTime) -> Self {
        Self {
            key,
            value,
            event_time,
            watermark,
            index: 0,
            fanout: 0,
        }
    }

    /// The record's context (for a late record sent to a side output, whose identity is the
    /// input record's).
    pub fn cx(&self) -> RecordCx {
        RecordCx {
            event_time: self.event_time,
            watermark: self.watermark,
            ident: Ident::Record {
                index: self.index,
                fanout: self.fanout,
            },
        }
    }
}

/// Where a keyed operator sends results and late records.
pub struct KeyedOutput<'a, In, Out> {
    main: &'a mut dyn Emit<Out>,
    late: &'a mut dyn Emit<In>,
    late_count: u64,
    emitted: u64,
}

impl<'a, In, Out> KeyedOutput<'a, In, Out> {
    pub(crate) fn new(main: &'a mut dyn Emit<Out>, late: &'a mut dyn Emit<In>) -> Self {
        Self {
            main,
            late,
            late_count: 0,
            emitted: 0,
        }
    }

    /// Emits a result.
    pub fn emit(&mut self, cx: &RecordCx, value: Out) {
        self.emitted += 1;
        self.main.emit(cx, value);
    }

    /// Routes a record that arrived after its window closed to the late side output.
    pub fn late<K>(&mut self, record: KeyedRecord<K, In>) {
        self.late_count += 1;
        let cx = record.cx();
        self.late.emit(&cx, record.value);
    }

    /// Results emitted so far.
    pub(crate) fn emitted(&self) -> u64 {
        self.emitted
    }

    /// Late records routed so far.
    pub(crate) fn late_count(&self) -> u64 {
        self.late_count
    }
}

/// A stateful operator on keyed records, with state per source shard.
///
/// The runtime calls `on_record` for each record of an epoch, then `on_watermark` with the
/// shard's watermark after the epoch (never during a replay), and reports `hold` to the
/// checkpoint tracker: the oldest epoch whose records the state still needs.
pub trait KeyedOperator: Send + 'static {
    /// The key type.
    type Key: Send + 'static;
    /// The input value type.
    type In: Send + 'static;
    /// The output type.
    type Out: Send + 'static;
    /// Everything the operator keeps for one source shard.
    type State: Default + Send + 'static;

    /// Handles one record of `epoch`.
    fn on_record(
        &mut self,
        state: &mut Self::State,
        record: KeyedRecord<Self::Key, Self::In>,
        epoch: Epoch,
        mode: Mode,
        out: &mut KeyedOutput<'_, Self::In, Self::Out>,
    );

    /// The shard's watermark advanced: fire and close what it completes.
    fn on_watermark(
        &mut self,
        state: &mut Self::State,
        watermark: EventTime,
        out: &mut KeyedOutput<'_, Self::In, Self::Out>,
    );

    /// A bounded run reached the end of its input: emit what open state holds, keep the state.
    fn on_end_of_input(
        &mut self,
        _state: &mut Self::State,
        _out: &mut KeyedOutput<'_, Self::In, Self::Out>,
    ) {
    }

    /// The worker is about to commit its sinks, after one or more epochs of this shard (also
    /// before a closed shard's state is dropped). Operators that emit running results emit
    /// them here, so that many epochs' updates of a key become one output per commit.
    fn on_commit(
        &mut self,
        _state: &mut Self::State,
        _out: &mut KeyedOutput<'_, Self::In, Self::Out>,
    ) {
    }

    /// The oldest epoch the state holds records of, if any.
    fn hold(&self, state: &Self::State) -> Option<Epoch>;

    /// Whether [`save`](Self::save) and [`restore`](Self::restore) are implemented: a topology
    /// whose state policy takes snapshots refuses to build with an operator that cannot.
    const SNAPSHOTS: bool = false;

    /// Serializes `state` (this worker's keys of one shard) for a snapshot, as of the epoch
    /// just committed. Nothing that depends on the number of workers may go in: a restart at
    /// another parallelism merges every worker's part.
    ///
    /// # Errors
    /// If the state cannot be serialized (a message naming the operator's kind, never a value).
    fn save(&self, _state: &Self::State) -> Result<SavedState, String> {
        Err("this operator keeps no snapshots".to_owned())
    }

    /// Merges the keys of snapshot part `part` that `owns` says are this worker's into
    /// `state`, which then holds them as of epoch `held_from` (the first epoch of the life
    /// that restores them). Returns the number of keys taken.
    ///
    /// # Errors
    /// If the part cannot be read (corrupt, or written by an incompatible operator).
    fn restore(
        &self,
        _state: &mut Self::State,
        _part: &[u8],
        _owns: &dyn Fn(&Self::Key) -> bool,
        _held_from: Epoch,
    ) -> Result<u64, String> {
        Err("this operator keeps no snapshots".to_owned())
    }
}

/// One keyed worker's serialized state of one shard, for a snapshot part.
#[derive(Clone, Debug, Default)]
pub struct SavedState {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Keys they hold.
    pub keys: u64,
}

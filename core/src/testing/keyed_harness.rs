//! Drives a `KeyedOperator` the way a keyed worker does, for operator unit tests.

use async_trait::async_trait;

use crate::error::Error;
use crate::operator::SavedState;
use crate::operator::{
    Emit, EpochCx, KeyedOperator, KeyedOutput, KeyedRecord, Mode, RecordCx, NO_WATERMARK,
};
use crate::position::EventTime;
use crate::protocol::checkpoint::Epoch;

struct Collect<T>(Vec<(RecordCx, T)>);

#[async_trait]
impl<T: Send + 'static> Emit<T> for Collect<T> {
    fn emit(&mut self, cx: &RecordCx, value: T) {
        self.0.push((cx.clone(), value));
    }
    async fn flush(&mut self, _epoch: &EpochCx) -> Result<(), Error> {
        Ok(())
    }
    async fn commit(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn discard(&mut self) {
        self.0.clear();
    }
}

/// One shard's records through one operator: records carry the watermark at their arrival
/// (largest event time so far minus `out_of_orderness`), and ending an epoch advances the
/// operator's watermark, as the runtime does.
pub struct KeyedHarness<Op: KeyedOperator> {
    op: Op,
    state: Op::State,
    main: Collect<Op::Out>,
    late: Collect<Op::In>,
    max_event_time: Option<EventTime>,
    out_of_orderness: i64,
    epoch: Epoch,
    /// Outputs and late records before the current replay.
    replay_from: (usize, usize),
}

impl<Op: KeyedOperator> KeyedHarness<Op> {
    /// A harness at epoch 1 with no records seen.
    pub fn new(op: Op, out_of_orderness: i64) -> Self {
        Self {
            op,
            state: Op::State::default(),
            main: Collect(Vec::new()),
            late: Collect(Vec::new()),
            max_event_time: None,
            out_of_orderness,
            epoch: 1,
            replay_from: (0, 0),
        }
    }

    /// The state saved as a snapshot part (`KeyedOperator::save`).
    ///
    /// # Panics
    /// If the operator cannot save its state.
    pub fn save(&self) -> SavedState {
        self.op
            .save(&self.state)
            .expect("the operator saves its state")
    }

    /// A harness for the shard `from` runs, restored as a worker that owns the keys `owns`
    /// accepts would restore it from snapshot `parts` (every worker's), at `from`'s watermark
    /// and next epoch; nothing emitted yet.
    ///
    /// # Panics
    /// If a part cannot be read.
    pub fn restored(
        op: Op,
        from: &Self,
        parts: &[Vec<u8>],
        owns: impl Fn(&Op::Key) -> bool,
    ) -> Self {
        let mut state = Op::State::default();
        for part in parts {
            op.restore(&mut state, part, &owns, from.epoch)
                .expect("the part reads back");
        }
        Self {
            op,
            state,
            main: Collect(Vec::new()),
            late: Collect(Vec::new()),
            max_event_time: from.max_event_time,
            out_of_orderness: from.out_of_orderness,
            epoch: from.epoch,
            replay_from: (0, 0),
        }
    }

    /// The shard's watermark now.
    pub fn watermark(&self) -> EventTime {
        self.max_event_time
            .map_or(NO_WATERMARK, |m| m - self.out_of_orderness)
    }

    fn feed(&mut self, key: Op::Key, value: Op::In, event_time: EventTime, mode: Mode) {
        let record = KeyedRecord::new(key, value, event_time, self.watermark());
        self.max_event_time = Some(
            self.max_event_time
                .map_or(event_time, |m| m.max(event_time)),
        );
        let mut out = KeyedOutput::new(&mut self.main, &mut self.late);
        self.op
            .on_record(&mut self.state, record, self.epoch, mode, &mut out);
    }

    /// A record of the shard went to another keyed worker: the shard's watermark moves as it
    /// does for every worker (the runtime stamps each record with the shard's watermark).
    pub fn saw(&mut self, event_time: EventTime) {
        self.max_event_time = Some(
            self.max_event_time
                .map_or(event_time, |m| m.max(event_time)),
        );
    }

    /// A live record of the current epoch.
    pub fn record(&mut self, key: Op::Key, value: Op::In, event_time: EventTime) {
        self.feed(key, value, event_time, Mode::Live);
    }

    /// A replayed record (its outputs were committed by an earlier run).
    pub fn replay(&mut self, key: Op::Key, value: Op::In, event_time: EventTime) {
        self.feed(key, value, event_time, Mode::Rebuild);
    }

    /// Marks where a replay begins: what is emitted from here to the end of the replay epoch
    /// is dropped.
    pub fn begin_replay(&mut self) {
        self.replay_from = (self.main.0.len(), self.late.0.len());
    }

    /// Ends the epoch: the operator sees the watermark, and the next epoch begins.
    pub fn end_epoch(&mut self) {
        if self.max_event_time.is_some() {
            let watermark = self.watermark();
            let mut out = KeyedOutput::new(&mut self.main, &mut self.late);
            self.op.on_watermark(&mut self.state, watermark, &mut out);
        }
        self.epoch += 1;
    }

    /// Ends a replay epoch as the runtime does: the operator sees the watermark like after a
    /// live epoch, and what it emitted since the replay began is dropped (the run that first
    /// read the records committed it).
    pub fn end_replay_epoch(&mut self) {
        if self.max_event_time.is_some() {
            let watermark = self.watermark();
            let mut out = KeyedOutput::new(&mut self.main, &mut self.late);
            self.op.on_watermark(&mut self.state, watermark, &mut out);
        }
        self.main.0.truncate(self.replay_from.0);
        self.late.0.truncate(self.replay_from.1);
        self.epoch += 1;
    }

    /// The worker commits: operators with running results emit them.
    pub fn commit(&mut self) {
        let mut out = KeyedOutput::new(&mut self.main, &mut self.late);
        self.op.on_commit(&mut self.state, &mut out);
    }

    /// A bounded run reached its end.
    pub fn end_of_input(&mut self) {
        let mut out = KeyedOutput::new(&mut self.main, &mut self.late);
        self.op.on_end_of_input(&mut self.state, &mut out);
    }

    /// The shard closed: every window closes.
    pub fn shard_end(&mut self) {
        let mut out = KeyedOutput::new(&mut self.main, &mut self.late);
        self.op
            .on_watermark(&mut self.state, EventTime::MAX, &mut out);
    }

    /// The oldest epoch the state holds.
    pub fn hold(&self) -> Option<Epoch> {
        self.op.hold(&self.state)
    }

    /// The outputs emitted since the last call, with their contexts.
    pub fn take_outputs(&mut self) -> Vec<(RecordCx, Op::Out)> {
        std::mem::take(&mut self.main.0)
    }

    /// The late records routed to the side output since the last call.
    pub fn take_late(&mut self) -> Vec<Op::In> {
        std::mem::take(&mut self.late.0)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }
}

//! The fused push chain a batch flows through: fan-out, the end of an unconsumed branch, and
//! stateless operator nodes with their per-operator record counts.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::operator::{Collector, Emit, EpochCx, Fan, RecordCx, Refused, ReportFailure, Stateless};
use crate::position::ShardId;
use crate::sink::Held;
use crate::topology::InstanceCx;

/// Fans a value out to several consumers (a stream handle used more than once).
pub(crate) struct Tee<T> {
    pub(crate) outs: Vec<Box<dyn Emit<T>>>,
}

#[async_trait]
impl<T: Clone + Send + 'static> Emit<T> for Tee<T> {
    fn emit(&mut self, cx: &RecordCx, value: T) {
        if let Some((last, rest)) = self.outs.split_last_mut() {
            for out in rest {
                out.emit(cx, value.clone());
            }
            last.emit(cx, value);
        }
    }
    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        for out in &mut self.outs {
            out.flush(epoch).await?;
        }
        Ok(())
    }
    async fn commit(&mut self) -> Result<(), Error> {
        for out in &mut self.outs {
            out.commit().await?;
        }
        Ok(())
    }
    fn discard(&mut self) {
        self.outs.iter_mut().for_each(|o| o.discard());
    }
    fn held(&self, out: &mut Vec<(String, ShardId, Held)>) {
        self.outs.iter().for_each(|o| o.held(out));
    }
    fn resume(&mut self) {
        self.outs.iter_mut().for_each(|o| o.resume());
    }
    fn take_refused(&mut self, out: &mut Vec<Refused>) {
        self.outs.iter_mut().for_each(|o| o.take_refused(out));
    }
}

/// The end of a branch nobody consumes.
pub(crate) struct Discard;

#[async_trait]
impl<T: Send + 'static> Emit<T> for Discard {
    fn emit(&mut self, _cx: &RecordCx, _value: T) {}
    async fn flush(&mut self, _epoch: &EpochCx) -> Result<(), Error> {
        Ok(())
    }
    async fn commit(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn discard(&mut self) {}
}

pub(crate) struct StatelessNode<O, U> {
    pub(crate) op: O,
    pub(crate) fan: Fan,
    pub(crate) down: Box<dyn Emit<U>>,
    pub(crate) failures: Option<Arc<dyn ReportFailure>>,
    pub(crate) counts: OperatorCounts,
}

/// Records into and out of one operator instance, counted per record and handed to the
/// metrics once per epoch.
pub(crate) struct OperatorCounts {
    pub(crate) label: Arc<str>,
    topology: String,
    metrics: Metrics,
    pub(crate) records_in: u64,
    pub(crate) records_out: u64,
}

impl OperatorCounts {
    pub(crate) fn new(label: Arc<str>, cx: &InstanceCx) -> Self {
        Self {
            label,
            topology: cx.topology.clone(),
            metrics: cx.metrics.clone(),
            records_in: 0,
            records_out: 0,
        }
    }

    /// Adds an epoch's counts to the metrics of `shard`.
    pub(crate) fn report(&mut self, shard: &ShardId) {
        let io = (
            std::mem::take(&mut self.records_in),
            std::mem::take(&mut self.records_out),
        );
        self.metrics
            .operator(&self.topology, shard.as_str(), &self.label, io);
    }

    /// Forgets counts of records that will be processed again.
    pub(crate) fn discard(&mut self) {
        self.records_in = 0;
        self.records_out = 0;
    }
}

#[async_trait]
impl<T, U, O> Emit<T> for StatelessNode<O, U>
where
    T: Send + 'static,
    U: Send + 'static,
    O: Stateless<T, U>,
{
    fn emit(&mut self, cx: &RecordCx, value: T) {
        self.counts.records_in += 1;
        let failures = self.failures.as_deref();
        // Set while the collector's own code runs (its rules, the operators downstream): a
        // panic there is not this operator's user function failing.
        let mut in_collector = false;
        let applied = super::user_code::call(|| {
            let mut out = Collector::new(
                &mut *self.down,
                failures,
                &mut self.counts.records_out,
                self.fan,
                &mut in_collector,
            );
            self.op.apply(cx, value, &mut out);
        });
        if let Err(panic) = applied {
            match failures {
                // Before `key_by` the record goes to the dead-letter policy.
                Some(failures) if !in_collector => {
                    failures.fail(
                        cx,
                        &self.counts.label,
                        super::user_code::Panic::REASON,
                        0,
                        false,
                    );
                }
                // After it (keyed results have no input record), or a panic downstream or of
                // a rule: as it was.
                _ => panic.resume(),
            }
        }
    }
    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        // A replay only rebuilds state: its records were counted by the run that read them.
        if epoch.replay() {
            self.counts.discard();
        } else {
            self.counts.report(&epoch.shard);
        }
        self.down.flush(epoch).await
    }
    async fn commit(&mut self) -> Result<(), Error> {
        self.down.commit().await
    }
    fn discard(&mut self) {
        self.counts.discard();
        self.down.discard();
    }
    fn held(&self, out: &mut Vec<(String, ShardId, Held)>) {
        self.down.held(out);
    }
    fn resume(&mut self) {
        self.down.resume();
    }
    fn take_refused(&mut self, out: &mut Vec<Refused>) {
        self.down.take_refused(out);
    }
}

/// Capacity for the buffer that replaces one handed on with `len` items: the next epoch likely
/// holds about as many, and a little headroom saves regrowing (and copying) the whole buffer
/// when it holds a few more.
pub(crate) fn next_capacity(len: usize) -> usize {
    len + len / 4
}

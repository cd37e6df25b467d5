//! Stateless operators: the `Stateless` trait, the `Collector` they emit into, and how they
//! report a failing user function.

use std::time::Duration;

use crate::exec::user_code::break_rule;
use crate::operator::context::RecordCx;
use crate::operator::emit::Emit;

/// What the failure handler decided about a failed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureAction {
    /// Call the function again after this wait.
    RetryAfter(Duration),
    /// The record was dead-lettered or the shard will stop; go on with the next record.
    Handled,
}

/// Where a failing user function is reported: the shard's dead-letter policy, which the
/// executor applies (`exec::failures`).
pub(crate) trait ReportFailure: Send + Sync {
    /// The record behind `cx` failed in `stage` on its `attempt`-th try (from 0); `retryable`
    /// is false where trying again would fail the same way (decoding).
    fn fail(
        &self,
        cx: &RecordCx,
        stage: &str,
        error: &str,
        attempt: u32,
        retryable: bool,
    ) -> FailureAction;

    /// The record behind `cx` is one a keyed operator (`stage`) panicked on in this run
    /// (`protocol::failure::on_quarantined`): it goes to the dead-letter sink, or stops the
    /// shard, in a replay too.
    fn quarantined(&self, cx: &RecordCx, stage: &str, error: &str);

    /// An operator parked a value to call its function again at `until`: the shard task
    /// stops pushing records, waits on the runtime's clock (never blocking a thread) and then
    /// resumes the chain (`Emit::resume`).
    fn park(&self, until: tokio::time::Instant);

    /// Whether an operator parked a value since the shard task last took the wait.
    fn parked(&self) -> bool;
}

/// How many outputs an operator makes of one input, and so how their identities derive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fan {
    /// At most one: the output keeps the input's identity (map, filter, try_map).
    One,
    /// Any number: the n-th output's identity adds `n` in `bits` bits (flat_map; see
    /// [`RecordCx::nth_output`]).
    Numbered {
        /// Bits per level of fan-out in this topology.
        bits: u32,
    },
}

/// Where a stateless operator sends its results, and how it reports failures. A collector
/// serves one input value.
pub struct Collector<'a, U> {
    down: &'a mut dyn Emit<U>,
    failures: Option<&'a dyn ReportFailure>,
    emitted: &'a mut u64,
    fan: Fan,
    /// Outputs of this input so far.
    outputs: u64,
    /// Set while `emit` runs, cleared when it returns: a panic that leaves it set came from
    /// the collector's rules or the operators downstream, not from the user function.
    in_collector: &'a mut bool,
}

impl<'a, U> Collector<'a, U> {
    pub(crate) fn new(
        down: &'a mut dyn Emit<U>,
        failures: Option<&'a dyn ReportFailure>,
        emitted: &'a mut u64,
        fan: Fan,
        in_collector: &'a mut bool,
    ) -> Self {
        Self {
            down,
            failures,
            emitted,
            fan,
            outputs: 0,
            in_collector,
        }
    }

    /// Emits a result. An operator declared with [`Stream::stateless_fan_out`] gives each
    /// output of an input its own identity; one declared with [`Stream::stateless`] emits at
    /// most one output per input.
    ///
    /// # Panics
    /// If an operator declared with `Stream::stateless` emits a second output for one input
    /// (its outputs would share one identity and overwrite each other in every sink), or if
    /// a fanning-out operator after `key_by` emits more outputs of one result than its
    /// identities can number (2^(64 / the deepest chain of `flat_map`s)); before `key_by` the
    /// input record goes to the dead-letter policy instead.
    ///
    /// [`Stream::stateless`]: crate::topology::Stream::stateless
    /// [`Stream::stateless_fan_out`]: crate::topology::Stream::stateless_fan_out
    pub fn emit(&mut self, cx: &RecordCx, value: U) {
        *self.in_collector = true;
        self.emit_inner(cx, value);
        *self.in_collector = false;
    }

    fn emit_inner(&mut self, cx: &RecordCx, value: U) {
        let n = self.outputs;
        self.outputs += 1;
        match self.fan {
            Fan::One => {
                if n != 0 {
                    break_rule(format_args!(
                        "a stateless operator emitted a second output for one input: declare \
                         it with Stream::stateless_fan_out so that its outputs get identities \
                         of their own"
                    ));
                }
                *self.emitted += 1;
                self.down.emit(cx, value);
            }
            Fan::Numbered { bits } => match cx.nth_output(n, bits) {
                Some(output) => {
                    *self.emitted += 1;
                    self.down.emit(&output, value);
                }
                None => {
                    let error = format!(
                        "more than 2^{bits} outputs of one input: the topology's chain of \
                         flat_maps leaves {bits} bits per level to number them"
                    );
                    match self.failures {
                        Some(failures) => {
                            if n == 1 << bits {
                                failures.fail(cx, "flat_map", &error, 0, false);
                            }
                        }
                        None => break_rule(format_args!("{error}")),
                    }
                }
            },
        }
    }

    /// Reports that the user function `stage` failed on the record behind `cx`, for good: the
    /// record goes to the dead-letter policy (a dead-letter sink, or the shard stops). A
    /// function worth calling again declares itself with `Stream::try_stateless` (`try_map`),
    /// whose retries wait on the runtime's clock.
    ///
    /// # Panics
    /// After `key_by`, where failures have no input record; the stream types prevent it.
    pub fn fail(&mut self, cx: &RecordCx, stage: &str, error: &str) {
        *self.in_collector = true;
        let Some(failures) = self.failures else {
            break_rule(format_args!(
                "Collector::fail after key_by, where no input record stands behind a value"
            ))
        };
        failures.fail(cx, stage, error, 0, false);
        *self.in_collector = false;
    }
}

/// A stateless operator: map, filter, flat_map and their fallible forms are thin layers on it.
pub trait Stateless<T, U>: Send + 'static {
    /// Handles one value.
    fn apply(&mut self, cx: &RecordCx, value: T, out: &mut Collector<'_, U>);
}

impl<T, U, F> Stateless<T, U> for F
where
    F: FnMut(&RecordCx, T, &mut Collector<'_, U>) + Send + 'static,
{
    fn apply(&mut self, cx: &RecordCx, value: T, out: &mut Collector<'_, U>) {
        self(cx, value, out);
    }
}

//! Stateless operators: the `Stateless` trait, the `Collector` they emit into, and how they
//! report a failing user function.

use std::time::Duration;

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
}

/// Where a stateless operator sends its results, and how it reports failures.
pub struct Collector<'a, U> {
    down: &'a mut dyn Emit<U>,
    failures: Option<&'a dyn ReportFailure>,
    emitted: &'a mut u64,
}

impl<'a, U> Collector<'a, U> {
    pub(crate) fn new(
        down: &'a mut dyn Emit<U>,
        failures: Option<&'a dyn ReportFailure>,
        emitted: &'a mut u64,
    ) -> Self {
        Self {
            down,
            failures,
            emitted,
        }
    }

    /// Emits a result.
    pub fn emit(&mut self, cx: &RecordCx, value: U) {
        *self.emitted += 1;
        self.down.emit(cx, value);
    }

    /// Reports that the user function `stage` failed on the record behind `cx` (attempt from 0)
    /// and returns what to do: retry after a wait, or go on (dead-lettered or stopping).
    ///
    /// # Panics
    /// After `key_by`, where failures have no input record; the stream types prevent it.
    pub fn fail(&mut self, cx: &RecordCx, stage: &str, error: &str, attempt: u32) -> FailureAction {
        self.failures
            .expect("fallible operators run only before key_by")
            .fail(cx, stage, error, attempt, true)
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

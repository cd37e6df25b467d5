//! The fallible stateless node behind `try_map`: a user function that may fail on a value.
//! A failure goes to the shard's dead-letter policy; when the policy retries, the node parks
//! the value (with the values after it, so that order holds) and the shard task waits on the
//! runtime's clock before it resumes the chain: no thread ever sleeps.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::Error;
use crate::operator::{Emit, EpochCx, FailureAction, RecordCx, ReportFailure};
use crate::position::ShardId;
use crate::sink::Held;

use super::chain::OperatorCounts;

/// A value waiting for its function to be called again, and the values behind it.
struct Parked<T> {
    cx: RecordCx,
    value: T,
    /// Failed attempts so far.
    attempt: u32,
    /// When to call the function again.
    due: Instant,
}

pub(crate) struct FallibleNode<F, T, U> {
    f: F,
    stage: &'static str,
    down: Box<dyn Emit<U>>,
    failures: Arc<dyn ReportFailure>,
    counts: OperatorCounts,
    /// Values waiting, oldest first: the front one for its retry, the others behind it.
    parked: VecDeque<Parked<T>>,
}

impl<F, T, U> FallibleNode<F, T, U>
where
    F: FnMut(&T) -> Result<U, String> + Send + 'static,
    T: Send + 'static,
    U: Send + 'static,
{
    pub(crate) fn new(
        f: F,
        stage: &'static str,
        down: Box<dyn Emit<U>>,
        failures: Arc<dyn ReportFailure>,
        counts: OperatorCounts,
    ) -> Self {
        Self {
            f,
            stage,
            down,
            failures,
            counts,
            parked: VecDeque::new(),
        }
    }

    /// Calls the function on `value` for the `attempt`-th time: its output goes on, or the
    /// value comes back to be parked until the policy's wait is over.
    fn call(&mut self, cx: RecordCx, value: T, attempt: u32) -> Option<Parked<T>> {
        let called = super::user_code::call(|| (self.f)(&value));
        let (error, retryable) = match called {
            Ok(Ok(out)) => {
                self.counts.records_out += 1;
                self.down.emit(&cx, out);
                return None;
            }
            Ok(Err(error)) => (error, true),
            // A panic is not worth another call: it is a bug, not a flaky dependency.
            Err(_) => (super::user_code::Panic::REASON.to_owned(), false),
        };
        match self
            .failures
            .fail(&cx, self.stage, &error, attempt, retryable)
        {
            FailureAction::RetryAfter(wait) => {
                let due = Instant::now() + wait;
                self.failures.park(due);
                Some(Parked {
                    cx,
                    value,
                    attempt: attempt + 1,
                    due,
                })
            }
            FailureAction::Handled => None,
        }
    }
}

#[async_trait]
impl<F, T, U> Emit<T> for FallibleNode<F, T, U>
where
    F: FnMut(&T) -> Result<U, String> + Send + 'static,
    T: Send + 'static,
    U: Send + 'static,
{
    fn emit(&mut self, cx: &RecordCx, value: T) {
        self.counts.records_in += 1;
        if !self.parked.is_empty() {
            // Behind a parked value: order holds.
            self.parked.push_back(Parked {
                cx: cx.clone(),
                value,
                attempt: 0,
                due: Instant::now(),
            });
            return;
        }
        if let Some(parked) = self.call(cx.clone(), value, 0) {
            self.parked.push_back(parked);
        }
    }

    fn resume(&mut self) {
        while let Some(front) = self.parked.front() {
            if front.due > Instant::now() {
                self.failures.park(front.due);
                break;
            }
            let Parked {
                cx, value, attempt, ..
            } = self.parked.pop_front().expect("front exists");
            if let Some(again) = self.call(cx, value, attempt) {
                self.parked.push_front(again);
                break;
            }
        }
        self.down.resume();
    }

    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        debug_assert!(self.parked.is_empty(), "an epoch ends with nothing parked");
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
        self.parked.clear();
        self.counts.discard();
        self.down.discard();
    }

    fn held(&self, out: &mut Vec<(String, ShardId, Held)>) {
        self.down.held(out);
    }
}

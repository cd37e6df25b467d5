//! The failure handler behind a shard's dead-letter policy: gathers the dead letters and the
//! stop request of the epoch being processed.

use std::sync::{Arc, Mutex};

use crate::dead_letter::{DeadLetter, DeadLetterRecord};
use crate::error::ShardStopped;
use crate::operator::{FailureAction, Ident, RecordCx, ReportFailure};
use crate::position::ShardId;
use crate::protocol::failure::{on_failure, on_quarantined, OnFailure};
use crate::record::RawBatch;

/// Applies a shard's dead-letter policy to failed records of the current epoch.
#[derive(Clone)]
pub(crate) struct Failures {
    inner: Arc<Mutex<FailureState>>,
}

struct FailureState {
    policy: DeadLetter,
    stream: String,
    shard: ShardId,
    raw: Arc<RawBatch>,
    replay: bool,
    dead: Vec<(u32, DeadLetterRecord)>,
    stop: Option<ShardStopped>,
    /// The earliest time an operator parked a value until, since the shard task last looked.
    parked: Option<tokio::time::Instant>,
}

impl Failures {
    pub(crate) fn new(policy: DeadLetter, stream: String, shard: ShardId) -> Self {
        let state = FailureState {
            policy,
            stream,
            shard,
            raw: Arc::default(),
            replay: false,
            dead: Vec::new(),
            stop: None,
            parked: None,
        };
        Self {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FailureState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn begin_epoch(&self, raw: &Arc<RawBatch>, replay: bool) {
        let mut state = self.lock();
        state.raw = Arc::clone(raw);
        state.replay = replay;
    }

    /// The earliest time an operator waits for before calling its function again, if one
    /// parked a value since the last call.
    pub(crate) fn take_parked(&self) -> Option<tokio::time::Instant> {
        self.lock().parked.take()
    }

    /// Takes the dead letters and the stop request of the epoch.
    /// Dead letters come with the index of their record in the epoch's batch.
    pub(crate) fn end_epoch(&self) -> (Vec<(u32, DeadLetterRecord)>, Option<ShardStopped>) {
        let mut state = self.lock();
        state.raw = Arc::default();
        state.parked = None;
        let dead = std::mem::take(&mut state.dead);
        (dead, state.stop.take())
    }
}

impl ReportFailure for Failures {
    fn park(&self, until: tokio::time::Instant) {
        let mut state = self.lock();
        state.parked = Some(state.parked.map_or(until, |p| p.min(until)));
    }

    fn parked(&self) -> bool {
        self.lock().parked.is_some()
    }

    fn fail(
        &self,
        cx: &RecordCx,
        stage: &str,
        error: &str,
        attempt: u32,
        retryable: bool,
    ) -> FailureAction {
        let mut state = self.lock();
        let Ident::Record { index, .. } = cx.ident else {
            // Fallible operators exist only before `key_by` (the types see to it), where every
            // value still has its input record.
            unreachable!("a fallible operator ran on a keyed result");
        };
        let decision = on_failure(&state.policy, attempt, retryable, state.replay);
        Self::apply(&mut state, decision, index, stage, error)
    }

    fn quarantined(&self, cx: &RecordCx, stage: &str, error: &str) {
        let mut state = self.lock();
        let Ident::Record { index, .. } = cx.ident else {
            unreachable!("quarantined records are met before key_by");
        };
        let decision = on_quarantined(&state.policy);
        Self::apply(&mut state, decision, index, stage, error);
    }
}

impl Failures {
    /// Executes the policy's decision for the record at `index` of the epoch.
    fn apply(
        state: &mut FailureState,
        decision: OnFailure,
        index: u32,
        stage: &str,
        error: &str,
    ) -> FailureAction {
        let record = state.raw.get(index as usize);
        match decision {
            OnFailure::Retry(wait) => return FailureAction::RetryAfter(wait),
            OnFailure::Replayed => {}
            OnFailure::DeadLetter => {
                let letter = DeadLetterRecord::new(
                    state.stream.clone(),
                    state.shard.clone(),
                    record.position.clone(),
                    record.partition_key,
                    record.data,
                    stage.to_owned(),
                    error.to_owned(),
                );
                // One dead letter per input record, even if two branches fail on it.
                if !state.dead.iter().any(|(i, _)| *i == index) {
                    state.dead.push((index, letter));
                }
            }
            OnFailure::StopShard => {
                if state.stop.is_none() {
                    state.stop = Some(ShardStopped::BadRecord {
                        shard: state.shard.clone(),
                        position: record.position.clone(),
                        reason: format!("{stage}: {error}"),
                    });
                }
            }
        }
        FailureAction::Handled
    }
}

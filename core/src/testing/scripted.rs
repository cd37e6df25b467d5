//! `ScriptedSink`: wraps any sink and follows a script shared by all its writers: fail the
//! next writes or commits, delay or stall commits, and record the lease epochs it was given and
//! every call that could make a shard's outputs durable (for a checker's own evidence).
//! The one test double for sink faults (tests and the simulation checker).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::SinkError;
use crate::lease::LeaseEpoch;
use crate::position::ShardId;
use crate::sink::{Held, OutputBatch, Sink, SinkContext, SinkWriter};

#[derive(Debug, Default)]
struct Script {
    fail_writes: u32,
    fail_commits: u32,
    commit_delay: Duration,
    stall_until: Option<Instant>,
    injected: u64,
    epochs: BTreeMap<ShardId, Vec<LeaseEpoch>>,
    attempts: Vec<WriteAttempt>,
}

/// Calls the script keeps at most: a test that makes more has a runaway loop.
const MAX_ATTEMPTS: usize = 4_000_000;

/// One call of a writer that could make outputs of a shard durable, with the lease epoch the
/// outputs were written under: a write, a commit (one per shard life with outputs written since
/// the writer's last successful commit) or a shard's end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteAttempt {
    /// When the call was made (tokio's clock).
    pub at: Instant,
    /// The sink's name.
    pub sink: String,
    /// The call: `write`, `commit` or `end_shard`.
    pub call: &'static str,
    /// The shard.
    pub shard: ShardId,
    /// The epoch its outputs were written under.
    pub epoch: LeaseEpoch,
}

/// A sink that follows a script before handing on to the sink it wraps. Cloning shares the
/// script.
pub struct ScriptedSink<S> {
    inner: Arc<S>,
    script: Arc<Mutex<Script>>,
}

impl<S> Clone for ScriptedSink<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            script: Arc::clone(&self.script),
        }
    }
}

impl<S> ScriptedSink<S> {
    /// Wraps `inner`; the script starts empty (every call goes through).
    pub fn new(inner: S) -> Self {
        Self {
            inner: Arc::new(inner),
            script: Arc::default(),
        }
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next `n` writes fail with a retryable error.
    pub fn fail_writes(&self, n: u32) {
        self.lock().fail_writes = n;
    }

    /// The next `n` commits fail with a retryable error (nothing of them becomes durable).
    pub fn fail_commits(&self, n: u32) {
        self.lock().fail_commits = n;
    }

    /// Every commit takes this long (a slow sink).
    pub fn delay_commits(&self, delay: Duration) {
        self.lock().commit_delay = delay;
    }

    /// Commits wait until `until` (a sink that stalls).
    pub fn stall_until(&self, until: Instant) {
        self.lock().stall_until = Some(until);
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// The lease epochs written with, per shard, in order (each change once).
    pub fn lease_epochs(&self) -> BTreeMap<ShardId, Vec<LeaseEpoch>> {
        self.lock().epochs.clone()
    }

    /// Every call of its writers that could make outputs durable, in order.
    pub fn attempts(&self) -> Vec<WriteAttempt> {
        self.lock().attempts.clone()
    }
}

fn injected(sink: &str, operation: &'static str) -> SinkError {
    SinkError {
        sink: sink.to_owned(),
        operation,
        retryable: true,
        source: "failure injected by the test script".into(),
    }
}

struct ScriptedWriter<T> {
    name: String,
    inner: Box<dyn SinkWriter<T>>,
    script: Arc<Mutex<Script>>,
    /// Shard lives with outputs written since the last successful commit.
    pending: BTreeSet<(ShardId, LeaseEpoch)>,
}

impl<T> ScriptedWriter<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn attempted<'a>(
        &self,
        call: &'static str,
        lives: impl IntoIterator<Item = &'a (ShardId, LeaseEpoch)>,
    ) {
        let at = Instant::now();
        let mut script = self.lock();
        for (shard, epoch) in lives {
            assert!(
                script.attempts.len() < MAX_ATTEMPTS,
                "more than {MAX_ATTEMPTS} sink calls: a runaway loop"
            );
            script.attempts.push(WriteAttempt {
                at,
                sink: self.name.clone(),
                call,
                shard: shard.clone(),
                epoch: *epoch,
            });
        }
    }
}

#[async_trait]
impl<T: Send + 'static> SinkWriter<T> for ScriptedWriter<T> {
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        let life = (batch.shard.clone(), batch.lease_epoch);
        self.attempted("write", [&life]);
        self.pending.insert(life);
        {
            let mut script = self.lock();
            if script.fail_writes > 0 {
                script.fail_writes -= 1;
                script.injected += 1;
                return Err(injected(&self.name, "write"));
            }
            let epochs = script.epochs.entry(batch.shard.clone()).or_default();
            if epochs.last() != Some(&batch.lease_epoch) {
                epochs.push(batch.lease_epoch);
            }
        }
        self.inner.write(batch).await
    }

    async fn commit(&mut self) -> Result<(), SinkError> {
        // At the call: a commit that stalls inside the sink was still made when it was made.
        self.attempted("commit", &self.pending);
        let (delay, stall) = {
            let script = self.lock();
            (script.commit_delay, script.stall_until)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(until) = stall {
            tokio::time::sleep_until(until).await;
        }
        {
            let mut script = self.lock();
            if script.fail_commits > 0 {
                script.fail_commits -= 1;
                script.injected += 1;
                return Err(injected(&self.name, "commit"));
            }
        }
        self.inner.commit().await?;
        // A writer that still holds outputs of a life (a unit not yet sealed) may store them
        // at a later commit without a new write: that commit is a call for the life too.
        let held = self.inner.held();
        self.pending
            .retain(|(shard, _)| held.iter().any(|(s, h)| s == shard && h.buffered));
        Ok(())
    }

    fn held(&self) -> Vec<(ShardId, Held)> {
        self.inner.held()
    }

    async fn end_shard(&mut self, shard: &ShardId) -> Result<(), SinkError> {
        let lives: Vec<_> = self
            .pending
            .iter()
            .filter(|(s, _)| s == shard)
            .cloned()
            .collect();
        self.attempted("end_shard", &lives);
        self.inner.end_shard(shard).await
    }

    fn release_shard(&mut self, shard: &ShardId) {
        self.pending.retain(|(s, _)| s != shard);
        self.inner.release_shard(shard);
    }

    fn bytes_written(&self) -> u64 {
        self.inner.bytes_written()
    }
}

#[async_trait]
impl<T: Send + 'static, S: Sink<T>> Sink<T> for ScriptedSink<S> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        let inner = self.inner.open(cx).await?;
        Ok(Box::new(ScriptedWriter {
            name: self.inner.name().to_owned(),
            inner,
            script: Arc::clone(&self.script),
            pending: BTreeSet::new(),
        }))
    }

    fn check(&self, value: &T) -> Result<(), String> {
        self.inner.check(value)
    }

    fn size_of(&self, value: &T) -> Option<u64> {
        self.inner.size_of(value)
    }

    fn holds_record_outputs(&self) -> bool {
        self.inner.holds_record_outputs()
    }
}

//! A log of the decisions a runtime takes (leases taken, where shards resume, checkpoints
//! written, how shard tasks ended), for simulations that check that two runs of one seed
//! decide alike. Off unless a caller asks for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// Where a runtime records its decisions. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct DecisionLog {
    entries: Option<Arc<Mutex<Vec<String>>>>,
    start: Option<Instant>,
    /// The most epochs the checkpoint tracker kept for one shard at once.
    peak_tracked: Arc<AtomicUsize>,
    /// The worker whose decisions these are, where several share one log.
    worker: Option<Arc<str>>,
}

impl DecisionLog {
    /// A log that keeps every decision, stamped with the milliseconds since it was made.
    pub fn recording() -> Self {
        Self {
            entries: Some(Arc::default()),
            start: Some(Instant::now()),
            peak_tracked: Arc::default(),
            worker: None,
        }
    }

    /// The same log, each entry naming `worker` (for several workers sharing one log).
    pub fn of_worker(&self, worker: &str) -> Self {
        Self {
            worker: Some(worker.into()),
            ..self.clone()
        }
    }

    /// Whether decisions are kept.
    pub fn is_recording(&self) -> bool {
        self.entries.is_some()
    }

    /// Records one decision; `entry` is only called when recording.
    pub(crate) fn record(&self, entry: impl FnOnce() -> String) {
        if let (Some(entries), Some(start)) = (&self.entries, self.start) {
            let ms = start.elapsed().as_millis();
            let line = match &self.worker {
                Some(worker) => format!("{ms:>8} [{worker}] {}", entry()),
                None => format!("{ms:>8} {}", entry()),
            };
            entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
        }
    }

    /// Notes how many epochs the checkpoint tracker keeps for a shard now.
    pub(crate) fn observe_tracked_epochs(&self, n: usize) {
        if self.entries.is_some() {
            self.peak_tracked.fetch_max(n, Ordering::Relaxed);
        }
    }

    /// The most epochs the checkpoint tracker kept for one shard at once (when recording):
    /// its memory bound, checked by the simulation.
    pub fn peak_tracked_epochs(&self) -> usize {
        self.peak_tracked.load(Ordering::Relaxed)
    }

    /// Every decision recorded so far, oldest first.
    pub fn entries(&self) -> Vec<String> {
        self.entries.as_ref().map_or_else(Vec::new, |e| {
            e.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }
}

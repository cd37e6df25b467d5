//! Whether a worker can still reach its lease table (liveness): healthy while its last
//! successful lease round (a shard sync, or a renewal round without store errors) is within a
//! lease duration. A worker that cannot renew will lose its leases; a health check should say so
//! first. Readiness adds the shards the dead-letter policy stopped at a bad record: a restart
//! would stop at the same record, so they make a worker unready, never unhealthy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::ShardStopped;

/// Shared between the runtime (which reports) and a health endpoint (which asks). Cloning
/// shares it.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<State>,
}

#[derive(Debug)]
struct State {
    base: Instant,
    /// Milliseconds after `base` of the last successful lease round, plus one (0: never).
    last_ok_ms: AtomicU64,
    lease_duration_ms: AtomicU64,
    /// Each shard the dead-letter policy stopped whose lease this worker still holds, with
    /// what stopped it, in the order they stopped.
    stopped: Mutex<Vec<(String, String)>>,
    /// The stream a worker waits for, while it does not exist yet.
    waiting_for: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Unhealthy until the runtime's first successful lease round.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(State {
                base: Instant::now(),
                last_ok_ms: AtomicU64::new(0),
                lease_duration_ms: AtomicU64::new(10_000),
                stopped: Mutex::new(Vec::new()),
                waiting_for: Mutex::new(None),
            }),
        }
    }

    /// Whether the last successful lease round is within a lease duration.
    pub fn is_healthy(&self) -> bool {
        self.since_last_ok().is_some_and(|d| {
            d.as_millis() < u128::from(self.inner.lease_duration_ms.load(Ordering::Acquire))
        })
    }

    /// How long ago the last successful lease round was, if there was one.
    pub fn since_last_ok(&self) -> Option<Duration> {
        let last = self.inner.last_ok_ms.load(Ordering::Acquire);
        (last > 0).then(|| {
            let at = self.inner.base + Duration::from_millis(last - 1);
            Instant::now().saturating_duration_since(at)
        })
    }

    /// Healthy, no shard stopped at a bad record, and the stream exists.
    pub fn is_ready(&self) -> bool {
        self.is_healthy() && self.stopped_shards().is_empty() && self.waiting_for().is_none()
    }

    /// The stream this worker waits for, while it does not exist yet (a wrong name or
    /// region looks the same: readiness fails until it is listed).
    pub fn waiting_for(&self) -> Option<String> {
        self.inner
            .waiting_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_waiting_for(&self, stream: Option<&str>) {
        *self
            .inner
            .waiting_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stream.map(str::to_owned);
    }

    /// What stopped each shard the dead-letter policy stopped in this run (shard, record
    /// position and the stage that failed), in the order they stopped; a shard whose lease
    /// went to another worker since is that worker's to report.
    pub fn stopped_shards(&self) -> Vec<String> {
        self.inner
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(_, what)| what.clone())
            .collect()
    }

    /// Records a shard the dead-letter policy stopped, by its position and the stage that
    /// failed: never the error's text, which may quote the payload (a decode error quotes
    /// values); the worker's log has the whole reason.
    pub(crate) fn shard_stopped(&self, stop: &ShardStopped) {
        let (shard, what) = match stop {
            ShardStopped::BadRecord {
                shard,
                position,
                reason,
            } => {
                let stage = reason.split(": ").next().unwrap_or_default();
                (
                    shard.as_str().to_owned(),
                    format!(
                        "shard {shard} stopped at record {position} in {stage} (the reason is \
                         in the worker's log)"
                    ),
                )
            }
            ShardStopped::KeyedPath { shard, .. } => (
                shard.as_str().to_owned(),
                format!(
                    "shard {shard} stopped on a keyed path (the reason is in the worker's log)"
                ),
            ),
            other => (String::new(), format!("a shard stopped: {other}")),
        };
        self.inner
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((shard, what));
    }

    /// A stopped shard's lease went to another worker (lost, say after a pause): it reports the
    /// shard when it stops there too.
    pub(crate) fn stopped_shard_let_go(&self, shard: &str) {
        self.inner
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(s, _)| s != shard);
    }

    pub(crate) fn set_lease_duration(&self, lease_duration: Duration) {
        let ms = u64::try_from(lease_duration.as_millis()).unwrap_or(u64::MAX);
        self.inner.lease_duration_ms.store(ms, Ordering::Release);
    }

    pub(crate) fn lease_round_ok(&self) {
        let ms = Instant::now()
            .saturating_duration_since(self.inner.base)
            .as_millis();
        let ms = u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1;
        self.inner.last_ok_ms.fetch_max(ms, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn healthy_only_within_a_lease_duration_of_the_last_good_round() {
        let health = Health::new();
        health.set_lease_duration(Duration::from_secs(3));
        assert!(!health.is_healthy(), "not before the first round");
        health.lease_round_ok();
        assert!(health.is_healthy());
        tokio::time::advance(Duration::from_millis(2_900)).await;
        assert!(health.is_healthy());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!health.is_healthy(), "no good round for over 3 s");
        health.lease_round_ok();
        assert!(health.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_shard_makes_a_healthy_worker_unready() {
        let health = Health::new();
        health.lease_round_ok();
        assert!(health.is_ready());
        let stop = ShardStopped::BadRecord {
            shard: crate::position::ShardId::new("s"),
            position: crate::position::RecordPosition::new(
                crate::position::SequenceNumber::from_u128(7),
            ),
            reason: "decode: invalid type: string \"secret\", expected u64".into(),
        };
        health.shard_stopped(&stop);
        assert!(
            health.is_healthy(),
            "a restart would stop at the same record"
        );
        assert!(!health.is_ready());
        assert_eq!(
            health.stopped_shards(),
            ["shard s stopped at record 7/0 in decode (the reason is in the worker's log)"],
            "the position and stage, never the payload an error may quote"
        );
        health.stopped_shard_let_go("other");
        assert!(
            !health.is_ready(),
            "another shard's release changes nothing"
        );
        health.stopped_shard_let_go("s");
        assert!(health.is_ready(), "the shard is another worker's to report");
    }
}

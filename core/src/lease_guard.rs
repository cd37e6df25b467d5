//! How long a worker may still act on a lease by its own clock: a lease duration from the
//! start of its last successful take or renewal. Other workers start their expiry clock only
//! after seeing that write, so acting within this bound never overlaps a legitimate new owner;
//! a worker paused past it (SIGSTOP, a long GC-like stall, a partition) waits for a renewal
//! before it sends more of the shard to its sinks, and learns there that the lease is gone.
//! Shard tasks check it before each epoch goes on; keyed workers before each epoch and each
//! commit (through the tracker), so nothing queued or uncommitted is written after it ran out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Shared by the lease manager (which extends it) and the shard task (which checks it).
#[derive(Clone, Debug)]
pub(crate) struct LeaseGuard {
    base: Instant,
    /// Milliseconds after `base` until which the lease is surely still ours.
    valid_until_ms: Arc<AtomicU64>,
    /// Wakes a shard task waiting for a renewal.
    renewed: Arc<Notify>,
}

impl LeaseGuard {
    /// A guard valid for `duration` from `acted_at` (when the take began).
    pub(crate) fn new(acted_at: Instant, duration: Duration) -> Self {
        let guard = Self {
            base: acted_at,
            valid_until_ms: Arc::new(AtomicU64::new(0)),
            renewed: Arc::new(Notify::new()),
        };
        guard.extend(acted_at, duration);
        guard
    }

    /// A successful renewal that began at `acted_at`.
    pub(crate) fn extend(&self, acted_at: Instant, duration: Duration) {
        let until = acted_at.saturating_duration_since(self.base) + duration;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.valid_until_ms.fetch_max(ms, Ordering::AcqRel);
        self.renewed.notify_waiters();
    }

    /// The lease is lost: never valid again.
    pub(crate) fn revoke(&self) {
        self.valid_until_ms.store(0, Ordering::Release);
    }

    /// Whether the lease is surely still ours by this worker's clock (never after `revoke`).
    pub(crate) fn is_valid(&self) -> bool {
        let now = Instant::now().saturating_duration_since(self.base);
        u128::from(self.valid_until_ms.load(Ordering::Acquire)) > now.as_millis()
    }

    /// Waits until the lease is valid; false if `cancel` fired first (the lease was lost or the
    /// worker is shutting down).
    pub(crate) async fn wait_valid(&self, cancel: &CancellationToken) -> bool {
        loop {
            // Registered before the check, so that a renewal in between still wakes us.
            let renewed = self.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            if self.is_valid() {
                return !cancel.is_cancelled();
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return false,
                () = renewed => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn valid_for_a_lease_duration_from_the_last_renewal_start() {
        let start = Instant::now();
        let guard = LeaseGuard::new(start, Duration::from_secs(10));
        tokio::time::advance(Duration::from_millis(9_990)).await;
        assert!(guard.is_valid());
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(!guard.is_valid(), "expired by our own clock");
        guard.extend(start + Duration::from_secs(3), Duration::from_secs(10));
        assert!(guard.is_valid(), "renewed at 3 s: valid until 13 s");
        // An older renewal finishing late never shortens it.
        guard.extend(start + Duration::from_secs(1), Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(guard.is_valid(), "at 12 s");
        guard.revoke();
        assert!(!guard.is_valid());
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_task_waits_for_renewal_or_cancellation() {
        let guard = LeaseGuard::new(Instant::now(), Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(2)).await;
        let cancel = CancellationToken::new();
        let renewer = guard.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            renewer.extend(Instant::now(), Duration::from_secs(1));
        });
        assert!(guard.wait_valid(&cancel).await, "renewed: go on");
        tokio::time::advance(Duration::from_secs(2)).await;
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            canceller.cancel();
        });
        assert!(!guard.wait_valid(&cancel).await, "lost: stop");
    }
}

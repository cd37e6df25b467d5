//! How long a worker may still act on a lease by its own clock: a lease duration from the
//! start of its last successful take or renewal. Other workers start their expiry clock only
//! after seeing that write, so acting within this bound never overlaps a legitimate new owner;
//! a worker paused past it (SIGSTOP, a long GC-like stall, a partition) waits for a renewal
//! before it sends more of the shard to its sinks, and learns there that the lease is gone.
//! Shard tasks check it before each epoch goes on; keyed workers before each epoch and each
//! commit (through the tracker), so nothing queued or uncommitted is written after it ran out.
//!
//! The monotonic clock stops while a machine is suspended (a VM paused, a laptop asleep), and
//! other workers' clocks do not: so the guard also runs on the (injected) wall clock, and is
//! valid only while both say the lease duration has not passed. A wall clock stepped forward
//! ends it early, which is safe; one stepped back cannot extend it past the monotonic bound.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::WallClock;

/// A moment on both clocks: when a lease write began.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Moment {
    pub(crate) at: Instant,
    pub(crate) wall_ms: i64,
}

impl Moment {
    pub(crate) fn now(wall: &WallClock) -> Self {
        Self {
            at: Instant::now(),
            wall_ms: wall.now_ms(),
        }
    }

    /// The earlier of two moments (by the monotonic clock).
    pub(crate) fn min(self, other: Self) -> Self {
        if other.at < self.at {
            other
        } else {
            self
        }
    }
}

/// Shared by the lease manager (which extends it) and the shard task (which checks it).
#[derive(Clone, Debug)]
pub(crate) struct LeaseGuard {
    base: Instant,
    /// Milliseconds after `base` until which the lease is surely still ours.
    valid_until_ms: Arc<AtomicU64>,
    /// The same bound on the wall clock, which counts time the machine was suspended.
    wall_valid_until_ms: Arc<AtomicI64>,
    wall: WallClock,
    /// Set by `revoke`: a renewal finishing afterwards does not make it valid again.
    revoked: Arc<AtomicBool>,
    /// Wakes a shard task waiting for a renewal.
    renewed: Arc<Notify>,
}

impl LeaseGuard {
    /// A guard valid for `duration` from `acted_at` (when the take began), on both clocks.
    pub(crate) fn new(acted_at: Moment, duration: Duration, wall: WallClock) -> Self {
        let guard = Self {
            base: acted_at.at,
            valid_until_ms: Arc::new(AtomicU64::new(0)),
            wall_valid_until_ms: Arc::new(AtomicI64::new(i64::MIN)),
            wall,
            revoked: Arc::new(AtomicBool::new(false)),
            renewed: Arc::new(Notify::new()),
        };
        guard.extend(acted_at, duration);
        guard
    }

    /// A successful renewal that began at `acted_at`.
    pub(crate) fn extend(&self, acted_at: Moment, duration: Duration) {
        let until = acted_at.at.saturating_duration_since(self.base) + duration;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.valid_until_ms.fetch_max(ms, Ordering::AcqRel);
        let lease_ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        self.wall_valid_until_ms
            .fetch_max(acted_at.wall_ms.saturating_add(lease_ms), Ordering::AcqRel);
        self.renewed.notify_waiters();
    }

    /// The lease is lost: never valid again, whatever renewal lands later (a new take makes a
    /// new guard).
    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.valid_until_ms.store(0, Ordering::Release);
        self.wall_valid_until_ms.store(i64::MIN, Ordering::Release);
    }

    /// Whether the lease is surely still ours by this worker's clocks (never after `revoke`):
    /// both the monotonic and the wall clock must say so.
    pub(crate) fn is_valid(&self) -> bool {
        if self.revoked.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now().saturating_duration_since(self.base);
        let monotonic = u128::from(self.valid_until_ms.load(Ordering::Acquire)) > now.as_millis();
        monotonic && self.wall_valid_until_ms.load(Ordering::Acquire) > self.wall.now_ms()
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
        let wall = WallClock::following_runtime(0);
        let moment = |at: Instant| Moment {
            at,
            wall_ms: i64::try_from((at - start).as_millis()).unwrap(),
        };
        let guard = LeaseGuard::new(moment(start), Duration::from_secs(10), wall);
        tokio::time::advance(Duration::from_millis(9_990)).await;
        assert!(guard.is_valid());
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(!guard.is_valid(), "expired by our own clock");
        guard.extend(
            moment(start + Duration::from_secs(3)),
            Duration::from_secs(10),
        );
        assert!(guard.is_valid(), "renewed at 3 s: valid until 13 s");
        // An older renewal finishing late never shortens it.
        guard.extend(
            moment(start + Duration::from_secs(1)),
            Duration::from_secs(10),
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(guard.is_valid(), "at 12 s");
        guard.revoke();
        assert!(!guard.is_valid());
        guard.extend(
            moment(start + Duration::from_secs(12)),
            Duration::from_secs(10),
        );
        assert!(
            !guard.is_valid(),
            "a renewal landing after the revocation changes nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_task_waits_for_renewal_or_cancellation() {
        let wall = WallClock::following_runtime(0);
        let guard = LeaseGuard::new(Moment::now(&wall), Duration::from_secs(1), wall.clone());
        tokio::time::advance(Duration::from_secs(2)).await;
        let cancel = CancellationToken::new();
        let renewer = guard.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            renewer.extend(Moment::now(&wall), Duration::from_secs(1));
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

    #[tokio::test(start_paused = true)]
    async fn time_suspended_counts_against_the_guard() {
        // A machine suspended for 20 s: its monotonic clock stood still, the wall clock (and
        // every other worker's) did not.
        let suspended_ms = Arc::new(AtomicI64::new(0));
        let jump = Arc::clone(&suspended_ms);
        let runtime = WallClock::following_runtime(1_000_000);
        let wall = WallClock::from_fn(move || runtime.now_ms() + jump.load(Ordering::Relaxed));
        let guard = LeaseGuard::new(Moment::now(&wall), Duration::from_secs(10), wall.clone());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(guard.is_valid());
        suspended_ms.store(20_000, Ordering::Relaxed);
        assert!(
            !guard.is_valid(),
            "1 s by the monotonic clock, 21 s by the wall clock: expired"
        );
        guard.extend(Moment::now(&wall), Duration::from_secs(10));
        assert!(
            guard.is_valid(),
            "a renewal after the resume makes it valid again"
        );
        // A wall clock stepped back never extends it past the monotonic bound.
        suspended_ms.store(-60_000, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!guard.is_valid());
    }
}

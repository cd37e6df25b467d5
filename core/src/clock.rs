//! The wall clock the runtime reads (milliseconds since the Unix epoch), injected so that a
//! simulation runs it on paused time and replays a run exactly.

use std::sync::Arc;

use crate::position::EventTime;

/// Milliseconds since the Unix epoch, as the runtime sees them. Cloning shares the source.
#[derive(Clone)]
pub struct WallClock(Arc<dyn Fn() -> EventTime + Send + Sync>);

impl WallClock {
    /// The operating system's clock (the default).
    pub fn system() -> Self {
        Self(Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| {
                    i64::try_from(d.as_millis()).unwrap_or(EventTime::MAX)
                })
        }))
    }

    /// A clock that reads `start_ms` now and runs with the runtime's (tokio's) clock: on paused
    /// time, as fast as the simulation advances it.
    pub fn following_runtime(start_ms: EventTime) -> Self {
        let origin = tokio::time::Instant::now();
        Self(Arc::new(move || {
            let elapsed = origin.elapsed().as_millis();
            start_ms.saturating_add(i64::try_from(elapsed).unwrap_or(EventTime::MAX))
        }))
    }

    /// A clock that reads `now` (a test's clock that jumps, say).
    pub fn from_fn(now: impl Fn() -> EventTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// The time now.
    pub fn now_ms(&self) -> EventTime {
        (self.0)()
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WallClock({})", self.now_ms())
    }
}

//! `LocalStreamConfig`: retention, durability and the clock of a local stream.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::clock::{Clock, SystemClock};

/// Kinesis keeps records 24 hours unless the stream's retention is raised.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// How a [`LocalStream`](super::LocalStream) keeps its records.
///
/// ```
/// use std::time::Duration;
/// use shardflow_connectors::local::LocalStreamConfig;
///
/// let config = LocalStreamConfig::default().retention(Duration::from_secs(3600)).fsync(false);
/// assert_eq!(config.retention_period(), Duration::from_secs(3600));
/// ```
#[derive(Clone)]
pub struct LocalStreamConfig {
    pub(crate) retention: Duration,
    pub(crate) fsync: bool,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Default for LocalStreamConfig {
    fn default() -> Self {
        Self {
            retention: DEFAULT_RETENTION,
            fsync: true,
            clock: Arc::new(SystemClock),
        }
    }
}

impl fmt::Debug for LocalStreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalStreamConfig")
            .field("retention", &self.retention)
            .field("fsync", &self.fsync)
            .finish_non_exhaustive()
    }
}

impl LocalStreamConfig {
    /// The defaults: 24 hours of retention, fsync on, the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long records stay readable (default 24 hours). Retention is a property of the stream:
    /// [`LocalStream::create`](super::LocalStream::create) stores it with the stream, and
    /// opening a stream uses the stored value; change it with
    /// [`LocalStream::set_retention`](super::LocalStream::set_retention).
    ///
    /// ```
    /// use std::time::Duration;
    /// use shardflow_connectors::local::LocalStreamConfig;
    ///
    /// let week = LocalStreamConfig::new().retention(Duration::from_secs(7 * 24 * 3600));
    /// assert_eq!(week.retention_period().as_secs(), 604_800);
    /// ```
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Whether appends, metadata changes and trims are fsynced before they return (default
    /// true). Without fsync a process crash loses nothing (the page cache survives it), but a
    /// power loss may lose acknowledged records.
    ///
    /// ```
    /// use shardflow_connectors::local::LocalStreamConfig;
    ///
    /// let fast = LocalStreamConfig::new().fsync(false);
    /// assert!(!fast.fsync_enabled());
    /// ```
    #[must_use]
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// The clock that stamps arrival times and drives retention (default: the system clock).
    ///
    /// ```
    /// use shardflow_connectors::local::{LocalStreamConfig, ManualClock};
    ///
    /// let clock = ManualClock::new(1_700_000_000_000);
    /// let config = LocalStreamConfig::new().clock(clock.clone());
    /// # let _ = config;
    /// ```
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The retention this config sets.
    pub fn retention_period(&self) -> Duration {
        self.retention
    }

    /// Whether this config fsyncs.
    pub fn fsync_enabled(&self) -> bool {
        self.fsync
    }
}

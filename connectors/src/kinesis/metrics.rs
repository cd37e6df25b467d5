//! Prometheus metrics of the Kinesis spout.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Spout metrics, labelled by stream and shard. Cloning shares them.
#[derive(Clone)]
pub struct SpoutMetrics {
    records: IntCounterVec,
    bytes: IntCounterVec,
    behind: IntGaugeVec,
    latency: HistogramVec,
    throttles: IntCounterVec,
    expired: IntCounterVec,
    outside_range: IntCounterVec,
}

impl SpoutMetrics {
    /// Metrics registered in `registry` (a name already registered is shared).
    pub fn new(registry: &Registry) -> Self {
        let labels = &["stream", "shard"];
        let counter = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let behind = IntGaugeVec::new(
            Opts::new(
                "shardflow_kinesis_millis_behind_latest",
                "MillisBehindLatest of the last GetRecords",
            ),
            labels,
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(behind.clone()));
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "shardflow_kinesis_get_records_seconds",
                "GetRecords latency",
            ),
            labels,
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(latency.clone()));
        Self {
            records: counter("shardflow_kinesis_records_read_total", "User records read (after de-aggregation)"),
            bytes: counter("shardflow_kinesis_bytes_read_total", "Kinesis record bytes read"),
            behind,
            latency,
            throttles: counter("shardflow_kinesis_read_throttles_total", "GetRecords calls throttled"),
            expired: counter("shardflow_kinesis_expired_iterators_total", "Shard iterators renewed after expiry"),
            outside_range: counter(
                "shardflow_kinesis_records_outside_shard_range_total",
                "De-aggregated user records whose explicit hash key lies outside their shard (delivered)",
            ),
        }
    }

    /// Metrics in a private registry.
    pub fn unregistered() -> Self {
        Self::new(&Registry::new())
    }

    pub(crate) fn read(
        &self,
        stream: &str,
        shard: &str,
        records: usize,
        bytes: usize,
        behind: Option<i64>,
        took: Duration,
    ) {
        self.records
            .with_label_values(&[stream, shard])
            .inc_by(records as u64);
        self.bytes
            .with_label_values(&[stream, shard])
            .inc_by(bytes as u64);
        if let Some(ms) = behind {
            self.behind.with_label_values(&[stream, shard]).set(ms);
        }
        self.latency
            .with_label_values(&[stream, shard])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn throttled(&self, stream: &str, shard: &str) {
        self.throttles.with_label_values(&[stream, shard]).inc();
    }

    pub(crate) fn expired_iterator(&self, stream: &str, shard: &str) {
        self.expired.with_label_values(&[stream, shard]).inc();
    }

    pub(crate) fn outside_range(&self, stream: &str, shard: &str, n: u64) {
        self.outside_range
            .with_label_values(&[stream, shard])
            .inc_by(n);
    }

    /// Records throttled so far (for tests and the CLI).
    pub fn throttle_count(&self, stream: &str, shard: &str) -> u64 {
        self.throttles.with_label_values(&[stream, shard]).get()
    }

    /// Iterators renewed so far.
    pub fn expired_count(&self, stream: &str, shard: &str) -> u64 {
        self.expired.with_label_values(&[stream, shard]).get()
    }

    /// Out-of-range user records so far.
    pub fn outside_range_count(&self, stream: &str, shard: &str) -> u64 {
        self.outside_range.with_label_values(&[stream, shard]).get()
    }
}

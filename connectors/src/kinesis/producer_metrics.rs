//! Prometheus metrics of the Kinesis producer.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, Registry};

/// Producer metrics. Cloning shares them.
#[derive(Clone)]
pub struct ProducerMetrics {
    user_records: IntCounter,
    kinesis_records: IntCounter,
    bytes: IntCounter,
    latency: Histogram,
    failed_entries: IntCounter,
    retries: IntCounter,
    fill: HistogramVec,
}

impl ProducerMetrics {
    /// Metrics registered in `registry` (a name already registered is shared).
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let histogram = |opts: HistogramOpts| {
            let h = Histogram::with_opts(opts).expect("valid metric");
            let _ = registry.register(Box::new(h.clone()));
            h
        };
        Self {
            user_records: counter(
                "shardflow_producer_user_records_total",
                "User records written",
            ),
            kinesis_records: counter(
                "shardflow_producer_kinesis_records_total",
                "Kinesis records written (aggregates count once)",
            ),
            bytes: counter(
                "shardflow_producer_bytes_total",
                "Bytes written (data plus partition keys)",
            ),
            latency: histogram(HistogramOpts::new(
                "shardflow_producer_put_records_seconds",
                "PutRecords latency",
            )),
            failed_entries: counter(
                "shardflow_producer_failed_entries_total",
                "PutRecords entries that failed (and were retried or expired)",
            ),
            retries: counter(
                "shardflow_producer_retries_total",
                "Entries re-sent after a failure",
            ),
            fill: {
                let opts = HistogramOpts::new(
                    "shardflow_producer_aggregate_fill_ratio",
                    "Size of an aggregated record over the aggregate limit, by why it was sent (full, early)",
                )
                .buckets(vec![0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]);
                let h = HistogramVec::new(opts, &["sealed"]).expect("valid metric");
                let _ = registry.register(Box::new(h.clone()));
                h
            },
        }
    }

    /// Metrics in a private registry.
    pub fn unregistered() -> Self {
        Self::new(&Registry::new())
    }

    pub(crate) fn request(&self, took: Duration) {
        self.latency.observe(took.as_secs_f64());
    }

    pub(crate) fn written(&self, user_records: usize, bytes: usize) {
        self.user_records.inc_by(user_records as u64);
        self.kinesis_records.inc();
        self.bytes.inc_by(bytes as u64);
    }

    pub(crate) fn failed_entry(&self) {
        self.failed_entries.inc();
    }

    pub(crate) fn retried(&self, n: usize) {
        self.retries.inc_by(n as u64);
    }

    pub(crate) fn aggregate_filled(&self, ratio: f64, full: bool) {
        self.fill
            .with_label_values(&[if full { "full" } else { "early" }])
            .observe(ratio);
    }

    /// User records written so far.
    pub fn user_records(&self) -> u64 {
        self.user_records.get()
    }

    /// Kinesis records written so far.
    pub fn kinesis_records(&self) -> u64 {
        self.kinesis_records.get()
    }

    /// Entries that failed so far.
    pub fn failed_entries(&self) -> u64 {
        self.failed_entries.get()
    }

    /// Entries re-sent so far.
    pub fn retries(&self) -> u64 {
        self.retries.get()
    }

    /// Mean fill ratio of all aggregates written so far (0 if none).
    pub fn mean_fill_ratio(&self) -> f64 {
        let (sum, n) = ["full", "early"].iter().fold((0.0, 0), |(s, n), l| {
            let h = self.fill.with_label_values(&[l]);
            (s + h.get_sample_sum(), n + h.get_sample_count())
        });
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }

    /// Mean fill ratio of the aggregates sent because they were full: how well a steady input
    /// packs (0 if none).
    pub fn mean_full_fill_ratio(&self) -> f64 {
        let h = self.fill.with_label_values(&["full"]);
        let n = h.get_sample_count();
        if n == 0 {
            0.0
        } else {
            h.get_sample_sum() / n as f64
        }
    }
}

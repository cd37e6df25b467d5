//! Prometheus metrics of a running topology, registered in a registry the caller owns.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The metrics every part of the runtime updates. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    records_read: IntCounterVec,
    bytes_read: IntCounterVec,
    millis_behind: IntGaugeVec,
    records_written: IntCounterVec,
    bytes_written: IntCounterVec,
    operator_in: IntCounterVec,
    operator_out: IntCounterVec,
    sink_commit: HistogramVec,
    dead_letters: IntCounterVec,
    dead_letters_truncated: IntCounterVec,
    late_records: IntCounterVec,
    untimely_records: IntCounterVec,
    watermark: IntGaugeVec,
    event_time_lag: IntGaugeVec,
    checkpoints: IntCounterVec,
    checkpoint_lag: IntGaugeVec,
    leases_held: IntGaugeVec,
    leases_taken: IntCounterVec,
    leases_lost: IntCounterVec,
    lease_handoffs: IntCounterVec,
    worker_id_conflicts: IntCounterVec,
    vanished_leases: IntCounterVec,
    shards_stopped: IntGaugeVec,
    sink_failures: IntCounterVec,
    shards_backing_off: IntGaugeVec,
    shards_let_go: IntCounterVec,
    lease_items_skipped: IntGaugeVec,
    legacy_leases_waiting: IntGaugeVec,
    state_keys: IntGaugeVec,
    state_bytes: IntGaugeVec,
    snapshot_parts: IntCounterVec,
    snapshot_seconds: HistogramVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    // Registering the same name twice (two runtimes in one registry) keeps the first: both
    // runtimes then share one series per label set, which is what a dashboard wants.
    let _ = registry.register(Box::new(c.clone()));
    c
}

impl Metrics {
    /// Metrics registered in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(g.clone()));
            g
        };
        let sink_commit = HistogramVec::new(
            HistogramOpts::new("shardflow_sink_commit_seconds", "Latency of sink commits"),
            &["topology", "sink"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(sink_commit.clone()));
        let snapshot_seconds = HistogramVec::new(
            HistogramOpts::new(
                "shardflow_snapshot_part_seconds",
                "Time a keyed worker took to save and store its part of a shard's snapshot",
            ),
            &["topology", "operator"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(snapshot_seconds.clone()));
        Self {
            snapshot_seconds,
            state_keys: gauge(
                "shardflow_state_keys",
                "Keys of a shard's keyed state one worker held at its last snapshot part",
                &["topology", "shard", "operator", "worker"],
            ),
            state_bytes: gauge(
                "shardflow_state_bytes",
                "Bytes of one worker's last snapshot part of a shard's keyed state",
                &["topology", "shard", "operator", "worker"],
            ),
            snapshot_parts: counter(
                registry,
                "shardflow_snapshot_parts_total",
                "Snapshot parts keyed workers saved and stored (outcome stored) or could not \
                 (outcome failed: that snapshot stays incomplete)",
                &["topology", "operator", "outcome"],
            ),
            records_read: counter(
                registry,
                "shardflow_records_read_total",
                "Records read from the source",
                &["topology", "shard"],
            ),
            bytes_read: counter(
                registry,
                "shardflow_bytes_read_total",
                "Payload bytes read from the source",
                &["topology", "shard"],
            ),
            millis_behind: gauge(
                "shardflow_millis_behind_latest",
                "How far the reader is behind the tip of the shard",
                &["topology", "shard"],
            ),
            records_written: counter(
                registry,
                "shardflow_records_written_total",
                "Outputs written to a sink",
                &["topology", "shard", "sink"],
            ),
            bytes_written: counter(
                registry,
                "shardflow_bytes_written_total",
                "Bytes a sink stored (as the sink counts them: file, object or item bytes)",
                &["topology", "sink"],
            ),
            operator_in: counter(
                registry,
                "shardflow_operator_records_in_total",
                "Records into an operator (labelled by kind, e.g. window-tumbling-60s, or by .name(..))",
                &["topology", "shard", "operator"],
            ),
            operator_out: counter(
                registry,
                "shardflow_operator_records_out_total",
                "Records out of an operator",
                &["topology", "shard", "operator"],
            ),
            sink_commit,
            dead_letters: counter(
                registry,
                "shardflow_dead_letters_total",
                "Records sent to the dead-letter sink",
                &["topology", "shard"],
            ),
            dead_letters_truncated: counter(
                registry,
                "shardflow_dead_letters_truncated_total",
                "Dead letters whose payload was cut to fit the dead-letter sink",
                &["topology", "shard"],
            ),
            late_records: counter(
                registry,
                "shardflow_late_records_total",
                "Records that arrived after their window closed",
                &["topology"],
            ),
            untimely_records: counter(
                registry,
                "shardflow_untimely_records_total",
                "Records whose event time was beyond the maximum skew ahead of their arrival (late for every window)",
                &["topology", "shard"],
            ),
            watermark: gauge(
                "shardflow_watermark_ms",
                "The shard's event-time watermark, in milliseconds since the Unix epoch",
                &["topology", "shard"],
            ),
            event_time_lag: gauge(
                "shardflow_event_time_lag_ms",
                "How far the shard's watermark trails the wall clock, in milliseconds",
                &["topology", "shard"],
            ),
            checkpoint_lag: gauge(
                "shardflow_checkpoint_lag_records",
                "Records read from the shard that its last written checkpoint does not cover",
                &["topology", "shard"],
            ),
            checkpoints: counter(
                registry,
                "shardflow_checkpoints_written_total",
                "Checkpoints written to the lease store",
                &["topology", "shard"],
            ),
            leases_held: gauge(
                "shardflow_leases_held",
                "Leases this worker holds",
                &["topology"],
            ),
            leases_taken: counter(
                registry,
                "shardflow_leases_taken_total",
                "Leases this worker took (free, expired, handed over, or its own after a restart)",
                &["topology"],
            ),
            leases_lost: counter(
                registry,
                "shardflow_leases_lost_total",
                "Leases this worker lost (stolen, expired, or fenced by a sink)",
                &["topology"],
            ),
            worker_id_conflicts: counter(
                registry,
                "shardflow_worker_id_conflicts_total",
                "Leases seen renewed by another live process with this worker's id (a \
                 configuration error: every process needs its own id)",
                &["topology"],
            ),
            vanished_leases: counter(
                registry,
                "shardflow_vanished_shard_leases_deleted_total",
                "Leases deleted because the stream stopped listing their shard (for its \
                 retention period, or since it was created again), so their children start",
                &["topology"],
            ),
            lease_handoffs: counter(
                registry,
                "shardflow_lease_handoffs_total",
                "Graceful handoffs: leases this worker asked another for (requested), and \
                 leases it handed over after its final checkpoint (handed_over)",
                &["topology", "kind"],
            ),
            shards_stopped: gauge(
                "shardflow_shards_stopped",
                "Shards the dead-letter policy stopped at a bad record in this run (their leases \
                 stay held, so no other worker reads past it; see /readyz)",
                &["topology"],
            ),
            sink_failures: counter(
                registry,
                "shardflow_shard_sink_failures_total",
                "Times a shard backed off because a sink or the dead-letter sink failed after \
                 its own retries",
                &["topology", "shard"],
            ),
            shards_backing_off: gauge(
                "shardflow_shards_backing_off",
                "Shards this worker is pausing after sink failures (or leaving alone for a \
                 cool-down after letting them go)",
                &["topology"],
            ),
            shards_let_go: counter(
                registry,
                "shardflow_shards_let_go_total",
                "Shards whose sinks kept failing through every pause: their leases are no \
                 longer renewed, so another worker takes them once expired",
                &["topology"],
            ),
            lease_items_skipped: gauge(
                "shardflow_lease_items_skipped",
                "Items of the lease table the last shard sync skipped: not leases shardflow can \
                 read (another tool's, or damaged; each is logged)",
                &["topology"],
            ),
            legacy_leases_waiting: gauge(
                "shardflow_legacy_leases_waiting",
                "Leases keyed by shard id alone (an older shardflow) not yet moved to \
                 stream-qualified keys because a live worker holds them; no new shard starts \
                 until it is 0",
                &["topology"],
            ),
        }
    }

    /// Metrics in a private registry (for tests and embedded runs that export nothing).
    pub fn unregistered() -> Self {
        Self::new(&Registry::new())
    }

    pub(crate) fn read(&self, topology: &str, shard: &str, records: usize, bytes: usize) {
        self.records_read
            .with_label_values(&[topology, shard])
            .inc_by(records as u64);
        self.bytes_read
            .with_label_values(&[topology, shard])
            .inc_by(bytes as u64);
    }

    pub(crate) fn behind(&self, topology: &str, shard: &str, millis: u64) {
        let millis = i64::try_from(millis).unwrap_or(i64::MAX);
        self.millis_behind
            .with_label_values(&[topology, shard])
            .set(millis);
    }

    pub(crate) fn sink_records(&self, topology: &str, shard: &str, sink: &str, n: usize) {
        self.records_written
            .with_label_values(&[topology, shard, sink])
            .inc_by(n as u64);
    }

    pub(crate) fn sink_bytes(&self, topology: &str, sink: &str, bytes: u64) {
        if bytes > 0 {
            self.bytes_written
                .with_label_values(&[topology, sink])
                .inc_by(bytes);
        }
    }

    /// Counts an epoch's records into and out of an operator.
    pub(crate) fn operator(&self, topology: &str, shard: &str, operator: &str, io: (u64, u64)) {
        let labels = [topology, shard, operator];
        if io.0 > 0 {
            self.operator_in.with_label_values(&labels).inc_by(io.0);
        }
        if io.1 > 0 {
            self.operator_out.with_label_values(&labels).inc_by(io.1);
        }
    }

    /// A keyed worker stored its part of a shard's snapshot (`Some((keys, bytes))`) or could
    /// not (`None`), taking `took`.
    pub(crate) fn snapshot_part(
        &self,
        (topology, shard, operator, worker): (&str, &str, &str, usize),
        stored: Option<(u64, u64)>,
        took: Duration,
    ) {
        let outcome = if stored.is_some() { "stored" } else { "failed" };
        self.snapshot_parts
            .with_label_values(&[topology, operator, outcome])
            .inc();
        self.snapshot_seconds
            .with_label_values(&[topology, operator])
            .observe(took.as_secs_f64());
        if let Some((keys, bytes)) = stored {
            let worker = worker.to_string();
            let labels = [topology, shard, operator, worker.as_str()];
            let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.state_keys.with_label_values(&labels).set(clamp(keys));
            self.state_bytes
                .with_label_values(&labels)
                .set(clamp(bytes));
        }
    }

    pub(crate) fn sink_commit(&self, topology: &str, sink: &str, took: Duration) {
        self.sink_commit
            .with_label_values(&[topology, sink])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn dead_lettered(&self, topology: &str, shard: &str, n: usize) {
        self.dead_letters
            .with_label_values(&[topology, shard])
            .inc_by(n as u64);
    }

    /// Counts dead letters whose payload was truncated to fit the dead-letter sink.
    pub(crate) fn dead_letter_truncated(&self, topology: &str, shard: &str) {
        self.dead_letters_truncated
            .with_label_values(&[topology, shard])
            .inc();
    }

    /// Counts late records (operators call it).
    pub fn late(&self, topology: &str, n: u64) {
        self.late_records.with_label_values(&[topology]).inc_by(n);
    }

    pub(crate) fn untimely(&self, topology: &str, shard: &str, n: usize) {
        self.untimely_records
            .with_label_values(&[topology, shard])
            .inc_by(n as u64);
    }

    /// The shard's watermark after an epoch, and how far it trails `now_ms` (the wall clock).
    pub(crate) fn watermark(&self, topology: &str, shard: &str, watermark: i64, now_ms: i64) {
        self.watermark
            .with_label_values(&[topology, shard])
            .set(watermark);
        self.event_time_lag
            .with_label_values(&[topology, shard])
            .set(now_ms.saturating_sub(watermark).max(0));
    }

    pub(crate) fn checkpoint_lag(&self, topology: &str, shard: &str, records: u64) {
        self.checkpoint_lag
            .with_label_values(&[topology, shard])
            .set(i64::try_from(records).unwrap_or(i64::MAX));
    }

    /// Drops the per-shard gauges of a shard this worker no longer processes, so that they do
    /// not report its last values forever.
    pub(crate) fn forget_shard(&self, topology: &str, shard: &str) {
        let _ = self.millis_behind.remove_label_values(&[topology, shard]);
        let _ = self.checkpoint_lag.remove_label_values(&[topology, shard]);
        let _ = self.watermark.remove_label_values(&[topology, shard]);
        let _ = self.event_time_lag.remove_label_values(&[topology, shard]);
    }

    pub(crate) fn checkpointed(&self, topology: &str, shard: &str) {
        self.checkpoints.with_label_values(&[topology, shard]).inc();
    }

    pub(crate) fn lease_taken(&self, topology: &str) {
        self.leases_taken.with_label_values(&[topology]).inc();
    }

    pub(crate) fn lease_lost(&self, topology: &str) {
        self.leases_lost.with_label_values(&[topology]).inc();
    }

    pub(crate) fn vanished_lease_deleted(&self, topology: &str) {
        self.vanished_leases.with_label_values(&[topology]).inc();
    }

    pub(crate) fn worker_id_conflict(&self, topology: &str) {
        self.worker_id_conflicts
            .with_label_values(&[topology])
            .inc();
    }

    /// A handoff this worker asked for (`requested`) or made (`handed_over`).
    pub(crate) fn lease_handoff(&self, topology: &str, kind: &str) {
        self.lease_handoffs
            .with_label_values(&[topology, kind])
            .inc();
    }

    pub(crate) fn shards_stopped(&self, topology: &str, stopped: usize) {
        self.shards_stopped
            .with_label_values(&[topology])
            .set(i64::try_from(stopped).unwrap_or(i64::MAX));
    }

    pub(crate) fn sink_failure(&self, topology: &str, shard: &str) {
        self.sink_failures
            .with_label_values(&[topology, shard])
            .inc();
    }

    pub(crate) fn shards_backing_off(&self, topology: &str, n: usize) {
        self.shards_backing_off
            .with_label_values(&[topology])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn lease_items_skipped(&self, topology: &str, n: usize) {
        self.lease_items_skipped
            .with_label_values(&[topology])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn legacy_leases_waiting(&self, topology: &str, n: usize) {
        self.legacy_leases_waiting
            .with_label_values(&[topology])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn shard_let_go(&self, topology: &str) {
        self.shards_let_go.with_label_values(&[topology]).inc();
    }

    pub(crate) fn leases(&self, topology: &str, held: usize) {
        self.leases_held
            .with_label_values(&[topology])
            .set(held as i64);
    }
}

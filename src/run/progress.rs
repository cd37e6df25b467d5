//! A progress line for bounded runs (backfills, replays after `shardflow leases reset`) on a
//! terminal: records read and written so far, and how far the slowest shard trails the tip.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use prometheus::proto::MetricFamily;
use prometheus::Registry;

/// How often the line is redrawn from the metrics.
const REFRESH: Duration = Duration::from_millis(250);

/// A running progress line; hidden when stderr is not a terminal.
pub(crate) struct Progress {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Shows the progress of the run whose metrics `registry` holds.
    pub(crate) fn start(registry: Registry) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} backfill {elapsed}: {msg}")
                .expect("a valid template"),
        );
        let line = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                line.set_message(Summary::of(&registry.gather()).to_string());
                line.tick();
                tokio::time::sleep(REFRESH).await;
            }
        });
        Self { bar, task }
    }

    /// Removes the line.
    pub(crate) fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

/// What the progress line shows, read from the runtime's metrics.
#[derive(Debug, Default, PartialEq)]
struct Summary {
    read: u64,
    written: u64,
    /// The largest `shardflow_millis_behind_latest` of the shards being read.
    behind_ms: Option<i64>,
}

impl Summary {
    fn of(families: &[MetricFamily]) -> Self {
        let mut summary = Self::default();
        for family in families {
            let metrics = family.get_metric();
            match family.name() {
                "shardflow_records_read_total" => {
                    summary.read = metrics
                        .iter()
                        .map(|m| m.get_counter().get_value() as u64)
                        .sum();
                }
                "shardflow_records_written_total" => {
                    summary.written = metrics
                        .iter()
                        .map(|m| m.get_counter().get_value() as u64)
                        .sum();
                }
                "shardflow_millis_behind_latest" => {
                    summary.behind_ms = metrics
                        .iter()
                        .map(|m| m.get_gauge().get_value() as i64)
                        .max();
                }
                _ => {}
            }
        }
        summary
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records read, {} outputs written",
            self.read, self.written
        )?;
        match self.behind_ms {
            Some(ms) => write!(f, ", {}s behind the tip", ms / 1000),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounterVec, IntGaugeVec, Opts};

    #[test]
    fn the_summary_adds_up_shards_and_takes_the_slowest() {
        let registry = Registry::new();
        let read =
            IntCounterVec::new(Opts::new("shardflow_records_read_total", "r"), &["shard"]).unwrap();
        let behind =
            IntGaugeVec::new(Opts::new("shardflow_millis_behind_latest", "b"), &["shard"]).unwrap();
        registry.register(Box::new(read.clone())).unwrap();
        registry.register(Box::new(behind.clone())).unwrap();
        read.with_label_values(&["a"]).inc_by(5);
        read.with_label_values(&["b"]).inc_by(7);
        behind.with_label_values(&["a"]).set(3_000);
        behind.with_label_values(&["b"]).set(61_000);
        let summary = Summary::of(&registry.gather());
        assert_eq!(
            summary,
            Summary {
                read: 12,
                written: 0,
                behind_ms: Some(61_000)
            }
        );
        assert_eq!(
            summary.to_string(),
            "12 records read, 0 outputs written, 61s behind the tip"
        );
    }
}

//! Helpers for the local backend's tests: streams in temp directories on a manual clock.

use std::time::Duration;

use shardflow_core::position::{ShardId, StartPosition};
use shardflow_core::source::{ReadLimits, ShardStatus};

use super::{LocalStream, LocalStreamConfig, ManualClock};

/// The time the manual clock starts at (2023-11-14).
pub(crate) const T0: i64 = 1_700_000_000_000;

/// A stream of `shards` shards in a fresh temp directory, without fsync, on a manual clock.
pub(crate) fn stream(shards: u32) -> (tempfile::TempDir, LocalStream, ManualClock) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let config = LocalStreamConfig::new().fsync(false).clock(clock.clone());
    let stream = LocalStream::create(dir.path(), "test", shards, config).unwrap();
    (dir, stream, clock)
}

/// A stream with the given retention.
pub(crate) fn stream_with_retention(
    shards: u32,
    retention: Duration,
) -> (tempfile::TempDir, LocalStream, ManualClock) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let config = LocalStreamConfig::new()
        .fsync(false)
        .clock(clock.clone())
        .retention(retention);
    let stream = LocalStream::create(dir.path(), "test", shards, config).unwrap();
    (dir, stream, clock)
}

/// Reads `shard` from `start` until the reader is caught up or ended; returns the payloads as
/// strings and the final status.
pub(crate) fn read_all(
    stream: &LocalStream,
    shard: &ShardId,
    start: StartPosition,
) -> (Vec<String>, ShardStatus) {
    let mut reader = stream.reader(shard, start, ReadLimits::default()).unwrap();
    drain(&mut reader)
}

/// Reads until caught up or ended.
pub(crate) fn drain(reader: &mut super::LocalShardReader) -> (Vec<String>, ShardStatus) {
    let mut out = Vec::new();
    loop {
        let batch = reader.read_blocking().unwrap();
        out.extend(
            batch
                .records
                .iter()
                .map(|r| String::from_utf8(r.data.to_vec()).unwrap()),
        );
        if batch.status != ShardStatus::More {
            return (out, batch.status);
        }
    }
}

/// `n` records for key `key`, with payloads `"{prefix}{i}"`.
pub(crate) fn records(key: &str, prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (key.to_owned(), format!("{prefix}{i}").into_bytes()))
        .collect()
}

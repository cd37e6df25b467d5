//! `LocalShardReader`: reads one shard's log in batches, from any start position.
//!
//! The reader keeps its file offset and read buffer between batches. At the tip it rereads the
//! metadata, to learn whether the shard was closed (then it reads to the end once more and
//! reports `Ended`) or its log was rewritten by a trim (then it continues in the new log after
//! the last record it returned).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use shardflow_core::error::SourceError;
use shardflow_core::position::{RecordPosition, SequenceNumber, ShardId, StartPosition};
use shardflow_core::record::RawBatch;
use shardflow_core::source::{ReadBatch, ReadLimits, ShardReader, ShardStatus};

use super::error::LocalStreamError;
use super::frame::FrameRef;
use super::log::{LogCursor, Peek, Tail};
use super::stream::StreamInner;

/// How often one read may start over at the tip (a closed shard, a trimmed log) before the
/// reader gives up: more means the files keep changing under it, which a working writer does not
/// do.
const MAX_TIP_RETRIES: usize = 8;

/// A reader of one shard of a [`LocalStream`](super::LocalStream).
///
/// Use [`read_blocking`](Self::read_blocking) from synchronous code; as a
/// [`ShardReader`] it reads on tokio's blocking thread pool.
pub struct LocalShardReader {
    stream: String,
    shard: ShardId,
    /// `None` only while a read runs on the blocking pool, or after that read was cancelled.
    state: Option<ReaderState>,
}

impl std::fmt::Debug for LocalShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalShardReader")
            .field("stream", &self.stream)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// Which records before the start position to pass over. Once a record passes, none after it
/// is skipped: sequence numbers increase, and `AtTimestamp` starts at the first record that
/// arrived at or after the time (as Kinesis `AT_TIMESTAMP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skip {
    Nothing,
    /// Records with a sequence number below this.
    Below(u128),
    /// Records with a sequence number up to and including this.
    UpTo(u128),
    /// Records that arrived before this time.
    ArrivedBefore(i64),
}

impl Skip {
    fn skips(&mut self, frame: &FrameRef<'_>) -> bool {
        let skip = match *self {
            Self::Nothing => return false,
            Self::Below(n) => frame.sequence < n,
            Self::UpTo(n) => frame.sequence <= n,
            Self::ArrivedBefore(t) => frame.arrival_ms < t,
        };
        if !skip {
            *self = Self::Nothing;
        }
        skip
    }
}

enum AtTip {
    /// Read on: the shard was just seen closed, or the log was replaced.
    Retry,
    CaughtUp,
    Ended,
}

struct ReaderState {
    inner: Arc<StreamInner>,
    shard: ShardId,
    log_name: String,
    path: PathBuf,
    cursor: LogCursor,
    limits: ReadLimits,
    skip: Skip,
    /// The last record returned (or, for `Latest`, passed over at the start).
    last_sequence: Option<u128>,
    retention_ms: u64,
    /// The shard was seen closed before the current pass to the tip began: the tip is its end.
    closed_seen: bool,
    ended: bool,
}

fn u128_sequence(
    inner: &StreamInner,
    shard: &ShardId,
    sequence: &SequenceNumber,
) -> Result<u128, LocalStreamError> {
    sequence
        .as_u128()
        .ok_or_else(|| LocalStreamError::InvalidStartPosition {
            stream: inner.name.clone(),
            shard: shard.clone(),
            reason: format!(
                "sequence number {sequence} is beyond any local sequence number (u128)"
            ),
        })
}

impl LocalShardReader {
    pub(crate) fn open(
        inner: Arc<StreamInner>,
        shard: &ShardId,
        start: StartPosition,
        limits: ReadLimits,
    ) -> Result<Self, LocalStreamError> {
        let latest = start == StartPosition::Latest;
        let skip = match start {
            StartPosition::TrimHorizon | StartPosition::Latest => Skip::Nothing,
            StartPosition::AtSequence(s) => Skip::Below(u128_sequence(&inner, shard, &s)?),
            // Local records have sub-sequence 0, so the record at the position itself is done
            // whatever sub-sequence the checkpoint names.
            StartPosition::After(p) => Skip::UpTo(u128_sequence(&inner, shard, &p.sequence)?),
            StartPosition::AtTimestamp(t) => Skip::ArrivedBefore(t),
        };
        let mut state = ReaderState::open(inner, shard, limits, skip)?;
        if latest {
            state.skip_to_tip()?;
        }
        Ok(Self {
            stream: state.inner.name.clone(),
            shard: shard.clone(),
            state: Some(state),
        })
    }

    /// The shard this reader reads.
    pub fn shard(&self) -> &ShardId {
        &self.shard
    }

    /// Reads the next batch, blocking on file I/O.
    ///
    /// # Errors
    /// I/O failures; damage in a closed shard's log; [`LocalStreamError::ReaderCancelled`] if
    /// an earlier async read was cancelled half way.
    pub fn read_blocking(&mut self) -> Result<ReadBatch, LocalStreamError> {
        match &mut self.state {
            Some(state) => state.read_batch(),
            None => Err(self.cancelled()),
        }
    }

    fn cancelled(&self) -> LocalStreamError {
        LocalStreamError::ReaderCancelled {
            stream: self.stream.clone(),
            shard: self.shard.clone(),
        }
    }
}

#[async_trait]
impl ShardReader for LocalShardReader {
    async fn read(&mut self) -> Result<ReadBatch, SourceError> {
        let Some(mut state) = self.state.take() else {
            return Err(self.cancelled().into());
        };
        let task = tokio::task::spawn_blocking(move || {
            let result = state.read_batch();
            (state, result)
        });
        match task.await {
            Ok((state, result)) => {
                self.state = Some(state);
                result.map_err(SourceError::from)
            }
            // A panic while reading is a bug in this module: surface it where it happened.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(self.cancelled().into()),
        }
    }
}

impl ReaderState {
    fn open(
        inner: Arc<StreamInner>,
        shard: &ShardId,
        limits: ReadLimits,
        skip: Skip,
    ) -> Result<Self, LocalStreamError> {
        // A trim may replace the log between reading the metadata and opening the file.
        let mut attempts = 0;
        loop {
            let (meta, _) = inner.paths.load(&inner.name)?;
            let shard_meta =
                meta.shard(shard.as_str())
                    .ok_or_else(|| LocalStreamError::ShardNotFound {
                        stream: inner.name.clone(),
                        shard: shard.clone(),
                    })?;
            let path = inner.paths.log(shard_meta);
            match LogCursor::open(&path) {
                Ok(cursor) => {
                    return Ok(Self {
                        shard: shard.clone(),
                        log_name: shard_meta.log_name(),
                        path,
                        cursor,
                        limits,
                        skip,
                        last_sequence: None,
                        retention_ms: meta.retention_ms,
                        closed_seen: false,
                        ended: false,
                        inner,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < MAX_TIP_RETRIES => {
                    attempts += 1;
                }
                Err(e) => {
                    return Err(LocalStreamError::io(
                        &inner.name,
                        "opening shard log",
                        path,
                        e,
                    ))
                }
            }
        }
    }

    fn io_error(&self, e: io::Error) -> LocalStreamError {
        if e.kind() == io::ErrorKind::InvalidData {
            LocalStreamError::Corrupt {
                stream: self.inner.name.clone(),
                path: self.path.clone(),
                offset: self.cursor.offset(),
                reason: e.to_string(),
            }
        } else {
            LocalStreamError::io(&self.inner.name, "reading shard log", &self.path, e)
        }
    }

    /// Passes over every record there is now (for `Latest`).
    fn skip_to_tip(&mut self) -> Result<(), LocalStreamError> {
        loop {
            match self.cursor.peek() {
                Ok(Peek::Frame(frame, len)) => {
                    self.last_sequence = Some(frame.sequence);
                    self.cursor.consume(len);
                }
                Ok(Peek::Tip(_)) => return self.cursor.rewind().map_err(|e| self.io_error(e)),
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    fn read_batch(&mut self) -> Result<ReadBatch, LocalStreamError> {
        let now = self.inner.clock.now_ms();
        if self.ended {
            return Ok(ReadBatch {
                records: RawBatch::default(),
                millis_behind_latest: Some(0),
                status: ShardStatus::Ended,
            });
        }
        let cutoff = now.saturating_sub(i64::try_from(self.retention_ms).unwrap_or(i64::MAX));
        let max_records = self.limits.max_records.max(1);
        let max_bytes = self.limits.max_bytes;
        // Small to start: most reads at the tip return nothing, and a full batch grows it in a
        // few doublings.
        let mut batch = RawBatch::with_capacity(max_records.min(256), max_bytes.min(32 * 1024));
        let mut last_arrival = None;
        let mut retries = 0;
        let status = loop {
            let peeked = match self.cursor.peek() {
                Ok(peeked) => peeked,
                Err(e) => return Err(self.io_error(e)),
            };
            match peeked {
                Peek::Frame(frame, len) => {
                    if self.skip.skips(&frame) || frame.arrival_ms < cutoff {
                        self.cursor.consume(len);
                        continue;
                    }
                    let size = frame.partition_key.len() + frame.data.len();
                    let full = batch.len() >= max_records
                        || (!batch.is_empty() && batch.byte_len() + size > max_bytes);
                    if full {
                        break ShardStatus::More;
                    }
                    batch.push(
                        RecordPosition::new(SequenceNumber::from_u128(frame.sequence)),
                        frame.arrival_ms,
                        frame.partition_key,
                        frame.data,
                    );
                    self.last_sequence = Some(frame.sequence);
                    last_arrival = Some(frame.arrival_ms);
                    self.cursor.consume(len);
                }
                Peek::Tip(tail) => match self.at_tip(tail)? {
                    AtTip::Retry if retries < MAX_TIP_RETRIES => retries += 1,
                    AtTip::Retry => break ShardStatus::CaughtUp,
                    AtTip::CaughtUp => break ShardStatus::CaughtUp,
                    AtTip::Ended => {
                        self.ended = true;
                        break ShardStatus::Ended;
                    }
                },
            }
        };
        let millis_behind_latest = match (status, last_arrival) {
            (ShardStatus::More, Some(arrival)) => Some(u64::try_from(now - arrival).unwrap_or(0)),
            _ => Some(0),
        };
        Ok(ReadBatch {
            records: batch,
            millis_behind_latest,
            status,
        })
    }

    fn at_tip(&mut self, tail: Tail) -> Result<AtTip, LocalStreamError> {
        self.cursor.rewind().map_err(|e| self.io_error(e))?;
        if self.closed_seen {
            if let Tail::Torn { reason } = tail {
                // A closed shard takes no appends and was repaired before it closed.
                return Err(LocalStreamError::Corrupt {
                    stream: self.inner.name.clone(),
                    path: self.path.clone(),
                    offset: self.cursor.offset(),
                    reason: format!("{reason} after the last record of a closed shard"),
                });
            }
            return Ok(AtTip::Ended);
        }
        let (meta, _) = self.inner.paths.load(&self.inner.name)?;
        let shard =
            meta.shard(self.shard.as_str())
                .ok_or_else(|| LocalStreamError::ShardNotFound {
                    stream: self.inner.name.clone(),
                    shard: self.shard.clone(),
                })?;
        self.retention_ms = meta.retention_ms;
        let log_name = shard.log_name();
        if log_name != self.log_name {
            let path = self.inner.paths.log(shard);
            match LogCursor::open(&path) {
                Ok(cursor) => {
                    self.cursor = cursor;
                    self.path = path;
                    self.log_name = log_name;
                    if let Some(last) = self.last_sequence {
                        self.skip = Skip::UpTo(last);
                    }
                }
                // Trimmed again in the meantime: the next look at the metadata finds the newer.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LocalStreamError::io(
                        &self.inner.name,
                        "opening shard log",
                        path,
                        e,
                    ))
                }
            }
            return Ok(AtTip::Retry);
        }
        if shard.closed {
            // Appends to a shard all happen before it closes, so one more pass reads them all.
            self.closed_seen = true;
            return Ok(AtTip::Retry);
        }
        Ok(AtTip::CaughtUp)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::{drain, read_all, records, stream, stream_with_retention};
    use super::super::{LocalStream, PutResult};
    use super::*;

    fn shard0() -> ShardId {
        ShardId::new("shardId-000000000000")
    }

    /// One shard with records r0..r4, arriving 1 s apart.
    fn five_records() -> (
        tempfile::TempDir,
        LocalStream,
        super::super::ManualClock,
        Vec<PutResult>,
    ) {
        let (dir, stream, clock) = stream(1);
        let mut puts = Vec::new();
        for i in 0..5 {
            puts.extend(stream.append(&[("k", format!("r{i}"))]).unwrap());
            clock.advance(1_000);
        }
        (dir, stream, clock, puts)
    }

    #[test]
    fn reading_starts_where_each_start_position_says() {
        let (_dir, stream, _clock, puts) = five_records();
        let read = |start| read_all(&stream, &shard0(), start).0;
        assert_eq!(
            read(StartPosition::TrimHorizon),
            ["r0", "r1", "r2", "r3", "r4"]
        );
        assert_eq!(
            read(StartPosition::AtSequence(puts[2].sequence.clone())),
            ["r2", "r3", "r4"]
        );
        assert_eq!(read(StartPosition::After(puts[2].position())), ["r3", "r4"]);
        // A checkpoint inside an aggregated record still means "this record is done" here.
        let inside = RecordPosition::with_sub_sequence(puts[2].sequence.clone(), 3);
        assert_eq!(read(StartPosition::After(inside)), ["r3", "r4"]);
        let t0 = super::super::test_support::T0;
        assert_eq!(read(StartPosition::AtTimestamp(t0 + 3_000)), ["r3", "r4"]);
        assert_eq!(read(StartPosition::AtTimestamp(t0 + 2_500)), ["r3", "r4"]);
        assert_eq!(read(StartPosition::AtTimestamp(0)).len(), 5);
        assert!(read(StartPosition::After(puts[4].position())).is_empty());
    }

    #[test]
    fn latest_returns_only_records_written_after_the_reader_opened() {
        let (_dir, stream, _clock, _) = five_records();
        let mut reader = stream
            .reader(&shard0(), StartPosition::Latest, ReadLimits::default())
            .unwrap();
        stream.append(&[("k", "new")]).unwrap();
        assert_eq!(
            drain(&mut reader),
            (vec!["new".to_owned()], ShardStatus::CaughtUp)
        );
    }

    #[test]
    fn a_sequence_number_beyond_u128_is_an_invalid_start_position() {
        let (_dir, stream, _) = stream(1);
        let huge = SequenceNumber::parse(&"9".repeat(50)).unwrap();
        let err = stream.reader(
            &shard0(),
            StartPosition::AtSequence(huge),
            ReadLimits::default(),
        );
        assert!(matches!(
            err,
            Err(LocalStreamError::InvalidStartPosition { .. })
        ));
    }

    #[test]
    fn batches_respect_record_and_byte_limits() {
        let (_dir, stream, _) = stream(1);
        stream.append(&records("k", "0123456789-", 25)).unwrap();
        let limits = ReadLimits {
            max_records: 10,
            max_bytes: usize::MAX,
        };
        let mut reader = stream
            .reader(&shard0(), StartPosition::TrimHorizon, limits)
            .unwrap();
        let sizes: Vec<_> = (0..3)
            .map(|_| {
                let b = reader.read_blocking().unwrap();
                (b.records.len(), b.status)
            })
            .collect();
        assert_eq!(
            sizes,
            [
                (10, ShardStatus::More),
                (10, ShardStatus::More),
                (5, ShardStatus::CaughtUp)
            ]
        );

        // Each record is 1 key byte + 12 or 13 data bytes; 40 bytes hold three.
        let limits = ReadLimits {
            max_records: 1_000,
            max_bytes: 40,
        };
        let mut reader = stream
            .reader(&shard0(), StartPosition::TrimHorizon, limits)
            .unwrap();
        let first = reader.read_blocking().unwrap();
        assert_eq!(first.records.len(), 3);
        assert!(first.records.byte_len() <= 40);
        assert_eq!(first.status, ShardStatus::More);
    }

    #[test]
    fn a_record_larger_than_max_bytes_is_still_returned_alone() {
        let (_dir, stream, _) = stream(1);
        let big = vec![b'x'; 5_000];
        stream.append(&[("k", &big[..]), ("k", b"small")]).unwrap();
        let limits = ReadLimits {
            max_records: 100,
            max_bytes: 1_000,
        };
        let mut reader = stream
            .reader(&shard0(), StartPosition::TrimHorizon, limits)
            .unwrap();
        let first = reader.read_blocking().unwrap();
        assert_eq!(first.records.len(), 1);
        assert_eq!(first.records.get(0).data.len(), 5_000);
        assert_eq!(
            reader.read_blocking().unwrap().records.get(0).data,
            b"small"
        );
    }

    #[test]
    fn a_closed_shards_reader_ends_with_ended() {
        let (_dir, stream, _) = stream(2);
        let (a, b) = (shard0(), ShardId::new("shardId-000000000001"));
        let mut reader = stream
            .reader(&a, StartPosition::TrimHorizon, ReadLimits::default())
            .unwrap();
        assert_eq!(
            reader.read_blocking().unwrap().status,
            ShardStatus::CaughtUp
        );
        let routed_to_a: Vec<(String, String)> = (0..50)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .filter(|(k, _)| {
                let range = stream.shards().unwrap()[0].hash_key_range;
                (range.0..=range.1).contains(&super::super::partition_key_hash(k))
            })
            .collect();
        stream.append(&routed_to_a).unwrap();
        stream.merge_shards(&a, &b).unwrap();
        let batch = reader.read_blocking().unwrap();
        assert_eq!(batch.records.len(), routed_to_a.len());
        assert_eq!(batch.status, ShardStatus::Ended);
        let after = reader.read_blocking().unwrap();
        assert!(after.records.is_empty());
        assert_eq!(after.status, ShardStatus::Ended);
        // An empty closed shard ends at once.
        let (_, status) = read_all(&stream, &b, StartPosition::TrimHorizon);
        assert_eq!(status, ShardStatus::Ended);
    }

    #[test]
    fn retention_skips_records_older_than_the_retention_period() {
        let (_dir, stream, clock) = stream_with_retention(1, Duration::from_secs(60));
        stream.append(&records("k", "old-", 3)).unwrap();
        clock.advance(40_000);
        stream.append(&records("k", "new-", 2)).unwrap();
        assert_eq!(
            read_all(&stream, &shard0(), StartPosition::TrimHorizon)
                .0
                .len(),
            5
        );
        clock.advance(30_000);
        let (kept, _) = read_all(&stream, &shard0(), StartPosition::TrimHorizon);
        assert_eq!(kept, ["new-0", "new-1"]);
        clock.advance(60_000);
        assert!(read_all(&stream, &shard0(), StartPosition::TrimHorizon)
            .0
            .is_empty());
    }

    #[test]
    fn a_reader_continues_in_the_new_log_after_a_trim() {
        let (_dir, stream, clock) = stream_with_retention(1, Duration::from_secs(60));
        stream.append(&records("k", "old-", 3)).unwrap();
        clock.advance(40_000);
        stream.append(&records("k", "new-", 2)).unwrap();
        let limits = ReadLimits {
            max_records: 4,
            max_bytes: usize::MAX,
        };
        let mut reader = stream
            .reader(&shard0(), StartPosition::TrimHorizon, limits)
            .unwrap();
        assert_eq!(reader.read_blocking().unwrap().records.len(), 4);
        clock.advance(30_000);
        assert_eq!(stream.trim().unwrap().records_removed, 3);
        stream.append(&records("k", "later-", 2)).unwrap();
        let (rest, status) = drain(&mut reader);
        assert_eq!(rest, ["new-1", "later-0", "later-1"]);
        assert_eq!(status, ShardStatus::CaughtUp);
    }

    #[test]
    fn an_unknown_shard_is_shard_not_found() {
        let (_dir, stream, _) = stream(1);
        let err = stream.reader(
            &ShardId::new("shardId-000000000042"),
            StartPosition::TrimHorizon,
            ReadLimits::default(),
        );
        assert!(matches!(err, Err(LocalStreamError::ShardNotFound { .. })));
    }

    #[tokio::test]
    async fn async_reads_return_the_same_batches_as_blocking_reads() {
        let (_dir, stream, _) = stream(1);
        stream.append(&records("k", "r", 3)).unwrap();
        let mut reader: Box<dyn ShardReader> = Box::new(
            stream
                .reader(&shard0(), StartPosition::TrimHorizon, ReadLimits::default())
                .unwrap(),
        );
        let batch = reader.read().await.unwrap();
        assert_eq!(batch.records.len(), 3);
        assert_eq!(batch.status, ShardStatus::CaughtUp);
        assert_eq!(batch.millis_behind_latest, Some(0));
        let batch = reader.read().await.unwrap();
        assert!(batch.records.is_empty());
    }

    /// Run with `cargo test --release -p shardflow-connectors -- --ignored --nocapture`.
    #[test]
    #[ignore = "throughput check; meaningful only in release builds"]
    fn reads_more_than_a_million_100_byte_records_per_second() {
        let (_dir, stream, _) = stream(1);
        let payload = [b'x'; 100];
        let total = 2_000_000;
        for chunk in 0..(total / 10_000) {
            let batch: Vec<(String, &[u8])> = (0..10_000)
                .map(|i| (format!("k{}", chunk * 10_000 + i), &payload[..]))
                .collect();
            stream.append(&batch).unwrap();
        }
        let started = std::time::Instant::now();
        let mut reader = stream
            .reader(&shard0(), StartPosition::TrimHorizon, ReadLimits::default())
            .unwrap();
        let mut read = 0;
        loop {
            let batch = reader.read_blocking().unwrap();
            read += batch.records.len();
            if batch.status != ShardStatus::More {
                break;
            }
        }
        let elapsed = started.elapsed();
        let rate = read as f64 / elapsed.as_secs_f64();
        println!("read {read} records in {elapsed:?}: {rate:.0} records/s");
        assert_eq!(read, total);
        assert!(rate > 1_000_000.0, "{rate:.0} records/s");
    }
}

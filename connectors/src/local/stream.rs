//! `LocalStream`: a file-backed stream modelled on Kinesis Data Streams.
//!
//! A stream is a directory:
//!
//! ```text
//! <dir>/<name>/metadata.json         shards, hash key ranges, parents, retention (atomic rewrite)
//! <dir>/<name>/shards/<id>.<gen>.log one append-only log per shard (see `frame.rs`)
//! <dir>/<name>/writer.lock           held by the one handle that writes
//! <dir>/<name>/recovery.lock         held briefly around checks of the writer lock
//! ```
//!
//! Any number of handles, in any number of processes, may read; one handle at a time writes
//! (appends, reshards, trims). The first write of a handle takes the writer lock and keeps it
//! until the last clone of the handle is dropped.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shardflow_core::position::{RecordPosition, SequenceNumber, ShardId, ShardInfo, StartPosition};
use shardflow_core::source::ReadLimits;
use tracing::{debug, warn};

use super::clock::Clock;
use super::config::LocalStreamConfig;
use super::error::LocalStreamError;
use super::fs::{sync_dir, FileLock};
use super::hash::even_ranges;
use super::limits::check_record;
use super::log::create_log;
use super::metadata::{exists, StreamMetadata, StreamPaths};
use super::reader::LocalShardReader;
use super::writer::{recover, Recovered, Writer};

/// Stream names as Kinesis allows them (1 to 128 of `a-zA-Z0-9_.-`), minus a leading `.`, which
/// could name `.` or `..` as a directory.
const MAX_STREAM_NAME_LEN: usize = 128;

/// More shards than any local use needs; Kinesis's default quota is 500 (or 200) shards per
/// account and region.
pub const MAX_SHARD_COUNT: u32 = 10_000;

/// A file-backed stream of shards; cheap to clone (clones share one handle).
///
/// All methods do blocking file I/O; from async code, call them inside
/// `tokio::task::spawn_blocking`, or use [`LocalProducer`](super::LocalProducer) and
/// [`LocalSource`](super::LocalSource), which do.
///
/// ```
/// use shardflow_connectors::local::{LocalStream, LocalStreamConfig};
/// use shardflow_core::position::StartPosition;
/// use shardflow_core::source::ReadLimits;
///
/// let dir = tempfile::tempdir()?;
/// let stream = LocalStream::create(dir.path(), "clicks", 2, LocalStreamConfig::default())?;
/// let put = stream.append(&[("user-1", b"{\"page\":\"/\"}")])?;
/// let mut reader = stream.reader(&put[0].shard, StartPosition::TrimHorizon, ReadLimits::default())?;
/// let batch = reader.read_blocking()?;
/// assert_eq!(batch.records.get(0).data, b"{\"page\":\"/\"}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct LocalStream {
    pub(crate) inner: Arc<StreamInner>,
}

pub(crate) struct StreamInner {
    pub(crate) name: String,
    pub(crate) paths: StreamPaths,
    pub(crate) fsync: bool,
    pub(crate) clock: Arc<dyn Clock>,
    writer: Mutex<Option<Writer>>,
    /// What recovery found when the stream was opened, so that a first write need not scan the
    /// logs again if nothing changed since.
    recovered: Mutex<Option<Recovered>>,
}

impl std::fmt::Debug for LocalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStream")
            .field("name", &self.inner.name)
            .field("dir", &self.inner.paths.dir)
            .finish_non_exhaustive()
    }
}

/// Where a record was written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PutResult {
    /// The shard the partition key routed to.
    pub shard: ShardId,
    /// The record's sequence number in that shard.
    pub sequence: SequenceNumber,
}

impl PutResult {
    /// The record's position, as readers and checkpoints see it.
    pub fn position(&self) -> RecordPosition {
        RecordPosition::new(self.sequence.clone())
    }
}

/// What [`LocalStream::trim`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// Records older than the retention period, removed from the logs.
    pub records_removed: u64,
    /// Shard logs rewritten without them.
    pub shards_rewritten: usize,
}

fn check_name(name: &str) -> Result<(), LocalStreamError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_STREAM_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(LocalStreamError::InvalidStreamName {
            name: name.to_owned(),
        })
    }
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl LocalStream {
    /// Creates stream `name` in `dir` (as `dir/name/`) with `shard_count` shards splitting the
    /// hash key space evenly, as Kinesis `CreateStream` does.
    ///
    /// # Errors
    /// [`LocalStreamError::StreamExists`] if the stream is there already; invalid names and
    /// counts; I/O failures.
    pub fn create(
        dir: impl AsRef<Path>,
        name: &str,
        shard_count: u32,
        config: LocalStreamConfig,
    ) -> Result<Self, LocalStreamError> {
        check_name(name)?;
        if shard_count == 0 || shard_count > MAX_SHARD_COUNT {
            return Err(LocalStreamError::InvalidShardCount {
                stream: name.to_owned(),
                count: shard_count,
                max: MAX_SHARD_COUNT,
            });
        }
        let paths = StreamPaths {
            dir: dir.as_ref().join(name),
        };
        let io = |operation, path: &Path, e| LocalStreamError::io(name, operation, path, e);
        std::fs::create_dir_all(paths.shards_dir())
            .map_err(|e| io("creating directory", &paths.shards_dir(), e))?;
        let _recovery = FileLock::lock(&paths.recovery_lock())
            .map_err(|e| io("locking", &paths.recovery_lock(), e))?;
        // Two concurrent creates of one stream: the loser finds the lock or the metadata.
        let Some(_writer) = FileLock::try_lock(&paths.writer_lock())
            .map_err(|e| io("locking", &paths.writer_lock(), e))?
        else {
            return Err(LocalStreamError::StreamExists {
                stream: name.to_owned(),
                dir: paths.dir,
            });
        };
        if exists(&paths.dir) {
            return Err(LocalStreamError::StreamExists {
                stream: name.to_owned(),
                dir: paths.dir,
            });
        }
        let mut meta = StreamMetadata::new(name, millis(config.retention), config.clock.now_ms());
        for range in even_ranges(shard_count) {
            meta.add_shard(range, None, None);
        }
        // Logs first, metadata last: the metadata names only logs that exist.
        for shard in &meta.shards {
            let path = paths.log(shard);
            create_log(&path, config.fsync).map_err(|e| io("creating shard log", &path, e))?;
        }
        if config.fsync {
            sync_dir(&paths.shards_dir()).map_err(|e| io("syncing", &paths.shards_dir(), e))?;
            sync_dir(&paths.dir).map_err(|e| io("syncing", &paths.dir, e))?;
        }
        let bytes = paths.write_metadata(&meta, config.fsync)?;
        debug!(stream = name, dir = %paths.dir.display(), shard_count, "created local stream");
        let recovered = Recovered::fresh(&meta, bytes);
        Ok(Self::from_parts(name, paths, config, Some(recovered)))
    }

    /// Opens an existing stream with the default config (fsync on, the system clock). The
    /// retention is the stream's own, stored when it was created.
    ///
    /// # Errors
    /// [`LocalStreamError::StreamNotFound`] if there is no such stream.
    pub fn open(dir: impl AsRef<Path>, name: &str) -> Result<Self, LocalStreamError> {
        Self::open_with(dir, name, LocalStreamConfig::default())
    }

    /// Opens an existing stream with `config`'s fsync and clock (its retention is ignored: the
    /// stream keeps its own, see [`set_retention`](Self::set_retention)).
    ///
    /// If no handle is writing the stream, opening recovers it: a torn record at the end of a
    /// shard log (a crash in the middle of an append) is logged and truncated.
    ///
    /// # Errors
    /// [`LocalStreamError::StreamNotFound`] if there is no such stream; I/O failures.
    pub fn open_with(
        dir: impl AsRef<Path>,
        name: &str,
        config: LocalStreamConfig,
    ) -> Result<Self, LocalStreamError> {
        check_name(name)?;
        let paths = StreamPaths {
            dir: dir.as_ref().join(name),
        };
        let (meta, bytes) = paths.load(name)?;
        let io = |operation, path: &Path, e| LocalStreamError::io(name, operation, path, e);
        let _recovery = FileLock::lock(&paths.recovery_lock())
            .map_err(|e| io("locking", &paths.recovery_lock(), e))?;
        let writer = FileLock::try_lock(&paths.writer_lock())
            .map_err(|e| io("locking", &paths.writer_lock(), e))?;
        // A live writer owns the tails of the logs; only without one may they be repaired.
        let recovered = match writer {
            Some(_writer) => Some(recover(name, &paths, &meta, bytes, config.fsync)?),
            None => None,
        };
        Ok(Self::from_parts(name, paths, config, recovered))
    }

    fn from_parts(
        name: &str,
        paths: StreamPaths,
        config: LocalStreamConfig,
        recovered: Option<Recovered>,
    ) -> Self {
        Self {
            inner: Arc::new(StreamInner {
                name: name.to_owned(),
                paths,
                fsync: config.fsync,
                clock: config.clock,
                writer: Mutex::new(None),
                recovered: Mutex::new(recovered),
            }),
        }
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The stream's directory (`dir/name`).
    pub fn dir(&self) -> &Path {
        &self.inner.paths.dir
    }

    /// Every shard, open and closed, in creation order, as stored now (other handles' reshards
    /// included).
    ///
    /// # Errors
    /// If the metadata cannot be read.
    pub fn shards(&self) -> Result<Vec<ShardInfo>, LocalStreamError> {
        let (meta, _) = self.inner.paths.load(&self.inner.name)?;
        Ok(meta.shards.iter().map(|s| s.info()).collect())
    }

    /// When the stream was created (ms since the Unix epoch, by its clock; 0 for a stream
    /// created before shardflow recorded it).
    ///
    /// # Errors
    /// If the metadata cannot be read.
    pub fn created_ms(&self) -> Result<i64, LocalStreamError> {
        let (meta, _) = self.inner.paths.load(&self.inner.name)?;
        Ok(meta.created_ms)
    }

    /// How long records stay readable.
    ///
    /// # Errors
    /// If the metadata cannot be read.
    pub fn retention(&self) -> Result<Duration, LocalStreamError> {
        let (meta, _) = self.inner.paths.load(&self.inner.name)?;
        Ok(Duration::from_millis(meta.retention_ms))
    }

    /// Changes how long records stay readable (readers pick it up at their next caught-up
    /// read). A writer operation: takes the writer lock.
    ///
    /// # Errors
    /// [`LocalStreamError::WriterBusy`] if another handle writes the stream; I/O failures.
    pub fn set_retention(&self, retention: Duration) -> Result<(), LocalStreamError> {
        self.with_writer(|writer, inner| writer.set_retention(inner, millis(retention)))
    }

    /// Appends records, each routed by the MD5 of its partition key to the open shard whose
    /// hash key range contains it. Every record is checked before anything is written; each
    /// shard's records are written with one write and, with fsync on, one fsync. Sequence
    /// numbers increase across the whole stream, so also within each shard.
    ///
    /// If writing one shard's records fails, those of shards written before stay.
    ///
    /// # Errors
    /// [`LocalStreamError::InvalidPartitionKey`] and [`LocalStreamError::RecordTooLarge`] name
    /// the first bad record; [`LocalStreamError::WriterBusy`] if another handle writes the
    /// stream; I/O failures.
    pub fn append<K: AsRef<str>, D: AsRef<[u8]>>(
        &self,
        records: &[(K, D)],
    ) -> Result<Vec<PutResult>, LocalStreamError> {
        for (index, (key, data)) in records.iter().enumerate() {
            check_record(&self.inner.name, index, key.as_ref(), data.as_ref())?;
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.with_writer(|writer, inner| writer.append(inner, records))
    }

    /// Splits open shard `shard` in two at `new_starting_hash_key`, as Kinesis `SplitShard`:
    /// the parent closes, the first child covers `[start, new_starting_hash_key - 1]`, the
    /// second `[new_starting_hash_key, end]`, both with the parent as `parent`.
    ///
    /// # Errors
    /// Unknown or closed shards, a key outside `(start, end]`, I/O failures.
    pub fn split_shard(
        &self,
        shard: &ShardId,
        new_starting_hash_key: u128,
    ) -> Result<(ShardId, ShardId), LocalStreamError> {
        self.with_writer(|writer, inner| writer.split(inner, shard, new_starting_hash_key))
    }

    /// Merges two open shards with adjacent hash key ranges, as Kinesis `MergeShards`: both
    /// close, and one child covering both ranges has `shard` as parent and `adjacent` as
    /// adjacent parent.
    ///
    /// # Errors
    /// Unknown or closed shards, ranges that do not touch, I/O failures.
    pub fn merge_shards(
        &self,
        shard: &ShardId,
        adjacent: &ShardId,
    ) -> Result<ShardId, LocalStreamError> {
        self.with_writer(|writer, inner| writer.merge(inner, shard, adjacent))
    }

    /// Removes records older than the retention period from the front of every shard log, by
    /// rewriting the log without them. Readers skip such records anyway; trimming frees the
    /// disk. Readers in the middle of an old log finish it and then continue in the new one.
    ///
    /// # Errors
    /// [`LocalStreamError::WriterBusy`] if another handle writes the stream; I/O failures.
    pub fn trim(&self) -> Result<TrimReport, LocalStreamError> {
        self.with_writer(|writer, inner| writer.trim(inner))
    }

    /// Gives up the writer lock if this handle holds it, so that another handle (in this or
    /// another process) may write; this handle takes it again at its next write. Readers need
    /// no lock. (Dropping the last clone of the handle releases it too.)
    pub fn release_writer(&self) {
        if self.inner.lock_writer().take().is_some() {
            debug!(stream = %self.inner.name, "released the writer lock");
        }
    }

    /// A reader of `shard` from `start`, returning batches within `limits`.
    ///
    /// # Errors
    /// [`LocalStreamError::ShardNotFound`]; a sequence number beyond `u128` (no local record
    /// has one); I/O failures.
    pub fn reader(
        &self,
        shard: &ShardId,
        start: StartPosition,
        limits: ReadLimits,
    ) -> Result<LocalShardReader, LocalStreamError> {
        LocalShardReader::open(Arc::clone(&self.inner), shard, start, limits)
    }

    fn with_writer<R>(
        &self,
        op: impl FnOnce(&mut Writer, &StreamInner) -> Result<R, LocalStreamError>,
    ) -> Result<R, LocalStreamError> {
        let inner = &*self.inner;
        let mut slot = inner.lock_writer();
        let writer = match &mut *slot {
            Some(writer) => writer,
            empty => {
                let cached = lock(&inner.recovered).take();
                empty.insert(Writer::acquire(inner, cached)?)
            }
        };
        let result = op(writer, inner);
        if let Err(error @ LocalStreamError::Io { .. }) = &result {
            // The files may be in any state: let the next write take the lock afresh and
            // recover the logs, rather than append after bytes nobody checked.
            warn!(stream = %inner.name, %error, "local stream write failed; the writer restarts");
            *slot = None;
        }
        result
    }
}

impl StreamInner {
    fn lock_writer(&self) -> MutexGuard<'_, Option<Writer>> {
        match self.writer.lock() {
            Ok(guard) => guard,
            // A panic in the middle of a write: drop the writer so the next one recovers.
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                *guard = None;
                self.writer.clear_poison();
                guard
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use shardflow_core::source::ShardStatus;

    use super::super::hash::partition_key_hash;
    use super::super::test_support::{read_all, records, stream};
    use super::*;

    fn info(stream: &LocalStream, id: &ShardId) -> ShardInfo {
        stream
            .shards()
            .unwrap()
            .into_iter()
            .find(|s| &s.id == id)
            .unwrap()
    }

    fn contains(info: &ShardInfo, key: &str) -> bool {
        let (start, end) = info.hash_key_range;
        (start..=end).contains(&partition_key_hash(key))
    }

    #[test]
    fn keys_land_in_the_shard_whose_range_contains_their_md5() {
        let (_dir, stream, _) = stream(4);
        let keys: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
        let batch: Vec<(&str, &[u8])> = keys.iter().map(|k| (k.as_str(), &b"x"[..])).collect();
        let results = stream.append(&batch).unwrap();
        let shards = stream.shards().unwrap();
        let mut per_shard: BTreeMap<ShardId, usize> = BTreeMap::new();
        for (key, put) in keys.iter().zip(&results) {
            let shard = shards.iter().find(|s| s.id == put.shard).unwrap();
            assert!(
                contains(shard, key),
                "{key} routed to {} outside its range",
                put.shard
            );
            *per_shard.entry(put.shard.clone()).or_default() += 1;
        }
        // MD5 spreads 400 keys over all four shards.
        assert_eq!(per_shard.len(), 4, "{per_shard:?}");
    }

    #[test]
    fn sequence_numbers_increase_across_the_stream_and_within_each_shard() {
        let (_dir, stream, _) = stream(3);
        let mut all = Vec::new();
        for round in 0..5 {
            let batch: Vec<(String, Vec<u8>)> = (0..20)
                .map(|i| (format!("k{i}"), format!("{round}-{i}").into_bytes()))
                .collect();
            all.extend(stream.append(&batch).unwrap());
        }
        for pair in all.windows(2) {
            assert!(
                pair[0].sequence < pair[1].sequence,
                "{:?} then {:?}",
                pair[0],
                pair[1]
            );
        }
        for shard in stream.shards().unwrap() {
            let mut reader = stream
                .reader(&shard.id, StartPosition::TrimHorizon, ReadLimits::default())
                .unwrap();
            let batch = reader.read_blocking().unwrap();
            let positions: Vec<_> = batch.records.iter().map(|r| r.position.clone()).collect();
            assert!(
                positions.windows(2).all(|p| p[0] < p[1]),
                "shard {}",
                shard.id
            );
        }
    }

    #[test]
    fn split_closes_the_parent_and_gives_two_children_covering_its_range() {
        let (_dir, stream, _) = stream(2);
        let parent = ShardId::new("shardId-000000000000");
        stream.append(&records("before-split", "old-", 10)).unwrap();
        let (start, end) = info(&stream, &parent).hash_key_range;
        let middle = start + (end - start) / 2;
        let (low, high) = stream.split_shard(&parent, middle).unwrap();
        assert_eq!(
            (low.as_str(), high.as_str()),
            ("shardId-000000000002", "shardId-000000000003")
        );
        assert!(info(&stream, &parent).closed);
        let (low_info, high_info) = (info(&stream, &low), info(&stream, &high));
        assert_eq!(low_info.hash_key_range, (start, middle - 1));
        assert_eq!(high_info.hash_key_range, (middle, end));
        assert_eq!(low_info.parents, std::slice::from_ref(&parent));
        assert_eq!(high_info.parents, std::slice::from_ref(&parent));
        assert!(!low_info.closed && !high_info.closed);

        // New records route to the open child whose range holds the key; none to the parent.
        let keys: Vec<String> = (0..200).map(|i| format!("after-{i}")).collect();
        let batch: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "new")).collect();
        for (key, put) in keys.iter().zip(stream.append(&batch).unwrap()) {
            assert_ne!(put.shard, parent);
            assert!(contains(&info(&stream, &put.shard), key));
        }
        let (parent_records, status) = read_all(&stream, &parent, StartPosition::TrimHorizon);
        assert_eq!(status, ShardStatus::Ended);
        assert!(parent_records.iter().all(|r| r.starts_with("old-")));
    }

    #[test]
    fn merge_links_parent_and_adjacent_parent_and_routes_to_the_child() {
        let (_dir, stream, _) = stream(3);
        let (a, b) = (
            ShardId::new("shardId-000000000001"),
            ShardId::new("shardId-000000000002"),
        );
        let child = stream.merge_shards(&a, &b).unwrap();
        assert_eq!(child.as_str(), "shardId-000000000003");
        let child_info = info(&stream, &child);
        assert_eq!(child_info.parents, [a.clone(), b.clone()]);
        assert_eq!(
            child_info.hash_key_range,
            (
                info(&stream, &a).hash_key_range.0,
                info(&stream, &b).hash_key_range.1
            )
        );
        assert!(info(&stream, &a).closed && info(&stream, &b).closed);
        let open: Vec<_> = stream
            .shards()
            .unwrap()
            .into_iter()
            .filter(|s| !s.closed)
            .collect();
        assert_eq!(open.len(), 2);
        let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
        let batch: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
        for (key, put) in keys.iter().zip(stream.append(&batch).unwrap()) {
            assert!(put.shard == child || put.shard.as_str() == "shardId-000000000000");
            assert!(contains(&info(&stream, &put.shard), key));
        }
    }

    #[test]
    fn reshards_that_kinesis_would_refuse_are_refused() {
        let (_dir, stream, _) = stream(3);
        let [s0, s1, s2] = [0, 1, 2].map(|i| ShardId::new(super::super::metadata::shard_id(i)));
        let (start, _) = info(&stream, &s1).hash_key_range;
        assert!(matches!(
            stream.split_shard(&s1, start),
            Err(LocalStreamError::InvalidSplitKey { .. })
        ));
        assert!(matches!(
            stream.merge_shards(&s0, &s2),
            Err(LocalStreamError::NotAdjacent { .. })
        ));
        assert!(matches!(
            stream.split_shard(&ShardId::new("shardId-000000000099"), 5),
            Err(LocalStreamError::ShardNotFound { .. })
        ));
        stream.merge_shards(&s1, &s2).unwrap();
        assert!(matches!(
            stream.split_shard(&s1, start + 1),
            Err(LocalStreamError::ShardClosed { .. })
        ));
    }

    #[test]
    fn a_second_writer_handle_is_refused_until_the_first_is_dropped() {
        let (dir, stream, _) = stream(1);
        stream.append(&[("k", "1")]).unwrap();
        let other =
            LocalStream::open_with(dir.path(), "test", LocalStreamConfig::new().fsync(false))
                .unwrap();
        assert!(matches!(
            other.append(&[("k", "2")]),
            Err(LocalStreamError::WriterBusy { .. })
        ));
        // Reading needs no lock.
        assert_eq!(other.shards().unwrap().len(), 1);
        drop(stream);
        let put = other.append(&[("k", "2")]).unwrap();
        assert_eq!(put[0].sequence, SequenceNumber::from_u128(2));
    }

    #[test]
    fn a_reader_on_another_handle_sees_appends_as_they_happen() {
        let (dir, stream, clock) = stream(1);
        let config = LocalStreamConfig::new().clock(clock);
        let reading = LocalStream::open_with(dir.path(), "test", config).unwrap();
        let shard = ShardId::new("shardId-000000000000");
        let mut reader = reading
            .reader(&shard, StartPosition::TrimHorizon, ReadLimits::default())
            .unwrap();
        assert_eq!(
            reader.read_blocking().unwrap().status,
            ShardStatus::CaughtUp
        );
        stream.append(&records("k", "r", 3)).unwrap();
        let batch = reader.read_blocking().unwrap();
        assert_eq!(batch.records.len(), 3);
        assert_eq!(batch.status, ShardStatus::CaughtUp);
    }

    #[test]
    fn sequence_numbers_continue_after_reopening_past_trimmed_and_closed_shards() {
        let (dir, stream, clock) = stream(2);
        stream.append(&records("a", "x", 5)).unwrap();
        let (low, _) = stream
            .split_shard(&ShardId::new("shardId-000000000000"), 1 << 100)
            .unwrap();
        let last = stream.append(&records("b", "y", 5)).unwrap().pop().unwrap();
        clock.advance(48 * 3600 * 1000);
        stream.trim().unwrap();
        drop(stream);
        let reopened =
            LocalStream::open_with(dir.path(), "test", LocalStreamConfig::new().fsync(false))
                .unwrap();
        let next = reopened.append(&[("b", "z")]).unwrap().pop().unwrap();
        assert!(next.sequence > last.sequence, "{next:?} after {last:?}");
        let _ = low;
    }

    #[test]
    fn create_refuses_an_existing_stream_and_open_a_missing_one() {
        let (dir, _stream, _) = stream(1);
        let again = LocalStream::create(dir.path(), "test", 1, LocalStreamConfig::new());
        assert!(matches!(again, Err(LocalStreamError::StreamExists { .. })));
        let missing = LocalStream::open(dir.path(), "nope");
        assert!(matches!(
            missing,
            Err(LocalStreamError::StreamNotFound { .. })
        ));
        for name in ["", "..", "a/b", &"x".repeat(129)] {
            let bad = LocalStream::create(dir.path(), name, 1, LocalStreamConfig::new());
            assert!(
                matches!(bad, Err(LocalStreamError::InvalidStreamName { .. })),
                "{name:?}"
            );
        }
        let zero = LocalStream::create(dir.path(), "zero", 0, LocalStreamConfig::new());
        assert!(matches!(
            zero,
            Err(LocalStreamError::InvalidShardCount { .. })
        ));
    }

    #[test]
    fn trim_removes_expired_records_and_keeps_the_rest() {
        let (_dir, stream, clock) =
            super::super::test_support::stream_with_retention(1, Duration::from_secs(60));
        stream.append(&records("k", "old-", 5)).unwrap();
        clock.advance(45_000);
        stream.append(&records("k", "new-", 3)).unwrap();
        clock.advance(30_000);
        let report = stream.trim().unwrap();
        assert_eq!(
            report,
            TrimReport {
                records_removed: 5,
                shards_rewritten: 1
            }
        );
        let shard = ShardId::new("shardId-000000000000");
        let (kept, _) = read_all(&stream, &shard, StartPosition::TrimHorizon);
        assert_eq!(kept, ["new-0", "new-1", "new-2"]);
        // Appends go to the new log.
        stream.append(&[("k", "after-trim")]).unwrap();
        let (kept, _) = read_all(&stream, &shard, StartPosition::TrimHorizon);
        assert_eq!(kept.last().map(String::as_str), Some("after-trim"));
        assert_eq!(stream.trim().unwrap(), TrimReport::default());
        let logs = std::fs::read_dir(stream.dir().join("shards"))
            .unwrap()
            .count();
        assert_eq!(logs, 1, "the old log is removed");
    }

    #[test]
    fn retention_is_stored_with_the_stream_and_can_be_changed() {
        let (dir, stream, _) =
            super::super::test_support::stream_with_retention(1, Duration::from_secs(7200));
        let reopened = LocalStream::open(dir.path(), "test").unwrap();
        assert_eq!(reopened.retention().unwrap(), Duration::from_secs(7200));
        stream.set_retention(Duration::from_secs(60)).unwrap();
        assert_eq!(reopened.retention().unwrap(), Duration::from_secs(60));
    }
}

#[cfg(test)]
mod concurrency_tests {
    use std::collections::BTreeSet;

    use shardflow_core::source::ShardStatus;

    use super::super::test_support::stream;
    use super::*;

    #[test]
    fn concurrent_appends_through_clones_are_all_read_back_in_order_while_reading() {
        let (_dir, stream, _) = stream(3);
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let stream = stream.clone();
                std::thread::spawn(move || {
                    for b in 0..50 {
                        let batch: Vec<(String, String)> = (0..20)
                            .map(|i| (format!("k{}", (w * 7 + i) % 13), format!("{w}-{b}-{i}")))
                            .collect();
                        stream.append(&batch).unwrap();
                    }
                })
            })
            .collect();
        let mut readers: Vec<_> = stream
            .shards()
            .unwrap()
            .iter()
            .map(|s| {
                stream
                    .reader(&s.id, StartPosition::TrimHorizon, ReadLimits::default())
                    .unwrap()
            })
            .collect();
        let mut seen = BTreeSet::new();
        let mut last: Vec<Option<RecordPosition>> = vec![None; readers.len()];
        let mut writing = writers;
        loop {
            let done = writing.iter().all(std::thread::JoinHandle::is_finished);
            let mut caught_up = true;
            for (reader, last) in readers.iter_mut().zip(&mut last) {
                let batch = reader.read_blocking().unwrap();
                for r in batch.records.iter() {
                    assert!(last.as_ref() < Some(r.position));
                    *last = Some(r.position.clone());
                    assert!(seen.insert(r.data.to_vec()), "each record read once");
                }
                caught_up &= batch.status == ShardStatus::CaughtUp;
            }
            if done && caught_up {
                break;
            }
        }
        for writer in writing.drain(..) {
            writer.join().unwrap();
        }
        assert_eq!(seen.len(), 4 * 50 * 20);
    }
}

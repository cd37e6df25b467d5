//! The one writer of a stream: the writer lock, crash recovery of the shard logs, appends,
//! reshards and trims.
//!
//! Locking: `writer.lock` is held for the writer's lifetime, so a second writer fails fast
//! with `WriterBusy`. Opening a stream also takes `writer.lock`, briefly, to repair torn logs
//! when nobody writes; both sides take `recovery.lock` around their check, so that a writer
//! never mistakes such a brief holder for another writer.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use shardflow_core::position::{SequenceNumber, ShardId};
use tracing::{debug, info, warn};

use super::error::LocalStreamError;
use super::frame::{encode_frame, frame_len};
use super::fs::{sync_dir, FileLock, TEMP_PREFIX};
use super::hash::partition_key_hash;
use super::log::{create_log, scan, LogCursor, Peek, Tail, LOG_HEADER_LEN, LOG_MAGIC};
use super::metadata::{ShardMeta, StreamMetadata, StreamPaths};
use super::stream::{PutResult, StreamInner, TrimReport};

/// The state of the logs after recovery: where each open shard's valid frames end.
#[derive(Clone, Debug)]
pub(crate) struct Recovered {
    /// The metadata this state belongs to, byte for byte.
    meta_bytes: Vec<u8>,
    /// By log file name: valid length and last sequence number.
    logs: HashMap<String, (u64, Option<u128>)>,
    next_sequence: u128,
}

impl Recovered {
    /// The state of a stream just created: empty logs.
    pub(crate) fn fresh(meta: &StreamMetadata, meta_bytes: Vec<u8>) -> Self {
        let logs = meta
            .open_shards()
            .map(|s| (s.log_name(), (LOG_HEADER_LEN, None)))
            .collect();
        Self {
            meta_bytes,
            logs,
            next_sequence: meta.sequence_floor,
        }
    }

    /// Whether nothing changed since: same metadata, every open log the recovered length.
    fn still_valid(&self, meta: &StreamMetadata, meta_bytes: &[u8], paths: &StreamPaths) -> bool {
        self.meta_bytes == meta_bytes
            && meta.open_shards().all(|s| {
                let len = fs::metadata(paths.log(s)).map(|m| m.len()).ok();
                len.is_some() && len == self.logs.get(&s.log_name()).map(|l| l.0)
            })
    }
}

/// Repairs the logs of the open shards: a missing header is rewritten, a torn tail truncated;
/// log files no shard refers to (left by a crash during a reshard or trim) are removed.
///
/// The caller holds `writer.lock`.
pub(crate) fn recover(
    stream: &str,
    paths: &StreamPaths,
    meta: &StreamMetadata,
    meta_bytes: Vec<u8>,
    fsync: bool,
) -> Result<Recovered, LocalStreamError> {
    let shards_dir = paths.shards_dir();
    let io = |operation, path: &Path, e| LocalStreamError::io(stream, operation, path, e);
    fs::create_dir_all(&shards_dir).map_err(|e| io("creating directory", &shards_dir, e))?;
    let mut logs = HashMap::new();
    let mut next_sequence = meta.sequence_floor;
    for shard in meta.open_shards() {
        let path = paths.log(shard);
        let end = match scan(&path) {
            Ok(end) => end,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warn!(stream, shard = %shard.id, path = %path.display(), "shard log missing; recreating it empty");
                create_log(&path, fsync).map_err(|e| io("creating shard log", &path, e))?;
                scan(&path).map_err(|e| io("reading shard log", &path, e))?
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(LocalStreamError::Corrupt {
                    stream: stream.to_owned(),
                    path,
                    offset: 0,
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(io("reading shard log", &path, e)),
        };
        let valid_len = if end.valid_len < LOG_HEADER_LEN {
            // A crash while the log was being created: only (part of) the header is missing.
            warn!(stream, shard = %shard.id, "shard log header incomplete; rewriting it");
            create_log(&path, fsync).map_err(|e| io("creating shard log", &path, e))?;
            LOG_HEADER_LEN
        } else {
            if let Tail::Torn { reason } = end.tail {
                let file_len = fs::metadata(&path)
                    .map_err(|e| io("reading", &path, e))?
                    .len();
                warn!(
                    stream,
                    shard = %shard.id,
                    offset = end.valid_len,
                    bytes_dropped = file_len - end.valid_len,
                    reason,
                    "truncating torn tail of shard log (a crash in the middle of an append)"
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io("opening shard log", &path, e))?;
                file.set_len(end.valid_len)
                    .map_err(|e| io("truncating shard log", &path, e))?;
                if fsync {
                    file.sync_all()
                        .map_err(|e| io("syncing shard log", &path, e))?;
                }
            }
            end.valid_len
        };
        if let Some(last) = end.last_sequence {
            next_sequence = next_sequence.max(last + 1);
        }
        logs.insert(shard.log_name(), (valid_len, end.last_sequence));
    }
    remove_leftovers(stream, paths, meta)?;
    Ok(Recovered {
        meta_bytes,
        logs,
        next_sequence,
    })
}

/// Removes log files no shard refers to, and unfinished metadata writes.
fn remove_leftovers(
    stream: &str,
    paths: &StreamPaths,
    meta: &StreamMetadata,
) -> Result<(), LocalStreamError> {
    let referenced: HashSet<String> = meta.shards.iter().map(ShardMeta::log_name).collect();
    for dir in [paths.shards_dir(), paths.dir.clone()] {
        let entries =
            fs::read_dir(&dir).map_err(|e| LocalStreamError::io(stream, "listing", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| LocalStreamError::io(stream, "listing", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let leftover = name.starts_with(TEMP_PREFIX)
                || (dir == paths.shards_dir()
                    && name.ends_with(".log")
                    && !referenced.contains(&name));
            if leftover {
                debug!(stream, file = %name, "removing file left by an interrupted write");
                if let Err(e) = fs::remove_file(entry.path()) {
                    warn!(stream, file = %name, error = %e, "cannot remove leftover file");
                }
            }
        }
    }
    Ok(())
}

/// An open shard's log, appended to by the writer.
#[derive(Debug)]
struct OpenLog {
    file: File,
    /// The valid length: where the next frame goes.
    len: u64,
}

/// An open shard's hash key range, for routing.
#[derive(Debug)]
struct Route {
    start: u128,
    shard: ShardId,
}

/// The writer of one stream, owning the writer lock.
#[derive(Debug)]
pub(crate) struct Writer {
    _lock: FileLock,
    meta: StreamMetadata,
    next_sequence: u128,
    /// Open shards' logs, by shard id.
    logs: HashMap<String, OpenLog>,
    /// Open shards by starting hash key; together they cover the whole hash key space.
    routes: Vec<Route>,
}

impl Writer {
    /// Takes the writer lock and brings the logs to a known state.
    pub(crate) fn acquire(
        inner: &StreamInner,
        cached: Option<Recovered>,
    ) -> Result<Self, LocalStreamError> {
        let (stream, paths) = (&inner.name, &inner.paths);
        let io = |operation, path: &Path, e| LocalStreamError::io(stream, operation, path, e);
        let _recovery = FileLock::lock(&paths.recovery_lock())
            .map_err(|e| io("locking", &paths.recovery_lock(), e))?;
        let lock = FileLock::try_lock(&paths.writer_lock())
            .map_err(|e| io("locking", &paths.writer_lock(), e))?
            .ok_or_else(|| LocalStreamError::WriterBusy {
                stream: stream.clone(),
                dir: paths.dir.clone(),
            })?;
        let (meta, meta_bytes) = paths.load(stream)?;
        let recovered = match cached {
            Some(cached) if cached.still_valid(&meta, &meta_bytes, paths) => cached,
            _ => recover(stream, paths, &meta, meta_bytes, inner.fsync)?,
        };
        let mut writer = Self {
            _lock: lock,
            meta,
            next_sequence: recovered.next_sequence,
            logs: HashMap::new(),
            routes: Vec::new(),
        };
        for shard in writer.meta.open_shards() {
            let path = paths.log(shard);
            let len = recovered
                .logs
                .get(&shard.log_name())
                .map_or(LOG_HEADER_LEN, |l| l.0);
            let file = open_append(&path).map_err(|e| io("opening shard log", &path, e))?;
            writer.logs.insert(shard.id.clone(), OpenLog { file, len });
        }
        writer.rebuild_routes();
        debug!(stream = %stream, next_sequence = writer.next_sequence, "took the writer lock");
        Ok(writer)
    }

    fn rebuild_routes(&mut self) {
        self.routes = self
            .meta
            .open_shards()
            .map(|s| Route {
                start: s.starting_hash_key,
                shard: ShardId::new(&s.id),
            })
            .collect();
        self.routes.sort_by_key(|r| r.start);
    }

    /// The index in `routes` of the open shard whose range holds `hash_key`.
    fn route(&self, hash_key: u128) -> usize {
        // Open shards cover the whole space from 0, so some route starts at or below the key.
        self.routes.partition_point(|r| r.start <= hash_key) - 1
    }

    pub(crate) fn append<K: AsRef<str>, D: AsRef<[u8]>>(
        &mut self,
        inner: &StreamInner,
        records: &[(K, D)],
    ) -> Result<Vec<PutResult>, LocalStreamError> {
        let arrival_ms = inner.clock.now_ms();
        let first = self.next_sequence;
        // Taken before writing: if a write fails half way, numbers may be skipped, never reused.
        self.next_sequence += records.len() as u128;
        let mut groups: Vec<Vec<u8>> = vec![Vec::new(); self.routes.len()];
        let mut results = Vec::with_capacity(records.len());
        for (i, (key, data)) in records.iter().enumerate() {
            let route = self.route(partition_key_hash(key.as_ref()));
            let (key, data) = (key.as_ref().as_bytes(), data.as_ref());
            let sequence = first + i as u128;
            let group = &mut groups[route];
            if group.is_empty() {
                group.reserve(frame_len(key, data) * (records.len() / self.routes.len() + 1));
            }
            encode_frame(group, sequence, arrival_ms, key, data);
            results.push(PutResult {
                shard: self.routes[route].shard.clone(),
                sequence: SequenceNumber::from_u128(sequence),
            });
        }
        for (route, bytes) in groups.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
            let shard = &self.routes[route].shard;
            let log = self
                .logs
                .get_mut(shard.as_str())
                .expect("every open shard has a log");
            if let Err(e) = write_group(log, bytes, inner.fsync) {
                let path = inner
                    .paths
                    .log(self.meta.shard(shard.as_str()).expect("open shard"));
                // Leave no partial frame behind for readers (or the next append) to trip on.
                if let Err(undo) = log.file.set_len(log.len) {
                    warn!(stream = %inner.name, %shard, error = %undo, "cannot undo a failed append; recovery will");
                }
                return Err(LocalStreamError::io(
                    &inner.name,
                    "appending to shard log",
                    path,
                    e,
                ));
            }
            log.len += bytes.len() as u64;
        }
        Ok(results)
    }

    pub(crate) fn split(
        &mut self,
        inner: &StreamInner,
        shard: &ShardId,
        new_starting_hash_key: u128,
    ) -> Result<(ShardId, ShardId), LocalStreamError> {
        let parent = self.reshardable(inner, shard)?;
        let (start, end) = (parent.starting_hash_key, parent.ending_hash_key);
        if new_starting_hash_key <= start || new_starting_hash_key > end {
            return Err(LocalStreamError::InvalidSplitKey {
                stream: inner.name.clone(),
                shard: shard.clone(),
                key: new_starting_hash_key,
                start,
                end,
            });
        }
        let mut meta = self.meta.clone();
        let parent_id = Some(shard.as_str().to_owned());
        let low = meta
            .add_shard((start, new_starting_hash_key - 1), parent_id.clone(), None)
            .id
            .clone();
        let high = meta
            .add_shard((new_starting_hash_key, end), parent_id, None)
            .id
            .clone();
        meta.shard_mut(shard.as_str())
            .expect("checked above")
            .closed = true;
        self.commit_reshard(inner, meta, &[shard.as_str()], &[&low, &high])?;
        info!(stream = %inner.name, parent = %shard, %low, %high, "split shard");
        Ok((ShardId::new(low), ShardId::new(high)))
    }

    pub(crate) fn merge(
        &mut self,
        inner: &StreamInner,
        shard: &ShardId,
        adjacent: &ShardId,
    ) -> Result<ShardId, LocalStreamError> {
        let a = self.reshardable(inner, shard)?;
        let b = self.reshardable(inner, adjacent)?;
        let touch = |x: &ShardMeta, y: &ShardMeta| {
            x.ending_hash_key.checked_add(1) == Some(y.starting_hash_key)
        };
        if !(touch(a, b) || touch(b, a)) {
            return Err(LocalStreamError::NotAdjacent {
                stream: inner.name.clone(),
                shard: shard.clone(),
                adjacent: adjacent.clone(),
            });
        }
        let range = (
            a.starting_hash_key.min(b.starting_hash_key),
            a.ending_hash_key.max(b.ending_hash_key),
        );
        let mut meta = self.meta.clone();
        let child = meta
            .add_shard(
                range,
                Some(shard.as_str().to_owned()),
                Some(adjacent.as_str().to_owned()),
            )
            .id
            .clone();
        meta.shard_mut(shard.as_str())
            .expect("checked above")
            .closed = true;
        meta.shard_mut(adjacent.as_str())
            .expect("checked above")
            .closed = true;
        self.commit_reshard(inner, meta, &[shard.as_str(), adjacent.as_str()], &[&child])?;
        info!(stream = %inner.name, parent = %shard, adjacent_parent = %adjacent, %child, "merged shards");
        Ok(ShardId::new(child))
    }

    fn reshardable(
        &self,
        inner: &StreamInner,
        shard: &ShardId,
    ) -> Result<&ShardMeta, LocalStreamError> {
        let meta =
            self.meta
                .shard(shard.as_str())
                .ok_or_else(|| LocalStreamError::ShardNotFound {
                    stream: inner.name.clone(),
                    shard: shard.clone(),
                })?;
        if meta.closed {
            return Err(LocalStreamError::ShardClosed {
                stream: inner.name.clone(),
                shard: shard.clone(),
            });
        }
        Ok(meta)
    }

    /// Creates the children's logs, then switches the metadata: the parents close at that
    /// rename, after their last append, so a reader that sees them closed can read them to the
    /// end and stop.
    fn commit_reshard(
        &mut self,
        inner: &StreamInner,
        mut meta: StreamMetadata,
        closed: &[&str],
        created: &[&str],
    ) -> Result<(), LocalStreamError> {
        let io = |operation, path: &Path, e| LocalStreamError::io(&inner.name, operation, path, e);
        for id in created {
            let path = inner.paths.log(meta.shard(id).expect("just added"));
            create_log(&path, inner.fsync).map_err(|e| io("creating shard log", &path, e))?;
        }
        if inner.fsync {
            let dir = inner.paths.shards_dir();
            sync_dir(&dir).map_err(|e| io("syncing", &dir, e))?;
        }
        meta.sequence_floor = self.next_sequence;
        inner.paths.write_metadata(&meta, inner.fsync)?;
        self.meta = meta;
        for id in closed {
            self.logs.remove(*id);
        }
        for id in created {
            let path = inner.paths.log(self.meta.shard(id).expect("just added"));
            let file = open_append(&path).map_err(|e| io("opening shard log", &path, e))?;
            self.logs.insert(
                (*id).to_owned(),
                OpenLog {
                    file,
                    len: LOG_HEADER_LEN,
                },
            );
        }
        self.rebuild_routes();
        Ok(())
    }

    pub(crate) fn set_retention(
        &mut self,
        inner: &StreamInner,
        retention_ms: u64,
    ) -> Result<(), LocalStreamError> {
        let mut meta = self.meta.clone();
        meta.retention_ms = retention_ms;
        meta.sequence_floor = self.next_sequence;
        inner.paths.write_metadata(&meta, inner.fsync)?;
        self.meta = meta;
        Ok(())
    }

    pub(crate) fn trim(&mut self, inner: &StreamInner) -> Result<TrimReport, LocalStreamError> {
        let now = inner.clock.now_ms();
        let cutoff = now.saturating_sub(i64::try_from(self.meta.retention_ms).unwrap_or(i64::MAX));
        let io = |operation, path: &Path, e| LocalStreamError::io(&inner.name, operation, path, e);
        let mut meta = self.meta.clone();
        let mut report = TrimReport::default();
        // (shard id, old path, new path, new length)
        let mut rewritten = Vec::new();
        for shard in &mut meta.shards {
            let old_path = inner.paths.log(shard);
            let (expired, keep_from) = count_expired(&old_path, cutoff)
                .map_err(|e| io("reading shard log", &old_path, e))?;
            if expired == 0 {
                continue;
            }
            // An open shard's log may hold a torn frame only past the writer's length; a closed
            // shard's log ends at its last frame.
            let end = match self.logs.get(&shard.id) {
                Some(log) => log.len,
                None => fs::metadata(&old_path)
                    .map_err(|e| io("reading", &old_path, e))?
                    .len(),
            };
            shard.log_generation += 1;
            let new_path = inner.paths.log(shard);
            let new_len = copy_tail(&old_path, &new_path, keep_from, end, inner.fsync)
                .map_err(|e| io("rewriting shard log", &new_path, e))?;
            rewritten.push((shard.id.clone(), old_path, new_path, new_len));
            report.records_removed += expired;
            report.shards_rewritten += 1;
        }
        if rewritten.is_empty() {
            return Ok(report);
        }
        if inner.fsync {
            let dir = inner.paths.shards_dir();
            sync_dir(&dir).map_err(|e| io("syncing", &dir, e))?;
        }
        // Trimmed sequence numbers are not scanned at the next start; the floor keeps them
        // from being handed out again.
        meta.sequence_floor = self.next_sequence;
        inner.paths.write_metadata(&meta, inner.fsync)?;
        self.meta = meta;
        for (id, old_path, new_path, new_len) in rewritten {
            if let Some(log) = self.logs.get_mut(&id) {
                let file =
                    open_append(&new_path).map_err(|e| io("opening shard log", &new_path, e))?;
                *log = OpenLog { file, len: new_len };
            }
            // Readers that have the old log open keep reading it (on Unix) until they switch.
            if let Err(e) = fs::remove_file(&old_path) {
                warn!(stream = %inner.name, path = %old_path.display(), error = %e, "cannot remove trimmed log; the next writer will");
            }
        }
        info!(stream = %inner.name, records = report.records_removed, shards = report.shards_rewritten, "trimmed expired records");
        Ok(report)
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).open(path)
}

fn write_group(log: &mut OpenLog, bytes: &[u8], fsync: bool) -> io::Result<()> {
    log.file.write_all(bytes)?;
    if fsync {
        log.file.sync_data()?;
    }
    Ok(())
}

/// How many records at the front of a log arrived before `cutoff`, and where the first that
/// did not starts.
fn count_expired(path: &Path, cutoff: i64) -> io::Result<(u64, u64)> {
    let mut cursor = LogCursor::open(path)?;
    let mut expired = 0;
    loop {
        match cursor.peek()? {
            Peek::Frame(frame, len) if frame.arrival_ms < cutoff => {
                expired += 1;
                cursor.consume(len);
            }
            Peek::Frame(..) | Peek::Tip(_) => return Ok((expired, cursor.offset())),
        }
    }
}

/// Writes a new log holding the header and `old[from..end]`; returns its length.
fn copy_tail(old: &Path, new: &Path, from: u64, end: u64, fsync: bool) -> io::Result<u64> {
    let mut source = File::open(old)?;
    source.seek(SeekFrom::Start(from))?;
    let mut target = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(new)?;
    target.write_all(LOG_MAGIC)?;
    let copied = io::copy(
        &mut io::Read::take(source, end.saturating_sub(from)),
        &mut target,
    )?;
    if fsync {
        target.sync_all()?;
    }
    Ok(LOG_HEADER_LEN + copied)
}

#[cfg(test)]
mod tests {
    use shardflow_core::position::StartPosition;
    use shardflow_core::source::ShardStatus;

    use super::super::test_support::{read_all, records, stream};
    use super::super::{LocalStream, LocalStreamConfig, ManualClock};
    use super::*;

    fn log_path(stream: &LocalStream) -> std::path::PathBuf {
        stream.dir().join("shards/shardId-000000000000.0.log")
    }

    fn reopen(dir: &Path, clock: &ManualClock) -> LocalStream {
        let config = LocalStreamConfig::new().fsync(false).clock(clock.clone());
        LocalStream::open_with(dir, "test", config).unwrap()
    }

    #[test]
    fn a_log_cut_in_the_middle_of_a_frame_is_truncated_on_open_and_appends_continue() {
        let (dir, stream, clock) = stream(1);
        stream.append(&records("k", "r", 3)).unwrap();
        let path = log_path(&stream);
        let good_len = fs::metadata(&path).unwrap().len();
        stream.append(&[("k", "torn-record")]).unwrap();
        drop(stream);
        // A crash in the middle of the fourth record's write.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(good_len + 10).unwrap();

        let stream = reopen(dir.path(), &clock);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            good_len,
            "torn tail truncated on open"
        );
        let shard = ShardId::new("shardId-000000000000");
        let (kept, status) = read_all(&stream, &shard, StartPosition::TrimHorizon);
        assert_eq!(
            (kept, status),
            (
                vec!["r0".into(), "r1".into(), "r2".into()],
                ShardStatus::CaughtUp
            )
        );
        let put = stream.append(&[("k", "after")]).unwrap();
        assert_eq!(
            put[0].sequence,
            SequenceNumber::from_u128(4),
            "numbers of lost records may be reused"
        );
        let (all, _) = read_all(&stream, &shard, StartPosition::TrimHorizon);
        assert_eq!(all, ["r0", "r1", "r2", "after"]);
    }

    #[test]
    fn garbage_after_the_last_record_is_truncated_on_open() {
        let (dir, stream, clock) = stream(1);
        stream.append(&records("k", "r", 2)).unwrap();
        let path = log_path(&stream);
        let good_len = fs::metadata(&path).unwrap().len();
        drop(stream);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        // A plausible length with a wrong checksum, then random bytes.
        file.write_all(&[40, 0, 0, 0, 1, 2, 3, 4]).unwrap();
        file.write_all(&[0xAB; 60]).unwrap();
        drop(file);

        let stream = reopen(dir.path(), &clock);
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
        stream.append(&[("k", "new")]).unwrap();
        let shard = ShardId::new("shardId-000000000000");
        assert_eq!(
            read_all(&stream, &shard, StartPosition::TrimHorizon).0,
            ["r0", "r1", "new"]
        );
    }

    #[test]
    fn a_reader_stops_at_a_torn_tail_until_a_writer_repairs_it() {
        let (dir, stream, clock) = stream(1);
        stream.append(&records("k", "r", 2)).unwrap();
        let path = log_path(&stream);
        drop(stream);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[40, 0, 0]).unwrap();
        drop(file);
        // A reader-only handle (as if a writer were still alive) must not truncate, only wait.
        let reader_handle = {
            let _writer = FileLock::try_lock(&dir.path().join("test/writer.lock"))
                .unwrap()
                .unwrap();
            LocalStream::open_with(dir.path(), "test", LocalStreamConfig::new().clock(clock))
                .unwrap()
        };
        let shard = ShardId::new("shardId-000000000000");
        let (kept, status) = read_all(&reader_handle, &shard, StartPosition::TrimHorizon);
        assert_eq!((kept.len(), status), (2, ShardStatus::CaughtUp));
        // The first write takes the lock and repairs the log.
        reader_handle.append(&[("k", "new")]).unwrap();
        assert_eq!(
            read_all(&reader_handle, &shard, StartPosition::TrimHorizon)
                .0
                .len(),
            3
        );
    }

    #[test]
    fn recovery_removes_log_files_no_shard_refers_to() {
        let (dir, stream, clock) = stream(1);
        let orphan = stream.dir().join("shards/shardId-000000000007.0.log");
        fs::write(&orphan, LOG_MAGIC).unwrap();
        let temp = stream.dir().join(".tmp-1-2");
        fs::write(&temp, b"{").unwrap();
        drop(stream);
        let _stream = reopen(dir.path(), &clock);
        assert!(!orphan.exists() && !temp.exists());
    }

    #[test]
    fn appends_with_fsync_are_readable_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let stream = LocalStream::create(dir.path(), "test", 2, LocalStreamConfig::new()).unwrap();
        let puts = stream.append(&records("key", "v", 10)).unwrap();
        drop(stream);
        let stream = LocalStream::open(dir.path(), "test").unwrap();
        let (values, _) = read_all(&stream, &puts[0].shard, StartPosition::TrimHorizon);
        assert_eq!(values.len(), 10);
    }
}

//! `LocalDirSink`: outputs as JSON files, one per output identity, replaced atomically, so a
//! replay overwrites instead of duplicating.
//!
//! Layout: `<root>/<topology>/<shard id>/<OutputId::to_path()>.json`, e.g.
//! `out/clicks/shardId-000000000000/w/00000000000000060000-00000000000000120000/user-1.json`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shardflow_core::error::SinkError;
use shardflow_core::position::ShardId;
use shardflow_core::sink::{InspectSink, OutputBatch, Sink, SinkContext, SinkWriter};
use tracing::info;

use super::escape::{escape_component, unescape_component};
use super::fs::{remove_temp_files, sync_dir, temp_path_for};

const OUTPUT_SUFFIX: &str = ".json";
/// The longest file name common file systems take (ext4, XFS, APFS, NTFS: 255 bytes).
const MAX_FILE_NAME_BYTES: usize = 255;
/// A temp file removed by another process's crash cleanup between its write and its rename is
/// written again; more than this many times in a row means something else is wrong.
const RENAME_ATTEMPTS: usize = 3;

/// Why a [`LocalDirSink`] operation failed (the source of a [`SinkError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalDirSinkError {
    /// A file system operation failed.
    #[error("{operation} {path} failed: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A value could not be written as JSON (a map with non-string keys, a failing `Serialize`).
    #[error("output {output} cannot be encoded as JSON: {source}")]
    Encode {
        /// The output's identity path.
        output: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored output does not parse as the sink's type.
    #[error(
        "output file {} does not hold the expected type: {}",
        shardflow_core::redact::output_path(&path.to_string_lossy()),
        shardflow_core::redact::without_values(&source.to_string())
    )]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// An output's file name is longer than file systems allow. Identities shorten long keys
    /// (`shardflow_core::sink::MAX_ESCAPED_KEY_BYTES`), so only a sink wrapper that renames
    /// outputs can cause this. The name is not quoted: it holds a key.
    #[error("an output file name in {dir} is {len} bytes; the limit is {MAX_FILE_NAME_BYTES}")]
    NameTooLong {
        /// The directory it was to be written in.
        dir: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

impl LocalDirSinkError {
    fn io(operation: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            operation,
            path: path.to_owned(),
            source,
        }
    }
}

/// A [`Sink`] writing each output to its own JSON file under a root directory.
///
/// Each output is written to a `.tmp-*` file in its target directory and renamed over the
/// target, so a file always holds a whole value; with fsync on (the default), the file is
/// fsynced before the rename and `commit` fsyncs the directories written to. The content is the
/// value as JSON followed by a newline. Opening the first writer of a topology removes `.tmp-*`
/// files a crash left behind.
///
/// ```
/// use shardflow_connectors::local::LocalDirSink;
///
/// let dir = tempfile::tempdir()?;
/// let sink = LocalDirSink::new(dir.path().join("out"));
/// assert!(sink.root().ends_with("out"));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LocalDirSink {
    root: Arc<Path>,
    name: Arc<str>,
    fsync: bool,
    /// Topologies whose crash leftovers this sink removed already: the cleanup runs once, before
    /// this sink's own writers have temp files in flight.
    cleaned: Arc<Mutex<HashSet<String>>>,
}

impl LocalDirSink {
    /// A sink writing under `root` (created when first written to).
    pub fn new(root: impl AsRef<Path>) -> Self {
        let root = root.as_ref();
        Self {
            // The last component only: a name labels metrics and logs, where a machine's
            // paths do not belong.
            name: Arc::from(format!(
                "dir:{}",
                root.file_name().map_or_else(
                    || root.display().to_string(),
                    |n| n.to_string_lossy().into_owned()
                )
            )),
            root: Arc::from(root),
            fsync: true,
            cleaned: Arc::default(),
        }
    }

    /// Whether outputs are fsynced before they are renamed into place, and their directories at
    /// commit (default true). Off, committed outputs survive a process crash but not a power
    /// loss.
    ///
    /// ```
    /// use shardflow_connectors::local::LocalDirSink;
    ///
    /// let sink = LocalDirSink::new("/tmp/shardflow-out").fsync(false);
    /// # let _ = sink;
    /// ```
    #[must_use]
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of one topology's outputs.
    pub fn topology_dir(&self, topology: &str) -> PathBuf {
        self.root.join(escape_component(topology))
    }

    /// Every output stored for `topology`, by (source shard, identity path), parsed as `T`.
    ///
    /// # Errors
    /// I/O failures, and files that do not parse as `T`.
    pub async fn read_topology<T: DeserializeOwned + Send + 'static>(
        &self,
        topology: &str,
    ) -> Result<BTreeMap<(ShardId, String), T>, SinkError> {
        let dir = self.topology_dir(topology);
        self.blocking("read", move || {
            let mut out = BTreeMap::new();
            read_topology_dir(&dir, &mut out)?;
            Ok(out)
        })
        .await
    }

    fn error(&self, operation: &'static str, error: LocalDirSinkError) -> SinkError {
        let retryable = matches!(error, LocalDirSinkError::Io { .. });
        SinkError {
            sink: self.name.to_string(),
            operation,
            retryable,
            source: Box::new(error),
        }
    }

    async fn blocking<R: Send + 'static>(
        &self,
        operation: &'static str,
        op: impl FnOnce() -> Result<R, LocalDirSinkError> + Send + 'static,
    ) -> Result<R, SinkError> {
        match tokio::task::spawn_blocking(op).await {
            Ok(result) => result.map_err(|e| self.error(operation, e)),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(SinkError {
                sink: self.name.to_string(),
                operation,
                retryable: true,
                source: Box::new(e),
            }),
        }
    }
}

#[async_trait]
impl<T: Serialize + Send + Sync + 'static> Sink<T> for LocalDirSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        let topology_dir = self.topology_dir(&cx.topology);
        let first = self
            .cleaned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(cx.topology.clone());
        let dir = topology_dir.clone();
        let topology = cx.topology.clone();
        let opened = self.blocking("open", move || {
            fs::create_dir_all(&dir)
                .map_err(|e| LocalDirSinkError::io("creating directory", &dir, e))?;
            if first {
                let removed = remove_temp_files(&dir)
                    .map_err(|e| LocalDirSinkError::io("cleaning", &dir, e))?;
                if removed > 0 {
                    info!(%topology, removed, "removed unfinished output files left by a crash");
                }
            }
            Ok(())
        })
        .await;
        if opened.is_err() && first {
            // Not cleaned after all: the next open tries again.
            self.cleaned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&cx.topology);
        }
        opened?;
        Ok(Box::new(DirSinkWriter {
            sink: self.clone(),
            topology_dir,
            known_dirs: HashSet::new(),
            dirty_dirs: BTreeSet::new(),
            bytes_written: 0,
            _values: PhantomData,
        }))
    }
}

#[async_trait]
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> InspectSink<T> for LocalDirSink {
    /// Every committed output of every topology under the root (use one root per topology when
    /// inspecting, or [`LocalDirSink::read_topology`]).
    async fn committed(&self) -> Result<BTreeMap<(ShardId, String), T>, SinkError> {
        let root = self.root.to_path_buf();
        self.blocking("read", move || {
            let mut out = BTreeMap::new();
            for topology in sorted_entries(&root)? {
                if topology.is_dir() {
                    read_topology_dir(&topology, &mut out)?;
                }
            }
            Ok(out)
        })
        .await
    }
}

struct DirSinkWriter<T> {
    sink: LocalDirSink,
    topology_dir: PathBuf,
    /// Directories known to exist, so that each output costs no `mkdir`.
    known_dirs: HashSet<PathBuf>,
    /// Directories with entries written since the last commit.
    dirty_dirs: BTreeSet<PathBuf>,
    /// Bytes of the files written so far.
    bytes_written: u64,
    _values: PhantomData<fn(T)>,
}

#[async_trait]
impl<T: Serialize + Send + Sync + 'static> SinkWriter<T> for DirSinkWriter<T> {
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        if batch.outputs.is_empty() {
            return Ok(());
        }
        let shard_dir = self
            .topology_dir
            .join(escape_component(batch.shard.as_str()));
        let mut files = Vec::with_capacity(batch.outputs.len());
        for output in &batch.outputs {
            let path = output.id.to_path();
            let mut bytes = serde_json::to_vec(&output.value).map_err(|source| {
                self.sink.error(
                    "write",
                    LocalDirSinkError::Encode {
                        output: shardflow_core::redact::output_path(&path),
                        source,
                    },
                )
            })?;
            bytes.push(b'\n');
            let shown = shardflow_core::redact::output_path(&path);
            files.push(OutputFile {
                target: shard_dir.join(format!("{path}{OUTPUT_SUFFIX}")),
                shown: shard_dir.join(format!("{shown}{OUTPUT_SUFFIX}")),
                bytes,
            });
        }
        let bytes: usize = files.iter().map(|f| f.bytes.len()).sum();
        let mut state = OutputDirs {
            root: self.sink.root.to_path_buf(),
            known: std::mem::take(&mut self.known_dirs),
            dirty: std::mem::take(&mut self.dirty_dirs),
        };
        let fsync = self.sink.fsync;
        let (state, result) = match tokio::task::spawn_blocking(move || {
            let result = write_outputs(&files, fsync, &mut state);
            (state, result)
        })
        .await
        {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                return Err(SinkError {
                    sink: self.sink.name.to_string(),
                    operation: "write",
                    retryable: true,
                    source: Box::new(e),
                })
            }
        };
        self.known_dirs = state.known;
        self.dirty_dirs = state.dirty;
        result.map_err(|e| self.sink.error("write", e))?;
        self.bytes_written += bytes as u64;
        Ok(())
    }

    fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    async fn commit(&mut self) -> Result<(), SinkError> {
        if !self.sink.fsync || self.dirty_dirs.is_empty() {
            self.dirty_dirs.clear();
            return Ok(());
        }
        let dirs = self.dirty_dirs.clone();
        self.sink
            .blocking("commit", move || {
                for dir in &dirs {
                    sync_dir(dir).map_err(|e| {
                        let shown = shardflow_core::redact::output_path(&dir.to_string_lossy());
                        LocalDirSinkError::io("syncing", Path::new(&shown), e)
                    })?;
                }
                Ok(())
            })
            .await?;
        // Kept until synced: a failed commit is retried (or replayed), and must sync them then.
        self.dirty_dirs.clear();
        Ok(())
    }
}

struct OutputDirs {
    root: PathBuf,
    known: HashSet<PathBuf>,
    dirty: BTreeSet<PathBuf>,
}

/// One output's file: where it goes, the path errors show (its key replaced by its length,
/// `redact::output_path`), and its bytes.
struct OutputFile {
    target: PathBuf,
    shown: PathBuf,
    bytes: Vec<u8>,
}

fn write_outputs(
    files: &[OutputFile],
    fsync: bool,
    dirs: &mut OutputDirs,
) -> Result<(), LocalDirSinkError> {
    for OutputFile {
        target,
        shown,
        bytes,
    } in files
    {
        let dir = target.parent().expect("output paths have a directory");
        let shown_dir = shown.parent().expect("output paths have a directory");
        let len = target.file_name().map_or(0, |n| n.len());
        if len > MAX_FILE_NAME_BYTES {
            return Err(LocalDirSinkError::NameTooLong {
                dir: shown_dir.to_owned(),
                len,
            });
        }
        if !dirs.known.contains(dir) {
            fs::create_dir_all(dir)
                .map_err(|e| LocalDirSinkError::io("creating directory", shown_dir, e))?;
            // A new directory's own entry must reach the disk too: sync its ancestors once.
            for ancestor in dir.ancestors().skip(1) {
                dirs.dirty.insert(ancestor.to_path_buf());
                if ancestor == dirs.root {
                    break;
                }
            }
            dirs.known.insert(dir.to_path_buf());
        }
        replace_file(target, bytes, fsync)
            .map_err(|e| LocalDirSinkError::io("writing", shown, e))?;
        dirs.dirty.insert(dir.to_path_buf());
    }
    Ok(())
}

/// Writes `bytes` to a temp file beside `target` and renames it over the target.
fn replace_file(target: &Path, bytes: &[u8], fsync: bool) -> io::Result<()> {
    let mut attempt = 0;
    loop {
        let temp = temp_path_for(target);
        let written = (|| {
            let mut file = File::create(&temp)?;
            file.write_all(bytes)?;
            if fsync {
                // Before the rename: otherwise a power loss could leave the new name on an
                // empty file.
                file.sync_data()?;
            }
            Ok::<_, io::Error>(())
        })();
        let result = written.and_then(|()| fs::rename(&temp, target));
        match result {
            Ok(()) => return Ok(()),
            // Another process, starting up, took our temp file for a crash leftover.
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt + 1 < RENAME_ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        }
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, LocalDirSinkError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LocalDirSinkError::io("listing", dir, e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LocalDirSinkError::io("listing", dir, e))?;
        paths.push(entry.path());
    }
    paths.sort();
    Ok(paths)
}

fn read_topology_dir<T: DeserializeOwned>(
    topology_dir: &Path,
    out: &mut BTreeMap<(ShardId, String), T>,
) -> Result<(), LocalDirSinkError> {
    for shard_dir in sorted_entries(topology_dir)? {
        let Some(shard) = shard_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(unescape_component)
            .filter(|_| shard_dir.is_dir())
        else {
            continue;
        };
        let shard = ShardId::new(shard);
        read_outputs(&shard_dir, "", &shard, out)?;
    }
    Ok(())
}

fn read_outputs<T: DeserializeOwned>(
    dir: &Path,
    prefix: &str,
    shard: &ShardId,
    out: &mut BTreeMap<(ShardId, String), T>,
) -> Result<(), LocalDirSinkError> {
    for path in sorted_entries(dir)? {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Unfinished writes, and anything else hidden, are not outputs.
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            read_outputs(&path, &format!("{prefix}{name}/"), shard, out)?;
        } else if let Some(stem) = name.strip_suffix(OUTPUT_SUFFIX) {
            let bytes = fs::read(&path).map_err(|e| {
                let shown = shardflow_core::redact::output_path(&path.to_string_lossy());
                LocalDirSinkError::io("reading", Path::new(&shown), e)
            })?;
            let value =
                serde_json::from_slice(&bytes).map_err(|source| LocalDirSinkError::Decode {
                    path: path.clone(),
                    source,
                })?;
            out.insert((shard.clone(), format!("{prefix}{stem}")), value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use shardflow_core::lease::LeaseEpoch;
    use shardflow_core::position::{RecordPosition, SequenceNumber};
    use shardflow_core::sink::{Output, OutputId, Window};

    use super::*;

    fn cx() -> SinkContext {
        SinkContext {
            topology: "t".into(),
            instance: "shard-0".into(),
        }
    }

    #[tokio::test]
    async fn outputs_are_one_json_file_each_with_a_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalDirSink::new(dir.path());
        let mut writer = Sink::<serde_json::Value>::open(&sink, &cx()).await.unwrap();
        let id = OutputId::Keyed {
            key: "user 1".into(),
            window: Some(Window::new(0, 60_000)),
            index: 0,
        };
        let outputs = vec![Output {
            id: id.clone(),
            value: serde_json::json!({"n": 3}),
        }];
        writer
            .write(OutputBatch {
                shard: ShardId::new("shardId-000000000000"),
                lease_epoch: LeaseEpoch::new(1, 1),
                outputs,
            })
            .await
            .unwrap();
        writer.commit().await.unwrap();
        let file = dir
            .path()
            .join("t/shardId-000000000000")
            .join(format!("{}.json", id.to_path()));
        assert_eq!(fs::read_to_string(file).unwrap(), "{\"n\":3}\n");
    }

    #[tokio::test]
    async fn open_removes_temp_files_left_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let leftover = dir.path().join("t/shardId-000000000000/r/.tmp-123-abc");
        fs::create_dir_all(leftover.parent().unwrap()).unwrap();
        fs::write(&leftover, b"half a val").unwrap();
        let sink = LocalDirSink::new(dir.path());
        let _writer = Sink::<u64>::open(&sink, &cx()).await.unwrap();
        assert!(!leftover.exists());
        let committed: BTreeMap<_, u64> = sink.committed().await.unwrap();
        assert!(committed.is_empty());
    }

    #[tokio::test]
    async fn replayed_outputs_overwrite_instead_of_duplicating() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalDirSink::new(dir.path()).fsync(false);
        let shard = ShardId::new("s");
        let id = OutputId::Record {
            position: RecordPosition::new(SequenceNumber::from_u128(9)),
            index: 0,
        };
        for value in [1u64, 2, 2] {
            let mut writer = Sink::<u64>::open(&sink, &cx()).await.unwrap();
            let outputs = vec![Output {
                id: id.clone(),
                value,
            }];
            writer
                .write(OutputBatch {
                    shard: shard.clone(),
                    lease_epoch: LeaseEpoch::new(1, 1),
                    outputs,
                })
                .await
                .unwrap();
            writer.commit().await.unwrap();
        }
        let committed: BTreeMap<_, u64> = sink.read_topology("t").await.unwrap();
        assert_eq!(
            committed.into_iter().collect::<Vec<_>>(),
            [((shard, id.to_path()), 2)]
        );
    }

    #[tokio::test]
    async fn an_overlong_key_is_written_under_a_shortened_name() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalDirSink::new(dir.path());
        let mut writer = Sink::<u64>::open(&sink, &cx()).await.unwrap();
        let id = OutputId::Keyed {
            key: "k".repeat(300).into(),
            window: None,
            index: 0,
        };
        let outputs = vec![Output {
            id: id.clone(),
            value: 1,
        }];
        writer
            .write(OutputBatch {
                shard: ShardId::new("s"),
                lease_epoch: LeaseEpoch::new(1, 1),
                outputs,
            })
            .await
            .expect("a 300-byte key fits once shortened");
        writer.commit().await.unwrap();
        let stored: BTreeMap<(ShardId, String), u64> = InspectSink::committed(&sink).await.unwrap();
        assert_eq!(stored.get(&(ShardId::new("s"), id.to_path())), Some(&1));
        assert!(id.to_path().len() < 120, "{}", id.to_path());
    }
}

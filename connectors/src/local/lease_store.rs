//! `FileLeaseStore`: leases as JSON files in a directory, updated under a file lock, so that
//! workers in several processes on one machine share them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use shardflow_core::error::LeaseError;
use shardflow_core::lease::{apply_update, check_delete, Lease, LeaseStore, LeaseUpdate};

use super::escape::{escape_component, unescape_component};
use super::fs::{sync_dir, write_atomic, FileLock};

/// The lock every read-modify-write takes; its name starts with `.` so that no lease file
/// (escaped names never do) can collide with it.
const LOCK_FILE: &str = ".lock";
/// The table generation (see `LeaseEpoch`): milliseconds since the Unix epoch when the first
/// lease was written to the directory. A directory deleted and created again gets a later one.
const GENERATION_FILE: &str = ".generation";
const LEASE_SUFFIX: &str = ".json";

/// Why a [`FileLeaseStore`] operation failed (the source of a `LeaseError::Store`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileLeaseStoreError {
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
    /// A lease could not be encoded as JSON.
    #[error("lease {key:?} cannot be encoded as JSON: {source}")]
    Encode {
        /// The lease key.
        key: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The generation file does not hold a number.
    #[error("{path} does not hold a lease table generation (a decimal number); fix or remove it")]
    BadGeneration {
        /// The file.
        path: PathBuf,
    },
    /// A lease file does not hold a lease (edited by hand, or another program's file).
    #[error("lease file {path} is not a valid lease: {source}; fix or remove it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl FileLeaseStoreError {
    fn io(operation: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            operation,
            path: path.to_owned(),
            source,
        }
    }

    fn into_lease_error(self, operation: &'static str) -> LeaseError {
        let retryable = matches!(self, Self::Io { .. });
        LeaseError::Store {
            operation,
            retryable,
            source: Box::new(self),
        }
    }
}

/// A durable [`LeaseStore`] in a directory: one `<escaped key>.json` file per lease.
///
/// Every write takes an exclusive lock on `<dir>/.lock` (so writers in threads and processes
/// are serialized), applies [`apply_update`] to the lease as stored, and replaces the file
/// atomically (temp file, fsync, rename, directory fsync). Reads take no lock: a rename is
/// atomic, so a reader sees a whole lease, old or new.
///
/// ```
/// use shardflow_connectors::local::FileLeaseStore;
/// use shardflow_core::lease::{Lease, LeaseStore, LeaseUpdate};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store = FileLeaseStore::new(dir.path());
/// store.create_if_absent(&Lease::new("shardId-000000000000", vec![])).await?;
/// let taken = store
///     .update("shardId-000000000000", 0, &LeaseUpdate::Take { owner: "worker-1".into() })
///     .await?;
/// assert_eq!(taken.owner.as_deref(), Some("worker-1"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct FileLeaseStore {
    dir: Arc<Path>,
    fsync: bool,
    /// Files the last `list` skipped: named like leases but not readable as one.
    skipped: Arc<std::sync::atomic::AtomicUsize>,
}

impl FileLeaseStore {
    /// A store in `dir`, created at the first write if missing.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: Arc::from(dir.as_ref()),
            fsync: true,
            skipped: Arc::default(),
        }
    }

    /// Whether writes are fsynced before they return (default true). Off, a power loss may
    /// undo recent lease changes; a process crash does not.
    ///
    /// ```
    /// use shardflow_connectors::local::FileLeaseStore;
    ///
    /// let store = FileLeaseStore::new("/tmp/leases").fsync(false);
    /// # let _ = store;
    /// ```
    #[must_use]
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.dir
            .join(format!("{}{LEASE_SUFFIX}", escape_component(key)))
    }

    fn lock(&self) -> Result<FileLock, FileLeaseStoreError> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| FileLeaseStoreError::io("creating directory", &self.dir, e))?;
        let path = self.dir.join(LOCK_FILE);
        FileLock::lock(&path).map_err(|e| FileLeaseStoreError::io("locking", &path, e))
    }

    /// The directory's generation, if it has one yet.
    fn read_generation(&self) -> Result<Option<u64>, FileLeaseStoreError> {
        let path = self.dir.join(GENERATION_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| FileLeaseStoreError::BadGeneration { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FileLeaseStoreError::io("reading", &path, e)),
        }
    }

    /// The directory's generation, written now if it has none (under the write lock, so two
    /// writers agree on it). A directory written by a version without generations gets one at
    /// its next write; its leases read as generation 0 until then, below any later epoch.
    fn generation_locked(&self, _lock: &FileLock) -> Result<u64, FileLeaseStoreError> {
        if let Some(generation) = self.read_generation()? {
            return Ok(generation);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        let path = self.dir.join(GENERATION_FILE);
        write_atomic(&path, format!("{now}\n").as_bytes(), self.fsync)
            .map_err(|e| FileLeaseStoreError::io("writing", &path, e))?;
        Ok(now)
    }

    fn read(&self, path: &Path) -> Result<Option<Lease>, FileLeaseStoreError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FileLeaseStoreError::io("reading", path, e)),
        };
        let lease: Lease =
            serde_json::from_slice(&bytes).map_err(|source| FileLeaseStoreError::Corrupt {
                path: path.to_owned(),
                source,
            })?;
        Ok(Some(Lease {
            generation: self.read_generation()?.unwrap_or(0),
            ..lease
        }))
    }

    fn write(&self, lease: &Lease) -> Result<(), FileLeaseStoreError> {
        let path = self.path_of(&lease.key);
        let mut bytes =
            serde_json::to_vec_pretty(lease).map_err(|source| FileLeaseStoreError::Encode {
                key: lease.key.clone(),
                source,
            })?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes, self.fsync)
            .map_err(|e| FileLeaseStoreError::io("writing", &path, e))
    }

    fn list_blocking(&self) -> Result<Vec<Lease>, FileLeaseStoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(FileLeaseStoreError::io("listing", &self.dir, e)),
        };
        let mut leases = Vec::new();
        let mut skipped = 0;
        for entry in entries {
            let entry = entry.map_err(|e| FileLeaseStoreError::io("listing", &self.dir, e))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(LEASE_SUFFIX)) else {
                continue;
            };
            // Temp files and the lock start with `.`; foreign files do not unescape.
            if stem.starts_with('.') || unescape_component(stem).is_none() {
                continue;
            }
            // A lease deleted since the listing is simply gone; a damaged file is skipped
            // (and logged) rather than failing every shard sync.
            match self.read(&entry.path()) {
                Ok(Some(lease)) => leases.push(lease),
                Ok(None) => {}
                Err(error @ FileLeaseStoreError::Corrupt { .. }) => {
                    skipped += 1;
                    tracing::warn!(%error, "skipping a lease file that does not parse");
                }
                Err(error) => return Err(error),
            }
        }
        self.skipped
            .store(skipped, std::sync::atomic::Ordering::Relaxed);
        // By key, not by file name: escaping does not keep the order.
        leases.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(leases)
    }

    fn create_blocking(&self, lease: &Lease) -> Result<bool, FileLeaseStoreError> {
        let lock = self.lock()?;
        self.generation_locked(&lock)?;
        if self.read(&self.path_of(&lease.key))?.is_some() {
            return Ok(false);
        }
        self.write(lease)?;
        Ok(true)
    }

    fn update_blocking(
        &self,
        key: &str,
        expected_counter: u64,
        update: &LeaseUpdate,
    ) -> Result<Lease, LeaseError> {
        let op = update.name();
        let lock = self.lock().map_err(|e| e.into_lease_error(op))?;
        self.generation_locked(&lock)
            .map_err(|e| e.into_lease_error(op))?;
        let current = self
            .read(&self.path_of(key))
            .map_err(|e| e.into_lease_error(op))?
            .ok_or_else(|| LeaseError::NotFound {
                lease_key: key.to_owned(),
            })?;
        let next = apply_update(&current, expected_counter, update)?;
        self.write(&next).map_err(|e| e.into_lease_error(op))?;
        Ok(next)
    }

    fn delete_blocking(&self, key: &str, expected_counter: u64) -> Result<(), LeaseError> {
        let fail = |e: FileLeaseStoreError| e.into_lease_error("delete");
        let _lock = self.lock().map_err(fail)?;
        let path = self.path_of(key);
        let current = self
            .read(&path)
            .map_err(fail)?
            .ok_or_else(|| LeaseError::NotFound {
                lease_key: key.to_owned(),
            })?;
        check_delete(&current, expected_counter)?;
        fs::remove_file(&path).map_err(|e| fail(FileLeaseStoreError::io("removing", &path, e)))?;
        if self.fsync {
            sync_dir(&self.dir)
                .map_err(|e| fail(FileLeaseStoreError::io("syncing", &self.dir, e)))?;
        }
        Ok(())
    }

    /// Runs blocking file I/O off the async threads.
    async fn blocking<R: Send + 'static>(
        &self,
        operation: &'static str,
        op: impl FnOnce(&Self) -> Result<R, LeaseError> + Send + 'static,
    ) -> Result<R, LeaseError> {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || op(&store)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(LeaseError::Store {
                operation,
                retryable: true,
                source: Box::new(e),
            }),
        }
    }
}

#[async_trait]
impl LeaseStore for FileLeaseStore {
    fn skipped_items(&self) -> usize {
        self.skipped.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        self.blocking("list", |s| {
            s.list_blocking().map_err(|e| e.into_lease_error("list"))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Lease>, LeaseError> {
        let key = key.to_owned();
        self.blocking("get", move |s| {
            s.read(&s.path_of(&key))
                .map_err(|e| e.into_lease_error("get"))
        })
        .await
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let lease = lease.clone();
        self.blocking("create", move |s| {
            s.create_blocking(&lease)
                .map_err(|e| e.into_lease_error("create"))
        })
        .await
    }

    async fn update(
        &self,
        key: &str,
        expected_counter: u64,
        update: &LeaseUpdate,
    ) -> Result<Lease, LeaseError> {
        let (key, update) = (key.to_owned(), update.clone());
        self.blocking(update.name(), move |s| {
            s.update_blocking(&key, expected_counter, &update)
        })
        .await
    }

    async fn delete(&self, key: &str, expected_counter: u64) -> Result<(), LeaseError> {
        let key = key.to_owned();
        self.blocking("delete", move |s| s.delete_blocking(&key, expected_counter))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_survive_a_new_store_on_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileLeaseStore::new(dir.path());
        store
            .create_if_absent(&Lease::new("stream:shard/1", vec![]))
            .await
            .unwrap();
        store
            .update(
                "stream:shard/1",
                0,
                &LeaseUpdate::Take { owner: "w".into() },
            )
            .await
            .unwrap();
        let reopened = FileLeaseStore::new(dir.path());
        let lease = reopened.get("stream:shard/1").await.unwrap().unwrap();
        assert_eq!((lease.owner.as_deref(), lease.counter), (Some("w"), 1));
        assert_eq!(reopened.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_damaged_lease_file_is_skipped_not_a_failed_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileLeaseStore::new(dir.path());
        store
            .create_if_absent(&Lease::new("shard-1", vec![]))
            .await
            .unwrap();
        std::fs::write(
            dir.path().join(format!("shard-2{LEASE_SUFFIX}")),
            b"{\"half\": ",
        )
        .unwrap();
        let leases = store.list().await.expect("the damaged file is skipped");
        assert_eq!(leases.len(), 1);
        assert_eq!(store.skipped_items(), 1);
    }

    #[tokio::test]
    async fn a_store_on_a_missing_directory_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileLeaseStore::new(dir.path().join("not-yet"));
        assert!(store.list().await.unwrap().is_empty());
        assert_eq!(store.get("x").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_damaged_lease_file_is_a_store_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileLeaseStore::new(dir.path());
        std::fs::write(dir.path().join("s.json"), b"{ not json").unwrap();
        let err = store.get("s").await.unwrap_err();
        assert!(
            matches!(
                err,
                LeaseError::Store {
                    retryable: false,
                    ..
                }
            ),
            "got {err:?}"
        );
        assert!(err.to_string().contains("get"), "{err}");
    }
}

//! `LocalStateStore`: snapshot parts of keyed state as files in a directory, for the embedded
//! backend (one machine; with leases in DynamoDB use a store every worker reaches, S3).

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use shardflow_core::error::SinkError;
use shardflow_core::state_store::StateStore;

use super::fs::{sync_dir, write_atomic, TEMP_PREFIX};

/// Stores each part as the file `<dir>/<name>`, written to a temporary file, synced and
/// renamed into place, so a part is whole or absent. Names are `state_store::part_name`s:
/// a name with an empty, `.` or `..` component, or a byte other than letters, digits and
/// `-_.:%`, is refused rather than escaped, so a file's path is always its name.
#[derive(Clone, Debug)]
pub struct LocalStateStore {
    dir: PathBuf,
    name: String,
}

impl LocalStateStore {
    /// Parts under `dir` (created as needed).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref().to_path_buf();
        let last = dir
            .file_name()
            .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
        Self {
            name: format!("dir:{last}"),
            dir,
        }
    }

    fn error(&self, operation: &'static str, name: &str, error: &io::Error) -> SinkError {
        SinkError {
            sink: self.name.clone(),
            operation,
            retryable: error.kind() != io::ErrorKind::InvalidInput,
            source: format!("{name}: {}", error.kind()).into(),
        }
    }

    /// The file of object `name`, if the name is one this store takes.
    fn path(&self, name: &str) -> io::Result<PathBuf> {
        let valid = |c: &str| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && !c.starts_with(TEMP_PREFIX)
                && c.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'%')
                })
        };
        if !name.split('/').all(valid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a snapshot part name",
            ));
        }
        Ok(self.dir.join(name))
    }
}

/// Every file under `dir`, as names relative to `root` joined with `/`.
fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            files_under(root, &path, out)?;
        } else if let Ok(relative) = path.strip_prefix(root) {
            let parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    Ok(())
}

#[async_trait]
impl StateStore for LocalStateStore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        let path = self
            .path(name)
            .map_err(|e| self.error("store a snapshot part", name, &e))?;
        let root = self.dir.clone();
        let bytes = bytes.to_vec();
        let written = tokio::task::spawn_blocking(move || {
            let parent = path.parent().unwrap_or(&root).to_path_buf();
            std::fs::create_dir_all(&parent)?;
            write_atomic(&path, &bytes, true)?;
            // Directories `create_dir_all` may have made: durable up to the store's own, so
            // that a checkpoint never names a part a power loss took back.
            for dir in parent
                .ancestors()
                .skip(1)
                .take_while(|d| d.starts_with(&root))
            {
                sync_dir(dir)?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        written.map_err(|e| self.error("store a snapshot part", name, &e))
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, SinkError> {
        let path = self
            .path(name)
            .map_err(|e| self.error("read a snapshot part", name, &e))?;
        let read = tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        read.map_err(|e| self.error("read a snapshot part", name, &e))
    }

    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        let path = self
            .path(name)
            .map_err(|e| self.error("delete a snapshot part", name, &e))?;
        let root = self.dir.clone();
        let deleted = tokio::task::spawn_blocking(move || {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            // The snapshot's directories, once empty (no one writes an old snapshot again).
            for dir in path.ancestors().skip(1).take(2) {
                if dir == root || std::fs::remove_dir(dir).is_err() {
                    break;
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        deleted.map_err(|e| self.error("delete a snapshot part", name, &e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        // Walk the deepest directory the prefix names whole.
        let dir_part = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let start = if dir_part.is_empty() {
            self.dir.clone()
        } else {
            self.path(dir_part)
                .map_err(|e| self.error("list snapshot parts", prefix, &e))?
        };
        let root = self.dir.clone();
        let prefix_owned = prefix.to_owned();
        let listed = tokio::task::spawn_blocking(move || {
            let mut names = Vec::new();
            files_under(&root, &start, &mut names)?;
            names.retain(|n| n.starts_with(&prefix_owned));
            names.sort();
            Ok(names)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        listed.map_err(|e| self.error("list snapshot parts", prefix, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_state_store_conformance_suite() {
        let root = tempfile::tempdir().unwrap();
        let counter = std::sync::atomic::AtomicUsize::new(0);
        shardflow_core::testing::state_store_conformance(|| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dir = root.path().join(format!("store-{n}"));
            async move { LocalStateStore::new(dir) }
        })
        .await;
    }

    #[tokio::test]
    async fn names_that_could_leave_the_directory_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalStateStore::new(root.path().join("state"));
        for name in ["../x", "a//b", "a/./b", "a/b c", "/abs"] {
            let error = store.put(name, b"x").await.unwrap_err();
            assert!(!error.retryable, "{name}: {error}");
        }
        assert!(!root.path().join("x").exists());
    }
}

//! `LocalPayloadStore`: dead letters' payloads too large for their sink, as files named by the
//! record's position (`DeadLetter::to_with_overflow`) on the embedded backend.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use shardflow_core::error::SinkError;
use shardflow_core::payload_store::PayloadStore;

use super::escape::escape_component;
use super::fs::{sync_dir, write_atomic};

/// Stores payloads as files `<dir>/<topology>/<stream>/<shard>/<sequence>-<sub-sequence>`,
/// each written to a temporary file, synced and renamed into place, so a file is whole or
/// absent; a replay writes the same bytes again.
#[derive(Clone, Debug)]
pub struct LocalPayloadStore {
    dir: PathBuf,
    name: String,
}

impl LocalPayloadStore {
    /// Payloads under `dir` (created as needed).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref().to_path_buf();
        let last = dir
            .file_name()
            .map_or_else(|| "payloads".into(), |n| n.to_string_lossy().into_owned());
        Self {
            name: format!("dir:{last}"),
            dir,
        }
    }

    /// The file of object `name`: each `/`-separated component escaped (`escape_component`),
    /// so that a stream or shard named `..` stays inside the store.
    fn path(&self, name: &str) -> PathBuf {
        name.split('/').fold(self.dir.clone(), |path, part| {
            path.join(escape_component(part))
        })
    }
}

#[async_trait]
impl PayloadStore for LocalPayloadStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn location(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        let path = self.path(name);
        let root = self.dir.clone();
        let bytes = bytes.to_vec();
        let written = tokio::task::spawn_blocking(move || {
            let parent = path.parent().unwrap_or(&root);
            std::fs::create_dir_all(parent)?;
            write_atomic(&path, &bytes, true)?;
            // The directories `create_dir_all` may have made: durable entries up to the store's
            // own, so that a committed letter never names a file a power loss took back.
            for dir in parent
                .ancestors()
                .skip(1)
                .take_while(|d| d.starts_with(&root))
            {
                sync_dir(dir)?;
            }
            let above = root
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| Path::new("."));
            sync_dir(above)
        })
        .await;
        let error = match written {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(e) => std::io::Error::other(e.to_string()),
        };
        Err(SinkError {
            sink: self.name.clone(),
            operation: "store a dead letter's payload",
            retryable: true,
            // The kind and the object's name (a position), never the payload.
            source: format!("writing {name}: {}", error.kind()).into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn payloads_are_files_named_by_position_and_a_second_put_replaces_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalPayloadStore::new(dir.path().join("overflow"));
        let name = "clicks/events/1764547200/shardId-000000000001/4959-0";
        store.put(name, b"first").await.unwrap();
        store.put(name, b"whole payload").await.unwrap();
        let path = dir
            .path()
            .join("overflow/clicks/events/1764547200/shardId-000000000001/4959-0");
        assert_eq!(std::fs::read(&path).unwrap(), b"whole payload");
        assert_eq!(store.location(name), path.display().to_string());
        assert_eq!(store.name(), "dir:overflow");
        // A stream named `..` (Kinesis allows it) stays inside the store.
        store.put("t/../0/s/1-0", b"x").await.unwrap();
        let escaped = dir.path().join("overflow/t/%../0/s/1-0");
        assert_eq!(std::fs::read(&escaped).unwrap(), b"x");
    }
}

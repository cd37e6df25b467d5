//! The stream's metadata file: its shards, their hash key ranges, parents, state and logs.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shardflow_core::position::{ShardId, ShardInfo};

use super::error::LocalStreamError;
use super::fs::write_atomic;

/// The metadata file's name inside the stream directory.
pub(crate) const METADATA_FILE: &str = "metadata.json";
/// The folder of shard logs inside the stream directory.
pub(crate) const SHARDS_DIR: &str = "shards";
/// The version of the layout this code reads and writes.
const FORMAT: u32 = 1;

/// What `metadata.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StreamMetadata {
    pub(crate) format: u32,
    pub(crate) name: String,
    pub(crate) retention_ms: u64,
    /// When the stream was created (ms since the Unix epoch, by the stream's clock); 0 in
    /// streams created before it was recorded. Lease keys name it, so that a stream deleted
    /// and created again starts with fresh leases.
    #[serde(default)]
    pub(crate) created_ms: i64,
    /// Every sequence number handed out so far is below this, counting records of shards that
    /// are closed or trimmed and therefore not scanned when a writer starts.
    #[serde(with = "decimal")]
    pub(crate) sequence_floor: u128,
    /// The number in the next shard id.
    pub(crate) next_shard_index: u64,
    /// Every shard, open and closed, in creation order.
    pub(crate) shards: Vec<ShardMeta>,
}

/// One shard in the metadata (field names follow Kinesis `DescribeStream`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShardMeta {
    pub(crate) id: String,
    #[serde(with = "decimal")]
    pub(crate) starting_hash_key: u128,
    #[serde(with = "decimal")]
    pub(crate) ending_hash_key: u128,
    pub(crate) parent: Option<String>,
    pub(crate) adjacent_parent: Option<String>,
    pub(crate) closed: bool,
    /// Bumped by each trim, which writes the retained records to a new log file.
    pub(crate) log_generation: u64,
}

impl ShardMeta {
    /// The name of the shard's current log file.
    pub(crate) fn log_name(&self) -> String {
        format!("{}.{}.log", self.id, self.log_generation)
    }

    /// The shard as the `Source` trait describes it.
    pub(crate) fn info(&self) -> ShardInfo {
        ShardInfo {
            id: ShardId::new(&self.id),
            parents: self
                .parent
                .iter()
                .chain(&self.adjacent_parent)
                .map(ShardId::new)
                .collect(),
            hash_key_range: (self.starting_hash_key, self.ending_hash_key),
            closed: self.closed,
        }
    }
}

/// The Kinesis form of shard ids.
pub(crate) fn shard_id(index: u64) -> String {
    format!("shardId-{index:012}")
}

impl StreamMetadata {
    pub(crate) fn new(name: &str, retention_ms: u64, created_ms: i64) -> Self {
        Self {
            format: FORMAT,
            name: name.to_owned(),
            retention_ms,
            created_ms,
            sequence_floor: 1,
            next_shard_index: 0,
            shards: Vec::new(),
        }
    }

    /// Adds an open shard with a fresh id.
    pub(crate) fn add_shard(
        &mut self,
        range: (u128, u128),
        parent: Option<String>,
        adjacent_parent: Option<String>,
    ) -> &ShardMeta {
        let id = shard_id(self.next_shard_index);
        self.next_shard_index += 1;
        self.shards.push(ShardMeta {
            id,
            starting_hash_key: range.0,
            ending_hash_key: range.1,
            parent,
            adjacent_parent,
            closed: false,
            log_generation: 0,
        });
        self.shards.last().expect("just pushed")
    }

    pub(crate) fn shard(&self, id: &str) -> Option<&ShardMeta> {
        self.shards.iter().find(|s| s.id == id)
    }

    pub(crate) fn shard_mut(&mut self, id: &str) -> Option<&mut ShardMeta> {
        self.shards.iter_mut().find(|s| s.id == id)
    }

    pub(crate) fn open_shards(&self) -> impl Iterator<Item = &ShardMeta> {
        self.shards.iter().filter(|s| !s.closed)
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("metadata serializes");
        bytes.push(b'\n');
        bytes
    }
}

/// The stream directory's files.
#[derive(Clone, Debug)]
pub(crate) struct StreamPaths {
    pub(crate) dir: PathBuf,
}

impl StreamPaths {
    pub(crate) fn metadata(&self) -> PathBuf {
        self.dir.join(METADATA_FILE)
    }

    pub(crate) fn shards_dir(&self) -> PathBuf {
        self.dir.join(SHARDS_DIR)
    }

    pub(crate) fn log(&self, shard: &ShardMeta) -> PathBuf {
        self.shards_dir().join(shard.log_name())
    }

    /// Held for the lifetime of the stream's writer.
    pub(crate) fn writer_lock(&self) -> PathBuf {
        self.dir.join("writer.lock")
    }

    /// Held briefly by whoever checks or takes the writer lock; see `writer.rs`.
    pub(crate) fn recovery_lock(&self) -> PathBuf {
        self.dir.join("recovery.lock")
    }

    /// Reads and parses the metadata; `Ok(None)` if there is none.
    pub(crate) fn read_metadata(
        &self,
        stream: &str,
    ) -> Result<Option<(StreamMetadata, Vec<u8>)>, LocalStreamError> {
        let path = self.metadata();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LocalStreamError::io(stream, "reading metadata", path, e)),
        };
        let meta: StreamMetadata =
            serde_json::from_slice(&bytes).map_err(|source| LocalStreamError::Metadata {
                stream: stream.to_owned(),
                path: path.clone(),
                source,
            })?;
        if meta.format != FORMAT {
            return Err(LocalStreamError::Corrupt {
                stream: stream.to_owned(),
                path,
                offset: 0,
                reason: format!(
                    "metadata format {} is not the supported {FORMAT}",
                    meta.format
                ),
            });
        }
        Ok(Some((meta, bytes)))
    }

    /// Reads the metadata of a stream that must exist.
    pub(crate) fn load(&self, stream: &str) -> Result<(StreamMetadata, Vec<u8>), LocalStreamError> {
        self.read_metadata(stream)?
            .ok_or_else(|| LocalStreamError::StreamNotFound {
                stream: stream.to_owned(),
                dir: self.dir.clone(),
            })
    }

    /// Replaces the metadata atomically (temp file, fsync, rename, directory fsync).
    pub(crate) fn write_metadata(
        &self,
        meta: &StreamMetadata,
        fsync: bool,
    ) -> Result<Vec<u8>, LocalStreamError> {
        let bytes = meta.to_bytes();
        let path = self.metadata();
        write_atomic(&path, &bytes, fsync)
            .map_err(|e| LocalStreamError::io(&meta.name, "writing metadata", path, e))?;
        Ok(bytes)
    }
}

/// Whether `dir` holds a stream.
pub(crate) fn exists(dir: &Path) -> bool {
    dir.join(METADATA_FILE).exists()
}

/// `u128` as a decimal string: JSON numbers beyond 2^53 lose precision in most readers, and
/// Kinesis writes hash keys and sequence numbers as strings too.
mod decimal {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(n: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_with_hash_keys_as_strings() {
        let mut meta = StreamMetadata::new("s", 1000, 0);
        meta.add_shard((0, u128::MAX), None, None);
        meta.add_shard((5, 6), Some("shardId-000000000000".into()), None);
        let bytes = meta.to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains("\"340282366920938463463374607431768211455\""),
            "{text}"
        );
        let back: StreamMetadata = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, meta);
        assert_eq!(back.shards[1].id, "shardId-000000000001");
        assert_eq!(
            back.shards[1].info().parents,
            [ShardId::new("shardId-000000000000")]
        );
    }
}

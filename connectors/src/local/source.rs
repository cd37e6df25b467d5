//! `LocalSource`: a local stream as the `Source` a topology reads.

use async_trait::async_trait;
use shardflow_core::error::SourceError;
use shardflow_core::position::{ShardInfo, StartPosition};
use shardflow_core::source::{ReadLimits, ShardReader, Source, StreamFacts};

use super::error::LocalStreamError;
use super::stream::LocalStream;

/// Reads a [`LocalStream`]: lists its shards (closed ones too, with parent links) and opens
/// readers on them. Attach a decoder with `shardflow_core::decode::SourceExt`, e.g.
/// `LocalSource::new(&stream).json::<Click>()`.
///
/// ```
/// use shardflow_connectors::local::{LocalSource, LocalStream, LocalStreamConfig};
/// use shardflow_core::source::Source;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let stream = LocalStream::create(dir.path(), "events", 3, LocalStreamConfig::default())?;
/// let source = LocalSource::new(&stream);
/// assert_eq!(source.list_shards().await?.len(), 3);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct LocalSource {
    stream: LocalStream,
}

impl LocalSource {
    /// A source reading `stream` (the handle is shared, not reopened).
    pub fn new(stream: &LocalStream) -> Self {
        Self {
            stream: stream.clone(),
        }
    }

    /// The stream read.
    pub fn stream(&self) -> &LocalStream {
        &self.stream
    }

    async fn blocking<R: Send + 'static>(
        &self,
        op: impl FnOnce(LocalStream) -> Result<R, LocalStreamError> + Send + 'static,
    ) -> Result<R, SourceError> {
        let stream = self.stream.clone();
        match tokio::task::spawn_blocking(move || op(stream)).await {
            Ok(result) => result.map_err(SourceError::from),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(SourceError::Other {
                what: format!("local stream {:?}", self.stream.name()),
                retryable: true,
                source: Box::new(e),
            }),
        }
    }
}

#[async_trait]
impl Source for LocalSource {
    fn stream_name(&self) -> &str {
        self.stream.name()
    }

    async fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        self.blocking(|stream| stream.shards()).await
    }

    async fn facts(&self) -> Result<Option<StreamFacts>, SourceError> {
        let (created_ms, retention) = self
            .blocking(|stream| Ok((stream.created_ms()?, stream.retention()?)))
            .await?;
        Ok(Some(StreamFacts {
            created_ms,
            retention,
        }))
    }

    async fn open_shard(
        &self,
        shard: &ShardInfo,
        start: StartPosition,
        limits: ReadLimits,
    ) -> Result<Box<dyn ShardReader>, SourceError> {
        let id = shard.id.clone();
        let reader = self
            .blocking(move |stream| stream.reader(&id, start, limits))
            .await?;
        Ok(Box::new(reader))
    }
}

#[cfg(test)]
mod tests {
    use shardflow_core::decode::SourceExt;
    use shardflow_core::position::ShardId;
    use shardflow_core::source::ShardStatus;

    use super::super::test_support::stream;
    use super::*;

    #[tokio::test]
    async fn list_shards_includes_closed_shards_with_their_parents() {
        let (_dir, stream, _) = stream(2);
        let source = LocalSource::new(&stream);
        let parent = ShardId::new("shardId-000000000001");
        stream.split_shard(&parent, u128::MAX - 10).unwrap();
        let shards = source.list_shards().await.unwrap();
        assert_eq!(shards.len(), 4);
        assert!(shards[1].closed);
        assert_eq!(shards[2].parents, std::slice::from_ref(&parent));
        assert_eq!(shards[3].parents, [parent]);
        assert_eq!(source.stream_name(), "test");
    }

    #[tokio::test]
    async fn open_shard_reads_through_the_source_trait() {
        let (_dir, stream, _) = stream(1);
        stream.append(&[("k", r#"{"n":1}"#)]).unwrap();
        let source = LocalSource::new(&stream);
        let shard = source.list_shards().await.unwrap().remove(0);
        let mut reader = source
            .open_shard(&shard, StartPosition::TrimHorizon, ReadLimits::default())
            .await
            .unwrap();
        let batch = reader.read().await.unwrap();
        assert_eq!(batch.records.get(0).data, br#"{"n":1}"#);
        assert_eq!(batch.status, ShardStatus::CaughtUp);
        // The typed form a topology takes compiles against this source.
        let _typed = LocalSource::new(&stream).json::<serde_json::Value>();
    }

    #[tokio::test]
    async fn an_unknown_shard_is_source_shard_not_found() {
        let (_dir, stream, _) = stream(1);
        let source = LocalSource::new(&stream);
        let missing = ShardInfo {
            id: ShardId::new("shardId-000000000009"),
            parents: vec![],
            hash_key_range: (0, 1),
            closed: false,
        };
        let err = source
            .open_shard(&missing, StartPosition::TrimHorizon, ReadLimits::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, SourceError::ShardNotFound { .. }), "{err}");
        assert!(!err.is_retryable());
    }
}

//! `LocalProducer`: puts records into a local stream from async code, as a Kinesis producer.

use super::error::LocalStreamError;
use super::stream::{LocalStream, PutResult};

/// Writes records to a [`LocalStream`], doing the file I/O on tokio's blocking thread pool.
///
/// Records are checked against the Kinesis limits (partition keys of 1 to 256 characters, data
/// plus key at most 1 MiB) before anything is written; a bad record fails the whole call with a
/// typed error and is never truncated.
///
/// ```
/// use shardflow_connectors::local::{LocalProducer, LocalStream, LocalStreamConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let stream = LocalStream::create(dir.path(), "orders", 4, LocalStreamConfig::default())?;
/// let producer = LocalProducer::new(stream);
/// let put = producer.put("customer-7", br#"{"total":12}"#.to_vec()).await?;
/// let batch = producer.put_batch(&[("a", b"1".to_vec()), ("b", b"2".to_vec())]).await?;
/// assert!(batch[0].sequence > put.sequence);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct LocalProducer {
    stream: LocalStream,
}

impl LocalProducer {
    /// A producer writing to `stream`.
    pub fn new(stream: LocalStream) -> Self {
        Self { stream }
    }

    /// The stream written to.
    pub fn stream(&self) -> &LocalStream {
        &self.stream
    }

    /// Puts one record.
    ///
    /// # Errors
    /// See [`LocalStream::append`].
    pub async fn put(
        &self,
        partition_key: &str,
        data: impl Into<Vec<u8>>,
    ) -> Result<PutResult, LocalStreamError> {
        let records = vec![(partition_key.to_owned(), data.into())];
        let mut results = self.append(records).await?;
        Ok(results.pop().expect("one result per record"))
    }

    /// Puts a batch; results are in the order of `records`. Records of one shard are written
    /// together with one fsync.
    ///
    /// # Errors
    /// See [`LocalStream::append`]: a bad record fails the call before anything is written.
    pub async fn put_batch<K: AsRef<str>, D: AsRef<[u8]>>(
        &self,
        records: &[(K, D)],
    ) -> Result<Vec<PutResult>, LocalStreamError> {
        // Checked here as well as in the stream, so that a bad batch is not copied first.
        for (index, (key, data)) in records.iter().enumerate() {
            super::limits::check_record(self.stream.name(), index, key.as_ref(), data.as_ref())?;
        }
        let owned = records
            .iter()
            .map(|(k, d)| (k.as_ref().to_owned(), d.as_ref().to_vec()))
            .collect();
        self.append(owned).await
    }

    async fn append(
        &self,
        records: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<PutResult>, LocalStreamError> {
        let stream = self.stream.clone();
        match tokio::task::spawn_blocking(move || stream.append(&records)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only a runtime shutting down cancels a blocking task; whether the records were
            // written is unknown, as after a lost network reply.
            Err(e) => Err(LocalStreamError::io(
                self.stream.name(),
                "appending (runtime shut down)",
                self.stream.dir(),
                std::io::Error::other(e),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use shardflow_core::position::StartPosition;

    use super::super::limits::MAX_RECORD_BYTES;
    use super::super::test_support::{read_all, stream};
    use super::*;

    fn total_records(stream: &LocalStream) -> usize {
        stream
            .shards()
            .unwrap()
            .iter()
            .map(|s| read_all(stream, &s.id, StartPosition::TrimHorizon).0.len())
            .sum()
    }

    fn log_bytes(stream: &LocalStream) -> u64 {
        std::fs::read_dir(stream.dir().join("shards"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[tokio::test]
    async fn oversized_records_and_bad_keys_are_rejected_without_writing_anything() {
        let (_dir, stream, _) = stream(2);
        let producer = LocalProducer::new(stream.clone());
        producer.put("ok", b"1".to_vec()).await.unwrap();
        let before = log_bytes(&stream);

        let too_big = vec![0u8; MAX_RECORD_BYTES];
        let err = producer.put("k", too_big.clone()).await.unwrap_err();
        assert!(
            matches!(err, LocalStreamError::RecordTooLarge { index: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("1 MiB"), "{err}");

        let batch = [("a", vec![1u8]), ("b", vec![2]), ("c", too_big)];
        let err = producer.put_batch(&batch).await.unwrap_err();
        assert!(
            matches!(err, LocalStreamError::RecordTooLarge { index: 2, .. }),
            "{err}"
        );

        let err = producer.put("", b"x".to_vec()).await.unwrap_err();
        assert!(
            matches!(err, LocalStreamError::InvalidPartitionKey { chars: 0, .. }),
            "{err}"
        );
        let long_key = "k".repeat(257);
        let batch = [("fine", &b"x"[..]), (long_key.as_str(), &b"x"[..])];
        let err = producer.put_batch(&batch).await.unwrap_err();
        assert!(
            matches!(
                err,
                LocalStreamError::InvalidPartitionKey {
                    index: 1,
                    chars: 257,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_retryable());

        assert_eq!(
            log_bytes(&stream),
            before,
            "nothing written by rejected calls"
        );
        assert_eq!(total_records(&stream), 1);
    }

    #[tokio::test]
    async fn a_record_of_exactly_one_mebibyte_with_its_key_is_accepted() {
        let (_dir, stream, _) = stream(1);
        let producer = LocalProducer::new(stream.clone());
        let data = vec![7u8; MAX_RECORD_BYTES - 3];
        let put = producer.put("key", data).await.unwrap();
        let (values, _) = read_all(&stream, &put.shard, StartPosition::TrimHorizon);
        assert_eq!(values[0].len(), MAX_RECORD_BYTES - 3);
    }

    #[tokio::test]
    async fn put_batch_returns_positions_in_input_order() {
        let (_dir, stream, _) = stream(4);
        let producer = LocalProducer::new(stream.clone());
        let batch: Vec<(String, String)> = (0..100)
            .map(|i| (format!("key-{i}"), format!("value-{i}")))
            .collect();
        let puts = producer.put_batch(&batch).await.unwrap();
        assert_eq!(puts.len(), 100);
        for ((key, value), put) in batch.iter().zip(&puts) {
            assert_eq!(
                put.shard,
                stream
                    .shards()
                    .unwrap()
                    .into_iter()
                    .find(|s| {
                        (s.hash_key_range.0..=s.hash_key_range.1)
                            .contains(&super::super::partition_key_hash(key))
                    })
                    .unwrap()
                    .id
            );
            let mut reader = stream
                .reader(
                    &put.shard,
                    StartPosition::AtSequence(put.sequence.clone()),
                    Default::default(),
                )
                .unwrap();
            let batch = reader.read_blocking().unwrap();
            assert_eq!(batch.records.get(0).data, value.as_bytes());
            assert_eq!(batch.records.get(0).partition_key, key.as_bytes());
        }
    }
}

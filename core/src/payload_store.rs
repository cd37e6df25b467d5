//! `PayloadStore`: where a dead letter's whole payload goes when the dead-letter sink cannot take
//! it, as an object named by the record's position (`DeadLetter::to_with_overflow`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::SinkError;
use crate::position::{RecordPosition, ShardId};

/// Stores payloads as named objects. A put of a name replaces the object: a replay stores the
/// same bytes under the same name again, so a crash between the put and the dead letter's
/// commit leaves nothing that the replay does not write again.
#[async_trait]
pub trait PayloadStore: Send + Sync + 'static {
    /// The store's name, for logs and errors.
    fn name(&self) -> &str;

    /// Where object `name` is stored (what a dead letter's `stored_at` says): a path or URL
    /// that names the store and the object, never the payload.
    fn location(&self, name: &str) -> String;

    /// Stores `bytes` as object `name`, durably before it returns.
    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError>;
}

/// The object name of the payload of the record at `position` of `shard` of `stream` as created
/// at `created_secs` (seconds since the epoch, 0 if the source cannot tell; see
/// `protocol::lease_keys`), read by `topology`:
/// `<topology>/<stream>/<created>/<shard>/<sequence>-<sub-sequence>`. A stream deleted and
/// created again reuses shard ids, and may reuse sequence numbers (the local backend starts
/// them over): the creation keeps the new stream's payloads from replacing the old one's.
/// Stores that keep names as paths escape each component (a stream may be named `..`).
pub fn payload_name(
    topology: &str,
    stream: &str,
    created_secs: i64,
    shard: &ShardId,
    position: &RecordPosition,
) -> String {
    format!(
        "{topology}/{stream}/{created_secs}/{shard}/{}-{}",
        position.sequence, position.sub_sequence
    )
}

/// Payloads in memory: for tests. [`set_failing`](Self::set_failing) makes every put fail
/// (retryable), as a throttled store would.
#[derive(Default)]
pub struct MemoryPayloadStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    failing: AtomicBool,
    puts: std::sync::atomic::AtomicUsize,
}

impl MemoryPayloadStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The objects stored, by name.
    pub fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock().clone()
    }

    /// Puts tried, failed ones included.
    pub fn puts(&self) -> usize {
        self.puts.load(Ordering::SeqCst)
    }

    /// Makes every put fail (`true`) or succeed again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl PayloadStore for MemoryPayloadStore {
    fn name(&self) -> &str {
        "memory"
    }

    fn location(&self, name: &str) -> String {
        format!("memory:{name}")
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(SinkError {
                sink: "memory".into(),
                operation: "store a dead letter's payload",
                retryable: true,
                source: "the store is failing (set_failing)".into(),
            });
        }
        self.lock().insert(name.to_owned(), bytes.to_vec());
        Ok(())
    }
}

#[async_trait]
impl<P: PayloadStore + ?Sized> PayloadStore for std::sync::Arc<P> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn location(&self, name: &str) -> String {
        (**self).location(name)
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        (**self).put(name, bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::SequenceNumber;

    #[test]
    fn names_follow_the_position() {
        let position = RecordPosition {
            sequence: SequenceNumber::from_u128(49_590),
            sub_sequence: 3,
        };
        let name = payload_name(
            "clicks",
            "events",
            1_764_547_200,
            &ShardId::new("shardId-1"),
            &position,
        );
        assert_eq!(name, "clicks/events/1764547200/shardId-1/49590-3");
    }
}

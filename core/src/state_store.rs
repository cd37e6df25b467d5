//! `StateStore`: where snapshots of keyed state go (one object per keyed worker, shard and
//! snapshot), named deterministically so that a checkpoint can name them and a restart on any
//! machine can find them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::SinkError;
use crate::lease::LeaseEpoch;
use crate::protocol::checkpoint::Epoch;

/// Stores snapshot parts as named objects.
///
/// A put replaces the object and is durable before it returns; a get returns exactly the
/// bytes of the last put (or `None` for an object never stored, or deleted); a delete of an
/// absent object succeeds. Names come from [`part_name`] and [`shard_prefix`]: they hold
/// `/`, letters, digits, `-`, `_`, `.` and `:` only, and never `..` as a component.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The store's name, for logs and errors.
    fn name(&self) -> &str;

    /// Stores `bytes` as object `name`, durably before it returns.
    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError>;

    /// The bytes of object `name`, if it exists.
    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, SinkError>;

    /// Removes object `name` (nothing if it is absent).
    async fn delete(&self, name: &str) -> Result<(), SinkError>;

    /// The names of the objects whose names start with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, SinkError>;
}

/// Escapes a name component: letters, digits, `-`, `_`, `.` and `:` stay, other bytes become
/// `%XX`, and a component made only of dots gets a `%2E` first byte (no `.` or `..`).
fn component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, b) in text.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b':')
            || (b == b'.' && !(i == 0 && text.bytes().all(|c| c == b'.')));
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

/// Where every snapshot part of one shard of one topology lies:
/// `<topology>/<lease key>/`. The lease key names the stream, its creation and the shard
/// (`protocol::lease_keys`), so a stream created again under the same name never finds the
/// old stream's snapshots.
pub fn shard_prefix(topology: &str, lease_key: &str) -> String {
    format!("{}/{}/", component(topology), component(lease_key))
}

/// The object name of the part that keyed worker `worker` of operator `operator` wrote for
/// the snapshot taken after epoch `epoch` of the life `lease_epoch`:
/// `<shard prefix><generation>-<counter>-<epoch>/<operator>/<worker>`. The lease epoch keeps a
/// stale owner's parts apart from the current owner's: only the owner can write the
/// checkpoint that names a part.
pub fn part_name(
    prefix: &str,
    lease_epoch: LeaseEpoch,
    epoch: Epoch,
    operator: &str,
    worker: usize,
) -> String {
    format!(
        "{prefix}{}-{}-{epoch}/{}/{worker}",
        lease_epoch.generation,
        lease_epoch.counter,
        component(operator)
    )
}

/// The life and epoch a part under `prefix` was taken in, read back from its name
/// ([`part_name`]); `None` for a name of another form.
pub fn part_life(prefix: &str, name: &str) -> Option<(LeaseEpoch, Epoch)> {
    let rest = name.strip_prefix(prefix)?;
    let (snapshot, _) = rest.split_once('/')?;
    let mut numbers = snapshot.splitn(3, '-').map(str::parse::<u64>);
    let (generation, counter, epoch) = (
        numbers.next()?.ok()?,
        numbers.next()?.ok()?,
        numbers.next()?.ok()?,
    );
    Some((LeaseEpoch::new(generation, counter), epoch))
}

/// Snapshot parts in memory: for tests and the simulation checker.
/// [`set_failing`](Self::set_failing) makes every call fail (retryable), as a throttled store
/// would.
#[derive(Default)]
pub struct MemoryStateStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    failing: AtomicBool,
    puts: AtomicUsize,
    /// Every so many puts one fails (0: none).
    failing_puts_every: AtomicUsize,
}

impl MemoryStateStore {
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

    /// Makes every call fail (`true`) or succeed again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes one put in `n` fail (retryable; 0 for none), as a store that drops some writes
    /// would: some workers' parts of a snapshot are stored and others not.
    pub fn fail_puts_every(&self, n: usize) {
        self.failing_puts_every.store(n, Ordering::SeqCst);
    }

    fn check(&self, operation: &'static str) -> Result<(), SinkError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(SinkError {
                sink: "memory-state".into(),
                operation,
                retryable: true,
                source: "the store is failing (set_failing)".into(),
            });
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl StateStore for MemoryStateStore {
    fn name(&self) -> &str {
        "memory-state"
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        let n = self.puts.fetch_add(1, Ordering::SeqCst);
        self.check("store a snapshot part")?;
        let every = self.failing_puts_every.load(Ordering::SeqCst);
        if every > 0 && n % every == 0 {
            return Err(SinkError {
                sink: "memory-state".into(),
                operation: "store a snapshot part",
                retryable: true,
                source: "the store drops this put (fail_puts_every)".into(),
            });
        }
        self.lock().insert(name.to_owned(), bytes.to_vec());
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, SinkError> {
        self.check("read a snapshot part")?;
        Ok(self.lock().get(name).cloned())
    }

    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        self.check("delete a snapshot part")?;
        self.lock().remove(name);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        self.check("list snapshot parts")?;
        Ok(self
            .lock()
            .range(prefix.to_owned()..)
            .take_while(|(n, _)| n.starts_with(prefix))
            .map(|(n, _)| n.clone())
            .collect())
    }
}

#[async_trait]
impl<S: StateStore + ?Sized> StateStore for std::sync::Arc<S> {
    fn name(&self) -> &str {
        (**self).name()
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        (**self).put(name, bytes).await
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, SinkError> {
        (**self).get(name).await
    }

    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        (**self).delete(name).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        (**self).list(prefix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_what_could_climb_out() {
        let prefix = shard_prefix("..", "a/b:1:shardId-0");
        assert_eq!(prefix, "%2E./a%2Fb:1:shardId-0/");
        let epoch = LeaseEpoch {
            generation: 7,
            counter: 3,
        };
        assert_eq!(
            part_name(&prefix, epoch, 42, "count per/min", 1),
            "%2E./a%2Fb:1:shardId-0/7-3-42/count%20per%2Fmin/1"
        );
        let name = part_name(&prefix, epoch, 42, "count per/min", 1);
        assert_eq!(part_life(&prefix, &name), Some((epoch, 42)));
        assert_eq!(part_life(&prefix, "elsewhere/7-3-42/x/1"), None);
        assert_eq!(part_life(&prefix, &format!("{prefix}junk/x/1")), None);
        assert_eq!(component(""), "%");
        assert_eq!(component("v1.2"), "v1.2");
    }
}

//! The `Sink` trait, output identities, and the in-memory sink.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::error::{Fenced, SinkError};
use crate::lease::LeaseEpoch;
use crate::position::{EventTime, RecordPosition, ShardId};

/// A window of event time, `[start, end)` in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    /// First millisecond in the window.
    pub start: EventTime,
    /// First millisecond after the window.
    pub end: EventTime,
}

impl Window {
    /// The window `[start, end)`.
    pub const fn new(start: EventTime, end: EventTime) -> Self {
        Self { start, end }
    }

    /// The last millisecond inside the window (the event time of its result).
    pub const fn max_timestamp(&self) -> EventTime {
        self.end - 1
    }
}

/// A key as it appears in output identities. Integer keys stay integers until a sink renders
/// them (rendering millions of window results' keys was a measurable cost); other keys are
/// text, inline up to 24 bytes. One key type always makes the same variant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(KeyRepr);

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum KeyRepr {
    Unsigned(u64),
    Signed(i64),
    Text(CompactString),
}

impl KeyId {
    /// An unsigned integer key.
    pub const fn unsigned(n: u64) -> Self {
        Self(KeyRepr::Unsigned(n))
    }

    /// A signed integer key.
    pub const fn signed(n: i64) -> Self {
        Self(KeyRepr::Signed(n))
    }

    /// A text key.
    pub fn text(s: impl Into<CompactString>) -> Self {
        Self(KeyRepr::Text(s.into()))
    }

    /// The key as the value it was made from, for sinks with typed columns.
    pub fn value(&self) -> KeyValue<'_> {
        match &self.0 {
            KeyRepr::Unsigned(n) => KeyValue::Unsigned(*n),
            KeyRepr::Signed(n) => KeyValue::Signed(*n),
            KeyRepr::Text(s) => KeyValue::Text(s),
        }
    }
}

/// A [`KeyId`] as the value it was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyValue<'a> {
    /// An unsigned integer key.
    Unsigned(u64),
    /// A signed integer key.
    Signed(i64),
    /// A text key.
    Text(&'a str),
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            KeyRepr::Unsigned(n) => write!(f, "{n}"),
            KeyRepr::Signed(n) => write!(f, "{n}"),
            KeyRepr::Text(s) => f.write_str(s),
        }
    }
}

impl From<&str> for KeyId {
    fn from(s: &str) -> Self {
        Self::text(s)
    }
}

impl From<String> for KeyId {
    fn from(s: String) -> Self {
        Self::text(s)
    }
}

/// The deterministic identity of one output. A replay produces the same outputs with the same
/// identities, so a sink that overwrites by identity ends with no duplicates.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OutputId {
    /// Derived from one input record: its position and, where `flat_map` fanned it out, the
    /// index of the output (16 bits per `flat_map` level).
    Record {
        /// The input record's position.
        position: RecordPosition,
        /// Which of the record's outputs.
        index: u64,
    },
    /// A keyed result: for a key and, for windowed results, a window; `index` numbers the
    /// outputs `flat_map`s after the keyed operator made of the result (0 without them).
    Keyed {
        /// The key, rendered.
        key: KeyId,
        /// The window, for windowed results.
        window: Option<Window>,
        /// Which output of the result.
        #[serde(default)]
        index: u64,
    },
}

impl OutputId {
    /// A keyed result's identity: `key` and `window`, before any `flat_map`.
    pub fn keyed(key: KeyId, window: Option<Window>) -> Self {
        Self::Keyed {
            key,
            window,
            index: 0,
        }
    }

    /// A relative path naming this output, safe as a file or object name:
    /// `r/<sequence>-<sub>-<index>`, `w/<start>-<end>/<key>` or `k/<key>`, the last two with
    /// `/<index>` after them when `index` is not 0.
    pub fn to_path(&self) -> String {
        let mut out = String::new();
        match self {
            Self::Record { position, index } => {
                let _ = write!(
                    out,
                    "r/{}-{}-{}",
                    position.sequence, position.sub_sequence, index
                );
            }
            Self::Keyed { key, window, index } => {
                match window {
                    Some(w) => {
                        let _ = write!(out, "w/{:020}-{:020}/", w.start, w.end);
                    }
                    None => out.push_str("k/"),
                }
                push_escaped(&mut out, key);
                if *index != 0 {
                    let _ = write!(out, "/{index}");
                }
            }
        }
        out
    }
}

impl fmt::Display for OutputId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_path())
    }
}

/// Writes a key as one path component (see [`push_escaped_text`]); integers need no escaping.
fn push_escaped(out: &mut String, key: &KeyId) {
    match &key.0 {
        KeyRepr::Unsigned(n) => {
            let _ = write!(out, "{n}");
        }
        KeyRepr::Signed(n) => {
            let _ = write!(out, "{n}");
        }
        KeyRepr::Text(s) => push_escaped_text(out, s),
    }
}

/// Longest escaped key kept whole in a path. File systems allow 255-byte names, S3 1,024-byte
/// keys and DynamoDB 2,048-byte hash keys; past this, a key is shortened to a readable
/// prefix, `~` and a digest, so that every sink can store every identity.
pub const MAX_ESCAPED_KEY_BYTES: usize = 128;

/// How much of a shortened key's escaped text stays readable before its digest.
const SHORTENED_PREFIX_BYTES: usize = 80;

/// Escapes a key for use as one path component: ASCII letters, digits, `-`, `_` and `.` stay;
/// every other byte becomes `%XX`. A key that is empty or starts with `.` gets a `%` prefix.
///
/// An escaped key longer than [`MAX_ESCAPED_KEY_BYTES`] becomes its first escaped bytes (at
/// most 80, ending after a whole character), `~`, and the first 128 bits of the SHA-256 of the key in
/// hex: at most 113 bytes. Escaping never writes `~`, so a shortened key cannot equal a kept
/// one, and two long keys share a path only if their digests collide.
fn push_escaped_text(out: &mut String, key: &str) {
    let start = out.len();
    if key.is_empty() || key.starts_with('.') {
        out.push('%');
    }
    // Where the readable prefix would end: after the last whole character that fits.
    let mut prefix_end = out.len();
    for c in key.chars() {
        let mut utf8 = [0; 4];
        for &b in c.encode_utf8(&mut utf8).as_bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
        if out.len() - start <= SHORTENED_PREFIX_BYTES {
            prefix_end = out.len();
        }
        if out.len() - start > MAX_ESCAPED_KEY_BYTES {
            break;
        }
    }
    if out.len() - start <= MAX_ESCAPED_KEY_BYTES {
        return;
    }
    out.truncate(prefix_end);
    out.push('~');
    let digest = sha2::Sha256::digest(key.as_bytes());
    for b in &digest[..16] {
        let _ = write!(out, "{b:02x}");
    }
}

/// One output value with its identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Output<T> {
    /// The deterministic identity.
    pub id: OutputId,
    /// The value.
    pub value: T,
}

/// Outputs derived from one source shard.
#[derive(Clone, Debug)]
pub struct OutputBatch<T> {
    /// The source shard the outputs derive from.
    pub shard: ShardId,
    /// The writing worker's lease epoch for `shard` (its fencing token): a sink that keeps
    /// it with the output can refuse to let an older epoch overwrite a newer one.
    pub lease_epoch: LeaseEpoch,
    /// The outputs.
    pub outputs: Vec<Output<T>>,
}

/// What a sink writer is told about where it runs.
#[derive(Clone, Debug)]
pub struct SinkContext {
    /// The topology's name.
    pub topology: String,
    /// Which instance of the writer this is (`shard-<id>` or `worker-<n>`), unique per run.
    pub instance: String,
}

/// A destination for outputs of type `T`.
///
/// Contract (checked by `testing::sink_conformance`): an output written and then committed is
/// durable; writing an output whose identity exists replaces it (so replays leave no
/// duplicates); outputs written but not committed may or may not survive a crash.
#[async_trait]
pub trait Sink<T>: Send + Sync + 'static {
    /// The sink's name, for errors and metrics.
    fn name(&self) -> &str;

    /// Opens a writer. Each pipeline instance (a shard task or a keyed worker) opens its own.
    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError>;

    /// Refuses, before it is buffered, an output this sink could never write (too large for
    /// the store, not encodable): on a shard's own path (before any `key_by`) the output's
    /// input record then goes to the topology's dead-letter policy with this reason, instead
    /// of the write failing the run. Default: every output is accepted.
    fn check(&self, _value: &T) -> Result<(), String> {
        Ok(())
    }

    /// The output's size as this sink encodes it, if the sink knows: a keyed dead letter
    /// records it for a result `check` refused. Default: unknown.
    fn size_of(&self, _value: &T) -> Option<u64> {
        None
    }

    /// Whether the sink gathers the outputs of records into units across commits and reports
    /// where a shard's checkpoint may stop (`SinkWriter::held`), as `S3Sink` does. Such a sink
    /// must see all of a shard's record outputs in one writer, so that a replay at any
    /// parallelism cuts the same units: it is refused after `key_by` (late records), where
    /// several keyed workers write one shard's records. Default: no.
    ///
    /// A sink that wraps another must forward this, `check`, `size_of`, and its writer's `held`,
    /// `end_shard` and `release_shard`. The runtime refuses what it can see of a partial
    /// forward (`error::HoldingContract`) at the first write, commit or shard end that shows
    /// it, before any checkpoint moves: a writer holding outputs under a sink that does not
    /// declare it, or after `key_by`; a declared one that reports nothing for a shard right
    /// after writing its records, or still buffers a shard after `end_shard`.
    fn holds_record_outputs(&self) -> bool {
        false
    }
}

/// Where a writer that gathers the outputs of records into larger units (S3 objects) has
/// stored units of a shard, and whether it still buffers outputs (see [`SinkWriter::held`]).
///
/// A replay that gave such a sink outputs from inside a stored unit would start a new unit in
/// the middle of it and duplicate the unit's tail; so the checkpoint keeps, per such sink,
/// where it may resume: at a cut (the end of a unit), or, when nothing is buffered, after the
/// last output it was given (no unit spans it). See `protocol::checkpoint`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Ends of units this writer stored for the shard, ascending (the most recent ones).
    pub cuts: Vec<RecordPosition>,
    /// Outputs after the last cut are buffered, not yet durable.
    pub buffered: bool,
}

/// Writes outputs for one pipeline instance.
#[async_trait]
pub trait SinkWriter<T>: Send {
    /// Writes (or buffers) a batch.
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError>;

    /// Makes everything written so far durable, except what [`held`](Self::held) reports.
    /// The runtime checkpoints past an input only after every output derived from it was
    /// committed and is not held.
    ///
    /// A commit refused as fenced ([`SinkError::fenced`], naming a shard) keeps every output
    /// it did not make durable: the runtime then drops the fenced shard
    /// ([`release_shard`](Self::release_shard)) and commits again, since a commit after
    /// `key_by` holds several shards' outputs and the others must not be lost with it.
    ///
    /// [`SinkError::fenced`]: crate::error::SinkError::fenced
    async fn commit(&mut self) -> Result<(), SinkError>;

    /// For a writer that gathers the outputs of records into larger units across commits (an
    /// S3 object of a fixed number of records): per shard it stored units for or buffers
    /// outputs of, where the shard's checkpoint may stop ([`Held`]). The runtime never
    /// checkpoints inside a unit or past buffered outputs, so a replay starts where a unit
    /// starts. Only outputs of records ([`OutputId::Record`], on the shard's own path before
    /// any `key_by`) may be held. A writer of a sink that declares
    /// [`Sink::holds_record_outputs`] reports a shard here right after it was given outputs
    /// of the shard's records (stored or buffered), and reports none buffered after
    /// [`end_shard`](Self::end_shard). Default: no constraint.
    fn held(&self) -> Vec<(ShardId, Held)> {
        Vec::new()
    }

    /// The shard's input ended (it was closed, or a bounded run reached its tip): make every
    /// output buffered for it durable now, cutting a short unit if need be.
    async fn end_shard(&mut self, _shard: &ShardId) -> Result<(), SinkError> {
        Ok(())
    }

    /// The shard is no longer this worker's: drop everything it buffers for it, keyed results
    /// included (the next owner replays it from the checkpoint). Outputs of other shards stay.
    fn release_shard(&mut self, _shard: &ShardId) {}

    /// Bytes this writer stored since it was opened, as it counts them (file, object or item
    /// bytes), for the `shardflow_bytes_written_total` metric. Writers that do not count
    /// report 0.
    fn bytes_written(&self) -> u64 {
        0
    }
}

/// A sink under a name of its choosing: the name labels metrics, logs and dead letters
/// (`Named::new("clicks-db", sink)`); everything else is the inner sink's, its writers
/// included. A holding sink (`S3Sink`) keeps its positions in checkpoints under its name: give
/// it one name for good, or a restart under another replays its shard from the committed
/// position.
pub struct Named<S> {
    name: String,
    inner: S,
}

impl<S> Named<S> {
    /// `inner`, named `name`.
    pub fn new(name: impl Into<String>, inner: S) -> Self {
        Self {
            name: name.into(),
            inner,
        }
    }
}

#[async_trait]
impl<T: Send + 'static, S: Sink<T>> Sink<T> for Named<S> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        self.inner.open(cx).await
    }

    fn check(&self, value: &T) -> Result<(), String> {
        self.inner.check(value)
    }

    fn size_of(&self, value: &T) -> Option<u64> {
        self.inner.size_of(value)
    }

    fn holds_record_outputs(&self) -> bool {
        self.inner.holds_record_outputs()
    }
}

#[async_trait]
impl<T: Send + 'static, S: InspectSink<T>> InspectSink<T> for Named<S> {
    async fn committed(&self) -> Result<BTreeMap<(ShardId, String), T>, SinkError> {
        self.inner.committed().await
    }
}

/// A sink whose committed contents a test can read back, for the conformance suite.
#[async_trait]
pub trait InspectSink<T>: Sink<T> {
    /// Every committed output, by (source shard, identity path).
    async fn committed(&self) -> Result<BTreeMap<(ShardId, String), T>, SinkError>;
}

/// An in-memory sink: committed outputs in a map, shared by every clone. A
/// [`fencing`](Self::fencing) one refuses, like `DynamoSink`, to overwrite an output a newer
/// lease epoch committed.
pub struct MemorySink<T> {
    name: String,
    state: Arc<Mutex<MemoryState<T>>>,
}

struct MemoryState<T> {
    /// Each output with the lease epoch that committed it.
    committed: BTreeMap<(ShardId, String), (LeaseEpoch, T)>,
    writes: u64,
    replaced: u64,
    fencing: bool,
    refused: u64,
}

impl<T> Clone for MemorySink<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            state: Arc::clone(&self.state),
        }
    }
}

impl<T: Clone + Send + 'static> MemorySink<T> {
    /// An empty sink.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            state: Arc::new(Mutex::new(MemoryState {
                committed: BTreeMap::new(),
                writes: 0,
                replaced: 0,
                fencing: false,
                refused: 0,
            })),
        }
    }

    /// An empty sink that fences: a commit holding an output a newer lease epoch already
    /// committed is refused whole ([`Fenced`], naming the shard) and
    /// stays pending; once the refused shard is released, the next commit writes the rest.
    pub fn fencing(name: impl Into<String>) -> Self {
        let sink = Self::new(name);
        sink.lock().fencing = true;
        sink
    }

    /// Every committed output by (shard, identity path).
    pub fn contents(&self) -> BTreeMap<(ShardId, String), T> {
        self.lock()
            .committed
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect()
    }

    /// The lease epoch that committed each output.
    pub fn epochs(&self) -> BTreeMap<(ShardId, String), LeaseEpoch> {
        self.lock()
            .committed
            .iter()
            .map(|(k, (e, _))| (k.clone(), *e))
            .collect()
    }

    /// Commits refused as fenced.
    pub fn refused(&self) -> u64 {
        self.lock().refused
    }

    /// Committed writes that replaced an existing identity (replays absorbed).
    pub fn replaced(&self) -> u64 {
        self.lock().replaced
    }

    /// Committed writes in all.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState<T>> {
        // A poisoned lock means a test thread panicked mid-update; the data is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct MemoryWriter<T> {
    sink: MemorySink<T>,
    pending: Vec<(ShardId, LeaseEpoch, Output<T>)>,
}

#[async_trait]
impl<T: Clone + Send + Sync + 'static> Sink<T> for MemorySink<T> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, _cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(MemoryWriter {
            sink: self.clone(),
            pending: Vec::new(),
        }))
    }
}

#[async_trait]
impl<T: Clone + Send + Sync + 'static> SinkWriter<T> for MemoryWriter<T> {
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        let (shard, epoch) = (batch.shard, batch.lease_epoch);
        self.pending
            .extend(batch.outputs.into_iter().map(|o| (shard.clone(), epoch, o)));
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), SinkError> {
        let mut state = self.sink.lock();
        // A fencing commit is all or nothing (the strictest a writer may be): one refused
        // output keeps the whole commit pending for the next one (see `SinkWriter::commit`).
        let refused = self.pending.iter().find(|(shard, epoch, output)| {
            state.fencing
                && state
                    .committed
                    .get(&(shard.clone(), output.id.to_path()))
                    .is_some_and(|(written_by, _)| written_by > epoch)
        });
        if let Some((shard, epoch, output)) = refused {
            let fenced = Fenced {
                shard: shard.clone(),
                output: output.id.to_path(),
                epoch: *epoch,
            };
            state.refused += 1;
            return Err(SinkError {
                sink: self.sink.name.clone(),
                operation: "commit",
                retryable: false,
                source: Box::new(fenced),
            });
        }
        for (shard, epoch, output) in self.pending.drain(..) {
            state.writes += 1;
            let key = (shard, output.id.to_path());
            if state.committed.insert(key, (epoch, output.value)).is_some() {
                state.replaced += 1;
            }
        }
        Ok(())
    }

    fn release_shard(&mut self, shard: &ShardId) {
        self.pending.retain(|(s, _, _)| s != shard);
    }
}

#[async_trait]
impl<T: Clone + Send + Sync + 'static> InspectSink<T> for MemorySink<T> {
    async fn committed(&self) -> Result<BTreeMap<(ShardId, String), T>, SinkError> {
        Ok(self.contents())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::SequenceNumber;

    #[test]
    fn output_paths_escape_keys_and_sort_windows_by_time() {
        let id = OutputId::keyed("a/b c".into(), Some(Window::new(0, 60_000)));
        assert_eq!(
            id.to_path(),
            "w/00000000000000000000-00000000000000060000/a%2Fb%20c"
        );
        assert_eq!(OutputId::keyed("..".into(), None).to_path(), "k/%..");
        let second = OutputId::Keyed {
            key: "a".into(),
            window: None,
            index: 1,
        };
        assert_eq!(
            second.to_path(),
            "k/a/1",
            "a flat_map's second output of a result"
        );
        let rec = OutputId::Record {
            position: RecordPosition::with_sub_sequence(SequenceNumber::from_u128(42), 3),
            index: 1,
        };
        assert_eq!(rec.to_path(), "r/42-3-1");
    }

    fn key_path(key: &str) -> String {
        OutputId::keyed(key.into(), None)
            .to_path()
            .strip_prefix("k/")
            .expect("a keyed path")
            .to_owned()
    }

    #[test]
    fn long_keys_become_a_readable_prefix_and_a_digest_that_fits_every_sink() {
        // 90 CJK characters escape to 810 bytes: over a file name's 255.
        let cjk = "\u{4e2d}".repeat(90);
        let path = key_path(&cjk);
        assert!(path.len() <= 113, "{} bytes: {path}", path.len());
        assert!(path.starts_with("%E4%B8%AD"), "{path}");
        let (prefix, digest) = path.split_once('~').expect("shortened");
        assert_eq!(digest.len(), 32);
        assert!(
            prefix.len() <= 80 && prefix.len() % 9 == 0,
            "never cuts an escape: {prefix}"
        );
        // Keys that differ only past the prefix stay apart; the same key is always the same.
        let long_a = format!("{}a", "x".repeat(200));
        let long_b = format!("{}b", "x".repeat(200));
        assert_ne!(key_path(&long_a), key_path(&long_b));
        assert_eq!(key_path(&long_a), key_path(&long_a.clone()));
        // At the limit a key stays whole; one byte past it, it is shortened.
        assert_eq!(key_path(&"k".repeat(128)), "k".repeat(128));
        assert!(key_path(&"k".repeat(129)).contains('~'));
        // Odd keys stay one component that is never hidden, `.` or `..`.
        for key in [
            "/",
            "%",
            "..",
            "\0",
            "a/../b",
            &"/".repeat(1000),
            &"\0".repeat(300),
        ] {
            let p = key_path(key);
            assert!(
                !p.contains('/') && !p.starts_with('.') && p.len() <= 128,
                "{p}"
            );
        }
        // Shifted by one to three bytes, the prefix still ends after a whole character.
        for pad in 0..3 {
            let key = format!("{}{}", "a".repeat(pad), "\u{4e2d}".repeat(100));
            let path = key_path(&key);
            let (prefix, _) = path.split_once('~').expect("shortened");
            assert_eq!(prefix.trim_start_matches('a').len() % 9, 0, "{prefix}");
        }
    }
}

//! The dead-letter policy: where a record goes when it cannot be decoded or a user function
//! fails on it. Never a silent skip.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::payload_store::PayloadStore;
use crate::position::{RecordPosition, ShardId};
use crate::sink::{OutputId, Sink, Window};

/// A record that could not be processed, with everything needed to replay it by hand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// The stream it came from.
    pub stream: String,
    /// The shard it came from.
    pub shard: ShardId,
    /// Its position in the shard.
    pub position: RecordPosition,
    /// Its partition key (lossy UTF-8).
    pub partition_key: String,
    /// Its payload, or only its first bytes if `truncated`. Base64 in JSON (and so in
    /// DynamoDB items), bytes in binary formats; an array of numbers is read too.
    #[serde(with = "payload")]
    pub data: Vec<u8>,
    /// The whole payload's length in bytes.
    #[serde(default)]
    pub size: u64,
    /// The SHA-256 of the whole payload, in hex: what a truncated letter is recognised by.
    #[serde(default)]
    pub digest: String,
    /// Whether `data` holds only the start of the payload because the dead-letter sink refused
    /// the whole letter (too large for it). The record stays readable in the stream, at
    /// `position`, until the stream's retention drops it.
    #[serde(default)]
    pub truncated: bool,
    /// Where the whole payload is stored, if it was too large for the dead-letter sink and the
    /// policy has an overflow store ([`DeadLetter::to_with_overflow`]): an object named by the
    /// record's position.
    #[serde(default)]
    pub stored_at: Option<String>,
    /// Where it failed: `decode`, the name of the operator, or `sink <name>`.
    pub stage: String,
    /// The error: its kind and where, never the payload's values.
    pub error: String,
    /// For a keyed dead letter, the keyed result a sink refused (`Sink::check`). No input
    /// record stands behind a keyed result: the letter has no payload, and its `position` is
    /// the last record of the shard read before the result was made.
    #[serde(default)]
    pub result: Option<RefusedResult>,
}

/// The keyed result behind a keyed dead letter: a sink refused it (too large for it, say), so
/// it was never written; the run went on without it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedResult {
    /// The topology that made it.
    pub topology: String,
    /// The sink that refused it.
    pub sink: String,
    /// Its key as text: the first [`MAX_LETTER_KEY_BYTES`] bytes of a longer one (`identity`
    /// tells long keys apart). Empty for a late record on a keyed path's side output.
    pub key: String,
    /// Its window, for a windowed result.
    pub window: Option<Window>,
    /// Its identity in that sink as a path (`OutputId::to_path`: key, window and index; a
    /// late record's position), long keys shortened to a readable prefix and a digest.
    pub identity: String,
    /// Its encoded size as the sink sizes it, if the sink says (`Sink::size_of`).
    pub size: Option<u64>,
}

/// The most bytes of a refused result's key a keyed dead letter keeps.
pub const MAX_LETTER_KEY_BYTES: usize = 1024;

impl RefusedResult {
    /// What a keyed dead letter says of the result `identity` that `sink` of `topology`
    /// refused.
    pub fn new(topology: String, sink: String, identity: &OutputId, size: Option<u64>) -> Self {
        let (key, window) = match identity {
            OutputId::Keyed { key, window, .. } => {
                let mut key = key.to_string();
                if key.len() > MAX_LETTER_KEY_BYTES {
                    let mut end = MAX_LETTER_KEY_BYTES;
                    while !key.is_char_boundary(end) {
                        end -= 1;
                    }
                    key.truncate(end);
                }
                (key, *window)
            }
            OutputId::Record { .. } => (String::new(), None),
        };
        Self {
            topology,
            sink,
            key,
            window,
            identity: identity.to_path(),
            size,
        }
    }
}

impl DeadLetterRecord {
    /// The dead letter of a whole payload.
    pub fn new(
        stream: String,
        shard: ShardId,
        position: RecordPosition,
        partition_key: &[u8],
        data: &[u8],
        stage: String,
        error: String,
    ) -> Self {
        Self {
            stream,
            shard,
            position,
            partition_key: String::from_utf8_lossy(partition_key).into_owned(),
            data: data.to_vec(),
            size: data.len() as u64,
            digest: hex_sha256(data),
            truncated: false,
            stored_at: None,
            stage,
            error,
            result: None,
        }
    }

    /// The keyed dead letter of a result a sink refused, made in `stream`'s `shard` after the
    /// record at `after`.
    pub fn of_result(
        stream: String,
        shard: ShardId,
        after: RecordPosition,
        result: RefusedResult,
        error: String,
    ) -> Self {
        Self {
            stream,
            shard,
            position: after,
            partition_key: String::new(),
            data: Vec::new(),
            size: 0,
            digest: String::new(),
            truncated: false,
            stored_at: None,
            stage: format!("sink {}", result.sink),
            error,
            result: Some(result),
        }
    }

    /// This letter as the dead-letter sink accepts it (`Sink::check`): whole, or with the
    /// longest start of its payload the sink accepts (`truncated`; `size` and `digest` still
    /// describe the whole payload). `Err` with the sink's reason if it refuses even an empty
    /// payload.
    pub fn fit(
        mut self,
        check: impl Fn(&DeadLetterRecord) -> Result<(), String>,
    ) -> Result<Self, String> {
        if check(&self).is_ok() {
            return Ok(self);
        }
        let whole = std::mem::take(&mut self.data);
        self.truncated = true;
        // A sink's limit grows with the payload: search for the longest accepted prefix.
        let (mut fits, mut refused) = (None, whole.len());
        let mut low = 0;
        while low < refused {
            let mid = low + (refused - low) / 2;
            self.data.clear();
            self.data.extend_from_slice(&whole[..mid]);
            match check(&self) {
                Ok(()) => {
                    fits = Some(mid);
                    low = mid + 1;
                }
                Err(_) => refused = mid,
            }
        }
        let Some(len) = fits else {
            // Refused even without its payload: a long reason (a user function's message) may
            // be what is too large; keep its start.
            self.data.clear();
            if self.error.len() > MAX_TRUNCATED_ERROR_BYTES {
                let mut end = MAX_TRUNCATED_ERROR_BYTES;
                while !self.error.is_char_boundary(end) {
                    end -= 1;
                }
                self.error.truncate(end);
                self.error.push_str(" …");
                if check(&self).is_ok() {
                    return Ok(self);
                }
            }
            return Err(check(&self).err().unwrap_or_default());
        };
        self.data.clear();
        self.data.extend_from_slice(&whole[..len]);
        Ok(self)
    }
}

/// How much of a letter's reason is kept when even its empty payload is refused.
const MAX_TRUNCATED_ERROR_BYTES: usize = 1024;

/// The SHA-256 of `bytes` in lower-case hex.
fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    let mut out = String::with_capacity(64);
    for b in sha2::Sha256::digest(bytes) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A payload as base64 text in human-readable formats (JSON: a third larger than the bytes,
/// where an array of numbers took three to four times) and as bytes in binary ones.
mod payload {
    use base64::Engine as _;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
        } else {
            s.serialize_bytes(data)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Payload;
        impl<'de> Visitor<'de> for Payload {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("base64 text, bytes or an array of bytes")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<u8>, E> {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| E::custom("a dead letter's payload is not base64"))
            }
            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
                Ok(bytes.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(bytes)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(Payload)
        } else {
            d.deserialize_byte_buf(Payload)
        }
    }
}

/// What happens to a record that fails.
#[derive(Clone)]
pub enum DeadLetter {
    /// Write it to a sink (with shard, sequence number and error); the checkpoint passes it only
    /// after that write is committed.
    To(Arc<dyn Sink<DeadLetterRecord>>),
    /// Like `To`; a letter the sink refuses whole (too large for it) first has its whole
    /// payload stored in `overflow` under a name made of its position, and then goes to the
    /// sink truncated, saying where the payload is (`stored_at`).
    ToWithOverflow {
        /// The dead-letter sink.
        sink: Arc<dyn Sink<DeadLetterRecord>>,
        /// Where payloads too large for it go.
        overflow: Arc<dyn PayloadStore>,
    },
    /// Call a failing user function again, up to `max` more times, waiting `backoff` doubled
    /// each time; then apply `then`. Decoding is not retried: it would fail the same way.
    Retry {
        /// Retries after the first failure.
        max: u32,
        /// Wait before the first retry.
        backoff: Duration,
        /// What happens when the retries are exhausted.
        then: Box<DeadLetter>,
    },
    /// Stop the shard: its checkpoint stays before the record and the run reports the error.
    StopShard,
}

impl Default for DeadLetter {
    /// Stopping the shard is the default: it loses nothing and makes the problem visible.
    fn default() -> Self {
        Self::StopShard
    }
}

impl DeadLetter {
    /// Dead-letters into `sink`.
    pub fn to(sink: impl Sink<DeadLetterRecord>) -> Self {
        Self::To(Arc::new(sink))
    }

    /// Dead-letters into `sink`, and stores a payload too large for it whole in `overflow`
    /// (an S3 bucket, a local directory) before its letter goes to `sink` truncated.
    pub fn to_with_overflow(
        sink: impl Sink<DeadLetterRecord>,
        overflow: impl PayloadStore,
    ) -> Self {
        Self::ToWithOverflow {
            sink: Arc::new(sink),
            overflow: Arc::new(overflow),
        }
    }

    /// Retries a failing user function `max` times, then applies `then`.
    pub fn retry(max: u32, backoff: Duration, then: DeadLetter) -> Self {
        Self::Retry {
            max,
            backoff,
            then: Box::new(then),
        }
    }

    /// The sink this policy eventually writes to, if any.
    pub(crate) fn sink(&self) -> Option<&Arc<dyn Sink<DeadLetterRecord>>> {
        match self {
            Self::To(sink) | Self::ToWithOverflow { sink, .. } => Some(sink),
            Self::Retry { then, .. } => then.sink(),
            Self::StopShard => None,
        }
    }

    /// The store this policy keeps payloads too large for its sink in, if any.
    pub(crate) fn overflow(&self) -> Option<&Arc<dyn PayloadStore>> {
        match self {
            Self::ToWithOverflow { overflow, .. } => Some(overflow),
            Self::Retry { then, .. } => then.overflow(),
            Self::To(_) | Self::StopShard => None,
        }
    }
}

impl std::fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::To(sink) => write!(f, "DeadLetter::To({:?})", sink.name()),
            Self::ToWithOverflow { sink, overflow } => f
                .debug_struct("DeadLetter::ToWithOverflow")
                .field("sink", &sink.name())
                .field("overflow", &overflow.name())
                .finish(),
            Self::Retry { max, backoff, then } => f
                .debug_struct("DeadLetter::Retry")
                .field("max", max)
                .field("backoff", backoff)
                .field("then", then)
                .finish(),
            Self::StopShard => f.write_str("DeadLetter::StopShard"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::SequenceNumber;

    fn letter(data: &[u8]) -> DeadLetterRecord {
        DeadLetterRecord::new(
            "s".into(),
            ShardId::new("shard-0"),
            RecordPosition::new(SequenceNumber::from_u128(7)),
            b"pk",
            data,
            "decode".into(),
            "cannot decode record as json".into(),
        )
    }

    #[test]
    fn a_keyed_letter_keeps_a_bounded_start_of_a_long_key_and_its_shortened_identity() {
        let long = "é".repeat(1000);
        let id = OutputId::keyed(long.as_str().into(), Some(Window::new(0, 10)));
        let result = RefusedResult::new("t".into(), "s".into(), &id, Some(9));
        assert!(result.key.len() <= MAX_LETTER_KEY_BYTES && long.starts_with(&result.key));
        assert_eq!(
            result.key.len(),
            MAX_LETTER_KEY_BYTES,
            "cut after a whole character"
        );
        assert_eq!(result.identity, id.to_path());
        assert!(result.identity.len() < 200, "{}", result.identity);
        assert_eq!(result.window, Some(Window::new(0, 10)));
        let letter = DeadLetterRecord::of_result(
            "s".into(),
            ShardId::new("shard-0"),
            RecordPosition::new(SequenceNumber::from_u128(7)),
            result,
            "too large".into(),
        );
        assert_eq!(letter.stage, "sink s");
        let json = serde_json::to_value(&letter).unwrap();
        assert_eq!(
            serde_json::from_value::<DeadLetterRecord>(json).unwrap(),
            letter
        );
        let bytes = bincode::serialize(&letter).unwrap();
        assert_eq!(
            bincode::deserialize::<DeadLetterRecord>(&bytes).unwrap(),
            letter
        );
    }

    #[test]
    fn payloads_are_base64_in_json_and_bytes_in_binary_formats() {
        let dead = letter(&[0, 1, 2, 255]);
        let json = serde_json::to_value(&dead).unwrap();
        assert_eq!(json["data"], "AAEC/w==");
        assert_eq!(json["size"], 4);
        assert_eq!(
            serde_json::from_value::<DeadLetterRecord>(json).unwrap(),
            dead
        );
        let bytes = bincode::serialize(&dead).unwrap();
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        assert_eq!(
            bincode::deserialize::<DeadLetterRecord>(&bytes).unwrap(),
            dead
        );
        // Letters written before payloads were base64 (an array of numbers) still read.
        let mut old = serde_json::to_value(&dead).unwrap();
        old["data"] = serde_json::json!([0, 1, 2, 255]);
        let read: DeadLetterRecord = serde_json::from_value(old).unwrap();
        assert_eq!(read.data, dead.data);
    }

    #[test]
    fn a_letter_too_large_for_its_sink_keeps_the_longest_start_it_accepts() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        // A sink that accepts letters whose JSON is at most 600 bytes.
        let check = |l: &DeadLetterRecord| {
            let n = serde_json::to_vec(l).unwrap().len();
            if n <= 600 {
                Ok(())
            } else {
                Err(format!("{n} bytes"))
            }
        };
        let whole = letter(&payload[..100]).fit(check).unwrap();
        assert!(!whole.truncated);
        assert_eq!(whole.data, &payload[..100]);

        let fitted = letter(&payload).fit(check).unwrap();
        assert!(fitted.truncated);
        assert_eq!(fitted.size, 1000);
        assert_eq!(fitted.digest, letter(&payload).digest);
        assert_eq!(fitted.data, &payload[..fitted.data.len()]);
        let mut one_more = fitted.clone();
        one_more.data = payload[..fitted.data.len() + 1].to_vec();
        assert!(
            check(&fitted).is_ok() && check(&one_more).is_err(),
            "the longest start"
        );

        let refused = letter(&payload).fit(|_| Err("no".into()));
        assert_eq!(refused, Err("no".into()));

        // A reason too long for the sink is cut (after the payload).
        let mut long = letter(&payload);
        long.error = "é".repeat(10_000);
        let roomier = |l: &DeadLetterRecord| {
            let n = serde_json::to_vec(l).unwrap().len();
            if n <= 1600 {
                Ok(())
            } else {
                Err(format!("{n} bytes"))
            }
        };
        let fitted = long.fit(roomier).unwrap();
        assert!(
            fitted.data.is_empty() && fitted.error.len() <= 1024 + 4,
            "{}",
            fitted.error.len()
        );
    }
}

//! Where a record sits in a stream: shard ids, sequence numbers, start positions, event time.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Event time in milliseconds since the Unix epoch.
pub type EventTime = i64;

/// The identifier of a shard, as the stream names it (`shardId-000000000001` on Kinesis).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShardId(Arc<str>);

impl ShardId {
    /// Wraps a shard identifier.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(Arc::from(id.as_ref()))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardId({})", self.0)
    }
}

/// A Kinesis sequence number: a decimal integer of up to 129 digits, ordered numerically.
///
/// Numbers that fit in a `u128` (every number of the embedded backend) are stored inline, so
/// copying a position is free on the hot path; longer ones (real Kinesis numbers have 56 digits)
/// share one allocation.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    // A u128 as (high, low) halves: u64 alignment keeps a position at 32 bytes instead of 48,
    // which matters in batches of ten thousand.
    Small([u64; 2]),
    // Canonical decimal digits without leading zeros, always greater than u128::MAX.
    Large(Arc<str>),
}

/// Why a text is not a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sequence number {text:?}: expected 1 to 129 decimal digits")]
pub struct InvalidSequenceNumber {
    /// The rejected text.
    pub text: String,
}

/// Longest sequence number Kinesis documents (pattern `0|([1-9]\d{0,128})`).
const MAX_SEQUENCE_DIGITS: usize = 129;

impl SequenceNumber {
    /// A sequence number from an integer.
    pub const fn from_u128(n: u128) -> Self {
        Self(Repr::Small([(n >> 64) as u64, n as u64]))
    }

    /// Parses a decimal sequence number.
    pub fn parse(text: &str) -> Result<Self, InvalidSequenceNumber> {
        let invalid = || InvalidSequenceNumber {
            text: text.to_owned(),
        };
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let digits = text.trim_start_matches('0');
        if digits.len() > MAX_SEQUENCE_DIGITS {
            return Err(invalid());
        }
        if digits.is_empty() {
            return Ok(Self::from_u128(0));
        }
        match digits.parse::<u128>() {
            Ok(n) => Ok(Self::from_u128(n)),
            Err(_) => Ok(Self(Repr::Large(Arc::from(digits)))),
        }
    }

    /// The number as a `u128`, if it fits.
    pub fn as_u128(&self) -> Option<u128> {
        match &self.0 {
            Repr::Small(n) => Some(join(*n)),
            Repr::Large(_) => None,
        }
    }
}

fn join([high, low]: [u64; 2]) -> u128 {
    u128::from(high) << 64 | u128::from(low)
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        match (&self.0, &other.0) {
            // Lexicographic order of (high, low) is the numeric order.
            (Repr::Small(a), Repr::Small(b)) => a.cmp(b),
            (Repr::Small(_), Repr::Large(_)) => Ordering::Less,
            (Repr::Large(_), Repr::Small(_)) => Ordering::Greater,
            // Canonical digits: a longer number is larger; equal lengths compare as text.
            (Repr::Large(a), Repr::Large(b)) => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
        }
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Small(n) => write!(f, "{}", join(*n)),
            Repr::Large(s) => f.write_str(s),
        }
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({self})")
    }
}

impl Serialize for SequenceNumber {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SequenceNumber {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The position of one user record: its Kinesis sequence number and, for a record that came out
/// of a KPL aggregated record, its index inside it (0 otherwise). Ordered by both.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RecordPosition {
    /// The Kinesis sequence number of the (possibly aggregated) record.
    pub sequence: SequenceNumber,
    /// The index of the user record inside an aggregated record; 0 when not aggregated.
    pub sub_sequence: u32,
}

impl RecordPosition {
    /// The position of a plain (not aggregated) record.
    pub const fn new(sequence: SequenceNumber) -> Self {
        Self {
            sequence,
            sub_sequence: 0,
        }
    }

    /// The position of user record `sub_sequence` inside an aggregated record.
    pub const fn with_sub_sequence(sequence: SequenceNumber, sub_sequence: u32) -> Self {
        Self {
            sequence,
            sub_sequence,
        }
    }
}

impl fmt::Display for RecordPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.sequence, self.sub_sequence)
    }
}

impl fmt::Debug for RecordPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordPosition({self})")
    }
}

/// Where to start reading a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartPosition {
    /// The oldest record still retained.
    TrimHorizon,
    /// Only records written after the reader starts.
    Latest,
    /// The record with this sequence number and everything after it.
    AtSequence(SequenceNumber),
    /// Everything after this position (a checkpoint); sub-sequences of an aggregated record
    /// up to and including `sub_sequence` are skipped.
    After(RecordPosition),
    /// The first record that arrived at or after this time (milliseconds since the epoch).
    AtTimestamp(EventTime),
}

/// A shard as its stream describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// The shard's identifier.
    pub id: ShardId,
    /// The shards this one was split or merged from (none for an original shard).
    pub parents: Vec<ShardId>,
    /// The inclusive range of 128-bit MD5 hash keys the shard covers.
    pub hash_key_range: (u128, u128),
    /// A closed shard takes no more writes; reading it ends at its last record.
    pub closed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_order_numerically_across_representations() {
        let small = SequenceNumber::parse("99").unwrap();
        let bigger = SequenceNumber::parse("100").unwrap();
        let max = SequenceNumber::from_u128(u128::MAX);
        let kinesis =
            SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898")
                .unwrap();
        let kinesis_next =
            SequenceNumber::parse("49590338271490256608559692538361571095921575989136588899")
                .unwrap();
        assert!(small < bigger);
        assert!(bigger < max);
        assert!(max < kinesis);
        assert!(kinesis < kinesis_next);
        assert_eq!(kinesis.to_string().len(), 56);
    }

    #[test]
    fn sequence_number_parsing_rejects_non_digits_and_normalises_zeros() {
        assert!(SequenceNumber::parse("").is_err());
        assert!(SequenceNumber::parse("12a").is_err());
        assert!(SequenceNumber::parse(&"1".repeat(130)).is_err());
        assert_eq!(
            SequenceNumber::parse("007").unwrap(),
            SequenceNumber::from_u128(7)
        );
        assert_eq!(
            SequenceNumber::parse("0").unwrap(),
            SequenceNumber::from_u128(0)
        );
    }

    #[test]
    fn sequence_numbers_round_trip_through_json() {
        let n = SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898")
            .unwrap();
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<SequenceNumber>(&json).unwrap(), n);
    }

    #[test]
    fn positions_stay_small() {
        assert_eq!(std::mem::size_of::<RecordPosition>(), 32);
        let n = (1u128 << 64) + 5;
        assert_eq!(SequenceNumber::from_u128(n).as_u128(), Some(n));
        assert!(SequenceNumber::from_u128(u128::from(u64::MAX)) < SequenceNumber::from_u128(n));
    }

    #[test]
    fn positions_order_by_sequence_then_sub_sequence() {
        let a = RecordPosition::with_sub_sequence(SequenceNumber::from_u128(5), 3);
        let b = RecordPosition::with_sub_sequence(SequenceNumber::from_u128(5), 4);
        let c = RecordPosition::new(SequenceNumber::from_u128(6));
        assert!(a < b && b < c);
    }
}

//! The KPL aggregated record format: many user records in one Kinesis record.
//!
//! Layout (as the KPL writes it and the KCL reads it): the magic bytes `F3 89 9A C2`, a protobuf
//! `AggregatedRecord`, then the MD5 digest of the protobuf bytes. Partition keys and explicit
//! hash keys are stored once in tables and referenced by index from each record.

use std::collections::HashMap;

use md5::{Digest, Md5};
use prost::Message;

/// The four bytes that open every aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Length of the trailing MD5 digest.
const DIGEST_LEN: usize = 16;
/// The longest partition key Kinesis (and the KPL) accepts, in bytes.
pub const MAX_PARTITION_KEY_BYTES: usize = 256;
/// The longest explicit hash key: a decimal number below 2^128 has at most 39 digits.
pub const MAX_EXPLICIT_HASH_KEY_BYTES: usize = 39;
/// How many times its own size an aggregate may grow into when its keys are copied to each
/// user record. Each record names its keys by an index into tables, so a small aggregate could
/// otherwise ask for gigabytes (one 256-byte key named by every one of a megabyte's worth of
/// 3-byte records is 87 MiB); real KPL aggregates stay far below this.
pub const MAX_EXPANSION: usize = 32;
/// The expansion every aggregate may have whatever its size, so that a small one of tiny
/// payloads under long keys still passes: 4 MiB.
pub const MIN_EXPANSION_BUDGET: usize = 4 << 20;

/// The protobuf message of an aggregated record (field numbers from the KPL's `messages.proto`).
#[derive(Clone, PartialEq, Message)]
struct AggregatedRecordProto {
    #[prost(string, repeated, tag = "1")]
    partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<RecordProto>,
}

#[derive(Clone, PartialEq, Message)]
struct RecordProto {
    #[prost(uint64, required, tag = "1")]
    partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    tags: Vec<TagProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TagProto {
    #[prost(string, required, tag = "1")]
    key: String,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
}

/// One user record inside an aggregated record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    /// Its partition key.
    pub partition_key: String,
    /// Its explicit hash key (a decimal 128-bit number), if the producer set one.
    pub explicit_hash_key: Option<String>,
    /// Its payload.
    pub data: Vec<u8>,
}

/// Why bytes that start like an aggregated record are not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregationError {
    /// Shorter than the magic plus a digest.
    #[error("aggregated record of {len} bytes is too short for the magic and the MD5 digest")]
    TooShort {
        /// The record's length.
        len: usize,
    },
    /// The trailing MD5 digest does not match the protobuf bytes.
    #[error("aggregated record's MD5 digest does not match its contents (corrupt or truncated)")]
    DigestMismatch,
    /// The protobuf does not decode.
    #[error("aggregated record's protobuf is malformed: {0}")]
    Malformed(String),
    /// A record points past the partition key or explicit hash key table.
    #[error(
        "user record {record} refers to {table} index {index}, past the table's {len} entries"
    )]
    BadIndex {
        /// Which user record.
        record: usize,
        /// Which table.
        table: &'static str,
        /// The index it names.
        index: u64,
        /// The table's length.
        len: usize,
    },
    /// A key longer than Kinesis allows (no producer could have written it).
    #[error("{table} entry {index} is {len} bytes; Kinesis allows at most {max}")]
    KeyTooLong {
        /// Which table.
        table: &'static str,
        /// The entry.
        index: usize,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Copying each record's keys would take more memory than the bound allows.
    #[error(
        "aggregated record of {len} bytes would expand to {expanded} bytes of user records \
         (more than {MAX_EXPANSION} times its size, and more than {MIN_EXPANSION_BUDGET} bytes)"
    )]
    TooLarge {
        /// The aggregated record's length.
        len: usize,
        /// What its user records would take.
        expanded: usize,
    },
}

/// The MD5 digest that closes an aggregated record, of its protobuf bytes.
pub fn digest(body: &[u8]) -> [u8; DIGEST_LEN] {
    Md5::digest(body).into()
}

/// Whether `data` is an aggregated record (starts with the magic bytes).
pub fn is_aggregated(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

/// Splits an aggregated record into its user records, in order (their index is the
/// sub-sequence number). Returns `None` for a plain record.
///
/// # Errors
/// A record with the magic bytes whose digest, protobuf or table indexes are wrong: it is
/// neither silently dropped nor passed on as one opaque record.
pub fn deaggregate(data: &[u8]) -> Result<Option<Deaggregated>, AggregationError> {
    if !is_aggregated(data) {
        return Ok(None);
    }
    if data.len() < MAGIC.len() + DIGEST_LEN {
        return Err(AggregationError::TooShort { len: data.len() });
    }
    let (body, digest) = data[MAGIC.len()..].split_at(data.len() - MAGIC.len() - DIGEST_LEN);
    if Md5::digest(body).as_slice() != digest {
        return Err(AggregationError::DigestMismatch);
    }
    let proto = AggregatedRecordProto::decode(body)
        .map_err(|e| AggregationError::Malformed(e.to_string()))?;
    check_tables(&proto)?;
    // What the user records take once each has its own copy of its keys (a batch copies them
    // per record), bounded before anything is copied (an index past a table counts nothing
    // here and fails below).
    let key_len = |entries: &[String], index: u64| {
        usize::try_from(index)
            .ok()
            .and_then(|i| entries.get(i))
            .map_or(0, String::len)
    };
    let expanded: usize = proto
        .records
        .iter()
        .map(|r| {
            r.data.len()
                + key_len(&proto.partition_key_table, r.partition_key_index)
                + r.explicit_hash_key_index
                    .map_or(0, |i| key_len(&proto.explicit_hash_key_table, i))
        })
        .sum();
    if expanded
        > data
            .len()
            .saturating_mul(MAX_EXPANSION)
            .max(MIN_EXPANSION_BUDGET)
    {
        return Err(AggregationError::TooLarge {
            len: data.len(),
            expanded,
        });
    }
    let index = |record: usize, table: &'static str, entries: &[String], index: u64| {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < entries.len())
            .ok_or(AggregationError::BadIndex {
                record,
                table,
                index,
                len: entries.len(),
            })
    };
    let records = proto
        .records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let pk = index(
                i,
                "partition key",
                &proto.partition_key_table,
                r.partition_key_index,
            )?;
            let ehk = r
                .explicit_hash_key_index
                .map(|ehk| index(i, "explicit hash key", &proto.explicit_hash_key_table, ehk))
                .transpose()?;
            Ok((pk, ehk, r.data))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Deaggregated {
        partition_keys: proto.partition_key_table,
        explicit_hash_keys: proto.explicit_hash_key_table,
        records,
    }))
}

/// The user records of one aggregated record. Their keys stay in the aggregate's tables,
/// shared: an aggregate of many records naming one long key holds that key once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deaggregated {
    partition_keys: Vec<String>,
    explicit_hash_keys: Vec<String>,
    /// Per record: its partition key's index, its explicit hash key's, its payload (indexes
    /// checked at decoding).
    records: Vec<(usize, Option<usize>, Vec<u8>)>,
}

/// One user record of a [`Deaggregated`], borrowing its keys from the aggregate's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRecordRef<'a> {
    /// Its partition key.
    pub partition_key: &'a str,
    /// Its explicit hash key (a decimal 128-bit number), if the producer set one.
    pub explicit_hash_key: Option<&'a str>,
    /// Its payload.
    pub data: &'a [u8],
}

impl Deaggregated {
    /// How many user records the aggregate holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The user records in order (their sub-sequence numbers are their indexes).
    pub fn iter(&self) -> impl Iterator<Item = UserRecordRef<'_>> {
        self.records.iter().map(|(pk, ehk, data)| UserRecordRef {
            partition_key: &self.partition_keys[*pk],
            explicit_hash_key: ehk.map(|i| self.explicit_hash_keys[i].as_str()),
            data,
        })
    }

    /// The user records, each with its own copy of its keys.
    pub fn into_user_records(self) -> Vec<UserRecord> {
        self.iter()
            .map(|r| UserRecord {
                partition_key: r.partition_key.to_owned(),
                explicit_hash_key: r.explicit_hash_key.map(str::to_owned),
                data: r.data.to_vec(),
            })
            .collect()
    }
}

/// Refuses table entries longer than Kinesis allows.
fn check_tables(proto: &AggregatedRecordProto) -> Result<(), AggregationError> {
    let tables = [
        (
            "partition key",
            &proto.partition_key_table,
            MAX_PARTITION_KEY_BYTES,
        ),
        (
            "explicit hash key",
            &proto.explicit_hash_key_table,
            MAX_EXPLICIT_HASH_KEY_BYTES,
        ),
    ];
    for (table, entries, max) in tables {
        if let Some((index, key)) = entries.iter().enumerate().find(|(_, k)| k.len() > max) {
            return Err(AggregationError::KeyTooLong {
                table,
                index,
                len: key.len(),
                max,
            });
        }
    }
    Ok(())
}

/// A string table of an aggregate (partition keys or explicit hash keys): entries in order,
/// with an index so that a lookup does not scan the table.
#[derive(Debug, Default)]
struct Table {
    entries: Vec<String>,
    index: HashMap<String, u64>,
}

impl Table {
    fn find(&self, value: &str) -> Option<u64> {
        self.index.get(value).copied()
    }

    /// The index of `value`, added if new.
    fn intern(&mut self, value: String) -> u64 {
        if let Some(i) = self.find(&value) {
            return i;
        }
        let i = self.entries.len() as u64;
        self.index.insert(value.clone(), i);
        self.entries.push(value);
        i
    }

    fn len(&self) -> u64 {
        self.entries.len() as u64
    }
}

/// Builds one aggregated record, tracking its encoded size exactly as records are added, so a
/// producer can fill it up to a size limit without encoding twice.
#[derive(Debug, Default)]
pub struct AggregateBuilder {
    partition_keys: Table,
    explicit_hash_keys: Table,
    records: Vec<RecordProto>,
    /// Encoded protobuf length so far.
    body_len: usize,
}

impl AggregateBuilder {
    /// An empty aggregate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of user records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Size of the finished aggregated record (magic, protobuf and digest).
    pub fn size(&self) -> usize {
        MAGIC.len() + self.body_len + DIGEST_LEN
    }

    /// The size the aggregate would have with `record` added.
    pub fn size_with(&self, record: &UserRecord) -> usize {
        self.size() + self.growth(record)
    }

    /// Bytes `record` adds to the protobuf: new table entries, and the record itself.
    fn growth(&self, record: &UserRecord) -> usize {
        let mut growth = 0;
        let pk_index = self
            .partition_keys
            .find(&record.partition_key)
            .unwrap_or_else(|| {
                growth += field_len(1, record.partition_key.len());
                self.partition_keys.len()
            });
        let ehk_index = record.explicit_hash_key.as_deref().map(|ehk| {
            self.explicit_hash_keys.find(ehk).unwrap_or_else(|| {
                growth += field_len(2, ehk.len());
                self.explicit_hash_keys.len()
            })
        });
        let inner = RecordProto {
            partition_key_index: pk_index,
            explicit_hash_key_index: ehk_index,
            data: Vec::new(),
            tags: Vec::new(),
        }
        .encoded_len()
            // `data` is a required field, so the empty placeholder above was encoded too.
            - field_len(3, 0)
            + field_len(3, record.data.len());
        growth + field_len(3, inner)
    }

    /// Adds a user record.
    pub fn add(&mut self, record: UserRecord) {
        self.body_len += self.growth(&record);
        let partition_key_index = self.partition_keys.intern(record.partition_key);
        let explicit_hash_key_index = record
            .explicit_hash_key
            .map(|ehk| self.explicit_hash_keys.intern(ehk));
        self.records.push(RecordProto {
            partition_key_index,
            explicit_hash_key_index,
            data: record.data,
            tags: Vec::new(),
        });
    }

    /// The encoded aggregated record; the builder is empty again.
    pub fn finish(&mut self) -> Vec<u8> {
        let Self {
            partition_keys,
            explicit_hash_keys,
            records,
            ..
        } = std::mem::take(self);
        let proto = AggregatedRecordProto {
            partition_key_table: partition_keys.entries,
            explicit_hash_key_table: explicit_hash_keys.entries,
            records,
        };
        let body = proto.encode_to_vec();
        let mut out = Vec::with_capacity(MAGIC.len() + body.len() + DIGEST_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&body);
        out.extend_from_slice(&Md5::digest(&body));
        out
    }
}

/// Encoded length of a length-delimited protobuf field with `len` bytes of payload.
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(pk: &str, ehk: Option<&str>, data: &[u8]) -> UserRecord {
        UserRecord {
            partition_key: pk.into(),
            explicit_hash_key: ehk.map(Into::into),
            data: data.to_vec(),
        }
    }

    #[test]
    fn plain_records_are_not_aggregated() {
        assert_eq!(deaggregate(b"{\"hello\":1}").unwrap(), None);
        assert_eq!(deaggregate(b"").unwrap(), None);
    }

    #[test]
    fn an_aggregate_round_trips_in_order() {
        let records = vec![
            record("a", None, b"one"),
            record("b", Some("12345"), b""),
            record("a", Some("12345"), b"three"),
        ];
        let mut builder = AggregateBuilder::new();
        for r in records.clone() {
            builder.add(r);
        }
        let bytes = builder.finish();
        assert!(is_aggregated(&bytes));
        assert_eq!(
            deaggregate(&bytes)
                .unwrap()
                .map(Deaggregated::into_user_records),
            Some(records)
        );
    }

    #[test]
    fn a_flipped_bit_fails_the_digest() {
        let mut builder = AggregateBuilder::new();
        builder.add(record("k", None, b"payload"));
        let mut bytes = builder.finish();
        bytes[6] ^= 0x01;
        assert_eq!(deaggregate(&bytes), Err(AggregationError::DigestMismatch));
    }

    #[test]
    fn a_truncated_aggregate_is_an_error() {
        let mut builder = AggregateBuilder::new();
        builder.add(record("k", None, b"payload"));
        let bytes = builder.finish();
        assert!(deaggregate(&bytes[..bytes.len() - 3]).is_err());
        assert_eq!(
            deaggregate(&MAGIC),
            Err(AggregationError::TooShort { len: 4 })
        );
    }

    #[test]
    fn a_valid_digest_over_garbage_is_malformed() {
        let body = [0xFFu8, 0xFF, 0xFF];
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&Md5::digest(body));
        assert!(matches!(
            deaggregate(&bytes),
            Err(AggregationError::Malformed(_))
        ));
    }

    #[test]
    fn an_index_past_the_table_is_an_error() {
        let proto = AggregatedRecordProto {
            partition_key_table: vec!["a".into()],
            explicit_hash_key_table: vec![],
            records: vec![RecordProto {
                partition_key_index: 3,
                explicit_hash_key_index: None,
                data: b"x".to_vec(),
                tags: vec![],
            }],
        };
        let body = proto.encode_to_vec();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&Md5::digest(&body));
        assert!(matches!(
            deaggregate(&bytes),
            Err(AggregationError::BadIndex { index: 3, .. })
        ));
    }

    /// Wraps `proto` as an aggregated record (magic, protobuf, digest).
    fn wrap(proto: &AggregatedRecordProto) -> Vec<u8> {
        let body = proto.encode_to_vec();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&Md5::digest(&body));
        bytes
    }

    /// Issue 14: de-aggregation copied the partition key into every user record, so a 30 KB
    /// aggregate became 100 MB of strings, and one 1 MiB record could ask for 128 GiB. Keys
    /// longer than Kinesis allows, and aggregates that would grow past `MAX_EXPANSION` times
    /// their size, are refused before anything is copied (the record then goes to the
    /// dead-letter policy as a malformed aggregate).
    #[test]
    fn an_aggregate_that_would_expand_without_bound_is_refused() {
        let long = AggregatedRecordProto {
            partition_key_table: vec!["k".repeat(100_000)],
            explicit_hash_key_table: vec![],
            records: vec![RecordProto {
                partition_key_index: 0,
                explicit_hash_key_index: None,
                data: b"x".to_vec(),
                tags: vec![],
            }],
        };
        assert!(matches!(
            deaggregate(&wrap(&long)),
            Err(AggregationError::KeyTooLong {
                len: 100_000,
                max: 256,
                ..
            })
        ));
        // One 256-byte key named by 20 000 empty records: 5 MB of copies from a 60 KB record
        // (above the 4 MiB every aggregate may take).
        let amplifying = AggregatedRecordProto {
            partition_key_table: vec!["k".repeat(256)],
            explicit_hash_key_table: vec![],
            records: (0..20_000)
                .map(|_| RecordProto {
                    partition_key_index: 0,
                    explicit_hash_key_index: None,
                    data: vec![],
                    tags: vec![],
                })
                .collect(),
        };
        let bytes = wrap(&amplifying);
        assert!(
            matches!(deaggregate(&bytes), Err(AggregationError::TooLarge { .. })),
            "{} bytes",
            bytes.len()
        );
        // One 256-byte key named by 1 000 one-byte records (42 times its size, under 4 MiB)
        // passes, as does a KPL-like aggregate of 100-byte payloads under 256-byte keys.
        let small = AggregatedRecordProto {
            partition_key_table: vec!["k".repeat(256)],
            explicit_hash_key_table: vec![],
            records: (0..1_000)
                .map(|_| RecordProto {
                    partition_key_index: 0,
                    explicit_hash_key_index: None,
                    data: b"x".to_vec(),
                    tags: vec![],
                })
                .collect(),
        };
        assert_eq!(deaggregate(&wrap(&small)).unwrap().unwrap().len(), 1_000);
        let mut builder = AggregateBuilder::new();
        for i in 0..1_000 {
            builder.add(record(&format!("{i:0>256}"), None, &[b'x'; 100]));
        }
        assert_eq!(
            deaggregate(&builder.finish()).unwrap().unwrap().len(),
            1_000
        );
    }

    proptest! {
        #[test]
        fn any_records_round_trip_and_sizes_are_exact(
            records in proptest::collection::vec(
                ("[a-z]{1,8}", proptest::option::of("[0-9]{1,39}"), proptest::collection::vec(any::<u8>(), 0..300)),
                1..40,
            )
        ) {
            let records: Vec<UserRecord> = records
                .into_iter()
                .map(|(pk, ehk, data)| UserRecord { partition_key: pk, explicit_hash_key: ehk, data })
                .collect();
            let mut builder = AggregateBuilder::new();
            for r in records.clone() {
                let predicted = builder.size_with(&r);
                builder.add(r);
                prop_assert_eq!(builder.size(), predicted);
            }
            let size = builder.size();
            let bytes = builder.finish();
            prop_assert_eq!(bytes.len(), size);
            prop_assert_eq!(deaggregate(&bytes).unwrap().map(Deaggregated::into_user_records), Some(records));
            prop_assert!(builder.is_empty());
        }

        #[test]
        fn deaggregation_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&data);
            let _ = deaggregate(&bytes);
            let mut with_digest = MAGIC.to_vec();
            with_digest.extend_from_slice(&data);
            with_digest.extend_from_slice(&Md5::digest(&data));
            let _ = deaggregate(&with_digest);
        }
    }
}

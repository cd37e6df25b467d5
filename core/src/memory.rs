//! An in-memory stream: shards of records held in memory, for tests and benchmarks.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::error::SourceError;
use crate::position::{RecordPosition, SequenceNumber, ShardId, ShardInfo, StartPosition};
use crate::record::RawBatch;
use crate::source::{ReadBatch, ReadLimits, ShardReader, ShardStatus, Source, StreamFacts};

/// One record of a [`MemoryStream`].
#[derive(Clone, Debug)]
struct MemoryRecord {
    arrival_ms: i64,
    partition_key: Vec<u8>,
    data: Vec<u8>,
    fault: Option<String>,
}

/// A stream whose shards are vectors in memory; sequence numbers are indexes from 1. All shards
/// are open (reads end at the tip); `close` ends a shard like a split parent. It says it was
/// created at time 0 and keeps records 24 hours (see [`set_facts`](Self::set_facts)), and
/// [`unlist`](Self::unlist) makes a shard vanish from listings, as an expired one does.
#[derive(Clone)]
pub struct MemoryStream {
    name: String,
    shards: Arc<Mutex<Vec<MemoryShard>>>,
    listing: Arc<Mutex<Listing>>,
}

/// What the stream says about itself beyond its shards.
struct Listing {
    facts: Option<StreamFacts>,
    unlisted: Vec<ShardId>,
    /// The stream answers "not found", as Kinesis does before it is created.
    missing: bool,
}

type MemoryShard = (ShardInfo, Vec<MemoryRecord>);

impl MemoryStream {
    /// A stream with `shards` empty shards named `shard-0`, `shard-1`, ...
    pub fn new(name: impl Into<String>, shards: usize) -> Self {
        let shards = (0..shards)
            .map(|i| {
                let info = ShardInfo {
                    id: ShardId::new(format!("shard-{i}")),
                    parents: Vec::new(),
                    hash_key_range: (0, u128::MAX),
                    closed: false,
                };
                (info, Vec::new())
            })
            .collect();
        Self {
            name: name.into(),
            shards: Arc::new(Mutex::new(shards)),
            listing: Arc::new(Mutex::new(Listing {
                facts: Some(StreamFacts {
                    created_ms: 0,
                    retention: std::time::Duration::from_secs(24 * 3600),
                }),
                unlisted: Vec::new(),
                missing: false,
            })),
        }
    }

    fn listing(&self) -> std::sync::MutexGuard<'_, Listing> {
        self.listing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shard `shard` is no longer listed (Kinesis drops a closed shard from its listings once
    /// its records expired). Its records stay readable here.
    pub fn unlist(&self, shard: usize) {
        let id = self.lock()[shard].0.id.clone();
        self.listing().unlisted.push(id);
    }

    /// Whether listing the stream answers [`SourceError::StreamNotFound`], as a stream not
    /// created yet does.
    pub fn set_missing(&self, missing: bool) {
        self.listing().missing = missing;
    }

    /// What the stream says of its creation time and retention (`None`: it cannot tell).
    pub fn set_facts(&self, facts: Option<StreamFacts>) {
        self.listing().facts = facts;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<MemoryShard>> {
        self.shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a record to shard `shard`; returns its sequence number.
    ///
    /// # Panics
    /// If the shard does not exist or is closed.
    pub fn push(&self, shard: usize, arrival_ms: i64, partition_key: &[u8], data: &[u8]) -> u128 {
        let mut shards = self.lock();
        let (info, records) = &mut shards[shard];
        assert!(!info.closed, "shard {} is closed", info.id);
        records.push(MemoryRecord {
            arrival_ms,
            partition_key: partition_key.to_vec(),
            data: data.to_vec(),
            fault: None,
        });
        records.len() as u128
    }

    /// Appends a record readers deliver as one the source could not interpret (as a corrupt
    /// KPL aggregate is), with `reason`.
    pub fn push_corrupt(&self, shard: usize, arrival_ms: i64, data: &[u8], reason: &str) -> u128 {
        let n = self.push(shard, arrival_ms, b"", data);
        let mut shards = self.lock();
        if let Some(last) = shards[shard].1.last_mut() {
            last.fault = Some(reason.to_owned());
        }
        n
    }

    /// Closes shard `shard`: readers end after its last record.
    pub fn close(&self, shard: usize) {
        self.lock()[shard].0.closed = true;
    }

    /// Splits open shard `shard` at the middle of its hash-key range, as Kinesis `SplitShard`
    /// does: the parent closes and two children (named `shard-<n>` by their index) take its
    /// range. Returns the children's indexes.
    ///
    /// # Panics
    /// If the shard does not exist or is closed.
    pub fn split(&self, shard: usize) -> (usize, usize) {
        let mut shards = self.lock();
        let (parent, _) = &mut shards[shard];
        assert!(!parent.closed, "shard {} is closed", parent.id);
        parent.closed = true;
        let (low, high) = parent.hash_key_range;
        let middle = low + (high - low) / 2;
        let parents = vec![parent.id.clone()];
        let first = shards.len();
        for range in [(low, middle), (middle + 1, high)] {
            let info = ShardInfo {
                id: ShardId::new(format!("shard-{}", shards.len())),
                parents: parents.clone(),
                hash_key_range: range,
                closed: false,
            };
            shards.push((info, Vec::new()));
        }
        (first, first + 1)
    }

    /// Merges open shards `a` and `b`, as Kinesis `MergeShards` does: both close and one child
    /// takes both ranges. Returns the child's index.
    ///
    /// # Panics
    /// If a shard does not exist or is closed, or `a == b`.
    pub fn merge(&self, a: usize, b: usize) -> usize {
        assert_ne!(a, b, "a shard merges with another shard");
        let mut shards = self.lock();
        for i in [a, b] {
            assert!(!shards[i].0.closed, "shard {} is closed", shards[i].0.id);
            shards[i].0.closed = true;
        }
        let range = (
            shards[a]
                .0
                .hash_key_range
                .0
                .min(shards[b].0.hash_key_range.0),
            shards[a]
                .0
                .hash_key_range
                .1
                .max(shards[b].0.hash_key_range.1),
        );
        let info = ShardInfo {
            id: ShardId::new(format!("shard-{}", shards.len())),
            parents: vec![shards[a].0.id.clone(), shards[b].0.id.clone()],
            hash_key_range: range,
            closed: false,
        };
        shards.push((info, Vec::new()));
        shards.len() - 1
    }

    /// Every shard as the stream describes it, by index.
    pub fn shards(&self) -> Vec<ShardInfo> {
        self.lock().iter().map(|(info, _)| info.clone()).collect()
    }
}

#[async_trait]
impl Source for MemoryStream {
    fn stream_name(&self) -> &str {
        &self.name
    }

    async fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        let listing = self.listing();
        if listing.missing {
            return Err(SourceError::StreamNotFound {
                stream: self.name.clone(),
            });
        }
        Ok(self
            .lock()
            .iter()
            .map(|(info, _)| info)
            .filter(|info| !listing.unlisted.contains(&info.id))
            .cloned()
            .collect())
    }

    async fn facts(&self) -> Result<Option<StreamFacts>, SourceError> {
        Ok(self.listing().facts)
    }

    async fn open_shard(
        &self,
        shard: &ShardInfo,
        start: StartPosition,
        limits: ReadLimits,
    ) -> Result<Box<dyn ShardReader>, SourceError> {
        let shards = self.lock();
        let index = shards
            .iter()
            .position(|(info, _)| info.id == shard.id)
            .ok_or_else(|| SourceError::ShardNotFound {
                stream: self.name.clone(),
                shard: shard.id.clone(),
            })?;
        let records = &shards[index].1;
        let next = match start {
            StartPosition::TrimHorizon => 0,
            StartPosition::Latest => records.len(),
            StartPosition::AtSequence(s) => s
                .as_u128()
                .map_or(records.len(), |n| n.saturating_sub(1) as usize),
            StartPosition::After(p) => p.sequence.as_u128().map_or(records.len(), |n| n as usize),
            StartPosition::AtTimestamp(t) => records
                .iter()
                .position(|r| r.arrival_ms >= t)
                .unwrap_or(records.len()),
        };
        Ok(Box::new(MemoryReader {
            stream: self.clone(),
            index,
            next,
            limits,
        }))
    }
}

struct MemoryReader {
    stream: MemoryStream,
    index: usize,
    next: usize,
    limits: ReadLimits,
}

#[async_trait]
impl ShardReader for MemoryReader {
    async fn read(&mut self) -> Result<ReadBatch, SourceError> {
        let shards = self.stream.lock();
        let (info, records) = &shards[self.index];
        let mut batch = RawBatch::default();
        while self.next < records.len()
            && batch.len() < self.limits.max_records
            && batch.byte_len() < self.limits.max_bytes
        {
            let r = &records[self.next];
            self.next += 1;
            let position = RecordPosition::new(SequenceNumber::from_u128(self.next as u128));
            match &r.fault {
                Some(reason) => batch.push_faulty(
                    position,
                    r.arrival_ms,
                    &r.partition_key,
                    &r.data,
                    reason.clone(),
                ),
                None => batch.push(position, r.arrival_ms, &r.partition_key, &r.data),
            }
        }
        let status = match (self.next < records.len(), info.closed) {
            (true, _) => ShardStatus::More,
            (false, true) => ShardStatus::Ended,
            (false, false) => ShardStatus::CaughtUp,
        };
        Ok(ReadBatch {
            records: batch,
            millis_behind_latest: Some(0),
            status,
        })
    }
}

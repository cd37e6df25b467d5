//! `HoldingSink`: an in-memory model of a sink that gathers the outputs of records into units
//! across commits, as `S3Sink` does with objects, for tests and the simulation checker.
//!
//! Each shard's record outputs fill a unit, named by its first record's position, cut by
//! count, by a latency bound on a quiet shard, and at shard end. Starting a unit where a stored
//! one starts ends the new one where the stored one ended (S3Sink's HEAD), so a replay cuts
//! what an earlier run cut. A unit is durable when sealed, and sealed only over what was
//! stored at its key when it started (S3Sink's `If-None-Match`/`If-Match`): a unit another
//! writer stored meanwhile refuses it as fenced. Keyed results are stored one each.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::{Fenced, SinkError};
use crate::lease::LeaseEpoch;
use crate::position::{RecordPosition, ShardId};
use crate::sink::{Held, InspectSink, OutputBatch, OutputId, Sink, SinkContext, SinkWriter};

/// Units the model remembers as cuts per shard (S3Sink keeps 256).
const MAX_CUTS: usize = 256;

struct Unit<T> {
    last: RecordPosition,
    outputs: Vec<(String, T)>,
    /// Which store put it there (an ETag).
    version: u64,
}

struct Store<T> {
    units: BTreeMap<(ShardId, RecordPosition), Unit<T>>,
    keyed: BTreeMap<(ShardId, String), T>,
    /// Stores so far: the next unit's version.
    stores: u64,
}

/// A holding sink in memory. Cloning shares the store.
pub struct HoldingSink<T> {
    name: String,
    records_per_unit: usize,
    max_latency: Duration,
    store: Arc<Mutex<Store<T>>>,
}

impl<T> Clone for HoldingSink<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            records_per_unit: self.records_per_unit,
            max_latency: self.max_latency,
            store: Arc::clone(&self.store),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> HoldingSink<T> {
    /// Units of `records_per_unit` input records, or fewer after `max_latency` on a quiet shard.
    ///
    /// # Panics
    /// If `records_per_unit` is zero.
    pub fn new(name: impl Into<String>, records_per_unit: usize, max_latency: Duration) -> Self {
        assert!(records_per_unit > 0, "a unit holds at least one record");
        Self {
            name: name.into(),
            records_per_unit,
            max_latency,
            store: Arc::new(Mutex::new(Store {
                units: BTreeMap::new(),
                keyed: BTreeMap::new(),
                stores: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store<T>> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every stored output by (shard, identity path), and the identities stored in more than
    /// one unit (a record written twice: never, for a correct runtime).
    pub fn contents_and_duplicates(&self) -> (BTreeMap<(ShardId, String), T>, Vec<String>) {
        let store = self.lock();
        let mut out = store.keyed.clone();
        let mut duplicates = Vec::new();
        for ((shard, first), unit) in &store.units {
            for (path, value) in &unit.outputs {
                if out
                    .insert((shard.clone(), path.clone()), value.clone())
                    .is_some()
                {
                    duplicates.push(format!("{shard}/{path} (again in the unit at {first})"));
                }
            }
        }
        (out, duplicates)
    }

    /// The stored units of `shard`: (first, last) positions.
    pub fn units(&self, shard: &ShardId) -> Vec<(RecordPosition, RecordPosition)> {
        self.lock()
            .units
            .iter()
            .filter(|((s, _), _)| s == shard)
            .map(|((_, first), u)| (first.clone(), u.last.clone()))
            .collect()
    }
}

struct Filling<T> {
    first: RecordPosition,
    last: RecordPosition,
    records: usize,
    outputs: Vec<(String, T)>,
    started: Instant,
    /// Where a unit stored at `first` ended: a replay ends there too.
    ends_at: Option<RecordPosition>,
    /// The version of the unit stored at `first` when this one started (`None`: none was).
    replaces: Option<u64>,
    /// The lease epoch of the shard's life that writes it.
    epoch: LeaseEpoch,
}

struct ShardState<T> {
    filling: Option<Filling<T>>,
    cuts: VecDeque<RecordPosition>,
}

impl<T> Default for ShardState<T> {
    fn default() -> Self {
        Self {
            filling: None,
            cuts: VecDeque::new(),
        }
    }
}

struct HoldingWriter<T> {
    sink: HoldingSink<T>,
    shards: BTreeMap<ShardId, ShardState<T>>,
    keyed: Vec<((ShardId, String), T)>,
}

impl<T: Clone + Send + Sync + 'static> HoldingWriter<T> {
    /// Stores the shard's filling unit if its key still holds what it held when the unit
    /// started; otherwise another writer stored there meanwhile, and the writer is fenced.
    fn seal(&mut self, shard: &ShardId) -> Result<(), SinkError> {
        let Some(state) = self.shards.get_mut(shard) else {
            return Ok(());
        };
        let Some(f) = state.filling.take() else {
            return Ok(());
        };
        let mut store = self.sink.lock();
        let key = (shard.clone(), f.first.clone());
        if store.units.get(&key).map(|u| u.version) != f.replaces {
            return Err(SinkError {
                sink: self.sink.name.clone(),
                operation: "write",
                retryable: false,
                source: Box::new(Fenced {
                    shard: shard.clone(),
                    output: format!("unit at {}", f.first),
                    epoch: f.epoch,
                }),
            });
        }
        if state.cuts.len() == MAX_CUTS {
            state.cuts.pop_front();
        }
        state.cuts.push_back(f.last.clone());
        store.stores += 1;
        let version = store.stores;
        store.units.insert(
            key,
            Unit {
                last: f.last,
                outputs: f.outputs,
                version,
            },
        );
        Ok(())
    }

    fn full_before(&self, f: &Filling<T>, next: &RecordPosition) -> bool {
        match &f.ends_at {
            Some(end) => next > end,
            None => f.records >= self.sink.records_per_unit,
        }
    }
}

#[async_trait]
impl<T: Clone + Send + Sync + 'static> SinkWriter<T> for HoldingWriter<T> {
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        let shard = batch.shard;
        for output in batch.outputs {
            let path = output.id.to_path();
            let OutputId::Record { position, .. } = &output.id else {
                self.keyed.push(((shard.clone(), path), output.value));
                continue;
            };
            let (same_record, full) = match self.shards.get(&shard).and_then(|s| s.filling.as_ref())
            {
                Some(f) => (
                    &f.last == position && f.records > 0,
                    self.full_before(f, position),
                ),
                None => (false, false),
            };
            // Outputs of one record (flat_map) always share a unit.
            let new_record = !same_record;
            if new_record && full {
                self.seal(&shard)?;
            }
            let state = self.shards.entry(shard.clone()).or_default();
            if state.filling.is_none() {
                let stored = self
                    .sink
                    .lock()
                    .units
                    .get(&(shard.clone(), position.clone()))
                    .map(|u| (u.last.clone(), u.version));
                state.filling = Some(Filling {
                    first: position.clone(),
                    last: position.clone(),
                    records: 0,
                    outputs: Vec::new(),
                    started: Instant::now(),
                    ends_at: stored.as_ref().map(|(last, _)| last.clone()),
                    replaces: stored.map(|(_, version)| version),
                    epoch: batch.lease_epoch,
                });
            }
            let f = state.filling.as_mut().expect("started above");
            if new_record {
                f.records += 1;
                f.last = position.clone();
            }
            f.outputs.push((path, output.value));
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), SinkError> {
        {
            let mut store = self.sink.lock();
            for (key, value) in self.keyed.drain(..) {
                store.keyed.insert(key, value);
            }
        }
        let overdue: Vec<ShardId> = self
            .shards
            .iter()
            .filter(|(_, s)| {
                s.filling.as_ref().is_some_and(|f| {
                    f.ends_at.is_none() && f.started.elapsed() >= self.sink.max_latency
                })
            })
            .map(|(shard, _)| shard.clone())
            .collect();
        for shard in overdue {
            self.seal(&shard)?;
        }
        Ok(())
    }

    fn held(&self) -> Vec<(ShardId, Held)> {
        self.shards
            .iter()
            .filter(|(_, s)| s.filling.is_some() || !s.cuts.is_empty())
            .map(|(shard, s)| {
                let held = Held {
                    cuts: s.cuts.iter().cloned().collect(),
                    buffered: s.filling.is_some(),
                };
                (shard.clone(), held)
            })
            .collect()
    }

    async fn end_shard(&mut self, shard: &ShardId) -> Result<(), SinkError> {
        self.seal(shard)?;
        self.shards.remove(shard);
        Ok(())
    }

    fn release_shard(&mut self, shard: &ShardId) {
        self.shards.remove(shard);
        self.keyed.retain(|((s, _), _)| s != shard);
    }
}

#[async_trait]
impl<T: Clone + Send + Sync + 'static> Sink<T> for HoldingSink<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn holds_record_outputs(&self) -> bool {
        true
    }

    async fn open(&self, _cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(HoldingWriter {
            sink: self.clone(),
            shards: BTreeMap::new(),
            keyed: Vec::new(),
        }))
    }
}

#[async_trait]
impl<T: Clone + Send + Sync + 'static> InspectSink<T> for HoldingSink<T> {
    async fn committed(&self) -> Result<BTreeMap<(ShardId, String), T>, SinkError> {
        Ok(self.contents_and_duplicates().0)
    }
}

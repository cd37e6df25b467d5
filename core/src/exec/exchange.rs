//! The exchange: hashes each keyed record to the keyed worker that owns its key, and sends
//! every worker one message per epoch over a bounded channel.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use async_trait::async_trait;
use rustc_hash::FxBuildHasher;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::operator::{Emit, EpochCx, Ident, KeyedRecord, RecordCx, ReportFailure};
use crate::pool::VecPool;
use crate::topology::Exchanges;

use super::chain::next_capacity;

/// One epoch of one shard for one keyed worker.
pub(crate) struct ExchangeMsg<K, T> {
    pub(crate) epoch: EpochCx,
    pub(crate) records: Vec<KeyedRecord<K, T>>,
}

/// Record buffers of one exchange: a worker gives back each one it emptied, a shard task takes
/// one for each it sends.
pub(crate) type RecordPool<K, T> = Arc<VecPool<KeyedRecord<K, T>>>;

/// The pool of an exchange with `workers` workers: a spare buffer per worker and one more;
/// buffers of more than 2 MiB are not kept.
pub(crate) fn record_pool<K, T>(workers: usize) -> RecordPool<K, T> {
    Arc::new(VecPool::new(workers + 1, 2 << 20))
}

/// The shard tasks' side of one keyed branch: a sender per worker and the buffer pool.
pub(crate) struct Exchange<K, T> {
    pub(crate) senders: Vec<mpsc::Sender<ExchangeMsg<K, T>>>,
    pub(crate) pool: RecordPool<K, T>,
}

impl<K, T> Clone for Exchange<K, T> {
    fn clone(&self) -> Self {
        Self {
            senders: self.senders.clone(),
            pool: Arc::clone(&self.pool),
        }
    }
}

/// The shard-side end of an exchange: hashes each record's key to a worker and sends every
/// worker one message per epoch (possibly without records: each worker must see every epoch).
pub(crate) struct ExchangeEmitter<K, T, F> {
    pub(crate) key_fn: F,
    pub(crate) exchange: Exchange<K, T>,
    pub(crate) buffers: Vec<Vec<KeyedRecord<K, T>>>,
    /// Where a record whose key function panics goes (the shard's dead-letter policy).
    pub(crate) failures: Option<Arc<dyn ReportFailure>>,
}

impl<K, T, F> ExchangeEmitter<K, T, F> {
    pub(crate) fn new(
        key_fn: F,
        exchange: Exchange<K, T>,
        failures: Option<Arc<dyn ReportFailure>>,
    ) -> Self {
        let buffers = exchange.senders.iter().map(|_| Vec::new()).collect();
        Self {
            key_fn,
            exchange,
            buffers,
            failures,
        }
    }
}

#[async_trait]
impl<K, T, F> Emit<T> for ExchangeEmitter<K, T, F>
where
    K: Hash + Send + 'static,
    T: Send + 'static,
    F: Fn(&T) -> K + Send + 'static,
{
    fn emit(&mut self, cx: &RecordCx, value: T) {
        let key = match super::user_code::call(|| (self.key_fn)(&value)) {
            Ok(key) => key,
            Err(panic) => match &self.failures {
                Some(failures) => {
                    let reason = super::user_code::Panic::REASON;
                    failures.fail(cx, "key_by", reason, 0, false);
                    return;
                }
                None => panic.resume(),
            },
        };
        let worker = worker_of(&key, self.buffers.len());
        let Ident::Record { index, fanout } = cx.ident else {
            unreachable!("key_by runs before any keyed operator");
        };
        self.buffers[worker].push(KeyedRecord::of_input(key, value, cx, index, fanout));
    }

    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        let Exchange { senders, pool } = &self.exchange;
        for (sender, buffer) in senders.iter().zip(&mut self.buffers) {
            let records = std::mem::replace(buffer, pool.take(next_capacity(buffer.len())));
            let msg = ExchangeMsg {
                epoch: epoch.clone(),
                records,
            };
            // A closed channel means the worker failed; the run reports the worker's error.
            sender
                .send(msg)
                .await
                .map_err(|_| Error::Task("keyed worker stopped".into()))?;
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), Error> {
        // The workers commit their own sinks and report to the tracker.
        Ok(())
    }

    fn discard(&mut self) {
        self.buffers.iter_mut().for_each(Vec::clear);
    }
}

/// Takes a branch's typed exchange from the registry.
pub(crate) fn exchange<K: 'static + Send, T: 'static + Send>(
    exchanges: &Exchanges,
    branch: usize,
) -> Exchange<K, T> {
    exchanges[branch]
        .downcast_ref::<Exchange<K, T>>()
        .expect("the exchange registry holds the exchange of the branch's types")
        .clone()
}

/// The keyed worker, of `workers`, that owns `key`: the exchange sends its records there, and
/// a restore from a snapshot loads it there.
#[inline]
pub(crate) fn worker_of<K: Hash>(key: &K, workers: usize) -> usize {
    if workers == 1 {
        return 0;
    }
    // Multiply-shift maps the hash onto the workers without a division.
    let h = FxBuildHasher.hash_one(key);
    ((u128::from(h) * workers as u128) >> 64) as usize
}

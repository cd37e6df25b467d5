//! `key_by` and the keyed stream: running `reduce`/`aggregate`, or `window` for windowed ones.

use serde::{Deserialize, Serialize};
use shardflow_core::topology::{Keyed, ShardStage, Stream};

use crate::aggregate::{Aggregator, Reduce};
use crate::key::Key;
use crate::running::RunningAggregate;
use crate::window::{WindowAssigner, WindowedStream};

/// A running result for a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedValue<K, V> {
    /// The key.
    pub key: K,
    /// The value.
    pub value: V,
}

/// A stream grouped by key, before a keyed operator.
pub struct KeyedStream<T, K, F, S> {
    pub(crate) stream: Stream<T, S>,
    pub(crate) key_fn: F,
    pub(crate) _k: std::marker::PhantomData<fn() -> K>,
}

/// `key_by`, before any keyed operator.
pub trait KeyBy<T, S: ShardStage>: Sized {
    /// Groups by `key_fn`: keyed operators see each key's values of a shard together, on one of
    /// the keyed workers (keys are hashed over them).
    fn key_by<K: Key, F>(self, key_fn: F) -> KeyedStream<T, K, F, S>
    where
        F: Fn(&T) -> K + Clone + Send + Sync + 'static;
}

impl<T: Send + 'static, S: ShardStage> KeyBy<T, S> for Stream<T, S> {
    fn key_by<K: Key, F>(self, key_fn: F) -> KeyedStream<T, K, F, S>
    where
        F: Fn(&T) -> K + Clone + Send + Sync + 'static,
    {
        KeyedStream {
            stream: self,
            key_fn,
            _k: std::marker::PhantomData,
        }
    }
}

impl<T, K, F, S> KeyedStream<T, K, F, S>
where
    T: Send + 'static,
    K: Key,
    F: Fn(&T) -> K + Clone + Send + Sync + 'static,
    S: ShardStage,
{
    /// Groups the keyed values into event-time windows.
    pub fn window<W: WindowAssigner>(self, assigner: W) -> WindowedStream<T, K, F, S, W> {
        WindowedStream::new(self, assigner)
    }

    /// A running aggregate per key, emitted after each batch for the keys it changed. Its state
    /// lives as long as the shard, so a restart replays the shard from its start: prefer a
    /// window for unbounded streams.
    pub fn aggregate<A: Aggregator<T>>(self, agg: A) -> Stream<KeyedValue<K, A::Out>, Keyed> {
        let (main, _late) = self.stream.keyed("aggregate", self.key_fn, move || {
            RunningAggregate::new(agg.clone())
        });
        main
    }

    /// A running reduce per key (see [`KeyedStream::aggregate`]).
    pub fn reduce<R>(self, f: R) -> Stream<KeyedValue<K, T>, Keyed>
    where
        T: Clone + serde::Serialize + serde::de::DeserializeOwned,
        R: Fn(&T, &T) -> T + Clone + Send + Sync + 'static,
    {
        self.aggregate(Reduce::with(f))
    }
}

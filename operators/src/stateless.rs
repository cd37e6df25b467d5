//! Stateless operators: `map`, `filter`, `flat_map`, `inspect`, and the fallible `try_map`
//! whose failures go to the topology's dead-letter policy.

use std::fmt::Display;

use shardflow_core::topology::{Collector, RecordCx, ShardStage, Stage, Stream};

use crate::misuse::{AggregateNeedsKey, WindowNeedsKey};

/// Stateless operators on any stream.
pub trait StreamExt<T, S: Stage>: Sized {
    /// Transforms each value.
    fn map<U, F>(self, f: F) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        F: Fn(T) -> U + Clone + Send + Sync + 'static;

    /// Keeps the values for which `f` is true.
    fn filter<F>(self, f: F) -> Stream<T, S::AfterOp>
    where
        F: Fn(&T) -> bool + Clone + Send + Sync + 'static;

    /// Turns each value into any number of values.
    fn flat_map<U, I, F>(self, f: F) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        I: IntoIterator<Item = U>,
        F: Fn(T) -> I + Clone + Send + Sync + 'static;

    /// Looks at each value (for logging or metrics) and passes it on.
    fn inspect<F>(self, f: F) -> Stream<T, S::AfterOp>
    where
        F: Fn(&T) + Clone + Send + Sync + 'static;

    /// Not callable here: a stream needs `.key_by(..)` before `.window(..)`. Declared so that
    /// the compiler says so (see [`WindowNeedsKey`]) instead of "no method named `window`".
    fn window<W>(self, assigner: W) -> <Self as WindowNeedsKey<W>>::Windowed
    where
        Self: WindowNeedsKey<W>,
    {
        self.window_of_keyed(assigner)
    }

    /// Not callable here: a stream needs `.key_by(..)` before `.aggregate(..)` (see
    /// [`AggregateNeedsKey`]).
    fn aggregate<A>(self, aggregator: A) -> <Self as AggregateNeedsKey<A>>::Aggregated
    where
        Self: AggregateNeedsKey<A>,
    {
        self.aggregate_of_keyed(aggregator)
    }
}

impl<T: Send + 'static, S: Stage> StreamExt<T, S> for Stream<T, S> {
    fn map<U, F>(self, f: F) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        F: Fn(T) -> U + Clone + Send + Sync + 'static,
    {
        self.stateless("map", move || {
            let f = f.clone();
            move |cx: &RecordCx, v: T, out: &mut Collector<'_, U>| out.emit(cx, f(v))
        })
    }

    fn filter<F>(self, f: F) -> Stream<T, S::AfterOp>
    where
        F: Fn(&T) -> bool + Clone + Send + Sync + 'static,
    {
        self.stateless("filter", move || {
            let f = f.clone();
            move |cx: &RecordCx, v: T, out: &mut Collector<'_, T>| {
                if f(&v) {
                    out.emit(cx, v);
                }
            }
        })
    }

    fn flat_map<U, I, F>(self, f: F) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        I: IntoIterator<Item = U>,
        F: Fn(T) -> I + Clone + Send + Sync + 'static,
    {
        // Each output gets an identity of its own: the input's and its index among them.
        self.stateless_fan_out("flat_map", move || {
            let f = f.clone();
            move |cx: &RecordCx, v: T, out: &mut Collector<'_, U>| {
                for u in f(v) {
                    out.emit(cx, u);
                }
            }
        })
    }

    fn inspect<F>(self, f: F) -> Stream<T, S::AfterOp>
    where
        F: Fn(&T) + Clone + Send + Sync + 'static,
    {
        self.stateless("inspect", move || {
            let f = f.clone();
            move |cx: &RecordCx, v: T, out: &mut Collector<'_, T>| {
                f(&v);
                out.emit(cx, v);
            }
        })
    }
}

/// Operators allowed only before `key_by`, where each value still has its input record.
pub trait ShardStreamExt<T, S: ShardStage>: Sized {
    /// Transforms each value with a function that may fail. A failure is handled by the
    /// topology's dead-letter policy (retry, dead-letter sink with the input record, or stop
    /// the shard); it never silently drops the record.
    fn try_map<U, E, F>(self, name: &'static str, f: F) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        E: Display,
        F: Fn(&T) -> Result<U, E> + Clone + Send + Sync + 'static;
}

impl<T: Send + 'static, S: ShardStage> ShardStreamExt<T, S> for Stream<T, S> {
    fn try_map<U, E, F>(self, name: &'static str, f: F) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        E: Display,
        F: Fn(&T) -> Result<U, E> + Clone + Send + Sync + 'static,
    {
        // Retries wait on the runtime's clock, never on a blocked thread.
        self.try_stateless(name, move || {
            let f = f.clone();
            move |v: &T| f(v).map_err(|e| e.to_string())
        })
    }
}

//! Aggregators: `Count`, `Sum`, `Min`, `Max`, `Reduce`, and the `Aggregator` trait for your own.

use std::marker::PhantomData;
use std::ops::AddAssign;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Folds values of type `T` into an accumulator and reads a result from it.
pub trait Aggregator<T>: Clone + Send + Sync + 'static {
    /// The running state.
    ///
    /// A serde type, so that keyed state can be snapshotted (`StatePolicy::Snapshot`).
    type Acc: Send + Serialize + DeserializeOwned + 'static;
    /// The result.
    type Out: Send + 'static;
    /// The state before any value: `add` is always called at least once before `result`.
    fn init(&self, first: &T) -> Self::Acc;
    /// Folds in one value.
    fn add(&self, acc: &mut Self::Acc, value: &T);
    /// Combines two states (session windows merge).
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc);
    /// The result of a state.
    fn result(&self, acc: &Self::Acc) -> Self::Out;
}

/// Counts values.
#[derive(Clone, Copy, Debug, Default)]
pub struct Count;

impl<T> Aggregator<T> for Count {
    type Acc = u64;
    type Out = u64;
    fn init(&self, _first: &T) -> u64 {
        0
    }
    fn add(&self, acc: &mut u64, _value: &T) {
        *acc += 1;
    }
    fn merge(&self, acc: &mut u64, other: u64) {
        *acc += other;
    }
    fn result(&self, acc: &u64) -> u64 {
        *acc
    }
}

/// Sums a field: `Sum::of(|c: &Click| c.cost_micros)`.
pub struct Sum<T, N, F> {
    f: F,
    _t: PhantomData<fn(&T) -> N>,
}

impl<T, N, F: Clone> Clone for Sum<T, N, F> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _t: PhantomData,
        }
    }
}

impl<T, N, F> Sum<T, N, F> {
    /// Sums `f(value)`.
    pub fn of(f: F) -> Self {
        Self { f, _t: PhantomData }
    }
}

impl<T: 'static, N, F> Aggregator<T> for Sum<T, N, F>
where
    N: AddAssign + Default + Copy + Send + Sync + Serialize + DeserializeOwned + 'static,
    F: Fn(&T) -> N + Clone + Send + Sync + 'static,
{
    type Acc = N;
    type Out = N;
    fn init(&self, _first: &T) -> N {
        N::default()
    }
    fn add(&self, acc: &mut N, value: &T) {
        *acc += (self.f)(value);
    }
    fn merge(&self, acc: &mut N, other: N) {
        *acc += other;
    }
    fn result(&self, acc: &N) -> N {
        *acc
    }
}

macro_rules! extremum {
    ($name:ident, $doc:literal, $keep:ident) => {
        #[doc = $doc]
        pub struct $name<T, N, F> {
            f: F,
            _t: PhantomData<fn(&T) -> N>,
        }

        impl<T, N, F: Clone> Clone for $name<T, N, F> {
            fn clone(&self) -> Self {
                Self {
                    f: self.f.clone(),
                    _t: PhantomData,
                }
            }
        }

        impl<T, N, F> $name<T, N, F> {
            /// Over `f(value)`.
            pub fn of(f: F) -> Self {
                Self { f, _t: PhantomData }
            }
        }

        impl<T: 'static, N, F> Aggregator<T> for $name<T, N, F>
        where
            N: PartialOrd + Copy + Send + Sync + Serialize + DeserializeOwned + 'static,
            F: Fn(&T) -> N + Clone + Send + Sync + 'static,
        {
            type Acc = N;
            type Out = N;
            fn init(&self, first: &T) -> N {
                (self.f)(first)
            }
            fn add(&self, acc: &mut N, value: &T) {
                let v = (self.f)(value);
                if v.$keep(acc) {
                    *acc = v;
                }
            }
            fn merge(&self, acc: &mut N, other: N) {
                if other.$keep(acc) {
                    *acc = other;
                }
            }
            fn result(&self, acc: &N) -> N {
                *acc
            }
        }
    };
}

extremum!(
    Min,
    "The smallest `f(value)`: `Min::of(|r: &Reading| r.celsius)`.",
    lt
);
extremum!(
    Max,
    "The largest `f(value)`: `Max::of(|r: &Reading| r.celsius)`.",
    gt
);

/// Combines values pairwise with a function: `Reduce::with(|a, b| a.max(b))`.
#[derive(Clone)]
pub struct Reduce<F>(F);

impl<F> Reduce<F> {
    /// Reduces with `f`.
    pub fn with(f: F) -> Self {
        Self(f)
    }
}

impl<T, F> Aggregator<T> for Reduce<F>
where
    T: Clone + Send + Serialize + DeserializeOwned + 'static,
    F: Fn(&T, &T) -> T + Clone + Send + Sync + 'static,
{
    type Acc = Option<T>;
    type Out = T;
    fn init(&self, _first: &T) -> Option<T> {
        None
    }
    fn add(&self, acc: &mut Option<T>, value: &T) {
        *acc = Some(match acc.take() {
            Some(a) => (self.0)(&a, value),
            None => value.clone(),
        });
    }
    fn merge(&self, acc: &mut Option<T>, other: Option<T>) {
        if let Some(o) = other {
            self.add(acc, &o);
        }
    }
    fn result(&self, acc: &Option<T>) -> T {
        acc.clone()
            .expect("a reduce state holds at least one value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold<T, A: Aggregator<T>>(agg: &A, values: &[T]) -> A::Out {
        let mut acc = agg.init(&values[0]);
        values.iter().for_each(|v| agg.add(&mut acc, v));
        agg.result(&acc)
    }

    #[test]
    fn built_in_aggregators_fold_values() {
        let v = [3i64, -1, 7, 2];
        assert_eq!(fold(&Count, &v), 4);
        assert_eq!(fold(&Sum::of(|x: &i64| *x), &v), 11);
        assert_eq!(fold(&Min::of(|x: &i64| *x), &v), -1);
        assert_eq!(fold(&Max::of(|x: &i64| *x), &v), 7);
        assert_eq!(fold(&Reduce::with(|a: &i64, b: &i64| a * b), &v), -42);
    }

    #[test]
    fn merge_equals_folding_everything() {
        let agg = Sum::of(|x: &i64| *x);
        let mut a = agg.init(&1);
        [1, 2].iter().for_each(|x| agg.add(&mut a, x));
        let mut b = agg.init(&3);
        [3, 4].iter().for_each(|x| agg.add(&mut b, x));
        agg.merge(&mut a, b);
        assert_eq!(agg.result(&a), 10);
        let max = Max::of(|x: &i64| *x);
        let mut m = max.init(&5);
        max.add(&mut m, &5);
        max.merge(&mut m, 9);
        assert_eq!(max.result(&m), 9);
    }
}

//! Event-time windows: the assigner trait, the windowed stream, and the operator that keeps
//! windows per (shard, key), fires them when the shard's watermark passes their end, refines
//! them for late records within the allowed lateness, and routes later records to a side output.

mod fixed;
mod session;
mod sliding;
mod tumbling;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardflow_core::position::EventTime;
use shardflow_core::sink::Window;
use shardflow_core::topology::{Ident, Keyed, KeyedOutput, RecordCx, ShardStage, Stream};

use crate::aggregate::{Aggregator, Reduce};
use crate::key::Key;
use crate::keyed::KeyedStream;
pub use session::SessionWindow;
pub use sliding::SlidingWindow;
pub use tumbling::TumblingWindow;

/// Assigns records to windows by event time.
pub trait WindowAssigner: Clone + Send + Sync + 'static {
    /// The windows containing `event_time`, appended to `out`.
    fn assign(&self, event_time: EventTime, out: &mut Vec<Window>);
    /// For assigners that give every record exactly one window (tumbling): that window. The
    /// operator then skips the list `assign` fills.
    fn single(&self, _event_time: EventTime) -> Option<Window> {
        None
    }
    /// For session windows: the inactivity gap that separates sessions.
    fn session_gap(&self) -> Option<i64> {
        None
    }
    /// What the windows are, as the default label of their operator in metrics and logs
    /// (`window-tumbling-60s`).
    fn describe(&self) -> String {
        "window".into()
    }
}

/// A length of event time for a label: whole seconds as `60s`, anything else in `ms`.
pub(crate) fn span(ms: i64) -> String {
    if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// A window's result for a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowResult<K, V> {
    /// The key.
    pub key: K,
    /// The window.
    pub window: Window,
    /// The aggregate.
    pub value: V,
}

type LateSide<T> = Box<dyn FnOnce(Stream<T, Keyed>) + Send>;

/// A keyed stream with a window assigner, before its aggregate.
pub struct WindowedStream<T, K, F, S, W> {
    keyed: KeyedStream<T, K, F, S>,
    assigner: W,
    lateness: i64,
    late: Option<LateSide<T>>,
}

/// Constructors of the window operators for operator tests (`KeyedHarness`); topologies get
/// them through `window(..).aggregate(..)`.
#[doc(hidden)]
pub mod testing {
    use shardflow_core::topology::KeyedOperator;

    use super::{fixed::FixedWindows, session::SessionOperator, WindowAssigner, WindowResult};
    use crate::aggregate::Aggregator;
    use crate::key::Key;
    use crate::keyed::KeyedValue;
    use crate::running::RunningAggregate;

    /// The tumbling/sliding window operator.
    pub fn fixed<K: Key, T: Send + 'static, A: Aggregator<T>, W: WindowAssigner>(
        assigner: W,
        agg: A,
        lateness_ms: i64,
    ) -> impl KeyedOperator<Key = K, In = T, Out = WindowResult<K, A::Out>> {
        FixedWindows::new(assigner, agg, lateness_ms)
    }

    /// The session window operator.
    pub fn session<K: Key, T: Send + 'static, A: Aggregator<T>, W: WindowAssigner>(
        assigner: W,
        agg: A,
        lateness_ms: i64,
    ) -> impl KeyedOperator<Key = K, In = T, Out = WindowResult<K, A::Out>> {
        SessionOperator::new(assigner, agg, lateness_ms)
    }

    /// The running (unwindowed) aggregate.
    pub fn running<K: Key, T: Send + 'static, A: Aggregator<T>>(
        agg: A,
    ) -> impl KeyedOperator<Key = K, In = T, Out = KeyedValue<K, A::Out>> {
        RunningAggregate::new(agg)
    }
}

/// Whether a record may still enter a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The window is open (or fired but within the allowed lateness).
    Open,
    /// The window closed before the record arrived: a late record.
    Late,
}

/// The lateness rule every window operator applies. It uses the watermark at the record's
/// arrival, so a replay decides exactly as the first run did.
pub(crate) fn admission(window: Window, lateness: i64, record_watermark: EventTime) -> Admission {
    if cfg!(shardflow_mutation = "readmit_late") {
        // A mutation check: closed windows take late records again.
        return Admission::Open;
    }
    if window.end.saturating_add(lateness) <= record_watermark {
        Admission::Late
    } else {
        Admission::Open
    }
}

/// The start of the window of `size` (aligned to the Unix epoch) that holds `event_time`,
/// in 128 bits: no event time or size overflows it.
pub(crate) fn aligned_start(event_time: EventTime, size: i64) -> i128 {
    let t = i128::from(event_time);
    t - t.rem_euclid(i128::from(size.max(1)))
}

/// The window `[start, end)` computed in 128 bits, clamped to the range of event times: never
/// inverted or empty, even at the ends of the range (where no timely record lies).
pub(crate) fn clamped(start: i128, end: i128) -> Window {
    let clamp = |v: i128| v.clamp(i128::from(EventTime::MIN), i128::from(EventTime::MAX)) as i64;
    let (start, end) = (clamp(start), clamp(end));
    if end > start {
        Window::new(start, end)
    } else {
        Window::new(end.saturating_sub(1), end.max(EventTime::MIN + 1))
    }
}

/// Emits the result of `window` for `key`, identified by both.
pub(crate) fn emit_result<K: Key, T, V>(
    out: &mut KeyedOutput<'_, T, WindowResult<K, V>>,
    key: &K,
    window: Window,
    watermark: EventTime,
    value: V,
) {
    let cx = RecordCx {
        event_time: window.max_timestamp(),
        watermark,
        ident: Ident::keyed(key.key_id(), Some(window)),
    };
    out.emit(
        &cx,
        WindowResult {
            key: key.clone(),
            window,
            value,
        },
    );
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<T, K, F, S, W> WindowedStream<T, K, F, S, W>
where
    T: Send + 'static,
    K: Key,
    F: Fn(&T) -> K + Clone + Send + Sync + 'static,
    S: ShardStage,
    W: WindowAssigner,
{
    pub(crate) fn new(keyed: KeyedStream<T, K, F, S>, assigner: W) -> Self {
        Self {
            keyed,
            assigner,
            lateness: 0,
            late: None,
        }
    }

    /// Keeps windows open this long after the watermark passed their end: a late record within
    /// it refines the window's result (emitted again with the same identity).
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.lateness = millis(lateness);
        self
    }

    /// Routes records later than the allowed lateness to a side output, which `side` consumes
    /// (for example `|late| { late.sink(dir); }`). Without it they are counted in the
    /// `shardflow_late_records_total` metric and dropped.
    pub fn late_records(mut self, side: impl FnOnce(Stream<T, Keyed>) + Send + 'static) -> Self {
        self.late = Some(Box::new(side));
        self
    }

    /// Aggregates each window of each key.
    pub fn aggregate<A: Aggregator<T>>(self, agg: A) -> Stream<WindowResult<K, A::Out>, Keyed> {
        let Self {
            keyed,
            assigner,
            lateness,
            late,
        } = self;
        let kind = assigner.describe();
        let (main, late_stream) = if assigner.session_gap().is_some() {
            keyed.stream.keyed(&kind, keyed.key_fn, move || {
                session::SessionOperator::new(assigner.clone(), agg.clone(), lateness)
            })
        } else {
            keyed.stream.keyed(&kind, keyed.key_fn, move || {
                fixed::FixedWindows::new(assigner.clone(), agg.clone(), lateness)
            })
        };
        if let Some(side) = late {
            side(late_stream);
        }
        main
    }

    /// Reduces each window of each key with `f`.
    pub fn reduce<R>(self, f: R) -> Stream<WindowResult<K, T>, Keyed>
    where
        T: Clone + serde::Serialize + serde::de::DeserializeOwned,
        R: Fn(&T, &T) -> T + Clone + Send + Sync + 'static,
    {
        self.aggregate(Reduce::with(f))
    }
}

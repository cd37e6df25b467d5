//! shardflow-operators: map, filter, flat_map, try_map, key_by, reduce, aggregate, and
//! tumbling, sliding and session windows on event time. Each is a thin layer over one of the
//! core primitives (`Stream::stateless`, `Stream::keyed`).
#![deny(missing_docs)]

pub mod aggregate;
pub mod key;
pub mod keyed;
pub mod misuse;
mod running;
mod snapshot;
pub mod stateless;
pub mod window;

pub use aggregate::{Aggregator, Count, Max, Min, Reduce, Sum};
pub use key::Key;
pub use keyed::{KeyBy, KeyedStream, KeyedValue};
pub use stateless::{ShardStreamExt, StreamExt};
pub use window::{
    SessionWindow, SlidingWindow, TumblingWindow, WindowAssigner, WindowResult, WindowedStream,
};

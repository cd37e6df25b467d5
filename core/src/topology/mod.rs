//! Declaring topologies: the typed builder, the fused chain and the keyed stage.

pub mod chain;
pub mod keyed;
pub mod stream;

pub use chain::{Collector, Emit, FailureAction, Ident, Mode, RecordCx, Stateless, NO_WATERMARK};
pub use keyed::{KeyedOperator, KeyedOutput, KeyedRecord};
pub use stream::{
    Keyed, Pipeline, ShardStage, Sharded, Sourced, Stage, Stream, Topology, TopologyBuilder,
};

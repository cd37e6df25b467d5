//! Declaring topologies: the typed builder, the graph of declared stages, and the stage types.
//! Nothing here executes: `exec/` instantiates what is declared and `runtime/` drives it.

mod graph;
mod stage;
mod state;
mod stream;

pub(crate) use graph::{
    label_of, lock, EventTimeFn, ExchangeDecl, Exchanges, FallibleDecl, FanOut, InstanceCx,
    Instantiate, InstantiateBranch, InstantiateRoot, KeyedBranchDecl, Node, Processed, Quarantined,
    ShardPipeline, SinkDecl, SourceDecl, StatelessDecl, TeeDecl, WorkerCx,
};
pub use stage::{Keyed, ShardStage, Sharded, SourceStage, Sourced, Stage};
pub use state::StatePolicy;
pub use stream::{Pipeline, Stream, Topology, TopologyBuilder};

// What operators implement, at the paths it had before it moved to `operator/`.
pub use crate::operator::{
    Collector, Emit, FailureAction, Ident, KeyedOperator, KeyedOutput, KeyedRecord, Mode, RecordCx,
    SavedState, Stateless, NO_WATERMARK,
};

/// The push chain's operator-facing types, at their old path (see [`crate::operator`]).
pub mod chain {
    pub use crate::operator::{
        Collector, Control, Emit, EpochCx, FailureAction, Ident, Mode, RecordCx, Stateless,
        NO_WATERMARK,
    };
}

/// The keyed stage's operator-facing types, at their old path (see [`crate::operator`]).
pub mod keyed {
    pub use crate::operator::{KeyedOperator, KeyedOutput, KeyedRecord, SavedState};
}

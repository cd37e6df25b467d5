//! Executing a declared topology: the fused push chain (stateless nodes, fan-out, sink
//! emitters with their commits and retries), the exchange to keyed workers, the keyed-worker
//! loop, the decode and watermark loop, and the instantiation of each declared stage.
//!
//! Builds on `topology/` (what to instantiate) and `operator/` (what operators implement);
//! the runtime drives what this module builds, and the decisions it takes come from
//! `protocol/`.

mod chain;
mod exchange;
pub(crate) mod failures;
mod fallible;
mod holding;
mod instantiate;
mod keyed_worker;
pub(crate) mod sink_emitter;
mod source_pipeline;
pub(crate) mod user_code;

pub(crate) use failures::Failures;
pub(crate) use sink_emitter::SinkEmitter;

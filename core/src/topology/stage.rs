//! Stage types: where in the topology a stream is, so that operators are allowed or not by
//! stage at compile time.

/// Where in the topology a stream is; operators are allowed or not by stage.
pub trait Stage: Send + Sync + 'static {
    /// The stage of a stateless operator's output.
    type AfterOp: Stage;
    /// Whether the stream comes after `key_by`: one shard's values are spread over the keyed
    /// workers.
    const AFTER_KEY_BY: bool;
}

/// Stages before `key_by`, where every value still has its input record: fallible operators
/// (whose failures are dead-lettered with the record) and `key_by` itself live here.
pub trait ShardStage: Stage {}

/// Straight out of the source: event time and watermarks are configured here.
#[derive(Debug)]
pub enum Sourced {}
/// After a stateless operator, before `key_by`.
#[derive(Debug)]
pub enum Sharded {}
/// After a keyed operator: results of windows and reductions.
#[derive(Debug)]
pub enum Keyed {}

impl Stage for Sourced {
    type AfterOp = Sharded;
    const AFTER_KEY_BY: bool = false;
}
impl Stage for Sharded {
    type AfterOp = Sharded;
    const AFTER_KEY_BY: bool = false;
}
impl Stage for Keyed {
    type AfterOp = Keyed;
    const AFTER_KEY_BY: bool = true;
}
impl ShardStage for Sourced {}
impl ShardStage for Sharded {}

/// The stage where a stream's event time and watermarks are set: straight out of the source,
/// before any operator can drop or reorder records. Only [`Sourced`] is.
#[diagnostic::on_unimplemented(
    message = "event time is set right after `.source(..)`: call `.event_time(..)` (and \
               `.max_out_of_orderness(..)`, `.max_event_time_skew(..)`, `.idleness(..)`) before \
               `.map`, `.filter` or any other operator",
    label = "this stream has passed an operator already (it is at stage `{Self}`, not `Sourced`)"
)]
pub trait SourceStage: Stage {}
impl SourceStage for Sourced {}

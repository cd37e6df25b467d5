//! What operators implement and see: the `Emit` push interface, per-record and per-epoch
//! context, and the `Stateless` and `KeyedOperator` traits with their outputs. The declaration
//! (`topology/`) and the execution (`exec/`) both build on this module; it builds on neither.

mod context;
mod emit;
mod keyed;
mod stateless;

pub use context::{Control, EpochCx, Ident, Mode, RecordCx, Restore, StateOrder, NO_WATERMARK};
pub use emit::{Emit, Refused};
pub use keyed::{KeyedOperator, KeyedOutput, KeyedRecord, SavedState};
pub use stateless::{Collector, FailureAction, Stateless};
pub(crate) use stateless::{Fan, ReportFailure};

//! Calls into user functions that may panic: a panic costs the record it was called on (the
//! shard's dead-letter policy), never the run, so a replay cannot crash-loop on it.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// A user function's panic, caught.
pub(crate) struct Panic(Box<dyn Any + Send>);

impl Panic {
    /// The reason a dead letter gives. The panic's message is not in it: it may hold the value
    /// the function failed on; the panic hook has already printed it (with its place) to
    /// stderr.
    pub(crate) const REASON: &'static str = "user function panicked (its message is on stderr)";

    /// Lets the panic go on unwinding, as if it had not been caught.
    pub(crate) fn resume(self) -> ! {
        resume_unwind(self.0)
    }
}

/// Calls `f`; `Err` if it panicked. Unwinding costs nothing where nothing panics.
pub(crate) fn call<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
    catch_unwind(AssertUnwindSafe(f)).map_err(Panic)
}

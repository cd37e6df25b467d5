//! Calls into user functions that may panic: a panic costs the record it was called on (the
//! shard's dead-letter policy), never the run, so a replay cannot crash-loop on it.

use std::any::Any;
use std::cell::Cell;
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

/// The start of the message of a panic the runtime raises for one of its rules a topology
/// broke (a second output from a one-output operator, say): a bug in the topology, not a bad
/// record or shard, so `call` lets it unwind on and the run fails.
pub(crate) const RULE_BROKEN: &str = "shardflow: the topology broke a rule of the runtime: ";

thread_local! {
    /// Set by `break_rule` just before it panics, cleared as every `call` starts: with the
    /// marker, it tells the runtime's own panic from a user's whose message (perhaps made from
    /// an input record) happens to start like it.
    static RULE_BROKEN_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Panics for a rule of the runtime the topology broke; the run fails (`call` lets it unwind
/// on). Only the runtime calls it.
pub(crate) fn break_rule(message: std::fmt::Arguments<'_>) -> ! {
    RULE_BROKEN_HERE.with(|flag| flag.set(true));
    panic!("{RULE_BROKEN}{message}")
}

/// Calls `f`; `Err` if it panicked. A panic for a broken rule (`break_rule`) unwinds on.
/// Unwinding costs nothing where nothing panics.
pub(crate) fn call<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
    // A flag left by a rule panic that ended a task on this thread is stale now: a rule
    // panic unwinds through every `call` around it, and none is around this one yet.
    RULE_BROKEN_HERE.with(|flag| flag.set(false));
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Ok(r),
        Err(payload) if RULE_BROKEN_HERE.with(Cell::get) && is_rule_broken(&*payload) => {
            resume_unwind(payload)
        }
        Err(payload) => Err(Panic(payload)),
    }
}

/// Whether a panic's payload is the runtime's own, for a broken rule.
fn is_rule_broken(payload: &(dyn Any + Send)) -> bool {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .is_some_and(|message| message.starts_with(RULE_BROKEN))
}

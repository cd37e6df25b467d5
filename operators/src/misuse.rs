//! Compile errors that name the fix for common mistakes: traits no type implements, bounding
//! methods a user reaches for too early, each with a message saying what to call first.

/// `.window(..)` on a stream without a key. Implemented by nothing: windows group the values
/// of one key, so they come after `.key_by(..)`.
#[diagnostic::on_unimplemented(
    message = "windows need a key: call `.key_by(|v| ..)` before `.window(..)`",
    label = "this stream has no key (`.window(..)` is a method of the stream `.key_by(..)` returns)"
)]
pub trait WindowNeedsKey<W> {
    /// What the window would have made.
    type Windowed;
    /// Never called: no type implements the trait.
    fn window_of_keyed(self, assigner: W) -> Self::Windowed;
}

/// `.aggregate(..)` on a stream without a key. Implemented by nothing: aggregates are per key,
/// so they come after `.key_by(..)` (and `.window(..)` for one result per window).
#[diagnostic::on_unimplemented(
    message = "aggregates are per key: call `.key_by(|v| ..)` (and `.window(..)` for windowed \
               results) before `.aggregate(..)`",
    label = "this stream has no key"
)]
pub trait AggregateNeedsKey<A> {
    /// What the aggregate would have made.
    type Aggregated;
    /// Never called: no type implements the trait.
    fn aggregate_of_keyed(self, aggregator: A) -> Self::Aggregated;
}

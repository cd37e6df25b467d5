//! The protocol's decisions, as pure functions over plain data: facts in, decision out. The
//! runtime gathers the facts, calls these functions and executes what they return; nothing
//! here does I/O, reads a clock or draws a random number.
//!
//! # The life of an epoch
//!
//! From the lease to the checkpoint, each step names the function that decides it.
//!
//! 1. **A shard is taken.** Leases are keyed by stream, creation time and shard
//!    ([`lease_keys::StreamScope`]). Each shard-sync round, a worker first moves leases keyed
//!    by shard id alone and deletes those of an earlier creation of the stream
//!    ([`lease_keys::migration_step`]), then creates leases for new shards
//!    ([`shard_sync::leases_to_create`], starting at [`lease_keys::inherited_counter`]),
//!    keeps only the leases it may process: not finished,
//!    every parent at its end ([`shard_sync::processable`]), plans takes (free, expired, or
//!    handed over to it) and requests to busier owners toward an even spread
//!    ([`balance::plan`]) and starts what it took and its own
//!    ([`shard_sync::leases_to_start`]). A take is a conditional update
//!    ([`lease_rules::apply_update`]); the counter it leaves is the shard's lease epoch for
//!    this life. An owner asked for a lease learns it when a write is refused
//!    ([`lease_rules::handoff_asked`]), ends the shard in an orderly way (step 10) and
//!    releases it to the requester. Finished parents whose children all started are deleted
//!    ([`shard_sync::leases_to_clean`]), and so are leases of shards the stream stopped
//!    listing, once their records are provably gone ([`vanished::VanishedShards::observe`]).
//! 2. **Where it resumes.** From the checkpoint in the lease, [`resume::plan_resume`] says
//!    where reading starts (after `rebuild_from`), which records only rebuild state (up to
//!    `committed`), and which recorded watermark advances to make again.
//! 3. **A read becomes epochs.** Each read batch is one epoch, cut short at the end of the
//!    replay and at each recorded advance ([`resume::next_epoch_len`]) so that an epoch is
//!    wholly replayed or wholly live. A recorded advance is an epoch of its own, replayed up
//!    to the committed watermark ([`crate::lease::WatermarkAdvance`]).
//! 4. **Each record is judged.** Its arrival watermark, and whether its event time counts at
//!    all, come from [`watermark::WatermarkRules::observe`]; a window admits it by that
//!    watermark only (`operators::window::admission`), so a replay judges it as the first run
//!    did. A record that fails goes where [`failure::on_failure`] says: retried after a wait
//!    on the runtime's clock, dead-lettered (in a replay too: step 5 drops what was
//!    committed), or stopping the shard (never in a replay: the first run got past it).
//! 5. **The epoch flows.** Stateless operators run fused in the shard task; `key_by` sends
//!    every keyed worker one message per epoch; sinks write it. A replayed epoch's outputs are
//!    dropped, except what a holding sink has not stored yet (its own position in the
//!    checkpoint).
//! 6. **A quiet shard.** At its tip, a shard that read nothing for the idleness timeout
//!    advances its watermark on the clock ([`watermark::WatermarkRules::idle_advance`]); the
//!    advance is written to the lease first, then made as an epoch.
//! 7. **Paths report.** After its sinks commit, each path (the shard task's own sinks and
//!    dead letters, and each keyed worker) reports the epochs it committed, the oldest epoch
//!    its state holds, and (a holding sink) where its units end, tagged with the shard's lease
//!    epoch so that an earlier life's reports count for nothing
//!    ([`checkpoint::ShardProgress::report`], [`checkpoint::ShardProgress::hold_back`]).
//! 8. **The checkpoint advances.** [`checkpoint::ShardProgress::checkpoint`] derives
//!    `committed` (the end of the last epoch every path committed), `rebuild_from` (early
//!    enough to rebuild every window open then and for every holding sink's position), the
//!    holding sinks' positions and the advances since `rebuild_from`; it never moves back,
//!    and never before the checkpoint the shard resumed from.
//! 9. **It is written.** On the checkpoint tick the worker renews its leases when due
//!    ([`lease_rules::renewal_due`]) and writes each moved checkpoint, conditional on owner
//!    and counter ([`lease_rules::apply_update`]); a lost lease stops the shard. A checkpoint
//!    is decided under the lock every lease write takes, so the last decided is the last
//!    written.
//! 10. **The shard's task ends.** What happens next is [`outcome::after_task`]: a shard read
//!     to its end or stopped in an orderly way waits for its last epochs to be committed and
//!     writes its final checkpoint (`SHARD_END` lets its children start); one whose lease
//!     moved, or that dropped its state because its lease guard lapsed (on any path, keyed
//!     workers included) or a sink fenced it, is forgotten; a bad record stops only its
//!     shard. [`outcome::finished`] says what a finished shard counts as (not done if its
//!     final checkpoint was refused) and [`outcome::run_over`] when a run ends.

pub mod balance;
pub mod checkpoint;
pub mod failure;
pub mod lease_keys;
pub mod lease_rules;
pub mod outcome;
pub mod resume;
pub mod shard_sync;
pub mod sink_failure;
pub mod vanished;
pub mod watermark;

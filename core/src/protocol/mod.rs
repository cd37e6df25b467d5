//! The protocol's decisions, as pure functions over plain data: facts in, decision out. The
//! runtime gathers the facts, calls these functions and executes what they return; nothing
//! here does I/O, reads a clock or draws a random number.

pub mod balance;
pub mod checkpoint;
pub mod failure;
pub mod lease_rules;
pub mod outcome;
pub mod resume;
pub mod shard_sync;
pub mod watermark;

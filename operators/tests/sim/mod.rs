//! The deterministic simulation checker: random topologies over several shards, random input
//! and random faults, on one thread with paused time, checked against an oracle. A seed
//! replays exactly: every random choice (topology, input, faults, the runtime's jitter) comes
//! from one seeded generator, and nothing depends on the wall clock or on hash-map order.

#![allow(dead_code)]

pub mod driver;
pub mod model;
pub mod oracle;
pub mod spec;

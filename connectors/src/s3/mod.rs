//! S3: a sink that cuts the records of each shard into objects named by their first record, and
//! writes keyed results one object each (feature `s3`).

mod conditional;
mod objects;
mod payload_store;
mod sink;
mod state_store;

pub use payload_store::S3PayloadStore;
pub use sink::{S3Sink, S3SinkError};
pub use state_store::S3StateStore;

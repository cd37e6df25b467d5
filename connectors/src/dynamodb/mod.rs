//! DynamoDB: the lease store that coordinates workers, and a fencing, idempotent sink
//! (feature `dynamodb`).

mod attribute;
mod lease_store;
mod retry;
mod sink;
mod table;

pub use lease_store::DynamoLeaseStore;
pub use sink::{DynamoSink, DynamoSinkError, DynamoWriteMode};

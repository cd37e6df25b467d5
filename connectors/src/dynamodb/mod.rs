//! DynamoDB: the lease store that coordinates workers (feature `dynamodb`).

mod lease_store;

pub use lease_store::DynamoLeaseStore;

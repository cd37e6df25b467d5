//! A lease store seen through one stream creation's scope: the runtime reads and writes leases
//! by shard id, the table holds them under `<stream>:<created>:<shard id>` (see
//! `protocol::lease_keys`), and items of any other scope are invisible.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::LeaseError;
use crate::lease::{Lease, LeaseStore, LeaseUpdate};
use crate::protocol::lease_keys::StreamScope;

pub(crate) struct ScopedStore {
    table: Arc<dyn LeaseStore>,
    scope: StreamScope,
}

impl ScopedStore {
    pub(crate) const fn new(table: Arc<dyn LeaseStore>, scope: StreamScope) -> Self {
        Self { table, scope }
    }

    pub(crate) const fn scope(&self) -> &StreamScope {
        &self.scope
    }

    /// A lease as stored, as the runtime sees it (`None` if it is of another scope).
    pub(crate) fn seen(&self, lease: Lease) -> Option<Lease> {
        let shard = self.scope.shard_of(&lease.key)?.to_owned();
        let parents = lease
            .parents
            .iter()
            .map(|p| self.scope.shard_of(p).unwrap_or(p).to_owned())
            .collect();
        Some(Lease {
            key: shard,
            parents,
            ..lease
        })
    }

    /// A lease as the runtime sees it, as stored.
    pub(crate) fn stored(&self, lease: &Lease) -> Lease {
        Lease {
            key: self.scope.key(&lease.key),
            parents: lease.parents.iter().map(|p| self.scope.key(p)).collect(),
            ..lease.clone()
        }
    }
}

#[async_trait]
impl LeaseStore for ScopedStore {
    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let all = self.table.list().await?;
        Ok(all.into_iter().filter_map(|l| self.seen(l)).collect())
    }

    async fn get(&self, key: &str) -> Result<Option<Lease>, LeaseError> {
        let lease = self.table.get(&self.scope.key(key)).await?;
        Ok(lease.and_then(|l| self.seen(l)))
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.table.create_if_absent(&self.stored(lease)).await
    }

    async fn update(
        &self,
        key: &str,
        expected_counter: u64,
        update: &LeaseUpdate,
    ) -> Result<Lease, LeaseError> {
        let written = self
            .table
            .update(&self.scope.key(key), expected_counter, update)
            .await?;
        Ok(self.seen(written).expect("written under this scope's key"))
    }

    async fn delete(&self, key: &str, expected_counter: u64) -> Result<(), LeaseError> {
        self.table
            .delete(&self.scope.key(key), expected_counter)
            .await
    }

    fn skipped_items(&self) -> usize {
        self.table.skipped_items()
    }
}

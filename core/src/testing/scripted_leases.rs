//! `ScriptedLeaseStore`: wraps any lease store and follows a script: block or slow down
//! updates, fail the next listings or updates (or every update for a while), lose the replies
//! of the next updates made, report the next renewals as lost, and log every update that
//! succeeded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::LeaseError;
use crate::lease::{Lease, LeaseStore, LeaseUpdate};

/// Updates the log keeps at most: a test that writes more has a runaway loop.
const MAX_LOGGED_UPDATES: usize = 1_000_000;

#[derive(Debug, Default)]
struct Script {
    blocked: bool,
    /// Every update takes this long before it is tried.
    update_delay: Duration,
    list_failures: u32,
    list_failures_retryable: bool,
    lose_renewals: u32,
    /// The next updates are made, then answered with an error: (how many, whether as the
    /// client's own retry would see it).
    lost_replies: (u32, bool),
    update_failures: u32,
    /// Every update fails retryably until then.
    throttled_until: Option<tokio::time::Instant>,
    log: Vec<(tokio::time::Instant, Lease)>,
}

/// A lease store that follows a script before handing on to the store it wraps. Cloning
/// shares the store and the script.
pub struct ScriptedLeaseStore<S> {
    inner: Arc<S>,
    script: Arc<Mutex<Script>>,
}

impl<S> Clone for ScriptedLeaseStore<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            script: Arc::clone(&self.script),
        }
    }
}

impl<S: LeaseStore> ScriptedLeaseStore<S> {
    /// Wraps `inner` with an empty script.
    pub fn new(inner: S) -> Self {
        Self {
            inner: Arc::new(inner),
            script: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Updates wait while blocked (a lease table out of reach).
    pub fn block_updates(&self, blocked: bool) {
        self.lock().blocked = blocked;
    }

    /// Every update takes `delay` before it is tried (a table whose client retries throttled
    /// requests inside).
    pub fn delay_updates(&self, delay: Duration) {
        self.lock().update_delay = delay;
    }

    /// The next `n` listings fail, retryably or not.
    pub fn fail_lists(&self, n: u32, retryable: bool) {
        let mut script = self.lock();
        script.list_failures = n;
        script.list_failures_retryable = retryable;
    }

    /// The next `n` updates fail with a retryable store error without writing (a throttled
    /// table).
    pub fn fail_updates(&self, n: u32) {
        self.lock().update_failures = n;
    }

    /// Every update fails with a retryable store error for `period` from now (a throttled
    /// table).
    pub fn throttle_updates_for(&self, period: Duration) {
        self.lock().throttled_until = Some(tokio::time::Instant::now() + period);
    }

    /// The next `n` renewals answer `LeaseLost` without writing (the worker believes another
    /// took the lease; the table still names it).
    pub fn lose_renewals(&self, n: u32) {
        self.lock().lose_renewals = n;
    }

    /// The next `n` updates are made but their replies lost: answered with a retryable store
    /// error (a timeout), or, if `retried`, with what the client's own retry of the write then
    /// gets (the condition refused: `LeaseLost`, or `ConditionFailed` for a take).
    pub fn lose_replies(&self, n: u32, retried: bool) {
        self.lock().lost_replies = (n, retried);
    }

    /// The store it wraps.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Every lease as an update left it, oldest first.
    pub fn log(&self) -> Vec<Lease> {
        self.lock().log.iter().map(|(_, l)| l.clone()).collect()
    }

    /// The log with the time (tokio's clock) each update was made.
    pub fn timed_log(&self) -> Vec<(tokio::time::Instant, Lease)> {
        self.lock().log.clone()
    }
}

#[async_trait]
impl<S: LeaseStore> LeaseStore for ScriptedLeaseStore<S> {
    fn skipped_items(&self) -> usize {
        self.inner().skipped_items()
    }

    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        {
            let mut script = self.lock();
            if script.list_failures > 0 {
                script.list_failures -= 1;
                return Err(LeaseError::Store {
                    operation: "list",
                    retryable: script.list_failures_retryable,
                    source: "failure injected by the test script".into(),
                });
            }
        }
        self.inner.list().await
    }

    async fn get(&self, key: &str) -> Result<Option<Lease>, LeaseError> {
        self.inner.get(key).await
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.inner.create_if_absent(lease).await
    }

    async fn update(
        &self,
        key: &str,
        expected_counter: u64,
        update: &LeaseUpdate,
    ) -> Result<Lease, LeaseError> {
        while self.lock().blocked {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delay = self.lock().update_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        {
            let mut script = self.lock();
            let throttled = script
                .throttled_until
                .is_some_and(|until| tokio::time::Instant::now() < until);
            let scripted = !throttled && script.update_failures > 0;
            if scripted {
                script.update_failures -= 1;
            }
            if throttled || scripted {
                return Err(LeaseError::Store {
                    operation: "update",
                    retryable: true,
                    source: "failure injected by the test script".into(),
                });
            }
        }
        if matches!(update, LeaseUpdate::Renew { .. }) {
            let mut script = self.lock();
            if script.lose_renewals > 0 {
                script.lose_renewals -= 1;
                return Err(LeaseError::LeaseLost {
                    lease_key: key.to_owned(),
                });
            }
        }
        let lease = self.inner.update(key, expected_counter, update).await?;
        let lost_reply = {
            let mut script = self.lock();
            let (n, retried) = script.lost_replies;
            (n > 0).then(|| {
                script.lost_replies.0 -= 1;
                retried
            })
        };
        {
            let mut script = self.lock();
            assert!(
                script.log.len() < MAX_LOGGED_UPDATES,
                "more than {MAX_LOGGED_UPDATES} lease updates: a runaway loop (last: {:?})",
                script.log.last()
            );
            script
                .log
                .push((tokio::time::Instant::now(), lease.clone()));
        }
        match lost_reply {
            None => Ok(lease),
            Some(false) => Err(LeaseError::Store {
                operation: "update",
                retryable: true,
                source: "reply lost by the test script".into(),
            }),
            // The retry meets the counter the write moved.
            Some(true) => Err(self
                .inner
                .update(key, expected_counter, update)
                .await
                .expect_err("a retry of a conditional write that landed is refused")),
        }
    }

    async fn delete(&self, key: &str, expected_counter: u64) -> Result<(), LeaseError> {
        self.inner.delete(key, expected_counter).await
    }
}

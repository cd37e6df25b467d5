//! Model test of the lease protocol: workers renewing, planning, taking, asking for and handing
//! over leases over one store, with crashes, restarts, graceful releases and time passing at
//! random; checked against the rules after every step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::leases::LeaseManager;
use crate::lease::{Lease, LeaseStore, MemoryLeaseStore};

const SHARDS: usize = 8;
const WORKERS: usize = 3;
const LEASE_DURATION: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
enum Op {
    /// A worker's round: renew what it holds, then plan and take.
    Tick(usize),
    /// Time passes.
    Advance(u64),
    /// A worker dies without releasing (its leases expire).
    Crash(usize),
    /// A dead worker comes back with the same id.
    Restart(usize),
    /// A worker shuts down gracefully, releasing its leases.
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..WORKERS).prop_map(Op::Tick),
        3 => (1u64..8).prop_map(Op::Advance),
        1 => (0..WORKERS).prop_map(Op::Crash),
        1 => (0..WORKERS).prop_map(Op::Restart),
        1 => (0..WORKERS).prop_map(Op::Release),
    ]
}

struct Worker {
    manager: LeaseManager,
    alive: bool,
}

fn keys() -> Vec<String> {
    (0..SHARDS).map(|i| format!("shard-{i}")).collect()
}

async fn tick(worker: &Worker) {
    worker.manager.renew_all_until(None).await;
    let leases = worker.manager.list().await.expect("list");
    worker.manager.note_requests(&leases).await;
    // An owner asked for a lease hands it over at once (the model has no epochs in flight).
    for (key, _) in worker.manager.handoffs_asked().await {
        worker.manager.release(&key).await;
    }
    let leases = worker.manager.list().await.expect("list");
    let candidates: Vec<&Lease> = leases.iter().collect();
    let plan = worker.manager.plan(&candidates, 1).await;
    for key in &plan.request {
        let lease = leases
            .iter()
            .find(|l| &l.key == key)
            .expect("planned from the list");
        worker
            .manager
            .request_handoff(lease)
            .await
            .expect("store works");
    }
    for key in &plan.take {
        let lease = leases
            .iter()
            .find(|l| &l.key == key)
            .expect("planned from the list");
        worker.manager.take(lease).await.expect("store works");
    }
}

/// At most one worker holds each lease with the store's current counter: a worker that lost a
/// lease may still think it holds it, but no write of its can succeed.
async fn check_single_writer(store: &MemoryLeaseStore, workers: &[Worker]) {
    for lease in store.list().await.expect("list") {
        let mut writers = Vec::new();
        for (i, w) in workers.iter().enumerate() {
            if w.manager.held_counter(&lease.key).await == Some(lease.counter) {
                writers.push(i);
            }
        }
        assert!(
            writers.len() <= 1,
            "{} writable by workers {writers:?}",
            lease.key
        );
        if let Some(&i) = writers.first() {
            assert_eq!(
                lease.owner.as_deref(),
                Some(workers[i].manager.owner()),
                "the writer is the recorded owner"
            );
        }
    }
}

/// Worker `i` in its `incarnation`-th run (a restart is a new incarnation).
fn manager(store: &Arc<MemoryLeaseStore>, i: usize, incarnation: usize) -> LeaseManager {
    let store: Arc<dyn LeaseStore> = Arc::clone(store) as Arc<dyn LeaseStore>;
    LeaseManager::new(
        store,
        (&format!("w{i}"), &incarnation.to_string()),
        LEASE_DURATION,
        crate::clock::WallClock::following_runtime(0),
    )
}

async fn run(ops: Vec<Op>) {
    let store = Arc::new(MemoryLeaseStore::new());
    for key in keys() {
        store
            .create_if_absent(&Lease::new(key, vec![]))
            .await
            .expect("create");
    }
    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|i| Worker {
            manager: manager(&store, i, 0),
            alive: true,
        })
        .collect();
    let mut runs = WORKERS;
    for op in ops {
        match op {
            Op::Tick(i) if workers[i].alive => tick(&workers[i]).await,
            Op::Advance(secs) => tokio::time::advance(Duration::from_secs(secs)).await,
            Op::Crash(i) => workers[i].alive = false,
            Op::Restart(i) if !workers[i].alive => {
                runs += 1;
                workers[i] = Worker {
                    manager: manager(&store, i, runs),
                    alive: true,
                };
            }
            Op::Release(i) if workers[i].alive => {
                workers[i].manager.release_all().await;
                workers[i].alive = false;
            }
            _ => {}
        }
        check_single_writer(&store, &workers).await;
    }
    // Liveness: with at least one worker alive and time passing, every lease ends up with a live
    // worker and the spread evens out to within one.
    if workers.iter().all(|w| !w.alive) {
        workers[0] = Worker {
            manager: manager(&store, 0, runs + 1),
            alive: true,
        };
    }
    for _ in 0..3 * SHARDS {
        tokio::time::advance(Duration::from_secs(4)).await;
        for w in workers.iter().filter(|w| w.alive) {
            tick(w).await;
        }
        check_single_writer(&store, &workers).await;
    }
    let alive: Vec<String> = workers
        .iter()
        .filter(|w| w.alive)
        .map(|w| w.manager.owner().to_owned())
        .collect();
    let mut load: BTreeMap<String, usize> = alive.iter().map(|w| (w.clone(), 0)).collect();
    for lease in store.list().await.expect("list") {
        let owner = lease.owner.clone().unwrap_or_default();
        assert!(
            alive.contains(&owner),
            "{} owned by {owner:?}, not a live worker {alive:?}: {lease:?}",
            lease.key
        );
        *load.get_mut(&owner).expect("live owner") += 1;
    }
    let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
    assert!(max - min <= 1, "uneven spread {load:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn leases_have_one_writer_and_end_evenly_spread_over_live_workers(ops in proptest::collection::vec(op(), 0..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
        rt.block_on(run(ops));
    }
}

#[tokio::test(start_paused = true)]
async fn one_worker_then_two_more_spread_to_three_three_two() {
    let store = Arc::new(MemoryLeaseStore::new());
    for key in keys() {
        store
            .create_if_absent(&Lease::new(key, vec![]))
            .await
            .expect("create");
    }
    let workers: Vec<Worker> = (0..WORKERS)
        .map(|i| Worker {
            manager: manager(&store, i, 0),
            alive: true,
        })
        .collect();
    tick(&workers[0]).await;
    assert_eq!(
        workers[0].manager.held_count().await,
        SHARDS,
        "a lone worker takes all"
    );
    let mut rounds = 0;
    loop {
        rounds += 1;
        tokio::time::advance(Duration::from_secs(3)).await;
        for w in &workers {
            tick(w).await;
        }
        let mut counts = Vec::new();
        for w in &workers {
            counts.push(w.manager.held_count().await);
        }
        counts.sort_unstable();
        if counts == [2, 3, 3] {
            break;
        }
        assert!(rounds < 10, "spread within 10 rounds, at {counts:?}");
    }
}

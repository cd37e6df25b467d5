//! The simulation checker: random topologies from the whole operator set, random input over
//! several shards and random faults (aborts, graceful stops, restarts at another parallelism,
//! splits and merges, failing, stalling and slow sinks, a failing lease table, a second worker
//! joining and leaving, the main worker cut off from the lease table), each seed on one thread
//! with paused time, every sink compared with an oracle at the end (see `tests/sim/`).
//!
//! `cargo test -p shardflow-operators --release --test simulation` runs as many seeds as fit
//! in about two minutes, at least 500. Environment:
//! - `SHARDFLOW_SIM_SEEDS=N`: run seeds `0..N` whatever the time (`docs/` says how to run
//!   thousands); `SHARDFLOW_SIM_FIRST=K` starts at seed K.
//! - `SHARDFLOW_SIM_SEED=K`: the `replay_one_seed` test replays seed K and prints its spec and
//!   its decisions.

mod sim;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sim::driver::{run_seed, Fault, SeedReport, FAULTS};

/// Operator kinds the coverage table checks, with each fault.
const KINDS: [&str; 12] = [
    "map",
    "filter",
    "flat_map",
    "try_map",
    "tumbling",
    "sliding",
    "session",
    "running",
    "late_output",
    "holding_sink",
    "idleness",
    "holding_dlq",
];
/// Seeds at least, and the time to spend at least.
const MIN_SEEDS: u64 = 500;
const BUDGET: Duration = Duration::from_secs(120);
/// Each (fault, operator kind) pair must have been exercised by this many seeds.
const MIN_CELL: u32 = 5;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn replay_command(seed: u64) -> String {
    format!(
        "SHARDFLOW_SIM_SEED={seed} cargo test -p shardflow-operators --test simulation -- \
         replay_one_seed --nocapture"
    )
}

fn describe(report: &SeedReport) -> String {
    format!(
        "seed {} failed:\n  {}\n  spec: {}\n  replay: {}",
        report.seed,
        report.failures.join("\n  "),
        report.spec,
        replay_command(report.seed)
    )
}

#[test]
fn random_topologies_under_random_faults_match_the_oracle() {
    let first = env_u64("SHARDFLOW_SIM_FIRST").unwrap_or(0);
    let fixed = env_u64("SHARDFLOW_SIM_SEEDS");
    let started = Instant::now();
    let next = Arc::new(Mutex::new(first));
    let reports: Arc<Mutex<Vec<SeedReport>>> = Arc::default();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (next, reports) = (Arc::clone(&next), Arc::clone(&reports));
            std::thread::spawn(move || loop {
                let seed = {
                    let mut n = next.lock().unwrap();
                    let done = *n - first;
                    let more = match fixed {
                        Some(total) => done < total,
                        None => done < MIN_SEEDS || started.elapsed() < BUDGET,
                    };
                    if !more {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                let mut report = run_seed(seed);
                // Thousands of seeds: keep what the summary needs, not every run's logs.
                report.decisions = Vec::new();
                report.contents = String::new();
                if report.failures.is_empty() {
                    report.spec = String::new();
                }
                reports.lock().unwrap().push(report);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a seed thread panicked");
    }
    let mut reports = std::mem::take(&mut *reports.lock().unwrap());
    reports.sort_by_key(|r| r.seed);
    let mut cells: BTreeMap<(Fault, &str), u32> = BTreeMap::new();
    for r in &reports {
        for f in r.faults.keys() {
            for k in &r.kinds {
                *cells.entry((*f, k)).or_default() += 1;
            }
        }
    }
    let records: usize = reports.iter().map(|r| r.records).sum();
    let refusing: Vec<u64> = reports
        .iter()
        .filter(|r| r.refused > 0)
        .map(|r| r.seed)
        .collect();
    println!(
        "{} seeds, {records} records, in {:.1} s; {} seeds with fenced writes {:?}",
        reports.len(),
        started.elapsed().as_secs_f64(),
        refusing.len(),
        &refusing[..refusing.len().min(10)]
    );
    let named: usize = reports.iter().map(|r| r.snapshots_named).sum();
    let resumes: usize = reports.iter().map(|r| r.snapshot_resumes).sum();
    let parts_left: usize = reports.iter().map(|r| r.parts_left).sum();
    let leaking = reports.iter().filter(|r| r.parts_left > 0).count();
    println!(
        "snapshots: {} seeds keep them; {named} checkpoints named one; {resumes} takes resumed from one; {parts_left} parts left at the end in {leaking} seeds",
        reports.iter().filter(|r| r.spec_snapshots).count()
    );
    print!("{:<12}", "fault");
    for k in KINDS {
        print!("{k:>13}");
    }
    println!();
    let mut thin = Vec::new();
    for f in FAULTS {
        print!("{:<12}", format!("{f:?}"));
        for k in KINDS {
            let n = cells.get(&(f, k)).copied().unwrap_or(0);
            // A recreated lease table loses the recorded idle advances, so the fault applies
            // only where nothing is decided on the clock.
            let never = f == Fault::Recreate && k == "idleness";
            if n < MIN_CELL && !never {
                thin.push(format!("{f:?} x {k}: {n}"));
            }
            print!("{n:>13}");
        }
        println!();
    }
    let failed: Vec<&SeedReport> = reports.iter().filter(|r| !r.failures.is_empty()).collect();
    for r in failed.iter().take(5) {
        println!("{}", describe(r));
    }
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed; the first: {}",
        failed.len(),
        reports.len(),
        failed.first().map(|r| describe(r)).unwrap_or_default()
    );
    assert!(
        fixed.is_some_and(|n| n < MIN_SEEDS) || (named > 0 && resumes > 0),
        "no seed restored a snapshot ({named} named, {resumes} resumes)"
    );
    assert!(
        fixed.is_some_and(|n| n < MIN_SEEDS) || thin.is_empty(),
        "coverage cells under {MIN_CELL}: {thin:?}"
    );
}

#[test]
fn one_seed_decides_and_writes_alike_in_every_run() {
    for seed in 0..50 {
        let (a, b) = (run_seed(seed), run_seed(seed));
        assert!(!a.decisions.is_empty(), "seed {seed} recorded decisions");
        let first = a
            .decisions
            .iter()
            .zip(&b.decisions)
            .position(|(x, y)| x != y)
            .or((a.decisions.len() != b.decisions.len())
                .then_some(a.decisions.len().min(b.decisions.len())));
        if let Some(i) = first {
            panic!(
                "seed {seed}: decision {i} differs:\n  {:?}\n  {:?}",
                a.decisions.get(i),
                b.decisions.get(i)
            );
        }
        assert_eq!(a.contents, b.contents, "seed {seed}: sink contents differ");
    }
}

#[test]
fn replay_one_seed() {
    let seed = env_u64("SHARDFLOW_SIM_SEED").unwrap_or(0);
    let report = run_seed(seed);
    println!("seed {seed}: {}", report.spec);
    println!("faults: {:?}", report.faults);
    for d in &report.decisions {
        println!("{d}");
    }
    assert!(report.failures.is_empty(), "{}", describe(&report));
}

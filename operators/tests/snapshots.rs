//! Snapshots of the built-in keyed operators: a state saved mid-stream and restored at another
//! parallelism (each worker keeping the keys it owns) emits exactly what the uninterrupted
//! operator emits from there on, for running aggregates, tumbling, sliding and session windows.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::time::Duration;

use shardflow_core::random::Random;
use shardflow_core::testing::KeyedHarness;
use shardflow_core::topology::KeyedOperator;
use shardflow_operators::keyed::KeyedValue;
use shardflow_operators::window::testing::{fixed, running, session};
use shardflow_operators::{Count, SessionWindow, SlidingWindow, Sum, TumblingWindow, WindowResult};

/// (key, amount, event time) of a pseudo-random shard: 40 keys, time moving forward with
/// disorder, in epochs of 25 records.
fn input(seed: u64) -> Vec<Vec<(u32, i64, i64)>> {
    let random = Random::seeded(seed);
    let mut t = 0i64;
    (0..40)
        .map(|_| {
            (0..25)
                .map(|_| {
                    t += (random.fraction() * 40.0) as i64;
                    let disorder = (random.fraction() * 300.0) as i64;
                    let key = (random.fraction() * 40.0) as u32;
                    (key, 1 + (random.fraction() * 9.0) as i64, t - disorder)
                })
                .collect()
        })
        .collect()
}

/// What a harness emits, as a set (order across workers is not defined).
trait Rendered {
    fn render(&self) -> String;
}

impl<V: Debug> Rendered for WindowResult<u32, V> {
    fn render(&self) -> String {
        format!("{} {:?} {:?}", self.key, self.window, self.value)
    }
}

impl<V: Debug> Rendered for KeyedValue<u32, V> {
    fn render(&self) -> String {
        format!("{} {:?}", self.key, self.value)
    }
}

fn take<Op>(h: &mut KeyedHarness<Op>, into: &mut BTreeSet<String>)
where
    Op: KeyedOperator<Key = u32, In = i64>,
    Op::Out: Rendered,
{
    for (_, out) in h.take_outputs() {
        into.insert(out.render());
    }
    for late in h.take_late() {
        into.insert(format!("late {late}"));
    }
}

/// Runs `epochs` through `make()` uninterrupted, and again with a snapshot after epoch
/// `cut` restored into `workers` harnesses (worker `key % workers` owns `key`); compares
/// everything emitted after the cut.
fn restored_emits_what_the_uninterrupted_operator_does<Op, M>(make: M, workers: u32, seed: u64)
where
    Op: KeyedOperator<Key = u32, In = i64>,
    Op::Out: Rendered,
    M: Fn() -> Op,
{
    let epochs = input(seed);
    let cut = 5 + (Random::seeded(!seed).fraction() * 25.0) as usize;
    let mut whole = KeyedHarness::new(make(), 200);
    let mut ignored = BTreeSet::new();
    for epoch in &epochs[..cut] {
        for &(key, amount, t) in epoch {
            whole.record(key, amount, t);
        }
        whole.end_epoch();
        whole.commit();
    }
    take(&mut whole, &mut ignored);
    let part = whole.save().bytes;
    let parts = vec![part];
    let mut restored: Vec<_> = (0..workers)
        .map(|w| KeyedHarness::restored(make(), &whole, &parts, move |k: &u32| k % workers == w))
        .collect();
    let (mut want, mut got) = (BTreeSet::new(), BTreeSet::new());
    for epoch in &epochs[cut..] {
        for &(key, amount, t) in epoch {
            whole.record(key, amount, t);
            for (w, h) in restored.iter_mut().enumerate() {
                if w as u32 == key % workers {
                    h.record(key, amount, t);
                } else {
                    h.saw(t);
                }
            }
        }
        whole.end_epoch();
        whole.commit();
        for h in &mut restored {
            // Every worker sees every epoch's end (the runtime sends each one every epoch).
            h.end_epoch();
            h.commit();
        }
    }
    whole.shard_end();
    whole.commit();
    take(&mut whole, &mut want);
    for h in &mut restored {
        h.shard_end();
        h.commit();
        take(h, &mut got);
    }
    assert!(
        !want.is_empty(),
        "seed {seed}: the operator emitted after the cut"
    );
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&want).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "seed {seed}, cut after epoch {cut}, {workers} workers: missing {missing:?}, extra {extra:?}"
    );
}

#[test]
fn running_aggregates_restore_at_any_parallelism() {
    for seed in 0..20 {
        for workers in 1..=3 {
            restored_emits_what_the_uninterrupted_operator_does(
                || running(Sum::of(|v: &i64| *v)),
                workers,
                seed,
            );
        }
    }
}

#[test]
fn tumbling_and_sliding_windows_restore_at_any_parallelism() {
    for seed in 0..20 {
        for workers in 1..=3 {
            restored_emits_what_the_uninterrupted_operator_does(
                || fixed(TumblingWindow::of(Duration::from_millis(500)), Count, 300),
                workers,
                seed,
            );
            restored_emits_what_the_uninterrupted_operator_does(
                || {
                    fixed(
                        SlidingWindow::of(Duration::from_millis(600), Duration::from_millis(200)),
                        Sum::of(|v: &i64| *v),
                        100,
                    )
                },
                workers,
                seed,
            );
        }
    }
}

#[test]
fn session_windows_restore_at_any_parallelism() {
    for seed in 0..20 {
        for workers in 1..=3 {
            restored_emits_what_the_uninterrupted_operator_does(
                || {
                    session(
                        SessionWindow::with_gap(Duration::from_millis(150)),
                        Count,
                        200,
                    )
                },
                workers,
                seed,
            );
        }
    }
}

#[test]
fn a_part_of_another_operator_kind_or_a_corrupt_part_is_refused() {
    let mut h = KeyedHarness::new(running(Count), 0);
    h.record(1u32, 5i64, 10);
    h.end_epoch();
    h.commit();
    let part = h.save().bytes;
    let windows = fixed::<u32, i64, _, _>(TumblingWindow::of(Duration::from_secs(1)), Count, 0);
    let mut state = Default::default();
    let error = windows
        .restore(&mut state, &part, &|_: &u32| true, 1)
        .expect_err("a running aggregate's part is no window state");
    assert!(error.contains("running-aggregate"), "{error}");
    let op = running::<u32, i64, _>(Count);
    let mut state = Default::default();
    let error = op
        .restore(&mut state, &part[..part.len() - 1], &|_: &u32| true, 1)
        .expect_err("a truncated part");
    assert!(error.contains("bytes"), "{error}");
}

#[test]
fn a_part_of_other_windows_is_refused() {
    let mut h = KeyedHarness::new(
        fixed(TumblingWindow::of(Duration::from_millis(500)), Count, 0),
        0,
    );
    h.record(1u32, 5i64, 10);
    h.end_epoch();
    h.commit();
    let part = h.save().bytes;
    let wider = fixed::<u32, i64, _, _>(TumblingWindow::of(Duration::from_secs(1)), Count, 0);
    let mut state = Default::default();
    let error = wider
        .restore(&mut state, &part, &|_: &u32| true, 1)
        .expect_err("windows of another size");
    assert!(
        error.contains("window-tumbling-500ms") && error.contains("window-tumbling-1s"),
        "{error}"
    );
    let later = fixed::<u32, i64, _, _>(TumblingWindow::of(Duration::from_millis(500)), Count, 9);
    let mut state = Default::default();
    assert!(
        later
            .restore(&mut state, &part, &|_: &u32| true, 1)
            .is_err(),
        "other lateness"
    );
}

//! Window and running-aggregate operators driven through the keyed harness: firing, watermarks,
//! out-of-orderness, lateness, side output, holds, replays and end of input.

use std::time::Duration;

use shardflow_core::sink::{KeyId, Window};
use shardflow_core::testing::KeyedHarness;
use shardflow_core::topology::{Ident, KeyedOperator};
use shardflow_operators::window::testing::{fixed, running, session};
use shardflow_operators::{Count, SessionWindow, SlidingWindow, Sum, TumblingWindow, WindowResult};

type Counted = WindowResult<char, u64>;

fn results<Op: KeyedOperator<Out = Counted>>(h: &mut KeyedHarness<Op>) -> Vec<(char, i64, u64)> {
    let mut r: Vec<_> = h
        .take_outputs()
        .into_iter()
        .map(|(_, o)| (o.key, o.window.start, o.value))
        .collect();
    r.sort_unstable();
    r
}

fn tumbling_count(
    lateness: i64,
    out_of_orderness: i64,
) -> KeyedHarness<impl KeyedOperator<Key = char, In = i64, Out = Counted>> {
    KeyedHarness::new(
        fixed(
            TumblingWindow::of(Duration::from_millis(1000)),
            Count,
            lateness,
        ),
        out_of_orderness,
    )
}

#[test]
fn a_window_fires_only_when_the_watermark_reaches_its_end() {
    let mut h = tumbling_count(0, 0);
    h.record('a', 1, 0);
    h.record('a', 1, 998);
    h.end_epoch(); // watermark 998
    h.record('a', 1, 999);
    h.end_epoch(); // watermark 999: the window [0, 1000) is not complete yet
    assert!(results(&mut h).is_empty());
    h.record('a', 1, 1000);
    h.end_epoch(); // watermark 1000
    assert_eq!(results(&mut h), [('a', 0, 3)]);
}

#[test]
fn out_of_orderness_delays_firing_and_admits_disordered_records() {
    let mut h = tumbling_count(0, 500);
    h.record('a', 1, 100);
    h.record('a', 1, 1200); // watermark after: 700
    h.record('a', 1, 900); // behind the largest time, ahead of the watermark: admitted
    h.end_epoch();
    assert!(results(&mut h).is_empty(), "watermark 700 < 1000");
    h.record('a', 1, 1600);
    h.end_epoch(); // watermark 1100
    assert_eq!(results(&mut h), [('a', 0, 2)]);
    assert!(h.take_late().is_empty());
}

#[test]
fn lateness_refines_a_fired_window_then_routes_later_records_aside() {
    let mut h = tumbling_count(500, 0);
    h.record('a', 1, 10);
    h.record('a', 1, 1100);
    h.end_epoch(); // watermark 1100: [0,1000) fires with 1
    assert_eq!(results(&mut h), [('a', 0, 1)], "[1000, 2000) is still open");
    h.record('a', 1, 20); // late by 1100 - 1000 = 100 ms, within 500: refines
    h.end_epoch();
    let refined = h.take_outputs();
    assert_eq!(
        refined.len(),
        1,
        "only the refined key of the refined window"
    );
    assert_eq!(refined[0].1.value, 2);
    assert_eq!(
        refined[0].0.ident,
        Ident::keyed(KeyId::text("a"), Some(Window::new(0, 1000)))
    );
    h.record('a', 1, 1500); // watermark 1500: [0,1000) closes (1000 + 500)
    h.end_epoch();
    h.take_outputs();
    h.record('a', 7, 30); // too late
    h.end_epoch();
    assert_eq!(h.take_late(), [7]);
    assert!(
        results(&mut h).iter().all(|r| r.1 != 0),
        "the closed window is not emitted again"
    );
}

#[test]
fn a_record_exactly_at_the_lateness_bound_is_late() {
    let mut h = tumbling_count(200, 0);
    h.record('a', 1, 1200); // watermark 1200 = end 1000 + lateness 200
    h.record('a', 9, 999);
    assert_eq!(h.take_late(), [9]);
}

#[test]
fn keys_and_windows_are_counted_separately() {
    let mut h = tumbling_count(0, 0);
    for (k, t) in [('a', 0), ('b', 1), ('a', 2), ('a', 1001), ('b', 1999)] {
        h.record(k, 1, t);
    }
    h.record('a', 1, 2000);
    h.end_epoch();
    assert_eq!(
        results(&mut h),
        [('a', 0, 2), ('a', 1000, 1), ('b', 0, 1), ('b', 1000, 1)]
    );
}

#[test]
fn hold_is_the_first_epoch_of_the_oldest_open_window() {
    let mut h = tumbling_count(0, 0);
    assert_eq!(h.hold(), None);
    h.record('a', 1, 10);
    h.end_epoch(); // epoch 1
    h.record('a', 1, 1010); // epoch 2, new window
    h.end_epoch(); // fires and closes [0,1000)
    assert_eq!(h.hold(), Some(2));
    h.shard_end();
    assert_eq!(h.hold(), None, "a closed shard holds nothing");
    assert_eq!(results(&mut h).len(), 2);
}

#[test]
fn end_of_input_emits_open_windows_but_keeps_holding_them() {
    let mut h = tumbling_count(0, 0);
    h.record('a', 1, 10);
    h.end_epoch();
    h.end_of_input();
    assert_eq!(results(&mut h), [('a', 0, 1)]);
    assert_eq!(h.hold(), Some(1), "a later run must rebuild and refine it");
}

#[test]
fn a_replay_rebuilds_the_state_of_the_first_run_and_its_outputs_are_dropped() {
    let mut h = tumbling_count(0, 0);
    // The first run committed through 1400: [0,1000) had fired and closed, [1000,2000) was open.
    h.begin_replay();
    h.replay('a', 1, 500);
    h.replay('a', 1, 1200);
    h.replay('a', 1, 900); // late then, late now
    h.replay('a', 1, 1400);
    h.end_replay_epoch();
    assert!(
        h.take_outputs().is_empty(),
        "what the replay fires is dropped"
    );
    assert!(
        h.take_late().is_empty(),
        "replayed late records are dropped"
    );
    h.record('a', 1, 2000);
    h.end_epoch();
    assert_eq!(results(&mut h), [('a', 1000, 2)]);
}

#[test]
fn sliding_windows_count_each_record_in_every_window_it_falls_in() {
    let op = fixed(
        SlidingWindow::of(Duration::from_millis(300), Duration::from_millis(100)),
        Count,
        0,
    );
    let mut h = KeyedHarness::new(op, 0);
    h.record('a', 1, 250);
    h.record('a', 1, 1000);
    h.end_epoch();
    assert_eq!(results(&mut h), [('a', 0, 1), ('a', 100, 1), ('a', 200, 1)]);
}

#[test]
fn sessions_merge_when_a_record_bridges_the_gap() {
    let op = session(
        SessionWindow::with_gap(Duration::from_millis(100)),
        Sum::of(|v: &i64| *v),
        0,
    );
    // Out of order by up to 100 ms: the watermark trails the records by that much.
    let mut h = KeyedHarness::new(op, 100);
    h.record('a', 1, 0); // [0, 100)
    h.record('a', 2, 150); // [150, 250)
    h.record('a', 4, 90); // [90, 190) bridges both (watermark 50: [0, 100) is open)
    h.end_epoch();
    assert!(h.take_outputs().is_empty(), "watermark 50 < 250");
    h.record('a', 8, 600); // a new session; watermark 500 closes [0, 250)
    h.end_epoch();
    let out: Vec<_> = h
        .take_outputs()
        .into_iter()
        .map(|(_, r)| (r.window, r.value))
        .collect();
    assert_eq!(out, [(Window::new(0, 250), 7)]);
    assert_eq!(h.hold(), Some(2), "only the session from epoch 2 is open");
}

#[test]
fn a_session_the_watermark_closed_before_a_bridging_record_arrived_stays_apart() {
    let op = session(
        SessionWindow::with_gap(Duration::from_millis(100)),
        Sum::of(|v: &i64| *v),
        0,
    );
    let mut h = KeyedHarness::new(op, 0);
    h.record('a', 1, 0); // [0, 100)
    h.record('a', 2, 150); // [150, 250); the watermark is now 150
                           // Judged by the watermark at its arrival (150), whatever epoch it is read in: [0, 100)
                           // fired and closed before it, so it joins only [150, 250).
    h.record('a', 4, 90);
    let fired: Vec<_> = h
        .take_outputs()
        .into_iter()
        .map(|(_, r)| (r.window, r.value))
        .collect();
    assert_eq!(
        fired,
        [(Window::new(0, 100), 1)],
        "fired at the record, not at the epoch end"
    );
    h.shard_end();
    let out: Vec<_> = h
        .take_outputs()
        .into_iter()
        .map(|(_, r)| (r.window, r.value))
        .collect();
    assert_eq!(out, [(Window::new(90, 250), 6)]);
}

#[test]
fn sessions_of_different_keys_stay_apart() {
    let op = session(
        SessionWindow::with_gap(Duration::from_millis(100)),
        Count,
        0,
    );
    let mut h = KeyedHarness::new(op, 0);
    h.record('a', 0, 0);
    h.record('b', 0, 50);
    h.record('a', 0, 500);
    h.end_epoch();
    let mut out: Vec<_> = h
        .take_outputs()
        .into_iter()
        .map(|(_, r)| (r.key, r.window, r.value))
        .collect();
    out.sort_unstable();
    assert_eq!(
        out,
        [
            ('a', Window::new(0, 100), 1),
            ('b', Window::new(50, 150), 1)
        ]
    );
}

#[test]
fn a_running_aggregate_emits_each_changed_key_once_per_commit() {
    let mut h = KeyedHarness::new(running::<char, i64, _>(Count), 0);
    h.record('a', 0, 1);
    h.record('b', 0, 2);
    h.end_epoch();
    h.record('a', 0, 3);
    h.end_epoch();
    assert!(h.take_outputs().is_empty(), "nothing before the commit");
    h.commit();
    let mut out: Vec<_> = h
        .take_outputs()
        .into_iter()
        .map(|(_, v)| (v.key, v.value))
        .collect();
    out.sort_unstable();
    assert_eq!(out, [('a', 2), ('b', 1)]);
    h.record('b', 0, 4);
    h.end_epoch();
    h.commit();
    let out: Vec<_> = h
        .take_outputs()
        .into_iter()
        .map(|(_, v)| (v.key, v.value))
        .collect();
    assert_eq!(out, [('b', 2)]);
    assert_eq!(
        h.hold(),
        Some(1),
        "running state needs the shard from its first epoch"
    );
}

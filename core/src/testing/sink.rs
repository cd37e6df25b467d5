//! The sink conformance suite: commit makes outputs durable, identities overwrite.

use crate::lease::LeaseEpoch;
use crate::position::{RecordPosition, SequenceNumber, ShardId};
use crate::sink::{Held, InspectSink, Output, OutputBatch, OutputId, SinkContext, Window};

fn cx(instance: &str) -> SinkContext {
    SinkContext {
        topology: "conformance".into(),
        instance: instance.into(),
    }
}

/// Runs every check against sinks made by `make` (a fresh, empty sink per check). `value(i)`
/// makes distinct values of the sink's type.
///
/// # Panics
/// On the first check the sink fails, naming it.
pub async fn sink_conformance<T, S, F, Fut>(make: F, value: impl Fn(u64) -> T)
where
    T: Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static,
    S: InspectSink<T>,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let shard = ShardId::new("shardId-000000000000");
    let other = ShardId::new("shardId-000000000001");
    let record = |n: u128, index| OutputId::Record {
        position: RecordPosition::new(SequenceNumber::from_u128(n)),
        index,
    };
    let window = |key: &str| OutputId::Keyed {
        key: key.into(),
        window: Some(Window::new(60_000, 120_000)),
        index: 0,
    };

    // Committed outputs are visible, under their shard and identity.
    let sink = make().await;
    let mut writer = sink.open(&cx("a")).await.expect("open");
    let outputs = vec![
        Output {
            id: record(1, 0),
            value: value(1),
        },
        Output {
            id: record(1, 1),
            value: value(2),
        },
        Output {
            id: window("k/1 é"),
            value: value(3),
        },
    ];
    writer
        .write(OutputBatch {
            shard: shard.clone(),
            lease_epoch: LeaseEpoch::new(1, 1),
            outputs,
        })
        .await
        .expect("write");
    writer.commit().await.expect("commit");
    // A writer may hold outputs of records back across commits, but must say how far they
    // are durable: an output missing after a commit is one it reports held.
    let got = sink.committed().await.expect("read back");
    let held = writer.held();
    if sink.holds_record_outputs() {
        assert!(
            held.iter().any(|(s, _)| s == &shard),
            "a holding sink's writer reports a shard it was given records of: {held:?}"
        );
    } else {
        assert!(
            held.iter().all(|(_, h)| *h == Held::default()),
            "a writer holds outputs back only if its sink says so: {held:?}"
        );
    }
    for n in [0, 1] {
        let id = record(1, n);
        if !got.contains_key(&(shard.clone(), id.to_path())) {
            let position = RecordPosition::new(SequenceNumber::from_u128(1));
            let covered = held.iter().any(|(s, h)| {
                s == &shard && h.buffered && h.cuts.last().is_none_or(|cut| cut < &position)
            });
            assert!(
                covered,
                "{id} neither durable after commit nor reported held: {held:?}"
            );
        }
    }
    assert!(
        got.contains_key(&(shard.clone(), window("k/1 é").to_path())),
        "keyed outputs are never held"
    );
    writer.end_shard(&shard).await.expect("end shard");
    assert!(
        writer.held().is_empty(),
        "nothing held after the shard ended"
    );
    let got = sink.committed().await.expect("read back");
    assert_eq!(got.len(), 3, "three committed outputs, got {got:?}");
    assert_eq!(
        got.get(&(shard.clone(), record(1, 1).to_path())),
        Some(&value(2))
    );
    assert_eq!(
        got.get(&(shard.clone(), window("k/1 é").to_path())),
        Some(&value(3))
    );

    // Writing an existing identity replaces it: a replay leaves one output, the latest.
    let sink = make().await;
    let mut writer = sink.open(&cx("a")).await.expect("open");
    for v in [10, 11] {
        let outputs = vec![Output {
            id: window("k"),
            value: value(v),
        }];
        writer
            .write(OutputBatch {
                shard: shard.clone(),
                lease_epoch: LeaseEpoch::new(1, 1),
                outputs,
            })
            .await
            .expect("write");
        writer.commit().await.expect("commit");
    }
    let mut replay = sink.open(&cx("b")).await.expect("open a second writer");
    let outputs = vec![Output {
        id: window("k"),
        value: value(11),
    }];
    replay
        .write(OutputBatch {
            shard: shard.clone(),
            lease_epoch: LeaseEpoch::new(1, 1),
            outputs,
        })
        .await
        .expect("write");
    replay.commit().await.expect("commit");
    let got = sink.committed().await.expect("read back");
    assert_eq!(got.len(), 1, "one identity, one output: {got:?}");
    assert_eq!(
        got.get(&(shard.clone(), window("k").to_path())),
        Some(&value(11))
    );

    // The same identity from two shards is two outputs.
    let sink = make().await;
    let mut writer = sink.open(&cx("a")).await.expect("open");
    for s in [&shard, &other] {
        let outputs = vec![Output {
            id: window("k"),
            value: value(5),
        }];
        writer
            .write(OutputBatch {
                shard: s.clone(),
                lease_epoch: LeaseEpoch::new(1, 1),
                outputs,
            })
            .await
            .expect("write");
    }
    writer.commit().await.expect("commit");
    assert_eq!(sink.committed().await.expect("read back").len(), 2);

    // A commit with nothing written succeeds and changes nothing.
    let sink = make().await;
    let mut writer = sink.open(&cx("a")).await.expect("open");
    writer.commit().await.expect("empty commit");
    assert!(sink.committed().await.expect("read back").is_empty());
}

/// Checks a fencing sink: an output written under a lease epoch cannot be overwritten from an
/// older epoch (the write or its commit fails with [`SinkError::is_fenced`] and the newer value
/// stays); the same or a newer epoch may overwrite it (a refined window result).
///
/// # Panics
/// On the first check the sink fails, naming it.
///
/// [`SinkError::is_fenced`]: crate::error::SinkError::is_fenced
pub async fn fencing_sink_conformance<T, S, F, Fut>(make: F, value: impl Fn(u64) -> T)
where
    T: Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static,
    S: InspectSink<T>,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let shard = ShardId::new("shardId-000000000000");
    let id = OutputId::Keyed {
        key: "k".into(),
        window: Some(Window::new(0, 60_000)),
        index: 0,
    };
    let sink = make().await;
    let put = |epoch: u64, v: u64| OutputBatch {
        shard: shard.clone(),
        lease_epoch: LeaseEpoch::new(1, epoch),
        outputs: vec![Output {
            id: id.clone(),
            value: value(v),
        }],
    };
    let read = || async {
        sink.committed()
            .await
            .expect("read back")
            .get(&(shard.clone(), id.to_path()))
            .cloned()
    };
    let mut newer = sink.open(&cx("newer")).await.expect("open");
    newer.write(put(5, 1)).await.expect("write");
    newer.commit().await.expect("commit");

    let mut stale = sink.open(&cx("stale")).await.expect("open");
    let refused = match stale.write(put(4, 2)).await {
        Err(e) => e,
        Ok(()) => stale
            .commit()
            .await
            .expect_err("a stale epoch's overwrite is refused"),
    };
    assert!(refused.is_fenced(), "refused as fenced: {refused}");
    assert_eq!(read().await, Some(value(1)), "the newer value stays");

    newer.write(put(5, 3)).await.expect("write");
    newer
        .commit()
        .await
        .expect("the same epoch refines its output");
    assert_eq!(read().await, Some(value(3)));
    let mut next = sink.open(&cx("next")).await.expect("open");
    next.write(put(6, 4)).await.expect("write");
    next.commit().await.expect("a newer epoch overwrites");
    assert_eq!(read().await, Some(value(4)));

    // A recreated lease table starts its counters over: its generation orders its epochs after
    // every epoch of the old table, and the old table's epochs are stale from then on.
    let put_in = |generation: u64, counter: u64, v: u64| OutputBatch {
        lease_epoch: LeaseEpoch::new(generation, counter),
        ..put(counter, v)
    };
    let mut recreated = sink.open(&cx("recreated")).await.expect("open");
    recreated.write(put_in(2, 1, 7)).await.expect("write");
    recreated
        .commit()
        .await
        .expect("a newer table generation overwrites a larger counter of the old one");
    assert_eq!(read().await, Some(value(7)));
    let mut old_table = sink.open(&cx("old-table")).await.expect("open");
    let refused = match old_table.write(put_in(1, 9, 8)).await {
        Err(e) => e,
        Ok(()) => old_table
            .commit()
            .await
            .expect_err("the old table's epoch is refused, whatever its counter"),
    };
    assert!(refused.is_fenced(), "refused as fenced: {refused}");
    assert_eq!(
        read().await,
        Some(value(7)),
        "the newer table's value stays"
    );

    // A commit after `key_by` holds several shards' outputs: a refusal names its shard, the
    // other shard's output survives it, and once the refused shard is released the next
    // commit makes the rest durable.
    let other = ShardId::new("shardId-000000000001");
    let mut mixed = sink.open(&cx("mixed")).await.expect("open");
    let refused = match mixed.write(put(5, 5)).await {
        Err(e) => e,
        Ok(()) => {
            mixed
                .write(OutputBatch {
                    shard: other.clone(),
                    lease_epoch: LeaseEpoch::new(1, 1),
                    outputs: vec![Output {
                        id: id.clone(),
                        value: value(6),
                    }],
                })
                .await
                .expect("write another shard");
            mixed
                .commit()
                .await
                .expect_err("the stale shard is refused")
        }
    };
    let fenced = refused.fenced().expect("refused as fenced");
    assert_eq!(fenced.shard, shard, "the refusal names the refused shard");
    mixed.release_shard(&shard);
    mixed
        .commit()
        .await
        .expect("the rest commits once the refused shard is released");
    let committed = sink.committed().await.expect("read back");
    assert_eq!(
        committed.get(&(other.clone(), id.to_path())),
        Some(&value(6)),
        "the other shard's output of the refused commit is durable"
    );
    assert_eq!(read().await, Some(value(7)), "the newer value stays");
}

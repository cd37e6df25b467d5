//! Criterion micro-benchmarks of the per-record hot paths: KPL de-aggregation, JSON decoding,
//! a tumbling window's add and fire, and a keyed topology end to end on the in-memory backend
//! (decode, exchange to the keyed workers, window, sink emit: the parts the runtime keeps
//! private). `cargo bench -p shardflow-benches`; HTML reports with plots under
//! `target/criterion/report/`. `examples/bench_window.rs` stays the end-to-end figure against
//! a plain loop.
// criterion_group! declares an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde::Deserialize;
use shardflow_connectors::kinesis::aggregation::{deaggregate, AggregateBuilder, UserRecord};
use shardflow_core::decode::{Decoder, Json, SourceExt};
use shardflow_core::lease::MemoryLeaseStore;
use shardflow_core::memory::MemoryStream;
use shardflow_core::position::{RecordPosition, SequenceNumber};
use shardflow_core::record::RawRecord;
use shardflow_core::runtime::{RunMode, Runtime, RuntimeConfig};
use shardflow_core::sink::MemorySink;
use shardflow_core::testing::KeyedHarness;
use shardflow_core::topology::Topology;
use shardflow_operators::window::testing::fixed;
use shardflow_operators::{Count, KeyBy, TumblingWindow};

#[derive(Clone, Debug, Deserialize)]
struct Click {
    user: u64,
    ts: i64,
}

fn click_json(i: u64) -> Vec<u8> {
    format!(r#"{{"user":{},"ts":{}}}"#, i % 1_000, i).into_bytes()
}

fn deaggregation(c: &mut Criterion) {
    let mut builder = AggregateBuilder::new();
    for i in 0..500 {
        builder.add(UserRecord {
            partition_key: format!("user-{}", i % 50),
            explicit_hash_key: None,
            data: vec![b'x'; 100],
        });
    }
    let aggregate = builder.finish();
    let mut group = c.benchmark_group("kpl");
    group.throughput(Throughput::Elements(500));
    group.bench_function("deaggregate_500_records_of_100_bytes", |b| {
        b.iter(|| deaggregate(black_box(&aggregate)).unwrap());
    });
    group.finish();
}

fn decode(c: &mut Criterion) {
    let records: Vec<Vec<u8>> = (0..1_000).map(click_json).collect();
    let position = RecordPosition::new(SequenceNumber::from_u128(1));
    let json = Json::<Click>::default();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("json_1000_small_records", |b| {
        b.iter(|| {
            for data in &records {
                let record = RawRecord {
                    position: &position,
                    arrival_ms: 0,
                    partition_key: b"k",
                    data,
                };
                black_box(json.decode(record).unwrap());
            }
        });
    });
    group.finish();
}

fn window_add(c: &mut Criterion) {
    const EVENTS: u64 = 10_000;
    let mut group = c.benchmark_group("window");
    group.throughput(Throughput::Elements(EVENTS));
    // 1 000 keys, 1 event per ms, 1 s windows: each window closes with a result per key.
    group.bench_function("tumbling_1s_count_10000_events_1000_keys", |b| {
        b.iter_batched(
            || {
                KeyedHarness::new(
                    fixed::<u64, Click, _, _>(TumblingWindow::of(Duration::from_secs(1)), Count, 0),
                    0,
                )
            },
            |mut harness| {
                for i in 0..EVENTS {
                    let ts = i64::try_from(i).unwrap();
                    harness.record(
                        i % 1_000,
                        Click {
                            user: i % 1_000,
                            ts,
                        },
                        ts,
                    );
                    if i % 1_000 == 999 {
                        harness.end_epoch();
                        harness.commit();
                    }
                }
                black_box(harness)
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn keyed_pipeline(c: &mut Criterion) {
    const EVENTS: u64 = 20_000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS));
    group.bench_function("memory_2_shards_tumbling_count_20000_events", |b| {
        b.iter_batched(
            || {
                let stream = MemoryStream::new("bench", 2);
                for i in 0..EVENTS {
                    let ts = i64::try_from(i).unwrap();
                    stream.push(usize::from(i % 2 == 1), ts, b"k", &click_json(i));
                }
                stream
            },
            |stream| {
                let sink = MemorySink::new("counts");
                let topology = Topology::builder("bench")
                    .source(stream.json::<Click>())
                    .event_time(|c: &Click| c.ts)
                    .key_by(|c: &Click| c.user)
                    .window(TumblingWindow::of(Duration::from_secs(1)))
                    .aggregate(Count)
                    .sink(sink.clone())
                    .build()
                    .unwrap();
                let config = RuntimeConfig {
                    worker_id: "bench".into(),
                    parallelism: 2,
                    mode: RunMode::UntilCaughtUp,
                    idle_wait: Duration::from_millis(1),
                    ..RuntimeConfig::default()
                };
                runtime
                    .block_on(
                        Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
                            .with_config(config)
                            .run(),
                    )
                    .unwrap();
                black_box(sink.writes())
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(hot_paths, deaggregation, decode, window_add, keyed_pipeline);
criterion_main!(hot_paths);

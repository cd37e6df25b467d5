//! Model test of `LocalStream`: random appends, splits, merges and reopenings against a small
//! reference model of Kinesis shards, comparing shards, routing, sequence numbers and contents.
#![cfg(feature = "local")]

use proptest::prelude::*;
use shardflow_connectors::local::{
    partition_key_hash, LocalStream, LocalStreamConfig, ManualClock,
};
use shardflow_core::position::{ShardId, StartPosition};
use shardflow_core::source::{ReadLimits, ShardStatus};

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<(u8, u8)>),
    Split { pick: usize, at: u128 },
    Merge { pick: usize },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((any::<u8>(), any::<u8>()), 1..30).prop_map(Op::Append),
        1 => (any::<usize>(), any::<u128>()).prop_map(|(pick, at)| Op::Split { pick, at }),
        1 => any::<usize>().prop_map(|pick| Op::Merge { pick }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug)]
struct ModelShard {
    id: String,
    range: (u128, u128),
    parents: Vec<String>,
    closed: bool,
    payloads: Vec<String>,
}

#[derive(Default)]
struct Model {
    shards: Vec<ModelShard>,
}

impl Model {
    fn add(&mut self, range: (u128, u128), parents: Vec<String>) -> String {
        let id = format!("shardId-{:012}", self.shards.len());
        self.shards.push(ModelShard {
            id: id.clone(),
            range,
            parents,
            closed: false,
            payloads: vec![],
        });
        id
    }

    /// Open shards by starting hash key.
    fn open(&self) -> Vec<usize> {
        let mut open: Vec<usize> = (0..self.shards.len())
            .filter(|&i| !self.shards[i].closed)
            .collect();
        open.sort_by_key(|&i| self.shards[i].range.0);
        open
    }
}

fn config(clock: &ManualClock) -> LocalStreamConfig {
    LocalStreamConfig::new().fsync(false).clock(clock.clone())
}

fn check(stream: &LocalStream, model: &Model) {
    let shards = stream.shards().unwrap();
    assert_eq!(shards.len(), model.shards.len());
    for (got, want) in shards.iter().zip(&model.shards) {
        assert_eq!(got.id.as_str(), want.id);
        assert_eq!(got.hash_key_range, want.range);
        assert_eq!(got.closed, want.closed, "{}", want.id);
        let parents: Vec<&str> = got.parents.iter().map(ShardId::as_str).collect();
        assert_eq!(parents, want.parents);
        let limits = ReadLimits {
            max_records: 7,
            max_bytes: 1 << 20,
        };
        let mut reader = stream
            .reader(&got.id, StartPosition::TrimHorizon, limits)
            .unwrap();
        let mut payloads = Vec::new();
        let mut last = None;
        let status = loop {
            let batch = reader.read_blocking().unwrap();
            for r in batch.records.iter() {
                assert!(
                    last.as_ref() < Some(r.position),
                    "positions increase in {}",
                    want.id
                );
                last = Some(r.position.clone());
                payloads.push(String::from_utf8(r.data.to_vec()).unwrap());
            }
            if batch.status != ShardStatus::More {
                break batch.status;
            }
        };
        assert_eq!(payloads, want.payloads, "contents of {}", want.id);
        let expected = if want.closed {
            ShardStatus::Ended
        } else {
            ShardStatus::CaughtUp
        };
        assert_eq!(status, expected, "{}", want.id);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_stream_behaves_like_the_model(ops in prop::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_700_000_000_000);
        let mut stream = LocalStream::create(dir.path(), "model", 2, config(&clock)).unwrap();
        let mut model = Model::default();
        let half = u128::MAX / 2;
        model.add((0, half), vec![]);
        model.add((half + 1, u128::MAX), vec![]);
        let mut last_sequence = None;
        let mut counter = 0u64;

        for op in ops {
            match op {
                Op::Append(records) => {
                    let batch: Vec<(String, String)> = records
                        .iter()
                        .map(|(k, _)| {
                            counter += 1;
                            (format!("key-{k}"), format!("p{counter}"))
                        })
                        .collect();
                    let puts = stream.append(&batch).unwrap();
                    for ((key, payload), put) in batch.iter().zip(puts) {
                        let hash = partition_key_hash(key);
                        let target = model
                            .open()
                            .into_iter()
                            .find(|&i| (model.shards[i].range.0..=model.shards[i].range.1).contains(&hash))
                            .expect("open shards cover the hash space");
                        prop_assert_eq!(put.shard.as_str(), model.shards[target].id.as_str());
                        prop_assert!(last_sequence.as_ref() < Some(&put.sequence));
                        last_sequence = Some(put.sequence.clone());
                        model.shards[target].payloads.push(payload.clone());
                    }
                }
                Op::Split { pick, at } => {
                    let open = model.open();
                    let i = open[pick % open.len()];
                    let (start, end) = model.shards[i].range;
                    if start == end {
                        continue;
                    }
                    let key = start + 1 + at % (end - start);
                    let parent = model.shards[i].id.clone();
                    let (low, high) = stream.split_shard(&ShardId::new(&parent), key).unwrap();
                    model.shards[i].closed = true;
                    let want_low = model.add((start, key - 1), vec![parent.clone()]);
                    let want_high = model.add((key, end), vec![parent]);
                    prop_assert_eq!(low.as_str(), want_low.as_str());
                    prop_assert_eq!(high.as_str(), want_high.as_str());
                }
                Op::Merge { pick } => {
                    let open = model.open();
                    if open.len() < 2 {
                        continue;
                    }
                    let j = pick % (open.len() - 1);
                    let (a, b) = (open[j], open[j + 1]);
                    let (ida, idb) = (model.shards[a].id.clone(), model.shards[b].id.clone());
                    let child = stream.merge_shards(&ShardId::new(&ida), &ShardId::new(&idb)).unwrap();
                    model.shards[a].closed = true;
                    model.shards[b].closed = true;
                    let range = (model.shards[a].range.0, model.shards[b].range.1);
                    let want = model.add(range, vec![ida, idb]);
                    prop_assert_eq!(child.as_str(), want.as_str());
                }
                Op::Reopen => {
                    drop(stream);
                    stream = LocalStream::open_with(dir.path(), "model", config(&clock)).unwrap();
                }
            }
        }
        check(&stream, &model);
    }
}

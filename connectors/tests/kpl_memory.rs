//! Memory under a hostile KPL aggregate, measured with a counting allocator (this test binary's
//! own): a 1 MiB record whose user records would take more than 32 times its size once each has
//! its keys is refused before anything is copied, within a stated bound.

use cap::Cap;
use shardflow_connectors::kinesis::aggregation::{
    deaggregate, AggregateBuilder, AggregationError, UserRecord,
};

#[global_allocator]
static ALLOCATOR: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

/// The bound the issue states for the process while it de-aggregates one hostile 1 MiB record.
const BOUND: usize = 64 << 20;

/// One test function, so that no other test's allocations count: the peak is the process's.
#[test]
fn hostile_aggregates_stay_within_64_mib() {
    a_1_mib_aggregate_asking_for_more_than_its_budget_is_a_fault();
    an_aggregate_of_many_records_naming_one_key_holds_that_key_once();
    let peak = ALLOCATOR.max_allocated();
    println!(
        "peak of the process: {:.1} MiB",
        peak as f64 / f64::from(1 << 20)
    );
    assert!(peak < BOUND, "the process peaked at {} MiB", peak >> 20);
}

fn a_1_mib_aggregate_asking_for_more_than_its_budget_is_a_fault() {
    // As many empty user records as fit in 1 MiB, each naming the one longest partition key
    // Kinesis allows: once each had its copy of the key, they would take 40 times the record.
    let key = "k".repeat(256);
    let mut builder = AggregateBuilder::new();
    while builder.size() < (1 << 20) - 16 {
        builder.add(UserRecord {
            partition_key: key.clone(),
            explicit_hash_key: None,
            data: Vec::new(),
        });
    }
    let records = builder.len();
    let aggregate = builder.finish();
    assert!(aggregate.len() <= 1 << 20, "{} bytes", aggregate.len());
    let before = ALLOCATOR.allocated();
    let result = deaggregate(&aggregate);
    match result {
        Err(AggregationError::TooLarge { len, expanded }) => {
            assert_eq!(len, aggregate.len());
            assert!(expanded >= records * 256, "{expanded}");
        }
        other => panic!(
            "expected TooLarge, got {:?}",
            other.map(|d| d.map(|d| d.len()))
        ),
    }
    assert_eq!(ALLOCATOR.allocated(), before, "nothing kept");
    println!(
        "{records} user records in {} bytes: refused; process peak so far {:.1} MiB",
        aggregate.len(),
        ALLOCATOR.max_allocated() as f64 / f64::from(1 << 20)
    );
}

fn an_aggregate_of_many_records_naming_one_key_holds_that_key_once() {
    // Within budget (16 bytes of payload per record): the records share the key's table entry
    // instead of a copy each.
    let key = "k".repeat(256);
    let mut builder = AggregateBuilder::new();
    while builder.size() < (1 << 20) - 64 {
        builder.add(UserRecord {
            partition_key: key.clone(),
            explicit_hash_key: None,
            data: vec![7; 16],
        });
    }
    let records = builder.len();
    let aggregate = builder.finish();
    let before = ALLOCATOR.allocated();
    let users = deaggregate(&aggregate).unwrap().unwrap();
    let held = ALLOCATOR.allocated() - before;
    assert_eq!(users.len(), records);
    assert!(users
        .iter()
        .all(|u| u.partition_key.len() == 256 && u.data == [7; 16]));
    // The records' payloads and bookkeeping, not `records` copies of the key.
    assert!(held < records * 256, "{records} records hold {held} bytes");
}

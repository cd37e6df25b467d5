//! Fuzz target: the KPL de-aggregator must never panic, and whatever it accepts must re-encode
//! to records that de-aggregate to the same user records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardflow_connectors::kinesis::aggregation::{deaggregate, AggregateBuilder, MAGIC};

fuzz_target!(|data: &[u8]| {
    // Raw input, and the input framed as an aggregate with a valid digest, so the fuzzer
    // reaches the protobuf decoder instead of stopping at the digest check.
    let _ = deaggregate(data);
    let mut framed = MAGIC.to_vec();
    framed.extend_from_slice(data);
    framed.extend_from_slice(&md5_of(data));
    if let Ok(Some(records)) = deaggregate(&framed) {
        let records = records.into_user_records();
        let mut builder = AggregateBuilder::new();
        for r in records.clone() {
            builder.add(r);
        }
        let again = deaggregate(&builder.finish()).expect("re-encoded aggregate decodes");
        assert_eq!(again.map(|a| a.into_user_records()), Some(records));
    }
});

fn md5_of(data: &[u8]) -> [u8; 16] {
    shardflow_connectors::kinesis::aggregation::digest(data)
}

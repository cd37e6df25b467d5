//! `.aggregate(..)` before `.key_by(..)`: the error says to key the stream first.
use shardflow_core::decode::SourceExt;
use shardflow_core::memory::MemoryStream;
use shardflow_core::topology::Topology;
use shardflow_operators::{Count, StreamExt};

fn main() {
    let stream = MemoryStream::new("s", 1);
    let _ = Topology::builder("t").source(stream.raw()).aggregate(Count);
}

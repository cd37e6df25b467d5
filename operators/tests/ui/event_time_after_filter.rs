//! `.event_time(..)` after an operator: the error says it goes right after `.source(..)`.
use shardflow_core::decode::SourceExt;
use shardflow_core::memory::MemoryStream;
use shardflow_core::topology::Topology;
use shardflow_operators::StreamExt;

fn main() {
    let stream = MemoryStream::new("s", 1);
    let _ = Topology::builder("t")
        .source(stream.raw())
        .filter(|r: &Vec<u8>| !r.is_empty())
        .event_time(|_: &Vec<u8>| 0);
}

//! `.window(..)` before `.key_by(..)`: the error says to key the stream first.
use std::time::Duration;

use shardflow_core::decode::SourceExt;
use shardflow_core::memory::MemoryStream;
use shardflow_core::topology::Topology;
use shardflow_operators::{StreamExt, TumblingWindow};

fn main() {
    let stream = MemoryStream::new("s", 1);
    let _ = Topology::builder("t")
        .source(stream.raw())
        .window(TumblingWindow::of(Duration::from_secs(60)));
}

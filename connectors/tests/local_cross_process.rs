//! Two processes on one stream: the writer lock excludes a second writer in another process,
//! and records appended by one process are read by the other.
//!
//! The test binary runs itself again as the second process (the ignored `child` test, selected
//! by name and driven by environment variables).
#![cfg(feature = "local")]

use std::path::Path;
use std::process::Command;

use shardflow_connectors::local::{LocalStream, LocalStreamConfig, LocalStreamError};
use shardflow_core::position::{ShardId, StartPosition};
use shardflow_core::source::{ReadLimits, ShardStatus};

const DIR_VAR: &str = "SHARDFLOW_CROSS_PROCESS_DIR";
const ROLE_VAR: &str = "SHARDFLOW_CROSS_PROCESS_ROLE";

fn shard() -> ShardId {
    ShardId::new("shardId-000000000000")
}

fn read_payloads(stream: &LocalStream) -> Vec<String> {
    let mut reader = stream
        .reader(&shard(), StartPosition::TrimHorizon, ReadLimits::default())
        .unwrap();
    let mut out = Vec::new();
    loop {
        let batch = reader.read_blocking().unwrap();
        out.extend(
            batch
                .records
                .iter()
                .map(|r| String::from_utf8(r.data.to_vec()).unwrap()),
        );
        if batch.status != ShardStatus::More {
            return out;
        }
    }
}

fn run_child(dir: &Path, role: &str) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_VAR, dir)
        .env(ROLE_VAR, role)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "child {role} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("1 passed"),
        "the child test did not run:\n{stdout}"
    );
}

#[test]
fn a_second_process_reads_appends_and_writes_only_after_the_writer_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let stream = LocalStream::create(dir.path(), "shared", 1, LocalStreamConfig::new()).unwrap();
    stream.append(&[("k", "from-parent")]).unwrap();
    // The parent holds the writer lock: the child can read but not write.
    run_child(dir.path(), "read-then-fail-to-write");
    stream.release_writer();
    run_child(dir.path(), "write");
    assert_eq!(read_payloads(&stream), ["from-parent", "from-child"]);
    // And the parent can write again after the child exited.
    stream.append(&[("k", "parent-again")]).unwrap();
    assert_eq!(read_payloads(&stream).len(), 3);
}

#[test]
#[ignore = "run by a_second_process_reads_appends_and_writes_only_after_the_writer_lets_go"]
fn child() {
    let (Ok(dir), Ok(role)) = (std::env::var(DIR_VAR), std::env::var(ROLE_VAR)) else {
        return;
    };
    let stream = LocalStream::open(&dir, "shared").unwrap();
    match role.as_str() {
        "read-then-fail-to-write" => {
            assert_eq!(read_payloads(&stream), ["from-parent"]);
            let err = stream.append(&[("k", "nope")]).unwrap_err();
            assert!(matches!(err, LocalStreamError::WriterBusy { .. }), "{err}");
        }
        "write" => {
            stream.append(&[("k", "from-child")]).unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}

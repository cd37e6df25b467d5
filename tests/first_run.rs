//! The README's first command builds only what the embedded backend needs: the dependency
//! graph of `cargo run --release --example clickstream` (the root package with its default
//! features, dev-dependencies included, since examples build them) holds no AWS SDK crate, no
//! benchmark harness or peer, and no more crates than counted when it was last looked at.

use std::collections::BTreeSet;
use std::process::Command;

/// Crates in the graph on 2026-11-30 (147, with rusqlite and its bundled SQLite), plus room
/// for a few small additions. Raise it only with a look at what came in and what it costs a
/// cold build (`docs/benchmarks.md`, "The first run").
const MAX_CRATES: usize = 160;

/// Crates the first run must never build: the AWS SDK (minutes of compile time; features
/// `kinesis`, `dynamodb`, `s3`), and benchmark harnesses and peers.
const FORBIDDEN: &[&str] = &[
    "aws-sdk-",
    "aws-config",
    "aws-smithy-",
    "criterion",
    "timely",
    "differential-dataflow",
];

/// The crates `cargo tree` lists for the root package with `extra` arguments.
fn crates_of(extra: &[&str]) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "--package",
            "shardflow",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .args(extra)
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        // "name vX.Y.Z (path or marker)": the name and version name a crate.
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some(format!("{} {}", words.next()?, words.next()?))
        })
        .collect()
}

fn first_run_crates() -> BTreeSet<String> {
    crates_of(&["--edges", "normal,build,dev"])
}

fn forbidden_in(crates: &BTreeSet<String>) -> Vec<&String> {
    crates
        .iter()
        .filter(|c| FORBIDDEN.iter().any(|f| c.starts_with(f)))
        .collect()
}

/// The operations tool on the local backend (`--features cli`) builds without the AWS SDK too.
#[test]
fn the_local_operations_tool_builds_no_aws_sdk() {
    let crates = crates_of(&["--edges", "normal,build", "--features", "cli"]);
    // The same query sees the SDK when the AWS features ask for it.
    let with_aws = crates_of(&[
        "--edges",
        "normal,build",
        "--features",
        "cli,kinesis,dynamodb",
    ]);
    assert!(
        !forbidden_in(&with_aws).is_empty(),
        "the check sees AWS crates: {with_aws:?}"
    );
    let forbidden = forbidden_in(&crates);
    assert!(
        forbidden.is_empty(),
        "the local tool would build {forbidden:?}"
    );
}

#[test]
fn the_first_command_builds_no_aws_sdk_and_no_benchmark_crates() {
    let crates = first_run_crates();
    assert!(
        crates.iter().any(|c| c.starts_with("rusqlite ")),
        "the graph is the example's, with its SQLite sink: {crates:?}"
    );
    let forbidden = forbidden_in(&crates);
    assert!(
        forbidden.is_empty(),
        "the first run would build {forbidden:?}: put them behind a feature"
    );
    assert!(
        crates.len() <= MAX_CRATES,
        "the first run builds {} crates, more than the {MAX_CRATES} allowed: {crates:?}",
        crates.len()
    );
}

//! The `shardflow` tool on the embedded local backend (`--local-dir`), built without the AWS
//! SDK: create and describe a stream, put lines, tail them, reshard, and list and reset the
//! leases a worker left (issue 13: the tool worked only against AWS endpoints).

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use clap::Parser as _;
use shardflow::local::{LocalDirSink, LocalSource};
use shardflow::prelude::*;
use shardflow::run::{run_with, Flags, Settings};

fn shardflow(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardflow"))
        .arg("--local-dir")
        .arg(dir)
        .args(args)
        // Nothing of AWS is reachable or needed.
        .env_remove("SHARDFLOW_KINESIS_ENDPOINT")
        .env_remove("SHARDFLOW_DYNAMODB_ENDPOINT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the shardflow binary");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = shardflow(dir, args, stdin);
    assert!(
        out.status.success(),
        "shardflow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_on_a_local_directory() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    ok(dir, &["stream", "create", "events", "--shards", "2"], None);
    let described = ok(dir, &["stream", "describe", "events"], None);
    assert!(
        described.contains("events: local, 2 open shards"),
        "{described}"
    );

    let lines: String = (0..40).map(|i| format!("{i}\n")).collect();
    ok(dir, &["put", "events"], Some(&lines));
    let tailed = ok(dir, &["tail", "events"], None);
    let mut values: Vec<u32> = tailed
        .lines()
        .map(|l| l.rsplit('\t').next().unwrap().parse().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(values, (0..40).collect::<Vec<_>>(), "{tailed}");
    let limited = ok(dir, &["tail", "events", "--limit", "5"], None);
    assert_eq!(limited.lines().count(), 5);

    // A worker processes the stream and leaves its leases in `<dir>/leases/copy`.
    let flags = Flags::try_parse_from([
        "worker",
        "--stream",
        "events",
        "--local-dir",
        dir.to_str().unwrap(),
        "--until-caught-up",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    let out = dir.join("out");
    run_with(
        Settings::resolve(flags).unwrap(),
        |cx| async move {
            let stream = cx.local_stream().await?;
            Ok(Topology::builder("copy")
                .source(LocalSource::new(&stream).json::<u32>())
                .sink(LocalDirSink::new(&out))
                .build()?)
        },
        None,
    )
    .await
    .unwrap();
    let listed = ok(dir, &["leases", "list", "copy"], None);
    assert_eq!(
        listed.lines().count(),
        3,
        "a header and two shards: {listed}"
    );
    assert!(
        listed.lines().skip(1).all(|l| !l.contains("INITIAL")),
        "checkpointed: {listed}"
    );
    ok(
        dir,
        &["leases", "reset", "copy", "--to", "trim-horizon"],
        None,
    );
    let reset = ok(dir, &["leases", "list", "copy"], None);
    assert_eq!(
        reset.matches("TRIM_HORIZON").count(),
        2,
        "both shards replay from the start: {reset}"
    );

    // Resharding by split, and what the local backend does not do, said plainly.
    let first = described
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let split = ok(dir, &["stream", "split", "events", &first], None);
    assert!(split.starts_with(&format!("split {first}")), "{split}");
    let described = ok(dir, &["stream", "describe", "events"], None);
    assert!(described.contains("3 open shards"), "{described}");
    let scale = shardflow(dir, &["stream", "scale", "events", "4"], None);
    assert!(!scale.status.success());
    assert!(
        String::from_utf8_lossy(&scale.stderr).contains("split and merge only"),
        "{}",
        String::from_utf8_lossy(&scale.stderr)
    );
    let missing = shardflow(dir, &["leases", "list", "nothing"], None);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no lease store for topology nothing"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

//! The `shardflow` tool against kinesis-local and dynalite (started by scripts/test.sh): each
//! subcommand, and a bad argument's message.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use shardflow::core::lease::{Lease, LeaseStore as _, LeaseUpdate};
use shardflow::dynamodb::DynamoLeaseStore;
use shardflow::AwsConfig;

fn endpoint(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test.sh"))
}

fn shardflow(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardflow"))
        .args(args)
        .env(
            "SHARDFLOW_KINESIS_ENDPOINT",
            endpoint("SHARDFLOW_KINESIS_ENDPOINT"),
        )
        .env(
            "SHARDFLOW_DYNAMODB_ENDPOINT",
            endpoint("SHARDFLOW_DYNAMODB_ENDPOINT"),
        )
        .env("SHARDFLOW_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "shardflow-test")
        .env("AWS_SECRET_ACCESS_KEY", "shardflow-test")
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

fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = shardflow(args, stdin);
    assert!(
        out.status.success(),
        "shardflow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_against_the_emulators() {
    let stream = format!("cli-{}-{}", std::process::id(), rand::random::<u32>());
    ok(&["stream", "create", &stream, "--shards", "2"], None);
    let described = ok(&["stream", "describe", &stream], None);
    assert!(described.contains("ACTIVE, 2 open shards"), "{described}");

    let lines: String = (0..40).map(|i| format!("line-{i}\n")).collect();
    ok(&["put", &stream], Some(&lines));
    ok(&["put", &stream, "--aggregate"], Some(&lines));
    let tailed = ok(&["tail", &stream], None);
    let mut data: Vec<&str> = tailed
        .lines()
        .map(|l| l.rsplit('\t').next().unwrap())
        .collect();
    data.sort_unstable();
    let mut expected: Vec<String> = (0..40)
        .flat_map(|i| [format!("line-{i}"), format!("line-{i}")])
        .collect();
    expected.sort_unstable();
    assert_eq!(data, expected, "both puts, de-aggregated, each record once");
    assert!(
        tailed.lines().all(|l| l.starts_with("shardId-")),
        "shard, position, data per line: {tailed}"
    );
    assert_eq!(
        ok(&["tail", &stream, "--limit", "5"], None).lines().count(),
        5
    );

    ok(&["stream", "split", &stream, "shardId-000000000000"], None);
    let described = ok(&["stream", "describe", &stream], None);
    assert!(described.contains("3 open shards"), "{described}");
    assert!(
        described.contains("parents shardId-000000000000"),
        "{described}"
    );
    let children: Vec<&str> = described
        .lines()
        .filter(|l| l.contains("parents shardId-000000000000"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    ok(
        &["stream", "merge", &stream, children[0], children[1]],
        None,
    );
    assert!(ok(&["stream", "describe", &stream], None).contains("2 open shards"));
    ok(&["stream", "scale", &stream, "4"], None);
    assert!(ok(&["stream", "describe", &stream], None).contains("4 open shards"));
    ok(&["stream", "retention", &stream, "48"], None);
    assert!(ok(&["stream", "describe", &stream], None).contains("retention 48 h"));

    // A lease table with one owned lease.
    let table = format!("cli-leases-{}", rand::random::<u32>());
    let client = AwsConfig::emulator(endpoint("SHARDFLOW_DYNAMODB_ENDPOINT"))
        .dynamodb_client()
        .await;
    let store = DynamoLeaseStore::open(client, &table).await.unwrap();
    store
        .create_if_absent(&Lease::new("shardId-000000000001", vec![]))
        .await
        .unwrap();
    let take = LeaseUpdate::Take {
        owner: "worker-a".into(),
    };
    store
        .update("shardId-000000000001", 0, &take)
        .await
        .unwrap();
    // The tombstone a move to stream-qualified keys leaves: listed, never reset.
    let moved = shardflow::core::protocol::lease_keys::MOVED_OWNER;
    store
        .create_if_absent(&Lease::new("shardId-000000000009", vec![]))
        .await
        .unwrap();
    let bury = LeaseUpdate::Take {
        owner: moved.into(),
    };
    store
        .update("shardId-000000000009", 0, &bury)
        .await
        .unwrap();
    let end = LeaseUpdate::Checkpoint {
        owner: moved.into(),
        checkpoint: shardflow::core::lease::ShardCheckpoint::shard_end(),
    };
    store.update("shardId-000000000009", 1, &end).await.unwrap();
    let listed = ok(&["leases", "list", &table, "--stream", &stream], None);
    let row = listed
        .lines()
        .find(|l| l.starts_with("shardId-000000000001"))
        .expect("the lease's row");
    let cells: Vec<&str> = row.split('\t').collect();
    assert_eq!(cells[1..4], ["worker-a", "1", "INITIAL"], "{listed}");
    assert!(cells[4].parse::<i64>().is_ok(), "a lag in ms: {row}");

    // Reset: refused while owned, a dry run changes nothing, then TRIM_HORIZON.
    let checkpoint = LeaseUpdate::Checkpoint {
        owner: "worker-a".into(),
        checkpoint: shardflow::core::lease::ShardCheckpoint::shard_end(),
    };
    store
        .update("shardId-000000000001", 1, &checkpoint)
        .await
        .unwrap();
    let refused = shardflow(&["leases", "reset", &table, "--to", "trim-horizon"], None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("owned by worker-a"),
        "names the owned lease"
    );
    let release = LeaseUpdate::Release {
        owner: "worker-a".into(),
    };
    store
        .update("shardId-000000000001", 2, &release)
        .await
        .unwrap();
    let dry = ok(
        &[
            "leases",
            "reset",
            &table,
            "--to",
            "trim-horizon",
            "--dry-run",
        ],
        None,
    );
    assert!(
        dry.contains("SHARD_END -> TRIM_HORIZON\t(dry run)"),
        "{dry}"
    );
    let lease = store.get("shardId-000000000001").await.unwrap().unwrap();
    assert!(lease.checkpoint.is_shard_end(), "a dry run writes nothing");
    ok(&["leases", "reset", &table, "--to", "trim-horizon"], None);
    let lease = store.get("shardId-000000000001").await.unwrap().unwrap();
    assert_eq!(
        lease.checkpoint,
        shardflow::core::lease::ShardCheckpoint::trim_horizon()
    );
    // To a time: shown, then written as an AT_TIMESTAMP checkpoint.
    let time = "2026-11-26T08:00:00.250Z";
    let dry = ok(
        &["leases", "reset", &table, "--to", time, "--dry-run"],
        None,
    );
    assert!(
        dry.contains("TRIM_HORIZON -> AT_TIMESTAMP 2026-11-26T08:00:00.250Z\t(dry run)"),
        "{dry}"
    );
    ok(&["leases", "reset", &table, "--to", time], None);
    let lease = store.get("shardId-000000000001").await.unwrap().unwrap();
    assert_eq!(
        lease.checkpoint,
        shardflow::core::lease::ShardCheckpoint::at_timestamp(1_795_680_000_250)
    );
    let tombstone = store.get("shardId-000000000009").await.unwrap().unwrap();
    assert!(
        shardflow::core::protocol::lease_keys::is_tombstone(&tombstone),
        "resets leave tombstones alone: {tombstone:?}"
    );
    let listed = ok(&["leases", "list", &table, "--stream", &stream], None);
    assert!(
        listed.contains("AT_TIMESTAMP 2026-11-26T08:00:00.250Z"),
        "{listed}"
    );
    let bad = shardflow(&["leases", "reset", &table, "--to", "last tuesday"], None);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("takes trim-horizon or an RFC 3339 time"),
        "names what --to takes"
    );

    let cost = ok(
        &[
            "cost",
            "--events-per-second",
            "5000",
            "--event-bytes",
            "200",
        ],
        None,
    );
    assert!(cost.contains("without aggregation: 5 shards"), "{cost}");

    let bad = shardflow(&["tail", &stream, "--from", "yesterday"], None);
    assert!(!bad.status.success());
    let message = String::from_utf8_lossy(&bad.stderr);
    assert!(
        message.contains("trim-horizon, latest or an RFC 3339 time"),
        "{message}"
    );
}

//! `shardflow::run_with`: a worker configured from flags runs a topology on the local backend,
//! serves its endpoint, and on shutdown drains, checkpoints and releases its leases.

use std::time::Duration;

use clap::Parser as _;
use shardflow::local::{LocalDirSink, LocalProducer, LocalSource, LocalStream, LocalStreamConfig};
use shardflow::prelude::*;
use shardflow::run::{run_with, Flags, Settings};
use shardflow::LeaseStore as _;

/// Creates the local stream `name` under `dir/stream` holding the numbers `0..count` as JSON.
async fn local_stream_holding(dir: &std::path::Path, name: &str, shards: u32, count: u32) {
    let stream =
        LocalStream::create(dir.join("stream"), name, shards, LocalStreamConfig::new()).unwrap();
    let producer = LocalProducer::new(stream);
    for i in 0..count {
        producer
            .put(&format!("k{i}"), i.to_string().into_bytes())
            .await
            .unwrap();
    }
}

/// Waits (polling, up to 10 s) until topology `copy` wrote `n` outputs to `out`.
async fn wait_for_outputs(out: &std::path::Path, n: usize) {
    let sink = LocalDirSink::new(out);
    let count = || async {
        sink.read_topology::<u32>("copy")
            .await
            .map_or(0, |m| m.len())
    };
    for _ in 0..500 {
        if count().await == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count().await, n);
}

/// Stops a running worker and asserts its run ended cleanly within 10 s.
async fn stop(
    run: tokio::task::JoinHandle<anyhow::Result<shardflow::RunReport>>,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("stops within 10 s")
        .unwrap()
        .expect("a clean run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_from_flags_processes_and_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    local_stream_holding(dir.path(), "events", 2, 100).await;
    let local_dir = dir.path().display().to_string();
    let flags = Flags::try_parse_from([
        "worker",
        "--stream",
        "events",
        "--local-dir",
        &local_dir,
        "--worker-id",
        "runner-test",
        "--checkpoint-interval",
        "50ms",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    let settings = Settings::resolve(flags).unwrap();
    let out = dir.path().join("out");
    let sink_dir = out.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(run_with(
        settings,
        move |cx| async move {
            let stream = cx.local_stream().await?;
            Ok(Topology::builder("copy")
                .source(LocalSource::new(&stream).json::<u32>())
                .sink(LocalDirSink::new(&sink_dir))
                .build()?)
        },
        Some(shutdown.clone()),
    ));
    wait_for_outputs(&out, 100).await;
    stop(run, &shutdown).await;
    let leases = shardflow::local::FileLeaseStore::new(dir.path().join("leases").join("copy"));
    let all = leases.list().await.unwrap();
    assert_eq!(all.len(), 2);
    for lease in all {
        assert_eq!(lease.owner, None, "{} released", lease.key);
        assert_ne!(
            lease.checkpoint.committed,
            shardflow::core::lease::CheckpointPosition::Initial,
            "{} checkpointed",
            lease.key
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_with_until_caught_up_processes_what_the_stream_holds_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    local_stream_holding(dir.path(), "backlog", 3, 300).await;
    let local_dir = dir.path().display().to_string();
    let flags = Flags::try_parse_from([
        "worker",
        "--stream",
        "backlog",
        "--local-dir",
        &local_dir,
        "--until-caught-up",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    let settings = Settings::resolve(flags).unwrap();
    let out = dir.path().join("out");
    let sink_dir = out.clone();
    // No shutdown token: the run ends by itself.
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        run_with(
            settings,
            move |cx| async move {
                let stream = cx.local_stream().await?;
                Ok(Topology::builder("backfill")
                    .source(LocalSource::new(&stream).json::<u32>())
                    .sink(LocalDirSink::new(&sink_dir))
                    .build()?)
            },
            Some(tokio_util::sync::CancellationToken::new()),
        ),
    )
    .await
    .expect("a bounded run ends by itself")
    .expect("a clean run");
    let mut got: Vec<u32> = LocalDirSink::new(&out)
        .read_topology::<u32>("backfill")
        .await
        .unwrap()
        .into_values()
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..300).collect::<Vec<_>>(), "every record, once");
    assert!(
        report.shards_ended.is_empty(),
        "open shards are read to their tip, not ended"
    );
}

/// Issue 13: a worker started before its local stream existed exited with an error. It now
/// waits for the stream, and processes it once it is created; a backfill of a missing stream
/// still fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_local_stream_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().display().to_string();
    let flags = |extra: &[&str]| {
        let mut args = vec![
            "worker",
            "--stream",
            "later",
            "--local-dir",
            &local_dir,
            "--checkpoint-interval",
            "50ms",
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Settings::resolve(Flags::try_parse_from(args).unwrap()).unwrap()
    };
    let out = dir.path().join("out");
    let build = |out: std::path::PathBuf| {
        move |cx: shardflow::run::RunContext| async move {
            let stream = cx.local_stream().await?;
            Ok(Topology::builder("copy")
                .source(LocalSource::new(&stream).json::<u32>())
                .sink(LocalDirSink::new(&out))
                .build()?)
        }
    };
    let error = run_with(flags(&["--until-caught-up"]), build(out.clone()), None)
        .await
        .expect_err("a backfill of a missing stream fails");
    assert!(format!("{error:#}").contains("later"), "{error:#}");

    // A stop while it waits ends the wait (SIGTERM works before the stream exists).
    let stopped = tokio_util::sync::CancellationToken::new();
    let waiting = tokio::spawn(run_with(
        flags(&[]),
        build(out.clone()),
        Some(stopped.clone()),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "waiting for the stream");
    stopped.cancel();
    let error = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a stop ends the wait")
        .unwrap()
        .expect_err("stopped before it ran");
    assert!(
        format!("{error:#}").contains("stopped while waiting"),
        "{error:#}"
    );

    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(run_with(
        flags(&[]),
        build(out.clone()),
        Some(shutdown.clone()),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!run.is_finished(), "waiting for the stream");
    local_stream_holding(dir.path(), "later", 1, 10).await;
    wait_for_outputs(&out, 10).await;
    stop(run, &shutdown).await;
}

#[derive(Debug, clap::Args)]
struct AppFlags {
    /// Where the application writes its results.
    #[arg(long, default_value = "results")]
    out_dir: std::path::PathBuf,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AppSettings {
    min_value: u32,
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    use std::io::Write as _;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

/// Issue 13: `shardflow::run` rejected the application's own flags (`--out-dir` was
/// "unexpected") and had no place for its settings. With `run_app` the application's flags
/// share the worker's command line and `--help`, its settings come from the config file's
/// `[app]` table, and both reach the topology's builder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_gets_its_own_flags_and_config_table() {
    let dir = tempfile::tempdir().unwrap();
    local_stream_holding(dir.path(), "events", 1, 10).await;
    let config =
        config_file("stream = \"events\"\ncommit_interval = \"20ms\"\n[app]\nmin_value = 4\n");
    let out = dir.path().join("app-out");
    let (local_dir, out_arg) = (dir.path().display().to_string(), out.display().to_string());
    let (settings, flags): (Settings, AppFlags) = shardflow::run::parse_app_args([
        "worker",
        "--config",
        config.path().to_str().unwrap(),
        "--local-dir",
        &local_dir,
        "--out-dir",
        &out_arg,
        "--until-caught-up",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    assert_eq!(settings.runtime.commit_interval, Duration::from_millis(20));
    let app_settings: AppSettings = settings.app_settings().unwrap();
    shardflow::run::run_app_with(
        settings,
        flags,
        app_settings,
        |cx: shardflow::run::RunContext<AppFlags, AppSettings>| async move {
            let stream = cx.local_stream().await?;
            let min = cx.app_settings().min_value;
            Ok(Topology::builder("copy")
                .source(LocalSource::new(&stream).json::<u32>())
                .filter(move |v: &u32| *v >= min)
                .sink(LocalDirSink::new(&cx.app_flags().out_dir))
                .build()?)
        },
        None,
    )
    .await
    .unwrap();
    let written = LocalDirSink::new(&out)
        .read_topology::<u32>("copy")
        .await
        .unwrap();
    let mut values: Vec<u32> = written.into_values().collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (4..10).collect::<Vec<_>>(),
        "the [app] table's bound, into --out-dir"
    );
}

/// Issue 13: `--help` showed no defaults, and runtime settings such as `commit_interval`,
/// `idle_wait` and the read limits were unreachable from flags, environment or file.
#[test]
fn help_shows_defaults_and_every_runtime_setting_is_a_flag_and_a_file_key() {
    let help = shardflow::run::command::<AppFlags>()
        .render_long_help()
        .to_string();
    for expected in [
        "--commit-interval",
        "--idle-wait",
        "--read-max-records",
        "--read-max-bytes",
        "[default: 10s]",
        "[default: 100ms]",
        "--out-dir",
        "[default: results]",
        "SHARDFLOW_COMMIT_INTERVAL",
    ] {
        assert!(help.contains(expected), "{expected} missing from:\n{help}");
    }
    let config = config_file(
        "stream = \"s\"\nidle_wait = \"50ms\"\nread_max_records = 500\nread_max_bytes = 65536\n",
    );
    let (settings, _): (Settings, shardflow::run::NoFlags) =
        shardflow::run::parse_app_args(["worker", "--config", config.path().to_str().unwrap()])
            .unwrap();
    assert_eq!(settings.runtime.idle_wait, Duration::from_millis(50));
    assert_eq!(settings.runtime.read_limits.max_records, 500);
    assert_eq!(settings.runtime.read_limits.max_bytes, 65_536);
    let bad = config_file("stream = \"s\"\nread_max_records = 20000\n");
    let error = shardflow::run::parse_app_args::<shardflow::run::NoFlags, _, _>([
        "worker",
        "--config",
        bad.path().to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        error.to_string().contains("read_limits.max_records"),
        "{error}"
    );
}

/// An `[app]` table that does not fit the application's settings is a named error; one given
/// to an application without settings (`shardflow::run`) too.
#[test]
fn a_bad_app_table_is_a_named_error() {
    let secret = config_file("stream = \"s\"\n[app]\nmin_value = \"hunter2-secret\"\n");
    let (settings, _): (Settings, shardflow::run::NoFlags) =
        shardflow::run::parse_app_args(["worker", "--config", secret.path().to_str().unwrap()])
            .unwrap();
    let error = settings
        .app_settings::<AppSettings>()
        .unwrap_err()
        .to_string();
    assert!(
        !error.contains("hunter2") && error.contains("expected u32"),
        "the refused value is never quoted: {error}"
    );
    let config = config_file("stream = \"s\"\n[app]\nmin_valu = 4\n");
    let (settings, _): (Settings, shardflow::run::NoFlags) =
        shardflow::run::parse_app_args(["worker", "--config", config.path().to_str().unwrap()])
            .unwrap();
    let error = settings.app_settings::<AppSettings>().unwrap_err();
    assert!(
        error.to_string().contains("`app`") && error.to_string().contains("min_valu"),
        "{error}"
    );
    assert!(settings
        .app_settings::<shardflow::run::NoSettings>()
        .is_err());
}

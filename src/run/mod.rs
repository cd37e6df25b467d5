//! `shardflow::run`: the worker's `main`. Reads its settings (flags, `SHARDFLOW_*` environment,
//! a TOML file), sets up logs, builds the topology with the settings' clients, picks the lease
//! store (a directory on the local backend, DynamoDB on AWS), serves `/metrics`, `/healthz` and `/readyz`,
//! and runs until SIGTERM or SIGINT (drain, checkpoint, release leases; a second signal exits),
//! or with `--until-caught-up` until it processed what the stream holds (a backfill, with a
//! progress line on a terminal).
//!
//! ```no_run
//! use shardflow::prelude::*;
//! use shardflow::local::{LocalDirSink, LocalSource};
//!
//! fn main() -> std::process::ExitCode {
//!     shardflow::run(|cx| async move {
//!         let stream = cx.local_stream().await?;
//!         Ok(Topology::builder("copy")
//!             .source(LocalSource::new(&stream).raw())
//!             .sink(LocalDirSink::new("out/"))
//!             .build()?)
//!     })
//! }
//! ```

mod progress;
mod settings;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use prometheus::Registry;
use shardflow_connectors::local::{FileLeaseStore, LocalStream, LocalStreamError};
use shardflow_core::lease::LeaseStore;
use shardflow_core::runtime::metrics::Metrics;
use shardflow_core::runtime::{Health, RunMode, RunReport, Runtime};
use shardflow_core::topology::Topology;
use tokio_util::sync::CancellationToken;

pub use settings::{Backend, Flags, LogFormat, Settings, SettingsError};

/// How often a worker waiting for its local stream looks for it.
const STREAM_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// How often a worker waiting for its local stream says so.
pub const STREAM_WAIT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What the topology's builder gets: the settings, the metrics registry the endpoint serves,
/// clients made from them, and the application's own flags (`A`) and settings (`C`, the
/// config file's `[app]` table) when it runs with [`run_app`].
pub struct RunContext<A = NoFlags, C = NoSettings> {
    settings: Settings,
    registry: Registry,
    app_flags: A,
    app_settings: C,
    /// Cancelled by SIGTERM (or the embedder): ends a wait for the local stream.
    shutdown: CancellationToken,
}

/// An application without flags of its own ([`run`]).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NoFlags {}

/// An application without settings of its own ([`run`]): an `[app]` table in the config file
/// is then an error, not ignored.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

/// The worker's flags and the application's, in one command line and one `--help`.
#[derive(Debug, clap::Parser)]
#[command(about = "A shardflow worker", long_about = None)]
struct Cli<A: clap::Args> {
    #[command(flatten)]
    worker: Flags,
    #[command(flatten)]
    app: A,
}

impl<A, C> RunContext<A, C> {
    /// The application's own flags (each may also read an environment variable of its own).
    pub fn app_flags(&self) -> &A {
        &self.app_flags
    }

    /// The application's own settings: the config file's `[app]` table (its type's default
    /// when there is none).
    pub fn app_settings(&self) -> &C {
        &self.app_settings
    }

    /// The resolved settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The registry `/metrics` serves: register a source's or sink's metrics here.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The local backend's stream named by the settings, under `local_dir/stream`. A worker
    /// started before its stream was created waits for it, with a log line every
    /// [`STREAM_WAIT_LOG_EVERY`] (`/metrics` answers meanwhile; `/healthz` and `/readyz` answer
    /// 503 until the run starts); a bounded run (`--until-caught-up`) fails at once instead.
    ///
    /// # Errors
    /// The stream cannot be opened, or does not exist and the run is bounded, or the worker
    /// was stopped while it waited.
    pub async fn local_stream(&self) -> anyhow::Result<LocalStream> {
        let dir = self.settings.local_dir.join("stream");
        let name = &self.settings.stream;
        let waits = self.settings.runtime.mode == RunMode::Continuous;
        let mut last_log: Option<std::time::Instant> = None;
        loop {
            match LocalStream::open(&dir, name) {
                Err(LocalStreamError::StreamNotFound { .. }) if waits => {
                    if last_log.is_none_or(|at| at.elapsed() >= STREAM_WAIT_LOG_EVERY) {
                        tracing::warn!(stream = %name, dir = %dir.display(), "the local stream does not exist yet: waiting for it to be created");
                        last_log = Some(std::time::Instant::now());
                    }
                    tokio::select! {
                        () = tokio::time::sleep(STREAM_POLL) => {}
                        () = self.shutdown.cancelled() => {
                            anyhow::bail!("stopped while waiting for local stream {name}")
                        }
                    }
                }
                opened => {
                    return opened.with_context(|| {
                        format!("opening local stream {name} in {}", dir.display())
                    })
                }
            }
        }
    }

    #[cfg(any(feature = "kinesis", feature = "dynamodb", feature = "s3"))]
    fn aws(&self, endpoint: Option<&String>) -> crate::AwsConfig {
        let mut config = crate::AwsConfig::new();
        if let Some(region) = &self.settings.region {
            config = config.region(region.clone());
        }
        if let Some(endpoint) = endpoint {
            config = config.endpoint(endpoint.clone());
        }
        config
    }

    /// A Kinesis client for the settings' region and endpoint.
    #[cfg(feature = "kinesis")]
    pub async fn kinesis_client(&self) -> aws_sdk_kinesis::Client {
        self.aws(self.settings.kinesis_endpoint.as_ref())
            .kinesis_client()
            .await
    }

    /// A DynamoDB client for the settings' region and endpoint.
    #[cfg(feature = "dynamodb")]
    pub async fn dynamodb_client(&self) -> aws_sdk_dynamodb::Client {
        self.aws(self.settings.dynamodb_endpoint.as_ref())
            .dynamodb_client()
            .await
    }

    /// An S3 client for the settings' region and endpoint (path-style with an endpoint).
    #[cfg(feature = "s3")]
    pub async fn s3_client(&self) -> aws_sdk_s3::Client {
        self.aws(self.settings.s3_endpoint.as_ref())
            .path_style(self.settings.s3_endpoint.is_some())
            .s3_client()
            .await
    }
}

/// Runs a worker: settings from the command line, environment and config file; `build` makes
/// the topology. Exit status 2 for bad settings, 1 for a failed run, 0 after a graceful stop.
pub fn run<F, Fut>(build: F) -> ExitCode
where
    F: FnOnce(RunContext) -> Fut,
    Fut: Future<Output = anyhow::Result<Topology>>,
{
    run_app::<NoFlags, NoSettings, _, _>(build)
}

/// The worker's command line with the application's flags `A`, as [`run_app`] parses it: for
/// `--help` text, completions or tests.
pub fn command<A: clap::Args>() -> clap::Command {
    <Cli<A> as clap::CommandFactory>::command()
}

/// Parses `args` (the program name first) as [`run_app`] does: the worker's settings resolved
/// (flags over environment over the config file over defaults) and the application's flags.
///
/// # Errors
/// A bad command line (clap's error, which also carries `--help`) or a bad setting.
pub fn parse_app_args<A, I, T>(args: I) -> anyhow::Result<(Settings, A)>
where
    A: clap::Args,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = <Cli<A> as clap::Parser>::try_parse_from(args)?;
    Ok((Settings::resolve(cli.worker)?, cli.app))
}

/// [`run`] for an application with flags of its own (`A`, a `clap::Args`, shown in the same
/// `--help` as the worker's) and settings of its own (`C`, read from the config file's `[app]`
/// table, its `Default` without one). Both reach `build` through the [`RunContext`].
///
/// ```no_run
/// use shardflow::local::{LocalDirSink, LocalSource};
/// use shardflow::prelude::*;
///
/// #[derive(clap::Args)]
/// struct AppFlags {
///     /// Where the results go.
///     #[arg(long, env = "APP_OUT_DIR", default_value = "out")]
///     out_dir: std::path::PathBuf,
/// }
///
/// #[derive(Default, serde::Deserialize)]
/// #[serde(default, deny_unknown_fields)]
/// struct AppSettings {
///     min_bytes: usize,
/// }
///
/// fn main() -> std::process::ExitCode {
///     shardflow::run_app(|cx: shardflow::run::RunContext<AppFlags, AppSettings>| async move {
///         let stream = cx.local_stream().await?;
///         let min = cx.app_settings().min_bytes;
///         Ok(Topology::builder("copy")
///             .source(LocalSource::new(&stream).raw())
///             .filter(move |r: &Vec<u8>| r.len() >= min)
///             .sink(LocalDirSink::new(&cx.app_flags().out_dir))
///             .build()?)
///     })
/// }
/// ```
pub fn run_app<A, C, F, Fut>(build: F) -> ExitCode
where
    A: clap::Args,
    C: serde::de::DeserializeOwned + Default,
    F: FnOnce(RunContext<A, C>) -> Fut,
    Fut: Future<Output = anyhow::Result<Topology>>,
{
    let cli = <Cli<A> as clap::Parser>::parse();
    let settings = match Settings::resolve(cli.worker) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("shardflow: {error}");
            return ExitCode::from(2);
        }
    };
    let app_settings = match settings.app_settings::<C>() {
        Ok(app) => app,
        Err(error) => {
            eprintln!("shardflow: {error}");
            return ExitCode::from(2);
        }
    };
    init_logs(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("shardflow: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_app_with(settings, cli.app, app_settings, build, None)) {
        Ok(report) => {
            tracing::info!(ended = report.shards_ended.len(), "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "worker failed");
            ExitCode::FAILURE
        }
    }
}

/// The AWS SDK's and its HTTP stack's log targets. Their DEBUG and TRACE events carry request
/// and response contents: bodies and decoded outputs (records' payloads and partition keys,
/// items' values), endpoint parameters and canonical requests (S3 object keys, which hold
/// output keys). They are capped at INFO whatever `RUST_LOG` says, unless
/// `SHARDFLOW_LOG_WIRE_BODIES=1` asks for them (payloads and keys then reach the logs).
pub const WIRE_TARGETS: [&str; 13] = [
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
    "aws_smithy_types",
    "aws_sigv4",
    "aws_runtime",
    "aws_config",
    "aws_sdk_kinesis",
    "aws_sdk_dynamodb",
    "aws_sdk_s3",
    "hyper",
    "hyper_util",
    "h2",
];

/// The worker's log filter: `directives` (`RUST_LOG`'s syntax; `info` when empty), and, unless
/// `wire_bodies`, a second filter no directive can override that keeps `WIRE_TARGETS` at INFO.
pub fn log_filter<S>(
    directives: &str,
    wire_bodies: bool,
) -> impl tracing_subscriber::layer::Filter<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::{FilterExt as _, LevelFilter, Targets};
    let directives = if directives.trim().is_empty() {
        "info"
    } else {
        directives
    };
    let env = tracing_subscriber::EnvFilter::try_new(directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let cap = if wire_bodies {
        LevelFilter::TRACE
    } else {
        LevelFilter::INFO
    };
    let caps = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(WIRE_TARGETS.map(|t| (t, cap)));
    env.and(caps)
}

/// Human-readable or JSON logs to stderr; `RUST_LOG` filters (default `info`), without the
/// SDK's wire-level events (`log_filter`).
fn init_logs(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(
        &std::env::var("RUST_LOG").unwrap_or_default(),
        std::env::var("SHARDFLOW_LOG_WIRE_BODIES").is_ok_and(|v| v == "1"),
    );
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second initialisation (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .try_init(),
    };
}

/// [`run`] with resolved settings, inside a tokio runtime; `shutdown` replaces the signal
/// handlers (for tests and embedding).
///
/// # Errors
/// Building the topology, opening the lease store or the endpoint, or the run failed.
pub async fn run_with<F, Fut>(
    settings: Settings,
    build: F,
    shutdown: Option<CancellationToken>,
) -> anyhow::Result<RunReport>
where
    F: FnOnce(RunContext) -> Fut,
    Fut: Future<Output = anyhow::Result<Topology>>,
{
    run_app_with(settings, NoFlags {}, NoSettings {}, build, shutdown).await
}

/// [`run_app`] with resolved settings and the application's flags and settings, inside a
/// tokio runtime; `shutdown` replaces the signal handlers (for tests and embedding).
///
/// # Errors
/// Building the topology, opening the lease store or the endpoint, or the run failed.
pub async fn run_app_with<A, C, F, Fut>(
    settings: Settings,
    app_flags: A,
    app_settings: C,
    build: F,
    shutdown: Option<CancellationToken>,
) -> anyhow::Result<RunReport>
where
    F: FnOnce(RunContext<A, C>) -> Fut,
    Fut: Future<Output = anyhow::Result<Topology>>,
{
    let registry = Registry::new();
    // The endpoint and the signal handlers come first: building may wait for a local stream,
    // and a worker waiting must answer /metrics and stop on SIGTERM.
    let health = Health::new();
    let ops = crate::ops::serve(settings.metrics_addr, registry.clone(), health.clone())
        .await
        .with_context(|| format!("binding the metrics endpoint {}", settings.metrics_addr))?;
    let shutdown = match shutdown {
        Some(token) => token,
        None => crate::ops::shutdown_on_signals().context("installing signal handlers")?,
    };
    let cx = RunContext {
        settings: settings.clone(),
        registry: registry.clone(),
        app_flags,
        app_settings,
        shutdown: shutdown.clone(),
    };
    let topology = build(cx).await.context("building the topology")?;
    let leases: Arc<dyn LeaseStore> = match settings.backend {
        Backend::Local => Arc::new(FileLeaseStore::new(
            settings.local_dir.join("leases").join(topology.name()),
        )),
        Backend::Aws => aws_leases(&settings, topology.name()).await?,
    };
    tracing::info!(
        topology = topology.name(),
        worker = settings.runtime.worker_id,
        endpoint = %ops.local_addr(),
        "starting"
    );
    let bounded = settings.runtime.mode == RunMode::UntilCaughtUp;
    let metrics = Metrics::new(&registry);
    let progress = bounded.then(|| progress::Progress::start(registry));
    let report = Runtime::new(topology, leases)
        .with_config(settings.runtime)
        .with_metrics(metrics)
        .with_health(health)
        .with_shutdown(shutdown)
        .run()
        .await;
    if let Some(progress) = progress {
        progress.finish();
    }
    Ok(report?)
}

#[cfg(feature = "dynamodb")]
async fn aws_leases(settings: &Settings, topology: &str) -> anyhow::Result<Arc<dyn LeaseStore>> {
    use shardflow_connectors::dynamodb::DynamoLeaseStore;
    let mut config = crate::AwsConfig::new();
    if let Some(region) = &settings.region {
        config = config.region(region.clone());
    }
    if let Some(endpoint) = &settings.dynamodb_endpoint {
        config = config.endpoint(endpoint.clone());
    }
    let table = settings
        .lease_table
        .clone()
        .unwrap_or_else(|| DynamoLeaseStore::default_table_name(topology));
    let store = DynamoLeaseStore::open(config.dynamodb_client().await, &table)
        .await
        .with_context(|| format!("opening the lease table {table}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "dynamodb"))]
async fn aws_leases(_settings: &Settings, _topology: &str) -> anyhow::Result<Arc<dyn LeaseStore>> {
    anyhow::bail!("backend `aws` keeps leases in DynamoDB: build with the `dynamodb` feature")
}

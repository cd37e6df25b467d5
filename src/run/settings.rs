//! A worker's settings from command-line flags, environment variables (`SHARDFLOW_*`) and a
//! TOML file, in that order of precedence over the defaults. A bad value fails at startup with
//! a message naming the field and what it accepts. No secrets live here: AWS credentials come
//! from the default chain (environment, profile, instance role).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use shardflow_core::redact::{without_user_info, without_values};
use shardflow_core::runtime::{RunMode, RuntimeConfig, SinkBackoff};
use shardflow_core::source::ReadLimits;

/// Where the stream, leases and AWS clients come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded, file-backed backend under `local_dir`.
    Local,
    /// Kinesis and DynamoDB (and S3 for sinks) through the AWS SDK.
    Aws,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Command-line flags; each also reads `SHARDFLOW_<NAME>` from the environment.
#[derive(Debug, Default, Parser)]
#[command(about = "A shardflow worker", long_about = None)]
pub struct Flags {
    /// A TOML file with any of the settings below, snake_case (flags and environment win), and
    /// the application's own settings under an `[app]` table.
    #[arg(long, env = "SHARDFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// local or aws [default: local].
    #[arg(long, env = "SHARDFLOW_BACKEND")]
    pub backend: Option<Backend>,
    /// AWS region (default: from the AWS default chain).
    #[arg(long, env = "SHARDFLOW_REGION")]
    pub region: Option<String>,
    /// Kinesis endpoint override (an emulator, a VPC endpoint).
    #[arg(long, env = "SHARDFLOW_KINESIS_ENDPOINT")]
    pub kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint override.
    #[arg(long, env = "SHARDFLOW_DYNAMODB_ENDPOINT")]
    pub dynamodb_endpoint: Option<String>,
    /// S3 endpoint override.
    #[arg(long, env = "SHARDFLOW_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// The stream to read.
    #[arg(long, env = "SHARDFLOW_STREAM")]
    pub stream: Option<String>,
    /// The lease table (default: `shardflow-leases-<topology>`).
    #[arg(long, env = "SHARDFLOW_LEASE_TABLE")]
    pub lease_table: Option<String>,
    /// Directory of the local backend (stream, leases) [default: shardflow-data].
    #[arg(long, env = "SHARDFLOW_LOCAL_DIR")]
    pub local_dir: Option<PathBuf>,
    /// This worker's id in the lease table [default: host name, process id and a random
    /// suffix, unique per process]. Never give two live processes one id.
    #[arg(long, env = "SHARDFLOW_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Keyed workers per keyed branch [default: the number of cores].
    #[arg(long, env = "SHARDFLOW_PARALLELISM")]
    pub parallelism: Option<usize>,
    /// Epochs in flight per keyed worker (bounds memory) [default: 4].
    #[arg(long, env = "SHARDFLOW_CHANNEL_CAPACITY")]
    pub channel_capacity: Option<usize>,
    /// A lease not renewed for this long may be taken by another worker [default: 10s].
    #[arg(long, env = "SHARDFLOW_LEASE_DURATION", value_parser = parse_duration)]
    pub lease_duration: Option<Duration>,
    /// How often checkpoints are written [default: 1s].
    #[arg(long, env = "SHARDFLOW_CHECKPOINT_INTERVAL", value_parser = parse_duration)]
    pub checkpoint_interval: Option<Duration>,
    /// How often the shard list is read again and leases balanced [default: 10s].
    #[arg(long, env = "SHARDFLOW_SHARD_SYNC_INTERVAL", value_parser = parse_duration)]
    pub shard_sync_interval: Option<Duration>,
    /// Leases asked of a busier worker per sync round at most (handed over, never stolen)
    /// [default: 1].
    #[arg(long, env = "SHARDFLOW_MAX_LEASES_TO_STEAL")]
    pub max_leases_to_steal: Option<usize>,
    /// How long a keyed worker gathers epochs before it commits its sinks [default: 100ms].
    #[arg(long, env = "SHARDFLOW_COMMIT_INTERVAL", value_parser = parse_duration)]
    pub commit_interval: Option<Duration>,
    /// Wait after an empty read at the tip of a shard [default: 200ms].
    #[arg(long, env = "SHARDFLOW_IDLE_WAIT", value_parser = parse_duration)]
    pub idle_wait: Option<Duration>,
    /// Records per read at most, 1 to 10000 [default: 2000].
    #[arg(long, env = "SHARDFLOW_READ_MAX_RECORDS")]
    pub read_max_records: Option<usize>,
    /// Bytes per read at most [default: 4194304].
    #[arg(long, env = "SHARDFLOW_READ_MAX_BYTES")]
    pub read_max_bytes: Option<usize>,
    /// A shard whose sink fails after the sink's own retries starts again from its checkpoint
    /// after this pause, doubled with each failure in a row [default: 1s].
    #[arg(long, env = "SHARDFLOW_SINK_PAUSE", value_parser = parse_duration)]
    pub sink_pause: Option<Duration>,
    /// The longest such pause [default: 1m].
    #[arg(long, env = "SHARDFLOW_SINK_MAX_PAUSE", value_parser = parse_duration)]
    pub sink_max_pause: Option<Duration>,
    /// Sink failures in a row (the checkpoint not moving) before the shard is left to another
    /// worker (its lease is no longer renewed) [default: 8].
    #[arg(long, env = "SHARDFLOW_SINK_ATTEMPTS")]
    pub sink_attempts: Option<u32>,
    /// How long this worker then leaves the shard alone [default: 5m].
    #[arg(long, env = "SHARDFLOW_SINK_COOL_DOWN", value_parser = parse_duration)]
    pub sink_cool_down: Option<Duration>,
    /// Address of `/metrics`, `/healthz` and `/readyz` [default: 127.0.0.1:9464].
    #[arg(long, env = "SHARDFLOW_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// human or json [default: human].
    #[arg(long, env = "SHARDFLOW_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Process what the stream holds now and exit (a backfill, say after `shardflow leases
    /// reset`), instead of running until a signal. Shows progress on a terminal.
    #[arg(long, env = "SHARDFLOW_UNTIL_CAUGHT_UP")]
    pub until_caught_up: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (write e.g. 250ms, 10s, 1m)"))
}

/// The TOML file: the same settings, snake_case, durations as strings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    backend: Option<Backend>,
    region: Option<String>,
    kinesis_endpoint: Option<String>,
    dynamodb_endpoint: Option<String>,
    s3_endpoint: Option<String>,
    stream: Option<String>,
    lease_table: Option<String>,
    local_dir: Option<PathBuf>,
    worker_id: Option<String>,
    parallelism: Option<usize>,
    channel_capacity: Option<usize>,
    lease_duration: Option<String>,
    checkpoint_interval: Option<String>,
    shard_sync_interval: Option<String>,
    max_leases_to_steal: Option<usize>,
    commit_interval: Option<String>,
    idle_wait: Option<String>,
    read_max_records: Option<usize>,
    sink_pause: Option<String>,
    sink_max_pause: Option<String>,
    sink_attempts: Option<u32>,
    sink_cool_down: Option<String>,
    read_max_bytes: Option<usize>,
    metrics_addr: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    until_caught_up: Option<bool>,
    /// The application's own settings (`shardflow::run_app`).
    app: Option<toml::Table>,
}

/// Resolved settings of a worker. Its `Debug` shows endpoints without user info and only the
/// keys of the `[app]` table (which may hold an application's secrets).
#[derive(Clone)]
pub struct Settings {
    /// Where the stream and leases live.
    pub backend: Backend,
    /// AWS region, if not from the default chain.
    pub region: Option<String>,
    /// Endpoint overrides.
    pub kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint override.
    pub dynamodb_endpoint: Option<String>,
    /// S3 endpoint override.
    pub s3_endpoint: Option<String>,
    /// The stream to read.
    pub stream: String,
    /// The lease table, if not derived from the topology's name.
    pub lease_table: Option<String>,
    /// The local backend's directory.
    pub local_dir: PathBuf,
    /// How the runtime runs.
    pub runtime: RuntimeConfig,
    /// Address of the operations endpoint.
    pub metrics_addr: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// The file's `[app]` table, for the application's own settings (`shardflow::run_app`).
    pub app: toml::Table,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoint = |e: &Option<String>| e.as_deref().map(without_user_info);
        f.debug_struct("Settings")
            .field("backend", &self.backend)
            .field("region", &self.region)
            .field("kinesis_endpoint", &endpoint(&self.kinesis_endpoint))
            .field("dynamodb_endpoint", &endpoint(&self.dynamodb_endpoint))
            .field("s3_endpoint", &endpoint(&self.s3_endpoint))
            .field("stream", &self.stream)
            .field("lease_table", &self.lease_table)
            .field("local_dir", &self.local_dir)
            .field("runtime", &self.runtime)
            .field("metrics_addr", &self.metrics_addr)
            .field("log_format", &self.log_format)
            .field("app_keys", &self.app.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A setting that cannot be used, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{field}`: {reason}")]
pub struct SettingsError {
    /// The setting.
    pub field: String,
    /// What is wrong and what it accepts.
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

impl Settings {
    /// Resolves `flags` (already merged with the environment by clap) over the TOML file they
    /// name, over the defaults, and validates the result.
    ///
    /// # Errors
    /// An unreadable or invalid file, or a bad value, named.
    pub fn resolve(flags: Flags) -> Result<Self, SettingsError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let duration =
            |flag: Option<Duration>, file: Option<&String>, field: &str| match (flag, file) {
                (Some(d), _) => Ok(Some(d)),
                (None, Some(text)) => parse_duration(text).map(Some).map_err(|e| bad(field, e)),
                (None, None) => Ok(None),
            };
        let defaults = RuntimeConfig::default();
        let backend = flags.backend.or(file.backend).unwrap_or(Backend::Local);
        let stream = flags.stream.or(file.stream).ok_or_else(|| {
            bad(
                "stream",
                "required: the stream to read (--stream or SHARDFLOW_STREAM)",
            )
        })?;
        if stream.is_empty() {
            return Err(bad("stream", "must not be empty"));
        }
        // Every field named (no `..defaults`): a runtime setting added later does not compile
        // here until it is a flag and a file key too.
        let runtime = RuntimeConfig {
            worker_id: flags
                .worker_id
                .or(file.worker_id)
                .unwrap_or(defaults.worker_id.clone()),
            parallelism: flags
                .parallelism
                .or(file.parallelism)
                .unwrap_or(defaults.parallelism),
            channel_capacity: flags
                .channel_capacity
                .or(file.channel_capacity)
                .unwrap_or(defaults.channel_capacity),
            lease_duration: duration(
                flags.lease_duration,
                file.lease_duration.as_ref(),
                "lease_duration",
            )?
            .unwrap_or(defaults.lease_duration),
            checkpoint_interval: duration(
                flags.checkpoint_interval,
                file.checkpoint_interval.as_ref(),
                "checkpoint_interval",
            )?
            .unwrap_or(defaults.checkpoint_interval),
            shard_sync_interval: duration(
                flags.shard_sync_interval,
                file.shard_sync_interval.as_ref(),
                "shard_sync_interval",
            )?
            .unwrap_or(defaults.shard_sync_interval),
            max_leases_to_steal: flags
                .max_leases_to_steal
                .or(file.max_leases_to_steal)
                .unwrap_or(defaults.max_leases_to_steal),
            commit_interval: duration(
                flags.commit_interval,
                file.commit_interval.as_ref(),
                "commit_interval",
            )?
            .unwrap_or(defaults.commit_interval),
            idle_wait: duration(flags.idle_wait, file.idle_wait.as_ref(), "idle_wait")?
                .unwrap_or(defaults.idle_wait),
            read_limits: ReadLimits {
                max_records: flags
                    .read_max_records
                    .or(file.read_max_records)
                    .unwrap_or(defaults.read_limits.max_records),
                max_bytes: flags
                    .read_max_bytes
                    .or(file.read_max_bytes)
                    .unwrap_or(defaults.read_limits.max_bytes),
            },
            sink_backoff: SinkBackoff {
                first_pause: duration(flags.sink_pause, file.sink_pause.as_ref(), "sink_pause")?
                    .unwrap_or(defaults.sink_backoff.first_pause),
                max_pause: duration(
                    flags.sink_max_pause,
                    file.sink_max_pause.as_ref(),
                    "sink_max_pause",
                )?
                .unwrap_or(defaults.sink_backoff.max_pause),
                attempts: flags
                    .sink_attempts
                    .or(file.sink_attempts)
                    .unwrap_or(defaults.sink_backoff.attempts),
                cool_down: duration(
                    flags.sink_cool_down,
                    file.sink_cool_down.as_ref(),
                    "sink_cool_down",
                )?
                .unwrap_or(defaults.sink_backoff.cool_down),
            },
            mode: if flags.until_caught_up || file.until_caught_up.unwrap_or(false) {
                RunMode::UntilCaughtUp
            } else {
                defaults.mode
            },
        };
        runtime.validate().map_err(|e| match e {
            shardflow_core::error::BuildError::InvalidConfig { field, reason } => {
                bad(field, reason)
            }
            other => bad("runtime", other.to_string()),
        })?;
        Ok(Self {
            backend,
            region: flags.region.or(file.region),
            kinesis_endpoint: flags.kinesis_endpoint.or(file.kinesis_endpoint),
            dynamodb_endpoint: flags.dynamodb_endpoint.or(file.dynamodb_endpoint),
            s3_endpoint: flags.s3_endpoint.or(file.s3_endpoint),
            stream,
            lease_table: flags.lease_table.or(file.lease_table),
            local_dir: flags
                .local_dir
                .or(file.local_dir)
                .unwrap_or_else(|| PathBuf::from("shardflow-data")),
            runtime,
            metrics_addr: flags
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9464))),
            log_format: flags
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Human),
            app: file.app.unwrap_or_default(),
        })
    }
}

impl Settings {
    /// The application's settings from the config file's `[app]` table, or `C::default()`
    /// without one.
    ///
    /// # Errors
    /// The table does not fit `C`, named as the setting `app`.
    pub fn app_settings<C: serde::de::DeserializeOwned + Default>(
        &self,
    ) -> Result<C, SettingsError> {
        if self.app.is_empty() {
            return Ok(C::default());
        }
        toml::Value::Table(self.app.clone())
            .try_into()
            .map_err(|e: toml::de::Error| bad("app", without_values(e.message())))
    }
}

fn read_file(path: &Path) -> Result<FileSettings, SettingsError> {
    let field = "config";
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(field, format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| bad(field, format!("{}: {}", path.display(), e.message())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["worker"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).expect("flags parse")
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write as _;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn debug_output_shows_no_endpoint_user_info_and_no_app_values() {
        let file = config_file("stream = \"s\"\n[app]\ntoken = \"t0ps3cret\"\n");
        let path = file.path().to_str().unwrap();
        // A flag, which wins over the environment (the test script sets the endpoints there).
        let endpoint = "--kinesis-endpoint=http://admin:hunter2@127.0.0.1:1";
        let settings = Settings::resolve(flags(&["--config", path, endpoint])).unwrap();
        let shown = format!("{settings:?}");
        for secret in ["hunter2", "admin", "t0ps3cret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("token") && shown.contains("127.0.0.1:1"),
            "{shown}"
        );
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let file = config_file(
            "backend = \"aws\"\nstream = \"from-file\"\nlease_duration = \"30s\"\nparallelism = 3\n",
        );
        let path = file.path().to_str().unwrap();
        let settings =
            Settings::resolve(flags(&["--config", path, "--stream", "from-flag"])).unwrap();
        assert_eq!(settings.backend, Backend::Aws);
        assert_eq!(settings.stream, "from-flag");
        assert_eq!(settings.runtime.lease_duration, Duration::from_secs(30));
        assert_eq!(settings.runtime.parallelism, 3);
        assert_eq!(
            settings.runtime.checkpoint_interval,
            Duration::from_secs(1),
            "default"
        );
        assert_eq!(
            settings.metrics_addr.to_string(),
            "127.0.0.1:9464",
            "loopback by default"
        );
        assert_eq!(settings.log_format, LogFormat::Human);
        assert_eq!(
            settings.runtime.mode,
            RunMode::Continuous,
            "runs until a signal"
        );
    }

    #[test]
    fn until_caught_up_comes_from_the_flag_or_the_file() {
        let bounded = Settings::resolve(flags(&["--stream", "s", "--until-caught-up"])).unwrap();
        assert_eq!(bounded.runtime.mode, RunMode::UntilCaughtUp);
        let file = config_file("stream = \"s\"\nuntil_caught_up = true\n");
        let path = file.path().to_str().unwrap();
        let from_file = Settings::resolve(flags(&["--config", path])).unwrap();
        assert_eq!(from_file.runtime.mode, RunMode::UntilCaughtUp);
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = |args: &[&str]| Settings::resolve(flags(args)).unwrap_err().field;
        assert_eq!(err(&[]), "stream");
        assert_eq!(err(&["--stream", "s", "--parallelism", "0"]), "parallelism");
        assert_eq!(
            err(&[
                "--stream",
                "s",
                "--lease-duration",
                "1s",
                "--checkpoint-interval",
                "1s"
            ]),
            "lease_duration"
        );
        let file = config_file("stream = \"s\"\ncheckpoint_interval = \"soon\"\n");
        let e = Settings::resolve(flags(&["--config", file.path().to_str().unwrap()])).unwrap_err();
        assert_eq!(e.field, "checkpoint_interval");
        assert!(e.reason.contains("10s"), "says what it accepts: {e}");
        let file = config_file("stream = \"s\"\nbackend = \"gcp\"\n");
        let e = Settings::resolve(flags(&["--config", file.path().to_str().unwrap()])).unwrap_err();
        assert!(
            e.reason.contains("local") && e.reason.contains("aws"),
            "{e}"
        );
        let file = config_file("stream = \"s\"\nleas_duration = \"10s\"\n");
        let e = Settings::resolve(flags(&["--config", file.path().to_str().unwrap()])).unwrap_err();
        assert!(e.reason.contains("leas_duration"), "a typo is named: {e}");
    }

    #[test]
    fn bad_flag_values_list_what_is_allowed() {
        let e = Flags::try_parse_from(["worker", "--backend", "gcp"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("local") && e.contains("aws"), "{e}");
        let e = Flags::try_parse_from(["worker", "--lease-duration", "ten"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease-duration") && e.contains("10s"), "{e}");
    }
}

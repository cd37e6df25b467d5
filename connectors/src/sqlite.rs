//! `SqliteSink`: outputs upserted by identity into one table of an embedded SQLite database, one
//! transaction per commit, fenced by lease epoch like `DynamoSink`.
//!
//! Each row is one output: the topology, source shard and identity path (the primary key), the
//! key and window as typed columns (an integer key stays an integer, up to `i64::MAX`; a larger
//! unsigned key is stored as text), the record position for outputs of records, the value as
//! JSON, and the lease epoch that wrote it. The writers of one sink share one connection, so a
//! process's commits queue for it instead of contending for SQLite's lock. A replay writes the same
//! rows again (no duplicates), and an upsert never lets an older lease epoch replace a row a
//! newer one wrote: such a commit is refused whole as [`Fenced`] and nothing of it lands.
//!
//! ```sql
//! SELECT key, window_start, json_extract(value, '$.clicks') FROM funnel ORDER BY 2, 1;
//! ```

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
/// The SQLite bindings the sink uses, to read its tables back with the same library.
pub use rusqlite;
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shardflow_core::error::{Fenced, SinkError};
use shardflow_core::lease::LeaseEpoch;
use shardflow_core::position::ShardId;
use shardflow_core::sink::{
    InspectSink, KeyValue, OutputBatch, OutputId, Sink, SinkContext, SinkWriter,
};

/// How long a commit waits for another connection's transaction (another process, or another
/// sink on the same file) before it fails as retryable, by default.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest table name accepted: SQLite has no limit, but a name is also a metric label.
const MAX_TABLE_NAME: usize = 64;

/// Why a [`SqliteSink`] operation failed (the source of a [`SinkError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteSinkError {
    /// SQLite refused or failed an operation.
    #[error("{operation} {path} failed: {source}")]
    Sqlite {
        /// What was being done.
        operation: &'static str,
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A value could not be written as JSON (a map with non-string keys, a failing `Serialize`).
    #[error("an output of shard {shard} cannot be encoded as JSON ({category:?} error)")]
    Encode {
        /// The output's source shard.
        shard: ShardId,
        /// What kind of error the encoder found (its message may quote the value).
        category: serde_json::error::Category,
    },
    /// A stored value does not parse as the sink's type (the parser's message, which may
    /// quote the value, is left out).
    #[error(
        "a stored output of shard {shard} does not hold the expected type ({category:?} error \
         at column {column})"
    )]
    Decode {
        /// The output's source shard.
        shard: ShardId,
        /// What kind of error the parser found.
        category: serde_json::error::Category,
        /// Where in the stored JSON.
        column: usize,
    },
    /// The table exists with other columns (made by another program, or an older version).
    #[error(
        "table {table} in {path} has columns {found} where this version writes {expected}: use \
         another table name, or move the old table away"
    )]
    Schema {
        /// The table.
        table: String,
        /// The database file.
        path: PathBuf,
        /// The columns found, as `name type pk`.
        found: String,
        /// The columns expected.
        expected: String,
    },
    /// A number does not fit SQLite's signed 64-bit integers.
    #[error("{what} {value} does not fit a signed 64-bit integer")]
    TooLarge {
        /// Which number.
        what: &'static str,
        /// The number.
        value: u64,
    },
    /// A table name SQL would need quoting for, or that is too long.
    #[error(
        "a table name of {len} bytes is not one SqliteSink accepts: ASCII letters, digits and _, \
         starting with a letter, at most {MAX_TABLE_NAME} bytes, not sqlite_*"
    )]
    TableName {
        /// The name's length in bytes (the name itself is not repeated).
        len: usize,
    },
    /// `InspectSink::committed` on a table several topologies write: read it with SQL, by
    /// topology.
    #[error("table {table} holds the outputs of {topologies} topologies: query it by topology")]
    SeveralTopologies {
        /// The table.
        table: String,
        /// How many topologies wrote it.
        topologies: i64,
    },
    /// The blocking task that runs SQLite's calls ended without an answer.
    #[error("the database task ended: {0}")]
    Task(String),
}

impl SqliteSinkError {
    fn sqlite(operation: &'static str, path: &Path, source: rusqlite::Error) -> Self {
        Self::Sqlite {
            operation,
            path: path.to_owned(),
            source,
        }
    }

    /// Another writer held the database past the busy timeout: the next commit may succeed.
    fn is_retryable(&self) -> bool {
        match self {
            Self::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
            ),
            Self::Task(_) => true,
            _ => false,
        }
    }
}

/// A sink that upserts outputs into a table of the SQLite database at `path` (created with its
/// directory if missing). The writers of one sink (and its clones) share one connection; the
/// database runs in WAL mode, so readers (a `sqlite3` shell) never block a commit.
pub struct SqliteSink<T> {
    /// `sqlite:<table>`, in metrics, logs and dead letters.
    name: String,
    table: String,
    path: PathBuf,
    fsync: bool,
    busy_timeout: Duration,
    /// The connection every writer of this sink commits through, opened by the first.
    shared: Arc<Mutex<Option<Connection>>>,
    _values: PhantomData<fn(T)>,
}

impl<T> Clone for SqliteSink<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            table: self.table.clone(),
            path: self.path.clone(),
            fsync: self.fsync,
            busy_timeout: self.busy_timeout,
            shared: Arc::clone(&self.shared),
            _values: PhantomData,
        }
    }
}

impl<T> SqliteSink<T> {
    /// A sink writing table `table` of the database file `path`: ASCII letters, digits and `_`,
    /// starting with a letter, at most 64 bytes. The sink is named `sqlite:<table>`.
    ///
    /// # Errors
    /// A table name SQL would need quoting for, or that is too long.
    pub fn new(path: impl AsRef<Path>, table: impl Into<String>) -> Result<Self, SqliteSinkError> {
        let table = table.into();
        let name = &table;
        let valid = name.len() <= MAX_TABLE_NAME
            && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.to_ascii_lowercase().starts_with("sqlite_");
        if !valid {
            return Err(SqliteSinkError::TableName { len: name.len() });
        }
        Ok(Self {
            name: format!("sqlite:{table}"),
            table,
            path: path.as_ref().to_owned(),
            fsync: true,
            busy_timeout: BUSY_TIMEOUT,
            shared: Arc::default(),
            _values: PhantomData,
        })
    }

    /// Whether a commit is synced to disk before it returns (SQLite's `synchronous=FULL`,
    /// default true). Off (`NORMAL`), a commit survives a process crash but a power loss may
    /// take the last ones while the lease table kept the checkpoints that counted on them.
    #[must_use]
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// How long a commit waits for another connection's write lock on the file (another
    /// process, or another sink on the same file) before it fails as retryable (default 10 s).
    #[must_use]
    pub fn busy_timeout(mut self, wait: Duration) -> Self {
        self.busy_timeout = wait;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn error(&self, operation: &'static str, error: SqliteSinkError) -> SinkError {
        SinkError {
            sink: self.name.clone(),
            operation,
            retryable: error.is_retryable(),
            source: Box::new(error),
        }
    }

    /// Opens the shared connection (creating or checking the table) unless it is open, off the
    /// async threads.
    async fn connect(&self) -> Result<(), SinkError> {
        let (path, table) = (self.path.clone(), self.table.clone());
        let (fsync, busy) = (self.fsync, self.busy_timeout);
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut conn = shared.lock().unwrap_or_else(PoisonError::into_inner);
            if conn.is_none() {
                *conn = Some(connect(&path, &table, fsync, busy)?);
            }
            Ok(())
        })
        .await
        .map_err(|e| self.error("open", e))
    }

    /// Runs `op` with the shared connection on the blocking pool.
    async fn with_connection<R: Send + 'static>(
        &self,
        operation: &'static str,
        op: impl FnOnce(&mut Connection, &Path, &str) -> Result<R, SqliteSinkError> + Send + 'static,
    ) -> Result<R, SinkError> {
        self.connect().await?;
        let (path, table) = (self.path.clone(), self.table.clone());
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut conn = shared.lock().unwrap_or_else(PoisonError::into_inner);
            let conn = conn.as_mut().expect("connected just before");
            op(conn, &path, &table)
        })
        .await
        .map_err(|e| self.error(operation, e))
    }
}

/// Runs `op` on the blocking pool.
async fn blocking<R: Send + 'static>(
    op: impl FnOnce() -> Result<R, SqliteSinkError> + Send + 'static,
) -> Result<R, SqliteSinkError> {
    match tokio::task::spawn_blocking(op).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(SqliteSinkError::Task(e.to_string())),
    }
}

fn connect(
    path: &Path,
    table: &str,
    fsync: bool,
    busy_timeout: Duration,
) -> Result<Connection, SqliteSinkError> {
    let fail = |operation| move |e| SqliteSinkError::sqlite(operation, path, e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| SqliteSinkError::sqlite("create the directory of", path, io_error(&e)))?;
    }
    let conn = Connection::open(path).map_err(fail("open"))?;
    conn.busy_timeout(busy_timeout)
        .map_err(fail("set the busy timeout of"))?;
    // WAL: a reader never blocks a commit. FULL syncs the WAL at every commit; NORMAL only
    // at WAL checkpoints (a commit survives a process crash, not always a power loss).
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(fail("set the journal mode of"))?;
    let synchronous = if fsync { "FULL" } else { "NORMAL" };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(fail("set the synchronous mode of"))?;
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|(name, ty, _)| format!("\"{name}\" {ty}").trim_end().to_owned())
        .collect();
    // `key` has no declared type, so an integer key stays an integer and text stays text.
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS \"{table}\" ({}, PRIMARY KEY (topology, shard, output)) \
         WITHOUT ROWID;",
        columns.join(", ")
    ))
    .map_err(fail("create the table in"))?;
    check_schema(&conn, path, table)?;
    Ok(conn)
}

/// The table's columns: name, declared type, place in the primary key (0: not in it).
const COLUMNS: [(&str, &str, i64); 11] = [
    ("topology", "TEXT NOT NULL", 1),
    ("shard", "TEXT NOT NULL", 2),
    ("output", "TEXT NOT NULL", 3),
    ("key", "", 0),
    ("window_start", "INTEGER", 0),
    ("window_end", "INTEGER", 0),
    ("record_sequence", "TEXT", 0),
    ("record_sub_sequence", "INTEGER", 0),
    ("value", "TEXT NOT NULL", 0),
    ("lease_generation", "INTEGER NOT NULL", 0),
    ("lease_counter", "INTEGER NOT NULL", 0),
];

/// Refuses a table that exists with other columns or types: an epoch column declared as text,
/// say, would compare `'9' >= '10'` and let a stale writer through.
fn check_schema(conn: &Connection, path: &Path, table: &str) -> Result<(), SqliteSinkError> {
    let fail = |e| SqliteSinkError::sqlite("read the columns of a table in", path, e);
    let mut stmt = conn
        .prepare(&format!("PRAGMA table_info(\"{table}\")"))
        .map_err(fail)?;
    let found: Vec<(String, String, bool, i64)> = stmt
        .query_map([], |r| {
            Ok((r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? != 0, r.get(5)?))
        })
        .map_err(fail)?
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let expected: Vec<(String, String, bool, i64)> = COLUMNS
        .iter()
        .map(|(name, ty, pk)| {
            let not_null = ty.ends_with("NOT NULL");
            let ty = ty.trim_end_matches("NOT NULL").trim_end();
            ((*name).to_owned(), ty.to_owned(), not_null, *pk)
        })
        .collect();
    let same = found.len() == expected.len()
        && found.iter().zip(&expected).all(|(f, e)| {
            f.0 == e.0 && f.1.eq_ignore_ascii_case(&e.1) && f.3 == e.3 && (f.2 || !e.2)
        });
    if same {
        return Ok(());
    }
    let show = |cols: &[(String, String, bool, i64)]| {
        cols.iter()
            .map(|(n, t, _, pk)| format!("{n} {t} {pk}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(SqliteSinkError::Schema {
        table: table.to_owned(),
        path: path.to_owned(),
        found: show(&found),
        expected: show(&expected),
    })
}

fn io_error(e: &std::io::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(std::io::Error::new(e.kind(), e.to_string())))
}

fn signed(what: &'static str, value: u64) -> Result<i64, SqliteSinkError> {
    i64::try_from(value).map_err(|_| SqliteSinkError::TooLarge { what, value })
}

/// One output as the row it becomes.
#[derive(Clone, Debug)]
struct Row {
    shard: ShardId,
    output: String,
    key: Value,
    window: Option<(i64, i64)>,
    record: Option<(String, i64)>,
    value: String,
    epoch: LeaseEpoch,
}

impl Row {
    fn new(
        shard: &ShardId,
        epoch: LeaseEpoch,
        id: &OutputId,
        value: String,
    ) -> Result<Self, SqliteSinkError> {
        let (key, window, record) = match id {
            OutputId::Record { position, .. } => (
                Value::Null,
                None,
                Some((
                    position.sequence.to_string(),
                    i64::from(position.sub_sequence),
                )),
            ),
            OutputId::Keyed { key, window, .. } => {
                let key = match key.value() {
                    KeyValue::Signed(n) => Value::Integer(n),
                    KeyValue::Unsigned(n) => {
                        i64::try_from(n).map_or_else(|_| Value::Text(n.to_string()), Value::Integer)
                    }
                    KeyValue::Text(s) => Value::Text(s.to_owned()),
                };
                (key, window.map(|w| (w.start, w.end)), None)
            }
        };
        Ok(Self {
            shard: shard.clone(),
            output: id.to_path(),
            key,
            window,
            record,
            value,
            epoch,
        })
    }
}

#[async_trait]
impl<T: Serialize + Send + Sync + 'static> Sink<T> for SqliteSink<T> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        self.connect().await?;
        Ok(Box::new(SqliteWriter {
            sink: self.clone(),
            topology: cx.topology.clone(),
            pending: Vec::new(),
            in_flight: None,
            released: Vec::new(),
            bytes: 0,
        }))
    }

    fn check(&self, value: &T) -> Result<(), String> {
        serde_json::to_vec(value)
            .map(drop)
            .map_err(|e| format!("not encodable as JSON ({:?} error)", e.classify()))
    }
}

#[async_trait]
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> InspectSink<T> for SqliteSink<T> {
    async fn committed(&self) -> Result<BTreeMap<(ShardId, String), T>, SinkError> {
        self.with_connection("read", |conn, path, table| {
            let fail = |e| SqliteSinkError::sqlite("read", path, e);
            let topologies: i64 = conn
                .query_row(
                    &format!("SELECT count(DISTINCT topology) FROM \"{table}\""),
                    [],
                    |r| r.get(0),
                )
                .map_err(fail)?;
            if topologies > 1 {
                return Err(SqliteSinkError::SeveralTopologies {
                    table: table.to_owned(),
                    topologies,
                });
            }
            let mut stmt = conn
                .prepare(&format!("SELECT shard, output, value FROM \"{table}\""))
                .map_err(fail)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, String>(2)?))
                })
                .map_err(fail)?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (shard, output, value) = row.map_err(fail)?;
                let shard = ShardId::new(shard);
                let value = serde_json::from_str(&value).map_err(|e| SqliteSinkError::Decode {
                    shard: shard.clone(),
                    category: e.classify(),
                    column: e.column(),
                })?;
                out.insert((shard, output), value);
            }
            Ok(out)
        })
        .await
    }
}

struct SqliteWriter<T> {
    sink: SqliteSink<T>,
    /// The topology, the first part of every row's key.
    topology: String,
    /// Outputs written since the last commit, encoded.
    pending: Vec<Row>,
    /// The commit under way: still set when a commit starts only if the last one's future was
    /// dropped before its task ended. That task may still run; its outcome decides whether its
    /// rows are written again (waiting for it first keeps an older value from landing after a
    /// newer one).
    in_flight: Option<InFlight>,
    /// Shards released while a commit was in flight: its rows of them are dropped if they come
    /// back.
    released: Vec<ShardId>,
    bytes: u64,
}

type CommitOutcome = Result<Result<u64, Fenced>, SqliteSinkError>;

struct InFlight {
    rows: Arc<Vec<Row>>,
    task: tokio::task::JoinHandle<CommitOutcome>,
}

impl<T> SqliteWriter<T> {
    /// Puts `rows` (older) back before what was written since.
    fn restore(&mut self, rows: Arc<Vec<Row>>) {
        let mut rows = Arc::try_unwrap(rows).unwrap_or_else(|shared| (*shared).clone());
        rows.retain(|r| !self.released.contains(&r.shard));
        rows.append(&mut self.pending);
        self.pending = rows;
    }

    /// Waits for the commit in flight (cancel-safe: dropped here, it stays in flight) and
    /// settles it: landed, or its rows pending again.
    async fn settle(&mut self) -> Result<Result<(), Fenced>, SinkError> {
        let flight = self.in_flight.as_mut().expect("a commit in flight");
        let joined = (&mut flight.task).await;
        let flight = self.in_flight.take().expect("still in flight");
        let outcome = match joined {
            Ok(Ok(Ok(bytes))) => {
                self.bytes += bytes;
                Ok(Ok(()))
            }
            Ok(Ok(Err(fenced))) => {
                self.restore(flight.rows);
                Ok(Err(fenced))
            }
            Ok(Err(e)) => {
                self.restore(flight.rows);
                Err(self.sink.error("commit", e))
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                self.restore(flight.rows);
                Err(self
                    .sink
                    .error("commit", SqliteSinkError::Task(e.to_string())))
            }
        };
        self.released.clear();
        outcome
    }
}

#[async_trait]
impl<T: Serialize + Send + Sync + 'static> SinkWriter<T> for SqliteWriter<T> {
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        self.pending.reserve(batch.outputs.len());
        for output in &batch.outputs {
            let row = serde_json::to_string(&output.value)
                .map_err(|e| SqliteSinkError::Encode {
                    shard: batch.shard.clone(),
                    category: e.classify(),
                })
                .and_then(|value| Row::new(&batch.shard, batch.lease_epoch, &output.id, value))
                .map_err(|e| self.sink.error("write", e))?;
            self.pending.push(row);
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), SinkError> {
        if self.in_flight.is_some() {
            // Whatever it did, its rows are settled: landed, or pending again (and written
            // below, where a refusal is reported).
            let _ = self.settle().await;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        self.sink.connect().await?;
        let rows = Arc::new(std::mem::take(&mut self.pending));
        let (sent, topology) = (Arc::clone(&rows), self.topology.clone());
        let (path, table) = (self.sink.path.clone(), self.sink.table.clone());
        let shared = Arc::clone(&self.sink.shared);
        let task = tokio::task::spawn_blocking(move || {
            let mut conn = shared.lock().unwrap_or_else(PoisonError::into_inner);
            let conn = conn.as_mut().expect("connected just before");
            upsert(conn, &path, &table, &topology, &sent)
        });
        self.in_flight = Some(InFlight { rows, task });
        match self.settle().await? {
            Ok(()) => Ok(()),
            // Nothing of the commit landed; it stays pending until the runtime releases the
            // refused shard (`SinkWriter::commit`).
            Err(fenced) => Err(SinkError {
                sink: self.sink.name.clone(),
                operation: "commit",
                retryable: false,
                source: Box::new(fenced),
            }),
        }
    }

    fn release_shard(&mut self, shard: &ShardId) {
        self.pending.retain(|r| &r.shard != shard);
        if self.in_flight.is_some() {
            self.released.push(shard.clone());
        }
    }

    fn bytes_written(&self) -> u64 {
        self.bytes
    }
}

/// Upserts `rows` in one transaction. Returns the bytes of values written, or, if a row a newer
/// lease epoch wrote refused its overwrite, that refusal (and the transaction is rolled back).
fn upsert(
    conn: &mut Connection,
    path: &Path,
    table: &str,
    topology: &str,
    rows: &[Row],
) -> Result<Result<u64, Fenced>, SqliteSinkError> {
    let fail = |operation| move |e| SqliteSinkError::sqlite(operation, path, e);
    // IMMEDIATE: the write lock is taken (or waited for, up to the busy timeout, when another
    // process or another sink on the file holds it) at the start, not at the first write, so
    // that two writers never deadlock upgrading their read locks.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail("begin a transaction on"))?;
    let mut bytes = 0;
    {
        // The row's epoch is compared as the pair (generation, counter): an equal epoch
        // refines its own output, a newer one overwrites, an older one changes nothing.
        let mut stmt = tx
            .prepare_cached(&format!(
                "INSERT INTO \"{table}\" (topology, shard, output, \"key\", window_start,
                    window_end, record_sequence, record_sub_sequence, value, lease_generation,
                    lease_counter)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (topology, shard, output) DO UPDATE SET
                    \"key\" = excluded.\"key\", window_start = excluded.window_start,
                    window_end = excluded.window_end, record_sequence = excluded.record_sequence,
                    record_sub_sequence = excluded.record_sub_sequence, value = excluded.value,
                    lease_generation = excluded.lease_generation,
                    lease_counter = excluded.lease_counter
                 WHERE (excluded.lease_generation, excluded.lease_counter)
                    >= (\"{table}\".lease_generation, \"{table}\".lease_counter)"
            ))
            .map_err(fail("prepare an upsert on"))?;
        for row in rows {
            let generation = signed("lease generation", row.epoch.generation)?;
            let counter = signed("lease counter", row.epoch.counter)?;
            let changed = stmt
                .execute(params![
                    topology,
                    row.shard.as_str(),
                    row.output,
                    row.key,
                    row.window.map(|w| w.0),
                    row.window.map(|w| w.1),
                    row.record.as_ref().map(|r| r.0.as_str()),
                    row.record.as_ref().map(|r| r.1),
                    row.value,
                    generation,
                    counter,
                ])
                .map_err(fail("upsert into"))?;
            if changed == 0 {
                // Dropping the transaction rolls it back.
                return Ok(Err(Fenced {
                    shard: row.shard.clone(),
                    output: row.output.clone(),
                    epoch: row.epoch,
                }));
            }
            bytes += (row.output.len() + row.value.len()) as u64;
        }
    }
    tx.commit().map_err(fail("commit a transaction on"))?;
    Ok(Ok(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_that_would_need_quoting_are_refused() {
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "sqlite_master",
            "x\"; DROP",
            &"a".repeat(65),
        ] {
            assert!(SqliteSink::<u64>::new("db", bad).is_err(), "{bad:?}");
        }
        for good in ["funnel", "Clicks_per_minute2", &"a".repeat(64)] {
            assert!(SqliteSink::<u64>::new("db", good).is_ok(), "{good:?}");
        }
    }
}

//! The database: SQLite embedded by default (one file, WAL), or PostgreSQL when several
//! tandem-api instances share one state behind a load balancer. Both run the same versioned
//! migrations (each written once per dialect) and the same queries.
//!
//! Entities are JSON documents in narrow tables `(id, project_id, parent_id, created_at, doc)`:
//! every query the API needs filters on those columns, and the rest of the record evolves with
//! serde defaults instead of schema churn (`doc` is `TEXT` in SQLite, `jsonb` in PostgreSQL).
//!
//! Concurrency across processes: every read-check-write runs inside [`Db::transaction`].
//! On SQLite that is `BEGIN IMMEDIATE`, which takes the database's single write lock at the
//! start, so the whole closure is serialised against every other writer of the file. On
//! PostgreSQL it is a READ COMMITTED transaction in which the closure locks what it checks:
//! [`Tx::get_for_update`] (`SELECT ... FOR UPDATE`) for the record whose status it moves, and
//! [`Tx::lock_project`] (a transaction-scoped advisory lock) before counting a project's usage
//! against its quota, because counting cannot lock rows that do not exist yet. Locks are taken
//! in one order (project, then volume, then snapshot, then attachment), so transactions never
//! deadlock. Background operations own their row through a lease (`lease_owner`,
//! `lease_until_ms`, see [`Tx::claim`]), so two instances never run the same one.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("stored document does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("database: {0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, DbError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Volumes,
    Snapshots,
    Attachments,
    VolumeTypes,
    Nodes,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Volumes => "volumes",
            Table::Snapshots => "snapshots",
            Table::Attachments => "attachments",
            Table::VolumeTypes => "volume_types",
            Table::Nodes => "nodes",
        }
    }

    /// Tables whose rows background operations own through a lease.
    fn leased(self) -> bool {
        matches!(self, Table::Volumes | Table::Snapshots)
    }
}

/// One schema step in both dialects. Never edit a published one; append.
struct Migration {
    version: i64,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite:
            "CREATE TABLE volumes (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc TEXT NOT NULL);
         CREATE INDEX volumes_project ON volumes (project_id, created_at);
         CREATE TABLE snapshots (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc TEXT NOT NULL);
         CREATE INDEX snapshots_project ON snapshots (project_id, created_at);
         CREATE INDEX snapshots_volume ON snapshots (parent_id);
         CREATE TABLE attachments (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc TEXT NOT NULL);
         CREATE INDEX attachments_volume ON attachments (parent_id);
         CREATE TABLE volume_types (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc TEXT NOT NULL);
         CREATE TABLE nodes (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc TEXT NOT NULL);
         CREATE TABLE quotas (project_id TEXT NOT NULL, resource TEXT NOT NULL,
             hard_limit INTEGER NOT NULL, PRIMARY KEY (project_id, resource));",
        postgres:
            "CREATE TABLE volumes (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc JSONB NOT NULL);
         CREATE INDEX volumes_project ON volumes (project_id, created_at);
         CREATE TABLE snapshots (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc JSONB NOT NULL);
         CREATE INDEX snapshots_project ON snapshots (project_id, created_at);
         CREATE INDEX snapshots_volume ON snapshots (parent_id);
         CREATE TABLE attachments (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc JSONB NOT NULL);
         CREATE INDEX attachments_volume ON attachments (parent_id);
         CREATE TABLE volume_types (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc JSONB NOT NULL);
         CREATE TABLE nodes (id TEXT PRIMARY KEY, project_id TEXT NOT NULL, parent_id TEXT,
             created_at TEXT NOT NULL, doc JSONB NOT NULL);
         CREATE TABLE quotas (project_id TEXT NOT NULL, resource TEXT NOT NULL,
             hard_limit BIGINT NOT NULL, PRIMARY KEY (project_id, resource));",
    },
    Migration {
        version: 2,
        sqlite: "ALTER TABLE volumes ADD COLUMN lease_owner TEXT;
         ALTER TABLE volumes ADD COLUMN lease_until_ms INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE snapshots ADD COLUMN lease_owner TEXT;
         ALTER TABLE snapshots ADD COLUMN lease_until_ms INTEGER NOT NULL DEFAULT 0;",
        postgres: "ALTER TABLE volumes ADD COLUMN lease_owner TEXT;
         ALTER TABLE volumes ADD COLUMN lease_until_ms BIGINT NOT NULL DEFAULT 0;
         ALTER TABLE snapshots ADD COLUMN lease_owner TEXT;
         ALTER TABLE snapshots ADD COLUMN lease_until_ms BIGINT NOT NULL DEFAULT 0;",
    },
];

/// Advisory-lock key that serialises migrations of instances starting together on PostgreSQL.
const MIGRATION_LOCK_KEY: i64 = 0x7461_6e64_656d_0001;

/// What `--database` names: a PostgreSQL URL or an SQLite file.
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

enum Conn {
    Sqlite(Connection),
    /// `None` only while being dropped. Boxed: the client is large.
    Postgres {
        client: Option<Box<postgres::Client>>,
        url: String,
    },
}

pub struct Db {
    conn: Conn,
}

/// Runs `f` where the synchronous PostgreSQL client may block: that client drives its own
/// small tokio runtime, which must not be entered from a thread already running tokio tasks,
/// so inside a runtime the call moves to a scoped thread (one per transaction, microseconds
/// against a network round trip) while the caller waits, as it waits for SQLite.
pub(crate) fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|scope| match scope.spawn(f).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

fn pg_connect(url: &str) -> Result<Box<postgres::Client>> {
    let url = url.to_string();
    off_runtime(move || Ok(Box::new(postgres::Client::connect(&url, postgres::NoTls)?)))
}

impl Db {
    /// Opens `location`: a `postgres://` or `postgresql://` URL, else an SQLite file path.
    pub fn open_location(location: &str) -> Result<Db> {
        if is_postgres_url(location) {
            Db::open_postgres(location)
        } else {
            Db::open(Path::new(location))
        }
    }

    /// Opens (creating if needed) an SQLite database file.
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)?;
        // WAL keeps readers off the writer's back; NORMAL sync is durable across process
        // crashes, which is what a restart of tandem-api needs.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Writers of the same file in other processes wait for the write lock this long.
        conn.busy_timeout(std::time::Duration::from_millis(
            crate::constants::SQLITE_BUSY_TIMEOUT_MS_MAX,
        ))?;
        Db::migrate_sqlite(conn)
    }

    pub fn open_in_memory() -> Result<Db> {
        Db::migrate_sqlite(Connection::open_in_memory()?)
    }

    /// Connects to PostgreSQL (`postgres://user@host:port/database`) and migrates the schema.
    pub fn open_postgres(url: &str) -> Result<Db> {
        let client = pg_connect(url)?;
        let mut db = Db { conn: Conn::Postgres { client: Some(client), url: url.to_string() } };
        db.migrate_postgres()?;
        Ok(db)
    }

    /// `sqlite` or `postgres`, for logs and tests.
    pub fn backend(&self) -> &'static str {
        match self.conn {
            Conn::Sqlite(_) => "sqlite",
            Conn::Postgres { .. } => "postgres",
        }
    }

    fn migrate_sqlite(mut conn: Connection) -> Result<Db> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)",
        )?;
        for m in MIGRATIONS {
            // IMMEDIATE: a second process migrating the same file waits instead of racing.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let done: Option<i64> = tx
                .query_row(
                    "SELECT version FROM schema_migrations WHERE version = ?1",
                    [m.version],
                    |r| r.get(0),
                )
                .optional()?;
            if done.is_none() {
                tx.execute_batch(m.sqlite)?;
                tx.execute("INSERT INTO schema_migrations (version) VALUES (?1)", [m.version])?;
            }
            tx.commit()?;
        }
        Ok(Db { conn: Conn::Sqlite(conn) })
    }

    fn migrate_postgres(&mut self) -> Result<()> {
        let client = self.pg_client()?;
        off_runtime(move || {
            // DDL is transactional in PostgreSQL: all pending steps apply, or none.
            let mut tx = client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)",
            )?;
            for m in MIGRATIONS {
                let done = tx.query_opt(
                    "SELECT version FROM schema_migrations WHERE version = $1",
                    &[&m.version],
                )?;
                if done.is_none() {
                    tx.batch_execute(m.postgres)?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)",
                        &[&m.version],
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The PostgreSQL client, reconnected when the server closed the previous connection (a
    /// restarted database must not need a restarted API).
    fn pg_client(&mut self) -> Result<&mut postgres::Client> {
        let Conn::Postgres { client, url } = &mut self.conn else {
            return Err(DbError::Other("not a PostgreSQL database".into()));
        };
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            tracing::warn!("reconnecting to PostgreSQL");
            *client = Some(pg_connect(url)?);
        }
        client.as_deref_mut().ok_or_else(|| DbError::Other("no PostgreSQL connection".into()))
    }

    /// Runs `f` as one atomic step that may write: nothing it read can change under it in
    /// another process before it commits (see the module comment). An `Err` rolls back.
    pub fn transaction<T, E>(
        &mut self,
        f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<T, E> + Send,
    ) -> std::result::Result<T, E>
    where
        T: Send,
        E: From<DbError> + Send,
    {
        self.run(TransactionBehavior::Immediate, f)
    }

    /// Runs `f` as a consistent read (it may still write, but takes no write lock up front on
    /// SQLite).
    pub fn read<T, E>(
        &mut self,
        f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<T, E> + Send,
    ) -> std::result::Result<T, E>
    where
        T: Send,
        E: From<DbError> + Send,
    {
        self.run(TransactionBehavior::Deferred, f)
    }

    fn run<T, E>(
        &mut self,
        behavior: TransactionBehavior,
        f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<T, E> + Send,
    ) -> std::result::Result<T, E>
    where
        T: Send,
        E: From<DbError> + Send,
    {
        match &mut self.conn {
            Conn::Sqlite(conn) => {
                let tx = conn.transaction_with_behavior(behavior).map_err(DbError::from)?;
                let mut tx = Tx { inner: TxInner::Sqlite(tx) };
                let out = f(&mut tx);
                let TxInner::Sqlite(inner) = tx.inner else { unreachable!() };
                match out {
                    Ok(v) => {
                        inner.commit().map_err(DbError::from)?;
                        Ok(v)
                    }
                    Err(e) => {
                        let _ = inner.rollback();
                        Err(e)
                    }
                }
            }
            Conn::Postgres { .. } => {
                let client = self.pg_client()?;
                off_runtime(move || {
                    let inner = client.transaction().map_err(DbError::from)?;
                    let mut tx = Tx { inner: TxInner::Postgres(inner) };
                    let out = f(&mut tx);
                    let TxInner::Postgres(inner) = tx.inner else { unreachable!() };
                    match out {
                        Ok(v) => {
                            inner.commit().map_err(DbError::from)?;
                            Ok(v)
                        }
                        Err(e) => {
                            let _ = inner.rollback();
                            Err(e)
                        }
                    }
                })
            }
        }
    }

    // One-statement conveniences: each is its own transaction.

    pub fn schema_version(&mut self) -> Result<i64> {
        self.read(|tx| tx.schema_version())
    }

    pub fn put<T: Serialize>(
        &mut self,
        table: Table,
        id: &str,
        project_id: &str,
        parent_id: Option<&str>,
        created_at: &str,
        doc: &T,
    ) -> Result<()> {
        let doc = serde_json::to_string(doc)?;
        self.transaction(|tx| tx.put_text(table, id, project_id, parent_id, created_at, &doc))
    }

    pub fn get<T: DeserializeOwned + Send>(&mut self, table: Table, id: &str) -> Result<Option<T>> {
        self.read(|tx| tx.get(table, id))
    }

    /// Every row, or one project's, oldest first.
    pub fn list<T: DeserializeOwned + Send>(
        &mut self,
        table: Table,
        project_id: Option<&str>,
    ) -> Result<Vec<T>> {
        self.read(|tx| tx.list(table, project_id))
    }

    pub fn list_by_parent<T: DeserializeOwned + Send>(
        &mut self,
        table: Table,
        parent_id: &str,
    ) -> Result<Vec<T>> {
        self.read(|tx| tx.list_by_parent(table, parent_id))
    }

    pub fn count_by_parent(&mut self, table: Table, parent_id: &str) -> Result<usize> {
        self.read(|tx| tx.count_by_parent(table, parent_id))
    }

    pub fn delete(&mut self, table: Table, id: &str) -> Result<bool> {
        self.transaction(|tx| tx.delete(table, id))
    }

    pub fn quota_overrides(&mut self, project_id: &str) -> Result<BTreeMap<String, i64>> {
        self.read(|tx| tx.quota_overrides(project_id))
    }

    pub fn set_quota(&mut self, project_id: &str, resource: &str, hard_limit: i64) -> Result<()> {
        self.transaction(|tx| tx.set_quota(project_id, resource, hard_limit))
    }

    pub fn delete_quotas(&mut self, project_id: &str) -> Result<()> {
        self.transaction(|tx| tx.delete_quotas(project_id))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // The PostgreSQL client owns a runtime, which must not be dropped inside another.
        if let Conn::Postgres { client, .. } = &mut self.conn
            && let Some(client) = client.take()
        {
            off_runtime(move || drop(client));
        }
    }
}

enum TxInner<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(postgres::Transaction<'a>),
}

/// One open transaction; see [`Db::transaction`].
pub struct Tx<'a> {
    inner: TxInner<'a>,
}

fn decode<T: DeserializeOwned>(docs: Vec<String>) -> Result<Vec<T>> {
    docs.iter().map(|d| Ok(serde_json::from_str(d)?)).collect()
}

fn sqlite_strings(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<String>> {
    let mut stmt = tx.prepare(sql)?;
    let rows = stmt.query_map(params, |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

fn pg_strings(
    tx: &mut postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<Vec<String>> {
    tx.query(sql, params)?.iter().map(|r| Ok(r.try_get::<_, String>(0)?)).collect()
}

impl Tx<'_> {
    pub fn schema_version(&mut self) -> Result<i64> {
        let sql = "SELECT MAX(version) FROM schema_migrations";
        Ok(match &mut self.inner {
            TxInner::Sqlite(tx) => tx.query_row(sql, [], |r| r.get(0))?,
            TxInner::Postgres(tx) => tx.query_one(sql, &[])?.try_get(0)?,
        })
    }

    pub fn put<T: Serialize>(
        &mut self,
        table: Table,
        id: &str,
        project_id: &str,
        parent_id: Option<&str>,
        created_at: &str,
        doc: &T,
    ) -> Result<()> {
        let doc = serde_json::to_string(doc)?;
        self.put_text(table, id, project_id, parent_id, created_at, &doc)
    }

    fn put_text(
        &mut self,
        table: Table,
        id: &str,
        project_id: &str,
        parent_id: Option<&str>,
        created_at: &str,
        doc: &str,
    ) -> Result<()> {
        let t = table.name();
        match &mut self.inner {
            TxInner::Sqlite(tx) => {
                tx.execute(
                    &format!(
                        "INSERT INTO {t} (id, project_id, parent_id, created_at, doc)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (id) DO UPDATE SET project_id = ?2, parent_id = ?3, doc = ?5"
                    ),
                    params![id, project_id, parent_id, created_at, doc],
                )?;
            }
            TxInner::Postgres(tx) => {
                tx.execute(
                    &format!(
                        "INSERT INTO {t} (id, project_id, parent_id, created_at, doc)
                         VALUES ($1, $2, $3, $4, $5::text::jsonb)
                         ON CONFLICT (id) DO UPDATE SET project_id = EXCLUDED.project_id,
                             parent_id = EXCLUDED.parent_id, doc = EXCLUDED.doc"
                    ),
                    &[&id, &project_id, &parent_id, &created_at, &doc],
                )?;
            }
        }
        Ok(())
    }

    pub fn get<T: DeserializeOwned>(&mut self, table: Table, id: &str) -> Result<Option<T>> {
        self.get_locked(table, id, false)
    }

    /// Reads a record and locks it until the transaction ends, for a read-check-write of it
    /// (on SQLite the transaction already holds the write lock).
    pub fn get_for_update<T: DeserializeOwned>(
        &mut self,
        table: Table,
        id: &str,
    ) -> Result<Option<T>> {
        self.get_locked(table, id, true)
    }

    fn get_locked<T: DeserializeOwned>(
        &mut self,
        table: Table,
        id: &str,
        for_update: bool,
    ) -> Result<Option<T>> {
        let t = table.name();
        let docs = match &mut self.inner {
            TxInner::Sqlite(tx) => {
                sqlite_strings(tx, &format!("SELECT doc FROM {t} WHERE id = ?1"), [id])?
            }
            TxInner::Postgres(tx) => {
                let lock = if for_update { " FOR UPDATE" } else { "" };
                pg_strings(tx, &format!("SELECT doc::text FROM {t} WHERE id = $1{lock}"), &[&id])?
            }
        };
        Ok(decode(docs)?.pop())
    }

    /// Every row, or one project's, oldest first.
    pub fn list<T: DeserializeOwned>(
        &mut self,
        table: Table,
        project_id: Option<&str>,
    ) -> Result<Vec<T>> {
        let t = table.name();
        let docs = match &mut self.inner {
            TxInner::Sqlite(tx) => sqlite_strings(
                tx,
                &format!(
                    "SELECT doc FROM {t} WHERE (?1 IS NULL OR project_id = ?1)
                     ORDER BY created_at, id"
                ),
                [project_id],
            )?,
            // COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
            TxInner::Postgres(tx) => pg_strings(
                tx,
                &format!(
                    "SELECT doc::text FROM {t} WHERE ($1::text IS NULL OR project_id = $1)
                     ORDER BY created_at COLLATE \"C\", id COLLATE \"C\""
                ),
                &[&project_id],
            )?,
        };
        decode(docs)
    }

    pub fn list_by_parent<T: DeserializeOwned>(
        &mut self,
        table: Table,
        parent_id: &str,
    ) -> Result<Vec<T>> {
        let t = table.name();
        let docs = match &mut self.inner {
            TxInner::Sqlite(tx) => sqlite_strings(
                tx,
                &format!("SELECT doc FROM {t} WHERE parent_id = ?1 ORDER BY created_at, id"),
                [parent_id],
            )?,
            TxInner::Postgres(tx) => pg_strings(
                tx,
                &format!(
                    "SELECT doc::text FROM {t} WHERE parent_id = $1
                     ORDER BY created_at COLLATE \"C\", id COLLATE \"C\""
                ),
                &[&parent_id],
            )?,
        };
        decode(docs)
    }

    pub fn count_by_parent(&mut self, table: Table, parent_id: &str) -> Result<usize> {
        let t = table.name();
        let n: i64 = match &mut self.inner {
            TxInner::Sqlite(tx) => tx.query_row(
                &format!("SELECT COUNT(*) FROM {t} WHERE parent_id = ?1"),
                [parent_id],
                |r| r.get(0),
            )?,
            TxInner::Postgres(tx) => tx
                .query_one(
                    &format!("SELECT COUNT(*) FROM {t} WHERE parent_id = $1"),
                    &[&parent_id],
                )?
                .try_get(0)?,
        };
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub fn delete(&mut self, table: Table, id: &str) -> Result<bool> {
        let t = table.name();
        let n = match &mut self.inner {
            TxInner::Sqlite(tx) => {
                u64::try_from(tx.execute(&format!("DELETE FROM {t} WHERE id = ?1"), [id])?)
                    .unwrap_or(u64::MAX)
            }
            TxInner::Postgres(tx) => {
                tx.execute(&format!("DELETE FROM {t} WHERE id = $1"), &[&id])?
            }
        };
        Ok(n > 0)
    }

    pub fn quota_overrides(&mut self, project_id: &str) -> Result<BTreeMap<String, i64>> {
        let mut out = BTreeMap::new();
        match &mut self.inner {
            TxInner::Sqlite(tx) => {
                let mut stmt =
                    tx.prepare("SELECT resource, hard_limit FROM quotas WHERE project_id = ?1")?;
                let rows = stmt.query_map([project_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })?;
                for row in rows {
                    let (k, v) = row?;
                    out.insert(k, v);
                }
            }
            TxInner::Postgres(tx) => {
                for row in tx.query(
                    "SELECT resource, hard_limit FROM quotas WHERE project_id = $1",
                    &[&project_id],
                )? {
                    out.insert(row.try_get(0)?, row.try_get(1)?);
                }
            }
        }
        Ok(out)
    }

    pub fn set_quota(&mut self, project_id: &str, resource: &str, hard_limit: i64) -> Result<()> {
        let sql = "INSERT INTO quotas (project_id, resource, hard_limit) VALUES ($1, $2, $3)
                   ON CONFLICT (project_id, resource) DO UPDATE SET hard_limit = $3";
        match &mut self.inner {
            TxInner::Sqlite(tx) => {
                tx.execute(&sqlite_placeholders(sql), params![project_id, resource, hard_limit])?;
            }
            TxInner::Postgres(tx) => {
                tx.execute(sql, &[&project_id, &resource, &hard_limit])?;
            }
        }
        Ok(())
    }

    pub fn delete_quotas(&mut self, project_id: &str) -> Result<()> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => {
                tx.execute("DELETE FROM quotas WHERE project_id = ?1", [project_id])?;
            }
            TxInner::Postgres(tx) => {
                tx.execute("DELETE FROM quotas WHERE project_id = $1", &[&project_id])?;
            }
        }
        Ok(())
    }

    /// Serialises this transaction against every other one that locks the same project until
    /// both end: what a quota check needs, since it counts rows another transaction may be
    /// about to insert. SQLite's `BEGIN IMMEDIATE` already serialises every writer.
    pub fn lock_project(&mut self, project_id: &str) -> Result<()> {
        if let TxInner::Postgres(tx) = &mut self.inner {
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('tandem-project:' || $1::text, 0))",
                &[&project_id],
            )?;
        }
        Ok(())
    }

    /// Takes the lease on a volume or snapshot row for `owner` until `until_ms`: when the row
    /// has no live lease, or `owner` holds it already, or `force` is set (the caller just moved
    /// the record into a status no running operation owns). Returns whether `owner` holds it.
    pub fn claim(
        &mut self,
        table: Table,
        id: &str,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
        force: bool,
    ) -> Result<bool> {
        assert!(table.leased(), "{} rows carry no lease", table.name());
        assert!(until_ms > now_ms);
        let t = table.name();
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let until = i64::try_from(until_ms).unwrap_or(i64::MAX);
        let sql = format!(
            "UPDATE {t} SET lease_owner = $2, lease_until_ms = $4 WHERE id = $1
             AND ($5 OR lease_owner IS NULL OR lease_owner = $2 OR lease_until_ms < $3)"
        );
        let n = match &mut self.inner {
            TxInner::Sqlite(tx) => u64::try_from(
                tx.execute(&sqlite_placeholders(&sql), params![id, owner, now, until, force])?,
            )
            .unwrap_or(u64::MAX),
            TxInner::Postgres(tx) => tx.execute(&sql, &[&id, &owner, &now, &until, &force])?,
        };
        Ok(n == 1)
    }

    /// Gives a lease back, if `owner` still holds it.
    pub fn release(&mut self, table: Table, id: &str, owner: &str) -> Result<()> {
        assert!(table.leased(), "{} rows carry no lease", table.name());
        let t = table.name();
        let sql = format!(
            "UPDATE {t} SET lease_owner = NULL, lease_until_ms = 0
             WHERE id = $1 AND lease_owner = $2"
        );
        match &mut self.inner {
            TxInner::Sqlite(tx) => {
                tx.execute(&sqlite_placeholders(&sql), params![id, owner])?;
            }
            TxInner::Postgres(tx) => {
                tx.execute(&sql, &[&id, &owner])?;
            }
        }
        Ok(())
    }

    /// Records whose lease is free or expired at `now_ms`: what a reconciler may claim.
    pub fn list_unleased<T: DeserializeOwned>(
        &mut self,
        table: Table,
        now_ms: u64,
    ) -> Result<Vec<T>> {
        assert!(table.leased(), "{} rows carry no lease", table.name());
        let t = table.name();
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let docs = match &mut self.inner {
            TxInner::Sqlite(tx) => sqlite_strings(
                tx,
                &format!(
                    "SELECT doc FROM {t} WHERE lease_owner IS NULL OR lease_until_ms < ?1
                     ORDER BY created_at, id"
                ),
                [now],
            )?,
            TxInner::Postgres(tx) => pg_strings(
                tx,
                &format!(
                    "SELECT doc::text FROM {t} WHERE lease_owner IS NULL OR lease_until_ms < $1
                     ORDER BY created_at COLLATE \"C\", id COLLATE \"C\""
                ),
                &[&now],
            )?,
        };
        decode(docs)
    }

    /// The lease holder of a row, if any (for tests and diagnostics).
    pub fn lease(&mut self, table: Table, id: &str) -> Result<Option<(String, u64)>> {
        assert!(table.leased(), "{} rows carry no lease", table.name());
        let t = table.name();
        let row: Option<(Option<String>, i64)> = match &mut self.inner {
            TxInner::Sqlite(tx) => tx
                .query_row(
                    &format!("SELECT lease_owner, lease_until_ms FROM {t} WHERE id = ?1"),
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?,
            TxInner::Postgres(tx) => tx
                .query_opt(
                    &format!("SELECT lease_owner, lease_until_ms FROM {t} WHERE id = $1"),
                    &[&id],
                )?
                .map(|r| Ok::<_, DbError>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()?,
        };
        Ok(row.and_then(|(owner, until)| owner.map(|o| (o, u64::try_from(until).unwrap_or(0)))))
    }
}

/// PostgreSQL's `$N` placeholders as SQLite's numbered `?N`, so a statement is written once.
fn sqlite_placeholders(sql: &str) -> String {
    sql.replace('$', "?")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Doc {
        n: u32,
    }

    /// A database of each backend for one test body. PostgreSQL needs a private cluster, which
    /// takes seconds: it runs with TANDEM_SLOW_TESTS=1.
    enum Fixture {
        Sqlite(tempfile::TempDir),
        Postgres(crate::pg_cluster::PgCluster),
    }

    impl Fixture {
        fn open(&self) -> Db {
            match self {
                Fixture::Sqlite(dir) => Db::open(&dir.path().join("api.sqlite")).unwrap(),
                Fixture::Postgres(cluster) => Db::open_postgres(&cluster.url()).unwrap(),
            }
        }
    }

    fn fixtures() -> Vec<Fixture> {
        let mut out = vec![Fixture::Sqlite(tempfile::tempdir().unwrap())];
        if std::env::var("TANDEM_SLOW_TESTS").as_deref() == Ok("1") {
            out.push(Fixture::Postgres(crate::pg_cluster::PgCluster::start().unwrap()));
        } else {
            eprintln!("PostgreSQL backend skipped: set TANDEM_SLOW_TESTS=1");
        }
        out
    }

    #[test]
    fn documents_round_trip_and_survive_reopen() {
        for fixture in fixtures() {
            {
                let mut db = fixture.open();
                let what = db.backend();
                db.put(Table::Volumes, "a", "p1", None, "2026-01-01", &Doc { n: 1 }).unwrap();
                db.put(Table::Volumes, "b", "p2", None, "2026-01-02", &Doc { n: 2 }).unwrap();
                db.put(Table::Snapshots, "s", "p1", Some("a"), "2026-01-03", &Doc { n: 3 })
                    .unwrap();
                db.put(Table::Volumes, "a", "p1", None, "2026-01-01", &Doc { n: 4 }).unwrap();
                db.set_quota("p1", "volumes", 3).unwrap();
                db.set_quota("p1", "volumes", 5).unwrap();
                assert_eq!(db.list::<Doc>(Table::Volumes, None).unwrap().len(), 2, "{what}");
            }
            let mut db = fixture.open();
            let what = db.backend();
            assert_eq!(db.schema_version().unwrap(), 2, "{what}");
            assert_eq!(db.get::<Doc>(Table::Volumes, "a").unwrap(), Some(Doc { n: 4 }), "{what}");
            assert_eq!(
                db.list::<Doc>(Table::Volumes, Some("p2")).unwrap(),
                vec![Doc { n: 2 }],
                "{what}"
            );
            assert_eq!(
                db.list::<Doc>(Table::Volumes, None).unwrap(),
                vec![Doc { n: 4 }, Doc { n: 2 }],
                "{what}: oldest first"
            );
            assert_eq!(db.count_by_parent(Table::Snapshots, "a").unwrap(), 1, "{what}");
            assert_eq!(
                db.list_by_parent::<Doc>(Table::Snapshots, "a").unwrap(),
                vec![Doc { n: 3 }],
                "{what}"
            );
            assert_eq!(db.quota_overrides("p1").unwrap().get("volumes"), Some(&5), "{what}");
            db.delete_quotas("p1").unwrap();
            assert!(db.quota_overrides("p1").unwrap().is_empty(), "{what}");
            assert!(db.delete(Table::Volumes, "a").unwrap(), "{what}");
            assert!(!db.delete(Table::Volumes, "a").unwrap(), "{what}");
            assert_eq!(db.get::<Doc>(Table::Volumes, "a").unwrap(), None, "{what}");
        }
    }

    #[test]
    fn a_failed_transaction_leaves_nothing_behind() {
        for fixture in fixtures() {
            let mut db = fixture.open();
            let what = db.backend();
            let out: std::result::Result<(), DbError> = db.transaction(|tx| {
                tx.put(Table::Volumes, "a", "p", None, "t", &Doc { n: 1 })?;
                tx.set_quota("p", "volumes", 1)?;
                Err(DbError::Other("refused".into()))
            });
            assert!(out.is_err(), "{what}");
            assert_eq!(db.get::<Doc>(Table::Volumes, "a").unwrap(), None, "{what}");
            assert!(db.quota_overrides("p").unwrap().is_empty(), "{what}");
        }
    }

    /// Many threads, each with its own connection (as separate tandem-api processes have),
    /// increment one document through read-check-write transactions: no update is lost.
    #[test]
    fn read_check_write_is_atomic_across_connections() {
        const THREADS: u32 = 4;
        const ROUNDS: u32 = 25;
        for fixture in fixtures() {
            let mut db = fixture.open();
            let what = db.backend();
            db.put(Table::Volumes, "counter", "p", None, "t", &Doc { n: 0 }).unwrap();
            std::thread::scope(|s| {
                for _ in 0..THREADS {
                    let fixture = &fixture;
                    s.spawn(move || {
                        let mut db = fixture.open();
                        for _ in 0..ROUNDS {
                            db.transaction(|tx| {
                                let mut d: Doc =
                                    tx.get_for_update(Table::Volumes, "counter")?.unwrap();
                                d.n += 1;
                                tx.put(Table::Volumes, "counter", "p", None, "t", &d)
                            })
                            .unwrap();
                        }
                    });
                }
            });
            assert_eq!(
                db.get::<Doc>(Table::Volumes, "counter").unwrap(),
                Some(Doc { n: THREADS * ROUNDS }),
                "{what}"
            );
        }
    }

    /// Quota-style check-then-insert under a project lock: concurrent inserts never exceed
    /// the limit.
    #[test]
    fn project_lock_makes_count_then_insert_atomic() {
        const THREADS: usize = 6;
        const LIMIT: usize = 3;
        for fixture in fixtures() {
            let mut db = fixture.open();
            let what = db.backend();
            let admitted: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|i| {
                        let fixture = &fixture;
                        s.spawn(move || {
                            let mut db = fixture.open();
                            db.transaction(|tx| {
                                tx.lock_project("p")?;
                                let n = tx.list::<Doc>(Table::Volumes, Some("p"))?.len();
                                if n >= LIMIT {
                                    return Ok(false);
                                }
                                // Widen the window a racing transaction would slip through.
                                std::thread::sleep(std::time::Duration::from_millis(20));
                                let id = format!("v{i}");
                                tx.put(Table::Volumes, &id, "p", None, "t", &Doc { n: 0 })?;
                                Ok::<_, DbError>(true)
                            })
                            .unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
            });
            assert_eq!(admitted, LIMIT, "{what}");
            assert_eq!(db.list::<Doc>(Table::Volumes, Some("p")).unwrap().len(), LIMIT, "{what}");
        }
    }

    #[test]
    fn leases_admit_one_owner_until_they_expire() {
        for fixture in fixtures() {
            let mut db = fixture.open();
            let what = db.backend();
            db.put(Table::Volumes, "v", "p", None, "t", &Doc { n: 0 }).unwrap();
            let claim = |db: &mut Db, owner: &str, now: u64, force: bool| {
                db.transaction(|tx| tx.claim(Table::Volumes, "v", owner, now, now + 100, force))
                    .unwrap()
            };
            let unleased = |db: &mut Db, now: u64| {
                db.read(|tx| tx.list_unleased::<Doc>(Table::Volumes, now)).unwrap().len()
            };
            assert_eq!(unleased(&mut db, 1000), 1, "{what}");
            assert!(claim(&mut db, "a", 1000, false), "{what}: free");
            assert!(!claim(&mut db, "b", 1050, false), "{what}: held by a");
            assert_eq!(unleased(&mut db, 1050), 0, "{what}");
            assert!(claim(&mut db, "a", 1050, false), "{what}: a renews");
            assert!(!claim(&mut db, "b", 1149, false), "{what}: renewed until 1150");
            assert_eq!(unleased(&mut db, 1151), 1, "{what}: expired");
            assert!(claim(&mut db, "b", 1151, false), "{what}: expired lease taken");
            assert!(claim(&mut db, "c", 1152, true), "{what}: forced");
            assert_eq!(
                db.read(|tx| tx.lease(Table::Volumes, "v")).unwrap(),
                Some(("c".to_string(), 1252)),
                "{what}"
            );
            db.transaction(|tx| tx.release(Table::Volumes, "v", "b")).unwrap();
            assert_eq!(unleased(&mut db, 1160), 0, "{what}: only the holder releases");
            db.transaction(|tx| tx.release(Table::Volumes, "v", "c")).unwrap();
            assert_eq!(unleased(&mut db, 1160), 1, "{what}");
            assert!(
                !db.transaction(|tx| tx.claim(Table::Volumes, "gone", "a", 1, 2, true)).unwrap()
            );
        }
    }

    /// The PostgreSQL client works from inside a tokio runtime (where tandem-api calls it).
    #[tokio::test]
    async fn usable_inside_a_runtime() {
        for fixture in fixtures() {
            let mut db = fixture.open();
            db.put(Table::Nodes, "n", "", None, "", &Doc { n: 7 }).unwrap();
            assert_eq!(db.get::<Doc>(Table::Nodes, "n").unwrap(), Some(Doc { n: 7 }));
            drop(db);
        }
    }
}

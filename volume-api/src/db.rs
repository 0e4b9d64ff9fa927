//! The database: SQLite embedded (one file, WAL) with versioned migrations.
//!
//! Entities are JSON documents in narrow tables `(id, project_id, parent_id, created_at, doc)`:
//! every query the API needs filters on those columns, and the rest of the record evolves with
//! serde defaults instead of schema churn. The SQL is plain enough to run unchanged on
//! PostgreSQL (`doc` becomes `jsonb`, `?N` placeholders become `$N`), the follow-up for
//! several API nodes.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("stored document does not decode: {0}")]
    Decode(#[from] serde_json::Error),
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
}

/// Versioned migrations, applied in order once each; never edit a published one, append.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
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
)];

pub struct Db {
    conn: Connection,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)?;
        // WAL keeps readers off the writer's back; NORMAL sync is durable across process
        // crashes, which is what a restart of tandem-api needs.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Db::migrate(conn)
    }

    pub fn open_in_memory() -> Result<Db> {
        Db::migrate(Connection::open_in_memory()?)
    }

    fn migrate(mut conn: Connection) -> Result<Db> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)",
        )?;
        for (version, sql) in MIGRATIONS {
            let tx = conn.transaction()?;
            let done: Option<i64> = tx
                .query_row(
                    "SELECT version FROM schema_migrations WHERE version = ?1",
                    [version],
                    |r| r.get(0),
                )
                .optional()?;
            if done.is_none() {
                tx.execute_batch(sql)?;
                tx.execute("INSERT INTO schema_migrations (version) VALUES (?1)", [version])?;
            }
            tx.commit()?;
        }
        Ok(Db { conn })
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.query_row("SELECT MAX(version) FROM schema_migrations", [], |r| r.get(0))?)
    }

    pub fn put<T: Serialize>(
        &self,
        table: Table,
        id: &str,
        project_id: &str,
        parent_id: Option<&str>,
        created_at: &str,
        doc: &T,
    ) -> Result<()> {
        let doc = serde_json::to_string(doc)?;
        self.conn.execute(
            &format!(
                "INSERT INTO {} (id, project_id, parent_id, created_at, doc) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET project_id = ?2, parent_id = ?3, doc = ?5",
                table.name()
            ),
            params![id, project_id, parent_id, created_at, doc],
        )?;
        Ok(())
    }

    pub fn get<T: DeserializeOwned>(&self, table: Table, id: &str) -> Result<Option<T>> {
        let doc: Option<String> = self
            .conn
            .query_row(&format!("SELECT doc FROM {} WHERE id = ?1", table.name()), [id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(match doc {
            Some(doc) => Some(serde_json::from_str(&doc)?),
            None => None,
        })
    }

    /// Every row, or one project's, oldest first.
    pub fn list<T: DeserializeOwned>(
        &self,
        table: Table,
        project_id: Option<&str>,
    ) -> Result<Vec<T>> {
        let sql = format!(
            "SELECT doc FROM {} WHERE (?1 IS NULL OR project_id = ?1) ORDER BY created_at, id",
            table.name()
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([project_id], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }

    pub fn list_by_parent<T: DeserializeOwned>(
        &self,
        table: Table,
        parent_id: &str,
    ) -> Result<Vec<T>> {
        let sql = format!(
            "SELECT doc FROM {} WHERE parent_id = ?1 ORDER BY created_at, id",
            table.name()
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([parent_id], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }

    pub fn count_by_parent(&self, table: Table, parent_id: &str) -> Result<usize> {
        let n: i64 = self.conn.query_row(
            &format!("SELECT COUNT(*) FROM {} WHERE parent_id = ?1", table.name()),
            [parent_id],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub fn delete(&self, table: Table, id: &str) -> Result<bool> {
        Ok(self.conn.execute(&format!("DELETE FROM {} WHERE id = ?1", table.name()), [id])? > 0)
    }

    pub fn quota_overrides(&self, project_id: &str) -> Result<BTreeMap<String, i64>> {
        let mut stmt =
            self.conn.prepare("SELECT resource, hard_limit FROM quotas WHERE project_id = ?1")?;
        let rows =
            stmt.query_map([project_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (k, v) = row?;
            out.insert(k, v);
        }
        Ok(out)
    }

    pub fn set_quota(&self, project_id: &str, resource: &str, hard_limit: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO quotas (project_id, resource, hard_limit) VALUES (?1, ?2, ?3)
             ON CONFLICT (project_id, resource) DO UPDATE SET hard_limit = ?3",
            params![project_id, resource, hard_limit],
        )?;
        Ok(())
    }

    pub fn delete_quotas(&self, project_id: &str) -> Result<()> {
        self.conn.execute("DELETE FROM quotas WHERE project_id = ?1", [project_id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Doc {
        n: u32,
    }

    #[test]
    fn documents_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sqlite");
        {
            let db = Db::open(&path).unwrap();
            db.put(Table::Volumes, "a", "p1", None, "2026-01-01", &Doc { n: 1 }).unwrap();
            db.put(Table::Volumes, "b", "p2", None, "2026-01-02", &Doc { n: 2 }).unwrap();
            db.put(Table::Snapshots, "s", "p1", Some("a"), "2026-01-03", &Doc { n: 3 }).unwrap();
            db.put(Table::Volumes, "a", "p1", None, "2026-01-01", &Doc { n: 4 }).unwrap();
            db.set_quota("p1", "volumes", 3).unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), 1);
        assert_eq!(db.get::<Doc>(Table::Volumes, "a").unwrap(), Some(Doc { n: 4 }));
        assert_eq!(db.list::<Doc>(Table::Volumes, Some("p2")).unwrap(), vec![Doc { n: 2 }]);
        assert_eq!(db.list::<Doc>(Table::Volumes, None).unwrap().len(), 2);
        assert_eq!(db.count_by_parent(Table::Snapshots, "a").unwrap(), 1);
        assert_eq!(db.quota_overrides("p1").unwrap().get("volumes"), Some(&3));
        assert!(db.delete(Table::Volumes, "a").unwrap());
        assert!(!db.delete(Table::Volumes, "a").unwrap());
        assert_eq!(db.get::<Doc>(Table::Volumes, "a").unwrap(), None);
    }
}

//! The database a test's tandem-api runs on: SQLite (a file in a temporary directory) or
//! PostgreSQL (a private cluster from Debian's packages, started for the test). Dropping it
//! removes the file or stops the cluster.

/// One test database.
pub enum Database {
    Sqlite(tempfile::TempDir),
    Postgres(volume_api::pg_cluster::PgCluster),
}

impl Database {
    pub fn sqlite() -> Database {
        Database::Sqlite(tempfile::tempdir().expect("a temporary directory"))
    }

    pub fn postgres() -> Database {
        Database::Postgres(
            volume_api::pg_cluster::PgCluster::start().expect("starting a PostgreSQL cluster"),
        )
    }

    /// What tandem-api's `--database` takes.
    pub fn location(&self) -> String {
        match self {
            Database::Sqlite(dir) => dir.path().join("api.sqlite").display().to_string(),
            Database::Postgres(cluster) => cluster.url(),
        }
    }
}

//! A throw-away PostgreSQL cluster for tests and local trials: Debian's `initdb` and `pg_ctl`
//! in a temporary directory, listening on a free loopback port with trust authentication, and
//! stopped by its postmaster's PID when the handle drops. Run as root, the server runs as the
//! `postgres` system user (PostgreSQL refuses to run as root), through `runuser`.
//!
//! Not used by the service itself; tests of this crate and of the `tests` crate start one.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the cluster may take to start or stop.
const CLUSTER_START_TIMEOUT_MS_MAX: u64 = 60_000;
const CLUSTER_STOP_TIMEOUT_MS_MAX: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL test cluster: {0}")]
pub struct ClusterError(String);

pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    postmaster_pid: u32,
}

/// `/usr/lib/postgresql/<newest>/bin`, where Debian's packages put the server programs.
pub fn server_bin_dir() -> Result<PathBuf, ClusterError> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            ClusterError(format!(
                "no /usr/lib/postgresql ({e}): install the Debian package `postgresql`"
            ))
        })?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        ClusterError("no initdb under /usr/lib/postgresql: install `postgresql`".into())
    })
}

fn we_are_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// uid and gid of the `postgres` system user, from /etc/passwd.
fn postgres_user() -> Result<(u32, u32), ClusterError> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| ClusterError(format!("reading /etc/passwd: {e}")))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| ClusterError("no `postgres` system user (package `postgresql`)".into()))
}

/// `program` with `args`, as the `postgres` user when we are root.
fn server_command(program: &Path) -> Command {
    if we_are_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) -> Result<(), ClusterError> {
    let out = command.output().map_err(|e| ClusterError(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(ClusterError(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn free_port() -> Result<u16, ClusterError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| ClusterError(format!("free port: {e}")))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| ClusterError(format!("free port: {e}")))
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

impl PgCluster {
    /// initdb, then start the server on a free port; returns once it accepts connections.
    pub fn start() -> Result<PgCluster, ClusterError> {
        let bin = server_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("tandem-pg-")
            .tempdir()
            .map_err(|e| ClusterError(format!("temp dir: {e}")))?;
        if we_are_root() {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| ClusterError(format!("chown {}: {e}", dir.path().display())))?;
        }
        let data = dir.path().join("data");
        let mut initdb = server_command(&bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        let port = free_port()?;
        let mut start = server_command(&bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c max_connections=200",
                dir.path().display()
            ))
            .args(["-w", "-t", &(CLUSTER_START_TIMEOUT_MS_MAX / 1000).to_string(), "start"]);
        // pg_ctl leaves the server running detached; its PID is in postmaster.pid.
        run(start, "pg_ctl start")?;
        let pid_text = std::fs::read_to_string(data.join("postmaster.pid"))
            .map_err(|e| ClusterError(format!("reading postmaster.pid: {e}")))?;
        let postmaster_pid = pid_text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| ClusterError(format!("bad postmaster.pid: {pid_text:?}")))?;
        let cluster = PgCluster { dir, port, postmaster_pid };
        let url = cluster.url_of("postgres");
        // The synchronous client must not run on a thread that drives tokio tasks.
        crate::db::off_runtime(move || {
            let deadline = Instant::now() + Duration::from_millis(CLUSTER_START_TIMEOUT_MS_MAX);
            let mut client = loop {
                match postgres::Client::connect(&url, postgres::NoTls) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > deadline => {
                        return Err(ClusterError(format!("server never answered: {e}")));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            client
                .batch_execute("CREATE DATABASE tandem")
                .map_err(|e| ClusterError(format!("CREATE DATABASE: {e}")))
        })?;
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:PORT/tandem`, the database made for the test.
    pub fn url(&self) -> String {
        self.url_of("tandem")
    }

    fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn postmaster_pid(&self) -> u32 {
        self.postmaster_pid
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: clients are cut off, the server exits cleanly.
        let pid = self.postmaster_pid.to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_millis(CLUSTER_STOP_TIMEOUT_MS_MAX);
        while process_alive(self.postmaster_pid) {
            if Instant::now() > deadline {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

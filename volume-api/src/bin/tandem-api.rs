//! tandem-api: the Cinder v3 compatible volume service.
//!
//! tandem-api [--listen 127.0.0.1:8776]
//!   [--database /var/lib/tandem/api.sqlite | --database postgres://USER@HOST:PORT/DB]
//!   [--auth noauth | --auth-config tokens.json] [--node NAME=http://HOST:PORT]...
//!   [--node-token TOKEN] [--availability-zone nova] [--replica-count 2]

use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use volume_api::api::{self, AppState, Settings};
use volume_api::auth::{Auth, TokenConfig};
use volume_api::constants::REPLICA_COUNT_MAX;
use volume_api::db::{Db, Table};
use volume_api::model::Node;
use volume_api::node_client::HttpNodeClient;

const USAGE: &str = "usage: tandem-api [--listen ADDR:PORT] \
[--database FILE | --database postgres://USER[:PASSWORD]@HOST:PORT/DB] \
[--auth noauth | --auth-config FILE] [--node NAME=URL]... [--node-token TOKEN] \
[--availability-zone AZ] [--replica-count N]

  --database    an SQLite file (default tandem-api.sqlite; one instance, or several on one
                host), or a PostgreSQL URL (--database-url is a synonym) for several instances
                behind a load balancer on one database. Migrations run at start.";

struct Args {
    listen: SocketAddr,
    /// An SQLite file path, or a `postgres://` URL.
    database: String,
    auth_config: Option<PathBuf>,
    nodes: Vec<(String, String)>,
    node_token: String,
    availability_zone: String,
    replica_count: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        listen: "127.0.0.1:8776".parse()?,
        database: "tandem-api.sqlite".into(),
        auth_config: None,
        nodes: Vec::new(),
        node_token: std::env::var("TANDEM_NODE_TOKEN").unwrap_or_default(),
        availability_zone: "nova".into(),
        replica_count: 2,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = argv.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--listen" => {
                args.listen = value.parse().with_context(|| format!("bad --listen {value:?}"))?
            }
            "--database" | "--database-url" => args.database = value,
            "--auth" if value == "noauth" => args.auth_config = None,
            "--auth" => bail!("--auth takes only noauth; use --auth-config FILE for tokens"),
            "--auth-config" => args.auth_config = Some(PathBuf::from(value)),
            "--node" => {
                let (name, url) = value
                    .split_once('=')
                    .with_context(|| format!("--node wants NAME=URL, got {value:?}"))?;
                if !url.starts_with("http://") {
                    bail!("--node URL must start with http://: {url}");
                }
                args.nodes.push((name.to_string(), url.to_string()));
            }
            "--node-token" => args.node_token = value,
            "--availability-zone" => args.availability_zone = value,
            "--replica-count" => {
                args.replica_count =
                    value.parse().with_context(|| format!("bad --replica-count {value:?}"))?;
                if !(1..=REPLICA_COUNT_MAX).contains(&args.replica_count) {
                    bail!("--replica-count must be 1 to {REPLICA_COUNT_MAX}");
                }
            }
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = parse_args()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let auth = match &args.auth_config {
        None => Auth::NoAuth,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config: TokenConfig = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            Auth::Tokens(config)
        }
    };
    let db = Db::open_location(&args.database)
        .with_context(|| format!("opening database {}", redacted(&args.database)))?;
    let settings = Settings {
        default_availability_zone: args.availability_zone.clone(),
        default_replica_count: args.replica_count,
        host: hostname(),
    };
    let state =
        AppState::new(db, Arc::new(HttpNodeClient::new(args.node_token.clone())), auth, settings);
    volume_api::api::ensure_default_type(&state).map_err(|e| anyhow::anyhow!("{e}"))?;
    for (name, url) in &args.nodes {
        state
            .transaction(|tx| {
                let existing: Option<Node> = tx.get_for_update(Table::Nodes, name)?;
                let node = Node {
                    name: name.clone(),
                    url: url.clone(),
                    availability_zone: existing
                        .as_ref()
                        .map_or(args.availability_zone.clone(), |n| n.availability_zone.clone()),
                    total_bytes: existing.as_ref().map_or(0, |n| n.total_bytes),
                    free_bytes: existing.as_ref().map_or(0, |n| n.free_bytes),
                    heartbeat_ms: existing.as_ref().map_or(0, |n| n.heartbeat_ms),
                    enabled: true,
                };
                Ok(tx.put(Table::Nodes, name, "", None, "", &node)?)
            })
            .map_err(|e| anyhow::anyhow!("registering node {name}: {e}"))?;
    }
    // Resumes what a crashed run left (once its leases expired) and, every few seconds, what
    // another instance on the same database left when it died.
    tokio::spawn(volume_api::worker::reconcile_loop(state.clone()));
    tokio::spawn(volume_api::worker::heartbeat_loop(state.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(
        "tandem-api listening on http://{local} (database: {}, instance {})",
        redacted(&args.database),
        state.instance_id
    );
    println!("tandem-api listening on http://{local}");
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The database location for logs, without a password.
fn redacted(location: &str) -> String {
    match location.split_once("://").and_then(|(scheme, rest)| {
        let (credentials, host) = rest.rsplit_once('@')?;
        let user = credentials.split(':').next().unwrap_or("");
        Some(format!("{scheme}://{user}@{host}"))
    }) {
        Some(clean) => clean,
        None => location.to_string(),
    }
}

//! tandemd: hosts replicated resources (DRBD configuration syntax) and exports each over iSCSI.
//!
//! ```text
//! tandemd [-c /etc/drbd.conf] [--node NAME] [--node-file /etc/tandem/node.conf]
//!         [--portal 0.0.0.0:3260] [--control-socket /run/tandem/tandemd.sock]
//!         [--state-dir /var/lib/tandem] [--iqn-prefix iqn.2026-11.org.tandem]
//!         [--chap USER:SECRET] [--mutual-chap USER:SECRET]
//!         [--api-listen ADDR:PORT --api-token TOKEN]
//!         [--replication-address IP] [--replication-ports MIN-MAX]
//!         [--forward-listen ADDR:PORT] [--forward-peer NODE=ADDR:PORT ...]
//!         [--metrics-listen ADDR:PORT] [--service-ip 'RESOURCE IPV4/PREFIX dev IFACE' ...]
//!         [--promoter 'RESOURCE [preferred-nodes NODE,NODE]' ...]
//!         [--reservations 'RESOURCE local|replicated' ...] [--worker-threads N]
//! ```
//! `--worker-threads` sets the tokio worker threads (default: one per
//! `CORES_PER_WORKER_THREAD` cores, at least one).
//! `--promoter` lets the resource promote itself when it has quorum and no primary is left
//! (drbd-reactor's promoter; `src/autopromote.rs`).
//! `--forward-listen` accepts forward links from peers (this node serves their iSCSI ports
//! while it is Primary); `--forward-peer` keeps a link to a peer's forward listener, so this
//! node's port serves the peer's logical unit while the peer is Primary (multipath).
//! Prints `tandemd: ready ...` on stdout once the control socket and the portal are up.

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::sync::Arc;
use storage_node::constants::{
    CONTROL_CONNECTIONS_MAX, CONTROL_REQUEST_BYTES_MAX, CORES_PER_WORKER_THREAD, WORKER_THREADS_MAX,
};
use storage_node::control::{self, Reply, exit};
use storage_node::host::Host;
use storage_node::node_settings::NodeSettings;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const USAGE: &str = "usage: tandemd [-c FILE] [--node NAME] [--node-file FILE] [--portal ADDR:PORT] \
[--control-socket PATH] [--state-dir DIR] [--iqn-prefix IQN] [--chap USER:SECRET] \
[--mutual-chap USER:SECRET] [--api-listen ADDR:PORT --api-token TOKEN] \
[--replication-address IP] [--replication-ports MIN-MAX] [--metrics-listen ADDR:PORT] \
[--service-ip 'RESOURCE IPV4/PREFIX dev IFACE' ...] \
[--promoter 'RESOURCE [preferred-nodes NODE,NODE]' ...] \
[--reservations 'RESOURCE local|replicated' ...] \
[--forward-listen ADDR:PORT] [--forward-peer NODE=ADDR:PORT ...] [--worker-threads N]";

struct Args {
    config_path: PathBuf,
    settings: NodeSettings,
    forward_listen: Option<std::net::SocketAddr>,
    forward_peers: Vec<(String, std::net::SocketAddr)>,
    worker_threads: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut config_path = PathBuf::from("/etc/drbd.conf");
    let mut node_file = None;
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut forward_listen = None;
    let mut forward_peers = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut worker_threads = (cores / CORES_PER_WORKER_THREAD).clamp(1, WORKER_THREADS_MAX);
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let (flag, value) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), v.to_owned()),
            _ => {
                let value =
                    argv.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
                (flag, value)
            }
        };
        match flag.as_str() {
            "-c" | "--config" => config_path = value.into(),
            "--forward-listen" => {
                forward_listen =
                    Some(value.parse().with_context(|| format!("--forward-listen {value}"))?)
            }
            "--forward-peer" => {
                let (node, address) = value
                    .split_once('=')
                    .with_context(|| format!("--forward-peer {value}: want NODE=ADDR:PORT"))?;
                let address = address.parse().with_context(|| format!("--forward-peer {value}"))?;
                forward_peers.push((node.to_owned(), address));
            }
            "--node-file" => node_file = Some(PathBuf::from(value)),
            "--worker-threads" => {
                worker_threads = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=WORKER_THREADS_MAX).contains(n))
                    .with_context(|| {
                        format!("--worker-threads {value}: want 1 to {WORKER_THREADS_MAX}")
                    })?;
            }
            "--node"
            | "--portal"
            | "--control-socket"
            | "--state-dir"
            | "--iqn-prefix"
            | "--chap"
            | "--mutual-chap"
            | "--api-listen"
            | "--api-token"
            | "--availability-zone"
            | "--replication-address"
            | "--replication-ports"
            | "--metrics-listen"
            | "--service-ip"
            | "--promoter"
            | "--reservations" => flags.push((flag[2..].to_owned(), value)),
            _ => bail!("unknown option {flag}\n{USAGE}"),
        }
    }
    let mut settings = NodeSettings::default();
    if let Some(path) = node_file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading node file {}", path.display()))?;
        settings.apply_file(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?;
    }
    for (key, value) in flags {
        settings.set(&key, &value).map_err(|e| anyhow::anyhow!("--{key}: {e}"))?;
    }
    if settings.mutual_chap.is_some() && settings.chap.is_none() {
        bail!("--mutual-chap needs --chap");
    }
    if settings.api_listen.is_some() && settings.api_token.is_none() {
        bail!("--api-listen needs --api-token (the HTTP API never runs without a bearer token)");
    }
    if !settings.service_ips.is_empty() && !settings.portal.ip().is_unspecified() {
        bail!(
            "service-ip needs the portal on the wildcard address (e.g. --portal 0.0.0.0:{}): \
             the portal binds once at start and must answer on the service IP as soon as it \
             is added",
            settings.portal.port()
        );
    }
    Ok(Args { config_path, settings, forward_listen, forward_peers, worker_threads })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,drbd_engine=warn".into()),
        )
        .init();
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads)
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let node_name = match &args.settings.node {
        Some(name) => name.clone(),
        None => storage_node::config::local_node_name().context("reading the host name")?,
    };
    let api_directory = storage_node::host::api_resource_directory(&args.settings);
    let loaded = storage_node::loader::load_with(&args.config_path, &api_directory)
        .with_context(|| format!("reading {}", args.config_path.display()))?;
    for warning in &loaded.config.warnings {
        tracing::warn!("{warning}");
    }
    for (file, error) in &loaded.broken {
        tracing::error!(file = %file.display(), "resource file skipped, its resources are not served: {error}");
    }
    let host = Host::new(
        args.settings.clone(),
        node_name.clone(),
        args.config_path.clone(),
        loaded.config,
    )
    .map_err(anyhow::Error::msg)?;
    for slot in host.slots() {
        if let Err(error) = slot.plan() {
            tracing::error!(resource = %slot.name, "resource not served: {error}");
        }
    }
    if host.slots().is_empty() {
        tracing::warn!(node = %node_name, "no resource in {} names this node", args.config_path.display());
    }

    // iSCSI: one target per resource (`PREFIX:NAME`), LUN = volume number.
    let credentials = |c: &Option<(String, String)>| {
        c.as_ref().map(|(user, secret)| iscsi_target::Credentials {
            user: user.clone(),
            secret: secret.clone(),
        })
    };
    let auth = iscsi_target::AuthConfig {
        chap: credentials(&args.settings.chap),
        mutual_chap: credentials(&args.settings.mutual_chap),
        allowed_initiators: Vec::new(),
    };
    let listeners = iscsi_target::driver::bind(&[args.settings.portal])
        .await
        .with_context(|| format!("binding the iSCSI portal {}", args.settings.portal))?;
    let portals = listeners
        .iter()
        .map(|(l, port)| iscsi_target::PortalAddress {
            address: l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            relative_port: *port,
        })
        .collect::<Vec<_>>();
    let portal_text = portals.first().map(|p| p.address.clone()).unwrap_or_default();
    let iscsi_config = Arc::new(iscsi_target::Config::new(Vec::new(), auth, portals));
    host.attach_portal(iscsi_config.clone());
    // One set of device locks for local sessions and forwarded commands.
    let registry = Arc::new(iscsi_target::driver::Registry::default());
    let mut forward_text = String::new();
    if let Some(address) = args.forward_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the forward listener {address}"))?;
        forward_text = format!(
            " forward={}",
            listener.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        let target = Arc::new(storage_node::forward::node::NodeForwardTarget {
            host: host.clone(),
            portal: iscsi_config.clone(),
            registry: registry.clone(),
        });
        let forwarder = host.forwarder.clone();
        tokio::spawn(async move {
            if let Err(error) = storage_node::forward::serve(listener, forwarder, target).await {
                tracing::error!(%error, "forward listener stopped");
            }
        });
    }
    for (peer, address) in &args.forward_peers {
        host.forwarder.add_peer(peer, *address);
    }
    tokio::spawn(async move {
        if let Err(error) =
            iscsi_target::driver::serve_with(iscsi_config, listeners, registry).await
        {
            tracing::error!(%error, "iSCSI portal stopped");
        }
    });

    // Control socket.
    let socket = &args.settings.control_socket;
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if UnixStream::connect(socket).await.is_ok() {
        bail!("another tandemd answers on {}", socket.display());
    }
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;

    let mut api_text = String::new();
    if let (Some(address), Some(token)) =
        (args.settings.api_listen, args.settings.api_token.clone())
    {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the HTTP API on {address}"))?;
        api_text =
            format!(" api={}", listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
        let router =
            storage_node::api::router(storage_node::api::ApiState::new(host.clone(), token));
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "HTTP API stopped");
            }
        });
    }

    let mut metrics_text = String::new();
    if let Some(address) = args.settings.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the metrics listener on {address}"))?;
        metrics_text = format!(
            " metrics={}",
            listener.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        let router = storage_node::metrics::router(host.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "metrics listener stopped");
            }
        });
    }

    host.restore().await;
    for config in host.service_ips.configs() {
        if host.slot(&config.resource).is_none() {
            tracing::warn!(resource = %config.resource, "service-ip names a resource this node does not host");
        }
    }
    // After restore: resources come back Secondary, so a service IP left by a crash goes.
    host.service_ips.start();
    if !host.service_ips.is_empty() {
        // Only with service IPs does stopping need work: without, SIGTERM keeps its default.
        tokio::spawn(release_service_ips_on_signal(host.clone()));
    }
    tokio::spawn(host.clone().watch());
    storage_node::autopromote::start(&host);
    println!(
        "tandemd: ready node={node_name} control={} portal={portal_text}{api_text}{metrics_text}{forward_text} resources={}",
        socket.display(),
        host.slots().len()
    );
    let permits = Arc::new(tokio::sync::Semaphore::new(CONTROL_CONNECTIONS_MAX));
    loop {
        let (stream, _) = listener.accept().await.context("accepting on the control socket")?;
        let Ok(permit) = permits.clone().acquire_owned().await else { continue };
        let host = host.clone();
        tokio::spawn(async move {
            serve_client(host, stream).await;
            drop(permit);
        });
    }
}

/// On SIGTERM or SIGINT, removes the service IPs this node holds, then exits as the signal
/// would have (128 + signal number).
async fn release_service_ips_on_signal(host: Arc<Host>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot watch SIGTERM/SIGINT: service IPs stay on a stop");
        return;
    };
    let code = tokio::select! {
        _ = terminate.recv() => 128 + libc::SIGTERM,
        _ = interrupt.recv() => 128 + libc::SIGINT,
    };
    host.service_ips.release_all().await;
    std::process::exit(code);
}

async fn serve_client(host: Arc<Host>, stream: UnixStream) {
    let (reader, mut writer) = stream.into_split();
    let mut reader =
        BufReader::new(reader.take(u64::try_from(CONTROL_REQUEST_BYTES_MAX).unwrap_or(u64::MAX)));
    let mut line = String::new();
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    match control::decode_request(&line) {
        Ok(request) => {
            tracing::info!(verb = %request.verb, resource = %request.resource, "tandemadm");
            let host = host.clone();
            tokio::spawn(async move {
                let code = host.handle(request, &tx).await;
                let _ = tx.send(Reply::Done { exit_code: code });
            });
        }
        Err(error) => {
            let _ = tx.send(Reply::Error { text: error.to_string() });
            let _ = tx.send(Reply::Done { exit_code: exit::USAGE });
        }
    }
    // Detect a client that went away (events2, waits) by watching the read half.
    let mut closed = Box::pin(async move {
        let mut sink = [0u8; 64];
        loop {
            match reader.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    loop {
        tokio::select! {
            reply = rx.recv() => {
                let Some(reply) = reply else { return };
                let done = matches!(reply, Reply::Done { .. });
                if writer.write_all(control::encode_reply(&reply).as_bytes()).await.is_err() || done {
                    return;
                }
            }
            () = &mut closed => return,
        }
    }
}

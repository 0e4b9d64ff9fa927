//! `tandem-compute`: the compute agent daemon and the CLI that talks to it.
//!
//!   tandem-compute daemon [--listen 127.0.0.1:8774] [--state-dir DIR] [--accel auto|kvm|tcg]
//!                         [--volume-api http://HOST:8776/v3/PROJECT --volume-api-token T]
//!   tandem-compute boot NAME [--kernel K --initrd I --cmdline C] [--image FILE] ...
//!   tandem-compute info | list | show ID | stop ID | start ID | unpause ID | delete ID
//!   tandem-compute attach ID --volume-id V | attach ID --connection-info FILE|- [--volume-id V]
//!   tandem-compute detach ID VOLUME_ID | attachments ID
//!   tandem-compute libvirt-xml --connection-info FILE|- [--target-dev vdb] [--domain|--secret]

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use compute_agent::api;
use compute_agent::connection_info::IscsiConnection;
use compute_agent::constants::API_PORT_DEFAULT;
use compute_agent::instance::Machine;
use compute_agent::libvirt::{self, DiskOptions, SecretRef};
use compute_agent::supervisor::{AccelChoice, Config, Supervisor, system_host_name};
use compute_agent::volume_api::VolumeApiConfig;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "tandem-compute",
    version,
    about = "Runs QEMU instances and hot-plugs Tandem (iSCSI) volumes into them",
    after_help = "Start the agent with `tandem-compute daemon`; the other subcommands talk to it \
                  over HTTP (--endpoint, default http://127.0.0.1:8774).\n\n\
                  With --volume-api (tandem-api's project endpoint) and a token, \
                  `attach ID --volume-id V` attaches nova's way: attachment create with this \
                  host's connector, hot-plug with the connection_info tandem-api returns, \
                  os-complete; any failure rolls back and the volume returns to available."
)]
struct Cli {
    /// The agent's HTTP endpoint (for the client subcommands).
    #[arg(long, global = true, env = "TANDEM_COMPUTE_ENDPOINT", default_value_t = format!("http://127.0.0.1:{API_PORT_DEFAULT}"))]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: supervise instances and serve the HTTP API.
    Daemon {
        /// Address to listen on.
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], API_PORT_DEFAULT)))]
        listen: SocketAddr,
        /// Where instances keep their console logs and sockets.
        #[arg(long, default_value = "/var/lib/tandem-compute")]
        state_dir: PathBuf,
        /// The QEMU binary.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
        /// Accelerator: auto probes whether KVM runs guests and falls back to TCG.
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        /// The iSCSI initiator name QEMU logs in with [default: one generated for this host on
        /// first start, iqn.2026-11.org.tandem:compute:HOST:RANDOM, kept in
        /// STATE_DIR/initiator-iqn].
        #[arg(long)]
        initiator_iqn: Option<String>,
        /// This host's address as storage nodes see it (the connector's `ip`).
        #[arg(long, default_value = "127.0.0.1")]
        my_ip: std::net::IpAddr,
        /// This host's name in the connector (Nova's `host`) [default: the system host name].
        #[arg(long)]
        host: Option<String>,
        /// tandem-api's project endpoint, as Cinder clients take it
        /// (http://HOST:8776/v3/PROJECT); enables attach by volume id.
        #[arg(long, env = "TANDEM_VOLUME_API", value_name = "URL")]
        volume_api: Option<String>,
        /// The token for tandem-api, sent as X-Auth-Token: `user:project` with its noauth
        /// (`--auth noauth`), or a bearer token of its `--auth-config`.
        #[arg(
            long,
            env = "TANDEM_VOLUME_API_TOKEN",
            hide_env_values = true,
            conflicts_with = "volume_api_token_file"
        )]
        volume_api_token: Option<String>,
        /// Read the tandem-api token from a file (keeps it out of the process list).
        #[arg(long, value_name = "FILE")]
        volume_api_token_file: Option<PathBuf>,
        /// Log QEMU straight into the first portal instead of through the per-volume path
        /// proxy that fails over between the connection_info's portals (no multipath).
        #[arg(long)]
        no_path_proxy: bool,
    },
    /// Boot a new instance.
    Boot {
        name: String,
        /// Instance id (default: a random UUID).
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long)]
        cmdline: Option<String>,
        /// A disk image to boot from (raw, or qcow2 by extension).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        memory_mib: Option<u32>,
        #[arg(long)]
        vcpus: Option<u32>,
        /// q35 (default) or pc.
        #[arg(long)]
        machine: Option<String>,
        /// Hot-plug slots to reserve (pcie-root-ports on q35).
        #[arg(long)]
        hotplug_slots: Option<usize>,
    },
    /// Show the agent: accelerator in use, initiator IQN and the Cinder connector of this host.
    Info,
    /// List instances.
    List,
    /// Show one instance.
    Show { id: String },
    /// Stop an instance (its attachments stay recorded).
    Stop { id: String },
    /// Start a stopped instance (re-attaching its volumes).
    Start { id: String },
    /// Resume a paused instance (after an I/O error the watcher gave up on).
    Unpause { id: String },
    /// Stop and remove an instance.
    Delete { id: String },
    /// Hot-plug a volume: by id through tandem-api (`--volume-id V`, the daemon needs
    /// --volume-api), or given Cinder connection_info as JSON (a file or - for stdin).
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["connection_info", "volume_id"])))]
    Attach {
        id: String,
        #[arg(long)]
        connection_info: Option<PathBuf>,
        #[arg(long)]
        volume_id: Option<String>,
    },
    /// Hot-unplug a volume.
    Detach { id: String, volume_id: String },
    /// List an instance's volume attachments.
    Attachments { id: String },
    /// Print the libvirt disk XML Nova would write for a connection_info (no daemon needed).
    LibvirtXml {
        #[arg(long)]
        connection_info: PathBuf,
        #[arg(long, default_value = "vdb")]
        target_dev: String,
        /// Name the CHAP secret by usage (default tandem-volume-<volume_id>) ...
        #[arg(long)]
        secret_usage: Option<String>,
        /// ... or by UUID, as Nova does.
        #[arg(long, conflicts_with = "secret_usage")]
        secret_uuid: Option<String>,
        /// Wrap the disk in a minimal domain (for virt-xml-validate).
        #[arg(long)]
        domain: bool,
        /// Print the <secret> definition instead of the disk.
        #[arg(long, conflicts_with = "domain")]
        secret: bool,
    },
}

fn read_json(path: &PathBuf) -> Result<Value> {
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
    } else {
        text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    }
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

async fn call(endpoint: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let (status, value) = api::request(endpoint, method, path, body.as_ref())
        .await
        .with_context(|| format!("{method} {endpoint}{path}"))?;
    if !(200..300).contains(&status) {
        bail!("{method} {path}: HTTP {status}: {value}");
    }
    Ok(value)
}

fn print(value: &Value) {
    if !value.is_null() {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    }
}

async fn daemon(listen: SocketAddr, config: Config) -> Result<()> {
    let supervisor = Supervisor::new(config).await.context("starting the supervisor")?;
    let accel = supervisor.accel();
    let supervisor = Arc::new(supervisor);
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    println!("tandem-compute: listening on {} (accel {})", listener.local_addr()?, accel.as_str());
    let shutdown = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    axum::serve(listener, api::router(supervisor.clone()))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")?;
    supervisor.shutdown().await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tandem-compute: starting the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain in one line; no backtrace for an operator's mistake.
            eprintln!("tandem-compute: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let endpoint = cli.endpoint.as_str();
    match cli.command {
        Command::Daemon {
            listen,
            state_dir,
            qemu,
            accel,
            initiator_iqn,
            my_ip,
            host,
            volume_api,
            volume_api_token,
            volume_api_token_file,
            no_path_proxy,
        } => {
            let token = match (volume_api_token, volume_api_token_file) {
                (Some(token), _) => Some(token),
                (None, Some(file)) => Some(
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?
                        .trim()
                        .to_owned(),
                ),
                (None, None) => None,
            };
            let volume_api = match (volume_api, token) {
                (Some(endpoint), Some(token)) => Some(VolumeApiConfig { endpoint, token }),
                (Some(_), None) => bail!(
                    "--volume-api needs a token: --volume-api-token USER:PROJECT (tandem-api's \
                     noauth) or a bearer token, or --volume-api-token-file"
                ),
                (None, Some(_)) => bail!("a tandem-api token without --volume-api"),
                (None, None) => None,
            };
            let config = Config {
                state_dir,
                qemu,
                accel,
                initiator_iqn,
                my_ip: my_ip.to_string(),
                host: host.unwrap_or_else(system_host_name),
                volume_api,
                path_proxy: !no_path_proxy,
            };
            daemon(listen, config).await?;
        }
        Command::Boot {
            name,
            id,
            kernel,
            initrd,
            cmdline,
            image,
            memory_mib,
            vcpus,
            machine,
            hotplug_slots,
        } => {
            let mut server = json!({ "name": name });
            let mut set = |key: &str, value: Value| {
                if !value.is_null() {
                    server[key] = value;
                }
            };
            set("id", json!(id));
            set("kernel", json!(kernel));
            set("initrd", json!(initrd));
            set("cmdline", json!(cmdline));
            set("image", json!(image));
            set("memory_mib", json!(memory_mib));
            set("vcpus", json!(vcpus));
            set("hotplug_slots", json!(hotplug_slots));
            if let Some(machine) = machine {
                let machine: Machine = serde_json::from_value(json!(machine))
                    .with_context(|| format!("--machine {machine}: use q35 or pc"))?;
                set("machine", json!(machine));
            }
            print(
                &call(endpoint, "POST", "/v2.1/servers", Some(json!({ "server": server }))).await?,
            );
        }
        Command::Info => print(&call(endpoint, "GET", "/", None).await?),
        Command::List => print(&call(endpoint, "GET", "/v2.1/servers", None).await?),
        Command::Show { id } => {
            print(&call(endpoint, "GET", &format!("/v2.1/servers/{id}"), None).await?)
        }
        Command::Stop { id } => {
            call(
                endpoint,
                "POST",
                &format!("/v2.1/servers/{id}/action"),
                Some(json!({"os-stop": null})),
            )
            .await?;
        }
        Command::Start { id } => {
            call(
                endpoint,
                "POST",
                &format!("/v2.1/servers/{id}/action"),
                Some(json!({"os-start": null})),
            )
            .await?;
        }
        Command::Unpause { id } => {
            call(
                endpoint,
                "POST",
                &format!("/v2.1/servers/{id}/action"),
                Some(json!({"unpause": null})),
            )
            .await?;
        }
        Command::Delete { id } => {
            call(endpoint, "DELETE", &format!("/v2.1/servers/{id}"), None).await?;
        }
        Command::Attach { id, connection_info, volume_id } => {
            let mut request = json!({ "volumeId": volume_id });
            if let Some(path) = &connection_info {
                request["connection_info"] = read_json(path)?;
            }
            let body = json!({ "volumeAttachment": request });
            print(
                &call(
                    endpoint,
                    "POST",
                    &format!("/v2.1/servers/{id}/os-volume_attachments"),
                    Some(body),
                )
                .await?,
            );
        }
        Command::Detach { id, volume_id } => {
            call(
                endpoint,
                "DELETE",
                &format!("/v2.1/servers/{id}/os-volume_attachments/{volume_id}"),
                None,
            )
            .await?;
        }
        Command::Attachments { id } => {
            print(
                &call(endpoint, "GET", &format!("/v2.1/servers/{id}/os-volume_attachments"), None)
                    .await?,
            );
        }
        Command::LibvirtXml {
            connection_info,
            target_dev,
            secret_usage,
            secret_uuid,
            domain,
            secret,
        } => {
            let connection = IscsiConnection::parse(&read_json(&connection_info)?)
                .context("parsing connection_info")?;
            let secret_ref = match (secret_usage, secret_uuid) {
                (Some(usage), _) => Some(SecretRef::Usage(usage)),
                (None, Some(uuid)) => Some(SecretRef::Uuid(uuid)),
                (None, None) => None,
            };
            if secret {
                let usage = match &secret_ref {
                    Some(SecretRef::Usage(usage)) => usage.clone(),
                    _ => libvirt::default_secret_usage(&connection),
                };
                print!("{}", libvirt::secret_xml(&usage));
                return Ok(());
            }
            let disk =
                libvirt::disk_xml(&connection, &DiskOptions { target_dev, secret: secret_ref });
            if domain {
                print!("{}", libvirt::validation_domain_xml(&disk));
            } else {
                print!("{disk}");
            }
        }
    }
    Ok(())
}

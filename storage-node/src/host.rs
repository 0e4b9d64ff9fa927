//! The daemon's core: the resources this node hosts, their replicated devices, and the
//! tandemadm verbs acting on them. The tokio plumbing (control socket, portal) lives in
//! `bin/tandemd.rs`; the text formats in `status`; the wire protocol in `control`.

use crate::config::{
    AfterSb0Pri, Config, Disk, FencingPolicy, MetaDisk, NetOptions, Protocol, Resource,
};
use crate::constants::{
    ENGINE_STOP_TIMEOUT_MS_MAX, EVENTS_BUFFER_MAX, RESOURCES_MAX, STATE_POLL_INTERVAL_MS,
    WAIT_POLL_INTERVAL_MS,
};
use crate::control::{Reply, Request, Verb, exit};
use crate::engine_runtime::{EngineRuntime, StartError};
use crate::lun::ResourceLun;
use crate::node_settings::NodeSettings;
use crate::status::{self, PeerView, PeerVolumeView, ResourceView, VolumeView};
use backing_store::EngineKind;
use drbd_engine::NodeId;
use drbd_engine::constants::BLOCK_SIZE_BYTES;
use drbd_engine::driver::constants::FENCE_HANDLER_TIMEOUT_MS_DEFAULT;
use drbd_engine::driver::fence::FenceHandler;
use drbd_engine::driver::meta_v09::V09File;
use drbd_engine::driver::{DeviceError, DriverConfig, MetaFormat, ReplicatedDevice, Status};
use drbd_engine::meta::{AlGeometry, MetaLayout, MetaPlacement};
use drbd_engine::protocol::node::StateError;
use drbd_engine::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{
    AfterSbPolicies, ConnectionState, DigestAlg, DigestSettings, DiskState,
    DynamicControllerConfig, Fencing, ReplicationProtocol, ReplicationState, ResyncRate, Role,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};

/// How often wait-sync reports resync progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// What the configuration says about one resource on this node, ready for the engine.
#[derive(Debug, Clone)]
pub struct Plan {
    pub driver: DriverConfig,
    pub volume: u32,
    pub minor: u32,
    pub peer_names: BTreeMap<u8, String>,
    /// The resource's `handlers { fence-peer }`, run when fencing asks for it.
    pub fence_handler: Option<FenceHandler>,
    /// This node is `disk none`: a diskless quorum tiebreaker (votes, stores nothing, exports
    /// no LUN, never promotes). Its engine runs on placeholder files in the state directory.
    pub diskless: bool,
    /// The device's end keeps the replicated persistent reservations (`reservations.rs`), so
    /// the LUN is that much smaller; off with the node file's `reservations R local` (a
    /// volume from kernel DRBD fills its device to the end).
    pub reservation_area: bool,
}

struct Running {
    device: ReplicatedDevice,
    /// Owns every task, socket and file of the engine; stopping it releases them all.
    engine: EngineRuntime,
    /// The engine settings it was started with, for `adjust`.
    started_with: String,
}

/// One hosted resource. Lives as long as tandemd (its LUN is part of the fixed target set).
pub struct Slot {
    pub name: String,
    plan: Mutex<Result<Plan, String>>,
    running: Mutex<Option<Running>>,
    /// Serialises state-changing verbs on this resource (up/down/primary/secondary ...).
    verb_lock: tokio::sync::Mutex<()>,
    pub primary: AtomicBool,
    pub size_bytes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    /// The LUN's request counters (Prometheus metrics, upper-pending).
    pub io: Arc<crate::metrics::LunIo>,
    last_view: Mutex<Option<ResourceView>>,
    split_brain_logged: AtomicBool,
    /// Writes through the LUN hold it shared; a snapshot holds it exclusively, so no write is
    /// in flight while the replicas are copied.
    pub write_gate: tokio::sync::RwLock<()>,
    /// The connected peer that is Primary, if any (where a remote port forwards to).
    primary_peer: Mutex<Option<String>>,
    /// The persistent reservations kept in the replicated device (`reservations.rs`).
    pub reservations: crate::reservations::ReservationStore,
}

#[path = "host_resize.rs"]
mod resize;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Slot {
    /// The size the LUN (the volume) has: the device less its reservation area, if it has one.
    pub fn lun_size_bytes(&self) -> u64 {
        let device_bytes = self.size_bytes.load(Ordering::Acquire);
        if self.reservation_area() {
            crate::reservations::lun_size_bytes(device_bytes)
        } else {
            device_bytes
        }
    }

    /// Whether the device's end keeps the replicated persistent reservations ([`Plan`]).
    pub fn reservation_area(&self) -> bool {
        lock(&self.plan).as_ref().map_or(true, |plan| plan.reservation_area)
    }

    pub fn device(&self) -> Option<ReplicatedDevice> {
        lock(&self.running).as_ref().map(|r| r.device.clone())
    }

    pub fn plan(&self) -> Result<Plan, String> {
        lock(&self.plan).clone()
    }

    pub fn volume(&self) -> Option<u32> {
        lock(&self.plan).as_ref().ok().map(|p| p.volume)
    }

    /// The connected peer that is Primary, as the state watcher last saw it.
    pub fn primary_peer(&self) -> Option<String> {
        lock(&self.primary_peer).clone()
    }
}

/// A verb's failure: exit code and the message (which says what to do).
type VerbResult = Result<(), (i32, String)>;

fn fail(code: i32, message: impl Into<String>) -> VerbResult {
    Err((code, message.into()))
}

fn protocol_of(protocol: Protocol) -> ReplicationProtocol {
    match protocol {
        Protocol::A => ReplicationProtocol::A,
        Protocol::B => ReplicationProtocol::B,
        Protocol::C => ReplicationProtocol::C,
    }
}

/// Where a volume's metadata lives and in which layout.
///
/// `meta-disk internal` is DRBD's internal metadata at the end of the backing file, unless the
/// state directory still holds `NAME.VOL.md` from before Tandem supported that: such a volume
/// keeps its external file (its data uses the whole backing file, so its metadata cannot move
/// in without shrinking it); `up` says so in the log. `meta-disk PATH` is drbdmeta's
/// flex-external file; `meta-disk PATH [N]` (indexed, 128 MiB slots) is refused.
fn metadata_place(
    settings: &NodeSettings,
    resource: &str,
    volume: u32,
    backing_path: &std::path::Path,
    meta: &Option<MetaDisk>,
) -> Result<(PathBuf, MetaFormat), String> {
    match meta {
        Some(MetaDisk::External { path, index: None }) => {
            Ok((path.clone(), MetaFormat::V09External))
        }
        Some(MetaDisk::External { path, index: Some(index) }) => Err(format!(
            "{resource}: 'meta-disk {} [{index}]' (indexed external metadata) is not supported; \
             use 'meta-disk internal' or a flex-external 'meta-disk {}' without an index",
            path.display(),
            path.display()
        )),
        _ => {
            let legacy = legacy_metadata_path(settings, resource, volume);
            if legacy.exists() {
                Ok((legacy, MetaFormat::V09External))
            } else {
                Ok((backing_path.to_owned(), MetaFormat::V09Internal))
            }
        }
    }
}

/// Where tandemd kept `meta-disk internal` metadata before it wrote it into the backing file.
pub fn legacy_metadata_path(settings: &NodeSettings, resource: &str, volume: u32) -> PathBuf {
    settings.state_directory.join(format!("{resource}.{volume}.md"))
}

/// Whether the resource's metadata exists (internal: a valid v09 superblock at the end of the
/// backing file, as drbdmeta checks; external: the file).
pub fn metadata_present(driver: &DriverConfig) -> bool {
    match driver.meta_format {
        MetaFormat::V09Internal => {
            V09File::probe(&driver.meta_path, MetaPlacement::Internal).unwrap_or(false)
        }
        _ => driver.meta_path.exists(),
    }
}

/// The backing file size that gives a volume (LUN) of `data_size_bytes` with internal
/// metadata for `max_peers` peers (what the HTTP create allocates, as LINSTOR does for DRBD):
/// the device is the volume plus the persistent-reservation area at its end
/// (`reservations.rs`).
pub fn internal_backing_bytes(data_size_bytes: u64, max_peers: u32) -> Result<u64, String> {
    let device_bytes = data_size_bytes
        .checked_add(crate::reservations::RESERVATION_AREA_BYTES)
        .ok_or_else(|| format!("{data_size_bytes} bytes is too large"))?;
    MetaLayout::internal_device_bytes_for_data(device_bytes, max_peers, AlGeometry::default())
        .map_err(|e| format!("internal metadata for {data_size_bytes} bytes: {e}"))
}

/// The size the device will have: the data area below internal metadata (computed for this
/// configuration's max-peers until the engine reports the metadata's own), else the file.
fn device_size_bytes(driver: &DriverConfig) -> u64 {
    match driver.meta_format {
        MetaFormat::V09Internal => {
            MetaLayout::internal(driver.size_bytes, max_peers(driver), AlGeometry::default())
                .map_or(0, |layout| layout.data_size_bytes)
        }
        _ => driver.size_bytes,
    }
}

/// Turns a resource of the configuration into the engine's settings for this node.
pub fn plan_resource(
    settings: &NodeSettings,
    node_name: &str,
    resource: &Resource,
) -> Result<Plan, String> {
    let name = &resource.name;
    let node = resource.local_node(node_name).map_err(|e| e.to_string())?;
    let node_id = u8::try_from(node.node_id)
        .ok()
        .and_then(NodeId::new)
        .ok_or_else(|| format!("{name}: node-id {} is out of range", node.node_id))?;
    let [volume] = node.volumes.as_slice() else {
        return Err(format!(
            "{name}: {} volumes; the engine replicates one volume per resource so far \
             (split the volumes into resources of one volume each)",
            node.volumes.len()
        ));
    };
    let diskless = matches!(volume.disk, Disk::None);
    let backing_path = match &volume.disk {
        Disk::Path(path) => path.clone(),
        Disk::None => crate::diskless::placeholder_path(settings, name, volume.number),
    };
    let listen = node
        .address
        .as_ref()
        .map(|e| e.address)
        .ok_or_else(|| format!("{name}: on {node_name}: no address to listen on"))?;
    let mut peers = Vec::new();
    let mut peer_names = BTreeMap::new();
    let mut protocol = resource.net.protocol();
    let mut fencing = resource.net.fencing();
    let mut diskless_peers = Vec::new();
    let mut net = &resource.net;
    for (connection, host) in resource.peers_of(&node.name) {
        let peer = u8::try_from(host.node_id)
            .ok()
            .and_then(NodeId::new)
            .ok_or_else(|| format!("{name}: peer node-id {} is out of range", host.node_id))?;
        let address = host
            .address
            .as_ref()
            .map(|e| e.address)
            .ok_or_else(|| format!("{name}: peer {} has no address", host.name))?;
        peers.push((peer, address));
        peer_names.insert(peer.0, host.name.clone());
        // A peer with `disk none` for this volume is a diskless tiebreaker (it votes only).
        let peer_volume = resource
            .node(&host.name)
            .and_then(|n| n.volumes.iter().find(|v| v.number == volume.number));
        if peer_volume.is_some_and(|v| matches!(v.disk, Disk::None)) {
            diskless_peers.push(peer);
        }
        protocol = connection.net.protocol();
        fencing = connection.net.fencing();
        net = &connection.net;
    }
    let net_digests = digest_settings(net).map_err(|e| format!("{name}: net {{ }}: {e}"))?;
    let after_sb = after_sb_of(net, node_name).map_err(|e| format!("{name}: {e}"))?;
    let shared_secret = shared_secret_of(net).map_err(|e| format!("{name}: {e}"))?;
    let disk = &volume.disk_options;
    let resync_rate = if disk.c_plan_ahead_ds() == 0 {
        ResyncRate::Fixed { rate_kib_per_s: disk.resync_rate_kib_per_s() }
    } else {
        ResyncRate::Dynamic(DynamicControllerConfig {
            plan_ahead_steps: disk.c_plan_ahead_ds(),
            fill_target_kib: disk.c_fill_target_sectors() / 2,
            max_rate_kib_per_s: disk.c_max_rate_kib_per_s(),
            min_rate_kib_per_s: disk.c_min_rate_kib_per_s(),
        })
    };
    let (size_bytes, meta_path, meta_format) = if diskless {
        crate::diskless::engine_files(settings, name, volume.number)
    } else {
        let size_bytes = std::fs::metadata(&backing_path).map(|m| m.len()).unwrap_or(0);
        let (meta_path, meta_format) =
            metadata_place(settings, name, volume.number, &backing_path, &volume.meta_disk)?;
        (size_bytes, meta_path, meta_format)
    };
    let mut quorum = quorum_of(&resource.options, diskless_peers)?;
    if diskless {
        crate::diskless::check_tiebreaker(name, node_name, &quorum)?;
        quorum.diskless = true;
    }
    Ok(Plan {
        driver: DriverConfig {
            node_id,
            listen,
            peers,
            backing_path,
            size_bytes,
            engine: EngineKind::Sync,
            direct_io: false,
            meta_path,
            // DRBD 9's v09 layout, internal or flex-external: drbdmeta dump-md reads it.
            meta_format,
            protocol: protocol_of(protocol),
            fencing: fencing_of(fencing),
            resync_rate,
            al_extents: usize::try_from(disk.al_extents()).unwrap_or(usize::MAX),
            digests: net_digests,
            quorum,
            after_sb,
            shared_secret,
            on_io_error: on_io_error_of(disk.on_io_error()).map_err(|e| format!("{name}: {e}"))?,
            congestion: congestion_of(net, protocol).map_err(|e| format!("{name}: {e}"))?,
        },
        volume: volume.number,
        minor: volume.device.minor,
        peer_names,
        fence_handler: resource.fence_peer_handler().map(|command| FenceHandler {
            command: command.to_owned(),
            resource: name.clone(),
            volume: volume.number,
            timeout_ms: FENCE_HANDLER_TIMEOUT_MS_DEFAULT,
        }),
        diskless,
        reservation_area: !settings.local_reservations.iter().any(|local| local == name),
    })
}

/// `net { csums-alg; csums-after-crash-only; verify-alg; }` for the engine. The engine has
/// crc32c and sha256; any other algorithm (DRBD also takes md5, sha1, ...) is refused by name
/// rather than replaced behind the operator's back.
fn digest_settings(net: &NetOptions) -> Result<DigestSettings, String> {
    let alg = |option: &str, value: &Option<String>| -> Result<Option<DigestAlg>, String> {
        value
            .as_deref()
            .map(|text| text.parse::<DigestAlg>().map_err(|e| format!("{option}: {e}")))
            .transpose()
    };
    Ok(DigestSettings {
        csums_alg: alg("csums-alg", &net.csums_alg)?,
        csums_after_crash_only: net.ignored.get("csums-after-crash-only").map(String::as_str)
            == Some("yes"),
        verify_alg: alg("verify-alg", &net.verify_alg)?,
    })
}

/// `options { quorum ...; on-no-quorum ...; }` as the engine's settings.
fn quorum_of(
    options: &crate::config::ResourceOptions,
    diskless_peers: Vec<NodeId>,
) -> Result<QuorumConfig, String> {
    let quorum = match options.quorum() {
        crate::config::Quorum::Off => QuorumPolicy::Off,
        crate::config::Quorum::Majority => QuorumPolicy::Majority,
        crate::config::Quorum::All => QuorumPolicy::All,
        crate::config::Quorum::Count(n) => u8::try_from(n)
            .ok()
            .filter(|n| (1..=32).contains(n))
            .map(QuorumPolicy::Count)
            .ok_or_else(|| format!("quorum {n}: not in 1..32"))?,
    };
    let on_no_quorum = match options.on_no_quorum() {
        crate::config::OnNoQuorum::SuspendIo => OnNoQuorum::SuspendIo,
        crate::config::OnNoQuorum::IoError => OnNoQuorum::IoError,
    };
    Ok(QuorumConfig {
        quorum,
        on_no_quorum,
        minimum_redundancy: QuorumPolicy::Off,
        diskless: false,
        diskless_peers,
    })
}

/// `net { after-sb-0pri; after-sb-1pri; after-sb-2pri; }` as the engine's policies (the words
/// are the same). `discard-node-NAME` is `discard-local` on node NAME and `discard-remote` on
/// its peer (two nodes per resource, so the peer is the only other one).
fn after_sb_of(net: &NetOptions, this_node: &str) -> Result<AfterSbPolicies, String> {
    let zero = match net.after_sb_0pri() {
        AfterSb0Pri::DiscardNode(node) if node == this_node => "discard-local".to_owned(),
        AfterSb0Pri::DiscardNode(_) => "discard-remote".to_owned(),
        other => other.to_string(),
    };
    Ok(AfterSbPolicies {
        zero_primaries: zero.parse().map_err(|e| format!("{e}"))?,
        one_primary: net.after_sb_1pri().as_str().parse().map_err(|e| format!("{e}"))?,
        two_primaries: net.after_sb_2pri().as_str().parse().map_err(|e| format!("{e}"))?,
    })
}

/// `net { cram-hmac-alg sha256; shared-secret S; }`: the engine authenticates every peer
/// connection with HMAC-SHA256. Without cram-hmac-alg there is no authentication (DRBD
/// ignores a lone shared-secret the same way).
fn shared_secret_of(net: &NetOptions) -> Result<Option<Vec<u8>>, String> {
    let Some(alg) = net.cram_hmac_alg.as_deref() else { return Ok(None) };
    if !matches!(alg, "sha256" | "hmac(sha256)") {
        return Err(format!("cram-hmac-alg {alg:?} is not supported (only sha256)"));
    }
    let secret = net.shared_secret.as_deref().ok_or("cram-hmac-alg needs a shared-secret")?;
    drbd_engine::protocol::auth::check_secret(secret.as_bytes())?;
    Ok(Some(secret.as_bytes().to_vec()))
}

/// `disk { on-io-error; }`: detach (DRBD's default) and pass_on; the engine runs no
/// local-io-error handler.
fn on_io_error_of(
    policy: crate::config::OnIoError,
) -> Result<drbd_engine::protocol::OnIoError, String> {
    use crate::config::OnIoError as Words;
    match policy {
        Words::Detach => Ok(drbd_engine::protocol::OnIoError::Detach),
        Words::PassOn => Ok(drbd_engine::protocol::OnIoError::PassOn),
        Words::CallLocalIoError => Err("disk { on-io-error call-local-io-error; } is not \
             supported (no local-io-error handler): use detach or pass_on"
            .to_owned()),
    }
}

/// `net { on-congestion; congestion-fill; congestion-extents; }` for the engine (DRBD's
/// defaults when absent: block, no fill limit). A policy other than block needs protocol A,
/// as in DRBD; the error names the setting.
fn congestion_of(
    net: &NetOptions,
    protocol: Protocol,
) -> Result<drbd_engine::protocol::node::CongestionConfig, String> {
    use crate::config::OnCongestion as Words;
    use drbd_engine::protocol::node::{CongestionConfig, OnCongestion};
    let config = CongestionConfig {
        on_congestion: match net.on_congestion {
            None | Some(Words::Block) => OnCongestion::Block,
            Some(Words::PullAhead) => OnCongestion::PullAhead,
            Some(Words::Disconnect) => OnCongestion::Disconnect,
        },
        fill_bytes: net.congestion_fill_sectors.unwrap_or(0).saturating_mul(512),
        extents: net.congestion_extents.and_then(|extents| usize::try_from(extents).ok()),
    };
    config.check(protocol_of(protocol)).map_err(|e| format!("net {{ }}: {e}"))?;
    Ok(config)
}

fn fencing_of(policy: FencingPolicy) -> Fencing {
    match policy {
        FencingPolicy::DontCare => Fencing::DontCare,
        FencingPolicy::ResourceOnly => Fencing::ResourceOnly,
        FencingPolicy::ResourceAndStonith => Fencing::ResourceAndStonith,
    }
}

pub struct Host {
    pub settings: NodeSettings,
    pub node_name: String,
    pub config_path: PathBuf,
    config: Mutex<Config>,
    slots: Mutex<BTreeMap<String, Arc<Slot>>>,
    events: broadcast::Sender<String>,
    /// The portal's target set, once the portal is up; resources found later are added.
    portal: std::sync::OnceLock<Arc<iscsi_target::Config<ResourceLun>>>,
    /// Target names given per resource by tandem-api (`PUT`), instead of `PREFIX:NAME`.
    target_names: Mutex<BTreeMap<String, String>>,
    /// tandem-api's CHAP identity per resource: the resource's target accepts only it.
    target_chaps: Mutex<BTreeMap<String, iscsi_target::Credentials>>,
    /// Forward links: a Secondary's port serves through the Primary's logical unit.
    pub forwarder: Arc<crate::forward::Forwarder>,
    /// The service IPs that follow each resource's role (node file `service-ip`).
    pub service_ips: crate::service_ip::ServiceIps,
}

/// The tandem-api settings of an API-created resource, beside its `.res` file.
pub fn api_request_path(settings: &NodeSettings, name: &str) -> PathBuf {
    api_resource_directory(settings).join(format!("{name}.json"))
}

/// Target names and CHAP identities recorded by earlier `PUT`s (`NAME.json` beside `NAME.res`).
type StoredTargets = (BTreeMap<String, String>, BTreeMap<String, iscsi_target::Credentials>);

fn stored_target_names(settings: &NodeSettings) -> StoredTargets {
    let mut names = BTreeMap::new();
    let mut chaps = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(api_resource_directory(settings)) else {
        return (names, chaps);
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let (Some(stem), Some("json")) =
            (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|e| e.to_str()))
        else {
            continue;
        };
        let request = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::provision::PutRequest>(&b).ok());
        match request {
            Some(request) => {
                names.insert(stem.to_owned(), request.target_iqn);
                chaps.insert(
                    stem.to_owned(),
                    iscsi_target::Credentials {
                        user: request.chap.username,
                        secret: request.chap.secret,
                    },
                );
            }
            None => tracing::error!(file = %path.display(), "unreadable API request file"),
        }
    }
    (names, chaps)
}

/// Where resources created through the HTTP API keep their (DRBD syntax) files.
pub fn api_resource_directory(settings: &NodeSettings) -> PathBuf {
    settings.state_directory.join("resources")
}

fn marker(settings: &NodeSettings, name: &str) -> PathBuf {
    settings.state_directory.join(format!("{name}.up"))
}

impl Host {
    /// Builds the slots for every resource of `config` that names this node.
    pub fn new(
        settings: NodeSettings,
        node_name: String,
        config_path: PathBuf,
        config: Config,
    ) -> Result<Arc<Host>, String> {
        let (events, _) = broadcast::channel(EVENTS_BUFFER_MAX);
        let forwarder = crate::forward::Forwarder::new(node_name.clone());
        let settings_service_ips = settings.service_ips.clone();
        let host = Arc::new(Host {
            settings,
            node_name,
            config_path,
            config: Mutex::new(Config::default()),
            slots: Mutex::new(BTreeMap::new()),
            events,
            portal: std::sync::OnceLock::new(),
            target_names: Mutex::new(BTreeMap::new()),
            target_chaps: Mutex::new(BTreeMap::new()),
            forwarder,
            service_ips: crate::service_ip::ServiceIps::new(&settings_service_ips),
        });
        let (names, chaps) = stored_target_names(&host.settings);
        *lock(&host.target_names) = names;
        *lock(&host.target_chaps) = chaps;
        host.adopt(config)?;
        Ok(host)
    }

    /// Every hosted resource, by name.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.slots).values().cloned().collect()
    }

    pub fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        lock(&self.slots).get(name).cloned()
    }

    /// Takes a (re)loaded configuration: new resources for this node get a slot (and a target
    /// once the portal runs), existing ones get their settings refreshed.
    fn adopt(&self, config: Config) -> Result<(), String> {
        let mut added = Vec::new();
        {
            let mut slots = lock(&self.slots);
            for slot in slots.values() {
                let plan = match config.resource(&slot.name) {
                    Some(resource) => plan_resource(&self.settings, &self.node_name, resource),
                    None => Err(format!(
                        "{}: no longer in the configuration (or its file is broken)",
                        slot.name
                    )),
                };
                *lock(&slot.plan) = plan;
            }
            for resource in &config.resources {
                if resource.node(&self.node_name).is_none() || slots.contains_key(&resource.name) {
                    continue;
                }
                if slots.len() >= RESOURCES_MAX {
                    return Err(format!("more than {RESOURCES_MAX} resources on this node"));
                }
                let plan = plan_resource(&self.settings, &self.node_name, resource);
                // Internal metadata takes the end of the backing file.
                let size_bytes = plan.as_ref().map_or(0, |p| device_size_bytes(&p.driver));
                let slot = Arc::new(Slot {
                    name: resource.name.clone(),
                    plan: Mutex::new(plan),
                    running: Mutex::new(None),
                    verb_lock: tokio::sync::Mutex::new(()),
                    primary: AtomicBool::new(false),
                    size_bytes: AtomicU64::new(size_bytes),
                    read_bytes: AtomicU64::new(0),
                    written_bytes: AtomicU64::new(0),
                    io: Arc::default(),
                    last_view: Mutex::new(None),
                    split_brain_logged: AtomicBool::new(false),
                    write_gate: tokio::sync::RwLock::new(()),
                    primary_peer: Mutex::new(None),
                    reservations: Default::default(),
                });
                slots.insert(resource.name.clone(), slot.clone());
                added.push(slot);
            }
        }
        *lock(&self.config) = config;
        if self.portal.get().is_some() {
            for slot in added {
                self.export(&slot);
            }
        }
        Ok(())
    }

    /// Starts exporting every resource on the portal's target set (called once it runs).
    pub fn attach_portal(&self, portal: Arc<iscsi_target::Config<ResourceLun>>) {
        if self.portal.set(portal).is_ok() {
            for slot in self.slots() {
                self.export(&slot);
            }
        }
    }

    /// The iSCSI target name of a resource: tandem-api's when it gave one, else `PREFIX:NAME`.
    pub fn target_name(&self, resource: &str) -> String {
        lock(&self.target_names)
            .get(resource)
            .cloned()
            .unwrap_or_else(|| self.settings.target_name(resource))
    }

    /// Records (or with `None` forgets) tandem-api's target name for a resource; takes effect
    /// when the resource's target is (re)created.
    pub fn set_target_name(&self, resource: &str, iqn: Option<String>) {
        let mut names = lock(&self.target_names);
        match iqn {
            Some(iqn) => names.insert(resource.to_owned(), iqn),
            None => names.remove(resource),
        };
    }

    /// Records (or with `None` forgets) tandem-api's CHAP identity for a resource: its
    /// target, when (re)created, accepts logins with these credentials only.
    pub fn set_target_chap(&self, resource: &str, chap: Option<iscsi_target::Credentials>) {
        let mut chaps = lock(&self.target_chaps);
        match chap {
            Some(chap) => chaps.insert(resource.to_owned(), chap),
            None => chaps.remove(resource),
        };
    }

    fn export(&self, slot: &Arc<Slot>) {
        let (Some(portal), Some(volume)) = (self.portal.get(), slot.volume()) else { return };
        if slot.plan().is_ok_and(|plan| plan.diskless) {
            return; // a tiebreaker holds no data to export
        }
        let name = self.target_name(&slot.name);
        if portal.target(&name).is_some() {
            return;
        }
        let device = Arc::new(ResourceLun::with_forwarder(slot.clone(), self.forwarder.clone()));
        let lun = Arc::new(iscsi_target::LogicalUnit::new(&name, u64::from(volume), device));
        let (port_offset, remote_ports) =
            slot.plan().map(|plan| crate::lun::relative_ports(&plan)).unwrap_or_default();
        let mut target =
            iscsi_target::TargetNode::new(name, vec![lun]).with_ports(port_offset, remote_ports);
        if let Some(chap) = lock(&self.target_chaps).get(&slot.name).cloned() {
            target = target
                .with_auth(iscsi_target::AuthConfig { chap: Some(chap), ..Default::default() });
        }
        portal.add_target(target);
    }

    /// Forgets a resource that is down (HTTP delete): its target and its slot.
    pub fn forget(&self, name: &str) {
        if let Some(portal) = self.portal.get() {
            portal.remove_target(&self.target_name(name));
        }
        lock(&self.slots).remove(name);
        self.set_target_name(name, None);
        self.set_target_chap(name, None);
    }

    /// Brings up every resource that was up when tandemd last ran (restart safety: the
    /// engine reads its metadata and resyncs what the bitmaps and activity log say).
    pub async fn restore(self: &Arc<Self>) {
        for slot in &self.slots() {
            if !marker(&self.settings, &slot.name).exists() {
                continue;
            }
            let _guard = slot.verb_lock.lock().await;
            match self.up(slot).await {
                Ok(()) => tracing::info!(resource = %slot.name, "resumed: was up before restart"),
                Err((_, message)) => {
                    tracing::error!(resource = %slot.name, "cannot resume: {message}")
                }
            }
        }
    }

    fn publish(&self, resource: &str, line: String) {
        tracing::info!(resource = %resource, "{line}");
        let _ = self.events.send(line);
    }

    fn view_of(&self, slot: &Slot, plan: &Plan, status: &Status) -> ResourceView {
        let role = status.role;
        let peers = status
            .peers
            .iter()
            .map(|p| {
                let connected = p.connection == ConnectionState::Connected;
                let done_percent = p
                    .resync
                    .as_ref()
                    .map(|r| {
                        if r.blocks_total == 0 {
                            100.0
                        } else {
                            let done = r.blocks_total.saturating_sub(r.blocks_remaining);
                            // Display only: two decimals of a percentage.
                            (done as f64) * 100.0 / (r.blocks_total as f64)
                        }
                    })
                    .or_else(|| p.verify.as_ref().map(|v| v.percent_done()));
                PeerView {
                    name: plan
                        .peer_names
                        .get(&p.node_id.0)
                        .cloned()
                        .unwrap_or_else(|| format!("node-{}", p.node_id.0)),
                    node_id: u32::from(p.node_id.0),
                    connection: p.connection,
                    // As drbdsetup shows it: the role the peer announced, Unknown when apart.
                    role: if connected { p.role } else { Role::Unknown },
                    volumes: vec![PeerVolumeView {
                        number: plan.volume,
                        replication: p.replication,
                        peer_disk: p.disk,
                        out_of_sync_kib: p.out_of_sync_blocks * (BLOCK_SIZE_BYTES / 1024),
                        done_percent,
                        received_kib: status.resync_blocks_received * (BLOCK_SIZE_BYTES / 1024),
                        sent_kib: status.resync_blocks_sent * (BLOCK_SIZE_BYTES / 1024),
                    }],
                }
            })
            .collect();
        ResourceView {
            name: slot.name.clone(),
            node_id: u32::from(status.node_id.0),
            role,
            suspended: false,
            volumes: vec![VolumeView {
                number: plan.volume,
                minor: plan.minor,
                disk: status.disk,
                backing_dev: plan.driver.backing_path.display().to_string(),
                size_kib: status.size_bytes / 1024,
                read_kib: slot.read_bytes.load(Ordering::Relaxed) / 1024,
                written_kib: slot.written_bytes.load(Ordering::Relaxed) / 1024,
                quorum: status.quorum,
                upper_pending: slot.io.in_flight(),
            }],
            peers,
        }
    }

    /// The resource's current state, when it is up.
    pub async fn view(&self, slot: &Slot) -> Option<ResourceView> {
        self.sample(slot).await.map(|(view, _)| view)
    }

    /// Runs a verb and collects its output: (exit code, stdout lines, stderr lines).
    pub async fn run(
        self: &Arc<Self>,
        verb: Verb,
        resource: &str,
        options: crate::control::Options,
    ) -> (i32, Vec<String>, Vec<String>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let request = Request { verb, resource: resource.to_owned(), options };
        let code = self.handle(request, &tx).await;
        drop(tx);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(reply) = rx.recv().await {
            match reply {
                Reply::Line { text } => out.push(text),
                Reply::Error { text } => err.push(text),
                Reply::Progress { .. } => {}
                Reply::Done { .. } => {}
            }
        }
        (code, out, err)
    }

    pub(crate) async fn sample(&self, slot: &Slot) -> Option<(ResourceView, Status)> {
        let device = slot.device()?;
        let plan = slot.plan().ok()?;
        let status = device.status().await.ok()?;
        // A secondary grows when the primary resizes: the LUN reports the device's size.
        slot.size_bytes.store(status.size_bytes, Ordering::Release);
        Some((self.view_of(slot, &plan, &status), status))
    }

    /// Samples every resource, logs and broadcasts what changed (events2 `change` lines).
    pub async fn watch(self: Arc<Self>) {
        loop {
            for slot in &self.slots() {
                let Some((view, status)) = self.sample(slot).await else {
                    *lock(&slot.primary_peer) = None;
                    self.service_ips.set_primary(&slot.name, false);
                    continue;
                };
                let primary_peer = view
                    .peers
                    .iter()
                    .find(|p| p.role == Role::Primary && p.connection == ConnectionState::Connected)
                    .map(|p| p.name.clone());
                let lost = std::mem::replace(&mut *lock(&slot.primary_peer), primary_peer.clone());
                if let Some(lost) = lost.filter(|l| primary_peer.as_ref() != Some(l)) {
                    // Commands forwarded to a primary the engine lost fail now (retryable)
                    // rather than at the forward timeout: the initiator retries them here or
                    // on another path, and this node may be promoted meanwhile.
                    let failed = self.forwarder.link(&lost).map_or(0, |link| link.fail_pending());
                    if failed > 0 {
                        tracing::info!(resource = %slot.name, peer = %lost,
                            "primary lost: {failed} forwarded commands failed (retryable)");
                    }
                }
                let previous = lock(&slot.last_view).replace(view.clone());
                if let Some(previous) = previous {
                    for line in status::change_lines(&previous, &view) {
                        self.publish(&slot.name, line);
                    }
                    // The engine detached a failed disk itself (a metadata write failed): say
                    // which resource and why, once, as DRBD's "Local IO failed" line does.
                    let detached = |v: &status::ResourceView| {
                        v.volumes.iter().all(|volume| volume.disk == DiskState::Diskless)
                    };
                    if let Some(error) = &status.disk_error
                        && !detached(&previous)
                        && detached(&view)
                    {
                        tracing::error!(
                            resource = %slot.name,
                            %error,
                            "local disk failed: disk:Diskless, I/O goes through UpToDate peers; \
                             `tandemadm attach` once the disk has room again (a full resync)"
                        );
                    }
                }
                if status.split_brain && !slot.split_brain_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        resource = %slot.name,
                        "Split-Brain detected but unresolved, dropping connection! Resolve with \
                         'tandemadm secondary' + 'tandemadm connect --discard-my-data' on the \
                         node whose changes to throw away"
                    );
                }
                // Keep the LUN's ALUA state and the service IP in step with the engine's role:
                // a primary without quorum serves nothing (its I/O is held or failed), so
                // initiators move to the node that will take over; a new primary serves once
                // it has read the replicated reservations.
                let serving = crate::autopromote::serves(view.role, status.quorum)
                    && crate::reservations::ensure_loaded(slot).await;
                slot.primary.store(serving, Ordering::Release);
                self.service_ips.set_primary(&slot.name, serving);
            }
            tokio::time::sleep(Duration::from_millis(STATE_POLL_INTERVAL_MS)).await;
        }
    }

    /// The promoter's promotion: `primary` without --force under the resource's verb lock,
    /// then the services (ALUA active/optimized, service IP), as the verb does.
    pub(crate) async fn promote_automatically(&self, slot: &Slot) -> Result<(), DeviceError> {
        let _guard = slot.verb_lock.lock().await;
        let device = slot.device().ok_or(DeviceError::Stopped)?;
        device.promote(false).await?;
        // The LUN serves only once the replicated reservations are read; if they cannot be,
        // the state watcher keeps trying and the LUN stays in standby meanwhile.
        if crate::reservations::ensure_loaded(slot).await {
            slot.primary.store(true, Ordering::Release);
            self.service_ips.set_primary(&slot.name, true);
        }
        Ok(())
    }

    /// Stops a resource's services at once (ALUA standby, service IP removed), without
    /// waiting for the engine: the promoter's first step when a primary loses quorum.
    pub(crate) fn stop_services(&self, slot: &Slot) {
        slot.primary.store(false, Ordering::Release);
        self.service_ips.set_primary(&slot.name, false);
    }

    /// Re-reads the configuration (and the API's resource files).
    pub fn reload(&self) -> Option<String> {
        match crate::loader::load_with(&self.config_path, &api_resource_directory(&self.settings)) {
            Ok(loaded) => {
                for (file, error) in &loaded.broken {
                    tracing::error!(file = %file.display(), "resource file skipped: {error}");
                }
                self.adopt(loaded.config).err()
            }
            Err(error) => Some(error.to_string()),
        }
    }

    fn targets(&self, resource: &str) -> Result<Vec<Arc<Slot>>, (i32, String)> {
        if resource == "all" {
            return Ok(self.slots());
        }
        match self.slot(resource) {
            Some(slot) => Ok(vec![slot]),
            None => {
                let known = lock(&self.config).resource(resource).is_some();
                Err((
                    exit::CONFIG_INVALID,
                    if known {
                        format!("'{resource}' not defined for this host ({})", self.node_name)
                    } else {
                        format!("'{resource}' not defined in your config (for this host).")
                    },
                ))
            }
        }
    }

    /// Runs one tandemadm request; replies go to `out`. Returns the exit code.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request,
        out: &mpsc::UnboundedSender<Reply>,
    ) -> i32 {
        let line = |text: String| {
            let _ = out.send(Reply::Line { text });
        };
        if matches!(request.verb, Verb::Up | Verb::Adjust | Verb::CreateMd)
            && let Some(error) = self.reload()
        {
            let _ = out.send(Reply::Error { text: error });
            return exit::CONFIG_INVALID;
        }
        let slots = match self.targets(&request.resource) {
            Ok(slots) => slots,
            Err((code, message)) => {
                let _ = out.send(Reply::Error { text: message });
                return code;
            }
        };
        if request.verb == Verb::Events2 {
            return self.events2(&slots, &request, out).await;
        }
        if request.verb == Verb::Dump {
            let config = lock(&self.config).clone();
            for slot in &slots {
                if let Some(resource) = config.resource(&slot.name) {
                    line(crate::dump::render(resource));
                }
            }
            return exit::SUCCESS;
        }
        let mut code = exit::SUCCESS;
        for slot in slots {
            // Waits and queries never hold the resource's lock: a `wait-sync` in one
            // terminal must not block `primary` in another.
            let read_only = matches!(
                request.verb,
                Verb::WaitConnect
                    | Verb::WaitSync
                    | Verb::Role
                    | Verb::Cstate
                    | Verb::Dstate
                    | Verb::Status
                    | Verb::ShowGi
            );
            let result = if read_only {
                self.verb(&slot, &request, out).await
            } else {
                let _guard = slot.verb_lock.lock().await;
                self.verb(&slot, &request, out).await
            };
            if let Err((failure, message)) = result {
                let _ = out.send(Reply::Error { text: format!("{}: {message}", slot.name) });
                code = code.max(failure);
            }
        }
        code
    }

    async fn events2(
        &self,
        slots: &[Arc<Slot>],
        request: &Request,
        out: &mpsc::UnboundedSender<Reply>,
    ) -> i32 {
        let mut subscription = self.events.subscribe();
        for slot in slots {
            if let Some((view, _)) = self.sample(slot).await {
                for text in status::events2_lines(&view, "exists", request.options.statistics) {
                    let _ = out.send(Reply::Line { text });
                }
            }
        }
        let _ = out.send(Reply::Line { text: "exists -".into() });
        if request.options.now {
            return exit::SUCCESS;
        }
        let names: Vec<String> = slots.iter().map(|s| s.name.clone()).collect();
        loop {
            match subscription.recv().await {
                Ok(text) => {
                    let wanted = names.iter().any(|n| {
                        text.contains(&format!(" name:{n} "))
                            || text.ends_with(&format!(" name:{n}"))
                    });
                    if wanted && out.send(Reply::Line { text }).is_err() {
                        return exit::SUCCESS;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    let _ = out.send(Reply::Error {
                        text: format!("events2: {lost} events lost (reader too slow)"),
                    });
                }
                Err(broadcast::error::RecvError::Closed) => return exit::SUCCESS,
            }
            if out.is_closed() {
                return exit::SUCCESS;
            }
        }
    }

    fn require_running(&self, slot: &Slot) -> Result<ReplicatedDevice, (i32, String)> {
        slot.device().ok_or_else(|| {
            (
                exit::CONFIG_INVALID,
                format!("resource is down; run 'tandemadm up {}' first", slot.name),
            )
        })
    }

    async fn verb(
        &self,
        slot: &Arc<Slot>,
        request: &Request,
        out: &mpsc::UnboundedSender<Reply>,
    ) -> VerbResult {
        let line = |text: String| {
            let _ = out.send(Reply::Line { text });
        };
        let options = &request.options;
        match request.verb {
            Verb::CreateMd => self.create_md(slot, options.force, out),
            Verb::Up => self.up(slot).await,
            Verb::Adjust => {
                if slot.device().is_none() {
                    return self.up(slot).await;
                }
                let plan = slot.plan().map_err(|e| (exit::CONFIG_INVALID, e))?;
                let changed = lock(&slot.running)
                    .as_ref()
                    .is_some_and(|r| r.started_with != format!("{:?}", plan.driver));
                if changed {
                    return fail(
                        exit::EXEC_ERROR,
                        "the configuration changed, but the engine cannot apply new settings to \
                         a running resource yet; they take effect when tandemd restarts (or \
                         after 'tandemadm down' and a restart)",
                    );
                }
                Ok(())
            }
            Verb::Down => self.down(slot).await,
            Verb::Primary => {
                let device = self.require_running(slot)?;
                match device.promote(options.force).await {
                    Ok(()) | Err(DeviceError::State(StateError::Already(Role::Primary))) => {
                        if !crate::reservations::ensure_loaded(slot).await {
                            return fail(
                                exit::EXEC_ERROR,
                                format!(
                                    "{}: Primary, but the persistent reservations could not be read; the LUN stays in standby (see the log)",
                                    slot.name
                                ),
                            );
                        }
                        slot.primary.store(true, Ordering::Release);
                        self.service_ips.set_primary(&slot.name, true);
                        Ok(())
                    }
                    Err(error) => Err(explain_state_error(&slot.name, "primary", error)),
                }
            }
            Verb::Secondary => {
                let device = self.require_running(slot)?;
                // Refuse new I/O first (ALUA standby), then let the engine drain what is in
                // flight and demote.
                let was_primary = slot.primary.swap(false, Ordering::AcqRel);
                match device.demote().await {
                    Ok(()) => {
                        self.service_ips.set_primary(&slot.name, false);
                        Ok(())
                    }
                    Err(DeviceError::State(StateError::Already(Role::Secondary))) => Ok(()),
                    Err(error) => {
                        slot.primary.store(was_primary, Ordering::Release);
                        Err(explain_state_error(&slot.name, "secondary", error))
                    }
                }
            }
            Verb::Connect | Verb::Disconnect => {
                let device = self.require_running(slot)?;
                let plan = slot.plan().map_err(|e| (exit::CONFIG_INVALID, e))?;
                for (peer, _) in &plan.driver.peers {
                    let result = if request.verb == Verb::Connect {
                        device.connect(*peer, options.discard_my_data).await
                    } else {
                        device.disconnect(*peer).await
                    };
                    result
                        .map_err(|e| explain_state_error(&slot.name, request.verb.as_str(), e))?;
                }
                Ok(())
            }
            Verb::Verify => {
                // drbdadm verify: this node becomes VerifyS towards every peer; the run goes
                // on in the engine (status shows replication:VerifyS done:NN.NN, and
                // out-of-sync blocks found are marked; disconnect/connect resyncs them).
                let device = self.require_running(slot)?;
                let plan = slot.plan().map_err(|e| (exit::CONFIG_INVALID, e))?;
                let first_block = options.start_sector.unwrap_or(0) / (BLOCK_SIZE_BYTES / 512);
                for (peer, _) in &plan.driver.peers {
                    device
                        .verify(*peer, first_block)
                        .await
                        .map_err(|e| explain_state_error(&slot.name, "verify", e))?;
                }
                Ok(())
            }
            Verb::Resize => self.resize(slot, options.size_bytes, out).await,
            Verb::NewCurrentUuid => {
                let device = self.require_running(slot)?;
                if !options.clear_bitmap {
                    return fail(
                        exit::EXEC_ERROR,
                        "new-current-uuid without --clear-bitmap is not supported by the \
                         engine yet; only 'new-current-uuid --clear-bitmap' (skip the initial \
                         sync of a fresh resource) is",
                    );
                }
                device.new_current_uuid_clear_bitmap().await.map_err(|e| {
                    explain_state_error(&slot.name, "new-current-uuid --clear-bitmap", e)
                })
            }
            Verb::WaitConnect | Verb::WaitSync => {
                let device = self.require_running(slot)?;
                let deadline = options
                    .timeout_s
                    .filter(|t| *t > 0)
                    .map(|t| Instant::now() + Duration::from_secs(t));
                let mut last_progress = None;
                loop {
                    let status =
                        device.status().await.map_err(|e| (exit::EXEC_ERROR, e.to_string()))?;
                    // DRBD's wait-connect returns once the handshake is done; the engine says
                    // Connected before that, so also wait for a replication state.
                    let connected = status.peers.iter().all(|p| {
                        p.connection == ConnectionState::Connected
                            && p.replication != ReplicationState::Off
                    });
                    // A diskless tiebreaker (this node or a peer) holds no data: in sync
                    // once connected, as DRBD's wait-sync treats it.
                    let plan = slot.plan().ok();
                    let diskless_here = plan.as_ref().is_some_and(|p| p.diskless);
                    let diskless_peer = |id: NodeId| {
                        plan.as_ref().is_some_and(|p| p.driver.quorum.is_diskless_peer(id))
                    };
                    let synced = (status.disk == DiskState::UpToDate
                        || (diskless_here && status.disk == DiskState::Diskless))
                        && status.peers.iter().all(|p| {
                            p.connection == ConnectionState::Connected
                                && p.replication == ReplicationState::Established
                                && (p.disk == DiskState::UpToDate
                                    || (diskless_peer(p.node_id) && p.disk == DiskState::Diskless))
                        });
                    if (request.verb == Verb::WaitConnect && connected) || synced {
                        return Ok(());
                    }
                    if request.verb == Verb::WaitSync
                        && last_progress.is_none_or(|t: Instant| t.elapsed() >= PROGRESS_INTERVAL)
                    {
                        let plan = slot.plan().ok();
                        for peer in &status.peers {
                            let Some(progress) = &peer.resync else { continue };
                            let name = plan
                                .as_ref()
                                .and_then(|p| p.peer_names.get(&peer.node_id.0).cloned())
                                .unwrap_or_else(|| format!("node-{}", peer.node_id.0));
                            let text = status::progress_line(
                                &slot.name,
                                &name,
                                peer.replication,
                                progress.blocks_total,
                                progress.blocks_remaining,
                                progress.rate_kib_per_s,
                                progress.eta_s,
                            );
                            let _ = out.send(Reply::Progress { text });
                            last_progress = Some(Instant::now());
                        }
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return fail(exit::TIMEOUT, format!("{} timed out", request.verb));
                    }
                    if out.is_closed() {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(WAIT_POLL_INTERVAL_MS)).await;
                }
            }
            Verb::Role | Verb::Cstate | Verb::Dstate | Verb::Status => {
                let Some((view, _)) = self.sample(slot).await else {
                    // Like drbdsetup: `status` of everything lists what is up; naming a
                    // resource that is down is an error.
                    if request.verb == Verb::Status && request.resource == "all" {
                        return Ok(());
                    }
                    return fail(
                        exit::CONFIG_INVALID,
                        format!("No such resource (it is down; 'tandemadm up {}')", slot.name),
                    );
                };
                match request.verb {
                    Verb::Role => line(view.role.to_string()),
                    Verb::Cstate => {
                        for peer in &view.peers {
                            line(peer.connection.to_string());
                        }
                    }
                    Verb::Dstate => {
                        let mut text = view.volumes[0].disk.to_string();
                        for peer in &view.peers {
                            for v in &peer.volumes {
                                text.push('/');
                                text.push_str(&v.peer_disk.to_string());
                            }
                        }
                        line(text);
                    }
                    _ => {
                        let text =
                            status::format_status(&view, options.verbose, options.statistics);
                        line(text.trim_end_matches('\n').to_owned() + "\n");
                    }
                }
                Ok(())
            }
            Verb::ShowGi => {
                let plan = slot.plan().map_err(|e| (exit::CONFIG_INVALID, e))?;
                let meta = open_metadata(&plan.driver)?;
                let u = &meta.uuids;
                for (peer, name) in &plan.peer_names {
                    line(format!(
                        "{:016X}:{:016X}:{:016X}:{:016X}  (current:bitmap-for-{name}:history1:history2)",
                        u.current,
                        u.bitmap[usize::from(*peer)],
                        u.history[0],
                        u.history.get(1).copied().unwrap_or(0)
                    ));
                }
                Ok(())
            }
            Verb::Attach | Verb::Detach => {
                // drbdadm detach: stop using the local disk, serve through the UpToDate peers;
                // attach (as Secondary): the disk is back, the peer resyncs what it marked.
                let device = self.require_running(slot)?;
                let (result, verb) = if request.verb == Verb::Attach {
                    (device.attach().await, "attach")
                } else {
                    (device.detach().await, "detach")
                };
                result.map_err(|e| explain_state_error(&slot.name, verb, e))
            }
            Verb::Invalidate
            | Verb::InvalidateRemote
            | Verb::PauseSync
            | Verb::ResumeSync
            | Verb::Outdate => fail(
                exit::EXEC_ERROR,
                format!(
                    "'{}' is not supported by the replication engine yet (drbd-engine's \
                     ReplicatedDevice has no such operation); nothing was changed",
                    request.verb
                ),
            ),
            Verb::Events2 | Verb::Dump => unreachable!("handled for all resources at once"),
        }
    }

    fn create_md(
        &self,
        slot: &Slot,
        force: bool,
        out: &mpsc::UnboundedSender<Reply>,
    ) -> VerbResult {
        let plan = slot.plan().map_err(|e| (exit::CONFIG_INVALID, e))?;
        let driver = &plan.driver;
        if plan.diskless {
            // drbdadm skips diskless volumes the same way: there is no disk to put metadata on.
            let _ = out.send(Reply::Line { text: crate::diskless::CREATE_MD_NOTE.into() });
            return Ok(());
        }
        if slot.device().is_some() {
            return fail(
                exit::STATE_CHANGE_FAILED,
                "resource is up; run 'tandemadm down' before create-md",
            );
        }
        if driver.size_bytes == 0 || driver.size_bytes % BLOCK_SIZE_BYTES != 0 {
            return fail(
                exit::CONFIG_INVALID,
                format!(
                    "disk {} is missing, empty or not a multiple of 4 KiB; create it first (e.g. \
                     truncate -s 1G {})",
                    driver.backing_path.display(),
                    driver.backing_path.display()
                ),
            );
        }
        let internal = driver.meta_format == MetaFormat::V09Internal;
        if metadata_present(driver) {
            if !force {
                return fail(
                    exit::CONFIG_INVALID,
                    format!(
                        "valid meta data exists at {}{}; refusing to overwrite it (use create-md \
                         --force to start over with empty, Inconsistent metadata)",
                        driver.meta_path.display(),
                        if internal { " (internal, at the end of the disk)" } else { "" }
                    ),
                );
            }
            if !internal {
                std::fs::remove_file(&driver.meta_path).map_err(|e| {
                    (exit::EXEC_ERROR, format!("{}: {e}", driver.meta_path.display()))
                })?;
            }
        }
        if let Some(parent) = driver.meta_path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| (exit::EXEC_ERROR, format!("{}: {e}", parent.display())))?;
        }
        let created = if internal {
            V09File::create_internal(
                &driver.meta_path,
                driver.node_id,
                max_peers(driver),
                u32::try_from(driver.al_extents).unwrap_or(u32::MAX),
            )
        } else {
            open_or_create_metadata(driver)
        };
        let (_, meta) = created.map_err(|e| (exit::EXEC_ERROR, e.to_string()))?;
        slot.size_bytes.store(meta.size_blocks * BLOCK_SIZE_BYTES, Ordering::Release);
        let _ = out.send(Reply::Line { text: "initializing activity log".into() });
        let _ = out.send(Reply::Line {
            text: format!(
                "initializing bitmap ({} KB) to all zero",
                driver.size_bytes / BLOCK_SIZE_BYTES / 8 / 1024
            ),
        });
        let _ =
            out.send(Reply::Line { text: "New drbd meta data block successfully created.".into() });
        Ok(())
    }

    async fn up(&self, slot: &Arc<Slot>) -> VerbResult {
        if slot.device().is_some() {
            return Ok(());
        }
        let plan = slot.plan().map_err(|e| (exit::CONFIG_INVALID, e))?;
        let driver = plan.driver.clone();
        if plan.diskless {
            crate::diskless::prepare(&self.settings).map_err(|e| (exit::EXEC_ERROR, e))?;
        } else if !driver.backing_path.exists() {
            return fail(
                exit::CONFIG_INVALID,
                format!("disk {} does not exist; create it first", driver.backing_path.display()),
            );
        }
        if !plan.diskless && !metadata_present(&driver) {
            return fail(
                exit::CONFIG_INVALID,
                format!(
                    "no valid meta data found at {}{}; run 'tandemadm create-md {}' first",
                    driver.meta_path.display(),
                    if driver.meta_format == MetaFormat::V09Internal { " (internal)" } else { "" },
                    slot.name
                ),
            );
        }
        if driver.meta_format == MetaFormat::V09External
            && driver.meta_path == legacy_metadata_path(&self.settings, &slot.name, plan.volume)
        {
            tracing::info!(
                resource = %slot.name,
                "meta-disk internal: keeping the metadata file {} from before internal metadata \
                 (the whole backing file stays data; drbdmeta reads it as flex-external)",
                driver.meta_path.display()
            );
        }
        let listen = driver.listen;
        let started_with = format!("{driver:?}");
        let (device, engine) =
            EngineRuntime::start(&slot.name, driver).await.map_err(|e| match e {
                StartError::Device(DeviceError::Io(io))
                    if io.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    (
                        exit::EXEC_ERROR,
                        format!("cannot listen on {listen}: address in use (another process)"),
                    )
                }
                other => (exit::EXEC_ERROR, other.to_string()),
            })?;
        // Set before any peer connects, so a fence request always finds its handler.
        if let Some(handler) = plan.fence_handler.clone() {
            device
                .set_fence_handler(Some(handler))
                .await
                .map_err(|e| (exit::EXEC_ERROR, format!("fence-peer handler: {e}")))?;
        }
        slot.size_bytes.store(device.size_bytes(), Ordering::Release);
        *lock(&slot.running) = Some(Running { device, engine, started_with });
        slot.split_brain_logged.store(false, Ordering::Relaxed);
        std::fs::create_dir_all(&self.settings.state_directory)
            .and_then(|()| std::fs::write(marker(&self.settings, &slot.name), b"up\n"))
            .map_err(|e| (exit::EXEC_ERROR, format!("state directory: {e}")))?;
        if let Some((view, _)) = self.sample(slot).await {
            for line in status::events2_lines(&view, "create", false) {
                self.publish(&slot.name, line);
            }
            *lock(&slot.last_view) = Some(view);
        }
        Ok(())
    }

    async fn down(&self, slot: &Arc<Slot>) -> VerbResult {
        let Some(device) = slot.device() else {
            let _ = std::fs::remove_file(marker(&self.settings, &slot.name));
            return Ok(());
        };
        if slot.primary.swap(false, Ordering::AcqRel)
            && let Err(error) = device.demote().await
        {
            slot.primary.store(true, Ordering::Release);
            return Err(explain_state_error(&slot.name, "down", error));
        }
        let view = lock(&slot.last_view).take();
        let running = lock(&slot.running).take();
        if let Some(running) = running {
            drop(running.device);
            if !running.engine.stop().await {
                tracing::warn!(
                    resource = %slot.name,
                    "the engine took over {ENGINE_STOP_TIMEOUT_MS_MAX} ms to release its \
                     listener and files; a quick 'up' may still find the port taken"
                );
            }
        }
        let _ = std::fs::remove_file(marker(&self.settings, &slot.name));
        self.service_ips.set_primary(&slot.name, false);
        if let Some(view) = view {
            for line in status::destroy_lines(&view) {
                self.publish(&slot.name, line);
            }
        }
        Ok(())
    }
}

/// Peer slots in the metadata: as many as the configuration names (at least one), like
/// drbdadm create-md's default.
fn max_peers(driver: &DriverConfig) -> u32 {
    u32::try_from(driver.peers.len().max(1)).unwrap_or(u32::MAX)
}

/// The resource's v09 metadata file with the sizes its configuration gives.
fn open_or_create_metadata(
    driver: &DriverConfig,
) -> Result<(V09File, drbd_engine::protocol::Metadata), drbd_engine::driver::meta_v09::V09Error> {
    V09File::open_or_create(
        &driver.meta_path,
        driver.node_id,
        driver.size_bytes / BLOCK_SIZE_BYTES,
        max_peers(driver),
        u32::try_from(driver.al_extents).unwrap_or(u32::MAX),
    )
}

/// Reads a resource's metadata (never creates it).
fn open_metadata(driver: &DriverConfig) -> Result<drbd_engine::protocol::Metadata, (i32, String)> {
    if driver.meta_format == MetaFormat::V09Internal {
        if !metadata_present(driver) {
            return Err((
                exit::CONFIG_INVALID,
                format!(
                    "no meta data at the end of {}; run create-md first",
                    driver.meta_path.display()
                ),
            ));
        }
        return V09File::open(&driver.meta_path, MetaPlacement::Internal, driver.node_id)
            .map(|(_, meta)| meta)
            .map_err(|e| (exit::CONFIG_INVALID, e.to_string()));
    }
    if !driver.meta_path.exists() {
        return Err((
            exit::CONFIG_INVALID,
            format!("no meta data at {}; run create-md first", driver.meta_path.display()),
        ));
    }
    open_or_create_metadata(driver)
        .map(|(_, meta)| meta)
        .map_err(|e| (exit::CONFIG_INVALID, e.to_string()))
}

/// Turns an engine refusal into drbdsetup's exit code and a message that says what to do.
fn explain_state_error(resource: &str, verb: &str, error: DeviceError) -> (i32, String) {
    let message = match &error {
        DeviceError::State(StateError::NoUpToDateData(disk)) => format!(
            "refusing to become primary: disk is {disk}, no UpToDate data; use 'tandemadm \
             primary --force {resource}' only if you know this node's data is the newest (it \
             becomes the sync source and overwrites the peers)"
        ),
        DeviceError::State(StateError::PeerIsPrimary(peer)) => format!(
            "refusing to become primary: peer node-id {peer} is Primary; run 'tandemadm \
             secondary {resource}' there first"
        ),
        DeviceError::State(StateError::SyncTarget) => format!(
            "refusing to become primary while SyncTarget; wait for the resync ('tandemadm \
             wait-sync {resource}')"
        ),
        DeviceError::State(StateError::Already(role)) => format!("{verb}: already {role}"),
        other => format!("{verb}: {other}"),
    };
    let code = match error {
        DeviceError::State(_) => exit::STATE_CHANGE_FAILED,
        _ => exit::EXEC_ERROR,
    };
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn plan_of(net: &str, handlers: &str) -> Plan {
        let text = format!(
            "resource r0 {{
               net {{ protocol C; {net} }}
               {handlers}
               volume 0 {{ device minor 0; disk /tmp/r0.img; meta-disk internal; }}
               on alpha {{ node-id 0; address 127.0.0.1:7789; }}
               on beta {{ node-id 1; address 127.0.0.1:7790; }}
             }}"
        );
        let config = crate::config::parse_str("r0.res", &text, Path::new("/tmp")).expect("parses");
        let resource = config.resource("r0").expect("r0");
        plan_resource(&NodeSettings::default(), "alpha", resource).expect("plans")
    }

    /// `on-congestion`, `congestion-fill` and `congestion-extents` reach the engine in its
    /// units; a policy other than block needs protocol A and the refusal names the setting.
    #[test]
    fn congestion_settings_reach_the_engine() {
        use drbd_engine::protocol::node::{CongestionConfig, OnCongestion};
        assert_eq!(plan_of("", "").driver.congestion, CongestionConfig::default());
        let net =
            "protocol A; on-congestion pull-ahead; congestion-fill 2M; congestion-extents 100;";
        let plan = plan_of(net, "");
        assert_eq!(
            plan.driver.congestion,
            CongestionConfig {
                on_congestion: OnCongestion::PullAhead,
                fill_bytes: 2 * 1024 * 1024,
                extents: Some(100),
            }
        );
        let plan = plan_of("protocol A; on-congestion disconnect; congestion-fill 1000;", "");
        assert_eq!(plan.driver.congestion.on_congestion, OnCongestion::Disconnect);
        assert_eq!(plan.driver.congestion.fill_bytes, 1000 * 512);
        for net in ["on-congestion pull-ahead;", "protocol B; on-congestion disconnect;"] {
            let text = format!(
                "resource r0 {{
                   net {{ {net} }}
                   volume 0 {{ device minor 0; disk /tmp/r0.img; meta-disk internal; }}
                   on alpha {{ node-id 0; address 127.0.0.1:7789; }}
                   on beta {{ node-id 1; address 127.0.0.1:7790; }}
                 }}"
            );
            let config = crate::config::parse_str("r0.res", &text, Path::new("/tmp")).unwrap();
            let resource = config.resource("r0").unwrap();
            let error = match plan_resource(&NodeSettings::default(), "alpha", resource) {
                Ok(_) => panic!("{net} was accepted"),
                Err(error) => error,
            };
            assert!(error.contains("on-congestion"), "{error}");
            assert!(error.contains("needs protocol A"), "{error}");
        }
    }

    #[test]
    fn on_io_error_reaches_the_engine() {
        use drbd_engine::protocol::OnIoError;
        // DRBD's default is detach.
        assert_eq!(plan_of("", "").driver.on_io_error, OnIoError::Detach);
        let plan = plan_of("", "disk { on-io-error pass_on; }");
        assert_eq!(plan.driver.on_io_error, OnIoError::PassOn);
        let plan = plan_of("", "disk { on-io-error detach; }");
        assert_eq!(plan.driver.on_io_error, OnIoError::Detach);
        let text = "resource r0 {
               disk { on-io-error call-local-io-error; }
               volume 0 { device minor 0; disk /tmp/r0.img; meta-disk internal; }
               on alpha { node-id 0; address 127.0.0.1:7789; }
               on beta { node-id 1; address 127.0.0.1:7790; }
             }";
        let config = crate::config::parse_str("r0.res", text, Path::new("/tmp")).expect("parses");
        let planned =
            plan_resource(&NodeSettings::default(), "alpha", config.resource("r0").unwrap());
        let Err(error) = planned else { panic!("call-local-io-error accepted") };
        assert!(error.contains("call-local-io-error"), "{error}");
    }

    #[test]
    fn csums_and_verify_algorithms_reach_the_engine() {
        let plan = plan_of("csums-alg sha256; csums-after-crash-only yes; verify-alg crc32c;", "");
        assert_eq!(
            plan.driver.digests,
            DigestSettings {
                csums_alg: Some(DigestAlg::Sha256),
                csums_after_crash_only: true,
                verify_alg: Some(DigestAlg::Crc32c),
            }
        );
        assert_eq!(plan_of("", "").driver.digests, DigestSettings::default());
        let text = "resource r0 {
               net { verify-alg md5; }
               volume 0 { device minor 0; disk /tmp/r0.img; meta-disk internal; }
               on alpha { node-id 0; address 127.0.0.1:7789; }
               on beta { node-id 1; address 127.0.0.1:7790; }
             }";
        let config = crate::config::parse_str("r0.res", text, Path::new("/tmp")).expect("parses");
        let error =
            plan_resource(&NodeSettings::default(), "alpha", config.resource("r0").unwrap())
                .expect_err("md5 is not built in");
        assert!(error.contains("verify-alg") && error.contains("md5"), "{error}");
    }

    #[test]
    fn fencing_policy_and_handler_reach_the_engine() {
        let handler = r#"handlers { fence-peer "/usr/lib/drbd/crm-fence-peer.9.sh"; }"#;
        for (net, handlers, fencing, command) in [
            ("", "", Fencing::DontCare, None),
            ("fencing dont-care;", "", Fencing::DontCare, None),
            ("fencing resource-only;", handler, Fencing::ResourceOnly, Some("crm-fence-peer")),
            ("fencing resource-and-stonith;", handler, Fencing::ResourceAndStonith, Some("crm")),
        ] {
            let plan = plan_of(net, handlers);
            assert_eq!(plan.driver.fencing, fencing, "{net}");
            match (plan.fence_handler, command) {
                (None, None) => {}
                (Some(h), Some(part)) => {
                    assert!(h.command.contains(part), "{net}: {}", h.command);
                    assert_eq!((h.resource.as_str(), h.volume), ("r0", 0));
                    assert_eq!(h.timeout_ms, FENCE_HANDLER_TIMEOUT_MS_DEFAULT);
                }
                (got, want) => panic!("{net}: handler {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn meta_disk_maps_to_internal_flex_external_legacy_or_a_refusal() {
        let state = std::env::temp_dir().join(format!("tandem-meta-place-{}", std::process::id()));
        std::fs::create_dir_all(&state).unwrap();
        let settings = NodeSettings { state_directory: state.clone(), ..NodeSettings::default() };
        let disk = Path::new("/srv/r0.img");
        let place = |meta: Option<MetaDisk>| metadata_place(&settings, "r0", 0, disk, &meta);
        let internal = (disk.to_owned(), MetaFormat::V09Internal);
        assert_eq!(place(Some(MetaDisk::Internal)), Ok(internal.clone()));
        assert_eq!(place(None), Ok(internal));
        let md = PathBuf::from("/srv/r0.md");
        assert_eq!(
            place(Some(MetaDisk::External { path: md.clone(), index: None })),
            Ok((md.clone(), MetaFormat::V09External))
        );
        let refused = place(Some(MetaDisk::External { path: md, index: Some(1) })).unwrap_err();
        assert!(refused.contains("indexed external metadata) is not supported"), "{refused}");
        // A deployment from before internal metadata keeps its state-directory file.
        let legacy = state.join("r0.0.md");
        std::fs::write(&legacy, b"").unwrap();
        let kept = place(Some(MetaDisk::Internal));
        std::fs::remove_dir_all(&state).unwrap();
        assert_eq!(kept, Ok((legacy, MetaFormat::V09External)));
    }

    #[test]
    fn split_brain_policies_and_shared_secret_reach_the_engine() {
        use drbd_engine::protocol::{AfterSb0Pri as P0, AfterSb1Pri as P1, AfterSb2Pri as P2};
        for (net, p0, p1, p2) in [
            ("", P0::Disconnect, P1::Disconnect, P2::Disconnect),
            (
                "after-sb-0pri discard-zero-changes; after-sb-1pri consensus; \
                 after-sb-2pri call-pri-lost-after-sb;",
                P0::DiscardZeroChanges,
                P1::Consensus,
                P2::CallPriLostAfterSb,
            ),
            ("after-sb-0pri discard-node-alpha;", P0::DiscardLocal, P1::Disconnect, P2::Disconnect),
            ("after-sb-0pri discard-node-beta;", P0::DiscardRemote, P1::Disconnect, P2::Disconnect),
            (
                "after-sb-0pri discard-least-changes; after-sb-1pri discard-secondary;",
                P0::DiscardLeastChanges,
                P1::DiscardSecondary,
                P2::Disconnect,
            ),
        ] {
            let policies = plan_of(net, "").driver.after_sb;
            assert_eq!(
                (policies.zero_primaries, policies.one_primary, policies.two_primaries),
                (p0, p1, p2),
                "{net}"
            );
        }
        assert_eq!(plan_of("", "").driver.shared_secret, None);
        let plan = plan_of(r#"cram-hmac-alg sha256; shared-secret "open sesame";"#, "");
        assert_eq!(plan.driver.shared_secret.as_deref(), Some(&b"open sesame"[..]));
    }

    #[test]
    fn a_local_disk_none_is_a_diskless_tiebreaker_with_quorum_only() {
        let text = |options: &str| {
            format!(
                "resource r0 {{ {options}
                   volume 0 {{ device minor 0; meta-disk internal; }}
                   on alpha {{ node-id 0; address 127.0.0.1:7789; volume 0 {{ disk /tmp/a.img; }} }}
                   on beta {{ node-id 1; address 127.0.0.1:7790; volume 0 {{ disk /tmp/b.img; }} }}
                   on tie {{ node-id 2; address 127.0.0.1:7791; volume 0 {{ disk none; }} }}
                   connection-mesh {{ hosts alpha beta tie; }} }}"
            )
        };
        let settings = NodeSettings { state_directory: "/var/lib/t".into(), ..Default::default() };
        let config = crate::config::parse_str(
            "r0.res",
            &text("options { quorum majority; }"),
            Path::new("/tmp"),
        )
        .expect("parses");
        let resource = config.resource("r0").expect("r0");
        let tie = plan_resource(&settings, "tie", resource).expect("plans");
        assert!(tie.diskless && tie.driver.quorum.diskless);
        assert_eq!(tie.driver.backing_path, PathBuf::from("/var/lib/t/r0.0.diskless"));
        assert_eq!(tie.driver.meta_path, PathBuf::from("/var/lib/t/r0.0.diskless.md"));
        assert_eq!(tie.driver.meta_format, MetaFormat::V09External);
        assert_eq!(tie.driver.peers.len(), 2);
        let alpha = plan_resource(&settings, "alpha", resource).expect("plans");
        assert!(!alpha.diskless && !alpha.driver.quorum.diskless);
        assert_eq!(alpha.driver.quorum.diskless_peers, [NodeId::new(2).expect("id")]);
        let config = crate::config::parse_str("r0.res", &text(""), Path::new("/tmp")).expect("ok");
        let error = plan_resource(&settings, "tie", config.resource("r0").expect("r0"))
            .expect_err("a diskless node without quorum");
        assert!(error.contains("quorum majority"), "{error}");
    }

    #[test]
    fn unsupported_authentication_settings_are_refused() {
        let plan = |net: &str| {
            let text = format!(
                "resource r0 {{ net {{ {net} }}
                   volume 0 {{ device minor 0; disk /tmp/r0.img; meta-disk internal; }}
                   on alpha {{ node-id 0; address 127.0.0.1:7789; }}
                   on beta {{ node-id 1; address 127.0.0.1:7790; }} }}"
            );
            let config = crate::config::parse_str("r0.res", &text, Path::new("/tmp")).unwrap();
            plan_resource(&NodeSettings::default(), "alpha", config.resource("r0").unwrap())
        };
        let error = plan("cram-hmac-alg sha1; shared-secret s;").err().unwrap();
        assert!(error.contains("only sha256"), "{error}");
        let error = plan("cram-hmac-alg sha256;").err().unwrap();
        assert!(error.contains("needs a shared-secret"), "{error}");
    }
}

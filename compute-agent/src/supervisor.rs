//! The instance supervisor: QEMU processes, their QMP monitors, hot-plug plans executed with
//! rollback, and the resume watcher driven from QMP events. Decisions come from [`crate::attach`]
//! and [`crate::resume`]; this module only acts on them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::attach::{
    AttachmentEvent, AttachmentNames, AttachmentStatus, Compensation, Frontend, SlotTable, Step,
    Undo, VolumeAttachStage, compensations, plan_attach, rollback,
};
use crate::connection_info::{IscsiConnection, Portal, check_name};
use crate::connector::{HostIdentity, connector, generate_initiator_iqn, is_valid_initiator_iqn};
use crate::constants::{
    INSTANCES_MAX, PATH_ROTATE_AFTER_RESUMES, PENDING_DELETE_RETRY_INTERVAL_MS,
    PENDING_DELETES_MAX, QEMU_START_TIMEOUT_MS, QEMU_STOP_TIMEOUT_MS,
    RESUME_PROBE_CONNECT_TIMEOUT_MS,
};
use crate::instance::{Accel, InstancePaths, InstanceSpec, probe_kvm, qemu_args};
use crate::path_proxy::PathProxy;
use crate::process::{Process, is_instance_process};
use crate::qmp::{Event, Qmp, QmpError};
use crate::record::{self, AttachmentRecord, InstanceRecord};
use crate::resume::{Action, ResumeWatcher};
use crate::volume_api::{VolumeApi, VolumeApiConfig, VolumeApiError, VolumeApiErrorKind};

/// Errors with the small kind the API maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    /// tandem-api is unreachable or failing (perhaps temporarily).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<VolumeApiError> for Error {
    fn from(error: VolumeApiError) -> Error {
        let message = error.to_string();
        match error.kind {
            VolumeApiErrorKind::NotFound => Error::NotFound(message),
            VolumeApiErrorKind::BadRequest => Error::BadRequest(message),
            VolumeApiErrorKind::Conflict => Error::Conflict(message),
            VolumeApiErrorKind::Unavailable => Error::Unavailable(message),
            // The agent's own configuration or tandem-api's answers are wrong: an operator's
            // matter, not the caller's.
            VolumeApiErrorKind::Auth | VolumeApiErrorKind::Protocol => Error::Internal(message),
        }
    }
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when a probe shows it runs guests, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// The supervisor's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub qemu: PathBuf,
    pub accel: AccelChoice,
    /// The initiator name QEMU logs in with (Nova's connector `initiator`); `None` uses the
    /// one generated for this host on first start and kept in `STATE_DIR/initiator-iqn`.
    pub initiator_iqn: Option<String>,
    /// This host's address as the storage side sees it (Nova's `my_ip`, the connector's `ip`).
    pub my_ip: String,
    /// This host's name in the connector (Nova's `CONF.host`).
    pub host: String,
    /// tandem-api, for attaching by volume id; `None`: callers bring the connection_info.
    pub volume_api: Option<VolumeApiConfig>,
    /// Attach volumes with several portals through a path proxy (`path_proxy.rs`), so the
    /// guest's disk follows a failover; `false` logs QEMU into the first portal only.
    pub path_proxy: bool,
}

/// This machine's host name (the kernel's), `localhost` when unreadable.
pub fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The initiator name kept in the state directory, created on first use.
fn host_initiator_iqn(state_dir: &std::path::Path, host: &str) -> Result<String, Error> {
    let path = state_dir.join("initiator-iqn");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let iqn = text.trim().to_owned();
            if is_valid_initiator_iqn(&iqn) {
                return Ok(iqn);
            }
            Err(Error::Internal(format!(
                "{} holds {iqn:?}, not an initiator name: fix or remove it",
                path.display()
            )))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut random = [0u8; 6];
            random.copy_from_slice(&random_bytes()[..6]);
            let iqn = generate_initiator_iqn(host, random);
            std::fs::write(&path, format!("{iqn}\n"))
                .map_err(|error| Error::Internal(format!("writing {}: {error}", path.display())))?;
            tracing::info!("generated the initiator name {iqn} (kept in {})", path.display());
            Ok(iqn)
        }
        Err(error) => Err(Error::Internal(format!("reading {}: {error}", path.display()))),
    }
}

/// Nova's server status words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServerStatus {
    Active,
    Paused,
    Shutoff,
    Error,
}

/// One volume attachment of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub volume_id: String,
    pub status: AttachmentStatus,
    pub frontend: Frontend,
    pub names: AttachmentNames,
    pub portal: String,
    pub target_iqn: String,
    pub lun: u32,
    pub attach_ms: u64,
    /// The attachment in tandem-api (attached by volume id), deleted on detach.
    pub attachment_id: Option<String>,
    /// The local portal QEMU logs in through when the volume has several paths.
    pub path_proxy: Option<String>,
    #[serde(skip)]
    steps: Vec<Step>,
    #[serde(skip)]
    connection_info: Value,
    #[serde(skip)]
    slot: usize,
}

struct Running {
    process: Process,
    qmp: Arc<Qmp>,
    watcher: tokio::task::JoinHandle<()>,
}

struct InstanceState {
    running: Option<Running>,
    attachments: BTreeMap<String, Attachment>,
    slots: SlotTable,
    last_error: Option<String>,
}

/// tandem-api attachments the agent gave up but could not delete yet (tandem-api was down):
/// a background task repeats the deletes, so their volumes do not stay `attaching`.
type PendingDeletes = Arc<Mutex<BTreeSet<String>>>;

/// A volume's ways in: every portal of its connection_info, and the path proxy QEMU logs in
/// through when there is more than one (dropped, it closes its connections).
struct VolumePaths {
    portals: Vec<Portal>,
    proxy: Option<PathProxy>,
}

/// Node name -> the paths of its volume, for the resume watcher's probes.
type PortalMap = Arc<Mutex<HashMap<String, VolumePaths>>>;

/// A supervised instance.
pub struct Instance {
    pub id: String,
    pub spec: InstanceSpec,
    pub paths: InstancePaths,
    pub accel: Accel,
    created_unix_s: u64,
    state: tokio::sync::Mutex<InstanceState>,
    watcher: Arc<Mutex<ResumeWatcher>>,
    portals: PortalMap,
    /// The last full view, served while an operation (a login that may take seconds) holds
    /// the instance, so listing servers never waits for an attach.
    last_shown: Mutex<Option<Value>>,
}

impl Instance {
    /// A stopped instance with nothing attached, keeping its files in `dir`.
    fn new(
        id: String,
        spec: InstanceSpec,
        dir: &std::path::Path,
        accel: Accel,
        created_unix_s: u64,
    ) -> Instance {
        let slots = SlotTable::new(spec.hotplug_slots);
        Instance {
            id,
            spec,
            paths: InstancePaths::new(dir),
            accel,
            created_unix_s,
            state: tokio::sync::Mutex::new(InstanceState {
                running: None,
                attachments: BTreeMap::new(),
                slots,
                last_error: None,
            }),
            watcher: Arc::new(Mutex::new(ResumeWatcher::default())),
            portals: Arc::new(Mutex::new(HashMap::new())),
            last_shown: Mutex::new(None),
        }
    }
}

/// The supervisor of every instance on this host.
pub struct Supervisor {
    config: Config,
    identity: HostIdentity,
    volume_api: Option<VolumeApi>,
    pending_deletes: PendingDeletes,
    accel: Accel,
    instances: tokio::sync::Mutex<BTreeMap<String, Arc<Instance>>>,
    serial: AtomicU64,
}

fn now_unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// 16 bytes from the kernel's generator.
fn random_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    if let Ok(mut file) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = file.read_exact(&mut bytes);
    }
    bytes
}

/// A random UUID (version 4) for instance ids.
fn new_uuid() -> String {
    let mut bytes = random_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

impl Supervisor {
    /// Creates the state directory and settles the accelerator (probing KVM when asked to).
    pub async fn new(config: Config) -> Result<Supervisor, Error> {
        std::fs::create_dir_all(config.state_dir.join("instances")).map_err(|error| {
            Error::Internal(format!("creating {}: {error}", config.state_dir.display()))
        })?;
        let accel = match config.accel {
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Auto => {
                if probe_kvm(&config.qemu, &config.state_dir).await {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
        };
        tracing::info!("accelerator: {}", accel.as_str());
        let initiator_iqn = match &config.initiator_iqn {
            Some(iqn) if is_valid_initiator_iqn(iqn) => iqn.clone(),
            Some(iqn) => {
                return Err(Error::BadRequest(format!("{iqn:?} is not an iqn./eui./naa. name")));
            }
            None => host_initiator_iqn(&config.state_dir, &config.host)?,
        };
        let identity =
            HostIdentity { initiator_iqn, host: config.host.clone(), ip: config.my_ip.clone() };
        let volume_api = match &config.volume_api {
            Some(volume_api) => Some(
                VolumeApi::new(volume_api)
                    .map_err(|error| Error::BadRequest(format!("tandem-api: {error}")))?,
            ),
            None => None,
        };
        let pending_deletes = PendingDeletes::default();
        if let Some(volume_api) = &volume_api {
            tracing::info!("tandem-api: {}", volume_api.endpoint_url());
            tokio::spawn(retry_pending_deletes(volume_api.clone(), pending_deletes.clone()));
        }
        let supervisor = Supervisor {
            config,
            identity,
            volume_api,
            pending_deletes,
            accel,
            instances: tokio::sync::Mutex::new(BTreeMap::new()),
            serial: AtomicU64::new(1),
        };
        supervisor.restore().await;
        Ok(supervisor)
    }

    /// Takes back the instances an earlier run of the agent left behind when it crashed: a
    /// QEMU still running is adopted through its QMP socket with the volumes still plugged into
    /// it (a recorded volume QEMU no longer holds goes back to tandem-api); an instance whose
    /// QEMU is gone comes back SHUTOFF with its volumes recorded, as after `stop`.
    async fn restore(&self) {
        let root = self.config.state_dir.join("instances");
        let Ok(entries) = std::fs::read_dir(&root) else { return };
        let mut serial_max = 0;
        for entry in entries.flatten() {
            let dir = entry.path();
            let id = entry.file_name().to_string_lossy().into_owned();
            let record = match record::load(&dir) {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(error) => {
                    tracing::error!("server {id} not restored: {error}");
                    continue;
                }
            };
            let spec: InstanceSpec = match std::fs::read(dir.join("spec.json"))
                .map_err(|error| error.to_string())
                .and_then(|text| serde_json::from_slice(&text).map_err(|e| e.to_string()))
            {
                Ok(spec) => spec,
                Err(error) => {
                    tracing::error!("server {id} not restored: its spec.json: {error}");
                    continue;
                }
            };
            if check_name("id", &id).is_err() || spec.validate().is_err() {
                tracing::error!("server {id} not restored: its id or spec is invalid");
                continue;
            }
            let instance =
                Arc::new(Instance::new(id.clone(), spec, &dir, self.accel, record.created_unix_s));
            let mut state = instance.state.lock().await;
            let plugged = self.adopt_process(&instance, &mut state, record.pid).await;
            let mut kept = 0;
            for attachment in record.attachments {
                serial_max = serial_max.max(serial_of(&attachment.names).unwrap_or(0));
                let in_qemu = plugged
                    .as_ref()
                    .is_none_or(|nodes| nodes.contains(&attachment.names.node_name));
                if in_qemu && self.restore_attachment(&instance, &mut state, &attachment) {
                    kept += 1;
                    // The crash may have come between the hot-plug and `os-complete`; completing
                    // twice is harmless (Cinder answers 204 for an attached attachment).
                    if let (Some(_), Some(attachment_id), Some(volume_api)) =
                        (&plugged, &attachment.attachment_id, &self.volume_api)
                        && let Err(error) = volume_api.attachment_complete(attachment_id).await
                    {
                        tracing::warn!(
                            "server {id}: completing the attachment of {} in tandem-api: {error}",
                            attachment.volume_id
                        );
                    }
                    continue;
                }
                tracing::warn!(
                    "server {id}: volume {} is no longer plugged in; giving it back",
                    attachment.volume_id
                );
                if let Some(attachment_id) = &attachment.attachment_id
                    && let Err(error) = self.delete_attachment(attachment_id).await
                {
                    let later = self.retry_delete_later(attachment_id);
                    tracing::warn!("server {id}: {error}; {later}");
                }
            }
            match (&state.running, &plugged) {
                (Some(running), Some(_)) => tracing::info!(
                    "server {id}: took back QEMU pid {:?} with {kept} volume(s) attached",
                    running.process.pid()
                ),
                _ => tracing::info!("server {id}: restored SHUTOFF with {kept} volume(s) recorded"),
            }
            save_record(&instance, &state);
            drop(state);
            self.instances.lock().await.insert(id, instance);
        }
        self.serial.store(serial_max + 1, Ordering::Relaxed);
    }

    /// Adopts the recorded QEMU process if it is still this instance's and answers on QMP;
    /// returns the block nodes it holds. A process that does not answer is killed.
    async fn adopt_process(
        &self,
        instance: &Arc<Instance>,
        state: &mut InstanceState,
        pid: Option<u32>,
    ) -> Option<BTreeSet<String>> {
        let pid = pid.filter(|pid| is_instance_process(*pid, &instance.paths.qmp_socket))?;
        let qmp = match Qmp::connect(&instance.paths.qmp_socket).await {
            Ok(qmp) => Arc::new(qmp),
            Err(error) => {
                tracing::error!(
                    "server {}: QEMU pid {pid} runs but its QMP does not answer ({error});                      killing it",
                    instance.id
                );
                Process::Adopted { pid }.kill().await;
                return None;
            }
        };
        let nodes: BTreeSet<String> = match qmp.execute("query-named-block-nodes", None).await {
            Ok(Value::Array(nodes)) => nodes
                .iter()
                .filter_map(|node| node["node-name"].as_str().map(str::to_owned))
                .collect(),
            other => {
                tracing::error!(
                    "server {}: listing QEMU's block nodes failed ({other:?}); killing it",
                    instance.id
                );
                Process::Adopted { pid }.kill().await;
                return None;
            }
        };
        let watcher = tokio::spawn(watch(
            instance.id.clone(),
            qmp.clone(),
            instance.watcher.clone(),
            instance.portals.clone(),
        ));
        state.running = Some(Running { process: Process::Adopted { pid }, qmp, watcher });
        Some(nodes)
    }

    /// Puts a recorded attachment back; false when its record no longer makes sense.
    fn restore_attachment(
        &self,
        instance: &Instance,
        state: &mut InstanceState,
        recorded: &AttachmentRecord,
    ) -> bool {
        let Ok(connection) = IscsiConnection::parse(&recorded.connection_info) else {
            return false;
        };
        if state.attachments.contains_key(&recorded.volume_id)
            || !state.slots.claim(recorded.slot, &recorded.volume_id)
        {
            return false;
        }
        // QEMU reconnects to the proxy's port when a path drops: listen there again.
        let proxy = match recorded.path_proxy_port {
            Some(port) => match PathProxy::start(
                connection.paths.iter().map(|path| path.portal.clone()).collect(),
                port,
            ) {
                Ok(proxy) => Some(proxy),
                Err(error) => {
                    tracing::error!(
                        "server {}: volume {}: {error}; its disk cannot fail over until \
                         detached and attached again",
                        instance.id,
                        recorded.volume_id
                    );
                    None
                }
            },
            None => None,
        };
        let path_proxy = recorded.path_proxy_port.map(|port| format!("127.0.0.1:{port}"));
        // The same names give the same plan, so a later detach undoes exactly what exists.
        let steps = plan_attach(
            &through(&connection, proxy.as_ref()),
            &recorded.names,
            &self.identity.initiator_iqn,
            recorded.frontend,
        );
        lock(&instance.portals).insert(
            recorded.names.node_name.clone(),
            VolumePaths {
                portals: connection.paths.iter().map(|path| path.portal.clone()).collect(),
                proxy,
            },
        );
        state.attachments.insert(
            recorded.volume_id.clone(),
            Attachment {
                volume_id: recorded.volume_id.clone(),
                status: AttachmentStatus::Attached,
                frontend: recorded.frontend,
                names: recorded.names.clone(),
                portal: connection.primary.portal.to_string(),
                target_iqn: connection.primary.iqn.clone(),
                lun: connection.primary.lun,
                attach_ms: recorded.attach_ms,
                attachment_id: recorded.attachment_id.clone(),
                path_proxy,
                steps,
                connection_info: recorded.connection_info.clone(),
                slot: recorded.slot,
            },
        );
        true
    }

    /// A path proxy for a volume with several paths to one target and LUN (a Tandem
    /// resource's replicas), listening on `port` (0: any); `None` when QEMU logs in directly.
    fn path_proxy_for(
        &self,
        connection: &IscsiConnection,
        port: u16,
    ) -> Result<Option<PathProxy>, Error> {
        let same_unit = connection
            .paths
            .iter()
            .all(|path| path.iqn == connection.primary.iqn && path.lun == connection.primary.lun);
        if !self.config.path_proxy || connection.paths.len() < 2 || !same_unit {
            return Ok(None);
        }
        let portals = connection.paths.iter().map(|path| path.portal.clone()).collect();
        PathProxy::start(portals, port)
            .map(Some)
            .map_err(|error| Error::Internal(error.to_string()))
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn initiator_iqn(&self) -> &str {
        &self.identity.initiator_iqn
    }

    /// The connector this host hands to tandem-api.
    pub fn connector(&self) -> Value {
        connector(&self.identity)
    }

    /// Attachments whose delete in tandem-api is still being retried.
    pub fn pending_deletes(&self) -> Vec<String> {
        lock(&self.pending_deletes).iter().cloned().collect()
    }

    /// Hands an attachment whose delete failed to the retry task.
    fn retry_delete_later(&self, attachment_id: &str) -> String {
        let mut pending = lock(&self.pending_deletes);
        if pending.len() >= PENDING_DELETES_MAX {
            tracing::error!(
                "too many attachments to delete; {attachment_id} is left in tandem-api"
            );
            return format!(
                "the attachment {attachment_id} is left in tandem-api: delete it with \
                 `cinder attachment-delete`"
            );
        }
        pending.insert(attachment_id.to_owned());
        format!(
            "the agent keeps retrying to delete the attachment {attachment_id} every \
             {PENDING_DELETE_RETRY_INTERVAL_MS} ms"
        )
    }

    /// tandem-api's endpoint, when the agent attaches by volume id.
    pub fn volume_api_endpoint(&self) -> Option<String> {
        self.volume_api.as_ref().map(VolumeApi::endpoint_url)
    }

    /// Creates and boots an instance.
    pub async fn create(&self, id: Option<String>, spec: InstanceSpec) -> Result<Value, Error> {
        spec.validate().map_err(|error| Error::BadRequest(error.to_string()))?;
        let id = id.unwrap_or_else(new_uuid);
        check_name("id", &id).map_err(|error| Error::BadRequest(error.to_string()))?;
        let instance = {
            let mut instances = self.instances.lock().await;
            if instances.contains_key(&id) {
                return Err(Error::Conflict(format!("server {id} exists")));
            }
            if instances.len() >= INSTANCES_MAX {
                return Err(Error::Conflict(format!("at most {INSTANCES_MAX} servers")));
            }
            let dir = self.config.state_dir.join("instances").join(&id);
            std::fs::create_dir_all(&dir)
                .map_err(|error| Error::Internal(format!("creating {}: {error}", dir.display())))?;
            let spec_text = serde_json::to_string_pretty(&spec).unwrap_or_default();
            let _ = std::fs::write(dir.join("spec.json"), spec_text);
            let instance =
                Arc::new(Instance::new(id.clone(), spec, &dir, self.accel, now_unix_s()));
            instances.insert(id.clone(), instance.clone());
            instance
        };
        let mut state = instance.state.lock().await;
        if let Err(error) = self.launch(&instance, &mut state).await {
            state.last_error = Some(error.to_string());
            drop(state);
            self.instances.lock().await.remove(&id);
            return Err(error);
        }
        drop(state);
        Ok(self.show_instance(&instance).await)
    }

    async fn launch(
        &self,
        instance: &Arc<Instance>,
        state: &mut InstanceState,
    ) -> Result<(), Error> {
        assert!(state.running.is_none(), "launch only a stopped instance");
        let paths = &instance.paths;
        for socket in [&paths.qmp_socket, &paths.operator_qmp_socket, &paths.channel_socket] {
            let _ = std::fs::remove_file(socket);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.qemu_log)
            .map_err(|error| Error::Internal(format!("opening the QEMU log: {error}")))?;
        let log_err = log.try_clone().map_err(|error| Error::Internal(error.to_string()))?;
        let args = qemu_args(&instance.spec, paths, instance.accel);
        let mut child = tokio::process::Command::new(&self.config.qemu)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| {
                Error::Internal(format!("starting {}: {error}", self.config.qemu.display()))
            })?;
        let started = Instant::now();
        let qmp = loop {
            if paths.qmp_socket.exists() {
                match Qmp::connect(&paths.qmp_socket).await {
                    Ok(qmp) => break qmp,
                    Err(error)
                        if started.elapsed() > Duration::from_millis(QEMU_START_TIMEOUT_MS) =>
                    {
                        let _ = child.kill().await;
                        return Err(Error::Internal(format!("QMP did not come up: {error}")));
                    }
                    Err(_) => {}
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&paths.qemu_log).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(Error::Internal(format!("QEMU exited at start ({status}): {tail}")));
            }
            if started.elapsed() > Duration::from_millis(QEMU_START_TIMEOUT_MS) {
                let _ = child.kill().await;
                return Err(Error::Internal("QEMU did not create its QMP socket in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let qmp = Arc::new(qmp);
        *lock(&instance.watcher) = ResumeWatcher::default();
        let watcher = tokio::spawn(watch(
            instance.id.clone(),
            qmp.clone(),
            instance.watcher.clone(),
            instance.portals.clone(),
        ));
        tracing::info!(
            "server {} started (pid {:?}, accel {}, QEMU {}) in {} ms",
            instance.id,
            child.id(),
            instance.accel.as_str(),
            qmp.version(),
            started.elapsed().as_millis()
        );
        state.running = Some(Running { process: Process::Owned(child), qmp, watcher });
        save_record(instance, state);
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Arc<Instance>, Error> {
        self.instances
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("server {id} not found")))
    }

    /// Every instance, shown.
    pub async fn list(&self) -> Vec<Value> {
        let instances: Vec<_> = self.instances.lock().await.values().cloned().collect();
        let mut shown = Vec::new();
        for instance in instances {
            shown.push(self.show_instance(&instance).await);
        }
        shown
    }

    pub async fn show(&self, id: &str) -> Result<Value, Error> {
        let instance = self.get(id).await?;
        Ok(self.show_instance(&instance).await)
    }

    async fn show_instance(&self, instance: &Arc<Instance>) -> Value {
        let watcher = lock(&instance.watcher).clone();
        let Ok(mut state) = instance.state.try_lock() else {
            // Busy: the last full view, marked, with the watcher's live figures.
            let mut shown = lock(&instance.last_shown)
                .clone()
                .unwrap_or_else(|| json!({ "id": instance.id, "name": instance.spec.name }));
            shown["task_state"] = json!("busy");
            shown["io_error_resumes"] = json!(watcher.resumes_total);
            shown["paused_on_io_error"] = json!(watcher.is_paused_on_io_error());
            return shown;
        };
        let status = status_of(&mut state).await;
        let attachments: Vec<_> = state.attachments.values().cloned().collect();
        let shown = json!({
            "id": instance.id,
            "name": instance.spec.name,
            "status": status,
            "task_state": null,
            "accel": instance.accel.as_str(),
            "created_unix_s": instance.created_unix_s,
            "spec": instance.spec,
            "paths": instance.paths,
            "pid": state.running.as_ref().and_then(|running| running.process.pid()),
            "hotplug_slots_free": state.slots.free_count(),
            "volume_attachments": attachments,
            "last_error": state.last_error,
            "io_error_resumes": watcher.resumes_total,
            "io_error_pause_ms_max": watcher.pause_ms_max,
            "paused_on_io_error": watcher.is_paused_on_io_error(),
        });
        *lock(&instance.last_shown) = Some(shown.clone());
        shown
    }

    /// Stops the QEMU process (attachments stay recorded and come back on start).
    pub async fn stop(&self, id: &str) -> Result<(), Error> {
        let instance = self.get(id).await?;
        let mut state = instance.state.lock().await;
        stop_process(&instance, &mut state).await;
        Ok(())
    }

    /// Boots a stopped instance again and re-attaches its recorded volumes.
    pub async fn start(&self, id: &str) -> Result<(), Error> {
        let instance = self.get(id).await?;
        let mut state = instance.state.lock().await;
        if status_of(&mut state).await != ServerStatus::Shutoff {
            return Err(Error::Conflict(format!("server {id} is not SHUTOFF")));
        }
        state.running = None;
        self.launch(&instance, &mut state).await?;
        let volumes: Vec<(String, Value, Option<String>)> = state
            .attachments
            .values()
            .map(|attachment| {
                (
                    attachment.volume_id.clone(),
                    attachment.connection_info.clone(),
                    attachment.attachment_id.clone(),
                )
            })
            .collect();
        for (volume_id, connection_info, attachment_id) in volumes {
            if let Some(old) = state.attachments.remove(&volume_id) {
                state.slots.release(&volume_id);
                lock(&instance.portals).remove(&old.names.node_name);
            }
            if let Err(error) = self
                .attach_locked(&instance, &mut state, &volume_id, &connection_info, attachment_id)
                .await
            {
                state.last_error = Some(format!("re-attaching {volume_id}: {error}"));
            }
        }
        save_record(&instance, &state);
        Ok(())
    }

    /// Resumes a paused instance (`cont`), e.g. after the resume watcher gave up.
    pub async fn unpause(&self, id: &str) -> Result<(), Error> {
        let instance = self.get(id).await?;
        let state = instance.state.lock().await;
        let running = state
            .running
            .as_ref()
            .ok_or_else(|| Error::Conflict(format!("server {id} is not running")))?;
        running.qmp.execute("cont", None).await?;
        Ok(())
    }

    /// Stops and forgets an instance, removing its state directory.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let instance = self.get(id).await?;
        {
            let mut state = instance.state.lock().await;
            stop_process(&instance, &mut state).await;
            self.release_volumes(&instance, &mut state).await;
        }
        self.instances.lock().await.remove(id);
        let _ = std::fs::remove_dir_all(&instance.paths.dir);
        Ok(())
    }

    /// Deletes the tandem-api attachments of a stopped instance that is going away, as Nova
    /// does when it deletes a server; a failure is logged, the rest carry on.
    async fn release_volumes(&self, instance: &Instance, state: &mut InstanceState) {
        assert!(state.running.is_none(), "release the volumes of a stopped instance only");
        let attachments = std::mem::take(&mut state.attachments);
        for attachment in attachments.values() {
            state.slots.release(&attachment.volume_id);
            let Some(attachment_id) = &attachment.attachment_id else { continue };
            if let Err(error) = self.delete_attachment(attachment_id).await {
                let later = self.retry_delete_later(attachment_id);
                tracing::warn!(
                    "server {}: volume {} stays attached in tandem-api: {error}; {later}",
                    instance.id,
                    attachment.volume_id
                );
            }
        }
        lock(&instance.portals).clear();
        save_record(instance, state);
    }

    async fn delete_attachment(&self, attachment_id: &str) -> Result<(), Error> {
        let volume_api = self.volume_api.as_ref().ok_or_else(|| {
            Error::Internal(format!(
                "attachment {attachment_id} belongs to tandem-api but the agent has none"
            ))
        })?;
        volume_api.attachment_delete(attachment_id).await.map_err(Error::from)
    }

    /// Stops every instance (daemon shutdown).
    pub async fn shutdown(&self) {
        let instances: Vec<_> = self.instances.lock().await.values().cloned().collect();
        for instance in instances {
            let mut state = instance.state.lock().await;
            stop_process(&instance, &mut state).await;
            // A stopped agent keeps no instance (their volumes go back), unlike one that
            // crashed: its running instances are taken back by the next start.
            self.release_volumes(&instance, &mut state).await;
            record::remove(&instance.paths.dir);
        }
    }

    /// Hot-plugs a volume given its Cinder connection_info.
    pub async fn attach(
        &self,
        id: &str,
        volume_id: Option<String>,
        connection_info: &Value,
    ) -> Result<Attachment, Error> {
        let instance = self.get(id).await?;
        let connection = IscsiConnection::parse(connection_info)
            .map_err(|error| Error::BadRequest(error.to_string()))?;
        let volume_id = volume_id
            .or(connection.volume_id.clone())
            .ok_or_else(|| Error::BadRequest("volumeId is required".into()))?;
        check_name("volumeId", &volume_id).map_err(|error| Error::BadRequest(error.to_string()))?;
        let mut state = instance.state.lock().await;
        self.attach_locked(&instance, &mut state, &volume_id, connection_info, None).await
    }

    /// Attaches a volume by its id, nova's way: an attachment in tandem-api with this host's
    /// connector (the volume goes `attaching`), the connection_info from its answer (or from an
    /// update with the connector), the hot-plug, then `os-complete` (`in-use`). A failure at any
    /// step takes back the steps before it, so the volume returns to `available`.
    pub async fn attach_volume(&self, id: &str, volume_id: &str) -> Result<Attachment, Error> {
        let Some(volume_api) = &self.volume_api else {
            return Err(Error::BadRequest(
                "volumeAttachment needs connection_info: this agent has no tandem-api \
                 (start the daemon with --volume-api)"
                    .into(),
            ));
        };
        check_name("volumeId", volume_id).map_err(|error| Error::BadRequest(error.to_string()))?;
        let instance = self.get(id).await?;
        let mut state = instance.state.lock().await;
        // Refuse what the hot-plug would refuse before tandem-api changes the volume's status.
        if state.running.as_ref().is_none_or(|running| running.qmp.is_closed()) {
            return Err(Error::Conflict(format!("server {id} is not running")));
        }
        if state.attachments.contains_key(volume_id) {
            return Err(Error::Conflict(format!("volume {volume_id} is already attached")));
        }
        if state.slots.free_count() == 0 {
            return Err(Error::Conflict("no free hot-plug slot".into()));
        }
        let connector = self.connector();
        let created = volume_api.attachment_create(volume_id, id, &connector).await?;
        let attachment_id = created.id.clone();
        let mut stage = VolumeAttachStage::AttachmentCreated;
        let result: Result<Attachment, Error> = async {
            let connection_info = match created.connection_info {
                Some(info) => info,
                None => volume_api.attachment_update(&attachment_id, &connector).await?,
            };
            let attachment = self
                .attach_locked(
                    &instance,
                    &mut state,
                    volume_id,
                    &connection_info,
                    Some(attachment_id.clone()),
                )
                .await?;
            stage = VolumeAttachStage::Plugged;
            volume_api.attachment_complete(&attachment_id).await?;
            stage = VolumeAttachStage::Completed;
            Ok(attachment)
        }
        .await;
        let error = match result {
            Ok(attachment) => return Ok(attachment),
            Err(error) => error,
        };
        let mut problems = Vec::new();
        let mut still_plugged = false;
        for compensation in compensations(stage) {
            match compensation {
                Compensation::Unplug => {
                    let Some(attachment) = state.attachments.get(volume_id).cloned() else {
                        continue;
                    };
                    let qmp = state.running.as_ref().map(|running| running.qmp.clone());
                    let errors = match qmp {
                        // As in a detach: stop at the first failure, so nothing is deleted
                        // under a device the guest still holds.
                        Some(qmp) => {
                            let undos = rollback(&attachment.steps, attachment.steps.len());
                            run_undos(&qmp, &undos, false).await
                        }
                        None => Vec::new(),
                    };
                    if errors.is_empty() {
                        state.attachments.remove(volume_id);
                        state.slots.release(volume_id);
                        lock(&instance.portals).remove(&attachment.names.node_name);
                    } else {
                        // QEMU may still use the volume: it stays attached in tandem-api and
                        // recorded here as `error`; a detach finishes the job.
                        still_plugged = true;
                        let failed = attachment
                            .status
                            .next(AttachmentEvent::DetachRequested)
                            .and_then(|status| status.next(AttachmentEvent::DetachFailed));
                        if let (Some(record), Ok(failed)) =
                            (state.attachments.get_mut(volume_id), failed)
                        {
                            record.status = failed;
                        }
                        problems.push(format!(
                            "unplugging: {}; {volume_id} stays attached (status error): \
                             detach it to finish",
                            errors.join("; ")
                        ));
                    }
                }
                Compensation::DeleteAttachment if still_plugged => {}
                Compensation::DeleteAttachment => {
                    if let Err(delete_error) = volume_api.attachment_delete(&attachment_id).await {
                        let later = self.retry_delete_later(&attachment_id);
                        problems.push(format!("{delete_error}; {later}"));
                    }
                }
            }
        }
        save_record(&instance, &state);
        tracing::warn!(
            "server {id}: attaching {volume_id} failed ({error}); rolled back{}",
            if problems.is_empty() {
                String::new()
            } else {
                format!(" with: {}", problems.join("; "))
            }
        );
        if problems.is_empty() {
            return Err(error);
        }
        Err(Error::Internal(format!("{error}; rollback: {}", problems.join("; "))))
    }

    async fn attach_locked(
        &self,
        instance: &Arc<Instance>,
        state: &mut InstanceState,
        volume_id: &str,
        connection_info: &Value,
        attachment_id: Option<String>,
    ) -> Result<Attachment, Error> {
        let connection = IscsiConnection::parse(connection_info)
            .map_err(|error| Error::BadRequest(error.to_string()))?;
        let qmp = match &state.running {
            Some(running) if !running.qmp.is_closed() => running.qmp.clone(),
            _ => return Err(Error::Conflict(format!("server {} is not running", instance.id))),
        };
        if state.attachments.contains_key(volume_id) {
            return Err(Error::Conflict(format!("volume {volume_id} is already attached")));
        }
        let slot = state
            .slots
            .allocate(volume_id)
            .ok_or_else(|| Error::Conflict("no free hot-plug slot".into()))?;
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let names = AttachmentNames::new(
            serial,
            instance.spec.hotplug_bus(slot),
            connection.chap.is_some(),
        );
        let frontend =
            if instance.spec.has_os() { Frontend::VirtioBlk } else { Frontend::NodeOnly };
        let proxy = self.path_proxy_for(&connection, 0)?;
        let via = through(&connection, proxy.as_ref());
        let steps = plan_attach(&via, &names, &self.identity.initiator_iqn, frontend);
        let started = Instant::now();
        for (index, step) in steps.iter().enumerate() {
            let result = qmp
                .execute_with_timeout(
                    step.call.command,
                    Some(step.call.arguments.clone()),
                    step.call.timeout_ms,
                )
                .await;
            if let Err(error) = result {
                let undo_errors = run_undos(&qmp, &rollback(&steps, index), true).await;
                state.slots.release(volume_id);
                let mut message =
                    format!("attaching {volume_id} failed at {}: {error}", step.call.command);
                if !undo_errors.is_empty() {
                    message.push_str(&format!("; rollback: {}", undo_errors.join("; ")));
                }
                tracing::warn!("server {}: {message}", instance.id);
                return Err(match error {
                    QmpError::Command { .. } => Error::BadRequest(message),
                    _ => Error::Internal(message),
                });
            }
        }
        let status = AttachmentStatus::Attaching
            .next(AttachmentEvent::AttachSucceeded)
            .map_err(|error| Error::Internal(error.to_string()))?;
        let attachment = Attachment {
            volume_id: volume_id.to_owned(),
            status,
            frontend,
            portal: connection.primary.portal.to_string(),
            target_iqn: connection.primary.iqn.clone(),
            lun: connection.primary.lun,
            attach_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            attachment_id,
            path_proxy: proxy.as_ref().map(|proxy| proxy.local_portal().to_string()),
            names: names.clone(),
            steps,
            connection_info: connection_info.clone(),
            slot,
        };
        assert_eq!(state.slots.slot_of(volume_id), Some(attachment.slot));
        lock(&instance.portals).insert(
            names.node_name.clone(),
            VolumePaths {
                portals: connection.paths.iter().map(|path| path.portal.clone()).collect(),
                proxy,
            },
        );
        state.attachments.insert(volume_id.to_owned(), attachment.clone());
        save_record(instance, state);
        tracing::info!(
            "server {}: attached {volume_id} on {} in {} ms",
            instance.id,
            names.bus,
            attachment.attach_ms
        );
        Ok(attachment)
    }

    /// Hot-unplugs a volume: device_del (waiting for the guest), blockdev-del, object-del.
    pub async fn detach(&self, id: &str, volume_id: &str) -> Result<(), Error> {
        let instance = self.get(id).await?;
        let mut state = instance.state.lock().await;
        let result = self.detach_locked(&instance, &mut state, volume_id).await;
        save_record(&instance, &state);
        result
    }

    async fn detach_locked(
        &self,
        instance: &Instance,
        state: &mut InstanceState,
        volume_id: &str,
    ) -> Result<(), Error> {
        let id = &instance.id;
        let attachment = state.attachments.get(volume_id).cloned().ok_or_else(|| {
            Error::NotFound(format!("volume {volume_id} is not attached to {id}"))
        })?;
        let detaching = attachment
            .status
            .next(AttachmentEvent::DetachRequested)
            .map_err(|error| Error::Conflict(error.to_string()))?;
        let failed = detaching
            .next(AttachmentEvent::DetachFailed)
            .map_err(|error| Error::Internal(error.to_string()))?;
        let qmp = state
            .running
            .as_ref()
            .filter(|running| !running.qmp.is_closed())
            .map(|running| running.qmp.clone());
        if let Some(record) = state.attachments.get_mut(volume_id) {
            record.status = detaching;
        }
        // Without QEMU nothing is plugged in, only the record remains.
        if let Some(qmp) = qmp {
            let undos = rollback(&attachment.steps, attachment.steps.len());
            let errors = run_undos(&qmp, &undos, false).await;
            if !errors.is_empty() {
                if let Some(record) = state.attachments.get_mut(volume_id) {
                    record.status = failed;
                }
                return Err(Error::Internal(format!(
                    "detaching {volume_id}: {}",
                    errors.join("; ")
                )));
            }
        }
        // QEMU holds nothing of the volume any more.
        state.slots.release(volume_id);
        lock(&instance.portals).remove(&attachment.names.node_name);
        let deleted = match &attachment.attachment_id {
            Some(attachment_id) => self.delete_attachment(attachment_id).await,
            None => Ok(()),
        };
        if let Err(error) = deleted {
            // Unplugged, but tandem-api still has it attached: keep the record with nothing
            // left to unplug, so a repeated DELETE only repeats the tandem-api call.
            if let Some(record) = state.attachments.get_mut(volume_id) {
                record.steps.clear();
                record.status = failed;
            }
            return Err(match error {
                Error::Unavailable(message) => Error::Unavailable(format!(
                    "{volume_id} is unplugged but {message}; repeat the detach"
                )),
                other => other,
            });
        }
        state.attachments.remove(volume_id);
        tracing::info!("server {id}: detached {volume_id}");
        Ok(())
    }

    /// The attachments of an instance.
    pub async fn attachments(&self, id: &str) -> Result<Vec<Attachment>, Error> {
        let instance = self.get(id).await?;
        let state = instance.state.lock().await;
        Ok(state.attachments.values().cloned().collect())
    }
}

/// Repeats the deletes of attachments the agent gave up, until tandem-api takes them. Only an
/// unavailable tandem-api is worth waiting for; any other refusal is logged and dropped.
async fn retry_pending_deletes(volume_api: VolumeApi, pending: PendingDeletes) {
    loop {
        tokio::time::sleep(Duration::from_millis(PENDING_DELETE_RETRY_INTERVAL_MS)).await;
        let attachment_ids: Vec<String> = lock(&pending).iter().cloned().collect();
        for attachment_id in attachment_ids {
            match volume_api.attachment_delete(&attachment_id).await {
                Ok(()) => {
                    tracing::info!("deleted the attachment {attachment_id} in tandem-api");
                    lock(&pending).remove(&attachment_id);
                }
                Err(error) if error.kind == VolumeApiErrorKind::Unavailable => {
                    tracing::debug!("attachment {attachment_id}: {error}; retrying later");
                }
                Err(error) => {
                    tracing::error!("attachment {attachment_id} cannot be deleted: {error}");
                    lock(&pending).remove(&attachment_id);
                }
            }
        }
    }
}

/// Writes what a restarted agent needs to take the instance back; a failure is logged (the
/// instance keeps running, only its recovery after a crash would be incomplete).
/// The connection QEMU is given: through the proxy's local portal when there is one.
fn through(connection: &IscsiConnection, proxy: Option<&PathProxy>) -> IscsiConnection {
    let mut via = connection.clone();
    if let Some(proxy) = proxy {
        via.primary.portal = proxy.local_portal();
    }
    via
}

fn save_record(instance: &Instance, state: &InstanceState) {
    let record = InstanceRecord {
        created_unix_s: instance.created_unix_s,
        pid: state.running.as_ref().and_then(|running| running.process.pid()),
        attachments: state
            .attachments
            .values()
            .map(|attachment| AttachmentRecord {
                volume_id: attachment.volume_id.clone(),
                attachment_id: attachment.attachment_id.clone(),
                connection_info: attachment.connection_info.clone(),
                names: attachment.names.clone(),
                slot: attachment.slot,
                frontend: attachment.frontend,
                attach_ms: attachment.attach_ms,
                path_proxy_port: attachment
                    .path_proxy
                    .as_deref()
                    .and_then(|portal| portal.rsplit_once(':'))
                    .and_then(|(_, port)| port.parse().ok()),
            })
            .collect(),
    };
    if let Err(error) = record::save(&instance.paths.dir, &record) {
        tracing::error!("server {}: recording its state: {error}", instance.id);
    }
}

/// The serial in an attachment's node name (`tandem-node{serial}`).
fn serial_of(names: &AttachmentNames) -> Option<u64> {
    names.node_name.strip_prefix("tandem-node")?.parse().ok()
}

async fn status_of(state: &mut InstanceState) -> ServerStatus {
    let Some(running) = state.running.as_mut() else {
        return ServerStatus::Shutoff;
    };
    if running.process.has_exited() {
        return ServerStatus::Shutoff;
    }
    match running.qmp.execute("query-status", None).await {
        Ok(reply) if reply["running"].as_bool() == Some(true) => ServerStatus::Active,
        Ok(reply) if reply["status"] == "shutdown" => ServerStatus::Shutoff,
        Ok(_) => ServerStatus::Paused,
        Err(_) => ServerStatus::Error,
    }
}

async fn stop_process(instance: &Instance, state: &mut InstanceState) {
    let Some(mut running) = state.running.take() else {
        return;
    };
    // `quit` is a hard stop, like Nova's destroy; the guest's page cache is lost, the
    // volume's acknowledged writes are not (cache=none, flushes go to the target).
    let _ = running.qmp.execute("quit", None).await;
    if !running.process.wait_for_exit(QEMU_STOP_TIMEOUT_MS).await {
        running.process.kill().await;
    }
    running.watcher.abort();
    save_record(instance, state);
    tracing::info!("server {} stopped", instance.id);
}

/// Runs undo steps in order. `best_effort` keeps going after a failure (rollback of a failed
/// attach); otherwise the first failure stops the detach so nothing is deleted under a device
/// the guest still holds. Returns the failures.
async fn run_undos(qmp: &Qmp, undos: &[Undo], best_effort: bool) -> Vec<String> {
    let mut errors = Vec::new();
    for undo in undos {
        let result = match undo {
            Undo::Call(call) => qmp
                .execute_with_timeout(call.command, Some(call.arguments.clone()), call.timeout_ms)
                .await
                .map(drop)
                .map_err(|error| error.to_string()),
            Undo::DeleteDevice { device_id, timeout_ms } => {
                delete_device(qmp, device_id, *timeout_ms).await
            }
        };
        if let Err(error) = result {
            errors.push(error);
            if !best_effort {
                break;
            }
        }
    }
    errors
}

/// `device_del` and wait for the guest to let go (DEVICE_DELETED for this device).
async fn delete_device(qmp: &Qmp, device_id: &str, timeout_ms: u64) -> Result<(), String> {
    let mut events = qmp.subscribe();
    match qmp.execute("device_del", Some(json!({ "id": device_id }))).await {
        Ok(_) => {}
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => return Ok(()),
        Err(error) => return Err(error.to_string()),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                return Err(format!(
                    "the guest did not release {device_id} within {timeout_ms} ms"
                ));
            }
            Ok(Ok(Event::DeviceDeleted { device: Some(device), .. })) if device == device_id => {
                return Ok(());
            }
            Ok(Ok(_)) => {}
            Ok(Err(RecvError::Lagged(_))) => {
                // Events were lost: ask QEMU whether the device still exists.
                let listing = qmp
                    .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
                    .await
                    .map_err(|error| error.to_string())?;
                let present = listing
                    .as_array()
                    .is_some_and(|entries| entries.iter().any(|entry| entry["name"] == device_id));
                if !present {
                    return Ok(());
                }
            }
            Ok(Err(RecvError::Closed)) => return Err("QMP closed while detaching".into()),
        }
    }
}

/// The resume watcher's driver: feeds QMP events into [`ResumeWatcher`] and carries out its
/// actions (probe portals, `cont`).
async fn watch(id: String, qmp: Arc<Qmp>, watcher: Arc<Mutex<ResumeWatcher>>, portals: PortalMap) {
    let mut events = qmp.subscribe();
    let epoch = Instant::now();
    let now_ms = || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    loop {
        let next_poll_ms = lock(&watcher).next_poll_ms();
        let sleep_ms = next_poll_ms.map(|at| at.saturating_sub(now_ms())).unwrap_or(60_000);
        let event = tokio::select! {
            event = events.recv() => Some(event),
            () = tokio::time::sleep(Duration::from_millis(sleep_ms)) => None,
        };
        match event {
            Some(Ok(Event::BlockIoError { node_name, device, reason, operation, .. })) => {
                tracing::warn!(
                    "server {id}: I/O error on {node_name}{device} ({operation}: {reason})"
                );
                lock(&watcher).handle_io_error(&node_name);
            }
            Some(Ok(Event::Stop)) => {
                let io_error = match qmp.execute("query-status", None).await {
                    Ok(reply) => reply["status"] == "io-error",
                    Err(_) => false,
                };
                tracing::info!("server {id}: stopped (io-error: {io_error})");
                lock(&watcher).handle_stopped(io_error, now_ms());
            }
            Some(Ok(Event::Resume)) => {
                tracing::info!("server {id}: running");
                lock(&watcher).handle_resumed(now_ms());
            }
            Some(Ok(Event::Other { name, .. })) if name == "QMP_DISCONNECTED" => return,
            Some(Ok(_)) | Some(Err(RecvError::Lagged(_))) | None => {}
            Some(Err(RecvError::Closed)) => return,
        }
        loop {
            let action = lock(&watcher).poll(now_ms());
            match action {
                Action::Wait => break,
                Action::Probe => {
                    // A volume behind a path proxy is reachable when any of its portals
                    // answers (the proxy picks that one); a direct one only through its first.
                    let targets: Vec<Vec<Portal>> = {
                        let watcher = lock(&watcher);
                        let portals = lock(&portals);
                        let failing = watcher.failing_nodes();
                        portals
                            .iter()
                            .filter(|(node, _)| failing.is_empty() || failing.contains(*node))
                            .map(|(_, paths)| match paths.proxy {
                                Some(_) => paths.portals.clone(),
                                None => paths.portals.iter().take(1).cloned().collect(),
                            })
                            .collect()
                    };
                    let mut reachable = true;
                    for volume in &targets {
                        let mut any = false;
                        for portal in volume {
                            if probe_portal(portal).await {
                                any = true;
                                break;
                            }
                        }
                        reachable &= any;
                    }
                    lock(&watcher).handle_probe(reachable, now_ms());
                }
                Action::Cont => {
                    // Resumes keep failing although the path accepts logins: it fails I/O for
                    // good (a node cut off from its primary). Move the failing volumes'
                    // proxies to their next path before QEMU retries. Not sooner: right after
                    // a failover the survivor answers "standby" until it is promoted, and
                    // closing its connection then only costs libiscsi's reconnect back-off.
                    if lock(&watcher).attempts() >= PATH_ROTATE_AFTER_RESUMES {
                        let failing = lock(&watcher).failing_nodes().clone();
                        for (node, paths) in lock(&portals).iter() {
                            if let Some(proxy) = &paths.proxy
                                && (failing.is_empty() || failing.contains(node))
                            {
                                proxy.rotate();
                                tracing::info!(
                                    "server {id}: {node}: next path first ({})",
                                    proxy.preferred()
                                );
                            }
                        }
                    }
                    tracing::info!("server {id}: volumes reachable again, resuming");
                    if let Err(error) = qmp.execute("cont", None).await {
                        tracing::warn!("server {id}: cont failed: {error}");
                        lock(&watcher).handle_cont_failed(now_ms());
                    }
                }
                Action::GiveUp => {
                    tracing::warn!(
                        "server {id}: volumes keep failing; left paused for an operator"
                    );
                }
            }
        }
        lock(&watcher).clear_failing_if_stable(now_ms());
    }
}

async fn probe_portal(portal: &Portal) -> bool {
    let address = format!("{}:{}", portal.host, portal.port);
    matches!(
        tokio::time::timeout(
            Duration::from_millis(RESUME_PROBE_CONNECT_TIMEOUT_MS),
            tokio::net::TcpStream::connect(address)
        )
        .await,
        Ok(Ok(_))
    )
}

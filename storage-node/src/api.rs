//! tandemd's HTTP control API, for the volume API (`tandem-api`): create, delete, promote,
//! demote and inspect resources, node capacity and health. JSON over HTTP/1.1 with a bearer
//! token; `GET /v1/openapi.json` serves the OpenAPI description. Every route maps onto the
//! same verbs tandemadm uses (`Host::run`), so both see one behaviour.
//!
//! Two create forms: `PUT /v1/resources/{name}` is tandem-api's (peers by node name and
//! control-API URL; the nodes number themselves and reserve their replication endpoints among
//! themselves, see `provision`), `POST /v1/resources` the explicit one (node ids, addresses and
//! disks given). Both write the resource as a DRBD file into the API's include directory
//! (`STATE/resources/NAME.res`), create the metadata and a sparse backing file, and bring the
//! resource up.

use crate::constants::{
    CREATE_SETTLE_MS_MAX, INITIAL_PROMOTION_WAIT_MS_MAX, WAIT_POLL_INTERVAL_MS,
};
use crate::control::{Options, Verb, exit};
use crate::host::{Host, Slot, api_request_path, api_resource_directory};
use crate::peer_client::{self, PeerError};
use crate::provision::{self, Endpoint, NODES_MAX, PutRequest, Refusal};
use crate::status::ResourceView;
use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use drbd_engine::protocol::{ConnectionState, DiskState, Role};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod snapshots;

#[derive(Clone)]
pub struct ApiState {
    pub host: Arc<Host>,
    pub token: String,
    /// Serialises create/delete per resource name, and endpoint reservations node-wide.
    locks: Arc<Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    reservations: Arc<tokio::sync::Mutex<()>>,
}

impl ApiState {
    pub fn new(host: Arc<Host>, token: String) -> ApiState {
        ApiState {
            host,
            token,
            locks: Arc::default(),
            reservations: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Names whose lock nobody holds any more are dropped, so the map stays small.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(name.to_owned()).or_default().clone()
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct CreateNode {
    pub name: String,
    pub node_id: u32,
    /// `IP:PORT` for replication.
    pub address: String,
    /// The backing file (created sparse on this node when missing), or `none` for a
    /// diskless tiebreaker (votes for quorum, holds no data, never primary).
    pub disk: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct CreateRequest {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default = "protocol_c")]
    pub protocol: String,
    pub nodes: Vec<CreateNode>,
    /// As in the PUT form: `off`, `majority` (the default with 3 nodes or more), `all`, N.
    #[serde(default)]
    pub quorum: Option<String>,
    #[serde(default)]
    pub on_no_quorum: Option<String>,
    /// Run the promoter for the resource on this node (when it holds a disk).
    #[serde(default)]
    pub auto_promote: bool,
    #[serde(default)]
    pub preferred_nodes: Vec<String>,
}

impl CreateRequest {
    /// The quorum layout of the request, checked.
    pub fn layout(&self) -> Result<provision::Layout, String> {
        let nodes: Vec<(&str, bool)> =
            self.nodes.iter().map(|n| (n.name.as_str(), n.disk == "none")).collect();
        provision::layout(
            &nodes,
            self.quorum.as_deref(),
            self.on_no_quorum.as_deref(),
            self.auto_promote,
            &self.preferred_nodes,
        )
        .map_err(|Refusal::BadRequest(message)| message)
    }
}

fn protocol_c() -> String {
    "C".into()
}

#[derive(Debug, Default, Deserialize)]
pub struct PromoteRequest {
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Serialize)]
pub struct PeerJson {
    pub name: String,
    pub node_id: u32,
    pub connection: String,
    /// The peer's role as this node knows it (Primary, Secondary, Unknown).
    pub role: String,
    pub replication: String,
    pub peer_disk: String,
    pub out_of_sync_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ExportJson {
    pub portal: String,
    pub target_iqn: String,
    pub lun: u32,
}

/// A resource as tandem-api's node contract (volume-api/node-control-api.yaml, ResourceStatus)
/// describes it, plus DRBD detail: `role` is `primary`/`secondary`, `export` is set where this
/// node serves I/O (Primary).
#[derive(Debug, Serialize)]
pub struct ResourceJson {
    pub name: String,
    pub up: bool,
    pub role: String,
    /// DRBD's disk state word (UpToDate, Inconsistent, ...; Diskless while down).
    pub disk_state: String,
    pub size_bytes: u64,
    pub export: Option<ExportJson>,
    pub target_iqn: String,
    pub lun: Option<u32>,
    pub portal: String,
    pub peers: Vec<PeerJson>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A failed step of a handler: the status and the message, answered as the JSON error.
struct Failure {
    status: StatusCode,
    message: String,
}

fn fail(status: StatusCode, message: impl Into<String>) -> Failure {
    Failure { status, message: message.into() }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

/// The bearer token, checked once for every route but the OpenAPI document.
async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", state.token);
    let given =
        request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    next.run(request).await
}

/// Maps tandemadm's exit codes to HTTP statuses.
fn status_of(code: i32) -> StatusCode {
    match code {
        exit::SUCCESS => StatusCode::OK,
        exit::USAGE => StatusCode::BAD_REQUEST,
        exit::TIMEOUT => StatusCode::GATEWAY_TIMEOUT,
        exit::CONFIG_INVALID => StatusCode::NOT_FOUND,
        exit::STATE_CHANGE_FAILED => StatusCode::CONFLICT,
        _ => StatusCode::NOT_IMPLEMENTED,
    }
}

pub fn valid_name(name: &str) -> bool {
    provision::valid_name(name)
}

fn not_found(name: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no resource {name} on this node"))
}

/// A JSON body, or a 400 that says what is wrong with it (an empty body is `T::default()`
/// where `empty` allows it).
fn parse_body<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    empty: bool,
) -> Result<T, Failure> {
    if empty && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| fail(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

fn resource_json(host: &Host, slot: &Slot, view: Option<ResourceView>) -> ResourceJson {
    let primary = view.as_ref().is_some_and(|v| v.role == Role::Primary);
    let (disk_state, peers) = match &view {
        Some(v) => (
            v.volumes.first().map(|d| d.disk.to_string()).unwrap_or_default(),
            v.peers
                .iter()
                .map(|p| {
                    let volume = p.volumes.first();
                    PeerJson {
                        name: p.name.clone(),
                        node_id: p.node_id,
                        connection: p.connection.to_string(),
                        role: p.role.to_string(),
                        replication: volume.map(|x| x.replication.to_string()).unwrap_or_default(),
                        peer_disk: volume.map(|x| x.peer_disk.to_string()).unwrap_or_default(),
                        out_of_sync_bytes: volume.map_or(0, |x| x.out_of_sync_kib * 1024),
                    }
                })
                .collect(),
        ),
        None => ("Diskless".into(), Vec::new()),
    };
    let target_iqn = host.target_name(&slot.name);
    let portal = host.settings.portal.to_string();
    ResourceJson {
        name: slot.name.clone(),
        up: view.is_some(),
        role: if primary { "primary" } else { "secondary" }.into(),
        disk_state,
        size_bytes: slot.lun_size_bytes(),
        export: match (primary, slot.volume()) {
            (true, Some(lun)) => {
                Some(ExportJson { portal: portal.clone(), target_iqn: target_iqn.clone(), lun })
            }
            _ => None,
        },
        target_iqn,
        lun: slot.volume(),
        portal,
        peers,
    }
}

/// The resource's JSON with `status`, or 404 when this node does not host it.
async fn resource_response(host: &Host, name: &str, status: StatusCode) -> Response {
    match host.slot(name) {
        Some(slot) => {
            let view = host.view(&slot).await;
            (status, Json(resource_json(host, &slot, view))).into_response()
        }
        None => not_found(name),
    }
}

async fn list(State(state): State<ApiState>) -> Response {
    let mut out = Vec::new();
    for slot in state.host.slots() {
        let view = state.host.view(&slot).await;
        out.push(resource_json(&state.host, &slot, view));
    }
    Json(out).into_response()
}

async fn show(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    resource_response(&state.host, &name, StatusCode::OK).await
}

/// Runs a tandemadm verb on a hosted resource: its JSON on success, the mapped error else.
async fn verb(host: &Arc<Host>, verb: Verb, name: &str, options: Options) -> Response {
    if host.slot(name).is_none() {
        return not_found(name);
    }
    let (code, _, err) = host.run(verb, name, options).await;
    if code == exit::SUCCESS {
        resource_response(host, name, StatusCode::OK).await
    } else {
        error(status_of(code), err.join("; "))
    }
}

/// Promote and demote answer 204 on success, as tandem-api's node contract says.
fn no_content(response: Response) -> Response {
    if response.status() == StatusCode::OK {
        StatusCode::NO_CONTENT.into_response()
    } else {
        response
    }
}

async fn promote(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: PromoteRequest = match parse_body(&body, true) {
        Ok(request) => request,
        Err(failure) => return failure.into_response(),
    };
    let options = Options { force: request.force, ..Default::default() };
    no_content(verb(&state.host, Verb::Primary, &name, options).await)
}

async fn demote(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    no_content(verb(&state.host, Verb::Secondary, &name, Options::default()).await)
}

async fn skip_initial_sync(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    let wait = Options { timeout_s: Some(30), ..Default::default() };
    let (code, _, err) = state.host.run(Verb::WaitConnect, &name, wait).await;
    if code != exit::SUCCESS {
        return error(status_of(code), err.join("; "));
    }
    let clear = Options { clear_bitmap: true, ..Default::default() };
    verb(&state.host, Verb::NewCurrentUuid, &name, clear).await
}

/// `POST /v1/resources/{name}/resize {"size_bytes": N, "grow_only": false}`: grows this
/// node's backing file so the device can hold N bytes; on the primary (unless `grow_only`)
/// then grows the device online across the connected peers (`tandemadm resize --size N`).
/// A caller grows every replica's file first (`grow_only` on each node), then asks every node
/// again: secondaries have nothing left to do, the primary resizes. 409 when the primary
/// cannot reach N yet (a peer's file is smaller) or refuses (a resync is running).
async fn resize(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: ResizeRequest = match parse_body(&body, false) {
        Ok(request) => request,
        Err(failure) => return failure.into_response(),
    };
    if request.size_bytes == 0 || !request.size_bytes.is_multiple_of(4096) {
        return error(StatusCode::BAD_REQUEST, "size_bytes must be a positive multiple of 4096");
    }
    let Some(slot) = state.host.slot(&name) else { return not_found(&name) };
    if slot.lun_size_bytes() > request.size_bytes {
        return error(
            StatusCode::BAD_REQUEST,
            "refusing to shrink: size_bytes is below the current size",
        );
    }
    // `size_bytes` is the LUN's, as at create: the device also holds the replicated
    // persistent-reservation area at its end.
    let Some(device_bytes) =
        request.size_bytes.checked_add(crate::reservations::RESERVATION_AREA_BYTES)
    else {
        return error(StatusCode::BAD_REQUEST, "size_bytes is too large");
    };
    if request.grow_only {
        return match state.host.grow_backing(&slot, device_bytes) {
            Ok(_) => resource_response(&state.host, &name, StatusCode::OK).await,
            Err((_, message)) => error(StatusCode::CONFLICT, message),
        };
    }
    let options = Options { size_bytes: Some(device_bytes), ..Default::default() };
    let (code, _, err) = state.host.run(Verb::Resize, &name, options).await;
    match code {
        exit::SUCCESS => resource_response(&state.host, &name, StatusCode::OK).await,
        exit::CONFIG_INVALID => error(StatusCode::NOT_FOUND, err.join("; ")),
        _ => error(StatusCode::CONFLICT, err.join("; ")),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub size_bytes: u64,
    /// Only grow this node's backing file (the first pass over every replica).
    #[serde(default)]
    pub grow_only: bool,
}

/// The resource file a create request describes, in DRBD syntax (drbdadm accepts it).
pub fn render_resource(request: &CreateRequest) -> Result<String, String> {
    if !valid_name(&request.name) {
        return Err(format!("bad resource name {:?} (letters, digits, - _ . only)", request.name));
    }
    if !matches!(request.protocol.as_str(), "A" | "B" | "C") {
        return Err(format!("protocol must be A, B or C, got {:?}", request.protocol));
    }
    if request.nodes.len() < 2 || request.nodes.len() > NODES_MAX {
        return Err(format!("between 2 and {NODES_MAX} nodes, got {}", request.nodes.len()));
    }
    if request.size_bytes == 0 || !request.size_bytes.is_multiple_of(4096) {
        return Err("size_bytes must be a positive multiple of 4096".into());
    }
    let layout = request.layout()?;
    let mut text =
        format!("resource {} {{\n  net {{ protocol {}; }}\n", request.name, request.protocol);
    text.push_str(&provision::options_section(&layout));
    for node in &request.nodes {
        if !valid_name(&node.name) {
            return Err(format!("bad node name {:?}", node.name));
        }
        let address: std::net::SocketAddr = node
            .address
            .parse()
            .map_err(|_| format!("bad address {:?} (IP:PORT)", node.address))?;
        if layout.diskless.contains(&node.name) {
            text.push_str(&format!(
                "  on {} {{\n    node-id {};\n    address {};\n    volume 0 {{\n      device minor \
                 0;\n      disk none;\n    }}\n  }}\n",
                node.name, node.node_id, address
            ));
            continue;
        }
        if node.disk.is_empty()
            || node.disk.contains(|c: char| c.is_whitespace() || c == ';' || c == '"')
        {
            return Err(format!("bad disk path {:?}", node.disk));
        }
        text.push_str(&format!(
            "  on {} {{\n    node-id {};\n    address {};\n    volume 0 {{\n      device minor 0;\n      \
             disk {};\n      meta-disk internal;\n    }}\n  }}\n",
            node.name, node.node_id, address, node.disk
        ));
    }
    text.push_str(&provision::mesh_section(request.nodes.iter().map(|n| n.name.as_str())));
    text.push_str("}\n");
    // Checked by the same reader tandemd uses, so a bad request never becomes a bad file.
    crate::config::parse_str("request", &text, std::path::Path::new("/"))
        .map_err(|e| e.to_string())?;
    Ok(text)
}

async fn create(State(state): State<ApiState>, body: axum::body::Bytes) -> Response {
    let request: CreateRequest = match parse_body(&body, false) {
        Ok(request) => request,
        Err(failure) => return failure.into_response(),
    };
    let host = &state.host;
    let text = match render_resource(&request) {
        Ok(text) => text,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Some(me) = request.nodes.iter().find(|n| n.name == host.node_name) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("no node named {} (this node)", host.node_name),
        );
    };
    let lock = state.lock_for(&request.name);
    let _guard = lock.lock().await;
    if let Some(slot) = host.slot(&request.name) {
        // Idempotent like tandem-api's contract: the same resource again answers 200.
        let file = api_resource_directory(&host.settings).join(format!("{}.res", request.name));
        let same = std::fs::read_to_string(&file).is_ok_and(|existing| existing == text)
            && slot.lun_size_bytes() == request.size_bytes;
        if same && slot.device().is_some() {
            return resource_response(host, &request.name, StatusCode::OK).await;
        }
        return error(
            StatusCode::CONFLICT,
            format!("resource {} exists with other settings", request.name),
        );
    }
    let diskless = me.disk == "none";
    let disk = (!diskless).then(|| PathBuf::from(&me.disk));
    if let Err(failure) = prepare_files(
        host,
        &request.name,
        &text,
        disk.as_deref(),
        request.size_bytes,
        peers_of(request.nodes.len()),
        false,
    ) {
        return failure.into_response();
    }
    if let Err(failure) = bring_up(host, &request.name).await {
        return failure.into_response();
    }
    let layout = request.layout().unwrap_or_default();
    if let Err(failure) = enable_promoter(host, &request.name, &layout, diskless) {
        return failure.into_response();
    }
    resource_response(host, &request.name, StatusCode::CREATED).await
}

/// Writes `text` atomically to `path` (a crash leaves the old file or the new one).
fn write_atomically(path: &std::path::Path, text: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// The resource file, and the backing file sparse at `size_bytes` when missing (or, with
/// `fresh`, replacing whatever an earlier, abandoned attempt left: the new replica must read
/// as zeros, which the initial promotion relies on).
fn prepare_files(
    host: &Host,
    name: &str,
    text: &str,
    disk: Option<&std::path::Path>,
    size_bytes: u64,
    max_peers: u32,
    fresh: bool,
) -> Result<(), Failure> {
    let directory = api_resource_directory(&host.settings);
    let prepared = std::fs::create_dir_all(&directory)
        .and_then(|()| write_atomically(&directory.join(format!("{name}.res")), text.as_bytes()))
        .and_then(|()| {
            // A diskless tiebreaker has no backing file (tandemd gives the engine a
            // placeholder, see `diskless`).
            let Some(disk) = disk else { return Ok(()) };
            if let Some(parent) = disk.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if fresh || !disk.exists() {
                // `meta-disk internal`: room for the metadata after the volume's bytes.
                let backing_bytes = crate::host::internal_backing_bytes(size_bytes, max_peers)
                    .map_err(std::io::Error::other)?;
                let file = std::fs::File::create(disk)?;
                file.set_len(0)?;
                file.set_len(backing_bytes)?;
            }
            Ok(())
        });
    prepared.map_err(|e| fail(StatusCode::INSUFFICIENT_STORAGE, format!("preparing {name}: {e}")))
}

/// With `auto_promote`, records the resource's promoter line and starts the promoter (on a
/// node with a disk: a tiebreaker never promotes).
fn enable_promoter(
    host: &Arc<Host>,
    name: &str,
    layout: &provision::Layout,
    diskless: bool,
) -> Result<(), Failure> {
    if !layout.auto_promote || diskless {
        return Ok(());
    }
    let settings = crate::autopromote::PromoterSettings {
        resource: name.to_owned(),
        preferred_nodes: layout.preferred_nodes.clone(),
    };
    crate::autopromote::enable_api_promoter(host, settings).map_err(|e| {
        fail(StatusCode::INSUFFICIENT_STORAGE, format!("recording {name}'s promoter: {e}"))
    })
}

/// Metadata peer slots for a resource of `nodes` nodes (create-md's default, max-peers).
fn peers_of(nodes: usize) -> u32 {
    u32::try_from(nodes.saturating_sub(1).max(1)).unwrap_or(u32::MAX)
}

/// create-md when there is no metadata yet, then up (both re-read the configuration, which
/// gives the resource its slot and its target).
async fn bring_up(host: &Arc<Host>, name: &str) -> Result<(), Failure> {
    let has_metadata = host
        .slot(name)
        .and_then(|slot| slot.plan().ok())
        .is_some_and(|plan| crate::host::metadata_present(&plan.driver));
    let verbs: &[Verb] = if has_metadata { &[Verb::Up] } else { &[Verb::CreateMd, Verb::Up] };
    for verb_name in verbs {
        let (code, _, err) = host.run(*verb_name, name, Options::default()).await;
        if code != exit::SUCCESS {
            let status = match status_of(code) {
                // A resource this node was just told to create is not "not found": its
                // configuration is what is wrong.
                StatusCode::NOT_FOUND => StatusCode::CONFLICT,
                other => other,
            };
            return Err(fail(status, format!("{verb_name}: {}", err.join("; "))));
        }
    }
    Ok(())
}

/// This node's replication endpoint for `name`, reserved on first use and kept in
/// `STATE/endpoints/NAME.json` until the resource is deleted.
async fn reserve_endpoint(state: &ApiState, name: &str) -> Result<Endpoint, Failure> {
    let host = &state.host;
    let _guard = state.reservations.lock().await;
    let path = endpoint_path(host, name);
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(endpoint) = serde_json::from_slice::<Endpoint>(&bytes)
    {
        return Ok(endpoint);
    }
    let ip = host.settings.replication_ip().map_err(|e| fail(StatusCode::CONFLICT, e))?;
    // Ports of every resource this node hosts, and of every reservation.
    let mut taken = std::collections::BTreeSet::new();
    for slot in host.slots() {
        if let Ok(plan) = slot.plan() {
            taken.insert(plan.driver.listen.port());
        }
    }
    if let Ok(entries) = std::fs::read_dir(endpoint_directory(host)) {
        for entry in entries.filter_map(Result::ok) {
            let endpoint = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Endpoint>(&b).ok());
            if let Some(endpoint) = endpoint {
                taken.insert(endpoint.address.port());
            }
        }
    }
    let range = host.settings.replication_ports;
    let port = provision::choose_port(range, &taken, |port| {
        std::net::TcpListener::bind((ip, port)).is_ok()
    })
    .ok_or_else(|| {
        fail(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("no free replication port in {}-{} on {ip}", range.0, range.1),
        )
    })?;
    let endpoint = Endpoint {
        node: host.node_name.clone(),
        address: std::net::SocketAddr::new(ip, port),
        disk: host.settings.state_directory.join("volumes").join(format!("{name}.img")),
        minor: u32::from(port - range.0),
    };
    let stored = std::fs::create_dir_all(endpoint_directory(host))
        .and_then(|()| write_atomically(&path, &serde_json::to_vec(&endpoint).unwrap_or_default()));
    stored.map_err(|e| {
        fail(StatusCode::INSUFFICIENT_STORAGE, format!("recording the endpoint: {e}"))
    })?;
    Ok(endpoint)
}

fn endpoint_directory(host: &Host) -> PathBuf {
    host.settings.state_directory.join("endpoints")
}

fn endpoint_path(host: &Host, name: &str) -> PathBuf {
    endpoint_directory(host).join(format!("{name}.json"))
}

/// `POST /v1/resources/{name}/replication-endpoint`: what a peer asks while creating `name`.
async fn replication_endpoint(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    if !provision::valid_name(&name) {
        return error(StatusCode::BAD_REQUEST, format!("bad resource name {name:?}"));
    }
    if let Err(failure) = config_resource_conflict(&state.host, &name) {
        return failure.into_response();
    }
    match reserve_endpoint(&state, &name).await {
        Ok(endpoint) => Json(endpoint).into_response(),
        Err(failure) => failure.into_response(),
    }
}

/// The 409 for a resource the administrator's configuration defines: the API neither
/// creates, reserves for, nor deletes it.
fn config_resource_conflict(host: &Host, name: &str) -> Result<(), Failure> {
    let hosted = host.slot(name).is_some();
    if hosted && !api_resource_directory(&host.settings).join(format!("{name}.res")).exists() {
        return Err(fail(
            StatusCode::CONFLICT,
            format!(
                "{name} is defined in {}, not through the API; change it there",
                host.config_path.display()
            ),
        ));
    }
    Ok(())
}

fn peer_failure(error_value: PeerError) -> Response {
    match &error_value {
        PeerError::Unreachable { .. } => {
            error(StatusCode::SERVICE_UNAVAILABLE, error_value.to_string())
        }
        PeerError::Refused { status: 409, .. } => {
            error(StatusCode::CONFLICT, error_value.to_string())
        }
        _ => error(StatusCode::BAD_GATEWAY, error_value.to_string()),
    }
}

/// tandem-api's create (`PUT /v1/resources/{name}`, volume-api/node-control-api.yaml):
/// idempotent (the same request again answers 200 with the export, another one 409).
async fn put_resource(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: PutRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")),
    };
    let host = &state.host;
    let layout = match provision::check(&name, &host.node_name, &request)
        .and_then(|()| provision::layout_of(&host.node_name, &request))
    {
        Ok(layout) => layout,
        Err(Refusal::BadRequest(message)) => return error(StatusCode::BAD_REQUEST, message),
    };
    let diskless = layout.diskless.contains(&host.node_name);
    if let Err(failure) = snapshots::check_source(&state, &request) {
        return failure.into_response();
    }
    let lock = state.lock_for(&name);
    let _guard = lock.lock().await;
    if let Err(failure) = config_resource_conflict(host, &name) {
        return failure.into_response();
    }
    let request_path = api_request_path(&host.settings, &name);
    let earlier = std::fs::read(&request_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<PutRequest>(&b).ok());
    if earlier.as_ref().is_some_and(|earlier| *earlier != request) {
        return error(
            StatusCode::CONFLICT,
            format!("resource {name} exists with other settings (size, role, peers, IQN or CHAP)"),
        );
    }
    // Endpoints: this node's, then each peer's (the peer reserves it when asked).
    let mut endpoints = match reserve_endpoint(&state, &name).await {
        Ok(endpoint) => vec![endpoint],
        Err(failure) => return failure.into_response(),
    };
    for peer in &request.peers {
        let path = format!("/v1/resources/{name}/replication-endpoint");
        match peer_client::call::<Endpoint>(&peer.url, &state.token, "POST", &path, None).await {
            Ok(endpoint) if endpoint.node == peer.node => endpoints.push(endpoint),
            Ok(endpoint) => {
                return error(
                    StatusCode::CONFLICT,
                    format!(
                        "peer {} at {} answers as node {}; check tandem-api's node list",
                        peer.node, peer.url, endpoint.node
                    ),
                );
            }
            Err(e) => return peer_failure(e),
        }
    }
    let ids = provision::node_ids(endpoints.iter().map(|e| e.node.as_str()));
    let text = match provision::render_with(&name, &request.protocol, &endpoints, &ids, &layout) {
        Ok(text) => text,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let res_path = api_resource_directory(&host.settings).join(format!("{name}.res"));
    let running = host.slot(&name).is_some_and(|slot| slot.device().is_some());
    if running && std::fs::read_to_string(&res_path).ok().as_deref() != Some(text.as_str()) {
        return error(
            StatusCode::CONFLICT,
            format!("resource {name} is up with other endpoints; delete it and create it again"),
        );
    }
    let fresh = earlier.is_none();
    if fresh {
        // The request is recorded first: a retry after a crash from here on resumes.
        let recorded =
            std::fs::create_dir_all(api_resource_directory(&host.settings)).and_then(|()| {
                write_atomically(&request_path, &serde_json::to_vec(&request).unwrap_or_default())
            });
        if let Err(e) = recorded {
            return error(StatusCode::INSUFFICIENT_STORAGE, format!("recording {name}: {e}"));
        }
        // Metadata an abandoned attempt left would not match the fresh disk.
        let _ = std::fs::remove_file(host.settings.state_directory.join(format!("{name}.0.md")));
    }
    host.set_target_name(&name, Some(request.target_iqn.clone()));
    // The volume's target accepts tandem-api's CHAP identity for it, and no other.
    host.set_target_chap(
        &name,
        Some(iscsi_target::Credentials {
            user: request.chap.username.clone(),
            secret: request.chap.secret.clone(),
        }),
    );
    let source = provision::source_of(&request).ok().flatten();
    let disk = &endpoints[0].disk;
    // Metadata slots for the peers with a disk: a bitmap is kept only against those (the
    // same count on every node, as they all see the same layout).
    let max_peers = peers_of(endpoints.len());
    if let Some(source) = &source
        && (fresh || !disk.exists())
    {
        // `meta-disk internal`: room for this resource's own metadata after the data.
        let backing_bytes = match crate::host::internal_backing_bytes(request.size_bytes, max_peers)
        {
            Ok(bytes) => bytes,
            Err(message) => return error(StatusCode::INSUFFICIENT_STORAGE, message),
        };
        if let Err(failure) =
            snapshots::fill_from_source(&state, &name, source, disk, backing_bytes).await
        {
            return failure.into_response();
        }
    }
    let blank = fresh && source.is_none();
    let disk = (!diskless).then_some(disk.as_path());
    if let Err(failure) =
        prepare_files(host, &name, &text, disk, request.size_bytes, max_peers, blank)
    {
        return failure.into_response();
    }
    if let Err(failure) = bring_up(host, &name).await {
        return failure.into_response();
    }
    if let Err(failure) = enable_promoter(host, &name, &layout, diskless) {
        return failure.into_response();
    }
    match request.role {
        // A tiebreaker has nothing to wait for: it serves no I/O.
        provision::Role::Secondary if diskless => {}
        provision::Role::Primary => {
            let inconsistent = match host.slot(&name) {
                Some(slot) => host.view(&slot).await.is_some_and(|v| {
                    v.role != Role::Primary
                        && v.volumes.iter().all(|d| d.disk == DiskState::Inconsistent)
                }),
                None => false,
            };
            // Only a replica that never held data is promoted here: a retried create of a
            // volume that failed over since must not take the primary role back.
            if fresh || inconsistent {
                tokio::spawn(initial_promotion(host.clone(), name.clone()));
            }
        }
        provision::Role::Secondary => settle_secondary(&state, &name, &request).await,
    }
    let export = ExportJson {
        portal: host.settings.portal.to_string(),
        target_iqn: request.target_iqn.clone(),
        lun: 0,
    };
    let status = if fresh { StatusCode::CREATED } else { StatusCode::OK };
    (status, Json(export)).into_response()
}

/// The primary of a new resource: once every peer is connected, a resource that never held
/// data (every replica Inconsistent: no node was ever UpToDate, so no write was ever
/// acknowledged and every replica still reads as the zeros it was created with) skips the
/// initial sync (`new-current-uuid --clear-bitmap`); then it is promoted. tandem-api creates
/// the replicas one after another, so this waits for the peers in the background.
async fn initial_promotion(host: Arc<Host>, name: String) {
    let deadline = Instant::now() + Duration::from_millis(INITIAL_PROMOTION_WAIT_MS_MAX);
    while Instant::now() < deadline {
        let Some(slot) = host.slot(&name) else { return };
        let Some(view) = host.view(&slot).await else { return };
        if view.role == Role::Primary {
            return;
        }
        // A diskless tiebreaker replicates nothing: connected is all it can be.
        let tiebreaker = |p: &crate::status::PeerView| {
            p.volumes.iter().all(|v| v.peer_disk == DiskState::Diskless)
        };
        let connected = !view.peers.is_empty()
            && view.peers.iter().all(|p| {
                p.connection == ConnectionState::Connected
                    && (tiebreaker(p)
                        || p.volumes
                            .iter()
                            .all(|v| v.replication != drbd_engine::protocol::ReplicationState::Off))
            });
        if connected {
            let never_written = view.volumes.iter().all(|v| v.disk == DiskState::Inconsistent)
                && view
                    .peers
                    .iter()
                    .filter(|p| !tiebreaker(p))
                    .all(|p| p.volumes.iter().all(|v| v.peer_disk == DiskState::Inconsistent));
            if never_written {
                let clear = Options { clear_bitmap: true, ..Default::default() };
                let (code, _, err) = host.run(Verb::NewCurrentUuid, &name, clear).await;
                if code != exit::SUCCESS {
                    tracing::warn!(resource = %name, "skipping the initial sync: {}", err.join("; "));
                }
            }
            let (code, _, err) = host.run(Verb::Primary, &name, Options::default()).await;
            if code == exit::SUCCESS {
                tracing::info!(resource = %name, "promoted: initial primary of a new resource");
                return;
            }
            if err.iter().any(|e| e.contains("is Primary")) {
                tracing::warn!(resource = %name, "not promoted: a peer is Primary already");
                return;
            }
            tracing::debug!(resource = %name, "initial promotion not yet: {}", err.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(WAIT_POLL_INTERVAL_MS)).await;
    }
    tracing::warn!(
        resource = %name,
        "not promoted: the peers did not come up within {INITIAL_PROMOTION_WAIT_MS_MAX} ms"
    );
}

/// A new secondary answers once it is connected with UpToDate data and a peer reports itself
/// primary (so the volume serves I/O when tandem-api calls it available), or after
/// `CREATE_SETTLE_MS_MAX` (the resource exists either way; the primary promotes on its own).
async fn settle_secondary(state: &ApiState, name: &str, request: &PutRequest) {
    let deadline = Instant::now() + Duration::from_millis(CREATE_SETTLE_MS_MAX);
    let host = &state.host;
    while Instant::now() < deadline {
        let ready = match host.slot(name) {
            Some(slot) => host.view(&slot).await.is_some_and(|view| {
                view.volumes.iter().all(|v| v.disk == DiskState::UpToDate)
                    && view.peers.iter().all(|p| p.connection == ConnectionState::Connected)
            }),
            None => return,
        };
        if ready {
            for peer in &request.peers {
                let path = format!("/v1/resources/{name}");
                let status = peer_client::call::<serde_json::Value>(
                    &peer.url,
                    &state.token,
                    "GET",
                    &path,
                    None,
                )
                .await;
                if status.is_ok_and(|s| s["role"] == "primary") {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(WAIT_POLL_INTERVAL_MS * 2)).await;
    }
    tracing::warn!(resource = %name, "answering before a primary was seen");
}

/// `DELETE /v1/resources/{name}`: down, then the resource file, tandem-api's settings, the
/// metadata, the backing file and the endpoint reservation. A missing resource is 404 (its
/// leftovers, such as a reservation a peer made, are removed all the same).
async fn delete(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    let host = &state.host;
    if !provision::valid_name(&name) {
        return error(StatusCode::BAD_REQUEST, format!("bad resource name {name:?}"));
    }
    let lock = state.lock_for(&name);
    let _guard = lock.lock().await;
    if let Err(failure) = config_resource_conflict(host, &name) {
        return failure.into_response();
    }
    let slot = host.slot(&name);
    // The promoter first, so it does not act on a resource going down.
    crate::autopromote::disable_api_promoter(host, &name);
    if slot.is_some() {
        let (code, _, err) = host.run(Verb::Down, &name, Options::default()).await;
        if code != exit::SUCCESS {
            return error(status_of(code), err.join("; "));
        }
    }
    let mut files = vec![
        api_resource_directory(&host.settings).join(format!("{name}.res")),
        api_request_path(&host.settings, &name),
        host.settings.state_directory.join(format!("{name}.0.md")),
    ];
    if let Some(Ok(plan)) = slot.as_ref().map(|s| s.plan()) {
        files.push(plan.driver.meta_path.clone());
        files.push(plan.driver.backing_path.clone());
        files.push(backing_store::atomic_journal::journal_path(&plan.driver.backing_path));
        snapshots::remove_all(&plan.driver.backing_path);
    }
    let endpoint = std::fs::read(endpoint_path(host, &name))
        .ok()
        .and_then(|b| serde_json::from_slice::<Endpoint>(&b).ok());
    if let Some(endpoint) = endpoint {
        snapshots::remove_all(&endpoint.disk);
        files.push(backing_store::atomic_journal::journal_path(&endpoint.disk));
        files.push(endpoint.disk);
    }
    // The reservation goes last: while it exists, its port stays taken.
    files.push(endpoint_path(host, &name));
    let existed = slot.is_some() || files.iter().any(|f| f.exists());
    for file in &files {
        let _ = std::fs::remove_file(file);
    }
    host.forget(&name);
    if slot.is_some() {
        StatusCode::NO_CONTENT.into_response()
    } else if existed {
        // Leftovers of an unfinished create, now gone.
        StatusCode::NO_CONTENT.into_response()
    } else {
        not_found(&name)
    }
}

async fn node(State(state): State<ApiState>) -> Response {
    let host = &state.host;
    // The state directory may not exist before the first resource; its file system does.
    let measured = host.settings.state_directory.ancestors().find(|p| p.exists());
    let capacity = measured.and_then(|p| nix::sys::statvfs::statvfs(p).ok()).map(|s| {
        let fragment = s.fragment_size();
        json!({
            "total_bytes": s.blocks() * fragment,
            "free_bytes": s.blocks_available() * fragment,
        })
    });
    let total = capacity.as_ref().map_or(0, |c| c["total_bytes"].as_u64().unwrap_or(0));
    let free = capacity.as_ref().map_or(0, |c| c["free_bytes"].as_u64().unwrap_or(0));
    Json(json!({
        "name": host.node_name,
        "availability_zone": host.settings.availability_zone,
        "total_bytes": total,
        "free_bytes": free,
        "node": host.node_name,
        "portal": host.settings.portal.to_string(),
        "resources": host.slots().len(),
        "capacity": capacity,
        "healthy": true,
    }))
    .into_response()
}

async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub fn router(state: ApiState) -> axum::Router {
    let public = axum::Router::new().route("/v1/openapi.json", get(openapi));
    axum::Router::new()
        .route("/v1/node", get(node))
        .route("/v1/resources", get(list).post(create))
        .route("/v1/resources/{name}", get(show).delete(delete).put(put_resource))
        .route("/v1/resources/{name}/promote", post(promote))
        .route("/v1/resources/{name}/demote", post(demote))
        .route("/v1/resources/{name}/skip-initial-sync", post(skip_initial_sync))
        .route("/v1/resources/{name}/resize", post(resize))
        .route(
            "/v1/resources/{name}/snapshots/{snapshot}",
            put(snapshots::put).delete(snapshots::delete),
        )
        .route("/v1/resources/{name}/replication-endpoint", post(replication_endpoint))
        .route_service("/metrics", crate::metrics::router(state.host.clone()))
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_token))
        .merge(public)
        .with_state(state)
}

pub const OPENAPI: &str = include_str!("../openapi.json");

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str, size: u64) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            size_bytes: size,
            protocol: "C".into(),
            nodes: vec![
                CreateNode {
                    name: "a".into(),
                    node_id: 0,
                    address: "127.0.0.1:7800".into(),
                    disk: "/tmp/a.img".into(),
                },
                CreateNode {
                    name: "b".into(),
                    node_id: 1,
                    address: "127.0.0.1:7801".into(),
                    disk: "/tmp/b.img".into(),
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn create_requests_take_a_diskless_tiebreaker_quorum_and_the_promoter() {
        let mut three = request("vol-3", 1 << 20);
        three.nodes.push(CreateNode {
            name: "tie".into(),
            node_id: 2,
            address: "127.0.0.1:7802".into(),
            disk: "none".into(),
        });
        three.auto_promote = true;
        let text = render_resource(&three).expect("valid");
        assert!(text.contains("disk none;") && text.contains("quorum majority;"), "{text}");
        assert!(text.contains("hosts a b tie;"), "{text}");
        let config =
            crate::config::parse_str("x", &text, std::path::Path::new("/")).expect("parses");
        assert_eq!(config.resources[0].nodes.len(), 3);
        three.quorum = Some("off".into());
        assert!(render_resource(&three).expect_err("no quorum").contains("auto_promote needs"));
        let mut two = request("v", 4096);
        two.nodes[1].disk = "none".into();
        assert!(render_resource(&two).expect_err("one disk").contains("at least 2 nodes"));
    }

    #[test]
    fn create_requests_become_drbd_files_or_clear_errors() {
        let text = render_resource(&request("vol-1", 1 << 20)).expect("valid");
        let config =
            crate::config::parse_str("x", &text, std::path::Path::new("/")).expect("parses");
        assert_eq!(config.resources[0].name, "vol-1");
        assert_eq!(config.resources[0].nodes.len(), 2);
        for (bad, needle) in [
            (request("../etc", 4096), "bad resource name"),
            (request("v", 4095), "multiple of 4096"),
            (request("v", 0), "multiple of 4096"),
        ] {
            let error = render_resource(&bad).expect_err("invalid");
            assert!(error.contains(needle), "{error}");
        }
        let mut one = request("v", 4096);
        one.nodes.truncate(1);
        assert!(render_resource(&one).expect_err("one node").contains("between 2"));
        let mut bad_disk = request("v", 4096);
        bad_disk.nodes[0].disk = "/tmp/x; on evil".into();
        assert!(render_resource(&bad_disk).expect_err("injection").contains("bad disk path"));
    }

    #[test]
    fn openapi_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        for path in [
            "/v1/node",
            "/v1/resources",
            "/v1/resources/{name}",
            "/v1/resources/{name}/promote",
            "/v1/resources/{name}/demote",
            "/v1/resources/{name}/skip-initial-sync",
            "/v1/resources/{name}/resize",
            "/v1/resources/{name}/replication-endpoint",
            "/v1/resources/{name}/snapshots/{snapshot}",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing from openapi.json");
        }
    }
}

//! tandemd's HTTP control API, for the volume API (`tandem-api`): create, delete, promote,
//! demote and inspect resources, node capacity and health. JSON over HTTP/1.1 with a bearer
//! token; `GET /v1/openapi.json` serves the OpenAPI description. Every route maps onto the
//! same verbs tandemadm uses (`Host::run`), so both see one behaviour.

use crate::control::{Options, Verb, exit};
use crate::host::{Host, Slot, api_resource_directory};
use crate::status::ResourceView;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

/// Resource names: what DRBD allows in practice and a file name can hold.
const RESOURCE_NAME_BYTES_MAX: usize = 64;
/// Nodes one create request may name (DRBD 9: 32 nodes per resource).
const NODES_MAX: usize = 32;

#[derive(Clone)]
pub struct ApiState {
    pub host: Arc<Host>,
    pub token: String,
}

#[derive(Debug, Deserialize)]
pub struct CreateNode {
    pub name: String,
    pub node_id: u32,
    /// `IP:PORT` for replication.
    pub address: String,
    /// The backing file (created sparse on this node when missing).
    pub disk: String,
}

#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default = "protocol_c")]
    pub protocol: String,
    pub nodes: Vec<CreateNode>,
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

/// The 401 answer, unless the request carries the bearer token.
fn unauthorized(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    let expected = format!("Bearer {}", state.token);
    match headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        Some(value) if value == expected => None,
        _ => Some(error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")),
    }
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
    !name.is_empty()
        && name.len() <= RESOURCE_NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

fn resource_json(host: &Host, slot: &Slot, view: Option<ResourceView>) -> ResourceJson {
    let primary = view.as_ref().is_some_and(|v| v.role == drbd_engine::protocol::Role::Primary);
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
                        replication: volume.map(|x| x.replication.to_string()).unwrap_or_default(),
                        peer_disk: volume.map(|x| x.peer_disk.to_string()).unwrap_or_default(),
                        out_of_sync_bytes: volume.map_or(0, |x| x.out_of_sync_kib * 1024),
                    }
                })
                .collect(),
        ),
        None => ("Diskless".into(), Vec::new()),
    };
    let target_iqn = host.settings.target_name(&slot.name);
    let portal = host.settings.portal.to_string();
    ResourceJson {
        name: slot.name.clone(),
        up: view.is_some(),
        role: if primary { "primary" } else { "secondary" }.into(),
        disk_state,
        size_bytes: slot.size_bytes.load(std::sync::atomic::Ordering::Acquire),
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

async fn list(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let mut out = Vec::new();
    for slot in state.host.slots() {
        let view = state.host.view(&slot).await;
        out.push(resource_json(&state.host, &slot, view));
    }
    Json(out).into_response()
}

async fn show(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    match state.host.slot(&name) {
        Some(slot) => {
            let view = state.host.view(&slot).await;
            Json(resource_json(&state.host, &slot, view)).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no resource {name} on this node")),
    }
}

async fn verb(state: &ApiState, verb: Verb, name: &str, options: Options) -> Response {
    if state.host.slot(name).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no resource {name} on this node"));
    }
    let (code, _, err) = state.host.run(verb, name, options).await;
    if code == exit::SUCCESS {
        let slot = state.host.slot(name);
        match slot {
            Some(slot) => {
                let view = state.host.view(&slot).await;
                Json(resource_json(&state.host, &slot, view)).into_response()
            }
            None => StatusCode::NO_CONTENT.into_response(),
        }
    } else {
        error(status_of(code), err.join("; "))
    }
}

async fn promote(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    // An empty body means no options.
    let force = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        match serde_json::from_slice::<PromoteRequest>(&body) {
            Ok(request) => request.force,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad promote body: {e}")),
        }
    };
    no_content(verb(&state, Verb::Primary, &name, Options { force, ..Default::default() }).await)
}

/// Promote and demote answer 204 on success, as tandem-api's node contract says.
fn no_content(response: Response) -> Response {
    if response.status() == StatusCode::OK {
        StatusCode::NO_CONTENT.into_response()
    } else {
        response
    }
}

async fn demote(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    no_content(verb(&state, Verb::Secondary, &name, Options::default()).await)
}

/// tandem-api's `PUT /v1/resources/{name}` (peers as control-API URLs, per-volume target IQN
/// and CHAP) needs two things this node does not have yet: an agreement between nodes on
/// node ids and replication ports, and per-target CHAP in the iSCSI target. Say so.
async fn put_resource(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    error(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "PUT /v1/resources/{name} (peers by URL, per-volume IQN and CHAP) is not supported \
             yet: node ids and replication ports are not negotiated between nodes and the iSCSI \
             target has one CHAP identity per portal; create with POST /v1/resources (explicit \
             nodes, ids, addresses and disks), see /v1/openapi.json"
        ),
    )
}

async fn skip_initial_sync(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let wait = Options { timeout_s: Some(30), ..Default::default() };
    let (code, _, err) = state.host.run(Verb::WaitConnect, &name, wait).await;
    if code != exit::SUCCESS {
        return error(status_of(code), err.join("; "));
    }
    verb(&state, Verb::NewCurrentUuid, &name, Options { clear_bitmap: true, ..Default::default() })
        .await
}

async fn resize(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(_): Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    error(StatusCode::NOT_IMPLEMENTED, "resize is not supported by the replication engine yet")
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
    let mut text =
        format!("resource {} {{\n  net {{ protocol {}; }}\n", request.name, request.protocol);
    for node in &request.nodes {
        if !valid_name(&node.name) {
            return Err(format!("bad node name {:?}", node.name));
        }
        let address: std::net::SocketAddr = node
            .address
            .parse()
            .map_err(|_| format!("bad address {:?} (IP:PORT)", node.address))?;
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
    text.push_str("}\n");
    // Checked by the same reader tandemd uses, so a bad request never becomes a bad file.
    crate::config::parse_str("request", &text, std::path::Path::new("/"))
        .map_err(|e| e.to_string())?;
    Ok(text)
}

async fn create(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(request): Json<CreateRequest>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
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
    if let Some(slot) = host.slot(&request.name) {
        // Idempotent like tandem-api's contract: the same resource again answers 200.
        let file = api_resource_directory(&host.settings).join(format!("{}.res", request.name));
        let same = std::fs::read_to_string(&file).is_ok_and(|existing| existing == text)
            && slot.size_bytes.load(std::sync::atomic::Ordering::Acquire) == request.size_bytes;
        if same && slot.device().is_some() {
            let view = host.view(&slot).await;
            return Json(resource_json(host, &slot, view)).into_response();
        }
        return error(
            StatusCode::CONFLICT,
            format!("resource {} exists with other settings", request.name),
        );
    }
    let directory = api_resource_directory(&host.settings);
    let disk = std::path::PathBuf::from(&me.disk);
    let prepared = std::fs::create_dir_all(&directory)
        .and_then(|()| std::fs::write(directory.join(format!("{}.res", request.name)), &text))
        .and_then(|()| {
            if disk.exists() {
                return Ok(());
            }
            if let Some(parent) = disk.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::File::create(&disk)?.set_len(request.size_bytes)
        });
    if let Err(e) = prepared {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("preparing {}: {e}", request.name),
        );
    }
    for verb_name in [Verb::CreateMd, Verb::Up] {
        let (code, _, err) = host.run(verb_name, &request.name, Options::default()).await;
        if code != exit::SUCCESS {
            return error(status_of(code), format!("{verb_name}: {}", err.join("; ")));
        }
    }
    match host.slot(&request.name) {
        Some(slot) => {
            let view = host.view(&slot).await;
            (StatusCode::CREATED, Json(resource_json(host, &slot, view))).into_response()
        }
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "created but not hosted"),
    }
}

async fn delete(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let host = &state.host;
    let Some(slot) = host.slot(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no resource {name} on this node"));
    };
    let file = api_resource_directory(&host.settings).join(format!("{name}.res"));
    if !file.exists() {
        return error(
            StatusCode::CONFLICT,
            format!("{name} comes from {}; remove it there", host.config_path.display()),
        );
    }
    let (code, _, err) = host.run(Verb::Down, &name, Options::default()).await;
    if code != exit::SUCCESS {
        return error(status_of(code), err.join("; "));
    }
    let plan = slot.plan();
    let _ = std::fs::remove_file(&file);
    if let Ok(plan) = plan {
        let _ = std::fs::remove_file(&plan.driver.meta_path);
        let _ = std::fs::remove_file(&plan.driver.backing_path);
    }
    host.forget(&name);
    StatusCode::NO_CONTENT.into_response()
}

async fn node(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let host = &state.host;
    let capacity = nix::sys::statvfs::statvfs(&host.settings.state_directory).ok().map(|s| {
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
    axum::Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/node", get(node))
        .route("/v1/resources", get(list).post(create))
        .route("/v1/resources/{name}", get(show).delete(delete).put(put_resource))
        .route("/v1/resources/{name}/promote", post(promote))
        .route("/v1/resources/{name}/demote", post(demote))
        .route("/v1/resources/{name}/skip-initial-sync", post(skip_initial_sync))
        .route("/v1/resources/{name}/resize", post(resize))
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
        }
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
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing from openapi.json");
        }
    }
}

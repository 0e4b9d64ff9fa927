//! The HTTP boundary: routing, authentication, microversions, body parsing and the translation
//! of `Fault` into Cinder's fault responses. Handlers live in the submodules by resource.

mod attachments;
mod metadata_body;
mod misc;
mod snapshots;
mod types;
mod versions;
pub mod views;
mod volumes;

use crate::auth::{Auth, Principal};
use crate::db::{Db, DbError, Tx};
use crate::fault::Fault;
use crate::microversion::{self, Microversion};
use crate::node_client::NodeClient;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Service-wide settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub default_availability_zone: String,
    pub default_replica_count: u32,
    /// Host name reported for this API in os-services.
    pub host: String,
}

pub struct AppState {
    db: Mutex<Db>,
    pub nodes: Arc<dyn NodeClient>,
    pub auth: Auth,
    pub settings: Settings,
    /// Bounds the background operations running at once.
    pub operations: Arc<tokio::sync::Semaphore>,
    /// This process's name in operation leases: unique per process, so a restarted instance
    /// never mistakes a dead process's lease for its own.
    pub instance_id: String,
}

impl AppState {
    pub fn new(
        db: Db,
        nodes: Arc<dyn NodeClient>,
        auth: Auth,
        settings: Settings,
    ) -> Arc<AppState> {
        let instance_id =
            format!("{}:{}:{}", settings.host, std::process::id(), crate::model::new_secret(8));
        Arc::new(AppState {
            instance_id,
            db: Mutex::new(db),
            nodes,
            auth,
            settings,
            operations: Arc::new(tokio::sync::Semaphore::new(
                crate::constants::OPERATIONS_IN_FLIGHT_MAX,
            )),
        })
    }

    /// The database connection, held only for the statements of one request step (one
    /// connection per process: SQLite serialises writers anyway, and PostgreSQL round trips
    /// on a local network are short). Read-check-write steps go through `transaction`, which
    /// makes them atomic against other processes too, not only against this one's tasks.
    pub fn db(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock leaves no half-written row (an open transaction is
        // rolled back when it drops), so a poisoned lock is safe to keep using.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` as one database transaction; see `db::Db::transaction`.
    pub fn transaction<T: Send>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, Fault> + Send,
    ) -> Result<T, Fault> {
        self.db().transaction(f)
    }

    /// Runs `f` as one consistent read.
    pub fn read<T: Send>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, Fault> + Send,
    ) -> Result<T, Fault> {
        self.db().read(f)
    }
}

impl From<DbError> for Fault {
    fn from(e: DbError) -> Fault {
        tracing::error!("database error: {e}");
        Fault::Internal(format!(
            "The server has either erred or is incapable of performing the requested operation: {e}"
        ))
    }
}

impl IntoResponse for Fault {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

pub type ApiResult = Result<Response, Fault>;

pub fn reply(status: u16, body: Value) -> ApiResult {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    Ok((status, axum::Json(body)).into_response())
}

pub fn reply_empty(status: u16) -> ApiResult {
    Ok(StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT).into_response())
}

/// Who is asking, for which project, at which microversion, and the request's path parameters
/// and query.
pub struct Ctx {
    pub principal: Principal,
    pub version: Microversion,
    pub params: HashMap<String, String>,
    pub query: Vec<(String, String)>,
    /// `http://host:port/v3/{project}` for links.
    pub base_url: String,
    pub project_in_url: bool,
}

impl Ctx {
    pub fn project(&self) -> &str {
        &self.principal.project_id
    }
    pub fn is_admin(&self) -> bool {
        self.principal.is_admin
    }
    pub fn param(&self, name: &str) -> &str {
        self.params.get(name).map(String::as_str).unwrap_or("")
    }
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn require_admin(&self) -> Result<(), Fault> {
        if self.is_admin() { Ok(()) } else { Err(Fault::admin_only()) }
    }
}

impl FromRequestParts<Arc<AppState>> for Ctx {
    type Rejection = Fault;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Ctx, Fault> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| Fault::BadRequest(format!("Invalid path: {e}")))?;
        let query = match parts.uri.query() {
            Some(q) => axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
                .map(|axum::extract::Query(v)| v)
                .map_err(|_| Fault::BadRequest(format!("Invalid query string {q:?}.")))?,
            None => Vec::new(),
        };
        let version = parts.extensions.get::<Microversion>().copied().unwrap_or(microversion::MIN);
        let url_project = params.get("project_id").cloned();
        let principal = state.auth.authenticate(&parts.headers, url_project.as_deref())?;
        let host = parts
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost:8776")
            .to_string();
        let base_url = match &url_project {
            Some(p) => format!("http://{host}/v3/{p}"),
            None => format!("http://{host}/v3"),
        };
        Ok(Ctx {
            principal,
            version,
            params,
            query,
            base_url,
            project_in_url: url_project.is_some(),
        })
    }
}

/// Parses a JSON request body into an object, with Cinder's faults for what is wrong with it.
pub fn body_object(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, Fault> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Fault::OverLimit("Request is too large.".into())
        } else {
            Fault::BadRequest(format!("Malformed request body: {e}"))
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Fault::BadRequest("Missing required element in request body.".into()));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => {
            Err(Fault::BadRequest("Malformed request body: a JSON object is expected.".into()))
        }
        Err(e) => Err(Fault::BadRequest(format!("Malformed request body: {e}"))),
    }
}

/// The object under `key` in a body (`{"volume": {...}}`); rejects other top-level keys when
/// `only` is set.
pub fn take_object(
    mut body: Map<String, Value>,
    key: &str,
    allowed_siblings: &[&str],
) -> Result<Map<String, Value>, Fault> {
    if let Some(other) =
        body.keys().find(|k| k.as_str() != key && !allowed_siblings.contains(&k.as_str()))
    {
        return Err(Fault::BadRequest(format!(
            "Invalid input for field/attribute {other}. Additional properties are not allowed."
        )));
    }
    match body.remove(key) {
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(Fault::BadRequest(format!(
            "Invalid input for field/attribute {key}. Value should be an object."
        ))),
        None => {
            Err(Fault::BadRequest(format!("Missing required element '{key}' in request body.")))
        }
    }
}

/// Rejects keys outside `allowed` (Cinder's `additionalProperties: False`).
pub fn only_keys(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), Fault> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(Fault::BadRequest(format!(
            "Invalid input for field/attribute {k}. Additional properties are not allowed."
        ))),
        None => Ok(()),
    }
}

/// An optional string field (null allowed) no longer than `max`.
pub fn opt_string(
    map: &Map<String, Value>,
    key: &str,
    max: usize,
) -> Result<Option<String>, Fault> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= max => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(Fault::BadRequest(format!(
            "Invalid input for field/attribute {key}. It is longer than {max} bytes."
        ))),
        Some(_) => Err(Fault::BadRequest(format!(
            "Invalid input for field/attribute {key}. Value should be a string or null."
        ))),
    }
}

/// A positive size in GiB: an integer or a string of digits, as Cinder's schema allows.
pub fn size_gib(value: Option<&Value>, key: &str) -> Result<u64, Fault> {
    let bad = || {
        Fault::invalid_input(format!(
            "'{key}' must be an integer from 1 to {}.",
            crate::constants::VOLUME_SIZE_GIB_MAX
        ))
    };
    let n = match value {
        Some(Value::Number(n)) => n.as_u64().ok_or_else(bad)?,
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse().map_err(|_| bad())?
        }
        None | Some(Value::Null) => {
            return Err(Fault::BadRequest(format!(
                "Missing required element '{key}' in request body."
            )));
        }
        Some(_) => return Err(bad()),
    };
    if n == 0 || n > crate::constants::VOLUME_SIZE_GIB_MAX {
        return Err(bad());
    }
    Ok(n)
}

/// A boolean given as JSON or as Cinder's accepted strings.
pub fn boolish(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "t" | "1" | "yes" | "y" | "on" => Some(true),
            "false" | "f" | "0" | "no" | "n" | "off" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

/// A metadata object: string keys and string values within Cinder's limits.
pub fn metadata(value: Option<&Value>, key: &str) -> Result<Option<crate::model::Metadata>, Fault> {
    use crate::constants::{METADATA_ITEMS_MAX, METADATA_KEY_BYTES_MAX, METADATA_VALUE_BYTES_MAX};
    let map = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(Fault::BadRequest(format!(
                "Invalid input for field/attribute {key}. Value should be an object."
            )));
        }
    };
    if map.len() > METADATA_ITEMS_MAX {
        return Err(Fault::OverLimit(format!(
            "Maximum number of metadata items ({METADATA_ITEMS_MAX}) exceeded."
        )));
    }
    let mut out = crate::model::Metadata::new();
    for (k, v) in map {
        let Value::String(v) = v else {
            return Err(Fault::BadRequest(format!(
                "Invalid input for field/attribute {key}. Metadata values must be strings."
            )));
        };
        if k.is_empty() || k.len() > METADATA_KEY_BYTES_MAX || v.len() > METADATA_VALUE_BYTES_MAX {
            return Err(Fault::BadRequest(format!(
                "Invalid input for field/attribute {key}. Keys must be 1 to {METADATA_KEY_BYTES_MAX} bytes, values at most {METADATA_VALUE_BYTES_MAX}."
            )));
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(Some(out))
}

/// Negotiates the microversion before routing-level handlers run, and echoes it on the way out.
async fn microversion_layer(mut request: Request, next: Next) -> Response {
    let header =
        |h: &HeaderMap, name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let openstack = header(request.headers(), "openstack-api-version");
    let legacy = header(request.headers(), "x-openstack-volume-api-version");
    let version = match microversion::negotiate(openstack.as_deref(), legacy.as_deref()) {
        Ok(v) => v,
        Err(e @ microversion::VersionError::OutOfRange(_)) => {
            return Fault::NotAcceptable(e.to_string()).into_response();
        }
        Err(e) => return Fault::BadRequest(e.to_string()).into_response(),
    };
    request.extensions_mut().insert(version);
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("volume {version}")) {
        headers.insert("openstack-api-version", value);
    }
    headers.append("vary", HeaderValue::from_static("OpenStack-API-Version"));
    response
}

async fn not_found() -> Fault {
    Fault::NotFound("The resource could not be found.".into())
}

async fn bad_method() -> Fault {
    Fault::BadMethod("The method is not allowed for the requested URL.".into())
}

/// The Cinder API routes relative to `/v3` or `/v3/{project_id}`.
fn cinder_routes() -> Router<Arc<AppState>> {
    use axum::routing::{get, post, put};
    Router::new()
        .route("/volumes", get(volumes::list_summary).post(volumes::create))
        .route("/volumes/detail", get(volumes::list_detail))
        .route(
            "/volumes/{volume_id}",
            get(volumes::show).put(volumes::update).delete(volumes::delete),
        )
        .route("/volumes/{volume_id}/action", post(volumes::action))
        .route(
            "/volumes/{volume_id}/metadata",
            get(volumes::metadata_show)
                .post(volumes::metadata_merge)
                .put(volumes::metadata_replace),
        )
        .route(
            "/volumes/{volume_id}/metadata/{key}",
            get(volumes::metadata_item_show)
                .put(volumes::metadata_item_put)
                .delete(volumes::metadata_item_delete),
        )
        .route("/attachments", get(attachments::list_summary).post(attachments::create))
        .route("/attachments/detail", get(attachments::list_detail))
        .route(
            "/attachments/{attachment_id}",
            get(attachments::show).put(attachments::update).delete(attachments::delete),
        )
        .route("/attachments/{attachment_id}/action", post(attachments::action))
        .route("/snapshots", get(snapshots::list_summary).post(snapshots::create))
        .route("/snapshots/detail", get(snapshots::list_detail))
        .route(
            "/snapshots/{snapshot_id}",
            get(snapshots::show).put(snapshots::update).delete(snapshots::delete),
        )
        .route(
            "/snapshots/{snapshot_id}/metadata",
            get(snapshots::metadata_show)
                .post(snapshots::metadata_merge)
                .put(snapshots::metadata_replace),
        )
        .route(
            "/snapshots/{snapshot_id}/metadata/{key}",
            get(snapshots::metadata_item_show)
                .put(snapshots::metadata_item_put)
                .delete(snapshots::metadata_item_delete),
        )
        .route("/types", get(types::list).post(types::create))
        .route("/types/default", get(types::show_default))
        .route("/types/{type_id}", get(types::show).put(types::update).delete(types::delete))
        .route("/types/{type_id}/extra_specs", get(types::specs_show).post(types::specs_merge))
        .route(
            "/types/{type_id}/extra_specs/{key}",
            get(types::spec_show).put(types::spec_put).delete(types::spec_delete),
        )
        .route(
            "/os-quota-sets/{target_project}",
            get(misc::quota_show).put(misc::quota_update).delete(misc::quota_delete),
        )
        .route("/os-quota-sets/{target_project}/defaults", get(misc::quota_defaults))
        .route("/limits", get(misc::limits))
        .route("/os-availability-zone", get(misc::availability_zones))
        .route("/os-services", get(misc::services))
        .route("/extensions", get(misc::extensions))
        .route("/os-tandem-nodes", get(misc::nodes_list))
        .route("/os-tandem-nodes/{node_name}", put(misc::node_register))
}

/// The whole service.
pub fn router(state: Arc<AppState>) -> Router {
    use axum::routing::get;
    Router::new()
        .route("/", get(versions::root))
        .route("/v3", get(versions::v3))
        .route("/v3/", get(versions::v3))
        .nest("/v3/{project_id}", cinder_routes())
        .nest("/v3", cinder_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(bad_method)
        .layer(axum::middleware::from_fn(microversion_layer))
        .route("/openapi.yaml", get(versions::openapi))
        .route("/node-control-api.yaml", get(versions::node_openapi))
        .layer(axum::extract::DefaultBodyLimit::max(crate::constants::REQUEST_BODY_BYTES_MAX))
        .with_state(state)
}

/// Creates Cinder's `__DEFAULT__` volume type on first start.
pub fn ensure_default_type(state: &AppState) -> Result<(), Fault> {
    types::ensure_default(state)
}

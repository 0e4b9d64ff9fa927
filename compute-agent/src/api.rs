//! The agent's HTTP API (a nova-like subset) and the small client the CLI uses.
//!
//! - `GET /` : agent info (accelerator, initiator IQN, the Cinder connector of this host)
//! - `GET|POST /v2.1/servers`, `GET /v2.1/servers/detail`, `GET|DELETE /v2.1/servers/{id}`
//! - `POST /v2.1/servers/{id}/action` with `{"os-stop": null}`, `{"os-start": null}` or
//!   `{"unpause": null}`
//! - `GET|POST /v2.1/servers/{id}/os-volume_attachments`,
//!   `GET|DELETE /v2.1/servers/{id}/os-volume_attachments/{volume_id}`; the POST body is
//!   `{"volumeAttachment": {"volumeId": ..., "connection_info": {...}}}` (until tandem-api
//!   exists, the caller brings the connection_info).
//!
//! Errors use Nova's fault bodies: `{"badRequest": {"code": 400, "message": ...}}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::constants::{HTTP_BODY_BYTES_MAX, HTTP_CLIENT_TIMEOUT_MS};
use crate::instance::InstanceSpec;
use crate::supervisor::{Attachment, Error, Supervisor};

type Shared = Arc<Supervisor>;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "badRequest"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "itemNotFound"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflictingRequest"),
            Error::Qmp(_) | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "computeFault")
            }
        };
        let body = json!({ kind: { "code": status.as_u16(), "message": self.to_string() } });
        (status, Json(body)).into_response()
    }
}

/// The router over a supervisor.
pub fn router(supervisor: Shared) -> Router {
    Router::new()
        .route("/", get(info))
        .route("/v2.1/servers", get(list_servers).post(create_server))
        .route("/v2.1/servers/detail", get(list_servers))
        .route("/v2.1/servers/{id}", get(show_server).delete(delete_server))
        .route("/v2.1/servers/{id}/action", post(server_action))
        .route(
            "/v2.1/servers/{id}/os-volume_attachments",
            get(list_attachments).post(create_attachment),
        )
        .route(
            "/v2.1/servers/{id}/os-volume_attachments/{volume_id}",
            get(show_attachment).delete(delete_attachment),
        )
        .layer(DefaultBodyLimit::max(HTTP_BODY_BYTES_MAX))
        .with_state(supervisor)
}

async fn info(State(supervisor): State<Shared>) -> Json<Value> {
    Json(json!({
        "name": "tandem-compute",
        "version": env!("CARGO_PKG_VERSION"),
        "accel": supervisor.accel().as_str(),
        "initiator": supervisor.initiator_iqn(),
        "connector": connector(supervisor.initiator_iqn(), supervisor.my_ip()),
    }))
}

/// The connector this host hands to Cinder's `attachment-create`/`os-initialize_connection`,
/// in the shape nova-compute sends (os-brick's): QEMU's own initiator, no multipath (QEMU's
/// iSCSI driver uses one portal; failover goes through the service IP).
pub fn connector(initiator_iqn: &str, my_ip: &str) -> Value {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    json!({
        "initiator": initiator_iqn,
        "host": host,
        "ip": my_ip,
        "platform": std::env::consts::ARCH,
        "os_type": std::env::consts::OS,
        "multipath": false,
        "do_local_attach": false,
    })
}

async fn list_servers(State(supervisor): State<Shared>) -> Json<Value> {
    Json(json!({ "servers": supervisor.list().await }))
}

fn bad_request(message: impl Into<String>) -> Error {
    Error::BadRequest(message.into())
}

async fn create_server(
    State(supervisor): State<Shared>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), Error> {
    let mut server =
        body.get("server").cloned().ok_or_else(|| bad_request("body needs \"server\""))?;
    let id = match server.as_object_mut().and_then(|object| object.remove("id")) {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => return Err(bad_request("server.id must be a string")),
    };
    let spec: InstanceSpec =
        serde_json::from_value(server).map_err(|error| bad_request(format!("server: {error}")))?;
    let shown = supervisor.create(id, spec).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "server": shown }))))
}

async fn show_server(
    State(supervisor): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    Ok(Json(json!({ "server": supervisor.show(&id).await? })))
}

async fn delete_server(
    State(supervisor): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, Error> {
    supervisor.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn server_action(
    State(supervisor): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Result<StatusCode, Error> {
    if body.get("os-stop").is_some() {
        supervisor.stop(&id).await?;
    } else if body.get("os-start").is_some() {
        supervisor.start(&id).await?;
    } else if body.get("unpause").is_some() {
        supervisor.unpause(&id).await?;
    } else {
        return Err(bad_request("supported actions: os-stop, os-start, unpause"));
    }
    Ok(StatusCode::ACCEPTED)
}

fn attachment_json(server_id: &str, attachment: &Attachment) -> Value {
    let mut value = serde_json::to_value(attachment).unwrap_or(Value::Null);
    value["id"] = json!(attachment.volume_id);
    value["volumeId"] = json!(attachment.volume_id);
    value["serverId"] = json!(server_id);
    value
}

async fn list_attachments(
    State(supervisor): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let attachments = supervisor.attachments(&id).await?;
    let list: Vec<_> =
        attachments.iter().map(|attachment| attachment_json(&id, attachment)).collect();
    Ok(Json(json!({ "volumeAttachments": list })))
}

async fn show_attachment(
    State(supervisor): State<Shared>,
    Path((id, volume_id)): Path<(String, String)>,
) -> Result<Json<Value>, Error> {
    let attachments = supervisor.attachments(&id).await?;
    let attachment = attachments
        .iter()
        .find(|attachment| attachment.volume_id == volume_id)
        .ok_or_else(|| Error::NotFound(format!("volume {volume_id} is not attached to {id}")))?;
    Ok(Json(json!({ "volumeAttachment": attachment_json(&id, attachment) })))
}

async fn create_attachment(
    State(supervisor): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, Error> {
    let request = body
        .get("volumeAttachment")
        .ok_or_else(|| bad_request("body needs \"volumeAttachment\""))?;
    let volume_id = request.get("volumeId").and_then(Value::as_str).map(str::to_owned);
    let connection_info = request
        .get("connection_info")
        .ok_or_else(|| bad_request("volumeAttachment needs connection_info (no tandem-api yet)"))?;
    let attachment = supervisor.attach(&id, volume_id, connection_info).await?;
    Ok(Json(json!({ "volumeAttachment": attachment_json(&id, &attachment) })))
}

async fn delete_attachment(
    State(supervisor): State<Shared>,
    Path((id, volume_id)): Path<(String, String)>,
) -> Result<StatusCode, Error> {
    supervisor.detach(&id, &volume_id).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad endpoint {0:?}: use http://HOST:PORT")]
    Endpoint(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
}

/// One request to the agent: the status code and the JSON body (Null when empty).
pub async fn request(
    endpoint: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    let authority = endpoint
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .ok_or_else(|| ClientError::Endpoint(endpoint.to_owned()))?
        .to_owned();
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|error| ClientError::Connect(authority.clone(), error.to_string()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|error| ClientError::Http(error.to_string()))?;
        tokio::spawn(connection);
        let payload = body.map(Value::to_string).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &authority)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(payload)))
            .map_err(|error| ClientError::Http(error.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| ClientError::Http(error.to_string()))?;
        let status = response.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|error| ClientError::Http(error.to_string()))?
            .to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, value))
    };
    tokio::time::timeout(Duration::from_millis(HTTP_CLIENT_TIMEOUT_MS), exchange)
        .await
        .map_err(|_| ClientError::Timeout(HTTP_CLIENT_TIMEOUT_MS))?
}

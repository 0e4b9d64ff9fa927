//! The agent's HTTP API (a nova-like subset) and the small client the CLI uses.
//!
//! - `GET /` : agent info (accelerator, initiator IQN, the Cinder connector of this host)
//! - `GET|POST /v2.1/servers`, `GET /v2.1/servers/detail`, `GET|DELETE /v2.1/servers/{id}`
//! - `POST /v2.1/servers/{id}/action` with `{"os-stop": null}`, `{"os-start": null}` or
//!   `{"unpause": null}`
//! - `GET|POST /v2.1/servers/{id}/os-volume_attachments`,
//!   `GET|DELETE /v2.1/servers/{id}/os-volume_attachments/{volume_id}`; the POST body is
//!   Nova's `{"volumeAttachment": {"volumeId": ...}}` (the agent gets the connection_info from
//!   tandem-api), or, without tandem-api, `{"volumeAttachment": {"volumeId": ...,
//!   "connection_info": {...}}}` with the caller's connection_info.
//!
//! Errors use Nova's fault bodies: `{"badRequest": {"code": 400, "message": ...}}`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::constants::{
    HTTP_BODY_BYTES_MAX, HTTP_CLIENT_CONNECT_TIMEOUT_MS, HTTP_CLIENT_TIMEOUT_MS,
};
use crate::http_client::{Endpoint, HttpClient, HttpError, Idempotency, Policy};
use crate::instance::InstanceSpec;
use crate::supervisor::{Attachment, Error, Supervisor};

type Shared = Arc<Supervisor>;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "badRequest"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "itemNotFound"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflictingRequest"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "serviceUnavailable"),
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
        "connector": supervisor.connector(),
        "volume_api": supervisor.volume_api_endpoint(),
        "pending_attachment_deletes": supervisor.pending_deletes(),
    }))
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
    let volume_id = match request.get("volumeId") {
        None | Some(Value::Null) => None,
        Some(Value::String(volume_id)) => Some(volume_id.clone()),
        Some(_) => return Err(bad_request("volumeId must be a string")),
    };
    let attachment = match (request.get("connection_info"), volume_id) {
        (Some(connection_info), volume_id) => {
            supervisor.attach(&id, volume_id, connection_info).await?
        }
        (None, Some(volume_id)) => supervisor.attach_volume(&id, &volume_id).await?,
        (None, None) => return Err(bad_request("volumeAttachment needs volumeId")),
    };
    Ok(Json(json!({ "volumeAttachment": attachment_json(&id, &attachment) })))
}

async fn delete_attachment(
    State(supervisor): State<Shared>,
    Path((id, volume_id)): Path<(String, String)>,
) -> Result<StatusCode, Error> {
    supervisor.detach(&id, &volume_id).await?;
    Ok(StatusCode::ACCEPTED)
}

/// The CLI's policy towards the daemon: an attach can take [`crate::constants::ATTACH_MS_MAX`];
/// a request is repeated only when the daemon could not be reached at all.
pub const CLI_POLICY: Policy = Policy {
    connect_timeout_ms: HTTP_CLIENT_CONNECT_TIMEOUT_MS,
    request_timeout_ms: HTTP_CLIENT_TIMEOUT_MS,
    attempts_max: 2,
    backoff_ms: 200,
    backoff_ms_max: 200,
};

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad endpoint: {0}")]
    Endpoint(String),
    #[error(transparent)]
    Http(#[from] HttpError),
}

/// One request to the agent: the status code and the JSON body (Null when empty).
pub async fn request(
    endpoint: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    let endpoint = Endpoint::parse(endpoint).map_err(ClientError::Endpoint)?;
    let client = HttpClient::new(endpoint, CLI_POLICY, vec![]);
    let idempotency =
        if method == "POST" { Idempotency::NotIdempotent } else { Idempotency::Idempotent };
    let response = client.send(method, path, body, idempotency).await?;
    Ok((response.status, response.body))
}

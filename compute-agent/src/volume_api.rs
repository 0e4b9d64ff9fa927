//! The agent's client of tandem-api (Cinder v3): the attachments API calls nova-compute makes
//! (microversion 3.44): create with this host's connector, update with the connector when the
//! create answered without connection_info, `os-complete`, delete.
//!
//! Request bodies and the reading of answers are pure functions; [`VolumeApi`] sends them over
//! [`crate::http_client`].

use serde_json::{Value, json};

use crate::constants::{
    VOLUME_API_ATTEMPTS_MAX, VOLUME_API_CONNECT_TIMEOUT_MS, VOLUME_API_REQUEST_TIMEOUT_MS,
    VOLUME_API_RETRY_BACKOFF_MS, VOLUME_API_RETRY_BACKOFF_MS_MAX,
};
use crate::http_client::{Endpoint, HttpClient, HttpError, Idempotency, Policy, Response};

/// The microversion the agent speaks: the attachments API with `os-complete` (3.44).
pub const MICROVERSION: &str = "volume 3.44";

/// The agent's retry policy towards tandem-api.
pub const POLICY: Policy = Policy {
    connect_timeout_ms: VOLUME_API_CONNECT_TIMEOUT_MS,
    request_timeout_ms: VOLUME_API_REQUEST_TIMEOUT_MS,
    attempts_max: VOLUME_API_ATTEMPTS_MAX,
    backoff_ms: VOLUME_API_RETRY_BACKOFF_MS,
    backoff_ms_max: VOLUME_API_RETRY_BACKOFF_MS_MAX,
};

const _: () = assert!(POLICY.worst_case_ms() <= crate::constants::VOLUME_API_CALL_MS_MAX);

/// Where tandem-api is and who the agent is there.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeApiConfig {
    /// The project's endpoint, as the Cinder clients take it: `http://HOST:8776/v3/PROJECT`.
    pub endpoint: String,
    /// Sent as `X-Auth-Token`: `user:project` for tandem-api's noauth, or a bearer token from
    /// its `--auth-config`.
    pub token: String,
}

impl std::fmt::Debug for VolumeApiConfig {
    // The token never reaches a log line.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VolumeApiConfig")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// What kind of failure, for the agent's own API answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeApiErrorKind {
    /// 404: no such volume or attachment (in this project).
    NotFound,
    /// 400: the request was refused (e.g. the volume is not available).
    BadRequest,
    /// 409.
    Conflict,
    /// 401/403: the agent's credentials are wrong (an operator must fix the configuration).
    Auth,
    /// Unreachable, timed out, or a 5xx: perhaps temporary.
    Unavailable,
    /// An answer that does not follow Cinder's API.
    Protocol,
}

/// A failed tandem-api call, with its context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tandem-api {operation}: {message}")]
pub struct VolumeApiError {
    pub kind: VolumeApiErrorKind,
    pub operation: &'static str,
    pub message: String,
}

/// An attachment as created.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedAttachment {
    pub id: String,
    /// The flattened connection_info, when the create carried a connector and the server
    /// answered with it.
    pub connection_info: Option<Value>,
}

/// The body of `POST /attachments`.
pub fn create_body(volume_id: &str, instance_uuid: &str, connector: &Value) -> Value {
    json!({ "attachment": {
        "volume_uuid": volume_id,
        "instance_uuid": instance_uuid,
        "connector": connector,
        "mode": "rw",
    }})
}

/// The body of `PUT /attachments/{id}`.
pub fn update_body(connector: &Value) -> Value {
    json!({ "attachment": { "connector": connector } })
}

/// The message of a Cinder fault body (`{"badRequest": {"code": 400, "message": ...}}`), or the
/// body itself when it has another shape.
pub fn fault_message(body: &Value) -> String {
    let from_fault = body
        .as_object()
        .and_then(|object| object.values().find_map(|inner| inner.get("message")))
        .and_then(Value::as_str);
    match (from_fault, body) {
        (Some(message), _) => message.to_owned(),
        (None, Value::Null) => "(empty body)".to_owned(),
        (None, Value::String(text)) => text.chars().take(300).collect(),
        (None, other) => other.to_string().chars().take(300).collect(),
    }
}

/// Turns an answer into the JSON body of a success or a classified error.
pub fn check_answer(operation: &'static str, response: &Response) -> Result<Value, VolumeApiError> {
    if response.is_success() {
        return Ok(response.body.clone());
    }
    let kind = match response.status {
        400 | 413 | 422 => VolumeApiErrorKind::BadRequest,
        401 | 403 => VolumeApiErrorKind::Auth,
        404 => VolumeApiErrorKind::NotFound,
        409 => VolumeApiErrorKind::Conflict,
        500..=599 => VolumeApiErrorKind::Unavailable,
        _ => VolumeApiErrorKind::Protocol,
    };
    Err(VolumeApiError {
        kind,
        operation,
        message: format!("HTTP {}: {}", response.status, fault_message(&response.body)),
    })
}

fn protocol_error(operation: &'static str, message: String) -> VolumeApiError {
    VolumeApiError { kind: VolumeApiErrorKind::Protocol, operation, message }
}

/// Reads `{"attachment": {"id": ..., "connection_info": {...} | null}}`.
pub fn parse_attachment(
    operation: &'static str,
    body: &Value,
) -> Result<CreatedAttachment, VolumeApiError> {
    let attachment = body
        .get("attachment")
        .filter(|value| value.is_object())
        .ok_or_else(|| protocol_error(operation, format!("no \"attachment\" object in {body}")))?;
    let id = attachment
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| protocol_error(operation, "the attachment has no id".into()))?;
    crate::connection_info::check_name("attachment id", id)
        .map_err(|error| protocol_error(operation, error.to_string()))?;
    let connection_info = match attachment.get("connection_info") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) if map.is_empty() => None,
        Some(info @ Value::Object(_)) => Some(info.clone()),
        Some(other) => {
            return Err(protocol_error(
                operation,
                format!("connection_info is not an object: {other}"),
            ));
        }
    };
    Ok(CreatedAttachment { id: id.to_owned(), connection_info })
}

/// Checks a token before it becomes a header value.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() || token.len() > 4096 {
        return Err("the tandem-api token must be 1 to 4096 bytes".into());
    }
    if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err("the tandem-api token must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// tandem-api, as one compute host's client.
#[derive(Debug, Clone)]
pub struct VolumeApi {
    client: HttpClient,
}

fn unavailable(operation: &'static str, error: HttpError) -> VolumeApiError {
    VolumeApiError { kind: VolumeApiErrorKind::Unavailable, operation, message: error.to_string() }
}

impl VolumeApi {
    pub fn new(config: &VolumeApiConfig) -> Result<VolumeApi, String> {
        let endpoint = Endpoint::parse(&config.endpoint)?;
        check_token(&config.token)?;
        let headers = vec![
            ("x-auth-token".to_owned(), config.token.clone()),
            ("openstack-api-version".to_owned(), MICROVERSION.to_owned()),
        ];
        Ok(VolumeApi { client: HttpClient::new(endpoint, POLICY, headers) })
    }

    pub fn endpoint_url(&self) -> String {
        self.client.endpoint().url("")
    }

    async fn call(
        &self,
        operation: &'static str,
        method: &str,
        path: &str,
        body: Option<&Value>,
        idempotency: Idempotency,
    ) -> Result<Value, VolumeApiError> {
        let response = self
            .client
            .send(method, path, body, idempotency)
            .await
            .map_err(|error| unavailable(operation, error))?;
        check_answer(operation, &response)
    }

    /// Creates an attachment of `volume_id` to `instance_uuid` with this host's connector: the
    /// volume goes to `attaching` and the answer usually carries the connection_info.
    pub async fn attachment_create(
        &self,
        volume_id: &str,
        instance_uuid: &str,
        connector: &Value,
    ) -> Result<CreatedAttachment, VolumeApiError> {
        const OPERATION: &str = "attachment create";
        let body = create_body(volume_id, instance_uuid, connector);
        let answer = self
            .call(OPERATION, "POST", "/attachments", Some(&body), Idempotency::NotIdempotent)
            .await?;
        parse_attachment(OPERATION, &answer)
    }

    /// Hands the connector to an attachment that has none yet; returns the connection_info.
    pub async fn attachment_update(
        &self,
        attachment_id: &str,
        connector: &Value,
    ) -> Result<Value, VolumeApiError> {
        const OPERATION: &str = "attachment update";
        let body = update_body(connector);
        let path = format!("/attachments/{attachment_id}");
        // Updating with the same connector twice leaves the same state.
        let answer =
            self.call(OPERATION, "PUT", &path, Some(&body), Idempotency::Idempotent).await?;
        parse_attachment(OPERATION, &answer)?.connection_info.ok_or_else(|| {
            protocol_error(OPERATION, "the answer carries no connection_info".into())
        })
    }

    /// Marks the attachment attached (`os-complete`): the volume goes `in-use`.
    pub async fn attachment_complete(&self, attachment_id: &str) -> Result<(), VolumeApiError> {
        let path = format!("/attachments/{attachment_id}/action");
        let body = json!({ "os-complete": null });
        // Completing an attached attachment changes nothing.
        self.call("attachment complete", "POST", &path, Some(&body), Idempotency::Idempotent)
            .await
            .map(drop)
    }

    /// Deletes the attachment: the volume goes back to `available`. An attachment that is
    /// already gone counts as deleted.
    pub async fn attachment_delete(&self, attachment_id: &str) -> Result<(), VolumeApiError> {
        let path = format!("/attachments/{attachment_id}");
        match self.call("attachment delete", "DELETE", &path, None, Idempotency::Idempotent).await {
            Ok(_) => Ok(()),
            Err(error) if error.kind == VolumeApiErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_cinders_shape() {
        let connector = json!({"initiator": "iqn.x:y", "multipath": true});
        let create = create_body("vol-1", "server-1", &connector);
        assert_eq!(create["attachment"]["volume_uuid"], "vol-1");
        assert_eq!(create["attachment"]["instance_uuid"], "server-1");
        assert_eq!(create["attachment"]["connector"], connector);
        assert_eq!(update_body(&connector), json!({"attachment": {"connector": connector}}));
    }

    #[test]
    fn answers_are_classified_with_the_fault_message() {
        let response = |status, body| Response { status, body };
        let cases = [
            (
                400,
                json!({"badRequest": {"code": 400, "message": "Invalid volume: in-use"}}),
                VolumeApiErrorKind::BadRequest,
                "Invalid volume: in-use",
            ),
            (
                404,
                json!({"itemNotFound": {"code": 404, "message": "Volume v could not be found."}}),
                VolumeApiErrorKind::NotFound,
                "could not be found",
            ),
            (401, Value::Null, VolumeApiErrorKind::Auth, "(empty body)"),
            (403, json!("forbidden"), VolumeApiErrorKind::Auth, "forbidden"),
            (409, json!({"x": 1}), VolumeApiErrorKind::Conflict, "{\"x\":1}"),
            (503, json!("<html>"), VolumeApiErrorKind::Unavailable, "<html>"),
            (302, Value::Null, VolumeApiErrorKind::Protocol, "HTTP 302"),
        ];
        for (status, body, kind, needle) in cases {
            let error =
                check_answer("attachment create", &response(status, body)).expect_err("fails");
            assert_eq!(error.kind, kind, "{status}");
            let text = error.to_string();
            assert!(text.contains(needle) && text.contains("attachment create"), "{text}");
        }
        assert_eq!(check_answer("x", &response(204, Value::Null)), Ok(Value::Null));
    }

    #[test]
    fn attachments_parse_and_bad_ones_are_protocol_errors() {
        let flat = json!({"driver_volume_type": "iscsi", "target_iqn": "iqn.a:b",
            "target_portal": "127.0.0.1:3260", "attachment_id": "a-1"});
        let with_info =
            json!({"attachment": {"id": "a-1", "status": "attaching", "connection_info": flat}});
        let parsed = parse_attachment("op", &with_info).expect("ok");
        assert_eq!(parsed.id, "a-1");
        assert_eq!(parsed.connection_info.as_ref(), Some(&flat));
        for reserved in [
            json!({"attachment": {"id": "a-2", "connection_info": null}}),
            json!({"attachment": {"id": "a-2"}}),
            json!({"attachment": {"id": "a-2", "connection_info": {}}}),
        ] {
            assert_eq!(parse_attachment("op", &reserved).expect("ok").connection_info, None);
        }
        for bad in [
            Value::Null,
            json!("text"),
            json!({"attachment": []}),
            json!({"attachment": {}}),
            json!({"attachment": {"id": 5}}),
            json!({"attachment": {"id": "a/../b"}}),
            json!({"attachment": {"id": "a", "connection_info": "x"}}),
        ] {
            let error = parse_attachment("op", &bad).expect_err(&bad.to_string());
            assert_eq!(error.kind, VolumeApiErrorKind::Protocol, "{bad}");
        }
    }

    #[test]
    fn configuration_is_checked() {
        let config = |endpoint: &str, token: &str| VolumeApiConfig {
            endpoint: endpoint.into(),
            token: token.into(),
        };
        assert!(VolumeApi::new(&config("http://127.0.0.1:8776/v3/demo", "admin:demo")).is_ok());
        assert_eq!(
            VolumeApi::new(&config("http://127.0.0.1:8776/v3/demo/", "t"))
                .map(|api| api.endpoint_url()),
            Ok("http://127.0.0.1:8776/v3/demo".to_owned())
        );
        assert!(VolumeApi::new(&config("https://h/v3/p", "t")).is_err());
        assert!(VolumeApi::new(&config("http://h/v3/p", "")).is_err());
        assert!(VolumeApi::new(&config("http://h/v3/p", "a b")).is_err());
        assert!(VolumeApi::new(&config("http://h/v3/p", "bad\ntoken")).is_err());
        let shown = format!("{:?}", config("http://h/v3/p", "s3cret"));
        assert!(!shown.contains("s3cret"), "Debug hides the token: {shown}");
    }
}

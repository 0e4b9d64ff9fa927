//! Cinder's fault bodies: `{"<name>": {"message": ..., "code": N}}`, the name chosen by the HTTP
//! code exactly as Cinder's `wsgi.Fault` does.

use serde_json::{Value, json};

/// The errors the API reports. Handlers return these; only `api` turns them into HTTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadMethod(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    OverLimit(String),
    #[error("{0}")]
    BadMediaType(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Fault {
    pub fn code(&self) -> u16 {
        match self {
            Fault::BadRequest(_) => 400,
            Fault::Unauthorized(_) => 401,
            Fault::Forbidden(_) => 403,
            Fault::NotFound(_) => 404,
            Fault::BadMethod(_) => 405,
            Fault::NotAcceptable(_) => 406,
            Fault::Conflict(_) => 409,
            Fault::OverLimit(_) => 413,
            Fault::BadMediaType(_) => 415,
            Fault::Internal(_) => 500,
            Fault::Unavailable(_) => 503,
        }
    }

    /// The JSON body Cinder sends for this fault.
    pub fn body(&self) -> Value {
        let code = self.code();
        json!({ fault_name(code): { "message": self.to_string(), "code": code } })
    }

    pub fn volume_not_found(id: &str) -> Fault {
        Fault::NotFound(format!("Volume {id} could not be found."))
    }
    pub fn snapshot_not_found(id: &str) -> Fault {
        Fault::NotFound(format!("Snapshot {id} could not be found."))
    }
    pub fn attachment_not_found(id: &str) -> Fault {
        Fault::NotFound(format!(
            "Volume attachment could not be found with filter: attachment_id = {id}."
        ))
    }
    pub fn type_not_found(id: &str) -> Fault {
        Fault::NotFound(format!("Volume type {id} could not be found."))
    }
    pub fn admin_only() -> Fault {
        Fault::Forbidden("Policy doesn't allow this operation to be performed.".into())
    }
    pub fn invalid_volume(message: impl AsRef<str>) -> Fault {
        Fault::BadRequest(format!("Invalid volume: {}", message.as_ref()))
    }
    pub fn invalid_input(message: impl AsRef<str>) -> Fault {
        Fault::BadRequest(format!("Invalid input received: {}", message.as_ref()))
    }
}

/// Cinder's `wsgi.Fault._fault_names`; codes it does not name become `computeFault`.
pub fn fault_name(code: u16) -> &'static str {
    match code {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 => "conflictingRequest",
        413 => "overLimit",
        415 => "badMediaType",
        501 => "notImplemented",
        503 => "serviceUnavailable",
        _ => "computeFault",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_match_cinder() {
        let cases = [
            (Fault::BadRequest("x".into()), 400, "badRequest"),
            (Fault::Unauthorized("x".into()), 401, "unauthorized"),
            (Fault::Forbidden("x".into()), 403, "forbidden"),
            (Fault::NotFound("x".into()), 404, "itemNotFound"),
            (Fault::BadMethod("x".into()), 405, "badMethod"),
            (Fault::NotAcceptable("x".into()), 406, "computeFault"),
            (Fault::Conflict("x".into()), 409, "conflictingRequest"),
            (Fault::OverLimit("x".into()), 413, "overLimit"),
            (Fault::BadMediaType("x".into()), 415, "badMediaType"),
            (Fault::Internal("x".into()), 500, "computeFault"),
            (Fault::Unavailable("x".into()), 503, "serviceUnavailable"),
        ];
        for (fault, code, name) in cases {
            assert_eq!(fault.code(), code);
            assert_eq!(fault.body(), json!({ name: { "message": "x", "code": code } }));
        }
    }

    #[test]
    fn messages_are_cinders() {
        assert_eq!(
            Fault::volume_not_found("abc").body(),
            json!({"itemNotFound": {"message": "Volume abc could not be found.", "code": 404}})
        );
        assert_eq!(
            Fault::invalid_volume("Volume status must be available.").to_string(),
            "Invalid volume: Volume status must be available."
        );
    }
}

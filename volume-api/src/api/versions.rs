//! Version discovery and the served OpenAPI documents.

use crate::microversion::{MAX, MIN};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const OPENAPI: &str = include_str!("../../openapi.yaml");
const NODE_OPENAPI: &str = include_str!("../../node-control-api.yaml");

fn document(headers: &HeaderMap) -> Value {
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost:8776");
    json!({"versions": [{
        "id": "v3.0",
        "status": "CURRENT",
        "version": MAX.to_string(),
        "min_version": MIN.to_string(),
        "updated": "2023-07-17T00:00:00Z",
        "links": [
            {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
            {"rel": "self", "href": format!("http://{host}/v3/")},
        ],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.volume+json;version=3"}],
    }]})
}

/// `GET /`: 300 Multiple Choices, as Cinder.
pub async fn root(headers: HeaderMap) -> Response {
    (StatusCode::MULTIPLE_CHOICES, axum::Json(document(&headers))).into_response()
}

/// `GET /v3` and `GET /v3/`.
pub async fn v3(headers: HeaderMap) -> Response {
    (StatusCode::OK, axum::Json(document(&headers))).into_response()
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

pub async fn node_openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], NODE_OPENAPI).into_response()
}

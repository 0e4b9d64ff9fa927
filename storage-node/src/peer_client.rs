//! The few calls one tandemd makes to a peer tandemd's HTTP control API while creating a
//! resource in tandem-api's form: reserve the peer's replication endpoint, read its status.
//! HTTP/1.1, one connection per call, the bearer token this node's API uses (tandem-api
//! configures every node with the same node token).

use crate::constants::{
    COPY_RATE_MIB_PER_S_MIN, PEER_CALL_TIMEOUT_MS_MAX, PEER_RESPONSE_BYTES_MAX,
};
use crate::provision::url_authority;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {url} unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("peer {url} answered HTTP {status}: {message}")]
    Refused { url: String, status: u16, message: String },
    #[error("peer {url} answered garbage: {message}")]
    Protocol { url: String, message: String },
}

/// `method url path` with an optional JSON body; the decoded JSON answer of a 2xx, within
/// `PEER_CALL_TIMEOUT_MS_MAX`.
pub async fn call<T: serde::de::DeserializeOwned>(
    base_url: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<T, PeerError> {
    call_within(PEER_CALL_TIMEOUT_MS_MAX, base_url, token, method, path, body).await
}

/// How long a call whose answer waits for a copy of `data_bytes` of replica data may take:
/// the copy runs at `COPY_RATE_MIB_PER_S_MIN` at worst.
pub fn copy_call_timeout_ms(data_bytes: u64) -> u64 {
    let copy_ms = (data_bytes >> 20).saturating_mul(1000) / COPY_RATE_MIB_PER_S_MIN;
    PEER_CALL_TIMEOUT_MS_MAX.saturating_add(copy_ms)
}

/// [`call`] with a timeout of `timeout_ms`.
pub async fn call_within<T: serde::de::DeserializeOwned>(
    timeout_ms: u64,
    base_url: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<T, PeerError> {
    let url = base_url.to_owned();
    let unreachable = |message: String| PeerError::Unreachable { url: url.clone(), message };
    let exchange = async {
        let authority = url_authority(base_url)
            .ok_or_else(|| unreachable("only http://HOST:PORT URLs are supported".into()))?;
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .map_err(|e| unreachable(e.to_string()));
        let answer = match request {
            Ok(request) => match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    Limited::new(response.into_body(), PEER_RESPONSE_BYTES_MAX)
                        .collect()
                        .await
                        .map(|collected| (status, collected.to_bytes()))
                        .map_err(|e| unreachable(e.to_string()))
                }
                Err(e) => Err(unreachable(e.to_string())),
            },
            Err(e) => Err(e),
        };
        driver.abort();
        answer
    };
    let timeout = Duration::from_millis(timeout_ms);
    let (status, bytes) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout_ms} ms")))??;
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
        return Err(PeerError::Refused { url, status, message });
    }
    serde_json::from_slice(&bytes).map_err(|e| PeerError::Protocol { url, message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copying_call_allows_for_the_slowest_copy_of_the_data() {
        assert_eq!(copy_call_timeout_ms(0), PEER_CALL_TIMEOUT_MS_MAX);
        let one_gib_ms = 1024 * 1000 / COPY_RATE_MIB_PER_S_MIN;
        assert_eq!(copy_call_timeout_ms(1 << 30), PEER_CALL_TIMEOUT_MS_MAX + one_gib_ms);
        assert!(copy_call_timeout_ms(u64::MAX) >= copy_call_timeout_ms(1 << 40));
    }
}

//! The seam to storage nodes: what tandem-api asks a node to do (`NodeClient`), and the HTTP
//! implementation against the contract in `node-control-api.yaml` (JSON over HTTP/1.1 with a
//! bearer token).

use crate::constants::{NODE_CALL_TIMEOUT_MS_MAX, NODE_COPY_RATE_MIB_PER_S_MIN};
use crate::model::Node;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("node {node} unreachable: {message}")]
    Unreachable { node: String, message: String },
    #[error("node {node} timed out after {timeout_ms} ms")]
    Timeout { node: String, timeout_ms: u64 },
    #[error("node {node} refused: HTTP {status}: {message}")]
    Refused { node: String, status: u16, message: String },
    #[error("node {node} answered garbage: {message}")]
    Protocol { node: String, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chap {
    pub username: String,
    pub secret: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub node: String,
    pub url: String,
    /// `"none"`: the peer is the volume's diskless tiebreaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// Where the new resource's data comes from, when not blank. The node holding a replica of the
/// source holds it locally (the scheduler places clones on the source's nodes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Snapshot { resource: String, snapshot: String },
    Resource { resource: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateResource {
    pub size_bytes: u64,
    pub role: Role,
    pub protocol: char,
    pub peers: Vec<Peer>,
    pub target_iqn: String,
    pub chap: Chap,
    pub source: Option<Source>,
    /// `"none"`: this node is the volume's diskless tiebreaker (a quorum vote, no data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Run the nodes' promoter: a surviving replica takes over when the primary dies. The
    /// node defaults quorum to majority with three nodes or more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_promote: bool,
    /// The promoter's order among the replicas with data (the primary first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_nodes: Vec<String>,
}

/// How a node exports a resource over iSCSI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub portal: String,
    pub target_iqn: String,
    pub lun: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub availability_zone: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub name: String,
    pub role: Role,
    /// DRBD's disk state word (UpToDate, Inconsistent, ...).
    pub disk_state: String,
    pub size_bytes: u64,
    pub export: Option<Export>,
}

pub type NodeFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, NodeError>> + Send + 'a>>;

/// What tandem-api needs from a storage node. Every call is idempotent: creating a resource that
/// exists with the same size succeeds, deleting a missing one succeeds, so an operation
/// interrupted by a crash can be replayed.
pub trait NodeClient: Send + Sync + 'static {
    fn info<'a>(&'a self, node: &'a Node) -> NodeFuture<'a, NodeInfo>;
    fn create<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        request: &'a CreateResource,
    ) -> NodeFuture<'a, Export>;
    fn delete<'a>(&'a self, node: &'a Node, resource: &'a str) -> NodeFuture<'a, ()>;
    fn resize<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        size_bytes: u64,
    ) -> NodeFuture<'a, ()>;
    /// The first pass of an extend: only grow the node's backing file (tandemd's `grow_only`),
    /// so that the primary's `resize` in the second pass finds every replica grown.
    fn grow_backing<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        size_bytes: u64,
    ) -> NodeFuture<'a, ()> {
        self.resize(node, resource, size_bytes)
    }
    fn promote<'a>(&'a self, node: &'a Node, resource: &'a str) -> NodeFuture<'a, ()>;
    fn demote<'a>(&'a self, node: &'a Node, resource: &'a str) -> NodeFuture<'a, ()>;
    /// `size_bytes`: the volume's, for how long the copies may take.
    fn snapshot<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        snapshot: &'a str,
        size_bytes: u64,
    ) -> NodeFuture<'a, ()>;
    fn delete_snapshot<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        snapshot: &'a str,
    ) -> NodeFuture<'a, ()>;
    fn status<'a>(&'a self, node: &'a Node, resource: &'a str) -> NodeFuture<'a, ResourceStatus>;
}

/// How long copying `bytes` may take at `NODE_COPY_RATE_MIB_PER_S_MIN`.
fn copy_time(bytes: u64) -> Duration {
    Duration::from_millis((bytes >> 20).saturating_mul(1000) / NODE_COPY_RATE_MIB_PER_S_MIN)
}

/// `NodeClient` over HTTP/1.1, one connection per call (calls are rare and long-running).
pub struct HttpNodeClient {
    token: String,
    timeout: Duration,
}

impl HttpNodeClient {
    pub fn new(token: String) -> Self {
        HttpNodeClient { token, timeout: Duration::from_millis(NODE_CALL_TIMEOUT_MS_MAX) }
    }

    async fn call(
        &self,
        node: &Node,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, NodeError> {
        self.call_within(self.timeout, node, method, path, body).await
    }

    async fn call_within(
        &self,
        timeout: Duration,
        node: &Node,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, NodeError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match tokio::time::timeout(timeout, self.call_once(node, method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(NodeError::Timeout { node: node.name.clone(), timeout_ms }),
        }
    }

    /// The timeout of a call whose answer waits for `copies` copies of `size_bytes` of data.
    fn copy_timeout(&self, size_bytes: u64, copies: u64) -> Duration {
        self.timeout.saturating_add(copy_time(size_bytes.saturating_mul(copies)))
    }

    async fn call_once(
        &self,
        node: &Node,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, NodeError> {
        let unreachable =
            |message: String| NodeError::Unreachable { node: node.name.clone(), message };
        let authority = node
            .url
            .strip_prefix("http://")
            .ok_or_else(|| unreachable(format!("only http:// URLs are supported: {}", node.url)))?
            .trim_end_matches('/');
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let body_bytes = match body {
            Some(value) => Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
            None => Bytes::new(),
        };
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(Full::new(body_bytes))
            .map_err(|e| unreachable(e.to_string()))?;
        let response =
            sender.send_request(request).await.map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        driver.abort();
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(NodeError::Refused { node: node.name.clone(), status, message });
        }
        Ok(bytes)
    }

    fn decode<T: serde::de::DeserializeOwned>(node: &Node, bytes: &[u8]) -> Result<T, NodeError> {
        serde_json::from_slice(bytes)
            .map_err(|e| NodeError::Protocol { node: node.name.clone(), message: e.to_string() })
    }
}

/// A 404 on a delete means the piece is already gone, which is what the caller wanted.
fn gone_is_fine(result: Result<Bytes, NodeError>) -> Result<(), NodeError> {
    match result {
        Ok(_) | Err(NodeError::Refused { status: 404, .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

impl NodeClient for HttpNodeClient {
    fn info<'a>(&'a self, node: &'a Node) -> NodeFuture<'a, NodeInfo> {
        Box::pin(
            async move { Self::decode(node, &self.call(node, "GET", "/v1/node", None).await?) },
        )
    }
    fn create<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        request: &'a CreateResource,
    ) -> NodeFuture<'a, Export> {
        Box::pin(async move {
            let body = serde_json::to_value(request).unwrap_or_default();
            // A volume made from another one first snapshots the source (every replica at
            // once), then copies the snapshot into the new replica.
            let timeout = match request.source {
                Some(_) => self.copy_timeout(request.size_bytes, 2),
                None => self.timeout,
            };
            let path = format!("/v1/resources/{resource}");
            let bytes = self.call_within(timeout, node, "PUT", &path, Some(body)).await?;
            Self::decode(node, &bytes)
        })
    }
    fn delete<'a>(&'a self, node: &'a Node, resource: &'a str) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            gone_is_fine(
                self.call(node, "DELETE", &format!("/v1/resources/{resource}"), None).await,
            )
        })
    }
    fn resize<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        size_bytes: u64,
    ) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            let body = serde_json::json!({ "size_bytes": size_bytes });
            self.call(node, "POST", &format!("/v1/resources/{resource}/resize"), Some(body))
                .await
                .map(drop)
        })
    }
    fn grow_backing<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        size_bytes: u64,
    ) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            let body = serde_json::json!({ "size_bytes": size_bytes, "grow_only": true });
            self.call(node, "POST", &format!("/v1/resources/{resource}/resize"), Some(body))
                .await
                .map(drop)
        })
    }
    fn promote<'a>(&'a self, node: &'a Node, resource: &'a str) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            self.call(node, "POST", &format!("/v1/resources/{resource}/promote"), None)
                .await
                .map(drop)
        })
    }
    fn demote<'a>(&'a self, node: &'a Node, resource: &'a str) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            self.call(node, "POST", &format!("/v1/resources/{resource}/demote"), None)
                .await
                .map(drop)
        })
    }
    fn snapshot<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        snapshot: &'a str,
        size_bytes: u64,
    ) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            // The primary answers once every replica (each on its own node, at once) is copied.
            let timeout = self.copy_timeout(size_bytes, 1);
            let path = format!("/v1/resources/{resource}/snapshots/{snapshot}");
            self.call_within(timeout, node, "PUT", &path, None).await.map(drop)
        })
    }
    fn delete_snapshot<'a>(
        &'a self,
        node: &'a Node,
        resource: &'a str,
        snapshot: &'a str,
    ) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            gone_is_fine(
                self.call(
                    node,
                    "DELETE",
                    &format!("/v1/resources/{resource}/snapshots/{snapshot}"),
                    None,
                )
                .await,
            )
        })
    }
    fn status<'a>(&'a self, node: &'a Node, resource: &'a str) -> NodeFuture<'a, ResourceStatus> {
        Box::pin(async move {
            Self::decode(
                node,
                &self.call(node, "GET", &format!("/v1/resources/{resource}"), None).await?,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that waits for copies allows for the slowest copy of all of them on top of the
    /// plain call's timeout; without copies it is the plain timeout.
    #[test]
    fn copying_calls_wait_for_the_slowest_copy_of_every_replica() {
        let client = HttpNodeClient::new("token".into());
        assert_eq!(client.copy_timeout(0, 3), client.timeout);
        let gib_at_min_rate = Duration::from_millis(1024 * 1000 / NODE_COPY_RATE_MIB_PER_S_MIN);
        assert_eq!(client.copy_timeout(1 << 30, 1), client.timeout + gib_at_min_rate);
        assert_eq!(client.copy_timeout(1 << 30, 3), client.timeout + gib_at_min_rate * 3);
        assert!(client.copy_timeout(u64::MAX, u64::MAX) >= client.copy_timeout(1 << 40, 4));
    }
}

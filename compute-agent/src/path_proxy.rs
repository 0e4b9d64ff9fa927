//! Multipath for QEMU's iSCSI initiator: a per-volume local portal that QEMU logs in through,
//! spliced to whichever of the volume's portals answers.
//!
//! QEMU's `iscsi` block driver knows one portal. When that node dies, libiscsi reconnects to
//! the same portal forever and holds the guest's requests (measured: even with `timeout` set no
//! error is raised), so neither `werror=stop` nor a `blockdev-reopen` (which drains the node
//! first) can move the disk to the promoted secondary. Cinder's connection_info lists every
//! replica's portal (`target_portals`, the primary first) for exactly this: a multipath
//! initiator. This module is that initiator-side path selection, below libiscsi: QEMU connects
//! to `127.0.0.1:PORT`; each connection it opens is joined to the first portal, starting at the
//! last one that worked, that accepts a TCP connection. When the node behind a connection
//! dies, both ends close, libiscsi logs in again through the proxy, and the proxy picks the
//! next live portal. All of a Tandem resource's portals name the same target and LUN (a
//! secondary forwards to the primary, and serves locally once promoted), so the login that
//! libiscsi replays is valid on any of them.
//!
//! The cost is one extra copy of every PDU through this process; the proxy is used only when
//! connection_info offers more than one path (see `supervisor.rs`).
//!
//! [`PathOrder`] is the pure choice; [`PathProxy`] the tokio driver.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::connection_info::Portal;
use crate::constants::{
    PATH_CONNECT_TIMEOUT_MS, PATH_PROXY_BUFFER_BYTES, PATH_PROXY_CONNECTIONS_MAX,
    PATH_PROXY_REPLAY_BYTES_MAX,
};

/// Which portal to try first and in what order: starting at the last one that worked, so a
/// reconnect after a glitch returns to the same node and a failover sticks to the survivor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathOrder {
    paths: usize,
    preferred: usize,
}

impl PathOrder {
    pub fn new(paths: usize) -> PathOrder {
        assert!(paths > 0, "a volume has at least one path");
        PathOrder { paths, preferred: 0 }
    }

    /// Path indexes in the order a new connection tries them.
    pub fn order(&self) -> Vec<usize> {
        (0..self.paths).map(|offset| (self.preferred + offset) % self.paths).collect()
    }

    /// A connection through `path` was established.
    pub fn connected(&mut self, path: usize) {
        assert!(path < self.paths);
        self.preferred = path;
    }

    /// The path in use keeps failing I/O although it accepts connections (a node that lost
    /// its primary and cannot serve): try the next one first.
    pub fn rotate(&mut self) {
        self.preferred = (self.preferred + 1) % self.paths;
    }

    pub fn preferred(&self) -> usize {
        self.preferred
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PathProxyError {
    #[error("path proxy: cannot listen on {address}: {source}")]
    Listen { address: SocketAddr, source: std::io::Error },
}

/// A running proxy; dropping it stops accepting and closes every connection it joined.
#[derive(Debug)]
pub struct PathProxy {
    local: SocketAddr,
    portals: Vec<Portal>,
    order: Arc<Mutex<PathOrder>>,
    /// Rotations ask the open connections to close so libiscsi reconnects.
    reset: Arc<Notify>,
    /// Connections joined so far (a failover shows as more than one).
    connections_total: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PathProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Connections watch `reset`, so aborting the acceptor alone would leave them open.
        self.reset.notify_waiters();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PathProxy {
    /// Listens on `127.0.0.1:port` (0 picks a free port; a restarted agent passes the port
    /// QEMU already uses) and joins connections to `portals`. Needs a tokio runtime.
    pub fn start(portals: Vec<Portal>, port: u16) -> Result<PathProxy, PathProxyError> {
        assert!(!portals.is_empty(), "a volume has at least one path");
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let listen_error = |source| PathProxyError::Listen { address, source };
        let listener = std::net::TcpListener::bind(address).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let listener = TcpListener::from_std(listener).map_err(listen_error)?;
        let local = listener.local_addr().map_err(listen_error)?;
        let order = Arc::new(Mutex::new(PathOrder::new(portals.len())));
        let reset = Arc::new(Notify::new());
        let connections_total = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            portals.clone(),
            order.clone(),
            reset.clone(),
            connections_total.clone(),
        ));
        Ok(PathProxy { local, portals, order, reset, connections_total, task })
    }

    /// The portal QEMU connects to.
    pub fn local_portal(&self) -> Portal {
        Portal { host: self.local.ip().to_string(), port: self.local.port() }
    }

    pub fn portals(&self) -> &[Portal] {
        &self.portals
    }

    /// The portal new connections try first.
    pub fn preferred(&self) -> Portal {
        self.portals[lock(&self.order).preferred()].clone()
    }

    pub fn connections_total(&self) -> usize {
        self.connections_total.load(Ordering::Relaxed)
    }

    /// Moves to the next path: closes the open connections (libiscsi logs in again and
    /// replays its outstanding commands) and prefers the next portal.
    pub fn rotate(&self) {
        lock(&self.order).rotate();
        self.reset.notify_waiters();
    }
}

async fn accept_loop(
    listener: TcpListener,
    portals: Vec<Portal>,
    order: Arc<Mutex<PathOrder>>,
    reset: Arc<Notify>,
    connections_total: Arc<AtomicUsize>,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(PATH_PROXY_CONNECTIONS_MAX));
    loop {
        let Ok((downstream, _)) = listener.accept().await else {
            // Out of descriptors or similar: do not spin.
            tokio::time::sleep(Duration::from_millis(PATH_CONNECT_TIMEOUT_MS)).await;
            continue;
        };
        // One QEMU block node opens one session; more than a few connections is a stray
        // client, which waits rather than growing the agent without bound.
        let Ok(permit) = open.clone().acquire_owned().await else { return };
        let portals = portals.clone();
        let order = order.clone();
        let reset = reset.clone();
        let connections_total = connections_total.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve(downstream, &portals, &order, &reset, &connections_total).await;
        });
    }
}

/// Joins one initiator connection to a live path. Until the target has answered anything,
/// what the initiator sent (its login request) is kept: a target that dies before answering
/// (a node killed just as the initiator reconnected) is replaced by the next path and the
/// bytes replayed, because libiscsi, once a reconnect fails, waits a second or more before it
/// tries again. After the first answer the connection is the path's for good.
async fn serve(
    mut downstream: TcpStream,
    portals: &[Portal],
    order: &Mutex<PathOrder>,
    reset: &Notify,
    connections_total: &AtomicUsize,
) {
    let _ = downstream.set_nodelay(true);
    let mut sent: Vec<u8> = Vec::new();
    let mut failed: Vec<usize> = Vec::new();
    loop {
        let Some((index, mut upstream)) = connect_first(portals, order, &failed).await else {
            // No path answers: closing makes libiscsi retry after its own pause.
            return;
        };
        let _ = upstream.set_nodelay(true);
        match first_answer(&mut downstream, &mut upstream, &mut sent).await {
            FirstAnswer::Answered => {
                connections_total.fetch_add(1, Ordering::Relaxed);
                tracing::info!("path proxy: joined a connection to {}", portals[index]);
                join(downstream, upstream, reset).await;
                return;
            }
            FirstAnswer::PathFailed if sent.len() <= PATH_PROXY_REPLAY_BYTES_MAX => {
                tracing::info!("path proxy: {} closed before answering; next path", portals[index]);
                failed.push(index);
            }
            FirstAnswer::PathFailed | FirstAnswer::InitiatorGone => return,
        }
    }
}

enum FirstAnswer {
    /// The target's first bytes reached the initiator.
    Answered,
    /// The path closed or failed before answering (the initiator saw nothing of it).
    PathFailed,
    InitiatorGone,
}

/// Sends `sent` (bytes already taken from the initiator) and whatever else the initiator sends
/// to `upstream`, keeping them in `sent`, until the target answers; forwards that answer.
async fn first_answer(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    sent: &mut Vec<u8>,
) -> FirstAnswer {
    use tokio::io::AsyncReadExt;
    if !sent.is_empty() && upstream.write_all(sent).await.is_err() {
        return FirstAnswer::PathFailed;
    }
    let mut from_initiator = vec![0u8; 16 * 1024];
    let mut from_target = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = downstream.read(&mut from_initiator) => match read {
                Ok(0) | Err(_) => return FirstAnswer::InitiatorGone,
                Ok(n) => {
                    // Past the replay limit the bytes are not kept: a later failure of this
                    // path closes the initiator's connection instead of replaying.
                    if sent.len() <= PATH_PROXY_REPLAY_BYTES_MAX {
                        sent.extend_from_slice(&from_initiator[..n]);
                    }
                    if upstream.write_all(&from_initiator[..n]).await.is_err() {
                        return FirstAnswer::PathFailed;
                    }
                }
            },
            read = upstream.read(&mut from_target) => match read {
                Ok(0) | Err(_) => return FirstAnswer::PathFailed,
                Ok(n) => {
                    return if downstream.write_all(&from_target[..n]).await.is_ok() {
                        FirstAnswer::Answered
                    } else {
                        FirstAnswer::InitiatorGone
                    };
                }
            },
        }
    }
}

/// Connects to the first path in the current order that accepts, skipping `failed` ones.
async fn connect_first(
    portals: &[Portal],
    order: &Mutex<PathOrder>,
    failed: &[usize],
) -> Option<(usize, TcpStream)> {
    let tries = lock(order).order();
    for index in tries.into_iter().filter(|index| !failed.contains(index)) {
        let portal = &portals[index];
        let address = format!("{}:{}", portal.host, portal.port);
        let attempt = tokio::time::timeout(
            Duration::from_millis(PATH_CONNECT_TIMEOUT_MS),
            TcpStream::connect(address),
        )
        .await;
        if let Ok(Ok(stream)) = attempt {
            lock(order).connected(index);
            return Some((index, stream));
        }
    }
    None
}

/// Copies both ways until either side closes or fails, or a rotation resets the path; then
/// closes both, so the initiator sees the path go and reconnects.
async fn join(mut downstream: TcpStream, mut upstream: TcpStream, reset: &Notify) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(
            &mut downstream,
            &mut upstream,
            PATH_PROXY_BUFFER_BYTES,
            PATH_PROXY_BUFFER_BYTES,
        ) => {}
        () = reset.notified() => {}
    }
    let _ = downstream.shutdown().await;
    let _ = upstream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn order_starts_at_the_path_that_last_worked() {
        let cases: &[(&[&str], &[usize])] = &[
            (&[], &[0, 1, 2]),
            (&["connected 1"], &[1, 2, 0]),
            (&["connected 2", "rotate"], &[0, 1, 2]),
            (&["rotate", "rotate"], &[2, 0, 1]),
            (&["connected 1", "connected 0"], &[0, 1, 2]),
        ];
        for (events, expected) in cases {
            let mut order = PathOrder::new(3);
            for event in *events {
                match event.split_once(' ') {
                    Some(("connected", path)) => order.connected(path.parse().unwrap()),
                    _ => order.rotate(),
                }
            }
            assert_eq!(order.order(), *expected, "{events:?}");
        }
    }

    async fn echo_server(tag: u8) -> (Portal, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1];
                    while stream.read_exact(&mut buffer).await.is_ok() {
                        if stream.write_all(&[buffer[0] ^ tag]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (Portal { host: "127.0.0.1".into(), port }, task)
    }

    async fn round_trip(proxy: &PathProxy, byte: u8) -> Option<u8> {
        let mut stream =
            TcpStream::connect(format!("127.0.0.1:{}", proxy.local_portal().port)).await.ok()?;
        stream.write_all(&[byte]).await.ok()?;
        let mut answer = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer))
            .await
            .ok()?
            .ok()?;
        Some(answer[0])
    }

    #[tokio::test]
    async fn a_dead_path_moves_new_connections_to_the_next_one() {
        let (first, first_task) = echo_server(0x10).await;
        let (second, _second_task) = echo_server(0x20).await;
        let proxy = PathProxy::start(vec![first.clone(), second.clone()], 0).unwrap();
        assert_eq!(round_trip(&proxy, 1).await, Some(0x11), "the first path while it lives");
        assert_eq!(proxy.preferred(), first);
        // The first node dies: its listener goes away and connects are refused.
        first_task.abort();
        let _ = first_task.await;
        assert_eq!(round_trip(&proxy, 1).await, Some(0x21), "the survivor");
        assert_eq!(proxy.preferred(), second, "and stays preferred");
        assert_eq!(proxy.connections_total(), 2);
    }

    #[tokio::test]
    async fn rotate_closes_the_open_connection_and_prefers_the_next_path() {
        let (first, _first_task) = echo_server(0x10).await;
        let (second, _second_task) = echo_server(0x20).await;
        let proxy = PathProxy::start(vec![first, second.clone()], 0).unwrap();
        let mut stream =
            TcpStream::connect(format!("127.0.0.1:{}", proxy.local_portal().port)).await.unwrap();
        stream.write_all(&[1]).await.unwrap();
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[0], 0x11);
        proxy.rotate();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the joined connection is closed");
        assert_eq!(proxy.preferred(), second);
        assert_eq!(round_trip(&proxy, 2).await, Some(0x22));
    }

    /// A node dying as the initiator reconnects: it accepts the connection and closes it
    /// without answering. The initiator's bytes go to the next path on the same connection.
    #[tokio::test]
    async fn a_path_that_closes_before_answering_is_replaced_on_the_same_connection() {
        let dying = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dying_portal =
            Portal { host: "127.0.0.1".into(), port: dying.local_addr().unwrap().port() };
        let closer = tokio::spawn(async move {
            loop {
                let (stream, _) = dying.accept().await.unwrap();
                drop(stream);
            }
        });
        let (second, _second_task) = echo_server(0x20).await;
        let proxy = PathProxy::start(vec![dying_portal, second.clone()], 0).unwrap();
        assert_eq!(round_trip(&proxy, 3).await, Some(0x23), "answered by the second path");
        assert_eq!(proxy.preferred(), second);
        assert_eq!(proxy.connections_total(), 1, "one joined connection, no reconnect");
        closer.abort();
    }

    #[tokio::test]
    async fn no_live_path_closes_the_connection() {
        let dead = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            Portal { host: "127.0.0.1".into(), port }
        };
        let proxy = PathProxy::start(vec![dead], 0).unwrap();
        assert_eq!(round_trip(&proxy, 1).await, None);
    }
}

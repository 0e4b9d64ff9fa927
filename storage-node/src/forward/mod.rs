//! The forward link: how a secondary's iSCSI port serves a logical unit that lives on the
//! primary. The secondary's target port is a remote port of the primary's logical unit:
//! each SCSI command arriving there (with its I_T nexus), each LUN reset and each login and
//! logout is carried to the primary's tandemd, which runs it on its own logical unit
//! (`iscsi_target::driver::execute_forwarded`) and answers with status, sense and Data-In.
//!
//! One TCP connection per peer node, opened by the secondary to the peer's `--forward-listen`
//! address and kept up (reconnected every `FORWARD_RECONNECT_INTERVAL_MS`). A hello names the
//! sending node; each request names the resource and the sender's node id, and the primary
//! serves it only if it is Primary for that resource and the sender is that resource's peer
//! of that name. Requests are multiplexed by id; at most `FORWARD_IN_FLIGHT_MAX` are out per
//! link, each frame is at most `FORWARD_FRAME_BYTES_MAX`. When the link drops, every request
//! out on it fails at once (the iSCSI layer answers with a retryable sense, never GOOD) and
//! the secondary's port goes back to ALUA standby; on the primary, the remote nexuses of that
//! link are released as if they had logged out.

pub mod node;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iscsi_target::remote::{ForwardError, ForwardReply, ForwardRequest};
use iscsi_target::scsi::pr::Nexus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::constants::{
    FORWARD_CONNECT_TIMEOUT_MS, FORWARD_IN_FLIGHT_MAX, FORWARD_NEXUSES_PER_LINK_MAX,
    FORWARD_QUEUE_FRAMES_MAX, FORWARD_RECONNECT_INTERVAL_MS, FORWARD_REQUEST_TIMEOUT_MS,
};
use wire::{Frame, WireError};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This node's forward links: outbound ones to peers (by node name) and a count of inbound
/// ones from peers (which the primary's REPORT TARGET PORT GROUPS shows as active).
pub struct Forwarder {
    local_node: String,
    links: Mutex<HashMap<String, Arc<Link>>>,
    inbound: Mutex<HashMap<String, usize>>,
}

impl Forwarder {
    pub fn new(local_node: String) -> Arc<Self> {
        Arc::new(Self {
            local_node,
            links: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
        })
    }

    /// Keeps a link to `peer`'s forward listener at `address` up from now on (a task on the
    /// current runtime).
    pub fn add_peer(&self, peer: &str, address: SocketAddr) {
        let link = Arc::new(Link {
            peer: peer.to_owned(),
            address,
            local_node: self.local_node.clone(),
            up: AtomicBool::new(false),
            state: Mutex::new(LinkState::default()),
            permits: Semaphore::new(FORWARD_IN_FLIGHT_MAX),
            next_id: AtomicU64::new(1),
        });
        lock(&self.links).insert(peer.to_owned(), link.clone());
        tokio::spawn(link.run());
    }

    /// The link to `peer` when it is up.
    pub fn link(&self, peer: &str) -> Option<Arc<Link>> {
        lock(&self.links).get(peer).filter(|l| l.is_up()).cloned()
    }

    /// Whether `peer` has a forward link into this node.
    pub fn has_inbound(&self, peer: &str) -> bool {
        lock(&self.inbound).get(peer).is_some_and(|n| *n > 0)
    }
}

#[derive(Default)]
struct LinkState {
    /// Frames for the socket, while connected.
    sender: Option<mpsc::Sender<Bytes>>,
    /// Requests out, by id, with where their answer goes.
    pending: HashMap<u64, oneshot::Sender<Result<ForwardReply, String>>>,
}

/// An outbound forward link to one peer tandemd.
pub struct Link {
    peer: String,
    address: SocketAddr,
    local_node: String,
    up: AtomicBool,
    state: Mutex<LinkState>,
    permits: Semaphore,
    next_id: AtomicU64,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Sends `request` (for `resource`, from node `sender_node_id`) and waits for the answer.
    pub async fn request(
        &self,
        resource: &str,
        sender_node_id: u8,
        request: ForwardRequest,
    ) -> Result<ForwardReply, ForwardError> {
        let unavailable = |why: &str| ForwardError::Unavailable(format!("{}: {why}", self.peer));
        let _permit = self.permits.acquire().await.map_err(|_| unavailable("closed"))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer) = oneshot::channel();
        let sender = {
            let mut state = lock(&self.state);
            let sender = state.sender.clone().ok_or_else(|| unavailable("link down"))?;
            state.pending.insert(id, answer_tx);
            sender
        };
        let frame = wire::encode(&Frame::Request {
            id,
            resource: resource.to_owned(),
            sender_node_id,
            request,
        });
        let timeout = Duration::from_millis(FORWARD_REQUEST_TIMEOUT_MS);
        let result = tokio::time::timeout(timeout, async {
            sender.send(frame).await.map_err(|_| unavailable("link down"))?;
            match answer.await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(reason)) => Err(ForwardError::Refused(reason)),
                Err(_) => Err(unavailable("link lost with the request out")),
            }
        })
        .await
        .unwrap_or_else(|_| Err(unavailable("no answer in time")));
        lock(&self.state).pending.remove(&id);
        result
    }

    /// Fails every request out on this link at once (retryable, as when the link drops): the
    /// replication engine saw the peer go (a dead host resets nothing, so the link itself
    /// would only notice at the request timeout).
    pub fn fail_pending(&self) -> usize {
        let mut state = lock(&self.state);
        let failed = state.pending.len();
        state.pending.clear();
        failed
    }

    /// Connects, serves, and reconnects, for as long as tandemd runs.
    async fn run(self: Arc<Self>) {
        let mut logged_down = false;
        loop {
            match self.connect().await {
                Ok((stream, remote)) => {
                    tracing::info!(peer = %self.peer, node = %remote, "forward link up");
                    logged_down = false;
                    let error = self.serve(stream).await;
                    tracing::warn!(peer = %self.peer, "forward link down: {error}");
                }
                Err(error) => {
                    if !logged_down {
                        tracing::info!(peer = %self.peer, address = %self.address, "forward link not connected: {error}");
                        logged_down = true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(FORWARD_RECONNECT_INTERVAL_MS)).await;
        }
    }

    async fn connect(&self) -> Result<(TcpStream, String), String> {
        let timeout = Duration::from_millis(FORWARD_CONNECT_TIMEOUT_MS);
        let attempt = async {
            let mut stream = TcpStream::connect(self.address).await.map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let hello = wire::encode(&Frame::Hello { node: self.local_node.clone() });
            stream.write_all(&hello).await.map_err(|e| e.to_string())?;
            let mut input = BytesMut::new();
            match read_frame(&mut stream, &mut input).await.map_err(|e| e.to_string())? {
                Some(Frame::Welcome { node }) if node == self.peer => Ok((stream, node)),
                Some(Frame::Welcome { node }) => {
                    Err(format!("{} answers as {node}, not {}", self.address, self.peer))
                }
                _ => Err("no welcome".to_owned()),
            }
        };
        tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| Err("timed out".into()))
    }

    /// Runs a connected link until it fails; then fails every request out on it.
    async fn serve(&self, stream: TcpStream) -> String {
        let (mut reader, mut writer) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Bytes>(FORWARD_QUEUE_FRAMES_MAX);
        lock(&self.state).sender = Some(tx);
        self.up.store(true, Ordering::Release);
        let writing = async {
            while let Some(frame) = rx.recv().await {
                writer.write_all(&frame).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        let reading = async {
            let mut input = BytesMut::with_capacity(256 * 1024);
            loop {
                match read_frame(&mut reader, &mut input).await {
                    Ok(Some(Frame::Reply { id, reply })) => {
                        if let Some(answer) = lock(&self.state).pending.remove(&id) {
                            let _ = answer.send(reply);
                        }
                    }
                    Ok(Some(_)) => return "unexpected frame".to_owned(),
                    Ok(None) => return "closed by the peer".to_owned(),
                    Err(error) => return error.to_string(),
                }
            }
        };
        let error = tokio::select! {
            result = writing => result.err().unwrap_or_else(|| "writer ended".into()),
            error = reading => error,
        };
        self.up.store(false, Ordering::Release);
        let mut state = lock(&self.state);
        state.sender = None;
        // Dropping the answer senders fails every request out on this link at once.
        state.pending.clear();
        error
    }
}

/// Reads one frame; `None` at a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(
    reader: &mut R,
    input: &mut BytesMut,
) -> std::io::Result<Option<Frame>> {
    loop {
        match wire::frame_bytes(input) {
            Ok(Some(total)) if input.len() >= total => {
                let frame = input.split_to(total).freeze();
                return wire::decode(frame).map(Some).map_err(invalid);
            }
            Ok(Some(total)) => input.reserve(total - input.len()),
            Ok(None) => input.reserve(4096),
            Err(error) => return Err(invalid(error)),
        }
        if reader.read_buf(input).await? == 0 {
            return if input.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

fn invalid(error: WireError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, error)
}

/// What the serving side needs from the node: who may forward what, and where it runs.
pub trait ForwardTarget: Send + Sync + 'static {
    /// The target name of `resource` on this node, if `node` (with `node_id` in the resource)
    /// may forward to it now: this node is its Primary and `node` its peer.
    fn authorize(&self, resource: &str, node: &str, node_id: u8) -> Result<String, String>;
    /// Runs the request on the logical unit.
    fn execute(
        &self,
        request: ForwardRequest,
    ) -> impl std::future::Future<Output = Result<ForwardReply, ForwardError>> + Send;
    /// Releases remote nexuses of a link that went down.
    fn nexuses_lost(&self, lost: &[(String, Nexus)]);
}

/// Accepts forward links from peers until the listener fails.
pub async fn serve<T: ForwardTarget>(
    listener: TcpListener,
    forwarder: Arc<Forwarder>,
    target: Arc<T>,
) -> std::io::Result<()> {
    loop {
        let (stream, address) = listener.accept().await?;
        let forwarder = forwarder.clone();
        let target = target.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_link(stream, &forwarder, target).await {
                tracing::warn!(%address, "inbound forward link ended: {error}");
            }
        });
    }
}

async fn serve_link<T: ForwardTarget>(
    mut stream: TcpStream,
    forwarder: &Forwarder,
    target: Arc<T>,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut input = BytesMut::new();
    let hello = tokio::time::timeout(
        Duration::from_millis(FORWARD_CONNECT_TIMEOUT_MS),
        read_frame(&mut stream, &mut input),
    )
    .await
    .map_err(|_| "no hello in time".to_owned())?
    .map_err(|e| e.to_string())?;
    let Some(Frame::Hello { node }) = hello else { return Err("no hello".into()) };
    let welcome = wire::encode(&Frame::Welcome { node: forwarder.local_node.clone() });
    stream.write_all(&welcome).await.map_err(|e| e.to_string())?;
    tracing::info!(peer = %node, "inbound forward link up");
    *lock(&forwarder.inbound).entry(node.clone()).or_default() += 1;
    let nexuses: Mutex<HashSet<(String, Nexus)>> = Mutex::new(HashSet::new());
    let result = serve_requests(stream, input, &node, &target, &nexuses).await;
    if let Some(count) = lock(&forwarder.inbound).get_mut(&node) {
        *count = count.saturating_sub(1);
    }
    let lost: Vec<(String, Nexus)> = lock(&nexuses).drain().collect();
    target.nexuses_lost(&lost);
    tracing::info!(peer = %node, released = lost.len(), "inbound forward link down");
    result
}

async fn serve_requests<T: ForwardTarget>(
    stream: TcpStream,
    mut input: BytesMut,
    node: &str,
    target: &Arc<T>,
    nexuses: &Mutex<HashSet<(String, Nexus)>>,
) -> Result<(), String> {
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(FORWARD_QUEUE_FRAMES_MAX);
    let permits = Arc::new(Semaphore::new(FORWARD_IN_FLIGHT_MAX));
    let writing = async {
        while let Some(frame) = rx.recv().await {
            writer.write_all(&frame).await.map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    let reading = async {
        loop {
            let frame = match read_frame(&mut reader, &mut input).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(error) => return Err(error.to_string()),
            };
            let Frame::Request { id, resource, sender_node_id, mut request } = frame else {
                return Err("unexpected frame".into());
            };
            let target_name = match target.authorize(&resource, node, sender_node_id) {
                Ok(name) => name,
                Err(reason) => {
                    let reply = wire::encode(&Frame::Reply { id, reply: Err(reason) });
                    tx.send(reply).await.map_err(|_| "writer gone".to_owned())?;
                    continue;
                }
            };
            request.set_target_name(target_name.clone());
            track(nexuses, &target_name, &request);
            let tx = tx.clone();
            if matches!(request, ForwardRequest::Command(_)) {
                // Commands run concurrently, at most FORWARD_IN_FLIGHT_MAX; reading waits
                // for a slot, so a flood backs up into TCP.
                let permit =
                    permits.clone().acquire_owned().await.map_err(|_| "closed".to_owned())?;
                let target = target.clone();
                tokio::spawn(async move {
                    let reply = target.execute(request).await.map_err(|e| e.to_string());
                    let _ = tx.send(wire::encode(&Frame::Reply { id, reply })).await;
                    drop(permit);
                });
            } else {
                // Notices and resets keep their order relative to later commands.
                let reply = target.execute(request).await.map_err(|e| e.to_string());
                tx.send(wire::encode(&Frame::Reply { id, reply }))
                    .await
                    .map_err(|_| "writer gone".to_owned())?;
            }
        }
    };
    tokio::select! {
        result = writing => result,
        result = reading => result,
    }
}

/// Keeps the set of remote nexuses a link brought, to release them when it drops.
fn track(nexuses: &Mutex<HashSet<(String, Nexus)>>, target_name: &str, request: &ForwardRequest) {
    let mut set = lock(nexuses);
    match request {
        ForwardRequest::Command(c) => {
            let key = (target_name.to_owned(), c.nexus.clone());
            if set.len() < FORWARD_NEXUSES_PER_LINK_MAX && !set.contains(&key) {
                set.insert(key);
            }
        }
        ForwardRequest::NexusUp { nexus, .. } if set.len() < FORWARD_NEXUSES_PER_LINK_MAX => {
            set.insert((target_name.to_owned(), nexus.clone()));
        }
        ForwardRequest::NexusLost { nexus, .. } => {
            set.remove(&(target_name.to_owned(), nexus.clone()));
        }
        _ => {}
    }
}

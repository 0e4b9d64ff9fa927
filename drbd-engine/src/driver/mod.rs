//! The thin tokio driver: owns the TCP connections to peers, the backing store and the
//! metadata file, and runs the pure state machine (`protocol::Node`) between them.
//!
//! One task owns the `Node`; everything else talks to it through channels: application
//! requests (`ReplicatedDevice`), and frames and connection changes from per-connection reader
//! tasks. Local I/O runs as futures polled by that same task (no task per request, no channel
//! hop for a completion). Outputs are carried out in order; metadata updates are written and
//! fsynced before the next output, as `Output::Persist` requires.
//!
//! CPU per I/O is what limits a replicated LUN on a small machine, so the hot path batches:
//! up to `INPUT_BATCH_MAX` inputs and every local I/O that has finished are handled before the
//! outputs are carried out, the frames of one round to one peer leave in one TCP write, a reader takes in every frame that has arrived
//! with one read and hands them over together, and small buffered writes go to the page cache
//! on the driver's thread (backing-store's inline path) instead of through an engine thread;
//! a round's plain writes that continue each other on the disk (a burst of sequential 4 KiB
//! writes) go there as one gathered write, one pwritev2 (`Driver::try_gather`).
//! The driver writes a round's frames straight into the socket (`PeerWriter`) before it starts
//! the round's disk I/O: at QD1 the peer's copy is under way while the local write runs.

mod atomic;
pub mod constants;
pub mod fence;
pub mod meta_file;
pub mod meta_v09;
pub mod scope;

pub use scope::TaskScope;

use crate::NodeId;
use crate::constants::BLOCK_SIZE_BYTES;
use crate::protocol::frame::{EncodedFrame, HEADER_BYTES, frame_len};
use crate::protocol::node::{
    AppRequest, Config, DiskOp, Event, FenceOutcome, Fencing, IoFailed, IoId, Node, Output,
    Promotion, ReplicationProtocol, RequestError, RequestId, ResyncProgress, StateError,
    WriteOrigin,
};
use crate::protocol::{ConnectionState, DiskState, Metadata, ReplicationState, ResyncRate, Role};
use backing_store::constants::{GATHERED_WRITE_BYTES_MAX, GATHERED_WRITE_PIECES_MAX};
use backing_store::{BackingStore, EngineKind, OpenOptions};
use bytes::{Bytes, BytesMut};
use constants::{
    ACK_SPIN_US_MAX, COMMAND_QUEUE_MAX, GATHER_WRITE_BYTES_ONE_MAX, IMMEDIATE_DISK_PASSES_MAX,
    INLINE_WRITE_BACKOFF_MS, INPUT_BATCH_MAX, RECEIVE_BUFFER_BYTES_MAX, RECEIVE_BUFFERS_PARKED_MAX,
    RECEIVE_READ_BYTES_MIN, SEND_BATCH_BYTES_MAX, SEND_IOVECS_MAX, YIELD_REQUESTS_IN_FLIGHT_MIN,
};
use fence::FenceHandler;
use meta_file::MetaFile;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Connection preamble: magic, node id, connection id.
const PREAMBLE_MAGIC: u32 = 0x5444_4e43; // "TDNC"
const PREAMBLE_BYTES: usize = 16;
/// How often a missing connection is retried (DRBD's connect-int is 10 s; loopback wants less).
const CONNECT_RETRY_MS: u64 = 300;
/// The whole authentication exchange must finish within this (a silent peer is dropped).
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("request failed: {0}")]
    Request(#[from] RequestError),
    #[error("state change refused: {0}")]
    State(#[from] StateError),
    #[error("offset {offset} or length {len} is not a multiple of 4096")]
    Misaligned { offset: u64, len: u64 },
    #[error("the replication engine stopped")]
    Stopped,
    #[error("resize refused: {0}")]
    Resize(String),
    #[error("backing store: {0}")]
    Backing(#[from] backing_store::Error),
    #[error("metadata: {0}")]
    Meta(#[from] meta_file::MetaFileError),
    #[error("metadata: {0}")]
    MetaV09(#[from] meta_v09::V09Error),
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("atomic-write journal: {0}")]
    Journal(#[from] backing_store::atomic_journal::JournalError),
    #[error("an atomic write of {len} bytes exceeds this device's {max} bytes")]
    AtomicTooLong { len: u64, max: u64 },
}

#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    pub peers: Vec<(NodeId, SocketAddr)>,
    pub backing_path: PathBuf,
    /// Created with this size when missing.
    pub size_bytes: u64,
    pub engine: EngineKind,
    pub direct_io: bool,
    /// External metadata file (created by `create-md` semantics when missing); with
    /// `MetaFormat::V09Internal` the backing file itself (its metadata must exist).
    pub meta_path: PathBuf,
    pub meta_format: MetaFormat,
    pub protocol: ReplicationProtocol,
    pub fencing: Fencing,
    pub resync_rate: ResyncRate,
    pub al_extents: usize,
    /// `net { csums-alg; csums-after-crash-only; verify-alg; }`.
    pub digests: crate::protocol::DigestSettings,
    /// Quorum settings; `quorum.diskless` runs this node without using its disk.
    pub quorum: crate::protocol::quorum::QuorumConfig,
    /// `net { after-sb-0pri; after-sb-1pri; after-sb-2pri; }`.
    pub after_sb: crate::protocol::AfterSbPolicies,
    /// `net { cram-hmac-alg sha256; shared-secret ...; }`: every connection is authenticated
    /// both ways before any frame flows (`None`: no authentication, as without cram-hmac-alg).
    pub shared_secret: Option<Vec<u8>>,
    /// `disk { on-io-error detach|pass_on; }`.
    pub on_io_error: crate::protocol::OnIoError,
    /// `net { on-congestion; congestion-fill; congestion-extents; }` (`protocol::node::ahead`).
    pub congestion: crate::protocol::node::CongestionConfig,
}

/// How the metadata file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaFormat {
    /// DRBD 9's v09 layout on an external file (`drbdmeta ... flex-external dump-md` reads it).
    V09External,
    /// DRBD 9's v09 layout at the end of the backing file (`meta-disk internal`; `drbdmeta
    /// ... internal dump-md` reads it). The data area, and so the device, is smaller than the
    /// file by the metadata area.
    V09Internal,
    /// The interim whole-state file (`meta_file`).
    Sidecar,
}

enum Store {
    Sidecar(Box<MetaFile>),
    V09(Box<meta_v09::V09File>),
}

impl Store {
    fn apply_all(&mut self, updates: &[crate::protocol::MetaUpdate]) -> Result<(), String> {
        match self {
            Store::Sidecar(f) => f.apply_all(updates).map_err(|e| e.to_string()),
            Store::V09(f) => f.apply_all(updates).map_err(|e| e.to_string()),
        }
    }

    /// Data blocks this replica could hold after an online grow (see `protocol::node::resize`).
    fn usable_blocks(&self, backing_path: &std::path::Path, current_blocks: u64) -> u64 {
        let usable = match self {
            // The whole backing file is data.
            Store::Sidecar(_) => std::fs::metadata(backing_path)
                .map(|m| m.len() / BLOCK_SIZE_BYTES)
                .map_err(|e| e.to_string()),
            Store::V09(f) => f.usable_blocks().map_err(|e| e.to_string()),
        };
        usable.unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot measure the backing store for a resize");
            current_blocks
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub node_id: NodeId,
    pub connection: ConnectionState,
    /// The peer's role as it last announced it; `Unknown` while not connected.
    pub role: Role,
    pub replication: ReplicationState,
    pub disk: DiskState,
    pub out_of_sync_blocks: u64,
    pub resync: Option<ResyncProgress>,
    /// The verify run with this peer, while one runs (VerifyS or VerifyT).
    pub verify: Option<crate::protocol::VerifyProgress>,
    /// The last ping's round trip on the replication link, once one was answered.
    pub round_trip_us: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub node_id: NodeId,
    pub role: Role,
    pub disk: DiskState,
    pub size_bytes: u64,
    pub peers: Vec<PeerStatus>,
    /// Blocks written here by resync (as SyncTarget) since start.
    pub resync_blocks_received: u64,
    /// Blocks sent by finished resyncs (as SyncSource) since start.
    pub resync_blocks_sent: u64,
    pub split_brain: bool,
    /// Verify runs this node ran as VerifyS that finished (completed or not) since start.
    pub verifies_finished: u64,
    /// The last finished verify this node ran as VerifyS.
    pub verify_last: Option<VerifyOutcome>,
    /// Out-of-sync runs the current (or last) verify with each peer reported here, as VerifyS
    /// or VerifyT, oldest first, at most `VERIFY_REPORT_RUNS_MAX`: (peer, first block, blocks).
    pub verify_out_of_sync: Vec<(NodeId, u64, u64)>,
    /// DRBD's `quorum:` (always true with quorum off).
    pub quorum: bool,
    /// Why the disk was detached, when the engine detached it for a metadata write that
    /// failed (the error, e.g. ENOSPC); cleared by a successful `attach`.
    pub disk_error: Option<String>,
}

/// How a verify run ended, as `Event::VerifyFinished` told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub peer: NodeId,
    pub blocks_verified: u64,
    pub out_of_sync_blocks: u64,
    pub skipped_blocks: u64,
    pub completed: bool,
}

type Reply<T> = oneshot::Sender<Result<T, DeviceError>>;

enum Command {
    Request(AppRequest, Reply<Option<Vec<u8>>>),
    Promote(bool, Reply<()>),
    Demote(Reply<()>),
    NewCurrentUuid(Reply<()>),
    Connect(NodeId, bool, Reply<()>),
    Disconnect(NodeId, Reply<()>),
    Outdate(Reply<()>),
    Attach(Reply<()>),
    Detach(Reply<()>),
    Verify(NodeId, u64, Reply<()>),
    /// Online grow: (old, new) size in bytes.
    Resize(Reply<(u64, u64)>),
    SetFenceHandler(Option<FenceHandler>, Reply<()>),
    Status(oneshot::Sender<Status>),
}

enum Input {
    Connected {
        peer: NodeId,
        conn_id: u64,
        writer: PeerWriter,
    },
    /// One or more whole frames, back to back, as they arrived (a slice of the reader's
    /// buffer: Data payloads reach the disk without a copy).
    Frames {
        peer: NodeId,
        conn_id: u64,
        bytes: Bytes,
    },
    Closed {
        peer: NodeId,
        conn_id: u64,
        /// The peer ended the connection (EOF or reset), rather than a local error.
        by_peer: bool,
    },
    /// The fence-peer handler for `peer` finished.
    Fenced {
        peer: NodeId,
        outcome: FenceOutcome,
    },
}

type DiskResult = Result<Option<Vec<u8>>, IoFailed>;
type DiskFuture = Pin<Box<dyn Future<Output = (IoId, DiskResult)> + Send>>;
/// Adjacent writes of one round written as one (`GatherRun`): one result for all of them.
type GatheredFuture = Pin<Box<dyn Future<Output = (Vec<IoId>, Result<(), IoFailed>)> + Send>>;

/// One local I/O future: a single request, or a gathered run of writes.
enum DiskWork {
    One(DiskFuture),
    Gathered(GatheredFuture),
}

/// Local I/O in flight, polled by the driver task itself. Inline (page-cache) I/O completes on
/// its first poll; engine I/O wakes the driver task when done. The set is bounded by the state
/// machine's own in-flight limits.
#[derive(Default)]
struct DiskSet {
    pending: Vec<DiskWork>,
}

impl DiskSet {
    /// Polls every I/O in the set once and moves the finished ones to `done`. Inline I/O
    /// finishes on its first poll, so a burst of writes completes here together and its acks
    /// leave in one round's socket write (one completion per round meant one write system
    /// call per ack on the secondary at QD32).
    fn poll_all(&mut self, cx: &mut std::task::Context<'_>, done: &mut Vec<(IoId, DiskResult)>) {
        let mut i = 0;
        while i < self.pending.len() {
            let ready = match &mut self.pending[i] {
                DiskWork::One(future) => match future.as_mut().poll(cx) {
                    Poll::Ready(finished) => {
                        done.push(finished);
                        true
                    }
                    Poll::Pending => false,
                },
                DiskWork::Gathered(future) => match future.as_mut().poll(cx) {
                    Poll::Ready((ids, result)) => {
                        done.extend(ids.into_iter().map(|id| (id, result.map(|()| None))));
                        true
                    }
                    Poll::Pending => false,
                },
            };
            if ready {
                // Order among completions is free: the state machine orders what needs it
                // (it never has two overlapping writes in flight).
                drop(self.pending.swap_remove(i));
            } else {
                i += 1;
            }
        }
    }

    /// Completes when at least one I/O in the set did, with every one that did; never, while
    /// the set is empty.
    async fn next(&mut self, done: &mut Vec<(IoId, DiskResult)>) {
        std::future::poll_fn(|cx| {
            self.poll_all(cx, done);
            if done.is_empty() { Poll::Pending } else { Poll::Ready(()) }
        })
        .await;
    }

    /// Moves what has finished by now to `done`, without waiting.
    async fn ready(&mut self, done: &mut Vec<(IoId, DiskResult)>) {
        std::future::poll_fn(|cx| {
            self.poll_all(cx, done);
            Poll::Ready(())
        })
        .await;
    }
}

/// The handle the storage node and the iSCSI layer use.
#[derive(Clone)]
pub struct ReplicatedDevice {
    commands: mpsc::Sender<Command>,
    /// Grows with an online resize (the driver stores the new size once it is durable).
    size_bytes: Arc<AtomicU64>,
    /// The largest WRITE ATOMIC kept whole across a crash (`atomic::atomic_write_max_bytes`).
    atomic_write_max_bytes: u64,
}

fn check_aligned(offset: u64, len: u64) -> Result<(), DeviceError> {
    if !offset.is_multiple_of(BLOCK_SIZE_BYTES) || !len.is_multiple_of(BLOCK_SIZE_BYTES) || len == 0
    {
        return Err(DeviceError::Misaligned { offset, len });
    }
    Ok(())
}

impl ReplicatedDevice {
    /// Opens the backing store and metadata, starts listening and connecting, and returns the
    /// handle plus the driver task.
    pub async fn start(
        config: DriverConfig,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), DeviceError> {
        // A scope never shut down: the tasks live until they end on their own.
        let (device, driver) = Self::open(config, TaskScope::default()).await?;
        Ok((device, tokio::spawn(driver)))
    }

    /// Like `start`, on the current runtime, with every task the engine ever spawns in
    /// `scope`: `scope.shutdown()` stops the engine and releases its port, sockets and files.
    /// Hosts run the engine on the runtime that serves its I/O this way, so a request and its
    /// completion do not cross threads (a wakeup of another thread each way).
    pub async fn start_scoped(
        config: DriverConfig,
        scope: &TaskScope,
    ) -> Result<Self, DeviceError> {
        let (device, driver) = Self::open(config, scope.clone()).await?;
        scope.spawn(driver);
        Ok(device)
    }

    /// Opens everything and spawns the accept loop into `tasks`; the driver's future is the
    /// caller's to spawn.
    async fn open(
        config: DriverConfig,
        tasks: TaskScope,
    ) -> Result<(Self, impl Future<Output = ()> + Send + 'static), DeviceError> {
        let options = OpenOptions {
            engine: config.engine,
            direct_io: config.direct_io,
            create_size_bytes: Some(config.size_bytes),
            read_only: false,
        };
        let store = BackingStore::open(&config.backing_path, &options)?;
        if !store.is_direct_io() {
            // Small buffered writes go to the page cache on the driver's thread: a thread hop
            // per write cost about as much CPU as the write itself (see the README's figures).
            store.set_inline_blocking_writes(true);
            store.set_inline_write_backoff_ms(INLINE_WRITE_BACKOFF_MS);
        }
        let size_blocks = store.size_bytes() / BLOCK_SIZE_BYTES;
        let (meta_file, meta) = match config.meta_format {
            MetaFormat::Sidecar => {
                let (file, meta) =
                    MetaFile::open_or_create(&config.meta_path, config.node_id, size_blocks)?;
                (Store::Sidecar(Box::new(file)), meta)
            }
            MetaFormat::V09External => {
                let max_peers = u32::try_from(config.peers.len().max(1)).expect("at most 31 peers");
                let al_extents =
                    u32::try_from(config.al_extents).expect("bounded by AL_EXTENTS_MAX");
                let (file, meta) = meta_v09::V09File::open_or_create(
                    &config.meta_path,
                    config.node_id,
                    size_blocks,
                    max_peers,
                    al_extents,
                )?;
                (Store::V09(Box::new(file)), meta)
            }
            MetaFormat::V09Internal => {
                let (mut file, meta) = meta_v09::V09File::open(
                    &config.backing_path,
                    crate::meta::MetaPlacement::Internal,
                    config.node_id,
                )?;
                file.begin_use()?;
                assert!(meta.size_blocks * BLOCK_SIZE_BYTES <= file.data_area_bytes());
                (Store::V09(Box::new(file)), meta)
            }
        };
        let size_bytes = meta.size_blocks * BLOCK_SIZE_BYTES;
        // Replayed before anything reads or writes the disk.
        let journal = atomic::open_journal(&config, &store, size_bytes).await?;
        let atomic_write_max_bytes = atomic::atomic_write_max_bytes(journal.as_ref());
        let listener = TcpListener::bind(config.listen).await?;
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let shared_size_bytes = Arc::new(AtomicU64::new(size_bytes));
        let (inputs_tx, inputs_rx) = mpsc::unbounded_channel();
        let mut random = [0u8; 8];
        getrandom_fallback(&mut random);
        let node_config = Config {
            peers: config.peers.iter().map(|(id, _)| *id).collect(),
            protocol: config.protocol,
            fencing: config.fencing,
            resync_rate: config.resync_rate,
            al_extents: config.al_extents,
            random_seed: u64::from_le_bytes(random),
            digests: config.digests,
            quorum: config.quorum.clone(),
            after_sb: config.after_sb,
            on_io_error: config.on_io_error,
            congestion: config.congestion,
        };
        let node = Node::new(node_config, meta, now_ms());
        let mut driver = Driver {
            config,
            node,
            store,
            meta_file,
            inputs_tx: inputs_tx.clone(),
            writers: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_request: 1,
            pending_demote: None,
            pending_promote: None,
            pending_resize: None,
            shared_size_bytes: shared_size_bytes.clone(),
            status_replies: Vec::new(),
            store_grow_bytes: None,
            last_dial: BTreeMap::new(),
            resync_blocks_received: 0,
            resync_blocks_sent: 0,
            split_brain: false,
            verifies_finished: 0,
            verify_last: None,
            verify_out_of_sync: Vec::new(),
            disk_error: None,
            disk_queue: Vec::new(),
            gather: None,
            send_buffers: BTreeMap::new(),
            fence_handler: None,
            journal,
            ping_sent: BTreeMap::new(),
            round_trip_us: BTreeMap::new(),
            spun_for: None,
            tasks: tasks.clone(),
        };
        let accept_inputs = inputs_tx.clone();
        let my_id = driver.config.node_id;
        let known: Vec<NodeId> = driver.config.peers.iter().map(|(id, _)| *id).collect();
        let secret = driver.config.shared_secret.clone();
        tasks.spawn(accept_loop(listener, my_id, known, secret, accept_inputs, tasks.clone()));
        let task = async move { driver.run(commands_rx, inputs_rx).await };
        Ok((
            Self { commands: commands_tx, size_bytes: shared_size_bytes, atomic_write_max_bytes },
            task,
        ))
    }

    /// The device's size; an online resize grows it.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Online grow (`drbdadm resize`) on the primary: every replica's backing must have grown
    /// already. Returns the old and the new size in bytes (equal: nothing to grow).
    pub async fn resize(&self) -> Result<(u64, u64), DeviceError> {
        self.call(Command::Resize).await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, DeviceError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| DeviceError::Stopped)?;
        rx.await.map_err(|_| DeviceError::Stopped)?
    }

    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, DeviceError> {
        check_aligned(offset, len)?;
        let req = AppRequest::Read {
            offset_blocks: offset / BLOCK_SIZE_BYTES,
            blocks: len / BLOCK_SIZE_BYTES,
        };
        let data = self.call(|r| Command::Request(req, r)).await?;
        Ok(Bytes::from(data.unwrap_or_default()))
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        check_aligned(offset, data.len() as u64)?;
        // The caller's buffer goes to the peers' sockets and the local disk as it is.
        let req = AppRequest::Write { offset_blocks: offset / BLOCK_SIZE_BYTES, data, fua };
        self.call(|r| Command::Request(req, r)).await.map(|_| ())
    }

    /// The largest WRITE ATOMIC this device keeps whole across a crash, in bytes.
    pub fn atomic_write_max_bytes(&self) -> u64 {
        self.atomic_write_max_bytes
    }

    /// WRITE ATOMIC: one request that every replica writes through its atomic-write journal,
    /// so after any crash each holds all of `data` or none of it (`protocol::node::atomic`).
    pub async fn write_atomic(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let len = data.len() as u64;
        check_aligned(offset, len)?;
        if len > self.atomic_write_max_bytes {
            return Err(DeviceError::AtomicTooLong { len, max: self.atomic_write_max_bytes });
        }
        let req = AppRequest::WriteAtomic { offset_blocks: offset / BLOCK_SIZE_BYTES, data, fua };
        self.call(|r| Command::Request(req, r)).await.map(|_| ())
    }

    pub async fn flush(&self) -> Result<(), DeviceError> {
        self.call(|r| Command::Request(AppRequest::Flush, r)).await.map(|_| ())
    }

    /// Discards (and zeroes, on every replica) a block-aligned range.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_aligned(offset, len)?;
        let req = AppRequest::Discard {
            offset_blocks: offset / BLOCK_SIZE_BYTES,
            blocks: len / BLOCK_SIZE_BYTES,
        };
        self.call(|r| Command::Request(req, r)).await.map(|_| ())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.discard(offset, len).await
    }

    pub async fn promote(&self, force: bool) -> Result<(), DeviceError> {
        self.call(|r| Command::Promote(force, r)).await
    }

    /// Waits until every request drained and every write is stable on all replicas.
    pub async fn demote(&self) -> Result<(), DeviceError> {
        self.call(Command::Demote).await
    }

    pub async fn new_current_uuid_clear_bitmap(&self) -> Result<(), DeviceError> {
        self.call(Command::NewCurrentUuid).await
    }

    pub async fn connect(&self, peer: NodeId, discard_my_data: bool) -> Result<(), DeviceError> {
        self.call(|r| Command::Connect(peer, discard_my_data, r)).await
    }

    pub async fn disconnect(&self, peer: NodeId) -> Result<(), DeviceError> {
        self.call(|r| Command::Disconnect(peer, r)).await
    }

    /// `drbdadm outdate`: marks this (secondary, disconnected) node's data Outdated, which is
    /// what a fence-peer handler on the primary asks of the peer it fences.
    pub async fn outdate(&self) -> Result<(), DeviceError> {
        self.call(Command::Outdate).await
    }

    /// Sets (or with `None` removes) the fence-peer handler run on `Event::FencePeer`. Without
    /// one, a fencing primary that loses a peer keeps I/O frozen until the peer is back.
    /// `drbdadm attach`: the detached disk is back (see `protocol::node::diskless`).
    pub async fn attach(&self) -> Result<(), DeviceError> {
        self.call(Command::Attach).await
    }

    /// `drbdadm detach`: stop using the local disk, serve through the peers.
    pub async fn detach(&self) -> Result<(), DeviceError> {
        self.call(Command::Detach).await
    }

    pub async fn set_fence_handler(
        &self,
        handler: Option<FenceHandler>,
    ) -> Result<(), DeviceError> {
        self.call(|r| Command::SetFenceHandler(handler, r)).await
    }

    /// `drbdadm verify`: online verify against `peer` from `first_block` on; progress and
    /// results show in `status` (the run ends on its own).
    pub async fn verify(&self, peer: NodeId, first_block: u64) -> Result<(), DeviceError> {
        self.call(|r| Command::Verify(peer, first_block, r)).await
    }

    pub async fn status(&self) -> Result<Status, DeviceError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Status(tx)).await.map_err(|_| DeviceError::Stopped)?;
        rx.await.map_err(|_| DeviceError::Stopped)
    }

    pub async fn role(&self) -> Result<Role, DeviceError> {
        Ok(self.status().await?.role)
    }
}

/// The origin of `now_ms`.
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Random bits for generation UUIDs: the kernel's entropy via /dev/urandom, or the clock.
fn getrandom_fallback(out: &mut [u8; 8]) {
    use std::io::Read;
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(out)).is_ok();
    if !ok {
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        // Truncating the nanosecond count keeps its fast-changing low bits, which is the point.
        let nanos = u64::try_from(t.as_nanos() & u128::from(u64::MAX)).unwrap_or(0);
        *out = (nanos ^ u64::from(std::process::id())).to_le_bytes();
    }
}

async fn accept_loop(
    listener: TcpListener,
    my_id: NodeId,
    known: Vec<NodeId>,
    secret: Option<Vec<u8>>,
    inputs: mpsc::UnboundedSender<Input>,
    tasks: TaskScope,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let inputs = inputs.clone();
        let known = known.clone();
        let secret = secret.clone();
        let scope = tasks.clone();
        tasks.spawn(async move {
            let mut preamble = [0u8; PREAMBLE_BYTES];
            if stream.read_exact(&mut preamble).await.is_err() {
                return;
            }
            let magic = u32::from_le_bytes(preamble[0..4].try_into().expect("4 bytes"));
            let Some(peer) = NodeId::new(preamble[4]) else { return };
            if magic != PREAMBLE_MAGIC || !known.contains(&peer) {
                tracing::warn!(%peer, "rejected connection with a bad preamble");
                return;
            }
            let conn_id = u64::from_le_bytes(preamble[8..16].try_into().expect("8 bytes"));
            let mut reply = [0u8; PREAMBLE_BYTES];
            reply[0..4].copy_from_slice(&PREAMBLE_MAGIC.to_le_bytes());
            reply[4] = my_id.0;
            reply[8..16].copy_from_slice(&conn_id.to_le_bytes());
            if stream.write_all(&reply).await.is_err() {
                return;
            }
            if !authenticate(&mut stream, secret.as_deref(), my_id, peer).await {
                return;
            }
            run_connection(stream, peer, conn_id, inputs, &scope);
        });
    }
}

async fn dial(
    my_id: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    conn_id: u64,
    secret: Option<Vec<u8>>,
    inputs: mpsc::UnboundedSender<Input>,
    tasks: TaskScope,
) {
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
    else {
        return;
    };
    let mut preamble = [0u8; PREAMBLE_BYTES];
    preamble[0..4].copy_from_slice(&PREAMBLE_MAGIC.to_le_bytes());
    preamble[4] = my_id.0;
    preamble[8..16].copy_from_slice(&conn_id.to_le_bytes());
    if stream.write_all(&preamble).await.is_err() {
        return;
    }
    let mut reply = [0u8; PREAMBLE_BYTES];
    if stream.read_exact(&mut reply).await.is_err()
        || reply[4] != peer.0
        || reply[8..16] != preamble[8..16]
    {
        return;
    }
    if !authenticate(&mut stream, secret.as_deref(), my_id, peer).await {
        return;
    }
    run_connection(stream, peer, conn_id, inputs, &tasks);
}

/// DRBD's cram-hmac-alg exchange on a fresh connection (see `protocol::auth`), before the
/// state machine hears of it. A refusal is logged with its reason and the connection dropped;
/// the dialing side retries as for any failed connection, as DRBD keeps trying to connect.
async fn authenticate(
    stream: &mut TcpStream,
    secret: Option<&[u8]>,
    my_id: NodeId,
    peer: NodeId,
) -> bool {
    use crate::protocol::auth::{
        AuthError, Authenticator, CHALLENGE_MESSAGE_BYTES, RESPONSE_MESSAGE_BYTES,
        VERDICT_MESSAGE_BYTES,
    };
    let mut challenge = [0u8; crate::protocol::auth::CHALLENGE_BYTES];
    if secret.is_some() {
        // Challenges must be unpredictable: no clock fallback here.
        use std::io::Read;
        let random =
            std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut challenge));
        if let Err(error) = random {
            tracing::error!(%peer, %error, "no randomness for an authentication challenge");
            return false;
        }
    }
    let mut auth = Authenticator::new(secret, my_id, peer, challenge);
    let exchange = async {
        stream.write_all(&auth.challenge_message()).await.map_err(|_| None)?;
        let mut theirs = [0u8; CHALLENGE_MESSAGE_BYTES];
        stream.read_exact(&mut theirs).await.map_err(|_| None)?;
        let response = auth.handle_challenge(&theirs).map_err(Some)?;
        stream.write_all(&response).await.map_err(|_| None)?;
        let mut answer = [0u8; RESPONSE_MESSAGE_BYTES];
        stream.read_exact(&mut answer).await.map_err(|_| None)?;
        let verdict = auth.handle_response(&answer);
        let accepted = verdict.is_ok();
        stream.write_all(&Authenticator::verdict_message(accepted)).await.map_err(|_| None)?;
        verdict.map_err(Some)?;
        let mut peer_verdict = [0u8; VERDICT_MESSAGE_BYTES];
        stream.read_exact(&mut peer_verdict).await.map_err(|_| None)?;
        auth.handle_verdict(&peer_verdict).map_err(Some)?;
        Ok::<(), Option<AuthError>>(())
    };
    match tokio::time::timeout(AUTH_TIMEOUT, exchange).await {
        Ok(Ok(())) => true,
        Ok(Err(Some(error))) => {
            tracing::warn!(%peer, %error, "connection refused: peer authentication failed");
            false
        }
        // The peer closed (it refused us and logged why) or went silent.
        Ok(Err(None)) | Err(_) => {
            tracing::warn!(%peer, "connection refused: peer authentication did not complete");
            false
        }
    }
}

fn run_connection(
    stream: TcpStream,
    peer: NodeId,
    conn_id: u64,
    inputs: mpsc::UnboundedSender<Input>,
    tasks: &TaskScope,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let socket = Arc::new(writer);
    let queued = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Bytes>>();
    let writer = PeerWriter { socket: socket.clone(), queued: queued.clone(), tx };
    if inputs.send(Input::Connected { peer, conn_id, writer }).is_err() {
        return;
    }
    // Writes what the driver could not write at once. The socket's write side is shut when
    // the last holder drops it (this task, once the driver dropped its `PeerWriter`).
    tasks.spawn(async move {
        while let Some(pieces) = rx.recv().await {
            let written = write_pieces(&socket, pieces).await;
            // After the bytes are in the socket: the driver reads 0 only when nothing of
            // its earlier batches is still waiting here.
            queued.fetch_sub(1, Ordering::Release);
            if written.is_err() {
                break;
            }
        }
    });
    tasks.spawn(async move {
        if let Ok(by_peer) = read_frames(&mut reader, peer, conn_id, &inputs).await {
            let _ = inputs.send(Input::Closed { peer, conn_id, by_peer });
        }
    });
}

/// The sending side of one peer connection. The driver writes a round's frames straight
/// into the socket when nothing is queued for it, rather than waking the connection's writer
/// task: on the primary the Data frame is on the wire before the local disk write starts (the
/// driver polls its disk I/O only after the round's sends), and the secondary's ack leaves the
/// moment its disk write completes, without a task hop in either. What the socket does not
/// take at once goes to the writer task, and while that holds anything, every later batch
/// queues behind it, so frames keep their order.
struct PeerWriter {
    socket: Arc<tokio::net::tcp::OwnedWriteHalf>,
    /// Batches handed to the writer task and not yet wholly written.
    queued: Arc<AtomicUsize>,
    tx: mpsc::UnboundedSender<Vec<Bytes>>,
}

impl PeerWriter {
    fn send(&self, mut pieces: Vec<Bytes>) {
        if self.queued.load(Ordering::Acquire) == 0 {
            // Otherwise the rest waits for room. (An error: the writer task meets it again
            // and ends; the reader reports the connection's end.)
            if let Ok(true) = try_write_pieces(&self.socket, &mut pieces) {
                return;
            }
        }
        self.queued.fetch_add(1, Ordering::Release);
        if self.tx.send(pieces).is_err() {
            // The writer task ended on a write error: nothing more goes out on this connection.
            self.queued.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Drops the first `written` bytes of `pieces` (whole pieces, then the front of one).
fn advance_pieces(pieces: &mut Vec<Bytes>, mut written: usize) {
    let mut whole = 0usize;
    while whole < pieces.len() && written >= pieces[whole].len() {
        written -= pieces[whole].len();
        whole += 1;
    }
    pieces.drain(..whole);
    if written > 0 {
        let _ = pieces[0].split_to(written);
    }
}

/// Writes as much of `pieces` as the socket takes now, without waiting: true when all of it
/// went out; what is left stays in `pieces`.
fn try_write_pieces(
    socket: &tokio::net::tcp::OwnedWriteHalf,
    pieces: &mut Vec<Bytes>,
) -> std::io::Result<bool> {
    loop {
        pieces.retain(|piece| !piece.is_empty());
        if pieces.is_empty() {
            return Ok(true);
        }
        let written = {
            let slices: Vec<std::io::IoSlice<'_>> = pieces
                .iter()
                .take(SEND_IOVECS_MAX)
                .map(|piece| std::io::IoSlice::new(piece))
                .collect();
            match socket.try_write_vectored(&slices) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        };
        advance_pieces(pieces, written);
    }
}

/// Writes `pieces` in order with vectored writes (a Data payload is one piece: never copied),
/// waiting for room as needed.
async fn write_pieces(
    socket: &tokio::net::tcp::OwnedWriteHalf,
    mut pieces: Vec<Bytes>,
) -> std::io::Result<()> {
    while !try_write_pieces(socket, &mut pieces)? {
        socket.writable().await?;
    }
    Ok(())
}

/// Reads frames until the connection ends or sends garbage (`Ok`: true when the peer ended it
/// with a FIN or a reset), or the driver is gone (`Err`). Every read takes in whatever has arrived (at least `RECEIVE_READ_BYTES_MIN` of
/// room), and the whole frames in it go to the driver as one input, split off the buffer
/// without a copy; room for a frame larger than that is reserved at once, so its payload is
/// copied once, by the kernel.
async fn read_frames(
    reader: &mut OwnedReadHalf,
    peer: NodeId,
    conn_id: u64,
    inputs: &mpsc::UnboundedSender<Input>,
) -> Result<bool, ()> {
    let mut buffer = BytesMut::with_capacity(RECEIVE_BUFFER_BYTES_MAX);
    let mut spares = ReceiveBuffers::default();
    loop {
        match reader.read_buf(&mut buffer).await {
            Ok(0) => return Ok(true),
            Err(e) => return Ok(e.kind() == std::io::ErrorKind::ConnectionReset),
            Ok(_) => {}
        }
        let mut complete = 0usize;
        let mut next_frame_bytes = 0usize;
        while buffer.len() - complete >= HEADER_BYTES {
            let header: &[u8; HEADER_BYTES] =
                buffer[complete..complete + HEADER_BYTES].try_into().expect("header-sized slice");
            let Ok(total) = frame_len(header) else { return Ok(false) };
            if buffer.len() - complete >= total {
                complete += total;
            } else {
                next_frame_bytes = total - (buffer.len() - complete);
                break;
            }
        }
        if complete > 0 {
            let bytes = buffer.split_to(complete).freeze();
            inputs.send(Input::Frames { peer, conn_id, bytes }).map_err(|_| ())?;
        }
        let room = next_frame_bytes.max(RECEIVE_READ_BYTES_MIN);
        if buffer.capacity() - buffer.len() < room {
            buffer = spares.renew(buffer, room);
        }
    }
}

/// Receive buffers whose frames may still be in flight, kept for reuse. Every frame split off
/// a buffer shares its allocation until its disk write is done, so a reader renews its buffer
/// while earlier frames are alive; a fresh allocation the size of a 1 MiB frame comes from
/// mmap (or a trimmed heap) and faults every page in on its first read, which cost beta a
/// quarter of its CPU per 1 MiB write. A parked buffer is taken again once its frames are gone.
#[derive(Default)]
struct ReceiveBuffers {
    parked: std::collections::VecDeque<BytesMut>,
}

impl ReceiveBuffers {
    /// A buffer holding what `old` holds (the front of a frame) with at least `room` bytes
    /// free after it: `old` itself, a parked buffer whose frames are all gone, or a new one.
    fn renew(&mut self, mut old: BytesMut, room: usize) -> BytesMut {
        let need = old.len() + room;
        // Unique again (every frame dropped): the allocation is reused in place.
        if old.try_reclaim(room) {
            return old;
        }
        let reusable = self.parked.iter_mut().position(|parked| parked.try_reclaim(need));
        let mut fresh = match reusable {
            Some(i) => self.parked.remove(i).expect("position found it"),
            None => BytesMut::with_capacity(need.max(RECEIVE_BUFFER_BYTES_MAX)),
        };
        assert!(fresh.is_empty() && fresh.capacity() >= need);
        fresh.extend_from_slice(&old);
        old.clear();
        if self.parked.len() == RECEIVE_BUFFERS_PARKED_MAX {
            self.parked.pop_front();
        }
        self.parked.push_back(old);
        fresh
    }
}

struct Driver {
    config: DriverConfig,
    node: Node,
    /// `status` callers of this round, answered once its outputs were carried out, so that
    /// what a status shows (a grown size, a role) has also taken effect: `size_bytes()` and
    /// the LUN see it too. At most a round's commands (`INPUT_BATCH_MAX`).
    status_replies: Vec<oneshot::Sender<Status>>,
    store: BackingStore,
    meta_file: Store,
    inputs_tx: mpsc::UnboundedSender<Input>,
    writers: BTreeMap<NodeId, (u64, PeerWriter)>,
    requests: BTreeMap<u64, Reply<Option<Vec<u8>>>>,
    next_request: u64,
    pending_demote: Option<Reply<()>>,
    /// The caller of a cluster-wide promotion, answered at `Event::PromotionFinished`.
    pending_promote: Option<Reply<()>>,
    pending_resize: Option<Reply<(u64, u64)>>,
    shared_size_bytes: Arc<AtomicU64>,
    /// The backing store must learn the grown file's length before the next I/O starts.
    store_grow_bytes: Option<u64>,
    last_dial: BTreeMap<NodeId, u64>,
    resync_blocks_received: u64,
    resync_blocks_sent: u64,
    split_brain: bool,
    verifies_finished: u64,
    verify_last: Option<VerifyOutcome>,
    verify_out_of_sync: Vec<(NodeId, u64, u64)>,
    /// `Status::disk_error`.
    disk_error: Option<String>,
    /// Disk I/O asked for by the last outputs, for `run` to start.
    disk_queue: Vec<DiskWork>,
    /// Plain writes of this round, adjacent so far, not yet in `disk_queue` (`GatherRun`).
    gather: Option<GatherRun>,
    /// The frames of the current round, per peer, sent as one vectored write at its end.
    send_buffers: BTreeMap<NodeId, SendBatch>,
    fence_handler: Option<FenceHandler>,
    /// Atomic writes go through it (`atomic`); `None` without a side file.
    journal: Option<std::sync::Arc<backing_store::atomic_journal::AtomicJournal>>,
    /// When the last ping to each peer was handed to its send batch, and the round trip the
    /// last answered one took (DRBD's ping timing, shown as the metrics' peer round trip).
    ping_sent: BTreeMap<NodeId, Instant>,
    round_trip_us: BTreeMap<NodeId, u64>,
    /// The request the driver last waited for hot (`spin_for_ack`).
    spun_for: Option<u64>,
    /// Where every task the engine spawns goes (`scope`).
    tasks: TaskScope,
}

impl Driver {
    async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inputs: mpsc::UnboundedReceiver<Input>,
    ) {
        let mut disk = DiskSet::default();
        let mut completions = Vec::new();
        self.process_outputs();
        // One timer for the task's life, moved only when it must fire earlier or has fired: a
        // fresh `sleep` per round cost a timer-wheel insert and removal (and a clock read) on
        // every wake-up, two or more per replicated write.
        let mut timer = RoundTimer::new();
        loop {
            disk.pending.append(&mut self.disk_queue);
            self.dial_missing();
            let deadline = self.node.poll_timeout();
            let wake_ms = deadline.map_or(now_ms() + CONNECT_RETRY_MS, |d| {
                d.min(now_ms().saturating_add(CONNECT_RETRY_MS))
            });
            timer.arm(wake_ms);
            if self.spin_for_ack(&disk) {
                // Wait for the ack on this thread, hot, instead of parking it: see
                // `ACK_SPIN_US_MAX`. Each yield lets the runtime poll its sockets (a
                // zero-timeout epoll) and run the connection reader the ack wakes.
                let until = Instant::now() + Duration::from_micros(ACK_SPIN_US_MAX);
                while inputs.is_empty() && commands.is_empty() && Instant::now() < until {
                    tokio::task::yield_now().await;
                }
            }
            let mut woken_by_command = false;
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => {
                        self.handle_command(command);
                        woken_by_command = true;
                    }
                    None => return,
                },
                input = inputs.recv() => {
                    if let Some(input) = input {
                        self.handle_input(input);
                    }
                }
                () = disk.next(&mut completions) => {}
                () = timer.fired() => {
                    if deadline.is_some_and(|d| d <= now_ms()) {
                        self.node.handle_timeout(now_ms());
                    }
                }
            }
            if woken_by_command && self.requests.len() >= YIELD_REQUESTS_IN_FLIGHT_MIN {
                // The first request of a burst wakes this task straight away (tokio runs a
                // task woken by the running one next), so a round held one write and each
                // write took its own socket write and woke the peer. Yielding lets the
                // runnable tasks of this worker (the iSCSI layer runs one per command) queue
                // theirs first: tokio runs a yielded task once the worker has nothing else
                // ready. Only with other requests in flight: at QD1 nothing else comes, and
                // the yield cost two more context switches per write there.
                tokio::task::yield_now().await;
            }
            // Take in what else is ready before acting, so one round's frames share a write.
            for _ in 1..INPUT_BATCH_MAX {
                if let Ok(input) = inputs.try_recv() {
                    self.handle_input(input);
                } else if let Ok(command) = commands.try_recv() {
                    self.handle_command(command);
                } else {
                    break;
                }
            }
            // And every local I/O that has finished meanwhile (inline writes finish when
            // polled): their acks and replies go out with this round's.
            if completions.is_empty() && !disk.pending.is_empty() {
                disk.ready(&mut completions).await;
            }
            let now = now_ms();
            for (id, result) in completions.drain(..) {
                self.node.handle_disk_completion(now, id, result);
            }
            // A deadline that passed while other inputs kept the loop busy: the sleep branch
            // above may lose every race under a steady stream, and the engine's timers (the
            // barrier that closes an epoch, pings, resync steps) must not starve.
            if self.node.poll_timeout().is_some_and(|d| d <= now) {
                self.node.handle_timeout(now);
            }
            self.process_outputs();
            self.run_started_disk_io(&mut disk, &mut completions).await;
            if let Some(len) = self.store_grow_bytes.take() {
                // Before any I/O of this round starts: the store refuses I/O past the length
                // it knows.
                if let Err(error) = self.store.resize(len).await {
                    tracing::error!(%error, "the backing store did not take the grown length");
                }
            }
            for reply in std::mem::take(&mut self.status_replies) {
                let _ = reply.send(self.status());
            }
        }
    }

    /// Whether the round just done left exactly one application request waiting on nothing
    /// but a peer (its local I/O done), with every peer's last ping answered within
    /// `ACK_SPIN_US_MAX`: at queue depth 1 the driver then waits for the ack hot. Once per
    /// request, so a request held for longer (a quorum wait, a stalled peer) parks as usual.
    fn spin_for_ack(&mut self, disk: &DiskSet) -> bool {
        if self.requests.len() != 1
            || !disk.pending.is_empty()
            || self.node.role() != Role::Primary
            || self.round_trip_us.is_empty()
            || self.round_trip_us.values().any(|&rtt| rtt > ACK_SPIN_US_MAX)
        {
            return false;
        }
        let request = *self.requests.keys().next().expect("one request");
        if self.spun_for == Some(request) {
            return false;
        }
        self.spun_for = Some(request);
        true
    }

    /// Starts the disk I/O the round's outputs asked for at once, and carries on with what it
    /// led to while it completes on the spot (inline page-cache writes do): a secondary writes
    /// a frame's data and sends its ack, a primary writes its local copy, in the wake-up that
    /// brought the work, not in another pass through `select!`. Bounded by
    /// `IMMEDIATE_DISK_PASSES_MAX`; what is left (engine I/O in flight) waits in `select!`.
    async fn run_started_disk_io(
        &mut self,
        disk: &mut DiskSet,
        completions: &mut Vec<(IoId, DiskResult)>,
    ) {
        for _ in 0..IMMEDIATE_DISK_PASSES_MAX {
            if self.disk_queue.is_empty() || self.store_grow_bytes.is_some() {
                // (A grown store must learn its length before new I/O starts: `run` does it.)
                return;
            }
            disk.pending.append(&mut self.disk_queue);
            disk.ready(completions).await;
            if completions.is_empty() {
                return;
            }
            let now = now_ms();
            for (id, result) in completions.drain(..) {
                self.node.handle_disk_completion(now, id, result);
            }
            self.process_outputs();
        }
    }

    fn dial_missing(&mut self) {
        let me = self.config.node_id;
        let now = now_ms();
        for (peer, addr) in self.config.peers.clone() {
            // One connection per pair: the higher node id dials.
            if me < peer || !self.node.wants_connection(peer) || self.writers.contains_key(&peer) {
                continue;
            }
            if self.node.connection_state(peer) == Some(ConnectionState::Connected) {
                continue;
            }
            let last = self.last_dial.get(&peer).copied().unwrap_or(0);
            if last != 0 && last + CONNECT_RETRY_MS > now {
                continue;
            }
            self.last_dial.insert(peer, now.max(1));
            let mut random = [0u8; 8];
            getrandom_fallback(&mut random);
            let conn_id = u64::from_le_bytes(random) | 1;
            let secret = self.config.shared_secret.clone();
            let dial =
                dial(me, peer, addr, conn_id, secret, self.inputs_tx.clone(), self.tasks.clone());
            self.tasks.spawn(dial);
        }
    }

    fn handle_command(&mut self, command: Command) {
        let now = now_ms();
        match command {
            Command::Request(req, reply) => {
                let id = self.next_request;
                self.next_request += 1;
                self.requests.insert(id, reply);
                self.node.handle_request(now, RequestId(id), req);
            }
            Command::Promote(force, reply) => {
                if self.pending_promote.is_some() {
                    let _ = reply.send(Err(DeviceError::State(StateError::PromotionPending)));
                    return;
                }
                match self.node.handle_promote(now, force) {
                    Ok(Promotion::Done) => {
                        let _ = reply.send(Ok(()));
                    }
                    // The peers were asked: the answer is `Event::PromotionFinished`.
                    Ok(Promotion::Pending) => self.pending_promote = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Demote(reply) => match self.node.handle_demote(now) {
                Ok(()) => self.pending_demote = Some(reply),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Command::NewCurrentUuid(reply) => {
                let _ = reply.send(
                    self.node.handle_new_current_uuid_clear_bitmap(now).map_err(DeviceError::from),
                );
            }
            Command::Connect(peer, discard, reply) => {
                let _ = reply
                    .send(self.node.handle_connect(now, peer, discard).map_err(DeviceError::from));
            }
            Command::Disconnect(peer, reply) => {
                let _ =
                    reply.send(self.node.handle_disconnect(now, peer).map_err(DeviceError::from));
            }
            Command::Outdate(reply) => {
                let _ = reply.send(self.node.handle_outdate(now).map_err(DeviceError::from));
            }
            Command::Attach(reply) => {
                let result = self.node.handle_attach(now).map_err(DeviceError::from);
                if result.is_ok() {
                    self.disk_error = None;
                }
                let _ = reply.send(result);
            }
            Command::Detach(reply) => {
                let _ = reply.send(self.node.handle_detach(now).map_err(DeviceError::from));
            }
            Command::Verify(peer, first_block, reply) => {
                let result = self.node.handle_verify(now, peer, first_block);
                let _ = reply.send(result.map_err(DeviceError::from));
            }
            Command::Resize(reply) => {
                if self.pending_resize.is_some() {
                    let _ = reply.send(Err(DeviceError::State(StateError::Precondition(
                        "a resize is already running",
                    ))));
                    return;
                }
                let usable = self
                    .meta_file
                    .usable_blocks(&self.config.backing_path, self.node.size_blocks());
                match self.node.handle_resize(now, usable) {
                    Ok(()) => self.pending_resize = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::SetFenceHandler(handler, reply) => {
                self.fence_handler = handler;
                let _ = reply.send(Ok(()));
            }
            Command::Status(reply) => self.status_replies.push(reply),
        }
    }

    fn status(&self) -> Status {
        let n = &self.node;
        Status {
            node_id: n.node_id(),
            role: n.role(),
            disk: n.disk_state(),
            size_bytes: n.size_blocks() * BLOCK_SIZE_BYTES,
            peers: n
                .peer_ids()
                .into_iter()
                .map(|p| PeerStatus {
                    node_id: p,
                    connection: n.connection_state(p).unwrap_or(ConnectionState::StandAlone),
                    role: n.peer_role(p).unwrap_or(Role::Unknown),
                    replication: n.replication_state(p).unwrap_or(ReplicationState::Off),
                    disk: n.peer_disk_state(p).unwrap_or(DiskState::DUnknown),
                    out_of_sync_blocks: n.out_of_sync_blocks(p),
                    resync: n.resync_progress(p),
                    verify: n.verify_progress(p),
                    round_trip_us: self.round_trip_us.get(&p).copied(),
                })
                .collect(),
            resync_blocks_received: self.resync_blocks_received,
            resync_blocks_sent: self.resync_blocks_sent,
            split_brain: self.split_brain,
            verifies_finished: self.verifies_finished,
            verify_last: self.verify_last,
            verify_out_of_sync: self.verify_out_of_sync.clone(),
            quorum: n.has_quorum(),
            disk_error: self.disk_error.clone(),
        }
    }

    fn handle_input(&mut self, input: Input) {
        let now = now_ms();
        match input {
            Input::Connected { peer, conn_id, writer } => {
                self.writers.insert(peer, (conn_id, writer));
                // A peer that missed a resize makes this node grow in the handshake: its
                // backing may have grown since it last looked.
                let usable = self
                    .meta_file
                    .usable_blocks(&self.config.backing_path, self.node.size_blocks());
                self.node.handle_usable_size(now, usable);
                self.node.handle_connected(now, peer, conn_id);
            }
            Input::Frames { peer, bytes, conn_id } => {
                let mut at = 0usize;
                while self.writers.get(&peer).is_some_and(|(c, _)| *c == conn_id) {
                    // The reader cut the chunk at frame boundaries it checked with `frame_len`.
                    let Some(header) = bytes.get(at..at + HEADER_BYTES) else { break };
                    let header: &[u8; HEADER_BYTES] = header.try_into().expect("header-sized");
                    let Ok(total) = frame_len(header) else { break };
                    if bytes.len() - at < total {
                        break;
                    }
                    if crate::protocol::frame::header_kind(header)
                        == Some(crate::protocol::frame::PING_ACK_KIND)
                        && let Some(sent) = self.ping_sent.remove(&peer)
                    {
                        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                        self.round_trip_us.insert(peer, micros);
                    }
                    self.node.handle_receive_shared(now, peer, &bytes.slice(at..at + total));
                    at += total;
                }
            }
            Input::Closed { peer, conn_id, by_peer } => {
                if self.writers.get(&peer).is_some_and(|(c, _)| *c == conn_id) {
                    self.writers.remove(&peer);
                }
                if by_peer {
                    self.node.handle_transport_closed_by_peer(now, peer, conn_id);
                } else {
                    self.node.handle_transport_closed(now, peer, conn_id);
                }
            }
            Input::Fenced { peer, outcome } => self.node.handle_fence_outcome(now, peer, outcome),
        }
    }

    fn process_outputs(&mut self) {
        let mut persists = Vec::new();
        loop {
            let output = self.node.poll_output();
            if let Some(Output::Persist(update)) = output {
                persists.push(update);
                continue;
            }
            if !persists.is_empty() {
                // Durable before anything after it happens: the state machine relies on it.
                let applied = off_the_runtime(|| self.meta_file.apply_all(&persists));
                persists.clear();
                if let Err(error) = applied {
                    // A local disk failure (DRBD: a metadata I/O error detaches whatever
                    // on-io-error says). `output` was decided on the premise that the updates
                    // are durable: the node takes it back and says what to do instead
                    // (`protocol::node::metafail`).
                    tracing::error!(node = %self.config.node_id, %error, "metadata update failed: Local IO failed in metadata write, detaching the disk (disk( Failed -> Diskless ))");
                    self.disk_error = Some(format!("metadata update failed: {error}"));
                    self.node.handle_metadata_failed(now_ms(), output);
                    continue;
                }
            }
            let Some(output) = output else {
                self.end_gather_run();
                break;
            };
            match output {
                Output::Transmit { peer, frame } => self.transmit(peer, frame),
                Output::Disconnect { peer, conn_id } => {
                    self.flush_sends(Some(peer));
                    if self.writers.get(&peer).is_some_and(|(c, _)| *c == conn_id) {
                        // Dropping it ends the writer task, the socket's last holder, which
                        // shuts the socket's write side.
                        self.writers.remove(&peer);
                    }
                }
                Output::DiskIo { id, op } => self.submit_disk(id, op),
                Output::Persist(_) => unreachable!("batched above"),
                Output::Complete { request, result } => {
                    if let Some(reply) = self.requests.remove(&request.0) {
                        let _ = reply.send(result.map_err(DeviceError::from));
                    }
                }
                Output::Event(event) => self.handle_event(event),
            }
        }
        self.flush_sends(None);
    }

    /// Queues a frame for a peer: headers and small frames gather in one buffer, a Data
    /// payload joins the batch as a piece of its own (frames keep their order).
    fn transmit(&mut self, peer: NodeId, frame: EncodedFrame) {
        if !self.writers.contains_key(&peer) {
            return;
        }
        if crate::protocol::frame::header_kind(&frame.head)
            == Some(crate::protocol::frame::PING_KIND)
        {
            self.ping_sent.insert(peer, Instant::now());
        }
        let batch = self.send_buffers.entry(peer).or_default();
        batch.push(frame);
        if batch.bytes >= SEND_BATCH_BYTES_MAX {
            self.flush_sends(Some(peer));
        }
    }

    /// Hands the gathered frames of one peer (or of every peer) to the connection writers.
    fn flush_sends(&mut self, only: Option<NodeId>) {
        for (peer, batch) in &mut self.send_buffers {
            if only.is_some_and(|o| o != *peer) || batch.bytes == 0 {
                continue;
            }
            let pieces = batch.take();
            if let Some((_, writer)) = self.writers.get(peer) {
                writer.send(pieces);
            }
        }
    }

    fn handle_event(&mut self, event: Event) {
        tracing::info!(node = %self.config.node_id, ?event, "event");
        match event {
            Event::RoleChanged(Role::Secondary) => {
                if let Some(reply) = self.pending_demote.take() {
                    let _ = reply.send(Ok(()));
                }
            }
            Event::PromotionFinished(result) => {
                if let Some(reply) = self.pending_promote.take() {
                    let _ = reply.send(result.map_err(DeviceError::from));
                }
            }
            Event::ResyncFinished { blocks, .. } => self.resync_blocks_sent += blocks,
            Event::UsableSizeWanted => {
                let usable = self
                    .meta_file
                    .usable_blocks(&self.config.backing_path, self.node.size_blocks());
                self.node.handle_usable_size(now_ms(), usable);
            }
            Event::ResizeFinished { old_blocks, new_blocks, error } => {
                if new_blocks > old_blocks {
                    let len = match &self.meta_file {
                        Store::V09(f) => f.device_bytes().ok(),
                        Store::Sidecar(_) => {
                            std::fs::metadata(&self.config.backing_path).ok().map(|m| m.len())
                        }
                    };
                    self.store_grow_bytes = len;
                    self.shared_size_bytes.store(new_blocks * BLOCK_SIZE_BYTES, Ordering::Release);
                    tracing::info!(
                        old_bytes = old_blocks * BLOCK_SIZE_BYTES,
                        new_bytes = new_blocks * BLOCK_SIZE_BYTES,
                        "resized"
                    );
                }
                if let Some(reply) = self.pending_resize.take() {
                    let result = match error {
                        None => Ok((old_blocks * BLOCK_SIZE_BYTES, new_blocks * BLOCK_SIZE_BYTES)),
                        Some(message) => Err(DeviceError::Resize(message)),
                    };
                    let _ = reply.send(result);
                }
            }
            Event::SplitBrain { peer } => {
                self.split_brain = true;
                tracing::warn!(%peer, "split brain detected, StandAlone: discard the victim's changes with `connect PEER --discard-my-data` there");
            }
            Event::SplitBrainResolved { peer, policy, discarded_local } => {
                let victim = if discarded_local { "this node" } else { "the peer" };
                tracing::warn!(%peer, policy, "split brain resolved automatically: {victim} discards its changes since the split");
            }
            Event::PrimaryLostAfterSplitBrain { peer } => {
                // DRBD runs the pri-lost-after-sb handler here (usually a reboot); Tandem
                // leaves the connection StandAlone and the decision to the operator.
                tracing::error!(%peer, "call-pri-lost-after-sb: this primary lost the split-brain decision");
            }
            Event::FencePeer { peer } => self.start_fence_handler(peer),
            Event::Detached => {
                // DRBD's words: "disk( UpToDate -> Failed )", "Local IO failed ... Detaching...".
                tracing::error!(node = %self.config.node_id, "local disk failed or detached: disk( Failed -> Diskless ), I/O continues through UpToDate peers; `attach` once the disk is back");
            }
            Event::ReplicationStateChanged {
                peer,
                state: ReplicationState::VerifyS | ReplicationState::VerifyT,
            } => {
                // A new run: the list shows the runs of the current (or last) one.
                self.verify_out_of_sync.retain(|(p, _, _)| *p != peer);
            }
            Event::VerifyOutOfSync { peer, first_block, blocks } => {
                if self.verify_out_of_sync.len() >= constants::VERIFY_REPORT_RUNS_MAX {
                    self.verify_out_of_sync.remove(0);
                }
                self.verify_out_of_sync.push((peer, first_block, blocks));
            }
            Event::VerifyFinished {
                peer,
                blocks_verified,
                out_of_sync_blocks,
                skipped_blocks,
                completed,
                source: true,
            } => {
                self.verifies_finished += 1;
                self.verify_last = Some(VerifyOutcome {
                    peer,
                    blocks_verified,
                    out_of_sync_blocks,
                    skipped_blocks,
                    completed,
                });
            }
            _ => {}
        }
    }

    /// Runs the fence-peer handler for `peer` in a task of its own; its verdict comes back as
    /// an input. I/O stays frozen meanwhile (the state machine holds it).
    fn start_fence_handler(&mut self, peer: NodeId) {
        let Some(handler) = self.fence_handler.clone() else {
            // DRBD does the same when its handler fails: frozen until the peer is back.
            tracing::warn!(%peer, "fence-peer requested but no handler is set; I/O frozen until the peer reconnects");
            return;
        };
        let peer_addr = self.config.peers.iter().find(|(id, _)| *id == peer).map(|(_, a)| *a);
        let env = fence::environment(
            &handler,
            (self.config.node_id, self.config.listen),
            (peer, peer_addr),
        );
        let inputs = self.inputs_tx.clone();
        self.tasks.spawn(async move {
            let outcome = fence::run(handler, env, peer).await;
            let _ = inputs.send(Input::Fenced { peer, outcome });
        });
    }

    fn submit_disk(&mut self, id: IoId, op: DiskOp) {
        // With internal metadata the blocks past the data area are the bitmap, activity log
        // and superblock: data I/O there would corrupt them.
        let end_blocks = match &op {
            DiskOp::Read { offset_blocks, blocks } => offset_blocks + blocks,
            DiskOp::Write { offset_blocks, data, .. } => {
                offset_blocks + data.len() as u64 / BLOCK_SIZE_BYTES
            }
            DiskOp::Flush => 0,
        };
        assert!(end_blocks <= self.node.size_blocks(), "data I/O beyond the data area");
        let store = self.store.clone();
        if let DiskOp::Write { origin: WriteOrigin::Resync, data, .. } = &op {
            self.resync_blocks_received += data.len() as u64 / BLOCK_SIZE_BYTES;
        }
        let op = match atomic::journaled(self.journal.as_ref(), &store, id, op) {
            Ok(future) => {
                self.end_gather_run();
                return self.disk_queue.push(DiskWork::One(future));
            }
            Err(op) => op,
        };
        let op = match self.try_gather(id, op) {
            None => return,
            Some(op) => op,
        };
        self.end_gather_run();
        self.disk_queue.push(DiskWork::One(Box::pin(async move {
            let result = match op {
                DiskOp::Read { offset_blocks, blocks } => {
                    let len = usize::try_from(blocks * BLOCK_SIZE_BYTES).unwrap_or(usize::MAX);
                    store
                        .read(offset_blocks * BLOCK_SIZE_BYTES, len)
                        .await
                        .map(|b| Some(Vec::from(b)))
                }
                DiskOp::Write { offset_blocks, data, fua, .. } => {
                    store.write(offset_blocks * BLOCK_SIZE_BYTES, data, fua).await.map(|()| None)
                }
                DiskOp::Flush => store.flush().await.map(|()| None),
            };
            let result = result.map_err(|error| {
                tracing::error!(%error, "local I/O failed");
                IoFailed
            });
            (id, result)
        })));
    }

    /// Adds a plain buffered write to this round's run of adjacent writes (handing it back
    /// when it cannot join one): a burst of sequential 4 KiB writes then reaches the disk as
    /// one pwritev instead of a system call each, on the primary and on every secondary.
    fn try_gather(&mut self, id: IoId, op: DiskOp) -> Option<DiskOp> {
        let DiskOp::Write { offset_blocks, data, fua: false, atomic: false, .. } = &op else {
            return Some(op);
        };
        if self.store.is_direct_io() || data.len() > GATHER_WRITE_BYTES_ONE_MAX {
            return Some(op);
        }
        let (offset_blocks, blocks) = (*offset_blocks, data.len() as u64 / BLOCK_SIZE_BYTES);
        if let Some(run) = &mut self.gather
            && run.end_blocks == offset_blocks
            && run.bytes + data.len() <= GATHERED_WRITE_BYTES_MAX
            && run.pieces.len() < GATHERED_WRITE_PIECES_MAX
        {
            run.push(id, data.clone(), blocks);
            return None;
        }
        self.end_gather_run();
        let mut run = GatherRun {
            first_blocks: offset_blocks,
            end_blocks: offset_blocks,
            ids: Vec::new(),
            pieces: Vec::new(),
            bytes: 0,
        };
        run.push(id, data.clone(), blocks);
        self.gather = Some(run);
        None
    }

    /// Queues the current run of adjacent writes, if any: a lone write as before, two or more
    /// as one gathered write. Called before anything else is queued (the queue keeps the order
    /// the state machine asked for) and at the end of every round's outputs.
    fn end_gather_run(&mut self) {
        let Some(run) = self.gather.take() else { return };
        let store = self.store.clone();
        let offset_bytes = run.first_blocks * BLOCK_SIZE_BYTES;
        let GatherRun { mut ids, mut pieces, .. } = run;
        if pieces.len() == 1 {
            let (id, data) = (ids.pop().expect("one id"), pieces.pop().expect("one piece"));
            self.disk_queue.push(DiskWork::One(Box::pin(async move {
                let result = store.write(offset_bytes, data, false).await.map(|()| None);
                let result = result.map_err(|error| {
                    tracing::error!(%error, "local I/O failed");
                    IoFailed
                });
                (id, result)
            })));
            return;
        }
        self.disk_queue.push(DiskWork::Gathered(Box::pin(async move {
            let result = store.write_gathered(offset_bytes, pieces).await.map_err(|error| {
                tracing::error!(%error, "local I/O failed");
                IoFailed
            });
            (ids, result)
        })));
    }
}

/// Plain writes of one round that continue each other on the disk, in the order the state
/// machine asked for them (it never has overlapping writes in flight, so none of them overlap).
struct GatherRun {
    first_blocks: u64,
    end_blocks: u64,
    ids: Vec<IoId>,
    pieces: Vec<Bytes>,
    bytes: usize,
}

impl GatherRun {
    fn push(&mut self, id: IoId, data: Bytes, blocks: u64) {
        assert_eq!(data.len() as u64, blocks * BLOCK_SIZE_BYTES);
        self.end_blocks += blocks;
        self.bytes += data.len();
        self.ids.push(id);
        self.pieces.push(data);
    }
}

/// The driver's one timer (see `Driver::run`): armed for the next deadline each round, moved
/// only when that deadline is earlier than the armed one or the armed one has passed. Firing
/// early is harmless (the round re-checks every deadline), firing late is not.
struct RoundTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// What `sleep` is armed for, in `now_ms` milliseconds; `None` once it fired.
    armed_ms: Option<u64>,
}

impl RoundTimer {
    fn new() -> Self {
        Self { sleep: Box::pin(tokio::time::sleep(Duration::ZERO)), armed_ms: None }
    }

    fn arm(&mut self, wake_ms: u64) {
        if self.armed_ms.is_some_and(|armed| armed <= wake_ms && armed > now_ms()) {
            return;
        }
        let start = *START.get_or_init(Instant::now);
        let at = start + Duration::from_millis(wake_ms);
        self.sleep.as_mut().reset(tokio::time::Instant::from_std(at));
        self.armed_ms = Some(wake_ms);
    }

    /// Completes when the armed time has come.
    async fn fired(&mut self) {
        (&mut self.sleep).await;
        self.armed_ms = None;
    }
}

/// One peer's frames of the current round, in order: the pieces so far, then `small`, where
/// headers and payload-less frames gather until a payload needs a piece of its own.
#[derive(Default)]
struct SendBatch {
    pieces: Vec<Bytes>,
    small: Vec<u8>,
    bytes: usize,
}

impl SendBatch {
    fn push(&mut self, frame: EncodedFrame) {
        self.bytes += frame.len();
        if self.small.is_empty() {
            // The first frame after a piece is taken over without a copy.
            self.small = frame.head;
        } else {
            self.small.extend_from_slice(&frame.head);
        }
        if !frame.payload.is_empty() {
            self.pieces.push(Bytes::from(std::mem::take(&mut self.small)));
            self.pieces.push(frame.payload);
        }
    }

    fn take(&mut self) -> Vec<Bytes> {
        if !self.small.is_empty() {
            self.pieces.push(Bytes::from(std::mem::take(&mut self.small)));
        }
        self.bytes = 0;
        std::mem::take(&mut self.pieces)
    }
}

/// Loads `Metadata` for tests and tools without starting a driver.
pub fn load_metadata(path: &std::path::Path) -> Result<Metadata, DeviceError> {
    Ok(MetaFile::load(path)?)
}

/// Runs `work`, which blocks (metadata writes end in an fsync), without stalling the other
/// tasks of a multi-threaded runtime: the engine shares tandemd's runtime with the iSCSI
/// sessions and the other resources' engines, so a worker held in an fsync would hold them
/// too. The driver still waits for it: metadata is durable before the next output.
/// A current-thread runtime (tandem-replica, tests) has no other worker to hand tasks to.
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write the socket took only in part leaves exactly the bytes it did not take, in order.
    #[test]
    fn advance_pieces_drops_exactly_the_written_bytes() {
        let pieces = || {
            vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de"), Bytes::from_static(b"fghi")]
        };
        for written in 0..=9usize {
            let mut left = pieces();
            advance_pieces(&mut left, written);
            let rest: Vec<u8> = left.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(rest, b"abcdefghi"[written..].to_vec(), "after {written} bytes");
        }
    }

    /// Every I/O that has finished completes in the same round (their acks share a write),
    /// and one still in flight stays in the set.
    #[tokio::test]
    async fn disk_set_completes_everything_ready_at_once() {
        let mut disk = DiskSet::default();
        for id in 0..5u64 {
            disk.pending.push(DiskWork::One(Box::pin(std::future::ready((IoId(id), Ok(None))))));
        }
        disk.pending.push(DiskWork::One(Box::pin(std::future::pending())));
        let mut done = Vec::new();
        disk.next(&mut done).await;
        let mut ids: Vec<u64> = done.iter().map(|(id, _)| id.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1, 2, 3, 4]);
        assert_eq!(disk.pending.len(), 1);
        done.clear();
        disk.ready(&mut done).await;
        assert!(done.is_empty());
    }

    /// A renewed receive buffer keeps the front of the frame it held, and a parked buffer is
    /// taken again (same allocation, pages already mapped) once every frame split off it is gone.
    #[test]
    fn receive_buffers_are_reused_once_their_frames_are_gone() {
        const FRAME_BYTES: usize = 1024 * 1024;
        let mut spares = ReceiveBuffers::default();
        // Room after the frame, as the driver's reads leave it: the next frame's head lands in
        // the same allocation. (Without room, `extend_from_slice` would move the head to a new
        // allocation and the test would hinge on the allocator handing the freed one back.)
        let mut buffer = BytesMut::with_capacity(FRAME_BYTES + 4096);
        buffer.extend_from_slice(&vec![7u8; FRAME_BYTES]);
        let first_allocation = buffer.as_ptr();
        let frame = buffer.split_to(FRAME_BYTES).freeze();
        buffer.extend_from_slice(b"head");
        // The frame is alive: a fresh buffer, with the partial frame moved over.
        let mut second = spares.renew(buffer, FRAME_BYTES);
        assert_eq!(&second[..], b"head");
        assert!(second.capacity() - second.len() >= FRAME_BYTES);
        assert_ne!(second.as_ptr(), first_allocation);
        second.extend_from_slice(&vec![8u8; FRAME_BYTES - 4]);
        let frame_two = second.split_to(FRAME_BYTES).freeze();
        drop(frame);
        // The first buffer's frame is gone: its allocation comes back.
        let third = spares.renew(second, FRAME_BYTES);
        assert_eq!(third.as_ptr(), first_allocation);
        assert!(third.is_empty() && third.capacity() >= FRAME_BYTES);
        assert!(frame_two[..4] == *b"head" && frame_two[4..].iter().all(|b| *b == 8));
        assert!(spares.parked.len() <= RECEIVE_BUFFERS_PARKED_MAX);
    }

    /// Frames the driver writes directly and frames queued behind a full socket arrive whole and
    /// in order: a send buffer far smaller than the data forces the writer task to take over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_sends_keep_their_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let (_reader, writer) = client.into_split();
        let socket = Arc::new(writer);
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Bytes>>();
        let peer = PeerWriter { socket: socket.clone(), queued: queued.clone(), tx };
        let task_queued = queued.clone();
        let drain = tokio::spawn(async move {
            while let Some(pieces) = rx.recv().await {
                write_pieces(&socket, pieces).await.expect("write");
                task_queued.fetch_sub(1, Ordering::Release);
            }
        });
        const BATCHES: u32 = 64;
        const PIECE_BYTES: usize = 64 * 1024;
        let mut expected = Vec::new();
        for batch in 0..BATCHES {
            let pieces: Vec<Bytes> = (0..4u32)
                .map(|i| {
                    let fill = u8::try_from((batch * 4 + i) % 251).expect("below 251");
                    Bytes::from(vec![fill; PIECE_BYTES])
                })
                .collect();
            expected.extend(pieces.iter().flat_map(|p| p.iter().copied()));
            peer.send(pieces);
        }
        drop(peer);
        let mut received = vec![0u8; expected.len()];
        server.read_exact(&mut received).await.expect("read");
        drain.await.expect("drain task");
        assert!(received == expected, "bytes arrived out of order or damaged");
        assert_eq!(queued.load(Ordering::Acquire), 0);
    }
}

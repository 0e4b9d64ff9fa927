//! One replication node: the whole per-resource state machine.
//!
//! Write path on a primary (protocol C): wait until no earlier overlapping write, resync read
//! or peer write is in flight (so overlapping writes reach every disk in one order); make the
//! extents hot in the activity log; start a new generation if a peer will miss the write; mark
//! the write in the bitmap of every peer it cannot reach; then submit it locally and send it to
//! every replicating peer at once. It completes when the local disk and every replicating
//! peer acknowledged it, and never while the fencing of a lost peer is unresolved (with fencing
//! resource-only or resource-and-stonith, reads that finished meanwhile wait too: a peer
//! promoted behind our back may have newer data). If the fence-peer handler answers that the
//! peer is primary (exit code 6), this node outdates itself and fails what it froze.
//!
//! A completed write stays in the transfer log until it is on stable storage everywhere: the
//! primary closes epochs with barriers (a local flush plus a Barrier frame the peer answers
//! after flushing). If a connection breaks, every write the peer has not confirmed stable is
//! marked in its bitmap, so a peer that lost its volatile cache is resynced too. An extent
//! leaves the activity log only when no transfer-log entry references it, so after a crash
//! as primary the activity log covers every write that might differ between the replicas.

use crate::NodeId;
use crate::bitmap::Bitmap;
use crate::constants::{
    AL_EXTENT_BLOCKS, AL_EXTENTS_MAX, AL_EXTENTS_MIN, APP_REQUESTS_MAX, BARRIER_INTERVAL_MS,
    BARRIERS_MAX, BITMAP_CHUNK_WORDS_MAX, BLOCK_SIZE_BYTES, HANDSHAKE_TIMEOUT_MS,
    PEER_QUEUE_FRAMES_MAX, PEER_WRITES_IN_FLIGHT_MAX, PEERS_MAX, PING_INTERVAL_MS, PING_TIMEOUT_MS,
    REORDER_FRAMES_MAX, REQUEST_BLOCKS_MAX, RESYNC_REQUEST_BLOCKS_MAX, RESYNC_REQUESTS_MAX,
    RESYNC_STEP_MS, TRANSFER_LOG_ENTRIES_MAX,
};
use crate::protocol::after_sb::{self, AfterSbPolicies, Resolution, SplitBrainSide};
use crate::protocol::candidates::Candidates;
use crate::protocol::frame::{self, Envelope, Frame, Hello, PROTOCOL_VERSION};
use crate::protocol::persist::{MetaUpdate, Metadata, PersistedDisk};
use crate::protocol::quorum::{QuorumConfig, QuorumState};
use crate::protocol::resync_controller::{ResyncController, ResyncRate};
use crate::protocol::states::{ConnectionState, DiskState, ReplicationState, Role};
use crate::uuid::{self, GenerationUuids, HandshakeView, SyncDecision};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use thiserror::Error;

pub mod ahead;
mod atomic;
pub mod diskless;
mod mesh;
mod mesh_gen;
mod metafail;
mod promote;
#[path = "quorum_node.rs"]
mod quorum_node;
mod resize;
mod stall;
pub mod verify;

pub use ahead::{CongestionConfig, OnCongestion};
pub use diskless::OnIoError;
pub use promote::Promotion;

/// DRBD's replication protocols: when a write counts as complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationProtocol {
    /// Complete when written locally and sent.
    A,
    /// Complete when written locally and received by every peer.
    B,
    /// Complete when written locally and on every peer's disk.
    C,
}

impl ReplicationProtocol {
    fn to_wire(self) -> u8 {
        match self {
            Self::A => 1,
            Self::B => 2,
            Self::C => 3,
        }
    }
}

/// DRBD's `fencing` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// Keep writing when a peer is lost; a promoted stale peer can lose acknowledged writes,
    /// and a peer promoted behind our back makes two primaries (split brain on reconnect).
    DontCare,
    /// Freeze application I/O completion when a possibly UpToDate peer is lost until the fence
    /// handler answered (`Event::FencePeer` -> `Node::handle_fence_outcome`). DRBD itself
    /// freezes only with resource-and-stonith (`susp-fen`); Tandem freezes with both, because
    /// without the freeze a write acknowledged in the handler's window can be missing on a
    /// peer promoted meanwhile.
    ResourceOnly,
    /// As `ResourceOnly`; the handler may also shoot the peer (exit code 7), and the cluster
    /// shoots a primary that lost the race to a promoted peer.
    ResourceAndStonith,
}

impl Fencing {
    /// Whether losing a possibly UpToDate peer freezes I/O until the fence handler answered.
    pub fn freezes(self) -> bool {
        matches!(self, Self::ResourceOnly | Self::ResourceAndStonith)
    }
}

/// What the `fence-peer` handler reported, by its exit code (DRBD user guide, "The peer
/// fencing interface").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceOutcome {
    /// Exit code 3: the peer's disk was already Inconsistent (it cannot be promoted).
    PeerInconsistent,
    /// Exit code 4: the peer's disk is now Outdated (or was already).
    PeerOutdated,
    /// Exit code 5: the peer could not be reached. As DRBD, a node with UpToDate data takes
    /// the peer for dead and resumes; otherwise I/O stays frozen.
    PeerUnreachable,
    /// Exit code 6: the peer refused to be outdated because it is primary. As DRBD ("peer is
    /// primary, outdating myself"), this node outdates its own disk: its frozen requests fail
    /// and it serves nothing more, so it never acknowledges a write the new primary lacks.
    PeerIsPrimary,
    /// Exit code 7: the peer was fenced off the cluster (STONITH).
    PeerStonithed,
    /// Any other exit code: the handler is broken; I/O stays frozen (DRBD: until
    /// `drbdadm resume-io`, here until the peer reconnects in sync or as our sync target).
    Failed,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub peers: Vec<NodeId>,
    pub protocol: ReplicationProtocol,
    pub fencing: Fencing,
    pub resync_rate: ResyncRate,
    /// Activity-log size in extents (DRBD's `al-extents`).
    pub al_extents: usize,
    /// Seeds generation UUIDs; the driver passes random bits, the simulator its seed.
    pub random_seed: u64,
    /// `net { csums-alg; csums-after-crash-only; verify-alg; }` (see `verify`).
    pub digests: crate::protocol::digest::DigestSettings,
    /// Quorum settings and the diskless nodes (`protocol::quorum`).
    pub quorum: QuorumConfig,
    /// Automatic split-brain recovery (`net { after-sb-0pri; after-sb-1pri; after-sb-2pri; }`).
    pub after_sb: AfterSbPolicies,
    /// `disk { on-io-error detach|pass_on; }` (see `diskless`).
    pub on_io_error: OnIoError,
    /// `net { on-congestion; congestion-fill; congestion-extents; }` (see `ahead`).
    pub congestion: CongestionConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            protocol: ReplicationProtocol::C,
            fencing: Fencing::DontCare,
            resync_rate: ResyncRate::Dynamic(Default::default()),
            al_extents: AL_EXTENTS_MIN,
            random_seed: 0,
            digests: crate::protocol::digest::DigestSettings::default(),
            quorum: QuorumConfig::default(),
            after_sb: AfterSbPolicies::default(),
            on_io_error: OnIoError::default(),
            congestion: CongestionConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppRequest {
    Read {
        offset_blocks: u64,
        blocks: u64,
    },
    Write {
        offset_blocks: u64,
        /// Shared with the Data frames and the local write: never copied on the way.
        data: Bytes,
        fua: bool,
    },
    Flush,
    /// Replicated as a write of zeroes, so every replica reads back the same bytes.
    Discard {
        offset_blocks: u64,
        blocks: u64,
    },
    /// WRITE ATOMIC: like `Write`, and every replica applies it through its atomic-write
    /// journal, so a crash leaves each disk with all of it or none (`node::atomic`).
    WriteAtomic {
        offset_blocks: u64,
        data: Bytes,
        fua: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("not primary")]
    NotPrimary,
    #[error("no UpToDate data to serve from")]
    NoUpToDateData,
    #[error("range {offset_blocks}+{blocks} outside the device or empty")]
    InvalidRange { offset_blocks: u64, blocks: u64 },
    #[error("data length {0} is not a whole number of blocks")]
    Misaligned(usize),
    #[error("too many requests in flight")]
    Busy,
    #[error("I/O error")]
    Io,
    #[error("no quorum")]
    NoQuorum,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    #[error("already {0}")]
    Already(Role),
    #[error("disk is {0}, promotion needs UpToDate data (or --force on consistent data)")]
    NoUpToDateData(DiskState),
    #[error("peer {0} is primary")]
    PeerIsPrimary(NodeId),
    #[error("node is SyncTarget")]
    SyncTarget,
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
    #[error("precondition failed: {0}")]
    Precondition(&'static str),
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The cluster-wide promotion was refused by this peer (it sees another primary, or
    /// prepares another node's promotion, or is itself promoting).
    #[error("peer {0} refused the promotion")]
    PeerRefused(NodeId),
    /// This node granted peer `0`'s pending promotion and refuses its own until it ends.
    #[error("peer {0} is being promoted")]
    PeerPromoting(NodeId),
    /// A promotion of this node is pending already.
    #[error("a promotion is pending")]
    PromotionPending,
}

/// Why a local I/O failed (the driver maps its error to this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoFailed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOrigin {
    Application,
    Peer,
    Resync,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    Read {
        offset_blocks: u64,
        blocks: u64,
    },
    Write {
        offset_blocks: u64,
        data: Bytes,
        fua: bool,
        origin: WriteOrigin,
        /// Through the atomic-write journal: all of it or none after a crash.
        atomic: bool,
    },
    Flush,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    RoleChanged(Role),
    DiskStateChanged(DiskState),
    ConnectionStateChanged {
        peer: NodeId,
        state: ConnectionState,
    },
    ReplicationStateChanged {
        peer: NodeId,
        state: ReplicationState,
    },
    PeerDiskStateChanged {
        peer: NodeId,
        state: DiskState,
    },
    HandshakeDecided {
        peer: NodeId,
        decision: SyncDecision,
    },
    SplitBrain {
        peer: NodeId,
    },
    /// A split brain was resolved automatically by an after-sb policy: `discarded_local` says
    /// whether this node is the victim (its changes since the split are overwritten).
    SplitBrainResolved {
        peer: NodeId,
        policy: &'static str,
        discarded_local: bool,
    },
    /// `call-pri-lost-after-sb`: this primary lost the split-brain decision; run the
    /// `pri-lost-after-sb` handler (the connection stays StandAlone).
    PrimaryLostAfterSplitBrain {
        peer: NodeId,
    },
    UnrelatedData {
        peer: NodeId,
    },
    SyncRefused {
        peer: NodeId,
        reason: &'static str,
    },
    /// Call the fence handler and report with `handle_fence_result`.
    FencePeer {
        peer: NodeId,
    },
    ResyncFinished {
        peer: NodeId,
        blocks: u64,
    },
    ProtocolError {
        peer: NodeId,
        reason: String,
    },
    /// The local disk failed and was detached.
    Detached,
    /// Online verify found these blocks different on the peer (DRBD logs "Out of sync").
    VerifyOutOfSync {
        peer: NodeId,
        first_block: u64,
        blocks: u64,
    },
    /// A verify run with `peer` ended (`completed` false: stopped, refused or cut off).
    VerifyFinished {
        peer: NodeId,
        blocks_verified: u64,
        out_of_sync_blocks: u64,
        /// Blocks writes kept changing while they were compared (not verified).
        skipped_blocks: u64,
        completed: bool,
        /// This node was VerifyS (it compared and counted); false: VerifyT.
        source: bool,
    },
    /// Quorum was gained (true) or lost (false); only with quorum enabled.
    QuorumChanged(bool),
    /// A promotion that `handle_promote` left pending (`Promotion::Pending`) ended: the
    /// peers granted it and this node is Primary (after its RoleChanged), or it failed.
    PromotionFinished(Result<(), StateError>),
    /// A peer asks for this replica's usable size (online resize): answer with
    /// `Node::handle_usable_size`.
    UsableSizeWanted,
    /// An online resize ended here (`error`: why it was refused; `new_blocks == old_blocks`
    /// without error: nothing to grow).
    ResizeFinished {
        old_blocks: u64,
        new_blocks: u64,
        error: Option<String>,
    },
}

// Outputs are short-lived queue entries (see MetaUpdate).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// One frame for the peer, in two parts so a Data payload is not copied
    /// (`frame.to_vec()` joins them).
    Transmit {
        peer: NodeId,
        frame: frame::EncodedFrame,
    },
    /// Close this transport to the peer (the driver reconnects while the peer is Connecting).
    Disconnect {
        peer: NodeId,
        conn_id: u64,
    },
    DiskIo {
        id: IoId,
        op: DiskOp,
    },
    /// Must be durable before any later output is acted on.
    Persist(MetaUpdate),
    Complete {
        request: RequestId,
        result: Result<Option<Vec<u8>>, RequestError>,
    },
    Event(Event),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncProgress {
    pub blocks_total: u64,
    pub blocks_remaining: u64,
    pub rate_kib_per_s: u64,
    pub eta_s: Option<u64>,
}

#[derive(Debug)]
enum IoPurpose {
    AppRead { request: RequestId, first: u64, blocks: u64 },
    AppWrite { write: u64 },
    LocalFlush { generation: u64 },
    PeerWrite { peer: NodeId, conn_id: u64, id: u64, resync: bool },
    PeerFlush { peer: NodeId, conn_id: u64, epoch: u64 },
    ResyncRead { peer: NodeId, conn_id: u64, id: u64 },
    Digest(verify::DigestRead),
    RemoteRead { peer: NodeId, conn_id: u64, id: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalState {
    Pending,
    Done,
    Failed,
}

#[derive(Debug)]
struct AppWrite {
    request: RequestId,
    first: u64,
    blocks: u64,
    data: Bytes,
    fua: bool,
    submitted: bool,
    local: LocalState,
    /// Peers whose acknowledgement completion waits for.
    waiting: u64,
    tl: u64,
    /// A WRITE ATOMIC: sent as `Frame::AtomicData`, written through the journal.
    atomic: bool,
    /// Peers that acknowledged it (protocol A: it was sent to).
    acked_by: u64,
    /// Not on the local disk (diskless, or detached while in flight): it succeeds only if a
    /// peer acknowledged it.
    remote_only: bool,
}

impl AppWrite {
    /// Done locally and acknowledged by every peer it waits for.
    fn completable(&self) -> bool {
        self.submitted && self.local != LocalState::Pending && self.waiting == 0
    }
}

#[derive(Debug)]
struct TlEntry {
    first: u64,
    blocks: u64,
    /// Set for resync writes: the peer they went to; bits clear on its barrier ack.
    resync: bool,
    local_done: bool,
    local_stable: bool,
    flush_generation: Option<u64>,
    /// (peer, epoch it was sent in): not yet confirmed stable there.
    peers: Vec<(NodeId, u64)>,
}

impl TlEntry {
    /// Stable locally and confirmed stable by every peer it went to.
    fn collectable(&self) -> bool {
        self.local_stable && self.peers.is_empty()
    }
}

#[derive(Debug)]
struct AppFlush {
    request: RequestId,
    generation: Option<u64>,
    peers: Vec<(NodeId, u64, u64)>,
    failed: bool,
}

#[derive(Debug)]
enum Incoming {
    Write { id: u64, first: u64, data: Bytes, fua: bool, resync: bool, atomic: bool },
    Barrier { epoch: u64 },
    Read { id: u64, first: u64, blocks: u64 },
}

#[derive(Debug)]
struct Handshake {
    started_ms: u64,
    hello: Option<Hello>,
    bitmap: Bitmap,
    done: bool,
    /// What our Hello and bitmap told the peer, for the after-sb decision: both ends must
    /// decide from the same facts even if our role changes while the handshake runs.
    sent: SplitBrainSide,
}

#[derive(Debug)]
struct ResyncSource {
    cursor: u64,
    /// id -> (first, blocks, read finished and sent, epoch sent in)
    in_flight: BTreeMap<u64, (u64, u64, bool, u64)>,
    blocks_total: u64,
    started_ms: u64,
    controller: ResyncController,
    last_step_ms: u64,
    budget_kib: u64,
    acked_kib_step: u64,
    acked_blocks_total: u64,
    /// Checksum-based resync: ask for the target's digests before sending data.
    csums: Option<verify::CsumResync>,
}

impl ResyncSource {
    /// A resync of `blocks_total` marked blocks starting at `now_ms`, its first step due at
    /// once.
    fn new(
        blocks_total: u64,
        now_ms: u64,
        rate: ResyncRate,
        csums: Option<verify::CsumResync>,
    ) -> Self {
        Self {
            cursor: 0,
            in_flight: BTreeMap::new(),
            blocks_total,
            started_ms: now_ms,
            controller: ResyncController::new(rate),
            last_step_ms: now_ms.saturating_sub(RESYNC_STEP_MS),
            budget_kib: 0,
            acked_kib_step: 0,
            acked_blocks_total: 0,
            csums,
        }
    }
}

#[derive(Debug)]
struct Peer {
    id: NodeId,
    connection: ConnectionState,
    replication: ReplicationState,
    disk: DiskState,
    role: Role,
    discard_my_data: bool,
    /// This node was primary when the connection to the peer was last lost (recorded in the
    /// bitmap UUID when tracking starts; see `GenerationUuids::primary_at_split`).
    primary_at_loss: bool,
    conn_id: u64,
    send_seq: u64,
    recv_seq: u64,
    reorder: BTreeMap<u64, Envelope>,
    last_received_ms: u64,
    last_sent_ms: u64,
    handshake: Option<Handshake>,
    /// The epoch Data frames sent now belong to.
    epoch: u64,
    /// The newest epoch the peer confirmed stable.
    acked_epoch: u64,
    // Receiving side (this node as the secondary of that peer).
    queue: VecDeque<Incoming>,
    writes_in_flight: usize,
    barrier_in_flight: bool,
    resync: Option<ResyncSource>,
    next_resync_id: u64,
    verify: verify::PeerVerify,
}

impl Peer {
    fn new(id: NodeId) -> Self {
        Self {
            id,
            connection: ConnectionState::Connecting,
            replication: ReplicationState::Off,
            disk: DiskState::DUnknown,
            role: Role::Unknown,
            discard_my_data: false,
            primary_at_loss: false,
            conn_id: 0,
            send_seq: 0,
            recv_seq: 0,
            reorder: BTreeMap::new(),
            last_received_ms: 0,
            last_sent_ms: 0,
            handshake: None,
            epoch: 1,
            acked_epoch: 0,
            queue: VecDeque::new(),
            writes_in_flight: 0,
            barrier_in_flight: false,
            resync: None,
            next_resync_id: 1,
            verify: verify::PeerVerify::default(),
        }
    }

    /// Writes of the primary go to this peer.
    fn replicating(&self) -> bool {
        self.connection == ConnectionState::Connected
            && self.handshake.is_none()
            && matches!(
                self.replication,
                ReplicationState::Established
                    | ReplicationState::SyncSource
                    | ReplicationState::PausedSyncS
            )
            && self.disk != DiskState::Diskless
    }
}

fn overlaps(a_first: u64, a_blocks: u64, b_first: u64, b_blocks: u64) -> bool {
    a_first < b_first + b_blocks && b_first < a_first + a_blocks
}

fn blocks_of(bytes: usize) -> Option<u64> {
    let bytes = u64::try_from(bytes).ok()?;
    (bytes % BLOCK_SIZE_BYTES == 0 && bytes > 0).then_some(bytes / BLOCK_SIZE_BYTES)
}

fn kib(blocks: u64) -> u64 {
    blocks * BLOCK_SIZE_BYTES / 1024
}

pub struct Node {
    id: NodeId,
    config: Config,
    meta: Metadata,
    role: Role,
    disk: DiskState,
    peers: Vec<Peer>,
    outputs: VecDeque<Output>,
    now_ms: u64,
    random: u64,
    next_io: u64,
    ios: BTreeMap<u64, IoPurpose>,
    next_write: u64,
    app_writes: BTreeMap<u64, AppWrite>,
    queued_writes: VecDeque<u64>,
    app_reads: usize,
    next_tl: u64,
    transfer_log: BTreeMap<u64, TlEntry>,
    al_refs: BTreeMap<u64, u32>,
    /// Hot extents, least recently used first.
    al_order: VecDeque<u64>,
    flush_generation_next: u64,
    flush_generation_done: u64,
    app_flushes: Vec<AppFlush>,
    last_barrier_ms: u64,
    fence_pending: u64,
    /// Application reads finished on disk while a fence was pending: their data may be stale
    /// if the peer was promoted meanwhile, so they complete only after the handler answered.
    held_reads: Vec<(RequestId, Vec<u8>)>,
    demote_pending: bool,
    /// Local writes on behalf of peers (any connection, old ones too) still in flight.
    peer_writes: BTreeMap<(u8, u64, u64, bool), (u64, u64)>,
    last_app_write_ms: u64,
    quorum_state: QuorumState,
    /// Application writes that may have become completable since the last pump, and
    /// transfer-log entries that may have become collectable: each pump looks at these only,
    /// not at every write and entry (see `write_may_complete`).
    completion_candidates: Candidates,
    resize: resize::ResizeState,
    diskless: diskless::DisklessState,
    /// Three or more diskful nodes (`mesh`).
    mesh: mesh::MeshState,
    mesh_gen: mesh_gen::MeshGenState,
    ahead: ahead::AheadState,
    promote: promote::PromoteState,
}

impl Node {
    /// Attaches to persisted metadata (after `create-md`, a clean stop or a crash).
    pub fn new(config: Config, mut meta: Metadata, now_ms: u64) -> Self {
        assert!(config.peers.len() <= PEERS_MAX);
        assert!((AL_EXTENTS_MIN..=AL_EXTENTS_MAX).contains(&config.al_extents));
        assert!(!config.peers.contains(&meta.node_id));
        let id = meta.node_id;
        let mut outputs = VecDeque::new();
        let mut persist = |meta: &mut Metadata, update: MetaUpdate| {
            meta.apply(&update);
            outputs.push_back(Output::Persist(update));
        };
        let unclean_marks = mesh::unclean_secondary_marks(&config, &meta);
        let unclean = !unclean_marks.is_empty();
        for update in unclean_marks {
            persist(&mut meta, update);
        }
        if meta.flags.primary_indicator {
            // Went down as primary: any write in a hot extent may differ between replicas.
            let mut flags = meta.flags.clone();
            flags.primary_indicator = false;
            flags.crashed_primary = true;
            for extent in meta.activity_log.clone() {
                if let Some((first, blocks)) = meta.extent_range(extent) {
                    for peer in &config.peers {
                        persist(
                            &mut meta,
                            MetaUpdate::BitmapSet { peer: *peer, first_block: first, blocks },
                        );
                    }
                }
            }
            persist(&mut meta, MetaUpdate::Flags(flags));
        }
        // An unclean secondary keeps its log (`mesh::unclean_secondary_marks`).
        if !meta.activity_log.is_empty() && !unclean {
            let removed = meta.activity_log.clone();
            persist(&mut meta, MetaUpdate::ActivityLog { added: vec![], removed });
        }
        let all_peers_outdated =
            config.peers.iter().all(|p| meta.flags.peer_outdated & p.bit() != 0);
        let disk = match meta.flags.disk {
            PersistedDisk::Inconsistent => DiskState::Inconsistent,
            PersistedDisk::Outdated => DiskState::Outdated,
            PersistedDisk::UpToDate if all_peers_outdated => DiskState::UpToDate,
            PersistedDisk::UpToDate => DiskState::Consistent,
        };
        let disk = if config.quorum.diskless { DiskState::Diskless } else { disk };
        let quorum_state = QuorumState::new(&config.quorum);
        let peers = config.peers.iter().map(|p| Peer::new(*p)).collect();
        let random = config.random_seed ^ (u64::from(id.0) << 56) ^ 0x2545_f491_4f6c_dd1d;
        let al_order =
            if unclean { meta.activity_log.iter().copied().collect() } else { VecDeque::new() };
        let mut node = Self {
            id,
            config,
            meta,
            role: Role::Secondary,
            disk,
            peers,
            outputs,
            now_ms,
            random,
            next_io: 1,
            ios: BTreeMap::new(),
            next_write: 1,
            app_writes: BTreeMap::new(),
            queued_writes: VecDeque::new(),
            app_reads: 0,
            next_tl: 1,
            transfer_log: BTreeMap::new(),
            al_refs: BTreeMap::new(),
            al_order,
            flush_generation_next: 1,
            flush_generation_done: 0,
            app_flushes: Vec::new(),
            last_barrier_ms: now_ms,
            fence_pending: 0,
            held_reads: Vec::new(),
            demote_pending: false,
            peer_writes: BTreeMap::new(),
            last_app_write_ms: 0,
            quorum_state,
            completion_candidates: Candidates::default(),
            resize: resize::ResizeState::default(),
            diskless: diskless::DisklessState::default(),
            mesh: mesh::MeshState::default(),
            mesh_gen: mesh_gen::MeshGenState::default(),
            ahead: ahead::AheadState::default(),
            promote: promote::PromoteState::default(),
        };
        node.mesh_set_unclean(unclean);
        node
    }

    // ----- observation -----

    pub fn node_id(&self) -> NodeId {
        self.id
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn disk_state(&self) -> DiskState {
        self.disk
    }
    pub fn size_blocks(&self) -> u64 {
        self.meta.size_blocks
    }
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }
    pub fn uuids(&self) -> &GenerationUuids {
        &self.meta.uuids
    }
    pub fn peer_ids(&self) -> Vec<NodeId> {
        self.peers.iter().map(|p| p.id).collect()
    }
    fn peer(&self, id: NodeId) -> Option<&Peer> {
        self.peers.iter().find(|p| p.id == id)
    }
    fn peer_index(&self, id: NodeId) -> Option<usize> {
        self.peers.iter().position(|p| p.id == id)
    }
    pub fn connection_state(&self, peer: NodeId) -> Option<ConnectionState> {
        self.peer(peer).map(|p| p.connection)
    }
    pub fn replication_state(&self, peer: NodeId) -> Option<ReplicationState> {
        self.peer(peer).map(|p| p.verify.shown(p.replication))
    }
    pub fn peer_disk_state(&self, peer: NodeId) -> Option<DiskState> {
        self.peer(peer).map(|p| p.disk)
    }
    /// The role the peer last announced (`Unknown` while not connected).
    pub fn peer_role(&self, peer: NodeId) -> Option<Role> {
        self.peer(peer).map(|p| p.role)
    }
    /// The driver should hold (or keep trying to establish) a transport to this peer.
    pub fn wants_connection(&self, peer: NodeId) -> bool {
        self.peer(peer).is_some_and(|p| p.connection != ConnectionState::StandAlone)
            && (self.disk != DiskState::Diskless
                || self.config.quorum.diskless
                || self.diskless.detached)
    }
    /// Internal queue lengths, for diagnostics.
    pub fn debug_summary(&self) -> String {
        format!(
            "ios={} writes={} queued={} reads={} flushes={} tl={} fence={:#x} demote_pending={} al={:?} peer_writes={} al_refs={:?} first_queued={:?} al_extents={}",
            self.ios.len(),
            self.app_writes.len(),
            self.queued_writes.len(),
            self.app_reads,
            self.app_flushes.len(),
            self.transfer_log.len(),
            self.fence_pending,
            self.demote_pending,
            self.al_order,
            self.peer_writes.len(),
            self.al_refs,
            self.queued_writes
                .front()
                .map(|id| (self.app_writes[id].first, self.app_writes[id].blocks)),
            self.config.al_extents
        )
    }

    /// Nothing in flight: no local I/O, no queued peer frames, nothing awaiting stability.
    pub fn is_quiescent(&self) -> bool {
        self.ios.is_empty()
            && self.transfer_log.is_empty()
            && self.queued_writes.is_empty()
            && self.peers.iter().all(|p| p.queue.is_empty() && p.reorder.is_empty())
    }
    pub fn fence_pending(&self, peer: NodeId) -> bool {
        self.fence_pending & peer.bit() != 0
    }
    pub fn is_replicating_to(&self, peer: NodeId) -> bool {
        self.peer(peer).is_some_and(Peer::replicating)
    }
    pub fn out_of_sync_blocks(&self, peer: NodeId) -> u64 {
        self.meta.bitmaps[peer.index()].count()
    }
    /// Application requests accepted and not yet completed.
    pub fn requests_in_flight(&self) -> usize {
        self.app_writes.len() + self.app_reads + self.app_flushes.len()
    }
    pub fn resync_progress(&self, peer: NodeId) -> Option<ResyncProgress> {
        let p = self.peer(peer)?;
        let r = p.resync.as_ref()?;
        let remaining = self.meta.bitmaps[peer.index()].count();
        let elapsed_ms = self.now_ms.saturating_sub(r.started_ms).max(1);
        let rate = kib(r.acked_blocks_total) * 1000 / elapsed_ms;
        Some(ResyncProgress {
            blocks_total: r.blocks_total,
            blocks_remaining: remaining,
            rate_kib_per_s: rate,
            eta_s: (rate > 0).then(|| kib(remaining) / rate),
        })
    }

    // ----- outputs -----

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When `handle_timeout` wants to be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut deadline: Option<u64> = None;
        let mut consider = |t: u64| deadline = Some(deadline.map_or(t, |d| d.min(t)));
        for p in &self.peers {
            if p.connection == ConnectionState::Connected {
                consider(p.last_received_ms + PING_TIMEOUT_MS);
                consider(p.last_sent_ms + PING_INTERVAL_MS);
                if let Some(h) = &p.handshake {
                    consider(h.started_ms + HANDSHAKE_TIMEOUT_MS);
                }
                if let Some(r) = &p.resync {
                    consider(r.last_step_ms + RESYNC_STEP_MS);
                }
                if let Some(t) = p.verify.deadline_ms() {
                    consider(t);
                }
            }
        }
        if !self.transfer_log.is_empty() {
            consider(self.last_barrier_ms + BARRIER_INTERVAL_MS);
        }
        if let Some(t) = self.quorum_next_deadline() {
            consider(t);
        }
        if let Some(t) = self.promote_next_deadline() {
            consider(t);
        }
        deadline
    }

    fn emit(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    fn persist(&mut self, update: MetaUpdate) {
        self.meta.apply(&update);
        if self.diskless.detached {
            return; // no disk to persist to (see `diskless`)
        }
        self.outputs.push_back(Output::Persist(update));
    }

    fn persist_flags(&mut self, change: impl FnOnce(&mut crate::protocol::persist::MetaFlags)) {
        let mut flags = self.meta.flags.clone();
        change(&mut flags);
        if flags != self.meta.flags {
            self.persist(MetaUpdate::Flags(flags));
        }
    }

    fn set_disk(&mut self, disk: DiskState) {
        if self.disk != disk {
            self.disk = disk;
            self.emit(Event::DiskStateChanged(disk));
            let persisted = match disk {
                DiskState::UpToDate | DiskState::Consistent => Some(PersistedDisk::UpToDate),
                DiskState::Outdated => Some(PersistedDisk::Outdated),
                DiskState::Inconsistent | DiskState::Failed | DiskState::Diskless => {
                    Some(PersistedDisk::Inconsistent)
                }
                _ => None,
            };
            if let Some(persisted) = persisted {
                self.persist_flags(|f| f.disk = persisted);
            }
            self.broadcast_state();
        }
    }

    fn broadcast_state(&mut self) {
        let (role, disk) = (self.role, self.disk);
        for i in 0..self.peers.len() {
            if self.peers[i].connection == ConnectionState::Connected
                && self.peers[i].handshake.is_none()
            {
                self.send(i, Frame::State { role, disk });
            }
        }
    }

    /// Records peer `i`'s role as its State frame or handshake tells it, and lets the hooks
    /// that depend on who is primary react (a verify between mesh secondaries ends when a
    /// primary appears).
    pub(super) fn set_peer_role(&mut self, i: usize, role: Role) {
        self.peers[i].role = role;
        self.verify_peer_role_known();
    }

    fn set_peer_disk(&mut self, i: usize, disk: DiskState) {
        let peer = self.peers[i].id;
        if disk == DiskState::UpToDate {
            // A peer we know to be UpToDate must be fenced again before we write without it.
            self.persist_flags(|f| f.peer_outdated &= !peer.bit());
        }
        if self.peers[i].disk != disk {
            self.diskless_peer_disk_changed(i, self.peers[i].disk, disk);
            self.peers[i].disk = disk;
            self.emit(Event::PeerDiskStateChanged { peer, state: disk });
        }
    }

    fn set_replication(&mut self, i: usize, state: ReplicationState) {
        if self.peers[i].replication != state {
            self.peers[i].replication = state;
            let peer = self.peers[i].id;
            self.emit(Event::ReplicationStateChanged { peer, state });
        }
    }

    fn set_connection(&mut self, i: usize, state: ConnectionState) {
        if self.peers[i].connection != state {
            self.peers[i].connection = state;
            let peer = self.peers[i].id;
            self.emit(Event::ConnectionStateChanged { peer, state });
        }
    }

    fn send(&mut self, i: usize, frame: Frame) {
        let p = &mut self.peers[i];
        assert_eq!(p.connection, ConnectionState::Connected);
        let envelope = Envelope { conn_id: p.conn_id, seq: p.send_seq, frame };
        p.send_seq += 1;
        p.last_sent_ms = self.now_ms;
        let frame = frame::encode_parts(&envelope);
        let peer = p.id;
        self.outputs.push_back(Output::Transmit { peer, frame });
    }

    fn submit(&mut self, op: DiskOp, purpose: IoPurpose) -> u64 {
        if let DiskOp::Write { offset_blocks, data, .. } = &op {
            self.note_write_submitted(*offset_blocks, blocks_of(data.len()).unwrap_or(0));
        }
        let id = self.next_io;
        self.next_io += 1;
        self.ios.insert(id, purpose);
        self.outputs.push_back(Output::DiskIo { id: IoId(id), op });
        id
    }

    fn fresh_uuid(&mut self) -> u64 {
        // splitmix64: deterministic from the configured seed.
        self.random = self.random.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.random;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        uuid::fresh_uuid(z ^ (z >> 31))
    }

    fn advance(&mut self, now_ms: u64) {
        // A clock that goes backwards is a driver bug; never let it reorder timers.
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Marks blocks out of sync for a peer, starting a new generation first if that peer was
    /// not being tracked yet (so the UUIDs tell on reconnect that we hold newer data).
    fn mark_out_of_sync(&mut self, peer: NodeId, first: u64, blocks: u64) {
        if self.is_diskless_peer(peer) {
            return;
        }
        if self.meta.uuids.bitmap_uuid(peer) == 0 && self.quorum_generation_now(peer) {
            self.new_generation_for(peer);
        }
        self.set_out_of_sync_bits(peer, first, blocks);
    }

    /// Marks, for a peer just lost, a write sent to it that it has not confirmed stable (no
    /// barrier ack): it confirmed the write, or its protocol (A, B) let us acknowledge it, but
    /// a power loss may still take it. This node did not write without the peer, so with two
    /// diskful nodes no generation starts for it: as DRBD 9 (`NEW_CUR_UUID`, made when the first
    /// write is submitted after the loss), the first write the peer misses starts one, and a
    /// write still waiting for the peer's ack is such a write (`mark_out_of_sync`). Started
    /// here, the generation forked from the one the peer started when promoted, a split brain
    /// on reconnect although this node held nothing the peer lacked (two-node seed 9204: a
    /// primary whose demotion waited for its last barrier ack lost the peer). Within one
    /// generation the bits alone make this node the source (`decide_with_disks`). The mesh
    /// tracks what is in doubt on its own (`mesh_peer_lost`) and keeps its rules.
    fn mark_in_doubt(&mut self, peer: NodeId, first: u64, blocks: u64) {
        if self.mesh_enabled() {
            self.mark_out_of_sync(peer, first, blocks);
        } else if !self.is_diskless_peer(peer) {
            self.set_out_of_sync_bits(peer, first, blocks);
        }
    }

    fn set_out_of_sync_bits(&mut self, peer: NodeId, first: u64, blocks: u64) {
        if !(first..first + blocks).all(|b| self.meta.bitmaps[peer.index()].test(b)) {
            self.persist(MetaUpdate::BitmapSet { peer, first_block: first, blocks });
        }
    }

    /// Starts a new data generation in which `peer` (and every peer not replicating) is
    /// tracked by its bitmap.
    fn new_generation_for(&mut self, peer: NodeId) {
        let fresh = self.fresh_uuid();
        let mut uuids = self.meta.uuids.clone();
        let untracked: Vec<NodeId> =
            self.peers.iter().filter(|p| !p.replicating()).map(|p| p.id).chain([peer]).collect();
        uuids.new_current(fresh, untracked.iter().copied());
        for id in untracked {
            let lost_as_primary = self
                .peer(id)
                .is_some_and(|p| p.primary_at_loss || p.connection == ConnectionState::Connected);
            if self.role == Role::Primary && lost_as_primary {
                uuids.set_primary_at_split(id);
            }
        }
        self.persist(MetaUpdate::Uuids(uuids));
    }

    // ----- application requests -----

    pub fn handle_request(&mut self, now_ms: u64, request: RequestId, req: AppRequest) {
        self.advance(now_ms);
        let result = self.accept_request(request, req);
        if let Err(error) = result {
            self.outputs.push_back(Output::Complete { request, result: Err(error) });
        }
        self.pump();
    }

    fn check_range(&self, offset_blocks: u64, blocks: u64) -> Result<(), RequestError> {
        let end = offset_blocks.checked_add(blocks);
        if blocks == 0
            || blocks > REQUEST_BLOCKS_MAX
            || end.is_none_or(|e| e > self.meta.size_blocks)
        {
            return Err(RequestError::InvalidRange { offset_blocks, blocks });
        }
        Ok(())
    }

    fn accept_request(&mut self, request: RequestId, req: AppRequest) -> Result<(), RequestError> {
        if self.role != Role::Primary || self.demote_pending {
            return Err(RequestError::NotPrimary);
        }
        if self.quorum_fails_io() {
            return Err(RequestError::NoQuorum);
        }
        if self.disk != DiskState::UpToDate && !self.diskless_can_serve() {
            return Err(RequestError::NoUpToDateData);
        }
        if self.requests_in_flight() >= APP_REQUESTS_MAX {
            return Err(RequestError::Busy);
        }
        match req {
            AppRequest::Read { offset_blocks, blocks } => {
                self.check_range(offset_blocks, blocks)?;
                if self.is_diskless() {
                    self.diskless_read(request, offset_blocks, blocks);
                    return Ok(());
                }
                self.app_reads += 1;
                let purpose = IoPurpose::AppRead { request, first: offset_blocks, blocks };
                self.submit(DiskOp::Read { offset_blocks, blocks }, purpose);
            }
            AppRequest::Write { offset_blocks, data, fua } => {
                let blocks = blocks_of(data.len()).ok_or(RequestError::Misaligned(data.len()))?;
                self.check_range(offset_blocks, blocks)?;
                self.queue_write(request, offset_blocks, data, fua);
            }
            AppRequest::Discard { offset_blocks, blocks } => {
                self.check_range(offset_blocks, blocks)?;
                let len =
                    usize::try_from(blocks * BLOCK_SIZE_BYTES).map_err(|_| RequestError::Busy)?;
                self.queue_write(request, offset_blocks, Bytes::from(vec![0; len]), false);
            }
            AppRequest::WriteAtomic { offset_blocks, data, fua } => {
                self.accept_atomic_write(request, offset_blocks, data, fua)?;
            }
            AppRequest::Flush => {
                if self.app_flushes.len() >= BARRIERS_MAX {
                    return Err(RequestError::Busy);
                }
                self.start_barrier(Some(request));
            }
        }
        Ok(())
    }

    fn queue_write(&mut self, request: RequestId, first: u64, data: Bytes, fua: bool) {
        let blocks = blocks_of(data.len()).expect("validated");
        let id = self.next_write;
        self.next_write += 1;
        self.app_writes.insert(
            id,
            AppWrite {
                request,
                first,
                blocks,
                data,
                fua,
                submitted: false,
                local: LocalState::Pending,
                waiting: 0,
                tl: 0,
                atomic: false,
                acked_by: 0,
                remote_only: false,
            },
        );
        self.queued_writes.push_back(id);
        self.last_app_write_ms = self.now_ms;
    }

    /// Whether a new write to the range must wait for something already in flight.
    fn write_conflicts(&self, first: u64, blocks: u64) -> bool {
        // One pass: a submitted write not yet done locally or not yet acknowledged everywhere.
        self.app_writes.values().any(|w| {
            w.submitted
                && (w.local == LocalState::Pending || w.waiting != 0)
                && overlaps(w.first, w.blocks, first, blocks)
        }) || self.peer_writes.values().any(|(f, b)| overlaps(*f, *b, first, blocks))
            || self.diskless_read_in_flight(first, blocks)
            || self.peers.iter().any(|p| {
                p.resync.as_ref().is_some_and(|r| {
                    r.in_flight
                        .values()
                        .any(|(f, b, sent, _)| !sent && overlaps(*f, *b, first, blocks))
                })
            })
    }

    fn extents_of(first: u64, blocks: u64) -> Vec<u64> {
        let a = first / AL_EXTENT_BLOCKS;
        let b = (first + blocks - 1) / AL_EXTENT_BLOCKS;
        if a == b { vec![a] } else { vec![a, b] }
    }

    /// Makes the extents hot, evicting idle ones; false when the log is full of busy extents.
    fn activate_extents(&mut self, extents: &[u64]) -> bool {
        let missing: Vec<u64> =
            extents.iter().copied().filter(|e| !self.al_order.contains(e)).collect();
        let mut removed = Vec::new();
        while self.al_order.len() - removed.len() + missing.len() > self.config.al_extents {
            let victim = self.al_order.iter().copied().find(|e| {
                !removed.contains(e)
                    && !extents.contains(e)
                    && self.al_refs.get(e).copied().unwrap_or(0) == 0
            });
            match victim {
                Some(v) => removed.push(v),
                None => return false,
            }
        }
        for e in extents {
            self.al_order.retain(|x| x != e);
            self.al_order.push_back(*e);
        }
        self.al_order.retain(|e| !removed.contains(e));
        if !missing.is_empty() || !removed.is_empty() {
            self.persist(MetaUpdate::ActivityLog { added: missing, removed });
        }
        true
    }

    fn al_ref(&mut self, first: u64, blocks: u64, delta: i32) {
        for e in Self::extents_of(first, blocks) {
            let count = self.al_refs.entry(e).or_insert(0);
            *count = count.checked_add_signed(delta).expect("AL refcount never negative");
            if *count == 0 {
                self.al_refs.remove(&e);
            }
        }
    }

    fn handshake_in_progress(&self) -> bool {
        self.peers.iter().any(|p| p.handshake.is_some())
    }

    /// Starts every queued write that may start, in order.
    fn start_queued_writes(&mut self) {
        if self.handshake_in_progress() || self.fence_pending != 0 || self.quorum_holds_io() {
            return;
        }
        if (self.config.fencing.freezes() || self.config.quorum.enabled())
            && !self.queued_writes.is_empty()
        {
            // A peer we cannot reach may still be promoted with UpToDate data: have it fenced
            // before any write it misses is acknowledged.
            for i in 0..self.peers.len() {
                let p = &self.peers[i];
                if !p.replicating()
                    && self.meta.flags.peer_outdated & p.id.bit() == 0
                    && !self.is_diskless_peer(p.id)
                    && !self.ahead_of_connected(i)
                {
                    self.start_fence(i);
                }
            }
            if self.fence_pending != 0 {
                return;
            }
        }
        let mut blocked: Vec<(u64, u64)> = Vec::new();
        let queued: Vec<u64> = self.queued_writes.iter().copied().collect();
        for id in queued {
            let (first, blocks) = {
                let w = &self.app_writes[&id];
                (w.first, w.blocks)
            };
            if blocked.iter().any(|(f, b)| overlaps(*f, *b, first, blocks))
                || self.write_conflicts(first, blocks)
            {
                blocked.push((first, blocks));
                continue;
            }
            if self.transfer_log.len() >= TRANSFER_LOG_ENTRIES_MAX {
                break;
            }
            if !self.is_diskless() && !self.activate_extents(&Self::extents_of(first, blocks)) {
                // Every hot extent is busy: close an epoch so the transfer log drains.
                if self.last_barrier_ms + BARRIER_INTERVAL_MS / 4 <= self.now_ms {
                    self.start_barrier(None);
                }
                break;
            }
            self.queued_writes.retain(|x| *x != id);
            self.submit_write(id);
        }
    }

    fn submit_write(&mut self, id: u64) {
        if self.is_diskless() {
            self.diskless_submit_write(id);
            return;
        }
        let (first, blocks, fua, atomic) = {
            let w = &self.app_writes[&id];
            (w.first, w.blocks, w.fua, w.atomic)
        };
        self.ahead_check_congestion(blocks);
        let unreached: Vec<NodeId> =
            self.peers.iter().filter(|p| !p.replicating()).map(|p| p.id).collect();
        for peer in unreached {
            self.mark_out_of_sync(peer, first, blocks);
        }
        let tl = self.next_tl;
        self.next_tl += 1;
        let mut tl_peers = Vec::new();
        let mut waiting = 0u64;
        let mut tl_peer_bits = 0u64;
        for i in 0..self.peers.len() {
            if self.peers[i].replicating() {
                let p = &self.peers[i];
                tl_peers.push((p.id, p.epoch));
                tl_peer_bits |= p.id.bit();
                if self.config.protocol != ReplicationProtocol::A {
                    waiting |= p.id.bit();
                }
            }
        }
        self.transfer_log.insert(
            tl,
            TlEntry {
                first,
                blocks,
                resync: false,
                local_done: false,
                local_stable: false,
                flush_generation: None,
                peers: tl_peers,
            },
        );
        self.al_ref(first, blocks, 1);
        let data = {
            let w = self.app_writes.get_mut(&id).expect("queued write exists");
            w.submitted = true;
            w.waiting = waiting;
            w.tl = tl;
            if self.config.protocol == ReplicationProtocol::A {
                w.acked_by = tl_peer_bits;
            }
            w.data.clone()
        };
        self.mesh_announce();
        for i in 0..self.peers.len() {
            if self.peers[i].replicating() {
                self.send(i, atomic::data_frame(id, first, fua, data.clone(), atomic));
            }
        }
        self.submit(
            DiskOp::Write {
                offset_blocks: first,
                data,
                fua,
                origin: WriteOrigin::Application,
                atomic,
            },
            IoPurpose::AppWrite { write: id },
        );
    }

    fn try_complete_writes(&mut self) {
        if (self.fence_pending != 0 && !self.quorum_fails_io()) || self.quorum_holds_io() {
            // The candidates stay recorded: they complete once the fence is settled or quorum
            // is back.
            return;
        }
        self.quorum_deferred_generation();
        for id in self.completion_candidates.take_writes() {
            if !self.app_writes.get(&id).is_some_and(AppWrite::completable) {
                continue;
            }
            let w = self.app_writes.remove(&id).expect("checked");
            let result = if self.lost_to_peer() {
                // A peer was promoted while this write was frozen: it may lack the write.
                Err(RequestError::NoUpToDateData)
            } else if self.quorum_fails_request(w.request) {
                Err(RequestError::NoQuorum)
            } else if w.local == LocalState::Done && Self::diskless_write_ok(&w) {
                Ok(None)
            } else {
                // Detached since the local write finished: that copy is discarded (the disk
                // is fully resynced on attach), and the peers waited for may have been lost
                // rather than have acknowledged it. Failed means "may or may not have landed".
                Err(RequestError::Io)
            };
            self.outputs.push_back(Output::Complete { request: w.request, result });
        }
    }

    /// A full pass over the writes and the transfer log, on timer ticks only: records anything
    /// completable or collectable that no change recorded. Every change in this file records
    /// its ids, so in debug builds (the simulator's tests) a miss is a bug and panics; in
    /// release a miss costs latency, never safety, so it is only mended here.
    fn sweep_completion_candidates(&mut self) {
        for (id, w) in &self.app_writes {
            if w.completable() && !self.completion_candidates.has_write(*id) {
                debug_assert!(false, "write {id} completable but not recorded");
                self.completion_candidates.write(*id);
            }
        }
        for (id, entry) in &self.transfer_log {
            if entry.collectable() && !self.completion_candidates.has_transfer_log(*id) {
                debug_assert!(false, "transfer-log entry {id} collectable but not recorded");
                self.completion_candidates.transfer_log(*id);
            }
        }
    }

    /// A primary whose disk is Outdated outdated itself on fence-peer exit code 6: another
    /// node is primary with data it may lack, so it acknowledges nothing any more.
    fn lost_to_peer(&self) -> bool {
        self.role == Role::Primary && self.disk == DiskState::Outdated
    }

    /// Completes reads held while a fence was pending, once none is.
    fn release_held_reads(&mut self) {
        if (self.fence_pending != 0 && !self.quorum_fails_io()) || self.quorum_holds_io() {
            return;
        }
        for (request, data) in std::mem::take(&mut self.held_reads) {
            self.app_reads -= 1;
            let result = if self.lost_to_peer() {
                Err(RequestError::NoUpToDateData)
            } else if self.quorum_fails_request(request) {
                Err(RequestError::NoQuorum)
            } else if self.disk == DiskState::Diskless {
                // Held, then detached: as a read finishing after the detach.
                Err(RequestError::Io)
            } else {
                Ok(Some(data))
            };
            self.outputs.push_back(Output::Complete { request, result });
        }
    }

    // ----- barriers, flushes, transfer log -----

    /// Closes the current epoch everywhere: a local flush and a Barrier to every replicating
    /// peer. With `request`, that application flush completes when all of it is done.
    fn start_barrier(&mut self, request: Option<RequestId>) {
        self.last_barrier_ms = self.now_ms;
        let generation = if self.disk.has_data() || self.disk == DiskState::Inconsistent {
            let generation = self.flush_generation_next;
            self.flush_generation_next += 1;
            for entry in self.transfer_log.values_mut() {
                if entry.local_done && !entry.local_stable && entry.flush_generation.is_none() {
                    entry.flush_generation = Some(generation);
                }
            }
            self.submit(DiskOp::Flush, IoPurpose::LocalFlush { generation });
            Some(generation)
        } else {
            None
        };
        let mut peers = Vec::new();
        for i in 0..self.peers.len() {
            if self.peers[i].replicating() {
                let epoch = self.peers[i].epoch;
                self.peers[i].epoch += 1;
                peers.push((self.peers[i].id, self.peers[i].conn_id, epoch));
                self.send(i, Frame::Barrier { epoch });
            }
        }
        if let Some(request) = request {
            // Diskless, the flush is the peers' (at least one of them).
            let failed = generation.is_none() && (!self.is_diskless() || peers.is_empty());
            self.app_flushes.push(AppFlush { request, generation, peers, failed });
        }
    }

    fn collect_transfer_log(&mut self) {
        for id in self.completion_candidates.take_transfer_log() {
            if !self.transfer_log.get(&id).is_some_and(TlEntry::collectable) {
                continue;
            }
            let entry = self.transfer_log.remove(&id).expect("checked");
            if !entry.resync {
                self.al_ref(entry.first, entry.blocks, -1);
                self.mesh_collected(entry.first, entry.blocks);
            }
        }
    }

    fn try_complete_flushes(&mut self) {
        if (self.fence_pending != 0 && !self.quorum_fails_io())
            || self.quorum_holds_io()
            || self.ahead_holds_flushes()
        {
            return;
        }
        let mut i = 0;
        while i < self.app_flushes.len() {
            let f = &self.app_flushes[i];
            let local_done =
                f.failed || f.generation.is_none_or(|g| g <= self.flush_generation_done);
            let peers_done = f.peers.iter().all(|(peer, conn_id, epoch)| {
                self.peer(*peer).is_none_or(|p| p.conn_id != *conn_id || p.epoch_acked(*epoch))
            });
            if local_done && peers_done {
                let f = self.app_flushes.remove(i);
                let result = if self.lost_to_peer() {
                    Err(RequestError::NoUpToDateData)
                } else if self.quorum_fails_request(f.request) {
                    Err(RequestError::NoQuorum)
                } else if f.failed || self.diskless_flush_reached_nobody(f.generation, &f.peers) {
                    Err(RequestError::Io)
                } else {
                    Ok(None)
                };
                self.outputs.push_back(Output::Complete { request: f.request, result });
            } else {
                i += 1;
            }
        }
    }

    // ----- local I/O completions -----

    pub fn handle_disk_completion(
        &mut self,
        now_ms: u64,
        id: IoId,
        result: Result<Option<Vec<u8>>, IoFailed>,
    ) {
        self.advance(now_ms);
        let Some(purpose) = self.ios.remove(&id.0) else {
            // Completions of I/O the driver made up are a driver bug, not a peer's fault.
            panic!("completion for unknown I/O {id:?}");
        };
        match purpose {
            IoPurpose::AppRead { request, first, blocks } => {
                // A read that finishes after the disk was detached is not served from that
                // disk (no longer ours, and a detached primary holds nothing): it is retried
                // through a peer, or fails.
                let detached = self.disk == DiskState::Diskless;
                let result = match result {
                    Ok(Some(data))
                        if !detached
                            && (self.fence_pending != 0 || self.quorum_holds_read(request)) =>
                    {
                        // Still counted in app_reads: it completes when the fence is settled.
                        self.held_reads.push((request, data));
                        self.pump();
                        return;
                    }
                    Ok(Some(data)) if !detached => Ok(Some(data)),
                    _ => {
                        if self.diskless_local_read_failed(request, first, blocks) {
                            // Retried through a peer, still counted in app_reads.
                            self.pump();
                            return;
                        }
                        Err(RequestError::Io)
                    }
                };
                self.app_reads -= 1;
                self.outputs.push_back(Output::Complete { request, result });
            }
            IoPurpose::AppWrite { write } => {
                let ok = result.is_ok();
                let Some(w) = self.app_writes.get_mut(&write) else {
                    // Completed through the peers after a detach: the local result is moot.
                    assert!(self.diskless.detached, "app write {write} in flight");
                    self.pump();
                    return;
                };
                self.completion_candidates.write(write);
                if !w.remote_only {
                    // (A detached node's writes complete through its peers: the disk is moot.)
                    w.local = if ok { LocalState::Done } else { LocalState::Failed };
                    let (tl, fua, first, blocks) = (w.tl, w.fua, w.first, w.blocks);
                    if let Some(entry) = self.transfer_log.get_mut(&tl) {
                        entry.local_done = true;
                        entry.local_stable = fua || !ok;
                        self.completion_candidates.transfer_log(tl);
                    }
                    if !ok {
                        self.diskless_local_write_failed(first, blocks);
                    }
                }
            }
            IoPurpose::LocalFlush { generation } => {
                if result.is_ok() {
                    self.flush_generation_done = self.flush_generation_done.max(generation);
                    for (id, entry) in self.transfer_log.iter_mut() {
                        if entry.flush_generation.is_some_and(|g| g <= generation) {
                            entry.local_stable = true;
                            self.completion_candidates.transfer_log(*id);
                        }
                    }
                } else {
                    for f in &mut self.app_flushes {
                        if f.generation == Some(generation) {
                            f.failed = true;
                        }
                    }
                    if self.config.on_io_error == OnIoError::Detach {
                        self.detach();
                    }
                }
            }
            IoPurpose::PeerWrite { peer, conn_id, id, resync } => {
                self.peer_writes.remove(&id_key(peer, conn_id, id, resync));
                let i = self.peer_index(peer).expect("configured peer");
                let current = self.peers[i].conn_id == conn_id
                    && self.peers[i].connection == ConnectionState::Connected;
                if current {
                    self.peers[i].writes_in_flight -= 1;
                    let frame = match (resync, result.is_ok()) {
                        (true, ok) => Some(Frame::ResyncAck { id, ok }),
                        (false, false) => Some(Frame::NegAck { id }),
                        (false, true) if self.config.protocol == ReplicationProtocol::C => {
                            Some(Frame::WriteAck { id })
                        }
                        (false, true) => None,
                    };
                    if let Some(frame) = frame {
                        self.send(i, frame);
                    }
                }
                if result.is_err() && self.config.on_io_error == OnIoError::Detach {
                    self.detach();
                }
            }
            IoPurpose::PeerFlush { peer, conn_id, epoch } => {
                let i = self.peer_index(peer).expect("configured peer");
                if result.is_err() {
                    self.local_io_failed_internally();
                } else if self.peers[i].conn_id == conn_id
                    && self.peers[i].connection == ConnectionState::Connected
                {
                    self.peers[i].barrier_in_flight = false;
                    self.send(i, Frame::BarrierAck { epoch });
                }
            }
            IoPurpose::ResyncRead { peer, conn_id, id } => {
                let i = self.peer_index(peer).expect("configured peer");
                let current = self.peers[i].conn_id == conn_id
                    && self.peers[i].connection == ConnectionState::Connected;
                match result {
                    Ok(Some(data)) if current => {
                        let epoch = self.peers[i].epoch;
                        let first = self.peers[i]
                            .resync
                            .as_mut()
                            .and_then(|r| r.in_flight.get_mut(&id))
                            .map(|entry| {
                                entry.2 = true;
                                entry.3 = epoch;
                                entry.0
                            });
                        if let Some(first) = first {
                            self.send(i, Frame::ResyncData { id, offset_blocks: first, data });
                        }
                    }
                    Ok(_) => {}
                    Err(IoFailed) => self.local_io_failed_internally(),
                }
            }
            IoPurpose::Digest(read) => self.handle_digest_read(read, result),
            IoPurpose::RemoteRead { peer, conn_id, id } => {
                self.handle_remote_read_done(peer, conn_id, id, result);
            }
        }
        self.pump();
    }

    /// The local disk failed (or `drbdadm detach`): go on diskless through the peers.
    fn detach(&mut self) {
        self.go_diskless();
    }

    // ----- connections -----

    /// The driver established a transport to `peer`; both ends use the same `conn_id`.
    pub fn handle_connected(&mut self, now_ms: u64, peer: NodeId, conn_id: u64) {
        self.advance(now_ms);
        let Some(i) = self.peer_index(peer) else { return };
        if !self.wants_connection(peer) {
            self.outputs.push_back(Output::Disconnect { peer, conn_id });
            return;
        }
        if self.peers[i].connection == ConnectionState::Connected {
            self.disconnect(i, ConnectionState::Connecting);
        }
        let p = &mut self.peers[i];
        p.conn_id = conn_id;
        p.send_seq = 0;
        p.recv_seq = 0;
        p.reorder.clear();
        p.last_received_ms = self.now_ms;
        p.epoch = 1;
        p.acked_epoch = 0;
        p.queue.clear();
        p.writes_in_flight = 0;
        p.barrier_in_flight = false;
        self.mesh_handshake_starts(i);
        let sent = SplitBrainSide {
            node_id: self.id,
            role: self.role,
            changed_blocks: self.meta.bitmaps[peer.index()].count(),
            primary_at_split: self.meta.uuids.primary_at_split(peer),
        };
        let p = &mut self.peers[i];
        p.handshake = Some(Handshake {
            started_ms: self.now_ms,
            hello: None,
            bitmap: Bitmap::new(self.meta.size_blocks),
            done: false,
            sent,
        });
        self.set_connection(i, ConnectionState::Connected);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            node_id: self.id,
            size_blocks: self.meta.size_blocks,
            protocol: self.config.protocol.to_wire(),
            role: self.role,
            disk: self.disk,
            crashed_primary: self.meta.flags.crashed_primary,
            discard_my_data: self.peers[i].discard_my_data,
            full_sync_required: self.meta.flags.full_sync_required,
            uuids: self.meta.uuids.clone(),
            after_sb: self.config.after_sb,
        };
        self.send(i, Frame::Hello(hello));
        self.mesh_hello_sent(i);
        let words = self.meta.bitmaps[peer.index()].words().to_vec();
        for (n, chunk) in words.chunks(BITMAP_CHUNK_WORDS_MAX).enumerate() {
            if chunk.iter().any(|w| *w != 0) {
                let word_offset = (n * BITMAP_CHUNK_WORDS_MAX) as u64;
                self.send(i, Frame::BitmapChunk { word_offset, words: chunk.to_vec() });
            }
        }
        self.send(i, Frame::HandshakeDone);
        self.pump();
    }

    /// The transport to `peer` broke (reset, EOF, timeout seen by the driver).
    pub fn handle_transport_closed(&mut self, now_ms: u64, peer: NodeId, conn_id: u64) {
        self.advance(now_ms);
        let Some(i) = self.peer_index(peer) else { return };
        if self.peers[i].conn_id == conn_id
            && self.peers[i].connection == ConnectionState::Connected
        {
            self.disconnect(i, ConnectionState::Connecting);
        }
        self.pump();
    }

    /// `drbdadm connect [--discard-my-data]`.
    pub fn handle_connect(
        &mut self,
        now_ms: u64,
        peer: NodeId,
        discard_my_data: bool,
    ) -> Result<(), StateError> {
        self.advance(now_ms);
        let i = self.peer_index(peer).ok_or(StateError::UnknownPeer(peer))?;
        if self.peers[i].connection == ConnectionState::StandAlone {
            self.peers[i].discard_my_data = discard_my_data;
            self.set_connection(i, ConnectionState::Connecting);
        }
        Ok(())
    }

    /// `drbdadm disconnect`.
    pub fn handle_disconnect(&mut self, now_ms: u64, peer: NodeId) -> Result<(), StateError> {
        self.advance(now_ms);
        let i = self.peer_index(peer).ok_or(StateError::UnknownPeer(peer))?;
        if self.peers[i].connection == ConnectionState::Connected {
            self.disconnect(i, ConnectionState::StandAlone);
        } else {
            self.set_connection(i, ConnectionState::StandAlone);
        }
        self.pump();
        Ok(())
    }

    fn disconnect(&mut self, i: usize, next: ConnectionState) {
        let peer = self.peers[i].id;
        if self.peers[i].connection == ConnectionState::Connected {
            self.diskless_connection_lost(i);
        }
        if self.peers[i].connection == ConnectionState::Connected {
            let conn_id = self.peers[i].conn_id;
            self.outputs.push_back(Output::Disconnect { peer, conn_id });
        }
        let was_replicating = self.peers[i].replicating() || self.ahead_unconfirmed(i);
        if self.peers[i].connection == ConnectionState::Connected {
            self.peers[i].primary_at_loss = self.role == Role::Primary;
        }
        let p = &mut self.peers[i];
        p.conn_id = 0;
        p.handshake = None;
        p.queue.clear();
        p.reorder.clear();
        p.writes_in_flight = 0;
        p.barrier_in_flight = false;
        p.resync = None;
        p.role = Role::Unknown;
        self.verify_connection_lost(i);
        self.mesh_peer_lost(i);
        self.set_connection(i, next);
        self.set_replication(i, ReplicationState::Off);
        self.set_peer_disk(i, DiskState::DUnknown);
        // Whatever the peer has not confirmed stable may be missing there.
        let mut marks = Vec::new();
        let mut emptied = Vec::new();
        for (id, entry) in self.transfer_log.iter_mut() {
            if let Some(pos) = entry.peers.iter().position(|(p, _)| *p == peer) {
                entry.peers.remove(pos);
                self.completion_candidates.transfer_log(*id);
                if !entry.resync {
                    marks.push((entry.first, entry.blocks));
                }
            }
            if entry.resync && entry.peers.is_empty() {
                emptied.push(*id);
            }
        }
        for id in emptied {
            self.transfer_log.remove(&id);
        }
        for (first, blocks) in marks {
            self.mark_in_doubt(peer, first, blocks);
        }
        let mut unacked = Vec::new();
        for (id, w) in self.app_writes.iter_mut() {
            if w.waiting & peer.bit() != 0 {
                w.waiting &= !peer.bit();
                self.completion_candidates.write(*id);
                unacked.push((w.first, w.blocks));
            }
        }
        for (first, blocks) in unacked {
            self.mark_out_of_sync(peer, first, blocks);
        }
        if was_replicating
            && self.role == Role::Primary
            && (self.config.fencing.freezes() || self.config.quorum.enabled())
            && self.meta.flags.peer_outdated & peer.bit() == 0
        {
            self.start_fence(i);
        }
    }

    fn start_fence(&mut self, i: usize) {
        let peer = self.peers[i].id;
        if self.disk == DiskState::Diskless && !self.config.quorum.diskless {
            // Detached: we write nothing any more, and outdating the peer would outdate the
            // only good copy. DRBD: "Not fencing peer, I'm not even Consistent myself."
            return;
        }
        if self.fence_pending & peer.bit() == 0 {
            self.fence_pending |= peer.bit();
            self.quorum_fence_started();
            // With quorum alone the fence is settled in-protocol (`quorum_node`).
            if self.config.fencing.freezes() {
                self.emit(Event::FencePeer { peer });
            }
        }
    }

    /// The fence handler's verdict as a yes/no: `outdated` is exit code 4 (the peer's disk is
    /// now Outdated), anything else a broken handler (I/O stays frozen). Kept for drivers that
    /// only know success or failure; `handle_fence_outcome` takes every exit code.
    pub fn handle_fence_result(&mut self, now_ms: u64, peer: NodeId, outdated: bool) {
        let outcome = if outdated { FenceOutcome::PeerOutdated } else { FenceOutcome::Failed };
        self.handle_fence_outcome(now_ms, peer, outcome);
    }

    /// The fence-peer handler for `peer` finished with `outcome` (its exit code).
    pub fn handle_fence_outcome(&mut self, now_ms: u64, peer: NodeId, outcome: FenceOutcome) {
        self.advance(now_ms);
        if self.fence_pending & peer.bit() == 0 {
            return;
        }
        match outcome {
            FenceOutcome::Failed => return,
            // DRBD: "peer unreachable, doing nothing since disk != UpToDate".
            FenceOutcome::PeerUnreachable if self.disk != DiskState::UpToDate => return,
            FenceOutcome::PeerIsPrimary => {
                self.fence_pending &= !peer.bit();
                // "Peer is primary, outdating myself": the frozen requests fail (pump) and
                // new ones are refused for want of UpToDate data; the operator demotes us.
                if self.disk.has_data() {
                    self.set_disk(DiskState::Outdated);
                }
                for id in std::mem::take(&mut self.queued_writes) {
                    let w = self.app_writes.remove(&id).expect("queued");
                    self.outputs.push_back(Output::Complete {
                        request: w.request,
                        result: Err(RequestError::NoUpToDateData),
                    });
                }
            }
            FenceOutcome::PeerInconsistent
            | FenceOutcome::PeerOutdated
            | FenceOutcome::PeerUnreachable
            | FenceOutcome::PeerStonithed => {
                self.fence_pending &= !peer.bit();
                self.persist_flags(|f| f.peer_outdated |= peer.bit());
            }
        }
        self.pump();
    }

    /// `drbdadm outdate`, also what a fence handler does on the peer it fences.
    pub fn handle_outdate(&mut self, now_ms: u64) -> Result<(), StateError> {
        self.advance(now_ms);
        if self.role == Role::Primary {
            return Err(StateError::Already(Role::Primary));
        }
        // As DRBD: a node replicating from a peer is not outdated behind its back (the fence
        // handler of a primary that lost us must fail, and the reconnect settles it).
        if self
            .peers
            .iter()
            .any(|p| p.connection == ConnectionState::Connected && p.handshake.is_none())
        {
            return Err(StateError::Precondition("refusing to be Outdated while Connected"));
        }
        if matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
            self.set_disk(DiskState::Outdated);
        }
        self.mesh_outdated_by_request();
        self.pump();
        Ok(())
    }

    // ----- roles -----

    /// `drbdadm primary [--force]`. With quorum and a connected peer the promotion is
    /// cluster-wide (`promote`): `Promotion::Pending`, and `Event::PromotionFinished` tells
    /// the outcome.
    pub fn handle_promote(&mut self, now_ms: u64, force: bool) -> Result<Promotion, StateError> {
        self.advance(now_ms);
        self.promote_busy()?;
        self.promote_preconditions(force)?;
        if self.promote_ask_peers(force) {
            self.pump();
            return Ok(Promotion::Pending);
        }
        self.become_primary();
        self.pump();
        Ok(Promotion::Done)
    }

    /// The local checks of a promotion, before it starts and again before it commits.
    fn promote_preconditions(&self, force: bool) -> Result<(), StateError> {
        if self.role == Role::Primary {
            return Err(StateError::Already(Role::Primary));
        }
        if let Some(p) = self
            .peers
            .iter()
            .find(|p| p.role == Role::Primary && p.connection == ConnectionState::Connected)
        {
            return Err(StateError::PeerIsPrimary(p.id));
        }
        if self.peers.iter().any(|p| p.replication == ReplicationState::SyncTarget) {
            return Err(StateError::SyncTarget);
        }
        if self.handshake_in_progress() {
            // The peer decides from the role our Hello announced, and its own role is not
            // known yet: promoting now could make two primaries that each take the other for
            // a secondary. DRBD serializes state changes with the handshake the same way.
            return Err(promote::HANDSHAKE_IN_PROGRESS);
        }
        self.quorum_check_promote()?;
        if self.is_diskless() {
            return self.diskless_check_promote();
        }
        let allowed = self.disk == DiskState::UpToDate
            || (force && (self.disk.has_data() || self.disk == DiskState::Inconsistent));
        if !allowed {
            return Err(StateError::NoUpToDateData(self.disk));
        }
        Ok(())
    }

    /// The role change itself, once `promote_preconditions` passed (and the peers granted
    /// it, with quorum); the caller pumps.
    fn become_primary(&mut self) {
        if self.is_diskless() {
            self.diskless_promote();
            return;
        }
        if self.disk != DiskState::UpToDate {
            // Forced: this data becomes the truth. Start a new generation at once (as DRBD does)
            // so that every peer not known to hold the same data is resynced from us, or is
            // reported as split brain if it moved on too; re-handshake connected peers whose
            // data is not UpToDate so that they become our sync targets.
            let fresh = self.fresh_uuid();
            let mut uuids = self.meta.uuids.clone();
            let behind: Vec<NodeId> = self
                .peers
                .iter()
                .filter(|p| !p.replicating() || p.disk != DiskState::UpToDate)
                .filter(|p| !self.config.quorum.is_diskless_peer(p.id))
                .map(|p| p.id)
                .collect();
            uuids.new_current(fresh, behind.iter().copied());
            self.persist(MetaUpdate::Uuids(uuids));
            self.persist_flags(|f| f.full_sync_required = false);
            self.set_disk(DiskState::UpToDate);
            for peer in behind {
                let i = self.peer_index(peer).expect("listed");
                if self.peers[i].connection == ConnectionState::Connected {
                    self.disconnect(i, ConnectionState::Connecting);
                }
            }
        }
        self.persist_flags(|f| f.primary_indicator = true);
        self.role = Role::Primary;
        self.demote_pending = false;
        // A pending `connect --discard-my-data` is dropped, as DRBD's drbd_set_role does:
        // from now on this node acknowledges writes, which a later handshake must not
        // discard because of an order given before them.
        for p in &mut self.peers {
            p.discard_my_data = false;
        }
        self.quorum_promoted();
        self.emit(Event::RoleChanged(Role::Primary));
        self.broadcast_state();
    }

    /// `drbdadm secondary`: refuses new requests at once, finishes (RoleChanged) when every
    /// request completed and every write is stable on all replicas.
    pub fn handle_demote(&mut self, now_ms: u64) -> Result<(), StateError> {
        self.advance(now_ms);
        if self.role != Role::Primary {
            return Err(StateError::Already(self.role));
        }
        self.demote_pending = true;
        if !self.transfer_log.is_empty() {
            self.start_barrier(None);
        }
        self.pump();
        Ok(())
    }

    fn try_finish_demote(&mut self) {
        if self.demote_pending
            && self.requests_in_flight() == 0
            && (self.transfer_log.iter().all(|(_, e)| e.resync) || self.disk == DiskState::Diskless)
            && self.fence_pending == 0
        {
            self.mesh_before_demote();
            self.demote_pending = false;
            self.role = Role::Secondary;
            self.persist_flags(|f| f.primary_indicator = false);
            self.emit(Event::RoleChanged(Role::Secondary));
            self.broadcast_state();
        }
    }

    /// `drbdadm new-current-uuid --clear-bitmap`: declares connected, freshly created replicas
    /// identical (an all-zero new volume) so that no initial sync is needed.
    pub fn handle_new_current_uuid_clear_bitmap(&mut self, now_ms: u64) -> Result<(), StateError> {
        self.advance(now_ms);
        if self.meta.uuids.current != uuid::UUID_JUST_CREATED {
            return Err(StateError::Precondition("only on freshly created metadata"));
        }
        if !self.peers.iter().all(|p| {
            self.is_diskless_peer(p.id)
                || (p.replicating() && p.replication == ReplicationState::Established)
        }) {
            return Err(StateError::Precondition("every peer must be connected and Established"));
        }
        let fresh = self.fresh_uuid();
        let mut uuids = self.meta.uuids.clone();
        uuids.new_current_clear_bitmap(fresh);
        self.persist(MetaUpdate::Uuids(uuids));
        self.persist_flags(|f| f.full_sync_required = false);
        for i in 0..self.peers.len() {
            if self.is_diskless_peer(self.peers[i].id) {
                continue;
            }
            self.send(i, Frame::NewCurrentUuid { uuid: fresh });
            self.set_peer_disk(i, DiskState::UpToDate);
        }
        self.set_disk(DiskState::UpToDate);
        self.pump();
        Ok(())
    }

    // ----- timers -----

    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.advance(now_ms);
        self.sweep_completion_candidates();
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if p.connection != ConnectionState::Connected {
                continue;
            }
            let handshake_late = p
                .handshake
                .as_ref()
                .is_some_and(|h| h.started_ms + HANDSHAKE_TIMEOUT_MS <= self.now_ms);
            if p.last_received_ms + PING_TIMEOUT_MS <= self.now_ms || handshake_late {
                self.disconnect(i, ConnectionState::Connecting);
                continue;
            }
            if p.last_sent_ms + PING_INTERVAL_MS <= self.now_ms {
                self.send(i, Frame::Ping);
            }
        }
        if !self.transfer_log.is_empty()
            && self.last_barrier_ms + BARRIER_INTERVAL_MS <= self.now_ms
        {
            self.start_barrier(None);
        }
        self.resize_poll();
        self.pump();
    }

    // ----- frames -----

    pub fn handle_receive(&mut self, now_ms: u64, peer: NodeId, bytes: &[u8]) {
        self.receive(now_ms, peer, || frame::decode(bytes));
    }

    /// As `handle_receive`, for a frame the driver holds as `Bytes`: a Data payload is kept
    /// as a slice of it, not copied.
    pub fn handle_receive_shared(&mut self, now_ms: u64, peer: NodeId, bytes: &Bytes) {
        self.receive(now_ms, peer, || frame::decode_shared(bytes));
    }

    fn receive(
        &mut self,
        now_ms: u64,
        peer: NodeId,
        decode: impl FnOnce() -> Result<Envelope, frame::FrameError>,
    ) {
        self.advance(now_ms);
        let Some(i) = self.peer_index(peer) else { return };
        if self.peers[i].connection != ConnectionState::Connected {
            return;
        }
        let envelope = match decode() {
            Ok(envelope) => envelope,
            Err(error) => {
                // A frame from an older connection may be damaged too; only the current one
                // counts, but we cannot read the id of a damaged frame, so drop the connection:
                // unacknowledged writes are marked and resynced, nothing bad reaches the disk.
                self.protocol_error(i, format!("bad frame: {error}"));
                self.pump();
                return;
            }
        };
        let p = &mut self.peers[i];
        if envelope.conn_id != p.conn_id {
            return;
        }
        if envelope.seq < p.recv_seq || p.reorder.contains_key(&envelope.seq) {
            return; // a duplicate
        }
        if envelope.seq > p.recv_seq {
            if p.reorder.len() >= REORDER_FRAMES_MAX {
                self.protocol_error(i, "reorder window exceeded".into());
            } else {
                p.reorder.insert(envelope.seq, envelope);
            }
            self.pump();
            return;
        }
        let mut next = Some(envelope);
        while let Some(envelope) = next {
            let conn_id = envelope.conn_id;
            // Only in-order progress counts as life: a gap that never fills must time out.
            self.peers[i].last_received_ms = self.now_ms;
            self.peers[i].recv_seq += 1;
            self.handle_frame(i, envelope.frame);
            let p = &mut self.peers[i];
            if p.conn_id != conn_id || p.connection != ConnectionState::Connected {
                break;
            }
            next = p.reorder.remove(&p.recv_seq);
        }
        self.pump();
    }

    fn protocol_error(&mut self, i: usize, reason: String) {
        let peer = self.peers[i].id;
        self.emit(Event::ProtocolError { peer, reason });
        self.disconnect(i, ConnectionState::Connecting);
    }

    fn handle_frame(&mut self, i: usize, frame: Frame) {
        let peer = self.peers[i].id;
        if self.peers[i].handshake.is_some() {
            self.handle_handshake_frame(i, frame);
            return;
        }
        match frame {
            Frame::Ping => self.send(i, Frame::PingAck),
            Frame::PingAck => {}
            Frame::State { role, disk } => {
                if role == Role::Primary && self.quorum_reject_second_primary(i) {
                    return;
                }
                self.set_peer_role(i, role);
                self.mesh_peer_state(i, role, disk);
                self.set_peer_disk(i, disk);
                self.mesh_gen_target_state(i, disk);
                if matches!(disk, DiskState::Inconsistent | DiskState::Outdated)
                    && !self.mesh_synced_elsewhere(i, disk)
                {
                    // The peer itself says it cannot be promoted (it became our SyncTarget):
                    // losing it needs no fence, and a pending one is settled.
                    let peer = self.peers[i].id;
                    self.persist_flags(|f| f.peer_outdated |= peer.bit());
                    self.fence_pending &= !peer.bit();
                }
                if role == Role::Primary && self.role == Role::Primary {
                    self.protocol_error(i, "two primaries".into());
                }
            }
            Frame::Data { id, offset_blocks, fua, data } => {
                let syncing_or_established = matches!(
                    self.peers[i].replication,
                    ReplicationState::Established
                        | ReplicationState::SyncTarget
                        | ReplicationState::PausedSyncT
                );
                if self.role == Role::Primary || !syncing_or_established {
                    self.protocol_error(i, "unexpected Data".into());
                    return;
                }
                let blocks = blocks_of(data.len()).unwrap_or(0);
                self.mesh_data_received(i, offset_blocks, data.len());
                self.enqueue_incoming(i, id, offset_blocks, data, fua, false);
                if self.peers[i].connection != ConnectionState::Connected {
                    // Refused, and the connection dropped, by enqueue_incoming: no RecvAck
                    // on the closed connection (mesh seed 3554: a write beyond the device of
                    // a peer that had not grown yet).
                    return;
                }
                self.diskless_note_peer_write(i, offset_blocks, blocks);
                if self.receive_ack_wanted(i) {
                    self.send(i, Frame::RecvAck { id });
                }
            }
            Frame::AtomicData { id, offset_blocks, fua, data } => {
                self.handle_atomic_data(i, id, offset_blocks, fua, data);
            }
            Frame::ResyncData { id, offset_blocks, data } => {
                if self.peers[i].replication != ReplicationState::SyncTarget {
                    self.protocol_error(i, "unexpected ResyncData".into());
                    return;
                }
                self.mesh_resync_received(i, offset_blocks, data.len());
                self.enqueue_incoming(i, id, offset_blocks, Bytes::from(data), false, true);
            }
            Frame::Barrier { epoch } => {
                if self.peers[i].queue.len() >= PEER_QUEUE_FRAMES_MAX {
                    self.protocol_error(i, "peer queue overflow".into());
                    return;
                }
                self.peers[i].queue.push_back(Incoming::Barrier { epoch });
            }
            Frame::WriteAck { id } | Frame::RecvAck { id } => {
                let fua_stable = matches!(frame, Frame::WriteAck { .. });
                if let Some(w) = self.app_writes.get_mut(&id) {
                    w.waiting &= !peer.bit();
                    w.acked_by |= peer.bit();
                    self.completion_candidates.write(id);
                    if w.fua && fua_stable {
                        let tl = w.tl;
                        if let Some(entry) = self.transfer_log.get_mut(&tl) {
                            entry.peers.retain(|(p, _)| *p != peer);
                            self.completion_candidates.transfer_log(tl);
                        }
                    }
                }
            }
            Frame::NegAck { id } => {
                if let Some(w) = self.app_writes.get_mut(&id) {
                    w.waiting &= !peer.bit();
                    self.completion_candidates.write(id);
                    let (first, blocks) = (w.first, w.blocks);
                    self.mark_out_of_sync(peer, first, blocks);
                }
            }
            Frame::ResyncAck { id, ok } => self.handle_resync_ack(i, id, ok),
            Frame::BarrierAck { epoch } => self.handle_barrier_ack(i, epoch),
            Frame::ResyncDone { current_uuid } => self.handle_resync_done(i, current_uuid),
            Frame::NewCurrentUuid { uuid } => {
                if self.meta.uuids.current != uuid::UUID_JUST_CREATED || self.role == Role::Primary
                {
                    self.protocol_error(i, "NewCurrentUuid on data with a generation".into());
                    return;
                }
                let mut uuids = self.meta.uuids.clone();
                uuids.new_current_clear_bitmap(uuid);
                self.persist(MetaUpdate::Uuids(uuids));
                self.persist_flags(|f| f.full_sync_required = false);
                self.set_peer_disk(i, DiskState::UpToDate);
                self.set_disk(DiskState::UpToDate);
            }
            Frame::Quorum { primaries, term, outdate, unseen } => {
                self.quorum_handle_frame(i, [primaries, term, outdate, unseen]);
            }
            Frame::Hello(_)
            | Frame::BitmapChunk { .. }
            | Frame::HandshakeDone
            | Frame::UncleanSecondary
            | Frame::HelloHolds => {
                self.protocol_error(i, "handshake frame after the handshake".into());
            }
            frame @ (Frame::VerifyStart { .. }
            | Frame::DigestRequest { .. }
            | Frame::DigestReply { .. }
            | Frame::VerifyResult { .. }
            | Frame::VerifyDone { .. }) => self.handle_digest_frame(i, frame),
            frame @ (Frame::ResizeSizes { .. } | Frame::ResizeCommit { .. }) => {
                self.handle_resize_frame(i, frame);
            }
            frame @ (Frame::Detached { .. }
            | Frame::OutOfSync { .. }
            | Frame::ReadRequest { .. }
            | Frame::ReadReply { .. }
            | Frame::ReadError { .. }) => self.handle_diskless_frame(i, frame),
            frame @ (Frame::MeshTargets { .. }
            | Frame::PeersInSync { .. }
            | Frame::UuidHistory { .. }
            | Frame::ResyncPeersInSync { .. }) => {
                if let Frame::MeshTargets { current_uuid, lost, .. } = frame {
                    self.mesh_gen_targets(i, current_uuid, lost);
                }
                self.mesh_handle_frame(i, frame);
            }
            frame @ (Frame::Ahead | Frame::AheadResync) => self.handle_ahead_frame(i, frame),
            frame @ (Frame::PromoteAsk { .. }
            | Frame::PromoteAnswer { .. }
            | Frame::PromoteEnd { .. }) => self.handle_promote_frame(i, frame),
        }
    }

    fn enqueue_incoming(
        &mut self,
        i: usize,
        id: u64,
        first: u64,
        data: Bytes,
        fua: bool,
        resync: bool,
    ) {
        self.mesh_target_data_arrives(i);
        let valid = blocks_of(data.len()).is_some_and(|b| {
            b <= REQUEST_BLOCKS_MAX
                && first.checked_add(b).is_some_and(|e| e <= self.meta.size_blocks)
        });
        if !valid {
            self.protocol_error(i, "write outside the device".into());
            return;
        }
        if self.peers[i].queue.len() >= PEER_QUEUE_FRAMES_MAX {
            self.protocol_error(i, "peer queue overflow".into());
            return;
        }
        self.peers[i].queue.push_back(Incoming::Write {
            id,
            first,
            data,
            fua,
            resync,
            atomic: false,
        });
    }

    /// Submits queued peer writes in arrival order: a write waits for any earlier overlapping
    /// local write (any connection's), and nothing passes a barrier.
    fn pump_incoming(&mut self, i: usize) {
        if self.disk == DiskState::Diskless {
            return;
        }
        loop {
            let p = &self.peers[i];
            if p.barrier_in_flight {
                return;
            }
            match p.queue.front() {
                None => return,
                Some(Incoming::Barrier { epoch }) => {
                    if p.writes_in_flight > 0 {
                        return;
                    }
                    let (epoch, peer, conn_id) = (*epoch, p.id, p.conn_id);
                    self.peers[i].queue.pop_front();
                    self.peers[i].barrier_in_flight = true;
                    self.submit(DiskOp::Flush, IoPurpose::PeerFlush { peer, conn_id, epoch });
                }
                Some(Incoming::Read { .. }) => {
                    if !self.diskless_pump_read(i) {
                        return;
                    }
                }
                Some(Incoming::Write { first, data, .. }) => {
                    let blocks = blocks_of(data.len()).expect("validated on receipt");
                    let first = *first;
                    if p.writes_in_flight >= PEER_WRITES_IN_FLIGHT_MAX
                        || self.peer_writes.values().any(|(f, b)| overlaps(*f, *b, first, blocks))
                    {
                        return;
                    }
                    let (peer, conn_id) = (p.id, p.conn_id);
                    let Some(Incoming::Write { id, first, data, fua, resync, atomic }) =
                        self.peers[i].queue.pop_front()
                    else {
                        unreachable!("front was a write")
                    };
                    self.peers[i].writes_in_flight += 1;
                    self.peer_writes.insert(id_key(peer, conn_id, id, resync), (first, blocks));
                    let origin = if resync { WriteOrigin::Resync } else { WriteOrigin::Peer };
                    self.submit(
                        DiskOp::Write { offset_blocks: first, data, fua, origin, atomic },
                        IoPurpose::PeerWrite { peer, conn_id, id, resync },
                    );
                }
            }
        }
    }

    fn handle_barrier_ack(&mut self, i: usize, epoch: u64) {
        let peer = self.peers[i].id;
        let mut cleared = Vec::new();
        for (id, entry) in self.transfer_log.iter_mut() {
            let before = entry.peers.len();
            entry.peers.retain(|(p, e)| !(*p == peer && *e <= epoch));
            if entry.peers.len() != before {
                self.completion_candidates.transfer_log(*id);
                if entry.resync {
                    cleared.push((entry.first, entry.blocks));
                }
            }
        }
        for (first, blocks) in cleared {
            self.persist(MetaUpdate::BitmapClear { peer, first_block: first, blocks });
        }
        let p = &mut self.peers[i];
        p.acked_epoch_update(epoch);
        self.diskless_barrier_acked(i);
    }

    // ----- handshake -----

    fn handle_handshake_frame(&mut self, i: usize, frame: Frame) {
        let size_blocks = self.meta.size_blocks;
        if let Frame::Hello(hello) = frame {
            if hello.version != PROTOCOL_VERSION {
                self.refuse(i, "protocol version mismatch");
            } else if hello.node_id != self.peers[i].id {
                self.refuse(i, "peer has an unexpected node id");
            } else if hello.size_blocks != size_blocks
                && !self.handshake_with_diskless_end(i)
                && !self.resize_handshake_size(&hello)
            {
                self.refuse(i, "device sizes differ");
            } else if hello.protocol != self.config.protocol.to_wire() {
                self.refuse(i, "replication protocols differ");
            } else if !self.config.after_sb.compatible_with_peer(hello.after_sb) {
                self.refuse(i, "incompatible after-sb-0pri/1pri/2pri settings");
            } else {
                self.peers[i].handshake.as_mut().expect("in handshake").hello = Some(hello);
            }
            return;
        }
        let diskless = self.handshake_with_diskless_end(i);
        let handshake = self.peers[i].handshake.as_mut().expect("in handshake");
        match frame {
            Frame::Hello(_) => unreachable!("handled above"),
            Frame::BitmapChunk { .. } if diskless => {} // nothing to sync with a diskless end
            Frame::BitmapChunk { word_offset, words } => {
                let total = handshake.bitmap.words().len() as u64;
                let fits =
                    word_offset.checked_add(words.len() as u64).is_some_and(|end| end <= total);
                if !fits {
                    self.protocol_error(i, "bitmap chunk out of range".into());
                    return;
                }
                let mut all = handshake.bitmap.words().to_vec();
                let start = usize::try_from(word_offset).expect("checked against the word count");
                for (slot, word) in all[start..].iter_mut().zip(words) {
                    *slot |= word;
                }
                handshake.bitmap = Bitmap::from_words(size_blocks, all).expect("same word count");
            }
            Frame::HandshakeDone => {
                if handshake.hello.is_none() {
                    self.protocol_error(i, "handshake ended without Hello".into());
                    return;
                }
                handshake.done = true;
                if !self.mesh_hello_holds_sent(i) {
                    self.finish_handshake(i);
                }
            }
            Frame::HelloHolds => self.mesh_peer_hello_holds(i),
            Frame::Ping => self.send(i, Frame::PingAck),
            Frame::PingAck => {}
            Frame::UncleanSecondary => self.mesh_peer_unclean(i),
            _ => self.protocol_error(i, "data before the handshake finished".into()),
        }
    }

    fn refuse(&mut self, i: usize, reason: &'static str) {
        let peer = self.peers[i].id;
        self.emit(Event::SyncRefused { peer, reason });
        self.disconnect(i, ConnectionState::StandAlone);
    }

    fn finish_handshake(&mut self, i: usize) {
        let peer = self.peers[i].id;
        let handshake = self.peers[i].handshake.take().expect("in handshake");
        let hello = handshake.hello.expect("checked");
        self.resize_diskless_learn(&hello);
        if self.quorum_handshake_start(i, &hello) || self.diskless_handshake(i, &hello) {
            return;
        }
        if self.mesh_hello_stale(i) {
            return;
        }
        let mine = HandshakeView {
            node_id: self.id,
            uuids: self.meta.uuids.clone(),
            crashed_primary: self.meta.flags.crashed_primary,
            discard_my_data: self.peers[i].discard_my_data,
        };
        let theirs = HandshakeView {
            node_id: hello.node_id,
            uuids: hello.uuids.clone(),
            crashed_primary: hello.crashed_primary,
            discard_my_data: hello.discard_my_data,
        };
        let my_bits = !self.meta.bitmaps[peer.index()].is_clear();
        let their_bits = !handshake.bitmap.is_clear() | self.resize_grew_by_hello(i);
        let my_disk = (self.disk, self.meta.flags.full_sync_required, my_bits);
        let their_disk = (hello.disk, hello.full_sync_required, their_bits);
        let by_generations = uuid::decide(&mine, &theirs);
        let mut decision = decide_with_disks(by_generations, my_disk, their_disk);
        let both_consistent =
            [my_disk, their_disk].iter().all(|(d, full, _)| d.has_data() && !full);
        if by_generations == SyncDecision::NoSync && both_consistent && !self.mesh_enabled() {
            let roles = (handshake.sent.role, hello.role);
            decision = direction_within_generation(decision, &mine, &theirs, roles);
        }
        decision = self.mesh_adjust_decision(i, &hello, handshake.sent.role, decision);
        decision = self.mesh_gen_adjust_decision(&hello, handshake.sent.role, decision);
        decision = self.quorum_two_primaries_decision(&hello, handshake.sent.role, decision);
        let Some(mut decision) = self.mesh_defer_sync(i, &hello, by_generations, decision) else {
            return;
        };
        if decision == SyncDecision::SplitBrain {
            let (bitmap, sent) = (&handshake.bitmap, handshake.sent);
            decision = self.after_split_brain(i, &mine, &theirs, &hello, bitmap, sent);
        }
        self.set_peer_role(i, hello.role);
        self.peers[i].discard_my_data = false;
        self.set_peer_disk(i, hello.disk);
        self.emit(Event::HandshakeDecided { peer, decision });
        use SyncDecision::*;
        let target = matches!(decision, BitmapTarget | FullTarget);
        let source = matches!(decision, BitmapSource | FullSource);
        match decision {
            SplitBrain => {
                self.emit(Event::SplitBrain { peer });
                self.disconnect(i, ConnectionState::StandAlone);
                return;
            }
            Unrelated => {
                self.emit(Event::UnrelatedData { peer });
                self.disconnect(i, ConnectionState::StandAlone);
                return;
            }
            _ => {}
        }
        if self.quorum_after_decision(i, &hello, source, target) {
            return;
        }
        if target && (self.role == Role::Primary || self.disk == DiskState::Diskless) {
            self.refuse(i, "would become SyncTarget while primary or diskless");
            return;
        }
        if source && (hello.role == Role::Primary || hello.disk == DiskState::Diskless) {
            self.refuse(i, "peer would become SyncTarget while primary or diskless");
            return;
        }
        if (source && !self.disk.has_data()) || (target && !hello.disk.has_data()) {
            self.refuse(i, "the sync source has no consistent data");
            return;
        }
        if self.role == Role::Primary && hello.role == Role::Primary {
            // DRBD refuses the connection (SS_TWO_PRIMARIES): a peer promoted while we were
            // apart must not start receiving our writes, and a fence pending for it must not
            // be settled by this handshake.
            self.refuse(i, "both nodes are primary");
            return;
        }
        if decision == NoSync {
            // Connected again and in sync: whatever we write from now on reaches the peer or
            // is fenced again when the connection breaks. (As sync source the fence ends only
            // when the peer's State confirms it became Inconsistent: its side of the
            // handshake may still fail, leaving it UpToDate without our newer writes.)
            self.fence_pending &= !peer.bit();
        }
        if decision == NoSync {
            if self.meta.uuids.bitmap_uuid(peer) != 0 {
                let mut uuids = self.meta.uuids.clone();
                uuids.settled_in_sync(peer);
                self.persist(MetaUpdate::Uuids(uuids));
            }
            let both_have_data = self.disk.has_data() && hello.disk.has_data();
            let someone_current =
                self.disk >= DiskState::Consistent || hello.disk >= DiskState::Consistent;
            if both_have_data && someone_current {
                self.set_disk(DiskState::UpToDate);
                self.set_peer_disk(i, DiskState::UpToDate);
                self.persist_flags(|f| f.peer_outdated &= !peer.bit());
            }
            self.set_replication(i, ReplicationState::Established);
        } else if source {
            let full = decision == FullSource;
            if full {
                self.persist(MetaUpdate::BitmapSet {
                    peer,
                    first_block: 0,
                    blocks: self.meta.size_blocks,
                });
            } else {
                for (first, blocks) in handshake.bitmap.runs_from(0).collect::<Vec<_>>() {
                    self.persist(MetaUpdate::BitmapSet { peer, first_block: first, blocks });
                }
            }
            if self.disk != DiskState::UpToDate && !self.mesh_source_keeps_disk(i) {
                self.set_disk(DiskState::UpToDate);
            }
            self.set_peer_disk(i, DiskState::Inconsistent);
            let blocks_total = self.meta.bitmaps[peer.index()].count();
            let csums = self
                .config
                .digests
                .csums_for_resync(self.meta.flags.crashed_primary || hello.crashed_primary)
                .map(verify::CsumResync::new);
            self.peers[i].resync =
                Some(ResyncSource::new(blocks_total, self.now_ms, self.config.resync_rate, csums));
            self.set_replication(i, ReplicationState::SyncSource);
        } else {
            assert!(target);
            self.set_disk(DiskState::Inconsistent);
            self.mesh_target_takes_generation(i, hello.uuids.current, by_generations);
            self.mesh_gen_target_started(i, &hello.uuids);
            self.set_peer_disk(i, self.mesh_source_disk(hello.disk));
            self.set_replication(i, ReplicationState::SyncTarget);
        }
        self.broadcast_state();
    }

    /// Applies the after-sb policies to a split brain found in the handshake: the victim's
    /// side becomes the sync target of exactly what `--discard-my-data` would give (a bitmap
    /// resync of both sides' changes when both bitmaps share a base, else a full sync), or
    /// the split brain stands.
    fn after_split_brain(
        &mut self,
        i: usize,
        mine: &HandshakeView,
        theirs: &HandshakeView,
        hello: &Hello,
        their_bitmap: &Bitmap,
        local: SplitBrainSide,
    ) -> SyncDecision {
        let peer = self.peers[i].id;
        if !(self.disk.has_data() && hello.disk.has_data()) {
            return SyncDecision::SplitBrain;
        }
        let remote = SplitBrainSide {
            node_id: hello.node_id,
            role: hello.role,
            changed_blocks: their_bitmap.count(),
            primary_at_split: hello.uuids.primary_at_split(self.id),
        };
        let outcome = after_sb::resolve(self.config.after_sb, &local, &remote);
        if outcome.primary_lost {
            self.emit(Event::PrimaryLostAfterSplitBrain { peer });
        }
        let discarded_local = match outcome.resolution {
            Resolution::Disconnect => return SyncDecision::SplitBrain,
            Resolution::Victim => true,
            Resolution::Survivor => false,
        };
        let victim_role = if discarded_local { local.role } else { hello.role };
        if victim_role == Role::Primary {
            // violently-as0p against a primary: DRBD would resync a primary's data under its
            // users; this engine never makes a primary a sync target, so the split brain stands.
            return SyncDecision::SplitBrain;
        }
        let victim = HandshakeView { discard_my_data: discarded_local, ..mine.clone() };
        let survivor = HandshakeView { discard_my_data: !discarded_local, ..theirs.clone() };
        let my_disk = (self.disk, self.meta.flags.full_sync_required, local.changed_blocks > 0);
        let their_disk = (hello.disk, hello.full_sync_required, remote.changed_blocks > 0);
        let decision =
            match decide_with_disks(uuid::decide(&victim, &survivor), my_disk, their_disk) {
                // Same generation with changes on both sides: the two bitmaps cover them.
                SyncDecision::SplitBrain | SyncDecision::NoSync if discarded_local => {
                    SyncDecision::BitmapTarget
                }
                SyncDecision::SplitBrain | SyncDecision::NoSync => SyncDecision::BitmapSource,
                other => other,
            };
        self.emit(Event::SplitBrainResolved { peer, policy: outcome.policy, discarded_local });
        decision
    }

    // ----- resync -----

    fn pump_resync(&mut self, i: usize) {
        let peer = self.peers[i].id;
        let app_busy = self.last_app_write_ms + RESYNC_STEP_MS * 2 > self.now_ms
            && self.last_app_write_ms != 0;
        let now = self.now_ms;
        let size = self.meta.size_blocks;
        {
            let Some(r) = self.peers[i].resync.as_mut() else { return };
            if r.last_step_ms + RESYNC_STEP_MS <= now {
                let in_flight_kib: u64 = r.in_flight.values().map(|(_, b, _, _)| kib(*b)).sum();
                r.budget_kib = r.controller.step(r.acked_kib_step, in_flight_kib, app_busy);
                r.acked_kib_step = 0;
                r.last_step_ms = now;
            }
        }
        loop {
            let bitmap = &self.meta.bitmaps[peer.index()];
            let r = self.peers[i].resync.as_ref().expect("checked");
            if r.in_flight.len() >= RESYNC_REQUESTS_MAX || r.budget_kib == 0 {
                break;
            }
            let Some(start) = bitmap.next_set(r.cursor) else {
                let r = self.peers[i].resync.as_mut().expect("checked");
                r.cursor = size;
                break;
            };
            let end = bitmap.next_clear(start).min(start + RESYNC_REQUEST_BLOCKS_MAX);
            let blocks = end - start;
            if self.write_conflicts(start, blocks) {
                break;
            }
            let conn_id = self.peers[i].conn_id;
            let id = self.peers[i].next_resync_id;
            self.peers[i].next_resync_id += 1;
            let r = self.peers[i].resync.as_mut().expect("checked");
            let csums = r.csums.as_ref().map(verify::CsumResync::alg);
            // A checksum request reads nothing here yet: it holds no write back ("sent").
            r.in_flight.insert(id, (start, blocks, csums.is_some(), 0));
            r.cursor = end;
            r.budget_kib = r.budget_kib.saturating_sub(kib(blocks));
            if let Some(alg) = csums {
                self.send_csum_request(i, id, start, blocks, alg);
                continue;
            }
            self.submit(
                DiskOp::Read { offset_blocks: start, blocks },
                IoPurpose::ResyncRead { peer, conn_id, id },
            );
        }
        // Finished a pass: done, or start over for bits that could not be cleared.
        let r = self.peers[i].resync.as_ref().expect("checked");
        if r.cursor >= size && r.in_flight.is_empty() {
            let pending_barrier = self
                .transfer_log
                .values()
                .any(|e| e.resync && e.peers.iter().any(|(p, _)| *p == peer));
            if self.meta.bitmaps[peer.index()].is_clear() {
                self.finish_resync_as_source(i);
            } else if !pending_barrier {
                self.peers[i].resync.as_mut().expect("checked").cursor = 0;
            } else if self.last_barrier_ms + BARRIER_INTERVAL_MS / 4 <= self.now_ms {
                self.start_barrier(None);
            }
        }
    }

    fn handle_resync_ack(&mut self, i: usize, id: u64, ok: bool) {
        let peer = self.peers[i].id;
        let Some(r) = self.peers[i].resync.as_mut() else {
            self.protocol_error(i, "ResyncAck without a resync".into());
            return;
        };
        let Some((first, blocks, sent, epoch)) = r.in_flight.remove(&id) else {
            self.protocol_error(i, "ResyncAck for an unknown request".into());
            return;
        };
        if !sent {
            self.protocol_error(i, "ResyncAck before the data was sent".into());
            return;
        }
        if ok {
            r.acked_kib_step += kib(blocks);
            r.acked_blocks_total += blocks;
            let tl = self.next_tl;
            self.next_tl += 1;
            self.transfer_log.insert(
                tl,
                TlEntry {
                    first,
                    blocks,
                    resync: true,
                    local_done: true,
                    local_stable: true,
                    flush_generation: None,
                    peers: vec![(peer, epoch)],
                },
            );
        }
    }

    fn finish_resync_as_source(&mut self, i: usize) {
        let peer = self.peers[i].id;
        let blocks = self.peers[i].resync.take().map_or(0, |r| r.blocks_total);
        let mut uuids = self.meta.uuids.clone();
        uuids.resync_finished_as_source(peer);
        self.persist(MetaUpdate::Uuids(uuids));
        self.persist_flags(|f| {
            f.peer_outdated &= !peer.bit();
            f.crashed_primary = false;
        });
        let current_uuid = self.meta.uuids.current;
        self.mesh_before_resync_done(i);
        self.mesh_gen_sourced(i);
        self.send(i, Frame::ResyncDone { current_uuid });
        self.set_peer_disk(i, self.mesh_source_disk(self.disk));
        self.set_replication(i, ReplicationState::Established);
        self.emit(Event::ResyncFinished { peer, blocks });
    }

    fn handle_resync_done(&mut self, i: usize, current_uuid: u64) {
        let peer = self.peers[i].id;
        if self.peers[i].replication != ReplicationState::SyncTarget {
            self.protocol_error(i, "ResyncDone while not SyncTarget".into());
            return;
        }
        self.mesh_resync_done();
        let mut uuids = self.meta.uuids.clone();
        uuids.resync_finished_as_target(peer, current_uuid);
        self.mesh_target_lineage(i, self.meta.uuids.current, &mut uuids);
        self.persist(MetaUpdate::Uuids(uuids));
        self.mesh_gen_resync_done(i, current_uuid);
        let size = self.meta.size_blocks;
        if !self.meta.bitmaps[peer.index()].is_clear() {
            self.persist(MetaUpdate::BitmapClear { peer, first_block: 0, blocks: size });
        }
        self.persist_flags(|f| {
            f.crashed_primary = false;
            f.full_sync_required = false;
        });
        self.set_replication(i, ReplicationState::Established);
        self.set_disk(self.mesh_source_disk(self.peers[i].disk));
        self.mesh_target_ended_below(i);
        self.emit(Event::ResyncFinished { peer, blocks: 0 });
    }

    /// Runs everything that may have become possible after an input.
    fn pump(&mut self) {
        self.promote_pump();
        self.quorum_update();
        self.mesh_pump();
        self.mesh_gen_pump();
        for i in 0..self.peers.len() {
            if self.peers[i].connection == ConnectionState::Connected
                && self.peers[i].handshake.is_none()
            {
                self.pump_incoming(i);
                if self.peers[i].resync.is_some() {
                    self.pump_resync(i);
                }
                self.pump_verify(i);
            }
        }
        self.ahead_pump();
        self.start_queued_writes();
        self.collect_transfer_log();
        // Held reads first: their data was read before the writes released with them were
        // acknowledged, so they must not complete after those acknowledgements.
        self.release_held_reads();
        self.try_complete_writes();
        self.try_complete_flushes();
        self.try_finish_demote();
        self.mesh_announce();
    }
}

/// Refines the generation decision with what the disks say: data that is not consistent is
/// always the target (fully, if it may hold garbage), and bits one side holds for the other
/// mean "I may have data you lack" even when the generations match.
fn decide_with_disks(
    decision: SyncDecision,
    (my_disk, my_full, my_bits): (DiskState, bool, bool),
    (their_disk, their_full, their_bits): (DiskState, bool, bool),
) -> SyncDecision {
    use SyncDecision::*;
    let mine = my_disk.has_data() && !my_full;
    let theirs = their_disk.has_data() && !their_full;
    if matches!(decision, SplitBrain | Unrelated) {
        // Data that is not consistent has nothing to lose: a node that missed the end of its
        // resync (and so fell out of the peer's short history) is simply copied again.
        return match (mine, theirs) {
            (false, true) => FullTarget,
            (true, false) => FullSource,
            _ => decision,
        };
    }
    match (mine, theirs) {
        (false, false) => NoSync,
        (false, true) => {
            if decision == BitmapTarget && !my_full {
                BitmapTarget
            } else {
                FullTarget
            }
        }
        (true, false) => {
            if decision == BitmapSource && !their_full {
                BitmapSource
            } else {
                FullSource
            }
        }
        (true, true) if decision == NoSync => match (my_bits, their_bits) {
            (false, false) => NoSync,
            (true, false) => BitmapSource,
            (false, true) => BitmapTarget,
            (true, true) => SplitBrain,
        },
        (true, true) => decision,
    }
}

/// Two nodes of one generation, both with consistent data, whose direction came from the
/// bits (`decide_with_disks`; the mesh has its own rules, `mesh_adjust_decision`; a disk
/// without consistent data is a target whatever the roles or orders). Writing apart starts
/// a generation, before any acknowledgement, so bits within one generation are never
/// acknowledged writes the other lacks, except those acknowledged before a loss under
/// protocol A or B (lost at any failover) or confirmed by a peer that then lost power before
/// its barrier ack (`mark_in_doubt`): the bits of a primary that lost its peer under
/// fencing and deferred its generation (`fence_defers_generation`), of a disk re-attached
/// (every block), of blocks an online verify found different (the verify source's bits:
/// its data is the reference). So:
/// - bits on both sides (`SplitBrain` from the bits): an operator's `--discard-my-data`
///   names the victim, as at a split brain of generations; bits on one side only are no
///   split brain, and an order there is ignored, as DRBD applies discard-my-data only to a
///   split brain: a stale order (given for an earlier split brain, carried out after the
///   verify's disconnect) made the verify source the target of the node whose blocks were
///   flipped, copying the corrupt blocks over the good ones (two-node seed 8752);
/// - a primary is the source over a secondary (of both bitmaps, no split brain): its data is
///   the one acknowledged from now on (two-node seed 5603: a primary with its generation
///   deferred met a re-attached peer whose bitmap covered everything, a split brain; seed
///   3602: an old primary outdated by fence exit code 6 held the only bits and stayed the
///   source of the promoted peer, which refused it, StandAlone for good).
fn direction_within_generation(
    decision: SyncDecision,
    mine: &HandshakeView,
    theirs: &HandshakeView,
    (my_role, their_role): (Role, Role),
) -> SyncDecision {
    use SyncDecision::*;
    let decision = match (mine.discard_my_data, theirs.discard_my_data, decision) {
        (true, false, SplitBrain) => BitmapTarget,
        (false, true, SplitBrain) => BitmapSource,
        _ => decision,
    };
    match (my_role, their_role, decision) {
        (Role::Primary, Role::Secondary, BitmapTarget | SplitBrain) => BitmapSource,
        (Role::Secondary, Role::Primary, BitmapSource | SplitBrain) => BitmapTarget,
        _ => decision,
    }
}

/// Peer writes are keyed uniquely across connections (an old connection's write may still be
/// in flight when the next connection's writes arrive).
fn id_key(peer: NodeId, conn_id: u64, id: u64, resync: bool) -> (u8, u64, u64, bool) {
    (peer.0, conn_id, id, resync)
}

impl Peer {
    fn epoch_acked(&self, epoch: u64) -> bool {
        self.acked_epoch >= epoch
    }
    fn acked_epoch_update(&mut self, epoch: u64) {
        self.acked_epoch = self.acked_epoch.max(epoch);
    }
}

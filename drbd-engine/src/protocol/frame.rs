//! Frames of the peer protocol and their byte encoding.
//!
//! Every frame carries a 32-byte header: magic, kind, the connection id (so a frame from an
//! earlier connection is recognised and dropped), a per-connection sequence number (so loss,
//! duplication and reordering below us are detected rather than trusted away), the payload
//! length and a crc32c over header and payload. A bad checksum is a broken connection: the
//! receiver drops it, and the blocks whose writes were not acknowledged are resynced.

use crate::constants::{BITMAP_CHUNK_WORDS_MAX, FRAME_PAYLOAD_BYTES_MAX, NODE_ID_MAX};
use crate::protocol::after_sb::AfterSbPolicies;
use crate::protocol::digest::DigestAlg;
use crate::protocol::states::{DiskState, Role};
use crate::uuid::GenerationUuids;
use crate::{NodeId, constants::HISTORY_UUIDS_MAX};
use bytes::Bytes;
use thiserror::Error;

pub const FRAME_MAGIC: u32 = 0x5444_4e31; // "TDN1"
/// Bumped whenever a frame is added or changes: peers of different versions refuse each other
/// at the handshake instead of misreading frames. 2: quorum (17), resize (18-19), diskless
/// operation (20-24), the mesh (27-29), verify (40-44) and WRITE ATOMIC (33). 3: pull-ahead
/// (45-46), UncleanSecondary (50), and 32 history generations in Hello and UuidHistory.
/// 4: HelloHolds (60; a mesh node waits for it before deciding a handshake) and the
/// two-phase promotion (51-53).
pub const PROTOCOL_VERSION: u32 = 4;
pub const HEADER_BYTES: usize = 32;
/// Mask words of one VerifyResult: one bit per block of the largest request.
pub const VERIFY_MASK_WORDS_MAX: usize = 4;
const _: () = assert!(
    crate::constants::RESYNC_REQUEST_BLOCKS_MAX <= VERIFY_MASK_WORDS_MAX as u64 * 64,
    "a verify request's mask fits one VerifyResult"
);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame shorter than its header ({0} bytes)")]
    Short(usize),
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    #[error("payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("length mismatch: header says {header}, frame has {actual}")]
    LengthMismatch { header: usize, actual: usize },
    #[error("crc32c mismatch")]
    Checksum,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {0} payload")]
    Malformed(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub node_id: NodeId,
    pub size_blocks: u64,
    pub protocol: u8,
    pub role: Role,
    pub disk: DiskState,
    pub crashed_primary: bool,
    pub discard_my_data: bool,
    pub full_sync_required: bool,
    pub uuids: GenerationUuids,
    /// The sender's after-sb policies: both ends must agree to decide a split brain alike.
    pub after_sb: AfterSbPolicies,
}

// Frames are built, encoded and dropped at once; boxing the rare Hello would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// The sender's out-of-sync bitmap for the receiver, in chunks.
    BitmapChunk {
        word_offset: u64,
        words: Vec<u64>,
    },
    /// Ends the sender's half of the handshake.
    HandshakeDone,
    State {
        role: Role,
        disk: DiskState,
    },
    Data {
        id: u64,
        offset_blocks: u64,
        fua: bool,
        /// Shared, not copied: the application's buffer goes to the socket as it is, and a
        /// received payload is a slice of the receive buffer.
        data: Bytes,
    },
    WriteAck {
        id: u64,
    },
    RecvAck {
        id: u64,
    },
    /// The peer could not write the data: it detached its disk.
    NegAck {
        id: u64,
    },
    ResyncData {
        id: u64,
        offset_blocks: u64,
        data: Vec<u8>,
    },
    ResyncAck {
        id: u64,
        ok: bool,
    },
    /// Closes an epoch: the receiver acknowledges once every earlier write is on stable storage.
    Barrier {
        epoch: u64,
    },
    BarrierAck {
        epoch: u64,
    },
    Ping,
    PingAck,
    ResyncDone {
        current_uuid: u64,
    },
    /// `new-current-uuid --clear-bitmap`: adopt this generation, no sync needed.
    NewCurrentUuid {
        uuid: u64,
    },
    // Checksum-based resync and online verify (`protocol::node::verify`). Kinds 40 and up, so
    // frames other work appends after 16 do not collide with these.
    /// The sender becomes VerifyS for `first_block..end_block`; the receiver VerifyT.
    VerifyStart {
        first_block: u64,
        end_block: u64,
    },
    /// Read these blocks and answer with their digests (DRBD's P_OV_REQUEST when `verify`,
    /// else the sync source asking for the target's P_CSUM_RS_REQUEST digests).
    DigestRequest {
        id: u64,
        offset_blocks: u64,
        blocks: u64,
        alg: DigestAlg,
        verify: bool,
    },
    /// One digest per block; `reliable` is false when a write to the range was in flight while
    /// it was read (the verifier checks the range again) or the read failed.
    DigestReply {
        id: u64,
        reliable: bool,
        digests: Vec<u8>,
    },
    /// VerifyS to VerifyT: which blocks of a verified range differ (one bit per block), and
    /// whether the receiver keeps them in its bitmap (so one side only becomes sync source).
    VerifyResult {
        offset_blocks: u64,
        blocks: u64,
        differing: Vec<u64>,
        receiver_marks: bool,
    },
    /// Ends a verify: sent by VerifyS when done or by either side to refuse or stop it.
    VerifyDone {
        out_of_sync_blocks: u64,
        completed: bool,
    },
    /// The primaries the sender accepts (node id bits) and the term that confirms, the nodes
    /// a primary asks to be outdated (relayed by the others), and the diskful nodes the sender
    /// does not see with promotable data (see `protocol::quorum`). Only with quorum enabled.
    Quorum {
        primaries: u64,
        term: u64,
        outdate: u64,
        unseen: u64,
    },
    /// A Data frame of a WRITE ATOMIC: the receiver applies it through its atomic-write
    /// journal, so its disk holds all of it or none after a crash (`protocol::node::atomic`).
    /// Kinds 33-35 belong to atomic writes.
    AtomicData {
        id: u64,
        offset_blocks: u64,
        fua: bool,
        data: Bytes,
    },
    /// Online resize (`protocol::node::resize`): the data blocks the sender's backing could
    /// hold. `query`: the sender resizes and asks for the receiver's; otherwise the answer.
    ResizeSizes {
        usable_blocks: u64,
        query: bool,
    },
    /// Online resize: grow to `size_blocks` before handling any later frame.
    ResizeCommit {
        size_blocks: u64,
    },
    // Diskless operation (`protocol::node::diskless`): kinds 20-24.
    /// The sender's disk failed and it goes on diskless: the receiver tracks, from generation
    /// `current_uuid` on, every block written from now on for the sender (DRBD marks out of
    /// sync for a peer whose disk is below Inconsistent).
    Detached {
        current_uuid: u64,
    },
    /// These blocks may be missing on the disks of `peers` (node id bits; the sender's own bit:
    /// writes in flight when its disk failed): the receiver marks them in its bitmaps for them.
    OutOfSync {
        offset_blocks: u64,
        blocks: u64,
        peers: u64,
    },
    /// A diskless node asks an UpToDate peer for data (DRBD's P_DATA_REQUEST).
    ReadRequest {
        id: u64,
        offset_blocks: u64,
        blocks: u64,
    },
    /// The data of a ReadRequest (DRBD's P_DATA_REPLY).
    ReadReply {
        id: u64,
        data: Vec<u8>,
    },
    /// The peer could not serve a ReadRequest (no UpToDate data, or its read failed).
    ReadError {
        id: u64,
    },
    // Three or more diskful nodes (`protocol::node::mesh`), kinds 27-32.
    /// Primary to secondary, before the Data frames it concerns: the diskful nodes its writes
    /// go to from now on (`targets`, node id bits, itself included), those of them in sync
    /// with it (`in_sync`), its current generation and the peers it tracks changes for
    /// (`lost`), so that each secondary keeps bitmaps for the others.
    MeshTargets {
        targets: u64,
        in_sync: u64,
        current_uuid: u64,
        lost: u64,
    },
    /// Primary to secondary: a write to this range is stable on every node it went to, so
    /// the receiver forgets it as a difference towards the other secondaries.
    PeersInSync {
        offset_blocks: u64,
        blocks: u64,
    },
    /// Sync source to target, just before `ResyncDone`: the source's older generations, which
    /// the target adopts with its current one (a third node compares against them later).
    UuidHistory {
        history: [u64; crate::constants::HISTORY_UUIDS_MAX],
    },
    /// Mesh node to peer, in the handshake (after its Hello, before `HandshakeDone`): it
    /// restarted after going down as a secondary with hot extents, and the marks that
    /// restart set for this peer still stand: its bits for the peer are blocks where its own
    /// data may be wrong (a power loss takes the volatile cache), so a clean secondary of
    /// its generation is the sync source (`protocol::node::mesh`).
    UncleanSecondary,
    /// Sync source to target, before the resync data it concerns and again when it changes:
    /// the diskful nodes the source is connected to and fully in sync with (node id bits).
    /// The target need not mark the blocks it receives for those (they hold the same data).
    ResyncPeersInSync {
        peers: u64,
    },
    // Congestion policy pull-ahead (`protocol::node::ahead`), kinds 45-49.
    /// Primary to secondary, after the Barrier that closes the last epoch it sent: no more
    /// writes come; the receiver is Behind (and outdates its disk) until `AheadResync`.
    Ahead,
    /// Primary to a Behind secondary, once everything sent before `Ahead` is confirmed: the
    /// resync of the blocks marked meanwhile starts (Ahead -> SyncSource, Behind -> SyncTarget).
    AheadResync,
    /// Mesh node to peer, in the handshake, once the peer's `HandshakeDone` arrived: our Hello
    /// still holds (disk, generations, crash and unclean flags unchanged since it was sent).
    /// Each end decides only after the peer's, so both decide from Hellos that held at one
    /// moment (`protocol::node::mesh`, seed 12598).
    HelloHolds,
    // The cluster-wide (two-phase) promotion (`protocol::node::promote`), kinds 51-53.
    /// A node that wants to become primary asks each connected peer (DRBD's
    /// P_TWOPC_PREPARE for a role change): transaction `txn` of the sender.
    PromoteAsk {
        txn: u64,
    },
    /// The answer to `PromoteAsk` (DRBD's P_TWOPC_YES / P_TWOPC_NO). A yes is a grant: the
    /// sender refuses every other promotion until `PromoteEnd`, the connection drops or the
    /// grant times out.
    PromoteAnswer {
        txn: u64,
        granted: bool,
    },
    /// The asker's outcome (DRBD's P_TWOPC_COMMIT / P_TWOPC_ABORT): the grant ends.
    PromoteEnd {
        txn: u64,
        committed: bool,
    },
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::BitmapChunk { .. } => 2,
            Frame::HandshakeDone => 3,
            Frame::State { .. } => 4,
            Frame::Data { .. } => 5,
            Frame::WriteAck { .. } => 6,
            Frame::RecvAck { .. } => 7,
            Frame::NegAck { .. } => 8,
            Frame::ResyncData { .. } => 9,
            Frame::ResyncAck { .. } => 10,
            Frame::Barrier { .. } => 11,
            Frame::BarrierAck { .. } => 12,
            Frame::Ping => PING_KIND,
            Frame::PingAck => PING_ACK_KIND,
            Frame::ResyncDone { .. } => 15,
            Frame::NewCurrentUuid { .. } => 16,
            Frame::VerifyStart { .. } => 40,
            Frame::DigestRequest { .. } => 41,
            Frame::DigestReply { .. } => 42,
            Frame::VerifyResult { .. } => 43,
            Frame::VerifyDone { .. } => 44,
            Frame::Quorum { .. } => 17,
            Frame::AtomicData { .. } => 33,
            Frame::ResizeSizes { .. } => 18,
            Frame::ResizeCommit { .. } => 19,
            Frame::Detached { .. } => 20,
            Frame::OutOfSync { .. } => 21,
            Frame::ReadRequest { .. } => 22,
            Frame::ReadReply { .. } => 23,
            Frame::ReadError { .. } => 24,
            Frame::MeshTargets { .. } => 27,
            Frame::PeersInSync { .. } => 28,
            Frame::UuidHistory { .. } => 29,
            Frame::UncleanSecondary => 50,
            Frame::ResyncPeersInSync { .. } => 32,
            Frame::Ahead => 45,
            Frame::AheadResync => 46,
            Frame::HelloHolds => 60,
            Frame::PromoteAsk { .. } => 51,
            Frame::PromoteAnswer { .. } => 52,
            Frame::PromoteEnd { .. } => 53,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub conn_id: u64,
    pub seq: u64,
    pub frame: Frame,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        if self.bytes.len() < n {
            return Err(FrameError::Malformed(self.what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FrameError::Malformed(self.what)),
        }
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes).to_vec()
    }
    fn finish(&self) -> Result<(), FrameError> {
        if self.bytes.is_empty() { Ok(()) } else { Err(FrameError::Malformed(self.what)) }
    }
}

/// An encoded frame in two parts, so that a Data frame's payload reaches the socket without
/// being copied: `head` (header and fields) then `payload` (empty for every other frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub head: Vec<u8>,
    pub payload: Bytes,
}

impl EncodedFrame {
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole frame in one buffer (a copy of the payload; for tests and the simulator).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len());
        bytes.extend_from_slice(&self.head);
        bytes.extend_from_slice(&self.payload);
        bytes
    }
}

/// Encodes a frame with its header and checksum, in one buffer.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    encode_parts(envelope).to_vec()
}

/// Encodes a frame with its header and checksum; a Data payload stays shared.
pub fn encode_parts(envelope: &Envelope) -> EncodedFrame {
    let mut w = Writer(Vec::with_capacity(HEADER_BYTES + 64));
    let mut payload = Bytes::new();
    w.u32(FRAME_MAGIC);
    w.u8(envelope.frame.kind());
    w.u8(0);
    w.0.extend_from_slice(&[0, 0]);
    w.u64(envelope.conn_id);
    w.u64(envelope.seq);
    w.u32(0); // payload length, patched below
    w.u32(0); // crc32c, patched below
    assert_eq!(w.0.len(), HEADER_BYTES);
    match &envelope.frame {
        Frame::Hello(h) => {
            w.u32(h.version);
            w.u8(h.node_id.0);
            w.u64(h.size_blocks);
            w.u8(h.protocol);
            w.u8(h.role.to_wire());
            w.u8(h.disk.to_wire());
            w.u8(u8::from(h.crashed_primary));
            w.u8(u8::from(h.discard_my_data));
            w.u8(u8::from(h.full_sync_required));
            w.u64(h.uuids.current);
            for uuid in h.uuids.history {
                w.u64(uuid);
            }
            for uuid in h.uuids.bitmap {
                w.u64(uuid);
            }
            for byte in h.after_sb.to_wire() {
                w.u8(byte);
            }
        }
        Frame::BitmapChunk { word_offset, words } => {
            w.u64(*word_offset);
            w.u32(u32::try_from(words.len()).expect("chunk is bounded"));
            for word in words {
                w.u64(*word);
            }
        }
        Frame::HandshakeDone | Frame::Ping | Frame::PingAck => {}
        Frame::State { role, disk } => {
            w.u8(role.to_wire());
            w.u8(disk.to_wire());
        }
        Frame::Data { id, offset_blocks, fua, data }
        | Frame::AtomicData { id, offset_blocks, fua, data } => {
            w.u64(*id);
            w.u64(*offset_blocks);
            w.u8(u8::from(*fua));
            payload = data.clone();
        }
        Frame::ResyncData { id, offset_blocks, data } => {
            w.u64(*id);
            w.u64(*offset_blocks);
            w.0.extend_from_slice(data);
        }
        Frame::WriteAck { id } | Frame::RecvAck { id } | Frame::NegAck { id } => w.u64(*id),
        Frame::ResyncAck { id, ok } => {
            w.u64(*id);
            w.u8(u8::from(*ok));
        }
        Frame::Barrier { epoch } | Frame::BarrierAck { epoch } => w.u64(*epoch),
        Frame::ResyncDone { current_uuid } => w.u64(*current_uuid),
        Frame::NewCurrentUuid { uuid } => w.u64(*uuid),
        Frame::VerifyStart { first_block, end_block } => {
            w.u64(*first_block);
            w.u64(*end_block);
        }
        Frame::DigestRequest { id, offset_blocks, blocks, alg, verify } => {
            w.u64(*id);
            w.u64(*offset_blocks);
            w.u64(*blocks);
            w.u8(alg.to_wire());
            w.u8(u8::from(*verify));
        }
        Frame::DigestReply { id, reliable, digests } => {
            w.u64(*id);
            w.u8(u8::from(*reliable));
            w.0.extend_from_slice(digests);
        }
        Frame::VerifyResult { offset_blocks, blocks, differing, receiver_marks } => {
            w.u64(*offset_blocks);
            w.u64(*blocks);
            w.u8(u8::from(*receiver_marks));
            w.u32(u32::try_from(differing.len()).expect("a mask of one request"));
            for word in differing {
                w.u64(*word);
            }
        }
        Frame::VerifyDone { out_of_sync_blocks, completed } => {
            w.u64(*out_of_sync_blocks);
            w.u8(u8::from(*completed));
        }
        Frame::Quorum { primaries, term, outdate, unseen } => {
            for v in [primaries, term, outdate, unseen] {
                w.u64(*v);
            }
        }
        Frame::ResizeSizes { usable_blocks, query } => {
            w.u64(*usable_blocks);
            w.u8(u8::from(*query));
        }
        Frame::ResizeCommit { size_blocks } => w.u64(*size_blocks),
        Frame::Detached { current_uuid } => w.u64(*current_uuid),
        Frame::OutOfSync { offset_blocks, blocks, peers } => {
            w.u64(*offset_blocks);
            w.u64(*blocks);
            w.u64(*peers);
        }
        Frame::ReadRequest { id, offset_blocks, blocks } => {
            w.u64(*id);
            w.u64(*offset_blocks);
            w.u64(*blocks);
        }
        Frame::ReadReply { id, data } => {
            w.u64(*id);
            w.0.extend_from_slice(data);
        }
        Frame::ReadError { id } => w.u64(*id),
        Frame::MeshTargets { targets, in_sync, current_uuid, lost } => {
            for v in [targets, in_sync, current_uuid, lost] {
                w.u64(*v);
            }
        }
        Frame::PeersInSync { offset_blocks, blocks } => {
            w.u64(*offset_blocks);
            w.u64(*blocks);
        }
        Frame::UuidHistory { history } => {
            for v in history {
                w.u64(*v);
            }
        }
        Frame::UncleanSecondary => {}
        Frame::ResyncPeersInSync { peers } => w.u64(*peers),
        Frame::Ahead | Frame::AheadResync => {}
        Frame::HelloHolds => {}
        Frame::PromoteAsk { txn } => w.u64(*txn),
        Frame::PromoteAnswer { txn, granted: flag }
        | Frame::PromoteEnd { txn, committed: flag } => {
            w.u64(*txn);
            w.u8(u8::from(*flag));
        }
    }
    let payload_bytes = w.0.len() - HEADER_BYTES + payload.len();
    assert!(payload_bytes <= FRAME_PAYLOAD_BYTES_MAX, "frame payload over the limit");
    let payload_bytes = u32::try_from(payload_bytes).expect("bounded by FRAME_PAYLOAD_BYTES_MAX");
    w.0[24..28].copy_from_slice(&payload_bytes.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&w.0), &payload);
    w.0[28..32].copy_from_slice(&crc.to_le_bytes());
    EncodedFrame { head: w.0, payload }
}

/// The total frame length announced by a header, for stream transports.
/// The kind byte of an encoded frame's header (`None` for a short buffer): lets a driver see
/// its pings go and their answers come without decoding (it times the link's round trip).
pub fn header_kind(frame: &[u8]) -> Option<u8> {
    frame.get(4).copied()
}

/// Kinds of `Frame::Ping` and `Frame::PingAck` on the wire.
pub const PING_KIND: u8 = 13;
pub const PING_ACK_KIND: u8 = 14;

pub fn frame_len(header: &[u8; HEADER_BYTES]) -> Result<usize, FrameError> {
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let payload = u32::from_le_bytes(header[24..28].try_into().expect("4 bytes"));
    let payload = usize::try_from(payload).map_err(|_| FrameError::TooLarge(usize::MAX))?;
    if payload > FRAME_PAYLOAD_BYTES_MAX {
        return Err(FrameError::TooLarge(payload));
    }
    Ok(HEADER_BYTES + payload)
}

/// Decodes and verifies one whole frame (a Data payload is copied out of `bytes`).
pub fn decode(bytes: &[u8]) -> Result<Envelope, FrameError> {
    decode_with(bytes, |start| Bytes::copy_from_slice(&bytes[start..]))
}

/// Decodes and verifies one whole frame; a Data payload is a slice of `bytes`, not a copy.
pub fn decode_shared(bytes: &Bytes) -> Result<Envelope, FrameError> {
    decode_with(bytes, |start| bytes.slice(start..))
}

/// `payload(start)` hands out the Data payload that runs from `start` to the end of the frame.
fn decode_with(bytes: &[u8], payload: impl FnOnce(usize) -> Bytes) -> Result<Envelope, FrameError> {
    let header: &[u8; HEADER_BYTES] = bytes
        .get(..HEADER_BYTES)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Short(bytes.len()))?;
    let total = frame_len(header)?;
    if total != bytes.len() {
        return Err(FrameError::LengthMismatch { header: total, actual: bytes.len() });
    }
    let crc = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
    let mut digest = crc32c::crc32c(&bytes[..28]);
    digest = crc32c::crc32c_append(digest, &[0, 0, 0, 0]);
    digest = crc32c::crc32c_append(digest, &bytes[HEADER_BYTES..]);
    if digest != crc {
        return Err(FrameError::Checksum);
    }
    let kind = bytes[4];
    let conn_id = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let mut r = Reader { bytes: &bytes[HEADER_BYTES..], what: "frame" };
    let frame = match kind {
        1 => {
            r.what = "Hello";
            let version = r.u32()?;
            let node_id = NodeId::new(r.u8()?).ok_or(FrameError::Malformed("Hello"))?;
            let size_blocks = r.u64()?;
            let protocol = r.u8()?;
            let role = Role::from_wire(r.u8()?).ok_or(FrameError::Malformed("Hello"))?;
            let disk = DiskState::from_wire(r.u8()?).ok_or(FrameError::Malformed("Hello"))?;
            let crashed_primary = r.bool()?;
            let discard_my_data = r.bool()?;
            let full_sync_required = r.bool()?;
            let mut uuids = GenerationUuids::just_created();
            uuids.current = r.u64()?;
            for slot in 0..HISTORY_UUIDS_MAX {
                uuids.history[slot] = r.u64()?;
            }
            for slot in 0..=usize::from(NODE_ID_MAX) {
                uuids.bitmap[slot] = r.u64()?;
            }
            let after_sb = AfterSbPolicies::from_wire([r.u8()?, r.u8()?, r.u8()?])
                .ok_or(FrameError::Malformed("Hello"))?;
            Frame::Hello(Hello {
                version,
                node_id,
                size_blocks,
                protocol,
                role,
                disk,
                crashed_primary,
                discard_my_data,
                full_sync_required,
                uuids,
                after_sb,
            })
        }
        2 => {
            r.what = "BitmapChunk";
            let word_offset = r.u64()?;
            let count =
                usize::try_from(r.u32()?).map_err(|_| FrameError::Malformed("BitmapChunk"))?;
            if count > BITMAP_CHUNK_WORDS_MAX {
                return Err(FrameError::Malformed("BitmapChunk"));
            }
            let words = (0..count).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            Frame::BitmapChunk { word_offset, words }
        }
        3 => Frame::HandshakeDone,
        4 => {
            r.what = "State";
            let role = Role::from_wire(r.u8()?).ok_or(FrameError::Malformed("State"))?;
            let disk = DiskState::from_wire(r.u8()?).ok_or(FrameError::Malformed("State"))?;
            Frame::State { role, disk }
        }
        5 => {
            r.what = "Data";
            let id = r.u64()?;
            let offset_blocks = r.u64()?;
            let fua = r.bool()?;
            let start = bytes.len() - r.bytes.len();
            r.bytes = &[];
            Frame::Data { id, offset_blocks, fua, data: payload(start) }
        }
        33 => {
            r.what = "AtomicData";
            let id = r.u64()?;
            let offset_blocks = r.u64()?;
            let fua = r.bool()?;
            let start = bytes.len() - r.bytes.len();
            r.bytes = &[];
            Frame::AtomicData { id, offset_blocks, fua, data: payload(start) }
        }
        6 => Frame::WriteAck { id: r.u64()? },
        7 => Frame::RecvAck { id: r.u64()? },
        8 => Frame::NegAck { id: r.u64()? },
        9 => {
            r.what = "ResyncData";
            let id = r.u64()?;
            let offset_blocks = r.u64()?;
            Frame::ResyncData { id, offset_blocks, data: r.rest() }
        }
        10 => {
            r.what = "ResyncAck";
            let id = r.u64()?;
            Frame::ResyncAck { id, ok: r.bool()? }
        }
        11 => Frame::Barrier { epoch: r.u64()? },
        12 => Frame::BarrierAck { epoch: r.u64()? },
        13 => Frame::Ping,
        14 => Frame::PingAck,
        15 => Frame::ResyncDone { current_uuid: r.u64()? },
        16 => Frame::NewCurrentUuid { uuid: r.u64()? },
        20 => Frame::Detached { current_uuid: r.u64()? },
        21 => {
            r.what = "OutOfSync";
            Frame::OutOfSync { offset_blocks: r.u64()?, blocks: r.u64()?, peers: r.u64()? }
        }
        22 => {
            r.what = "ReadRequest";
            Frame::ReadRequest { id: r.u64()?, offset_blocks: r.u64()?, blocks: r.u64()? }
        }
        23 => {
            r.what = "ReadReply";
            let id = r.u64()?;
            Frame::ReadReply { id, data: r.rest() }
        }
        24 => Frame::ReadError { id: r.u64()? },
        45 => Frame::Ahead,
        46 => Frame::AheadResync,
        40 => {
            r.what = "VerifyStart";
            Frame::VerifyStart { first_block: r.u64()?, end_block: r.u64()? }
        }
        41 => {
            r.what = "DigestRequest";
            let id = r.u64()?;
            let offset_blocks = r.u64()?;
            let blocks = r.u64()?;
            let alg =
                DigestAlg::from_wire(r.u8()?).ok_or(FrameError::Malformed("DigestRequest"))?;
            Frame::DigestRequest { id, offset_blocks, blocks, alg, verify: r.bool()? }
        }
        42 => {
            r.what = "DigestReply";
            let id = r.u64()?;
            let reliable = r.bool()?;
            Frame::DigestReply { id, reliable, digests: r.rest() }
        }
        43 => {
            r.what = "VerifyResult";
            let offset_blocks = r.u64()?;
            let blocks = r.u64()?;
            let receiver_marks = r.bool()?;
            let count =
                usize::try_from(r.u32()?).map_err(|_| FrameError::Malformed("VerifyResult"))?;
            if count > VERIFY_MASK_WORDS_MAX {
                return Err(FrameError::Malformed("VerifyResult"));
            }
            let differing = (0..count).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            Frame::VerifyResult { offset_blocks, blocks, differing, receiver_marks }
        }
        44 => {
            r.what = "VerifyDone";
            Frame::VerifyDone { out_of_sync_blocks: r.u64()?, completed: r.bool()? }
        }
        17 => Frame::Quorum {
            primaries: r.u64()?,
            term: r.u64()?,
            outdate: r.u64()?,
            unseen: r.u64()?,
        },
        18 => Frame::ResizeSizes {
            usable_blocks: r.u64()?,
            query: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(FrameError::Malformed("ResizeSizes")),
            },
        },
        19 => Frame::ResizeCommit { size_blocks: r.u64()? },
        27 => Frame::MeshTargets {
            targets: r.u64()?,
            in_sync: r.u64()?,
            current_uuid: r.u64()?,
            lost: r.u64()?,
        },
        28 => Frame::PeersInSync { offset_blocks: r.u64()?, blocks: r.u64()? },
        29 => {
            let mut history = [0; crate::constants::HISTORY_UUIDS_MAX];
            for slot in &mut history {
                *slot = r.u64()?;
            }
            Frame::UuidHistory { history }
        }
        50 => Frame::UncleanSecondary,
        51 => Frame::PromoteAsk { txn: r.u64()? },
        52 => {
            r.what = "PromoteAnswer";
            Frame::PromoteAnswer { txn: r.u64()?, granted: r.bool()? }
        }
        53 => {
            r.what = "PromoteEnd";
            Frame::PromoteEnd { txn: r.u64()?, committed: r.bool()? }
        }
        32 => Frame::ResyncPeersInSync { peers: r.u64()? },
        60 => Frame::HelloHolds,
        other => return Err(FrameError::UnknownKind(other)),
    };
    r.finish()?;
    Ok(Envelope { conn_id, seq, frame })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        let mut uuids = GenerationUuids::just_created();
        uuids.current = 0x1234;
        uuids.bitmap[3] = 0x88;
        uuids.history[..2].copy_from_slice(&[0x66, 0x44]);
        let history = uuids.history;
        vec![
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_id: NodeId(2),
                size_blocks: 1 << 20,
                protocol: 3,
                role: Role::Primary,
                disk: DiskState::UpToDate,
                crashed_primary: true,
                discard_my_data: false,
                full_sync_required: true,
                uuids,
                after_sb: AfterSbPolicies {
                    zero_primaries: crate::protocol::AfterSb0Pri::DiscardLocal,
                    one_primary: crate::protocol::AfterSb1Pri::Consensus,
                    two_primaries: crate::protocol::AfterSb2Pri::CallPriLostAfterSb,
                },
            }),
            Frame::BitmapChunk { word_offset: 7, words: vec![1, u64::MAX, 0] },
            Frame::HandshakeDone,
            Frame::State { role: Role::Secondary, disk: DiskState::Outdated },
            Frame::Data { id: 9, offset_blocks: 77, fua: true, data: vec![0xab; 4096].into() },
            Frame::AtomicData { id: 10, offset_blocks: 78, fua: false, data: vec![7; 8192].into() },
            Frame::WriteAck { id: 1 },
            Frame::RecvAck { id: 2 },
            Frame::NegAck { id: 3 },
            Frame::ResyncData { id: 4, offset_blocks: 5, data: vec![1; 8192] },
            Frame::ResyncAck { id: 6, ok: false },
            Frame::Barrier { epoch: 10 },
            Frame::BarrierAck { epoch: 10 },
            Frame::Ping,
            Frame::PingAck,
            Frame::ResyncDone { current_uuid: 0x42 },
            Frame::NewCurrentUuid { uuid: 0x4242 },
            Frame::VerifyStart { first_block: 8, end_block: 4096 },
            Frame::DigestRequest {
                id: 11,
                offset_blocks: 12,
                blocks: 256,
                alg: DigestAlg::Sha256,
                verify: true,
            },
            Frame::DigestReply { id: 11, reliable: true, digests: vec![3; 64] },
            Frame::VerifyResult {
                offset_blocks: 12,
                blocks: 130,
                differing: vec![1, 0, 2],
                receiver_marks: true,
            },
            Frame::VerifyDone { out_of_sync_blocks: 3, completed: false },
            Frame::Quorum { primaries: 0b101, term: 7, outdate: 0b10, unseen: 0b10 },
            Frame::ResizeSizes { usable_blocks: 1 << 30, query: true },
            Frame::ResizeSizes { usable_blocks: 32768, query: false },
            Frame::ResizeCommit { size_blocks: 32768 },
            Frame::Detached { current_uuid: 0x4444 },
            Frame::OutOfSync { offset_blocks: 12, blocks: 3, peers: 0b100 },
            Frame::ReadRequest { id: 13, offset_blocks: 14, blocks: 2 },
            Frame::ReadReply { id: 13, data: vec![9; 8192] },
            Frame::ReadError { id: 15 },
            Frame::MeshTargets { targets: 0b111, in_sync: 0b011, current_uuid: 0x88, lost: 0b100 },
            Frame::PeersInSync { offset_blocks: 9, blocks: 3 },
            Frame::UuidHistory { history },
            Frame::UncleanSecondary,
            Frame::ResyncPeersInSync { peers: 0b101 },
            Frame::Ahead,
            Frame::AheadResync,
            Frame::HelloHolds,
            Frame::PromoteAsk { txn: 17 },
            Frame::PromoteAnswer { txn: 17, granted: true },
            Frame::PromoteAnswer { txn: 18, granted: false },
            Frame::PromoteEnd { txn: 17, committed: true },
            Frame::PromoteEnd { txn: 18, committed: false },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for (seq, frame) in samples().into_iter().enumerate() {
            let envelope = Envelope { conn_id: 99, seq: seq as u64, frame };
            let bytes = encode(&envelope);
            let header: &[u8; HEADER_BYTES] = bytes[..HEADER_BYTES].try_into().unwrap();
            assert_eq!(frame_len(header), Ok(bytes.len()));
            assert_eq!(decode(&bytes), Ok(envelope.clone()));
            assert_eq!(decode_shared(&Bytes::from(bytes)), Ok(envelope));
        }
    }

    /// The two-part encoding sends exactly the bytes of the one-buffer encoding, and a shared
    /// decode hands out the payload as a slice of the received buffer.
    #[test]
    fn data_payload_is_shared_not_copied() {
        let data = Bytes::from(vec![0x5a; 8192]);
        let envelope = Envelope {
            conn_id: 4,
            seq: 5,
            frame: Frame::Data { id: 6, offset_blocks: 7, fua: false, data: data.clone() },
        };
        let parts = encode_parts(&envelope);
        assert_eq!(parts.payload.as_ptr(), data.as_ptr());
        assert_eq!(parts.to_vec(), encode(&envelope));
        let received = Bytes::from(parts.to_vec());
        let Frame::Data { data: payload, .. } = decode_shared(&received).unwrap().frame else {
            panic!("not a Data frame")
        };
        assert_eq!(payload, data);
        assert_eq!(payload.as_ptr(), received[parts.head.len()..].as_ptr());
    }

    /// Any single flipped bit anywhere in a frame is caught (crc32c detects all 1-bit errors).
    #[test]
    fn every_bit_flip_is_rejected() {
        let bytes = encode(&Envelope {
            conn_id: 1,
            seq: 2,
            frame: Frame::Data { id: 3, offset_blocks: 4, fua: false, data: vec![7; 64].into() },
        });
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&damaged).is_err(), "bit {bit} flip accepted");
        }
    }

    /// A promotion frame whose flag is neither 0 nor 1, or that carries more than its fields,
    /// is malformed (resealed with a valid checksum, so the payload check is what refuses it).
    #[test]
    fn promotion_frames_with_a_bad_flag_or_extra_bytes_are_malformed() {
        let reseal = |mut bytes: Vec<u8>| {
            let payload = u32::try_from(bytes.len() - HEADER_BYTES).unwrap();
            bytes[24..28].copy_from_slice(&payload.to_le_bytes());
            let mut digest = crc32c::crc32c(&bytes[..28]);
            digest = crc32c::crc32c_append(digest, &[0, 0, 0, 0]);
            digest = crc32c::crc32c_append(digest, &bytes[HEADER_BYTES..]);
            bytes[28..32].copy_from_slice(&digest.to_le_bytes());
            bytes
        };
        for frame in [
            Frame::PromoteAnswer { txn: 1, granted: true },
            Frame::PromoteEnd { txn: 1, committed: false },
        ] {
            let mut bytes = encode(&Envelope { conn_id: 1, seq: 1, frame });
            *bytes.last_mut().unwrap() = 2;
            assert!(matches!(decode(&reseal(bytes)), Err(FrameError::Malformed(_))));
        }
        let mut long =
            encode(&Envelope { conn_id: 1, seq: 1, frame: Frame::PromoteAsk { txn: 1 } });
        long.push(0);
        assert!(matches!(decode(&reseal(long)), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[0; 31]).is_err());
        assert!(decode(&[0xff; 100]).is_err());
        let mut long = encode(&Envelope { conn_id: 1, seq: 1, frame: Frame::Ping });
        long.push(0);
        assert!(decode(&long).is_err());
    }
}

//! Checksum-based resync (`csums-alg`) and online verify (`verify-alg`), as hooks of `Node`.
//!
//! Both rest on one exchange: the side that decides sends `DigestRequest` for a range, the
//! other reads its own blocks and answers `DigestReply` with one digest per block; the decider
//! then reads its own blocks and compares.
//!
//! Checksum-based resync (DRBD's P_CSUM_RS_REQUEST / P_RS_IS_IN_SYNC, turned around because
//! our resync is driven by the source): the sync source asks for the target's digests instead
//! of reading and sending the data. Blocks whose digests match are "in sync": their bits are
//! cleared like those of a transferred block, once the target confirmed a flush after the
//! reply (a barrier ack), so a target that loses its cache is resynced again. Differing blocks
//! go out as ordinary `ResyncData`. No write ordering beyond the resync's own is needed: the
//! target only ever receives the source's data, so if the target's digest (at any moment)
//! equals the source's current data, the target holds or will hold exactly that data.
//!
//! Online verify (DRBD's P_OV_REQUEST / P_OV_REPLY / P_OV_RESULT): VerifyS walks the device;
//! differing blocks are reported (`Event::VerifyOutOfSync`), counted and marked out of sync in
//! the bitmap of one side only, the primary's (or VerifyS's when neither is primary), so that
//! the next handshake makes that side the sync source of just those blocks; nothing is
//! resynced automatically. Writes keep flowing. A block written while it is compared must not
//! be reported: a comparison counts only if no overlapping write was in flight or queued at
//! either end, nor submitted, from the request until both reads finished (each end watches its
//! own disk; stream order carries every earlier write to the other end before the request or
//! reply). Otherwise the range is checked again later, in halves, and after
//! `VERIFY_RECHECKS_MAX` tries reported as skipped.

use super::{
    DiskOp, Event, Incoming, IoFailed, IoPurpose, LocalState, Node, StateError, TlEntry, blocks_of,
    kib, overlaps,
};
use crate::NodeId;
use crate::constants::{
    BLOCK_BYTES, RESYNC_REQUEST_BLOCKS_MAX, RESYNC_REQUESTS_MAX, RESYNC_STEP_MS,
    VERIFY_RECHECKS_MAX,
};
use crate::protocol::digest::{self, DigestAlg};
use crate::protocol::frame::Frame;
use crate::protocol::persist::MetaUpdate;
use crate::protocol::resync_controller::ResyncController;
use crate::protocol::states::{ConnectionState, DiskState, ReplicationState, Role};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A verify run as its progress is shown (`drbdsetup status`'s `done:` and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyProgress {
    /// This node is VerifyS (it compares); false: VerifyT.
    pub source: bool,
    pub blocks_total: u64,
    pub blocks_done: u64,
    pub out_of_sync_blocks: u64,
    pub skipped_blocks: u64,
    pub rate_kib_per_s: u64,
}

impl VerifyProgress {
    /// Percent done, as `drbdsetup status` prints it (`done:12.34`).
    pub fn percent_done(&self) -> f64 {
        if self.blocks_total == 0 {
            return 100.0;
        }
        // Block counts stay far below 2^52, so the conversion is exact.
        #[allow(clippy::cast_precision_loss)]
        let ratio = self.blocks_done as f64 / self.blocks_total as f64;
        ratio * 100.0
    }
}

/// Verify state of one peer connection; reset when the connection ends.
#[derive(Debug, Default)]
pub(super) struct PeerVerify {
    role: Option<VerifyRole>,
    /// Digest reads for the peer's requests in flight: id -> (first, blocks, a write overlapped).
    target_reads: BTreeMap<u64, (u64, u64, bool)>,
}

#[derive(Debug)]
enum VerifyRole {
    Source(Box<VerifySource>),
    Target(VerifyTarget),
}

#[derive(Debug)]
struct VerifySource {
    alg: DigestAlg,
    first_block: u64,
    end_block: u64,
    cursor: u64,
    in_flight: BTreeMap<u64, VerifyRequest>,
    /// Ranges to compare again: (first, blocks, tries so far).
    recheck: VecDeque<(u64, u64, u32)>,
    controller: ResyncController,
    last_step_ms: u64,
    budget_kib: u64,
    acked_kib_step: u64,
    blocks_done: u64,
    out_of_sync_blocks: u64,
    skipped_blocks: u64,
    started_ms: u64,
}

#[derive(Debug)]
struct VerifyRequest {
    first: u64,
    blocks: u64,
    tries: u32,
    /// An overlapping write was in flight, queued or submitted since the request was sent.
    dirty: bool,
    /// The peer's digests arrived and our own read is in flight.
    reading: bool,
    peer_digests: Vec<u8>,
}

#[derive(Debug)]
struct VerifyTarget {
    first_block: u64,
    end_block: u64,
    blocks_done: u64,
    out_of_sync_blocks: u64,
    started_ms: u64,
}

/// The checksum part of a resync this node drives as sync source.
#[derive(Debug)]
pub(super) struct CsumResync {
    alg: DigestAlg,
    /// Requests whose digests have not arrived.
    awaiting: BTreeSet<u64>,
    /// Digests that arrived, while our own read of the range is in flight.
    digests: BTreeMap<u64, Vec<u8>>,
    pub(super) blocks_in_sync: u64,
    pub(super) blocks_sent: u64,
}

impl CsumResync {
    pub(super) fn new(alg: DigestAlg) -> Self {
        Self {
            alg,
            awaiting: BTreeSet::new(),
            digests: BTreeMap::new(),
            blocks_in_sync: 0,
            blocks_sent: 0,
        }
    }

    pub(super) fn alg(&self) -> DigestAlg {
        self.alg
    }
}

/// Why a digest read was submitted.
#[derive(Debug)]
pub(super) enum DigestRead {
    /// Our blocks for the peer's DigestRequest: reply with their digests.
    ForPeer { peer: NodeId, conn_id: u64, id: u64, alg: DigestAlg },
    /// As checksum-resync source, our blocks to compare with the target's digests.
    CsumSource { peer: NodeId, conn_id: u64, id: u64 },
    /// As VerifyS, our blocks to compare with VerifyT's digests.
    VerifySource { peer: NodeId, conn_id: u64, id: u64 },
}

impl PeerVerify {
    /// The replication state to show: VerifyS/VerifyT while a verify runs over an Established
    /// connection (internally it stays Established: writes flow as usual).
    pub(super) fn shown(&self, replication: ReplicationState) -> ReplicationState {
        match (&self.role, replication) {
            (Some(VerifyRole::Source(_)), ReplicationState::Established) => {
                ReplicationState::VerifyS
            }
            (Some(VerifyRole::Target(_)), ReplicationState::Established) => {
                ReplicationState::VerifyT
            }
            _ => replication,
        }
    }

    /// When the verify controller wants its next step.
    pub(super) fn deadline_ms(&self) -> Option<u64> {
        match &self.role {
            Some(VerifyRole::Source(v)) => Some(v.last_step_ms + RESYNC_STEP_MS),
            _ => None,
        }
    }

    /// A local write to `first..first+blocks` was submitted: comparisons it overlaps are void.
    fn note_write(&mut self, first: u64, blocks: u64) {
        for (f, b, dirty) in self.target_reads.values_mut() {
            if overlaps(*f, *b, first, blocks) {
                *dirty = true;
            }
        }
        if let Some(VerifyRole::Source(v)) = &mut self.role {
            for req in v.in_flight.values_mut() {
                if overlaps(req.first, req.blocks, first, blocks) {
                    req.dirty = true;
                }
            }
        }
    }
}

impl Node {
    /// `drbdadm verify`: online verify against `peer` from `first_block` to the end. This node
    /// becomes VerifyS, the peer VerifyT. Differing blocks are reported and marked out of sync;
    /// a following disconnect/connect resyncs just those.
    pub fn handle_verify(
        &mut self,
        now_ms: u64,
        peer: NodeId,
        first_block: u64,
    ) -> Result<(), StateError> {
        self.advance(now_ms);
        let i = self.peer_index(peer).ok_or(StateError::UnknownPeer(peer))?;
        let alg = self.config.digests.verify_alg.ok_or(StateError::Precondition(
            "verify-alg is not set (net { verify-alg crc32c|sha256; })",
        ))?;
        let p = &self.peers[i];
        if p.connection != ConnectionState::Connected
            || p.handshake.is_some()
            || p.replication != ReplicationState::Established
        {
            return Err(StateError::Precondition("verify needs an Established connection"));
        }
        if p.verify.role.is_some() {
            return Err(StateError::Precondition("a verify is already running"));
        }
        self.mesh_check_verify(i)?;
        if self.disk != DiskState::UpToDate || p.disk != DiskState::UpToDate {
            return Err(StateError::Precondition("verify needs UpToDate data on both nodes"));
        }
        let end_block = self.meta.size_blocks;
        if first_block >= end_block {
            return Err(StateError::Precondition("verify start is beyond the end of the device"));
        }
        self.peers[i].verify.role = Some(VerifyRole::Source(Box::new(VerifySource {
            alg,
            first_block,
            end_block,
            cursor: first_block,
            in_flight: BTreeMap::new(),
            recheck: VecDeque::new(),
            controller: ResyncController::new(self.config.resync_rate),
            last_step_ms: self.now_ms.saturating_sub(RESYNC_STEP_MS),
            budget_kib: 0,
            acked_kib_step: 0,
            blocks_done: 0,
            out_of_sync_blocks: 0,
            skipped_blocks: 0,
            started_ms: self.now_ms,
        })));
        self.send(i, Frame::VerifyStart { first_block, end_block });
        self.emit(Event::ReplicationStateChanged { peer, state: ReplicationState::VerifyS });
        self.pump();
        Ok(())
    }

    pub fn verify_progress(&self, peer: NodeId) -> Option<VerifyProgress> {
        let p = self.peer(peer)?;
        let elapsed = |started: u64| self.now_ms.saturating_sub(started).max(1);
        match p.verify.role.as_ref()? {
            VerifyRole::Source(v) => Some(VerifyProgress {
                source: true,
                blocks_total: v.end_block - v.first_block,
                blocks_done: v.blocks_done,
                out_of_sync_blocks: v.out_of_sync_blocks,
                skipped_blocks: v.skipped_blocks,
                rate_kib_per_s: kib(v.blocks_done) * 1000 / elapsed(v.started_ms),
            }),
            VerifyRole::Target(t) => Some(VerifyProgress {
                source: false,
                blocks_total: t.end_block - t.first_block,
                blocks_done: t.blocks_done,
                out_of_sync_blocks: t.out_of_sync_blocks,
                skipped_blocks: 0,
                rate_kib_per_s: kib(t.blocks_done) * 1000 / elapsed(t.started_ms),
            }),
        }
    }

    /// Hook of `submit`: a local write voids the comparisons it overlaps.
    pub(super) fn note_write_submitted(&mut self, first: u64, blocks: u64) {
        for p in &mut self.peers {
            p.verify.note_write(first, blocks);
        }
    }

    /// A local write to the range is in flight or waits in a peer's queue, so what a read of
    /// it returns now is about to change.
    fn digest_range_busy(&self, first: u64, blocks: u64) -> bool {
        self.app_writes.values().any(|w| {
            w.submitted
                && w.local == LocalState::Pending
                && overlaps(w.first, w.blocks, first, blocks)
        }) || self.peer_writes.values().any(|(f, b)| overlaps(*f, *b, first, blocks))
            || self.peers.iter().any(|p| {
                p.queue.iter().any(|q| match q {
                    Incoming::Write { first: f, data, .. } => {
                        blocks_of(data.len()).is_some_and(|b| overlaps(*f, b, first, blocks))
                    }
                    Incoming::Barrier { .. } | Incoming::Read { .. } => false,
                })
            })
    }

    /// Hook of `pump_resync`: instead of reading a range to send it, ask the target for its
    /// digests (checksum-based resync).
    pub(super) fn send_csum_request(
        &mut self,
        i: usize,
        id: u64,
        first: u64,
        blocks: u64,
        alg: DigestAlg,
    ) {
        if let Some(c) = self.peers[i].resync.as_mut().and_then(|r| r.csums.as_mut()) {
            c.awaiting.insert(id);
        }
        self.send(i, Frame::DigestRequest { id, offset_blocks: first, blocks, alg, verify: false });
    }

    fn valid_range(&self, first: u64, blocks: u64) -> bool {
        blocks > 0
            && blocks <= RESYNC_REQUEST_BLOCKS_MAX
            && first.checked_add(blocks).is_some_and(|end| end <= self.meta.size_blocks)
    }

    /// Hook of `handle_frame` for the frames of this module.
    pub(super) fn handle_digest_frame(&mut self, i: usize, frame: Frame) {
        match frame {
            Frame::VerifyStart { first_block, end_block } => {
                self.handle_verify_start(i, first_block, end_block)
            }
            Frame::DigestRequest { id, offset_blocks, blocks, alg, verify } => {
                self.handle_digest_request(i, id, offset_blocks, blocks, alg, verify)
            }
            Frame::DigestReply { id, reliable, digests } => {
                self.handle_digest_reply(i, id, reliable, digests)
            }
            Frame::VerifyResult { offset_blocks, blocks, differing, receiver_marks } => {
                self.handle_verify_result(i, offset_blocks, blocks, &differing, receiver_marks)
            }
            Frame::VerifyDone { out_of_sync_blocks, completed } => {
                self.handle_verify_done(i, out_of_sync_blocks, completed)
            }
            _ => unreachable!("only digest frames are routed here"),
        }
    }

    fn handle_verify_start(&mut self, i: usize, first_block: u64, end_block: u64) {
        let peer = self.peers[i].id;
        if first_block >= end_block || end_block > self.meta.size_blocks {
            self.protocol_error(i, "VerifyStart outside the device".into());
            return;
        }
        if let Some(VerifyRole::Source(_)) = &self.peers[i].verify.role {
            // Both started at once: the lower node id keeps its run, the other yields.
            if self.id < peer {
                return;
            }
            self.end_verify(i, false);
        }
        let p = &self.peers[i];
        if p.replication != ReplicationState::Established
            || p.verify.role.is_some()
            || self.disk != DiskState::UpToDate
            || self.mesh_check_verify(i).is_err()
        {
            self.send(i, Frame::VerifyDone { out_of_sync_blocks: 0, completed: false });
            return;
        }
        self.peers[i].verify.role = Some(VerifyRole::Target(VerifyTarget {
            first_block,
            end_block,
            blocks_done: 0,
            out_of_sync_blocks: 0,
            started_ms: self.now_ms,
        }));
        self.emit(Event::ReplicationStateChanged { peer, state: ReplicationState::VerifyT });
    }

    fn handle_digest_request(
        &mut self,
        i: usize,
        id: u64,
        first: u64,
        blocks: u64,
        alg: DigestAlg,
        verify: bool,
    ) {
        if !self.valid_range(first, blocks) {
            self.protocol_error(i, "DigestRequest outside the device".into());
            return;
        }
        let p = &self.peers[i];
        let allowed = if verify {
            p.replication == ReplicationState::Established && self.disk.has_data()
        } else {
            p.replication == ReplicationState::SyncTarget
        };
        if !allowed {
            self.protocol_error(i, "unexpected DigestRequest".into());
            return;
        }
        if p.verify.target_reads.len() >= RESYNC_REQUESTS_MAX * 2 {
            self.protocol_error(i, "too many DigestRequests in flight".into());
            return;
        }
        // A verify request of a run we do not (or no longer) take part in as VerifyT is
        // answered, but as unreliable: e.g. we stopped the run because a third node became
        // primary, and its writes may already be on our disk but not yet on the peer's.
        let not_target = verify && !matches!(p.verify.role, Some(VerifyRole::Target(_)));
        let busy = not_target || self.digest_range_busy(first, blocks);
        let (peer, conn_id) = (p.id, p.conn_id);
        self.peers[i].verify.target_reads.insert(id, (first, blocks, busy));
        self.submit(
            DiskOp::Read { offset_blocks: first, blocks },
            IoPurpose::Digest(DigestRead::ForPeer { peer, conn_id, id, alg }),
        );
    }

    fn handle_digest_reply(&mut self, i: usize, id: u64, reliable: bool, digests: Vec<u8>) {
        let csum = self.peers[i]
            .resync
            .as_mut()
            .and_then(|r| r.csums.as_mut())
            .is_some_and(|c| c.awaiting.remove(&id));
        if csum {
            self.handle_csum_reply(i, id, reliable, digests);
            return;
        }
        let peer_busy = match &self.peers[i].verify.role {
            Some(VerifyRole::Source(v)) => match v.in_flight.get(&id) {
                Some(req) if req.reading => {
                    self.protocol_error(i, "DigestReply twice".into());
                    return;
                }
                Some(req) => {
                    let length_ok = u64::try_from(digests.len()).ok()
                        == req.blocks.checked_mul(v.alg.digest_bytes() as u64);
                    if !length_ok {
                        self.protocol_error(i, "DigestReply of the wrong length".into());
                        return;
                    }
                    !reliable || req.dirty
                }
                // A reply to a request of a verify that ended (stopped, or yielded to the
                // peer's): ids are never reused on a connection, so it is simply stale.
                None => return,
            },
            _ => return,
        };
        let (first, blocks) = {
            let Some(VerifyRole::Source(v)) = &self.peers[i].verify.role else { unreachable!() };
            let req = &v.in_flight[&id];
            (req.first, req.blocks)
        };
        if peer_busy || self.digest_range_busy(first, blocks) {
            self.verify_recheck(i, id);
            return;
        }
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        if let Some(VerifyRole::Source(v)) = &mut self.peers[i].verify.role {
            let req = v.in_flight.get_mut(&id).expect("looked up above");
            req.reading = true;
            req.peer_digests = digests;
        }
        self.submit(
            DiskOp::Read { offset_blocks: first, blocks },
            IoPurpose::Digest(DigestRead::VerifySource { peer, conn_id, id }),
        );
    }

    /// The target's digests for a checksum-resync request arrived: read our own blocks to
    /// compare, unless a write to them is in flight (then the request is dropped and the next
    /// pass over the bitmap asks again; its bits are still set).
    fn handle_csum_reply(&mut self, i: usize, id: u64, reliable: bool, digests: Vec<u8>) {
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        let Some(&(first, blocks, _, _)) =
            self.peers[i].resync.as_ref().and_then(|r| r.in_flight.get(&id))
        else {
            self.protocol_error(i, "DigestReply for an unknown resync request".into());
            return;
        };
        if self.write_conflicts(first, blocks) {
            let r = self.peers[i].resync.as_mut().expect("checked above");
            r.in_flight.remove(&id);
            return;
        }
        let r = self.peers[i].resync.as_mut().expect("checked above");
        let entry = r.in_flight.get_mut(&id).expect("checked above");
        // Not "sent" any more: our read is in flight, and writes to the range wait for it.
        entry.2 = false;
        if reliable {
            r.csums.as_mut().expect("a csums request").digests.insert(id, digests);
        }
        self.submit(
            DiskOp::Read { offset_blocks: first, blocks },
            IoPurpose::Digest(DigestRead::CsumSource { peer, conn_id, id }),
        );
    }

    fn handle_verify_result(
        &mut self,
        i: usize,
        first: u64,
        blocks: u64,
        differing: &[u64],
        receiver_marks: bool,
    ) {
        if !self.valid_range(first, blocks)
            || differing.len() != usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX)
        {
            self.protocol_error(i, "malformed VerifyResult".into());
            return;
        }
        let runs = digest::mask_runs(differing, blocks);
        let found: u64 = runs.iter().map(|(_, b)| b).sum();
        match &mut self.peers[i].verify.role {
            Some(VerifyRole::Target(t)) => {
                t.blocks_done += blocks;
                t.out_of_sync_blocks += found;
            }
            // The result of a run this node no longer takes part in.
            _ => return,
        }
        self.report_out_of_sync(i, first, &runs, receiver_marks);
    }

    fn handle_verify_done(&mut self, i: usize, _out_of_sync_blocks: u64, completed: bool) {
        match &self.peers[i].verify.role {
            Some(VerifyRole::Target(_)) => self.end_verify(i, completed),
            // The peer refused or stopped our run.
            Some(VerifyRole::Source(_)) => self.end_verify(i, false),
            None => {}
        }
    }

    /// Reports differing runs (offsets relative to `first`) and, when this side keeps them,
    /// marks them out of sync. No new generation starts: the data did not change, and equal
    /// generations with bits on one side make that side the sync source on the next connect.
    fn report_out_of_sync(&mut self, i: usize, first: u64, runs: &[(u64, u64)], mark: bool) {
        let peer = self.peers[i].id;
        for (offset, blocks) in runs {
            let first_block = first + offset;
            self.emit(Event::VerifyOutOfSync { peer, first_block, blocks: *blocks });
            let bitmap = &self.meta.bitmaps[peer.index()];
            if mark && !(first_block..first_block + blocks).all(|b| bitmap.test(b)) {
                self.persist(MetaUpdate::BitmapSet { peer, first_block, blocks: *blocks });
            }
        }
    }

    /// Ends this node's part in a verify run with `peer` index `i`, telling the peer when we
    /// are the source.
    fn end_verify(&mut self, i: usize, completed: bool) {
        let peer = self.peers[i].id;
        let Some(role) = self.peers[i].verify.role.take() else { return };
        let (blocks, found, skipped) = match &role {
            VerifyRole::Source(v) => (v.blocks_done, v.out_of_sync_blocks, v.skipped_blocks),
            VerifyRole::Target(t) => (t.blocks_done, t.out_of_sync_blocks, 0),
        };
        if matches!(role, VerifyRole::Source(_)) {
            self.send(i, Frame::VerifyDone { out_of_sync_blocks: found, completed });
        }
        self.emit(Event::VerifyFinished {
            peer,
            blocks_verified: blocks,
            out_of_sync_blocks: found,
            skipped_blocks: skipped,
            completed,
            source: matches!(role, VerifyRole::Source(_)),
        });
        let state = self.peers[i].replication;
        self.emit(Event::ReplicationStateChanged { peer, state });
    }

    /// Hook of a peer's role becoming known (its State frame, a handshake): in a mesh, a verify
    /// between two secondaries relies on no third node writing to both (its writes reach the
    /// two over separate streams, so one end may read a block before such a write and the
    /// other after it, and report a false difference). A primary that appears mid-run ends
    /// the run at this end, before any of its writes is applied here; the other end learns of
    /// it by `VerifyDone`.
    pub(super) fn verify_peer_role_known(&mut self) {
        for i in 0..self.peers.len() {
            if self.peers[i].verify.role.is_none() || self.mesh_check_verify(i).is_ok() {
                continue;
            }
            if matches!(self.peers[i].verify.role, Some(VerifyRole::Target(_))) {
                // Stops the source; its own VerifyDone back finds no run here.
                self.send(i, Frame::VerifyDone { out_of_sync_blocks: 0, completed: false });
            }
            self.end_verify(i, false);
        }
    }

    /// Hook of `disconnect`: a verify run ends with the connection (not completed).
    pub(super) fn verify_connection_lost(&mut self, i: usize) {
        let verify = std::mem::take(&mut self.peers[i].verify);
        let Some(role) = verify.role else { return };
        let (blocks, found, skipped, source) = match &role {
            VerifyRole::Source(v) => (v.blocks_done, v.out_of_sync_blocks, v.skipped_blocks, true),
            VerifyRole::Target(t) => (t.blocks_done, t.out_of_sync_blocks, 0, false),
        };
        let peer = self.peers[i].id;
        self.emit(Event::VerifyFinished {
            peer,
            blocks_verified: blocks,
            out_of_sync_blocks: found,
            skipped_blocks: skipped,
            completed: false,
            source,
        });
    }

    /// A comparison was void (a write overlapped it): check the range again later, in halves
    /// so that a hot block does not keep a whole range from being verified.
    fn verify_recheck(&mut self, i: usize, id: u64) {
        let Some(VerifyRole::Source(v)) = &mut self.peers[i].verify.role else { return };
        let Some(req) = v.in_flight.remove(&id) else { return };
        let tries = req.tries + 1;
        if tries > VERIFY_RECHECKS_MAX {
            v.skipped_blocks += req.blocks;
            v.blocks_done += req.blocks;
            return;
        }
        if req.blocks > 1 {
            let half = req.blocks / 2;
            v.recheck.push_back((req.first, half, tries));
            v.recheck.push_back((req.first + half, req.blocks - half, tries));
        } else {
            v.recheck.push_back((req.first, 1, tries));
        }
    }

    /// Hook of `pump`: issues verify requests within the controller's budget, and finishes.
    pub(super) fn pump_verify(&mut self, i: usize) {
        let app_busy = self.last_app_write_ms + RESYNC_STEP_MS * 2 > self.now_ms
            && self.last_app_write_ms != 0;
        let now = self.now_ms;
        {
            let Some(VerifyRole::Source(v)) = &mut self.peers[i].verify.role else { return };
            if v.last_step_ms + RESYNC_STEP_MS <= now {
                let in_flight_kib: u64 = v.in_flight.values().map(|r| kib(r.blocks)).sum();
                v.budget_kib = v.controller.step(v.acked_kib_step, in_flight_kib, app_busy);
                v.acked_kib_step = 0;
                v.last_step_ms = now;
            }
        }
        loop {
            let Some(VerifyRole::Source(v)) = &mut self.peers[i].verify.role else { return };
            if v.in_flight.len() >= RESYNC_REQUESTS_MAX || v.budget_kib == 0 {
                break;
            }
            let (first, blocks, tries) = if v.cursor < v.end_block {
                let blocks = (v.end_block - v.cursor).min(RESYNC_REQUEST_BLOCKS_MAX);
                let first = v.cursor;
                v.cursor += blocks;
                (first, blocks, 0)
            } else if let Some(range) = v.recheck.pop_front() {
                range
            } else {
                break;
            };
            v.budget_kib = v.budget_kib.saturating_sub(kib(blocks));
            let alg = v.alg;
            let dirty = self.digest_range_busy(first, blocks);
            let id = self.peers[i].next_resync_id;
            self.peers[i].next_resync_id += 1;
            let Some(VerifyRole::Source(v)) = &mut self.peers[i].verify.role else { return };
            v.in_flight.insert(
                id,
                VerifyRequest { first, blocks, tries, dirty, reading: false, peer_digests: vec![] },
            );
            self.send(
                i,
                Frame::DigestRequest { id, offset_blocks: first, blocks, alg, verify: true },
            );
        }
        let Some(VerifyRole::Source(v)) = &self.peers[i].verify.role else { return };
        if v.cursor >= v.end_block && v.in_flight.is_empty() && v.recheck.is_empty() {
            self.end_verify(i, true);
        }
    }

    /// Hook of `handle_disk_completion` for the reads of this module.
    pub(super) fn handle_digest_read(
        &mut self,
        read: DigestRead,
        result: Result<Option<Vec<u8>>, IoFailed>,
    ) {
        let (peer, conn_id) = match &read {
            DigestRead::ForPeer { peer, conn_id, .. }
            | DigestRead::CsumSource { peer, conn_id, .. }
            | DigestRead::VerifySource { peer, conn_id, .. } => (*peer, *conn_id),
        };
        let i = self.peer_index(peer).expect("configured peer");
        let current = self.peers[i].conn_id == conn_id
            && self.peers[i].connection == ConnectionState::Connected;
        let data = match result {
            Err(IoFailed) => {
                // As any failed read: the disk is detached (and the connection with it).
                self.detach();
                return;
            }
            Ok(Some(data)) if current => data,
            Ok(_) => return,
        };
        match read {
            DigestRead::ForPeer { id, alg, .. } => {
                let Some((_, _, dirty)) = self.peers[i].verify.target_reads.remove(&id) else {
                    return;
                };
                let digests = digest::block_digests(alg, &data);
                self.send(i, Frame::DigestReply { id, reliable: !dirty, digests });
            }
            DigestRead::CsumSource { id, .. } => self.finish_csum_compare(i, id, &data),
            DigestRead::VerifySource { id, .. } => self.finish_verify_compare(i, id, &data),
        }
    }

    /// Our data for a checksum-resync request is here: equal blocks are in sync (cleared
    /// after the next barrier ack), differing runs are sent as resync data.
    fn finish_csum_compare(&mut self, i: usize, id: u64, data: &[u8]) {
        let peer = self.peers[i].id;
        let epoch = self.peers[i].epoch;
        let Some(r) = self.peers[i].resync.as_mut() else { return };
        let Some((first, blocks, _, _)) = r.in_flight.remove(&id) else { return };
        let c = r.csums.as_mut().expect("a csums request");
        let theirs = c.digests.remove(&id);
        let mine = digest::block_digests(c.alg, data);
        let all_differ = vec![u64::MAX; usize::try_from(blocks.div_ceil(64)).expect("small")];
        let mask = theirs
            .and_then(|t| digest::differing_blocks(c.alg, blocks, &mine, &t))
            .unwrap_or(all_differ);
        let differing = digest::mask_runs(&mask, blocks);
        let mut equal = Vec::new();
        let mut at = 0;
        for (offset, len) in differing.iter().copied().chain([(blocks, 0)]) {
            if offset > at {
                equal.push((at, offset - at));
            }
            at = offset + len;
        }
        for (offset, len) in equal {
            c.blocks_in_sync += len;
            r.acked_kib_step += kib(len);
            r.acked_blocks_total += len;
            let tl = self.next_tl;
            self.next_tl += 1;
            self.transfer_log.insert(
                tl,
                TlEntry {
                    first: first + offset,
                    blocks: len,
                    resync: true,
                    local_done: true,
                    local_stable: true,
                    flush_generation: None,
                    peers: vec![(peer, epoch)],
                },
            );
        }
        for (offset, len) in differing {
            let r = self.peers[i].resync.as_mut().expect("checked above");
            r.csums.as_mut().expect("a csums request").blocks_sent += len;
            let sub = self.peers[i].next_resync_id;
            self.peers[i].next_resync_id += 1;
            let r = self.peers[i].resync.as_mut().expect("checked above");
            r.in_flight.insert(sub, (first + offset, len, true, epoch));
            let start = usize::try_from(offset).expect("small") * BLOCK_BYTES;
            let end = start + usize::try_from(len).expect("small") * BLOCK_BYTES;
            let slice = data[start..end].to_vec();
            self.send(i, Frame::ResyncData { id: sub, offset_blocks: first + offset, data: slice });
        }
    }

    fn finish_verify_compare(&mut self, i: usize, id: u64, data: &[u8]) {
        let Some(VerifyRole::Source(v)) = &mut self.peers[i].verify.role else { return };
        let Some(req) = v.in_flight.get(&id) else { return };
        if req.dirty {
            self.verify_recheck(i, id);
            return;
        }
        let req = v.in_flight.remove(&id).expect("looked up above");
        let mine = digest::block_digests(v.alg, data);
        let mask = digest::differing_blocks(v.alg, req.blocks, &mine, &req.peer_digests)
            .expect("reply length checked on receipt");
        let runs = digest::mask_runs(&mask, req.blocks);
        let found: u64 = runs.iter().map(|(_, b)| b).sum();
        v.out_of_sync_blocks += found;
        v.blocks_done += req.blocks;
        v.acked_kib_step += kib(req.blocks);
        let peer_role = self.peers[i].role;
        let mark_here = self.role == Role::Primary || peer_role != Role::Primary;
        self.report_out_of_sync(i, req.first, &runs, mark_here);
        self.send(
            i,
            Frame::VerifyResult {
                offset_blocks: req.first,
                blocks: req.blocks,
                differing: mask,
                receiver_marks: !mark_here,
            },
        );
    }
}

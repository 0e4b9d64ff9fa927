//! Online grow (DRBD's `drbdadm resize`), as hooks of `Node`.
//!
//! Every replica's backing grows first (the admin or tandemd grows the file). Then the primary
//! negotiates: it sends `ResizeSizes { query }` with its own usable size to every Established
//! peer; each peer asks its driver for its usable size (`Event::UsableSizeWanted`, answered
//! with `Node::handle_usable_size`) and answers. The new size is the smallest usable size of
//! the primary and the peers that answered, as DRBD takes the minimum of the connected
//! backing devices; a result below the current size is refused (no shrink), an equal one
//! changes nothing. The primary then persists `MetaUpdate::Resize` (the driver moves internal
//! metadata to the new end, see `driver::meta_v09`) and sends `ResizeCommit` to every
//! Established peer, which grows before it handles any later frame, so no write to the new
//! blocks reaches a replica that has not grown. `Event::ResizeFinished` reports the outcome.
//!
//! The new blocks: DRBD marks them out of sync (unless `--assume-clean`) and resyncs them.
//! Here every replica's new blocks are a *fresh zero area*: the backing file grew with zeros
//! (`truncate`/`ftruncate` give a hole), and the move wipes the old metadata area, the only
//! part of the new blocks that held anything. So the new blocks are equal on every replica
//! that took part, and none is marked for them: the grow costs no resync. A peer that was not
//! Established gets the new blocks marked in its bitmap, so its reconnect resyncs them (its
//! own new area may hold anything, e.g. a file grown by copying).
//!
//! A peer that missed the resize learns the new size on its next handshake: a Hello with a
//! larger size makes the smaller side grow (if its backing allows, else it refuses the
//! connection), before the bitmap exchange that follows the Hello. The larger side marks
//! the smaller peer's new blocks when it reads that Hello (its bitmap already went out, so the
//! smaller side counts them as the peer's bits, `resize_grew_by_hello`): both ends decide the
//! resync of the new area even with equal generations (in a mesh, the larger side may hold
//! no bits for the peer at all, having grown and taken the new blocks from a third node).

use super::{Event, Node, StateError};
use crate::NodeId;
use crate::constants::HANDSHAKE_TIMEOUT_MS;
use crate::protocol::frame::{Frame, Hello};
use crate::protocol::persist::MetaUpdate;
use crate::protocol::states::{ConnectionState, DiskState, ReplicationState, Role};

/// A resize being negotiated on this node.
#[derive(Debug)]
struct Pending {
    started_ms: u64,
    /// Peers (node id bits) whose usable size has not arrived yet.
    waiting: u64,
    /// The smallest usable size so far (this node's included).
    usable_blocks_min: u64,
}

/// Resize state of a node.
#[derive(Debug, Default)]
pub(super) struct ResizeState {
    pending: Option<Pending>,
    /// Peers (bits) that asked for our usable size, answered once the driver reported it.
    queries: u64,
    /// Our usable size as the driver last reported it (0: never).
    usable_blocks: u64,
    /// Peers whose Hello made this node grow, with that connection (see
    /// `resize_grew_by_hello`).
    grown_by_hello: std::collections::BTreeMap<NodeId, u64>,
}

impl Node {
    /// A connected peer is in its handshake, a resync or a verify: no resize now.
    fn resize_peer_busy(&self) -> bool {
        self.peers.iter().any(|p| {
            // A verify keeps the connection Established inside (`PeerVerify::shown`).
            p.connection == ConnectionState::Connected
                && (p.handshake.is_some()
                    || p.verify.shown(p.replication) != ReplicationState::Established)
        })
    }

    /// `resize` on this node (the primary): negotiate the new size with the Established peers
    /// given this node's usable size (the data blocks its grown backing can hold).
    pub fn handle_resize(&mut self, now_ms: u64, usable_blocks: u64) -> Result<(), StateError> {
        self.advance(now_ms);
        if self.role != Role::Primary {
            return Err(StateError::Precondition("resize runs on the primary"));
        }
        if self.resize.pending.is_some() {
            return Err(StateError::Precondition("a resize is already running"));
        }
        if self.is_detached() {
            return Err(StateError::Precondition(
                "the disk is detached: nothing to grow here; attach it first",
            ));
        }
        if self.resize_peer_busy() {
            return Err(StateError::Precondition(
                "a handshake, resync or verify is running; resize when it finished",
            ));
        }
        self.resize.usable_blocks = usable_blocks;
        let mut waiting = 0;
        for i in 0..self.peers.len() {
            if self.peers[i].connection == ConnectionState::Connected {
                waiting |= self.peers[i].id.bit();
                self.send(i, Frame::ResizeSizes { usable_blocks, query: true });
            }
        }
        self.resize.pending =
            Some(Pending { started_ms: self.now_ms, waiting, usable_blocks_min: usable_blocks });
        self.resize_poll();
        self.pump();
        Ok(())
    }

    /// The driver's answer to `Event::UsableSizeWanted`.
    pub fn handle_usable_size(&mut self, now_ms: u64, usable_blocks: u64) {
        self.advance(now_ms);
        self.resize.usable_blocks = usable_blocks;
        let queries = std::mem::take(&mut self.resize.queries);
        for i in 0..self.peers.len() {
            if queries & self.peers[i].id.bit() != 0
                && self.peers[i].connection == ConnectionState::Connected
            {
                self.send(i, Frame::ResizeSizes { usable_blocks, query: false });
            }
        }
        self.pump();
    }

    /// A resize is being negotiated on this node.
    pub fn resize_pending(&self) -> bool {
        self.resize.pending.is_some()
    }

    pub(super) fn handle_resize_frame(&mut self, i: usize, frame: Frame) {
        let peer = self.peers[i].id;
        match frame {
            Frame::ResizeSizes { query: true, .. } => {
                if self.disk == DiskState::Diskless {
                    // Nothing to grow here: never the limit.
                    self.send(i, Frame::ResizeSizes { usable_blocks: u64::MAX, query: false });
                    return;
                }
                self.resize.queries |= peer.bit();
                self.emit(Event::UsableSizeWanted);
            }
            Frame::ResizeSizes { usable_blocks, query: false } => {
                let Some(pending) = self.resize.pending.as_mut() else { return };
                if pending.waiting & peer.bit() != 0 {
                    pending.waiting &= !peer.bit();
                    pending.usable_blocks_min = pending.usable_blocks_min.min(usable_blocks);
                }
                self.resize_poll();
            }
            Frame::ResizeCommit { size_blocks } => {
                if size_blocks <= self.meta.size_blocks {
                    return;
                }
                if !self.resize_grow_local(size_blocks) {
                    self.protocol_error(i, format!("cannot grow to {size_blocks} blocks"));
                }
            }
            _ => unreachable!("only resize frames are routed here"),
        }
    }

    /// Grows this replica to `size_blocks` if its backing allows; false if not.
    fn resize_grow_local(&mut self, size_blocks: u64) -> bool {
        let old = self.meta.size_blocks;
        assert!(size_blocks > old);
        if self.disk == DiskState::Diskless {
            // No metadata of its own to move; the size lives in memory (a restart learns it
            // again from the next Hello).
            self.meta.apply(&MetaUpdate::Resize { size_blocks });
        } else {
            if self.resize.usable_blocks < size_blocks {
                return false;
            }
            self.persist(MetaUpdate::Resize { size_blocks });
        }
        for p in &mut self.peers {
            if let Some(handshake) = p.handshake.as_mut() {
                handshake.bitmap = handshake.bitmap.grown(size_blocks);
            }
        }
        self.emit(Event::ResizeFinished { old_blocks: old, new_blocks: size_blocks, error: None });
        true
    }

    /// A Hello announced `hello.size_blocks` that differs from ours: true if the handshake may
    /// go on. The smaller side grows (a peer that missed a resize); the larger waits for it.
    pub(super) fn resize_handshake_size(&mut self, hello: &Hello) -> bool {
        let ours = self.meta.size_blocks;
        if hello.size_blocks < ours {
            // The peer grows when it reads our Hello, or refuses the connection. Its new
            // blocks may hold anything, so they are out of sync for it (DRBD marks a grown
            // area for every peer that did not grow with it): without this mark a node that
            // took its new blocks from a third one (a resync after growing by its Hello)
            // met the smaller peer with no bits and equal generations and decided NoSync,
            // leaving the peer's new area as it was (mesh seed 1145).
            if hello.disk != DiskState::Diskless && self.disk.has_data() {
                let (peer, blocks) = (hello.node_id, ours - hello.size_blocks);
                let first = hello.size_blocks;
                let bitmap = &self.meta.bitmaps[peer.index()];
                if !(first..ours).all(|b| bitmap.test(b)) {
                    self.persist(MetaUpdate::BitmapSet { peer, first_block: first, blocks });
                }
            }
            return true;
        }
        if hello.disk == DiskState::Diskless {
            return true;
        }
        let grown = self.resize_grow_local(hello.size_blocks);
        if grown && let Some(i) = self.peer_index(hello.node_id) {
            let conn_id = self.peers[i].conn_id;
            self.resize.grown_by_hello.insert(hello.node_id, conn_id);
        }
        grown
    }

    /// Hook of `finish_handshake`: this node grew on peer `i`'s Hello in this handshake. The
    /// peer marked our new blocks out of sync when it read our smaller Hello (see
    /// `resize_handshake_size`), after its bitmap had gone out, so we count its bits as
    /// non-empty, as it does: both ends decide the same resync of the new area.
    pub(super) fn resize_grew_by_hello(&mut self, i: usize) -> bool {
        let p = &self.peers[i];
        self.resize.grown_by_hello.remove(&p.id) == Some(p.conn_id)
    }

    /// Hook of `finish_handshake`: a diskless node (a tiebreaker, `disk none`) takes a
    /// larger size from a diskful peer, as DRBD sizes a diskless node by its peers. Without
    /// it a tiebreaker that missed a `ResizeCommit` (down, or cut off) kept the old size for
    /// good: the size check skips diskless ends, so no handshake corrected it.
    pub(super) fn resize_diskless_learn(&mut self, hello: &Hello) {
        if self.disk == DiskState::Diskless
            && hello.disk != DiskState::Diskless
            && hello.size_blocks > self.meta.size_blocks
        {
            let grown = self.resize_grow_local(hello.size_blocks);
            assert!(grown, "a diskless node grows in memory");
        }
    }

    /// Finishes a negotiation whose answers are in, or fails one that took too long.
    pub(super) fn resize_poll(&mut self) {
        let Some(pending) = self.resize.pending.as_mut() else { return };
        // A peer that left will learn the new size on reconnect.
        for p in &self.peers {
            if p.connection != ConnectionState::Connected || p.handshake.is_some() {
                pending.waiting &= !p.id.bit();
            }
        }
        let old = self.meta.size_blocks;
        if pending.waiting != 0 {
            if pending.started_ms + HANDSHAKE_TIMEOUT_MS <= self.now_ms {
                self.resize.pending = None;
                let error = Some("a peer did not report its size in time".to_string());
                self.emit(Event::ResizeFinished { old_blocks: old, new_blocks: old, error });
            }
            return;
        }
        let new = pending.usable_blocks_min;
        self.resize.pending = None;
        if self.role != Role::Primary {
            let error = Some("no longer primary".to_string());
            self.emit(Event::ResizeFinished { old_blocks: old, new_blocks: old, error });
            return;
        }
        if new < old {
            let error = Some(format!(
                "refusing to shrink from {old} to {new} blocks: a replica's backing is smaller than the device; grow every replica's backing file first"
            ));
            self.emit(Event::ResizeFinished { old_blocks: old, new_blocks: old, error });
            return;
        }
        if new == old {
            self.emit(Event::ResizeFinished { old_blocks: old, new_blocks: old, error: None });
            return;
        }
        if self.is_detached() {
            // The disk failed while we negotiated: the new size cannot be persisted here, and
            // committing it to the peers anyway left a tiebreaker at a size no diskful node
            // had (seed 164 --nodes 3, primary disk failures under quorum).
            let error = Some("the disk detached during the resize".to_string());
            self.emit(Event::ResizeFinished { old_blocks: old, new_blocks: old, error });
            return;
        }
        if self.resize_peer_busy() {
            // A peer connected (or started a resync or verify) while we negotiated: its
            // handshake carried the old size, so it would stay at the old size while
            // connected, and a handshake bitmap of the old size would meet the new one.
            // Refused as `handle_resize` refuses it up front: the admin runs it again.
            let error = Some(
                "a handshake, resync or verify started during the resize; resize again when it finished"
                    .to_string(),
            );
            self.emit(Event::ResizeFinished { old_blocks: old, new_blocks: old, error });
            return;
        }
        self.persist(MetaUpdate::Resize { size_blocks: new });
        let peers: Vec<(usize, NodeId, bool)> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let established = p.connection == ConnectionState::Connected
                    && p.handshake.is_none()
                    && p.replication == ReplicationState::Established;
                (i, p.id, established)
            })
            .collect();
        for (i, peer, established) in peers {
            if established {
                self.send(i, Frame::ResizeCommit { size_blocks: new });
            } else {
                // It missed the resize: whatever its new blocks hold, resync them.
                self.mark_out_of_sync(peer, old, new - old);
            }
        }
        self.emit(Event::ResizeFinished { old_blocks: old, new_blocks: new, error: None });
    }
}

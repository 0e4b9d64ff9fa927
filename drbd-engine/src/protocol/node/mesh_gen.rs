//! Generations in the mesh that outlive a resync or an adoption (a child module of `node`,
//! so that `node.rs` carries one-line hooks). Three diskful nodes only; with two (and a
//! tiebreaker) nothing here acts.
//!
//! - A sync target becomes a copy of its source, so towards every third node it must stand
//!   where the source stands: the source's bitmap UUIDs for third nodes are its own once the
//!   resync ends (`mesh_gen_resync_done`). The target learns them from the source's Hello
//!   and, while the resync runs, from the source's `MeshTargets` (a primary that starts a
//!   generation for a peer it lost names that peer among the lost ones; the base is the
//!   generation it held before). Without them the target took the source's current
//!   generation with no base for a third node it held bits for, its short history soon lost
//!   the generation that node holds, and the two were found split (seed 1263).
//! - A node Established with a diskful peer that it tracks by a bitmap base, or holds bits
//!   for, has moved on without it (it adopted a primary's new generation, inherited a base
//!   at the end of a resync, or took a primary's writes that skipped the peer, while the
//!   peer was out of the primary's reach): the handshake that made them
//!   Established no longer holds. Handshake again (`mesh_gen_pump`); between secondaries it
//!   waits while a primary replicates (`mesh_defer_sync`). Otherwise the node, promoted
//!   later, reported that peer in sync, the peer adopted the new generation without the
//!   writes it missed, and a third node holding them was found in sync with it (seed 457).
//! - A sync source whose resync ended before the target's `State` (Inconsistent) arrived,
//!   as when there was nothing to copy, still takes that State as the answer to its fence:
//!   the peer became its target on this connection (seed 61: the primary's I/O stayed
//!   frozen for good).

use super::*;

/// The mesh generation bookkeeping of a `Node`.
#[derive(Debug, Default)]
pub(super) struct MeshGenState {
    /// As sync target: the source (with its connection), its current generation and its
    /// bitmap bases for each node as we last learned them.
    source_view: Option<SourceView>,
    /// As sync source: the connection of each peer we finished a resync to.
    sourced: BTreeMap<NodeId, u64>,
}

#[derive(Debug)]
struct SourceView {
    peer: NodeId,
    conn_id: u64,
    current: u64,
    bases: [u64; crate::constants::NODE_ID_MAX as usize + 1],
}

impl Node {
    fn mesh_gen_active(&self) -> bool {
        self.mesh_enabled() && !self.config.quorum.diskless
    }

    /// We became peer `i`'s sync target; `theirs` is what its Hello said.
    pub(super) fn mesh_gen_target_started(&mut self, i: usize, theirs: &uuid::GenerationUuids) {
        if !self.mesh_gen_active() {
            return;
        }
        let p = &self.peers[i];
        let mut bases = theirs.bitmap;
        for b in &mut bases {
            *b &= !uuid::UUID_PRIMARY_FLAG;
        }
        self.mesh_gen.source_view =
            Some(SourceView { peer: p.id, conn_id: p.conn_id, current: theirs.current, bases });
    }

    /// Peer `i` sent `MeshTargets` (before the mesh handles it): if it is our sync source,
    /// follow the generations it starts and the peers it tracks.
    pub(super) fn mesh_gen_targets(&mut self, i: usize, current: u64, lost: u64) {
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        let Some(v) = self.mesh_gen.source_view.as_mut() else { return };
        if v.peer != peer || v.conn_id != conn_id {
            return;
        }
        for (index, base) in v.bases.iter_mut().enumerate() {
            let bit = 1u64.checked_shl(u32::try_from(index).unwrap_or(u32::MAX)).unwrap_or(0);
            if lost & bit == 0 {
                *base = 0;
            } else if *base == 0 && current != v.current {
                *base = v.current;
            }
        }
        v.current = current;
    }

    /// Our resync from peer `i` ended with its generation `current_uuid` (already taken):
    /// take its bases for the third nodes we do not track yet.
    pub(super) fn mesh_gen_resync_done(&mut self, i: usize, current_uuid: u64) {
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        let Some(v) = self.mesh_gen.source_view.take() else { return };
        if !self.mesh_gen_active()
            || v.peer != peer
            || v.conn_id != conn_id
            || v.current != current_uuid
            || self.meta.uuids.current != current_uuid
        {
            return;
        }
        let mut uuids = self.meta.uuids.clone();
        for p in &self.peers {
            let base = v.bases[p.id.index()];
            // A peer connected to us was compared with us on its own handshake (and, with
            // the source's view of it older than ours, inheriting made a pair just synced
            // look apart); only the ones out of reach take the source's view.
            if p.id == peer
                || self.is_diskless_peer(p.id)
                || base == 0
                || p.connection == ConnectionState::Connected
            {
                continue;
            }
            if uuids.bitmap_uuid(p.id) == 0 && base != current_uuid {
                uuids.bitmap[p.id.index()] = base;
            }
        }
        if uuids != self.meta.uuids {
            self.persist(MetaUpdate::Uuids(uuids));
        }
    }

    /// Whether `uuid` is one of the bitmap bases peer `i`, our sync source on this
    /// connection, had or took while the resync ran (a generation in its past).
    pub(super) fn mesh_gen_source_base(&self, i: usize, uuid: u64) -> bool {
        let p = &self.peers[i];
        self.mesh_gen
            .source_view
            .as_ref()
            .is_some_and(|v| v.peer == p.id && v.conn_id == p.conn_id && v.bases.contains(&uuid))
    }

    /// Whether we finished a resync as peer `i`'s source on its current connection.
    pub(super) fn mesh_gen_sourced_here(&self, i: usize) -> bool {
        let p = &self.peers[i];
        self.mesh_gen.sourced.get(&p.id) == Some(&p.conn_id)
    }

    /// We finished a resync as peer `i`'s source on its current connection.
    pub(super) fn mesh_gen_sourced(&mut self, i: usize) {
        let p = &self.peers[i];
        self.mesh_gen.sourced.insert(p.id, p.conn_id);
    }

    /// Peer `i`'s `State` arrived (before it is recorded). Inconsistent, after a resync we
    /// finished to it on this connection: it became our sync target here, so a fence pending
    /// for it is settled. (Not marked outdated: it holds our data now, the resync is done.)
    pub(super) fn mesh_gen_target_state(&mut self, i: usize, disk: DiskState) {
        let p = &self.peers[i];
        if disk == DiskState::Inconsistent
            && p.replication == ReplicationState::Established
            && self.mesh_gen.sourced.get(&p.id) == Some(&p.conn_id)
        {
            self.fence_pending &= !p.id.bit();
        }
    }

    /// A primary's link to a peer that has been silent for longer than a live link allows
    /// (`stall.rs`): the writes it sent there since are not acknowledged, maybe lost in a
    /// partition that the ping timeout has not ended yet, so that peer is not announced "in
    /// sync". The secondaries drop their bits for the peers announced in sync and take two
    /// such peers for in sync with each other: a peer cut off since before the primary's
    /// last writes was, and lost them (seed 151).
    pub(super) fn mesh_gen_link_silent(&self, p: &Peer) -> bool {
        p.connection == ConnectionState::Connected
            && p.last_received_ms + super::stall::PROMOTE_PEER_SILENCE_MS_MAX < self.now_ms
    }

    /// Two secondaries of one generation whose direction came from the crash flags (one
    /// side flagged: it lost its primary with writes in doubt, or crashed as primary, and
    /// is the bitmap source; bits alone, as a crashed primary's activity log after its
    /// flag was cleared, keep their direction): towards the worse
    /// disk it turns round, an UpToDate side is the source over an Outdated or Consistent
    /// one, as `mesh_adjust_decision` does when both hold bits. The flagged side may have
    /// lost quorum and missed the writes the other got since by a resync from the primary;
    /// as source it overwrote them with its stale blocks, and the node that resynced from
    /// the primary later found the overwritten one in sync (seed 172). An acknowledged
    /// write in doubt on the flagged side reached every target of the primary, the
    /// UpToDate side among them, so nothing acknowledged is lost this way; the union of
    /// both bitmaps is resynced either way. Both ends decide from the same two disks (a
    /// Hello that no longer matches our disk is retried, `mesh_hello_stale`).
    pub(super) fn mesh_gen_adjust_decision(
        &self,
        hello: &Hello,
        my_sent_role: Role,
        decision: SyncDecision,
    ) -> SyncDecision {
        let secondaries = my_sent_role != Role::Primary && hello.role != Role::Primary;
        if !self.mesh_gen_active()
            || !secondaries
            || self.meta.uuids.current != hello.uuids.current
            || self.meta.flags.crashed_primary == hello.crashed_primary
            || !self.disk.has_data()
            || !hello.disk.has_data()
        {
            return decision;
        }
        let up = |d: DiskState| d == DiskState::UpToDate;
        match decision {
            SyncDecision::BitmapSource if up(hello.disk) && !up(self.disk) => {
                SyncDecision::BitmapTarget
            }
            SyncDecision::BitmapTarget if up(self.disk) && !up(hello.disk) => {
                SyncDecision::BitmapSource
            }
            _ => decision,
        }
    }

    /// After every input: handshake again with an Established diskful peer we track by a
    /// bitmap base or hold bits for (see the module comment; bits: a primary's writes that
    /// skipped a peer cut off from it but still Established with us, seed 1222 with grows). Secondaries only: a primary starts generations
    /// for peers whose writes fail while they stay connected, and resyncs them itself.
    pub(super) fn mesh_gen_pump(&mut self) {
        if !self.mesh_gen_active() || self.role == Role::Primary {
            return;
        }
        // While we are a sync target, the bits we mark for the others (`mesh_resync_received`)
        // are handled once the resync is done.
        let target = self.peers.iter().any(|p| {
            matches!(p.replication, ReplicationState::SyncTarget | ReplicationState::PausedSyncT)
        });
        if target {
            return;
        }
        for j in 0..self.peers.len() {
            let p = &self.peers[j];
            let behind = self.meta.uuids.bitmap_uuid(p.id) != 0
                || !self.meta.bitmaps[p.id.index()].is_clear();
            if p.connection == ConnectionState::Connected
                && p.handshake.is_none()
                && p.replication == ReplicationState::Established
                && p.role != Role::Primary
                && p.disk.has_data()
                && !self.is_diskless_peer(p.id)
                && behind
            {
                self.disconnect(j, ConnectionState::Connecting);
            }
        }
    }
}

//! Three or more diskful nodes: DRBD 9's full mesh (a child module of `node`, so that
//! `node.rs` carries one-line hooks). Active only when a node has a disk and at least two
//! diskful peers, so two diskful nodes (with or without a diskless tiebreaker) behave exactly
//! as without this module.
//!
//! Every node keeps a bitmap per peer. On the primary it holds the blocks a peer missed, as
//! with two nodes. On a secondary it holds the blocks that may differ between this node and
//! each *other* secondary, so that when the primary dies the two survivors resync only that
//! difference:
//! - Before the Data frames it concerns, the primary tells each secondary where its writes go
//!   (`Frame::MeshTargets`: the diskful nodes replicating, those in sync, its current
//!   generation and the peers it tracks). A secondary in sync with it adopts a new generation
//!   the way the primary started it (the lost peers' bitmap UUIDs are the old generation), so
//!   the survivors' generations tell, on reconnect, who holds newer data.
//! - A write that does not go to a secondary X is marked in X's bitmap at once. A write that
//!   goes to X too is *in doubt* (it may not reach X if the primary dies) and is remembered in
//!   memory until the primary reports it stable everywhere (`Frame::PeersInSync`, sent when
//!   the transfer-log entry is collected). If X leaves the primary's targets, or the primary
//!   is lost, what is still in doubt is marked in X's bitmap; so is it when a handshake with
//!   X starts (`mesh_handshake_starts`): whether X holds it only the primary knows.
//! - A secondary that lost its primary with writes in doubt marks itself as DRBD marks a
//!   crashed primary (its bitmap covers what may differ; either direction of the resync is
//!   correct) and re-handshakes with the other secondaries: with equal generations the
//!   flagged side (the lower node id when both are) becomes the bitmap sync source of the
//!   union of both bitmaps. A promoted node is always the source over a flagged secondary.
//! - Secondaries never resync each other while a primary replicates to them (the primary's
//!   writes and the resync would race on the target), and a sync target takes one source at
//!   a time; such handshakes are deferred (the connection is retried). When the primary
//!   reports a peer in sync, the other secondaries drop their bits for it: the primary's own
//!   resync covered them (re-checked after every input, see `mesh_settle_in_sync`).
//! - Two secondaries whose generations name one side newer while that side is Inconsistent
//!   (its sync source was lost) do not sync in the direction the disks would choose: the
//!   stale side would overwrite the newer partial data and both would end UpToDate. They
//!   wait (the connection is retried) for a node with current data.
//! - A secondary that loses quorum outdates itself (DRBD 9): the primary with quorum settles
//!   its fence of a node no peer with quorum sees, and writes on without it.
//! - A disk becomes UpToDate only from UpToDate data: an Outdated sync source stays
//!   Outdated, a Consistent one becomes UpToDate only when no unseen peer may be newer, and a
//!   target ends with its source's state (`mesh_source_keeps_disk`); a Consistent node
//!   connected to every diskful peer becomes UpToDate (`mesh_consistent_settled`).
//! - A sync target marks what it receives for the other diskful peers, except those its
//!   source reports fully in sync with it (`Frame::ResyncPeersInSync`,
//!   `mesh_resync_received`; never a peer that became a third node's sync target on the
//!   current connection, nor one whose link went silent), unless the target itself resynced
//!   that peer without reporting the source in sync to it (`mesh_marked_for`) or lost that
//!   peer as its primary with writes in doubt (`MeshState::lost_with_writes`); and a
//!   handshake whose Hello is stale is retried (`mesh_hello_stale`); each end decides only
//!   after the peer confirmed its Hello still held (`Frame::HelloHolds`,
//!   `mesh_hello_holds_sent`), so neither acts on a Hello its sender no longer stands by
//!   (seed 12598). A target keeps its old
//!   generation in its history only if the source's past holds it (`mesh_target_lineage`).
//! - A detached primary's generation describes the data its peers hold: it takes the one it
//!   sent with `Frame::Detached`, announces only its sources as targets, and starts a new
//!   generation for a diskful peer its writes skip (all in memory; the sources adopt them).
//! - A sync target of a newer generation takes it with the first block it receives: its
//!   disk holds part of that data from then on, so no older node may resync it back; before
//!   it, its data is still of its own generation (the source may defer the resync at once).
//! - Two secondaries outdated only by losing their primary and quorum together (their own
//!   redial to resync what it left in doubt), of one generation and both reported in sync
//!   by it, become UpToDate through the resync of both bitmaps (`mesh_in_doubt_pair_settles`),
//!   unless anyone asked for them to be outdated.
//! - A primary's report of who is in sync counts for "both in sync" only while its link is
//!   live (`mesh_source_live`): one that dropped us first says nothing more.
//! - A node forgets what it announced as primary whenever it is not primary: promoted again
//!   on the same connection, it announces afresh (the secondary may have taken another
//!   primary as its source meanwhile, and without targets marks every write).
//! - A secondary's in-doubt writes go through its activity log (`mesh_al_hold`), so that a
//!   restart after going down as a secondary marks the hot extents for every diskful peer
//!   (`unclean_secondary_marks`, seed 1813). Such a node tells those peers in the handshake
//!   (`Frame::UncleanSecondary`) while its marks stand, and a clean secondary of its
//!   generation becomes the source (`mesh_unclean_direction`, seed 1420).

use super::*;
use crate::constants::IN_DOUBT_WRITES_MAX;

/// The mesh side of a `Node`.
#[derive(Debug, Default)]
pub(super) struct MeshState {
    /// As primary: the `MeshTargets` values each peer was last sent, with its connection.
    announced: BTreeMap<NodeId, (u64, [u64; 4])>,
    /// As primary: for each peer, the connection it was first announced to on and the
    /// transfer-log id of the first write sent after that (`mesh_announce`).
    announced_from: BTreeMap<NodeId, (u64, u64)>,
    /// As secondary: the primary whose writes this node receives.
    source: Option<MeshSource>,
    /// Received writes not yet confirmed on the other secondaries, oldest first.
    in_doubt: VecDeque<InDoubt>,
    /// Diskful peers to handshake with again (the primary was lost with writes in doubt).
    rehandshake: u64,
    /// What each connection's Hello told the peer: (conn_id, disk, generations, crashed).
    hello_sent: BTreeMap<NodeId, (u64, DiskState, crate::uuid::GenerationUuids, bool, bool)>,
    /// As sync source: the `ResyncPeersInSync` each target was last sent, with its connection.
    resync_in_sync_sent: BTreeMap<NodeId, (u64, u64)>,
    /// As sync source: the diskful peers we left out of a `ResyncPeersInSync` to each target
    /// on its connection (target, conn_id, node id bits): the target marked what it took
    /// from us for them (`mesh_resync_received`), so it may differ from them.
    resync_unreported: BTreeMap<NodeId, (u64, u64)>,
    /// As sync target: the last `ResyncPeersInSync` of each source, with its connection.
    resync_in_sync: BTreeMap<NodeId, (u64, u64)>,
    /// As sync target: the newer generation of the source (peer, conn_id, generation) to
    /// take with its first block (`mesh_target_data_arrives`).
    target_generation: Option<(NodeId, u64, u64)>,
    /// Outdated by a loss of quorum that came with the loss of a primary, which last
    /// reported in sync with it these nodes, us included (`mesh_source_keeps_disk`).
    outdated_in_sync: u64,
    /// The primary lost last reported these nodes in sync with it, us included (0 if not).
    lost_primary_in_sync: u64,
    /// The handshake with this peer compares equal generations of two Outdated nodes, both
    /// flagged after losing their primary with writes in doubt (`mesh_adjust_decision`).
    /// (Either one flagged was tried: seed 135 then ended in a split brain.)
    handshake_in_doubt_pair: Option<NodeId>,
    /// Went down uncleanly as a secondary with hot extents (`unclean_secondary_marks`): the
    /// diskful peers (node id bits) towards which its restart marks still stand. A peer
    /// leaves it when our bits for it are clear (a resync with it, or the primary reported
    /// it in sync), all do when we finish a resync as target or become primary. Told to
    /// those peers in each handshake.
    unclean: u64,
    /// As a primary whose term no peer confirmed, marked blocks out of sync for these diskful
    /// peers (node id bits), without starting a generation (`quorum_generation_now`): its
    /// bits for them are writes nobody acknowledged, in the generation those peers share
    /// with us. Kept after a step-down; told as `UncleanSecondary` in each handshake while
    /// the bits stand and no generation tracks the peer (`mesh_unclean_towards`).
    unacked: u64,
    /// Peers that told us so in the handshake of this connection (peer, conn_id).
    peer_unclean: BTreeMap<NodeId, u64>,
    /// Peers that became a third node's sync target on this connection (peer, conn_id):
    /// their data changed in blocks our bitmap does not know of, so our clear bits for them
    /// no longer say they hold our data (`mesh_announce_resync_in_sync`).
    synced_elsewhere: BTreeMap<NodeId, u64>,
    /// Primaries we lost with writes in doubt (node id bits), until a handshake with them
    /// ends: their last writes reached us and maybe no other secondary, so another node's
    /// report that such a node holds its data may predate them (`mesh_resync_received`).
    lost_with_writes: u64,
    /// As sync target: the history our source sent before `ResyncDone` (peer, conn_id,
    /// history), the past of the data we end with (`mesh_target_lineage`).
    source_history: Option<(NodeId, u64, [u64; crate::constants::HISTORY_UUIDS_MAX])>,
}

#[derive(Debug)]
struct MeshSource {
    peer: NodeId,
    conn_id: u64,
    targets: u64,
    /// The nodes the primary last reported in sync with it.
    in_sync: u64,
    /// The primary's generation it last reported.
    current: u64,
}

#[derive(Debug)]
struct InDoubt {
    first: u64,
    blocks: u64,
    /// The other secondaries the write went to (node id bits).
    peers: u64,
    /// Its extents are referenced in the activity log (`mesh_al_hold`) until it leaves.
    al_held: bool,
}

impl Node {
    /// A disk of our own and at least two diskful peers.
    pub(super) fn mesh_enabled(&self) -> bool {
        !self.config.quorum.diskless
            && self.peers.iter().filter(|p| !self.is_diskless_peer(p.id)).count() >= 2
    }

    /// Writes of the primary in doubt towards other secondaries, for diagnostics and tests.
    pub fn mesh_writes_in_doubt(&self) -> usize {
        self.mesh.in_doubt.len()
    }

    /// Primary: tells every replicating diskful peer where writes go now, if that changed.
    /// Called before the Data frames of a write and after every input.
    pub(super) fn mesh_announce(&mut self) {
        if !self.mesh_enabled() || self.role != Role::Primary {
            // What an earlier term as primary announced means nothing to the peers now (a
            // secondary drops its source when another primary announces): the next term
            // announces afresh even on the same connection (seed 1920: a re-promoted node
            // found its old announcement unchanged, sent none, and the secondary marked
            // every write for the other secondary).
            self.mesh.announced.clear();
            self.mesh.announced_from.clear();
            return;
        }
        let (mut targets, mut in_sync, mut lost) = (self.id.bit(), self.id.bit(), 0u64);
        // A detached primary writes to its sources only (see `diskless`), holds nothing
        // itself, and is behind its own generation (the one it started when it detached).
        let sources = if self.is_detached() { Some(self.diskless_sources()) } else { None };
        if sources.is_some() {
            in_sync = 0;
            lost = self.id.bit();
        }
        for p in &self.peers {
            if self.is_diskless_peer(p.id) {
                continue;
            }
            let writes_go_there = p.replicating() && sources.is_none_or(|s| s & p.id.bit() != 0);
            if writes_go_there {
                targets |= p.id.bit();
                if p.replication == ReplicationState::Established
                    && p.disk == DiskState::UpToDate
                    && !self.mesh_gen_link_silent(p)
                {
                    in_sync |= p.id.bit();
                }
            }
            if self.meta.uuids.bitmap_uuid(p.id) != 0 {
                lost |= p.id.bit();
            }
        }
        let current_uuid = self.meta.uuids.current;
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if !p.replicating() || self.is_diskless_peer(p.id) {
                continue;
            }
            let (peer, conn_id) = (p.id, p.conn_id);
            let from = match self.mesh.announced_from.get(&peer) {
                Some((c, tl)) if *c == conn_id => *tl,
                _ => {
                    self.mesh.announced_from.insert(peer, (conn_id, self.next_tl));
                    self.next_tl
                }
            };
            let unconfirmed = self.mesh_unconfirmed_before(from) & !peer.bit();
            let values = [targets, in_sync & !unconfirmed, current_uuid, lost];
            let p = &self.peers[i];
            let entry = (p.conn_id, values);
            if self.mesh.announced.get(&p.id) != Some(&entry) {
                self.mesh.announced.insert(p.id, entry);
                let in_sync = values[1];
                self.send(i, Frame::MeshTargets { targets, in_sync, current_uuid, lost });
            }
        }
    }

    /// The demotion completes in this input: a generation this primary started in the same
    /// input (the one deferred until it could acknowledge writes again,
    /// `quorum_deferred_generation`, starts as the last request drains) is announced while
    /// it is still primary; the secondaries in sync take it as DRBD's peers take a new
    /// current UUID. After the demotion `mesh_announce` sends nothing, and the secondary
    /// kept the old generation while the demoted node held the new one with that secondary
    /// in sync: a generation nobody else had, found split from the secondary's next one
    /// (seed 10997).
    pub(super) fn mesh_before_demote(&mut self) {
        self.mesh_announce();
    }

    /// Primary: the peers (node id bits) that have not confirmed a write sent before
    /// transfer-log id `from`. A secondary that connected to us at `from` may hold such a
    /// write from its previous connection, marked for the other secondaries when it lost
    /// it; announced "in sync" to it, such a peer had those bits dropped although it never
    /// got the write, and when we lost that peer and marked the write for it, the
    /// secondary adopted our new generation without it (seed 19101: a later primary
    /// resynced the peer from those bits and missed blocks of 13 acknowledged writes). Once
    /// the peer confirms them (or is lost, and they are marked for it), the next
    /// announcement carries the change.
    fn mesh_unconfirmed_before(&self, from: u64) -> u64 {
        self.transfer_log
            .range(..from)
            .filter(|(_, e)| !e.resync)
            .fold(0, |bits, (_, e)| e.peers.iter().fold(bits, |b, (p, _)| b | p.bit()))
    }

    /// A primary in a mesh detached its disk and sent its sources `Frame::Detached` with
    /// `fresh`. It takes that generation itself (in memory only: nothing is persisted while
    /// detached, `handle_attach` restores the disk's own metadata), so that what it announces
    /// describes the data its peers hold from now on. Announcing the disk's old generation
    /// made a source that had adopted `fresh` go back to the old one: the stale disk, once
    /// attached again, then matched its peers' generation and became the sync source, and
    /// the writes made while it was detached were lost (seed 47).
    pub(super) fn mesh_detached_generation(&mut self, fresh: u64) {
        if !self.mesh_enabled() || self.role != Role::Primary {
            return;
        }
        let mut uuids = self.meta.uuids.clone();
        uuids.new_current(fresh, []);
        self.persist(MetaUpdate::Uuids(uuids));
    }

    /// A detached primary writes without the diskful peers `unreached` (not sources: cut
    /// off, or connected but not UpToDate). Its sources mark the write for them (the
    /// `OutOfSync` it sends), and it starts a new generation (in memory) for a peer not
    /// tracked yet, as a diskful primary does for a peer that misses a write: the sources
    /// adopt it from `MeshTargets`, so that when such a peer meets them its generation is
    /// found older. With one generation for all, a peer that missed the writes but lost the
    /// primary with writes in doubt became the sync source of one that held them (seed 564).
    pub(super) fn mesh_detached_unreached(&mut self, unreached: u64, first: u64, blocks: u64) {
        if !self.mesh_enabled() || self.role != Role::Primary {
            return;
        }
        for x in self.peer_ids() {
            if unreached & x.bit() != 0 {
                self.mark_out_of_sync(x, first, blocks);
            }
        }
    }

    /// We became the sync target of a peer whose generation is newer than ours. From the
    /// first block it sends, our disk holds part of that newer data: we take the generation
    /// then (Inconsistent), not only when the resync ends. Otherwise, if the source is lost
    /// mid-resync, our old generation names a third node that missed the same writes our
    /// equal (or newer), and that node, Outdated but consistent, becomes our sync source:
    /// both end UpToDate without the writes only the lost source and we held (seed 795).
    /// With the newer generation, that pair waits for a node with current data instead
    /// (`mesh_defer_sync`).
    ///
    /// Not before the first block (`mesh_target_data_arrives`): the source's end of the
    /// handshake may defer the resync (a primary replicates to it) and drop the connection
    /// at once. A target that took the generation anyway held the old data under the new
    /// generation, and the primary of that generation, finding it Inconsistent at its own
    /// generation, gave it a full sync instead of the bitmap resync its bitmap UUID for us
    /// allows (engine_mesh: the restarted old primary met a secondary first).
    pub(super) fn mesh_target_takes_generation(
        &mut self,
        i: usize,
        source_current: u64,
        by_generations: SyncDecision,
    ) {
        let newer = matches!(by_generations, SyncDecision::BitmapTarget | SyncDecision::FullTarget);
        let valid = source_current & 1 == 0
            && source_current != 0
            && source_current != uuid::UUID_JUST_CREATED;
        if !self.mesh_enabled() || !newer || !valid || source_current == self.meta.uuids.current {
            return;
        }
        let p = &self.peers[i];
        self.mesh.target_generation = Some((p.id, p.conn_id, source_current));
    }

    /// A block of peer `i` (our sync source, Data or resync data) is about to be written: the
    /// source's generation we wait to take (`mesh_target_takes_generation`) is taken now.
    pub(super) fn mesh_target_data_arrives(&mut self, i: usize) {
        let p = &self.peers[i];
        let Some((peer, conn_id, fresh)) = self.mesh.target_generation else { return };
        if peer != p.id || conn_id != p.conn_id {
            return;
        }
        self.mesh.target_generation = None;
        let target =
            matches!(p.replication, ReplicationState::SyncTarget | ReplicationState::PausedSyncT);
        if target && fresh != self.meta.uuids.current {
            let mut uuids = self.meta.uuids.clone();
            uuids.new_current(fresh, []);
            self.persist(MetaUpdate::Uuids(uuids));
        }
    }

    /// Sync target: the resync ended (`ResyncDone` records the source's generation).
    pub(super) fn mesh_resync_done(&mut self) {
        self.mesh.target_generation = None;
        // Our hot extents now hold the source's data: no longer unclean.
        self.mesh.unclean = 0;
        self.mesh.unacked = 0;
    }

    /// Sync target from source `i`, after the resync ended with our disk set: if it took
    /// the source's Outdated or Consistent state (`mesh_source_disk`) while we stay
    /// Established with an UpToDate peer, handshake with that peer again. Nothing else
    /// would: the peer's disk did not change (`mesh_peer_state` reacts to changes only), a
    /// primary sees us Established without bits, and the secondaries' resyncs wait while it
    /// replicates, so we stayed Outdated for good (seed 20368: node 0 took Outdated from
    /// node 1 beside UpToDate node 2, which was promoted later). With no bits for the peer
    /// (our source reported it in sync, so what we received is its data too:
    /// `mesh_resync_received`) the handshake is NoSync, which next to UpToDate data makes
    /// ours UpToDate; a primary is the source of whatever we marked. Not a secondary we
    /// marked blocks for: our Outdated side would be the source of those over its data.
    pub(super) fn mesh_target_ended_below(&mut self, i: usize) {
        if !self.mesh_enabled() || self.disk == DiskState::UpToDate || !self.disk.has_data() {
            return;
        }
        for j in (0..self.peers.len()).filter(|j| *j != i) {
            let p = &self.peers[j];
            if !self.is_diskless_peer(p.id)
                && p.connection == ConnectionState::Connected
                && p.handshake.is_none()
                && p.replication == ReplicationState::Established
                && p.disk == DiskState::UpToDate
                && (p.role == Role::Primary || self.meta.bitmaps[p.id.index()].is_clear())
            {
                self.mesh.rehandshake |= p.id.bit();
            }
        }
    }

    /// Sync target, at `ResyncDone`: `uuids` take the source's generation and push our old
    /// one, `old_current`, into the history. That says our data descends from it, true only
    /// if the source's data does: our old generation is in the source's past (its current,
    /// the history it sent, or a bitmap base of its Hello). Otherwise (a full sync, over a
    /// generation taken from a source lost mid-resync) the old generation is dropped: every
    /// block was overwritten with data that never held its writes. Kept, it made a node
    /// that held those writes look split from us (seed 4910: node 1 took generation G2 from
    /// the primary's resync, lost it, was fully synced to a sibling G3 by node 2 and ended
    /// with G2 in its history; the old primary, at G2 with G3 in its past, met it in a split
    /// brain although only it had diverged).
    pub(super) fn mesh_target_lineage(
        &mut self,
        i: usize,
        old_current: u64,
        uuids: &mut crate::uuid::GenerationUuids,
    ) {
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        let Some((from, conn, history)) = self.mesh.source_history.take() else { return };
        if !self.mesh_enabled()
            || from != peer
            || conn != conn_id
            || old_current == uuids.current
            || old_current == uuid::UUID_JUST_CREATED
            || history.contains(&old_current)
            || self.mesh_gen_source_base(i, old_current)
        {
            return;
        }
        let kept: Vec<u64> =
            uuids.history.iter().copied().filter(|u| *u != old_current && *u != 0).collect();
        let mut compacted = [0u64; crate::constants::HISTORY_UUIDS_MAX];
        for (slot, u) in compacted.iter_mut().zip(kept) {
            *slot = u;
        }
        uuids.history = compacted;
    }

    /// Primary: a write's transfer-log entry was collected (stable on every node it still
    /// goes to): the secondaries forget it as a difference between them.
    pub(super) fn mesh_collected(&mut self, first: u64, blocks: u64) {
        if !self.mesh_enabled() || self.role != Role::Primary {
            return;
        }
        // A peer lost since the write was sent must be announced first, so the secondaries
        // mark the write for it before they forget it.
        self.mesh_announce();
        for i in 0..self.peers.len() {
            if self.peers[i].replicating() && !self.is_diskless_peer(self.peers[i].id) {
                self.send(i, Frame::PeersInSync { offset_blocks: first, blocks });
            }
        }
    }

    /// A handshake with peer `i` starts (before our Hello and bitmap): the writes we hold in
    /// doubt for it are marked for it. The primary sent them to the peer too, but whether
    /// they arrived only the primary learns: compared without them, our clear bits would
    /// say the peer holds our data (seed 46593 of `tandem-sim --nodes 3 --diskful 3`: the
    /// primary's `HelloHolds` to node 2 was lost, so node 2 never took its writes, which
    /// node 1 held in doubt for it; node 1 and node 2 then met without bits and the
    /// Outdated node 2 became UpToDate from node 1 without them). The entries stay: a
    /// later handshake marks them again until the primary reports them stable everywhere,
    /// as our bits for the peer may be dropped meanwhile (`mesh_settle_in_sync`). While
    /// the primary replicates to both, the marks defer the pair's resync
    /// (`mesh_defer_sync`), or are dropped when it reports both in sync
    /// (`mesh_adjust_decision`).
    pub(super) fn mesh_handshake_starts(&mut self, i: usize) {
        if !self.mesh_enabled() {
            return;
        }
        let peer = self.peers[i].id;
        let writes: Vec<(u64, u64)> = self
            .mesh
            .in_doubt
            .iter()
            .filter(|e| e.peers & peer.bit() != 0)
            .map(|e| (e.first, e.blocks))
            .collect();
        for (first, blocks) in writes {
            self.mesh_mark(peer, first, blocks);
        }
    }

    /// Our Hello went out on peer `i`'s connection: remember what it said, and say that we
    /// are an unclean secondary if we are (before the bitmap, so the peer decides with it).
    pub(super) fn mesh_hello_sent(&mut self, i: usize) {
        let p = &self.peers[i];
        let crashed = self.meta.flags.crashed_primary;
        let unclean = self.mesh_unclean_towards(p.id);
        let facts = (p.conn_id, self.disk, self.meta.uuids.clone(), crashed, unclean);
        self.mesh.hello_sent.insert(p.id, facts);
        if unclean {
            self.send(i, Frame::UncleanSecondary);
        }
    }

    /// `Node::new`: this node restarted as an unclean secondary (`unclean_secondary_marks`).
    pub(super) fn mesh_set_unclean(&mut self, unclean: bool) {
        if unclean {
            for p in &self.peers {
                if !self.is_diskless_peer(p.id) {
                    self.mesh.unclean |= p.id.bit();
                }
            }
        }
    }

    /// Our restart marks for `peer` still stand: the bits we hold for it may mark blocks
    /// where our own data is wrong. So do the marks of an unconfirmed term, and such a
    /// term itself (`mesh_unclean_direction`).
    fn mesh_unclean_towards(&self, peer: NodeId) -> bool {
        // Unacknowledged marks count while no generation tracks the peer: once one does, the
        // generations tell which side is newer.
        let unacked = self.mesh.unacked & peer.bit() != 0 && self.meta.uuids.bitmap_uuid(peer) == 0;
        let marked = (self.mesh.unclean & peer.bit() != 0 || unacked)
            && !self.meta.bitmaps[peer.index()].is_clear();
        self.mesh_enabled() && (marked || self.quorum_primary_unconfirmed())
    }

    /// `quorum_generation_now`: this primary marks blocks for `peer` while it cannot
    /// acknowledge writes, and starts no generation for it (`MeshState::unacked`).
    pub(super) fn mesh_marked_unacked(&mut self, peer: NodeId) {
        self.mesh.unacked |= peer.bit();
    }

    /// After every input: a peer our bits are clear for is in sync with us (a resync in
    /// either direction, or the primary's report), so our restart marks for it are settled;
    /// bits set later for it (a write it missed) say we hold newer data, as on any node.
    fn mesh_settle_unclean(&mut self) {
        if self.role == Role::Primary {
            // A primary's data is the reference: it is no unclean secondary any more.
            self.mesh.unclean = 0;
        }
        for x in self.peer_ids() {
            if self.meta.bitmaps[x.index()].is_clear() {
                self.mesh.unclean &= !x.bit();
                self.mesh.unacked &= !x.bit();
            }
        }
    }

    /// Peer `i` told us in this handshake that it is an unclean secondary.
    pub(super) fn mesh_peer_unclean(&mut self, i: usize) {
        let p = &self.peers[i];
        self.mesh.peer_unclean.insert(p.id, p.conn_id);
    }

    /// The sync direction between two secondaries of one generation when exactly one of
    /// them is an unclean secondary: the clean one is the source of the union of both
    /// bitmaps. The unclean one's bits mark where its own data may be wrong: a power loss
    /// can take writes from its volatile cache that the other secondary holds (and that
    /// may have been acknowledged), so its copy must not overwrite the other's (mesh
    /// seeds 706, 1420: a restarted secondary became the source by its bits alone and
    /// spread its stale blocks). Writes it holds that the other lacks were never
    /// acknowledged there, and a write that skipped the other started a new generation.
    /// The same holds when the unclean one is a primary whose term no peer confirmed
    /// (`quorum_primary_unconfirmed`), or the secondary it became with the marks it made
    /// then (`MeshState::unacked`): it acknowledged nothing since its promotion, while the
    /// other may hold writes another primary acknowledged in the same generation (mesh seed
    /// 8475: node 1, promoted on a stalled link and never confirmed, met node 0, which held
    /// a write node 2 acknowledged, and became its source by the primary's rule of
    /// `mesh_adjust_decision`). Such a primary is the target: it steps down
    /// (`quorum_after_decision`), and the next handshake, as a secondary, resyncs it.
    fn mesh_unclean_direction(
        &self,
        i: usize,
        hello: &Hello,
        my_sent_role: Role,
        decision: SyncDecision,
    ) -> Option<SyncDecision> {
        use SyncDecision::*;
        let p = &self.peers[i];
        let peer_unclean = self.mesh.peer_unclean.get(&p.id) == Some(&p.conn_id);
        let mine = self.mesh.hello_sent.get(&p.id).is_some_and(|f| f.0 == p.conn_id && f.4);
        // A clean primary is the source by the primary's rule anyway.
        let clean_role = if mine { hello.role } else { my_sent_role };
        let applies = mine != peer_unclean
            && clean_role != Role::Primary
            && self.disk.has_data()
            && hello.disk.has_data()
            && matches!(decision, BitmapSource | BitmapTarget | SplitBrain);
        applies.then_some(if mine { BitmapTarget } else { BitmapSource })
    }

    /// The handshake with peer `i` is about to decide, but our disk, generations or crash
    /// flag changed since our Hello (a resync with a third node finished meanwhile): the
    /// peer decides from the Hello, we from the present, and the two ends could disagree
    /// (one NoSync, the other SyncSource), or we would find a pair in sync that the peer's
    /// facts do not (seed 258). Handshake again: the connection is retried. Returns true
    /// when it ended the connection.
    pub(super) fn mesh_hello_stale(&mut self, i: usize) -> bool {
        if !self.mesh_enabled() {
            return false;
        }
        let p = &self.peers[i];
        let stale = self.mesh.hello_sent.get(&p.id).is_some_and(
            |(conn_id, disk, uuids, crashed, unclean)| {
                *conn_id == p.conn_id
                    && (*disk != self.disk
                        || *uuids != self.meta.uuids
                        || *crashed != self.meta.flags.crashed_primary
                        || *unclean != self.mesh_unclean_towards(p.id))
            },
        );
        if stale {
            self.disconnect(i, ConnectionState::Connecting);
        }
        stale
    }

    /// The peer's `HandshakeDone` arrived: in a mesh the handshake does not decide yet. If
    /// our Hello still holds we say so (`HelloHolds`), if not the connection is retried as
    /// in `mesh_hello_stale`; either way the decision waits for the peer's `HelloHolds`.
    /// Without this round one end decided from a Hello its sender no longer stood by: node 1
    /// sent its Hello and took the primary's new generation in the same millisecond, node 2
    /// (of the old generation, without the primary's newer writes) found NoSync from it,
    /// became Established and reported node 1 UpToDate, while node 1 saw its Hello stale and
    /// dropped the connection (seed 12598). With the round, an end decides only once the
    /// peer's Hello held after our own was sent (the peer checked it on our `HandshakeDone`)
    /// and our own still holds when the peer's answer arrives, so both Hellos held together
    /// at the moment the peer answered (generations only move forward): the two Hellos are
    /// one consistent view. What changes after that is the established connection's to
    /// handle (a generation taken apart from a peer re-handshakes, `mesh_gen`). Returns
    /// true when the handshake waits (or ended). Not with a diskless end: that handshake
    /// compares no generations (`quorum_handshake_start`, `diskless_handshake`).
    pub(super) fn mesh_hello_holds_sent(&mut self, i: usize) -> bool {
        if !self.mesh_enabled() || self.handshake_with_diskless_end(i) {
            return false;
        }
        if !self.mesh_hello_stale(i) {
            self.send(i, Frame::HelloHolds);
        }
        true
    }

    /// The peer's `HelloHolds`: it comes after its `HandshakeDone` on the same stream, so the
    /// whole handshake is here; decide now (`finish_handshake` checks our own Hello again).
    pub(super) fn mesh_peer_hello_holds(&mut self, i: usize) {
        let done = self.peers[i].handshake.as_ref().is_some_and(|h| h.done);
        if !done || !self.mesh_enabled() || self.handshake_with_diskless_end(i) {
            self.protocol_error(i, "HelloHolds out of place".into());
            return;
        }
        self.finish_handshake(i);
    }

    /// Sync source, right before `ResyncDone`: the target takes our past too, so that a
    /// third node that knows an older generation of ours is not found unrelated to it.
    pub(super) fn mesh_before_resync_done(&mut self, i: usize) {
        if self.mesh_enabled() {
            let history = self.meta.uuids.history;
            self.send(i, Frame::UuidHistory { history });
        }
    }

    pub(super) fn mesh_handle_frame(&mut self, i: usize, frame: Frame) {
        match frame {
            Frame::MeshTargets { targets, in_sync, current_uuid, lost } => {
                self.mesh_targets(i, [targets, in_sync, current_uuid, lost]);
            }
            Frame::PeersInSync { offset_blocks, blocks } => {
                let from_source = self.mesh.source.as_ref().is_some_and(|s| {
                    s.peer == self.peers[i].id && s.conn_id == self.peers[i].conn_id
                });
                if from_source
                    && let Some(pos) = self
                        .mesh
                        .in_doubt
                        .iter()
                        .position(|e| e.first == offset_blocks && e.blocks == blocks)
                {
                    let entry = self.mesh.in_doubt.remove(pos).expect("found");
                    self.mesh_al_release(&entry);
                }
            }
            Frame::ResyncPeersInSync { peers } => {
                let p = &self.peers[i];
                self.mesh.resync_in_sync.insert(p.id, (p.conn_id, peers));
            }
            Frame::UuidHistory { history } => {
                if !self.mesh_enabled()
                    || self.peers[i].replication != ReplicationState::SyncTarget
                    || history.iter().any(|u| *u & uuid::UUID_PRIMARY_FLAG != 0)
                {
                    self.protocol_error(i, "unexpected UuidHistory".into());
                    return;
                }
                let p = &self.peers[i];
                self.mesh.source_history = Some((p.id, p.conn_id, history));
                let mut uuids = self.meta.uuids.clone();
                uuids.adopt_history(&history);
                if uuids != self.meta.uuids {
                    self.persist(MetaUpdate::Uuids(uuids));
                }
            }
            _ => unreachable!("only mesh frames are passed here"),
        }
    }

    fn mesh_targets(&mut self, i: usize, [targets, in_sync, current, lost]: [u64; 4]) {
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        if !self.mesh_enabled() || self.role == Role::Primary || self.peers[i].role != Role::Primary
        {
            // Sent by a primary only; one that demoted meanwhile sends no more Data either.
            return;
        }
        let same = |s: &MeshSource| s.peer == peer && s.conn_id == conn_id;
        if self.mesh.source.as_ref().is_some_and(|s| !same(s)) {
            // Writes of an earlier primary (or connection) never confirmed: may differ anywhere.
            self.mesh_persist_in_doubt(u64::MAX);
        }
        let previous = self.mesh.source.as_ref().filter(|s| same(s)).map_or(0, |s| s.targets);
        if previous & !targets != 0 {
            // Peers the primary no longer replicates to may lack what is still in doubt.
            self.mesh_persist_in_doubt(previous & !targets);
        }
        self.mesh.source = Some(MeshSource { peer, conn_id, targets, in_sync, current });
        let in_sync_with_primary = self.peers[i].replication == ReplicationState::Established
            && self.disk == DiskState::UpToDate
            && in_sync & self.id.bit() != 0;
        if !in_sync_with_primary {
            return;
        }
        if current != self.meta.uuids.current {
            let valid = current & 1 == 0 && current != 0 && current != uuid::UUID_JUST_CREATED;
            if !valid {
                self.protocol_error(i, "MeshTargets with an invalid generation".into());
                return;
            }
            // The primary started a new generation for the peers it lost: start it here the
            // same way, tracking those peers from the generation we shared.
            let lost_peers: Vec<NodeId> = self
                .peers
                .iter()
                .filter(|p| lost & p.id.bit() != 0 && !self.is_diskless_peer(p.id))
                .map(|p| p.id)
                .collect();
            let mut uuids = self.meta.uuids.clone();
            uuids.new_current(current, lost_peers);
            self.persist(MetaUpdate::Uuids(uuids));
        }
        self.mesh_settle_in_sync();
    }

    /// Secondary in sync with the primary that replicates to it: the peers the primary last
    /// reported in sync hold everything we hold, in-doubt writes aside, so our bits for them
    /// go. Run on every `MeshTargets` and after every input: a peer skipped because its
    /// handshake with us was running keeps no bits that nobody would ever clear (the primary
    /// announces again only when something changes; the secondaries' own resync waits while
    /// it replicates), seed 17.
    fn mesh_settle_in_sync(&mut self) {
        let Some((peer, conn_id, in_sync, current)) =
            self.mesh.source.as_ref().map(|s| (s.peer, s.conn_id, s.in_sync, s.current))
        else {
            return;
        };
        let Some(i) = self.peer_index(peer) else { return };
        let in_sync_with_primary = self.peers[i].conn_id == conn_id
            && self.peers[i].connection == ConnectionState::Connected
            && self.peers[i].handshake.is_none()
            && self.peers[i].role == Role::Primary
            && self.peers[i].replication == ReplicationState::Established
            && self.role != Role::Primary
            && self.disk == DiskState::UpToDate
            && in_sync & self.id.bit() != 0
            && self.meta.uuids.current == current;
        if !in_sync_with_primary {
            return;
        }
        let size = self.meta.size_blocks;
        for j in 0..self.peers.len() {
            let p = &self.peers[j];
            let x = p.id;
            let syncing = matches!(
                p.replication,
                ReplicationState::SyncSource
                    | ReplicationState::SyncTarget
                    | ReplicationState::PausedSyncS
                    | ReplicationState::PausedSyncT
            );
            if j == i
                || in_sync & x.bit() == 0
                || self.is_diskless_peer(x)
                || syncing
                || p.handshake.is_some()
            {
                continue;
            }
            if self.meta.uuids.bitmap_uuid(x) != 0 {
                let mut uuids = self.meta.uuids.clone();
                uuids.settled_in_sync(x);
                self.persist(MetaUpdate::Uuids(uuids));
            }
            if !self.meta.bitmaps[x.index()].is_clear() {
                self.persist(MetaUpdate::BitmapClear { peer: x, first_block: 0, blocks: size });
            }
        }
    }

    /// Peer `i` (a detached primary) reported blocks out of sync for the diskful `peers`:
    /// they are not in sync with it any more, whatever it last announced. It reports that as
    /// it loses a peer with writes unconfirmed, before it can announce the peer gone; the
    /// stale announcement made us drop the very bits just set (seed 564).
    pub(super) fn mesh_peers_out_of_sync(&mut self, i: usize, peers: u64) {
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        if let Some(s) = self.mesh.source.as_mut()
            && s.peer == peer
            && s.conn_id == conn_id
        {
            s.in_sync &= !peers;
        }
    }

    /// Secondary: a Data frame from a primary arrived. It is marked at once for the diskful
    /// peers it does not go to, and remembered as in doubt for those it goes to.
    pub(super) fn mesh_data_received(&mut self, i: usize, first: u64, bytes: usize) {
        if !self.mesh_enabled() {
            return;
        }
        let Some(blocks) = blocks_of(bytes) else { return };
        if first.checked_add(blocks).is_none_or(|end| end > self.meta.size_blocks) {
            return; // refused as "write outside the device" by the caller
        }
        let (sender, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        let targets = self
            .mesh
            .source
            .as_ref()
            .filter(|s| s.peer == sender && s.conn_id == conn_id)
            .map_or(0, |s| s.targets);
        let mut doubt = 0u64;
        let mut missed = Vec::new();
        for p in &self.peers {
            if p.id == sender || self.is_diskless_peer(p.id) {
                continue;
            }
            if targets & p.id.bit() != 0 {
                doubt |= p.id.bit();
            } else {
                missed.push(p.id);
            }
        }
        for x in missed {
            self.mesh_mark(x, first, blocks);
        }
        if doubt != 0 {
            // A log full of extents with writes in doubt leaves this one in memory only, as
            // before the log held them. Marking it in the bitmap instead lost it: the bits
            // for a peer the primary reports in sync are dropped (`mesh_settle_in_sync`),
            // which an in-doubt record survives (seed 2276).
            let al_held = self.mesh_al_hold(first, blocks).unwrap_or(false);
            self.mesh.in_doubt.push_back(InDoubt { first, blocks, peers: doubt, al_held });
            if self.mesh.in_doubt.len() > IN_DOUBT_WRITES_MAX {
                let oldest = self.mesh.in_doubt.pop_front().expect("over the limit");
                for x in self.peer_ids() {
                    if oldest.peers & x.bit() != 0 {
                        self.mesh_mark(x, oldest.first, oldest.blocks);
                    }
                }
                self.mesh_al_release(&oldest);
            }
        }
    }

    /// Sync target: a block of the source's data arrived. It replaces ours, which a third
    /// diskful node may have held too: what we shared with that node we may not share any
    /// more, so the block is marked for it (seed 141: a target took the blocks a restarted
    /// node had missed, then found itself in sync with the crashed primary, which lacked
    /// them). Not for the nodes the source reports fully in sync with it
    /// (`Frame::ResyncPeersInSync`): they hold the data we receive, and marking them would
    /// make each resync start another one around the mesh. Except a node we resynced
    /// ourselves, on its current connection, without reporting the source in sync to it: it
    /// may differ from the source whatever the source reports (`mesh_marked_for`). And a
    /// primary we lost with writes in doubt (`MeshState::lost_with_writes`): we hold writes
    /// of it the source may lack, so the source's report of it may predate them (seed 5361
    /// of `tandem-sim --nodes 3 --diskful 3`: node 0 was promoted as its link to node 1 went
    /// silent, and its writes reached node 2 only; node 2 lost it and resynced from node 1,
    /// which, the link silent for half a second, still reported node 0 in sync; node 2 took
    /// node 1's older blocks over node 0's writes unmarked and met node 0 again with no
    /// sync). The source cannot tell: a promotion may follow its peer's last frame by less
    /// than any silence bound, and a secondary's view of a primary's data ends there.
    pub(super) fn mesh_resync_received(&mut self, i: usize, first: u64, bytes: usize) {
        if !self.mesh_enabled() {
            return;
        }
        let Some(blocks) = blocks_of(bytes) else { return };
        if first.checked_add(blocks).is_none_or(|end| end > self.meta.size_blocks) {
            return; // refused as "write outside the device" by the caller
        }
        let (source, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        let in_sync = self
            .mesh
            .resync_in_sync
            .get(&source)
            .filter(|(c, _)| *c == conn_id)
            .map_or(0, |(_, peers)| *peers);
        let others: Vec<NodeId> = (0..self.peers.len())
            .filter(|j| *j != i && !self.is_diskless_peer(self.peers[*j].id))
            .filter(|j| {
                let x = self.peers[*j].id.bit();
                in_sync & x == 0
                    || self.mesh_marked_for(*j, source)
                    || self.mesh.lost_with_writes & x != 0
            })
            .map(|j| self.peers[j].id)
            .collect();
        for x in others {
            self.mesh_mark(x, first, blocks);
        }
    }

    /// We resynced peer `j` on its current connection without reporting `source` in sync
    /// to it (`resync_unreported`): `j` marked what it took from us for `source`, and may
    /// differ from it however `source` reports it. `source` excludes a peer that became a
    /// sync target from its report once it hears of it (`mesh_announce_resync_in_sync`),
    /// but over a link that has gone silent it hears nothing (seed 7229 of `tandem-sim
    /// --nodes 3 --diskful 3`: node 0 resynced node 1 while cut off from node 2, then took
    /// node 2's data, which node 2 reported node 1 to hold through a link silent for 400
    /// ms; node 0 and node 1 ended Established without bits and differing). Only then: a
    /// target that was reported `source` in sync holds its data, and marking it anyway made
    /// resyncs chase each other around the mesh (seed 2201).
    fn mesh_marked_for(&self, j: usize, source: NodeId) -> bool {
        let p = &self.peers[j];
        self.mesh
            .resync_unreported
            .get(&p.id)
            .is_some_and(|(c, bits)| *c == p.conn_id && bits & source.bit() != 0)
    }

    /// Sync source: tells each target which diskful nodes hold exactly our data (connected,
    /// Established, no bits and no bitmap UUID for them), before the data it concerns and
    /// whenever that changes (see `mesh_resync_received`). Not a node that became a third
    /// node's sync target on this connection: its data changed without our bits, and it
    /// may hold bits for us we do not (seed 2201: node 0 resynced from node 2 while
    /// Established with node 1, which had no bits for it and reported it in sync to node 2
    /// in its next resync; node 2 skipped marks for node 0, and 7 blocks stayed different
    /// between UpToDate replicas). Nor a node whose link has gone silent
    /// (`mesh_link_live`): it may have been promoted and written behind the partition, its
    /// report of the promotion lost with the link (seed 12713 of `tandem-sim --nodes 3
    /// --diskful 3`: node 0 reported node 2 in sync through a link partitioned a second
    /// earlier, its target node 1 took node 0's older data over writes of primary 2 without
    /// marking them for node 2, and node 1 and node 2 then reconnected with no sync).
    fn mesh_announce_resync_in_sync(&mut self) {
        for j in 0..self.peers.len() {
            let p = &self.peers[j];
            if p.resync.is_none() || p.connection != ConnectionState::Connected {
                continue;
            }
            let target = p.id;
            let mut peers = 0u64;
            for x in &self.peers {
                let same = x.id != target
                    && !self.is_diskless_peer(x.id)
                    && self.mesh_link_live(x)
                    && x.handshake.is_none()
                    && x.replication == ReplicationState::Established
                    && self.meta.uuids.bitmap_uuid(x.id) == 0
                    && self.meta.bitmaps[x.id.index()].is_clear()
                    && self.mesh.synced_elsewhere.get(&x.id) != Some(&x.conn_id);
                if same {
                    peers |= x.id.bit();
                }
            }
            let others = self
                .peers
                .iter()
                .filter(|x| x.id != target && !self.is_diskless_peer(x.id))
                .fold(0u64, |bits, x| bits | x.id.bit());
            let unreported = match self.mesh.resync_unreported.get(&target) {
                Some((c, bits)) if *c == p.conn_id => *bits,
                _ => 0,
            };
            let entry = (p.conn_id, unreported | (others & !peers));
            self.mesh.resync_unreported.insert(target, entry);
            let entry = (p.conn_id, peers);
            if self.mesh.resync_in_sync_sent.get(&target) != Some(&entry) {
                self.mesh.resync_in_sync_sent.insert(target, entry);
                self.send(j, Frame::ResyncPeersInSync { peers });
            }
        }
    }

    /// Secondary: a write in doubt is about to go to disk. Its extents go into the activity
    /// log as a primary's do (the `Persist` of the transaction comes before the write's
    /// `DiskIo`, so the record is durable first) and stay referenced while it is in doubt:
    /// if this node goes down uncleanly, the log names every block where it may hold a
    /// write the other secondaries lack, or lack one they hold (`unclean_secondary_marks`).
    /// Only the first write to a cold extent costs a transaction. `Some(false)` while
    /// detached (the write does not reach our disk), `None` when the log is full of
    /// referenced extents (the write is then in doubt in memory only).
    fn mesh_al_hold(&mut self, first: u64, blocks: u64) -> Option<bool> {
        if self.is_detached() || self.disk == DiskState::Diskless {
            return Some(false);
        }
        let extents = Self::extents_of(first, blocks);
        if !self.activate_extents(&extents) {
            return None;
        }
        self.al_ref(first, blocks, 1);
        Some(true)
    }

    /// A write left the in-doubt list: its extents may leave the activity log (evicted
    /// when another extent needs the slot, as for a primary).
    fn mesh_al_release(&mut self, entry: &InDoubt) {
        if !entry.al_held {
            return;
        }
        // An attach after a detach starts the log afresh (`handle_attach`): a hold from
        // before it has nothing left to release.
        let held = Self::extents_of(entry.first, entry.blocks)
            .iter()
            .all(|e| self.al_refs.get(e).is_some_and(|n| *n > 0));
        if held {
            self.al_ref(entry.first, entry.blocks, -1);
        }
    }

    fn mesh_mark(&mut self, peer: NodeId, first: u64, blocks: u64) {
        if !(first..first + blocks).all(|b| self.meta.bitmaps[peer.index()].test(b)) {
            self.persist(MetaUpdate::BitmapSet { peer, first_block: first, blocks });
        }
    }

    /// Marks every in-doubt write for the peers in `mask` and forgets those peers in them.
    /// Returns the peers something was marked for.
    fn mesh_persist_in_doubt(&mut self, mask: u64) -> u64 {
        let mut marks = Vec::new();
        let mut touched = 0u64;
        for e in &mut self.mesh.in_doubt {
            let hit = e.peers & mask;
            if hit != 0 {
                marks.push((e.first, e.blocks, hit));
                touched |= hit;
                e.peers &= !mask;
            }
        }
        for (first, blocks, hit) in marks {
            for x in self.peer_ids() {
                if hit & x.bit() != 0 {
                    self.mesh_mark(x, first, blocks);
                }
            }
        }
        // Released only after the marks: the bits now hold what the extents held.
        let (settled, kept): (Vec<InDoubt>, Vec<InDoubt>) =
            std::mem::take(&mut self.mesh.in_doubt).into_iter().partition(|e| e.peers == 0);
        self.mesh.in_doubt = kept.into();
        for entry in &settled {
            self.mesh_al_release(entry);
        }
        touched
    }

    /// The connection to peer `i` was lost (called by `disconnect`).
    pub(super) fn mesh_peer_lost(&mut self, i: usize) {
        let peer = self.peers[i].id;
        self.mesh.announced.remove(&peer);
        if self.mesh.source.as_ref().is_none_or(|s| s.peer != peer) {
            return;
        }
        // What it last reported, if it reported us in sync at the generation we hold.
        let current = self.meta.uuids.current;
        let in_sync =
            self.mesh.source.take().filter(|s| s.current == current).map_or(0, |s| s.in_sync);
        let touched = self.mesh_persist_in_doubt(u64::MAX);
        if touched != 0 {
            self.mesh.lost_with_writes |= peer.bit();
            // Our bitmap now covers every write of the lost primary that may differ between
            // us and the other secondaries: resync them by it, as after a crashed primary.
            self.persist_flags(|f| f.crashed_primary = true);
            self.mesh.rehandshake |= touched;
        }
        let in_sync_with_it = in_sync & self.id.bit() != 0 && self.disk == DiskState::UpToDate;
        self.mesh.lost_primary_in_sync = if in_sync_with_it { in_sync } else { 0 };
    }

    /// Quorum was just lost. A secondary outdates itself, as DRBD 9 does: the nodes that
    /// still have quorum may write on without it (the primary settles its fence because no
    /// node with quorum sees us), so its data can be stale without it ever being told; an
    /// UpToDate disk would later give it a promotion, with quorum regained through a peer
    /// that is Inconsistent or that resyncs from us (seed 469). It becomes UpToDate again by
    /// a handshake that finds it in sync with an UpToDate node, or by a resync (and a pair
    /// outdated only by losing their primary and quorum together: `mesh_in_doubt_pair_settles`).
    pub(super) fn mesh_quorum_lost(&mut self) {
        if self.mesh_enabled()
            && self.role == Role::Secondary
            && matches!(self.disk, DiskState::UpToDate | DiskState::Consistent)
        {
            self.set_disk(DiskState::Outdated);
            self.mesh.outdated_in_sync = std::mem::take(&mut self.mesh.lost_primary_in_sync);
        }
    }

    /// The operator or a fence-peer handler outdated this node (`drbdadm outdate`): a
    /// primary may write on without it, whatever it last knew (`mesh_source_keeps_disk`).
    pub(super) fn mesh_outdated_by_request(&mut self) {
        self.mesh.outdated_in_sync = 0;
    }

    /// A peer's `State` arrived (before it is recorded). A secondary peer we are Established
    /// with that became UpToDate again got its data from elsewhere (a third node's resync, or
    /// a sync it became source of): what our handshake found no longer holds, so handshake
    /// again (an Outdated node next to an UpToDate one in sync becomes UpToDate that way).
    pub(super) fn mesh_peer_state(&mut self, i: usize, role: Role, disk: DiskState) {
        // (Not our own target whose State comes after a resync with nothing to copy.)
        if self.mesh_synced_elsewhere(i, disk) && !self.mesh_gen_sourced_here(i) {
            let p = &self.peers[i];
            self.mesh.synced_elsewhere.insert(p.id, p.conn_id);
        }
        let p = &self.peers[i];
        if self.mesh_enabled()
            && !self.is_diskless_peer(p.id)
            && self.role != Role::Primary
            && role != Role::Primary
            && p.replication == ReplicationState::Established
            && p.disk != DiskState::UpToDate
            && disk == DiskState::UpToDate
        {
            self.mesh.rehandshake |= p.id.bit();
        }
    }

    /// Sync source: whether our disk stays as it is instead of becoming UpToDate (DRBD 9).
    /// Only a node connected to UpToDate data, or a resync from it, makes a disk UpToDate:
    /// - An Outdated node stays Outdated: a peer that saw us Outdated counts us out of its
    ///   quorum and may write on without us, so an Outdated pair that synced each other
    ///   UpToDate could promote beside it (two writers, seed 1631).
    /// - A Consistent node (restarted, not knowing whether the others wrote on) becomes
    ///   UpToDate only if every other diskful peer is connected to it (a newer one would have
    ///   made it a sync target) or known outdated: a restarted node of an old generation
    ///   otherwise overwrote a sync target of the newer generation and promoted it without
    ///   the newer writes (seed 1724).
    pub(super) fn mesh_source_keeps_disk(&self, i: usize) -> bool {
        if !self.mesh_enabled() {
            return false;
        }
        match self.disk {
            DiskState::Outdated => !self.mesh_in_doubt_pair_settles(i),
            DiskState::Consistent => !self.mesh_all_others_known(i),
            _ => false,
        }
    }

    /// Two secondaries that lost their primary while it reported both in sync with it, and
    /// outdated themselves only because they lost quorum with it (each had ended the
    /// connection to the other to resync what the primary left in doubt between them, or
    /// saw it end): their generations are equal, so the primary wrote nothing without
    /// either of them (it starts a generation for a peer its writes skip), and their data
    /// differ only by the primary's writes in doubt, which the resync of both bitmaps
    /// settles. After it both hold every acknowledged write, and the source (then the
    /// target) becomes UpToDate: a majority, and promotable (engine_mesh: otherwise neither
    /// could ever be promoted again). Not when anyone asked for us to be outdated (a fence
    /// handler, the operator, a primary through a peer): a primary may then write on without
    /// us, and an Outdated pair synced UpToDate would promote beside it (seed 1631).
    fn mesh_in_doubt_pair_settles(&self, i: usize) -> bool {
        let peer = self.peers[i].id;
        let both = self.id.bit() | peer.bit();
        self.mesh.handshake_in_doubt_pair == Some(peer) && self.mesh.outdated_in_sync & both == both
    }

    /// Every diskful peer other than `i` replicates with us (its handshake found nothing
    /// newer) or is known outdated.
    fn mesh_all_others_known(&self, i: usize) -> bool {
        let source = self.peers[i].id;
        self.peers.iter().all(|p| {
            p.id == source
                || self.is_diskless_peer(p.id)
                || p.replicating()
                || self.meta.flags.peer_outdated & p.id.bit() != 0
        })
    }

    /// A Consistent secondary whose handshakes with every diskful peer are done (none found
    /// newer data, or it would be their sync target) holds the best data there is: it
    /// becomes UpToDate, and its Outdated peers follow by handshaking with it again (see
    /// `mesh_peer_state`). Without this, nodes that stayed Consistent or Outdated as sync
    /// sources (`mesh_source_keeps_disk`) never converged (seed 59).
    fn mesh_consistent_settled(&mut self) {
        if self.role == Role::Primary || self.disk != DiskState::Consistent {
            return;
        }
        let all_connected = self.peers.iter().all(|p| {
            self.is_diskless_peer(p.id)
                || (p.connection == ConnectionState::Connected
                    && p.handshake.is_none()
                    && matches!(
                        p.replication,
                        ReplicationState::Established | ReplicationState::SyncSource
                    ))
        });
        if all_connected {
            self.set_disk(DiskState::UpToDate);
        }
    }

    /// The disk a sync target ends with, given its source's: in a mesh, an Outdated or
    /// Consistent source gives its own state (see `mesh_source_keeps_disk`), else UpToDate.
    pub(super) fn mesh_source_disk(&self, source: DiskState) -> DiskState {
        if self.mesh_enabled() && matches!(source, DiskState::Outdated | DiskState::Consistent) {
            source
        } else {
            DiskState::UpToDate
        }
    }

    /// A peer's `State` says Inconsistent, but it is not our sync target: in a mesh it is a
    /// third node's, and becomes UpToDate from it, maybe after we lost sight of it. Taking it
    /// for outdated would leave it out of our quorum for good, and a primary cut off from
    /// both then wrote on while that peer and the third node promoted (two writers, seed
    /// 1181).
    pub(super) fn mesh_synced_elsewhere(&self, i: usize, disk: DiskState) -> bool {
        self.mesh_enabled()
            && disk == DiskState::Inconsistent
            && !matches!(
                self.peers[i].replication,
                ReplicationState::SyncSource | ReplicationState::PausedSyncS
            )
    }

    /// After every input: re-handshakes the connections the loss of a primary left with
    /// differences to resync.
    pub(super) fn mesh_pump(&mut self) {
        if self.disk != DiskState::Outdated {
            self.mesh.outdated_in_sync = 0;
        }
        self.mesh_settle_unclean();
        self.mesh_settle_lost_with_writes();
        self.mesh_orphaned_target();
        self.mesh_end_raced_resyncs();
        if self.mesh_enabled() {
            self.mesh_settle_in_sync();
            self.mesh_announce_resync_in_sync();
            self.mesh_consistent_settled();
        }
        let pending = std::mem::take(&mut self.mesh.rehandshake);
        if pending == 0 {
            return;
        }
        for j in 0..self.peers.len() {
            let p = &self.peers[j];
            if pending & p.id.bit() != 0
                && p.connection == ConnectionState::Connected
                && p.handshake.is_none()
                && p.replication == ReplicationState::Established
            {
                self.disconnect(j, ConnectionState::Connecting);
            }
        }
    }

    /// After every input: a primary we lost with writes in doubt that we handshook with
    /// again (the handshake compared our bits, which hold what we took from others since)
    /// is reported by others as usual.
    fn mesh_settle_lost_with_writes(&mut self) {
        for p in &self.peers {
            let handshook = p.connection == ConnectionState::Connected
                && p.handshake.is_none()
                && p.replication != ReplicationState::Off;
            if handshook {
                self.mesh.lost_with_writes &= !p.id.bit();
            }
        }
    }

    /// A resync between this secondary and another one that was running when a primary
    /// began to replicate to this node (promoted, or connected, meanwhile): it races the
    /// primary's writes as the deferred handshakes would (`mesh_defer_sync`). As source, a
    /// block read for the resync before a primary's write to it landed here went out old,
    /// and the write's mark for the target (already set) was cleared with the resync's
    /// acknowledgement: the target ended UpToDate without an acknowledged write (seed 412).
    /// The connection is ended and retried; its handshake waits while the primary
    /// replicates, and the primary's own resync covers the target meanwhile.
    fn mesh_end_raced_resyncs(&mut self) {
        if !self.mesh_enabled() || self.role == Role::Primary {
            return;
        }
        let primary_replicating = self.peers.iter().any(|p| {
            p.connection == ConnectionState::Connected
                && p.handshake.is_none()
                && p.role == Role::Primary
                && p.replication != ReplicationState::Off
        });
        if !primary_replicating {
            return;
        }
        for j in 0..self.peers.len() {
            let p = &self.peers[j];
            let syncing = matches!(
                p.replication,
                ReplicationState::SyncSource
                    | ReplicationState::SyncTarget
                    | ReplicationState::PausedSyncS
                    | ReplicationState::PausedSyncT
            );
            if syncing
                && p.role != Role::Primary
                && p.connection == ConnectionState::Connected
                && !self.is_diskless_peer(p.id)
            {
                self.disconnect(j, ConnectionState::Connecting);
            }
        }
    }

    /// A secondary left Inconsistent by a sync source it lost, while Established with an
    /// UpToDate peer that replicates to it (the handshake with that peer found nothing to
    /// sync before we became a sync target elsewhere): nobody would ever complete our data,
    /// and resyncs between secondaries wait while a primary replicates. Handshake again with
    /// that peer, which then becomes our sync source (seed 469).
    fn mesh_orphaned_target(&mut self) {
        if !self.mesh_enabled()
            || self.role == Role::Primary
            || self.disk != DiskState::Inconsistent
        {
            return;
        }
        let synced = self.peers.iter().any(|p| {
            p.handshake.is_some()
                || matches!(
                    p.replication,
                    ReplicationState::SyncTarget | ReplicationState::PausedSyncT
                )
        });
        if synced {
            return;
        }
        let source = self.peers.iter().position(|p| {
            !self.is_diskless_peer(p.id)
                && p.connection == ConnectionState::Connected
                && p.replication == ReplicationState::Established
                && p.disk == DiskState::UpToDate
        });
        if let Some(j) = source {
            self.mesh.rehandshake |= self.peers[j].id.bit();
        }
    }

    /// Refines the sync decision in a mesh. With equal generations:
    /// - between a primary and a secondary flagged after losing its primary, the primary is
    ///   the source (of both bitmaps);
    /// - two UpToDate secondaries that the primary replicating to this node reports in sync
    ///   with it are in sync with each other: their bits for each other are dropped.
    pub(super) fn mesh_adjust_decision(
        &mut self,
        i: usize,
        hello: &Hello,
        my_sent_role: Role,
        decision: SyncDecision,
    ) -> SyncDecision {
        let in_doubt_pair = self.mesh_enabled()
            && self.meta.uuids.current == hello.uuids.current
            && self.meta.flags.crashed_primary
            && hello.crashed_primary
            && self.disk == DiskState::Outdated
            && hello.disk == DiskState::Outdated;
        self.mesh.handshake_in_doubt_pair = in_doubt_pair.then_some(self.peers[i].id);
        if !self.mesh_enabled() || self.meta.uuids.current != hello.uuids.current {
            return decision;
        }
        if let Some(direction) = self.mesh_unclean_direction(i, hello, my_sent_role, decision) {
            return direction;
        }
        match (my_sent_role, hello.role, decision) {
            (Role::Primary, r, SyncDecision::BitmapTarget) if r != Role::Primary => {
                return SyncDecision::BitmapSource;
            }
            (r, Role::Primary, SyncDecision::BitmapSource) if r != Role::Primary => {
                return SyncDecision::BitmapTarget;
            }
            // Bits on both sides within one generation are no split brain (writing apart
            // starts a generation): the secondary's are blocks a resync from a third node
            // brought it (see `mesh_resync_received`). The primary's data stands; the union
            // of both bitmaps is resynced from it (seed 36).
            (Role::Primary, r, SyncDecision::SplitBrain)
                if r != Role::Primary && hello.disk.has_data() && self.disk.has_data() =>
            {
                return SyncDecision::BitmapSource;
            }
            (r, Role::Primary, SyncDecision::SplitBrain)
                if r != Role::Primary && hello.disk.has_data() && self.disk.has_data() =>
            {
                return SyncDecision::BitmapTarget;
            }
            // Two secondaries of one generation that each hold bits for the other: no node
            // wrote apart (that starts a generation), the bits are writes of a primary one
            // of them may lack or leftovers of an interrupted resync, or blocks a resync
            // from a third node brought. Either direction is correct with the union of both
            // bitmaps, except towards the worse disk: an UpToDate side is the source over an
            // Outdated or Consistent one (whose data is known stale or unconfirmed, seed 43);
            // between equals the lower node id is the source.
            (Role::Secondary, Role::Secondary, SyncDecision::SplitBrain)
                if hello.disk.has_data() && self.disk.has_data() =>
            {
                let rank = |d: DiskState| u8::from(d == DiskState::UpToDate);
                let (mine, theirs) = (rank(self.disk), rank(hello.disk));
                return if mine > theirs || (mine == theirs && self.id < hello.node_id) {
                    SyncDecision::BitmapSource
                } else {
                    SyncDecision::BitmapTarget
                };
            }
            _ => {}
        }
        let peer = self.peers[i].id;
        let both = self.id.bit() | peer.bit();
        let both_in_sync = my_sent_role != Role::Primary
            && hello.role != Role::Primary
            && self.role != Role::Primary
            && self.disk == DiskState::UpToDate
            && hello.disk == DiskState::UpToDate
            && self.mesh_primary_replicating(i)
            && self.mesh_source_live()
            && self.mesh.source.as_ref().is_some_and(|s| s.in_sync & both == both);
        if both_in_sync && decision != SyncDecision::NoSync {
            if !self.meta.bitmaps[peer.index()].is_clear() {
                let size = self.meta.size_blocks;
                self.persist(MetaUpdate::BitmapClear { peer, first_block: 0, blocks: size });
            }
            return SyncDecision::NoSync;
        }
        decision
    }

    /// The primary whose report of who is in sync we hold is still heard from: its link is
    /// connected on the connection it reported on and not silent for longer than a live link
    /// allows. A primary that dropped its connection to us (a partition it noticed first)
    /// says nothing more, and our link stays `Connected` until the ping timeout: its old
    /// report of "both in sync" then no longer holds, the peer we handshake with may have
    /// taken writes since that we never will (seed 1983: the primary lost quorum with writes
    /// in flight to one secondary only, and the other still trusted the old report).
    fn mesh_source_live(&self) -> bool {
        let Some(s) = self.mesh.source.as_ref() else { return false };
        self.peer_index(s.peer).is_some_and(|j| {
            let p = &self.peers[j];
            p.conn_id == s.conn_id && self.mesh_link_live(p)
        })
    }

    /// The connection to `p` is up and not silent for longer than a live link allows (it
    /// pings at least every `PING_INTERVAL_MS`). A partitioned link stays `Connected` until
    /// the ping timeout, and what we know of that peer stops with it.
    fn mesh_link_live(&self, p: &Peer) -> bool {
        p.connection == ConnectionState::Connected
            && p.last_received_ms + super::stall::PROMOTE_PEER_SILENCE_MS_MAX >= self.now_ms
    }

    /// A primary other than peer `i` replicates to this node.
    fn mesh_primary_replicating(&self, i: usize) -> bool {
        (0..self.peers.len()).filter(|j| *j != i).any(|j| {
            let p = &self.peers[j];
            p.connection == ConnectionState::Connected
                && p.handshake.is_none()
                && p.role == Role::Primary
                && p.replication != ReplicationState::Off
        })
    }

    /// Verify between two secondaries would compare disks that a primary's writes reach at
    /// different moments: in a mesh it runs from (or against) the primary, or with none.
    /// Both ends check (the target answers `VerifyStart` with an incomplete `VerifyDone`):
    /// one may not know yet that a peer was promoted, its connection to that peer stalled by
    /// a lost frame until the gap fills or times out (seed 293).
    pub(super) fn mesh_check_verify(&self, i: usize) -> Result<(), StateError> {
        if !self.mesh_enabled() || self.role == Role::Primary || self.peers[i].role == Role::Primary
        {
            return Ok(());
        }
        let primary_connected = self
            .peers
            .iter()
            .any(|p| p.role == Role::Primary && p.connection == ConnectionState::Connected);
        if primary_connected {
            return Err(StateError::Precondition(
                "verify two secondaries only while no primary replicates to them; run it on the primary",
            ));
        }
        Ok(())
    }

    /// Defers a sync (or a split brain) between two secondaries while a primary replicates to
    /// this node, and a second sync source for a node already SyncTarget: the connection is
    /// ended (and retried) and `None` returned. The primary's own resyncs and its report of
    /// who is in sync settle such pairs meanwhile.
    pub(super) fn mesh_defer_sync(
        &mut self,
        i: usize,
        hello: &Hello,
        by_generations: SyncDecision,
        decision: SyncDecision,
    ) -> Option<SyncDecision> {
        use SyncDecision::*;
        if !self.mesh_enabled() {
            return Some(decision);
        }
        // The generations name the newer side, but it is Inconsistent (a sync target whose
        // source was lost), so the disks turned the direction round: the older side would
        // overwrite newer partial data with its stale copy and both would end UpToDate
        // without the writes a third node holds (seed 1574). Neither has current data; wait
        // for a node that does.
        let generations_target = matches!(by_generations, BitmapTarget | FullTarget);
        let generations_source = matches!(by_generations, BitmapSource | FullSource);
        let disks_source = matches!(decision, BitmapSource | FullSource);
        let disks_target = matches!(decision, BitmapTarget | FullTarget);
        // Only generations that differ say so: with equal ones the direction comes from
        // flags (a crashed primary), which the disk states rightly override.
        let newer_generation = self.meta.uuids.current != hello.uuids.current;
        let stale_source =
            (generations_target && disks_source) || (generations_source && disks_target);
        if self.role != Role::Primary
            && hello.role != Role::Primary
            && newer_generation
            && stale_source
        {
            self.disconnect(i, ConnectionState::Connecting);
            return None;
        }
        let syncing = |states: [ReplicationState; 2]| {
            (0..self.peers.len()).filter(|j| *j != i).any(|j| {
                let p = &self.peers[j];
                p.connection == ConnectionState::Connected
                    && p.handshake.is_none()
                    && states.contains(&p.replication)
            })
        };
        let already_target = syncing([ReplicationState::SyncTarget, ReplicationState::PausedSyncT]);
        // A sync source whose data a third node overwrote would send that node's data on.
        let already_source = syncing([ReplicationState::SyncSource, ReplicationState::PausedSyncS]);
        // Two nodes without consistent data have nothing to give each other; while this one
        // is being synced by a third, "in sync" between them would be a claim about nothing.
        // Nor can they have diverged: their generations say nothing, a third node syncs them.
        // Past the first generation this holds on either end even if only the other knows it
        // is synced by a third node: its peer (which cannot tell) must not declare the pair in
        // sync while it defers (seed 258).
        let both_new = self.meta.uuids.current == uuid::UUID_JUST_CREATED
            && hello.uuids.current == uuid::UUID_JUST_CREATED;
        let empty_pair = !hello.disk.has_data()
            && !self.disk.has_data()
            && (already_target || matches!(decision, SplitBrain | Unrelated) || !both_new);
        if !matches!(decision, BitmapSource | BitmapTarget | FullSource | FullTarget | SplitBrain)
            && !empty_pair
        {
            return Some(decision);
        }
        let target = matches!(decision, BitmapTarget | FullTarget);
        let secondaries = self.role != Role::Primary && hello.role != Role::Primary;
        if (secondaries && self.mesh_primary_replicating(i))
            || (target && (already_target || already_source))
            || empty_pair
        {
            self.disconnect(i, ConnectionState::Connecting);
            return None;
        }
        Some(decision)
    }
}

/// Attach of a node with a disk and two or more diskful peers that went down as a secondary
/// (a crashed primary is handled by its own flag) with hot extents in its activity log: it
/// held writes in doubt there (`Node::mesh_al_hold`), which may have reached its disk but
/// not the other secondaries', or the reverse (a power loss takes the volatile cache). Every
/// hot extent is marked for every diskful peer, as DRBD marks a crashed primary's, so that
/// the handshake with a peer of the same generation resyncs those blocks (mesh seed 1813:
/// two secondaries that went down with different writes in doubt met without their primary
/// and found each other in sync). No crash flag: the bits alone make the handshake resync
/// the union of both bitmaps, the direction coming from the peer's side (a peer flagged
/// for losing its primary with writes in doubt is the source, as it may hold acknowledged
/// writes that our volatile cache lost). A clean stop cannot be told from a crash here (no
/// engine hook sees it), so a restart marks the extents even then: a resync too many, never
/// one too few.
pub(super) fn unclean_secondary_marks(config: &Config, meta: &Metadata) -> Vec<MetaUpdate> {
    let diskful: Vec<NodeId> =
        config.peers.iter().copied().filter(|p| !config.quorum.is_diskless_peer(*p)).collect();
    if config.quorum.diskless || diskful.len() < 2 || meta.flags.primary_indicator {
        return Vec::new();
    }
    let mut updates = Vec::new();
    for extent in &meta.activity_log {
        if let Some((first, blocks)) = meta.extent_range(*extent) {
            for peer in &diskful {
                updates.push(MetaUpdate::BitmapSet { peer: *peer, first_block: first, blocks });
            }
        }
    }
    updates
}

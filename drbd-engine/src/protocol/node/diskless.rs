//! Diskless operation: a node without usable local data serves its users through an UpToDate
//! peer (a child module of `node`, so that `node.rs` carries one-line hooks).
//!
//! Two ways to be diskless, one data path:
//! - `disk none` (`QuorumConfig::diskless`): the node never had a disk. Besides being a quorum
//!   tiebreaker it is a client: it can be primary and does all I/O through its peers.
//! - `on-io-error detach` (DRBD's default): a local read or write error detaches the disk. The
//!   node goes `Failed` then `Diskless` (DRBD's words, `Event::Detached` is logged) and keeps
//!   serving: a failed read is retried through a peer, a write already sent to a peer
//!   completes through it. Nothing is persisted from then on (the disk is gone); the metadata
//!   as it was on disk is kept in memory, and `handle_attach` resumes from it.
//!
//! Reads go to one *source*: a connected peer with UpToDate data that has not missed a write
//! since this node became diskless (a peer that was cut off while writes went elsewhere is
//! stale even if it still calls itself UpToDate; it counts again after a resync shows it
//! Inconsistent then UpToDate). `Frame::ReadRequest` queues behind the writes that arrived
//! before it on the peer, so a read sees every write acknowledged before it was issued, also
//! with protocols A and B. Writes go to every source; one complete per the protocol as for a
//! diskful primary, but succeed only when at least one source acknowledged them (protocol A
//! too: a source acknowledges a diskless writer's data on receipt, since a write counted done
//! once sent would exist only in a send buffer). With no source, requests fail at once
//! (`NoUpToDateData`); a source lost with reads outstanding has them retried on another
//! source or failed, so nothing waits longer than a ping timeout.
//!
//! Who remembers what the diskless node's disk lacks: its peers (DRBD marks a write out of sync
//! for a peer whose disk is below Inconsistent). A detaching primary sends `Frame::Detached`
//! with a fresh generation (all its peers adopt the same one, so they stay one lineage), then
//! `Frame::OutOfSync` for every write its disk may not hold (in flight or not yet flushed);
//! a peer marks, for a diskless peer that is not `disk none`, every write it receives from
//! it. A primary that detaches with nothing in doubt sends `Detached` with its first write
//! instead (its disk lacks nothing before that), as DRBD 9 starts the new current UUID it
//! flags (`NEW_CUR_UUID`) with the next write. A diskless primary that writes
//! while a diskful peer is unreachable tells the sources (`OutOfSync` naming that peer), so
//! they resync it later. After `handle_attach` the handshake finds the peer newer by that
//! generation and resyncs the marked blocks only.
//!
//! `on-io-error pass_on`: the error goes to the caller and the disk stays attached; a failed
//! application write is marked out of sync for every peer. Errors with no caller (a peer's
//! barrier flush, a resync read, a verify read) still detach.

use super::*;

/// DRBD's `disk { on-io-error ...; }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnIoError {
    /// Detach the disk and go on diskless through the peers (DRBD's default).
    #[default]
    Detach,
    /// Hand the error to the caller; keep the disk attached.
    PassOn,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid on-io-error value {0:?} (detach or pass_on)")]
pub struct InvalidOnIoError(pub String);

impl std::str::FromStr for OnIoError {
    type Err = InvalidOnIoError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "detach" => Ok(Self::Detach),
            "pass_on" => Ok(Self::PassOn),
            _ => Err(InvalidOnIoError(text.to_owned())),
        }
    }
}

impl std::fmt::Display for OnIoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Detach => "detach",
            Self::PassOn => "pass_on",
        })
    }
}

/// A read sent to a peer.
#[derive(Debug)]
struct RemoteRead {
    request: RequestId,
    first: u64,
    blocks: u64,
    peer: NodeId,
    conn_id: u64,
    /// Peers asked already (each at most once).
    tried: u64,
}

#[derive(Debug, Default)]
pub(super) struct DisklessState {
    /// The disk was detached (not `disk none`): `handle_attach` may bring it back.
    pub(super) detached: bool,
    /// A metadata write failed (`metafail`): `handle_attach` does a full resync.
    pub(super) meta_failed: bool,
    /// The metadata as it was on disk when it was detached.
    snapshot: Option<Box<Metadata>>,
    /// Diskful peers that missed a write since this node became diskless: not sources.
    missed: u64,
    /// A primary detached with nothing in doubt: the generation its sources adopt
    /// (`Frame::Detached`) starts with the first write its disk misses
    /// (`diskless_submit_write`), not at the detach.
    generation_pending: bool,
    reads: BTreeMap<u64, RemoteRead>,
    next_read: u64,
}

impl Node {
    pub(super) fn is_diskless(&self) -> bool {
        self.disk == DiskState::Diskless
    }

    /// The disk was detached (`on-io-error detach` or `handle_detach`), not `disk none`.
    pub fn is_detached(&self) -> bool {
        self.diskless.detached
    }

    fn diskless_source(&self, i: usize) -> bool {
        let p = &self.peers[i];
        p.replicating()
            && p.disk == DiskState::UpToDate
            && !self.is_diskless_peer(p.id)
            && self.diskless.missed & p.id.bit() == 0
    }

    pub(super) fn diskless_sources(&self) -> u64 {
        (0..self.peers.len())
            .filter(|i| self.diskless_source(*i))
            .map(|i| self.peers[i].id.bit())
            .sum()
    }

    /// A diskless node that can serve I/O (an UpToDate source is connected).
    pub(super) fn diskless_can_serve(&self) -> bool {
        self.is_diskless() && self.diskless_sources() != 0
    }

    fn diskful_peers(&self) -> u64 {
        self.peers.iter().filter(|p| !self.is_diskless_peer(p.id)).map(|p| p.id.bit()).sum()
    }

    // ----- the diskless node's side -----

    /// An application read on a diskless node (counted in `app_reads` until it completes).
    pub(super) fn diskless_read(&mut self, request: RequestId, first: u64, blocks: u64) {
        self.app_reads += 1;
        self.send_remote_read(RemoteRead {
            request,
            first,
            blocks,
            peer: self.id,
            conn_id: 0,
            tried: 0,
        });
    }

    /// Sends the read to a source not asked yet, or fails it.
    fn send_remote_read(&mut self, mut read: RemoteRead) {
        let choice = (0..self.peers.len())
            .find(|i| self.diskless_source(*i) && read.tried & self.peers[*i].id.bit() == 0);
        let Some(i) = choice else {
            self.app_reads -= 1;
            let result = Err(RequestError::NoUpToDateData);
            self.outputs.push_back(Output::Complete { request: read.request, result });
            return;
        };
        let id = self.diskless.next_read;
        self.diskless.next_read += 1;
        read.peer = self.peers[i].id;
        read.conn_id = self.peers[i].conn_id;
        read.tried |= read.peer.bit();
        let (offset_blocks, blocks) = (read.first, read.blocks);
        self.diskless.reads.insert(id, read);
        self.send(i, Frame::ReadRequest { id, offset_blocks, blocks });
    }

    /// A local read failed: with `detach`, detach and retry it through a peer (true: it was
    /// taken over; false: it fails to the caller).
    pub(super) fn diskless_local_read_failed(
        &mut self,
        request: RequestId,
        first: u64,
        blocks: u64,
    ) -> bool {
        if self.config.on_io_error == OnIoError::PassOn {
            return false;
        }
        self.detach();
        if !self.is_diskless() {
            return false;
        }
        self.send_remote_read(RemoteRead {
            request,
            first,
            blocks,
            peer: self.id,
            conn_id: 0,
            tried: 0,
        });
        true
    }

    /// A local write failed: `detach` detaches (the write completes through the peers that
    /// have it); `pass_on` fails it to the caller and marks it out of sync for every peer.
    pub(super) fn diskless_local_write_failed(&mut self, first: u64, blocks: u64) {
        if self.config.on_io_error == OnIoError::Detach {
            self.detach();
            return;
        }
        for peer in self.peer_ids() {
            if !self.is_diskless_peer(peer) {
                self.persist(MetaUpdate::BitmapSet { peer, first_block: first, blocks });
            }
        }
    }

    /// A local I/O that no caller waits for failed (a peer's flush, a resync read): detach,
    /// whatever the policy (nobody could take the error).
    pub(super) fn local_io_failed_internally(&mut self) {
        self.detach();
    }

    /// `submit_write` on a diskless node: the write goes to every source, nowhere else.
    pub(super) fn diskless_submit_write(&mut self, id: u64) {
        let sources = self.diskless_sources();
        if sources == 0 {
            let w = self.app_writes.remove(&id).expect("queued write exists");
            let result = Err(RequestError::NoUpToDateData);
            self.outputs.push_back(Output::Complete { request: w.request, result });
            return;
        }
        let (first, blocks, fua, data, atomic) = {
            let w = &self.app_writes[&id];
            (w.first, w.blocks, w.fua, w.data.clone(), w.atomic)
        };
        // Diskful peers that do not get this write are stale from now on; the sources keep
        // their bitmaps for them.
        let unreached = self.diskful_peers() & !sources;
        self.diskless.missed |= unreached;
        let tl = self.next_tl;
        self.next_tl += 1;
        let mut tl_peers = Vec::new();
        for p in &self.peers {
            if sources & p.id.bit() != 0 {
                tl_peers.push((p.id, p.epoch));
            }
        }
        self.transfer_log.insert(
            tl,
            TlEntry {
                first,
                blocks,
                resync: false,
                local_done: true,
                local_stable: true,
                flush_generation: None,
                peers: tl_peers,
            },
        );
        // Counted like a local write's, so collecting the entry balances it; no extent is
        // made hot (there is no activity log to write).
        self.al_ref(first, blocks, 1);
        {
            // Even under protocol A the write waits for a source's acknowledgment (its
            // `RecvAck`, see `receive_ack_wanted`): with no disk of our own, a write counted
            // done once sent exists only in a send buffer, and a partition or a dead peer
            // loses it with no node crashing (seeds 2103, 5601).
            let w = self.app_writes.get_mut(&id).expect("queued write exists");
            w.submitted = true;
            w.local = LocalState::Done;
            w.remote_only = true;
            w.waiting = sources;
            w.acked_by = 0;
            w.tl = tl;
        }
        self.completion_candidates.write(id);
        if std::mem::take(&mut self.diskless.generation_pending) {
            // The first write our disk misses (`go_diskless`): before its Data frames.
            self.detached_generation(sources, &[]);
        }
        // The secondaries must know where this write goes before its Data frames.
        self.mesh_detached_unreached(unreached, first, blocks);
        self.mesh_announce();
        for i in 0..self.peers.len() {
            if sources & self.peers[i].id.bit() != 0 {
                if unreached != 0 {
                    self.send(
                        i,
                        Frame::OutOfSync { offset_blocks: first, blocks, peers: unreached },
                    );
                }
                // A WRITE ATOMIC stays one atomic frame: each source journals it whole.
                self.send(i, super::atomic::data_frame(id, first, fua, data.clone(), atomic));
            }
        }
    }

    /// Whether a write received from peer `i` is acknowledged on receipt (`Frame::RecvAck`):
    /// always under protocol B, and under protocol A when the writer has no disk of its own
    /// (it sent `Frame::State` with `Diskless` before any such write), since then our copy is
    /// its only one and it must not count the write done before we have it.
    pub(super) fn receive_ack_wanted(&self, i: usize) -> bool {
        match self.config.protocol {
            ReplicationProtocol::A => self.peers[i].disk == DiskState::Diskless,
            ReplicationProtocol::B => true,
            ReplicationProtocol::C => false,
        }
    }

    /// A write of this node that was sent to peers succeeds when one of them has it.
    pub(super) fn diskless_write_ok(w: &AppWrite) -> bool {
        !w.remote_only || w.acked_by != 0
    }

    /// An application flush with no local part (diskless): it needs at least one peer that
    /// confirmed the barrier on the connection it was sent on.
    pub(super) fn diskless_flush_reached_nobody(
        &self,
        generation: Option<u64>,
        peers: &[(NodeId, u64, u64)],
    ) -> bool {
        generation.is_none()
            && !peers.iter().any(|(peer, conn_id, epoch)| {
                self.peer(*peer).is_some_and(|p| p.conn_id == *conn_id && p.epoch_acked(*epoch))
            })
    }

    /// A detached primary's new generation: every source adopts it (`Frame::Detached`),
    /// then marks the writes in `in_doubt` for us; in a mesh we take it too (in memory).
    fn detached_generation(&mut self, sources: u64, in_doubt: &[(u64, u64)]) {
        let fresh = self.fresh_uuid();
        for i in 0..self.peers.len() {
            if sources & self.peers[i].id.bit() == 0 {
                continue;
            }
            self.send(i, Frame::Detached { current_uuid: fresh });
            for (first, blocks) in in_doubt {
                let peers = self.id.bit();
                self.send(i, Frame::OutOfSync { offset_blocks: *first, blocks: *blocks, peers });
            }
        }
        self.mesh_detached_generation(fresh);
    }

    /// `drbdadm detach`, and what a local I/O error does with `on-io-error detach`.
    pub(super) fn go_diskless(&mut self) {
        if self.is_diskless() {
            return;
        }
        // From here on nothing is persisted: keep what the disk holds, for `handle_attach`.
        self.diskless.snapshot = Some(Box::new(self.meta.clone()));
        self.diskless.detached = true;
        self.emit(Event::Detached);
        let sources: u64 = (0..self.peers.len())
            .filter(|i| {
                let p = &self.peers[*i];
                p.replicating() && p.disk == DiskState::UpToDate && !self.is_diskless_peer(p.id)
            })
            .map(|i| self.peers[i].id.bit())
            .sum();
        // A peer we could not reach lacks what our bitmap marks for it (marked before every
        // write it missed): with bits it is stale, without it holds every acknowledged write.
        let behind: u64 = self
            .peers
            .iter()
            .filter(|p| !self.meta.bitmaps[p.id.index()].is_clear())
            .map(|p| p.id.bit())
            .sum();
        self.diskless.missed = self.diskful_peers() & !sources & behind;
        // Writes the disk may not hold: failed (the one that brought us here), in flight, or
        // written but not flushed.
        let mut in_doubt: Vec<(u64, u64)> = self
            .transfer_log
            .values()
            .filter(|e| !e.resync && !e.local_stable)
            .map(|e| (e.first, e.blocks))
            .collect();
        in_doubt.extend(
            self.app_writes
                .values()
                .filter(|w| w.submitted && w.local != LocalState::Done)
                .map(|w| (w.first, w.blocks)),
        );
        // One frame per contiguous range (at most a request's size), not one per write: a
        // stream of small writes leaves thousands of unflushed entries, and each OutOfSync
        // costs the peer a metadata update; thousands of them held the peer's pings back past
        // the ping timeout, and the link (with the writes waiting on it) was lost.
        let in_doubt = coalesce_ranges(in_doubt, REQUEST_BLOCKS_MAX);
        if self.role == Role::Primary {
            if in_doubt.is_empty() {
                // The disk holds every write so far: nothing tells it apart from its peers
                // yet. As DRBD 9 flags a new current UUID and starts it with the next write
                // (`NEW_CUR_UUID`), the generation waits for the first write the disk
                // misses. Started here, it lived on the sources only (we have no disk to
                // keep it): after a crash this node came back with the older generation
                // it holds on disk, was force-promoted from it, and a source that had taken
                // the detach generation and held nothing new met it as a split brain (mesh
                // seed 2057 on branch hs12598; the same with two nodes and with a tiebreaker,
                // tests/detach_forced.rs).
                self.diskless.generation_pending = true;
            } else {
                self.detached_generation(sources, &in_doubt);
            }
        }
        self.set_disk(DiskState::Failed);
        self.set_disk(DiskState::Diskless);
        // Writes in flight complete through the peers that acknowledge them.
        let mut sent_only = Vec::new();
        for (id, w) in self.app_writes.iter_mut() {
            if w.submitted {
                w.local = LocalState::Done;
                w.remote_only = true;
                self.completion_candidates.write(*id);
                sent_only.push(*id);
            }
        }
        // Nothing in the transfer log waits for the local disk any more.
        for (id, entry) in self.transfer_log.iter_mut() {
            entry.local_done = true;
            entry.local_stable = true;
            self.completion_candidates.transfer_log(*id);
        }
        for f in &mut self.app_flushes {
            if f.generation.is_some() {
                f.generation = None;
                f.failed = f.peers.is_empty();
            }
        }
        // A secondary can no longer apply what its primary sends, and a resync or verify with
        // us needs our disk: those connections start over, diskless. A primary keeps its
        // diskless peers (a tiebreaker): nothing on that connection needs our disk, and
        // dropping it cost the tiebreaker's vote, so a detached primary whose UpToDate peer
        // and tiebreaker were both connected lost quorum and failed (or froze) its I/O.
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            let diskless_peer = self.is_diskless_peer(p.id)
                && p.connection == ConnectionState::Connected
                && p.handshake.is_none()
                && p.replication == ReplicationState::Established;
            let keep = self.role == Role::Primary
                && (p.replicating() || diskless_peer)
                && p.replication == ReplicationState::Established
                && p.verify.deadline_ms().is_none();
            if p.connection == ConnectionState::Connected && !keep {
                self.disconnect(i, ConnectionState::Connecting);
            }
        }
        if self.config.protocol == ReplicationProtocol::A {
            self.diskless_await_barrier_acks(&sent_only);
        }
    }

    /// Protocol A counted the writes in flight at a detach acknowledged once sent; with the
    /// local disk gone that sent copy may be their only one, still in a send buffer that a
    /// partition or a dead peer loses with no node crashing (seeds 2103, 5601: the write was
    /// acknowledged, the link died, the write was nowhere). They now wait for a peer's barrier
    /// ack of the epoch they were sent in (the peer has them on disk then), or fail when no
    /// peer that had them can confirm it. The open epoch is closed so the ack comes soon.
    fn diskless_await_barrier_acks(&mut self, writes: &[u64]) {
        let replicating: u64 =
            self.peers.iter().filter(|p| p.replicating()).map(|p| p.id.bit()).sum();
        for id in writes {
            let Some(w) = self.app_writes.get_mut(id) else { continue };
            // Peers still listed have not confirmed the write stable; a replicating peer no
            // longer listed has (its barrier ack), since a lost link also unlists it.
            let unconfirmed: u64 = self
                .transfer_log
                .get(&w.tl)
                .map_or(0, |e| e.peers.iter().map(|(p, _)| p.bit()).sum());
            w.acked_by &= replicating & !unconfirmed;
            w.waiting = replicating & unconfirmed;
        }
        if !writes.is_empty() {
            self.start_barrier(None);
        }
    }

    /// A barrier ack from peer `i` confirms the writes of a detached primary that wait for it
    /// (`diskless_await_barrier_acks`) once their transfer-log entry no longer lists the peer.
    pub(super) fn diskless_barrier_acked(&mut self, i: usize) {
        if !self.is_diskless() || self.config.protocol != ReplicationProtocol::A {
            return;
        }
        let peer = self.peers[i].id;
        for (id, w) in self.app_writes.iter_mut() {
            let listed = self
                .transfer_log
                .get(&w.tl)
                .is_some_and(|e| e.peers.iter().any(|(p, _)| *p == peer));
            if w.remote_only && w.waiting & peer.bit() != 0 && !listed {
                w.waiting &= !peer.bit();
                w.acked_by |= peer.bit();
                self.completion_candidates.write(*id);
            }
        }
    }

    /// `drbdadm detach`.
    pub fn handle_detach(&mut self, now_ms: u64) -> Result<(), StateError> {
        self.advance(now_ms);
        if self.is_diskless() {
            return Err(StateError::Precondition("already Diskless"));
        }
        self.go_diskless();
        self.pump();
        Ok(())
    }

    /// `drbdadm attach`: the detached disk is back. Its metadata is the one it held when it was
    /// detached; the node becomes Outdated and handshakes again with every peer, which finds
    /// it behind by the generation its peers started and resyncs what they marked.
    pub fn handle_attach(&mut self, now_ms: u64) -> Result<(), StateError> {
        self.advance(now_ms);
        if !self.diskless.detached {
            return Err(StateError::Precondition(if self.config.quorum.diskless {
                "disk none: there is no disk to attach"
            } else {
                "disk attached already"
            }));
        }
        if self.role == Role::Primary {
            // The handshake would make it the sync target of its peer, and this engine never
            // resyncs a primary's data under its users.
            return Err(StateError::Precondition(
                "attach as Secondary: demote first (a primary is never a sync target)",
            ));
        }
        if !self.ios.is_empty() || !self.transfer_log.is_empty() {
            return Err(StateError::Precondition("I/O from before the detach still in flight"));
        }
        let snapshot = self.diskless.snapshot.take().expect("a detached node keeps its metadata");
        let meta_failed = self.diskless.meta_failed;
        self.diskless = DisklessState::default();
        self.meta = *snapshot;
        self.al_order.clear();
        self.al_refs.clear();
        for i in 0..self.peers.len() {
            if self.peers[i].connection == ConnectionState::Connected {
                self.disconnect(i, ConnectionState::Connecting);
            }
        }
        self.set_disk(DiskState::Attaching);
        self.set_disk(DiskState::Outdated);
        // The disk failed under writes: any block of a hot extent may hold a write its peers
        // never got, or lack one they did. Like a crashed primary's (`Node::new`), those
        // extents are marked out of sync for every peer before the activity log is cleared,
        // so the handshake resyncs them instead of finding the replicas in sync.
        let was_primary = self.meta.flags.primary_indicator;
        for extent in self.meta.activity_log.clone() {
            if let Some((first, blocks)) = self.meta.extent_range(extent) {
                for peer in self.config.peers.clone() {
                    if !self.is_diskless_peer(peer) {
                        self.persist(MetaUpdate::BitmapSet { peer, first_block: first, blocks });
                    }
                }
            }
        }
        if meta_failed {
            self.metafail_full_resync();
        }
        self.persist_flags(|f| {
            f.crashed_primary |= was_primary;
            f.primary_indicator = false;
        });
        if !self.meta.activity_log.is_empty() {
            let removed = self.meta.activity_log.clone();
            self.persist(MetaUpdate::ActivityLog { added: vec![], removed });
        }
        self.pump();
        Ok(())
    }

    /// `drbdadm primary` on a diskless node: allowed with an UpToDate source.
    pub(super) fn diskless_check_promote(&self) -> Result<(), StateError> {
        if !self.diskless_can_serve() {
            return Err(StateError::NoUpToDateData(DiskState::Diskless));
        }
        Ok(())
    }

    /// The promotion of a diskless node, once `diskless_check_promote` passed (the caller
    /// pumps).
    pub(super) fn diskless_promote(&mut self) {
        self.role = Role::Primary;
        self.demote_pending = false;
        self.quorum_promoted();
        self.emit(Event::RoleChanged(Role::Primary));
        self.broadcast_state();
    }

    /// Start of the disconnect of peer `i` (still Connected): reads outstanding there go to
    /// another source; a source cut off with writes unconfirmed missed them, and the other
    /// sources keep those blocks for it.
    pub(super) fn diskless_connection_lost(&mut self, i: usize) {
        let peer = self.peers[i].id;
        let lost: Vec<u64> =
            self.diskless.reads.iter().filter(|(_, r)| r.peer == peer).map(|(id, _)| *id).collect();
        if !self.is_diskless() {
            assert!(lost.is_empty(), "reads go to peers only while diskless");
            return;
        }
        // Take the peer out of the sources first, so retries go elsewhere.
        let unconfirmed: Vec<(u64, u64)> = self
            .transfer_log
            .values()
            .filter(|e| !e.resync && e.peers.iter().any(|(p, _)| *p == peer))
            .map(|e| (e.first, e.blocks))
            .collect();
        if !unconfirmed.is_empty() {
            self.diskless.missed |= peer.bit();
            for j in 0..self.peers.len() {
                if j == i || !self.diskless_source(j) {
                    continue;
                }
                for (first, blocks) in &unconfirmed {
                    let frame = Frame::OutOfSync {
                        offset_blocks: *first,
                        blocks: *blocks,
                        peers: peer.bit(),
                    };
                    self.send(j, frame);
                }
            }
        }
        for id in lost {
            let mut read = self.diskless.reads.remove(&id).expect("listed");
            read.tried |= peer.bit();
            self.send_remote_read(read);
        }
    }

    /// A peer's disk state changed: a stale peer that finished a resync counts again.
    pub(super) fn diskless_peer_disk_changed(&mut self, i: usize, old: DiskState, new: DiskState) {
        if old == DiskState::Inconsistent && new == DiskState::UpToDate {
            self.diskless.missed &= !self.peers[i].id.bit();
        }
    }

    /// The end of a handshake when either side is diskless: nothing to compare or sync, the
    /// connection carries reads and writes at once. True when it handled the handshake.
    pub(super) fn diskless_handshake(&mut self, i: usize, hello: &Hello) -> bool {
        if !self.is_diskless() && hello.disk != DiskState::Diskless {
            return false;
        }
        if self.role == Role::Primary && hello.role == Role::Primary {
            self.refuse(i, "both nodes are primary");
            return true;
        }
        self.set_peer_role(i, hello.role);
        self.peers[i].discard_my_data = false;
        self.set_peer_disk(i, hello.disk);
        self.set_replication(i, ReplicationState::Established);
        // Back as a secondary: a diskless peer has nothing to be promoted with but us, and a
        // diskful one gets our writes from now on, or is a stale non-source to this diskless
        // node; either way a fence pending for it is settled, as for an in-sync handshake.
        self.fence_pending &= !self.peers[i].id.bit();
        self.broadcast_state();
        true
    }

    // ----- the peers' side -----

    /// Frames of diskless operation (kinds 20-24).
    pub(super) fn handle_diskless_frame(&mut self, i: usize, frame: Frame) {
        let peer = self.peers[i].id;
        match frame {
            Frame::Detached { current_uuid } => {
                let valid = current_uuid & 1 == 0
                    && current_uuid != 0
                    && current_uuid != uuid::UUID_JUST_CREATED;
                if !valid {
                    self.protocol_error(i, "Detached with an invalid generation".into());
                    return;
                }
                // One generation for every peer of the detached primary: they stay one lineage,
                // and the detached disk is found behind it when it comes back.
                if self.role != Role::Primary
                    && self.disk.has_data()
                    && self.meta.uuids.bitmap_uuid(peer) == 0
                {
                    let mut uuids = self.meta.uuids.clone();
                    uuids.new_current(current_uuid, [peer]);
                    self.persist(MetaUpdate::Uuids(uuids));
                }
            }
            Frame::OutOfSync { offset_blocks, blocks, peers } => {
                if !self.read_range_valid(offset_blocks, blocks) {
                    self.protocol_error(i, "OutOfSync outside the device".into());
                    return;
                }
                self.mesh_peers_out_of_sync(i, peers);
                for q in self.peer_ids() {
                    if peers & q.bit() != 0 && !self.is_diskless_peer(q) {
                        self.persist(MetaUpdate::BitmapSet {
                            peer: q,
                            first_block: offset_blocks,
                            blocks,
                        });
                    }
                }
            }
            Frame::ReadRequest { id, offset_blocks, blocks } => {
                if !self.read_range_valid(offset_blocks, blocks) {
                    self.protocol_error(i, "ReadRequest outside the device".into());
                } else if self.disk != DiskState::UpToDate {
                    self.send(i, Frame::ReadError { id });
                } else if self.peers[i].queue.len() >= PEER_QUEUE_FRAMES_MAX {
                    self.protocol_error(i, "peer queue overflow".into());
                } else {
                    // Behind the writes that arrived before it: it must see them.
                    self.peers[i].queue.push_back(Incoming::Read {
                        id,
                        first: offset_blocks,
                        blocks,
                    });
                }
            }
            Frame::ReadReply { id, data } => {
                let Some(read) = self.take_remote_read(i, id) else { return };
                if blocks_of(data.len()) != Some(read.blocks) {
                    self.protocol_error(i, "ReadReply of the wrong length".into());
                    self.send_remote_read(read);
                    return;
                }
                let request = read.request;
                if self.fence_pending != 0 || self.quorum_holds_read(request) {
                    self.held_reads.push((request, data));
                } else {
                    self.app_reads -= 1;
                    self.outputs.push_back(Output::Complete { request, result: Ok(Some(data)) });
                }
            }
            Frame::ReadError { id } => {
                if let Some(read) = self.take_remote_read(i, id) {
                    self.send_remote_read(read);
                }
            }
            _ => unreachable!("only diskless frames are routed here"),
        }
    }

    /// A read sent to a peer overlaps the range: a write to it waits, so that it cannot be
    /// acknowledged before a read issued earlier returns the older data.
    pub(super) fn diskless_read_in_flight(&self, first: u64, blocks: u64) -> bool {
        self.diskless.reads.values().any(|r| overlaps(r.first, r.blocks, first, blocks))
    }

    fn take_remote_read(&mut self, i: usize, id: u64) -> Option<RemoteRead> {
        let p = &self.peers[i];
        let matches =
            self.diskless.reads.get(&id).is_some_and(|r| r.peer == p.id && r.conn_id == p.conn_id);
        if !matches {
            self.protocol_error(i, "reply to a read not asked for".into());
            return None;
        }
        self.diskless.reads.remove(&id)
    }

    fn read_range_valid(&self, first: u64, blocks: u64) -> bool {
        blocks > 0
            && blocks <= REQUEST_BLOCKS_MAX
            && first.checked_add(blocks).is_some_and(|e| e <= self.meta.size_blocks)
    }

    /// A Data frame from peer `i`: a detached peer lacks it (DRBD marks out of sync for a peer
    /// whose disk is below Inconsistent).
    pub(super) fn diskless_note_peer_write(&mut self, i: usize, first: u64, blocks: u64) {
        let p = &self.peers[i];
        if p.disk == DiskState::Diskless && !self.is_diskless_peer(p.id) && !self.is_diskless() {
            let peer = p.id;
            if !(first..first + blocks).all(|b| self.meta.bitmaps[peer.index()].test(b)) {
                self.persist(MetaUpdate::BitmapSet { peer, first_block: first, blocks });
            }
        }
    }

    /// `pump_incoming` met a queued read at the front: false while an earlier overlapping
    /// write is still in flight (the read must see it).
    pub(super) fn diskless_pump_read(&mut self, i: usize) -> bool {
        let Some(Incoming::Read { id, first, blocks }) = self.peers[i].queue.front() else {
            unreachable!("front is a read")
        };
        let (id, first, blocks) = (*id, *first, *blocks);
        if self.peer_writes.values().any(|(f, b)| overlaps(*f, *b, first, blocks)) {
            return false;
        }
        self.peers[i].queue.pop_front();
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        self.submit(
            DiskOp::Read { offset_blocks: first, blocks },
            IoPurpose::RemoteRead { peer, conn_id, id },
        );
        true
    }

    /// Our read for a diskless peer finished.
    pub(super) fn handle_remote_read_done(
        &mut self,
        peer: NodeId,
        conn_id: u64,
        id: u64,
        result: Result<Option<Vec<u8>>, IoFailed>,
    ) {
        let i = self.peer_index(peer).expect("configured peer");
        let current = self.peers[i].conn_id == conn_id
            && self.peers[i].connection == ConnectionState::Connected;
        let failed = !matches!(result, Ok(Some(_)));
        if current {
            let frame = match result {
                Ok(Some(data)) if self.disk == DiskState::UpToDate => Frame::ReadReply { id, data },
                _ => Frame::ReadError { id },
            };
            self.send(i, frame);
        }
        if failed && self.config.on_io_error == OnIoError::Detach {
            self.detach();
        }
    }
}

/// The union of `(first, blocks)` ranges as sorted, disjoint ranges of at most `piece_max`
/// blocks each (a longer run is cut into pieces). Pure.
fn coalesce_ranges(mut ranges: Vec<(u64, u64)>, piece_max: u64) -> Vec<(u64, u64)> {
    assert!(piece_max > 0);
    ranges.retain(|(_, blocks)| *blocks > 0);
    ranges.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (first, blocks) in ranges {
        match runs.last_mut() {
            Some((run_first, run_blocks)) if first <= *run_first + *run_blocks => {
                *run_blocks = (*run_blocks).max(first + blocks - *run_first);
            }
            _ => runs.push((first, blocks)),
        }
    }
    let mut pieces = Vec::with_capacity(runs.len());
    for (mut first, mut blocks) in runs {
        while blocks > 0 {
            let piece = blocks.min(piece_max);
            pieces.push((first, piece));
            first += piece;
            blocks -= piece;
        }
    }
    pieces
}

#[cfg(test)]
mod coalesce_tests {
    use super::coalesce_ranges;

    #[test]
    fn ranges_merge_when_they_touch_or_overlap_and_are_cut_at_the_piece_size() {
        type Case = (Vec<(u64, u64)>, u64, Vec<(u64, u64)>);
        let cases: Vec<Case> = vec![
            (vec![], 8, vec![]),
            (vec![(4, 2), (0, 2), (2, 2)], 8, vec![(0, 6)]),
            (vec![(0, 4), (1, 1)], 8, vec![(0, 4)]),
            (vec![(0, 2), (3, 1)], 8, vec![(0, 2), (3, 1)]),
            (vec![(10, 0), (0, 1)], 8, vec![(0, 1)]),
            (vec![(0, 3), (2, 5), (7, 1)], 8, vec![(0, 8)]),
            (vec![(0, 3), (2, 5), (7, 1)], 3, vec![(0, 3), (3, 3), (6, 2)]),
            (vec![(5, 20)], 8, vec![(5, 8), (13, 8), (21, 4)]),
        ];
        for (input, piece_max, expected) in cases {
            assert_eq!(coalesce_ranges(input.clone(), piece_max), expected, "{input:?}");
        }
    }
}

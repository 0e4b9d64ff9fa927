//! The state machine's side of quorum and of diskless nodes (a child module of `node`, so
//! that `node.rs` carries only one-line hooks). The decisions themselves are the pure
//! functions of `protocol::quorum`; this file feeds them the node's view and acts on them.
//!
//! What a primary does with quorum (DRBD 9's semantics):
//! - quorum lost, `on-no-quorum suspend-io`: no request completes and no new write starts
//!   until quorum returns; `io-error`: every request fails (`RequestError::NoQuorum`), new
//!   ones at once. Either way nothing is acknowledged from the moment the connection loss is
//!   noticed (quorum is re-evaluated before any completion of the same input).
//! - without quorum a primary starts no new data generation: the blocks of writes it could
//!   not replicate are marked in the bitmap only, so that a peer promoted meanwhile is found
//!   *newer* on reconnect (not split brain) and overwrites them. Nor while it may not
//!   acknowledge writes after losing a diskful peer (not fenced yet): with a tiebreaker it
//!   keeps quorum for a moment and may lose it before the fence is settled (issue 5); the
//!   generation starts only before its next acknowledgement (`quorum_deferred_generation`).
//! - a primary without quorum that meets a peer with newer data, or another primary, steps
//!   down (DRBD's `on-suspended-primary-outdated force-secondary`): what it held fails, it
//!   becomes Secondary and reconnects, and resyncs from the peer.
//! - right after a promotion, and while the peers that confirmed the new term (see
//!   `protocol::quorum`) do not give quorum, requests wait (they neither complete nor fail).

use super::*;
use crate::protocol::quorum::{self, OnNoQuorum, PeerReport, PeerView, Verdict};

/// How long a node keeps reporting a primary it lost (see `quorum_send_reports`).
pub(super) const PRIMARY_LOST_GRACE_MS: u64 = crate::constants::PING_TIMEOUT_MS;
const _: () = assert!(
    PRIMARY_LOST_GRACE_MS >= crate::constants::PING_INTERVAL_MS * 2,
    "longer than the primary may take to notice the same loss"
);

impl Node {
    /// Whether this node has quorum (always true with `quorum off`).
    pub fn has_quorum(&self) -> bool {
        self.quorum_state.have
    }

    pub(super) fn is_diskless_peer(&self, peer: NodeId) -> bool {
        self.config.quorum.is_diskless_peer(peer)
    }

    /// A handshake with a diskless end (this node or the peer): it stores nothing, so its
    /// device size means nothing and is not compared (DRBD's diskless nodes take the size of
    /// their peers; a tiebreaker never uses it).
    pub(super) fn handshake_with_diskless_end(&self, i: usize) -> bool {
        self.config.quorum.diskless || self.is_diskless_peer(self.peers[i].id)
    }

    /// The transport to `peer` was ended by the peer (EOF or reset, not a local timeout or
    /// error): as `handle_transport_closed`, but a primary lost this way is not reported for
    /// `PRIMARY_LOST_GRACE_MS`. The grace covers a primary that may notice the loss later
    /// than we do (a silent link: it keeps acknowledging until its own ping timeout); a
    /// primary whose end closed the connection (its engine dropped it, or its process died
    /// and its kernel closed it) noticed first, or acknowledges nothing any more.
    pub fn handle_transport_closed_by_peer(&mut self, now_ms: u64, peer: NodeId, conn_id: u64) {
        let current = self.peer_index(peer).is_some_and(|i| {
            self.peers[i].conn_id == conn_id
                && self.peers[i].connection == ConnectionState::Connected
        });
        if current {
            self.quorum_state.closed_by_peer |= peer.bit();
        }
        self.handle_transport_closed(now_ms, peer, conn_id);
        self.quorum_state.closed_by_peer &= !peer.bit();
    }

    /// A fence just started: ask the peers now (the report naming the lost peer), not at the
    /// next input; a new primary's first write waits for their answer, and without this it
    /// waited for the next ping (up to `PING_INTERVAL_MS`).
    pub(super) fn quorum_fence_started(&mut self) {
        if self.config.quorum.enabled() {
            self.quorum_send_reports();
        }
    }

    /// Handshake done on the current connection: the peer votes.
    fn peer_sees_us(&self, i: usize) -> bool {
        let p = &self.peers[i];
        p.connection == ConnectionState::Connected
            && p.handshake.is_none()
            && p.replication != ReplicationState::Off
    }

    /// The verdict now; with `confirmed_only`, peers that have not confirmed our current term
    /// as primary count as absent.
    fn quorum_verdict(&self, confirmed_only: bool, had: bool) -> Verdict {
        self.quorum_verdict_counting(
            |p| !confirmed_only || self.quorum_state.confirms(self.id, p.id, p.conn_id),
            had,
        )
    }

    /// The verdict of a pending promotion: only the peers that granted it (on their current
    /// connection) count as present (`promote`).
    pub(super) fn quorum_verdict_granted(&self, granted: &[(NodeId, u64)]) -> Verdict {
        self.quorum_verdict_counting(
            |p| granted.contains(&(p.id, p.conn_id)),
            self.quorum_state.have,
        )
    }

    /// The verdict with the connected peers for which `counts` is false taken as absent.
    fn quorum_verdict_counting(&self, counts: impl Fn(&Peer) -> bool, had: bool) -> Verdict {
        let views: Vec<PeerView> = (0..self.peers.len())
            .map(|i| {
                let p = &self.peers[i];
                let connected = self.peer_sees_us(i) && counts(p);
                PeerView {
                    connected,
                    disk: p.disk,
                    known_outdated: self.meta.flags.peer_outdated & p.id.bit() != 0,
                    diskless: self.is_diskless_peer(p.id),
                }
            })
            .collect();
        let tally = quorum::tally(self.disk, self.config.quorum.diskless, &views);
        quorum::evaluate(&self.config.quorum, &tally, had)
    }

    /// Whether marking blocks out of sync for `peer` (not tracked yet) starts a new data
    /// generation now; when not, the start is deferred to `quorum_deferred_generation`.
    pub(super) fn quorum_generation_now(&mut self, peer: NodeId) -> bool {
        if self.role != Role::Primary {
            return true;
        }
        if !self.config.quorum.enabled() {
            return !self.fence_defers_generation(peer);
        }
        let have = self.quorum_verdict(false, self.quorum_state.have).have;
        let confirmed = have && self.quorum_verdict(true, have).have;
        // Only writes this primary may still acknowledge start a generation: with quorum
        // among the peers that confirmed its term, and with every diskful peer it does not
        // reach fenced (known outdated). A peer lost a moment ago is not fenced yet: this
        // primary acknowledges nothing until it is, and may lose quorum before (issue 5: A
        // loses B, then the tiebreaker; B is promoted). A generation started then would fork
        // from B's, a split brain on reconnect; without it B's generation is newer and A,
        // which never acknowledged the marked writes, is B's sync target. DRBD 9 does the
        // same: the `NEW_CUR_UUID` of a lost peer is made when the I/O its fence froze thaws.
        let fenced = self.quorum_unreached_peers_fenced();
        if self.mesh_enabled() {
            // Three or more diskful nodes: the same rule, its quorum counted on links that
            // may have gone silent a moment ago (a partition: the peer's loss is only noticed
            // at its ping timeout, and the nodes on the other side promote one of them). A
            // quorum that rests on a stalled link (`stall.rs`) waits too, fenced or not.
            // Seed 5005 (draws of branch hs12598): a primary isolated 86 ms earlier, its
            // other link not stalled yet, was disconnected from a peer by the operator and
            // started a generation for it at once; it never acknowledged a write in it (the
            // fence waited for the silent peer), and that generation forked from the one the
            // majority started after promoting: a split brain on reconnect.
            if self.quorum_primary_unconfirmed() {
                // These marks are writes nobody acknowledged: they must not make us the
                // source of a peer of our generation (`mesh_unclean_direction`), after a
                // step-down either.
                self.mesh_marked_unacked(peer);
            }
            if confirmed && (!fenced || self.mesh_generation_stalled()) {
                self.quorum_state.generation_deferred |= peer.bit();
                return false;
            }
            return confirmed;
        }
        if confirmed && fenced {
            return true;
        }
        self.quorum_state.generation_deferred |= peer.bit();
        false
    }

    /// Without quorum (two nodes), under a fencing policy that freezes I/O: a primary that
    /// lost `peer`, not known outdated, acknowledges nothing until the fence-peer handler
    /// answered, and the handler may never outdate the peer (exit code 6, "peer is primary":
    /// this node outdates itself; or it fails and this node crashes while frozen). A
    /// generation started now would fork from the one of the peer, promoted meanwhile,
    /// although this node acknowledged no write in it: a false split brain on reconnect. So
    /// the start waits, as with quorum, for `quorum_deferred_generation` (DRBD defers
    /// `NEW_CUR_UUID` while I/O is frozen the same way); the marks alone make this node the
    /// peer's sync target if it never acknowledges again. A peer still connected (Ahead) is
    /// not fenced: its generation starts at once, as before.
    fn fence_defers_generation(&mut self, peer: NodeId) -> bool {
        let lost = self.peer(peer).is_some_and(|p| p.connection != ConnectionState::Connected);
        if !self.config.fencing.freezes()
            || !lost
            || self.meta.flags.peer_outdated & peer.bit() != 0
        {
            return false;
        }
        self.quorum_state.generation_deferred |= peer.bit();
        true
    }

    /// Every diskful peer this primary does not replicate to is known outdated (fenced).
    fn quorum_unreached_peers_fenced(&self) -> bool {
        self.peers.iter().all(|p| {
            p.replicating()
                || self.is_diskless_peer(p.id)
                || self.meta.flags.peer_outdated & p.id.bit() != 0
        })
    }

    /// This primary acknowledges writes now (none is held, none fails).
    fn quorum_acknowledges(&self) -> bool {
        self.role == Role::Primary
            && self.fence_pending == 0
            && !self.quorum_holds_io()
            && !self.quorum_fails_io()
    }

    /// Starts the generation deferred by `quorum_generation_now` once this primary may
    /// acknowledge writes again, before it does (called from `quorum_update` and before write
    /// completions). The writes marked meanwhile were never acknowledged: if this node steps
    /// down first (or reconnects to the peer), its marks only make it resync those blocks.
    pub(super) fn quorum_deferred_generation(&mut self) {
        if self.quorum_state.generation_deferred == 0 {
            return;
        }
        if self.role != Role::Primary || self.lost_to_peer() {
            // Stepped down, or outdated itself (fence-peer exit code 6): it acknowledges
            // nothing in this generation any more, and its marks make it the sync target of
            // the peer that holds the newer data.
            self.quorum_state.generation_deferred = 0;
            return;
        }
        if !self.quorum_acknowledges() {
            return;
        }
        let deferred = std::mem::take(&mut self.quorum_state.generation_deferred);
        let pending: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|p| {
                deferred & p.id.bit() != 0
                    && !p.replicating()
                    && self.meta.uuids.bitmap_uuid(p.id) == 0
            })
            .map(|p| p.id)
            .collect();
        // One generation tracks every peer not replicating: the first start covers the rest.
        for peer in pending {
            if self.meta.uuids.bitmap_uuid(peer) == 0 {
                self.new_generation_for(peer);
            }
        }
    }

    /// When `handle_timeout` must run for quorum: the end of a lost primary's grace period.
    pub(super) fn quorum_next_deadline(&self) -> Option<u64> {
        self.quorum_state.lost_primaries.values().map(|t| t + PRIMARY_LOST_GRACE_MS).min()
    }

    /// A primary whose term no peer confirmed yet (promoted on a stale view, seed 8475): it
    /// acknowledged nothing since its promotion, so its data is no reference for a peer of
    /// its generation (`mesh_unclean_direction`), which may hold writes another primary
    /// acknowledged meanwhile. (Not a primary that merely lost quorum: it may hold writes it
    /// acknowledged alone, under protocol A or B, or before it noticed the loss; seed 13.)
    pub(super) fn quorum_primary_unconfirmed(&self) -> bool {
        self.config.quorum.enabled()
            && self.role == Role::Primary
            && self.quorum_state.generation_pending
    }

    /// Application I/O of this primary waits.
    pub(super) fn quorum_holds_io(&self) -> bool {
        let q = &self.quorum_state;
        // A detached primary holds nothing: its disk is gone and it is connected to no one
        // until it is re-attached (after its demotion), so what it held would wait forever;
        // its requests fail instead.
        let detached = self.disk == DiskState::Diskless && !self.config.quorum.diskless;
        self.config.quorum.enabled()
            && self.role == Role::Primary
            && !detached
            && ((!q.have && self.config.quorum.on_no_quorum == OnNoQuorum::SuspendIo)
                || (q.have && !q.confirmed))
    }

    /// Application I/O of this primary fails: without quorum under `on-no-quorum io-error`,
    /// and on a detached primary (which serves through its peers) whenever it could not
    /// complete I/O, since it holds nothing (see `quorum_holds_io`).
    pub(super) fn quorum_fails_io(&self) -> bool {
        let q = &self.quorum_state;
        let detached = self.disk == DiskState::Diskless && !self.config.quorum.diskless;
        self.config.quorum.enabled()
            && self.role == Role::Primary
            && if detached {
                !(q.have && q.confirmed)
            } else {
                !q.have && self.config.quorum.on_no_quorum == OnNoQuorum::IoError
            }
    }

    /// Whether this request must fail now (io-error, or doomed by a force-secondary).
    pub(super) fn quorum_fails_request(&mut self, request: RequestId) -> bool {
        let doomed = self.quorum_state.doomed.remove(&request.0);
        doomed || self.quorum_fails_io()
    }

    /// A finished read waits in `held_reads` (released or failed by `release_held_reads`).
    pub(super) fn quorum_holds_read(&self, request: RequestId) -> bool {
        self.quorum_holds_io()
            || self.quorum_fails_io()
            || self.quorum_state.doomed.contains(&request.0)
    }

    /// `drbdadm primary` needs quorum, and no peer may report another primary.
    pub(super) fn quorum_check_promote(&self) -> Result<(), StateError> {
        if !self.config.quorum.enabled() {
            return Ok(());
        }
        if self.config.quorum.diskless {
            return Err(StateError::NoUpToDateData(DiskState::Diskless));
        }
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if self.peer_sees_us(i)
                && let Some(other) = self.quorum_state.primary_reported(self.id, p.id, p.conn_id)
            {
                return Err(StateError::PeerIsPrimary(other));
            }
        }
        if let Some(peer) = self.quorum_stalled_reporter() {
            return Err(StateError::NoQuorum(format!(
                "connection to {peer} stalled, its report of a primary may be held up"
            )));
        }
        let v = self.quorum_verdict(false, self.quorum_state.have);
        if v.have {
            return Ok(());
        }
        // DRBD's wording (drbd_state.c).
        Err(StateError::NoQuorum(if v.visible < v.quorum_at {
            format!("{} of {} nodes visible, need {} for quorum", v.visible, v.voters, v.quorum_at)
        } else {
            format!(
                "{} of {} nodes up_to_date, need {} for quorum-minimum-redundancy",
                v.up_to_date, v.voters, v.min_redundancy_at
            )
        }))
    }

    /// A primary other than `asker` this node knows of: connected, reported by a connected
    /// peer, or lost less than `PRIMARY_LOST_GRACE_MS` ago (it may not have noticed yet).
    /// A promotion of `asker` must not be granted then (`promote`).
    pub(super) fn quorum_other_primary(&self, asker: NodeId) -> Option<NodeId> {
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if p.id == asker || p.connection != ConnectionState::Connected {
                continue;
            }
            if p.role == Role::Primary {
                return Some(p.id);
            }
        }
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if self.peer_sees_us(i)
                && let Some(r) = self.quorum_state.reports.get(&p.id)
                && r.conn_id == p.conn_id
            {
                let others = r.primaries & !self.id.bit() & !asker.bit();
                if let Some(other) = self.peers.iter().find(|q| others & q.id.bit() != 0) {
                    return Some(other.id);
                }
            }
        }
        self.quorum_state
            .lost_primaries
            .iter()
            .find(|(p, t)| **p != asker && **t + PRIMARY_LOST_GRACE_MS > self.now_ms)
            .map(|(p, _)| *p)
    }

    /// Called when a promotion succeeded: a new term, which the peers must confirm.
    pub(super) fn quorum_promoted(&mut self) {
        if !self.config.quorum.enabled() {
            return;
        }
        self.quorum_state.term += 1;
        self.quorum_state.confirmed = false;
        self.quorum_state.generation_pending = true;
    }

    /// Once the peers confirmed a new primary: a new generation at once when a diskful peer
    /// is not replicating. A primary that lost quorum over there may hold writes it never
    /// acknowledged; our newer generation makes it the sync target on reconnect, even if we
    /// write nothing. (Not at promotion: a primary promoted on a stale view is never
    /// confirmed, steps down, and must then be found *older*, not split.)
    fn quorum_confirmed_generation(&mut self) {
        self.quorum_state.generation_pending = false;
        if self.mesh_enabled() {
            // Three or more diskful nodes: the generation starts with the first write a
            // peer misses (`mark_out_of_sync`), as DRBD 9 starts the one an unforced
            // promotion flags (`NEW_CUR_UUID`). One started here with nothing written met a
            // node force-promoted meanwhile, which had moved on from the same base, as a
            // split brain although this side held nothing new (seed 14209).
            return;
        }
        let missing: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|p| {
                !p.replicating()
                    && !self.is_diskless_peer(p.id)
                    && self.meta.uuids.bitmap_uuid(p.id) == 0
            })
            .map(|p| p.id)
            .collect();
        if !missing.is_empty() {
            let fresh = self.fresh_uuid();
            let mut uuids = self.meta.uuids.clone();
            uuids.new_current(fresh, missing);
            self.persist(MetaUpdate::Uuids(uuids));
        }
    }

    /// Re-evaluates quorum (first thing in every `pump`), reports changes as events, fails
    /// queued writes under io-error and sends `Frame::Quorum` where it changed.
    pub(super) fn quorum_update(&mut self) {
        if !self.config.quorum.enabled() {
            return;
        }
        let have = self.quorum_verdict(false, self.quorum_state.have).have;
        if have != self.quorum_state.have {
            self.quorum_state.have = have;
            self.emit(Event::QuorumChanged(have));
            if !have {
                self.mesh_quorum_lost();
            }
        }
        self.quorum_state.confirmed =
            self.role != Role::Primary || (have && self.quorum_verdict(true, have).have);
        self.quorum_settle_fences();
        if self.role == Role::Primary
            && self.quorum_state.confirmed
            && self.quorum_state.generation_pending
        {
            self.quorum_confirmed_generation();
        }
        self.quorum_deferred_generation();
        if self.quorum_fails_io() {
            for id in std::mem::take(&mut self.queued_writes) {
                let w = self.app_writes.remove(&id).expect("queued");
                self.outputs.push_back(Output::Complete {
                    request: w.request,
                    result: Err(RequestError::NoQuorum),
                });
            }
        }
        self.quorum_send_reports();
    }

    /// Tells every connected peer which primary this node accepts, when that changed. A
    /// primary this node lost stays in the report for `PRIMARY_LOST_GRACE_MS`: the primary
    /// may notice the loss up to a ping interval (plus network delay) later than we do, and
    /// keeps acknowledging writes until then, so no peer may promote before.
    fn quorum_send_reports(&mut self) {
        let mut accepted = 0u64;
        for i in 0..self.peers.len() {
            if self.peer_sees_us(i) && self.peers[i].role == Role::Primary {
                accepted |= self.peers[i].id.bit();
            }
        }
        let now = self.now_ms;
        let previous = std::mem::replace(&mut self.quorum_state.accepted, accepted);
        for p in &self.peers {
            // A primary that ended the connection itself (or whose process died: its kernel
            // closed it) knew of the loss first, so the grace below has nothing to cover.
            let closed_by_peer = self.quorum_state.closed_by_peer & p.id.bit() != 0;
            if previous & !accepted & p.id.bit() != 0 && !closed_by_peer {
                self.quorum_state.lost_primaries.insert(p.id, now);
            }
            if accepted & p.id.bit() != 0 {
                self.quorum_state.lost_primaries.remove(&p.id);
            }
        }
        self.quorum_state.lost_primaries.retain(|_, t| *t + PRIMARY_LOST_GRACE_MS > now);
        let lingering: u64 = self.quorum_state.lost_primaries.keys().map(|p| p.bit()).sum();
        let diskful_peers: u64 =
            self.peers.iter().filter(|p| !self.is_diskless_peer(p.id)).map(|p| p.id.bit()).sum();
        let (primaries, term, outdate) = if self.role == Role::Primary {
            // Only a primary with quorum fences: one that lost it may be the stale one.
            let fencing = if self.quorum_state.have { self.fence_pending } else { 0 };
            (self.id.bit(), self.quorum_state.term, fencing & diskful_peers)
        } else {
            let mut primaries = 0;
            let mut term = 0;
            let mut outdate = 0;
            for i in 0..self.peers.len() {
                let p = &self.peers[i];
                if self.peer_sees_us(i) && p.role == Role::Primary {
                    primaries |= p.id.bit();
                    if let Some(r) = self.quorum_state.reports.get(&p.id)
                        && r.conn_id == p.conn_id
                        && r.primaries & p.id.bit() != 0
                    {
                        term = r.term;
                        outdate = r.outdate;
                    }
                }
            }
            (primaries | lingering, term, outdate)
        };
        let mut unseen = 0u64;
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if !self.is_diskless_peer(p.id)
                && (!self.peer_sees_us(i) || p.disk <= DiskState::Outdated)
            {
                unseen |= p.id.bit();
            }
        }
        for i in 0..self.peers.len() {
            if !self.peer_sees_us(i) {
                continue;
            }
            let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
            let report = [conn_id, primaries, term, outdate, unseen];
            if self.quorum_state.sent.get(&peer) != Some(&report) {
                self.quorum_state.sent.insert(peer, report);
                self.send(i, Frame::Quorum { primaries, term, outdate, unseen });
            }
        }
    }

    pub(super) fn quorum_handle_frame(&mut self, i: usize, report: [u64; 4]) {
        let [primaries, term, outdate, unseen] = report;
        let p = &self.peers[i];
        self.quorum_state
            .reports
            .insert(p.id, PeerReport { conn_id: p.conn_id, primaries, term, outdate, unseen });
        // A primary that lost us asks (through the peers that accept it) that we outdate
        // ourselves before it writes on without us: we cannot be promoted with what it lacks.
        // Only while no diskful node is connected: a relayed request can be older than a
        // reconnection to the primary (or to anyone holding its data).
        let diskful_connected = (0..self.peers.len())
            .any(|j| self.peer_sees_us(j) && !self.is_diskless_peer(self.peers[j].id));
        if outdate & self.id.bit() != 0 {
            // A primary may write on without us from now on.
            self.mesh_outdated_by_request();
        }
        if outdate & self.id.bit() != 0
            && self.role != Role::Primary
            && !diskful_connected
            && matches!(self.disk, DiskState::UpToDate | DiskState::Consistent)
        {
            self.set_disk(DiskState::Outdated);
        }
    }

    /// A primary's fence of a lost diskful peer is settled in-protocol when a peer that
    /// confirms our term does not see it with promotable data (outdated at our request,
    /// relayed by that peer, or out of its reach: then it has no quorum without us either).
    fn quorum_settle_fences(&mut self) {
        // Only with quorum: a primary that lost it may be the stale one, and an outdated
        // peer would give it quorum back (DRBD's last man standing).
        if self.role != Role::Primary || self.fence_pending == 0 || !self.quorum_state.have {
            return;
        }
        for i in 0..self.peers.len() {
            let lost = self.peers[i].id;
            if self.fence_pending & lost.bit() == 0 {
                continue;
            }
            let vouched = (0..self.peers.len()).any(|j| {
                let q = &self.peers[j];
                j != i
                    && self.peer_sees_us(j)
                    && self.quorum_state.confirms(self.id, q.id, q.conn_id)
                    && self
                        .quorum_state
                        .reports
                        .get(&q.id)
                        // Naming our request makes the report an answer to it, not a view
                        // from before the loss.
                        .is_some_and(|r| r.unseen & r.outdate & lost.bit() != 0)
            });
            if vouched {
                self.fence_pending &= !lost.bit();
                self.persist_flags(|f| f.peer_outdated |= lost.bit());
            }
        }
    }

    /// Another connected peer is primary already: this node accepts one primary at a time.
    fn other_primary_connected(&self, except: usize) -> bool {
        (0..self.peers.len())
            .any(|j| j != except && self.peer_sees_us(j) && self.peers[j].role == Role::Primary)
    }

    /// A peer announced itself primary (`Frame::State`): with quorum, a second primary is
    /// disconnected (it then lacks this node's vote and confirmation). True when it was.
    pub(super) fn quorum_reject_second_primary(&mut self, i: usize) -> bool {
        if self.config.quorum.enabled()
            && self.role != Role::Primary
            && self.other_primary_connected(i)
        {
            self.protocol_error(i, "a second primary announced itself".into());
            return true;
        }
        false
    }

    /// Start of `finish_handshake`: refuses a second primary, and completes the handshake of a
    /// diskless node at once (it stores nothing: no generations to compare, nothing to sync).
    pub(super) fn quorum_handshake_start(&mut self, i: usize, hello: &Hello) -> bool {
        if self.config.quorum.enabled()
            && hello.role == Role::Primary
            && self.role != Role::Primary
            && self.other_primary_connected(i)
        {
            self.disconnect(i, ConnectionState::Connecting);
            return true;
        }
        if !(self.config.quorum.diskless || self.is_diskless_peer(self.peers[i].id)) {
            return false;
        }
        self.set_peer_role(i, hello.role);
        self.peers[i].discard_my_data = false;
        self.set_peer_disk(i, hello.disk);
        self.set_replication(i, ReplicationState::Established);
        self.broadcast_state();
        true
    }

    /// Two primaries of one generation, in a mesh, that each hold bits for the other: with
    /// quorum this is no split brain. Writing apart starts a generation, and where a primary
    /// defers it (its quorum rests on a stalled link, `quorum_generation_now`) it acknowledges
    /// nothing meanwhile; the bits are otherwise blocks a resync from a third node brought
    /// (`mesh_resync_received`), which the secondaries' rules in `mesh_adjust_decision`
    /// settle the same way (seed 5349: node 1 promoted on a link to node 0 that had just
    /// died, node 2 was promoted with node 0, and both held resync marks for each other).
    /// Nothing acts on the direction: `quorum_after_decision` ends the handshake of two
    /// primaries (the one without quorum steps down first), and the next one, with one of
    /// them secondary, decides for real. The lower node id is named the source, so that
    /// both sides report mirrored decisions.
    pub(super) fn quorum_two_primaries_decision(
        &self,
        hello: &Hello,
        my_sent_role: Role,
        decision: SyncDecision,
    ) -> SyncDecision {
        let two_primaries_one_generation = self.config.quorum.enabled()
            && self.mesh_enabled()
            && my_sent_role == Role::Primary
            && hello.role == Role::Primary
            && self.meta.uuids.current == hello.uuids.current
            && self.disk.has_data()
            && hello.disk.has_data();
        if decision != SyncDecision::SplitBrain || !two_primaries_one_generation {
            return decision;
        }
        if self.id < hello.node_id {
            SyncDecision::BitmapSource
        } else {
            SyncDecision::BitmapTarget
        }
    }

    /// After the sync decision: a primary without quorum that meets newer data or another
    /// primary steps down and reconnects; the other side waits for that instead of refusing
    /// for good. True when the handshake was ended here.
    pub(super) fn quorum_after_decision(
        &mut self,
        i: usize,
        hello: &Hello,
        source: bool,
        target: bool,
    ) -> bool {
        if !self.config.quorum.enabled() {
            return false;
        }
        let peer_primary = hello.role == Role::Primary;
        if self.role == Role::Primary && (target || peer_primary) {
            if !self.quorum_verdict(false, self.quorum_state.have).have {
                self.quorum_force_secondary();
            }
            self.disconnect(i, ConnectionState::Connecting);
            return true;
        }
        if peer_primary && source {
            // A primary behind us has no quorum (we or a primary we follow hold it): it steps
            // down on its side of this handshake and comes back as a secondary.
            self.disconnect(i, ConnectionState::Connecting);
            return true;
        }
        false
    }

    /// DRBD's force-secondary: everything this primary holds fails, it becomes Secondary.
    fn quorum_force_secondary(&mut self) {
        for id in std::mem::take(&mut self.queued_writes) {
            let w = self.app_writes.remove(&id).expect("queued");
            self.outputs.push_back(Output::Complete {
                request: w.request,
                result: Err(RequestError::NoQuorum),
            });
        }
        let doomed = &mut self.quorum_state.doomed;
        doomed.extend(self.app_writes.values().map(|w| w.request.0));
        doomed.extend(self.app_flushes.iter().map(|f| f.request.0));
        doomed.extend(self.held_reads.iter().map(|(r, _)| r.0));
        doomed.extend(self.ios.values().filter_map(|p| match p {
            IoPurpose::AppRead { request, .. } => Some(request.0),
            _ => None,
        }));
        self.role = Role::Secondary;
        self.demote_pending = false;
        // A secondary fences nothing; what the fence froze fails above.
        self.fence_pending = 0;
        self.persist_flags(|f| f.primary_indicator = false);
        self.emit(Event::RoleChanged(Role::Secondary));
        self.broadcast_state();
    }
}

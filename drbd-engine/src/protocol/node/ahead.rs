//! DRBD's congestion policies (`net { on-congestion; congestion-fill; congestion-extents; }`),
//! a child module of `node` with one-line hooks there.
//!
//! Under protocol A a primary acknowledges a write once it is sent, so a slow link lets the
//! data in flight to a peer grow until the sender blocks (`on-congestion block`, the default
//! and the behaviour without this module). With `pull-ahead`, when the application data sent
//! to a peer and not yet confirmed stable there (its epoch's barrier ack) reaches
//! `congestion-fill`, or the activity log holds more than `congestion-extents` hot extents
//! (the write's own counted), the primary
//! goes `Ahead` of that peer: it closes the open epoch with a barrier, tells the peer
//! (`Frame::Ahead`), and from then on sends it no writes but marks them out of sync in its
//! bitmap (the peer is not replicating, so the ordinary write path marks them, starting a new
//! generation as for a lost peer). The peer becomes `Behind` and outdates its disk: its data
//! is consistent but old, so it cannot be promoted without `--force` while Behind or after its
//! link drops (promotion needs UpToDate data). When
//! everything sent before the pull-ahead is confirmed (the in-flight data drained), the primary
//! starts a resync of the marked blocks on the same connection (`Frame::AheadResync`: Ahead
//! becomes SyncSource, Behind becomes SyncTarget) and both return to Established at its end.
//! `on-congestion disconnect` drops the connection instead (it reconnects and the handshake
//! resyncs what the peer missed). Not with three or more diskful nodes yet (`mesh`): there
//! the policy is ignored and writes block, as with `block`.
//!
//! Congestion is decided here, from what the core already knows (the transfer log and the
//! activity log); the driver measures nothing. DRBD accepts a policy other than `block` only
//! with protocol A (`ERR_CONG_NOT_PROTO_A`); `CongestionConfig::check` refuses it otherwise,
//! and a node configured that way anyway blocks, as without a policy.
//!
//! Safety until the peer has confirmed that it is Behind (its State says Outdated): a write
//! acknowledged meanwhile is in the same position as a protocol A write still on the wire,
//! except that an application flush would make it durable on the primary only. So flushes
//! wait for that confirmation, and losing the connection before it counts as losing a
//! replicating peer (it is fenced when fencing is configured).

use super::*;

/// `net { on-congestion }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCongestion {
    /// Wait for the link (the writes stay in flight).
    #[default]
    Block,
    /// Go Ahead of the congested peer and resync it once the congestion cleared.
    PullAhead,
    /// Drop the connection to the congested peer.
    Disconnect,
}

impl OnCongestion {
    /// DRBD's word for the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::PullAhead => "pull-ahead",
            Self::Disconnect => "disconnect",
        }
    }
}

impl std::str::FromStr for OnCongestion {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "block" => Ok(Self::Block),
            "pull-ahead" => Ok(Self::PullAhead),
            "disconnect" => Ok(Self::Disconnect),
            _ => Err(format!("invalid on-congestion: {text:?}")),
        }
    }
}

/// `net { on-congestion; congestion-fill; congestion-extents; }` in the engine's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CongestionConfig {
    pub on_congestion: OnCongestion,
    /// Congested when the application data in flight to a peer reaches this (0: not checked,
    /// DRBD's default).
    pub fill_bytes: u64,
    /// Congested when the activity log holds more hot extents than this (`None`: not checked).
    pub extents: Option<usize>,
}

/// Why a congestion configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CongestionError {
    #[error(
        "on-congestion {0} needs protocol A (the resource uses protocol {1}); DRBD refuses it \
         too: only protocol A acknowledges writes the link has not carried yet"
    )]
    NeedsProtocolA(&'static str, char),
}

impl CongestionConfig {
    /// Whether the policy is allowed with `protocol` (DRBD: policies other than `block` only
    /// with protocol A).
    pub fn check(&self, protocol: ReplicationProtocol) -> Result<(), CongestionError> {
        if self.on_congestion == OnCongestion::Block || protocol == ReplicationProtocol::A {
            return Ok(());
        }
        let name = match protocol {
            ReplicationProtocol::A => 'A',
            ReplicationProtocol::B => 'B',
            ReplicationProtocol::C => 'C',
        };
        Err(CongestionError::NeedsProtocolA(self.on_congestion.as_str(), name))
    }

    /// Some threshold is set and the policy acts on it.
    fn active(&self, protocol: ReplicationProtocol) -> bool {
        self.on_congestion != OnCongestion::Block
            && self.check(protocol).is_ok()
            && (self.fill_bytes > 0 || self.extents.is_some())
    }
}

/// Per peer (by index): its connection id and the application bytes sent in each epoch not
/// yet acknowledged, kept only while a policy is set (DRBD's `ap_in_flight`, without a
/// transfer-log walk per write).
#[derive(Debug, Default)]
pub(super) struct AheadState {
    sent: Vec<(u64, BTreeMap<u64, u64>)>,
}

impl Node {
    /// Application data sent to `peer` and not yet confirmed stable there, in bytes: the
    /// transfer-log entries still waiting for its barrier ack (exact, a walk of the log).
    pub(super) fn ahead_in_flight_bytes(&self, peer: NodeId) -> u64 {
        self.transfer_log
            .values()
            .filter(|e| !e.resync && e.peers.iter().any(|(p, _)| *p == peer))
            .map(|e| e.blocks * BLOCK_SIZE_BYTES)
            .sum()
    }

    /// Bytes in flight to `peer` (for status output and tests).
    pub fn in_flight_bytes(&self, peer: NodeId) -> u64 {
        self.ahead_in_flight_bytes(peer)
    }

    /// Application bytes in flight to peer `i` by the counters: what was sent in the epochs
    /// of its current connection that it has not acknowledged yet. (A FUA write acknowledged
    /// early still counts until its epoch is: a little conservative, never low.)
    fn ahead_sent_bytes(&mut self, i: usize) -> u64 {
        let p = &self.peers[i];
        let (conn_id, acked_epoch) = (p.conn_id, p.acked_epoch);
        let Some((conn, epochs)) = self.ahead.sent.get_mut(i) else { return 0 };
        if *conn != conn_id {
            return 0;
        }
        while epochs.first_key_value().is_some_and(|(epoch, _)| *epoch <= acked_epoch) {
            epochs.pop_first();
        }
        epochs.values().sum()
    }

    /// Counts a write of `blocks` sent now to every replicating peer in its current epoch.
    fn ahead_note_sent(&mut self, blocks: u64) {
        if self.ahead.sent.len() < self.peers.len() {
            self.ahead.sent.resize_with(self.peers.len(), Default::default);
        }
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if !p.replicating() {
                continue;
            }
            let (conn, epochs) = &mut self.ahead.sent[i];
            if *conn != p.conn_id {
                *conn = p.conn_id;
                epochs.clear();
            }
            // Bounded by the epochs the peer has not acknowledged (closed every barrier
            // interval, acknowledged within a ping timeout or the connection ends).
            let acked_epoch = p.acked_epoch;
            while epochs.first_key_value().is_some_and(|(epoch, _)| *epoch <= acked_epoch) {
                epochs.pop_first();
            }
            *epochs.entry(p.epoch).or_default() += blocks * BLOCK_SIZE_BYTES;
        }
    }

    /// Hook in `submit_write`, before the write is sent: applies the congestion policy to
    /// every peer the write would go to (DRBD's `maybe_pull_ahead`). Only Established peers
    /// are judged: a resync in progress keeps its writes flowing.
    pub(super) fn ahead_check_congestion(&mut self, blocks: u64) {
        let congestion = self.config.congestion;
        if self.role != Role::Primary || !congestion.active(self.config.protocol) {
            return;
        }
        if self.mesh_enabled() {
            // Three or more diskful nodes: the mesh's bookkeeping (which secondaries a write
            // went to, `MeshTargets`) assumes a connected diskful peer gets every write; a
            // policy there is not supported yet, so the writes block as by default.
            return;
        }
        let extents_congested = congestion.extents.is_some_and(|max| self.al_order.len() > max);
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if !p.replicating()
                || p.replication != ReplicationState::Established
                || self.is_diskless_peer(p.id)
            {
                continue;
            }
            // Writes sent while this node was not judging (a diskless or detached primary) are
            // not counted: congestion is noticed later, never wrongly.
            let sent = self.ahead_sent_bytes(i);
            let fill_congested = congestion.fill_bytes > 0 && sent >= congestion.fill_bytes;
            if !(fill_congested || extents_congested) {
                continue;
            }
            match congestion.on_congestion {
                OnCongestion::Block => {}
                OnCongestion::PullAhead => self.ahead_enter(i),
                // The handshake after the reconnect resyncs what the peer missed.
                OnCongestion::Disconnect => self.disconnect(i, ConnectionState::NetworkFailure),
            }
        }
        self.ahead_note_sent(blocks);
    }

    /// Goes Ahead of peer `i`: the open epoch is closed so what was sent drains, then the peer
    /// is told it is Behind. Later writes are marked for it instead of sent.
    fn ahead_enter(&mut self, i: usize) {
        let epoch = self.peers[i].epoch;
        self.peers[i].epoch += 1;
        self.send(i, Frame::Barrier { epoch });
        self.send(i, Frame::Ahead);
        self.set_replication(i, ReplicationState::Ahead);
    }

    /// Peer `i` is Ahead and has not yet confirmed that it is Behind: it may still count
    /// itself UpToDate.
    pub(super) fn ahead_unconfirmed(&self, i: usize) -> bool {
        let p = &self.peers[i];
        p.replication == ReplicationState::Ahead
            && p.connection == ConnectionState::Connected
            && !matches!(p.disk, DiskState::Outdated | DiskState::Inconsistent)
    }

    /// Hook in `try_complete_flushes`: an application flush must not complete while a peer we
    /// stopped sending to may still take itself for UpToDate.
    pub(super) fn ahead_holds_flushes(&self) -> bool {
        (0..self.peers.len()).any(|i| self.ahead_unconfirmed(i))
    }

    /// Hook in `start_queued_writes`' fence loop: a connected peer we are Ahead of is not a
    /// lost peer (it learns that it is Behind in order, and flushes wait for that).
    pub(super) fn ahead_of_connected(&self, i: usize) -> bool {
        let p = &self.peers[i];
        p.replication == ReplicationState::Ahead
            && p.connection == ConnectionState::Connected
            && p.handshake.is_none()
    }

    /// Hook in `pump`: once everything sent to an Ahead peer is confirmed, start resyncing the
    /// blocks marked meanwhile (Ahead -> SyncSource).
    pub(super) fn ahead_pump(&mut self) {
        for i in 0..self.peers.len() {
            if !self.ahead_of_connected(i) || self.ahead_unconfirmed(i) {
                continue;
            }
            let peer = self.peers[i].id;
            // Exact (the transfer log), newest first: while anything is in flight this stops
            // at once, and the walk to the end happens once, when the resync starts.
            let in_flight = self
                .transfer_log
                .values()
                .rev()
                .any(|e| !e.resync && e.peers.iter().any(|(p, _)| *p == peer));
            if in_flight {
                continue;
            }
            if self.disk != DiskState::UpToDate {
                // Detached or outdated meanwhile: this node cannot be the sync source; the
                // handshake after a reconnect decides who is.
                self.disconnect(i, ConnectionState::NetworkFailure);
                continue;
            }
            self.send(i, Frame::AheadResync);
            self.set_peer_disk(i, DiskState::Inconsistent);
            let blocks_total = self.meta.bitmaps[peer.index()].count();
            // Checksums pay off after a crash, not for blocks known to be written.
            let csums = self.config.digests.csums_for_resync(false).map(verify::CsumResync::new);
            self.peers[i].resync =
                Some(ResyncSource::new(blocks_total, self.now_ms, self.config.resync_rate, csums));
            self.set_replication(i, ReplicationState::SyncSource);
            self.pump_resync(i);
        }
    }

    /// `Frame::Ahead` and `Frame::AheadResync`, on the peer's side.
    pub(super) fn handle_ahead_frame(&mut self, i: usize, frame: Frame) {
        match frame {
            Frame::Ahead => {
                if self.role == Role::Primary
                    || self.peers[i].replication != ReplicationState::Established
                {
                    self.protocol_error(i, "Ahead while not an Established secondary".into());
                    return;
                }
                self.set_replication(i, ReplicationState::Behind);
                // Consistent but old from now on: never promotable as UpToDate (persisted, so
                // a restart keeps it so too). The State this broadcasts is the confirmation.
                self.set_disk(DiskState::Outdated);
            }
            Frame::AheadResync => {
                if self.peers[i].replication != ReplicationState::Behind {
                    self.protocol_error(i, "AheadResync while not Behind".into());
                    return;
                }
                self.set_disk(DiskState::Inconsistent);
                self.set_replication(i, ReplicationState::SyncTarget);
            }
            other => unreachable!("not an Ahead frame: {other:?}"),
        }
    }
}

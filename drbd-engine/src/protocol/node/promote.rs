//! The cluster-wide (two-phase) promotion, as DRBD 9 changes a role (a child module of
//! `node`; the hooks are in `handle_promote`, `handle_frame`, `pump` and `poll_timeout`).
//!
//! With quorum, a node's own view may be stale: a peer it reaches may already follow
//! another primary over a link this node does not know is dead (seeds 8475, 24455, 5349 of
//! `tandem-sim --nodes 3 --diskful 3`). So the promoting node (the initiator) first asks
//! every connected peer (`Frame::PromoteAsk`, DRBD's prepare). A peer answers yes only if it
//! is no primary, sees none (connected, reported, or lost within the grace), and is not
//! preparing another promotion; a yes is a grant: until the initiator's `Frame::PromoteEnd`
//! (commit or abort), the loss of the connection or `PROMOTE_GRANT_TIMEOUT_MS`, the peer
//! refuses every other promotion, its own too. The initiator commits when every peer it
//! asked answered yes (or its connection is gone meanwhile) and the granting peers with it
//! give quorum; any no, no quorum with the grants, or `PROMOTE_CONFIRM_TIMEOUT_MS` aborts.
//! Two nodes that ask at once refuse each other and both fail (the operator retries), and
//! every grant ends on its own: nothing waits forever. Without quorum, or with no peer
//! connected, the promotion stays local and immediate.

use super::*;

/// How long an initiator waits for its peers' answers: of the order of the ping timeout, so
/// that a link that has silently died is not waited on longer than it would take to notice.
pub(super) const PROMOTE_CONFIRM_TIMEOUT_MS: u64 = crate::constants::PING_TIMEOUT_MS;
/// How long a peer holds a grant without the initiator's end: longer than the initiator
/// waits (measured from a later moment, the arrival of the ask), so that a grant never ends
/// while its initiator may still commit on it, even with a ping interval of network delay.
pub(super) const PROMOTE_GRANT_TIMEOUT_MS: u64 =
    PROMOTE_CONFIRM_TIMEOUT_MS + crate::constants::PING_INTERVAL_MS;
const _: () = assert!(PROMOTE_GRANT_TIMEOUT_MS > PROMOTE_CONFIRM_TIMEOUT_MS);

/// The handshake check of `promote_preconditions`: before a commit it means "wait" (a peer
/// that connected meanwhile finishes its handshake first), not "fail".
pub(super) const HANDSHAKE_IN_PROGRESS: StateError =
    StateError::Precondition("connection handshake in progress");

/// What `Node::handle_promote` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// This node is Primary.
    Done,
    /// The peers were asked; `Event::PromotionFinished` tells the outcome.
    Pending,
}

#[derive(Debug, Default)]
pub(super) struct PromoteState {
    /// Transaction ids of this node's promotions (per connection, so a counter suffices:
    /// a restart makes new connections).
    next_txn: u64,
    pending: Option<Pending>,
    grant: Option<Grant>,
}

/// This node's promotion, waiting for its peers' answers.
#[derive(Debug)]
struct Pending {
    txn: u64,
    force: bool,
    started_ms: u64,
    /// Each peer asked, on which connection, and its answer so far.
    asked: Vec<(NodeId, u64, Option<bool>)>,
}

/// A yes this node gave to a peer's promotion.
#[derive(Debug)]
struct Grant {
    to: NodeId,
    conn_id: u64,
    txn: u64,
    at_ms: u64,
}

impl Node {
    /// This node's promotion, or its grant to a peer's, stands in the way of a new one.
    pub(super) fn promote_busy(&self) -> Result<(), StateError> {
        if self.promote.pending.is_some() {
            return Err(StateError::PromotionPending);
        }
        match &self.promote.grant {
            Some(g) if self.promote_grant_live(g) => Err(StateError::PeerPromoting(g.to)),
            _ => Ok(()),
        }
    }

    /// Starts the cluster-wide promotion when quorum is enabled and a peer is connected:
    /// asks each such peer. False: promote locally at once.
    pub(super) fn promote_ask_peers(&mut self, force: bool) -> bool {
        if !self.config.quorum.enabled() {
            return false;
        }
        let connected: Vec<usize> = (0..self.peers.len())
            .filter(|&i| {
                self.peers[i].connection == ConnectionState::Connected
                    && self.peers[i].handshake.is_none()
            })
            .collect();
        if connected.is_empty() {
            return false;
        }
        self.promote.next_txn += 1;
        let txn = self.promote.next_txn;
        let asked = connected.iter().map(|&i| (self.peers[i].id, self.peers[i].conn_id, None));
        let asked = asked.collect();
        self.promote.pending = Some(Pending { txn, force, started_ms: self.now_ms, asked });
        for i in connected {
            self.send(i, Frame::PromoteAsk { txn });
        }
        true
    }

    /// When `handle_timeout` must run for a pending promotion or a grant.
    pub(super) fn promote_next_deadline(&self) -> Option<u64> {
        let pending =
            self.promote.pending.as_ref().map(|p| p.started_ms + PROMOTE_CONFIRM_TIMEOUT_MS);
        let grant = self.promote.grant.as_ref().map(|g| g.at_ms + PROMOTE_GRANT_TIMEOUT_MS);
        pending.into_iter().chain(grant).min()
    }

    pub(super) fn handle_promote_frame(&mut self, i: usize, frame: Frame) {
        let (peer, conn_id) = (self.peers[i].id, self.peers[i].conn_id);
        match frame {
            Frame::PromoteAsk { txn } => {
                let granted = self.promote_may_grant(i);
                if granted {
                    let at_ms = self.now_ms;
                    self.promote.grant = Some(Grant { to: peer, conn_id, txn, at_ms });
                }
                self.send(i, Frame::PromoteAnswer { txn, granted });
            }
            Frame::PromoteAnswer { txn, granted } => {
                let Some(p) = self.promote.pending.as_mut().filter(|p| p.txn == txn) else {
                    return; // an answer to a promotion that ended already
                };
                let Some(entry) = p
                    .asked
                    .iter_mut()
                    .find(|(id, c, a)| *id == peer && *c == conn_id && a.is_none())
                else {
                    return;
                };
                entry.2 = Some(granted);
                if !granted {
                    self.promote_finish(Err(StateError::PeerRefused(peer)));
                }
                // A yes: `promote_pump` commits once every answer is in.
            }
            Frame::PromoteEnd { txn, .. } => {
                if self
                    .promote
                    .grant
                    .as_ref()
                    .is_some_and(|g| g.to == peer && g.conn_id == conn_id && g.txn == txn)
                {
                    self.promote.grant = None;
                }
            }
            _ => unreachable!("not a promotion frame"),
        }
    }

    /// The grant is still owed: its connection is the current one and it has not timed out.
    fn promote_grant_live(&self, g: &Grant) -> bool {
        g.at_ms + PROMOTE_GRANT_TIMEOUT_MS > self.now_ms
            && self.peer_index(g.to).is_some_and(|j| {
                self.peers[j].conn_id == g.conn_id
                    && self.peers[j].connection == ConnectionState::Connected
            })
    }

    /// Whether this node may grant the promotion of peer `i` (it asks now).
    fn promote_may_grant(&self, i: usize) -> bool {
        let asker = self.peers[i].id;
        if self.role == Role::Primary || self.promote.pending.is_some() {
            return false;
        }
        if let Some(g) = &self.promote.grant
            && self.promote_grant_live(g)
        {
            return false; // one promotion at a time (also a repeated ask: it must end first)
        }
        if self.quorum_other_primary(asker).is_some() {
            return false;
        }
        // Where this node's own view may be incomplete, say no (the asker retries): a peer
        // whose reports are stuck behind a gap or silent (`stall`), or a handshake whose
        // peer's role is not known yet. (A resync from another node is no reason: the asker,
        // UpToDate and no SyncTarget itself, holds that source's data or is not promotable
        // by its own checks; refusing it kept a 3-node setup without a primary for the
        // whole initial resync, seed 2163.)
        let other_stalled = self.quorum_stalled_reporter().is_some_and(|p| p != asker);
        let other_handshake = self.peers.iter().any(|p| p.id != asker && p.handshake.is_some());
        !(other_stalled || other_handshake)
    }

    /// First thing in every `pump`: ends a grant that lapsed, and commits or aborts this
    /// node's pending promotion when its answers are in, its peers are gone or it timed out.
    pub(super) fn promote_pump(&mut self) {
        if let Some(g) = &self.promote.grant
            && !self.promote_grant_live(g)
        {
            self.promote.grant = None;
        }
        let Some(p) = &self.promote.pending else { return };
        let live = |(id, conn_id): (NodeId, u64)| {
            self.peer_index(id).is_some_and(|j| {
                self.peers[j].conn_id == conn_id
                    && self.peers[j].connection == ConnectionState::Connected
            })
        };
        // A peer whose connection is gone no longer answers, and its grant ended with it.
        let waiting = p.asked.iter().any(|&(id, c, a)| a.is_none() && live((id, c)));
        let granted: Vec<(NodeId, u64)> = p
            .asked
            .iter()
            .filter(|&&(id, c, a)| a == Some(true) && live((id, c)))
            .map(|&(id, c, _)| (id, c))
            .collect();
        let (force, late) = (p.force, p.started_ms + PROMOTE_CONFIRM_TIMEOUT_MS <= self.now_ms);
        if waiting {
            if late {
                self.promote_finish(Err(StateError::NoQuorum(format!(
                    "promotion not confirmed within {PROMOTE_CONFIRM_TIMEOUT_MS} ms"
                ))));
            }
            return;
        }
        match self.promote_preconditions(force) {
            Err(e) if e == HANDSHAKE_IN_PROGRESS && !late => return,
            Err(e) => return self.promote_finish(Err(e)),
            Ok(()) => {}
        }
        let v = self.quorum_verdict_granted(&granted);
        if !v.have {
            return self.promote_finish(Err(StateError::NoQuorum(format!(
                "promotion granted by {} of {} nodes, need {} for quorum",
                v.visible, v.voters, v.quorum_at
            ))));
        }
        self.become_primary();
        self.promote_finish(Ok(()));
    }

    /// Ends this node's pending promotion: tells every asked peer still connected (after the
    /// State frame of a commit, so that a peer never sees the grant end before it sees the
    /// new primary) and reports the outcome.
    fn promote_finish(&mut self, result: Result<(), StateError>) {
        let p = self.promote.pending.take().expect("a promotion is pending");
        let committed = result.is_ok();
        for (id, conn_id, _) in p.asked {
            if let Some(j) = self.peer_index(id)
                && self.peers[j].conn_id == conn_id
                && self.peers[j].connection == ConnectionState::Connected
            {
                self.send(j, Frame::PromoteEnd { txn: p.txn, committed });
            }
        }
        self.emit(Event::PromotionFinished(result));
    }
}

//! Quorum, as DRBD 9 decides it (`options { quorum majority|all|N; on-no-quorum ...; }`), as
//! pure functions plus the small per-node state the state machine keeps for it.
//!
//! A node counts the nodes it can see. Itself and every peer it completed a handshake with
//! count as *UpToDate* or *present* (any other disk); a peer it cannot see counts as
//! *outdated* (known not to hold UpToDate data: fenced, or a sync target when lost) or
//! *unknown*. Voters are all of them, except that when no peer is unknown the outdated ones
//! drop out (they cannot form a partition that promotes: DRBD's "last man standing"). The
//! node has quorum when the visible voters reach `quorum_at` (majority: voters / 2 + 1; all:
//! voters; N: N) and, with `quorum-minimum-redundancy`, enough of them are UpToDate.
//!
//! Diskless tiebreaker (DRBD's rule, drbd_state.c `calc_quorum`): intentionally diskless nodes
//! (`disk none`) are not voters, but with an even number of voters a partition that misses
//! quorum by exactly one vote *keeps* it if it sees a majority of the diskless nodes. It only
//! keeps quorum, never gains it (the previous verdict is an input), so two diskful nodes and
//! one diskless node survive the loss of any single node, and a partition that isolates the
//! primary leaves it without quorum while the survivor keeps it.
//!
//! Two writers. Quorum alone is not enough when links are cut asymmetrically (the primary and
//! a secondary both see the tiebreaker, not each other: both keep quorum). DRBD makes a
//! promotion a cluster-wide two-phase commit; Tandem gets the same guarantee with one frame,
//! `Frame::Quorum { primaries, term }`: every node tells its peers which primary it accepts
//! (at most one: a node that already sees a primary disconnects a second one that announces
//! itself), and a primary numbers its promotions (`term`). A node refuses promotion while a
//! peer reports another primary, and a primary completes application I/O only while the
//! peers that confirmed its current term (their frame names it with that term) give it
//! quorum too. Two primaries can be promoted at the same instant, but a peer seen by both
//! confirms only one of them, and any two quorums share a peer.

use crate::NodeId;
use crate::protocol::states::DiskState;
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// DRBD's `quorum` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumPolicy {
    Off,
    Majority,
    All,
    /// At least this many visible voters (1..=32, as drbdsetup accepts).
    Count(u8),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid quorum value {0:?} (off, majority, all or 1..32)")]
pub struct InvalidQuorum(pub String);

impl std::str::FromStr for QuorumPolicy {
    type Err = InvalidQuorum;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "off" => Ok(Self::Off),
            "majority" => Ok(Self::Majority),
            "all" => Ok(Self::All),
            number => match number.parse::<u8>() {
                Ok(n) if (1..=32).contains(&n) => Ok(Self::Count(n)),
                _ => Err(InvalidQuorum(text.to_owned())),
            },
        }
    }
}

impl std::fmt::Display for QuorumPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Majority => f.write_str("majority"),
            Self::All => f.write_str("all"),
            Self::Count(n) => write!(f, "{n}"),
        }
    }
}

/// DRBD's `on-no-quorum` option: what a primary does with I/O once it lost quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnNoQuorum {
    /// Hold every request (in flight and new) until quorum returns (DRBD's default).
    SuspendIo,
    /// Fail every request (in flight and new) at once.
    IoError,
}

impl std::str::FromStr for OnNoQuorum {
    type Err = InvalidQuorum;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "suspend-io" => Ok(Self::SuspendIo),
            "io-error" => Ok(Self::IoError),
            _ => Err(InvalidQuorum(text.to_owned())),
        }
    }
}

impl std::fmt::Display for OnNoQuorum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SuspendIo => "suspend-io",
            Self::IoError => "io-error",
        })
    }
}

/// The quorum settings of a resource, and which of its nodes are diskless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumConfig {
    pub quorum: QuorumPolicy,
    pub on_no_quorum: OnNoQuorum,
    /// DRBD's `quorum-minimum-redundancy` (`Off`: no minimum).
    pub minimum_redundancy: QuorumPolicy,
    /// This node has no disk (DRBD's `disk none`): it stores nothing, votes as a tiebreaker.
    pub diskless: bool,
    /// Peers configured without a disk.
    pub diskless_peers: Vec<NodeId>,
}

impl Default for QuorumConfig {
    fn default() -> Self {
        Self {
            quorum: QuorumPolicy::Off,
            on_no_quorum: OnNoQuorum::SuspendIo,
            minimum_redundancy: QuorumPolicy::Off,
            diskless: false,
            diskless_peers: Vec::new(),
        }
    }
}

impl QuorumConfig {
    pub fn enabled(&self) -> bool {
        self.quorum != QuorumPolicy::Off
    }
    pub fn is_diskless_peer(&self, peer: NodeId) -> bool {
        self.diskless_peers.contains(&peer)
    }
}

/// What a node knows of one configured peer when it counts votes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    /// Handshake completed on the current connection.
    pub connected: bool,
    pub disk: DiskState,
    /// Known not to hold UpToDate data (DRBD's MDF_PEER_OUTDATED): fenced, or a sync target.
    pub known_outdated: bool,
    /// Configured without a disk.
    pub diskless: bool,
}

/// The counts DRBD's `calc_quorum` works from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub up_to_date: u32,
    pub present: u32,
    pub outdated: u32,
    pub unknown: u32,
    pub diskless: u32,
    pub missing_diskless: u32,
}

/// Counts this node and its peers.
pub fn tally(my_disk: DiskState, i_am_diskless: bool, peers: &[PeerView]) -> Tally {
    let mut t = Tally::default();
    match my_disk {
        DiskState::Diskless if i_am_diskless => t.diskless += 1,
        // A disk that failed and was detached gets no vote (DRBD counts it unknown).
        DiskState::Diskless => t.unknown += 1,
        DiskState::UpToDate => t.up_to_date += 1,
        _ => t.present += 1,
    }
    for p in peers {
        match (p.connected, p.diskless) {
            (false, true) => t.missing_diskless += 1,
            (false, false) if p.known_outdated || p.disk <= DiskState::Outdated => {
                t.outdated += 1;
            }
            (false, false) => t.unknown += 1,
            (true, true) if p.disk == DiskState::Diskless => t.diskless += 1,
            (true, _) if p.disk == DiskState::UpToDate => t.up_to_date += 1,
            (true, _) => t.present += 1,
        }
    }
    t
}

/// The verdict, with the numbers a refusal names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub have: bool,
    pub voters: u32,
    pub visible: u32,
    pub quorum_at: u32,
    pub up_to_date: u32,
    pub min_redundancy_at: u32,
    /// Quorum kept only by the diskless tiebreaker rule.
    pub tiebreaker: bool,
}

fn quorum_at(policy: QuorumPolicy, voters: u32) -> u32 {
    match policy {
        QuorumPolicy::Off => 0,
        QuorumPolicy::Majority => voters / 2 + 1,
        QuorumPolicy::All => voters,
        QuorumPolicy::Count(n) => u32::from(n),
    }
}

/// DRBD's `calc_quorum`: `had_quorum` is the previous verdict (the tiebreaker only keeps).
pub fn evaluate(config: &QuorumConfig, t: &Tally, had_quorum: bool) -> Verdict {
    let visible = t.up_to_date + t.present;
    let voters = if t.unknown > 0 { t.outdated + t.unknown + visible } else { visible };
    let at = quorum_at(config.quorum, voters);
    let min_redundancy_at = quorum_at(config.minimum_redundancy, voters);
    let mut verdict = Verdict {
        have: true,
        voters,
        visible,
        quorum_at: at,
        up_to_date: t.up_to_date,
        min_redundancy_at,
        tiebreaker: false,
    };
    if !config.enabled() {
        return verdict;
    }
    verdict.have = visible >= at && t.up_to_date >= min_redundancy_at;
    let diskless_majority_at = quorum_at(QuorumPolicy::Majority, t.diskless + t.missing_diskless);
    if !verdict.have
        && voters != 0
        && voters % 2 == 0
        && visible + 1 == at
        && t.up_to_date >= min_redundancy_at
        && t.diskless >= diskless_majority_at
        && had_quorum
    {
        verdict.have = true;
        verdict.tiebreaker = true;
    }
    verdict
}

/// What one peer last said in its `Frame::Quorum`, on which connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerReport {
    pub conn_id: u64,
    /// The primaries it accepts (node id bits).
    pub primaries: u64,
    /// Its own term if it is primary, else the term of the primary it accepts.
    pub term: u64,
    /// Nodes a primary asks to be outdated (relayed by the nodes that accept it).
    pub outdate: u64,
    /// Diskful nodes it does not see with promotable data (not connected, or Outdated).
    pub unseen: u64,
}

/// The quorum state one node keeps (one field of `Node`).
#[derive(Debug, Clone, Default)]
pub struct QuorumState {
    /// The current verdict (counting every connected peer).
    pub have: bool,
    /// As primary: the peers that confirmed the current term give quorum too.
    pub confirmed: bool,
    /// This node's promotions, so that a confirmation names the current one.
    pub term: u64,
    /// The last `Frame::Quorum` of each peer.
    pub reports: BTreeMap<NodeId, PeerReport>,
    /// What was last sent to each peer: (conn_id, primaries, term).
    pub sent: BTreeMap<NodeId, [u64; 5]>,
    /// Application requests that must fail when they complete: a primary without quorum
    /// stepped down (force-secondary) while they were in flight.
    pub doomed: BTreeSet<u64>,
    /// The primaries this node accepted at the last evaluation (node id bits).
    pub accepted: u64,
    /// Primaries this node lost, and when: reported a while longer.
    pub lost_primaries: BTreeMap<NodeId, u64>,
    /// Peers (node id bits) whose connection is being closed because the peer ended it (FIN
    /// or reset), while that input is handled: such a primary is not reported a while longer.
    pub closed_by_peer: u64,
    /// Promoted, and the generation check of the first confirmation is still to come.
    pub generation_pending: bool,
    /// As primary: peers (node id bits) whose blocks were marked out of sync while this node
    /// could not acknowledge writes; their new generation starts before the next
    /// acknowledgement, or never (see `quorum_node`).
    pub generation_deferred: u64,
}

impl QuorumState {
    pub fn new(config: &QuorumConfig) -> Self {
        Self { have: !config.enabled(), confirmed: !config.enabled(), ..Self::default() }
    }

    /// Whether the peer's report on this connection confirms our current term as primary.
    pub fn confirms(&self, me: NodeId, peer: NodeId, conn_id: u64) -> bool {
        self.reports.get(&peer).is_some_and(|r| {
            r.conn_id == conn_id && r.primaries & me.bit() != 0 && r.term == self.term
        })
    }

    /// Another primary a connected peer accepts (promotion must wait), if any.
    pub fn primary_reported(&self, me: NodeId, peer: NodeId, conn_id: u64) -> Option<NodeId> {
        let r = self.reports.get(&peer).filter(|r| r.conn_id == conn_id)?;
        let others = r.primaries & !me.bit();
        (0..64u8).find(|b| others & (1u64 << b) != 0).map(NodeId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DiskState::*;

    fn config(quorum: QuorumPolicy) -> QuorumConfig {
        QuorumConfig { quorum, ..QuorumConfig::default() }
    }

    /// (connected, disk, known outdated, diskless)
    fn peers(list: &[(bool, DiskState, bool, bool)]) -> Vec<PeerView> {
        list.iter()
            .map(|&(connected, disk, known_outdated, diskless)| PeerView {
                connected,
                disk,
                known_outdated,
                diskless,
            })
            .collect()
    }

    #[test]
    fn verdicts_follow_drbd() {
        const UP: (bool, DiskState, bool, bool) = (true, UpToDate, false, false);
        const GONE: (bool, DiskState, bool, bool) = (false, DUnknown, false, false);
        const GONE_OUTDATED: (bool, DiskState, bool, bool) = (false, DUnknown, true, false);
        const SYNC_TARGET: (bool, DiskState, bool, bool) = (true, Inconsistent, false, false);
        const TIEBREAKER: (bool, DiskState, bool, bool) = (true, Diskless, false, true);
        const TIEBREAKER_GONE: (bool, DiskState, bool, bool) = (false, DUnknown, false, true);
        use QuorumPolicy::*;
        // (name, policy, my disk, i am diskless, peers, had quorum, expected)
        let rows: &[(&str, QuorumPolicy, DiskState, bool, &[_], bool, bool)] = &[
            ("off always has quorum", Off, UpToDate, false, &[GONE, GONE], false, true),
            ("3 diskful, all seen", Majority, UpToDate, false, &[UP, UP], false, true),
            ("3 diskful, one lost", Majority, UpToDate, false, &[UP, GONE], true, true),
            ("3 diskful, isolated", Majority, UpToDate, false, &[GONE, GONE], true, false),
            (
                "sync target counts as present",
                Majority,
                UpToDate,
                false,
                &[SYNC_TARGET, GONE],
                true,
                true,
            ),
            (
                "outdated peers leave the voters",
                Majority,
                UpToDate,
                false,
                &[GONE_OUTDATED, GONE_OUTDATED],
                true,
                true,
            ),
            (
                "outdated stay voters while one is unknown",
                Majority,
                UpToDate,
                false,
                &[GONE_OUTDATED, GONE],
                true,
                false,
            ),
            ("all needs everyone", All, UpToDate, false, &[UP, GONE], true, false),
            ("count 2 of 3", Count(2), UpToDate, false, &[UP, GONE], true, true),
            ("2+tiebreaker, all seen", Majority, UpToDate, false, &[UP, TIEBREAKER], false, true),
            (
                "2+tiebreaker, peer lost, tiebreaker keeps",
                Majority,
                UpToDate,
                false,
                &[GONE, TIEBREAKER],
                true,
                true,
            ),
            (
                "2+tiebreaker, tiebreaker never gains",
                Majority,
                UpToDate,
                false,
                &[GONE, TIEBREAKER],
                false,
                false,
            ),
            (
                "2+tiebreaker, isolated primary",
                Majority,
                UpToDate,
                false,
                &[GONE, TIEBREAKER_GONE],
                true,
                false,
            ),
            (
                "2+tiebreaker, tiebreaker lost",
                Majority,
                UpToDate,
                false,
                &[UP, TIEBREAKER_GONE],
                true,
                true,
            ),
            ("tiebreaker itself sees both", Majority, Diskless, true, &[UP, UP], false, true),
            ("tiebreaker itself keeps with one", Majority, Diskless, true, &[UP, GONE], true, true),
            (
                "tiebreaker itself never gains with one",
                Majority,
                Diskless,
                true,
                &[UP, GONE],
                false,
                false,
            ),
            ("detached disk has no vote", Majority, Diskless, false, &[UP, GONE], true, false),
        ];
        for (name, policy, my_disk, diskless, list, had, expected) in rows {
            let t = tally(*my_disk, *diskless, &peers(list));
            let verdict = evaluate(&config(*policy), &t, *had);
            assert_eq!(verdict.have, *expected, "{name}: {t:?} -> {verdict:?}");
        }
    }

    #[test]
    fn minimum_redundancy_counts_up_to_date_only() {
        let config = QuorumConfig {
            quorum: QuorumPolicy::Majority,
            minimum_redundancy: QuorumPolicy::Count(2),
            ..QuorumConfig::default()
        };
        let sync_target =
            peers(&[(true, Inconsistent, false, false), (false, DUnknown, false, false)]);
        assert!(!evaluate(&config, &tally(UpToDate, false, &sync_target), true).have);
        let up = peers(&[(true, UpToDate, false, false), (false, DUnknown, false, false)]);
        assert!(evaluate(&config, &tally(UpToDate, false, &up), true).have);
    }

    #[test]
    fn words_round_trip() {
        for text in ["off", "majority", "all", "1", "32"] {
            assert_eq!(text.parse::<QuorumPolicy>().expect("valid").to_string(), text);
        }
        for text in ["0", "33", "most", ""] {
            assert!(text.parse::<QuorumPolicy>().is_err(), "{text}");
        }
        for text in ["suspend-io", "io-error"] {
            assert_eq!(text.parse::<OnNoQuorum>().expect("valid").to_string(), text);
        }
        assert!("freeze".parse::<OnNoQuorum>().is_err());
    }

    #[test]
    fn reports_confirm_only_the_current_term() {
        let me = NodeId(1);
        let mut state = QuorumState::new(&config(QuorumPolicy::Majority));
        state.term = 3;
        let report = |conn_id, primaries, term| PeerReport {
            conn_id,
            primaries,
            term,
            outdate: 0,
            unseen: 0,
        };
        state.reports.insert(NodeId(2), report(7, me.bit(), 2));
        assert!(!state.confirms(me, NodeId(2), 7), "an older term's confirmation");
        state.reports.insert(NodeId(2), report(7, me.bit(), 3));
        assert!(state.confirms(me, NodeId(2), 7));
        assert!(!state.confirms(me, NodeId(2), 8), "an older connection's report");
        state.reports.insert(NodeId(2), report(8, NodeId(0).bit(), 1));
        assert_eq!(state.primary_reported(me, NodeId(2), 8), Some(NodeId(0)));
    }
}

//! Faults the base event generator never produced, drawn per seed from a stream of their own
//! (so a seed with all of them off runs exactly as before):
//! - a broken fence-peer handler: it exits with a code outside 3..=7 (DRBD: I/O stays frozen),
//!   and the cluster manager runs it again after a while, as pacemaker retries a failed
//!   action; the engine must acknowledge nothing in between;
//! - `drbdadm outdate` by an operator on a secondary that lost its peers, the step a cluster
//!   manager takes before it promotes elsewhere;
//! - a disk failure on the primary (DRBD's `on-io-error detach`) while every diskful peer is
//!   connected, in sync and UpToDate under protocol C: a single failure that must lose no
//!   acknowledged write, because every one of them is on the peer, which the cluster
//!   manager promotes next. (Under protocols A and B the peer may lack acknowledged writes,
//!   so losing the primary's disk there is the documented double failure.)
//!
//! The main checkers judge them (acknowledged writes on the next node promoted, convergence,
//! split-brain decisions, liveness); `tandem-sim` counts how often each fault happened.

use super::{Ev, World, nid};
use crate::protocol::node::{FenceOutcome, Fencing, ReplicationProtocol};
use crate::protocol::{ConnectionState, DiskState, ReplicationState, Role};
use crate::sim::rng::Rng;

/// What a seed does with these faults.
#[derive(Debug, Clone, Default)]
pub struct MoreFaultsSwarm {
    /// Chance that one run of the fence-peer handler fails.
    pub fence_fail_ppm: u64,
    /// Chance per tick that an operator outdates a secondary cut off from every peer.
    pub operator_outdate_ppm_per_tick: u64,
    /// Chance per tick that the primary's disk is set to fail on its next I/O.
    pub primary_disk_fail_ppm_per_tick: u64,
}

impl MoreFaultsSwarm {
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x6d6f_7265_6661_0001);
        // Half the seeds keep the base mix, so the base generator keeps its full share.
        if rng.below(2) == 0 {
            return Self::default();
        }
        Self {
            fence_fail_ppm: [0, 300_000, 700_000][rng.index(3)],
            operator_outdate_ppm_per_tick: [0, 200, 2_000][rng.index(3)],
            primary_disk_fail_ppm_per_tick: [0, 100, 1_000][rng.index(3)],
        }
    }
}

/// Counters of a run (summed over seeds by `Report::add`).
#[derive(Debug, Default, Clone)]
pub struct MoreFaultsReport {
    pub fence_handler_failures: u64,
    pub operator_outdates: u64,
    pub primary_disk_failures: u64,
}

impl MoreFaultsReport {
    pub fn add(&mut self, other: &MoreFaultsReport) {
        self.fence_handler_failures += other.fence_handler_failures;
        self.operator_outdates += other.operator_outdates;
        self.primary_disk_failures += other.primary_disk_failures;
    }

    pub fn summary(&self) -> String {
        format!(
            "{} fence-peer handler failures, {} operator outdates, {} primary disk failures",
            self.fence_handler_failures, self.operator_outdates, self.primary_disk_failures
        )
    }
}

#[derive(Debug)]
pub(super) struct MoreFaultsState {
    pub(super) swarm: MoreFaultsSwarm,
    rng: Rng,
    /// The primary whose disk fails on its next I/O, if the failure is still safe then.
    fail_next_io: Option<usize>,
}

impl MoreFaultsState {
    pub(super) fn new(seed: u64) -> Self {
        Self {
            swarm: MoreFaultsSwarm::from_seed(seed),
            rng: Rng::new(seed ^ 0x6d6f_7265_6661_0002),
            fail_next_io: None,
        }
    }
}

impl World {
    pub fn more_faults_swarm(&self) -> &MoreFaultsSwarm {
        &self.more.swarm
    }

    /// Safety phase, once per tick: the operator's outdate and the primary's disk failure.
    pub(super) fn more_faults(&mut self) {
        let swarm = self.more.swarm.clone();
        if swarm.operator_outdate_ppm_per_tick > 0
            && self.more.rng.chance(swarm.operator_outdate_ppm_per_tick)
        {
            let i = self.more.rng.index(self.swarm.nodes);
            let cut_off = self.nodes[i].node.as_ref().is_some_and(|n| {
                n.role() == Role::Secondary
                    && n.disk_state() == DiskState::UpToDate
                    && n.peer_ids()
                        .iter()
                        .all(|p| n.connection_state(*p) != Some(ConnectionState::Connected))
            });
            if cut_off {
                self.log(|| format!("node {i} outdated by the operator"));
                let _ = self.nodes[i].node.as_mut().expect("up").handle_outdate(self.now_ms);
                self.report.more.operator_outdates += 1;
                self.drain(i, false);
            }
        }
        if swarm.primary_disk_fail_ppm_per_tick > 0
            && self.more.fail_next_io.is_none()
            && self.more.rng.chance(swarm.primary_disk_fail_ppm_per_tick)
        {
            self.more.fail_next_io = self.primary();
        }
    }

    /// Hook of `drain` for each disk I/O node i submits: whether it fails because of a planned
    /// primary disk failure. Checked when the I/O is submitted, so the peer holds every write
    /// acknowledged so far.
    pub(super) fn more_disk_error(&mut self, i: usize) -> bool {
        if self.more.fail_next_io != Some(i) || self.healing {
            return false;
        }
        self.more.fail_next_io = None;
        if !self.primary_disk_may_fail(i) {
            return false;
        }
        self.report.more.primary_disk_failures += 1;
        self.log(|| format!("node {i} primary disk fails"));
        true
    }

    /// A primary's disk may fail only where that loses no data: protocol C, and every diskful
    /// peer connected, Established and UpToDate, holding everything we hold. Both ends' views
    /// and the network's ground truth must agree: a sync source that just finished counts
    /// its peer UpToDate before the peer hears it, and a partition nobody noticed yet leaves
    /// the peer SyncTarget (Inconsistent) for good when the primary's disk fails then: two
    /// failures, no UpToDate copy left (seed 100305).
    fn primary_disk_may_fail(&self, i: usize) -> bool {
        let Some(n) = self.nodes[i].node.as_ref() else { return false };
        self.swarm.protocol == ReplicationProtocol::C
            && n.role() == Role::Primary
            && n.disk_state() == DiskState::UpToDate
            && (0..self.swarm.nodes).filter(|j| *j != i && !self.is_diskless(*j)).all(|j| {
                let peer_agrees = self.nodes[j].node.as_ref().is_some_and(|m| {
                    m.disk_state() == DiskState::UpToDate
                        && m.replication_state(nid(i)) == Some(ReplicationState::Established)
                });
                !self.dirty[i][j]
                    && peer_agrees
                    && !self.partitioned.get(&super::pair(i, j)).copied().unwrap_or(false)
                    && n.replication_state(nid(j)) == Some(ReplicationState::Established)
                    && n.peer_disk_state(nid(j)) == Some(DiskState::UpToDate)
            })
    }

    /// Hook of `fence_done`: the handler of node i for `peer` may fail instead of answering.
    /// Returns true when it failed (the engine hears `Failed`; the cluster manager runs the
    /// handler again later).
    pub(super) fn more_fence_fails(&mut self, i: usize, incarnation: u64, peer: usize) -> bool {
        let ppm = self.more.swarm.fence_fail_ppm;
        if ppm == 0 || self.swarm.fencing == Fencing::DontCare || !self.more.rng.chance(ppm) {
            return false;
        }
        self.report.more.fence_handler_failures += 1;
        self.log(|| format!("node {i} fence-peer {peer}: handler failed"));
        if let Some(n) = self.nodes[i].node.as_mut() {
            n.handle_fence_outcome(self.now_ms, nid(peer), FenceOutcome::Failed);
            self.drain(i, false);
        }
        let delay = self.more.rng.range(10, self.swarm.fence_delay_ms_max.max(10) * 2);
        self.schedule(self.now_ms + delay, Ev::FenceDone { node: i, incarnation, peer });
        true
    }

    /// A diskful node whose disk failed holds nothing its peers lack: it is fully resynced
    /// when it returns (full_sync_required), so the ghost record forgets its changes. The
    /// bits its detach marks for the writes it could not finish are not changes either.
    pub(super) fn detached(&mut self, i: usize) {
        for j in 0..self.swarm.nodes {
            self.dirty[i][j] = false;
        }
    }

    /// Node i is up and uses no disk of its own (configured diskless, or detached).
    pub(super) fn runs_without_disk(&self, i: usize) -> bool {
        self.nodes[i].node.as_ref().is_some_and(|n| n.disk_state() == DiskState::Diskless)
    }

    pub(super) fn detached_disk(&self, i: usize) -> bool {
        !self.is_diskless(i)
            && self.nodes[i].node.as_ref().is_some_and(|n| n.disk_state() == DiskState::Diskless)
    }
}

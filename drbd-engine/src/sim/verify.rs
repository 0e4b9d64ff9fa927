//! Checksum-based resync and online verify in the simulator.
//!
//! Per seed: `csums-alg` (none, crc32c or sha256), `csums-after-crash-only`, `verify-alg`, how
//! often verify runs are started during the safety phase (from either node, from block 0 or a
//! random block, while writes, crashes and partitions go on), and how many blocks get a silent
//! bit flip in the epilogue. These draws come from a stream of their own, so the rest of a
//! seed's swarm stays as it was.
//!
//! Checkers:
//! - no false differences: before the epilogue nothing diverges behind the engine's back, so
//!   any block a verify reports is a violation (a write in flight during the comparison must
//!   not be reported);
//! - exact report: once the healed cluster converged, bits are flipped on one node's disk
//!   behind the engine's back, and a verify from the other node must report exactly the blocks
//!   where the two disks differ; a disconnect/connect then resyncs just those (with checksums
//!   when the seed has csums-alg), after which the disks are byte-identical (the main checker)
//!   and a second verify must report nothing.

use super::{Ev, World, nid};
use crate::constants::BLOCK_BYTES as BLOCK;
use crate::protocol::node::Event;
use crate::protocol::{DigestAlg, DigestSettings, ReplicationState};
use crate::sim::rng::Rng;
use std::collections::BTreeSet;

/// What a seed does with digests.
#[derive(Debug, Clone, Default)]
pub struct VerifySwarm {
    pub digests: DigestSettings,
    /// Chance per tick of starting a verify during the safety phase.
    pub verify_ppm_per_tick: u64,
    /// Silent bit flips in the epilogue (0: the epilogue's verify must find nothing).
    pub flipped_blocks: u64,
}

impl VerifySwarm {
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x7665_7269_6679_0001);
        let alg = |rng: &mut Rng| {
            if rng.below(2) == 0 { DigestAlg::Crc32c } else { DigestAlg::Sha256 }
        };
        let csums_alg = if rng.below(3) == 0 { None } else { Some(alg(&mut rng)) };
        let csums_after_crash_only = rng.below(3) == 0;
        let verify_alg = Some(alg(&mut rng));
        let verify_ppm_per_tick = [0, 500, 3_000][rng.index(3)];
        let flipped_blocks = [0, 1, 3, 8][rng.index(4)];
        Self {
            digests: DigestSettings { csums_alg, csums_after_crash_only, verify_alg },
            verify_ppm_per_tick,
            flipped_blocks,
        }
    }
}

/// Counters of a run (summed over seeds by `Report::add`).
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub verifies_started: u64,
    pub verifies_completed: u64,
    pub blocks_verified: u64,
    /// Blocks skipped because writes kept changing them while they were compared.
    pub blocks_skipped: u64,
    pub blocks_flipped: u64,
    pub out_of_sync_found: u64,
}

impl VerifyReport {
    pub fn add(&mut self, other: &VerifyReport) {
        self.verifies_started += other.verifies_started;
        self.verifies_completed += other.verifies_completed;
        self.blocks_verified += other.blocks_verified;
        self.blocks_skipped += other.blocks_skipped;
        self.blocks_flipped += other.blocks_flipped;
        self.out_of_sync_found += other.out_of_sync_found;
    }

    pub fn summary(&self) -> String {
        format!(
            "{} verifies ({} completed, {} blocks verified, {} skipped under writes), \
             {} blocks flipped silently, {} found out of sync",
            self.verifies_started,
            self.verifies_completed,
            self.blocks_verified,
            self.blocks_skipped,
            self.blocks_flipped,
            self.out_of_sync_found
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Stage {
    #[default]
    Safety,
    /// The epilogue's first verify, from node `s` against node `t` (whose disk was flipped).
    First {
        s: usize,
        t: usize,
    },
    Resync {
        s: usize,
        t: usize,
    },
    Second {
        s: usize,
        t: usize,
    },
    Done,
}

#[derive(Debug)]
pub(super) struct VerifyState {
    pub(super) swarm: VerifySwarm,
    rng: Rng,
    stage: Stage,
    /// Blocks the epilogue's VerifyS reported in its current run.
    reported: BTreeSet<u64>,
    /// How the epilogue's current run ended: (completed, out-of-sync blocks).
    finished: Option<(bool, u64)>,
}

impl VerifyState {
    pub(super) fn new(seed: u64) -> Self {
        Self {
            swarm: VerifySwarm::from_seed(seed),
            rng: Rng::new(seed ^ 0x7665_7269_6679_0002),
            stage: Stage::Safety,
            reported: BTreeSet::new(),
            finished: None,
        }
    }
}

/// Replication states in which two nodes hold the same data (a verify runs over Established).
pub(super) fn in_sync_state(state: Option<ReplicationState>) -> bool {
    matches!(
        state,
        Some(ReplicationState::Established | ReplicationState::VerifyS | ReplicationState::VerifyT)
    )
}

impl World {
    pub(super) fn digest_settings(&self) -> DigestSettings {
        self.verify.swarm.digests
    }

    /// Safety phase: now and then an operator runs `drbdadm verify` on a random node.
    pub(super) fn verify_faults(&mut self) {
        if !self.verify.rng.chance(self.verify.swarm.verify_ppm_per_tick) {
            return;
        }
        let n = self.swarm.nodes;
        let i = self.verify.rng.index(n);
        let j = (i + 1 + self.verify.rng.index(n - 1)) % n;
        // The node's own size (the device may have grown, `resize`).
        let size = self.nodes[i].node.as_ref().map_or(self.swarm.size_blocks, |n| n.size_blocks());
        let first = if self.verify.rng.below(2) == 0 { 0 } else { self.verify.rng.below(size) };
        let Some(node) = self.nodes[i].node.as_mut() else { return };
        if node.handle_verify(self.now_ms, nid(j), first).is_ok() {
            self.report.verify.verifies_started += 1;
            self.log(|| format!("node {i} verify against {j} from {first}"));
        }
        self.drain(i, false);
    }

    /// Hook of `World::event` for the verify events.
    pub(super) fn verify_event(&mut self, i: usize, event: &Event) {
        let epilogue_source = match self.verify.stage {
            Stage::First { s, .. } | Stage::Second { s, .. } => Some(s),
            _ => None,
        };
        match *event {
            Event::VerifyOutOfSync { peer, first_block, blocks } => {
                if self.verify.stage == Stage::Safety {
                    self.violation(format!(
                        "node {i} verify reported blocks {first_block}+{blocks} out of sync with \
                         node {peer}, but nothing diverged behind the engine's back"
                    ));
                } else if epilogue_source == Some(i) {
                    self.verify.reported.extend(first_block..first_block + blocks);
                }
            }
            Event::VerifyFinished {
                blocks_verified,
                out_of_sync_blocks,
                skipped_blocks,
                completed,
                source: true,
                ..
            } => {
                let r = &mut self.report.verify;
                r.blocks_verified += blocks_verified;
                r.blocks_skipped += skipped_blocks;
                r.verifies_completed += u64::from(completed);
                if epilogue_source == Some(i) {
                    r.out_of_sync_found += out_of_sync_blocks;
                    self.verify.finished = Some((completed, out_of_sync_blocks));
                }
            }
            _ => {}
        }
    }

    /// The blocks where two nodes' disks differ now.
    fn differing_blocks(&self, a: usize, b: usize) -> BTreeSet<u64> {
        let size = self.nodes[a].meta.size_blocks.min(self.nodes[b].meta.size_blocks);
        let x = self.nodes[a].disk.read(0, size);
        let y = self.nodes[b].disk.read(0, size);
        x.chunks(BLOCK)
            .zip(y.chunks(BLOCK))
            .enumerate()
            .filter(|(_, (p, q))| p != q)
            .map(|(k, _)| k as u64)
            .collect()
    }

    /// The node whose disk the epilogue flipped, while its verify and resync are not over: it
    /// must not become primary (its silently wrong blocks would be copied to the others).
    pub(super) fn epilogue_flipped_node(&self) -> Option<usize> {
        match self.verify.stage {
            Stage::First { t, .. } | Stage::Resync { t, .. } | Stage::Second { t, .. } => Some(t),
            Stage::Safety | Stage::Done => None,
        }
    }

    fn start_epilogue_verify(&mut self, s: usize, t: usize) -> bool {
        self.verify.reported.clear();
        self.verify.finished = None;
        let result =
            self.nodes[s].node.as_mut().expect("converged").handle_verify(self.now_ms, nid(t), 0);
        self.drain(s, false);
        match result {
            Ok(()) => {
                self.report.verify.verifies_started += 1;
                true
            }
            Err(e) => {
                self.violation(format!("verify refused on a converged cluster: {e}"));
                false
            }
        }
    }

    /// Whether the epilogue's run completed; one cut off (the cluster looked converged while
    /// a connection was already dead) is started again.
    fn epilogue_verify_completed(&mut self, s: usize, t: usize) -> bool {
        if self.verify.finished == Some((true, self.verify.reported.len() as u64)) {
            return true;
        }
        if let Some((true, count)) = self.verify.finished {
            let reported = self.verify.reported.len();
            self.violation(format!(
                "verify {s}->{t} counted {count} blocks out of sync but reported {reported}"
            ));
            return true;
        }
        // The cluster broke up and converged again meanwhile; a node may have been promoted
        // (all Outdated: an operator forced one), and verify between two secondaries is
        // refused while a primary replicates to them: the primary verifies then (seed 33276
        // of `--nodes 3 --diskful 3`). It is never `t` (`try_promote`).
        let s = match self.primary() {
            Some(p) if p != t => p,
            _ => s,
        };
        match &mut self.verify.stage {
            Stage::First { s: from, .. } | Stage::Second { s: from, .. } => *from = s,
            _ => {}
        }
        self.log(|| format!("epilogue verify {s}->{t} ended early, again"));
        self.start_epilogue_verify(s, t);
        false
    }

    fn check_epilogue_verify(&mut self, s: usize, t: usize) -> bool {
        let truth = self.differing_blocks(s, t);
        if self.verify.reported != truth {
            let reported = self.verify.reported.clone();
            self.violation(format!(
                "verify {s}->{t} reported blocks {reported:?}, but the disks differ at {truth:?}"
            ));
            return false;
        }
        true
    }

    /// Runs the epilogue once the healed cluster converged; true when it is over (the final
    /// checks follow), false while it still needs the cluster to converge again.
    pub(super) fn verify_epilogue(&mut self) -> bool {
        if self.verify.swarm.digests.verify_alg.is_none() {
            return true;
        }
        match self.verify.stage {
            Stage::Safety => {
                // A promotion the cluster manager planned during the safety phase may still be
                // due, or a cluster-wide one wait for its peers' answers; it must not land on
                // the flipped node (its data is silently wrong until the resync, which nothing
                // in DRBD's model can know): wait until none is (seed 5733 of `--nodes 3
                // --diskful 3`: node 2, flipped while its promotion waited, became primary and
                // the resync copied its flipped blocks to node 1).
                if self.payloads.values().any(|e| matches!(e, Ev::SplitPromote { .. }))
                    || self.promoting.iter().any(Option::is_some)
                {
                    return false;
                }
                // Verify compares two disks: a diskless tiebreaker has none.
                let diskful: Vec<usize> =
                    (0..self.swarm.nodes).filter(|i| !self.is_diskless(*i)).collect();
                if diskful.len() < 2 {
                    self.verify.stage = Stage::Done;
                    return true;
                }
                let s = self
                    .primary()
                    .filter(|p| diskful.contains(p))
                    .unwrap_or_else(|| diskful[self.verify.rng.index(diskful.len())]);
                let others: Vec<usize> = diskful.iter().copied().filter(|i| *i != s).collect();
                let t = others[self.verify.rng.index(others.len())];
                let size = self.nodes[t].meta.size_blocks;
                for _ in 0..self.verify.swarm.flipped_blocks {
                    let block = self.verify.rng.below(size);
                    let at = self.verify.rng.index(BLOCK);
                    let bit = self.verify.rng.below(8);
                    let disk = &mut self.nodes[t].disk;
                    let mut data = disk.read(block, 1);
                    data[at] ^= 1 << bit;
                    // Straight to the platter: the engine on t knows nothing of it.
                    disk.write(block, data, true);
                }
                self.report.verify.blocks_flipped += self.differing_blocks(s, t).len() as u64;
                self.log(|| format!("epilogue: flipped bits on node {t}, verify from {s}"));
                self.verify.stage = Stage::First { s, t };
                !self.start_epilogue_verify(s, t)
            }
            Stage::First { s, t } => {
                if !self.epilogue_verify_completed(s, t) {
                    return !self.violations.is_empty();
                }
                if !self.check_epilogue_verify(s, t) {
                    return true;
                }
                if self.verify.reported.is_empty() {
                    self.verify.stage = Stage::Done;
                    return true;
                }
                // drbdadm disconnect + connect: the side holding the bits syncs just those.
                self.verify.stage = Stage::Resync { s, t };
                let node = self.nodes[s].node.as_mut().expect("converged");
                let _ = node.handle_disconnect(self.now_ms, nid(t));
                self.drain(s, false);
                self.schedule(self.now_ms + 20, Ev::Reconnect { node: s, peer: t, discard: false });
                false
            }
            Stage::Resync { s, t } => {
                // As on a restart (`epilogue_verify_completed`): a primary promoted meanwhile
                // verifies.
                let s = match self.primary() {
                    Some(p) if p != t => p,
                    _ => s,
                };
                self.verify.stage = Stage::Second { s, t };
                !self.start_epilogue_verify(s, t)
            }
            Stage::Second { s, t } => {
                if !self.epilogue_verify_completed(s, t) {
                    return !self.violations.is_empty();
                }
                self.check_epilogue_verify(s, t);
                self.verify.stage = Stage::Done;
                true
            }
            Stage::Done => true,
        }
    }
}

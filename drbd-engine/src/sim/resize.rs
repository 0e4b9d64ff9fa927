//! Online grow (`protocol::node::resize`, DRBD's `drbdadm resize`) in the random schedule of
//! every mode: two nodes, two and a tiebreaker, and the three-diskful mesh (`--nodes 3
//! --diskful 3`, issue 5), where a secondary that missed a `ResizeCommit` grows on a
//! handshake with either of the others.
//!
//! An episode is what an admin does: grow the backing device of every diskful node (as
//! `lvextend` on each, one after the other, whether the node is up or down), then run
//! `resize` on a node, usually the primary. Everything else keeps happening meanwhile:
//! writes, partitions, crashes, resyncs, promotions. Now and then the admin forgets one
//! node's backing, or asks before every backing grew, or asks a secondary: the engine must
//! refuse (or, for a peer that was not connected, let it learn the size on its next
//! handshake, where a backing still too small refuses the connection until the operator
//! grows it). Writes go to the grown blocks once the primary's size says they exist.
//!
//! Drawn per seed from an RNG stream of its own, so the other draws of a seed stay as they
//! were; a seed without a grow runs exactly as before.
//!
//! Checkers (besides the simulator's own, which now cover the grown blocks: no acknowledged
//! write lost, replicas identical after healing, reads return the latest acknowledged data):
//! - no disk I/O beyond the size a node has committed (persisted): with internal metadata
//!   such a write lands in the metadata area, and a replica that has not grown lacks it;
//! - no write acknowledged beyond the size the acknowledging node has committed;
//! - after healing every node, the diskless tiebreaker included, agrees on the size.

use super::rng::Rng;
use super::{Ev, World};
use crate::protocol::DiskState;
use crate::protocol::node::Event;

/// Times an admin runs `resize` again after a refusal, per episode.
const RETRIES_MAX: u32 = 3;

/// The largest device a run grows to: the simulator holds every replica's image in memory.
const GROWN_BLOCKS_MAX: u64 = 6_000;

/// What a seed does with online grow.
#[derive(Debug, Clone, Default)]
pub struct ResizeSwarm {
    /// Chance per tick that an admin starts a grow episode.
    pub grow_ppm_per_tick: u64,
    /// Episodes at most in one run.
    pub episodes_max: u64,
    /// How much each episode adds to the device.
    pub grow_blocks_choices: Vec<u64>,
    /// How long the admin takes per backing device, and before the resize request.
    pub step_ms_max: u64,
    /// Chance that an episode forgets one node's backing (fixed by the operator when a
    /// handshake is refused for it, or when healing).
    pub forget_node_ppm: u64,
    /// Chance that the resize request goes to a random node instead of the primary.
    pub any_node_ppm: u64,
}

impl ResizeSwarm {
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x7265_7369_7a65_0001);
        // One seed in four keeps the base mix without grows.
        if rng.below(4) == 0 {
            return Self::default();
        }
        Self {
            grow_ppm_per_tick: [200, 1_000, 3_000][rng.index(3)],
            episodes_max: [1, 3, 8][rng.index(3)],
            grow_blocks_choices: vec![1, 7, 64, 300],
            step_ms_max: [5, 200, 2_000][rng.index(3)],
            forget_node_ppm: [0, 100_000, 300_000][rng.index(3)],
            any_node_ppm: [0, 100_000][rng.index(2)],
        }
    }
}

/// Counters of a run (summed over seeds by `Report::add`).
#[derive(Debug, Default, Clone)]
pub struct ResizeReport {
    /// Grow episodes (backing devices grown, then a resize request).
    pub episodes: u64,
    pub requests: u64,
    /// Requests that grew the device.
    pub committed: u64,
    /// Requests refused at once (not primary, a resync running, ...) or after the
    /// negotiation (a backing too small, a peer that did not answer), or that found nothing
    /// to grow.
    pub refused: u64,
    pub unchanged: u64,
    /// Other replicas grown by a `ResizeCommit` or on a handshake with a larger peer.
    pub replicas_grown: u64,
    /// Handshakes refused because a replica's backing could not hold the peer's size.
    pub size_refusals: u64,
    /// Writes acknowledged in blocks beyond the initial size.
    pub grown_writes_acked: u64,
}

impl ResizeReport {
    pub fn add(&mut self, other: &ResizeReport) {
        self.episodes += other.episodes;
        self.requests += other.requests;
        self.committed += other.committed;
        self.refused += other.refused;
        self.unchanged += other.unchanged;
        self.replicas_grown += other.replicas_grown;
        self.size_refusals += other.size_refusals;
        self.grown_writes_acked += other.grown_writes_acked;
    }

    pub fn summary(&self) -> String {
        format!(
            "{} resizes requested in {} grow episodes ({} committed, {} refused, {} unchanged; \
             {} replicas grown by commit or handshake, {} handshakes refused for size), \
             {} writes acked to grown blocks",
            self.requests,
            self.episodes,
            self.committed,
            self.refused,
            self.unchanged,
            self.replicas_grown,
            self.size_refusals,
            self.grown_writes_acked
        )
    }
}

/// Events of this module (`Ev::Resize`).
#[derive(Debug)]
pub(super) enum ResizeEv {
    /// The admin grew node's backing device to `blocks`.
    GrowBacking { node: usize, blocks: u64 },
    /// The admin runs `resize` (on the primary, or on `any` node).
    Request { any: bool },
}

#[derive(Debug)]
pub(super) struct ResizeSimState {
    pub(super) swarm: ResizeSwarm,
    rng: Rng,
    /// The size the admin grows every backing to (the largest asked for so far).
    target_blocks: u64,
    /// The size the run started with: blocks from here on are grown blocks.
    pub(super) initial_blocks: u64,
    /// The node whose resize request is being negotiated.
    requester: Option<usize>,
    /// Times the admin still tries again after a refusal in this episode.
    retries_left: u32,
}

impl ResizeSimState {
    pub(super) fn new(seed: u64, initial_blocks: u64) -> Self {
        Self {
            swarm: ResizeSwarm::from_seed(seed),
            rng: Rng::new(seed ^ 0x7265_7369_7a65_0002),
            target_blocks: initial_blocks,
            initial_blocks,
            requester: None,
            retries_left: 0,
        }
    }
}

impl World {
    pub fn resize_swarm(&self) -> &ResizeSwarm {
        &self.resize.swarm
    }

    /// Every mode grows (the mesh since issue 5; its seeds' histories changed then).
    fn resize_enabled(&self) -> bool {
        true
    }

    /// The data blocks node i has committed: its persisted size (a detached or diskless node
    /// holds its size in memory only).
    pub(super) fn committed_blocks(&self, i: usize) -> u64 {
        match self.nodes[i].node.as_ref() {
            Some(n) if n.disk_state() == DiskState::Diskless => n.size_blocks(),
            _ => self.nodes[i].meta.size_blocks,
        }
    }

    /// The image of node i's device as its disk holds it now (its committed data area).
    pub(super) fn device_image(&self, i: usize) -> Vec<u8> {
        self.nodes[i].disk.read(0, self.nodes[i].meta.size_blocks)
    }

    /// Safety phase, once per tick: maybe start a grow episode.
    pub(super) fn resize_faults(&mut self) {
        let swarm = &self.resize.swarm;
        if !self.resize_enabled()
            || swarm.grow_ppm_per_tick == 0
            || self.report.resize.episodes >= swarm.episodes_max
            || !self.resize.rng.chance(swarm.grow_ppm_per_tick)
        {
            return;
        }
        let choices = self.resize.swarm.grow_blocks_choices.clone();
        let add = choices[self.resize.rng.index(choices.len())];
        let target = (self.resize.target_blocks + add).min(GROWN_BLOCKS_MAX);
        if target <= self.resize.target_blocks {
            return;
        }
        self.resize.target_blocks = target;
        self.report.resize.episodes += 1;
        let diskful: Vec<usize> = (0..self.swarm.nodes).filter(|i| !self.is_diskless(*i)).collect();
        let forgotten = self
            .resize
            .rng
            .chance(self.resize.swarm.forget_node_ppm)
            .then(|| diskful[self.resize.rng.index(diskful.len())]);
        let step = self.resize.swarm.step_ms_max;
        let mut at = self.now_ms;
        for node in diskful {
            at += self.resize.rng.range(0, step);
            if Some(node) != forgotten {
                self.schedule(at, Ev::Resize(ResizeEv::GrowBacking { node, blocks: target }));
            }
        }
        // Usually after the last backing grew, sometimes before (the engine must refuse).
        let request_at = if self.resize.rng.below(4) == 0 {
            self.now_ms + self.resize.rng.range(0, step)
        } else {
            at + self.resize.rng.range(0, step)
        };
        let any = self.resize.rng.chance(self.resize.swarm.any_node_ppm);
        self.resize.retries_left = RETRIES_MAX;
        self.log(|| format!("grow episode to {target} blocks, forgetting {forgotten:?}"));
        self.schedule(request_at, Ev::Resize(ResizeEv::Request { any }));
    }

    pub(super) fn resize_dispatch(&mut self, ev: ResizeEv) {
        match ev {
            ResizeEv::GrowBacking { node, blocks } => {
                self.log(|| format!("node {node} backing grows to {blocks} blocks"));
                self.nodes[node].disk.grow(blocks);
            }
            ResizeEv::Request { any } => {
                let node = if any {
                    Some(self.resize.rng.index(self.swarm.nodes))
                } else {
                    self.primary()
                };
                let Some(i) = node.filter(|i| self.nodes[*i].node.is_some()) else {
                    // No primary (or the chosen node is down): the admin waits for one.
                    if !self.healing {
                        let delay = self.resize.rng.range(100, 1_000);
                        self.schedule(self.now_ms + delay, Ev::Resize(ResizeEv::Request { any }));
                    }
                    return;
                };
                self.report.resize.requests += 1;
                let usable = self.usable_blocks(i);
                let now = self.now_ms;
                let result =
                    self.nodes[i].node.as_mut().expect("checked").handle_resize(now, usable);
                self.log(|| format!("node {i} resize (usable {usable}): {result:?}"));
                match result {
                    Ok(()) => self.resize.requester = Some(i),
                    Err(_) => self.resize_refused(),
                }
                self.drain(i, false);
            }
        }
    }

    /// A resize request was refused: the admin may look at why, and try again later.
    fn resize_refused(&mut self) {
        self.report.resize.refused += 1;
        if self.resize.retries_left > 0 && self.resize.rng.below(2) == 0 {
            self.resize.retries_left -= 1;
            let delay = self.resize.rng.range(50, 1_500);
            let any = self.resize.rng.chance(self.resize.swarm.any_node_ppm);
            self.schedule(self.now_ms + delay, Ev::Resize(ResizeEv::Request { any }));
        }
    }

    /// What node i's driver reports as its usable size: its backing device's data blocks.
    fn usable_blocks(&self, i: usize) -> u64 {
        if self.is_diskless(i) { u64::MAX } else { self.nodes[i].disk.size_blocks() }
    }

    /// Hook of `connect_pair`, before the connection: the driver reports the backing's usable
    /// size, so a node that missed a resize can grow in the handshake. Only once a backing
    /// grew, so that runs without grows see the same inputs as before.
    pub(super) fn resize_before_connect(&mut self, i: usize) {
        if self.is_diskless(i) {
            return;
        }
        let usable = self.usable_blocks(i);
        let now = self.now_ms;
        if let Some(n) = self.nodes[i].node.as_mut()
            && usable > n.size_blocks()
        {
            n.handle_usable_size(now, usable);
        }
    }

    /// Hook of `World::event` for the resize events.
    pub(super) fn resize_event(&mut self, i: usize, event: &Event) {
        match *event {
            Event::UsableSizeWanted => {
                let usable = self.usable_blocks(i);
                let now = self.now_ms;
                if let Some(n) = self.nodes[i].node.as_mut() {
                    n.handle_usable_size(now, usable);
                }
            }
            Event::ResizeFinished { old_blocks, new_blocks, ref error } => {
                if self.resize.requester == Some(i)
                    && self.nodes[i].node.as_ref().is_some_and(|n| !n.resize_pending())
                {
                    self.resize.requester = None;
                    let r = &mut self.report.resize;
                    match (error, new_blocks > old_blocks) {
                        (Some(_), _) => self.resize_refused(),
                        (None, true) => r.committed += 1,
                        (None, false) => r.unchanged += 1,
                    }
                } else if new_blocks > old_blocks {
                    self.report.resize.replicas_grown += 1;
                }
                if new_blocks > old_blocks && self.is_diskless(i) {
                    return;
                }
                if new_blocks > self.nodes[i].disk.size_blocks() {
                    self.violation(format!(
                        "node {i} grew to {new_blocks} blocks, beyond its backing device of {} blocks",
                        self.nodes[i].disk.size_blocks()
                    ));
                }
            }
            _ => {}
        }
    }

    /// `SyncRefused`: a handshake refused because this node's backing cannot hold its peer's
    /// size is fixed by the operator (grow every backing, reconnect); any other refusal by a
    /// split-brain recovery (`resolve_standalone`).
    pub(super) fn sync_refused(&mut self, i: usize, j: usize, reason: &str) {
        if reason != "device sizes differ" {
            self.resolve_standalone(i, j);
            return;
        }
        self.report.resize.size_refusals += 1;
        if !self.resize_enabled() || self.resize.target_blocks == self.resize.initial_blocks {
            self.violation(format!("node {i} refused {j}: device sizes differ, without a grow"));
            return;
        }
        let delay = self.resize.rng.range(10, 500);
        let target = self.resize.target_blocks;
        for node in 0..self.swarm.nodes {
            if !self.is_diskless(node) {
                self.schedule(
                    self.now_ms + delay,
                    Ev::Resize(ResizeEv::GrowBacking { node, blocks: target }),
                );
            }
        }
        for (a, b) in [(i, j), (j, i)] {
            self.schedule(
                self.now_ms + delay + 1,
                Ev::Reconnect { node: a, peer: b, discard: false },
            );
        }
    }

    /// Healing: the operator finishes the admin's work, every backing holds the target.
    pub(super) fn resize_heal(&mut self) {
        let target = self.resize.target_blocks;
        for i in 0..self.swarm.nodes {
            if !self.is_diskless(i) {
                self.nodes[i].disk.grow(target);
            }
        }
    }

    /// The workload's choice of a write's first block: now and then in the grown blocks of
    /// the primary's device, once it has any (`None`: the base choice).
    pub(super) fn resize_write_first(&mut self, size_blocks: u64, blocks: u64) -> Option<u64> {
        let initial = self.resize.initial_blocks;
        if size_blocks < initial + blocks || self.resize.rng.below(3) != 0 {
            return None;
        }
        Some(self.resize.rng.range(initial, size_blocks - blocks))
    }

    /// Checks of a completed request of node i: a write acknowledged beyond the size node i
    /// committed is a violation.
    pub(super) fn resize_check_ack(&mut self, i: usize, first: u64, end: u64) {
        let committed = self.committed_blocks(i);
        if end > committed {
            self.violation(format!(
                "node {i} acknowledged a write to blocks {first}..{end} beyond its committed \
                 size of {committed} blocks"
            ));
        }
        if end > self.resize.initial_blocks {
            self.report.resize.grown_writes_acked += 1;
        }
    }

    /// Hook of `drain` for each disk I/O: nothing reaches the disk beyond the size the node
    /// has committed (with internal metadata, that is the metadata area).
    pub(super) fn resize_check_io(&mut self, i: usize, first: u64, blocks: u64) {
        let committed = self.nodes[i].meta.size_blocks;
        let backing = self.nodes[i].disk.size_blocks();
        if first + blocks > committed.min(backing) {
            self.violation(format!(
                "node {i} submitted disk I/O to blocks {first}+{blocks} beyond its committed \
                 size of {committed} blocks (backing {backing} blocks)"
            ));
        }
    }

    /// Healing waits until every node that is up has the same size: a `resize` the admin
    /// ran just before the cluster settled has its `ResizeCommit` frames still on the wire
    /// (mesh seed 449 was checked 1 ms after the primary committed). A size that never
    /// settles ends as a liveness violation.
    pub(super) fn resize_sizes_settled(&self) -> bool {
        let mut sizes = self.nodes.iter().filter_map(|n| n.node.as_ref().map(|n| n.size_blocks()));
        let first = sizes.next();
        sizes.all(|s| Some(s) == first)
    }

    /// After healing: every node, the diskless tiebreaker included, agrees on the size, and
    /// every diskful node has committed it.
    pub(super) fn resize_final_checks(&mut self) {
        let sizes: Vec<(u64, u64)> = (0..self.swarm.nodes)
            .map(|i| {
                let live = self.nodes[i].node.as_ref().map_or(0, |n| n.size_blocks());
                let persisted =
                    if self.is_diskless(i) { live } else { self.nodes[i].meta.size_blocks };
                (live, persisted)
            })
            .collect();
        let (first, _) = sizes[0];
        if sizes.iter().any(|(live, persisted)| *live != first || *persisted != first) {
            self.violation(format!(
                "after healing the nodes disagree on the size (live, persisted): {sizes:?}"
            ));
        }
    }
}

//! Generation identifiers and the decision table that compares them on connect.
//!
//! Every node keeps a *current* UUID naming its data generation, one *bitmap* UUID per peer
//! (the generation at which it started tracking changes the peer lacks, zero when it tracks
//! nothing) and a short history of older generations. When two nodes connect, comparing these
//! decides whether they already hold the same data, which one resyncs which and whether a
//! bitmap suffices or everything must be copied, or whether they diverged (split brain) or never
//! shared data. The decision is a pure function so that both ends, computing it independently
//! from the same two views, always agree; `decide(a, b) == decide(b, a).mirrored()` is tested.

use crate::NodeId;
use crate::constants::{HISTORY_UUIDS_MAX, NODE_ID_MAX};

/// DRBD's marker for freshly created metadata: "never held data". Real generation UUIDs always
/// have the lowest bit clear and are never this value.
pub const UUID_JUST_CREATED: u64 = 4;

/// The low bit of a bitmap UUID: "was primary when the peer was lost" (DRBD's UUID_PRIMARY).
/// Generation UUIDs themselves always have it clear, so comparisons mask it off.
pub const UUID_PRIMARY_FLAG: u64 = 1;

/// The generation identifiers of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationUuids {
    pub current: u64,
    /// Indexed by peer node id; zero means "no changes tracked for that peer".
    pub bitmap: [u64; NODE_ID_MAX as usize + 1],
    pub history: [u64; HISTORY_UUIDS_MAX],
}

impl GenerationUuids {
    /// The identifiers `create-md` writes.
    pub fn just_created() -> Self {
        Self {
            current: UUID_JUST_CREATED,
            bitmap: [0; NODE_ID_MAX as usize + 1],
            history: [0; HISTORY_UUIDS_MAX],
        }
    }

    /// The generation this node started tracking changes for `peer` from (zero: none), without
    /// the primary flag.
    pub fn bitmap_uuid(&self, peer: NodeId) -> u64 {
        self.bitmap[peer.index()] & !UUID_PRIMARY_FLAG
    }

    /// This node was primary when it lost `peer` and started tracking changes for it (DRBD keeps
    /// this in the low bit of the bitmap UUID). After a split brain it names the *older*
    /// primary, which `discard-younger-primary` / `discard-older-primary` need.
    pub fn primary_at_split(&self, peer: NodeId) -> bool {
        self.bitmap[peer.index()] & UUID_PRIMARY_FLAG != 0
    }

    /// Records that this node was primary when it lost `peer` (only while a base is tracked).
    pub fn set_primary_at_split(&mut self, peer: NodeId) {
        if self.bitmap[peer.index()] != 0 {
            self.bitmap[peer.index()] |= UUID_PRIMARY_FLAG;
        }
    }

    fn push_history(&mut self, uuid: u64) {
        if uuid == 0 || self.history.contains(&uuid) {
            return;
        }
        self.history.rotate_right(1);
        self.history[0] = uuid;
    }

    /// A sync target takes the source's past as its own (three or more diskful nodes: a
    /// third node compares against it later). Zero and the current generation are skipped.
    pub fn adopt_history(&mut self, history: &[u64]) {
        for uuid in history.iter().rev() {
            if *uuid != self.current && *uuid != UUID_JUST_CREATED {
                self.push_history(*uuid);
            }
        }
    }

    /// Starts a new data generation: every listed peer that was not already tracked starts
    /// tracking from the old current generation. Called before the first write a peer misses.
    pub fn new_current(&mut self, fresh: u64, untracked_peers: impl IntoIterator<Item = NodeId>) {
        assert!(is_valid_fresh(fresh), "generation UUIDs have the low bit clear");
        let old = self.current;
        for peer in untracked_peers {
            if self.bitmap[peer.index()] & !UUID_PRIMARY_FLAG == 0 {
                self.bitmap[peer.index()] = old;
            }
        }
        self.push_history(old);
        self.current = fresh;
    }

    /// `new-current-uuid --clear-bitmap`: a fresh generation that every connected peer adopts
    /// without a sync (the data is declared identical, e.g. a new, all-zero volume).
    pub fn new_current_clear_bitmap(&mut self, fresh: u64) {
        assert!(is_valid_fresh(fresh));
        self.current = fresh;
        self.bitmap = [0; NODE_ID_MAX as usize + 1];
    }

    /// The sync source finished a resync to `peer`: nothing is tracked for it any more.
    pub fn resync_finished_as_source(&mut self, peer: NodeId) {
        let base = std::mem::take(&mut self.bitmap[peer.index()]) & !UUID_PRIMARY_FLAG;
        self.push_history(base);
    }

    /// The sync target finished: it now holds the source's generation.
    pub fn resync_finished_as_target(&mut self, source: NodeId, source_current: u64) {
        let old = self.current;
        if old != source_current && old != UUID_JUST_CREATED {
            self.push_history(old);
        }
        self.current = source_current;
        self.bitmap[source.index()] = 0;
    }

    /// Connected with identical generations: a leftover bitmap UUID for that peer is stale.
    pub fn settled_in_sync(&mut self, peer: NodeId) {
        let base = std::mem::take(&mut self.bitmap[peer.index()]) & !UUID_PRIMARY_FLAG;
        self.push_history(base);
    }
}

fn is_valid_fresh(uuid: u64) -> bool {
    uuid & 1 == 0 && uuid != 0 && uuid != UUID_JUST_CREATED
}

/// Turns random bits into a valid generation UUID.
pub fn fresh_uuid(random: u64) -> u64 {
    let uuid = random & !1;
    if uuid == 0 || uuid == UUID_JUST_CREATED { 0x5eed_0000_0000_0002 } else { uuid }
}

/// What one side tells the other in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeView {
    pub node_id: NodeId,
    pub uuids: GenerationUuids,
    /// This node was primary when it went down; its activity log extents are out of sync.
    pub crashed_primary: bool,
    /// The operator asked this node to give up its changes (`--discard-my-data`).
    pub discard_my_data: bool,
}

/// The outcome of comparing generations, from the local node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    NoSync,
    BitmapSource,
    BitmapTarget,
    FullSource,
    FullTarget,
    SplitBrain,
    Unrelated,
}

impl SyncDecision {
    /// The same decision seen from the other end.
    pub fn mirrored(self) -> Self {
        match self {
            Self::BitmapSource => Self::BitmapTarget,
            Self::BitmapTarget => Self::BitmapSource,
            Self::FullSource => Self::FullTarget,
            Self::FullTarget => Self::FullSource,
            other => other,
        }
    }
}

/// Nonzero generations a node knows as its past: history and bitmap bases.
fn past(view: &HandshakeView) -> impl Iterator<Item = u64> + '_ {
    let bases = view.uuids.bitmap.iter().map(|u| u & !UUID_PRIMARY_FLAG);
    view.uuids.history.iter().copied().chain(bases).filter(|u| *u != 0)
}

/// DRBD's connect-time decision (in the spirit of drbd_uuid_compare), as a pure function.
pub fn decide(local: &HandshakeView, remote: &HandshakeView) -> SyncDecision {
    use SyncDecision::*;
    let decision = compare(local, remote);
    // `--discard-my-data` also wins when the generations alone would make this node the source
    // (a crashed primary, or a forced primary with older data than a returning node): the
    // operator chose the victim.
    match (local.discard_my_data, remote.discard_my_data, decision) {
        (true, false, BitmapSource) => BitmapTarget,
        (true, false, FullSource) => FullTarget,
        (false, true, BitmapTarget) => BitmapSource,
        (false, true, FullTarget) => FullSource,
        _ => decision,
    }
}

fn compare(local: &HandshakeView, remote: &HandshakeView) -> SyncDecision {
    use SyncDecision::*;
    let (mine, theirs) = (&local.uuids, &remote.uuids);
    let local_fresh = mine.current == UUID_JUST_CREATED;
    let remote_fresh = theirs.current == UUID_JUST_CREATED;
    match (local_fresh, remote_fresh) {
        (true, true) => return NoSync,
        (true, false) => return FullTarget,
        (false, true) => return FullSource,
        (false, false) => {}
    }
    if mine.current == theirs.current {
        return match (local.crashed_primary, remote.crashed_primary) {
            (false, false) => NoSync,
            (true, false) => BitmapSource,
            (false, true) => BitmapTarget,
            // Both went down as primary (one after the other): both activity logs are merged
            // into the bitmap, so either direction is correct; the lower node id wins.
            (true, true) if local.node_id < remote.node_id => BitmapSource,
            (true, true) => BitmapTarget,
        };
    }
    let mine_base = mine.bitmap_uuid(remote.node_id);
    let their_base = theirs.bitmap_uuid(local.node_id);
    // Both started tracking changes against each other from the same generation: both wrote.
    // Not from "just created": that names no data the two ever shared, only that each
    // started tracking before its first sync (the first primary's peers, or a target whose
    // source of the first data was lost mid-resync and that inherited the base), so it says
    // nothing about who wrote since; the generations' past decides. (Found by mesh seed 646
    // under other random draws, while this branch tried an extra frame kind: two nodes with
    // that base for each other, one a later generation of the other's data, were found
    // split.)
    let both_moved_on = mine_base != 0 && mine_base != UUID_JUST_CREATED && mine_base == their_base;
    let i_am_behind = their_base == mine.current;
    let they_are_behind = mine_base == theirs.current;
    let decision = if i_am_behind && they_are_behind {
        SplitBrain
    } else if both_moved_on {
        // Equal bases name where the two started tracking each other, not that both wrote
        // since: one side's generation may have become the other's ancestor (it is in the
        // other's history), and that side is only behind. DRBD checks its rules 60 and 80
        // (current in the peer's history) before rule 90 (equal bitmap UUIDs) too. (Mesh
        // seed 6322: nodes 0 and 2 tracked each other from G; node 0 held Y, node 2 a later
        // generation with Y in its history; they were found split.)
        let in_history = |view: &HandshakeView, uuid: u64| view.uuids.history.contains(&uuid);
        match (in_history(remote, mine.current), in_history(local, theirs.current)) {
            (true, false) => FullTarget,
            (false, true) => FullSource,
            _ => SplitBrain,
        }
    } else if i_am_behind {
        BitmapTarget
    } else if they_are_behind {
        BitmapSource
    } else {
        let i_am_in_their_past = past(remote).any(|u| u == mine.current);
        let they_are_in_my_past = past(local).any(|u| u == theirs.current);
        let shared_past = past(local).any(|u| past(remote).any(|v| v == u));
        match (i_am_in_their_past, they_are_in_my_past) {
            (true, false) => FullTarget,
            (false, true) => FullSource,
            (true, true) => SplitBrain,
            (false, false) if shared_past => SplitBrain,
            (false, false) => Unrelated,
        }
    };
    if decision == SplitBrain {
        // Manual recovery: the victim resyncs from the survivor. With a common bitmap base both
        // bitmaps together cover every change since the split; otherwise copy everything.
        let bitmaps_cover = both_moved_on;
        return match (local.discard_my_data, remote.discard_my_data) {
            (true, false) if bitmaps_cover => BitmapTarget,
            (true, false) => FullTarget,
            (false, true) if bitmaps_cover => BitmapSource,
            (false, true) => FullSource,
            _ => SplitBrain,
        };
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use SyncDecision::*;

    const A: NodeId = NodeId(0);
    const B: NodeId = NodeId(1);

    struct Row {
        name: &'static str,
        local: (u64, u64, [u64; 2], bool, bool),
        remote: (u64, u64, [u64; 2], bool, bool),
        expected: SyncDecision,
    }

    /// (current, bitmap uuid for the other node, history, crashed primary, discard-my-data)
    fn view(id: NodeId, other: NodeId, v: (u64, u64, [u64; 2], bool, bool)) -> HandshakeView {
        let mut uuids = GenerationUuids::just_created();
        uuids.current = v.0;
        uuids.bitmap[other.index()] = v.1;
        uuids.history[..2].copy_from_slice(&v.2);
        HandshakeView { node_id: id, uuids, crashed_primary: v.3, discard_my_data: v.4 }
    }

    const JC: u64 = UUID_JUST_CREATED;

    #[test]
    fn decision_table() {
        let rows = [
            Row {
                name: "both just created",
                local: (JC, 0, [0, 0], false, false),
                remote: (JC, 0, [0, 0], false, false),
                expected: NoSync,
            },
            Row {
                name: "local just created: full sync target",
                local: (JC, 0, [0, 0], false, false),
                remote: (0x10, 0, [0, 0], false, false),
                expected: FullTarget,
            },
            Row {
                name: "remote just created: full sync source",
                local: (0x10, 0, [0, 0], false, false),
                remote: (JC, 0, [0, 0], false, false),
                expected: FullSource,
            },
            Row {
                name: "same generation: nothing to do",
                local: (0x10, 0, [0, 0], false, false),
                remote: (0x10, 0, [0, 0], false, false),
                expected: NoSync,
            },
            Row {
                name: "same generation, local crashed primary: bitmap source (AL)",
                local: (0x10, 0, [0, 0], true, false),
                remote: (0x10, 0, [0, 0], false, false),
                expected: BitmapSource,
            },
            Row {
                name: "same generation, remote crashed primary: bitmap target",
                local: (0x10, 0, [0, 0], false, false),
                remote: (0x10, 0, [0, 0], true, false),
                expected: BitmapTarget,
            },
            Row {
                name: "same generation, both crashed primaries: lower node id is source",
                local: (0x10, 0, [0, 0], true, false),
                remote: (0x10, 0, [0, 0], true, false),
                expected: BitmapSource,
            },
            Row {
                name: "local wrote while apart: bitmap source",
                local: (0x20, 0x10, [0x10, 0], false, false),
                remote: (0x10, 0, [0, 0], false, false),
                expected: BitmapSource,
            },
            Row {
                name: "remote wrote while apart: bitmap target",
                local: (0x10, 0, [0, 0], false, false),
                remote: (0x20, 0x10, [0x10, 0], false, false),
                expected: BitmapTarget,
            },
            Row {
                name: "remote moved on twice, base lost: full sync target",
                local: (0x10, 0, [0, 0], false, false),
                remote: (0x30, 0, [0x20, 0x10], false, false),
                expected: FullTarget,
            },
            Row {
                name: "local moved on twice, base lost: full sync source",
                local: (0x30, 0, [0x20, 0x10], false, false),
                remote: (0x10, 0, [0, 0], false, false),
                expected: FullSource,
            },
            Row {
                name: "both wrote while apart from the same base: split brain",
                local: (0x20, 0x10, [0x10, 0], false, false),
                remote: (0x30, 0x10, [0x10, 0], false, false),
                expected: SplitBrain,
            },
            Row {
                name: "both tracking from one base, local a later generation's ancestor: full target",
                local: (0x20, 0x10, [0x10, 0], false, false),
                remote: (0x30, 0x10, [0x20, 0x10], false, false),
                expected: FullTarget,
            },
            Row {
                name: "diverged with only shared history: split brain",
                local: (0x20, 0, [0x10, 0], false, false),
                remote: (0x30, 0, [0x10, 0], false, false),
                expected: SplitBrain,
            },
            Row {
                name: "split brain, local discards its data: bitmap target",
                local: (0x20, 0x10, [0x10, 0], false, true),
                remote: (0x30, 0x10, [0x10, 0], false, false),
                expected: BitmapTarget,
            },
            Row {
                name: "split brain, remote discards its data: bitmap source",
                local: (0x20, 0x10, [0x10, 0], false, false),
                remote: (0x30, 0x10, [0x10, 0], false, true),
                expected: BitmapSource,
            },
            Row {
                name: "split brain without common base, local discards: full target",
                local: (0x20, 0, [0x10, 0], false, true),
                remote: (0x30, 0, [0x10, 0], false, false),
                expected: FullTarget,
            },
            Row {
                name: "split brain, both discard: still split brain",
                local: (0x20, 0x10, [0x10, 0], false, true),
                remote: (0x30, 0x10, [0x10, 0], false, true),
                expected: SplitBrain,
            },
            Row {
                name: "local newer but discards its data: bitmap target",
                local: (0x20, 0x10, [0x10, 0], false, true),
                remote: (0x10, 0, [0, 0], false, false),
                expected: BitmapTarget,
            },
            Row {
                name: "same generation, local crashed primary but discards: bitmap target",
                local: (0x10, 0, [0, 0], true, true),
                remote: (0x10, 0, [0, 0], false, false),
                expected: BitmapTarget,
            },
            Row {
                name: "both tracking since creation, remote a later generation: full target",
                local: (0x10, JC, [JC, 0], false, false),
                remote: (0x20, JC, [0x10, JC], false, false),
                expected: FullTarget,
            },
            Row {
                name: "both tracking since creation, diverged: split brain",
                local: (0x10, JC, [JC, 0], false, false),
                remote: (0x20, JC, [JC, 0], false, false),
                expected: SplitBrain,
            },
            Row {
                name: "no common generation at all: unrelated data",
                local: (0x20, 0, [0x18, 0], false, false),
                remote: (0x30, 0, [0x28, 0], false, false),
                expected: Unrelated,
            },
        ];
        for row in &rows {
            let local = view(A, B, row.local);
            let remote = view(B, A, row.remote);
            assert_eq!(decide(&local, &remote), row.expected, "{}", row.name);
            assert_eq!(
                decide(&remote, &local),
                row.expected.mirrored(),
                "{} (seen from the peer)",
                row.name
            );
        }
    }

    /// Both ends always reach mirrored decisions, whatever the generations look like.
    #[test]
    fn decisions_are_antisymmetric() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pool = [0, JC, 0x10, 0x20, 0x30, 0x40];
        let mut pick = || pool[usize::try_from(next() % 6).unwrap()];
        for _ in 0..20_000 {
            let a = view(A, B, (pick(), pick(), [pick(), pick()], pick() > 0x20, pick() == 0x10));
            let b = view(B, A, (pick(), pick(), [pick(), pick()], pick() > 0x20, pick() == 0x10));
            assert_eq!(decide(&a, &b), decide(&b, &a).mirrored(), "{a:?} vs {b:?}");
        }
    }

    /// The "primary when the peer was lost" bit in a bitmap UUID never changes a decision,
    /// and leaves no trace in the history.
    #[test]
    fn primary_flag_in_bitmap_uuid_is_ignored_by_the_comparison() {
        let rows = [
            ((0x20, 0x10, [0x10, 0]), (0x30, 0x10, [0x10, 0]), SplitBrain),
            ((0x20, 0x10, [0x10, 0]), (0x10, 0, [0, 0]), BitmapSource),
            ((0x10, 0, [0, 0]), (0x20, 0x10, [0x10, 0]), BitmapTarget),
        ];
        for (local, remote, expected) in rows {
            for (flag_a, flag_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut a = view(A, B, (local.0, local.1, local.2, false, false));
                let mut b = view(B, A, (remote.0, remote.1, remote.2, false, false));
                if flag_a {
                    a.uuids.set_primary_at_split(B);
                }
                if flag_b {
                    b.uuids.set_primary_at_split(A);
                }
                assert_eq!(a.uuids.primary_at_split(B), flag_a && local.1 != 0);
                assert_eq!(a.uuids.bitmap_uuid(B), local.1);
                assert_eq!(decide(&a, &b), expected, "{local:?} {remote:?} {flag_a} {flag_b}");
            }
        }
        let mut uuids = view(A, B, (0x20, 0x10, [0x10, 0], false, false)).uuids;
        uuids.set_primary_at_split(B);
        uuids.resync_finished_as_source(B);
        assert_eq!(uuids.history[..2], [0x10, 0]);
        assert!(!uuids.primary_at_split(B));
    }

    /// Mesh seeds 4047 and 4815: a primary loses one peer while the announcement of the
    /// generation it started for another never reached it, so its base for the peer names a
    /// generation the peer never held; more generations follow for the third node. The
    /// peer's own generation must still be in the primary's past: a full sync, where a
    /// two-entry history forgot it and found the two unrelated.
    #[test]
    fn a_peer_several_generations_back_is_behind_not_unrelated() {
        const C: NodeId = NodeId(2);
        let mut primary = GenerationUuids::just_created();
        primary.new_current_clear_bitmap(0x100);
        let peer = HandshakeView {
            node_id: B,
            uuids: primary.clone(),
            crashed_primary: false,
            discard_my_data: false,
        };
        primary.new_current(0x200, [C]);
        primary.resync_finished_as_source(C);
        primary.new_current(0x300, [B]);
        for fresh in [0x400, 0x500] {
            primary.new_current(fresh, [C]);
            primary.resync_finished_as_source(C);
        }
        assert_eq!(primary.bitmap_uuid(B), 0x200, "a generation B never held");
        let primary = HandshakeView {
            node_id: A,
            uuids: primary,
            crashed_primary: false,
            discard_my_data: false,
        };
        assert_eq!(decide(&primary, &peer), FullSource);
        assert_eq!(decide(&peer, &primary), FullTarget);
    }

    #[test]
    fn generation_lifecycle() {
        let mut primary = GenerationUuids::just_created();
        let mut secondary = GenerationUuids::just_created();
        // new-current-uuid --clear-bitmap on a fresh pair: both adopt one generation.
        primary.new_current_clear_bitmap(0x100);
        secondary.new_current_clear_bitmap(0x100);
        let views = |p: &GenerationUuids, s: &GenerationUuids| {
            let mk = |id, uuids: &GenerationUuids| HandshakeView {
                node_id: id,
                uuids: uuids.clone(),
                crashed_primary: false,
                discard_my_data: false,
            };
            decide(&mk(A, p), &mk(B, s))
        };
        assert_eq!(views(&primary, &secondary), NoSync);
        // The primary writes while the secondary is away.
        primary.new_current(0x200, [B]);
        assert_eq!(primary.bitmap_uuid(B), 0x100);
        assert_eq!(views(&primary, &secondary), BitmapSource);
        // A second generation while still apart keeps the original bitmap base.
        primary.new_current(0x300, [B]);
        assert_eq!(primary.bitmap_uuid(B), 0x100);
        assert_eq!(views(&primary, &secondary), BitmapSource);
        primary.resync_finished_as_source(B);
        secondary.resync_finished_as_target(A, primary.current);
        assert_eq!(views(&primary, &secondary), NoSync);
        assert_eq!(primary.bitmap_uuid(B), 0);
    }
}

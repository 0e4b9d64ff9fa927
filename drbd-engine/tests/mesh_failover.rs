//! Three diskful nodes A (0), B (1), C (2) in a full mesh with `quorum majority`: the primary
//! dies with writes its secondaries hold in doubt, a survivor takes over, the dead node comes
//! back. The causes engine_mesh (the real-process test) found, each at the protocol level:
//! - the survivors end their connection to each other to resync what the dead primary left
//!   in doubt between them; each then lost quorum and outdated itself. Two such nodes,
//!   both reported in sync by the primary and of one generation, are made UpToDate by the
//!   resync of both bitmaps (else neither could ever be promoted again), unless someone
//!   asked for them to be outdated (a primary may then write on without them);
//! - a node that becomes the sync target of a newer generation takes that generation only
//!   with the first block: when the source's end defers the resync at once, the target's
//!   data is unchanged and still of its old generation, and the primary of the newer one
//!   gives it a bitmap resync instead of a full sync.
//!
//! Three state machines wired by a harness whose links can be held (frames queue) and cut,
//! and whose nodes can crash (their metadata survives) and restart.

mod common;

use common::mesh::{GRACE_MS, Mesh, NODES, link, majority_suspend_io, mesh_config, nid};
use common::{BLOCK, at, block_data};
use drbd_engine::protocol::node::Config;
use drbd_engine::protocol::{DiskState, ReplicationState, Role};
use drbd_engine::protocol::{Metadata, PersistedDisk};
use drbd_engine::uuid::SyncDecision;

const SIZE_BLOCKS: u64 = 1024;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// A resync rate that moves the in-doubt writes within a step.
const FAST_KIB_PER_S: u64 = 100_000;

fn config(i: usize, rate_kib_per_s: u64) -> Config {
    mesh_config(i, 31 + i as u64, rate_kib_per_s, majority_suspend_io())
}

impl Mesh {
    /// Three connected all-zero replicas of one generation, UpToDate, with quorum, resyncing
    /// at `rate_kib_per_s`.
    fn new(rate_kib_per_s: u64) -> Self {
        Mesh::start(SIZE_BLOCKS, [false; NODES], move |i| config(i, rate_kib_per_s))
    }
}

/// A primary, writes every node holds stably, then a stream the primary dies in: both
/// secondaries received its last writes, which are still in doubt (no barrier closed them).
/// Returns the mesh right after the crash and A's metadata.
fn primary_dies_with_writes_in_doubt(rate_kib_per_s: u64) -> (Mesh, Metadata) {
    let mut mesh = Mesh::new(rate_kib_per_s);
    mesh.promote(A);
    mesh.idle(50);
    for block in 0..16 {
        mesh.write(A, block, 1);
    }
    mesh.idle(200); // barriers close the epochs: the secondaries forget these writes
    for block in 100..164 {
        mesh.write(A, block, 1);
    }
    for i in [B, C] {
        assert!(mesh.nodes[i].mesh_writes_in_doubt() > 0, "node {i} holds writes in doubt");
    }
    let meta = mesh.crash(A);
    (mesh, meta)
}

/// A primary whose writes every node holds stably dies; returns the mesh and A's metadata.
fn primary_dies_with_nothing_in_doubt() -> (Mesh, Metadata) {
    let mut mesh = Mesh::new(FAST_KIB_PER_S);
    mesh.promote(A);
    mesh.idle(50);
    for block in 0..16 {
        mesh.write(A, block, 1);
    }
    mesh.idle(200);
    let meta = mesh.crash(A);
    (mesh, meta)
}

#[test]
fn survivors_outdated_by_losing_the_primary_resync_each_other_up_to_date_and_one_is_promoted() {
    let (mut mesh, _) = primary_dies_with_writes_in_doubt(FAST_KIB_PER_S);
    mesh.idle(100);
    // They ended their connection to each other to resync what the dead primary left in
    // doubt, lost quorum meanwhile and outdated themselves...
    assert!(mesh.connections[link(B, C)] >= 2, "the survivors redialed to resync");
    assert!(mesh.was_outdated(B, 0) && mesh.was_outdated(C, 0), "quorum lost at the redial");
    // ...and the resync of both bitmaps made them UpToDate again: a promotable majority.
    mesh.idle(GRACE_MS);
    for i in [B, C] {
        assert_eq!(mesh.nodes[i].disk_state(), DiskState::UpToDate, "node {i}");
        assert!(mesh.nodes[i].has_quorum(), "node {i}");
        let other = nid(B + C - i);
        assert_eq!(mesh.nodes[i].replication_state(other), Some(ReplicationState::Established));
    }
    mesh.promote(B);
    assert_eq!(mesh.nodes[B].role(), Role::Primary);
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
    for block in 0..16 {
        assert_eq!(&mesh.disks[B][at(block)..at(block + 1)], &block_data(block, 1)[..]);
    }
}

#[test]
fn survivors_outdated_on_request_stay_outdated_after_their_resync() {
    for outdate_by_request in [false, true] {
        let mut mesh = Mesh::new(FAST_KIB_PER_S);
        mesh.promote(A);
        mesh.idle(50);
        for block in 0..16 {
            mesh.write(A, block, 1);
        }
        mesh.idle(200);
        // B and C do not see each other; the primary replicates to both and dies with writes
        // in doubt on both. Alone, each loses quorum and outdates itself.
        mesh.plugged[link(B, C)] = false;
        let conn_id = std::mem::replace(&mut mesh.conn_id[link(B, C)], 0);
        let now = mesh.tick();
        mesh.nodes[B].handle_transport_closed(now, nid(C), conn_id);
        mesh.nodes[C].handle_transport_closed(now, nid(B), conn_id);
        mesh.run();
        for block in 100..108 {
            mesh.write(A, block, 1);
        }
        mesh.crash(A);
        for i in [B, C] {
            assert_eq!(mesh.nodes[i].disk_state(), DiskState::Outdated, "node {i}");
        }
        if outdate_by_request {
            // What a fence-peer handler does (`drbdadm outdate`): a primary may now write on
            // without B, so B's word that it was in sync with it no longer counts.
            let now = mesh.tick();
            mesh.nodes[B].handle_outdate(now).unwrap();
            mesh.run();
        }
        mesh.plugged[link(B, C)] = true;
        mesh.idle(GRACE_MS);
        let expected = if outdate_by_request { DiskState::Outdated } else { DiskState::UpToDate };
        for i in [B, C] {
            assert_eq!(mesh.nodes[i].disk_state(), expected, "node {i}, {outdate_by_request}");
        }
        assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
    }
}

#[test]
fn a_target_whose_source_defers_at_once_keeps_its_generation() {
    let (mut mesh, meta_a) = primary_dies_with_nothing_in_doubt();
    mesh.promote(B);
    mesh.idle(100);
    for block in 200..210 {
        mesh.write(B, block, 2);
    }
    // A comes back and meets C first: by the generations A is C's sync target, but C defers
    // the resync (B replicates to C) and ends the connection at once; A got no block.
    let since = mesh.events.len();
    mesh.restart(A, meta_a.clone(), &[C]);
    mesh.run();
    assert_eq!(mesh.nodes[A].uuids().current, meta_a.uuids.current, "A got no data from C");
    // Then A meets B, whose bitmap UUID for A names A's generation: a bitmap resync.
    mesh.plugged[link(A, B)] = true;
    mesh.idle(500);
    let decisions = mesh.decisions(A, B, since);
    assert_eq!(decisions.first(), Some(&SyncDecision::BitmapTarget), "A with B: {decisions:?}");
    assert_eq!(mesh.nodes[A].disk_state(), DiskState::UpToDate);
    assert_eq!(mesh.differing_blocks(A, B), Vec::<u64>::new());
}

/// A secondary holds a write the other secondary never got (its link from the primary is
/// held), goes down, and the primary dies too: the two secondaries meet without it. The
/// write was in doubt on B, so its extent was in B's activity log; B's restart marks every
/// hot extent for every diskful peer, and the handshake resyncs the block (mesh seed 1813:
/// the two found each other in sync and kept different data). B tells C it restarted
/// uncleanly, so C, which did not, is the source (mesh seed 1420: an unclean node that was
/// the source by its bits alone spread what its power loss had taken back); the write,
/// never acknowledged, is gone from both.
#[test]
fn a_secondary_that_went_down_with_a_write_the_other_lacks_resyncs_it() {
    let mut mesh = Mesh::new(FAST_KIB_PER_S);
    mesh.promote(A);
    mesh.idle(50);
    for block in 0..16 {
        mesh.write(A, block, 1);
    }
    mesh.idle(200);
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
    // C stops hearing from A: the next write reaches B's disk only, in doubt towards C.
    mesh.held[link(A, C)] = true;
    let block = 500;
    mesh.submit_write(A, block, 2);
    assert_eq!(&mesh.disks[B][at(block)..at(block + 1)], &block_data(block, 2)[..]);
    assert_eq!(mesh.differing_blocks(B, C), vec![block]);
    assert!(mesh.nodes[B].mesh_writes_in_doubt() > 0, "B holds the write in doubt");
    assert!(!mesh.nodes[B].metadata().activity_log.is_empty(), "in B's activity log");
    let meta_b = mesh.crash(B);
    mesh.crash(A);
    mesh.held[link(A, C)] = false;
    let since = mesh.events.len();
    mesh.restart(B, meta_b, &[C]);
    mesh.idle(GRACE_MS);
    let decisions = mesh.decisions(B, C, since);
    assert_eq!(decisions.first(), Some(&SyncDecision::BitmapTarget), "B with C: {decisions:?}");
    assert!(!decisions.contains(&SyncDecision::NoSync), "never in sync unsynced: {decisions:?}");
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
    assert_eq!(&mesh.disks[B][at(block)..at(block + 1)], &vec![0; BLOCK][..], "C's data won");
    for i in [B, C] {
        assert_eq!(
            mesh.nodes[i].replication_state(nid(B + C - i)),
            Some(ReplicationState::Established)
        );
    }
}

/// A node that ends a resync Outdated (its source was Outdated, and the target takes its
/// source's state) while it stays Established with an UpToDate peer handshakes with that
/// peer again and becomes UpToDate from it (mesh seed 20368: nothing else did; once that
/// peer was promoted, the resyncs between the secondaries waited for good and the node
/// stayed Outdated). As in the seed: A and B go down; C, alone, outdates itself; B comes
/// back Outdated with bits for A (what the seed's B marked for A as a sync target while A
/// was down: the same blocks as C's, set in its metadata here) and meets C, and both stay
/// Outdated; their link goes silent; A comes back, meets C first (in sync: both become
/// UpToDate), then B: by B's bits A is B's sync target, and B reports C in sync with it,
/// so A marks nothing for C.
#[test]
fn a_target_left_outdated_by_its_source_becomes_up_to_date_from_an_up_to_date_peer() {
    let mut mesh = Mesh::new(FAST_KIB_PER_S);
    let meta_a = mesh.crash(A);
    let mut meta_b = mesh.crash(B);
    assert_eq!(mesh.nodes[C].disk_state(), DiskState::Outdated, "C lost quorum");
    meta_b.flags.disk = PersistedDisk::Outdated;
    meta_b.bitmaps[A].set_range(0, 8).unwrap();
    mesh.restart(B, meta_b, &[C]);
    mesh.idle(100);
    for i in [B, C] {
        assert_eq!(mesh.nodes[i].disk_state(), DiskState::Outdated, "node {i}");
        let other = nid(B + C - i);
        assert_eq!(mesh.nodes[i].replication_state(other), Some(ReplicationState::Established));
    }
    mesh.held[link(B, C)] = true;
    mesh.restart(A, meta_a, &[C]);
    mesh.idle(100);
    assert_eq!(mesh.nodes[A].disk_state(), DiskState::UpToDate, "A in sync with C");
    assert_eq!(mesh.nodes[C].disk_state(), DiskState::UpToDate, "C in sync with A");
    let since = mesh.events.len();
    mesh.plug(A, B);
    mesh.idle(200);
    let decisions = mesh.decisions(A, B, since);
    assert_eq!(decisions.first(), Some(&SyncDecision::BitmapTarget), "A with B: {decisions:?}");
    assert!(mesh.was_outdated(A, since), "A took B's Outdated state at the end of the resync");
    assert_eq!(mesh.nodes[A].disk_state(), DiskState::UpToDate, "A is UpToDate from C");
    assert_eq!(mesh.nodes[A].replication_state(nid(C)), Some(ReplicationState::Established));
    assert_eq!(mesh.differing_blocks(A, C), Vec::<u64>::new());
}

/// A secondary that loses its connection to the primary marks the writes it holds in doubt
/// for the other secondaries; when it connects again, the primary does not announce to it
/// "in sync" a peer that has not confirmed a write sent before, so the mark is not dropped
/// (mesh seed 19101: it was; the primary then lost that peer and marked the write for it,
/// the secondary adopted the generation the primary started for the peer without the mark,
/// was promoted later and resynced the peer from its bits, and the peer missed the write).
#[test]
fn a_reconnected_secondary_keeps_its_marks_for_a_peer_that_did_not_confirm_them() {
    let mut mesh = Mesh::new(FAST_KIB_PER_S);
    mesh.promote(A);
    mesh.idle(50);
    mesh.cut(B, C);
    // C stops hearing from A (and A from C): the write reaches B only, in doubt towards C.
    mesh.held[link(A, C)] = true;
    let block = 500;
    let id = mesh.submit_write(A, block, 2);
    mesh.idle(100); // a barrier: B confirms the write stable, C cannot
    assert!(mesh.nodes[B].mesh_writes_in_doubt() > 0, "B holds the write in doubt");
    mesh.cut(A, B);
    assert!(mesh.nodes[B].out_of_sync_blocks(nid(C)) > 0, "B marked the write for C");
    mesh.plug(A, B);
    mesh.idle(100); // shorter than a silence the primary notices on its link to C
    assert_eq!(mesh.nodes[B].replication_state(nid(A)), Some(ReplicationState::Established));
    assert_eq!(mesh.nodes[B].disk_state(), DiskState::UpToDate);
    assert!(mesh.nodes[B].out_of_sync_blocks(nid(C)) > 0, "B keeps the mark for C");
    // A loses C with the write unconfirmed there, then dies; B meets C.
    mesh.cut(A, C);
    assert_eq!(mesh.result(id), Some(&Ok(None)), "the write was acknowledged");
    mesh.crash(A);
    mesh.plug(B, C);
    mesh.idle(GRACE_MS);
    assert_eq!(&mesh.disks[C][at(block)..at(block + 1)], &block_data(block, 2)[..]);
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
}

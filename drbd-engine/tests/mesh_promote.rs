//! Two promotions through one shared peer (mesh seed 8475 of `tandem-sim --nodes 3
//! --diskful 3`): three diskful nodes A (0), B (1), C (2), `quorum majority`. C holds an old
//! bitmap generation for B (B was resynced from A meanwhile, out of C's sight), so C writes
//! without B in the generation B holds and starts none. A's link to B goes silent; B is
//! promoted on its stale view of A (its quorum rests on the silent link, so its term is never
//! confirmed and it acknowledges nothing), and C with A. (With the cluster-wide promotion
//! the link goes silent just after A's grant: C waits until A dropped the link.) C's write reaches
//! A and is acknowledged. When B (still primary) later meets A (cut off from C), both hold one
//! generation and A holds bits for B: B must not become A's sync source (it was, by the
//! primary's rule, and A lost C's write), but step down and resync from A.
//!
//! Three state machines wired by the mesh harness (`common/mesh.rs`).

mod common;

use common::mesh::{GRACE_MS, Mesh, NODES, link, majority_suspend_io, mesh_config, nid};
use common::{at, block_data};
use drbd_engine::protocol::{ReplicationState, Role, StateError};
use drbd_engine::uuid::SyncDecision;

const SIZE_BLOCKS: u64 = 256;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn new_mesh() -> Mesh {
    let config = |i: usize| mesh_config(i, 71 + i as u64, 100_000, majority_suspend_io());
    Mesh::start(SIZE_BLOCKS, [false; NODES], config)
}

/// The block C writes (generation 2) and B tries to write (generation 3).
const BLOCK_X: u64 = 7;

/// Up to both promotions: B primary on a silent link, never confirmed, its write held; C
/// primary (confirmed by A) with an acknowledged write of `BLOCK_X` that B lacks; A-B cut.
fn two_primaries_through_a() -> Mesh {
    let mut mesh = new_mesh();
    // C tracks B from an old generation: A writes while B is cut off from both, C adopts A's
    // new generation with a bitmap for B; B is resynced from A only (B-C stays cut).
    mesh.promote(A);
    mesh.idle(50);
    mesh.cut(A, B);
    mesh.cut(B, C);
    mesh.idle(50);
    mesh.write(A, 1, 1);
    // A demotes first: no primary reports B in sync to C after the resync.
    let now = mesh.tick();
    mesh.nodes[A].handle_demote(now).unwrap();
    mesh.run();
    mesh.plug(A, B);
    mesh.idle(GRACE_MS);
    assert_eq!(mesh.nodes[B].replication_state(nid(A)), Some(ReplicationState::Established));
    assert_eq!(mesh.differing_blocks(A, B), Vec::<u64>::new());
    let (b_current, c_uuids) =
        (mesh.nodes[B].metadata().uuids.current, &mesh.nodes[C].metadata().uuids);
    assert_eq!(c_uuids.current, b_current, "B holds C's generation");
    assert_ne!(c_uuids.bitmap_uuid(nid(B)), 0, "C tracks B from an older one");
    // A's link to B goes silent. In the seed B was promoted on its view of A over the silent
    // link; the cluster-wide promotion waits for A's answer there, and times out.
    mesh.held[link(A, B)] = true;
    assert!(matches!(mesh.try_promote(B), Err(StateError::NoQuorum(_))));
    mesh.cut(A, B);
    mesh.plug(A, B);
    // The link goes silent right after A granted B's promotion instead: A never hears of the
    // new primary, whose term it never confirms.
    mesh.promote_then_hold(B, A);
    let held = mesh.submit_write(B, BLOCK_X, 3);
    // A's grant holds C's promotion back while A may still hear of B's ...
    assert_eq!(mesh.try_promote(C), Err(StateError::PeerRefused(nid(A))));
    // ... until A drops the silent link (its ping timeout; B's end is closed with it): C is
    // promoted with A, which never heard of B's promotion.
    mesh.cut(A, B);
    mesh.try_promote(C).unwrap();
    mesh.idle(50);
    let acked = mesh.submit_write(C, BLOCK_X, 2);
    assert_eq!(mesh.result(acked), Some(&Ok(None)), "C's write is acknowledged");
    assert!(mesh.result(held).is_none(), "B acknowledged nothing");
    mesh
}

#[test]
fn an_unconfirmed_primary_never_becomes_the_source_of_a_peer_holding_a_newer_write() {
    let mut mesh = two_primaries_through_a();
    // A loses C too.
    mesh.cut(A, C);
    assert_eq!(mesh.nodes[B].role(), Role::Primary, "B is still primary, without quorum");
    assert!(!mesh.nodes[B].has_quorum());
    let since = mesh.events.len();
    mesh.plug(A, B);
    mesh.idle(GRACE_MS);
    let decisions = mesh.decisions(B, A, since);
    assert!(
        !decisions
            .iter()
            .any(|d| matches!(d, SyncDecision::BitmapSource | SyncDecision::FullSource)),
        "B, never confirmed, was a sync source of A: {decisions:?}"
    );
    assert_eq!(mesh.nodes[B].role(), Role::Secondary, "B stepped down");
    let x = at(BLOCK_X)..at(BLOCK_X + 1);
    assert_eq!(&mesh.disks[A][x.clone()], &block_data(BLOCK_X, 2)[..], "A kept C's write");
    assert_eq!(&mesh.disks[B][x], &block_data(BLOCK_X, 2)[..], "B resynced C's write from A");
    assert_eq!(mesh.nodes[B].replication_state(nid(A)), Some(ReplicationState::Established));
}

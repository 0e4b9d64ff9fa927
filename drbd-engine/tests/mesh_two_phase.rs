//! The cluster-wide (two-phase) promotion of `protocol::node::promote` in a three-node mesh
//! with `quorum majority`: a promotion is asked of every connected peer and commits only
//! with their grants and quorum. Each test says what happened without it (the promotion was
//! decided on the node's own view, at once).
//!
//! Three state machines wired by the mesh harness (`common/mesh.rs`).

mod common;

use common::mesh::{GRACE_MS, Mesh, NODES, link, majority_suspend_io, mesh_config, nid};
use drbd_engine::protocol::node::{Event, Promotion};
use drbd_engine::protocol::{Role, StateError};

const SIZE_BLOCKS: u64 = 64;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn new_mesh() -> Mesh {
    let config = |i: usize| mesh_config(i, 31 + i as u64, 100_000, majority_suspend_io());
    Mesh::start(SIZE_BLOCKS, [false; NODES], config)
}

fn primaries(mesh: &Mesh) -> Vec<usize> {
    (0..NODES).filter(|&i| mesh.nodes[i].role() == Role::Primary).collect()
}

/// A healthy mesh: the promotion waits for both answers, then commits; the peers follow.
#[test]
fn a_promotion_in_a_healthy_mesh_commits_with_every_grant() {
    let mut mesh = new_mesh();
    let since = mesh.events.len();
    let now = mesh.tick();
    assert_eq!(mesh.nodes[A].handle_promote(now, false), Ok(Promotion::Pending));
    assert_eq!(mesh.nodes[A].role(), Role::Secondary, "nothing changes before the answers");
    mesh.run();
    assert_eq!(mesh.promotion_finished(A, since), Some(Ok(())));
    assert_eq!(primaries(&mesh), vec![A]);
    let changed = mesh.events_of(A).position(|e| *e == Event::RoleChanged(Role::Primary));
    let finished = mesh.events_of(A).position(|e| matches!(e, Event::PromotionFinished(_)));
    assert!(changed < finished, "the role changes before the outcome is reported");
    for peer in [B, C] {
        assert_eq!(mesh.nodes[peer].peer_role(nid(A)), Some(Role::Primary));
    }
    mesh.write(A, 1, 1);
    // A second promote of the primary is refused as before.
    let now = mesh.tick();
    assert_eq!(mesh.nodes[A].handle_promote(now, false), Err(StateError::Already(Role::Primary)));
}

/// B's only live link is to A, and it has just gone silent (B heard from A a moment ago, so
/// its own view still gives it quorum): B's ask gets no answer and the promotion fails
/// instead of making B a primary on a stale view (without the two phases: promoted at once,
/// the situation of mesh seed 8475).
#[test]
fn a_node_whose_only_link_to_the_majority_is_stalled_cannot_become_primary() {
    let mut mesh = new_mesh();
    mesh.cut(B, C);
    mesh.idle(50);
    mesh.held[link(A, B)] = true;
    let since = mesh.events.len();
    let now = mesh.tick();
    assert!(mesh.nodes[B].has_quorum(), "B's own view: quorum with A");
    assert_eq!(mesh.nodes[B].handle_promote(now, false), Ok(Promotion::Pending));
    let result = mesh.promotion_outcome(B, since);
    assert!(matches!(result, Err(StateError::NoQuorum(_))), "{result:?}");
    assert_eq!(mesh.nodes[B].role(), Role::Secondary);
    assert!(primaries(&mesh).is_empty());
}

/// A and B ask at once: each refuses the other (it prepares its own promotion), so both fail
/// and the operator retries (without the two phases both became primary).
#[test]
fn two_concurrent_promotions_never_both_succeed() {
    let mut mesh = new_mesh();
    let since = mesh.events.len();
    let now = mesh.tick();
    assert_eq!(mesh.nodes[A].handle_promote(now, false), Ok(Promotion::Pending));
    assert_eq!(mesh.nodes[B].handle_promote(now, false), Ok(Promotion::Pending));
    mesh.run();
    let a = mesh.promotion_finished(A, since).expect("A's promotion ended");
    let b = mesh.promotion_finished(B, since).expect("B's promotion ended");
    assert!(a.is_err() || b.is_err(), "both promoted: {a:?} {b:?}");
    assert!(primaries(&mesh).len() <= 1, "{:?}", primaries(&mesh));
    assert_eq!(a, Err(StateError::PeerRefused(nid(B))));
    assert_eq!(b, Err(StateError::PeerRefused(nid(A))));
    // Nothing is left locked: a retry succeeds.
    mesh.promote(A);
    assert_eq!(primaries(&mesh), vec![A]);
}

/// B asks with its link to C silent: A grants, and refuses its own promotion meanwhile.
/// Returns the mesh and the event index before B's promotion.
fn b_granted_by_a_waits_for_c() -> (Mesh, usize) {
    let mut mesh = new_mesh();
    mesh.held[link(B, C)] = true;
    let since = mesh.events.len();
    let now = mesh.tick();
    assert_eq!(mesh.nodes[B].handle_promote(now, false), Ok(Promotion::Pending));
    mesh.run();
    assert_eq!(mesh.promotion_finished(B, since), None, "B waits for C");
    let now = mesh.tick();
    assert_eq!(mesh.nodes[A].handle_promote(now, false), Err(StateError::PeerPromoting(nid(B))));
    (mesh, since)
}

/// A grant locks the granter: while B's promotion waits for C (B-C silent), A, which granted
/// it, refuses to be promoted itself and refuses C's ask; when C's answer arrives B commits,
/// and the grant ends (A then sees B as primary). Without the two phases B was primary at
/// once and A and C refused with `PeerIsPrimary`.
#[test]
fn a_granting_peer_refuses_other_promotions_until_the_end() {
    let (mut mesh, since) = b_granted_by_a_waits_for_c();
    assert_eq!(mesh.try_promote(C), Err(StateError::PeerRefused(nid(A))));
    let now = mesh.tick();
    assert_eq!(mesh.nodes[B].handle_promote(now, false), Err(StateError::PromotionPending));
    mesh.held[link(B, C)] = false;
    mesh.run();
    assert_eq!(mesh.promotion_finished(B, since), Some(Ok(())));
    assert_eq!(primaries(&mesh), vec![B]);
    let now = mesh.tick();
    assert_eq!(mesh.nodes[A].handle_promote(now, false), Err(StateError::PeerIsPrimary(nid(B))));
}

/// A grant whose asker went silent ends by itself: after the grant timeout the granter
/// answers again (here: it is promoted itself once its link to the silent asker dropped).
#[test]
fn a_grant_to_a_silent_asker_does_not_lock_the_granter_forever() {
    let (mut mesh, since) = b_granted_by_a_waits_for_c();
    // B goes silent towards A as well, after A granted.
    mesh.held[link(A, B)] = true;
    mesh.idle(GRACE_MS * 2);
    assert!(matches!(mesh.promotion_finished(B, since), Some(Err(_))));
    mesh.cut(A, B);
    mesh.cut(B, C);
    mesh.promote(A);
    assert_eq!(primaries(&mesh), vec![A]);
}

//! A quorum primary cut off in two steps, and the heal (issue 5): two diskful nodes A (0), B (1)
//! and a diskless tiebreaker T (2), `quorum majority`. A loses B first while a write waits for
//! B (A keeps quorum through T: the tiebreaker rule), then loses T (no quorum: nothing more is
//! acknowledged). B, which kept quorum with T, is promoted after the grace period and writes.
//! When the links come back, in either order, A must step down and resync from B: no split
//! brain, identical replicas, nothing B acknowledged lost.
//!
//! Three state machines wired by the mesh harness (`common/mesh.rs`), whose links can be held
//! (frames queue, as on a link that went silent) and cut.

mod common;

use common::mesh::{GRACE_MS, Mesh, link, mesh_config, nid};
use common::{BLOCK, at, block_data};
use drbd_engine::protocol::node::{Event, RequestId};
use drbd_engine::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{ConnectionState, DiskState, Role, StateError};
use drbd_engine::uuid::SyncDecision;

const SIZE_BLOCKS: u64 = 256;
const TIEBREAKER: usize = 2;

impl Mesh {
    /// Two diskful nodes and the diskless tiebreaker, `quorum majority`.
    fn new(on_no_quorum: OnNoQuorum) -> Self {
        let config = move |i: usize| {
            let quorum = QuorumConfig {
                quorum: QuorumPolicy::Majority,
                on_no_quorum,
                diskless: i == TIEBREAKER,
                diskless_peers: if i == TIEBREAKER { vec![] } else { vec![nid(TIEBREAKER)] },
                ..QuorumConfig::default()
            };
            mesh_config(i, 17 + i as u64, 100_000, quorum)
        };
        let diskless = [0, 1, 2].map(|i| i == TIEBREAKER);
        Mesh::start(SIZE_BLOCKS, diskless, config)
    }
}

#[derive(Debug, Clone, Copy)]
enum HealOrder {
    PeerFirst,
    TiebreakerFirst,
}

/// Plugs A's two links back in `order`, 200 ms apart.
fn heal(mesh: &mut Mesh, order: HealOrder, a: usize, b: usize, t: usize) {
    let (first, second) = match order {
        HealOrder::PeerFirst => (b, t),
        HealOrder::TiebreakerFirst => (t, b),
    };
    mesh.plug(a, first);
    mesh.idle(200);
    mesh.plug(a, second);
}

/// The scenario of issue 5, up to the heal; returns the mesh and A's requests after the cut.
fn partition_then_promote(on_no_quorum: OnNoQuorum) -> (Mesh, Vec<RequestId>) {
    let (a, b, t) = (0, 1, TIEBREAKER);
    let mut mesh = Mesh::new(on_no_quorum);
    mesh.try_promote(a).unwrap();
    mesh.idle(50);
    for block in 0..8 {
        assert_eq!(mesh.try_write(a, block, 1), Ok(None), "A writes with quorum");
    }
    // A's link to B goes silent with a write in flight for B; A notices first.
    mesh.held[link(a, b)] = true;
    let in_flight = mesh.submit_write(a, 3, 2);
    assert!(mesh.result(in_flight).is_none(), "waits for B");
    mesh.cut(a, b);
    assert!(mesh.nodes[a].has_quorum(), "A keeps quorum through the tiebreaker, for now");
    assert!(mesh.nodes[b].has_quorum(), "B keeps quorum through the tiebreaker");
    let during = mesh.submit_write(a, 4, 2);
    // Then A's link to T: A is alone, without quorum.
    mesh.cut(a, t);
    assert!(!mesh.nodes[a].has_quorum());
    let after = mesh.submit_write(a, 5, 2);
    let held = vec![in_flight, during, after];
    for id in &held {
        assert!(!matches!(mesh.result(*id), Some(Ok(_))), "A acknowledged {id:?} without quorum");
    }
    // B is refused while T still reports A (grace), then promoted.
    let promote = mesh.try_promote(b);
    assert!(matches!(promote, Err(StateError::PeerIsPrimary(_))), "{promote:?}");
    mesh.idle(GRACE_MS);
    mesh.try_promote(b).unwrap();
    mesh.idle(50);
    for block in [3, 9] {
        assert_eq!(mesh.try_write(b, block, 3), Ok(None), "B writes with quorum");
    }
    (mesh, held)
}

#[test]
fn a_primary_cut_off_in_two_steps_steps_down_and_resyncs_on_heal() {
    let (a, b, t) = (0, 1, TIEBREAKER);
    for on_no_quorum in [OnNoQuorum::SuspendIo, OnNoQuorum::IoError] {
        for order in [HealOrder::PeerFirst, HealOrder::TiebreakerFirst] {
            let case = format!("{on_no_quorum} {order:?}");
            let (mut mesh, held) = partition_then_promote(on_no_quorum);
            heal(&mut mesh, order, a, b, t);
            mesh.idle(1_000);
            let split: Vec<_> = mesh
                .events
                .iter()
                .filter(|(_, e)| {
                    matches!(
                        e,
                        Event::SplitBrain { .. }
                            | Event::HandshakeDecided { decision: SyncDecision::SplitBrain, .. }
                    )
                })
                .collect();
            assert!(split.is_empty(), "{case}: {split:?}");
            assert_eq!(mesh.nodes[a].role(), Role::Secondary, "{case}");
            assert_eq!(mesh.nodes[b].role(), Role::Primary, "{case}");
            for i in 0..2 {
                assert_eq!(mesh.nodes[i].disk_state(), DiskState::UpToDate, "{case}: node {i}");
            }
            for (x, y) in [(a, b), (a, t), (b, t)] {
                assert_eq!(
                    mesh.nodes[x].connection_state(nid(y)),
                    Some(ConnectionState::Connected),
                    "{case}: {x}-{y}"
                );
            }
            assert!(mesh.nodes[a].has_quorum(), "{case}");
            assert!(
                !mesh.events_of(b).any(|e| *e == Event::QuorumChanged(false)),
                "{case}: B never lost quorum"
            );
            assert_eq!(
                mesh.differing_blocks(a, b),
                Vec::<u64>::new(),
                "{case}: replicas identical"
            );
            for block in 0..10 {
                let expected = match block {
                    3 | 9 => block_data(block, 3),
                    0..=7 => block_data(block, 1),
                    _ => vec![0; BLOCK],
                };
                assert_eq!(
                    &mesh.disks[b][at(block)..at(block + 1)],
                    &expected[..],
                    "{case}: {block}"
                );
            }
            // What A held without quorum failed when it stepped down; nothing was acknowledged.
            for id in held {
                assert!(matches!(mesh.result(id), Some(Err(_))), "{case}: {:?}", mesh.result(id));
            }
            // B keeps writing, replicated to A.
            assert_eq!(mesh.try_write(b, 20, 4), Ok(None), "{case}");
            assert_eq!(mesh.differing_blocks(a, b), Vec::<u64>::new(), "{case}");
        }
    }
}

/// The other side of the deferral: when the peer A lost is isolated (the tiebreaker lost it
/// too), A's fence is settled through T and A acknowledges writes, so the deferred generation
/// must start before the first acknowledgement; B, found older on reconnect, is A's sync
/// target and receives the write that was in flight when the link went silent.
#[test]
fn an_isolated_peer_is_fenced_and_resynced_from_the_primary_that_kept_quorum() {
    let (a, b, t) = (0, 1, TIEBREAKER);
    for on_no_quorum in [OnNoQuorum::SuspendIo, OnNoQuorum::IoError] {
        let mut mesh = Mesh::new(on_no_quorum);
        mesh.try_promote(a).unwrap();
        mesh.idle(50);
        let generation_before = mesh.nodes[a].uuids().current;
        mesh.held[link(a, b)] = true;
        let in_flight = mesh.submit_write(a, 3, 2);
        mesh.cut(a, b);
        assert!(mesh.result(in_flight).is_none(), "{on_no_quorum}: B is not fenced yet");
        mesh.cut(b, t);
        mesh.idle(50);
        assert_eq!(mesh.result(in_flight), Some(&Ok(None)), "{on_no_quorum}: fenced through T");
        assert_ne!(
            mesh.nodes[a].uuids().current,
            generation_before,
            "{on_no_quorum}: a new generation before the acknowledgement"
        );
        assert_eq!(mesh.try_write(a, 4, 2), Ok(None), "{on_no_quorum}");
        assert!(!mesh.nodes[b].has_quorum(), "{on_no_quorum}");
        mesh.events.clear();
        mesh.plug(a, b);
        mesh.plug(b, t);
        mesh.idle(1_000);
        let decided = mesh.decisions(a, b, 0);
        assert_eq!(decided, vec![SyncDecision::BitmapSource], "{on_no_quorum}");
        assert_eq!(mesh.nodes[a].role(), Role::Primary, "{on_no_quorum}");
        assert_eq!(mesh.nodes[b].disk_state(), DiskState::UpToDate, "{on_no_quorum}");
        assert_eq!(mesh.differing_blocks(a, b), Vec::<u64>::new(), "{on_no_quorum}");
        assert_eq!(&mesh.disks[b][at(3)..at(4)], &block_data(3, 2)[..], "{on_no_quorum}");
    }
}

/// The deferral without a promotion: A lost B with a write in flight, then T, and nobody was
/// promoted. A's marks (no new generation) make it B's bitmap sync source when they meet
/// again: A keeps its role, what it held under suspend-io completes once B is fenced again by
/// the resync, and B ends with every block A acknowledged.
#[test]
fn an_unpromoted_peer_is_resynced_from_the_primary_that_deferred_its_generation() {
    let (a, b, t) = (0, 1, TIEBREAKER);
    for on_no_quorum in [OnNoQuorum::SuspendIo, OnNoQuorum::IoError] {
        for order in [HealOrder::PeerFirst, HealOrder::TiebreakerFirst] {
            let case = format!("{on_no_quorum} {order:?}");
            let mut mesh = Mesh::new(on_no_quorum);
            mesh.try_promote(a).unwrap();
            mesh.idle(50);
            mesh.held[link(a, b)] = true;
            let in_flight = mesh.submit_write(a, 3, 2);
            mesh.cut(a, b);
            mesh.cut(a, t);
            assert!(!mesh.nodes[a].has_quorum(), "{case}");
            mesh.idle(GRACE_MS);
            mesh.events.clear();
            heal(&mut mesh, order, a, b, t);
            mesh.idle(1_000);
            let decided = mesh.decisions(a, b, 0);
            assert_eq!(decided, vec![SyncDecision::BitmapSource], "{case}");
            assert_eq!(mesh.nodes[a].role(), Role::Primary, "{case}");
            assert!(mesh.nodes[a].has_quorum(), "{case}");
            assert_eq!(mesh.nodes[b].disk_state(), DiskState::UpToDate, "{case}");
            assert_eq!(mesh.differing_blocks(a, b), Vec::<u64>::new(), "{case}");
            match on_no_quorum {
                OnNoQuorum::SuspendIo => {
                    assert_eq!(mesh.result(in_flight), Some(&Ok(None)), "{case}");
                    assert_eq!(&mesh.disks[b][at(3)..at(4)], &block_data(3, 2)[..], "{case}");
                }
                OnNoQuorum::IoError => {
                    assert!(matches!(mesh.result(in_flight), Some(Err(_))), "{case}");
                }
            }
            assert_eq!(mesh.try_write(a, 20, 4), Ok(None), "{case}");
            assert_eq!(mesh.differing_blocks(a, b), Vec::<u64>::new(), "{case}");
        }
    }
}

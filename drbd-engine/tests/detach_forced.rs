//! The detach generation outside the mesh: two nodes A (0) and B (1), and two diskful nodes
//! with a diskless tiebreaker T (2). The primary A detaches its disk with nothing in doubt
//! (`drbdadm detach`, as a failed read does with `on-io-error detach`), crashes while
//! detached, comes back from the generation its disk holds and is force-promoted from it,
//! while B is out of reach. The generation a detached primary starts for its disk lives only
//! on B (A has no disk to keep it), so whether B took one decides how B meets A again:
//! - nothing written since the detach: A's disk lacked nothing, B holds nothing A lacks and is
//!   simply behind A's forced generation (a sync target), not a split brain (the mesh's seed
//!   2057 shape, here with one diskful peer);
//! - a write after the detach, or B promoted and writing while A was down: the histories
//!   really forked, and a split brain is right.

mod common;

use common::mesh::{Mesh, mesh_config, nid};
use common::{Pair, block_data};
use drbd_engine::protocol::node::{Config, Event, OnIoError, Promotion};
use drbd_engine::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{DiskState, ReplicationProtocol, StateError};
use drbd_engine::uuid::SyncDecision;

const SIZE_BLOCKS: u64 = 1024;
const A: usize = 0;
const B: usize = 1;
const T: usize = 2;

/// What happens between A's detach and its forced promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meanwhile {
    /// Nothing: A crashes before writing, B stays secondary.
    Nothing,
    /// A writes block 9 through B after the detach, then crashes.
    AWrites,
    /// A crashes before writing; B is promoted and writes block 9.
    BWrites,
}

fn events_of(events: &[(usize, Event)], node: usize) -> impl Iterator<Item = &Event> {
    events.iter().filter(move |(n, _)| *n == node).map(|(_, e)| e)
}

fn split_brains(events: &[(usize, Event)]) -> usize {
    events.iter().filter(|(_, e)| matches!(e, Event::SplitBrain { .. })).count()
}

// ----- two nodes -----

/// B's handshake decisions about A in `events`.
fn pair_decisions(events: &[(usize, Event)]) -> Vec<SyncDecision> {
    events_of(events, B)
        .filter_map(|e| match e {
            Event::HandshakeDecided { decision, .. } => Some(*decision),
            _ => None,
        })
        .collect()
}

/// The two-node scenario up to A meeting B again; returns the pair and the index of the first
/// event after A's forced promotion and write.
fn pair_scenario(meanwhile: Meanwhile) -> (Pair, usize) {
    let mut pair = Pair::new(SIZE_BLOCKS, ReplicationProtocol::C, OnIoError::Detach, false);
    let on_disk = pair.primary_detaches(A);
    if meanwhile == Meanwhile::AWrites {
        assert_eq!(pair.write(A, 9, 2), Ok(None), "through B");
        pair.idle(50);
    }
    // A crashes and restarts alone from its disk's metadata (Consistent: it cannot know
    // whether B moved on).
    pair.restart(A, on_disk.clone());
    pair.idle(50);
    assert_eq!(pair.nodes[A].disk_state(), DiskState::Consistent);
    if meanwhile == Meanwhile::BWrites {
        let now = pair.tick();
        assert_eq!(pair.nodes[B].handle_promote(now, false), Ok(Promotion::Done));
        pair.run();
        assert_eq!(pair.write(B, 9, 2), Ok(None));
        pair.idle(50);
    }
    let now = pair.tick();
    assert_eq!(pair.nodes[A].handle_promote(now, true), Ok(Promotion::Done));
    pair.run();
    assert_ne!(pair.nodes[A].uuids().current, on_disk.uuids.current, "forced: a new generation");
    assert_eq!(pair.write(A, 7, 3), Ok(None));
    pair.idle(100);
    let since = pair.events.len();
    (pair, since)
}

#[test]
fn two_nodes_the_peer_of_a_detached_primary_that_wrote_nothing_is_behind_its_forced_generation() {
    let (mut pair, since) = pair_scenario(Meanwhile::Nothing);
    pair.connect();
    pair.idle(300);
    let events = &pair.events[since..];
    assert_eq!(split_brains(events), 0, "B holds nothing A lacks");
    assert_eq!(pair_decisions(events), vec![SyncDecision::BitmapTarget]);
    assert_eq!(pair.nodes[B].disk_state(), DiskState::UpToDate);
    assert_eq!(pair.differing_blocks(), Vec::<u64>::new());
}

#[test]
fn two_nodes_a_write_after_the_detach_forks_from_the_forced_generation() {
    for meanwhile in [Meanwhile::AWrites, Meanwhile::BWrites] {
        let (mut pair, since) = pair_scenario(meanwhile);
        if meanwhile == Meanwhile::BWrites {
            let now = pair.tick();
            pair.nodes[B].handle_demote(now).unwrap();
            pair.run();
        }
        pair.connect();
        pair.idle(300);
        let events = &pair.events[since..];
        assert_eq!(
            pair_decisions(events),
            vec![SyncDecision::SplitBrain],
            "{meanwhile:?}: B holds block 9, which A's disk lacks, and A wrote block 7 apart"
        );
    }
}

/// Without a crash: A detaches with nothing written, demotes; B is promoted while A is
/// detached and writes (or nobody writes); A attaches again. With the detach generation
/// deferred, B's own generation (or none) decides: A's disk is behind B's writes, or in sync.
#[test]
fn two_nodes_a_detached_disk_that_missed_nothing_is_in_sync_or_behind_the_peer_on_attach() {
    for b_writes in [false, true] {
        let mut pair = Pair::new(SIZE_BLOCKS, ReplicationProtocol::C, OnIoError::Detach, false);
        pair.primary_detaches(A);
        let now = pair.tick();
        pair.nodes[A].handle_demote(now).unwrap();
        pair.run();
        if b_writes {
            let now = pair.tick();
            pair.nodes[B].handle_promote(now, false).unwrap();
            pair.run();
            assert_eq!(pair.write(B, 9, 2), Ok(None));
            assert_eq!(pair.write(B, 1, 2), Ok(None));
            let now = pair.tick();
            pair.nodes[B].handle_demote(now).unwrap();
            pair.run();
        }
        let since = pair.events.len();
        let now = pair.tick();
        pair.nodes[A].handle_attach(now).unwrap();
        pair.run();
        pair.connect();
        pair.idle(300);
        let events = &pair.events[since..];
        assert_eq!(split_brains(events), 0, "b_writes={b_writes}");
        assert_eq!(pair.nodes[A].disk_state(), DiskState::UpToDate, "b_writes={b_writes}");
        assert_eq!(pair.differing_blocks(), Vec::<u64>::new(), "b_writes={b_writes}");
        let expected = block_data(1, 1 + u8::from(b_writes));
        assert!(pair.disks[A][..common::BLOCK * 2].starts_with(&[0; 4096]), "block 0");
        assert!(pair.disks[A][common::BLOCK..].starts_with(&expected), "b_writes={b_writes}");
    }
}

// ----- two diskful nodes and a diskless tiebreaker -----

/// Node `i` of two diskful nodes and the tiebreaker T, under `quorum`.
fn tiebreaker_config(i: usize, quorum: QuorumPolicy) -> Config {
    let quorum = QuorumConfig {
        quorum,
        on_no_quorum: OnNoQuorum::SuspendIo,
        diskless: i == T,
        diskless_peers: if i == T { vec![] } else { vec![nid(T)] },
        ..QuorumConfig::default()
    };
    mesh_config(i, 2057, 100_000, quorum)
}

/// A detached primary that crashed, under quorum with the tiebreaker, cannot be forced
/// without B (the tiebreaker only keeps quorum, it never gives it to a restarted node), and
/// with B connected the handshake finds B newer before any promotion: the scenario below
/// needs quorum off.
#[test]
fn tiebreaker_under_quorum_a_restarted_primary_is_not_forced_without_its_peer() {
    let config = |i| tiebreaker_config(i, QuorumPolicy::Majority);
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false, false, true], config);
    let on_disk = mesh.primary_detaches(A);
    mesh.cut(A, B);
    let _ = mesh.crash(A);
    mesh.cut(B, T);
    mesh.restart(A, on_disk, &[T]);
    mesh.idle(50);
    let now = mesh.tick();
    assert!(
        matches!(mesh.nodes[A].handle_promote(now, true), Err(StateError::NoQuorum(_))),
        "forced without quorum"
    );
}

/// The tiebreaker scenario up to A meeting B again (A restarts with T, without B; quorum off);
/// returns the cluster and the index of the first event after A's forced promotion and write.
fn tiebreaker_scenario(meanwhile: Meanwhile) -> (Mesh, usize) {
    let config = |i| tiebreaker_config(i, QuorumPolicy::Off);
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false, false, true], config);
    let on_disk = mesh.primary_detaches(A);
    if meanwhile == Meanwhile::AWrites {
        mesh.write(A, 9, 2);
        mesh.idle(50);
    }
    mesh.cut(A, B);
    let _ = mesh.crash(A);
    mesh.idle(50);
    if meanwhile == Meanwhile::BWrites {
        mesh.promote(B);
        mesh.write(B, 9, 2);
        mesh.idle(50);
        let now = mesh.tick();
        mesh.nodes[B].handle_demote(now).unwrap();
        mesh.run();
    }
    // B goes out of reach; A comes back with T only.
    mesh.cut(B, T);
    mesh.restart(A, on_disk.clone(), &[T]);
    mesh.idle(50);
    assert_ne!(mesh.nodes[A].disk_state(), DiskState::UpToDate, "A restarted without B");
    let since = mesh.events.len();
    let now = mesh.tick();
    let promotion = mesh.nodes[A].handle_promote(now, true);
    mesh.run();
    match promotion {
        Ok(Promotion::Done) => {}
        Ok(Promotion::Pending) => assert_eq!(mesh.promotion_outcome(A, since), Ok(())),
        Err(e) => panic!("forced promotion of A: {e:?}"),
    }
    assert_ne!(mesh.nodes[A].uuids().current, on_disk.uuids.current, "forced: a new generation");
    mesh.write(A, 7, 3);
    mesh.idle(100);
    let since = mesh.events.len();
    (mesh, since)
}

#[test]
fn tiebreaker_the_peer_of_a_detached_primary_that_wrote_nothing_is_behind_its_forced_generation() {
    let (mut mesh, since) = tiebreaker_scenario(Meanwhile::Nothing);
    mesh.plug(A, B);
    mesh.plug(B, T);
    mesh.idle(300);
    assert_eq!(split_brains(&mesh.events[since..]), 0, "B holds nothing A lacks");
    assert_eq!(mesh.decisions(B, A, since), vec![SyncDecision::BitmapTarget]);
    assert_eq!(mesh.nodes[B].disk_state(), DiskState::UpToDate);
    assert_eq!(mesh.differing_blocks(A, B), Vec::<u64>::new());
}

#[test]
fn tiebreaker_a_write_after_the_detach_forks_from_the_forced_generation() {
    for meanwhile in [Meanwhile::AWrites, Meanwhile::BWrites] {
        let (mut mesh, since) = tiebreaker_scenario(meanwhile);
        mesh.plug(A, B);
        mesh.idle(300);
        assert_eq!(
            mesh.decisions(B, A, since),
            vec![SyncDecision::SplitBrain],
            "{meanwhile:?}: B holds block 9, which A's disk lacks, and A wrote block 7 apart"
        );
    }
}

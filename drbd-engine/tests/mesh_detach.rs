//! Three diskful nodes A (0), B (1), C (2) in a full mesh (quorum off): the primary
//! A detaches its disk (`on-io-error detach`), crashes while detached, comes back from the
//! generation its disk holds and is force-promoted from it. The generation a detached primary
//! starts for its disk lives only on its sources (it has no disk to keep it), so whether a
//! source took one decides how the source meets A again:
//! - nothing written since the detach: the disk lacks nothing, no generation starts, and C
//!   (A's source) is simply behind A's forced generation (mesh seed 2057 on branch hs12598:
//!   C had taken the detach generation at once and was found split from A with nothing new);
//! - a write after the detach: the disk lacks it, the sources take the detach generation with
//!   it; A's forced generation really forked from it (a split brain), and an attached disk is
//!   found behind them and resynced.

mod common;

use common::mesh::{Mesh, NODES, mesh_config};
use drbd_engine::protocol::node::{Config, Event, Promotion};
use drbd_engine::protocol::quorum::QuorumConfig;
use drbd_engine::protocol::{DiskState, Metadata};
use drbd_engine::uuid::SyncDecision;

const SIZE_BLOCKS: u64 = 1024;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Without quorum, so that A, restarted alone, can be force-promoted there (with quorum it
/// would need a peer that did not take the detach generation; the seed had one, an
/// Inconsistent node).
fn config(i: usize) -> Config {
    mesh_config(i, 57, 100_000, QuorumConfig::default())
}

/// A primary writes, its peers hold the write stably, and A detaches with nothing in
/// doubt; A then writes `block_after` (through B and C) if given, is cut off and crashes.
/// Returns the mesh and the metadata A's disk held at the detach.
fn primary_detaches_and_crashes(block_after: Option<u64>) -> (Mesh, Metadata) {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    let on_disk = mesh.primary_detaches(A);
    if let Some(block) = block_after {
        mesh.write(A, block, 2);
        mesh.idle(50);
    }
    mesh.cut(A, B);
    mesh.cut(A, C);
    let _ = mesh.crash(A);
    mesh.idle(50);
    (mesh, on_disk)
}

/// A restarts alone from its disk's metadata (Consistent: it cannot know whether its peers
/// moved on), is force-promoted and writes block 7. Returns the event index before A meets
/// its peers again (the caller plugs them).
fn restart_alone_and_force(mesh: &mut Mesh, on_disk: Metadata) -> usize {
    mesh.restart(A, on_disk.clone(), &[]);
    mesh.idle(50);
    assert_ne!(mesh.nodes[A].disk_state(), DiskState::UpToDate, "A restarted alone");
    let now = mesh.tick();
    assert_eq!(mesh.nodes[A].handle_promote(now, true), Ok(Promotion::Done));
    mesh.run();
    assert_ne!(mesh.nodes[A].uuids().current, on_disk.uuids.current, "forced: a new generation");
    mesh.write(A, 7, 3);
    mesh.idle(100);
    mesh.events.len()
}

fn split_brains(mesh: &Mesh, since: usize) -> usize {
    mesh.events[since..].iter().filter(|(_, e)| matches!(e, Event::SplitBrain { .. })).count()
}

#[test]
fn a_source_of_a_detached_primary_that_wrote_nothing_is_behind_its_forced_generation() {
    let (mut mesh, on_disk) = primary_detaches_and_crashes(None);
    let since = restart_alone_and_force(&mut mesh, on_disk);
    mesh.plug(A, B);
    mesh.plug(A, C);
    mesh.idle(300);
    assert_eq!(split_brains(&mesh, since), 0, "B and C hold nothing A lacks");
    for i in [B, C] {
        assert_eq!(mesh.decisions(i, A, since), vec![SyncDecision::BitmapTarget], "node {i}");
        assert_eq!(mesh.differing_blocks(A, i), Vec::<u64>::new(), "node {i}");
    }
}

#[test]
fn a_write_after_the_detach_forks_from_the_forced_generation() {
    let (mut mesh, on_disk) = primary_detaches_and_crashes(Some(9));
    let since = restart_alone_and_force(&mut mesh, on_disk);
    mesh.plug(A, C);
    mesh.idle(300);
    assert_eq!(
        mesh.decisions(C, A, since),
        vec![SyncDecision::SplitBrain],
        "C holds block 9, which A's disk lacks, and A wrote block 7 apart from C"
    );
}

#[test]
fn a_write_after_the_detach_starts_the_generation_the_attached_disk_is_resynced_by() {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    let on_disk = mesh.primary_detaches(A).uuids.current;
    for i in [B, C] {
        assert_eq!(mesh.nodes[i].uuids().current, on_disk, "node {i}: nothing written yet");
    }
    mesh.write(A, 9, 2);
    mesh.idle(50);
    for i in [B, C] {
        let uuids = mesh.nodes[i].uuids();
        assert_ne!(uuids.current, on_disk, "node {i} took the detach generation");
        assert_eq!(uuids.bitmap_uuid(common::mesh::nid(A)), on_disk, "node {i} tracks A's disk");
    }
    let now = mesh.tick();
    mesh.nodes[A].handle_demote(now).unwrap();
    mesh.run();
    let since = mesh.events.len();
    let now = mesh.tick();
    mesh.nodes[A].handle_attach(now).unwrap();
    mesh.run();
    mesh.idle(300);
    let decisions: Vec<_> = [B, C].iter().flat_map(|p| mesh.decisions(A, *p, since)).collect();
    assert!(decisions.contains(&SyncDecision::BitmapTarget), "A resyncs block 9: {decisions:?}");
    assert_eq!(split_brains(&mesh, since), 0);
    assert_eq!(mesh.nodes[A].disk_state(), DiskState::UpToDate);
    assert_eq!(mesh.differing_blocks(A, B), Vec::<u64>::new());
    assert_eq!(mesh.differing_blocks(A, C), Vec::<u64>::new());
}

//! Online verify between two secondaries of a three-diskful mesh when the third node is
//! promoted mid-run (simulator seed 5773). The new primary's writes reach the two over
//! separate streams, so one end may read a block before such a write and the other after
//! it: the run must end (not completed) before either end applies a write of that primary,
//! and must report nothing.

mod common;

use common::mesh::{Mesh, NODES, link, majority_suspend_io, mesh_config, nid};
use drbd_engine::protocol::node::{Config, Event};
use drbd_engine::protocol::{DigestAlg, DigestSettings, ReplicationState};

const SIZE_BLOCKS: u64 = 1024;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// Slow enough that the verify of the whole device takes many steps.
const SLOW_KIB_PER_S: u64 = 400;

fn config(i: usize) -> Config {
    Config {
        digests: DigestSettings {
            verify_alg: Some(DigestAlg::Crc32c),
            ..DigestSettings::default()
        },
        ..mesh_config(i, 57 + i as u64, SLOW_KIB_PER_S, majority_suspend_io())
    }
}

/// Whether node `i` ended a verify run with `peer`, and how.
fn verify_finished(mesh: &Mesh, i: usize, peer: usize) -> Option<bool> {
    mesh.events_of(i).find_map(|e| match e {
        Event::VerifyFinished { peer: p, completed, .. } if p.index() == peer => Some(*completed),
        _ => None,
    })
}

fn out_of_sync_reports(mesh: &Mesh) -> Vec<(usize, Event)> {
    let reports = mesh.events.iter().filter(|(_, e)| matches!(e, Event::VerifyOutOfSync { .. }));
    reports.cloned().collect()
}

#[test]
fn a_verify_between_secondaries_ends_when_a_third_node_is_promoted() {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    let now = mesh.tick();
    mesh.nodes[C].handle_verify(now, nid(B), 0).unwrap();
    mesh.run();
    assert_eq!(mesh.nodes[C].replication_state(nid(B)), Some(ReplicationState::VerifyS));

    // C hears of A's promotion late (its link to A holds frames, for less than the ping
    // timeout, from just after C granted it): B, the VerifyT, learns first and receives A's
    // writes over the whole device while the run goes on; it must stop rather than answer C
    // with their data.
    mesh.promote_then_hold(A, C);
    for block in (0..SIZE_BLOCKS).step_by(8) {
        mesh.submit_write(A, block, 1);
    }
    assert_eq!(verify_finished(&mesh, B, C), Some(false), "B stopped as VerifyT");
    assert_eq!(verify_finished(&mesh, C, B), Some(false), "C learned it by VerifyDone");
    mesh.idle(800);
    mesh.held[link(A, C)] = false;
    mesh.run();
    mesh.idle(1000);
    assert_eq!(out_of_sync_reports(&mesh), vec![]);
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());

    // With the primary known at both ends, a verify between the secondaries is refused.
    let now = mesh.tick();
    assert!(mesh.nodes[C].handle_verify(now, nid(B), 0).is_err());
}

//! Three diskful nodes A (0), B (1), C (2) in a full mesh with `quorum majority`: who knows
//! a generation a primary starts, found by the three-diskful simulator's false split brains.
//! - A primary whose quorum rests on a stalled link defers the generation for a peer its
//!   writes skip until it may acknowledge again; when that moment is also the one its
//!   demotion completes (the held write was the last request), the generation is announced
//!   before the role changes. The secondary in sync takes it (seed 10997: it kept the old
//!   one and met the demoted node later as a split brain), and a sync target learns the
//!   base for the skipped peer from it (here: it took the new generation at the end of its
//!   resync with no base for that peer).

mod common;

use common::mesh::{Mesh, NODES, link, majority_suspend_io, mesh_config, nid};
use drbd_engine::protocol::Role;
use drbd_engine::protocol::node::Config;

const SIZE_BLOCKS: u64 = 256;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const FAST_KIB_PER_S: u64 = 100_000;
/// Longer than a live link stays silent, shorter than the ping timeout.
const STALL_MS: u64 = drbd_engine::constants::PING_INTERVAL_MS * 2;

fn config(i: usize) -> Config {
    mesh_config(i, 71 + i as u64, FAST_KIB_PER_S, majority_suspend_io())
}

#[test]
fn a_generation_started_as_the_demotion_completes_is_announced() {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    mesh.promote(A);
    mesh.idle(50);
    mesh.write(A, 0, 1);
    mesh.idle(200);
    let shared = mesh.nodes[A].metadata().uuids.current;
    // A write is on its way to both secondaries, whose links go silent, when A loses C: the
    // write is marked for C, and the generation for C waits, A's quorum resting on a stalled
    // link (`mesh_generation_stalled`). Then A loses B, and quorum (B and C lose each other
    // too): the write is held.
    mesh.held[link(A, B)] = true;
    mesh.held[link(A, C)] = true;
    let held = mesh.submit_write(A, 5, 2);
    mesh.idle(STALL_MS);
    mesh.cut(A, C);
    assert_eq!(mesh.nodes[A].metadata().uuids.current, shared, "deferred: B's link stalled");
    mesh.cut(A, B);
    mesh.cut(B, C);
    assert!(!mesh.nodes[A].has_quorum());
    assert!(mesh.result(held).is_none(), "held without quorum");
    assert_eq!(mesh.nodes[A].metadata().uuids.current, shared, "no generation without quorum");
    // The operator demotes A: pending while the write is held.
    let now = mesh.tick();
    mesh.nodes[A].handle_demote(now).unwrap();
    mesh.run();
    assert_eq!(mesh.nodes[A].role(), Role::Primary);
    // B returns as A's sync target (it lacks the write): A regains quorum and, in one input,
    // starts the generation, completes the write and steps down.
    mesh.plug(A, B);
    mesh.idle(200);
    assert_eq!(mesh.result(held), Some(&Ok(None)));
    assert_eq!(mesh.nodes[A].role(), Role::Secondary);
    let a = mesh.nodes[A].metadata().uuids.clone();
    assert_ne!(a.current, shared, "A acknowledged a write C lacks: a new generation");
    assert_eq!(a.bitmap_uuid(nid(C)), shared);
    let b = &mesh.nodes[B].metadata().uuids;
    assert_eq!(b.current, a.current, "B took A's generation with the resync");
    assert_eq!(b.bitmap_uuid(nid(C)), shared, "and, announced, A's base for C");
}

/// The generation of a primary promoted apart from a peer starts with the first write that
/// peer misses (DRBD 9's `NEW_CUR_UUID`: an unforced promotion only flags it), and the
/// secondary in sync takes it. Seed 14209: a generation started at the promotion's
/// confirmation, with nothing written, met a node force-promoted meanwhile (a new
/// generation at once, from the same base): both had moved on from one base and were
/// found split although one held nothing new.
#[test]
fn the_first_write_apart_starts_the_generation() {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    let shared = mesh.nodes[A].metadata().uuids.current;
    mesh.cut(A, B);
    mesh.cut(A, C);
    mesh.promote(B);
    mesh.idle(100);
    assert_eq!(mesh.nodes[B].metadata().uuids.current, shared);
    mesh.write(B, 1, 2);
    mesh.idle(50);
    let b = mesh.nodes[B].metadata().uuids.clone();
    assert_ne!(b.current, shared);
    assert_eq!(b.bitmap_uuid(nid(A)), shared);
    let c = &mesh.nodes[C].metadata().uuids;
    assert_eq!(c.current, b.current);
    assert_eq!(c.bitmap_uuid(nid(A)), shared);
}

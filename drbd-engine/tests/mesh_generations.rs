//! Three diskful nodes A (0), B (1), C (2) in a full mesh with `quorum majority`: who knows
//! a generation a primary starts, found by the three-diskful simulator's false split brains.
//! - A primary whose quorum rests on a stalled link defers the generation for a peer its
//!   writes skip until it may acknowledge again; when that moment is also the one its
//!   demotion completes (the held write was the last request), the generation is announced
//!   before the role changes. The secondary in sync takes it (seed 10997: it kept the old
//!   one and met the demoted node later as a split brain), and a sync target learns the
//!   base for the skipped peer from it (here: it took the new generation at the end of its
//!   resync with no base for that peer).
//! - A primary defers that generation until the lost peer is fenced, its other link silent
//!   but not stalled yet (seed 5005): it acknowledges nothing before, and may lose quorum.

mod common;

use common::mesh::{Mesh, NODES, link, majority_suspend_io, mesh_config, nid};
use drbd_engine::protocol::Role;
use drbd_engine::protocol::node::{Config, RequestId};
use drbd_engine::uuid::SyncDecision;

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

/// A primary with a write of generation 1 everywhere, its links to B and C then held (gone
/// silent) with a write to block 5 on its way: the mesh, the shared generation, the write.
fn primary_a_goes_silent_with_a_write() -> (Mesh, u64, RequestId) {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    mesh.promote(A);
    mesh.idle(50);
    mesh.write(A, 0, 1);
    mesh.idle(200);
    let shared = mesh.nodes[A].metadata().uuids.current;
    mesh.held[link(A, B)] = true;
    mesh.held[link(A, C)] = true;
    let held = mesh.submit_write(A, 5, 2);
    (mesh, shared, held)
}

#[test]
fn a_generation_started_as_the_demotion_completes_is_announced() {
    // A write is on its way to both secondaries, whose links go silent, when A loses C: the
    // write is marked for C, and the generation for C waits, A's quorum resting on a stalled
    // link (`mesh_generation_stalled`). Then A loses B, and quorum (B and C lose each other
    // too): the write is held.
    let (mut mesh, shared, held) = primary_a_goes_silent_with_a_write();
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

/// Seed 5005 of `tandem-sim --nodes 3 --diskful 3` (on the draws of branch hs12598): a
/// partition isolates the primary A; 86 ms later, its links silent but not stalled yet, the
/// operator disconnects A from B. A's write in flight is marked for B, and A still counted C
/// (silent as long) for quorum, so it started a generation for B at once. It never
/// acknowledged anything in it: the fence of B waits for an answer from C that cannot come,
/// and A loses quorum at C's ping timeout. B and C promote B, whose first write starts a
/// generation of its own from the same base; the reconnect of A and B was a split brain.
/// As DRBD 9 does (`NEW_CUR_UUID` waits for the I/O a fence freezes to thaw), the
/// generation for a lost peer starts only once A may acknowledge writes again; A's marks
/// stay in its bitmap, B's generation is newer, and A becomes B's sync target.
#[test]
fn a_generation_waits_for_the_fence_of_the_lost_peer() {
    // The partition: A's links go silent, a write is on its way to both secondaries.
    let (mut mesh, shared, held) = primary_a_goes_silent_with_a_write();
    mesh.idle(80);
    // `drbdadm disconnect` on A: its FIN is lost in the partition, B notices at its ping
    // timeout below.
    let conn_ab = std::mem::replace(&mut mesh.conn_id[link(A, B)], 0);
    mesh.plugged[link(A, B)] = false;
    mesh.held[link(A, B)] = false;
    mesh.queues[A][B].clear();
    mesh.queues[B][A].clear();
    let now = mesh.tick();
    mesh.nodes[A].handle_disconnect(now, nid(B)).unwrap();
    mesh.run();
    assert!(mesh.nodes[A].has_quorum(), "C's link is silent, not stalled yet");
    assert!(mesh.result(held).is_none(), "held: B's fence is not settled");
    assert_eq!(
        mesh.nodes[A].metadata().uuids.current,
        shared,
        "A acknowledges nothing: no generation for B yet"
    );
    // The ping timeouts: A loses C (and quorum), B loses A.
    mesh.idle(300);
    mesh.cut(A, C);
    let now = mesh.tick();
    mesh.nodes[B].handle_transport_closed(now, nid(A), conn_ab);
    mesh.run();
    assert!(!mesh.nodes[A].has_quorum());
    assert!(mesh.result(held).is_none(), "held without quorum");
    assert_eq!(mesh.nodes[A].metadata().uuids.current, shared, "no generation without quorum");
    // B and C keep quorum; B is promoted and writes apart from A.
    mesh.promote(B);
    mesh.idle(50);
    mesh.write(B, 9, 3);
    mesh.idle(50);
    assert_ne!(mesh.nodes[B].metadata().uuids.current, shared);
    // The partition heals: A steps down, its held write fails, and it syncs from B.
    let since = mesh.events.len();
    let now = mesh.tick();
    mesh.nodes[A].handle_connect(now, nid(B), false).unwrap();
    mesh.plug(A, B);
    mesh.plug(A, C);
    mesh.idle(500);
    for peer in [B, C] {
        let decisions = mesh.decisions(A, peer, since);
        assert!(!decisions.contains(&SyncDecision::SplitBrain), "A with {peer}: {decisions:?}");
    }
    assert_ne!(mesh.result(held), Some(&Ok(None)), "A never acknowledged the held write");
    assert_eq!(mesh.nodes[A].role(), Role::Secondary);
    assert!(mesh.differing_blocks(A, B).is_empty(), "A took B's data");
    assert!(mesh.differing_blocks(C, B).is_empty());
    assert_eq!(mesh.nodes[A].metadata().uuids.current, mesh.nodes[B].metadata().uuids.current);
}

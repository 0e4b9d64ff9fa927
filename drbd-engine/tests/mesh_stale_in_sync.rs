//! Stale views of a peer that made a node count it in sync, each found by
//! `tandem-sim --nodes 3 --diskful 3`. A sync target skips its marks for the peers its source
//! reports holding the source's data (`Frame::ResyncPeersInSync`); three ways that report went
//! stale:
//! - seed 12713: the source reported a peer through a link that had gone silent, behind
//!   which the peer had been promoted and written;
//! - seed 7229: the target had itself resynced the peer just before, cut off from the
//!   source, and the source, its link to that peer silent, had not heard of it;
//! - seed 5361: the peer was the target's primary, promoted a moment after its last frame
//!   to the source, and the target had lost it with writes the source lacked.
//!
//! And a handshake decides only from Hellos both ends still stand by (`Frame::HelloHolds`,
//! seed 12598): a node sent its Hello and took the primary's new generation in the same
//! millisecond; its peer, of the old generation and without the primary's newer writes, found
//! no sync from the stale Hello and declared itself in sync with it, while the sender saw its
//! Hello stale and dropped the connection.
//!
//! And a node holding a primary's writes in doubt for a peer counts them as differences in
//! its handshake with that peer (seed 46593): the peer may never have received them.

mod common;

use common::mesh::{Mesh, NODES, link, majority_suspend_io, mesh_config, nid};
use drbd_engine::constants::{PING_INTERVAL_MS, PING_TIMEOUT_MS};
use drbd_engine::protocol::node::{Config, Event};
use drbd_engine::protocol::{DiskState, ReplicationState, Role};
use drbd_engine::uuid::SyncDecision;

const SIZE_BLOCKS: u64 = 256;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const FAST_KIB_PER_S: u64 = 100_000;

fn config(i: usize) -> Config {
    mesh_config(i, 71 + i as u64, FAST_KIB_PER_S, majority_suspend_io())
}

/// The generation node `i` holds in block `b` (see `block_data`).
fn generation(mesh: &Mesh, i: usize, b: u64) -> u8 {
    let data = &mesh.disks[i][common::at(b)..common::at(b + 1)];
    assert_eq!(data[..8], b.to_le_bytes(), "block {b} of node {i} is in place");
    data[8]
}

/// Seed 12713. A (0) lost B (1); its link to C (2) went silent (a partition neither end
/// noticed yet), and C was promoted behind it, its writes reaching B only. B then lost C
/// with those writes in doubt, outdated itself without quorum and reconnected to A, which
/// resynced it with A's older data. A's report still named C in sync with it, so B marked
/// nothing for C, and B and C, both of one generation and without bits for each other,
/// reconnected with no sync: two UpToDate replicas differed in C's acknowledged writes.
#[test]
fn a_target_marks_for_a_peer_its_source_last_heard_long_ago() {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    // A connection of A and C on which neither resynced a third node.
    mesh.cut(A, C);
    mesh.plug(A, C);
    mesh.idle(100);
    mesh.cut(A, B);
    // A-C goes silent right after A granted C's promotion; C is promoted before either end
    // notices, A never hears of it.
    mesh.promote_then_hold(C, A);
    let writes: Vec<_> = (0..8).map(|b| mesh.submit_write(C, b * 4, 7)).collect();
    for b in 0..8 {
        assert_eq!(generation(&mesh, B, b * 4), 7, "B holds C's write");
    }
    assert!(writes.iter().all(|w| mesh.result(*w).is_none()), "A's acks are missing");
    mesh.idle(200); // a barrier closes the epoch: C knows B holds its writes

    // B loses C with its writes in doubt and, alone, its quorum.
    mesh.cut(B, C);
    assert_eq!(mesh.nodes[B].disk_state(), DiskState::Outdated);

    // Long after A last heard from C (but before the ping timeout ends that link), B comes
    // back to A, which resyncs the blocks in doubt from its older data.
    mesh.idle(PING_INTERVAL_MS + PING_INTERVAL_MS / 2 + 100);
    assert!(mesh.conn_id[link(A, C)] != 0, "A has not noticed the silence of C yet");
    mesh.plug(A, B);
    mesh.idle(100);
    assert_eq!(generation(&mesh, B, 0), 0, "B took A's data");

    // A's link to C times out; C and B meet again: B must not count as in sync with C.
    mesh.idle(PING_TIMEOUT_MS);
    mesh.held[link(A, C)] = false;
    mesh.plug(B, C);
    mesh.idle(500);
    assert_eq!(mesh.nodes[C].role(), Role::Primary);
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new(), "B and C hold the same data");
    for b in 0..8 {
        assert_eq!(generation(&mesh, B, b * 4), 7, "B holds C's write again");
    }
}

/// Simulator seed 7229: the source's report lags behind a change the target itself made.
/// Primary A (0) went down before its last write reached its own disk (B (1) and C (2) hold
/// it). B lost its link to C, and with it its quorum, while C had not noticed yet. A came
/// back and, as the crashed primary, resynced B with its own older block; then C resynced A
/// and, its link to B silent for less than a second, reported B in sync with it: A took C's
/// block without marking it for B, and A and B, Established without bits, differed (a
/// verify between them reported the block).
#[test]
fn a_target_marks_for_a_peer_it_resynced_apart_from_its_source() {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    mesh.promote(A);
    mesh.write(A, 4, 1);
    mesh.idle(200);
    // The harness completes disk I/O at once: put back what A's disk held, as if A died
    // with the write still on its way to it.
    let before = mesh.disks[A][common::at(4)..common::at(5)].to_vec();
    mesh.write(A, 4, 2);
    let meta = mesh.crash(A);
    mesh.disks[A][common::at(4)..common::at(5)].copy_from_slice(&before);
    mesh.idle(300);
    assert_eq!(generation(&mesh, B, 4), 2);
    assert_eq!(generation(&mesh, C, 4), 2);

    // B notices the loss of its link to C (and with it its quorum); C does not yet.
    let l = link(B, C);
    let conn_id = std::mem::replace(&mut mesh.conn_id[l], 0);
    mesh.plugged[l] = false;
    mesh.queues[B][C].clear();
    mesh.queues[C][B].clear();
    let now = mesh.tick();
    mesh.nodes[B].handle_transport_closed(now, nid(C), conn_id);
    mesh.run();
    assert_eq!(mesh.nodes[B].disk_state(), DiskState::Outdated);

    // A comes back to B and resyncs it with its older block, then to C, which resyncs A.
    mesh.restart(A, meta, &[B]);
    mesh.idle(100);
    assert_eq!(generation(&mesh, B, 4), 1, "B took A's block");
    mesh.plug(A, C);
    mesh.idle(100);
    assert_eq!(generation(&mesh, A, 4), 2, "A took C's block");
    // (B handshakes with A again when A becomes UpToDate.)
    let bits = mesh.nodes[A].out_of_sync_blocks(nid(B)) + mesh.nodes[B].out_of_sync_blocks(nid(A));
    assert!(
        mesh.differing_blocks(A, B).is_empty() || bits > 0,
        "A and B differ in {:?} without knowing it",
        mesh.differing_blocks(A, B)
    );

    // Everyone meets again: one data everywhere.
    mesh.cut(A, B);
    mesh.plug(A, B);
    mesh.plug(B, C);
    mesh.idle(PING_TIMEOUT_MS);
    assert_eq!(mesh.differing_blocks(A, B), Vec::<u64>::new());
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
}

/// Delivers what `from` sent to `to` on their current connection, and nothing else.
fn deliver(mesh: &mut Mesh, from: usize, to: usize) {
    while let Some((conn_id, frame)) = mesh.queues[from][to].pop_front() {
        if conn_id == mesh.conn_id[link(from, to)] {
            let now = mesh.now_ms;
            mesh.nodes[to].handle_receive(now, nid(from), &frame);
        }
    }
}

/// Primary A and secondary B, both with A's first write; C (2), cut off from both, outdated
/// itself without quorum.
fn c_cut_off_from_primary_a() -> Mesh {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    mesh.promote(A);
    mesh.write(A, 3, 1);
    mesh.idle(200); // a barrier closes the epoch: the write is in doubt nowhere
    mesh.cut(A, C);
    mesh.cut(B, C);
    assert_eq!(mesh.nodes[C].disk_state(), DiskState::Outdated, "C alone lost its quorum");
    mesh
}

/// Primary A lost C and, writing without it, started a generation that B adopts from A's
/// announcement. B and C reconnect; B's Hello (old generation) is on its way to C when B
/// takes the new generation. C (Outdated: it lost its quorum) must not take that Hello for
/// B's state: a NoSync from it made C UpToDate without A's write. The handshake is retried
/// instead, and C ends with the write.
#[test]
fn a_handshake_waits_until_the_peer_confirms_its_hello() {
    let mut mesh = c_cut_off_from_primary_a();

    // A's write that misses C starts a generation for it; its announcement to B is held.
    mesh.held[link(A, B)] = true;
    let write = mesh.submit_write(A, 5, 2);

    // B and C reconnect: both Hellos go out, B's with the old generation.
    mesh.held[link(B, C)] = true;
    mesh.plug(B, C);
    assert!(mesh.conn_id[link(B, C)] != 0, "B and C connected");
    // B takes the new generation (and the write) before C has read B's Hello.
    mesh.held[link(A, B)] = false;
    deliver(&mut mesh, A, B);
    mesh.run();
    assert_eq!(mesh.result(write), Some(&Ok(None)), "A's write completed with B");
    let since = mesh.events.len();
    deliver(&mut mesh, B, C);
    mesh.run();
    assert_eq!(mesh.decisions(C, B, since), Vec::<SyncDecision>::new(), "C waits for B");
    assert_eq!(mesh.nodes[C].disk_state(), DiskState::Outdated, "C is not UpToDate");
    assert!(
        !mesh.events[since..].iter().any(|(n, e)| *n == C
            && *e
                == Event::ReplicationStateChanged {
                    peer: nid(B),
                    state: ReplicationState::Established
                }),
        "C is not Established with B on B's stale Hello"
    );

    // B finds its Hello stale and retries. B does not resync C while A replicates to it
    // (the handshakes are deferred); C gets A's write once A reaches it again.
    mesh.held[link(B, C)] = false;
    mesh.run();
    mesh.idle(200);
    assert!(mesh.connections[link(B, C)] >= 2, "B and C handshook again");
    let decisions = mesh.decisions(C, B, since);
    assert!(!decisions.contains(&SyncDecision::NoSync), "C never in sync with B: {decisions:?}");
    mesh.plug(A, C);
    mesh.idle(500);
    assert_eq!(mesh.nodes[A].role(), Role::Primary);
    for x in [B, C] {
        assert_eq!(mesh.differing_blocks(A, x), Vec::<u64>::new(), "node {x} holds A's writes");
        assert_eq!(mesh.nodes[x].disk_state(), DiskState::UpToDate, "node {x}");
    }
}

/// Simulator seed 46593. Primary A (0) finished its handshake with C (2), Outdated after
/// losing its quorum, but C never got A's `HelloHolds` (a lost frame stalled that stream),
/// so A replicated to C writes C never received. B (1) took them, in doubt for C (A names C
/// among its targets), then met C: B's bits for C were clear, so the pair found no sync and
/// C became UpToDate from B without A's writes. B marks its writes in doubt for a peer it
/// handshakes with: it cannot tell whether that peer holds them.
#[test]
fn a_handshake_counts_the_writes_in_doubt_for_the_peer() {
    let mut mesh = c_cut_off_from_primary_a();

    // A and C reconnect; C gets A's handshake but not the `HelloHolds` that follows it.
    let l = link(A, C);
    mesh.held[l] = true;
    mesh.plug(A, C);
    assert!(mesh.conn_id[l] != 0, "A and C connected");
    deliver(&mut mesh, A, C); // Hello, HandshakeDone: C answers with its HelloHolds
    mesh.run();
    deliver(&mut mesh, C, A); // A decides and replicates to C from now on
    mesh.run();
    assert_eq!(mesh.nodes[A].replication_state(nid(C)), Some(ReplicationState::Established));
    assert_eq!(mesh.nodes[C].disk_state(), DiskState::Outdated, "C has not decided");

    // A's write reaches B only; A waits for C's ack.
    let write = mesh.submit_write(A, 5, 2);
    assert_eq!(generation(&mesh, B, 5), 2, "B holds A's write");
    assert_eq!(mesh.differing_blocks(B, C), vec![5], "C lacks A's write");
    assert_eq!(mesh.result(write), None, "A waits for C");

    // B and C meet: C must not become UpToDate from B without A's write.
    let since = mesh.events.len();
    mesh.plug(B, C);
    mesh.idle(50);
    let decisions = mesh.decisions(C, B, since);
    assert!(!decisions.contains(&SyncDecision::NoSync), "C never in sync with B: {decisions:?}");
    assert!(
        mesh.nodes[C].disk_state() != DiskState::UpToDate || mesh.differing_blocks(A, C).is_empty(),
        "C is UpToDate without A's write"
    );

    // A's stream to C flows again: everyone ends with A's writes.
    mesh.held[l] = false;
    mesh.idle(500);
    assert_eq!(mesh.nodes[A].role(), Role::Primary);
    assert_eq!(mesh.result(write), Some(&Ok(None)), "A's write completed");
    for x in [B, C] {
        assert_eq!(mesh.differing_blocks(A, x), Vec::<u64>::new(), "node {x} holds A's writes");
        assert_eq!(mesh.nodes[x].disk_state(), DiskState::UpToDate, "node {x}");
    }
}

/// Simulator seed 5361: A (0) was promoted as its link to B (1) went silent, and its writes
/// reached C (2) only. C lost A with them in doubt, and its quorum with B; back with B, C
/// (Outdated) resynced from B, which, its link to A silent for half a second (less than a
/// live link's longest silence), still reported A in sync with it. C took B's older blocks
/// over A's writes without marking them for A, and A and C met again with no sync. No
/// silence bound at the source can tell: A may be promoted a moment after its last frame
/// to B. C knows, as it holds A's writes B may lack: a target marks what it receives for a
/// primary it lost with writes in doubt, whatever its source reports of that node.
#[test]
fn a_target_marks_for_the_primary_it_lost_with_writes_in_doubt() {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    // A connection of A and B on which neither resynced a third node.
    mesh.cut(A, B);
    mesh.plug(A, B);
    mesh.idle(100);
    mesh.promote_then_hold(A, B);
    let writes: Vec<_> = (0..4).map(|b| mesh.submit_write(A, b * 4 + 1, 3)).collect();
    let blocks: Vec<u64> = (0..4).map(|b| b * 4 + 1).collect();
    for b in &blocks {
        assert_eq!(generation(&mesh, C, *b), 3, "C holds A's write");
    }
    assert_eq!(mesh.differing_blocks(B, C), blocks, "B lacks A's writes");
    assert!(writes.iter().all(|w| mesh.result(*w).is_none()), "B's acks are missing");
    mesh.idle(200); // a barrier closes the epoch: A knows C holds its writes

    // C loses A with its writes in doubt, then its quorum.
    mesh.cut(A, C);
    mesh.cut(B, C);
    assert_eq!(mesh.nodes[C].disk_state(), DiskState::Outdated);

    // C comes back to B, which resyncs it from its older data before it notices that its
    // link to A went silent.
    let since = mesh.events.len();
    mesh.plug(B, C);
    mesh.idle(100);
    assert!(mesh.conn_id[link(A, B)] != 0, "B has not noticed the silence of A yet");
    assert!(mesh.decisions(C, B, since).contains(&SyncDecision::BitmapTarget), "C resynced");
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new(), "C took B's blocks");
    assert!(mesh.nodes[C].out_of_sync_blocks(nid(A)) >= 4, "C knows it differs from A");

    // A's link to B times out; A and C meet again: one data on both.
    mesh.cut(A, B);
    mesh.plug(A, C);
    mesh.idle(500);
    assert_eq!(mesh.differing_blocks(A, C), Vec::<u64>::new(), "A and C hold the same data");

    // Once C has handshaken with A again, it trusts a source's report of A as before: a
    // later resync from B, A a secondary in sync with B, marks nothing for A (marking it
    // anyway would start a resync of A and C after every resync of C).
    mesh.plug(A, B);
    mesh.idle(500);
    for x in [B, C] {
        assert_eq!(mesh.differing_blocks(A, x), Vec::<u64>::new(), "node {x} holds A's data");
    }
    demote(&mut mesh, A);
    mesh.cut(A, C);
    mesh.cut(B, C);
    mesh.promote(B);
    mesh.write(B, 20, 4);
    demote(&mut mesh, B);
    mesh.idle(200);
    let since = mesh.events.len();
    mesh.plug(B, C);
    mesh.idle(100);
    assert!(mesh.decisions(C, B, since).contains(&SyncDecision::BitmapTarget), "C resynced");
    assert_eq!(generation(&mesh, C, 20), 4, "C took B's write");
    assert_eq!(mesh.nodes[C].out_of_sync_blocks(nid(A)), 0, "C counts A in sync with B");
}

fn demote(mesh: &mut Mesh, i: usize) {
    let now = mesh.tick();
    mesh.nodes[i].handle_demote(now).unwrap();
    mesh.run();
    assert_eq!(mesh.nodes[i].role(), Role::Secondary, "node {i} demoted");
}

//! A sync source's report of which peers hold its data (`Frame::ResyncPeersInSync`) must not
//! count a peer whose link has gone silent (simulator seed 12713 of `tandem-sim --nodes 3
//! --diskful 3`). A (0) lost B (1); its link to C (2) went silent (a partition neither end
//! noticed yet), and C was promoted behind it, its writes reaching B only. B then lost C
//! with those writes in doubt, outdated itself without quorum and reconnected to A, which
//! resynced it with A's older data. A's report still named C in sync with it, so B marked
//! nothing for C, and B and C, both of one generation and without bits for each other,
//! reconnected with no sync: two UpToDate replicas differed in C's acknowledged writes.

mod common;

use common::mesh::{Mesh, NODES, link, mesh_config};
use drbd_engine::constants::{PING_INTERVAL_MS, PING_TIMEOUT_MS};
use drbd_engine::protocol::node::Config;
use drbd_engine::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{DiskState, Role};

const SIZE_BLOCKS: u64 = 256;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const FAST_KIB_PER_S: u64 = 100_000;

fn config(i: usize) -> Config {
    let quorum = QuorumConfig {
        quorum: QuorumPolicy::Majority,
        on_no_quorum: OnNoQuorum::SuspendIo,
        ..QuorumConfig::default()
    };
    mesh_config(i, 71 + i as u64, FAST_KIB_PER_S, quorum)
}

/// The generation node `i` holds in block `b` (see `block_data`).
fn generation(mesh: &Mesh, i: usize, b: u64) -> u8 {
    let data = &mesh.disks[i][common::at(b)..common::at(b + 1)];
    assert_eq!(data[..8], b.to_le_bytes(), "block {b} of node {i} is in place");
    data[8]
}

#[test]
fn a_target_marks_for_a_peer_its_source_last_heard_long_ago() {
    let mut mesh = Mesh::start(SIZE_BLOCKS, [false; NODES], config);
    // A connection of A and C on which neither resynced a third node.
    mesh.cut(A, C);
    mesh.plug(A, C);
    mesh.idle(100);
    mesh.cut(A, B);
    // A-C goes silent; C is promoted before either end notices, A never hears of it.
    mesh.held[link(A, C)] = true;
    mesh.promote(C);
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

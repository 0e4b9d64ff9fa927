//! When a two-node primary that loses its peer starts its new data generation: with the first
//! write the peer misses, not for the writes the peer confirmed but had not yet reported
//! stable (no barrier ack). Those are marked in the peer's bitmap within the old generation
//! (a power loss may still take them from the peer), as DRBD 9 makes the `NEW_CUR_UUID` of
//! a lost peer only when the next write is submitted. Started at the loss, the generation
//! forked from the one of the peer promoted meanwhile although the old primary held nothing
//! the peer lacked: a split brain on reconnect (simulator two-node seed 9204, an old primary
//! whose demotion waited for its last barrier ack when the peer went down).

mod common;

use common::{Pair, block_data};
use drbd_engine::NodeId;
use drbd_engine::protocol::node::Event;
use drbd_engine::protocol::{DiskState, Role};

const SIZE_BLOCKS: u64 = 64;

fn split_brains(pair: &Pair) -> usize {
    pair.events.iter().filter(|(_, e)| matches!(e, Event::SplitBrain { .. })).count()
}

/// Node 0 primary wrote block 1 on both nodes, acknowledged through node 1's WriteAck; no
/// barrier closed its epoch yet. Returns the pair and node 0's generation.
fn primary_wrote_block_1() -> (Pair, u64) {
    let mut pair = Pair::configured(SIZE_BLOCKS, false, |_| {});
    let now = pair.tick();
    pair.nodes[0].handle_promote(now, false).unwrap();
    pair.run();
    pair.idle(100);
    let generation = pair.nodes[0].metadata().uuids.current;
    assert_eq!(pair.write(0, 1, 1), Ok(None), "node 1 confirmed the write");
    (pair, generation)
}

/// As `primary_wrote_block_1`, then node 0 is asked to demote: its demotion waits for the
/// barrier ack, which node 1's link holds, and the link is cut.
fn demoting_primary_loses_peer_before_the_barrier_ack() -> (Pair, u64) {
    let (mut pair, generation) = primary_wrote_block_1();
    pair.held[1] = true;
    let now = pair.tick();
    pair.nodes[0].handle_demote(now).unwrap();
    pair.run();
    assert_eq!(pair.nodes[0].role(), Role::Primary, "the demotion waits for the barrier ack");
    pair.cut();
    (pair, generation)
}

#[test]
fn writes_the_lost_peer_confirmed_start_no_generation_and_the_old_primary_resyncs() {
    let (mut pair, generation) = demoting_primary_loses_peer_before_the_barrier_ack();
    assert_eq!(pair.nodes[0].role(), Role::Secondary);
    let meta = pair.nodes[0].metadata();
    assert!(meta.bitmaps[1].test(1), "the write in doubt is marked for node 1");
    assert_eq!(meta.uuids.current, generation, "node 0 wrote nothing without node 1");
    // Node 1 is promoted (the cluster manager) and writes block 3: its generation is newer.
    let now = pair.tick();
    pair.nodes[1].handle_promote(now, false).unwrap();
    pair.run();
    assert_eq!(pair.write(1, 3, 3), Ok(None));
    assert_ne!(pair.nodes[1].metadata().uuids.current, generation);
    pair.connect();
    pair.idle(500);
    assert_eq!(split_brains(&pair), 0, "node 0 holds nothing node 1 lacks");
    assert!(pair.resynced_blocks(1) > 0, "node 1 is the sync source");
    assert!(pair.differing_blocks().is_empty(), "replicas identical");
    assert_eq!(&pair.disks[0][common::at(1)..common::at(2)], &block_data(1, 1)[..]);
    assert_eq!(&pair.disks[0][common::at(3)..common::at(4)], &block_data(3, 3)[..]);
    assert_eq!(pair.nodes[0].disk_state(), DiskState::UpToDate);
}

#[test]
fn the_first_write_the_lost_peer_misses_starts_the_generation() {
    let (mut pair, generation) = primary_wrote_block_1();
    pair.cut();
    assert_eq!(pair.nodes[0].role(), Role::Primary);
    assert!(pair.nodes[0].metadata().bitmaps[1].test(1));
    assert_eq!(pair.nodes[0].metadata().uuids.current, generation, "nothing written apart yet");
    assert_eq!(pair.write(0, 2, 2), Ok(None));
    let uuids = &pair.nodes[0].metadata().uuids;
    assert_ne!(uuids.current, generation, "started before the write apart was acknowledged");
    assert_eq!(uuids.bitmap_uuid(NodeId(1)) & !1, generation & !1, "node 1 tracked from there");
    // Node 1 is promoted and writes too: both wrote apart, a split brain.
    let now = pair.tick();
    pair.nodes[1].handle_promote(now, false).unwrap();
    pair.run();
    assert_eq!(pair.write(1, 3, 3), Ok(None));
    let now = pair.tick();
    pair.nodes[0].handle_demote(now).unwrap();
    pair.run();
    pair.connect();
    pair.idle(100);
    assert_eq!(split_brains(&pair), 2, "both ends decide split brain");
}

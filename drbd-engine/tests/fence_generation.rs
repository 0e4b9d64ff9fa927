//! When a two-node primary that lost its peer under a freezing fencing policy starts its new
//! data generation: only once the fence-peer handler outdated (or shot) the peer, before its
//! next acknowledgement (DRBD's `NEW_CUR_UUID` when frozen I/O thaws). Started at the loss,
//! the generation forked from the one of the peer promoted meanwhile even when the handler
//! never outdated it ("peer is primary", or failures and then a crash while frozen): a
//! split brain on reconnect although the old primary acknowledged nothing apart (simulator
//! two-node seeds 344 and 1969).

mod common;

use common::{Pair, block_data, other};
use drbd_engine::NodeId;
use drbd_engine::protocol::node::{AppRequest, Event, RequestError, RequestId};
use drbd_engine::protocol::{DiskState, FenceOutcome, Fencing, Role};

const SIZE_BLOCKS: u64 = 64;

/// A fenced pair: node 0 primary with block 1 on both nodes, then a write of block 2 that
/// node 1 never receives (node 0's link holds it) and the link cut: node 0's fence is
/// pending. Returns the pair, the frozen write and node 0's generation before the loss.
fn primary_frozen_after_loss() -> (Pair, RequestId, u64) {
    let mut pair = Pair::configured(SIZE_BLOCKS, false, |config| {
        config.fencing = Fencing::ResourceOnly;
    });
    let now = pair.tick();
    pair.nodes[0].handle_promote(now, false).unwrap();
    pair.run();
    assert_eq!(pair.write(0, 1, 1), Ok(None));
    pair.idle(100);
    let generation = pair.nodes[0].metadata().uuids.current;
    pair.held[0] = true;
    let data = block_data(2, 2).into();
    let frozen = pair.submit(0, AppRequest::Write { offset_blocks: 2, data, fua: false });
    pair.cut();
    assert!(pair.nodes[0].fence_pending(NodeId(1)));
    assert!(pair.result(frozen).is_none(), "frozen until the handler answers");
    (pair, frozen, generation)
}

/// Node 1, cut off, is promoted (its own fence finds node 0 outdated or gone) and writes
/// block 3.
fn peer_promoted_writes(pair: &mut Pair, force: bool, outcome: FenceOutcome) {
    let now = pair.tick();
    pair.nodes[1].handle_promote(now, force).unwrap();
    pair.run();
    let data = block_data(3, 3).into();
    let write = pair.submit(1, AppRequest::Write { offset_blocks: 3, data, fua: false });
    let now = pair.tick();
    pair.nodes[1].handle_fence_outcome(now, other(1), outcome);
    pair.run();
    assert_eq!(pair.result(write), Some(&Ok(None)));
}

fn split_brains(pair: &Pair) -> usize {
    pair.events.iter().filter(|(_, e)| matches!(e, Event::SplitBrain { .. })).count()
}

/// Reconnects and lets the resync run: node 0 must be node 1's sync target, and end with
/// node 1's data (its unacknowledged block 2 overwritten).
fn reconnect_resyncs_old_primary(mut pair: Pair, case: &str) {
    pair.connect();
    pair.idle(500);
    assert_eq!(split_brains(&pair), 0, "{case}: the old primary holds nothing apart");
    assert!(pair.resynced_blocks(1) > 0, "{case}: node 1 is the sync source");
    assert!(pair.differing_blocks().is_empty(), "{case}: replicas identical");
    assert_eq!(&pair.disks[0][common::at(2)..common::at(3)], &vec![0; common::BLOCK][..]);
    assert_eq!(&pair.disks[0][common::at(3)..common::at(4)], &block_data(3, 3)[..]);
    assert_eq!(pair.nodes[0].disk_state(), DiskState::UpToDate, "{case}");
}

#[test]
fn fence_exit_code_6_leaves_the_generation_and_the_old_primary_resyncs() {
    let (mut pair, frozen, generation) = primary_frozen_after_loss();
    assert_eq!(
        pair.nodes[0].metadata().uuids.current,
        generation,
        "no generation before the fence settled"
    );
    // The cluster manager promoted node 1 before the handler reached it.
    peer_promoted_writes(&mut pair, false, FenceOutcome::PeerOutdated);
    let now = pair.tick();
    pair.nodes[0].handle_fence_outcome(now, NodeId(1), FenceOutcome::PeerIsPrimary);
    pair.run();
    assert_eq!(pair.result(frozen), Some(&Err(RequestError::NoUpToDateData)));
    assert_eq!(pair.nodes[0].disk_state(), DiskState::Outdated);
    // Still primary until the operator demotes it: no generation starts meanwhile.
    assert_eq!(pair.write(0, 4, 4), Err(RequestError::NoUpToDateData));
    pair.idle(100);
    assert_eq!(pair.nodes[0].metadata().uuids.current, generation);
    let now = pair.tick();
    pair.nodes[0].handle_demote(now).unwrap();
    pair.run();
    assert_eq!(pair.nodes[0].role(), Role::Secondary);
    assert_eq!(pair.nodes[0].metadata().uuids.current, generation);
    reconnect_resyncs_old_primary(pair, "exit code 6");
}

#[test]
fn fence_failures_then_a_crash_while_frozen_leave_the_generation() {
    let (mut pair, frozen, generation) = primary_frozen_after_loss();
    for _ in 0..3 {
        let now = pair.tick();
        pair.nodes[0].handle_fence_outcome(now, NodeId(1), FenceOutcome::Failed);
        pair.run();
    }
    assert!(pair.result(frozen).is_none(), "a failed handler keeps I/O frozen");
    assert_eq!(pair.nodes[0].metadata().uuids.current, generation);
    // Power loss while frozen: the deferred generation was never persisted, the marks were.
    let on_disk = pair.nodes[0].metadata().clone();
    assert!(on_disk.bitmaps[1].test(2), "the unreplicated write is marked");
    pair.restart(0, on_disk);
    peer_promoted_writes(&mut pair, true, FenceOutcome::PeerUnreachable);
    reconnect_resyncs_old_primary(pair, "failures then a crash");
}

#[test]
fn a_primary_that_wrote_on_after_its_fence_outdated_the_peer_is_a_split_brain() {
    let (mut pair, frozen, generation) = primary_frozen_after_loss();
    // The handler outdated node 1 (what it does to the peer, then its exit code 4).
    let now = pair.tick();
    pair.nodes[1].handle_outdate(now).unwrap();
    pair.nodes[0].handle_fence_outcome(now, NodeId(1), FenceOutcome::PeerOutdated);
    pair.run();
    assert_eq!(pair.result(frozen), Some(&Ok(None)));
    assert_ne!(
        pair.nodes[0].metadata().uuids.current,
        generation,
        "the generation starts before the frozen write is acknowledged"
    );
    assert_eq!(pair.write(0, 5, 5), Ok(None));
    // The operator force-promotes the outdated node 1: both wrote apart.
    peer_promoted_writes(&mut pair, true, FenceOutcome::PeerUnreachable);
    pair.connect();
    pair.idle(100);
    assert_eq!(split_brains(&pair), 2, "both ends decide split brain");
}

#[test]
fn an_old_primary_outdated_by_exit_code_6_is_the_sync_target_of_a_primary_that_wrote_nothing() {
    let (mut pair, frozen, generation) = primary_frozen_after_loss();
    // Node 1 is promoted but writes nothing yet: both keep the old generation, and only the
    // old primary holds bits (its unacknowledged write of block 2).
    let now = pair.tick();
    pair.nodes[1].handle_promote(now, false).unwrap();
    pair.run();
    pair.nodes[0].handle_fence_outcome(now, NodeId(1), FenceOutcome::PeerIsPrimary);
    pair.run();
    assert_eq!(pair.result(frozen), Some(&Err(RequestError::NoUpToDateData)));
    let now = pair.tick();
    pair.nodes[0].handle_demote(now).unwrap();
    pair.run();
    assert_eq!(pair.nodes[1].metadata().uuids.current, generation);
    assert_eq!(pair.nodes[0].metadata().uuids.current, generation);
    pair.connect();
    pair.idle(500);
    let refused = pair.events.iter().any(|(_, e)| matches!(e, Event::SyncRefused { .. }));
    assert!(!refused, "the primary is the source within one generation");
    assert_eq!(split_brains(&pair), 0);
    assert!(pair.differing_blocks().is_empty());
    assert_eq!(&pair.disks[0][common::at(2)..common::at(3)], &vec![0; common::BLOCK][..]);
}

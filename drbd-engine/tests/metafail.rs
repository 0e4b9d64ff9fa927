//! A failed metadata write (`protocol::node::metafail`) through the state machine's public
//! inputs and outputs, the harness failing `Output::Persist` as the driver does when the
//! meta-disk's file system is full: the disk detaches (whatever `on-io-error` says), nothing
//! queued behind the failed update reaches the disk, writes go on through the peer or fail
//! without one, and `attach` afterwards does a full resync.

mod common;

use common::{Pair, at, block_data};
use drbd_engine::NodeId;
use drbd_engine::protocol::node::{AppRequest, OnIoError, RequestError};
use drbd_engine::protocol::{ConnectionState, DiskState, MetaUpdate, ReplicationProtocol, Role};

/// Four activity-log extents: a full resync differs from an activity-log one.
const SIZE_BLOCKS: u64 = 4 * drbd_engine::constants::AL_EXTENT_BLOCKS;

fn primary_pair(on_io_error: OnIoError) -> Pair {
    let mut pair = Pair::new(SIZE_BLOCKS, ReplicationProtocol::C, on_io_error, false);
    pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
    pair.run();
    pair
}

#[test]
fn a_failed_metadata_write_detaches_and_the_primary_keeps_serving_through_its_peer() {
    // pass_on too: a metadata error has no caller to hand it to (DRBD detaches as well).
    for on_io_error in [OnIoError::Detach, OnIoError::PassOn] {
        let mut pair = primary_pair(on_io_error);
        for block in 0..8 {
            assert_eq!(pair.write(0, block, 1), Ok(None));
        }
        // The meta-disk fills up: the next write to a cold extent needs an activity-log
        // update, which fails. The write must not reach the disk behind it (its extent is not
        // in the on-disk log), and it completes through the peer.
        pair.fail_meta[0] = true;
        let cold = drbd_engine::constants::AL_EXTENT_BLOCKS + 5;
        assert_eq!(pair.write(0, cold, 2), Ok(None), "{on_io_error:?}");
        assert!(pair.meta_failures[0] > 0, "the activity-log update was attempted");
        assert!(pair.detached(0));
        assert_eq!(pair.nodes[0].disk_state(), DiskState::Diskless);
        assert_eq!(pair.nodes[0].role(), Role::Primary);
        assert!(pair.disks[0][at(cold)..at(cold + 1)].iter().all(|b| *b == 0), "not on disk");
        assert_eq!(pair.disks[1][at(cold)..at(cold + 1)], block_data(cold, 2)[..]);
        assert_eq!(pair.nodes[0].connection_state(NodeId(1)), Some(ConnectionState::Connected));
        assert_eq!(pair.nodes[1].peer_disk_state(NodeId(0)), Some(DiskState::Diskless));
        // From now on nothing is persisted and every write goes through the peer.
        let failures = pair.meta_failures[0];
        for block in 100..116 {
            assert_eq!(pair.write(0, block, 3), Ok(None));
        }
        assert_eq!(pair.request(0, AppRequest::Flush), Ok(None));
        pair.idle(200);
        assert_eq!(pair.meta_failures[0], failures, "a detached node persists nothing");
        for block in (0..8).chain([cold]).chain(100..116) {
            let generation = match block {
                0..8 => 1,
                100..116 => 3,
                _ => 2,
            };
            let read = pair.read(0, block);
            assert!(read == Ok(Some(block_data(block, generation))), "block {block} reads back");
        }
        // The peer tracks what the detached disk lacks.
        assert!(pair.nodes[1].out_of_sync_blocks(NodeId(0)) >= 17);
    }
}

#[test]
fn without_an_up_to_date_peer_a_failed_metadata_write_fails_the_write() {
    let mut pair = primary_pair(OnIoError::Detach);
    assert_eq!(pair.write(0, 1, 1), Ok(None));
    pair.cut();
    pair.fail_meta[0] = true;
    // Writing while the peer is away marks its bitmap first: that update fails, so the write
    // is never acknowledged and never reaches the disk.
    let result = pair.write(0, 2, 1);
    assert!(
        matches!(result, Err(RequestError::Io | RequestError::NoUpToDateData)),
        "the write fails: {result:?}"
    );
    assert!(pair.detached(0));
    assert!(pair.disks[0][at(2)..at(3)].iter().all(|b| *b == 0), "not on disk");
    assert_eq!(pair.write(0, 3, 1), Err(RequestError::NoUpToDateData));
    assert_eq!(pair.read(0, 1), Err(RequestError::NoUpToDateData));
}

#[test]
fn a_sync_target_whose_metadata_fails_detaches_and_the_primary_goes_on() {
    let mut pair = primary_pair(OnIoError::Detach);
    assert_eq!(pair.write(0, 1, 1), Ok(None));
    pair.cut();
    assert_eq!(pair.write(0, 2, 2), Ok(None));
    // The peer comes back behind: becoming a sync target updates its metadata (disk state,
    // UUIDs, bitmap), which fails. It detaches instead of taking the daemon down.
    pair.fail_meta[1] = true;
    pair.connect();
    pair.idle(2_000);
    assert!(pair.meta_failures[1] > 0, "the sync target's update was attempted");
    assert!(pair.detached(1));
    assert_eq!(pair.nodes[1].disk_state(), DiskState::Diskless);
    // The primary goes on with its own disk and keeps tracking what the peer lacks.
    assert_eq!(pair.nodes[0].disk_state(), DiskState::UpToDate);
    assert_eq!(pair.write(0, 3, 2), Ok(None));
    assert_eq!(pair.read(0, 2), Ok(Some(block_data(2, 2))));
    assert!(pair.nodes[0].out_of_sync_blocks(NodeId(1)) >= 2);
    assert_eq!(pair.meta_failures[0], 0);
}

#[test]
fn attach_after_a_metadata_failure_does_a_full_resync() {
    let mut pair = primary_pair(OnIoError::Detach);
    for block in 0..16 {
        assert_eq!(pair.write(0, block, 1), Ok(None));
    }
    pair.idle(200);
    pair.fail_meta[0] = true;
    let cold = 3 * drbd_engine::constants::AL_EXTENT_BLOCKS;
    assert_eq!(pair.write(0, cold, 2), Ok(None));
    assert!(pair.detached(0));
    pair.idle(200);
    pair.nodes[0].handle_demote(pair.now_ms + 1).unwrap();
    pair.run();
    // The meta-disk has room again.
    pair.fail_meta[0] = false;
    pair.persisted[0].clear();
    pair.nodes[0].handle_attach(pair.now_ms + 1).unwrap();
    pair.run();
    // Nothing on disk is trusted: every block is marked, and the superblock is rewritten.
    let full = MetaUpdate::BitmapSet { peer: NodeId(1), first_block: 0, blocks: SIZE_BLOCKS };
    assert!(pair.persisted[0].contains(&full), "{:?}", pair.persisted[0]);
    assert!(pair.persisted[0].iter().any(|u| matches!(u, MetaUpdate::Uuids(_))));
    pair.connect();
    pair.idle(5_000);
    assert_eq!(pair.nodes[0].disk_state(), DiskState::UpToDate);
    assert_eq!(pair.differing_blocks(), Vec::<u64>::new(), "replicas identical after the resync");
    let resynced = pair.resynced_blocks(1);
    assert_eq!(resynced, SIZE_BLOCKS, "a full resync");
    pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
    pair.run();
    assert_eq!(pair.read(0, cold), Ok(Some(block_data(cold, 2))));
}

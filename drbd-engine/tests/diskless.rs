//! Diskless operation through the state machine's public inputs and outputs:
//! `on-io-error detach` (reads retried and writes completed through the peer, re-attach with a
//! bitmap resync), `pass_on`, and a `disk none` client that is primary.

mod common;

use common::{BLOCK, Pair, block_data};
use drbd_engine::NodeId;
use drbd_engine::protocol::node::{AppRequest, Event, OnIoError, Output, RequestError, RequestId};
use drbd_engine::protocol::{ConnectionState, DiskState, ReplicationProtocol, Role};

const SIZE_BLOCKS: u64 = 1024;

fn pair(protocol: ReplicationProtocol, on_io_error: OnIoError, client: bool) -> Pair {
    Pair::new(SIZE_BLOCKS, protocol, on_io_error, client)
}

#[test]
fn a_write_error_detaches_and_the_primary_keeps_serving_through_its_peer() {
    for protocol in [ReplicationProtocol::A, ReplicationProtocol::B, ReplicationProtocol::C] {
        let mut pair = pair(protocol, OnIoError::Detach, false);
        pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
        pair.run();
        for block in 0..8 {
            assert_eq!(pair.write(0, block, 1), Ok(None));
        }
        // The disk fills up: the write that hits it fails locally, detaches, and completes
        // through the peer that has it.
        pair.fail_writes[0] = true;
        assert_eq!(pair.write(0, 8, 1), Ok(None), "{protocol:?}");
        assert!(pair.detached(0));
        assert_eq!(pair.nodes[0].disk_state(), DiskState::Diskless);
        assert_eq!(pair.nodes[0].role(), Role::Primary);
        assert_eq!(pair.nodes[0].connection_state(NodeId(1)), Some(ConnectionState::Connected));
        assert_eq!(pair.nodes[1].peer_disk_state(NodeId(0)), Some(DiskState::Diskless));
        for block in 9..16 {
            assert_eq!(pair.write(0, block, 2), Ok(None), "{protocol:?}");
        }
        // Overwrite one block written before the failure: the read must see the new data.
        assert_eq!(pair.write(0, 3, 3), Ok(None));
        pair.idle(200);
        for block in 0..16 {
            let generation = match block {
                3 => 3,
                9.. => 2,
                _ => 1,
            };
            assert_eq!(pair.read(0, block), Ok(Some(block_data(block, generation))), "{block}");
        }
        // The failed disk has none of it; the peer remembers every block written since.
        let at = |b: u64| usize::try_from(b).unwrap() * BLOCK;
        assert!(pair.disks[0][at(9)..at(16)].iter().all(|b| *b == 0));
        let marked = pair.nodes[1].out_of_sync_blocks(NodeId(0));
        assert!(marked >= 9, "blocks 3, 8..16 at least are marked, got {marked}");
        // Flushes complete through the peer.
        assert_eq!(pair.request(0, AppRequest::Flush), Ok(None));
    }
}

/// Protocol A counts a write done once it is sent; a primary without a disk of its own must
/// not, since the sent copy is its only one: a link that fails before the peer has it loses an
/// acknowledged write with no node crashing (simulator seeds 2103 and 5601). Both the write in
/// flight when the disk fails and a write issued once diskless wait for the peer now.
#[test]
fn under_protocol_a_a_detached_primary_acknowledges_only_what_its_peer_holds() {
    let write = |block: u64| AppRequest::Write {
        offset_blocks: block,
        data: block_data(block, 1).into(),
        fua: false,
    };
    for link_survives in [false, true] {
        let mut pair = pair(ReplicationProtocol::A, OnIoError::Detach, false);
        pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
        pair.run();
        // The link holds what node 0 sends: nothing reaches the peer for now.
        pair.held[0] = true;
        pair.fail_writes[0] = true;
        let in_flight = pair.submit(0, write(8));
        assert!(pair.detached(0));
        let diskless = pair.submit(0, write(9));
        assert_eq!(pair.result(in_flight), None, "sent only: not acknowledged yet");
        assert_eq!(pair.result(diskless), None, "sent only: not acknowledged yet");
        if link_survives {
            pair.held[0] = false;
            pair.run();
            assert_eq!(pair.result(in_flight), Some(&Ok(None)));
            assert_eq!(pair.result(diskless), Some(&Ok(None)));
            let at = |b: u64| usize::try_from(b).unwrap() * BLOCK;
            assert_eq!(pair.disks[1][at(8)..at(10)], [block_data(8, 1), block_data(9, 1)].concat());
        } else {
            pair.cut();
            assert!(pair.result(in_flight).is_some_and(Result::is_err), "the write is nowhere");
            assert!(pair.result(diskless).is_some_and(Result::is_err), "the write is nowhere");
        }
    }
}

#[test]
fn a_read_error_is_retried_through_the_peer() {
    let mut pair = pair(ReplicationProtocol::C, OnIoError::Detach, false);
    pair.nodes[0].handle_promote(1_000, false).unwrap();
    pair.run();
    assert_eq!(pair.write(0, 5, 7), Ok(None));
    pair.fail_reads[0] = true;
    assert_eq!(pair.read(0, 5), Ok(Some(block_data(5, 7))));
    assert!(pair.detached(0));
    assert_eq!(pair.nodes[0].disk_state(), DiskState::Diskless);
}

#[test]
fn pass_on_hands_the_error_to_the_caller_and_keeps_the_disk() {
    let mut pair = pair(ReplicationProtocol::C, OnIoError::PassOn, false);
    pair.nodes[0].handle_promote(1_000, false).unwrap();
    pair.run();
    pair.fail_writes[0] = true;
    assert_eq!(pair.write(0, 2, 1), Err(RequestError::Io));
    pair.fail_writes[0] = false;
    pair.fail_reads[0] = true;
    assert_eq!(pair.read(0, 2), Err(RequestError::Io));
    assert!(!pair.detached(0));
    assert_eq!(pair.nodes[0].disk_state(), DiskState::UpToDate);
    pair.fail_reads[0] = false;
    // The block the local disk missed is out of sync for the peer, and the disk still works.
    assert!(pair.nodes[0].out_of_sync_blocks(NodeId(1)) >= 1);
    assert_eq!(pair.write(0, 3, 1), Ok(None));
    assert_eq!(pair.read(0, 3), Ok(Some(block_data(3, 1))));
}

#[test]
fn without_an_up_to_date_peer_a_diskless_primary_fails_io_at_once() {
    let mut pair = pair(ReplicationProtocol::C, OnIoError::Detach, false);
    pair.nodes[0].handle_promote(1_000, false).unwrap();
    pair.run();
    pair.cut();
    pair.fail_writes[0] = true;
    // The write reached no disk at all: it fails, it is never acknowledged.
    assert_eq!(pair.write(0, 1, 1), Err(RequestError::Io));
    assert!(pair.detached(0));
    assert_eq!(pair.write(0, 2, 1), Err(RequestError::NoUpToDateData));
    assert_eq!(pair.read(0, 2), Err(RequestError::NoUpToDateData));
    // The peer comes back, but it missed a write only the failed disk may hold (block 1 is in
    // the bitmap): it is no source for this node.
    pair.connect();
    assert_eq!(pair.write(0, 2, 4), Err(RequestError::NoUpToDateData));
}

#[test]
fn a_peer_that_missed_nothing_serves_a_diskless_primary_after_a_reconnect() {
    let mut pair = pair(ReplicationProtocol::C, OnIoError::Detach, false);
    pair.nodes[0].handle_promote(1_000, false).unwrap();
    pair.run();
    assert_eq!(pair.write(0, 2, 1), Ok(None));
    pair.idle(200); // stable on the peer: nothing left to mark for it
    pair.cut();
    pair.nodes[0].handle_detach(pair.now_ms + 1).unwrap();
    pair.run();
    assert_eq!(pair.read(0, 2), Err(RequestError::NoUpToDateData));
    pair.connect();
    assert_eq!(pair.read(0, 2), Ok(Some(block_data(2, 1))));
    assert_eq!(pair.write(0, 2, 4), Ok(None));
    assert_eq!(pair.read(0, 2), Ok(Some(block_data(2, 4))));
}

#[test]
fn a_lost_peer_with_a_read_outstanding_fails_it_instead_of_hanging() {
    let mut pair = pair(ReplicationProtocol::C, OnIoError::Detach, false);
    pair.nodes[0].handle_promote(1_000, false).unwrap();
    pair.run();
    pair.nodes[0].handle_detach(pair.now_ms + 1).unwrap();
    pair.run();
    // The request goes out but the peer never answers: the connection times out.
    let now = pair.tick();
    pair.nodes[0].handle_request(
        now,
        RequestId(999),
        AppRequest::Read { offset_blocks: 0, blocks: 1 },
    );
    while let Some(output) = pair.nodes[0].poll_output() {
        if let Output::Complete { request, .. } = output {
            assert_ne!(request, RequestId(999), "answered before the peer did");
        }
    }
    pair.nodes[0].handle_timeout(now + 60_000);
    let done: Vec<Output> = std::iter::from_fn(|| pair.nodes[0].poll_output()).collect();
    assert!(
        done.contains(&Output::Complete {
            request: RequestId(999),
            result: Err(RequestError::NoUpToDateData)
        }),
        "{done:?}"
    );
}

#[test]
fn re_attach_resyncs_only_what_was_written_while_detached() {
    let mut pair = pair(ReplicationProtocol::C, OnIoError::Detach, false);
    pair.nodes[0].handle_promote(1_000, false).unwrap();
    pair.run();
    for block in 0..64 {
        assert_eq!(pair.write(0, block, 1), Ok(None));
    }
    pair.idle(200);
    pair.fail_writes[0] = true;
    for block in 100..110 {
        assert_eq!(pair.write(0, block, 2), Ok(None));
    }
    pair.idle(200);
    // A primary is never a sync target: attach as secondary.
    assert!(pair.nodes[0].handle_attach(pair.now_ms + 1).is_err());
    pair.nodes[0].handle_demote(pair.now_ms + 1).unwrap();
    pair.run();
    assert_eq!(pair.nodes[0].role(), Role::Secondary);
    pair.fail_writes[0] = false;
    pair.nodes[0].handle_attach(pair.now_ms + 1).unwrap();
    pair.run();
    assert_eq!(pair.nodes[0].disk_state(), DiskState::Outdated);
    pair.connect();
    assert!(
        pair.events.contains(&(
            0,
            Event::HandshakeDecided {
                peer: NodeId(1),
                decision: drbd_engine::uuid::SyncDecision::BitmapTarget
            }
        )),
        "the peer's generation is newer: a bitmap resync"
    );
    pair.idle(2_000);
    assert_eq!(pair.nodes[0].disk_state(), DiskState::UpToDate);
    assert_eq!(pair.differing_blocks(), Vec::<u64>::new(), "replicas identical after the resync");
    let resynced = pair.resynced_blocks(1);
    // What was written while detached, and the activity log's hot extent of the failure
    // (writes in flight when the disk failed may have landed on one side only): at most one
    // extent, which on this 1024-block device is the whole device.
    assert!(
        (10..=drbd_engine::constants::AL_EXTENT_BLOCKS).contains(&resynced),
        "a bitmap resync of the written blocks and the hot extent: {resynced}"
    );
    // And it can take over as primary with every acknowledged write.
    pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
    pair.run();
    assert_eq!(pair.read(0, 105), Ok(Some(block_data(105, 2))));
}

#[test]
fn a_disk_none_client_is_primary_and_does_all_io_through_its_peer() {
    let mut pair = pair(ReplicationProtocol::C, OnIoError::Detach, true);
    assert_eq!(pair.nodes[0].disk_state(), DiskState::Diskless);
    assert_eq!(pair.nodes[1].disk_state(), DiskState::UpToDate);
    pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
    pair.run();
    assert_eq!(pair.nodes[0].role(), Role::Primary);
    for block in 0..32 {
        assert_eq!(pair.write(0, block, 9), Ok(None));
    }
    assert_eq!(pair.request(0, AppRequest::Flush), Ok(None));
    for block in 0..32 {
        assert_eq!(pair.read(0, block), Ok(Some(block_data(block, 9))));
    }
    let at = |b: u64| usize::try_from(b).unwrap() * BLOCK;
    assert_eq!(&pair.disks[1][at(7)..at(8)], block_data(7, 9).as_slice());
    assert!(pair.disks[0].iter().all(|b| *b == 0), "the client's disk is never touched");
    // Attaching makes no sense without a disk.
    assert!(pair.nodes[0].handle_attach(pair.now_ms + 1).is_err());
    pair.nodes[0].handle_demote(pair.now_ms + 1).unwrap();
    pair.run();
    assert_eq!(pair.nodes[0].role(), Role::Secondary);
}

//! Focused behaviour of the pure state machine through its public inputs and outputs (the
//! simulator covers the interleavings; these pin single rules).

use drbd_engine::NodeId;
use drbd_engine::protocol::node::{AppRequest, Config, DiskOp, Output, RequestError, RequestId};
use drbd_engine::protocol::{
    DiskState, Fencing, MetaUpdate, Metadata, ReplicationProtocol, ResyncRate, Role,
};

fn config() -> Config {
    Config {
        peers: vec![NodeId(1)],
        protocol: ReplicationProtocol::C,
        fencing: Fencing::ResourceOnly,
        resync_rate: ResyncRate::Fixed { rate_kib_per_s: 1024 },
        al_extents: 4,
        random_seed: 7,
    }
}

fn drain(node: &mut drbd_engine::protocol::Node) -> Vec<Output> {
    std::iter::from_fn(|| node.poll_output()).collect()
}

#[test]
fn fresh_metadata_is_inconsistent_and_refuses_promotion_without_force() {
    let mut node = drbd_engine::protocol::Node::new(config(), Metadata::create(NodeId(0), 1024), 0);
    assert_eq!(node.disk_state(), DiskState::Inconsistent);
    assert!(node.handle_promote(1, false).is_err());
    assert_eq!(node.role(), Role::Secondary);
    // --force on a fresh disk starts a new generation (the initial full sync's source).
    node.handle_promote(2, true).unwrap();
    assert_eq!(node.role(), Role::Primary);
    assert_eq!(node.disk_state(), DiskState::UpToDate);
    let outputs = drain(&mut node);
    assert!(outputs.iter().any(|o| matches!(o, Output::Persist(MetaUpdate::Uuids(_)))));
}

#[test]
fn secondary_refuses_io_and_bad_requests_get_errors_not_panics() {
    let mut node = drbd_engine::protocol::Node::new(config(), Metadata::create(NodeId(0), 1024), 0);
    node.handle_request(
        1,
        RequestId(1),
        AppRequest::Write { offset_blocks: 0, data: vec![0; 4096], fua: false },
    );
    let done = drain(&mut node);
    assert!(done.contains(&Output::Complete {
        request: RequestId(1),
        result: Err(RequestError::NotPrimary)
    }));
    node.handle_promote(2, true).unwrap();
    drain(&mut node);
    let cases = [
        AppRequest::Write { offset_blocks: 0, data: vec![0; 100], fua: false },
        AppRequest::Write { offset_blocks: 1024, data: vec![0; 4096], fua: false },
        AppRequest::Read { offset_blocks: u64::MAX, blocks: 2 },
        AppRequest::Read { offset_blocks: 0, blocks: 0 },
        AppRequest::Discard { offset_blocks: 1020, blocks: 8 },
    ];
    for (n, case) in cases.into_iter().enumerate() {
        let id = RequestId(10 + n as u64);
        node.handle_request(3, id, case);
        let out = drain(&mut node);
        assert!(
            out.iter().any(
                |o| matches!(o, Output::Complete { request, result: Err(_) } if *request == id)
            ),
            "case {n} was accepted: {out:?}"
        );
    }
}

#[test]
fn a_disconnected_primary_fences_then_writes_and_marks_the_bitmap() {
    let mut node = drbd_engine::protocol::Node::new(config(), Metadata::create(NodeId(0), 1024), 0);
    node.handle_promote(1, true).unwrap();
    drain(&mut node);
    node.handle_request(
        2,
        RequestId(1),
        AppRequest::Write { offset_blocks: 8, data: vec![1; 8192], fua: false },
    );
    let out = drain(&mut node);
    // The peer may still be UpToDate: nothing is written before the fence handler answers.
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Event(drbd_engine::protocol::Event::FencePeer { .. })))
    );
    assert!(!out.iter().any(|o| matches!(o, Output::DiskIo { .. })));
    node.handle_fence_result(3, NodeId(1), true);
    let out = drain(&mut node);
    let al = out
        .iter()
        .position(|o| matches!(o, Output::Persist(MetaUpdate::ActivityLog { .. })))
        .expect("AL");
    let bits = out
        .iter()
        .position(|o| {
            matches!(o, Output::Persist(MetaUpdate::BitmapSet { first_block: 8, blocks: 2, .. }))
        })
        .expect("bitmap bits");
    let write = out
        .iter()
        .position(|o| matches!(o, Output::DiskIo { op: DiskOp::Write { .. }, .. }))
        .expect("the local write");
    assert!(al < write && bits < write, "metadata is persisted before the data write: {out:?}");
    assert_eq!(node.out_of_sync_blocks(NodeId(1)), 2);
}

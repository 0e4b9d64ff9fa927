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
        digests: Default::default(),
        quorum: Default::default(),
        after_sb: Default::default(),
        on_io_error: Default::default(),
        congestion: Default::default(),
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
        AppRequest::Write { offset_blocks: 0, data: vec![0; 4096].into(), fua: false },
    );
    let done = drain(&mut node);
    assert!(done.contains(&Output::Complete {
        request: RequestId(1),
        result: Err(RequestError::NotPrimary)
    }));
    node.handle_promote(2, true).unwrap();
    drain(&mut node);
    let cases = [
        AppRequest::Write { offset_blocks: 0, data: vec![0; 100].into(), fua: false },
        AppRequest::Write { offset_blocks: 1024, data: vec![0; 4096].into(), fua: false },
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
        AppRequest::Write { offset_blocks: 8, data: vec![1; 8192].into(), fua: false },
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

type RequestResult = Result<Option<Vec<u8>>, RequestError>;

/// The other node of the pair, by index.
fn other(i: usize) -> NodeId {
    NodeId(u8::from(i == 0))
}

/// Two nodes wired back to back: frames go straight across, disk I/O completes at once
/// (reads return zeroes), persisted metadata is applied inside the nodes already.
struct Pair {
    nodes: [drbd_engine::protocol::Node; 2],
    now_ms: u64,
    /// deliver[i]: frames to node i arrive (false: lost, as in a one-way partition).
    deliver: [bool; 2],
    completions: Vec<(usize, RequestId, RequestResult)>,
    events: Vec<(usize, drbd_engine::protocol::Event)>,
    /// fail_next_io[i]: node i's next disk I/O fails.
    fail_next_io: [bool; 2],
}

impl Pair {
    fn new(fencing: Fencing) -> Self {
        let node = |id: u8, peer: u8| {
            let config = Config { peers: vec![NodeId(peer)], fencing, ..config() };
            drbd_engine::protocol::Node::new(config, Metadata::create(NodeId(id), 1024), 0)
        };
        Self {
            nodes: [node(0, 1), node(1, 0)],
            now_ms: 0,
            deliver: [true; 2],
            completions: Vec::new(),
            events: Vec::new(),
            fail_next_io: [false; 2],
        }
    }

    /// Runs until neither node has output left.
    fn run(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..2 {
                while let Some(output) = self.nodes[i].poll_output() {
                    progress = true;
                    let now = self.now_ms;
                    match output {
                        Output::Transmit { frame, .. } if self.deliver[1 - i] => {
                            self.nodes[1 - i].handle_receive(now, other(1 - i), &frame.to_vec())
                        }
                        Output::DiskIo { id, .. } if self.fail_next_io[i] => {
                            self.fail_next_io[i] = false;
                            let failed = Err(drbd_engine::protocol::node::IoFailed);
                            self.nodes[i].handle_disk_completion(now, id, failed);
                        }
                        Output::DiskIo { id, op } => {
                            let result = match op {
                                DiskOp::Read { blocks, .. } => {
                                    Ok(Some(vec![0; usize::try_from(blocks).unwrap() * 4096]))
                                }
                                _ => Ok(None),
                            };
                            self.nodes[i].handle_disk_completion(now, id, result);
                        }
                        Output::Complete { request, result } => {
                            self.completions.push((i, request, result))
                        }
                        Output::Event(event) => self.events.push((i, event)),
                        _ => {}
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn connect(&mut self, conn_id: u64) {
        self.deliver = [true; 2];
        self.connect_with(conn_id);
    }

    /// A new transport whose frames arrive as `deliver` says.
    fn connect_with(&mut self, conn_id: u64) {
        self.now_ms += 1;
        for i in 0..2 {
            self.nodes[i].handle_connected(self.now_ms, other(i), conn_id);
        }
        self.run();
    }

    /// Both ends notice the link is gone (a partition both sides timed out on).
    fn cut(&mut self, conn_id: u64) {
        self.deliver = [false; 2];
        self.now_ms += 1;
        for i in 0..2 {
            self.nodes[i].handle_transport_closed(self.now_ms, other(i), conn_id);
        }
        self.run();
    }

    /// Node 0 primary over two identical UpToDate replicas, connected (connection 1).
    fn connected_primary(fencing: Fencing) -> Self {
        let mut pair = Self::new(fencing);
        pair.connect(1);
        pair.nodes[0].handle_new_current_uuid_clear_bitmap(2).unwrap();
        pair.run();
        pair.nodes[0].handle_promote(3, false).unwrap();
        pair.run();
        pair
    }

    /// [`Pair::connected_primary`] with write 1 (block 0) sent but never acknowledged (the
    /// peer's frames are lost), then the link cut: the fence is pending.
    fn primary_with_a_write_cut_off(fencing: Fencing) -> Self {
        let mut pair = Self::connected_primary(fencing);
        pair.deliver = [true, false];
        pair.request(
            0,
            1,
            AppRequest::Write { offset_blocks: 0, data: vec![7; 4096].into(), fua: false },
        );
        pair.cut(1);
        pair
    }

    /// Node 0 primary over two identical UpToDate replicas, then the link cut.
    fn primary_cut_off(fencing: Fencing) -> Self {
        let mut pair = Self::connected_primary(fencing);
        assert_eq!(pair.nodes[1].disk_state(), DiskState::UpToDate);
        pair.cut(1);
        pair
    }

    fn request(&mut self, i: usize, id: u64, req: AppRequest) {
        self.now_ms += 1;
        self.nodes[i].handle_request(self.now_ms, RequestId(id), req);
        self.run();
    }

    fn result(&self, id: u64) -> Option<&RequestResult> {
        self.completions.iter().find(|(_, r, _)| *r == RequestId(id)).map(|(_, _, result)| result)
    }
}

#[test]
fn a_primary_that_lost_its_peer_holds_reads_and_writes_until_the_fence_handler_answers() {
    for fencing in [Fencing::ResourceOnly, Fencing::ResourceAndStonith] {
        let mut pair = Pair::primary_cut_off(fencing);
        assert!(pair.nodes[0].fence_pending(NodeId(1)), "{fencing:?}: fence-peer requested");
        pair.request(
            0,
            1,
            AppRequest::Write { offset_blocks: 0, data: vec![7; 4096].into(), fua: false },
        );
        pair.request(0, 2, AppRequest::Read { offset_blocks: 0, blocks: 1 });
        // The read's data may be stale if the peer is promoted meanwhile: it waits too.
        assert!(pair.result(1).is_none() && pair.result(2).is_none(), "{fencing:?}");
        pair.nodes[0].handle_fence_outcome(
            10,
            NodeId(1),
            drbd_engine::protocol::FenceOutcome::PeerOutdated,
        );
        pair.run();
        assert_eq!(pair.result(1), Some(&Ok(None)), "{fencing:?}");
        assert!(matches!(pair.result(2), Some(Ok(Some(_)))), "{fencing:?}");
    }
}

#[test]
fn fence_exit_code_6_outdates_the_old_primary_and_fails_what_it_froze() {
    let mut pair = Pair::primary_cut_off(Fencing::ResourceOnly);
    pair.request(
        0,
        1,
        AppRequest::Write { offset_blocks: 0, data: vec![7; 4096].into(), fua: false },
    );
    pair.request(0, 2, AppRequest::Read { offset_blocks: 0, blocks: 1 });
    // The cluster manager promotes the cut-off secondary before the handler reaches it.
    pair.nodes[1].handle_promote(20, false).unwrap();
    pair.run();
    pair.nodes[0].handle_fence_outcome(
        21,
        NodeId(1),
        drbd_engine::protocol::FenceOutcome::PeerIsPrimary,
    );
    pair.run();
    // Never acknowledged: the new primary does not have the write.
    assert_eq!(pair.result(1), Some(&Err(RequestError::NoUpToDateData)));
    assert_eq!(pair.result(2), Some(&Err(RequestError::NoUpToDateData)));
    assert_eq!(pair.nodes[0].disk_state(), DiskState::Outdated);
    assert!(!pair.nodes[0].fence_pending(NodeId(1)));
    pair.request(
        0,
        3,
        AppRequest::Write { offset_blocks: 0, data: vec![8; 4096].into(), fua: false },
    );
    assert_eq!(pair.result(3), Some(&Err(RequestError::NoUpToDateData)));
    // The cluster manager can demote it now: nothing is left in flight.
    pair.nodes[0].handle_demote(22).unwrap();
    pair.run();
    assert_eq!(pair.nodes[0].role(), Role::Secondary);
}

#[test]
fn a_peer_promoted_apart_is_refused_on_reconnect_and_does_not_settle_the_fence() {
    let mut pair = Pair::primary_cut_off(Fencing::ResourceOnly);
    pair.request(
        0,
        1,
        AppRequest::Write { offset_blocks: 0, data: vec![7; 4096].into(), fua: false },
    );
    pair.nodes[1].handle_promote(20, false).unwrap();
    pair.run();
    // The link comes back before the handler answered: nobody wrote, the generations match,
    // but two primaries must not connect (DRBD: SS_TWO_PRIMARIES), and the old primary must
    // not take the handshake as the end of its fence.
    pair.connect(2);
    assert!(pair.events.iter().any(|(i, e)| *i == 0
        && matches!(e, drbd_engine::protocol::Event::SyncRefused { reason, .. }
            if reason.contains("both nodes are primary"))));
    assert!(pair.nodes[0].fence_pending(NodeId(1)));
    assert!(pair.result(1).is_none(), "the frozen write stays frozen");
}

#[test]
fn fence_exit_code_5_resumes_only_a_node_with_up_to_date_data() {
    let mut pair = Pair::primary_cut_off(Fencing::ResourceAndStonith);
    pair.request(
        0,
        1,
        AppRequest::Write { offset_blocks: 0, data: vec![7; 4096].into(), fua: false },
    );
    pair.nodes[0].handle_fence_outcome(10, NodeId(1), drbd_engine::protocol::FenceOutcome::Failed);
    pair.run();
    assert!(pair.result(1).is_none(), "a broken handler leaves I/O frozen");
    pair.nodes[0].handle_fence_outcome(
        11,
        NodeId(1),
        drbd_engine::protocol::FenceOutcome::PeerUnreachable,
    );
    pair.run();
    assert_eq!(pair.result(1), Some(&Ok(None)), "peer unreachable, assumed dead");
}

#[test]
fn a_one_sided_handshake_as_sync_source_does_not_end_the_fence() {
    // A write the peer never acknowledged is cut off with the link: the fence is pending.
    // The link comes back one way only: the primary hears the peer's whole handshake and
    // decides to be its sync source, but the peer never hears ours and stays UpToDate.
    let mut pair = Pair::primary_with_a_write_cut_off(Fencing::ResourceOnly);
    assert!(pair.nodes[0].fence_pending(NodeId(1)));
    assert!(pair.result(1).is_none());
    pair.deliver = [true, false];
    pair.connect_with(2);
    assert!(pair.events.iter().any(|(i, e)| *i == 0
        && matches!(e, drbd_engine::protocol::Event::HandshakeDecided { decision, .. }
            if *decision == drbd_engine::uuid::SyncDecision::BitmapSource)));
    assert_eq!(pair.nodes[1].disk_state(), DiskState::UpToDate, "the peer never became target");
    assert!(pair.result(1).is_none(), "not acknowledged before the peer confirmed");
    pair.cut(2);
    assert!(pair.nodes[0].fence_pending(NodeId(1)), "losing the peer again fences it again");
    assert!(pair.result(1).is_none());
}

#[test]
fn promotion_waits_for_a_connection_handshake_in_progress() {
    let mut pair = Pair::primary_cut_off(Fencing::ResourceOnly);
    // The transport is back but no handshake frame has arrived yet: the peer's role is
    // unknown and our Hello already announced Secondary.
    pair.deliver = [false, false];
    pair.connect_with(2);
    assert_eq!(
        pair.nodes[1].handle_promote(30, false),
        Err(drbd_engine::protocol::StateError::Precondition("connection handshake in progress"))
    );
    pair.cut(2);
    pair.nodes[1].handle_promote(31, false).unwrap();
}

#[test]
fn held_reads_complete_before_the_writes_released_with_them() {
    // A write the peer never acknowledged is cut off (the fence freezes it), then a read is
    // held too. When the handler answers, the read's data predates the write's
    // acknowledgement, so it must complete first.
    let mut pair = Pair::primary_with_a_write_cut_off(Fencing::ResourceOnly);
    pair.request(0, 2, AppRequest::Read { offset_blocks: 0, blocks: 1 });
    assert!(pair.result(1).is_none() && pair.result(2).is_none());
    pair.nodes[0].handle_fence_outcome(
        10,
        NodeId(1),
        drbd_engine::protocol::FenceOutcome::PeerOutdated,
    );
    pair.run();
    let position = |id| pair.completions.iter().position(|(_, r, _)| *r == RequestId(id));
    assert!(position(2).expect("read done") < position(1).expect("write done"));
}

/// Both nodes write apart after node 0 (primary) lost node 1; then they reconnect under the
/// after-sb-0pri policy `policy` (node 1 configured with the mirror words). Returns the
/// events after the reconnect.
fn split_brain_then_reconnect(
    policy: drbd_engine::protocol::AfterSb0Pri,
    node0_blocks: u64,
    node1_blocks: u64,
) -> Pair {
    use drbd_engine::protocol::AfterSbPolicies;
    let mut pair = Pair::new(Fencing::DontCare);
    let policies = AfterSbPolicies { zero_primaries: policy, ..AfterSbPolicies::default() };
    for (i, p) in [(0, policies), (1, policies.seen_from_peer())] {
        let config =
            Config { peers: vec![other(i)], fencing: Fencing::DontCare, after_sb: p, ..config() };
        let meta = Metadata::create(NodeId(u8::try_from(i).unwrap()), 1024);
        pair.nodes[i] = drbd_engine::protocol::Node::new(config, meta, 0);
    }
    pair.connect(1);
    pair.nodes[0].handle_new_current_uuid_clear_bitmap(2).unwrap();
    pair.run();
    pair.nodes[0].handle_promote(3, false).unwrap();
    pair.run();
    pair.cut(1);
    let mut id = 100;
    for (i, blocks) in [(0, node0_blocks), (1, node1_blocks)] {
        if blocks == 0 {
            continue;
        }
        if pair.nodes[i].role() != Role::Primary {
            pair.nodes[i].handle_promote(pair.now_ms, false).unwrap();
        }
        for b in 0..blocks {
            id += 1;
            // Node 1 writes further up, overlapping node 0's last block.
            let offset_blocks = b + i as u64 * (node0_blocks - 1);
            let data = vec![u8::try_from(i + 1).unwrap(); 4096];
            pair.request(i, id, AppRequest::Write { offset_blocks, data: data.into(), fua: false });
        }
        pair.nodes[i].handle_demote(pair.now_ms).unwrap();
        pair.run();
    }
    for i in 0..2 {
        pair.nodes[i].handle_demote(pair.now_ms).ok();
    }
    pair.events.clear();
    pair.connect(2);
    // Resync is paced by time: let it run.
    for _ in 0..200 {
        pair.now_ms += 50;
        for i in 0..2 {
            pair.nodes[i].handle_timeout(pair.now_ms);
        }
        pair.run();
    }
    pair
}

#[test]
fn after_sb_policies_pick_mirrored_victims_and_resync_the_union_of_both_bitmaps() {
    use drbd_engine::protocol::{AfterSb0Pri, Event};
    // (policy, blocks node 0 writes, blocks node 1 writes, victim or None for StandAlone)
    let rows = [
        (AfterSb0Pri::Disconnect, 5, 3, None),
        (AfterSb0Pri::DiscardLeastChanges, 5, 3, Some(1)),
        (AfterSb0Pri::DiscardLeastChanges, 2, 6, Some(0)),
        (AfterSb0Pri::DiscardYoungerPrimary, 2, 6, Some(1)),
        (AfterSb0Pri::DiscardOlderPrimary, 5, 3, Some(0)),
        (AfterSb0Pri::DiscardZeroChanges, 5, 3, None),
        (AfterSb0Pri::DiscardLocal, 5, 3, Some(0)),
        (AfterSb0Pri::DiscardRemote, 5, 3, Some(1)),
    ];
    for (policy, n0, n1, victim) in rows {
        let pair = split_brain_then_reconnect(policy, n0, n1);
        let resolved: Vec<(usize, bool)> = pair
            .events
            .iter()
            .filter_map(|(i, e)| match e {
                Event::SplitBrainResolved { discarded_local, .. } => Some((*i, *discarded_local)),
                _ => None,
            })
            .collect();
        let finished: Vec<u64> = pair
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::ResyncFinished { blocks, .. } if *blocks > 0 => Some(*blocks),
                _ => None,
            })
            .collect();
        match victim {
            None => {
                assert!(resolved.is_empty(), "{policy}: {resolved:?}");
                for i in 0..2 {
                    assert_eq!(
                        pair.nodes[i].connection_state(other(i)),
                        Some(drbd_engine::protocol::ConnectionState::StandAlone),
                        "{policy}"
                    );
                }
            }
            Some(v) => {
                let mut sorted = resolved.clone();
                sorted.sort();
                assert_eq!(sorted, vec![(0, v == 0), (1, v == 1)], "{policy}: mirrored verdicts");
                // One block overlaps: the union is n0 + n1 - 1.
                assert_eq!(finished, vec![n0 + n1 - 1], "{policy}: union of both bitmaps");
                for i in 0..2 {
                    assert_eq!(pair.nodes[i].disk_state(), DiskState::UpToDate, "{policy}");
                }
            }
        }
    }
}

#[test]
fn a_node_without_quorum_is_not_promoted_and_says_why() {
    use drbd_engine::protocol::StateError;
    use drbd_engine::protocol::quorum::{QuorumConfig, QuorumPolicy};
    // Two diskful nodes and a diskless tiebreaker (node 2); nobody connected yet.
    let quorum = QuorumConfig {
        quorum: QuorumPolicy::Majority,
        diskless_peers: vec![NodeId(2)],
        ..QuorumConfig::default()
    };
    let with_quorum = Config { peers: vec![NodeId(1), NodeId(2)], quorum, ..config() };
    let mut node =
        drbd_engine::protocol::Node::new(with_quorum, Metadata::create(NodeId(0), 1024), 0);
    assert!(!node.has_quorum());
    assert_eq!(
        node.handle_promote(1, true),
        Err(StateError::NoQuorum("1 of 2 nodes visible, need 2 for quorum".into()))
    );
    assert_eq!(node.role(), Role::Secondary);
    // The same node with quorum off is promoted (forced, on fresh data).
    let mut node = drbd_engine::protocol::Node::new(
        Config { peers: vec![NodeId(1), NodeId(2)], ..config() },
        Metadata::create(NodeId(0), 1024),
        0,
    );
    assert!(node.has_quorum());
    assert_eq!(node.handle_promote(1, true), Ok(drbd_engine::protocol::node::Promotion::Done));
}

/// `connect --discard-my-data` given to a node that is then promoted and acknowledges writes
/// must not discard them at the next handshake: promotion drops the pending discard, as
/// DRBD's drbd_set_role does (simulator seed 102572 lost acknowledged writes this way).
#[test]
fn promotion_drops_a_pending_discard_my_data() {
    use drbd_engine::protocol::{AfterSb0Pri, ConnectionState, Event};
    use drbd_engine::uuid::SyncDecision;
    // Both wrote apart; under `disconnect` both ends are left StandAlone.
    let mut pair = split_brain_then_reconnect(AfterSb0Pri::Disconnect, 5, 3);
    assert_eq!(pair.nodes[1].connection_state(NodeId(0)), Some(ConnectionState::StandAlone));
    // The operator starts the manual recovery with node 1 as the victim, then changes its
    // mind before the link is back: node 1 becomes primary and acknowledges a write.
    pair.nodes[1].handle_connect(pair.now_ms, NodeId(0), true).unwrap();
    pair.nodes[1].handle_promote(pair.now_ms, false).unwrap();
    pair.run();
    let write = AppRequest::Write { offset_blocks: 40, data: vec![9; 4096].into(), fua: false };
    pair.request(1, 500, write);
    assert_eq!(pair.result(500), Some(&Ok(None)));
    pair.nodes[1].handle_demote(pair.now_ms).unwrap();
    pair.run();
    pair.nodes[0].handle_connect(pair.now_ms, NodeId(1), false).unwrap();
    pair.events.clear();
    pair.connect(3);
    let mut decisions: Vec<(usize, SyncDecision)> = pair
        .events
        .iter()
        .filter_map(|(i, e)| match e {
            Event::HandshakeDecided { decision, .. } => Some((*i, *decision)),
            _ => None,
        })
        .collect();
    decisions.sort_by_key(|(i, _)| *i);
    // Still a split brain left to the operator: node 1's acknowledged write is not discarded.
    assert_eq!(decisions, vec![(0, SyncDecision::SplitBrain), (1, SyncDecision::SplitBrain)]);
}

/// A write done on the primary's disk but not yet acknowledged by the peer (the link is
/// silently gone) must not be acknowledged when the primary's disk then fails: detaching
/// discards the local copy (full resync on attach), so the write may be nowhere.
#[test]
fn a_write_only_on_a_disk_that_then_fails_is_not_acknowledged() {
    for fencing in [Fencing::DontCare, Fencing::ResourceOnly] {
        let mut pair = Pair::connected_primary(fencing);
        // Frames stop arriving; nobody has noticed yet.
        pair.deliver = [false; 2];
        let write = AppRequest::Write { offset_blocks: 5, data: vec![3; 4096].into(), fua: false };
        pair.request(0, 1, write);
        assert!(pair.result(1).is_none(), "{fencing:?}: waits for the peer's ack");
        // The next I/O fails: the disk is detached (on-io-error detach). The write's only
        // local copy is gone with it, so it is not acknowledged on that copy: it now waits for
        // the peer, which may hold it.
        pair.fail_next_io[0] = true;
        pair.request(0, 2, AppRequest::Read { offset_blocks: 0, blocks: 1 });
        assert_eq!(pair.nodes[0].disk_state(), DiskState::Diskless, "{fencing:?}");
        assert!(pair.result(1).is_none(), "{fencing:?}: not acknowledged on the detached disk");
        // The peer never acknowledged it: when the link is found gone, the write fails.
        pair.cut(1);
        assert!(matches!(pair.result(1), Some(Err(_))), "{fencing:?}: {:?}", pair.result(1));
    }
}

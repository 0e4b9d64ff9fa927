//! Online verify and checksum-based resync through the pure state machine's public inputs and
//! outputs: two nodes back to back with in-memory disks (the simulator covers interleavings
//! and faults; these pin the rules).

use drbd_engine::NodeId;
use drbd_engine::protocol::frame::{self, Frame};
use drbd_engine::protocol::node::{AppRequest, Config, DiskOp, Event, Output, RequestId};
use drbd_engine::protocol::{
    DigestAlg, DigestSettings, DiskState, Fencing, Metadata, Node, ReplicationProtocol,
    ReplicationState, ResyncRate,
};

const BLOCK: usize = 4096;
const SIZE_BLOCKS: u64 = 2048;

/// The other node of the pair.
fn peer_of(i: usize) -> NodeId {
    NodeId(u8::from(i == 0))
}

struct Pair {
    nodes: Vec<Node>,
    disks: [Vec<u8>; 2],
    now_ms: u64,
    events: Vec<(usize, Event)>,
    /// Frames sent, by the sender's index (decoded).
    frames: Vec<(usize, Frame)>,
    conn_id: u64,
}

fn config(peer: u8, digests: DigestSettings) -> Config {
    Config {
        peers: vec![NodeId(peer)],
        protocol: ReplicationProtocol::C,
        fencing: Fencing::DontCare,
        resync_rate: ResyncRate::Fixed { rate_kib_per_s: 1_000_000 },
        al_extents: 8,
        random_seed: 3,
        digests,
        quorum: Default::default(),
        after_sb: Default::default(),
        on_io_error: Default::default(),
        congestion: Default::default(),
    }
}

impl Pair {
    /// Node 0 primary over two identical, UpToDate replicas holding a pattern.
    fn new(digests: DigestSettings) -> Self {
        let nodes = (0..2u8)
            .map(|i| Node::new(config(1 - i, digests), Metadata::create(NodeId(i), SIZE_BLOCKS), 0))
            .collect();
        let size = usize::try_from(SIZE_BLOCKS).unwrap() * BLOCK;
        let pattern: Vec<u8> = (0..size).map(|k| u8::try_from(k * 7 % 251).unwrap()).collect();
        let mut pair = Self {
            nodes,
            disks: [pattern.clone(), pattern],
            now_ms: 0,
            events: vec![],
            frames: vec![],
            conn_id: 0,
        };
        pair.connect();
        pair.nodes[0].handle_new_current_uuid_clear_bitmap(pair.now_ms).unwrap();
        pair.nodes[0].handle_promote(pair.now_ms, false).unwrap();
        pair.settle();
        pair
    }

    fn connect(&mut self) {
        self.conn_id += 1;
        for i in 0..2 {
            self.nodes[i].handle_connected(self.now_ms, peer_of(i), self.conn_id);
        }
        self.settle();
    }

    fn disconnect(&mut self) {
        for i in 0..2 {
            self.nodes[i].handle_transport_closed(self.now_ms, peer_of(i), self.conn_id);
        }
        self.settle();
    }

    /// Runs until quiet, advancing time so timers (resync and verify steps) fire.
    fn settle(&mut self) {
        for _ in 0..2000 {
            let mut progress = false;
            for i in 0..2 {
                while let Some(output) = self.nodes[i].poll_output() {
                    progress = true;
                    self.act(i, output);
                }
            }
            if !progress {
                let busy = (0..2).any(|i| {
                    !self.nodes[i].is_quiescent()
                        || self.nodes[i].peer_ids().iter().any(|p| {
                            matches!(
                                self.nodes[i].replication_state(*p),
                                Some(
                                    ReplicationState::SyncSource
                                        | ReplicationState::VerifyS
                                        | ReplicationState::VerifyT
                                )
                            )
                        })
                });
                if !busy {
                    return;
                }
                self.now_ms += 10;
                for node in &mut self.nodes {
                    node.handle_timeout(self.now_ms);
                }
            }
        }
        panic!("did not settle");
    }

    fn act(&mut self, i: usize, output: Output) {
        let now = self.now_ms;
        match output {
            Output::Transmit { frame, .. } => {
                let bytes = frame.to_vec();
                self.frames.push((i, frame::decode(&bytes).expect("valid frame").frame));
                self.nodes[1 - i].handle_receive(now, NodeId(u8::try_from(i).unwrap()), &bytes);
            }
            Output::DiskIo { id, op } => {
                let result = match op {
                    DiskOp::Read { offset_blocks, blocks } => {
                        let at = usize::try_from(offset_blocks).unwrap() * BLOCK;
                        let len = usize::try_from(blocks).unwrap() * BLOCK;
                        Some(self.disks[i][at..at + len].to_vec())
                    }
                    DiskOp::Write { offset_blocks, data, .. } => {
                        let at = usize::try_from(offset_blocks).unwrap() * BLOCK;
                        self.disks[i][at..at + data.len()].copy_from_slice(&data);
                        None
                    }
                    DiskOp::Flush => None,
                };
                self.nodes[i].handle_disk_completion(now, id, Ok(result));
            }
            Output::Event(event) => self.events.push((i, event)),
            _ => {}
        }
    }

    fn flip(&mut self, node: usize, block: u64) {
        self.disks[node][usize::try_from(block).unwrap() * BLOCK + 99] ^= 0x80;
    }

    /// Blocks node `i` reported out of sync (VerifyOutOfSync events), and the finish event.
    fn verify_report(&self, i: usize) -> (Vec<u64>, Option<(u64, bool)>) {
        let mut blocks = vec![];
        let mut finished = None;
        for (node, event) in &self.events {
            match event {
                Event::VerifyOutOfSync { first_block, blocks: n, .. } if *node == i => {
                    blocks.extend(*first_block..first_block + n)
                }
                Event::VerifyFinished { out_of_sync_blocks, completed, .. } if *node == i => {
                    finished = Some((*out_of_sync_blocks, *completed))
                }
                _ => {}
            }
        }
        (blocks, finished)
    }
}

fn digests(csums: Option<DigestAlg>, after_crash_only: bool) -> DigestSettings {
    DigestSettings {
        csums_alg: csums,
        csums_after_crash_only: after_crash_only,
        verify_alg: Some(DigestAlg::Sha256),
    }
}

#[test]
fn verify_reports_marks_and_a_checksum_resync_repairs_exactly_the_differing_blocks() {
    for (verifier, csums) in [(0, Some(DigestAlg::Crc32c)), (1, Some(DigestAlg::Sha256)), (0, None)]
    {
        let mut pair = Pair::new(digests(csums, false));
        let flipped = [3u64, 700, 701, 2047];
        for block in flipped {
            pair.flip(1, block);
        }
        let peer = peer_of(verifier);
        pair.nodes[verifier].handle_verify(pair.now_ms, peer, 0).unwrap();
        assert_eq!(pair.nodes[verifier].replication_state(peer), Some(ReplicationState::VerifyS));
        pair.settle();
        let (reported, finished) = pair.verify_report(verifier);
        assert_eq!(reported, flipped, "verifier {verifier}");
        assert_eq!(finished, Some((4, true)));
        assert_eq!(pair.verify_report(1 - verifier).0, flipped, "VerifyT reports them too");
        // Marked on the primary only (node 0, whichever side verified); nothing resynced yet.
        assert_eq!(pair.nodes[0].out_of_sync_blocks(NodeId(1)), 4);
        assert_eq!(pair.nodes[1].out_of_sync_blocks(NodeId(0)), 0);
        assert_ne!(pair.disks[0], pair.disks[1]);
        // Writes keep flowing meanwhile and afterwards.
        pair.nodes[0].handle_request(
            pair.now_ms,
            RequestId(1),
            AppRequest::Write { offset_blocks: 10, data: vec![5; BLOCK].into(), fua: false },
        );
        pair.settle();

        // disconnect + connect: the primary is the source of just those blocks.
        pair.frames.clear();
        pair.disconnect();
        pair.connect();
        assert_eq!(pair.disks[0], pair.disks[1], "csums {csums:?}: repaired");
        let resync_blocks: u64 = pair
            .frames
            .iter()
            .filter_map(|(_, f)| match f {
                Frame::ResyncData { data, .. } => Some(data.len() as u64 / BLOCK as u64),
                _ => None,
            })
            .sum();
        assert_eq!(resync_blocks, 4, "only the differing blocks travel");
        let digest_requests =
            pair.frames.iter().filter(|(_, f)| matches!(f, Frame::DigestRequest { .. })).count();
        assert_eq!(digest_requests > 0, csums.is_some());
        assert_eq!(pair.nodes[1].disk_state(), DiskState::UpToDate);

        pair.events.clear();
        pair.nodes[verifier].handle_verify(pair.now_ms, peer, 0).unwrap();
        pair.settle();
        assert_eq!(pair.verify_report(verifier), (vec![], Some((0, true))));
    }
}

#[test]
fn csums_resync_sends_only_blocks_whose_digests_differ() {
    let mut pair = Pair::new(digests(Some(DigestAlg::Crc32c), false));
    // The secondary misses writes while apart; half of them rewrite what it already holds.
    pair.disconnect();
    for (n, block) in (100u64..164).enumerate() {
        let at = usize::try_from(block).unwrap() * BLOCK;
        let data = if n % 2 == 0 {
            pair.disks[0][at..at + BLOCK].to_vec()
        } else {
            vec![u8::try_from(n).unwrap(); BLOCK]
        };
        pair.nodes[0].handle_request(
            pair.now_ms,
            RequestId(n as u64),
            AppRequest::Write { offset_blocks: block, data: data.into(), fua: false },
        );
        pair.settle();
    }
    assert_eq!(pair.nodes[0].out_of_sync_blocks(NodeId(1)), 64);
    pair.frames.clear();
    pair.connect();
    assert_eq!(pair.disks[0], pair.disks[1]);
    assert_eq!(pair.nodes[0].out_of_sync_blocks(NodeId(1)), 0);
    let sent: Vec<u64> = pair
        .frames
        .iter()
        .filter_map(|(_, f)| match f {
            Frame::ResyncData { offset_blocks, data, .. } => {
                assert_eq!(data.len(), BLOCK);
                Some(*offset_blocks)
            }
            _ => None,
        })
        .collect();
    assert_eq!(sent, (101..164).step_by(2).collect::<Vec<_>>(), "only the changed blocks");
}

#[test]
fn csums_after_crash_only_leaves_a_resync_after_a_disconnect_plain() {
    let mut pair = Pair::new(digests(Some(DigestAlg::Sha256), true));
    pair.disconnect();
    pair.nodes[0].handle_request(
        pair.now_ms,
        RequestId(1),
        AppRequest::Write { offset_blocks: 5, data: vec![1; BLOCK].into(), fua: false },
    );
    pair.settle();
    pair.frames.clear();
    pair.connect();
    assert!(pair.frames.iter().all(|(_, f)| !matches!(f, Frame::DigestRequest { .. })));
    assert!(pair.frames.iter().any(|(_, f)| matches!(f, Frame::ResyncData { .. })));
    assert_eq!(pair.disks[0], pair.disks[1]);
}

#[test]
fn verify_is_refused_without_verify_alg_or_an_established_connection() {
    let mut pair = Pair::new(DigestSettings::default());
    assert!(pair.nodes[0].handle_verify(pair.now_ms, NodeId(1), 0).is_err(), "no verify-alg");
    let mut pair2 = Pair::new(digests(None, false));
    assert!(pair2.nodes[0].handle_verify(pair2.now_ms, NodeId(1), SIZE_BLOCKS).is_err());
    assert!(pair2.nodes[0].handle_verify(pair2.now_ms, NodeId(7), 0).is_err(), "unknown peer");
    pair2.disconnect();
    assert!(pair2.nodes[0].handle_verify(pair2.now_ms, NodeId(1), 0).is_err(), "not connected");
    pair.disconnect();
}

#[test]
fn a_verify_cut_off_by_a_disconnect_ends_not_completed_on_both_sides() {
    let mut pair = Pair::new(digests(None, false));
    pair.nodes[1].handle_verify(pair.now_ms, NodeId(0), 1000).unwrap();
    // Deliver only the start, then cut the link.
    for _ in 0..4 {
        for i in 0..2 {
            if let Some(output) = pair.nodes[i].poll_output() {
                pair.act(i, output);
            }
        }
    }
    pair.disconnect();
    for i in 0..2 {
        let finished = pair.verify_report(i).1;
        assert!(matches!(finished, Some((_, false))), "node {i}: {finished:?}");
        assert_eq!(pair.nodes[i].replication_state(peer_of(i)), Some(ReplicationState::Off));
    }
}

#[test]
fn a_resize_is_refused_while_a_verify_runs_on_either_side() {
    for verifier in [0, 1] {
        let mut pair = Pair::new(digests(None, false));
        pair.nodes[verifier].handle_verify(pair.now_ms, peer_of(verifier), 0).unwrap();
        // Let the verify start on both ends, not finish.
        for _ in 0..4 {
            for i in 0..2 {
                if let Some(output) = pair.nodes[i].poll_output() {
                    pair.act(i, output);
                }
            }
        }
        assert_eq!(
            pair.nodes[0].replication_state(NodeId(1)),
            Some(if verifier == 0 { ReplicationState::VerifyS } else { ReplicationState::VerifyT })
        );
        let refused = pair.nodes[0].handle_resize(pair.now_ms, 2 * SIZE_BLOCKS);
        assert!(
            format!("{refused:?}").contains("verify"),
            "verifier {verifier}: the primary resized during a verify: {refused:?}"
        );
        pair.settle();
        assert_eq!(pair.verify_report(verifier).1, Some((0, true)), "verifier {verifier}");
        assert!(!pair.nodes[0].resize_pending(), "nothing negotiated");
    }
}

/// Within one generation, bits on one side only are no split brain: an operator's `connect
/// --discard-my-data` there is ignored, as DRBD applies it only to a split brain. Honoured,
/// an order left from an earlier split brain and carried out after a verify's disconnect made
/// the verify source, whose marks are the only bits, the sync target of the node whose blocks
/// were flipped: the flipped blocks overwrote the good ones (two-node simulator seed 8752).
#[test]
fn a_stale_discard_order_does_not_copy_blocks_a_verify_found_different_over_the_good_ones() {
    let mut pair = Pair::new(digests(None, false));
    pair.nodes[0].handle_demote(pair.now_ms).unwrap();
    pair.settle();
    let good = pair.disks[1].clone();
    pair.flip(0, 5);
    pair.nodes[1].handle_verify(pair.now_ms, NodeId(0), 0).unwrap();
    pair.settle();
    assert_eq!(pair.verify_report(1), (vec![5], Some((1, true))));
    assert_eq!(pair.nodes[1].out_of_sync_blocks(NodeId(0)), 1, "the verify source marks");
    assert_eq!(pair.nodes[0].out_of_sync_blocks(NodeId(1)), 0);
    pair.nodes[1].handle_disconnect(pair.now_ms, NodeId(0)).unwrap();
    pair.disconnect();
    pair.nodes[1].handle_connect(pair.now_ms, NodeId(0), true).unwrap();
    pair.connect();
    assert_eq!(pair.disks[1], good, "the verify source keeps its data");
    assert_eq!(pair.disks[0], good, "the flipped block is repaired");
}

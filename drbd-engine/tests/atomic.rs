//! WRITE ATOMIC through the pure state machine: one request stays one frame and one journaled
//! disk write on every replica (`protocol::node::atomic`); the driver's journal is tested in
//! backing-store (`atomic_journal`, crash tests in child processes).

use drbd_engine::NodeId;
use drbd_engine::constants::REQUEST_BLOCKS_MAX;
use drbd_engine::protocol::node::{
    AppRequest, Config, DiskOp, Output, RequestError, RequestId, WriteOrigin,
};
use drbd_engine::protocol::{Fencing, Metadata, ReplicationProtocol, ResyncRate};

const DEVICE_BLOCKS: u64 = 4096;

fn node(id: u8, peer: u8) -> drbd_engine::protocol::Node {
    let config = Config {
        peers: vec![NodeId(peer)],
        protocol: ReplicationProtocol::C,
        fencing: Fencing::DontCare,
        resync_rate: ResyncRate::Fixed { rate_kib_per_s: 1024 },
        al_extents: 16,
        random_seed: 7,
        digests: Default::default(),
        quorum: Default::default(),
        after_sb: Default::default(),
        on_io_error: Default::default(),
        congestion: Default::default(),
    };
    drbd_engine::protocol::Node::new(config, Metadata::create(NodeId(id), DEVICE_BLOCKS), 0)
}

/// (node, offset, blocks, origin, atomic) of a data write the node submitted.
type Written = (usize, u64, u64, WriteOrigin, bool);
type RequestResult = Result<Option<Vec<u8>>, RequestError>;

struct Pair {
    nodes: [drbd_engine::protocol::Node; 2],
    now_ms: u64,
    connected: bool,
    writes: Vec<Written>,
    completions: Vec<(RequestId, RequestResult)>,
}

impl Pair {
    /// Node 0 primary over two UpToDate replicas, connected.
    fn new() -> Self {
        let mut pair = Self {
            nodes: [node(0, 1), node(1, 0)],
            now_ms: 1,
            connected: true,
            writes: Vec::new(),
            completions: Vec::new(),
        };
        for i in 0..2 {
            pair.nodes[i].handle_connected(1, NodeId(u8::from(i == 0)), 1);
        }
        pair.run();
        pair.nodes[0].handle_new_current_uuid_clear_bitmap(2).unwrap();
        pair.run();
        pair.nodes[0].handle_promote(3, false).unwrap();
        pair.run();
        pair
    }

    fn run(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..2 {
                while let Some(output) = self.nodes[i].poll_output() {
                    progress = true;
                    let now = self.now_ms;
                    match output {
                        Output::Transmit { frame, .. } if self.connected => self.nodes[1 - i]
                            .handle_receive(now, NodeId(u8::from(i == 1)), &frame.to_vec()),
                        Output::DiskIo { id, op } => {
                            let result = match op {
                                DiskOp::Read { blocks, .. } => {
                                    Ok(Some(vec![0; usize::try_from(blocks).unwrap() * 4096]))
                                }
                                DiskOp::Write { offset_blocks, data, origin, atomic, .. } => {
                                    let blocks = data.len() as u64 / 4096;
                                    self.writes.push((i, offset_blocks, blocks, origin, atomic));
                                    Ok(None)
                                }
                                DiskOp::Flush => Ok(None),
                            };
                            self.nodes[i].handle_disk_completion(now, id, result);
                        }
                        Output::Complete { request, result } => {
                            self.completions.push((request, result))
                        }
                        _ => {}
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn request(&mut self, id: u64, req: AppRequest) -> RequestResult {
        self.now_ms += 1;
        self.nodes[0].handle_request(self.now_ms, RequestId(id), req);
        self.run();
        let (_, result) = self
            .completions
            .iter()
            .find(|(r, _)| *r == RequestId(id))
            .unwrap_or_else(|| panic!("request {id} did not complete"));
        result.clone()
    }
}

fn atomic_write(offset_blocks: u64, blocks: u64) -> AppRequest {
    let data = vec![0xa6; usize::try_from(blocks * 4096).unwrap()].into();
    AppRequest::WriteAtomic { offset_blocks, data, fua: false }
}

#[test]
fn an_atomic_write_is_one_journaled_write_on_every_replica_and_a_plain_one_is_not() {
    // (offset, blocks, atomic): 1 to 256 blocks at the start and the end, as libiscsi's
    // WriteAtomic16.Simple writes them, and plain writes in between.
    let rows = [
        (0, 1, true),
        (0, REQUEST_BLOCKS_MAX, true),
        (DEVICE_BLOCKS - REQUEST_BLOCKS_MAX, REQUEST_BLOCKS_MAX, true),
        (DEVICE_BLOCKS - 3, 3, true),
        (1000, 8, false),
    ];
    let mut pair = Pair::new();
    for (n, (offset_blocks, blocks, atomic)) in rows.into_iter().enumerate() {
        pair.writes.clear();
        let id = 10 + n as u64;
        let request = if atomic {
            atomic_write(offset_blocks, blocks)
        } else {
            let data = vec![1; usize::try_from(blocks * 4096).unwrap()].into();
            AppRequest::Write { offset_blocks, data, fua: false }
        };
        assert_eq!(pair.request(id, request), Ok(None), "row {n}");
        // Never split: one local write and one peer write, both through the journal.
        assert_eq!(
            pair.writes,
            vec![
                (0, offset_blocks, blocks, WriteOrigin::Application, atomic),
                (1, offset_blocks, blocks, WriteOrigin::Peer, atomic),
            ],
            "row {n}"
        );
    }
}

#[test]
fn an_atomic_write_longer_than_one_request_or_outside_the_device_is_refused() {
    let mut pair = Pair::new();
    let rows = [(0, REQUEST_BLOCKS_MAX + 1), (DEVICE_BLOCKS - 1, 2), (u64::MAX, 1)];
    for (n, (offset_blocks, blocks)) in rows.into_iter().enumerate() {
        let result = pair.request(100 + n as u64, atomic_write(offset_blocks, blocks));
        assert!(matches!(result, Err(RequestError::InvalidRange { .. })), "row {n}: {result:?}");
    }
    let misaligned =
        AppRequest::WriteAtomic { offset_blocks: 0, data: vec![0; 100].into(), fua: false };
    assert_eq!(pair.request(200, misaligned), Err(RequestError::Misaligned(100)));
    assert!(pair.writes.is_empty(), "nothing reached a disk: {:?}", pair.writes);
}

#[test]
fn a_primary_without_its_peer_still_journals_its_own_copy() {
    let mut pair = Pair::new();
    pair.connected = false;
    pair.now_ms += 1;
    pair.nodes[0].handle_transport_closed(pair.now_ms, NodeId(1), 1);
    pair.run();
    pair.writes.clear();
    assert_eq!(pair.request(300, atomic_write(64, 16)), Ok(None));
    assert_eq!(pair.writes, vec![(0, 64, 16, WriteOrigin::Application, true)]);
}

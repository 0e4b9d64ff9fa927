//! A detached primary under quorum (issue 5: "Local disk failure (on-io-error detach): the
//! primary goes Diskless and keeps serving reads and writes through an UpToDate peer"), through
//! the state machine's public inputs and outputs: two diskful nodes and a diskless tiebreaker,
//! quorum majority. The primary's disk fails; every node is still connected, so the cluster
//! still has quorum (the peer's UpToDate vote and the tiebreaker's), and the primary must go on
//! serving through its peer instead of suspending or failing its I/O.

mod common;

use common::{RequestResult, at, block_data, disk_op};
use drbd_engine::NodeId;
use drbd_engine::protocol::node::{
    AppRequest, Config, DiskOp, Event, Node, OnIoError, Output, RequestId,
};
use drbd_engine::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{
    ConnectionState, DiskState, Fencing, IoFailed, Metadata, ReplicationProtocol, ResyncRate, Role,
};

const SIZE_BLOCKS: u64 = 1024;
const NODES: usize = 3;
/// Node 2 is the diskless tiebreaker.
const TIEBREAKER: usize = 2;

fn id(i: usize) -> NodeId {
    NodeId(u8::try_from(i).unwrap())
}

/// Three nodes wired back to back, frames delivered at once and in order.
struct Cluster {
    nodes: Vec<Node>,
    disks: Vec<Vec<u8>>,
    fail_disk: Vec<bool>,
    now_ms: u64,
    conn_id: u64,
    /// The current connection of each pair (a < b).
    conns: std::collections::BTreeMap<(usize, usize), u64>,
    completions: Vec<(usize, RequestId, RequestResult)>,
    events: Vec<(usize, Event)>,
    next_request: u64,
}

impl Cluster {
    fn new(on_no_quorum: OnNoQuorum) -> Self {
        let node = |i: usize| {
            let quorum = QuorumConfig {
                quorum: QuorumPolicy::Majority,
                on_no_quorum,
                minimum_redundancy: QuorumPolicy::Off,
                diskless: i == TIEBREAKER,
                diskless_peers: if i == TIEBREAKER { vec![] } else { vec![id(TIEBREAKER)] },
            };
            let config = Config {
                peers: (0..NODES).filter(|j| *j != i).map(id).collect(),
                protocol: ReplicationProtocol::C,
                fencing: Fencing::DontCare,
                resync_rate: ResyncRate::Fixed { rate_kib_per_s: 100_000 },
                al_extents: 8,
                random_seed: 7 + i as u64,
                on_io_error: OnIoError::Detach,
                quorum,
                ..Config::default()
            };
            Node::new(config, Metadata::create(id(i), SIZE_BLOCKS), 0)
        };
        let bytes = at(SIZE_BLOCKS);
        let mut cluster = Self {
            nodes: (0..NODES).map(node).collect(),
            disks: vec![vec![0; bytes]; NODES],
            fail_disk: vec![false; NODES],
            now_ms: 0,
            conn_id: 0,
            conns: std::collections::BTreeMap::new(),
            completions: Vec::new(),
            events: Vec::new(),
            next_request: 1,
        };
        for a in 0..NODES {
            for b in a + 1..NODES {
                cluster.connect(a, b);
            }
        }
        cluster.idle(100);
        // Identical all-zero replicas: no initial sync.
        let now = cluster.tick();
        cluster.nodes[0].handle_new_current_uuid_clear_bitmap(now).unwrap();
        cluster.run();
        let now = cluster.tick();
        cluster.nodes[0].handle_promote(now, false).unwrap();
        cluster.run();
        cluster.idle(200);
        cluster
    }

    fn tick(&mut self) -> u64 {
        self.now_ms += 1;
        self.now_ms
    }

    fn run(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..NODES {
                while let Some(output) = self.nodes[i].poll_output() {
                    progress = true;
                    let now = self.now_ms;
                    match output {
                        Output::Transmit { peer, frame } => {
                            self.nodes[peer.index()].handle_receive(now, id(i), &frame.to_vec());
                        }
                        Output::Disconnect { peer, conn_id } => {
                            self.nodes[peer.index()].handle_transport_closed(now, id(i), conn_id);
                        }
                        Output::DiskIo { id: io, op } => {
                            let result = self.disk_io(i, op);
                            self.nodes[i].handle_disk_completion(now, io, result);
                        }
                        Output::Complete { request, result } => {
                            self.completions.push((i, request, result));
                        }
                        Output::Event(event) => self.events.push((i, event)),
                        Output::Persist(_) => {}
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn disk_io(&mut self, i: usize, op: DiskOp) -> Result<Option<Vec<u8>>, IoFailed> {
        assert_ne!(i, TIEBREAKER, "the tiebreaker has no disk");
        if self.fail_disk[i] {
            return Err(IoFailed);
        }
        disk_op(&mut self.disks[i], op)
    }

    fn connect(&mut self, a: usize, b: usize) {
        self.conn_id += 1;
        self.conns.insert((a.min(b), a.max(b)), self.conn_id);
        let now = self.tick();
        self.nodes[a].handle_connected(now, id(b), self.conn_id);
        self.nodes[b].handle_connected(now, id(a), self.conn_id);
        self.run();
    }

    /// Lets timers run (pings, barriers, quorum reports) for `ms`.
    fn idle(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.now_ms += 10;
            for i in 0..NODES {
                self.nodes[i].handle_timeout(self.now_ms);
            }
            self.run();
        }
    }

    fn request(&mut self, i: usize, req: AppRequest) -> RequestResult {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let now = self.tick();
        self.nodes[i].handle_request(now, request, req);
        self.run();
        // A request held (suspended) waits for timers; give it a second before calling it lost.
        for _ in 0..100 {
            if let Some(pos) = self.completions.iter().position(|(_, r, _)| *r == request) {
                return self.completions.remove(pos).2;
            }
            self.idle(10);
        }
        panic!("request {request:?} on node {i} did not complete (held?): {:?}", self.describe());
    }

    fn write(&mut self, i: usize, block: u64, generation: u8) -> RequestResult {
        let data = block_data(block, generation).into();
        self.request(i, AppRequest::Write { offset_blocks: block, data, fua: false })
    }

    fn read(&mut self, i: usize, block: u64) -> RequestResult {
        self.request(i, AppRequest::Read { offset_blocks: block, blocks: 1 })
    }

    fn describe(&self) -> String {
        (0..NODES)
            .map(|i| {
                let n = &self.nodes[i];
                format!(
                    "node {i}: {:?} {:?} quorum={} {}",
                    n.role(),
                    n.disk_state(),
                    n.has_quorum(),
                    n.debug_summary()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[test]
fn a_detached_primary_with_quorum_serves_reads_and_writes_through_its_peer() {
    for on_no_quorum in [OnNoQuorum::SuspendIo, OnNoQuorum::IoError] {
        let mut c = Cluster::new(on_no_quorum);
        assert_eq!(c.nodes[0].role(), Role::Primary, "{}", c.describe());
        assert!(c.nodes[0].has_quorum(), "{}", c.describe());
        for block in 0..8 {
            assert_eq!(c.write(0, block, 1), Ok(None), "{on_no_quorum:?}");
        }
        c.idle(100);
        // The primary's disk fails under a write: on-io-error detach.
        c.fail_disk[0] = true;
        assert_eq!(c.write(0, 8, 1), Ok(None), "{on_no_quorum:?}: {}", c.describe());
        assert!(c.events.iter().any(|(n, e)| *n == 0 && *e == Event::Detached));
        assert_eq!(c.nodes[0].disk_state(), DiskState::Diskless);
        assert_eq!(c.nodes[0].role(), Role::Primary);
        // Everyone is still connected: the cluster has quorum, and so has the primary.
        for peer in [1, TIEBREAKER] {
            assert_eq!(
                c.nodes[0].connection_state(id(peer)),
                Some(ConnectionState::Connected),
                "{on_no_quorum:?}: {}",
                c.describe()
            );
        }
        c.idle(500);
        assert!(c.nodes[0].has_quorum(), "{on_no_quorum:?}: {}", c.describe());
        // Writes and reads complete through the UpToDate peer.
        for block in 9..16 {
            assert_eq!(c.write(0, block, 2), Ok(None), "{on_no_quorum:?}: {}", c.describe());
        }
        assert_eq!(c.write(0, 3, 3), Ok(None), "{on_no_quorum:?}");
        c.idle(200);
        for block in 0..16 {
            let generation = match block {
                3 => 3,
                9.. => 2,
                _ => 1,
            };
            assert_eq!(
                c.read(0, block),
                Ok(Some(block_data(block, generation))),
                "{on_no_quorum:?}: block {block}: {}",
                c.describe()
            );
        }
        assert_eq!(c.request(0, AppRequest::Flush), Ok(None), "{on_no_quorum:?}");
        // The peer holds every write; the failed disk none of those after the failure.
        for block in 9..16 {
            assert_eq!(c.disks[1][at(block)..at(block + 1)], block_data(block, 2)[..]);
            assert!(c.disks[0][at(block)..at(block + 1)].iter().all(|b| *b == 0));
        }
        assert!(c.nodes[0].has_quorum(), "{on_no_quorum:?}: {}", c.describe());
    }
}

#[test]
fn a_detached_primary_that_loses_its_peer_stops_serving() {
    // The other side of the same rule: without the UpToDate peer (its disk is the only copy)
    // the detached primary serves nothing, whatever the tiebreaker says.
    let mut c = Cluster::new(OnNoQuorum::IoError);
    assert_eq!(c.write(0, 1, 1), Ok(None));
    c.fail_disk[0] = true;
    assert_eq!(c.write(0, 2, 1), Ok(None), "{}", c.describe());
    assert_eq!(c.nodes[0].disk_state(), DiskState::Diskless);
    // The peer goes away (its connections close).
    let now = c.tick();
    for other in [0, TIEBREAKER] {
        let conn = c.conns[&(other.min(1), other.max(1))];
        c.nodes[other].handle_transport_closed(now, id(1), conn);
        c.nodes[1].handle_transport_closed(now, id(other), conn);
    }
    c.run();
    c.idle(200);
    let write = c.write(0, 3, 1);
    assert!(write.is_err(), "a write with no copy anywhere was acknowledged: {}", c.describe());
    let read = c.read(0, 1);
    assert!(read.is_err(), "a read with no copy to read from succeeded: {}", c.describe());
}

//! A quorum primary cut off in two steps, and the heal (issue 5): two diskful nodes A (0), B (1)
//! and a diskless tiebreaker T (2), `quorum majority`. A loses B first while a write waits for
//! B (A keeps quorum through T: the tiebreaker rule), then loses T (no quorum: nothing more is
//! acknowledged). B, which kept quorum with T, is promoted after the grace period and writes.
//! When the links come back, in either order, A must step down and resync from B: no split
//! brain, identical replicas, nothing B acknowledged lost.
//!
//! Three state machines wired by a harness whose links can be held (frames queue, as on a link
//! that went silent) and cut.

use drbd_engine::NodeId;
use drbd_engine::protocol::node::{AppRequest, Config, DiskOp, Event, Node, Output, RequestId};
use drbd_engine::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{
    ConnectionState, DiskState, Fencing, IoFailed, Metadata, ReplicationProtocol, ResyncRate, Role,
    StateError,
};
use drbd_engine::uuid::SyncDecision;
use std::collections::VecDeque;

const BLOCK: usize = 4096;
const SIZE_BLOCKS: u64 = 256;
const NODES: usize = 3;
const TIEBREAKER: usize = 2;
/// Longer than the grace a peer gives a primary it lost (`PRIMARY_LOST_GRACE_MS`).
const GRACE_MS: u64 = drbd_engine::constants::PING_TIMEOUT_MS + 100;

/// Frames in flight on one direction of a link, each with the connection it was sent on.
type Queue = VecDeque<(u64, Vec<u8>)>;
type RequestResult = Result<Option<Vec<u8>>, drbd_engine::protocol::node::RequestError>;

fn at(block: u64) -> usize {
    usize::try_from(block).unwrap() * BLOCK
}

fn block_data(block: u64, generation: u8) -> Vec<u8> {
    let mut data = vec![generation; BLOCK];
    data[..8].copy_from_slice(&block.to_le_bytes());
    data
}

/// Index of the link between `a` and `b` (0-1, 0-2, 1-2).
fn link(a: usize, b: usize) -> usize {
    assert_ne!(a, b);
    a + b - 1
}

fn nid(i: usize) -> NodeId {
    NodeId(u8::try_from(i).unwrap())
}

struct Mesh {
    nodes: Vec<Node>,
    disks: Vec<Vec<u8>>,
    now_ms: u64,
    next_conn_id: u64,
    /// The current connection of each link (0: none).
    conn_id: [u64; 3],
    /// Cables: an unplugged link carries nothing and is not re-established.
    plugged: [bool; 3],
    /// Frames on a held link queue instead of being delivered (a link gone silent).
    held: [bool; 3],
    /// Frames in flight from `from` to `to`, with the connection they were sent on.
    queues: Vec<Vec<Queue>>,
    completions: Vec<(usize, RequestId, RequestResult)>,
    events: Vec<(usize, Event)>,
    next_request: u64,
}

impl Mesh {
    fn new(on_no_quorum: OnNoQuorum) -> Self {
        let node = |i: usize| {
            let quorum = QuorumConfig {
                quorum: QuorumPolicy::Majority,
                on_no_quorum,
                diskless: i == TIEBREAKER,
                diskless_peers: if i == TIEBREAKER { vec![] } else { vec![nid(TIEBREAKER)] },
                ..QuorumConfig::default()
            };
            let config = Config {
                peers: (0..NODES).filter(|j| *j != i).map(nid).collect(),
                protocol: ReplicationProtocol::C,
                fencing: Fencing::DontCare,
                resync_rate: ResyncRate::Fixed { rate_kib_per_s: 100_000 },
                al_extents: 8,
                random_seed: 17 + i as u64,
                quorum,
                ..Config::default()
            };
            Node::new(config, Metadata::create(nid(i), SIZE_BLOCKS), 0)
        };
        let mut mesh = Self {
            nodes: (0..NODES).map(node).collect(),
            disks: (0..NODES)
                .map(|i| vec![0; if i == TIEBREAKER { 0 } else { at(SIZE_BLOCKS) }])
                .collect(),
            now_ms: 0,
            next_conn_id: 1,
            conn_id: [0; 3],
            plugged: [true; 3],
            held: [false; 3],
            queues: (0..NODES).map(|_| (0..NODES).map(|_| VecDeque::new()).collect()).collect(),
            completions: Vec::new(),
            events: Vec::new(),
            next_request: 1,
        };
        mesh.reconnect();
        // Identical all-zero replicas: no initial sync.
        let now = mesh.tick();
        mesh.nodes[0].handle_new_current_uuid_clear_bitmap(now).unwrap();
        mesh.run();
        mesh.idle(100);
        for i in 0..2 {
            assert_eq!(mesh.nodes[i].disk_state(), DiskState::UpToDate, "node {i}");
            assert!(mesh.nodes[i].has_quorum(), "node {i}");
        }
        mesh
    }

    fn tick(&mut self) -> u64 {
        self.now_ms += 1;
        self.now_ms
    }

    /// Delivers every output until all nodes are quiet (held links keep their frames).
    fn run(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..NODES {
                while let Some(output) = self.nodes[i].poll_output() {
                    progress = true;
                    self.act(i, output);
                }
            }
            for from in 0..NODES {
                for to in 0..NODES {
                    if from == to || self.held[link(from, to)] {
                        continue;
                    }
                    while let Some((conn_id, frame)) = self.queues[from][to].pop_front() {
                        progress = true;
                        if conn_id == self.conn_id[link(from, to)] {
                            self.nodes[to].handle_receive(self.now_ms, nid(from), &frame);
                        }
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn act(&mut self, i: usize, output: Output) {
        let now = self.now_ms;
        match output {
            Output::Transmit { peer, frame } => {
                let to = usize::from(peer.0);
                let l = link(i, to);
                if self.conn_id[l] != 0 {
                    self.queues[i][to].push_back((self.conn_id[l], frame.to_vec()));
                }
            }
            Output::Disconnect { peer, conn_id } => {
                let to = usize::from(peer.0);
                let l = link(i, to);
                if self.conn_id[l] == conn_id {
                    // The transport closes: the other end sees EOF.
                    self.conn_id[l] = 0;
                    self.queues[i][to].clear();
                    self.queues[to][i].clear();
                    self.nodes[to].handle_transport_closed_by_peer(now, nid(i), conn_id);
                }
            }
            Output::DiskIo { id, op } => {
                assert_ne!(i, TIEBREAKER, "the tiebreaker has no disk: {op:?}");
                let result = self.disk_io(i, op);
                self.nodes[i].handle_disk_completion(now, id, result);
            }
            Output::Complete { request, result } => self.completions.push((i, request, result)),
            Output::Event(event) => self.events.push((i, event)),
            Output::Persist(_) => {}
        }
    }

    fn disk_io(&mut self, i: usize, op: DiskOp) -> Result<Option<Vec<u8>>, IoFailed> {
        match op {
            DiskOp::Read { offset_blocks, blocks } => {
                Ok(Some(self.disks[i][at(offset_blocks)..at(offset_blocks + blocks)].to_vec()))
            }
            DiskOp::Write { offset_blocks, data, .. } => {
                self.disks[i][at(offset_blocks)..at(offset_blocks) + data.len()]
                    .copy_from_slice(&data);
                Ok(None)
            }
            DiskOp::Flush => Ok(None),
        }
    }

    /// Establishes every plugged link whose ends both want a connection and are not connected
    /// to each other, as the drivers' reconnect loops do.
    fn reconnect(&mut self) {
        for _ in 0..10 {
            let mut changed = false;
            for a in 0..NODES {
                for b in a + 1..NODES {
                    let l = link(a, b);
                    let up = self.conn_id[l] != 0;
                    let want = self.nodes[a].wants_connection(nid(b))
                        && self.nodes[b].wants_connection(nid(a));
                    if !self.plugged[l] || up || !want {
                        continue;
                    }
                    changed = true;
                    let conn_id = self.next_conn_id;
                    self.next_conn_id += 1;
                    self.conn_id[l] = conn_id;
                    let now = self.tick();
                    self.nodes[a].handle_connected(now, nid(b), conn_id);
                    self.nodes[b].handle_connected(now, nid(a), conn_id);
                    self.run();
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// Both ends of link a-b notice its loss (a first), as after a ping timeout.
    fn cut(&mut self, a: usize, b: usize) {
        let l = link(a, b);
        self.plugged[l] = false;
        self.held[l] = false;
        let conn_id = std::mem::replace(&mut self.conn_id[l], 0);
        self.queues[a][b].clear();
        self.queues[b][a].clear();
        let now = self.tick();
        self.nodes[a].handle_transport_closed(now, nid(b), conn_id);
        self.run();
        let now = self.tick();
        self.nodes[b].handle_transport_closed(now, nid(a), conn_id);
        self.run();
    }

    fn plug(&mut self, a: usize, b: usize) {
        self.plugged[link(a, b)] = true;
        self.reconnect();
    }

    /// Lets timers run (pings, grace periods, resync steps) for `ms`, reconnecting as drivers do.
    fn idle(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.now_ms += 10;
            for i in 0..NODES {
                self.nodes[i].handle_timeout(self.now_ms);
            }
            self.run();
            self.reconnect();
        }
    }

    fn promote(&mut self, i: usize) -> Result<(), StateError> {
        let now = self.tick();
        let result = self.nodes[i].handle_promote(now, false);
        self.run();
        result
    }

    fn submit_write(&mut self, i: usize, block: u64, generation: u8) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let data = block_data(block, generation).into();
        let now = self.tick();
        self.nodes[i].handle_request(
            now,
            id,
            AppRequest::Write { offset_blocks: block, data, fua: false },
        );
        self.run();
        id
    }

    fn result(&self, id: RequestId) -> Option<&RequestResult> {
        self.completions.iter().find(|(_, r, _)| *r == id).map(|(_, _, result)| result)
    }

    fn write(&mut self, i: usize, block: u64, generation: u8) -> RequestResult {
        let id = self.submit_write(i, block, generation);
        self.result(id).cloned().unwrap_or_else(|| panic!("write {block} on {i} not completed"))
    }

    fn differing_blocks(&self) -> Vec<u64> {
        let chunks = self.disks[0].chunks(BLOCK).zip(self.disks[1].chunks(BLOCK));
        chunks.enumerate().filter(|(_, (a, b))| a != b).map(|(n, _)| n as u64).collect()
    }

    fn events_of(&self, i: usize) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(move |(n, _)| *n == i).map(|(_, e)| e)
    }
}

#[derive(Debug, Clone, Copy)]
enum HealOrder {
    PeerFirst,
    TiebreakerFirst,
}

/// Plugs A's two links back in `order`, 200 ms apart.
fn heal(mesh: &mut Mesh, order: HealOrder, a: usize, b: usize, t: usize) {
    let (first, second) = match order {
        HealOrder::PeerFirst => (b, t),
        HealOrder::TiebreakerFirst => (t, b),
    };
    mesh.plug(a, first);
    mesh.idle(200);
    mesh.plug(a, second);
}

/// The scenario of issue 5, up to the heal; returns the mesh and A's requests after the cut.
fn partition_then_promote(on_no_quorum: OnNoQuorum) -> (Mesh, Vec<RequestId>) {
    let (a, b, t) = (0, 1, TIEBREAKER);
    let mut mesh = Mesh::new(on_no_quorum);
    mesh.promote(a).unwrap();
    mesh.idle(50);
    for block in 0..8 {
        assert_eq!(mesh.write(a, block, 1), Ok(None), "A writes with quorum");
    }
    // A's link to B goes silent with a write in flight for B; A notices first.
    mesh.held[link(a, b)] = true;
    let in_flight = mesh.submit_write(a, 3, 2);
    assert!(mesh.result(in_flight).is_none(), "waits for B");
    mesh.cut(a, b);
    assert!(mesh.nodes[a].has_quorum(), "A keeps quorum through the tiebreaker, for now");
    assert!(mesh.nodes[b].has_quorum(), "B keeps quorum through the tiebreaker");
    let during = mesh.submit_write(a, 4, 2);
    // Then A's link to T: A is alone, without quorum.
    mesh.cut(a, t);
    assert!(!mesh.nodes[a].has_quorum());
    let after = mesh.submit_write(a, 5, 2);
    let held = vec![in_flight, during, after];
    for id in &held {
        assert!(!matches!(mesh.result(*id), Some(Ok(_))), "A acknowledged {id:?} without quorum");
    }
    // B is refused while T still reports A (grace), then promoted.
    let promote = mesh.promote(b);
    assert!(matches!(promote, Err(StateError::PeerIsPrimary(_))), "{promote:?}");
    mesh.idle(GRACE_MS);
    mesh.promote(b).unwrap();
    mesh.idle(50);
    for block in [3, 9] {
        assert_eq!(mesh.write(b, block, 3), Ok(None), "B writes with quorum");
    }
    (mesh, held)
}

#[test]
fn a_primary_cut_off_in_two_steps_steps_down_and_resyncs_on_heal() {
    let (a, b, t) = (0, 1, TIEBREAKER);
    for on_no_quorum in [OnNoQuorum::SuspendIo, OnNoQuorum::IoError] {
        for order in [HealOrder::PeerFirst, HealOrder::TiebreakerFirst] {
            let case = format!("{on_no_quorum} {order:?}");
            let (mut mesh, held) = partition_then_promote(on_no_quorum);
            heal(&mut mesh, order, a, b, t);
            mesh.idle(1_000);
            let split: Vec<_> = mesh
                .events
                .iter()
                .filter(|(_, e)| {
                    matches!(
                        e,
                        Event::SplitBrain { .. }
                            | Event::HandshakeDecided { decision: SyncDecision::SplitBrain, .. }
                    )
                })
                .collect();
            assert!(split.is_empty(), "{case}: {split:?}");
            assert_eq!(mesh.nodes[a].role(), Role::Secondary, "{case}");
            assert_eq!(mesh.nodes[b].role(), Role::Primary, "{case}");
            for i in 0..2 {
                assert_eq!(mesh.nodes[i].disk_state(), DiskState::UpToDate, "{case}: node {i}");
            }
            for (x, y) in [(a, b), (a, t), (b, t)] {
                assert_eq!(
                    mesh.nodes[x].connection_state(nid(y)),
                    Some(ConnectionState::Connected),
                    "{case}: {x}-{y}"
                );
            }
            assert!(mesh.nodes[a].has_quorum(), "{case}");
            assert!(
                !mesh.events_of(b).any(|e| *e == Event::QuorumChanged(false)),
                "{case}: B never lost quorum"
            );
            assert_eq!(mesh.differing_blocks(), Vec::<u64>::new(), "{case}: replicas identical");
            for block in 0..10 {
                let expected = match block {
                    3 | 9 => block_data(block, 3),
                    0..=7 => block_data(block, 1),
                    _ => vec![0; BLOCK],
                };
                assert_eq!(
                    &mesh.disks[b][at(block)..at(block + 1)],
                    &expected[..],
                    "{case}: {block}"
                );
            }
            // What A held without quorum failed when it stepped down; nothing was acknowledged.
            for id in held {
                assert!(matches!(mesh.result(id), Some(Err(_))), "{case}: {:?}", mesh.result(id));
            }
            // B keeps writing, replicated to A.
            assert_eq!(mesh.write(b, 20, 4), Ok(None), "{case}");
            assert_eq!(mesh.differing_blocks(), Vec::<u64>::new(), "{case}");
        }
    }
}

/// The other side of the deferral: when the peer A lost is isolated (the tiebreaker lost it
/// too), A's fence is settled through T and A acknowledges writes, so the deferred generation
/// must start before the first acknowledgement; B, found older on reconnect, is A's sync
/// target and receives the write that was in flight when the link went silent.
#[test]
fn an_isolated_peer_is_fenced_and_resynced_from_the_primary_that_kept_quorum() {
    let (a, b, t) = (0, 1, TIEBREAKER);
    for on_no_quorum in [OnNoQuorum::SuspendIo, OnNoQuorum::IoError] {
        let mut mesh = Mesh::new(on_no_quorum);
        mesh.promote(a).unwrap();
        mesh.idle(50);
        let generation_before = mesh.nodes[a].uuids().current;
        mesh.held[link(a, b)] = true;
        let in_flight = mesh.submit_write(a, 3, 2);
        mesh.cut(a, b);
        assert!(mesh.result(in_flight).is_none(), "{on_no_quorum}: B is not fenced yet");
        mesh.cut(b, t);
        mesh.idle(50);
        assert_eq!(mesh.result(in_flight), Some(&Ok(None)), "{on_no_quorum}: fenced through T");
        assert_ne!(
            mesh.nodes[a].uuids().current,
            generation_before,
            "{on_no_quorum}: a new generation before the acknowledgement"
        );
        assert_eq!(mesh.write(a, 4, 2), Ok(None), "{on_no_quorum}");
        assert!(!mesh.nodes[b].has_quorum(), "{on_no_quorum}");
        mesh.events.clear();
        mesh.plug(a, b);
        mesh.plug(b, t);
        mesh.idle(1_000);
        let decided: Vec<_> = mesh
            .events
            .iter()
            .filter_map(|(i, e)| match e {
                Event::HandshakeDecided { peer, decision } if *i == a && *peer == nid(b) => {
                    Some(*decision)
                }
                _ => None,
            })
            .collect();
        assert_eq!(decided, vec![SyncDecision::BitmapSource], "{on_no_quorum}");
        assert_eq!(mesh.nodes[a].role(), Role::Primary, "{on_no_quorum}");
        assert_eq!(mesh.nodes[b].disk_state(), DiskState::UpToDate, "{on_no_quorum}");
        assert_eq!(mesh.differing_blocks(), Vec::<u64>::new(), "{on_no_quorum}");
        assert_eq!(&mesh.disks[b][at(3)..at(4)], &block_data(3, 2)[..], "{on_no_quorum}");
    }
}

/// The deferral without a promotion: A lost B with a write in flight, then T, and nobody was
/// promoted. A's marks (no new generation) make it B's bitmap sync source when they meet
/// again: A keeps its role, what it held under suspend-io completes once B is fenced again by
/// the resync, and B ends with every block A acknowledged.
#[test]
fn an_unpromoted_peer_is_resynced_from_the_primary_that_deferred_its_generation() {
    let (a, b, t) = (0, 1, TIEBREAKER);
    for on_no_quorum in [OnNoQuorum::SuspendIo, OnNoQuorum::IoError] {
        for order in [HealOrder::PeerFirst, HealOrder::TiebreakerFirst] {
            let case = format!("{on_no_quorum} {order:?}");
            let mut mesh = Mesh::new(on_no_quorum);
            mesh.promote(a).unwrap();
            mesh.idle(50);
            mesh.held[link(a, b)] = true;
            let in_flight = mesh.submit_write(a, 3, 2);
            mesh.cut(a, b);
            mesh.cut(a, t);
            assert!(!mesh.nodes[a].has_quorum(), "{case}");
            mesh.idle(GRACE_MS);
            mesh.events.clear();
            heal(&mut mesh, order, a, b, t);
            mesh.idle(1_000);
            let decided: Vec<_> = mesh
                .events
                .iter()
                .filter_map(|(i, e)| match e {
                    Event::HandshakeDecided { peer, decision } if *i == a && *peer == nid(b) => {
                        Some(*decision)
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(decided, vec![SyncDecision::BitmapSource], "{case}");
            assert_eq!(mesh.nodes[a].role(), Role::Primary, "{case}");
            assert!(mesh.nodes[a].has_quorum(), "{case}");
            assert_eq!(mesh.nodes[b].disk_state(), DiskState::UpToDate, "{case}");
            assert_eq!(mesh.differing_blocks(), Vec::<u64>::new(), "{case}");
            match on_no_quorum {
                OnNoQuorum::SuspendIo => {
                    assert_eq!(mesh.result(in_flight), Some(&Ok(None)), "{case}");
                    assert_eq!(&mesh.disks[b][at(3)..at(4)], &block_data(3, 2)[..], "{case}");
                }
                OnNoQuorum::IoError => {
                    assert!(matches!(mesh.result(in_flight), Some(Err(_))), "{case}");
                }
            }
            assert_eq!(mesh.write(a, 20, 4), Ok(None), "{case}");
            assert_eq!(mesh.differing_blocks(), Vec::<u64>::new(), "{case}");
        }
    }
}

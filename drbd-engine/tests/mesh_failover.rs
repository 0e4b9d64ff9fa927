//! Three diskful nodes A (0), B (1), C (2) in a full mesh with `quorum majority`: the primary
//! dies with writes its secondaries hold in doubt, a survivor takes over, the dead node comes
//! back. The causes engine_mesh (the real-process test) found, each at the protocol level:
//! - the survivors end their connection to each other to resync what the dead primary left
//!   in doubt between them; each then lost quorum and outdated itself. Two such nodes,
//!   both reported in sync by the primary and of one generation, are made UpToDate by the
//!   resync of both bitmaps (else neither could ever be promoted again), unless someone
//!   asked for them to be outdated (a primary may then write on without them);
//! - a node that becomes the sync target of a newer generation takes that generation only
//!   with the first block: when the source's end defers the resync at once, the target's
//!   data is unchanged and still of its old generation, and the primary of the newer one
//!   gives it a bitmap resync instead of a full sync.
//!
//! Three state machines wired by a harness whose links can be held (frames queue) and cut,
//! and whose nodes can crash (their metadata survives) and restart.

use drbd_engine::NodeId;
use drbd_engine::protocol::node::{AppRequest, Config, DiskOp, Event, Node, Output, RequestId};
use drbd_engine::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{
    DiskState, Fencing, IoFailed, Metadata, ReplicationProtocol, ReplicationState, ResyncRate, Role,
};
use drbd_engine::uuid::SyncDecision;
use std::collections::VecDeque;

const BLOCK: usize = 4096;
const SIZE_BLOCKS: u64 = 1024;
const NODES: usize = 3;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// A resync rate that moves the in-doubt writes within a step.
const FAST_KIB_PER_S: u64 = 100_000;
/// Longer than the grace a peer gives a primary it lost (`PRIMARY_LOST_GRACE_MS`).
const GRACE_MS: u64 = drbd_engine::constants::PING_TIMEOUT_MS + 100;

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

fn config(i: usize, rate_kib_per_s: u64) -> Config {
    Config {
        peers: (0..NODES).filter(|j| *j != i).map(nid).collect(),
        protocol: ReplicationProtocol::C,
        fencing: Fencing::DontCare,
        resync_rate: ResyncRate::Fixed { rate_kib_per_s },
        al_extents: 8,
        random_seed: 31 + i as u64,
        quorum: QuorumConfig {
            quorum: QuorumPolicy::Majority,
            on_no_quorum: OnNoQuorum::SuspendIo,
            ..QuorumConfig::default()
        },
        ..Config::default()
    }
}

struct Mesh {
    nodes: Vec<Node>,
    rate_kib_per_s: u64,
    alive: [bool; NODES],
    disks: Vec<Vec<u8>>,
    now_ms: u64,
    next_conn_id: u64,
    conn_id: [u64; 3],
    plugged: [bool; 3],
    held: [bool; 3],
    /// Connections each link ever had (a redial shows as a second one).
    connections: [u32; 3],
    queues: Vec<Vec<Queue>>,
    completions: Vec<(usize, RequestId, RequestResult)>,
    events: Vec<(usize, Event)>,
    next_request: u64,
}

impl Mesh {
    /// Three connected all-zero replicas of one generation, UpToDate, with quorum, resyncing
    /// at `rate_kib_per_s`.
    fn new(rate_kib_per_s: u64) -> Self {
        let mut mesh = Self {
            nodes: (0..NODES)
                .map(|i| {
                    let meta = Metadata::create(nid(i), SIZE_BLOCKS);
                    Node::new(config(i, rate_kib_per_s), meta, 0)
                })
                .collect(),
            rate_kib_per_s,
            alive: [true; NODES],
            disks: (0..NODES).map(|_| vec![0; at(SIZE_BLOCKS)]).collect(),
            now_ms: 0,
            next_conn_id: 1,
            conn_id: [0; 3],
            plugged: [true; 3],
            held: [false; 3],
            connections: [0; 3],
            queues: (0..NODES).map(|_| (0..NODES).map(|_| VecDeque::new()).collect()).collect(),
            completions: Vec::new(),
            events: Vec::new(),
            next_request: 1,
        };
        mesh.reconnect();
        let now = mesh.tick();
        mesh.nodes[A].handle_new_current_uuid_clear_bitmap(now).unwrap();
        mesh.run();
        mesh.idle(100);
        for i in 0..NODES {
            assert_eq!(mesh.nodes[i].disk_state(), DiskState::UpToDate, "node {i}");
            assert!(mesh.nodes[i].has_quorum(), "node {i}");
        }
        mesh
    }

    fn tick(&mut self) -> u64 {
        self.now_ms += 1;
        self.now_ms
    }

    fn run(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..NODES {
                while self.alive[i]
                    && let Some(output) = self.nodes[i].poll_output()
                {
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
                    self.conn_id[l] = 0;
                    self.queues[i][to].clear();
                    self.queues[to][i].clear();
                    self.nodes[to].handle_transport_closed_by_peer(now, nid(i), conn_id);
                }
            }
            Output::DiskIo { id, op } => {
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

    /// Establishes every plugged link between live nodes that both want it, as the drivers'
    /// reconnect loops do.
    fn reconnect(&mut self) {
        for _ in 0..10 {
            let mut changed = false;
            for a in 0..NODES {
                for b in a + 1..NODES {
                    let l = link(a, b);
                    let want = self.alive[a]
                        && self.alive[b]
                        && self.nodes[a].wants_connection(nid(b))
                        && self.nodes[b].wants_connection(nid(a));
                    if !self.plugged[l] || self.conn_id[l] != 0 || !want {
                        continue;
                    }
                    changed = true;
                    let conn_id = self.next_conn_id;
                    self.next_conn_id += 1;
                    self.conn_id[l] = conn_id;
                    self.connections[l] += 1;
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

    /// kill -9 of node `i`: its peers see its connections closed (its kernel closes them),
    /// its frames in flight are lost, its metadata survives.
    fn crash(&mut self, i: usize) -> Metadata {
        let meta = self.nodes[i].metadata().clone();
        self.alive[i] = false;
        for j in (0..NODES).filter(|j| *j != i) {
            let l = link(i, j);
            self.plugged[l] = false;
            let conn_id = std::mem::replace(&mut self.conn_id[l], 0);
            self.queues[i][j].clear();
            self.queues[j][i].clear();
            if conn_id != 0 {
                let now = self.tick();
                self.nodes[j].handle_transport_closed_by_peer(now, nid(i), conn_id);
                self.run();
            }
        }
        meta
    }

    /// Node `i` starts again from `meta`, its links to `peers` plugged.
    fn restart(&mut self, i: usize, meta: Metadata, peers: &[usize]) {
        let now = self.tick();
        self.nodes[i] = Node::new(config(i, self.rate_kib_per_s), meta, now);
        self.alive[i] = true;
        for j in peers {
            self.plugged[link(i, *j)] = true;
        }
        self.reconnect();
    }

    fn idle(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.now_ms += 10;
            for i in 0..NODES {
                if self.alive[i] {
                    self.nodes[i].handle_timeout(self.now_ms);
                }
            }
            self.run();
            self.reconnect();
        }
    }

    /// Promotes node `i`, retrying while a peer's grace for the lost primary or a handshake
    /// runs.
    fn promote(&mut self, i: usize) {
        for _ in 0..(GRACE_MS * 2) / 10 {
            let now = self.tick();
            let result = self.nodes[i].handle_promote(now, false);
            self.run();
            if result.is_ok() {
                return;
            }
            self.idle(10);
        }
        panic!(
            "node {i} could not be promoted: {:?} (disk {:?}, quorum {})",
            self.nodes[i].handle_promote(self.now_ms, false),
            self.nodes[i].disk_state(),
            self.nodes[i].has_quorum()
        );
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

    fn write(&mut self, i: usize, block: u64, generation: u8) {
        let id = self.submit_write(i, block, generation);
        let result = self.completions.iter().find(|(_, r, _)| *r == id).map(|(_, _, r)| r);
        assert_eq!(result, Some(&Ok(None)), "write {block} on {i}");
    }

    fn differing_blocks(&self, x: usize, y: usize) -> Vec<u64> {
        let chunks = self.disks[x].chunks(BLOCK).zip(self.disks[y].chunks(BLOCK));
        chunks.enumerate().filter(|(_, (a, b))| a != b).map(|(n, _)| n as u64).collect()
    }

    /// Node `i`'s handshake decisions with `peer` since event number `since`.
    fn decisions(&self, i: usize, peer: usize, since: usize) -> Vec<SyncDecision> {
        self.events[since..]
            .iter()
            .filter_map(|(n, e)| match e {
                Event::HandshakeDecided { peer: p, decision } if *n == i && p.index() == peer => {
                    Some(*decision)
                }
                _ => None,
            })
            .collect()
    }

    fn was_outdated(&self, i: usize, since: usize) -> bool {
        let outdated = Event::DiskStateChanged(DiskState::Outdated);
        self.events[since..].iter().any(|(n, e)| *n == i && *e == outdated)
    }
}

/// A primary, writes every node holds stably, then a stream the primary dies in: both
/// secondaries received its last writes, which are still in doubt (no barrier closed them).
/// Returns the mesh right after the crash and A's metadata.
fn primary_dies_with_writes_in_doubt(rate_kib_per_s: u64) -> (Mesh, Metadata) {
    let mut mesh = Mesh::new(rate_kib_per_s);
    mesh.promote(A);
    mesh.idle(50);
    for block in 0..16 {
        mesh.write(A, block, 1);
    }
    mesh.idle(200); // barriers close the epochs: the secondaries forget these writes
    for block in 100..164 {
        mesh.write(A, block, 1);
    }
    for i in [B, C] {
        assert!(mesh.nodes[i].mesh_writes_in_doubt() > 0, "node {i} holds writes in doubt");
    }
    let meta = mesh.crash(A);
    (mesh, meta)
}

/// A primary whose writes every node holds stably dies; returns the mesh and A's metadata.
fn primary_dies_with_nothing_in_doubt() -> (Mesh, Metadata) {
    let mut mesh = Mesh::new(FAST_KIB_PER_S);
    mesh.promote(A);
    mesh.idle(50);
    for block in 0..16 {
        mesh.write(A, block, 1);
    }
    mesh.idle(200);
    let meta = mesh.crash(A);
    (mesh, meta)
}

#[test]
fn survivors_outdated_by_losing_the_primary_resync_each_other_up_to_date_and_one_is_promoted() {
    let (mut mesh, _) = primary_dies_with_writes_in_doubt(FAST_KIB_PER_S);
    mesh.idle(100);
    // They ended their connection to each other to resync what the dead primary left in
    // doubt, lost quorum meanwhile and outdated themselves...
    assert!(mesh.connections[link(B, C)] >= 2, "the survivors redialed to resync");
    assert!(mesh.was_outdated(B, 0) && mesh.was_outdated(C, 0), "quorum lost at the redial");
    // ...and the resync of both bitmaps made them UpToDate again: a promotable majority.
    mesh.idle(GRACE_MS);
    for i in [B, C] {
        assert_eq!(mesh.nodes[i].disk_state(), DiskState::UpToDate, "node {i}");
        assert!(mesh.nodes[i].has_quorum(), "node {i}");
        let other = nid(B + C - i);
        assert_eq!(mesh.nodes[i].replication_state(other), Some(ReplicationState::Established));
    }
    mesh.promote(B);
    assert_eq!(mesh.nodes[B].role(), Role::Primary);
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
    for block in 0..16 {
        assert_eq!(&mesh.disks[B][at(block)..at(block + 1)], &block_data(block, 1)[..]);
    }
}

#[test]
fn survivors_outdated_on_request_stay_outdated_after_their_resync() {
    for outdate_by_request in [false, true] {
        let mut mesh = Mesh::new(FAST_KIB_PER_S);
        mesh.promote(A);
        mesh.idle(50);
        for block in 0..16 {
            mesh.write(A, block, 1);
        }
        mesh.idle(200);
        // B and C do not see each other; the primary replicates to both and dies with writes
        // in doubt on both. Alone, each loses quorum and outdates itself.
        mesh.plugged[link(B, C)] = false;
        let conn_id = std::mem::replace(&mut mesh.conn_id[link(B, C)], 0);
        let now = mesh.tick();
        mesh.nodes[B].handle_transport_closed(now, nid(C), conn_id);
        mesh.nodes[C].handle_transport_closed(now, nid(B), conn_id);
        mesh.run();
        for block in 100..108 {
            mesh.write(A, block, 1);
        }
        mesh.crash(A);
        for i in [B, C] {
            assert_eq!(mesh.nodes[i].disk_state(), DiskState::Outdated, "node {i}");
        }
        if outdate_by_request {
            // What a fence-peer handler does (`drbdadm outdate`): a primary may now write on
            // without B, so B's word that it was in sync with it no longer counts.
            let now = mesh.tick();
            mesh.nodes[B].handle_outdate(now).unwrap();
            mesh.run();
        }
        mesh.plugged[link(B, C)] = true;
        mesh.idle(GRACE_MS);
        let expected = if outdate_by_request { DiskState::Outdated } else { DiskState::UpToDate };
        for i in [B, C] {
            assert_eq!(mesh.nodes[i].disk_state(), expected, "node {i}, {outdate_by_request}");
        }
        assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
    }
}

#[test]
fn a_target_whose_source_defers_at_once_keeps_its_generation() {
    let (mut mesh, meta_a) = primary_dies_with_nothing_in_doubt();
    mesh.promote(B);
    mesh.idle(100);
    for block in 200..210 {
        mesh.write(B, block, 2);
    }
    // A comes back and meets C first: by the generations A is C's sync target, but C defers
    // the resync (B replicates to C) and ends the connection at once; A got no block.
    let since = mesh.events.len();
    mesh.restart(A, meta_a.clone(), &[C]);
    mesh.run();
    assert_eq!(mesh.nodes[A].uuids().current, meta_a.uuids.current, "A got no data from C");
    // Then A meets B, whose bitmap UUID for A names A's generation: a bitmap resync.
    mesh.plugged[link(A, B)] = true;
    mesh.idle(500);
    let decisions = mesh.decisions(A, B, since);
    assert_eq!(decisions.first(), Some(&SyncDecision::BitmapTarget), "A with B: {decisions:?}");
    assert_eq!(mesh.nodes[A].disk_state(), DiskState::UpToDate);
    assert_eq!(mesh.differing_blocks(A, B), Vec::<u64>::new());
}

/// A secondary holds a write the other secondary never got (its link from the primary is
/// held), goes down, and the primary dies too: the two secondaries meet without it. The
/// write was in doubt on B, so its extent was in B's activity log; B's restart marks every
/// hot extent for every diskful peer, and the handshake resyncs the block (mesh seed 1813:
/// the two found each other in sync and kept different data). B tells C it restarted
/// uncleanly, so C, which did not, is the source (mesh seed 1420: an unclean node that was
/// the source by its bits alone spread what its power loss had taken back); the write,
/// never acknowledged, is gone from both.
#[test]
fn a_secondary_that_went_down_with_a_write_the_other_lacks_resyncs_it() {
    let mut mesh = Mesh::new(FAST_KIB_PER_S);
    mesh.promote(A);
    mesh.idle(50);
    for block in 0..16 {
        mesh.write(A, block, 1);
    }
    mesh.idle(200);
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
    // C stops hearing from A: the next write reaches B's disk only, in doubt towards C.
    mesh.held[link(A, C)] = true;
    let block = 500;
    mesh.submit_write(A, block, 2);
    assert_eq!(&mesh.disks[B][at(block)..at(block + 1)], &block_data(block, 2)[..]);
    assert_eq!(mesh.differing_blocks(B, C), vec![block]);
    assert!(mesh.nodes[B].mesh_writes_in_doubt() > 0, "B holds the write in doubt");
    assert!(!mesh.nodes[B].metadata().activity_log.is_empty(), "in B's activity log");
    let meta_b = mesh.crash(B);
    mesh.crash(A);
    mesh.held[link(A, C)] = false;
    let since = mesh.events.len();
    mesh.restart(B, meta_b, &[C]);
    mesh.idle(GRACE_MS);
    let decisions = mesh.decisions(B, C, since);
    assert_eq!(decisions.first(), Some(&SyncDecision::BitmapTarget), "B with C: {decisions:?}");
    assert!(!decisions.contains(&SyncDecision::NoSync), "never in sync unsynced: {decisions:?}");
    assert_eq!(mesh.differing_blocks(B, C), Vec::<u64>::new());
    assert_eq!(&mesh.disks[B][at(block)..at(block + 1)], &vec![0; BLOCK][..], "C's data won");
    for i in [B, C] {
        assert_eq!(
            mesh.nodes[i].replication_state(nid(B + C - i)),
            Some(ReplicationState::Established)
        );
    }
}

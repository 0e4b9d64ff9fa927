//! The three-node harness shared by the mesh-level protocol tests (`quorum_heal.rs`,
//! `mesh_failover.rs`): three state machines in a full mesh whose links can be held (frames
//! queue, as on a link that went silent), cut and plugged again, and whose nodes can crash
//! (their metadata survives) and restart. Each test file builds its own configuration (see
//! [`Mesh::start`]) and uses part of the rest.

use std::collections::VecDeque;

use drbd_engine::NodeId;
use drbd_engine::protocol::node::{AppRequest, Config, Event, Node, Output, Promotion, RequestId};
use drbd_engine::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{
    DiskState, Fencing, Metadata, ReplicationProtocol, ResyncRate, StateError,
};
use drbd_engine::uuid::SyncDecision;

use super::{BLOCK, RequestResult, at, block_data, disk_op, reseeded};

pub const NODES: usize = 3;
/// Longer than the grace a peer gives a primary it lost (`PRIMARY_LOST_GRACE_MS`).
pub const GRACE_MS: u64 = drbd_engine::constants::PING_TIMEOUT_MS + 100;

/// Frames in flight on one direction of a link, each with the connection it was sent on.
type Queue = VecDeque<(u64, Vec<u8>)>;

/// Index of the link between `a` and `b` (0-1, 0-2, 1-2).
pub fn link(a: usize, b: usize) -> usize {
    assert_ne!(a, b);
    a + b - 1
}

pub fn nid(i: usize) -> NodeId {
    NodeId(u8::try_from(i).unwrap())
}

/// Node `i`'s configuration in the mesh: every other node a peer, protocol C, no fencing.
/// Quorum as the mesh tests run it: a majority, and I/O suspended without quorum.
pub fn majority_suspend_io() -> QuorumConfig {
    QuorumConfig {
        quorum: QuorumPolicy::Majority,
        on_no_quorum: OnNoQuorum::SuspendIo,
        ..QuorumConfig::default()
    }
}

pub fn mesh_config(
    i: usize,
    random_seed: u64,
    rate_kib_per_s: u64,
    quorum: QuorumConfig,
) -> Config {
    Config {
        peers: (0..NODES).filter(|j| *j != i).map(nid).collect(),
        protocol: ReplicationProtocol::C,
        fencing: Fencing::DontCare,
        resync_rate: ResyncRate::Fixed { rate_kib_per_s },
        al_extents: 8,
        random_seed,
        quorum,
        ..Config::default()
    }
}

pub struct Mesh {
    pub nodes: Vec<Node>,
    /// Builds node i's configuration, at the start and on a restart.
    config: Box<dyn Fn(usize) -> Config>,
    /// Starts of each node so far (1 before any restart): a restart draws fresh generations.
    incarnations: [u64; NODES],
    /// Nodes without a disk (a diskless tiebreaker): any disk I/O of theirs is a bug.
    diskless: [bool; NODES],
    pub alive: [bool; NODES],
    pub disks: Vec<Vec<u8>>,
    pub now_ms: u64,
    next_conn_id: u64,
    /// The current connection of each link (0: none).
    pub conn_id: [u64; 3],
    /// Cables: an unplugged link carries nothing and is not re-established.
    pub plugged: [bool; 3],
    /// Frames on a held link queue instead of being delivered (a link gone silent).
    pub held: [bool; 3],
    /// Connections each link ever had (a redial shows as a second one).
    pub connections: [u32; 3],
    /// Frames in flight from `from` to `to`, with the connection they were sent on.
    pub queues: Vec<Vec<Queue>>,
    pub completions: Vec<(usize, RequestId, RequestResult)>,
    pub events: Vec<(usize, Event)>,
    next_request: u64,
}

impl Mesh {
    /// Three connected all-zero replicas of `size_blocks` (none on the `diskless` nodes) of
    /// one generation, configured by `config`; every diskful node UpToDate with quorum.
    pub fn start(
        size_blocks: u64,
        diskless: [bool; NODES],
        config: impl Fn(usize) -> Config + 'static,
    ) -> Self {
        let mut mesh = Self {
            nodes: (0..NODES)
                .map(|i| Node::new(config(i), Metadata::create(nid(i), size_blocks), 0))
                .collect(),
            config: Box::new(config),
            incarnations: [1; NODES],
            diskless,
            alive: [true; NODES],
            disks: (0..NODES)
                .map(|i| vec![0; if diskless[i] { 0 } else { at(size_blocks) }])
                .collect(),
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
        // Identical all-zero replicas: no initial sync.
        let now = mesh.tick();
        mesh.nodes[0].handle_new_current_uuid_clear_bitmap(now).unwrap();
        mesh.run();
        mesh.idle(100);
        for i in (0..NODES).filter(|i| !diskless[*i]) {
            assert_eq!(mesh.nodes[i].disk_state(), DiskState::UpToDate, "node {i}");
            assert!(mesh.nodes[i].has_quorum(), "node {i}");
        }
        mesh
    }

    pub fn tick(&mut self) -> u64 {
        self.now_ms += 1;
        self.now_ms
    }

    /// Delivers every output until all live nodes are quiet (held links keep their frames).
    pub fn run(&mut self) {
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
                    // The transport closes: the other end sees EOF.
                    self.conn_id[l] = 0;
                    self.queues[i][to].clear();
                    self.queues[to][i].clear();
                    self.nodes[to].handle_transport_closed_by_peer(now, nid(i), conn_id);
                }
            }
            Output::DiskIo { id, op } => {
                assert!(!self.diskless[i], "node {i} has no disk: {op:?}");
                let result = disk_op(&mut self.disks[i], op);
                self.nodes[i].handle_disk_completion(now, id, result);
            }
            Output::Complete { request, result } => self.completions.push((i, request, result)),
            Output::Event(event) => self.events.push((i, event)),
            Output::Persist(_) => {}
        }
    }

    /// Establishes every plugged link between live nodes that both want it and are not
    /// connected to each other, as the drivers' reconnect loops do.
    pub fn reconnect(&mut self) {
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

    /// Both ends of link a-b notice its loss (a first), as after a ping timeout.
    pub fn cut(&mut self, a: usize, b: usize) {
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

    pub fn plug(&mut self, a: usize, b: usize) {
        self.plugged[link(a, b)] = true;
        self.reconnect();
    }

    /// kill -9 of node `i`: its peers see its connections closed (its kernel closes them),
    /// its frames in flight are lost, its metadata survives.
    pub fn crash(&mut self, i: usize) -> Metadata {
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

    /// Node `i` starts again from `meta`, its links to `peers` plugged, drawing fresh
    /// generation IDs (as the driver does).
    pub fn restart(&mut self, i: usize, meta: Metadata, peers: &[usize]) {
        let config = reseeded((self.config)(i), self.incarnations[i]);
        self.incarnations[i] += 1;
        let now = self.tick();
        self.nodes[i] = Node::new(config, meta, now);
        self.alive[i] = true;
        for j in peers {
            self.plugged[link(i, *j)] = true;
        }
        self.reconnect();
    }

    /// Lets timers run (pings, grace periods, resync steps) for `ms`, reconnecting as drivers do.
    pub fn idle(&mut self, ms: u64) {
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

    /// One promotion attempt of node `i`: a cluster-wide one runs (idling) until it ends.
    pub fn try_promote(&mut self, i: usize) -> Result<(), StateError> {
        let now = self.tick();
        let since = self.events.len();
        let result = self.nodes[i].handle_promote(now, false);
        self.run();
        match result? {
            Promotion::Done => Ok(()),
            Promotion::Pending => self.promotion_outcome(i, since),
        }
    }

    /// Promotes node `i` while its link to `peer` goes silent: the peer's grant gets through,
    /// everything after it (the new primary's State, the end of the promotion) is held. (A
    /// promotion over a link already silent waits for an answer, and times out.)
    pub fn promote_then_hold(&mut self, i: usize, peer: usize) {
        self.held[link(i, peer)] = true;
        let since = self.events.len();
        let now = self.tick();
        assert_eq!(self.nodes[i].handle_promote(now, false), Ok(Promotion::Pending));
        self.deliver_first(i, peer); // the ask
        self.deliver_first(peer, i); // the grant
        self.run();
        assert_eq!(self.promotion_finished(i, since), Some(Ok(())), "node {i} promoted");
    }

    /// Delivers the oldest frame queued from `from` to `to`, on a held link too (after acting
    /// on every output): the last frame through before the link went silent.
    pub fn deliver_first(&mut self, from: usize, to: usize) {
        for i in 0..NODES {
            while self.alive[i]
                && let Some(output) = self.nodes[i].poll_output()
            {
                self.act(i, output);
            }
        }
        if let Some((conn_id, frame)) = self.queues[from][to].pop_front()
            && conn_id == self.conn_id[link(from, to)]
        {
            self.nodes[to].handle_receive(self.now_ms, nid(from), &frame);
        }
    }

    /// The outcome of node `i`'s cluster-wide promotion started after event `since`, idling
    /// until it ends (at the latest at the engine's confirm timeout).
    pub fn promotion_outcome(&mut self, i: usize, since: usize) -> Result<(), StateError> {
        for _ in 0..GRACE_MS / 10 {
            if let Some(result) = self.promotion_finished(i, since) {
                return result;
            }
            self.idle(10);
        }
        panic!("the promotion of node {i} did not end within {GRACE_MS} ms")
    }

    /// The outcome of node `i`'s promotion, if it ended after event `since`.
    pub fn promotion_finished(&self, i: usize, since: usize) -> Option<Result<(), StateError>> {
        self.events[since..].iter().find_map(|(n, e)| match e {
            Event::PromotionFinished(result) if *n == i => Some(result.clone()),
            _ => None,
        })
    }

    /// Promotes node `i`, retrying while a peer's grace for the lost primary or a handshake
    /// runs.
    pub fn promote(&mut self, i: usize) {
        for _ in 0..(GRACE_MS * 2) / 10 {
            if self.try_promote(i).is_ok() {
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

    pub fn submit_write(&mut self, i: usize, block: u64, generation: u8) -> RequestId {
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

    pub fn result(&self, id: RequestId) -> Option<&RequestResult> {
        self.completions.iter().find(|(_, r, _)| *r == id).map(|(_, _, result)| result)
    }

    /// A write of `block` on node `i` that must complete at once; returns its result.
    pub fn try_write(&mut self, i: usize, block: u64, generation: u8) -> RequestResult {
        let id = self.submit_write(i, block, generation);
        self.result(id).cloned().unwrap_or_else(|| panic!("write {block} on {i} not completed"))
    }

    /// A write of `block` on node `i` that must succeed at once.
    pub fn write(&mut self, i: usize, block: u64, generation: u8) {
        let id = self.submit_write(i, block, generation);
        assert_eq!(self.result(id), Some(&Ok(None)), "write {block} on {i}");
    }

    /// Node `i` is promoted, writes block 1 (generation 1), its peers hold it stably, and it
    /// detaches its disk with nothing in doubt (it stays primary, diskless). Returns the
    /// metadata its disk holds (nothing is persisted while detached).
    pub fn primary_detaches(&mut self, i: usize) -> Metadata {
        self.promote(i);
        self.write(i, 1, 1);
        self.idle(200);
        let on_disk = self.nodes[i].metadata().clone();
        let now = self.tick();
        self.nodes[i].handle_detach(now).unwrap();
        self.run();
        assert_eq!(self.nodes[i].disk_state(), DiskState::Diskless);
        assert_eq!(self.nodes[i].role(), drbd_engine::protocol::Role::Primary);
        self.idle(50);
        on_disk
    }

    pub fn differing_blocks(&self, x: usize, y: usize) -> Vec<u64> {
        let chunks = self.disks[x].chunks(BLOCK).zip(self.disks[y].chunks(BLOCK));
        chunks.enumerate().filter(|(_, (a, b))| a != b).map(|(n, _)| n as u64).collect()
    }

    pub fn events_of(&self, i: usize) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(move |(n, _)| *n == i).map(|(_, e)| e)
    }

    /// Node `i`'s handshake decisions with `peer` since event number `since`.
    pub fn decisions(&self, i: usize, peer: usize, since: usize) -> Vec<SyncDecision> {
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

    pub fn was_outdated(&self, i: usize, since: usize) -> bool {
        let outdated = Event::DiskStateChanged(DiskState::Outdated);
        self.events[since..].iter().any(|(n, e)| *n == i && *e == outdated)
    }
}

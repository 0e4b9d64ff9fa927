//! The deterministic simulator (TigerBeetle's VOPR is the model).
//!
//! One seed decides everything: the fault rates of this run (swarm testing), the workload, the
//! network (loss, delay and so reordering, duplication, corruption, partitions), the disks
//! (latency, I/O errors, power loss that drops or tears volatile writes, kill -9 that keeps
//! them), crashes and restarts, promote/demote (forced too), disconnect/reconnect. A safety
//! phase with faults is followed by a liveness phase in which the cluster is healed and must
//! converge. Checkers:
//! - acknowledged writes: whenever a node is promoted with UpToDate data, every block on it
//!   holds the newest guaranteed write or a later one (`model`); every read is checked too;
//! - convergence: after healing, all replicas are connected, UpToDate and byte-identical, and
//!   that image satisfies the model;
//! - split brain: every handshake decision agrees with a ghost record of which node holds
//!   changes the other may lack (split brain iff both do); unrelated data never happens;
//! - no assertion fires (a panic anywhere is a violation);
//! - liveness: the healed cluster finishes its resync within a deadline.

pub mod disk;
pub mod model;
pub mod rng;

use crate::NodeId;
use crate::constants::BLOCK_BYTES as BLOCK;
use crate::protocol::node::{
    AppRequest, Config, DiskOp, Event, Fencing, IoFailed, IoId, Node, Output, ReplicationProtocol,
    RequestId,
};
use crate::protocol::{
    DiskState, DynamicControllerConfig, MetaUpdate, Metadata, PersistedDisk, ReplicationState,
    ResyncRate, Role,
};
use crate::uuid::SyncDecision;
use disk::SimDisk;
use model::Model;
use rng::Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

const TICK_MS: u64 = 2;
const LIVENESS_DEADLINE_MS: u64 = 120_000;
const APP_IN_FLIGHT_MAX: usize = 16;

/// Fault rates and shape of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Swarm {
    pub nodes: usize,
    pub size_blocks: u64,
    pub protocol: ReplicationProtocol,
    pub al_extents: usize,
    pub resync_rate: ResyncRate,
    pub net_delay_ms_max: u64,
    pub loss_ppm: u64,
    pub duplicate_ppm: u64,
    pub corrupt_ppm: u64,
    pub partition_ppm_per_tick: u64,
    pub disk_latency_ms_max: u64,
    pub disk_error_ppm: u64,
    pub crash_ppm_per_tick: u64,
    pub power_loss_share_ppm: u64,
    pub torn_ppm: u64,
    pub promote_demote_ppm_per_tick: u64,
    pub force_promote_ppm_per_tick: u64,
    pub admin_disconnect_ppm_per_tick: u64,
    pub write_ppm_per_tick: u64,
    pub fua_ppm: u64,
    pub flush_ppm: u64,
    pub initial_full_sync: bool,
    pub safety_ms: u64,
}

impl Swarm {
    pub fn from_rng(rng: &mut Rng, nodes: usize) -> Self {
        let pick = |rng: &mut Rng, choices: &[u64]| choices[rng.index(choices.len())];
        let protocol = match rng.below(10) {
            0 => ReplicationProtocol::A,
            1 => ReplicationProtocol::B,
            _ => ReplicationProtocol::C,
        };
        let resync_rate = if rng.below(2) == 0 {
            ResyncRate::Fixed { rate_kib_per_s: pick(rng, &[4_096, 40_960, 409_600]) }
        } else {
            ResyncRate::Dynamic(DynamicControllerConfig {
                plan_ahead_steps: u32::try_from(rng.range(1, 30)).expect("small"),
                fill_target_kib: pick(rng, &[128, 1024, 8192]),
                max_rate_kib_per_s: pick(rng, &[8_192, 102_400, 1_024_000]),
                min_rate_kib_per_s: pick(rng, &[0, 250, 4096]),
            })
        };
        Self {
            nodes,
            size_blocks: pick(rng, &[64, 512, 2048, 3000]),
            protocol,
            al_extents: usize::try_from(rng.range(2, 4)).expect("small"),
            resync_rate,
            net_delay_ms_max: pick(rng, &[1, 5, 20]),
            loss_ppm: pick(rng, &[0, 0, 100, 2_000]),
            duplicate_ppm: pick(rng, &[0, 1_000, 20_000]),
            corrupt_ppm: pick(rng, &[0, 0, 100, 1_000]),
            partition_ppm_per_tick: pick(rng, &[0, 100, 1_000]),
            disk_latency_ms_max: pick(rng, &[0, 1, 5]),
            disk_error_ppm: pick(rng, &[0, 0, 0, 50, 500]),
            crash_ppm_per_tick: pick(rng, &[0, 100, 500, 2_000]),
            power_loss_share_ppm: pick(rng, &[0, 500_000, 1_000_000]),
            torn_ppm: pick(rng, &[0, 300_000]),
            promote_demote_ppm_per_tick: pick(rng, &[0, 200, 1_000]),
            force_promote_ppm_per_tick: pick(rng, &[0, 0, 500]),
            admin_disconnect_ppm_per_tick: pick(rng, &[0, 100, 500]),
            write_ppm_per_tick: pick(rng, &[100_000, 500_000, 1_000_000]),
            fua_ppm: pick(rng, &[0, 100_000]),
            flush_ppm: pick(rng, &[20_000, 100_000]),
            initial_full_sync: rng.below(3) == 0,
            safety_ms: pick(rng, &[3_000, 8_000, 15_000]),
        }
    }
}

#[derive(Debug)]
enum Ev {
    Tick,
    Deliver { to: usize, from: usize, bytes: Vec<u8> },
    Closed { to: usize, from: usize, conn: u64 },
    DiskDone { node: usize, incarnation: u64, io: IoId, op: DiskOp, error: bool, flush_point: u64 },
    Timer { node: usize, incarnation: u64, at: u64 },
    Connect { a: usize, b: usize },
    Restart { node: usize },
    FenceDone { node: usize, incarnation: u64, peer: usize },
    Reconnect { node: usize, peer: usize, discard: bool },
}

#[derive(Debug)]
enum Pending {
    Write { id: u64, fua: bool },
    Flush { issued_ms: u64 },
    Read { first: u64 },
}

struct SimNode {
    node: Option<Node>,
    incarnation: u64,
    disk: SimDisk,
    meta: Metadata,
    timer_at: Option<u64>,
    /// Writes submitted and not completed: (io, first block, data, fua).
    in_flight_writes: BTreeMap<u64, (u64, Vec<u8>, bool)>,
    restart_scheduled: bool,
}

pub struct Report {
    pub seed: u64,
    pub violations: Vec<String>,
    pub writes_acked: u64,
    pub crashes: u64,
    pub split_brains: u64,
    pub resyncs: u64,
    pub promotions: u64,
    pub sim_ms: u64,
}

pub struct World {
    seed: u64,
    rng: Rng,
    swarm: Swarm,
    now_ms: u64,
    events: BinaryHeap<Reverse<(u64, u64)>>,
    payloads: BTreeMap<u64, Ev>,
    next_event: u64,
    nodes: Vec<SimNode>,
    /// Per unordered pair (a < b): current sim connection id.
    conns: BTreeMap<(usize, usize), u64>,
    connecting: BTreeMap<(usize, usize), bool>,
    partitioned: BTreeMap<(usize, usize), bool>,
    next_conn: u64,
    model: Model,
    pending: BTreeMap<u64, (usize, u64, Pending)>,
    next_request: u64,
    /// dirty[a][b]: a holds changes b may lack (ghost record for the split-brain checker).
    dirty: Vec<Vec<bool>>,
    /// The ghost record when each pair's current connection started: both handshake decisions
    /// are made from the state exchanged then (writes wait while a handshake runs), even if
    /// one side finishes first and writes again.
    dirty_at_connect: BTreeMap<(usize, usize), (PairMatrix, PairMatrix)>,
    discard_requested: Vec<Vec<bool>>,
    last_primary: Option<usize>,
    healing: bool,
    trace: bool,
    violations: Vec<String>,
    report: Report,
}

/// A per-ordered-pair flag: `m[a][b]`.
type PairMatrix = Vec<Vec<bool>>;

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn nid(i: usize) -> NodeId {
    NodeId(u8::try_from(i).expect("few sim nodes"))
}

impl World {
    pub fn new(seed: u64, nodes: usize) -> Self {
        let mut rng = Rng::new(seed);
        let swarm = Swarm::from_rng(&mut rng, nodes);
        let size = swarm.size_blocks;
        let sim_nodes = (0..nodes)
            .map(|i| SimNode {
                node: None,
                incarnation: 0,
                disk: SimDisk::new(size),
                meta: Metadata::create(nid(i), size),
                timer_at: None,
                in_flight_writes: BTreeMap::new(),
                restart_scheduled: false,
            })
            .collect();
        Self {
            seed,
            rng,
            swarm,
            now_ms: 0,
            events: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            next_event: 0,
            nodes: sim_nodes,
            conns: BTreeMap::new(),
            connecting: BTreeMap::new(),
            partitioned: BTreeMap::new(),
            next_conn: 1,
            model: Model::new(size),
            pending: BTreeMap::new(),
            next_request: 1,
            dirty: vec![vec![false; nodes]; nodes],
            dirty_at_connect: BTreeMap::new(),
            discard_requested: vec![vec![false; nodes]; nodes],
            last_primary: None,
            healing: false,
            trace: std::env::var("TANDEM_SIM_TRACE").is_ok_and(|v| v == "1"),
            violations: Vec::new(),
            report: Report {
                seed,
                violations: Vec::new(),
                writes_acked: 0,
                crashes: 0,
                split_brains: 0,
                resyncs: 0,
                promotions: 0,
                sim_ms: 0,
            },
        }
    }

    pub fn swarm(&self) -> &Swarm {
        &self.swarm
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        let id = self.next_event;
        self.next_event += 1;
        self.events.push(Reverse((at, id)));
        self.payloads.insert(id, ev);
    }

    fn log(&self, text: impl FnOnce() -> String) {
        if self.trace {
            println!("t={} {}", self.now_ms, text());
        }
    }

    fn violation(&mut self, text: String) {
        self.violations.push(format!("t={}ms: {text}", self.now_ms));
    }

    fn config(&self, i: usize) -> Config {
        Config {
            peers: (0..self.swarm.nodes).filter(|j| *j != i).map(nid).collect(),
            protocol: self.swarm.protocol,
            fencing: Fencing::ResourceOnly,
            resync_rate: self.swarm.resync_rate,
            al_extents: self.swarm.al_extents,
            random_seed: self.seed ^ ((i as u64) << 40) ^ (self.nodes[i].incarnation << 48),
        }
    }

    fn start_node(&mut self, i: usize) {
        self.log(|| format!("node {i} start"));
        let config = self.config(i);
        let node = Node::new(config, self.nodes[i].meta.clone(), self.now_ms);
        self.nodes[i].node = Some(node);
        self.nodes[i].restart_scheduled = false;
        self.drain(i, true);
    }

    /// Runs the whole scenario; the report lists violations (empty when the seed passes).
    pub fn run(mut self) -> Report {
        for i in 0..self.swarm.nodes {
            self.start_node(i);
        }
        self.schedule(0, Ev::Tick);
        self.setup_initial_state();
        let safety_end = self.swarm.safety_ms;
        let mut heal_started = false;
        while self.violations.is_empty() {
            let Some(Reverse((at, id))) = self.events.pop() else { break };
            let ev = self.payloads.remove(&id).expect("scheduled");
            self.now_ms = at;
            if !heal_started && at >= safety_end {
                heal_started = true;
                self.start_healing();
            }
            if heal_started && at >= safety_end + LIVENESS_DEADLINE_MS {
                let state = self.describe();
                self.violation(format!(
                    "liveness: cluster did not converge after healing: {state}"
                ));
                break;
            }
            self.dispatch(ev);
            if heal_started && self.converged() {
                self.final_checks();
                break;
            }
        }
        self.report.sim_ms = self.now_ms;
        self.report.violations = self.violations;
        self.report
    }

    fn setup_initial_state(&mut self) {
        // Bring the fresh replicas up the two ways an operator does: declare them identical
        // (new-current-uuid --clear-bitmap) or force one primary and run the initial full sync.
        if !self.swarm.initial_full_sync {
            // Connect everyone first, synchronously, so the clear-bitmap precondition holds.
            // Setup runs without faults: the volume is created on a healthy cluster.
            self.healing = true;
            for a in 0..self.swarm.nodes {
                for b in a + 1..self.swarm.nodes {
                    self.connect_pair(a, b);
                }
            }
            for _ in 0..50 {
                let established = self.nodes.iter().all(|n| {
                    n.node.as_ref().is_some_and(|x| {
                        x.peer_ids()
                            .iter()
                            .all(|p| x.replication_state(*p) == Some(ReplicationState::Established))
                    })
                });
                if established {
                    break;
                }
                self.settle(100);
            }
            self.healing = false;
            let result = self.nodes[0]
                .node
                .as_mut()
                .expect("up")
                .handle_new_current_uuid_clear_bitmap(self.now_ms);
            if let Err(e) = result {
                self.violation(format!("new-current-uuid --clear-bitmap refused: {e}"));
            }
            self.drain(0, false);
        }
        let result = self.nodes[0]
            .node
            .as_mut()
            .expect("up")
            .handle_promote(self.now_ms, self.swarm.initial_full_sync);
        match result {
            Ok(()) => {
                self.last_primary = Some(0);
                self.report.promotions += 1;
            }
            Err(e) => self.violation(format!("initial promotion refused: {e}")),
        }
        self.drain(0, false);
    }

    /// Runs events for a while (used only during setup).
    fn settle(&mut self, duration_ms: u64) {
        let until = self.now_ms + duration_ms;
        while let Some(Reverse((at, id))) = self.events.peek().copied() {
            if at > until {
                break;
            }
            self.events.pop();
            let ev = self.payloads.remove(&id).expect("scheduled");
            self.now_ms = at;
            self.dispatch(ev);
        }
        self.now_ms = until;
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Tick => self.tick(),
            Ev::Deliver { to, from, bytes } => {
                if let Some(node) = self.nodes[to].node.as_mut() {
                    node.handle_receive(self.now_ms, nid(from), &bytes);
                    self.drain(to, false);
                }
            }
            Ev::Closed { to, from, conn } => {
                if let Some(node) = self.nodes[to].node.as_mut() {
                    node.handle_transport_closed(self.now_ms, nid(from), conn);
                    self.drain(to, false);
                }
            }
            Ev::DiskDone { node, incarnation, io, op, error, flush_point } => {
                self.disk_done(node, incarnation, io, op, error, flush_point);
            }
            Ev::Timer { node, incarnation, at } => {
                let n = &mut self.nodes[node];
                if n.incarnation == incarnation && n.timer_at == Some(at) {
                    n.timer_at = None;
                    if let Some(state) = n.node.as_mut() {
                        state.handle_timeout(self.now_ms);
                        self.drain(node, false);
                    }
                }
            }
            Ev::Connect { a, b } => {
                self.connecting.insert(pair(a, b), false);
                let up = self.nodes[a].node.as_ref().is_some_and(|n| n.wants_connection(nid(b)))
                    && self.nodes[b].node.as_ref().is_some_and(|n| n.wants_connection(nid(a)));
                if up && !self.partitioned.get(&pair(a, b)).copied().unwrap_or(false) {
                    self.connect_pair(a, b);
                }
            }
            Ev::Restart { node } => {
                if self.nodes[node].node.is_none() {
                    self.start_node(node);
                }
            }
            Ev::FenceDone { node, incarnation, peer } => self.fence_done(node, incarnation, peer),
            Ev::Reconnect { node, peer, discard } => {
                if let Some(n) = self.nodes[node].node.as_mut() {
                    if discard {
                        self.discard_requested[node][peer] = true;
                    }
                    let _ = n.handle_connect(self.now_ms, nid(peer), discard);
                    self.drain(node, false);
                }
            }
        }
    }

    fn connect_pair(&mut self, a: usize, b: usize) {
        let conn = self.next_conn;
        self.log(|| format!("connect {a}-{b} conn {conn}"));
        self.next_conn += 1;
        self.conns.insert(pair(a, b), conn);
        self.dirty_at_connect
            .insert(pair(a, b), (self.dirty.clone(), self.discard_requested.clone()));
        for (x, y) in [(a, b), (b, a)] {
            if let Some(node) = self.nodes[x].node.as_mut() {
                node.handle_connected(self.now_ms, nid(y), conn);
            }
        }
        self.drain(a, false);
        self.drain(b, false);
    }

    fn tick(&mut self) {
        self.schedule(self.now_ms + TICK_MS, Ev::Tick);
        let n = self.swarm.nodes;
        // Reconnect pairs that both want a connection.
        for a in 0..n {
            for b in a + 1..n {
                let key = pair(a, b);
                let wants = self.nodes[a].node.as_ref().is_some_and(|x| x.wants_connection(nid(b)))
                    && self.nodes[b].node.as_ref().is_some_and(|x| x.wants_connection(nid(a)));
                let connected_both = self.nodes[a].node.as_ref().is_some_and(|x| {
                    x.connection_state(nid(b)) == Some(crate::protocol::ConnectionState::Connected)
                }) && self.nodes[b].node.as_ref().is_some_and(|x| {
                    x.connection_state(nid(a)) == Some(crate::protocol::ConnectionState::Connected)
                });
                if wants && !connected_both && !self.connecting.get(&key).copied().unwrap_or(false)
                {
                    self.connecting.insert(key, true);
                    let delay = self.rng.range(5, 100);
                    self.schedule(self.now_ms + delay, Ev::Connect { a, b });
                }
            }
        }
        if self.healing {
            return;
        }
        self.workload();
        self.faults();
    }

    fn primary(&self) -> Option<usize> {
        (0..self.swarm.nodes)
            .find(|&i| self.nodes[i].node.as_ref().is_some_and(|n| n.role() == Role::Primary))
    }

    fn workload(&mut self) {
        let Some(p) = self.primary() else { return };
        if self.pending.len() >= APP_IN_FLIGHT_MAX
            || !self.rng.chance(self.swarm.write_ppm_per_tick)
        {
            return;
        }
        let size = self.swarm.size_blocks;
        let request = self.next_request;
        self.next_request += 1;
        let incarnation = self.nodes[p].incarnation;
        let roll = self.rng.below(1_000_000);
        let (req, pending) = if roll < self.swarm.flush_ppm {
            (AppRequest::Flush, Pending::Flush { issued_ms: self.now_ms })
        } else if roll < self.swarm.flush_ppm + 80_000 {
            let blocks = self.rng.range(1, 8).min(size);
            let first = self.rng.below(size - blocks + 1);
            (AppRequest::Read { offset_blocks: first, blocks }, Pending::Read { first })
        } else {
            let blocks = self.rng.range(1, 8).min(size);
            // Most writes go to a hot area so that overlaps and conflicts are common.
            let hot = (size / 8).max(blocks);
            let first = if self.rng.below(3) > 0 {
                self.rng.below(hot - blocks + 1)
            } else {
                self.rng.below(size - blocks + 1)
            };
            let discard = self.rng.below(50) == 0;
            let fua = !discard && self.rng.chance(self.swarm.fua_ppm);
            let id = self.model.issue_write(first, blocks, discard);
            if discard {
                (AppRequest::Discard { offset_blocks: first, blocks }, Pending::Write { id, fua })
            } else {
                let mut data = vec![0u8; usize::try_from(blocks).expect("small") * BLOCK];
                for (k, chunk) in data.chunks_mut(BLOCK).enumerate() {
                    model::fill_block(chunk, id, first + k as u64);
                }
                (AppRequest::Write { offset_blocks: first, data, fua }, Pending::Write { id, fua })
            }
        };
        self.pending.insert(request, (p, incarnation, pending));
        self.nodes[p].node.as_mut().expect("primary is up").handle_request(
            self.now_ms,
            RequestId(request),
            req,
        );
        self.drain(p, false);
    }

    fn faults(&mut self) {
        let n = self.swarm.nodes;
        for i in 0..n {
            if self.nodes[i].node.is_some() && self.rng.chance(self.swarm.crash_ppm_per_tick) {
                let power = self.rng.chance(self.swarm.power_loss_share_ppm);
                self.crash(i, power);
                let delay = self.rng.range(10, 3_000);
                self.nodes[i].restart_scheduled = true;
                self.schedule(self.now_ms + delay, Ev::Restart { node: i });
            }
        }
        for a in 0..n {
            for b in a + 1..n {
                if self.rng.chance(self.swarm.partition_ppm_per_tick) {
                    let entry = self.partitioned.entry((a, b)).or_insert(false);
                    *entry = !*entry;
                    let now = *entry;
                    self.log(|| format!("partition {a}-{b} = {now}"));
                }
                if self.rng.chance(self.swarm.admin_disconnect_ppm_per_tick)
                    && let Some(node) = self.nodes[a].node.as_mut()
                {
                    let _ = node.handle_disconnect(self.now_ms, nid(b));
                    self.drain(a, false);
                    let delay = self.rng.range(10, 1_000);
                    self.schedule(
                        self.now_ms + delay,
                        Ev::Reconnect { node: a, peer: b, discard: false },
                    );
                }
            }
        }
        if self.rng.chance(self.swarm.promote_demote_ppm_per_tick) {
            match self.primary() {
                Some(p) => {
                    self.log(|| format!("node {p} demote"));
                    let _ = self.nodes[p].node.as_mut().expect("up").handle_demote(self.now_ms);
                    self.drain(p, false);
                }
                None => self.try_promote(false),
            }
        }
        if self.primary().is_none() && self.rng.chance(self.swarm.force_promote_ppm_per_tick) {
            self.try_promote(true);
        }
        // A detached node gets its disk re-attached (a restart) after a while.
        for i in 0..n {
            if !self.nodes[i].restart_scheduled
                && self.nodes[i].node.as_ref().is_some_and(|x| {
                    x.disk_state() == DiskState::Diskless && x.role() == Role::Secondary
                })
            {
                self.nodes[i].restart_scheduled = true;
                self.crash(i, false);
                let delay = self.rng.range(10, 500);
                self.schedule(self.now_ms + delay, Ev::Restart { node: i });
            } else if self.nodes[i]
                .node
                .as_ref()
                .is_some_and(|x| x.disk_state() == DiskState::Diskless && x.role() == Role::Primary)
            {
                let _ = self.nodes[i].node.as_mut().expect("up").handle_demote(self.now_ms);
                self.drain(i, false);
            }
        }
    }

    fn try_promote(&mut self, force: bool) {
        if self.primary().is_some() {
            return;
        }
        let candidates: Vec<usize> = (0..self.swarm.nodes)
            .filter(|&i| {
                self.nodes[i].node.as_ref().is_some_and(|n| {
                    if force {
                        n.disk_state().has_data() && n.disk_state() != DiskState::UpToDate
                    } else {
                        n.disk_state() == DiskState::UpToDate
                    }
                })
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let i = candidates[self.rng.index(candidates.len())];
        if force {
            // An operator forces a primary only when no UpToDate node is reachable, and then
            // outdates the others (their disks, if down) so that none of them is later promoted
            // as UpToDate with a different history: that would be two forced lineages, an
            // operator error no engine can repair.
            let up_to_date_up = (0..self.swarm.nodes).any(|j| {
                self.nodes[j].node.as_ref().is_some_and(|n| n.disk_state() == DiskState::UpToDate)
            });
            if up_to_date_up {
                return;
            }
            for j in 0..self.swarm.nodes {
                if j == i {
                    continue;
                }
                match self.nodes[j].node.as_mut() {
                    Some(n) => {
                        let _ = n.handle_outdate(self.now_ms);
                        self.drain(j, false);
                    }
                    None => {
                        if self.nodes[j].meta.flags.disk == PersistedDisk::UpToDate {
                            let mut flags = self.nodes[j].meta.flags.clone();
                            flags.disk = PersistedDisk::Outdated;
                            self.nodes[j].meta.apply(&MetaUpdate::Flags(flags));
                        }
                    }
                }
            }
        }
        let result = self.nodes[i].node.as_mut().expect("up").handle_promote(self.now_ms, force);
        self.log(|| format!("node {i} promote force={force}: {result:?}"));
        if result.is_ok() {
            self.report.promotions += 1;
            self.last_primary = Some(i);
            let image = self.nodes[i].disk.read(0, self.swarm.size_blocks);
            if force {
                // The operator declared this data the truth; writes it lacks are forgiven, and
                // every other node now lacks our new generation.
                let stable = self.nodes[i].disk.read_stable();
                self.model.rebase(&image, &stable);
                for j in 0..self.swarm.nodes {
                    if j != i {
                        self.dirty[i][j] = true;
                    }
                }
            } else if let Err(problem) = self.model.check_image(&image) {
                self.violation(format!(
                    "node {i} promoted with UpToDate data missing an acknowledged write: {problem}"
                ));
            }
        }
        self.drain(i, false);
    }

    fn crash(&mut self, i: usize, power_loss: bool) {
        if self.nodes[i].node.is_none() {
            return;
        }
        self.report.crashes += 1;
        self.log(|| format!("node {i} crash power_loss={power_loss}"));
        self.nodes[i].node = None;
        self.nodes[i].incarnation += 1;
        self.nodes[i].timer_at = None;
        // Writes the disk had accepted may or may not have been performed.
        for (_, (first, data, fua)) in std::mem::take(&mut self.nodes[i].in_flight_writes) {
            if self.rng.below(2) == 0 {
                self.nodes[i].disk.write(first, data, fua);
            }
        }
        if power_loss {
            let torn = self.swarm.torn_ppm;
            self.nodes[i].disk.power_loss(&mut self.rng, torn);
        }
        if power_loss || self.swarm.protocol != ReplicationProtocol::C {
            self.model.volatile_loss();
        }
        // Its application requests die with it (their writes stay "maybe landed").
        self.pending.retain(|_, (node, _, _)| *node != i);
        for j in 0..self.swarm.nodes {
            if let Some(conn) = self.conns.remove(&pair(i, j))
                && !self.partitioned.get(&pair(i, j)).copied().unwrap_or(false)
            {
                let delay = self.rng.range(1, 50);
                self.schedule(self.now_ms + delay, Ev::Closed { to: j, from: i, conn });
            }
        }
    }

    fn drain(&mut self, i: usize, constructing: bool) {
        loop {
            let Some(node) = self.nodes[i].node.as_mut() else { return };
            let Some(output) = node.poll_output() else { break };
            let role = node.role();
            match output {
                Output::Transmit { peer, bytes } => self.transmit(i, peer.index(), bytes),
                Output::Disconnect { peer, conn_id } => {
                    let j = peer.index();
                    if self.conns.get(&pair(i, j)) == Some(&conn_id) {
                        let conn = conn_id;
                        self.conns.remove(&pair(i, j));
                        if !self.partitioned.get(&pair(i, j)).copied().unwrap_or(false) {
                            let delay = self.rng.range(1, 20);
                            self.schedule(self.now_ms + delay, Ev::Closed { to: j, from: i, conn });
                        }
                    }
                }
                Output::DiskIo { id, op } => {
                    let latency = self.rng.range(0, self.swarm.disk_latency_ms_max);
                    let error = !self.healing
                        && self.may_fail_disk(i)
                        && self.rng.chance(self.swarm.disk_error_ppm);
                    let flush_point = self.nodes[i].disk.flush_point();
                    if let DiskOp::Write { offset_blocks, data, fua, .. } = &op {
                        self.nodes[i]
                            .in_flight_writes
                            .insert(id.0, (*offset_blocks, data.clone(), *fua));
                    }
                    let incarnation = self.nodes[i].incarnation;
                    self.schedule(
                        self.now_ms + latency,
                        Ev::DiskDone { node: i, incarnation, io: id, op, error, flush_point },
                    );
                }
                Output::Persist(update) => {
                    if let MetaUpdate::BitmapSet { peer, .. } = &update
                        && !constructing
                        && role == Role::Primary
                    {
                        self.dirty[i][peer.index()] = true;
                        self.log(|| format!("node {i} dirty for {peer} via {update:?}"));
                    }
                    self.nodes[i].meta.apply(&update);
                }
                Output::Complete { request, result } => self.complete(i, request.0, result),
                Output::Event(event) => {
                    self.log(|| format!("node {i} event {event:?}"));
                    self.event(i, event)
                }
            }
        }
        let node = self.nodes[i].node.as_ref().expect("still up");
        let deadline = node.poll_timeout();
        if deadline != self.nodes[i].timer_at {
            self.nodes[i].timer_at = deadline;
            if let Some(at) = deadline {
                let incarnation = self.nodes[i].incarnation;
                self.schedule(at.max(self.now_ms), Ev::Timer { node: i, incarnation, at });
            }
        }
    }

    /// Disk failures are injected only where they cannot destroy the last copy of data: a
    /// failed disk is detached and fully resynced, so it must not be the primary, a sync source
    /// or a node holding changes its peers lack (losing the only copy is a double failure).
    fn may_fail_disk(&self, i: usize) -> bool {
        let Some(n) = self.nodes[i].node.as_ref() else { return false };
        n.role() != Role::Primary
            && n.peer_ids()
                .iter()
                .all(|p| n.replication_state(*p) != Some(ReplicationState::SyncSource))
            && !self.dirty[i].iter().any(|d| *d)
    }

    fn transmit(&mut self, from: usize, to: usize, mut bytes: Vec<u8>) {
        let key = pair(from, to);
        if !self.conns.contains_key(&key) || self.partitioned.get(&key).copied().unwrap_or(false) {
            return;
        }
        let faults = !self.healing;
        if faults && self.rng.chance(self.swarm.loss_ppm) {
            return;
        }
        if faults && self.rng.chance(self.swarm.corrupt_ppm) {
            let at = self.rng.index(bytes.len());
            bytes[at] ^= 1 << self.rng.below(8);
        }
        let copies = if faults && self.rng.chance(self.swarm.duplicate_ppm) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.range(0, self.swarm.net_delay_ms_max);
            self.schedule(self.now_ms + delay, Ev::Deliver { to, from, bytes: bytes.clone() });
        }
    }

    fn disk_done(
        &mut self,
        i: usize,
        incarnation: u64,
        io: IoId,
        op: DiskOp,
        error: bool,
        flush_point: u64,
    ) {
        if self.nodes[i].incarnation != incarnation || self.nodes[i].node.is_none() {
            return;
        }
        self.nodes[i].in_flight_writes.remove(&io.0);
        if error {
            self.log(|| format!("node {i} disk error on {io:?}"));
        }
        let result = if error {
            Err(IoFailed)
        } else {
            match op {
                DiskOp::Read { offset_blocks, blocks } => {
                    Ok(Some(self.nodes[i].disk.read(offset_blocks, blocks)))
                }
                DiskOp::Write { offset_blocks, data, fua, .. } => {
                    self.nodes[i].disk.write(offset_blocks, data, fua);
                    Ok(None)
                }
                DiskOp::Flush => {
                    self.nodes[i].disk.flush(flush_point);
                    Ok(None)
                }
            }
        };
        self.nodes[i].node.as_mut().expect("checked").handle_disk_completion(
            self.now_ms,
            io,
            result,
        );
        self.drain(i, false);
    }

    fn complete(
        &mut self,
        i: usize,
        request: u64,
        result: Result<Option<Vec<u8>>, crate::protocol::RequestError>,
    ) {
        let Some((node, _, pending)) = self.pending.remove(&request) else {
            self.violation(format!("node {i} completed unknown request {request}"));
            return;
        };
        if node != i {
            self.violation(format!("request {request} of node {node} completed by node {i}"));
            return;
        }
        match (pending, result) {
            (Pending::Write { id, fua }, result) => {
                if result.is_ok() {
                    self.report.writes_acked += 1;
                }
                // Under protocols A and B a FUA write is acknowledged before the peer has it:
                // only protocol C's FUA is stable on every replica at completion.
                let stable = fua && self.swarm.protocol == ReplicationProtocol::C;
                self.model.complete_write(id, result.is_ok(), stable, self.now_ms);
            }
            (Pending::Flush { issued_ms }, Ok(_)) => self.model.complete_flush(issued_ms),
            (Pending::Flush { .. }, Err(_)) => {}
            (Pending::Read { first }, Ok(Some(data))) => {
                if let Err(problem) = self.model.check_read(first, &data) {
                    self.violation(format!("node {i}: {problem}"));
                }
            }
            (Pending::Read { .. }, _) => {}
        }
    }

    fn event(&mut self, i: usize, event: Event) {
        match event {
            Event::FencePeer { peer } => {
                let delay = self.rng.range(1, 200);
                let incarnation = self.nodes[i].incarnation;
                self.schedule(
                    self.now_ms + delay,
                    Ev::FenceDone { node: i, incarnation, peer: peer.index() },
                );
            }
            Event::HandshakeDecided { peer, decision } => {
                self.check_decision(i, peer.index(), decision)
            }
            Event::SplitBrain { peer } => {
                self.report.split_brains += 1;
                self.resolve_standalone(i, peer.index());
            }
            Event::SyncRefused { peer, .. } => self.resolve_standalone(i, peer.index()),
            Event::UnrelatedData { peer } => {
                self.violation(format!("node {i} and {peer} reported unrelated data"));
            }
            Event::ResyncFinished { peer, .. } => {
                self.report.resyncs += 1;
                let j = peer.index();
                self.dirty[i][j] = false;
                self.dirty[j][i] = false;
                self.discard_requested[i][j] = false;
                self.discard_requested[j][i] = false;
            }
            _ => {}
        }
    }

    /// The operator's manual split-brain recovery: the node that is not the latest primary
    /// discards its changes.
    fn resolve_standalone(&mut self, i: usize, j: usize) {
        let victim = if self.last_primary == Some(i) { j } else { i };
        let survivor = if victim == i { j } else { i };
        let delay = self.rng.range(10, 500);
        self.schedule(
            self.now_ms + delay,
            Ev::Reconnect { node: victim, peer: survivor, discard: true },
        );
        self.schedule(
            self.now_ms + delay,
            Ev::Reconnect { node: survivor, peer: victim, discard: false },
        );
    }

    fn check_decision(&mut self, i: usize, j: usize, decision: SyncDecision) {
        use SyncDecision::*;
        let (dirty, discard) = self
            .dirty_at_connect
            .get(&pair(i, j))
            .cloned()
            .unwrap_or_else(|| (self.dirty.clone(), self.discard_requested.clone()));
        let mine = dirty[i][j];
        let theirs = dirty[j][i];
        let discarding = discard[i][j] || discard[j][i];
        let ok = match decision {
            SplitBrain => mine && theirs,
            Unrelated => false,
            NoSync => !mine && !theirs,
            BitmapSource | FullSource => !theirs || discarding,
            BitmapTarget | FullTarget => !mine || discarding,
        };
        if !ok {
            self.violation(format!(
                "node {i} decided {decision:?} with peer {j}, but ghost says node {i} diverged={mine}, node {j} diverged={theirs}"
            ));
        }
        if decision == NoSync {
            self.dirty[i][j] = false;
            self.dirty[j][i] = false;
        }
    }

    fn fence_done(&mut self, i: usize, incarnation: u64, peer: usize) {
        let still_pending = self.nodes[i].incarnation == incarnation
            && self.nodes[i].node.as_ref().is_some_and(|n| n.fence_pending(nid(peer)));
        if !still_pending {
            return;
        }
        // The fence handler reaches the peer out of band (or its disk, when it is down).
        let ok = match self.nodes[peer].node.as_mut() {
            Some(n) => n.handle_outdate(self.now_ms).is_ok(),
            None => {
                if self.nodes[peer].meta.flags.disk == PersistedDisk::UpToDate {
                    let mut flags = self.nodes[peer].meta.flags.clone();
                    flags.disk = PersistedDisk::Outdated;
                    self.nodes[peer].meta.apply(&MetaUpdate::Flags(flags));
                }
                true
            }
        };
        if self.nodes[peer].node.is_some() {
            self.drain(peer, false);
        }
        if let Some(n) = self.nodes[i].node.as_mut() {
            n.handle_fence_result(self.now_ms, nid(peer), ok);
            self.drain(i, false);
        }
    }

    fn start_healing(&mut self) {
        self.healing = true;
        self.partitioned.clear();
        for i in 0..self.swarm.nodes {
            if self.nodes[i].node.is_none() {
                self.start_node(i);
            }
        }
        // Reconnect every pair an operator left StandAlone.
        for a in 0..self.swarm.nodes {
            for b in 0..self.swarm.nodes {
                if a != b
                    && self.nodes[a].node.as_ref().is_some_and(|n| {
                        n.connection_state(nid(b))
                            == Some(crate::protocol::ConnectionState::StandAlone)
                    })
                {
                    let delay = self.rng.range(1, 50);
                    self.schedule(
                        self.now_ms + delay,
                        Ev::Reconnect { node: a, peer: b, discard: false },
                    );
                }
            }
        }
    }

    fn converged(&mut self) -> bool {
        // Detached nodes are re-attached; stuck Outdated pairs get a forced primary.
        for i in 0..self.swarm.nodes {
            let Some(n) = self.nodes[i].node.as_ref() else { return false };
            if n.disk_state() == DiskState::Diskless {
                if n.role() == Role::Primary {
                    let _ = self.nodes[i].node.as_mut().expect("up").handle_demote(self.now_ms);
                    self.drain(i, false);
                } else {
                    self.crash(i, false);
                    self.start_node(i);
                }
                return false;
            }
        }
        let all_established = (0..self.swarm.nodes).all(|i| {
            let n = self.nodes[i].node.as_ref().expect("checked");
            n.disk_state() == DiskState::UpToDate
                && n.requests_in_flight() == 0
                && n.is_quiescent()
                && n.peer_ids().iter().all(|p| {
                    n.replication_state(*p) == Some(ReplicationState::Established)
                        && n.peer_disk_state(*p) == Some(DiskState::UpToDate)
                })
        });
        if !all_established {
            let stuck_outdated = (0..self.swarm.nodes).all(|i| {
                let n = self.nodes[i].node.as_ref().expect("checked");
                n.disk_state() == DiskState::Outdated
                    && n.peer_ids()
                        .iter()
                        .all(|p| n.replication_state(*p) == Some(ReplicationState::Established))
            });
            if stuck_outdated && self.primary().is_none() {
                self.try_promote(true);
            }
            return false;
        }
        true
    }

    fn final_checks(&mut self) {
        let size = self.swarm.size_blocks;
        let first = self.nodes[0].disk.read(0, size);
        for i in 1..self.swarm.nodes {
            let other = self.nodes[i].disk.read(0, size);
            if other != first {
                let block = first
                    .chunks(BLOCK)
                    .zip(other.chunks(BLOCK))
                    .position(|(a, b)| a != b)
                    .expect("images differ somewhere");
                self.violation(format!(
                    "UpToDate replicas 0 and {i} differ after healing (first at block {block})"
                ));
                return;
            }
        }
        if let Err(problem) = self.model.check_image(&first) {
            self.violation(format!("after healing: {problem}"));
        }
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            match &n.node {
                None => out.push_str(&format!("[node {i} down] ")),
                Some(node) => {
                    out.push_str(&format!(
                        "[node {i} {} {} {}",
                        node.role(),
                        node.disk_state(),
                        node.debug_summary()
                    ));
                    for p in node.peer_ids() {
                        out.push_str(&format!(
                            " peer {p}: {:?}/{:?}/{:?} oos={}",
                            node.connection_state(p),
                            node.replication_state(p),
                            node.peer_disk_state(p),
                            node.out_of_sync_blocks(p)
                        ));
                    }
                    out.push_str("] ");
                }
            }
        }
        out
    }
}

/// Runs one seed, turning a panic anywhere into a violation.
pub fn run_seed(seed: u64, nodes: usize) -> Report {
    let outcome = std::panic::catch_unwind(|| World::new(seed, nodes).run());
    match outcome {
        Ok(report) => report,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "non-string panic".into());
            Report {
                seed,
                violations: vec![format!("assertion fired: {text}")],
                writes_acked: 0,
                crashes: 0,
                split_brains: 0,
                resyncs: 0,
                promotions: 0,
                sim_ms: 0,
            }
        }
    }
}

/// The one-line reproducer for a seed.
pub fn reproduce_command(seed: u64) -> String {
    format!("cargo run -p drbd-engine --bin tandem-sim -- --seed {seed} --count 1")
}

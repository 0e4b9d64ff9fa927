//! The harnesses shared by the integration tests. Here, the two-node one of the protocol-level
//! tests (`diskless.rs`, `metafail.rs`, `ahead.rs`): two state machines back to back, in-memory
//! disks whose reads, writes and metadata updates can be made to fail, links that can be held
//! (a congested link: frames wait on the wire), and a clock the test advances;
//! [`mesh`], the three-node one; [`driver`], two real engines on loopback. Each test file uses
//! part of them.
#![allow(dead_code)]

pub mod driver;
pub mod mesh;

use std::collections::VecDeque;
use std::path::PathBuf;

use drbd_engine::NodeId;
use drbd_engine::protocol::node::{
    AppRequest, Config, DiskOp, Event, Node, OnIoError, Output, RequestError, RequestId,
};
use drbd_engine::protocol::{
    DiskState, Fencing, IoFailed, MetaUpdate, Metadata, ReplicationProtocol, ResyncRate, Role,
};

pub const BLOCK: usize = 4096;

/// drbdmeta, or None (with a message naming the package) when it is not installed. Under the
/// full test command (scripts/test sets TANDEM_SLOW_TESTS=1 after installing drbd-utils) or with
/// CI set, a missing drbdmeta fails the test instead: its absence there is a setup bug.
pub fn drbdmeta() -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path_var).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    if let Some(found) = dirs.iter().map(|d| d.join("drbdmeta")).find(|p| p.is_file()) {
        return Some(found);
    }
    if std::env::var_os("CI").is_some() || std::env::var("TANDEM_SLOW_TESTS").as_deref() == Ok("1")
    {
        panic!("drbdmeta not found: install the Debian package drbd-utils");
    }
    eprintln!("skipped: drbdmeta not found; install the Debian package drbd-utils");
    None
}

pub type RequestResult = Result<Option<Vec<u8>>, RequestError>;

pub fn other(i: usize) -> NodeId {
    NodeId(u8::from(i == 0))
}

/// Byte offset of `block` in a disk.
pub fn at(block: u64) -> usize {
    usize::try_from(block).unwrap() * BLOCK
}

/// Block `block`'s contents in generation `generation`: self-describing, so a misplaced block
/// shows.
pub fn block_data(block: u64, generation: u8) -> Vec<u8> {
    let mut data = vec![generation; BLOCK];
    data[..8].copy_from_slice(&block.to_le_bytes());
    data
}

/// Carries out `op` on the in-memory disk `disk`: reads return its bytes, writes land in it.
pub fn disk_op(disk: &mut [u8], op: DiskOp) -> Result<Option<Vec<u8>>, IoFailed> {
    match op {
        DiskOp::Read { offset_blocks, blocks } => {
            Ok(Some(disk[at(offset_blocks)..at(offset_blocks + blocks)].to_vec()))
        }
        DiskOp::Write { offset_blocks, data, .. } => {
            disk[at(offset_blocks)..at(offset_blocks) + data.len()].copy_from_slice(&data);
            Ok(None)
        }
        DiskOp::Flush => Ok(None),
    }
}

/// `config` for a node's `incarnation`-th start (0: the first): each restart draws fresh
/// generation IDs, as the driver does (it seeds every start with random bits); a restarted
/// node that drew its previous life's generations again would make unrelated histories look
/// alike.
pub fn reseeded(mut config: Config, incarnation: u64) -> Config {
    config.random_seed ^= incarnation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    config
}

/// Two nodes back to back with in-memory disks that can be made to fail.
pub struct Pair {
    pub nodes: [Node; 2],
    /// Each node's configuration, for [`Pair::restart`].
    configs: [Config; 2],
    /// Starts of each node so far (1 before any restart).
    incarnations: [u64; 2],
    pub disks: [Vec<u8>; 2],
    /// Reads / writes of node i's disk fail (EIO, or ENOSPC on a full disk).
    pub fail_reads: [bool; 2],
    pub fail_writes: [bool; 2],
    /// Metadata updates of node i fail (ENOSPC under its meta-disk).
    pub fail_meta: [bool; 2],
    pub meta_failures: [u64; 2],
    /// The updates node i persisted.
    pub persisted: [Vec<MetaUpdate>; 2],
    /// Frames on the wire from node i to the other, in order, while its link is held.
    pub wire: [VecDeque<Vec<u8>>; 2],
    /// The link from node i holds its frames (congested) instead of delivering them.
    pub held: [bool; 2],
    pub now_ms: u64,
    conn_id: u64,
    completions: Vec<(usize, RequestId, RequestResult)>,
    pub events: Vec<(usize, Event)>,
    next_request: u64,
}

impl Pair {
    /// A connected pair of `size_blocks` all-zero replicas, without an initial sync. With
    /// `client`, node 0 is a `disk none` client of node 1.
    pub fn new(
        size_blocks: u64,
        protocol: ReplicationProtocol,
        on_io_error: OnIoError,
        client: bool,
    ) -> Self {
        Self::configured(size_blocks, client, |config| {
            config.protocol = protocol;
            config.on_io_error = on_io_error;
        })
    }

    /// As [`Pair::new`], with `configure` applied to both nodes' configurations.
    pub fn configured(size_blocks: u64, client: bool, configure: impl Fn(&mut Config)) -> Self {
        let config = |id: u8, diskless: bool| {
            let mut config = Config {
                peers: vec![other(usize::from(id))],
                fencing: Fencing::DontCare,
                resync_rate: ResyncRate::Fixed { rate_kib_per_s: 100_000 },
                al_extents: 8,
                random_seed: 11,
                ..Config::default()
            };
            configure(&mut config);
            config.quorum.diskless = diskless;
            if client && id == 1 {
                config.quorum.diskless_peers = vec![NodeId(0)];
            }
            config
        };
        let configs = [config(0, client), config(1, false)];
        let node = |id: u8| {
            Node::new(
                configs[usize::from(id)].clone(),
                Metadata::create(NodeId(id), size_blocks),
                0,
            )
        };
        let bytes = at(size_blocks);
        let mut pair = Self {
            nodes: [node(0), node(1)],
            configs,
            incarnations: [1; 2],
            disks: [vec![0; bytes], vec![0; bytes]],
            fail_reads: [false; 2],
            fail_writes: [false; 2],
            fail_meta: [false; 2],
            meta_failures: [0; 2],
            persisted: [Vec::new(), Vec::new()],
            wire: [VecDeque::new(), VecDeque::new()],
            held: [false; 2],
            now_ms: 0,
            conn_id: 0,
            completions: Vec::new(),
            events: Vec::new(),
            next_request: 1,
        };
        pair.connect();
        // Identical all-zero replicas: no initial sync.
        let clear_on = usize::from(client);
        let now = pair.tick();
        pair.nodes[clear_on].handle_new_current_uuid_clear_bitmap(now).unwrap();
        pair.run();
        pair
    }

    pub fn tick(&mut self) -> u64 {
        self.now_ms += 1;
        self.now_ms
    }

    /// Delivers every output until both nodes are quiet; frames on a held link stay there.
    pub fn run(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..2 {
                while let Some(output) = self.nodes[i].poll_output() {
                    progress = true;
                    let now = self.now_ms;
                    match output {
                        Output::Transmit { frame, .. }
                            if self.held[i] || !self.wire[i].is_empty() =>
                        {
                            self.wire[i].push_back(frame.to_vec());
                        }
                        Output::Transmit { frame, .. } => {
                            self.nodes[1 - i].handle_receive(now, other(1 - i), &frame.to_vec());
                        }
                        Output::Disconnect { conn_id, .. } => {
                            self.wire = [VecDeque::new(), VecDeque::new()];
                            self.nodes[1 - i].handle_transport_closed(now, other(1 - i), conn_id);
                        }
                        Output::DiskIo { id, op } => {
                            let result = self.disk_io(i, op);
                            self.nodes[i].handle_disk_completion(now, id, result);
                        }
                        Output::Complete { request, result } => {
                            self.completions.push((i, request, result));
                        }
                        Output::Event(event) => self.events.push((i, event)),
                        Output::Persist(update) if !self.fail_meta[i] => {
                            self.persisted[i].push(update);
                        }
                        Output::Persist(_) => {
                            // As the driver does: the batch is the run of Persists; the output
                            // polled after it goes back to the node.
                            self.meta_failures[i] += 1;
                            let mut next = self.nodes[i].poll_output();
                            while matches!(next, Some(Output::Persist(_))) {
                                next = self.nodes[i].poll_output();
                            }
                            self.nodes[i].handle_metadata_failed(now, next);
                        }
                    }
                }
                if !self.held[i] {
                    while let Some(bytes) = self.wire[i].pop_front() {
                        progress = true;
                        let now = self.now_ms;
                        self.nodes[1 - i].handle_receive(now, other(1 - i), &bytes);
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn disk_io(&mut self, i: usize, op: DiskOp) -> Result<Option<Vec<u8>>, IoFailed> {
        let fails = match op {
            DiskOp::Read { .. } => self.fail_reads[i],
            DiskOp::Write { .. } | DiskOp::Flush => self.fail_writes[i],
        };
        if fails {
            return Err(IoFailed);
        }
        disk_op(&mut self.disks[i], op)
    }

    pub fn connect(&mut self) {
        self.conn_id += 1;
        let now = self.tick();
        for i in 0..2 {
            self.nodes[i].handle_connected(now, other(i), self.conn_id);
        }
        self.run();
    }

    pub fn cut(&mut self) {
        self.wire = [VecDeque::new(), VecDeque::new()];
        self.held = [false; 2];
        let now = self.tick();
        for i in 0..2 {
            self.nodes[i].handle_transport_closed(now, other(i), self.conn_id);
        }
        self.run();
    }

    /// kill -9 of node `i` and its start again from `meta` (what its disk holds), unconnected
    /// ([`Pair::connect`] links it again): the peer sees the connection closed, frames in
    /// flight are lost.
    pub fn restart(&mut self, i: usize, meta: Metadata) {
        self.cut();
        let config = reseeded(self.configs[i].clone(), self.incarnations[i]);
        self.incarnations[i] += 1;
        let now = self.tick();
        self.nodes[i] = Node::new(config, meta, now);
        self.run();
    }

    /// Lets timers run (barriers, resync steps) for `ms`.
    pub fn idle(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.now_ms += 10;
            for i in 0..2 {
                self.nodes[i].handle_timeout(self.now_ms);
            }
            self.run();
        }
    }

    /// Hands `req` to node i and runs; it may still be pending (see [`Pair::result`]).
    pub fn submit(&mut self, i: usize, req: AppRequest) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let now = self.tick();
        self.nodes[i].handle_request(now, id, req);
        self.run();
        id
    }

    /// The result of a submitted request, once it completed.
    pub fn result(&self, request: RequestId) -> Option<&RequestResult> {
        self.completions.iter().find(|(_, r, _)| *r == request).map(|(_, _, result)| result)
    }

    /// Submits `req` to node i, which must complete it before the nodes are quiet.
    pub fn request(&mut self, i: usize, req: AppRequest) -> RequestResult {
        let id = self.submit(i, req);
        let pos = self.completions.iter().position(|(_, r, _)| *r == id).expect("completed");
        self.completions.remove(pos).2
    }

    pub fn write(&mut self, i: usize, block: u64, generation: u8) -> RequestResult {
        let data = block_data(block, generation).into();
        self.request(i, AppRequest::Write { offset_blocks: block, data, fua: false })
    }

    pub fn read(&mut self, i: usize, block: u64) -> RequestResult {
        self.request(i, AppRequest::Read { offset_blocks: block, blocks: 1 })
    }

    /// Node `i` is promoted, writes block 1 (generation 1), its peer holds it stably, and it
    /// detaches its disk with nothing in doubt (it stays primary, diskless). Returns the
    /// metadata its disk holds (nothing is persisted while detached).
    pub fn primary_detaches(&mut self, i: usize) -> Metadata {
        let now = self.tick();
        self.nodes[i].handle_promote(now, false).unwrap();
        self.run();
        assert_eq!(self.write(i, 1, 1), Ok(None));
        self.idle(200);
        let on_disk = self.nodes[i].metadata().clone();
        let now = self.tick();
        self.nodes[i].handle_detach(now).unwrap();
        self.run();
        assert_eq!(self.nodes[i].disk_state(), DiskState::Diskless);
        assert_eq!(self.nodes[i].role(), Role::Primary);
        self.idle(50);
        on_disk
    }

    pub fn differing_blocks(&self) -> Vec<u64> {
        let chunks = self.disks[0].chunks(BLOCK).zip(self.disks[1].chunks(BLOCK));
        chunks.enumerate().filter(|(_, (a, b))| a != b).map(|(n, _)| n as u64).collect()
    }

    pub fn detached(&self, i: usize) -> bool {
        self.events.iter().any(|(n, e)| *n == i && *e == Event::Detached)
    }

    /// Blocks node i's finished resyncs moved, in total.
    pub fn resynced_blocks(&self, i: usize) -> u64 {
        self.events
            .iter()
            .filter_map(|(n, e)| match e {
                Event::ResyncFinished { blocks, .. } if *n == i => Some(*blocks),
                _ => None,
            })
            .sum()
    }
}

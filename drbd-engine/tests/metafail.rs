//! A failed metadata write (`protocol::node::metafail`) through the state machine's public
//! inputs and outputs, the harness failing `Output::Persist` as the driver does when the
//! meta-disk's file system is full: the disk detaches (whatever `on-io-error` says), nothing
//! queued behind the failed update reaches the disk, writes go on through the peer or fail
//! without one, and `attach` afterwards does a full resync.

use drbd_engine::NodeId;
use drbd_engine::protocol::node::{
    AppRequest, Config, DiskOp, Event, Node, OnIoError, Output, RequestError, RequestId,
};
use drbd_engine::protocol::{
    ConnectionState, DiskState, Fencing, MetaUpdate, Metadata, ReplicationProtocol, ResyncRate,
    Role,
};

/// Four activity-log extents: a full resync differs from an activity-log one.
const SIZE_BLOCKS: u64 = 4 * drbd_engine::constants::AL_EXTENT_BLOCKS;
const BLOCK: usize = 4096;

type RequestResult = Result<Option<Vec<u8>>, RequestError>;

fn other(i: usize) -> NodeId {
    NodeId(u8::from(i == 0))
}

fn block_data(block: u64, generation: u8) -> Vec<u8> {
    let mut data = vec![generation; BLOCK];
    data[..8].copy_from_slice(&block.to_le_bytes());
    data
}

/// Two nodes back to back with in-memory disks that can be made to fail.
struct Pair {
    nodes: [Node; 2],
    disks: [Vec<u8>; 2],
    /// Reads / writes of node i's disk fail (EIO, or ENOSPC on a full disk).
    fail_reads: [bool; 2],
    fail_writes: [bool; 2],
    /// Metadata updates of node i fail (ENOSPC under its meta-disk).
    fail_meta: [bool; 2],
    meta_failures: [u64; 2],
    /// The updates node i persisted.
    persisted: [Vec<MetaUpdate>; 2],
    now_ms: u64,
    conn_id: u64,
    completions: Vec<(usize, RequestId, RequestResult)>,
    events: Vec<(usize, Event)>,
    next_request: u64,
}

impl Pair {
    fn new(protocol: ReplicationProtocol, on_io_error: OnIoError, client: bool) -> Self {
        let node = |id: u8, diskless: bool| {
            let mut config = Config {
                peers: vec![other(usize::from(id))],
                protocol,
                fencing: Fencing::DontCare,
                resync_rate: ResyncRate::Fixed { rate_kib_per_s: 100_000 },
                al_extents: 8,
                random_seed: 11,
                on_io_error,
                ..Config::default()
            };
            config.quorum.diskless = diskless;
            if client && id == 1 {
                config.quorum.diskless_peers = vec![NodeId(0)];
            }
            Node::new(config, Metadata::create(NodeId(id), SIZE_BLOCKS), 0)
        };
        let bytes = usize::try_from(SIZE_BLOCKS).unwrap() * BLOCK;
        let mut pair = Self {
            nodes: [node(0, client), node(1, false)],
            disks: [vec![0; bytes], vec![0; bytes]],
            fail_reads: [false; 2],
            fail_writes: [false; 2],
            fail_meta: [false; 2],
            meta_failures: [0; 2],
            persisted: [Vec::new(), Vec::new()],
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

    fn tick(&mut self) -> u64 {
        self.now_ms += 1;
        self.now_ms
    }

    fn run(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..2 {
                while let Some(output) = self.nodes[i].poll_output() {
                    progress = true;
                    let now = self.now_ms;
                    match output {
                        Output::Transmit { frame, .. } => {
                            self.nodes[1 - i].handle_receive(now, other(1 - i), &frame.to_vec());
                        }
                        Output::Disconnect { conn_id, .. } => {
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
            }
            if !progress {
                return;
            }
        }
    }

    fn disk_io(
        &mut self,
        i: usize,
        op: DiskOp,
    ) -> Result<Option<Vec<u8>>, drbd_engine::protocol::IoFailed> {
        let at = |block: u64| usize::try_from(block).unwrap() * BLOCK;
        match op {
            DiskOp::Read { offset_blocks, blocks } => {
                if self.fail_reads[i] {
                    return Err(drbd_engine::protocol::IoFailed);
                }
                Ok(Some(self.disks[i][at(offset_blocks)..at(offset_blocks + blocks)].to_vec()))
            }
            DiskOp::Write { offset_blocks, data, .. } => {
                if self.fail_writes[i] {
                    return Err(drbd_engine::protocol::IoFailed);
                }
                self.disks[i][at(offset_blocks)..at(offset_blocks) + data.len()]
                    .copy_from_slice(&data);
                Ok(None)
            }
            DiskOp::Flush if self.fail_writes[i] => Err(drbd_engine::protocol::IoFailed),
            DiskOp::Flush => Ok(None),
        }
    }

    fn connect(&mut self) {
        self.conn_id += 1;
        let now = self.tick();
        for i in 0..2 {
            self.nodes[i].handle_connected(now, other(i), self.conn_id);
        }
        self.run();
    }

    fn cut(&mut self) {
        let now = self.tick();
        for i in 0..2 {
            self.nodes[i].handle_transport_closed(now, other(i), self.conn_id);
        }
        self.run();
    }

    /// Lets timers run (barriers, resync steps) for `ms`.
    fn idle(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.now_ms += 10;
            for i in 0..2 {
                self.nodes[i].handle_timeout(self.now_ms);
            }
            self.run();
        }
    }

    fn request(&mut self, i: usize, req: AppRequest) -> RequestResult {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let now = self.tick();
        self.nodes[i].handle_request(now, id, req);
        self.run();
        let pos = self.completions.iter().position(|(_, r, _)| *r == id).expect("completed");
        self.completions.remove(pos).2
    }

    fn write(&mut self, i: usize, block: u64, generation: u8) -> RequestResult {
        let data = block_data(block, generation).into();
        self.request(i, AppRequest::Write { offset_blocks: block, data, fua: false })
    }

    fn read(&mut self, i: usize, block: u64) -> RequestResult {
        self.request(i, AppRequest::Read { offset_blocks: block, blocks: 1 })
    }

    fn differing_blocks(&self) -> Vec<u64> {
        let chunks = self.disks[0].chunks(BLOCK).zip(self.disks[1].chunks(BLOCK));
        chunks.enumerate().filter(|(_, (a, b))| a != b).map(|(n, _)| n as u64).collect()
    }

    fn detached(&self, i: usize) -> bool {
        self.events.iter().any(|(n, e)| *n == i && *e == Event::Detached)
    }
}

fn at(block: u64) -> usize {
    usize::try_from(block).unwrap() * BLOCK
}

fn primary_pair(on_io_error: OnIoError) -> Pair {
    let mut pair = Pair::new(ReplicationProtocol::C, on_io_error, false);
    pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
    pair.run();
    pair
}

#[test]
fn a_failed_metadata_write_detaches_and_the_primary_keeps_serving_through_its_peer() {
    // pass_on too: a metadata error has no caller to hand it to (DRBD detaches as well).
    for on_io_error in [OnIoError::Detach, OnIoError::PassOn] {
        let mut pair = primary_pair(on_io_error);
        for block in 0..8 {
            assert_eq!(pair.write(0, block, 1), Ok(None));
        }
        // The meta-disk fills up: the next write to a cold extent needs an activity-log
        // update, which fails. The write must not reach the disk behind it (its extent is not
        // in the on-disk log), and it completes through the peer.
        pair.fail_meta[0] = true;
        let cold = drbd_engine::constants::AL_EXTENT_BLOCKS + 5;
        assert_eq!(pair.write(0, cold, 2), Ok(None), "{on_io_error:?}");
        assert!(pair.meta_failures[0] > 0, "the activity-log update was attempted");
        assert!(pair.detached(0));
        assert_eq!(pair.nodes[0].disk_state(), DiskState::Diskless);
        assert_eq!(pair.nodes[0].role(), Role::Primary);
        assert!(pair.disks[0][at(cold)..at(cold + 1)].iter().all(|b| *b == 0), "not on disk");
        assert_eq!(pair.disks[1][at(cold)..at(cold + 1)], block_data(cold, 2)[..]);
        assert_eq!(pair.nodes[0].connection_state(NodeId(1)), Some(ConnectionState::Connected));
        assert_eq!(pair.nodes[1].peer_disk_state(NodeId(0)), Some(DiskState::Diskless));
        // From now on nothing is persisted and every write goes through the peer.
        let failures = pair.meta_failures[0];
        for block in 100..116 {
            assert_eq!(pair.write(0, block, 3), Ok(None));
        }
        assert_eq!(pair.request(0, AppRequest::Flush), Ok(None));
        pair.idle(200);
        assert_eq!(pair.meta_failures[0], failures, "a detached node persists nothing");
        for block in (0..8).chain([cold]).chain(100..116) {
            let generation = match block {
                0..8 => 1,
                100..116 => 3,
                _ => 2,
            };
            let read = pair.read(0, block);
            assert!(read == Ok(Some(block_data(block, generation))), "block {block} reads back");
        }
        // The peer tracks what the detached disk lacks.
        assert!(pair.nodes[1].out_of_sync_blocks(NodeId(0)) >= 17);
    }
}

#[test]
fn without_an_up_to_date_peer_a_failed_metadata_write_fails_the_write() {
    let mut pair = primary_pair(OnIoError::Detach);
    assert_eq!(pair.write(0, 1, 1), Ok(None));
    pair.cut();
    pair.fail_meta[0] = true;
    // Writing while the peer is away marks its bitmap first: that update fails, so the write
    // is never acknowledged and never reaches the disk.
    let result = pair.write(0, 2, 1);
    assert!(
        matches!(result, Err(RequestError::Io | RequestError::NoUpToDateData)),
        "the write fails: {result:?}"
    );
    assert!(pair.detached(0));
    assert!(pair.disks[0][at(2)..at(3)].iter().all(|b| *b == 0), "not on disk");
    assert_eq!(pair.write(0, 3, 1), Err(RequestError::NoUpToDateData));
    assert_eq!(pair.read(0, 1), Err(RequestError::NoUpToDateData));
}

#[test]
fn a_sync_target_whose_metadata_fails_detaches_and_the_primary_goes_on() {
    let mut pair = primary_pair(OnIoError::Detach);
    assert_eq!(pair.write(0, 1, 1), Ok(None));
    pair.cut();
    assert_eq!(pair.write(0, 2, 2), Ok(None));
    // The peer comes back behind: becoming a sync target updates its metadata (disk state,
    // UUIDs, bitmap), which fails. It detaches instead of taking the daemon down.
    pair.fail_meta[1] = true;
    pair.connect();
    pair.idle(2_000);
    assert!(pair.meta_failures[1] > 0, "the sync target's update was attempted");
    assert!(pair.detached(1));
    assert_eq!(pair.nodes[1].disk_state(), DiskState::Diskless);
    // The primary goes on with its own disk and keeps tracking what the peer lacks.
    assert_eq!(pair.nodes[0].disk_state(), DiskState::UpToDate);
    assert_eq!(pair.write(0, 3, 2), Ok(None));
    assert_eq!(pair.read(0, 2), Ok(Some(block_data(2, 2))));
    assert!(pair.nodes[0].out_of_sync_blocks(NodeId(1)) >= 2);
    assert_eq!(pair.meta_failures[0], 0);
}

#[test]
fn attach_after_a_metadata_failure_does_a_full_resync() {
    let mut pair = primary_pair(OnIoError::Detach);
    for block in 0..16 {
        assert_eq!(pair.write(0, block, 1), Ok(None));
    }
    pair.idle(200);
    pair.fail_meta[0] = true;
    let cold = 3 * drbd_engine::constants::AL_EXTENT_BLOCKS;
    assert_eq!(pair.write(0, cold, 2), Ok(None));
    assert!(pair.detached(0));
    pair.idle(200);
    pair.nodes[0].handle_demote(pair.now_ms + 1).unwrap();
    pair.run();
    // The meta-disk has room again.
    pair.fail_meta[0] = false;
    pair.persisted[0].clear();
    pair.nodes[0].handle_attach(pair.now_ms + 1).unwrap();
    pair.run();
    // Nothing on disk is trusted: every block is marked, and the superblock is rewritten.
    let full = MetaUpdate::BitmapSet { peer: NodeId(1), first_block: 0, blocks: SIZE_BLOCKS };
    assert!(pair.persisted[0].contains(&full), "{:?}", pair.persisted[0]);
    assert!(pair.persisted[0].iter().any(|u| matches!(u, MetaUpdate::Uuids(_))));
    pair.connect();
    pair.idle(5_000);
    assert_eq!(pair.nodes[0].disk_state(), DiskState::UpToDate);
    assert_eq!(pair.differing_blocks(), Vec::<u64>::new(), "replicas identical after the resync");
    let resynced: u64 = pair
        .events
        .iter()
        .filter_map(|(n, e)| match e {
            Event::ResyncFinished { blocks, .. } if *n == 1 => Some(*blocks),
            _ => None,
        })
        .sum();
    assert_eq!(resynced, SIZE_BLOCKS, "a full resync");
    pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
    pair.run();
    assert_eq!(pair.read(0, cold), Ok(Some(block_data(cold, 2))));
}

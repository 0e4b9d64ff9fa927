//! Congestion policies (`net { on-congestion; congestion-fill; congestion-extents; }`) at the
//! protocol level: the shared two-node pair (`tests/common`), whose links can be held (a slow
//! link: frames wait on the wire), node 0 primary. See `protocol/node/ahead.rs`.

mod common;

use common::{Pair, at, other};
use drbd_engine::NodeId;
use drbd_engine::protocol::node::{AppRequest, CongestionConfig, Event, OnCongestion, RequestId};
use drbd_engine::protocol::{
    ConnectionState, DiskState, FenceOutcome, Fencing, ReplicationProtocol, ReplicationState, Role,
    StateError,
};

/// Blocks per activity-log extent (4 MiB).
const EXTENT_BLOCKS: u64 = 1024;

/// `blocks` blocks of generation `generation`, each naming its block number.
fn data(first: u64, blocks: u64, generation: u8) -> Vec<u8> {
    (first..first + blocks).flat_map(|block| common::block_data(block, generation)).collect()
}

/// The congestion tests' view of the shared pair: node 0 is the primary.
impl Pair {
    /// Two identical all-zero replicas under protocol `protocol`, connected and in sync, node 0
    /// primary.
    fn ahead(
        size_blocks: u64,
        protocol: ReplicationProtocol,
        congestion: CongestionConfig,
    ) -> Self {
        Self::ahead_fenced(size_blocks, protocol, congestion, Fencing::DontCare)
    }

    fn ahead_fenced(
        size_blocks: u64,
        protocol: ReplicationProtocol,
        congestion: CongestionConfig,
        fencing: Fencing,
    ) -> Self {
        let mut pair = Pair::configured(size_blocks, false, |config| {
            config.protocol = protocol;
            config.congestion = congestion;
            config.fencing = fencing;
        });
        let now = pair.tick();
        pair.nodes[0].handle_promote(now, false).unwrap();
        pair.run();
        assert_eq!(pair.replication(0), Some(ReplicationState::Established));
        pair
    }

    fn replication(&self, i: usize) -> Option<ReplicationState> {
        self.nodes[i].replication_state(other(i))
    }

    /// Writes `blocks` blocks at `first` through node 0; the write may still be pending.
    fn write_run(&mut self, first: u64, blocks: u64, generation: u8) -> RequestId {
        let data = data(first, blocks, generation).into();
        self.submit(0, AppRequest::Write { offset_blocks: first, data, fua: false })
    }

    fn saw(&self, node: usize, state: ReplicationState) -> bool {
        self.events.iter().any(|(i, e)| {
            *i == node
                && matches!(e, Event::ReplicationStateChanged { state: s, .. } if *s == state)
        })
    }

    /// Releases the held links and lets the resync run to its end.
    fn heal(&mut self) {
        self.held = [false; 2];
        self.run();
        for _ in 0..200 {
            self.idle(100);
            let settled = (0..2).all(|i| {
                self.replication(i) == Some(ReplicationState::Established)
                    && self.nodes[i].disk_state() == DiskState::UpToDate
            });
            if settled && self.nodes[0].out_of_sync_blocks(other(0)) == 0 {
                return;
            }
        }
        panic!(
            "did not settle: {:?} / {:?}, {} blocks out of sync",
            self.replication(0),
            self.replication(1),
            self.nodes[0].out_of_sync_blocks(other(0))
        );
    }
}

fn pull_ahead(fill_bytes: u64) -> CongestionConfig {
    CongestionConfig { on_congestion: OnCongestion::PullAhead, fill_bytes, extents: None }
}

/// The whole cycle: the fill passes congestion-fill on a slow link, the primary goes Ahead and
/// keeps completing writes, the peer is Behind (Outdated) once it hears of it, the marked
/// blocks are resynced when the link drains, and both data areas end byte-identical.
#[test]
fn pull_ahead_on_fill_then_resync_after_the_congestion_clears() {
    let mut pair = Pair::ahead(4096, ReplicationProtocol::A, pull_ahead(64 * 1024));
    pair.held[0] = true;
    // 8 blocks = 32 KiB each: the third write finds 64 KiB in flight.
    let first_two: Vec<RequestId> = (0..2).map(|k| pair.write_run(k * 8, 8, 1)).collect();
    assert_eq!(pair.replication(0), Some(ReplicationState::Established));
    assert_eq!(pair.nodes[0].in_flight_bytes(other(0)), 64 * 1024);
    let more: Vec<RequestId> = (2..40).map(|k| pair.write_run(k * 8, 8, 2)).collect();
    assert_eq!(pair.replication(0), Some(ReplicationState::Ahead));
    for request in first_two.iter().chain(&more) {
        assert_eq!(pair.result(*request), Some(&Ok(None)), "writes complete while Ahead");
    }
    // Nothing more went onto the congested link, and the writes since are marked.
    assert_eq!(pair.nodes[0].in_flight_bytes(other(0)), 64 * 1024);
    assert_eq!(pair.nodes[0].out_of_sync_blocks(other(0)), 38 * 8);
    // The link drains towards the peer only: it is Behind and Outdated.
    pair.held = [false, true];
    pair.run();
    assert_eq!(pair.replication(1), Some(ReplicationState::Behind));
    assert_eq!(pair.nodes[1].disk_state(), DiskState::Outdated);
    assert_eq!(pair.replication(0), Some(ReplicationState::Ahead));
    pair.heal();
    assert!(pair.saw(0, ReplicationState::SyncSource), "Ahead -> SyncSource");
    assert!(pair.saw(1, ReplicationState::SyncTarget), "Behind -> SyncTarget");
    assert_eq!(pair.nodes[1].peer_disk_state(other(1)), Some(DiskState::UpToDate));
    assert!(pair.disks[0] == pair.disks[1], "replicas differ after the resync");
    assert_eq!(&pair.disks[1][at(300)..at(301)], &data(300, 1, 2)[..]);
    // Established again: new writes are replicated as before.
    let request = pair.write_run(1000, 4, 3);
    assert_eq!(pair.result(request), Some(&Ok(None)));
    assert_eq!(pair.replication(0), Some(ReplicationState::Established));
    assert!(pair.disks[0] == pair.disks[1]);
}

/// Congestion-extents: too many hot activity-log extents pull ahead too.
#[test]
fn pull_ahead_on_hot_extents() {
    let congestion = CongestionConfig {
        on_congestion: OnCongestion::PullAhead,
        fill_bytes: 0,
        extents: Some(3),
    };
    let mut pair = Pair::ahead(8 * EXTENT_BLOCKS, ReplicationProtocol::A, congestion);
    pair.held[0] = true;
    for k in 0..3 {
        pair.write_run(k * EXTENT_BLOCKS, 1, 1);
        assert_eq!(pair.replication(0), Some(ReplicationState::Established), "extent {k}");
    }
    pair.write_run(3 * EXTENT_BLOCKS, 1, 1);
    assert_eq!(pair.replication(0), Some(ReplicationState::Ahead));
    pair.heal();
    assert!(pair.disks[0] == pair.disks[1]);
}

/// Until the peer confirmed that it is Behind it may still take itself for UpToDate: an
/// application flush waits, so nothing is declared durable that only the primary holds.
#[test]
fn flush_waits_until_the_peer_confirmed_behind() {
    let mut pair = Pair::ahead(1024, ReplicationProtocol::A, pull_ahead(32 * 1024));
    pair.held[0] = true;
    for k in 0..3 {
        pair.write_run(k * 8, 8, 1);
    }
    assert_eq!(pair.replication(0), Some(ReplicationState::Ahead));
    let flush = pair.submit(0, AppRequest::Flush);
    pair.idle(100);
    assert_eq!(pair.result(flush), None, "flush completed before the peer knew");
    pair.held[0] = false;
    pair.run();
    pair.idle(100);
    assert_eq!(pair.result(flush), Some(&Ok(None)));
    pair.heal();
    assert!(pair.disks[0] == pair.disks[1]);
}

/// A Behind peer's data is old: it refuses promotion (also once the link is gone), and the
/// reconnect resyncs it from the primary.
#[test]
fn behind_peer_cannot_be_promoted() {
    let mut pair = Pair::ahead(1024, ReplicationProtocol::A, pull_ahead(32 * 1024));
    pair.held[0] = true;
    for k in 0..10 {
        pair.write_run(k * 8, 8, 1);
    }
    pair.held = [false, true];
    pair.run();
    assert_eq!(pair.replication(1), Some(ReplicationState::Behind));
    let now = pair.tick();
    assert_eq!(pair.nodes[1].handle_promote(now, false), Err(StateError::PeerIsPrimary(NodeId(0))));
    pair.cut();
    let now = pair.tick();
    let refused = pair.nodes[1].handle_promote(now, false);
    assert_eq!(refused, Err(StateError::NoUpToDateData(DiskState::Outdated)));
    assert!(refused.unwrap_err().to_string().contains("promotion needs UpToDate data"));
    assert_eq!(pair.nodes[1].role(), Role::Secondary);
    // More writes while apart, then the reconnect resyncs all of it.
    pair.write_run(500, 8, 2);
    pair.connect();
    pair.heal();
    assert!(pair.disks[0] == pair.disks[1]);
}

/// `on-congestion disconnect`: the congested connection is dropped (and re-established by the
/// driver; its handshake resyncs what the peer missed).
#[test]
fn disconnect_policy_drops_the_link() {
    let congestion = CongestionConfig {
        on_congestion: OnCongestion::Disconnect,
        fill_bytes: 32 * 1024,
        extents: None,
    };
    let mut pair = Pair::ahead(1024, ReplicationProtocol::A, congestion);
    pair.held[0] = true;
    let requests: Vec<RequestId> = (0..4).map(|k| pair.write_run(k * 8, 8, 1)).collect();
    assert_ne!(pair.nodes[0].connection_state(other(0)), Some(ConnectionState::Connected));
    assert!(pair.events.iter().any(|(i, e)| *i == 0
        && matches!(
            e,
            Event::ConnectionStateChanged { state: ConnectionState::NetworkFailure, .. }
        )));
    assert!(!pair.saw(0, ReplicationState::Ahead));
    for request in requests {
        assert_eq!(pair.result(request), Some(&Ok(None)));
    }
    pair.connect();
    pair.heal();
    assert!(pair.disks[0] == pair.disks[1]);
}

/// `block` (the default) keeps today's behaviour: the writes stay on the link.
#[test]
fn block_policy_keeps_sending() {
    let congestion = CongestionConfig {
        on_congestion: OnCongestion::Block,
        fill_bytes: 32 * 1024,
        extents: None,
    };
    let mut pair = Pair::ahead(1024, ReplicationProtocol::A, congestion);
    pair.held[0] = true;
    for k in 0..8 {
        pair.write_run(k * 8, 8, 1);
    }
    assert_eq!(pair.replication(0), Some(ReplicationState::Established));
    assert_eq!(pair.nodes[0].in_flight_bytes(other(0)), 8 * 32 * 1024);
    pair.heal();
    assert!(pair.disks[0] == pair.disks[1]);
}

/// DRBD allows a policy other than block only with protocol A; a node configured otherwise
/// anyway blocks.
#[test]
fn congestion_policies_need_protocol_a() {
    for (protocol, name) in [(ReplicationProtocol::B, 'B'), (ReplicationProtocol::C, 'C')] {
        for policy in [OnCongestion::PullAhead, OnCongestion::Disconnect] {
            let config = CongestionConfig { on_congestion: policy, fill_bytes: 1, extents: None };
            let error = config.check(protocol).unwrap_err().to_string();
            assert!(error.contains(policy.as_str()), "{error}");
            assert!(error.contains(&format!("protocol {name}")), "{error}");
            assert!(error.contains("needs protocol A"), "{error}");
        }
    }
    let block = CongestionConfig { fill_bytes: 1, ..Default::default() };
    assert!(block.check(ReplicationProtocol::C).is_ok());
    assert!(pull_ahead(1).check(ReplicationProtocol::A).is_ok());
    let mut pair = Pair::ahead(1024, ReplicationProtocol::C, pull_ahead(32 * 1024));
    pair.held[0] = true;
    for k in 0..4 {
        pair.write_run(k * 8, 8, 1);
    }
    assert_eq!(pair.replication(0), Some(ReplicationState::Established));
    pair.heal();
    assert!(pair.disks[0] == pair.disks[1]);
}

/// With fencing, a peer we went Ahead of that has not confirmed Behind yet may still take
/// itself for UpToDate: losing it then is losing a replicating peer (fence-peer runs and I/O
/// waits for it). Once it confirmed, it is known Outdated and needs no fence.
#[test]
fn losing_an_unconfirmed_behind_peer_is_fenced() {
    for confirmed in [false, true] {
        let mut pair = Pair::ahead_fenced(
            1024,
            ReplicationProtocol::A,
            pull_ahead(32 * 1024),
            Fencing::ResourceOnly,
        );
        pair.held[0] = true;
        for k in 0..3 {
            pair.write_run(k * 8, 8, 1);
        }
        assert_eq!(pair.replication(0), Some(ReplicationState::Ahead));
        if confirmed {
            pair.held[0] = false;
            pair.run();
            // Outdated, or already Inconsistent if the resync started.
            let peer_disk = pair.nodes[0].peer_disk_state(other(0));
            assert!(peer_disk < Some(DiskState::DUnknown), "{peer_disk:?}");
            pair.held[0] = true;
        }
        pair.cut();
        let request = pair.write_run(100, 1, 2);
        let fenced =
            pair.events.iter().any(|(i, e)| *i == 0 && matches!(e, Event::FencePeer { .. }));
        assert_eq!(fenced, !confirmed, "confirmed={confirmed}");
        if confirmed {
            assert_eq!(pair.result(request), Some(&Ok(None)));
        } else {
            assert_eq!(pair.result(request), None, "completed before the fence answered");
            let now = pair.tick();
            pair.nodes[0].handle_fence_outcome(now, other(0), FenceOutcome::PeerOutdated);
            pair.run();
            assert_eq!(pair.result(request), Some(&Ok(None)));
        }
        pair.connect();
        pair.heal();
        assert!(pair.disks[0] == pair.disks[1]);
    }
}

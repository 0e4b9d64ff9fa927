//! Two real engines (`ReplicatedDevice`) in one process over loopback TCP, shared by the driver
//! tests (`atomic_driver.rs`, `gathered_driver.rs`, `meta_internal_driver.rs`,
//! `metafail_driver.rs`, `resize.rs`): node 0 and node 1, each the other's only peer.

use std::path::Path;
use std::time::{Duration, Instant};

use drbd_engine::NodeId;
use drbd_engine::driver::{DriverConfig, MetaFormat, ReplicatedDevice};
use drbd_engine::protocol::{Fencing, ReplicationProtocol, ReplicationState, ResyncRate};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Node `node`'s (0 or 1) configuration in a pair listening on `ports`: the sync engine without
/// O_DIRECT, protocol C, no fencing, a fast fixed resync rate, every other setting its default.
/// Tests that need another value override it with `DriverConfig { .., ..pair_config(..) }`.
pub fn pair_config(
    node: u8,
    ports: [u16; 2],
    size_bytes: u64,
    backing_path: &Path,
    meta_path: &Path,
    meta_format: MetaFormat,
) -> DriverConfig {
    let address = |n: u8| -> std::net::SocketAddr {
        format!("127.0.0.1:{}", ports[usize::from(n)]).parse().unwrap()
    };
    DriverConfig {
        node_id: NodeId(node),
        listen: address(node),
        peers: vec![(NodeId(1 - node), address(1 - node))],
        backing_path: backing_path.to_path_buf(),
        size_bytes,
        engine: backing_store::EngineKind::Sync,
        direct_io: false,
        meta_path: meta_path.to_path_buf(),
        meta_format,
        protocol: ReplicationProtocol::C,
        fencing: Fencing::DontCare,
        resync_rate: ResyncRate::Fixed { rate_kib_per_s: 100_000 },
        al_extents: 1237,
        digests: Default::default(),
        quorum: Default::default(),
        after_sb: Default::default(),
        shared_secret: None,
        on_io_error: Default::default(),
        congestion: Default::default(),
    }
}

/// [`pair_config`] with sidecar metadata: `dir/node{node}.img` and `dir/node{node}.md`.
pub fn sidecar_config(dir: &Path, node: u8, ports: [u16; 2], size_bytes: u64) -> DriverConfig {
    let backing = dir.join(format!("node{node}.img"));
    let meta = dir.join(format!("node{node}.md"));
    pair_config(node, ports, size_bytes, &backing, &meta, MetaFormat::Sidecar)
}

/// [`pair_config`] with internal metadata at the end of `path`.
pub fn internal_config(path: &Path, node: u8, ports: [u16; 2], size_bytes: u64) -> DriverConfig {
    pair_config(node, ports, size_bytes, path, path, MetaFormat::V09Internal)
}

/// Starts node 0's engine, then node 1's, each with `config(node)`; their driver tasks run
/// until the runtime ends.
pub async fn start_pair(config: impl Fn(u8) -> DriverConfig) -> [ReplicatedDevice; 2] {
    let (first, _task) = ReplicatedDevice::start(config(0)).await.unwrap();
    let (second, _task) = ReplicatedDevice::start(config(1)).await.unwrap();
    [first, second]
}

/// A sidecar pair in `dir` ([`sidecar_config`]), connected, its all-zero replicas declared
/// identical (no initial sync), node 0 promoted.
pub async fn start_primary_pair(
    dir: &Path,
    ports: [u16; 2],
    size_bytes: u64,
) -> [ReplicatedDevice; 2] {
    let devices = start_pair(|node| sidecar_config(dir, node, ports, size_bytes)).await;
    wait_connected(&devices).await;
    devices[0].new_current_uuid_clear_bitmap().await.unwrap();
    devices[0].promote(false).await.unwrap();
    devices
}

/// Waits (30 s at most) until every peer of every device is Established.
pub async fn wait_connected(devices: &[ReplicatedDevice]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut connected = true;
        for device in devices {
            let status = device.status().await.unwrap();
            connected &=
                status.peers.iter().all(|p| p.replication == ReplicationState::Established);
        }
        if connected {
            return;
        }
        assert!(Instant::now() < deadline, "the engines did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Block `block`'s 4 KiB of test data, varied by `seed`.
pub fn pattern(block: u64, seed: u8) -> Vec<u8> {
    (0..4096u64).map(|i| u8::try_from((i * 7 + block * 13) % 251).unwrap() ^ seed).collect()
}

//! Bursts of adjacent writes through two real engines on loopback: the driver hands a round's
//! adjacent plain writes to the disk as one gathered write (one pwritev) on the primary and on
//! the secondary, and every block must land where its own request said, on both replicas,
//! whatever the mix (sequential 4 KiB bursts, larger writes inside a run, FUA and non-adjacent
//! writes breaking runs, rewrites of earlier bursts).

use std::time::{Duration, Instant};

use bytes::Bytes;
use drbd_engine::NodeId;
use drbd_engine::driver::{DriverConfig, MetaFormat, ReplicatedDevice};
use drbd_engine::protocol::{Fencing, ReplicationProtocol, ReplicationState, ResyncRate};

const SIZE_BYTES: u64 = 16 * 1024 * 1024;
const BLOCK: u64 = 4096;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config(dir: &std::path::Path, node: u8, ports: [u16; 2]) -> DriverConfig {
    let peer = 1 - node;
    let address = |n: u8| -> std::net::SocketAddr {
        format!("127.0.0.1:{}", ports[usize::from(n)]).parse().unwrap()
    };
    DriverConfig {
        node_id: NodeId(node),
        listen: address(node),
        peers: vec![(NodeId(peer), address(peer))],
        backing_path: dir.join(format!("node{node}.img")),
        size_bytes: SIZE_BYTES,
        engine: backing_store::EngineKind::Sync,
        direct_io: false,
        meta_path: dir.join(format!("node{node}.md")),
        meta_format: MetaFormat::Sidecar,
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

async fn wait_connected(devices: &[ReplicatedDevice]) {
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

/// Distinct content per (burst, block), so a block written at the wrong place shows.
fn content(burst: u64, first_block: u64, blocks: u64) -> Bytes {
    let mut data = Vec::with_capacity(usize::try_from(blocks * BLOCK).unwrap());
    for block in first_block..first_block + blocks {
        let mut page = vec![0u8; usize::try_from(BLOCK).unwrap()];
        for (i, byte) in page.iter_mut().enumerate() {
            *byte = u8::try_from((burst * 131 + block * 7 + i as u64 / 8) % 251).unwrap();
        }
        data.extend_from_slice(&page);
    }
    Bytes::from(data)
}

#[test]
fn bursts_of_adjacent_writes_land_block_for_block_on_both_replicas() {
    // Each burst: (first block, [(blocks, fua)] written back to back from there, all issued
    // at once so they share the engine's rounds). Block counts above 16 exceed what the driver
    // gathers (64 KiB) and go alone; a FUA write is never gathered and splits the run.
    let bursts: Vec<(u64, Vec<(u64, bool)>)> = vec![
        (0, vec![(1, false); 64]),
        (
            100,
            vec![
                (1, false),
                (2, false),
                (16, false),
                (1, false),
                (1, true),
                (1, false),
                (1, false),
            ],
        ),
        (300, vec![(32, false), (1, false), (1, false), (3, false)]),
        // Rewrites the first burst's blocks: the newer data must win on both replicas.
        (10, vec![(1, false); 40]),
        // Ends at the device's last block.
        (SIZE_BYTES / BLOCK - 24, vec![(1, false); 24]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let mut model = vec![0u8; usize::try_from(SIZE_BYTES).unwrap()];
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut devices = Vec::new();
        for node in 0..2 {
            let (device, _task) =
                ReplicatedDevice::start(config(dir.path(), node, ports)).await.unwrap();
            devices.push(device);
        }
        wait_connected(&devices).await;
        devices[0].new_current_uuid_clear_bitmap().await.unwrap();
        devices[0].promote(false).await.unwrap();
        for (burst, (first, writes)) in bursts.iter().enumerate() {
            let mut tasks = Vec::new();
            let mut block = *first;
            for (blocks, fua) in writes {
                let data = content(burst as u64, block, *blocks);
                let start = usize::try_from(block * BLOCK).unwrap();
                model[start..start + data.len()].copy_from_slice(&data);
                let device = devices[0].clone();
                let (offset, fua) = (block * BLOCK, *fua);
                tasks.push(tokio::spawn(async move { device.write(offset, data, fua).await }));
                block += blocks;
            }
            for task in tasks {
                task.await.unwrap().unwrap();
            }
        }
        devices[0].flush().await.unwrap();
    });
    drop(runtime);
    for node in 0..2 {
        let image = std::fs::read(dir.path().join(format!("node{node}.img"))).unwrap();
        let data = &image[..model.len()];
        if let Some(at) = data.iter().zip(&model).position(|(a, b)| a != b) {
            panic!("node {node}: block {} differs from what was written", at as u64 / BLOCK);
        }
    }
}

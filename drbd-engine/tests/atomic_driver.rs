//! WRITE ATOMIC through two real engines on loopback: both replicas journal it and hold all of
//! it, the limit is one request, and a journal record a crash left pending is replayed before
//! the engine serves anything.

use std::time::{Duration, Instant};

use backing_store::atomic_journal::{Record, RecordState, encode, journal_bytes, journal_path};
use bytes::Bytes;
use drbd_engine::NodeId;
use drbd_engine::constants::ATOMIC_WRITE_BYTES_MAX;
use drbd_engine::driver::{DeviceError, DriverConfig, MetaFormat, ReplicatedDevice};
use drbd_engine::protocol::{
    DiskState, Fencing, ReplicationProtocol, ReplicationState, ResyncRate,
};

const SIZE_BYTES: u64 = 16 * 1024 * 1024;
const SLOT_BYTES: usize = 1024 * 1024;

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

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut data, offset).unwrap();
    data
}

#[test]
fn a_one_mebibyte_atomic_write_is_journaled_and_whole_on_both_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let offset = SIZE_BYTES - ATOMIC_WRITE_BYTES_MAX;
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
        assert_eq!(devices[0].atomic_write_max_bytes(), ATOMIC_WRITE_BYTES_MAX);
        let data = Bytes::from(vec![0xa6; SLOT_BYTES]);
        devices[0].write_atomic(offset, data, false).await.unwrap();
        devices[0].write_atomic(0, Bytes::from(vec![0x5c; 4096]), true).await.unwrap();
        let too_long = Bytes::from(vec![1; SLOT_BYTES + 4096]);
        let refused = devices[0].write_atomic(0, too_long, false).await;
        assert!(matches!(refused, Err(DeviceError::AtomicTooLong { .. })), "{refused:?}");
        assert_eq!(devices[1].status().await.unwrap().disk, DiskState::UpToDate);
    });
    drop(runtime);
    for node in 0..2 {
        let image = dir.path().join(format!("node{node}.img"));
        assert!(read_at(&image, offset, SLOT_BYTES).iter().all(|&b| b == 0xa6), "node {node}");
        assert!(read_at(&image, 0, 4096).iter().all(|&b| b == 0x5c), "node {node}");
        // Both went through the journal: its last record is applied.
        let journal = std::fs::read(journal_path(&image)).unwrap();
        let header = backing_store::atomic_journal::decode(&journal[..4096]).unwrap();
        let backing_store::atomic_journal::Decoded::Valid(record) = header else {
            panic!("node {node}: no journal record: {header:?}")
        };
        assert_eq!((record.state, record.sequence), (RecordState::Applied, 2), "node {node}");
    }
}

#[test]
fn a_pending_journal_record_is_replayed_before_the_engine_serves() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let image = dir.path().join("node0.img");
    // What a crash between the journal write and the applied mark leaves: the record and the
    // data in the journal, the image holding only half of it (a torn in-place write).
    let offset = 8 * 4096;
    let data = vec![0x3c; SLOT_BYTES];
    let record = Record {
        state: RecordState::Pending,
        sequence: 5,
        offset_bytes: offset,
        length_bytes: u32::try_from(SLOT_BYTES).unwrap(),
        data_crc32c: crc32c::crc32c(&data),
    };
    let mut journal = encode(&record).to_vec();
    journal.extend_from_slice(&data);
    assert_eq!(journal.len() as u64, journal_bytes(u32::try_from(SLOT_BYTES).unwrap()));
    std::fs::write(journal_path(&image), &journal).unwrap();
    let mut torn = vec![0u8; usize::try_from(SIZE_BYTES).unwrap()];
    let start = usize::try_from(offset).unwrap();
    torn[start..start + SLOT_BYTES / 2].fill(0x3c);
    std::fs::write(&image, &torn).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (device, _task) = ReplicatedDevice::start(config(dir.path(), 0, ports)).await.unwrap();
        device.promote(true).await.unwrap();
        let read = device.read(offset, SLOT_BYTES as u64).await.unwrap();
        assert!(read.iter().all(|&b| b == 0x3c), "the record was not replayed whole");
    });
}

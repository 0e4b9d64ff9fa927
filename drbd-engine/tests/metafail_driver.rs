//! A failed metadata write through the driver (`ReplicatedDevice`), two nodes in one process
//! over loopback TCP. The fault: the sidecar metadata is replaced atomically through
//! `<meta>.tmp` on every update, and a directory in that place makes the next update fail
//! (as ENOSPC on a full file system would, without needing a mount). The driver used to
//! panic; now the primary detaches, keeps serving through its peer, reports why in
//! `Status::disk_error`, and re-attaches with a full resync once the fault is gone.

use std::path::Path;
use std::time::{Duration, Instant};

use drbd_engine::NodeId;
use drbd_engine::constants::AL_EXTENT_BLOCKS;
use drbd_engine::driver::{DriverConfig, MetaFormat, ReplicatedDevice, Status};
use drbd_engine::protocol::node::{Fencing, ReplicationProtocol};
use drbd_engine::protocol::{DiskState, ReplicationState, ResyncRate, Role};

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 16 * MIB;
const BLOCK: u64 = 4096;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn block(n: u64, generation: u8) -> Vec<u8> {
    let mut data = vec![generation; 4096];
    data[..8].copy_from_slice(&n.to_le_bytes());
    data
}

fn config(node: u8, ports: [u16; 2], dir: &Path) -> DriverConfig {
    let address = |n: u8| format!("127.0.0.1:{}", ports[usize::from(n)]).parse().unwrap();
    DriverConfig {
        node_id: NodeId(node),
        listen: address(node),
        peers: vec![(NodeId(1 - node), address(1 - node))],
        backing_path: dir.join(format!("node{node}.img")),
        size_bytes: SIZE_BYTES,
        engine: backing_store::EngineKind::Sync,
        direct_io: false,
        meta_path: dir.join(format!("node{node}.tmeta")),
        meta_format: MetaFormat::Sidecar,
        protocol: ReplicationProtocol::C,
        fencing: Fencing::DontCare,
        resync_rate: ResyncRate::Fixed { rate_kib_per_s: 400_000 },
        al_extents: 64,
        digests: Default::default(),
        quorum: Default::default(),
        after_sb: Default::default(),
        shared_secret: None,
        on_io_error: Default::default(),
        congestion: Default::default(),
    }
}

async fn wait_until(
    device: &ReplicatedDevice,
    what: &str,
    done: impl Fn(&Status) -> bool,
) -> Status {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = device.status().await.expect("the driver answers");
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_failing_metadata_write_detaches_instead_of_panicking_and_attach_resyncs_fully() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (a, _a_task) = ReplicatedDevice::start(config(0, ports, dir.path())).await.unwrap();
        let (b, _b_task) = ReplicatedDevice::start(config(1, ports, dir.path())).await.unwrap();
        let connected =
            |s: &Status| s.peers.iter().all(|p| p.replication == ReplicationState::Established);
        wait_until(&a, "connected", connected).await;
        a.new_current_uuid_clear_bitmap().await.unwrap();
        a.promote(false).await.unwrap();
        for n in 0..8 {
            a.write(n * BLOCK, block(n, 1).into(), false).await.unwrap();
        }

        // The fault: the next metadata update cannot create its temporary file.
        std::fs::create_dir(dir.path().join("node0.tmp")).unwrap();
        let cold = 2 * AL_EXTENT_BLOCKS;
        a.write(cold * BLOCK, block(cold, 2).into(), false).await.expect("through the peer");
        let status = a.status().await.expect("the driver is alive, not panicked");
        assert_eq!(status.disk, DiskState::Diskless);
        assert_eq!(status.role, Role::Primary);
        let error = status.disk_error.expect("the reason is reported");
        assert!(error.contains("metadata update failed"), "{error}");
        for n in 8..16 {
            a.write(n * BLOCK, block(n, 3).into(), false).await.unwrap();
        }
        for (n, generation) in [(0, 1), (cold, 2), (12, 3)] {
            let data = a.read(n * BLOCK, BLOCK).await.unwrap();
            assert!(data.as_ref() == block(n, generation).as_slice(), "block {n} reads back");
        }
        // The data write behind the failed activity-log update never reached the disk.
        let a_disk = std::fs::read(dir.path().join("node0.img")).unwrap();
        let at = usize::try_from(cold * BLOCK).unwrap();
        assert!(a_disk[at..at + 4096].iter().all(|b| *b == 0), "not on the failed disk");

        // The fault is gone: attach as Secondary does a full resync.
        std::fs::remove_dir(dir.path().join("node0.tmp")).unwrap();
        a.demote().await.unwrap();
        // (Refused while writes from before the detach wait for their barrier.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = a.attach().await {
            assert!(Instant::now() < deadline, "attach: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = wait_until(&a, "resynced", |s| {
            s.disk == DiskState::UpToDate && s.resync_blocks_received > 0 && connected(s)
        })
        .await;
        assert_eq!(status.resync_blocks_received, SIZE_BYTES / BLOCK, "a full resync");
        assert_eq!(status.disk_error, None);
        let a_disk = std::fs::read(dir.path().join("node0.img")).unwrap();
        let b_disk = std::fs::read(dir.path().join("node1.img")).unwrap();
        assert!(a_disk == b_disk, "replicas identical after the resync");
        drop(b);
    });
}

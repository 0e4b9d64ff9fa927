//! Online grow through the driver, with internal metadata: both backing files grow, `resize`
//! on the primary grows both replicas without a resync (the new blocks are a fresh zero area
//! on each), the metadata moves to the new end where drbdmeta reads it with the new la-size;
//! a peer disconnected during a resize grows on reconnect and resyncs just the new blocks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drbd_engine::NodeId;
use drbd_engine::driver::meta_v09::V09File;
use drbd_engine::driver::{DriverConfig, MetaFormat, ReplicatedDevice, Status};
use drbd_engine::meta::{AlGeometry, MetaLayout};
use drbd_engine::protocol::node::{Fencing, ReplicationProtocol};
use drbd_engine::protocol::{DiskState, ReplicationState, ResyncRate};

const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn drbdmeta() -> Option<PathBuf> {
    ["/usr/sbin/drbdmeta", "/sbin/drbdmeta", "/usr/local/sbin/drbdmeta"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| p.is_file())
}

/// `drbdmeta --force - v09 FILE internal dump-md`.
fn dump_md(program: &Path, file: &Path) -> String {
    let output = Command::new(program)
        .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
        .args(["--force", "-", "v09"])
        .arg(file)
        .args(["internal", "dump-md"])
        .output()
        .expect("drbdmeta runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "dump-md failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn la_size_sect(dump: &str) -> u64 {
    dump.lines()
        .find_map(|l| l.trim().strip_prefix("la-size-sect "))
        .expect("la-size-sect")
        .trim_end_matches(';')
        .parse()
        .unwrap()
}

fn grow(path: &Path, size: u64) {
    File::options().write(true).open(path).unwrap().set_len(size).unwrap();
}

fn pattern(block: u64, seed: u8) -> Vec<u8> {
    (0..4096u64).map(|i| u8::try_from((i * 7 + block * 13) % 251).unwrap() ^ seed).collect()
}

async fn wait_for(
    devices: &[ReplicatedDevice],
    what: &str,
    done: impl Fn(&Status, &Status) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = devices[0].status().await.unwrap();
        let b = devices[1].status().await.unwrap();
        if done(&a, &b) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {a:?}\n{b:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn in_sync(a: &Status, b: &Status) -> bool {
    b.disk == DiskState::UpToDate
        && [a, b].iter().all(|s| {
            s.peers.iter().all(|p| {
                p.replication == ReplicationState::Established && p.out_of_sync_blocks == 0
            })
        })
}

/// The data areas (the device) of both files are equal up to `size`.
fn assert_same_data(paths: &[PathBuf; 2], size: u64) {
    let files = paths.each_ref().map(|p| File::open(p).unwrap());
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let len = usize::try_from((size - at).min(MIB)).unwrap();
        files[0].read_exact_at(&mut a[..len], at).unwrap();
        files[1].read_exact_at(&mut b[..len], at).unwrap();
        assert!(a[..len] == b[..len], "data differs in the MiB at {at}");
        at += len as u64;
    }
}

#[test]
fn online_grow_moves_internal_metadata_and_a_missed_resize_is_learned_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let paths = [dir.path().join("node0.img"), dir.path().join("node1.img")];
    for path in &paths {
        File::create(path).unwrap().set_len(32 * MIB).unwrap();
        V09File::create_internal(path, NodeId(0), 1, 1237).map(|_| ()).unwrap_or_else(|e| {
            panic!("create-md: {e}");
        });
    }
    // create_internal names node 0: redo node 1's with its own id.
    std::fs::remove_file(&paths[1]).unwrap();
    File::create(&paths[1]).unwrap().set_len(32 * MIB).unwrap();
    V09File::create_internal(&paths[1], NodeId(1), 1, 1237).unwrap();
    let data_bytes = |file_bytes: u64| {
        MetaLayout::internal(file_bytes, 1, AlGeometry::default()).unwrap().data_size_bytes
    };

    let ports = [free_port(), free_port()];
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut devices = Vec::new();
        for node in 0..2u8 {
            let address = |n: u8| -> std::net::SocketAddr {
                format!("127.0.0.1:{}", ports[usize::from(n)]).parse().unwrap()
            };
            let path = &paths[usize::from(node)];
            let config = DriverConfig {
                node_id: NodeId(node),
                listen: address(node),
                peers: vec![(NodeId(1 - node), address(1 - node))],
                backing_path: path.clone(),
                size_bytes: 32 * MIB,
                engine: backing_store::EngineKind::Sync,
                direct_io: false,
                meta_path: path.clone(),
                meta_format: MetaFormat::V09Internal,
                protocol: ReplicationProtocol::C,
                fencing: Fencing::DontCare,
                resync_rate: ResyncRate::Fixed { rate_kib_per_s: 200_000 },
                al_extents: 1237,
                digests: Default::default(),
                quorum: Default::default(),
                after_sb: Default::default(),
                shared_secret: None,
                on_io_error: Default::default(),
                congestion: Default::default(),
            };
            let (device, _task) = ReplicatedDevice::start(config).await.unwrap();
            devices.push(device);
        }
        wait_for(&devices, "the first connection", |a, _| {
            a.peers.iter().all(|p| p.replication == ReplicationState::Established)
        })
        .await;
        devices[0].new_current_uuid_clear_bitmap().await.unwrap();
        devices[0].promote(false).await.unwrap();
        wait_for(&devices, "UpToDate", in_sync).await;
        let size0 = devices[0].size_bytes();
        assert_eq!(size0, data_bytes(32 * MIB));
        for block in 0..64 {
            devices[0].write(block * 4096, pattern(block, 1).into(), false).await.unwrap();
        }

        // Nothing grew: nothing to do.
        assert_eq!(devices[0].resize().await.unwrap(), (size0, size0));
        // A secondary does not start a resize.
        assert!(devices[1].resize().await.is_err());

        // Both grow, the primary resizes: both replicas take the new size, no resync.
        for path in &paths {
            grow(path, 64 * MIB);
        }
        let size1 = data_bytes(64 * MIB);
        assert_eq!(devices[0].resize().await.unwrap(), (size0, size1));
        wait_for(&devices, "the peer's grow", |a, b| {
            a.size_bytes == size1 && b.size_bytes == size1 && in_sync(a, b)
        })
        .await;
        assert_eq!(devices[1].size_bytes(), size1);
        let last = size1 / 4096 - 1;
        devices[0].write(last * 4096, pattern(last, 2).into(), true).await.unwrap();
        devices[0].write(size0, pattern(size0 / 4096, 3).into(), true).await.unwrap();
        let status = devices[1].status().await.unwrap();
        assert_eq!(status.resync_blocks_received, 0, "a fresh zero area needs no resync");

        // The peer misses the next resize: the primary marks the new blocks for it, the peer
        // grows in the handshake and resyncs exactly those.
        devices[0].disconnect(NodeId(1)).await.unwrap();
        // Writes the peer had not confirmed stable (no barrier ack yet) are marked at the
        // disconnect, as DRBD does; the resize adds exactly the new blocks to them.
        let unconfirmed = devices[0].status().await.unwrap().peers[0].out_of_sync_blocks;
        for path in &paths {
            grow(path, 96 * MIB);
        }
        let size2 = data_bytes(96 * MIB);
        assert_eq!(devices[0].resize().await.unwrap(), (size1, size2));
        let marked = devices[0].status().await.unwrap().peers[0].out_of_sync_blocks;
        assert_eq!(marked, unconfirmed + (size2 - size1) / 4096);
        devices[0].write(size2 - 4096, pattern(9, 4).into(), false).await.unwrap();
        devices[0].connect(NodeId(1), false).await.unwrap();
        wait_for(&devices, "the reconnect's grow and resync", |a, b| {
            b.size_bytes == size2 && in_sync(a, b)
        })
        .await;
        let received = devices[1].status().await.unwrap().resync_blocks_received;
        assert_eq!(received, marked, "just the new blocks and the unconfirmed writes");
        devices[0].flush().await.unwrap();
        devices[0].demote().await.unwrap();
        assert_same_data(&paths, size2);
    });
    drop(runtime);
    let Some(program) = drbdmeta() else {
        eprintln!("drbdmeta not found (drbd-utils): dump-md check skipped");
        return;
    };
    for path in &paths {
        let dump = dump_md(&program, path);
        assert_eq!(la_size_sect(&dump), data_bytes(96 * MIB) / 512, "{dump}");
        assert!(!dump.contains("resized"), "metadata at the end, not a last known position");
    }
}

//! `on-io-error detach` with two real replication engines (`tandem-replica`) over loopback TCP:
//! the primary's backing file lives on a small tmpfs that fills up while a write stream runs.
//! The full disk (ENOSPC) detaches it; it goes Diskless and keeps serving: every write of the
//! stream is acknowledged, every acknowledged write is on the peer and reads back through the
//! diskless primary (reads travel to the peer). After the file system grows, `attach` resyncs
//! exactly what the peer marked while the disk was gone, and the replicas' data are identical.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test engine_detach -- --nocapture`

use std::path::Path;
use std::time::Duration;

use tests::replica::{Node, Replica};
use tests::small_fs::SmallFs;

/// The device: 64 MiB; the primary's file system: 8 MiB, so the stream fills it.
const DEVICE_BYTES: u64 = 64 * 1024 * 1024;
const SMALL_FS_MIB: u64 = 8;
/// 4 KiB blocks streamed: 16 MiB, twice what the small file system holds.
const STREAM_BLOCKS: u64 = 4096;

/// Node `id` of two on loopback, with `on-io-error detach`.
fn node(id: u8, port: u16, peer_port: u16, backing: &Path, meta: &Path) -> Node {
    Node {
        id,
        port,
        peer_id: 1 - id,
        peer_port,
        backing: backing.to_path_buf(),
        meta: meta.to_path_buf(),
        size_bytes: DEVICE_BYTES,
    }
}

const DETACH: &[&str] = &["--on-io-error", "detach"];

#[test]
fn a_full_disk_detaches_the_primary_which_keeps_serving_and_resyncs_after_attach() {
    tests::require_slow!();
    tests::require_tool("mount", "mount");
    let dir = tempfile::tempdir().expect("temp dir");
    let small = SmallFs::mount(dir.path().join("small"), SMALL_FS_MIB);
    let (pa, pb) = (tests::free_port(), tests::free_port());
    // The primary's data on the small file system, its metadata (flex-external) beside the
    // peer's on the roomy one: the data area fills, the metadata stays writable.
    let a_backing = small.path.join("a.img");
    let b_backing = dir.path().join("b.img");
    let a_node = node(0, pa, pb, &a_backing, &dir.path().join("a.md"));
    let b_node = node(1, pb, pa, &b_backing, &dir.path().join("b.md"));
    let mut a = Replica::start("a", &a_node, dir.path(), DETACH);
    let mut b = Replica::start("b", &b_node, dir.path(), DETACH);
    let long = Duration::from_secs(60);
    a.ok("wait-connected 20000", long);
    a.ok("new-current-uuid", long);
    a.ok("primary", long);

    // Local reads, for comparison with reads through the peer below.
    a.ok("write 0 64 1", long);
    let local = a.ok("read-latency 0 2000", long);

    // Stream twice what the file system holds: the disk fills, the primary detaches, and the
    // stream goes on through the peer. Every write is acknowledged.
    a.stream_all_acked(0, STREAM_BLOCKS, 2, 16, long);
    assert_eq!(a.status_value("disk"), "Diskless", "the full disk was detached");
    assert_eq!(a.status_value("role"), "Primary");
    let log = a.log_text();
    assert!(log.contains("local I/O failed"), "the error is logged:\n{log}");
    assert!(log.contains("Detached"), "the detach is logged:\n{log}");
    // The peer marked everything written while the disk was gone.
    let marked: u64 = b.status_value("oos").parse().unwrap();
    assert!(marked > 0, "the peer tracks the detached disk");

    // Every acknowledged write reads back through the diskless primary (from the peer).
    a.ok(&format!("check 0 {STREAM_BLOCKS} 2"), long);
    let remote = a.ok("read-latency 0 2000", long);
    println!("4 KiB QD1 reads: local {local}; through the peer {remote}");

    // Re-attach once the file system has room: as Secondary, it resyncs from the peer.
    a.ok("secondary", long);
    small.grow(128);
    a.ok("attach", long);
    a.ok("wait-synced 60000", long);
    let resynced: u64 = a.status_value("resync_received").parse().unwrap();
    println!("after attach, resync copied {resynced} blocks of {STREAM_BLOCKS} streamed");
    assert!(resynced > 0, "the blocks written while detached travel");
    assert!(resynced < DEVICE_BYTES / 4096, "a bitmap resync, not a full one: {resynced}");
    assert_eq!(a.status_value("disk"), "UpToDate");
    // The data areas (external metadata: the whole files) are identical.
    let a_data = std::fs::read(&a_backing).expect("a's data");
    let b_data = std::fs::read(&b_backing).expect("b's data");
    assert_eq!(a_data.len(), b_data.len());
    let differing = a_data.chunks(4096).zip(b_data.chunks(4096)).filter(|(x, y)| x != y).count();
    assert_eq!(differing, 0, "replicas differ in {differing} blocks after the resync");
    // And the re-attached node serves locally again as primary.
    a.ok("primary", long);
    a.ok(&format!("check 0 {STREAM_BLOCKS} 2"), long);
}

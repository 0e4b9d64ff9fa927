//! A failed metadata write with two real replication engines (`tandem-replica`) over loopback
//! TCP: the primary's metadata (the sidecar format, rewritten atomically on every update) lives
//! on a small tmpfs that is filled up. The next activity-log update fails with ENOSPC; instead
//! of panicking the engine treats it as a local disk failure: it detaches (Diskless), logs the
//! error, and every write of the stream is acknowledged through the peer and reads back. Once
//! the file system has room, `attach` does a full resync (a bitmap that failed to persist is
//! never trusted) and the replicas' data are identical.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test engine_metafail -- --nocapture`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::replica::{Node, Replica};
use tests::small_fs::SmallFs;

/// The device: 64 MiB (16384 blocks of 4 KiB, 16 activity-log extents).
const DEVICE_BYTES: u64 = 64 * 1024 * 1024;
const BLOCK_BYTES: u64 = 4096;
/// The primary's metadata file system: room for its metadata file and a rewrite of it.
const SMALL_FS_MIB: u64 = 1;
/// 4 KiB blocks streamed: 16 MiB, four activity-log extents, so the log must grow.
const STREAM_BLOCKS: u64 = 4096;

/// Node `id` of two on loopback: `on-io-error detach`, sidecar metadata at `meta`.
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

const DETACH_SIDECAR: &[&str] = &["--on-io-error", "detach", "--meta-format", "sidecar"];

/// Fills the file system under `dir` until it reports ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler file");
    let chunk = vec![0xa5u8; 4096];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = file.sync_all();
    path
}

#[test]
fn a_full_meta_disk_detaches_the_primary_which_keeps_serving_and_fully_resyncs_after_attach() {
    tests::require_slow!();
    tests::require_tool("mount", "mount");
    let dir = tempfile::tempdir().expect("temp dir");
    let small = SmallFs::mount(dir.path().join("small"), SMALL_FS_MIB);
    let (pa, pb) = (tests::free_port(), tests::free_port());
    // The primary's data on the roomy file system, its metadata on the small one.
    let a_backing = dir.path().join("a.img");
    let b_backing = dir.path().join("b.img");
    let a_node = node(0, pa, pb, &a_backing, &small.path.join("a.tmeta"));
    let b_node = node(1, pb, pa, &b_backing, &dir.path().join("b.tmeta"));
    let mut a = Replica::start("a", &a_node, dir.path(), DETACH_SIDECAR);
    let mut b = Replica::start("b", &b_node, dir.path(), DETACH_SIDECAR);
    let long = Duration::from_secs(60);
    a.ok("wait-connected 20000", long);
    a.ok("new-current-uuid", long);
    a.ok("primary", long);
    a.ok("write 0 64 1", long);
    assert_eq!(a.status_value("disk"), "UpToDate");

    // The metadata's file system fills up: the stream's first write to a cold extent needs an
    // activity-log update, which fails. Every write is still acknowledged, through the peer.
    let filler = fill(&small.path);
    a.stream_all_acked(0, STREAM_BLOCKS, 2, 16, long);
    assert_eq!(a.status_value("disk"), "Diskless", "the failed metadata detached the disk");
    assert_eq!(a.status_value("role"), "Primary");
    let log = a.log_text();
    assert!(log.contains("metadata update failed"), "the failure is logged:\n{log}");
    let status = a.status();
    assert!(status.contains("disk_error=\"metadata update failed"), "status names it: {status}");
    assert!(log.contains("No space left on device"), "the log names the error:\n{log}");
    assert!(log.contains("Detached"), "the detach is logged:\n{log}");
    assert!(!log.contains("panicked"), "no panic:\n{log}");
    let marked: u64 = b.status_value("oos").parse().unwrap();
    assert!(marked > 0, "the peer tracks the detached disk");

    // Every acknowledged write reads back through the diskless primary (from the peer).
    a.ok(&format!("check 0 {STREAM_BLOCKS} 2"), long);

    // Room again: re-attach as Secondary. The metadata that failed is not trusted: a full
    // resync from the peer, not one of the blocks it marked.
    a.ok("secondary", long);
    std::fs::remove_file(&filler).expect("removing the filler");
    a.ok("attach", long);
    a.ok("wait-synced 120000", long);
    assert_eq!(a.status_value("disk"), "UpToDate");
    let resynced: u64 = a.status_value("resync_received").parse().unwrap();
    println!("after attach, resync copied {resynced} blocks ({marked} marked by the peer)");
    assert_eq!(resynced, DEVICE_BYTES / BLOCK_BYTES, "a full resync");
    // The data areas (external metadata: the whole files) are identical.
    let a_data = std::fs::read(&a_backing).expect("a's data");
    let b_data = std::fs::read(&b_backing).expect("b's data");
    assert_eq!(a_data.len(), b_data.len());
    let differing = a_data.chunks(4096).zip(b_data.chunks(4096)).filter(|(x, y)| x != y).count();
    assert_eq!(differing, 0, "replicas differ in {differing} blocks after the resync");
    // And the re-attached node serves locally again as primary.
    a.ok("primary", long);
    a.ok(&format!("check 0 {STREAM_BLOCKS} 2"), long);
    assert!(!a.log_text().contains("panicked"));
    assert!(!b.log_text().contains("panicked"));
}

//! Three diskful replication engines (`tandem-replica`) in a full mesh over loopback TCP, quorum
//! majority: kill -9 the primary in the middle of a write stream, promote a secondary and
//! verify every acknowledged write on it; the two survivors resync between themselves only
//! what may differ (the dead primary's writes not yet reported stable everywhere), not the
//! device and not the earlier writes; the dead node comes
//! back and gets the new primary's writes; the third node, promoted last, holds everything.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test engine_mesh -- --nocapture`

use std::path::Path;
use std::time::Duration;

use tests::replica::{self, Replica};

const SIZE_BYTES: u64 = 64 * 1024 * 1024;
const DEVICE_BLOCKS: u64 = SIZE_BYTES / 4096;
/// Writes every node holds stably before the crash (closed by a flush).
const SETTLED_WRITES: u64 = 3000;
/// Writes of the stream the primary dies in, and how many of them are read as acknowledged
/// before the kill.
const LAST_STREAM_WRITES: u64 = 400;
const LAST_STREAM_ACKED: usize = 200;

/// Node `id` of three, listening on `ports[id]`.
fn start(name: &str, id: usize, ports: &[u16; 3], dir: &Path) -> Replica {
    let mut command = replica::command();
    command
        .args(["--node-id", &id.to_string()])
        .args(["--listen", &format!("127.0.0.1:{}", ports[id])])
        .arg("--backing")
        .arg(dir.join(format!("node{id}.img")))
        .arg("--meta")
        .arg(dir.join(format!("node{id}.md")))
        .args(["--size-bytes", &SIZE_BYTES.to_string()])
        .args(["--quorum", "majority"]);
    for (peer, port) in ports.iter().enumerate().filter(|(peer, _)| *peer != id) {
        command.args(["--peer", &format!("{peer}=127.0.0.1:{port}")]);
    }
    Replica::spawn(name, command, dir)
}

#[test]
fn three_diskful_nodes_fail_over_and_the_survivors_resync_only_their_difference() {
    tests::require_slow!();
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = [tests::free_port(), tests::free_port(), tests::free_port()];
    let long = Duration::from_secs(60);
    let mut a = start("a", 0, &ports, dir.path());
    let mut b = start("b", 1, &ports, dir.path());
    let mut c = start("c", 2, &ports, dir.path());
    for r in [&mut a, &mut b, &mut c] {
        r.ok("wait-connected 20000", long);
    }
    // A fresh, all-zero mesh: no initial sync.
    a.ok("new-current-uuid", long);
    a.ok("wait-synced 20000", long);
    a.ok("primary", long);

    // Writes (generation 1) that the flush makes stable on every node: the primary reports
    // them in sync everywhere, so the survivors hold none of them in doubt. Then a last stream,
    // and kill -9 the primary in the middle of it.
    a.stream_all_acked(0, SETTLED_WRITES, 1, 16, long);
    a.ok("flush", long);
    let mut acked =
        a.stream_until_acked(SETTLED_WRITES, LAST_STREAM_WRITES, 1, 16, LAST_STREAM_ACKED, long);
    a.kill9();
    acked.extend(0..SETTLED_WRITES);
    println!("killed the primary after {} acknowledged writes", acked.len());

    // B takes over (B and C are a majority) and holds every acknowledged write.
    b.promote();
    // The survivors resync what the dead primary may have left different between them.
    b.wait_status(&["peer2=Connected/Established/UpToDate"], long);
    c.wait_status(&["disk=UpToDate", "peer1=Connected/Established/UpToDate"], long);
    let survivors_copied = c.status_field("resync_received") + b.status_field("resync_received");
    println!("survivors resynced {survivors_copied} blocks between them (device: {DEVICE_BLOCKS})");
    // Only the last stream's writes may differ (how many of them depends on when the last
    // epoch closed, so on the disks' flush latency): not the settled writes, not the device.
    assert!(
        survivors_copied <= LAST_STREAM_WRITES,
        "only the last stream's {LAST_STREAM_WRITES} writes may differ, not {survivors_copied} blocks"
    );
    for block in &acked {
        let reply = b.cmd(&format!("check {block} 1 1"), long);
        assert_eq!(reply, "ok", "acknowledged block {block} lost on the promoted node");
    }
    println!("all {} acknowledged writes verified on the promoted node", acked.len());

    // The new primary writes while the old one is down; the old one comes back and catches up.
    b.ok("write 10000 100 2", long);
    let mut a = start("a2", 0, &ports, dir.path());
    a.wait_status(&["disk=UpToDate", "peer1=Connected/Established/UpToDate"], long);
    let a_copied = a.status_field("resync_received");
    println!("the old primary resynced {a_copied} blocks (100 new + its activity log)");
    assert!(a_copied >= 100, "the 100 new blocks must reach the old primary, got {a_copied}");
    assert!(a_copied < DEVICE_BLOCKS, "not a full sync: {a_copied}");
    b.wait_status(
        &["peer0=Connected/Established/UpToDate", "peer2=Connected/Established/UpToDate"],
        long,
    );

    // The third node, promoted last, holds every acknowledged write and the new ones.
    b.ok("secondary", long);
    c.promote();
    c.ok("check 10000 100 2", long);
    for block in acked.iter().filter(|b| **b < 10000) {
        assert_eq!(c.cmd(&format!("check {block} 1 1"), long), "ok", "block {block} on C");
    }
    c.ok("secondary", long);
    a.promote();
    a.ok("check 10000 100 2", long);
    for block in acked.iter().filter(|b| **b < 10000) {
        assert_eq!(a.cmd(&format!("check {block} 1 1"), long), "ok", "block {block} on A");
    }
}

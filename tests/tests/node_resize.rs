//! Online grow end to end (DRBD's `drbdadm resize`): two tandemd with `meta-disk internal`
//! and a 64 MiB volume; under a write load from QEMU's iSCSI initiator, `tandemadm resize
//! --size 128M` on the secondary (grows its file) and on the primary (grows its file, then the
//! device across both). The LUN reports 128 MiB (READ CAPACITY(16) via libiscsi and
//! qemu-img), the session that was writing sees CAPACITY DATA HAS CHANGED, nothing is
//! resynced (the new blocks are a fresh zero area on both), drbdmeta reads the moved
//! metadata with the new la-size, and both replicas' data areas are equal.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::clients::{dump_md, qemu_io_ok};
use tests::run_ok;
use tests::storage_pair::{PairOptions, StoragePair};

const MIB: u64 = 1024 * 1024;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The backing file that holds exactly `data_bytes` (up to 128 MiB) with internal metadata for
/// one peer: the superblock (4 KiB), the activity log (32 KiB) and one 4 KiB bitmap page.
fn backing_bytes(data_bytes: u64) -> u64 {
    assert!(data_bytes <= 128 * MIB, "one bitmap page covers 128 MiB");
    data_bytes + 40 * 1024
}

/// Waits for a child to exit, killing it after `timeout`.
fn wait_output(child: std::process::Child, timeout: Duration) -> std::process::Output {
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("waiting for the child"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
            panic!("child {id} did not finish within {timeout:?}");
        }
    }
}

/// The pair this file tests: no forward links, backing files for 64 MiB of data.
fn new_pair() -> StoragePair {
    StoragePair::with_options(PairOptions {
        volume_bytes: backing_bytes(64 * MIB),
        forward_links: false,
        ..PairOptions::default()
    })
}

fn field<'a>(dump: &'a str, key: &str) -> &'a str {
    dump.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{key} in\n{dump}"))
        .trim_end_matches(';')
}

/// The dump's geometry and size lines, for the report.
fn summary(dump: &str) -> String {
    dump.lines()
        .filter(|l| {
            l.starts_with("# md_")
                || l.starts_with("# al_")
                || l.starts_with("# bm_")
                || l.contains("la-size-sect")
                || l.starts_with("current-uuid")
                || l.starts_with("flags")
                || l.starts_with("node-id")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn file_range(path: &Path, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; usize::try_from(len).unwrap()];
    std::fs::File::open(path).unwrap().read_exact_at(&mut bytes, 0).unwrap();
    bytes
}

#[test]
fn online_grow_under_write_load_reaches_the_initiator() {
    tests::require_slow!();
    let pair = new_pair();
    let _alpha = pair.start(0);
    let _beta = pair.start(1);
    for i in 0..2 {
        pair.adm(i, &["create-md", "r0"]);
        pair.adm(i, &["up", "r0"]);
    }
    pair.adm(0, &["wait-connect", "--timeout", "20", "r0"]);
    pair.adm(0, &["new-current-uuid", "--clear-bitmap", "r0"]);
    pair.adm(0, &["wait-sync", "--timeout", "20", "r0"]);
    pair.adm(0, &["primary", "r0"]);
    qemu_io_ok(&pair.url(0), &["write -P 61 0 1M", "write -P 62 32M 1M"]);
    let before: Vec<String> = pair.nodes.iter().map(|n| dump_md(&n.disk)).collect();
    for (n, dump) in pair.nodes.iter().zip(&before) {
        println!("dump-md of {} before the resize:\n{}", n.name, summary(dump));
        assert_eq!(field(dump, "la-size-sect").parse::<u64>().unwrap(), 64 * MIB / 512);
    }

    // A shrink is refused with a clear message.
    let shrink = pair.adm_output(0, &["resize", "--size", "32M", "r0"]);
    assert!(!shrink.status.success());
    // Nothing grew yet: nothing to do.
    let unchanged = pair.adm(0, &["resize", "r0"]);
    assert!(unchanged.contains("size unchanged"), "{unchanged}");

    // Write load on the primary through QEMU's initiator, across the resize.
    let qemu_img = tests::require_tool("qemu-img", "qemu-utils");
    let load = Command::new(&qemu_img)
        .args(["bench", "-w", "-f", "raw", "-c", "60000", "-d", "8", "-s", "4k", "-S", "8k"])
        .arg(pair.url(0))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-img bench runs");
    std::thread::sleep(Duration::from_millis(700));
    let grown = pair.adm(1, &["resize", "--size", "128M", "r0"]);
    assert!(grown.contains("backing file grown"), "{grown}");
    let started = Instant::now();
    let resized = pair.adm(0, &["resize", "--size", "128M", "r0"]);
    let took = started.elapsed();
    println!("tandemadm resize --size 128M on the primary took {took:?}: {resized}");
    assert!(resized.contains("resized from 65536 KiB to 131072 KiB"), "{resized}");
    let output = wait_output(load, Duration::from_secs(180));
    let bench = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("write load: {bench}");
    assert!(output.status.success(), "the write load failed: {bench}");
    assert!(
        bench.contains("CAPACITY_DATA_HAS_CHANGED")
            || bench.contains("0x2a09")
            || bench.contains("2a/09"),
        "the open session saw no CAPACITY DATA HAS CHANGED: {bench}"
    );

    // The initiator sees the new size; the new blocks are writable at the very end.
    let capacity = tests::require_tool("iscsi-readcapacity16", "libiscsi-bin");
    let capacity = run_ok(Command::new(capacity).arg("-s").arg(pair.url(0)), COMMAND_TIMEOUT);
    println!("iscsi-readcapacity16 -s: {capacity}");
    // The device's last 128 KiB hold the replicated persistent-reservation state, moved there
    // by the resize: the LUN is the device less that area.
    let lun_bytes = 128 * MIB - 128 * 1024;
    assert_eq!(capacity.trim(), lun_bytes.to_string(), "READ CAPACITY(16)");
    let info = run_ok(
        Command::new(&qemu_img).args(["info", "-f", "raw"]).arg(pair.url(0)),
        COMMAND_TIMEOUT,
    );
    assert!(info.contains(&format!("({lun_bytes} bytes)")), "{info}");
    let last = lun_bytes - 4096;
    qemu_io_ok(&pair.url(0), &[format!("write -P 63 {last} 4k"), format!("read -P 63 {last} 4k")]);
    // The secondary grew too, without a resync.
    tests::wait_for("beta's size", Duration::from_secs(10), || {
        pair.adm(1, &["status", "--statistics", "r0"]).contains("size:131072")
    });
    assert_eq!(pair.adm(0, &["dstate", "r0"]), "UpToDate/UpToDate\n");
    let received = pair.resync_received_kib(1);
    println!("resync after the resize: {received} KiB received by beta");
    assert_eq!(received, 0, "the new blocks are a fresh zero area on both replicas");

    pair.adm(0, &["secondary", "r0"]);
    pair.adm(0, &["down", "r0"]);
    pair.adm(1, &["down", "r0"]);
    let after: Vec<String> = pair.nodes.iter().map(|n| dump_md(&n.disk)).collect();
    for (n, dump) in pair.nodes.iter().zip(&after) {
        println!("dump-md of {} after the resize:\n{}", n.name, summary(dump));
        assert_eq!(field(dump, "la-size-sect").parse::<u64>().unwrap(), 128 * MIB / 512);
        assert!(!dump.contains("resized"), "the metadata is at the new end: {dump}");
    }
    assert!(
        file_range(&pair.nodes[0].disk, 128 * MIB) == file_range(&pair.nodes[1].disk, 128 * MIB),
        "the replicas' data areas differ"
    );
}

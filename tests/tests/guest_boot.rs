//! A real guest on a Tandem volume: the tiny Linux guest the walk-through uses (Debian's cloud
//! kernel and a busybox initramfs from `scripts/build-guest`) boots under QEMU with an
//! `iscsi://` virtio disk served by `tandem-iscsi`, writes random data through its own block
//! layer and checksums it; the host then reads the same range back over iSCSI and must see the
//! same bytes.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tests::{Daemon, binary, free_port, require_slow, require_tool, run_ok, workspace_root};

#[test]
fn guest_writes_through_qemu_iscsi_and_host_reads_the_same_bytes() {
    require_slow!();
    let qemu = require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("qemu-img", "qemu-utils and qemu-block-extra");
    require_tool("cpio", "cpio");
    let guest_dir = workspace_root().join("target/guest");
    run_ok(
        Command::new(workspace_root().join("scripts/build-guest")).arg(&guest_dir),
        Duration::from_secs(300),
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let iqn = "iqn.2026-11.org.tandem:guest";
    let mut target = Command::new(binary("tandem-iscsi"));
    target.args(["--portal", &format!("127.0.0.1:{port}"), "--target", iqn, "--lun"]);
    target.arg(format!("0={}", dir.path().join("volume.img").display()));
    target.args(["--create-size", "256M"]);
    let mut target = Daemon::spawn("tandem-iscsi", target);
    target.wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(10));
    let url = format!("iscsi://127.0.0.1:{port}/{iqn}/0");

    // The guest writes 8 MiB at 32 MiB with O_DIRECT-free dd plus fsync, then reads it back
    // through its page cache's bypass (a fresh dd after the write) and prints the checksum.
    let script = "dd+if=/dev/urandom+of=/dev/vda+bs=1M+count=8+seek=32+conv=fsync;\
                  echo+3+>/proc/sys/vm/drop_caches;\
                  dd+if=/dev/vda+bs=1M+count=8+skip=32|sha256sum";
    let console = run_ok(
        Command::new(qemu).args([
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-kernel",
            guest_dir.join("vmlinuz").to_str().expect("utf-8 path"),
            "-initrd",
            guest_dir.join("initrd.img").to_str().expect("utf-8 path"),
            "-append",
            &format!("console=ttyS0 quiet panic=-1 tandem.run={script}"),
            "-drive",
            &format!("file={url},format=raw,if=virtio,cache=none"),
        ]),
        Duration::from_secs(180),
    );
    assert!(console.contains("tandem-guest: ready"), "the guest booted:\n{console}");
    assert!(console.contains("disks: vda"), "the guest sees the iSCSI volume as vda:\n{console}");
    let guest_sum = console
        .lines()
        .find_map(|line| line.trim().strip_suffix("  -").filter(|sum| sum.len() == 64))
        .unwrap_or_else(|| panic!("the guest printed no checksum:\n{console}"))
        .to_owned();

    let readback = dir.path().join("readback.img");
    run_ok(
        Command::new("qemu-img").args([
            "dd",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("if={url}"),
            &format!("of={}", readback.display()),
            "bs=1M",
            "skip=32",
            "count=40",
        ]),
        Duration::from_secs(60),
    );
    let bytes = std::fs::read(&readback).expect("read-back file");
    assert_eq!(bytes.len(), 8 << 20);
    let host_sum = hex::encode(Sha256::digest(&bytes));
    assert_eq!(guest_sum, host_sum, "the host reads what the guest wrote");
    assert!(bytes.iter().any(|&byte| byte != 0), "the guest's data is not zeroes");
    target.stop();
}

//! Multipath through both storage nodes: the secondary's iSCSI port is a remote port of the
//! primary's logical unit (commands forwarded over the forward link), so libiscsi's
//! conformance suite passes with the primary's portal as the first URL and the secondary's as
//! the multipath URL; and failover still works with forwarding in place.

use std::time::Duration;

use tests::clients::{qemu_io, qemu_io_ok};
use tests::storage_pair::StoragePair;

const VOLUME_BYTES: u64 = 256 * 1024 * 1024;

/// Waits until the secondary's port serves I/O (its forward link is up and it has seen the
/// peer as Primary), by reading through it.
fn wait_until_forwarding(url: &str) {
    let served = tests::wait_until(Duration::from_secs(20), || {
        let output = qemu_io(url, &["read 0 4k"]);
        output.status.success() && !String::from_utf8_lossy(&output.stdout).contains("failed")
    });
    assert!(served, "{url} never served I/O through the forward link");
}

#[test]
fn conformance_with_the_secondary_as_multipath_url_has_no_unexplained_failures() {
    tests::require_slow!();
    let cluster = StoragePair::new(VOLUME_BYTES);
    let _alpha = cluster.start(0);
    let _beta = cluster.start(1);
    cluster.bring_up(0);
    wait_until_forwarding(&cluster.url(1));
    let summary = tests::conformance::run_and_check(
        &[cluster.url(0), cluster.url(1)],
        &[tests::conformance::DISK_SKIPS, tests::conformance::REPLICATED_LUN_SKIPS],
        tests::conformance::REPLICATED_LUN_DEFECTS,
    );
    // The multipath tests ran (they skip with "Multipath unavailable" on one path, which the
    // tables do not allow).
    assert!(!summary.text.contains("Multipath unavailable"), "{}", summary.text);
    // WriteAtomic16.Simple included: 1..256 blocks of 4 KiB, journaled on both replicas.
    assert_eq!(summary.failed, 0, "{}", summary.text);
}

#[test]
fn both_portals_serve_and_failover_moves_the_logical_unit() {
    tests::require_slow!();
    let cluster = StoragePair::new(VOLUME_BYTES);
    let mut alpha = cluster.start(0);
    let mut beta = cluster.start(1);
    cluster.bring_up(0);
    let (primary_url, secondary_url) = (cluster.url(0), cluster.url(1));
    wait_until_forwarding(&secondary_url);

    // Writes through either portal land on the one logical unit.
    qemu_io_ok(&secondary_url, &["write -P 0x5a 0 1M"]);
    qemu_io_ok(&primary_url, &["write -P 0xa5 1M 1M"]);
    qemu_io_ok(&primary_url, &["read -P 0x5a 0 1M"]);
    qemu_io_ok(&secondary_url, &["read -P 0xa5 1M 1M", "read -P 0x5a 0 1M"]);

    // The primary dies: the secondary's link goes down and its port stops serving (standby),
    // never answering a command with stale success.
    alpha.kill9();
    beta.wait_for_log("forward link down", Duration::from_secs(10));
    let output = qemu_io(&secondary_url, &["read 0 4k"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success() || text.contains("failed"), "standby port served: {text}");

    // Promoted, beta is the logical unit; every acknowledged write is there.
    cluster.adm(1, &["primary", "r0"]);
    qemu_io_ok(&secondary_url, &["read -P 0x5a 0 1M", "read -P 0xa5 1M 1M"]);
    qemu_io_ok(&secondary_url, &["write -P 0x3c 2M 1M"]);

    // alpha comes back as Secondary and its port serves beta's logical unit.
    drop(alpha);
    // (tandemd brings r0 up again by itself: it was up when alpha died.)
    let _alpha = cluster.start(0);
    cluster.adm(0, &["wait-sync", "--timeout", "60", "r0"]);
    wait_until_forwarding(&primary_url);
    qemu_io_ok(&primary_url, &["read -P 0x3c 2M 1M", "read -P 0x5a 0 1M"]);
    beta.wait_for_log("inbound forward link up", Duration::from_secs(5));
}

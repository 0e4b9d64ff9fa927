//! A volume whose data fill its device to the end (one moved in from kernel DRBD) next to the
//! persistent-reservation area, which by default takes the device's last 128 KiB.
//!
//! With `--reservations 'r0 local'` the LUN is the whole device, and data written at its very
//! end stay there. Started again without it, tandemd finds data in the area that it never
//! writes there: the LUN does not serve (rather than showing the initiator a shorter disk and
//! letting the first PERSISTENT RESERVE OUT overwrite its data), and the log names the node-file
//! line that exports the whole device. With the line back, the same data read back unchanged.

use std::process::Command;
use std::time::Duration;

use tests::storage_pair::StoragePair;
use tests::{Daemon, binary, require_slow, require_tool, run_with_timeout};

const VOLUME_BYTES: u64 = 16 * 1024 * 1024;
const LOCAL: [&str; 2] = ["--reservations", "r0 local"];

fn qemu_io(url: &str, command: &str) -> (bool, String) {
    let output = run_with_timeout(
        Command::new(require_tool("qemu-io", "qemu-utils")).args(["-f", "raw", "-c", command, url]),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success() && !text.contains("failed") && !text.contains("error"), text)
}

fn lun_size_bytes(url: &str) -> u64 {
    let output = run_with_timeout(
        Command::new(require_tool("qemu-img", "qemu-utils"))
            .args(["info", "--output", "json", url]),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "qemu-img info: {output:?}");
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    info["virtual-size"].as_u64().expect("virtual-size")
}

fn start_both(pair: &StoragePair, flags: &[&str]) -> [Daemon; 2] {
    [pair.start_with(0, flags), pair.start_with(1, flags)]
}

#[test]
fn data_at_the_device_end_are_never_taken_for_reservations() {
    require_slow!();
    let pair = StoragePair::new(VOLUME_BYTES);

    // The whole device is the LUN; write the "file system's" last 64 KiB.
    let daemons = start_both(&pair, &LOCAL);
    pair.bring_up(0);
    let whole = lun_size_bytes(&pair.url(0));
    let last = whole - 64 * 1024;
    let (wrote, text) = qemu_io(&pair.url(0), &format!("write -P 0x5a {last} 64k"));
    assert!(wrote, "{text}");
    pair.adm(0, &["secondary", "r0"]);
    for i in 0..2 {
        pair.adm(i, &["down", "r0"]);
    }
    drop(daemons);

    // Default (replicated reservations in the device's end): the LUN does not serve.
    let mut daemons = start_both(&pair, &[]);
    for i in 0..2 {
        pair.adm(i, &["up", "r0"]);
    }
    pair.adm(0, &["wait-connect", "--timeout", "20", "r0"]);
    let refused = run_with_timeout(
        Command::new(binary("tandemadm"))
            .arg("-s")
            .arg(&pair.nodes[0].socket)
            .args(["primary", "r0"]),
        Duration::from_secs(30),
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("LUN stays in standby"),
        "promotion reports that the LUN does not serve: {refused:?}"
    );
    daemons[0].wait_for_log("hold data that is not a reservation image", Duration::from_secs(20));
    let log = daemons[0].log();
    assert!(log.contains("reservations r0 local"), "the log names the fix");
    assert_eq!(log.matches("hold data that is not a reservation image").count(), 1, "said once");
    let (read, text) = qemu_io(&pair.url(0), "read 0 4k");
    assert!(!read, "the LUN must not serve with foreign data in its reservation area: {text}");
    pair.adm(0, &["secondary", "r0"]);
    for i in 0..2 {
        pair.adm(i, &["down", "r0"]);
    }
    drop(daemons);

    // Local reservations again: the same size, the data unchanged on both replicas.
    let _daemons = start_both(&pair, &LOCAL);
    for i in 0..2 {
        pair.adm(i, &["up", "r0"]);
    }
    pair.adm(1, &["wait-connect", "--timeout", "20", "r0"]);
    pair.adm(1, &["primary", "r0"]);
    assert_eq!(lun_size_bytes(&pair.url(1)), whole);
    let (read, text) = qemu_io(&pair.url(1), &format!("read -P 0x5a {last} 64k"));
    assert!(read, "the data at the device's end are intact on the other replica: {text}");
}

//! Multipath through both storage nodes: the secondary's iSCSI port is a remote port of the
//! primary's logical unit (commands forwarded over the forward link), so libiscsi's
//! conformance suite passes with the primary's portal as the first URL and the secondary's as
//! the multipath URL; and failover still works with forwarding in place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use tests::{Daemon, binary, free_port, run_ok, run_with_timeout, sparse_file};

const VOLUME_BYTES: u64 = 256 * 1024 * 1024;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

struct Node {
    name: &'static str,
    portal: SocketAddr,
    forward: SocketAddr,
    socket: PathBuf,
    state: PathBuf,
}

struct Cluster {
    _dir: tempfile::TempDir,
    config: PathBuf,
    nodes: [Node; 2],
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = |name: &'static str| Node {
            name,
            portal: SocketAddr::from(([127, 0, 0, 1], free_port())),
            forward: SocketAddr::from(([127, 0, 0, 1], free_port())),
            socket: dir.path().join(format!("{name}.sock")),
            state: dir.path().join(format!("state-{name}")),
        };
        let nodes = [node("alpha"), node("beta")];
        let mut text = String::from("resource r0 {\n  net { protocol C; }\n");
        for (id, n) in nodes.iter().enumerate() {
            let disk = dir.path().join(format!("{}.img", n.name));
            sparse_file(&disk, VOLUME_BYTES);
            text.push_str(&format!(
                "  on {} {{\n    node-id {id};\n    address 127.0.0.1:{};\n    volume 0 {{\n      \
                 device minor 0;\n      disk {};\n      meta-disk internal;\n    }}\n  }}\n",
                n.name,
                free_port(),
                disk.display()
            ));
        }
        text.push_str("}\n");
        let config = dir.path().join("r0.res");
        std::fs::write(&config, text).expect("writing r0.res");
        Cluster { _dir: dir, config, nodes }
    }

    /// tandemd for node `index`, listening for the peer's forward link and keeping one to it.
    fn start(&self, index: usize) -> Daemon {
        let n = &self.nodes[index];
        let peer = &self.nodes[1 - index];
        let mut command = Command::new(binary("tandemd"));
        command
            .arg("-c")
            .arg(&self.config)
            .args(["--node", n.name, "--portal", &n.portal.to_string()])
            .args(["--forward-listen", &n.forward.to_string()])
            .args(["--forward-peer", &format!("{}={}", peer.name, peer.forward)])
            .arg("--control-socket")
            .arg(&n.socket)
            .arg("--state-dir")
            .arg(&n.state);
        let mut daemon = Daemon::spawn(n.name, command);
        daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
        daemon
    }

    fn adm(&self, index: usize, args: &[&str]) -> String {
        let mut command = Command::new(binary("tandemadm"));
        command.arg("-s").arg(&self.nodes[index].socket).args(args);
        run_ok(&mut command, COMMAND_TIMEOUT)
    }

    fn url(&self, index: usize) -> String {
        format!("iscsi://{}/iqn.2026-11.org.tandem:r0/0", self.nodes[index].portal)
    }

    /// create-md + up on both, skip the initial sync, promote `primary`.
    fn bring_up(&self, primary: usize) {
        for i in 0..2 {
            self.adm(i, &["create-md", "r0"]);
            self.adm(i, &["up", "r0"]);
        }
        self.adm(primary, &["wait-connect", "--timeout", "20", "r0"]);
        self.adm(primary, &["new-current-uuid", "--clear-bitmap", "r0"]);
        self.adm(primary, &["wait-sync", "--timeout", "20", "r0"]);
        self.adm(primary, &["primary", "r0"]);
    }
}

fn qemu_io(url: &str, commands: &[&str]) -> Output {
    let qemu_io = tests::require_tool("qemu-io", "qemu-utils qemu-block-extra");
    let mut command = Command::new(qemu_io);
    command.args(["-f", "raw"]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    command.arg(url);
    run_with_timeout(&mut command, Duration::from_secs(60))
}

fn qemu_io_ok(url: &str, commands: &[&str]) -> String {
    let output = qemu_io(url, commands);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success() && !text.contains("failed"), "qemu-io on {url}:\n{text}");
    text
}

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
    let cluster = Cluster::new();
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
    let cluster = Cluster::new();
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

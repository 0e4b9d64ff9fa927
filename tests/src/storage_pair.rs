//! Two `tandemd` on loopback replicating one resource `r0` (protocol C, `meta-disk internal`),
//! each with its own iSCSI portal and a forward link to the other (the secondary's portal is a
//! remote port of the primary's logical unit), driven with `tandemadm` like an administrator.
//! [`StoragePair::with_tiebreaker`] adds a third, diskless `tandemd` (`disk none`) so `r0` has
//! quorum (`quorum majority`) and both diskful nodes run the promoter: a dead primary is
//! replaced without an administrator. [`StoragePair::with_options`] builds the variants the
//! `node_*` tests need (no forward links, another backing size).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::{Daemon, binary, free_port, run_ok, run_with_timeout, sparse_file};

/// How long one `tandemadm` command may take (a resize grows and syncs two files).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// A node notices a peer killed -9 within this (the kernel closes its sockets at once).
const PEER_DEATH_NOTICED_WITHIN: Duration = Duration::from_secs(10);

pub const NODE_NAMES: [&str; 2] = ["alpha", "beta"];

pub struct PairNode {
    pub name: &'static str,
    pub portal: SocketAddr,
    pub forward: SocketAddr,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub disk: PathBuf,
}

pub struct StoragePair {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub nodes: [PairNode; 2],
    /// The diskless tiebreaker `tie`, when the resource has quorum.
    pub tiebreaker: Option<PairNode>,
    /// Whether alpha and beta keep forward links to each other (see [`PairOptions`]).
    pub forward_links: bool,
}

/// How [`StoragePair::with_options`] builds a pair.
#[derive(Clone, Copy, Debug)]
pub struct PairOptions {
    /// Size of each diskful node's sparse backing file (data area and internal metadata).
    pub volume_bytes: u64,
    /// Each tandemd listens for its peer's forward link and keeps one to it, so the
    /// secondary's portal is a remote port of the primary's logical unit (multipath).
    pub forward_links: bool,
    /// The diskless tiebreaker `tie`, `quorum majority` and the promoter on alpha and beta.
    pub tiebreaker: bool,
}

impl Default for PairOptions {
    fn default() -> PairOptions {
        PairOptions { volume_bytes: 64 * 1024 * 1024, forward_links: true, tiebreaker: false }
    }
}

impl StoragePair {
    /// Writes `r0.res` for two nodes with `volume_bytes` sparse backing files.
    pub fn new(volume_bytes: u64) -> StoragePair {
        StoragePair::with_options(PairOptions { volume_bytes, ..PairOptions::default() })
    }

    /// As [`StoragePair::new`], plus the diskless tiebreaker `tie`, `quorum majority` and the
    /// promoter on alpha and beta.
    pub fn with_tiebreaker(volume_bytes: u64) -> StoragePair {
        StoragePair::with_options(PairOptions {
            volume_bytes,
            tiebreaker: true,
            ..PairOptions::default()
        })
    }

    /// Writes `r0.res` for the pair `options` describe.
    pub fn with_options(options: PairOptions) -> StoragePair {
        let PairOptions { volume_bytes, forward_links, tiebreaker } = options;
        let dir = tempfile::tempdir().expect("temp dir");
        let node = |name: &'static str| PairNode {
            name,
            portal: SocketAddr::from(([127, 0, 0, 1], free_port())),
            forward: SocketAddr::from(([127, 0, 0, 1], free_port())),
            socket: dir.path().join(format!("{name}.sock")),
            state: dir.path().join(format!("state-{name}")),
            disk: dir.path().join(format!("{name}.img")),
        };
        let nodes = NODE_NAMES.map(node);
        let tiebreaker = tiebreaker.then(|| node("tie"));
        let mut text = String::from("resource r0 {\n  net { protocol C; }\n");
        if tiebreaker.is_some() {
            text.push_str("  options { quorum majority; on-no-quorum io-error; }\n");
        }
        for (id, n) in nodes.iter().enumerate() {
            sparse_file(&n.disk, volume_bytes);
            text.push_str(&format!(
                "  on {} {{\n    node-id {id};\n    address 127.0.0.1:{};\n    volume 0 {{\n      \
                 device minor 0;\n      disk {};\n      meta-disk internal;\n    }}\n  }}\n",
                n.name,
                free_port(),
                n.disk.display()
            ));
        }
        if tiebreaker.is_some() {
            text.push_str(&format!(
                "  on tie {{\n    node-id 2;\n    address 127.0.0.1:{};\n    volume 0 {{\n      \
                 device minor 0;\n      disk none;\n    }}\n  }}\n",
                free_port()
            ));
            // More than two `on` sections connect only as a connection section says.
            text.push_str("  connection-mesh { hosts alpha beta tie; }\n");
        }
        text.push_str("}\n");
        let config = dir.path().join("r0.res");
        std::fs::write(&config, text).expect("writing r0.res");
        StoragePair { dir, config, nodes, tiebreaker, forward_links }
    }

    /// tandemd for node `index`, listening for the peer's forward link and keeping one to it
    /// (unless built without forward links).
    pub fn start(&self, index: usize) -> Daemon {
        self.start_with(index, &[])
    }

    /// As [`StoragePair::start`], with `extra` arguments to tandemd (`--metrics-listen ...`).
    pub fn start_with(&self, index: usize, extra: &[&str]) -> Daemon {
        let n = &self.nodes[index];
        let peer = &self.nodes[1 - index];
        let mut command = Command::new(binary("tandemd"));
        command.arg("-c").arg(&self.config).args([
            "--node",
            n.name,
            "--portal",
            &n.portal.to_string(),
        ]);
        if self.forward_links {
            command
                .args(["--forward-listen", &n.forward.to_string()])
                .args(["--forward-peer", &format!("{}={}", peer.name, peer.forward)]);
        }
        command.arg("--control-socket").arg(&n.socket).arg("--state-dir").arg(&n.state);
        if self.tiebreaker.is_some() {
            command.args(["--promoter", "r0 preferred-nodes alpha,beta"]);
        }
        command.args(extra);
        let mut daemon = Daemon::spawn(n.name, command);
        daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
        daemon
    }

    /// tandemd for the diskless tiebreaker (`with_tiebreaker` only).
    pub fn start_tiebreaker(&self) -> Daemon {
        let n = self.tiebreaker.as_ref().expect("a pair with a tiebreaker");
        let mut command = Command::new(binary("tandemd"));
        command
            .arg("-c")
            .arg(&self.config)
            .args(["--node", n.name, "--portal", &n.portal.to_string()])
            .arg("--control-socket")
            .arg(&n.socket)
            .arg("--state-dir")
            .arg(&n.state);
        let mut daemon = Daemon::spawn(n.name, command);
        daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
        daemon
    }

    /// `tandemadm ARGS` against the tiebreaker.
    pub fn adm_tiebreaker(&self, args: &[&str]) -> String {
        let n = self.tiebreaker.as_ref().expect("a pair with a tiebreaker");
        let mut command = Command::new(binary("tandemadm"));
        command.arg("-s").arg(&n.socket).args(args);
        run_ok(&mut command, COMMAND_TIMEOUT)
    }

    /// `tandemadm ARGS` against node `index`; panics with the output when it fails.
    pub fn adm(&self, index: usize, args: &[&str]) -> String {
        let mut command = Command::new(binary("tandemadm"));
        command.arg("-s").arg(&self.nodes[index].socket).args(args);
        run_ok(&mut command, COMMAND_TIMEOUT)
    }

    /// `tandemadm primary r0` on node `index` right after its peer died: while the node has
    /// not yet seen the dead peer's connection drop it refuses ("peer ... is Primary"), and an
    /// operator (or the OCF agent) tries again; any other failure panics.
    pub fn promote_after_peer_death(&self, index: usize) {
        let deadline = std::time::Instant::now() + PEER_DEATH_NOTICED_WITHIN;
        loop {
            let output = self.adm_output(index, &["primary", "r0"]);
            if output.status.success() {
                return;
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains("is Primary") && std::time::Instant::now() < deadline,
                "tandemadm primary r0 on node {index} failed: {stderr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `tandemadm ARGS` against node `index`, failing or not.
    pub fn adm_output(&self, index: usize, args: &[&str]) -> Output {
        let mut command = Command::new(binary("tandemadm"));
        command.arg("-s").arg(&self.nodes[index].socket).args(args);
        run_with_timeout(&mut command, COMMAND_TIMEOUT)
    }

    /// KiB received by resync on `index` since its `up` (`status --statistics`).
    pub fn resync_received_kib(&self, index: usize) -> u64 {
        let statistics = self.adm(index, &["status", "--statistics", "r0"]);
        statistics
            .lines()
            .find_map(|l| {
                l.split_whitespace().find_map(|w| w.strip_prefix("received:")?.parse().ok())
            })
            .unwrap_or_else(|| panic!("no received: counter in\n{statistics}"))
    }

    pub fn iqn(&self) -> &'static str {
        "iqn.2026-11.org.tandem:r0"
    }

    pub fn url(&self, index: usize) -> String {
        format!("iscsi://{}/{}/0", self.nodes[index].portal, self.iqn())
    }

    /// create-md + up on both (and the tiebreaker), skip the initial sync, promote `primary`.
    pub fn bring_up(&self, primary: usize) {
        for i in 0..2 {
            self.adm(i, &["create-md", "r0"]);
            self.adm(i, &["up", "r0"]);
        }
        if self.tiebreaker.is_some() {
            self.adm_tiebreaker(&["up", "r0"]);
        }
        self.adm(primary, &["wait-connect", "--timeout", "20", "r0"]);
        self.adm(primary, &["new-current-uuid", "--clear-bitmap", "r0"]);
        self.adm(primary, &["wait-sync", "--timeout", "20", "r0"]);
        self.adm(primary, &["primary", "r0"]);
    }

    /// Cinder's iSCSI connection_info for `r0` with both portals, `primary` first (what
    /// tandem-api hands out), without CHAP.
    pub fn connection_info(&self, primary: usize, volume_id: &str) -> serde_json::Value {
        let order = [primary, 1 - primary];
        let portals: Vec<String> =
            order.iter().map(|&i| self.nodes[i].portal.to_string()).collect();
        serde_json::json!({
            "driver_volume_type": "iscsi",
            "data": {
                "target_discovered": false,
                "target_iqn": self.iqn(),
                "target_portal": portals[0],
                "target_lun": 0,
                "target_iqns": [self.iqn(), self.iqn()],
                "target_portals": portals,
                "target_luns": [0, 0],
                "volume_id": volume_id,
                "access_mode": "rw",
                "encrypted": false
            }
        })
    }
}

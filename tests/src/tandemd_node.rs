//! A real `tandemd` with its HTTP control API, as tandem-api drives storage nodes: no resource
//! file of its own (tandem-api creates resources through the API), its replication on a
//! loopback address of its own so several run on one machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Daemon, binary, free_port};

pub struct TandemdNode {
    pub name: &'static str,
    /// The control API tandem-api calls (`--node NAME=http://API`).
    pub api: SocketAddr,
    pub state: PathBuf,
    pub daemon: Daemon,
    /// The iSCSI portal (kept across [`TandemdNode::restart`]).
    pub portal: SocketAddr,
    /// What [`TandemdNode::restart`] starts it with again.
    dir: PathBuf,
    replication_ip: String,
    token: String,
}

impl TandemdNode {
    /// Starts `name` with its files under `dir`, the control API guarded by `token`, and
    /// replication on `replication_ip` (a 127.x address).
    pub fn start(dir: &Path, name: &'static str, replication_ip: &str, token: &str) -> TandemdNode {
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, "global { usage-count no; }\n").expect("config");
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let portal = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let state = dir.join(format!("state-{name}"));
        let daemon = Self::spawn(dir, name, api, portal, replication_ip, token);
        TandemdNode {
            name,
            api,
            state,
            daemon,
            portal,
            dir: dir.to_path_buf(),
            replication_ip: replication_ip.to_owned(),
            token: token.to_owned(),
        }
    }

    /// Starts the node again (after `daemon.kill9()`) with the same ports and state directory.
    pub fn restart(&mut self) {
        self.daemon = Self::spawn(
            &self.dir,
            self.name,
            self.api,
            self.portal,
            &self.replication_ip,
            &self.token,
        );
    }

    fn spawn(
        dir: &Path,
        name: &'static str,
        api: SocketAddr,
        portal: SocketAddr,
        replication_ip: &str,
        token: &str,
    ) -> Daemon {
        let config = dir.join(format!("{name}.conf"));
        let state = dir.join(format!("state-{name}"));
        let mut command = Command::new(binary("tandemd"));
        command
            .arg("-c")
            .arg(&config)
            .args(["--node", name, "--portal", &portal.to_string()])
            .arg("--control-socket")
            .arg(dir.join(format!("{name}.sock")))
            .arg("--state-dir")
            .arg(&state)
            .args(["--api-listen", &api.to_string(), "--api-token", token])
            .args(["--replication-address", replication_ip]);
        let mut daemon = Daemon::spawn(name, command);
        daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
        daemon
    }

    /// The node's control socket, for `tandemadm -s`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.name))
    }

    /// tandem-api's `--node` argument for this node.
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }
}

//! The Pacemaker resource agent (storage-node/ocf/tandem) checked by `ocf-tester` (Debian's
//! resource-agents) against two running tandemd on loopback: meta-data against ra-api-1.dtd,
//! validate-all, probes, start/stop/promote/demote in every order ocf-tester drives them
//! (including repeated ones), notify and reload. Pacemaker itself does not run here: the
//! promotion-score calls are skipped when crm_attribute/crm_master are absent, which the
//! agent checks first. Then the agent moves the Primary role between the nodes by itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tests::{Daemon, binary, free_port, run_ok, run_with_timeout, sparse_file, workspace_root};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

struct Node {
    name: &'static str,
    replication_port: u16,
    portal: SocketAddr,
    socket: PathBuf,
    state: PathBuf,
}

fn agent() -> PathBuf {
    workspace_root().join("storage-node/ocf/tandem")
}

/// Runs the agent's ACTION with the resource parameters, as Pacemaker's executor does.
fn agent_action(node: &Node, action: &str, interval_ms: u32) -> Output {
    let tandemadm = binary("tandemadm");
    let mut command = Command::new(agent());
    command
        .arg(action)
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("OCF_RESOURCE_INSTANCE", "r0")
        .env("OCF_RESKEY_tandem_resource", "r0")
        .env("OCF_RESKEY_control_socket", &node.socket)
        .env("OCF_RESKEY_tandemadm", &tandemadm)
        .env("OCF_RESKEY_CRM_meta_interval", interval_ms.to_string());
    run_with_timeout(&mut command, COMMAND_TIMEOUT)
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn start(config: &Path, n: &Node) -> Daemon {
    let mut command = Command::new(binary("tandemd"));
    command
        .arg("-c")
        .arg(config)
        .args(["--node", n.name, "--portal", &n.portal.to_string()])
        .arg("--control-socket")
        .arg(&n.socket)
        .arg("--state-dir")
        .arg(&n.state);
    let mut daemon = Daemon::spawn(n.name, command);
    daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
    daemon
}

fn adm(n: &Node, args: &[&str]) -> String {
    run_ok(Command::new(binary("tandemadm")).arg("-s").arg(&n.socket).args(args), COMMAND_TIMEOUT)
}

#[test]
fn ocf_tester_passes_and_the_agent_moves_the_primary() {
    tests::require_slow!();
    let ocf_tester = tests::require_tool("ocf-tester", "resource-agents");
    let dir = tempfile::tempdir().expect("temp dir");
    let node = |name: &'static str| Node {
        name,
        replication_port: free_port(),
        portal: SocketAddr::from(([127, 0, 0, 1], free_port())),
        socket: dir.path().join(format!("{name}.sock")),
        state: dir.path().join(format!("state-{name}")),
    };
    let nodes = [node("alpha"), node("beta")];
    let mut text = String::from("resource r0 {\n  net { protocol C; }\n");
    for (id, n) in nodes.iter().enumerate() {
        let disk = dir.path().join(format!("{}.img", n.name));
        sparse_file(&disk, 16 * 1024 * 1024);
        text.push_str(&format!(
            "  on {} {{\n    node-id {id};\n    address 127.0.0.1:{};\n    volume 0 {{\n      \
             device minor 0;\n      disk {};\n      meta-disk internal;\n    }}\n  }}\n",
            n.name,
            n.replication_port,
            disk.display()
        ));
    }
    text.push_str("}\n");
    let config = dir.path().join("r0.res");
    std::fs::write(&config, text).expect("writing r0.res");
    let _daemons: Vec<Daemon> = nodes.iter().map(|n| start(&config, n)).collect();
    let (alpha, beta) = (&nodes[0], &nodes[1]);

    // Metadata and the initial sync skipped (an administrator's one-time set-up, as with DRBD);
    // then both down, so ocf-tester starts from a stopped resource.
    for n in &nodes {
        adm(n, &["create-md", "r0"]);
        adm(n, &["up", "r0"]);
    }
    adm(alpha, &["wait-connect", "--timeout", "20", "r0"]);
    adm(alpha, &["new-current-uuid", "--clear-bitmap", "r0"]);
    adm(alpha, &["wait-sync", "--timeout", "20", "r0"]);
    adm(alpha, &["down", "r0"]);

    // ocf-tester on alpha while beta stays up as Secondary.
    let tandemadm = binary("tandemadm");
    let output = run_with_timeout(
        Command::new(&ocf_tester)
            .args(["-v", "-n", "r0", "-o", "tandem_resource=r0"])
            .arg("-o")
            .arg(format!("control_socket={}", alpha.socket.display()))
            .arg("-o")
            .arg(format!("tandemadm={}", tandemadm.display()))
            .arg(agent()),
        COMMAND_TIMEOUT,
    );
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("ocf-tester:\n{report}");
    assert!(output.status.success() && report.contains("passed all tests"), "{report}");

    // The agent by itself: probes, start, promote on alpha, fail over to beta, stop.
    assert_eq!(code(&agent_action(alpha, "monitor", 0)), 7, "stopped after ocf-tester");
    assert_eq!(code(&agent_action(alpha, "start", 0)), 0);
    assert_eq!(code(&agent_action(alpha, "monitor", 20_000)), 0, "started = Secondary");
    adm(alpha, &["wait-sync", "--timeout", "20", "r0"]);
    assert_eq!(code(&agent_action(alpha, "promote", 0)), 0);
    assert_eq!(code(&agent_action(alpha, "monitor", 10_000)), 8, "Primary = running master");
    assert_eq!(code(&agent_action(beta, "monitor", 20_000)), 0, "beta Secondary");
    assert_eq!(code(&agent_action(alpha, "demote", 0)), 0);
    assert_eq!(code(&agent_action(beta, "promote", 0)), 0);
    assert_eq!(adm(beta, &["role", "r0"]), "Primary\n");
    assert_eq!(code(&agent_action(beta, "stop", 0)), 0, "stop demotes first");
    assert_eq!(code(&agent_action(beta, "monitor", 0)), 7);
    assert_eq!(code(&agent_action(alpha, "stop", 0)), 0);

    // A resource tandemd does not host is a configuration error, not "stopped".
    let mut command = Command::new(agent());
    command
        .arg("validate-all")
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("OCF_RESKEY_tandem_resource", "nope")
        .env("OCF_RESKEY_control_socket", &alpha.socket)
        .env("OCF_RESKEY_tandemadm", &tandemadm);
    assert_eq!(code(&run_with_timeout(&mut command, COMMAND_TIMEOUT)), 6, "OCF_ERR_CONFIGURED");
}

//! A resource taken down and brought up again in the same tandemd: `down` releases the
//! replication listener, the peer connection, the backing and metadata files, so `up` works
//! again, 20 times in a row, with qemu-io writing and reading through the primary's LUN in
//! between, and tandemd's open file descriptors do not grow.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tests::clients::qemu_io_ok as qemu_io;
use tests::{Daemon, binary, free_port, run_with_timeout, sparse_file};

const VOLUME_BYTES: u64 = 16 * 1024 * 1024;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const CYCLES: u64 = 20;

struct Node {
    name: &'static str,
    portal: SocketAddr,
    socket: PathBuf,
    daemon: Daemon,
}

fn start_pair(dir: &Path) -> [Node; 2] {
    let names = ["alpha", "beta"];
    let ports = [free_port(), free_port()];
    let mut text = String::from("resource r0 {\n  net { protocol C; }\n");
    for (id, name) in names.iter().enumerate() {
        let disk = dir.join(format!("{name}.img"));
        sparse_file(&disk, VOLUME_BYTES);
        text.push_str(&format!(
            "  on {name} {{\n    node-id {id};\n    address 127.0.0.1:{};\n    volume 0 {{\n      \
             device minor 0;\n      disk {};\n      meta-disk internal;\n    }}\n  }}\n",
            ports[id],
            disk.display()
        ));
    }
    text.push_str("}\n");
    let config = dir.join("r0.res");
    std::fs::write(&config, text).expect("writing r0.res");
    names.map(|name| {
        let portal = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let socket = dir.join(format!("{name}.sock"));
        let mut command = Command::new(binary("tandemd"));
        command
            .arg("-c")
            .arg(&config)
            .args(["--node", name, "--portal", &portal.to_string()])
            .arg("--control-socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join(format!("state-{name}")));
        let mut daemon = Daemon::spawn(name, command);
        daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
        Node { name, portal, socket, daemon }
    })
}

fn adm(node: &Node, args: &[&str]) -> Output {
    let mut command = Command::new(binary("tandemadm"));
    command.arg("-s").arg(&node.socket).args(args);
    run_with_timeout(&mut command, COMMAND_TIMEOUT)
}

fn adm_ok(node: &Node, args: &[&str]) -> String {
    let output = adm(node, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "tandemadm {args:?} on {}: {text}", node.name);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The fd count once it has settled (engine threads finish their last I/O asynchronously).
fn settled_fd_count(pid: u32, at_most: usize) -> usize {
    let mut count = fd_count(pid);
    tests::wait_until(Duration::from_secs(5), || {
        count = fd_count(pid);
        count <= at_most
    });
    count
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

fn bring_up(nodes: &[Node; 2]) {
    for node in nodes {
        adm_ok(node, &["create-md", "r0"]);
        adm_ok(node, &["up", "r0"]);
    }
    adm_ok(&nodes[0], &["wait-connect", "--timeout", "20", "r0"]);
    adm_ok(&nodes[0], &["new-current-uuid", "--clear-bitmap", "r0"]);
    adm_ok(&nodes[0], &["wait-sync", "--timeout", "20", "r0"]);
    adm_ok(&nodes[0], &["primary", "r0"]);
}

/// One down/up cycle of the primary: down, up, reconnect, resync what beta missed, promote.
fn cycle(nodes: &[Node; 2]) {
    let alpha = &nodes[0];
    adm_ok(alpha, &["down", "r0"]);
    let gone = adm(alpha, &["status", "r0"]);
    assert_eq!(gone.status.code(), Some(10), "down means down");
    let up = adm(alpha, &["up", "r0"]);
    assert!(
        up.status.success(),
        "up after down in the same tandemd: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    adm_ok(alpha, &["wait-connect", "--timeout", "20", "r0"]);
    adm_ok(alpha, &["wait-sync", "--timeout", "20", "r0"]);
    adm_ok(alpha, &["primary", "r0"]);
}

#[test]
fn down_then_up_in_one_tandemd_releases_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let nodes = start_pair(dir.path());
    bring_up(&nodes);
    let pid = nodes[0].daemon.pid();
    // The first cycle reaches the steady state (lazily created runtime pieces, log files).
    cycle(&nodes);
    let fds_before = fd_count(pid);
    let threads_before = thread_count(pid);
    for _ in 0..3 {
        cycle(&nodes);
    }
    let fds_after = settled_fd_count(pid, fds_before);
    assert!(fds_after <= fds_before, "fd leak: {fds_before} open before, {fds_after} after");
    assert!(
        tests::wait_until(Duration::from_secs(5), || thread_count(pid) <= threads_before),
        "thread leak: {threads_before} before, {} after",
        thread_count(pid)
    );
    assert_eq!(
        adm_ok(&nodes[0], &["status", "r0"]),
        "r0 role:Primary\n  disk:UpToDate\n  beta role:Secondary\n    peer-disk:UpToDate\n\n"
    );
}

#[test]
fn twenty_down_up_cycles_with_io_leak_no_descriptors() {
    tests::require_slow!();
    let dir = tempfile::tempdir().expect("temp dir");
    let nodes = start_pair(dir.path());
    bring_up(&nodes);
    let pid = nodes[0].daemon.pid();
    let url = format!("iscsi://{}/iqn.2026-11.org.tandem:r0/0", nodes[0].portal);
    // The file's last MiB is left alone: the internal metadata and the replicated reservation
    // area sit at its end, outside the LUN.
    let chunk_bytes = (VOLUME_BYTES - (1 << 20)) / CYCLES / 4096 * 4096;
    let pattern = |cycle: u64| 1 + (cycle * 11) % 250;
    qemu_io(&url, &[format!("write -P {} 0 {chunk_bytes}", pattern(0))]);
    cycle(&nodes);
    let fds_before = fd_count(pid);
    let threads_before = thread_count(pid);
    println!("after the first cycle: {fds_before} fds, {threads_before} threads");
    for n in 1..CYCLES {
        // Everything written so far survived the previous down/up; this cycle's chunk too.
        let mut commands: Vec<String> = (0..n)
            .map(|c| format!("read -P {} {} {chunk_bytes}", pattern(c), c * chunk_bytes))
            .collect();
        commands.push(format!("write -P {} {} {chunk_bytes}", pattern(n), n * chunk_bytes));
        commands.push(format!("read -P {} {} {chunk_bytes}", pattern(n), n * chunk_bytes));
        qemu_io(&url, &commands);
        cycle(&nodes);
    }
    let fds_after = settled_fd_count(pid, fds_before);
    println!(
        "after {CYCLES} cycles: {fds_after} fds, {} threads (before: {fds_before}, \
         {threads_before})",
        thread_count(pid)
    );
    assert!(fds_after <= fds_before, "fd leak: {fds_before} open before, {fds_after} after");
    assert!(
        tests::wait_until(Duration::from_secs(5), || thread_count(pid) <= threads_before),
        "thread leak: {threads_before} before, {} after",
        thread_count(pid)
    );
    // Every chunk reads back through the primary, and through beta once it is promoted.
    let reads: Vec<String> = (0..CYCLES)
        .map(|c| format!("read -P {} {} {chunk_bytes}", pattern(c), c * chunk_bytes))
        .collect();
    qemu_io(&url, &reads);
    adm_ok(&nodes[0], &["secondary", "r0"]);
    adm_ok(&nodes[1], &["primary", "r0"]);
    let beta_url = format!("iscsi://{}/iqn.2026-11.org.tandem:r0/0", nodes[1].portal);
    qemu_io(&beta_url, &reads);
}

//! The service IP across network namespaces: two tandemd (alpha, beta) in namespaces of their
//! own and an initiator namespace holding a bridge that joins the three (one L2 segment, as
//! hosts on one switch). `service-ip r0 10.77.0.100/24 dev svc0` is given to both nodes.
//!
//! - A service IP left on beta's interface by a "crash" is removed when beta's tandemd starts.
//! - Promoting alpha adds the address on alpha; the initiator reaches the portal through it
//!   (iscsi-inq, then qemu-io writes and reads) and its neighbour entry holds alpha's MAC.
//! - Switching over (secondary on one node, primary on the other) moves the address; the
//!   gratuitous ARP updates the initiator's REACHABLE entry to the new MAC at once (without it
//!   the initiator kept the old MAC for 55 s), and the same URL reaches the new primary.
//!   Measured: time from `tandemadm primary` to the first answered INQUIRY through the
//!   service IP, per switchover (TANDEM_SERVICE_IP_RUNS, default 4).
//! - The primary's host dies (its link cut, then tandemd killed with -9) while a qemu-io
//!   session writes through the service IP; `primary` on the other node: the address comes
//!   up there, and the running session's next write completes (libiscsi reconnects); the
//!   dead node's tandemd restarted removes its leftover address; `down` and a SIGTERM'd
//!   tandemd remove it too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tests::{Daemon, NetNs, binary, run_ok, run_with_timeout, sparse_file};

const VOLUME_BYTES: u64 = 32 * 1024 * 1024;
const SERVICE_IP: &str = "10.77.0.100";
const DEVICE: &str = "svc0";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Generous: the figure is printed; the assertion only catches a missing announcement (the
/// old MAC would hold for tens of seconds).
const FAILOVER_DEADLINE: Duration = Duration::from_secs(5);

struct Host {
    name: &'static str,
    ns: NetNs,
    address: &'static str,
    socket: PathBuf,
    state: PathBuf,
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args), COMMAND_TIMEOUT);
}

fn ns_output(ns: &NetNs, program: &str, args: &[&str]) -> String {
    run_ok(ns.exec(program).args(args), COMMAND_TIMEOUT)
}

fn mac_of(ns: &NetNs, device: &str) -> String {
    let text = ns_output(ns, "ip", &["-o", "link", "show", device]);
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text}"))
        .to_owned()
}

fn has_service_ip(ns: &NetNs) -> bool {
    ns_output(ns, "ip", &["-o", "-4", "addr", "show", "dev", DEVICE])
        .contains(&format!("inet {SERVICE_IP}/"))
}

/// The initiator's neighbour entry for the service IP: the MAC it holds, if any.
fn neighbour_mac(ns: &NetNs) -> Option<String> {
    let text = ns_output(ns, "ip", &["neigh", "show", SERVICE_IP]);
    text.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(str::to_owned)
}

/// Runs a command, killing it after `timeout`; `None` when it had to be killed.
fn run_bounded(command: &mut Command, timeout: Duration) -> Option<Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return Some(child.wait_with_output().expect("output"));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn url() -> String {
    format!("iscsi://{SERVICE_IP}:3260/iqn.2026-11.org.tandem:r0/0")
}

/// One INQUIRY through the service IP from the initiator namespace.
fn inquiry(initiator: &NetNs) -> bool {
    let mut command = initiator.exec("iscsi-inq");
    command.arg(url());
    run_bounded(&mut command, Duration::from_secs(2)).is_some_and(|o| o.status.success())
}

/// Time from `start` until an INQUIRY through the service IP succeeds (polling).
fn time_to_first_inquiry(initiator: &NetNs, start: Instant) -> Duration {
    loop {
        if inquiry(initiator) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < FAILOVER_DEADLINE,
            "no INQUIRY through {SERVICE_IP} within {FAILOVER_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn qemu_io(initiator: &NetNs, commands: &[&str]) -> String {
    let mut command = initiator.exec("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    command.arg(url());
    let output = run_with_timeout(&mut command, Duration::from_secs(60));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success() && !text.contains("failed"), "qemu-io {commands:?}: {text}");
    text
}

fn start(config: &Path, host: &Host) -> Daemon {
    let mut command = host.ns.exec(binary("tandemd"));
    command
        .arg("-c")
        .arg(config)
        .args(["--node", host.name, "--portal", "0.0.0.0:3260"])
        .arg("--control-socket")
        .arg(&host.socket)
        .arg("--state-dir")
        .arg(&host.state)
        .args(["--service-ip", &format!("r0 {SERVICE_IP}/24 dev {DEVICE}")]);
    let mut daemon = Daemon::spawn(host.name, command);
    daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
    daemon
}

fn adm(host: &Host, args: &[&str]) -> String {
    run_ok(
        Command::new(binary("tandemadm")).arg("-s").arg(&host.socket).args(args),
        COMMAND_TIMEOUT,
    )
}

/// A qemu-io session through the service IP that keeps writing 4 KiB blocks (one command
/// every 20 ms on its stdin) and timestamps every completion: what an initiator with I/O in
/// flight sees across a failover (libiscsi reconnects by itself).
struct LiveWriter {
    child: std::process::Child,
    completions: std::sync::Arc<std::sync::Mutex<Vec<(Instant, bool)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: Option<std::thread::JoinHandle<()>>,
}

impl LiveWriter {
    fn start(initiator: &NetNs) -> LiveWriter {
        use std::io::{BufRead, Write};
        // qemu-io's stdout is a pipe here: line buffering makes each result arrive at once.
        let mut child = initiator
            .exec("stdbuf")
            .args(["-oL", "qemu-io", "-f", "raw"])
            .arg(url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-io");
        let completions = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stdout = child.stdout.take().expect("stdout");
        let seen = completions.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let ok = line.contains("wrote ");
                if ok || line.contains("failed") {
                    seen.lock().expect("lock").push((Instant::now(), ok));
                }
            }
        });
        let mut stdin = child.stdin.take().expect("stdin");
        let stopping = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut block = 0u64;
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                // 2 MiB upward: away from the blocks the test checks.
                let offset = (2 << 20) + (block % 256) * 4096;
                if writeln!(stdin, "write -P 33 {offset} 4k").is_err() {
                    return;
                }
                block += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = writeln!(stdin, "quit");
        });
        LiveWriter { child, completions, stop, sender: Some(sender) }
    }

    fn completed(&self) -> usize {
        self.completions.lock().expect("lock").iter().filter(|(_, ok)| *ok).count()
    }

    /// Time from `start` to the first write completed after it.
    fn first_write_after(&self, start: Instant, timeout: Duration) -> Duration {
        loop {
            let first = self
                .completions
                .lock()
                .expect("lock")
                .iter()
                .find(|(at, ok)| *ok && *at > start)
                .map(|(at, _)| *at - start);
            if let Some(elapsed) = first {
                return elapsed;
            }
            assert!(start.elapsed() < timeout, "no write completed within {timeout:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the session; returns how many writes failed.
    fn stop(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.completions.lock().expect("lock").iter().filter(|(_, ok)| !*ok).count()
    }
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[test]
fn service_ip_follows_the_primary_with_gratuitous_arp() {
    tests::require_slow!();
    tests::require_tool("ip", "iproute2");
    tests::require_tool("iscsi-inq", "libiscsi-bin");
    tests::require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().expect("temp dir");
    let initiator = NetNs::create("tnd-si");
    let host = |name: &'static str, address: &'static str| Host {
        name,
        ns: NetNs::create("tnd-si"),
        address,
        socket: dir.path().join(format!("{name}.sock")),
        state: dir.path().join(format!("state-{name}")),
    };
    let hosts = [host("alpha", "10.77.0.1"), host("beta", "10.77.0.2")];
    // The initiator's bridge joins a veth from each node: one L2 segment.
    initiator.ip(&["link", "add", "br0", "type", "bridge"]);
    for (index, h) in hosts.iter().enumerate() {
        let port = format!("port{index}");
        ip(&[
            "link",
            "add",
            DEVICE,
            "netns",
            h.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            initiator.name(),
        ]);
        initiator.ip(&["link", "set", &port, "master", "br0"]);
        initiator.ip(&["link", "set", &port, "up"]);
        h.ns.ip(&["addr", "add", &format!("{}/24", h.address), "dev", DEVICE]);
        h.ns.ip(&["link", "set", DEVICE, "up"]);
    }
    initiator.ip(&["addr", "add", "10.77.0.10/24", "dev", "br0"]);
    initiator.ip(&["link", "set", "br0", "up"]);
    let macs = [mac_of(&hosts[0].ns, DEVICE), mac_of(&hosts[1].ns, DEVICE)];

    let mut text = String::from("resource r0 {\n  net { protocol C; }\n");
    for (id, h) in hosts.iter().enumerate() {
        let disk = dir.path().join(format!("{}.img", h.name));
        sparse_file(&disk, VOLUME_BYTES);
        text.push_str(&format!(
            "  on {} {{\n    node-id {id};\n    address {}:7789;\n    volume 0 {{\n      \
             device minor 0;\n      disk {};\n      meta-disk internal;\n    }}\n  }}\n",
            h.name,
            h.address,
            disk.display()
        ));
    }
    text.push_str("}\n");
    let config = dir.path().join("r0.res");
    std::fs::write(&config, text).expect("writing r0.res");

    // A leftover from a crash on beta: removed when its tandemd starts (it is not primary).
    hosts[1].ns.ip(&["addr", "add", &format!("{SERVICE_IP}/24"), "dev", DEVICE]);
    let mut daemons: Vec<Daemon> = hosts.iter().map(|h| start(&config, h)).collect();
    tests::wait_for("beta drops the leftover service IP", Duration::from_secs(5), || {
        !has_service_ip(&hosts[1].ns)
    });
    assert!(!has_service_ip(&hosts[0].ns));

    for h in &hosts {
        adm(h, &["create-md", "r0"]);
        adm(h, &["up", "r0"]);
    }
    adm(&hosts[0], &["wait-connect", "--timeout", "20", "r0"]);
    adm(&hosts[0], &["new-current-uuid", "--clear-bitmap", "r0"]);
    adm(&hosts[0], &["wait-sync", "--timeout", "20", "r0"]);
    assert!(!inquiry(&initiator), "nobody holds the service IP before a promotion");

    let started = Instant::now();
    adm(&hosts[0], &["primary", "r0"]);
    let first = time_to_first_inquiry(&initiator, started);
    println!("promotion of alpha: first INQUIRY through {SERVICE_IP} after {first:?}");
    assert!(has_service_ip(&hosts[0].ns) && !has_service_ip(&hosts[1].ns));
    assert_eq!(neighbour_mac(&initiator).as_deref(), Some(macs[0].as_str()));
    qemu_io(&initiator, &["write -P 17 0 64k", "read -P 17 0 64k"]);

    // Switchovers back and forth: the initiator's entry is REACHABLE with the old MAC each
    // time (it just talked to it), so only the gratuitous ARP can move it in time.
    let runs: usize =
        std::env::var("TANDEM_SERVICE_IP_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let mut times = Vec::new();
    let mut primary = 0;
    for run in 0..runs {
        let next = 1 - primary;
        adm(&hosts[primary], &["secondary", "r0"]);
        tests::wait_for("the old primary drops the address", Duration::from_secs(5), || {
            !has_service_ip(&hosts[primary].ns)
        });
        let started = Instant::now();
        adm(&hosts[next], &["primary", "r0"]);
        let elapsed = time_to_first_inquiry(&initiator, started);
        let neighbour = neighbour_mac(&initiator);
        println!(
            "switchover {run}: {} -> {}: first INQUIRY through {SERVICE_IP} after {elapsed:?}",
            hosts[primary].name, hosts[next].name
        );
        assert_eq!(neighbour.as_deref(), Some(macs[next].as_str()), "the ARP moved the entry");
        let pattern = 20 + run;
        qemu_io(
            &initiator,
            &[&format!("write -P {pattern} 64k 64k"), &format!("read -P {pattern} 64k 64k")],
        );
        times.push(elapsed);
        primary = next;
    }
    if !times.is_empty() {
        println!(
            "switchover, primary -> first INQUIRY: median {:?} of {runs}: {times:?}",
            median(&mut times)
        );
    }

    // The primary dies (kill -9, then its link goes, as a dead host's would); the other node
    // promotes and takes the address; the dead node's restarted tandemd drops its leftover.
    let (dead, survivor) = (primary, 1 - primary);
    let live = LiveWriter::start(&initiator);
    tests::wait_for("the live initiator writes", Duration::from_secs(10), || live.completed() > 5);
    hosts[dead].ns.set_link(DEVICE, false);
    daemons[dead].kill9();
    let killed = Instant::now();
    tests::wait_for("the survivor sees the peer gone", Duration::from_secs(60), || {
        adm(&hosts[survivor], &["cstate", "r0"]).trim() != "Connected"
    });
    let noticed = killed.elapsed();
    let started = Instant::now();
    adm(&hosts[survivor], &["primary", "r0"]);
    let elapsed = time_to_first_inquiry(&initiator, started);
    let written = live.first_write_after(started, Duration::from_secs(60));
    let errors = live.stop();
    println!(
        "{} gone (link cut, kill -9): the survivor noticed after {noticed:?}; from `primary` \
         on {}: first INQUIRY through {SERVICE_IP} after {elapsed:?}, first write completed by \
         the running qemu-io session after {written:?} ({errors} writes failed meanwhile)",
        hosts[dead].name, hosts[survivor].name
    );
    assert_eq!(neighbour_mac(&initiator).as_deref(), Some(macs[survivor].as_str()));
    qemu_io(&initiator, &["read -P 17 0 64k"]);
    assert!(has_service_ip(&hosts[dead].ns), "the crash left the address behind");
    hosts[dead].ns.set_link(DEVICE, true);
    daemons[dead] = start(&config, &hosts[dead]);
    tests::wait_for("the restarted node drops the leftover", Duration::from_secs(5), || {
        !has_service_ip(&hosts[dead].ns)
    });
    assert!(has_service_ip(&hosts[survivor].ns));
    adm(&hosts[survivor], &["down", "r0"]);
    tests::wait_for("down removes the address", Duration::from_secs(5), || {
        !has_service_ip(&hosts[survivor].ns)
    });
    // A stopped tandemd (SIGTERM) gives its address up.
    adm(&hosts[survivor], &["up", "r0"]);
    adm(&hosts[survivor], &["primary", "--force", "r0"]);
    tests::wait_for("the address is back", Duration::from_secs(5), || {
        has_service_ip(&hosts[survivor].ns)
    });
    let status = daemons[survivor].stop().expect("stopped");
    assert_eq!(status.code(), Some(143), "exits as SIGTERM would: {status}");
    assert!(!has_service_ip(&hosts[survivor].ns), "SIGTERM removes the service IP");
    drop(daemons);
}

#[test]
fn a_service_ip_needs_the_portal_on_the_wildcard_address() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("empty.res");
    std::fs::write(&config, "global { usage-count no; }\n").expect("config");
    let output = run_with_timeout(
        Command::new(binary("tandemd"))
            .arg("-c")
            .arg(&config)
            .args(["--node", "alpha", "--portal", "127.0.0.1:3260"])
            .arg("--control-socket")
            .arg(dir.path().join("t.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--service-ip", &format!("r0 {SERVICE_IP}/24 dev {DEVICE}")]),
        COMMAND_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "tandemd started: {text}");
    assert!(text.contains("service-ip needs the portal on the wildcard address"), "{text}");
    let output = run_with_timeout(
        Command::new(binary("tandemd")).args(["--service-ip", "r0 10.0.0.1 dev eth0"]),
        COMMAND_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("--service-ip: service-ip wants"), "{text}");
}

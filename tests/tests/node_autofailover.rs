//! Automatic failover with quorum: three tandemd, each in a network namespace of its own, two
//! diskful (alpha, beta) and a diskless tiebreaker (tie, `disk none`), resource r0 with
//! `options { quorum majority; on-no-quorum io-error; }`; alpha and beta run the promoter
//! (`--promoter 'r0 preferred-nodes alpha,beta'`) and hold the service IP when primary.
//!
//! Two L2 segments, as two switches: the front (bridge `brf` in the initiator's namespace,
//! 10.78.0.0/24: iSCSI portals and the service IP 10.78.0.100) and the back (bridge `brb`
//! in the initiator's namespace too, without an address there: 10.79.0.0/24, replication and
//! the forward links between the diskful nodes). The initiator (qemu-io) runs in its own
//! namespace on the front.
//!
//! - `kill9_failover_through_service_ip_and_multipath`: nobody promotes by hand. Two qemu-io
//!   sessions write a verifiable pattern (one 4 KiB block each, every 20 ms, never the same
//!   block twice): one through the service IP, one through the secondary's portal (the path a
//!   multipath initiator keeps when the primary's path dies; commands there are forwarded to
//!   the primary's logical unit). The primary's tandemd is killed with -9 ("process": the host
//!   stays, its kernel resets the connections; "host": its links are cut first, as a dead
//!   host's). The secondary promotes itself; the time from the kill to the first write the
//!   initiator sees completed is measured per path, and every acknowledged write must read
//!   back from the new primary. The killed node restarts (Secondary, resync) and the next run
//!   kills the other node. Runs: TANDEM_AUTOFAILOVER_RUNS (default 2) of each kind, printed
//!   as min/median/max (`storage-node/bench/failover-timing` runs 10).
//! - `partition_stops_the_old_primary_and_heals_as_secondary`: the primary's back links are
//!   cut while the initiator still reaches it: it stops acknowledging (quorum lost), drops the
//!   service IP, the majority promotes, nothing the old primary acknowledged after the cut is
//!   lost; healed, the old primary is Secondary and resyncs; the data areas end identical.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test node_autofailover -- --nocapture`

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::{Daemon, NetNs, binary, run_ok, run_with_timeout, sparse_file};

const VOLUME_BYTES: u64 = 128 * 1024 * 1024;
const BLOCK_BYTES: u64 = 4096;
const SERVICE_IP: &str = "10.78.0.100";
const FRONT: &str = "front0";
const BACK: &str = "back0";
const PORTAL_PORT: u16 = 3260;
const FORWARD_PORT: u16 = 3270;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Blocks each writer may take per run (its region); at one write per 20 ms that is 20 s.
const WRITER_BLOCKS_MAX: u64 = 1000;
const WRITE_INTERVAL: Duration = Duration::from_millis(20);
/// Generous bound on a failover: the figures are printed, this only catches a hang.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

struct Node {
    name: &'static str,
    ns: NetNs,
    front: String,
    back: String,
    socket: PathBuf,
    state: PathBuf,
    disk: Option<PathBuf>,
}

struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    initiator: NetNs,
    nodes: Vec<Node>,
    daemons: Vec<Option<Daemon>>,
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args), COMMAND_TIMEOUT);
}

fn pattern_of(block: u64) -> u64 {
    block % 251 + 1
}

impl Cluster {
    fn new() -> Cluster {
        tests::require_tool("ip", "iproute2");
        tests::require_tool("qemu-io", "qemu-utils qemu-block-extra");
        let dir = tempfile::tempdir().expect("temp dir");
        let initiator = NetNs::create("tnd-af");
        for bridge in ["brf", "brb"] {
            initiator.ip(&["link", "add", bridge, "type", "bridge"]);
            initiator.ip(&["link", "set", bridge, "up"]);
        }
        initiator.ip(&["addr", "add", "10.78.0.10/24", "dev", "brf"]);
        let mut nodes = Vec::new();
        for (index, name) in ["alpha", "beta", "tie"].into_iter().enumerate() {
            let ns = NetNs::create("tnd-af");
            let host = index + 1;
            for (device, bridge, net) in [(FRONT, "brf", 78), (BACK, "brb", 79)] {
                let port = format!("{bridge}p{index}");
                ip(&[
                    "link",
                    "add",
                    device,
                    "netns",
                    ns.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &port,
                    "netns",
                    initiator.name(),
                ]);
                initiator.ip(&["link", "set", &port, "master", bridge]);
                initiator.ip(&["link", "set", &port, "up"]);
                ns.ip(&["addr", "add", &format!("10.{net}.0.{host}/24"), "dev", device]);
                ns.ip(&["link", "set", device, "up"]);
            }
            let disk = (name != "tie").then(|| dir.path().join(format!("{name}.img")));
            if let Some(disk) = &disk {
                sparse_file(disk, VOLUME_BYTES);
            }
            nodes.push(Node {
                name,
                ns,
                front: format!("10.78.0.{host}"),
                back: format!("10.79.0.{host}"),
                socket: dir.path().join(format!("{name}.sock")),
                state: dir.path().join(format!("state-{name}")),
                disk,
            });
        }
        let mut text = String::from(
            "resource r0 {\n  options { quorum majority; on-no-quorum io-error; }\n  \
             net { protocol C; }\n",
        );
        for (id, n) in nodes.iter().enumerate() {
            let disk = n.disk.as_ref().map_or("none".to_owned(), |d| d.display().to_string());
            text.push_str(&format!(
                "  on {} {{\n    node-id {id};\n    address {}:7789;\n    volume 0 {{\n      \
                 device minor 0;\n      disk {disk};\n      meta-disk internal;\n    }}\n  }}\n",
                n.name, n.back
            ));
        }
        text.push_str("  connection-mesh { hosts alpha beta tie; }\n}\n");
        let config = dir.path().join("r0.res");
        std::fs::write(&config, text).expect("writing r0.res");
        Cluster { dir, config, initiator, nodes, daemons: vec![None, None, None] }
    }

    fn start(&mut self, index: usize) {
        let n = &self.nodes[index];
        let mut command = n.ns.exec(binary("tandemd"));
        command
            .arg("-c")
            .arg(&self.config)
            .args(["--node", n.name, "--portal", &format!("0.0.0.0:{PORTAL_PORT}")])
            .arg("--control-socket")
            .arg(&n.socket)
            .arg("--state-dir")
            .arg(&n.state)
            .env("RUST_LOG", "info");
        if n.disk.is_some() {
            let peer = &self.nodes[1 - index];
            command
                .args(["--service-ip", &format!("r0 {SERVICE_IP}/24 dev {FRONT}")])
                .args(["--promoter", "r0 preferred-nodes alpha,beta"])
                .args(["--forward-listen", &format!("{}:{FORWARD_PORT}", n.back)])
                .args(["--forward-peer", &format!("{}={}:{FORWARD_PORT}", peer.name, peer.back)]);
        }
        let mut daemon = Daemon::spawn(n.name, command);
        daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
        self.daemons[index] = Some(daemon);
    }

    fn adm(&self, index: usize, args: &[&str]) -> String {
        let mut command = Command::new(binary("tandemadm"));
        command.arg("-s").arg(&self.nodes[index].socket).args(args);
        // Waits carry their own --timeout; give them room beyond it.
        run_ok(&mut command, COMMAND_TIMEOUT * 3)
    }

    fn role(&self, index: usize) -> String {
        self.adm(index, &["role", "r0"]).trim().to_owned()
    }

    fn portal_url(&self, index: usize) -> String {
        format!("iscsi://{}:{PORTAL_PORT}/iqn.2026-11.org.tandem:r0/0", self.nodes[index].front)
    }

    fn service_url() -> String {
        format!("iscsi://{SERVICE_IP}:{PORTAL_PORT}/iqn.2026-11.org.tandem:r0/0")
    }

    fn has_service_ip(&self, index: usize) -> bool {
        run_ok(
            self.nodes[index].ns.exec("ip").args(["-o", "-4", "addr", "show", "dev", FRONT]),
            COMMAND_TIMEOUT,
        )
        .contains(&format!("inet {SERVICE_IP}/"))
    }

    /// Everything up; alpha promotes itself (first preferred node) once the data is UpToDate.
    fn bring_up(&mut self) {
        for i in 0..3 {
            self.start(i);
        }
        for i in 0..3 {
            self.adm(i, &["create-md", "r0"]);
            self.adm(i, &["up", "r0"]);
        }
        self.adm(0, &["wait-connect", "--timeout", "30", "r0"]);
        self.adm(1, &["wait-connect", "--timeout", "30", "r0"]);
        let tie = self.adm(2, &["status", "r0"]);
        assert!(tie.contains("disk:Diskless"), "the tiebreaker's status:\n{tie}");
        assert!(
            !self.has_service_ip(0) && self.role(0) == "Secondary",
            "no data yet: no promotion"
        );
        self.adm(0, &["new-current-uuid", "--clear-bitmap", "r0"]);
        tests::wait_for("alpha promotes itself", Duration::from_secs(20), || {
            self.role(0) == "Primary"
        });
        assert_eq!(self.role(1), "Secondary");
        tests::wait_for("alpha takes the service IP", Duration::from_secs(10), || {
            self.has_service_ip(0)
        });
        wait_until_serving(&self.initiator, &self.portal_url(1));
        let tie = self.adm(2, &["status", "r0"]);
        println!("the tiebreaker's status:\n{tie}");
        assert!(tie.contains("role:Secondary") && tie.contains("disk:Diskless"), "{tie}");
        assert!(tie.contains("alpha role:Primary"), "{tie}");
        // The promoter logs its promotion once the promote returned: the role can show first.
        self.daemons[0]
            .as_mut()
            .expect("alpha")
            .wait_for_log("promoter r0: role:Primary", Duration::from_secs(10));
    }

    /// CPU time (user + system, ms) a node's tandemd used so far, from /proc.
    fn cpu_ms(&self, index: usize) -> u64 {
        let pid = self.daemons[index].as_ref().expect("running").pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // Fields after the command name (which may hold spaces): utime is the 12th, stime 13th.
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        ticks * 10 // USER_HZ is 100
    }

    /// Reads back every acknowledged block through `url`; panics naming the first that differs.
    fn verify(&self, url: &str, acked: &[u64]) {
        for chunk in acked.chunks(400) {
            let mut command = self.initiator.exec("qemu-io");
            command.args(["-f", "raw"]);
            for block in chunk {
                command.arg("-c").arg(format!(
                    "read -P {} {} {BLOCK_BYTES}",
                    pattern_of(*block),
                    block * BLOCK_BYTES
                ));
            }
            command.arg(url);
            let output = run_with_timeout(&mut command, Duration::from_secs(120));
            let text = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success() && !text.contains("failed") && !text.contains("fail"),
                "an acknowledged write did not read back through {url}:\n{}",
                text.lines().filter(|l| l.contains("fail")).take(10).collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// Waits until `url` serves a read (a secondary's port once its forward link is up).
fn wait_until_serving(initiator: &NetNs, url: &str) {
    let served = tests::wait_until(Duration::from_secs(30), || {
        let mut command = initiator.exec("qemu-io");
        command.args(["-f", "raw", "-c", "read 0 4k", url]);
        let output = run_with_timeout(&mut command, Duration::from_secs(20));
        output.status.success() && !String::from_utf8_lossy(&output.stdout).contains("failed")
    });
    assert!(served, "{url} never served I/O");
}

/// A qemu-io session that writes block `first + n` with its pattern every 20 ms (commands on
/// its stdin, so it keeps one iSCSI session across the failover, as an instance would) and
/// timestamps each result line.
struct Writer {
    child: std::process::Child,
    acked: Arc<Mutex<Vec<(Instant, u64)>>>,
    failed: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    sender: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(initiator: &NetNs, url: &str, first: u64) -> Writer {
        let mut child = initiator
            .exec("stdbuf")
            .args(["-oL", "qemu-io", "-f", "raw"])
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-io");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let (seen_ok, seen_failed) = (acked.clone(), failed.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // "wrote 4096/4096 bytes at offset 8192"
                // (after a "qemu-io> " prompt when stdin is not a terminal)
                let wrote = line.find("wrote ").map(|at| &line[at..]);
                if let Some(offset) = wrote.and_then(|rest| {
                    rest.split_whitespace().last().and_then(|o| o.parse::<u64>().ok())
                }) {
                    seen_ok.lock().expect("lock").push((Instant::now(), offset / BLOCK_BYTES));
                } else if line.contains("failed") {
                    seen_failed.lock().expect("lock").push(Instant::now());
                }
            }
        });
        let mut stdin = child.stdin.take().expect("stdin");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let sender = std::thread::spawn(move || {
            for block in first..first + WRITER_BLOCKS_MAX {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let command =
                    format!("write -P {} {} {BLOCK_BYTES}", pattern_of(block), block * BLOCK_BYTES);
                if writeln!(stdin, "{command}").is_err() {
                    return;
                }
                std::thread::sleep(WRITE_INTERVAL);
            }
            let _ = writeln!(stdin, "quit");
        });
        Writer { child, acked, failed, stop, sender: Some(sender) }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Time from `start` to the first write completed after it.
    fn first_write_after(&self, start: Instant) -> Duration {
        loop {
            let first = self
                .acked
                .lock()
                .expect("lock")
                .iter()
                .find(|(at, _)| *at > start)
                .map(|(at, _)| *at - start);
            if let Some(elapsed) = first {
                return elapsed;
            }
            assert!(
                start.elapsed() < FAILOVER_DEADLINE,
                "no write completed within {FAILOVER_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// When writes failed, in ms relative to `start` (negative: before it).
    fn failures_ms(&self, start: Instant) -> Vec<i64> {
        let ms = |at: Instant| {
            let after = at.saturating_duration_since(start).as_millis();
            let before = start.saturating_duration_since(at).as_millis();
            i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(i64::MAX)
        };
        self.failed.lock().expect("lock").iter().map(|at| ms(*at)).collect()
    }

    /// Stops the session; returns the acknowledged blocks with their times and the failures.
    fn stop(mut self) -> (Vec<(Instant, u64)>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let acked = self.acked.lock().expect("lock").clone();
        let failed = self.failed.lock().expect("lock").len();
        (acked, failed)
    }
}

impl Drop for Writer {
    /// A failing test must not leave its qemu-io behind (`stop` reaps it on success).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Death {
    /// kill -9 of tandemd; the host and its kernel stay (connections are reset).
    Process,
    /// The host's links are cut, then tandemd is killed: nothing is reset, peers must notice.
    Host,
}

fn distribution(label: &str, values: &mut [Duration]) {
    values.sort();
    let ms = |d: &Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
    println!(
        "{label}: n={} min {} ms, median {} ms, max {} ms; all: [{}] ms",
        values.len(),
        ms(&values[0]),
        ms(&values[values.len() / 2]),
        ms(&values[values.len() - 1]),
        values.iter().map(ms).collect::<Vec<_>>().join(", ")
    );
}

/// One failover: `primary` dies as `death` says; returns (service IP, multipath) times from
/// the kill to the first completed write.
fn failover(
    cluster: &mut Cluster,
    primary: usize,
    death: Death,
    next_block: &mut u64,
) -> (Duration, Duration) {
    let survivor = 1 - primary;
    let service = Writer::start(&cluster.initiator, &Cluster::service_url(), *next_block);
    *next_block += WRITER_BLOCKS_MAX;
    let multipath = Writer::start(&cluster.initiator, &cluster.portal_url(survivor), *next_block);
    *next_block += WRITER_BLOCKS_MAX;
    let writing = tests::wait_until(Duration::from_secs(20), || {
        service.acked_count() > 10 && multipath.acked_count() > 10
    });
    assert!(
        writing,
        "the sessions do not write: {} acked through the service IP, {} through {}'s portal",
        service.acked_count(),
        multipath.acked_count(),
        cluster.nodes[survivor].name
    );
    if death == Death::Host {
        cluster.nodes[primary].ns.set_link(FRONT, false);
        cluster.nodes[primary].ns.set_link(BACK, false);
    }
    let daemon = cluster.daemons[primary].as_mut().expect("running");
    daemon.kill9();
    let killed = Instant::now();
    let service_time = service.first_write_after(killed);
    let multipath_time = multipath.first_write_after(killed);
    assert_eq!(cluster.role(survivor), "Primary", "the survivor promoted itself");
    let multipath_failures = multipath.failures_ms(killed);
    let (service_acked, service_failed) = service.stop();
    let (multipath_acked, multipath_failed) = multipath.stop();
    let log = cluster.daemons[survivor].as_ref().expect("survivor").log();
    let decision =
        log.lines().rev().find(|l| l.contains("promoter r0: role:Primary")).unwrap_or("");
    println!(
        "{death:?} death of {}: first write after {service_time:?} (service IP, {} acked, {service_failed} failed), \
         {multipath_time:?} (multipath via {}, {} acked, {multipath_failed} failed, at \
         {multipath_failures:?} ms); {}",
        cluster.nodes[primary].name,
        service_acked.len(),
        cluster.nodes[survivor].name,
        multipath_acked.len(),
        decision.split("promoter r0: ").nth(1).unwrap_or(decision)
    );
    // Every acknowledged write is on the new primary.
    let blocks: Vec<u64> =
        service_acked.iter().chain(&multipath_acked).map(|(_, block)| *block).collect();
    cluster.verify(&cluster.portal_url(survivor), &blocks);
    // The dead node comes back (its tandemd brings r0 up as Secondary and removes the
    // leftover service IP) and resyncs. A dead host reboots without the address: its links
    // come back only once tandemd has removed it, or its kernel could answer ARP for it.
    cluster.daemons[primary] = None;
    cluster.start(primary);
    tests::wait_for("the leftover service IP goes", Duration::from_secs(10), || {
        !cluster.has_service_ip(primary)
    });
    if death == Death::Host {
        cluster.nodes[primary].ns.set_link(FRONT, true);
        cluster.nodes[primary].ns.set_link(BACK, true);
    }
    cluster.adm(primary, &["wait-sync", "--timeout", "60", "r0"]);
    assert_eq!(cluster.role(primary), "Secondary");
    wait_until_serving(&cluster.initiator, &cluster.portal_url(primary));
    (service_time, multipath_time)
}

#[test]
fn kill9_failover_through_service_ip_and_multipath() {
    tests::require_slow!();
    let runs: usize =
        std::env::var("TANDEM_AUTOFAILOVER_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let kinds: Vec<Death> = match std::env::var("TANDEM_AUTOFAILOVER_DEATH").as_deref() {
        Ok("process") => vec![Death::Process],
        Ok("host") => vec![Death::Host],
        _ => vec![Death::Process, Death::Host],
    };
    let mut cluster = Cluster::new();
    cluster.bring_up();
    // Idle cost of the three daemons (the promoter samples the engine every 10 ms on alpha
    // and beta; the tiebreaker runs none).
    let before: Vec<u64> = (0..3).map(|i| cluster.cpu_ms(i)).collect();
    std::thread::sleep(Duration::from_secs(10));
    let used: Vec<u64> = (0..3).map(|i| cluster.cpu_ms(i) - before[i]).collect();
    println!(
        "idle CPU over 10 s: alpha (primary, promoter) {} ms, beta (secondary, promoter) {} ms, \
         tie (diskless, no promoter) {} ms",
        used[0], used[1], used[2]
    );
    let mut primary = 0;
    let mut next_block = 256;
    let mut times: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    // Host deaths: TANDEM_AUTOFAILOVER_HOST_RUNS when set (see the README on the forward links
    // a dead host leaves behind).
    let host_runs: usize = std::env::var("TANDEM_AUTOFAILOVER_HOST_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(runs);
    for death in kinds {
        let runs = if death == Death::Host { host_runs } else { runs };
        for _ in 0..runs {
            let (service, multipath) = failover(&mut cluster, primary, death, &mut next_block);
            let (s, m) = match death {
                Death::Process => ("kill -9, service IP", "kill -9, multipath"),
                Death::Host => ("host death, service IP", "host death, multipath"),
            };
            times.entry(s).or_default().push(service);
            times.entry(m).or_default().push(multipath);
            primary = 1 - primary;
        }
    }
    for (label, values) in &mut times {
        distribution(&format!("failover, kill to first completed write ({label})"), values);
    }
    let _ = &cluster.dir;
}

#[test]
fn partition_stops_the_old_primary_and_heals_as_secondary() {
    tests::require_slow!();
    let mut cluster = Cluster::new();
    cluster.bring_up();
    // A session on alpha's own portal: it keeps reaching alpha across the partition, so it
    // sees exactly what the old primary acknowledges after the cut.
    let direct = Writer::start(&cluster.initiator, &cluster.portal_url(0), 256);
    let service =
        Writer::start(&cluster.initiator, &Cluster::service_url(), 256 + WRITER_BLOCKS_MAX);
    tests::wait_for("both sessions write", Duration::from_secs(20), || {
        direct.acked_count() > 10 && service.acked_count() > 10
    });
    cluster.nodes[0].ns.set_link(BACK, false);
    let cut = Instant::now();
    tests::wait_for("beta promotes itself", FAILOVER_DEADLINE, || cluster.role(1) == "Primary");
    let promoted = cut.elapsed();
    let service_time = service.first_write_after(cut);
    tests::wait_for("alpha drops the service IP", Duration::from_secs(10), || {
        !cluster.has_service_ip(0)
    });
    let alpha_log = cluster.daemons[0].as_ref().expect("alpha").log();
    assert!(alpha_log.contains("as Primary (quorum:no): services stopped"), "{alpha_log}");
    let (direct_acked, direct_failed) = direct.stop();
    let (service_acked, service_failed) = service.stop();
    let last_direct = direct_acked.iter().map(|(at, _)| *at).max().expect("acked");
    let acked_after_cut = direct_acked.iter().filter(|(at, _)| *at > cut).count();
    println!(
        "partition: alpha's last acknowledged write {:?} after the cut ({acked_after_cut} acked \
         after it, {direct_failed} failed); beta primary after {promoted:?}; first write through \
         the service IP after {service_time:?} ({service_failed} failed)",
        last_direct.saturating_duration_since(cut)
    );
    // Quorum lost within the ping timeout (2 s) plus a poll: alpha acknowledges nothing later.
    assert!(
        last_direct < cut + Duration::from_millis(2_500),
        "alpha acknowledged writes long after the cut"
    );
    let blocks: Vec<u64> =
        direct_acked.iter().chain(&service_acked).map(|(_, block)| *block).collect();
    cluster.verify(&cluster.portal_url(1), &blocks);

    // Healed: alpha is Secondary (it demoted on quorum loss) and resyncs from beta.
    cluster.nodes[0].ns.set_link(BACK, true);
    cluster.adm(0, &["wait-sync", "--timeout", "60", "r0"]);
    assert_eq!(cluster.role(0), "Secondary");
    assert_eq!(cluster.role(1), "Primary");
    let status = cluster.adm(0, &["status", "r0"]);
    assert!(status.contains("disk:UpToDate") && status.contains("beta role:Primary"), "{status}");
    // The same data on both replicas (data areas: each file ends in its own metadata).
    let size = cluster.adm(0, &["status", "--statistics", "r0"]);
    let size_kib: u64 = size
        .split_whitespace()
        .find_map(|w| w.strip_prefix("size:"))
        .and_then(|v| v.parse().ok())
        .expect("size in the status statistics");
    let read = |i: usize| {
        let mut data = std::fs::read(cluster.nodes[i].disk.as_ref().expect("disk")).expect("read");
        data.truncate(usize::try_from(size_kib * 1024).expect("fits"));
        data
    };
    assert!(read(0) == read(1), "the replicas differ after the resync");
}

//! Storage node end to end: two tandemd on loopback driven by tandemadm, QEMU's iSCSI
//! initiator (qemu-io) writing through the primary, a primary killed with -9 mid-stream, the
//! secondary promoted, every acknowledged write read back, the old primary resyncing as
//! secondary, and split brain shown and resolved.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tests::{Daemon, binary, free_port, run_ok, run_with_timeout, sparse_file};

const VOLUME_BYTES: u64 = 64 * 1024 * 1024;
const CHUNK_BYTES: u64 = 64 * 1024;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

struct NodeSpec {
    name: &'static str,
    replication_port: u16,
    portal: SocketAddr,
    socket: PathBuf,
    state: PathBuf,
}

struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    nodes: [NodeSpec; 2],
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = |name: &'static str| NodeSpec {
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
            sparse_file(&disk, VOLUME_BYTES);
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
        Cluster { dir, config, nodes }
    }

    fn start(&self, index: usize) -> Daemon {
        let n = &self.nodes[index];
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

    fn adm(&self, index: usize, args: &[&str]) -> Output {
        let mut command = Command::new(binary("tandemadm"));
        command.arg("-s").arg(&self.nodes[index].socket).args(args);
        run_with_timeout(&mut command, COMMAND_TIMEOUT)
    }

    fn adm_ok(&self, index: usize, args: &[&str]) -> String {
        let mut command = Command::new(binary("tandemadm"));
        command.arg("-s").arg(&self.nodes[index].socket).args(args);
        run_ok(&mut command, COMMAND_TIMEOUT)
    }

    fn url(&self, index: usize) -> String {
        format!("iscsi://{}/iqn.2026-11.org.tandem:r0/0", self.nodes[index].portal)
    }

    /// create-md + up on both, wait for the connection, skip the initial sync, promote `primary`.
    fn bring_up(&self, primary: usize) {
        for i in 0..2 {
            self.adm_ok(i, &["create-md", "r0"]);
            self.adm_ok(i, &["up", "r0"]);
        }
        self.adm_ok(primary, &["wait-connect", "--timeout", "20", "r0"]);
        self.adm_ok(primary, &["new-current-uuid", "--clear-bitmap", "r0"]);
        self.adm_ok(primary, &["wait-sync", "--timeout", "20", "r0"]);
        self.adm_ok(primary, &["primary", "r0"]);
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn qemu_io(url: &str, commands: &[String]) -> Output {
    let qemu_io = tests::require_tool("qemu-io", "qemu-utils");
    let mut command = Command::new(qemu_io);
    command.args(["-f", "raw"]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    command.arg(url);
    run_with_timeout(&mut command, Duration::from_secs(120))
}

fn pattern_of(chunk: u64, generation: u64) -> u64 {
    1 + (chunk * 7 + generation * 13) % 250
}

fn value_of(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

#[test]
fn tandemadm_drives_two_nodes() {
    let cluster = Cluster::new();
    if let Some(drbdadm) = tests::find_in_path("drbdadm") {
        let output = run_with_timeout(
            Command::new(&drbdadm)
                .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
                .arg("-c")
                .arg(&cluster.config)
                .args(["dump", "all"]),
            COMMAND_TIMEOUT,
        );
        assert!(output.status.success(), "drbdadm refuses the test's file: {}", text(&output));
        // tandemadm -c FILE dump reads the file itself (no daemon); drbdadm accepts the result.
        let dumped = run_ok(
            Command::new(binary("tandemadm")).arg("-c").arg(&cluster.config).args(["dump", "all"]),
            COMMAND_TIMEOUT,
        );
        let dump_file = cluster.dir.path().join("dumped.res");
        std::fs::write(&dump_file, &dumped).expect("writing the dump");
        let output = run_with_timeout(
            Command::new(drbdadm)
                .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
                .arg("-c")
                .arg(&dump_file)
                .args(["dump", "all"]),
            COMMAND_TIMEOUT,
        );
        assert!(
            output.status.success(),
            "drbdadm refuses tandemadm's dump: {}\n{dumped}",
            text(&output)
        );
    }
    let _alpha = cluster.start(0);
    let _beta = cluster.start(1);

    let refused = cluster.adm(0, &["up", "r0"]);
    assert_eq!(refused.status.code(), Some(10), "up without metadata: {}", text(&refused));
    assert!(text(&refused).contains("tandemadm create-md r0"), "{}", text(&refused));

    cluster.bring_up(0);
    // The metadata is DRBD 9's v09 layout at the end of the disk: drbdmeta reads it.
    if let Some(drbdmeta) = tests::find_in_path("drbdmeta") {
        for (index, node) in cluster.nodes.iter().enumerate() {
            let dump = run_ok(
                Command::new(&drbdmeta)
                    .args(["--force", "-", "v09"])
                    .arg(cluster.dir.path().join(format!("{}.img", node.name)))
                    .args(["internal", "dump-md"]),
                COMMAND_TIMEOUT,
            );
            assert!(dump.contains(&format!("node-id {index};")), "drbdmeta dump-md:\n{dump}");
        }
    }
    assert_eq!(cluster.adm_ok(0, &["role", "r0"]), "Primary\n");
    assert_eq!(cluster.adm_ok(0, &["cstate", "r0"]), "Connected\n");
    assert_eq!(cluster.adm_ok(0, &["dstate", "r0"]), "UpToDate/UpToDate\n");
    let status = cluster.adm_ok(0, &["status", "r0"]);
    assert_eq!(
        status,
        "r0 role:Primary\n  disk:UpToDate\n  beta role:Secondary\n    peer-disk:UpToDate\n\n"
    );
    println!("tandemadm status on alpha:\n{status}");
    let status = cluster.adm_ok(1, &["status"]);
    assert_eq!(
        status,
        "r0 role:Secondary\n  disk:UpToDate\n  alpha role:Primary\n    peer-disk:UpToDate\n\n",
        "the secondary shows the primary's role"
    );

    // A waiting tandemadm does not block verbs on the same resource: wait-connect on a
    // disconnected beta returns once `connect` (from another tandemadm) got through.
    cluster.adm_ok(1, &["disconnect", "r0"]);
    assert_eq!(cluster.adm_ok(1, &["cstate", "r0"]), "StandAlone\n");
    let mut waiter = Command::new(binary("tandemadm"))
        .arg("-s")
        .arg(&cluster.nodes[1].socket)
        .args(["wait-connect", "--timeout", "60", "r0"])
        .stdout(Stdio::null())
        .spawn()
        .expect("wait-connect");
    std::thread::sleep(Duration::from_millis(200));
    cluster.adm_ok(1, &["connect", "r0"]);
    let waited = waiter.wait().expect("wait-connect exits");
    assert!(waited.success(), "wait-connect: {waited}");
    cluster.adm_ok(0, &["wait-sync", "--timeout", "20", "r0"]);
    let refused = cluster.adm(1, &["primary", "r0"]);
    assert_eq!(refused.status.code(), Some(11), "{}", text(&refused));
    assert!(text(&refused).contains("refusing to become primary"), "{}", text(&refused));

    let events = cluster.adm_ok(1, &["events2", "--now", "r0"]);
    let lines: Vec<&str> = events.lines().collect();
    assert!(lines[0].starts_with("exists resource name:r0 role:Secondary"), "{events}");
    assert!(
        events.contains(
            "exists connection name:r0 peer-node-id:0 conn-name:alpha connection:Connected"
        )
    );
    assert!(events.contains("exists peer-device name:r0 peer-node-id:0 conn-name:alpha volume:0 replication:Established peer-disk:UpToDate"));
    assert_eq!(lines.last(), Some(&"exists -"));

    let usage = cluster.adm(0, &["frobnicate", "r0"]);
    assert_eq!(usage.status.code(), Some(3));
    let unknown = cluster.adm(0, &["up", "nope"]);
    assert_eq!(unknown.status.code(), Some(10));

    // Demote and promote the other way round, with an events2 stream watching beta.
    let mut events = Command::new(binary("tandemadm"))
        .arg("-s")
        .arg(&cluster.nodes[1].socket)
        .args(["events2", "r0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting tandemadm events2");
    let events_out = events.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(events_out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    cluster.adm_ok(0, &["secondary", "r0"]);
    cluster.adm_ok(1, &["primary", "r0"]);
    let wanted = "change resource name:r0 role:Primary may_promote:no";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline && !seen.iter().any(|l: &String| l.starts_with(wanted)) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(line);
        }
    }
    let _ = events.kill();
    let _ = events.wait();
    let _ = reader.join();
    assert!(seen.iter().any(|l| l == "exists -"), "{seen:?}");
    assert!(
        seen.iter().any(|l| l.starts_with(wanted)),
        "events2 stream missed the promotion: {seen:?}"
    );

    // adjust: nothing to do while the file is unchanged; a changed setting is named, not faked.
    cluster.adm_ok(0, &["adjust", "r0"]);
    let text_before = std::fs::read_to_string(&cluster.config).expect("r0.res");
    std::fs::write(&cluster.config, text_before.replace("protocol C;", "protocol B;"))
        .expect("edit");
    let adjust = cluster.adm(0, &["adjust", "r0"]);
    assert_eq!(adjust.status.code(), Some(20), "{}", text(&adjust));
    assert!(text(&adjust).contains("cannot apply new settings"), "{}", text(&adjust));
    std::fs::write(&cluster.config, text_before).expect("restore");
    cluster.adm_ok(0, &["adjust", "r0"]);

    assert_eq!(cluster.adm_ok(1, &["role", "r0"]), "Primary\n");
    assert_eq!(cluster.adm_ok(0, &["role", "r0"]), "Secondary\n");

    // create-md never overwrites metadata silently.
    let again = cluster.adm(0, &["create-md", "r0"]);
    assert_eq!(again.status.code(), Some(11), "{}", text(&again));
    assert!(text(&again).contains("resource is up"), "{}", text(&again));

    // down: alpha leaves; beta (Primary) keeps serving and sees the peer gone.
    cluster.adm_ok(0, &["down", "r0"]);
    let gone = cluster.adm(0, &["status", "r0"]);
    assert_eq!(gone.status.code(), Some(10), "{}", text(&gone));
    assert_eq!(cluster.adm_ok(0, &["status"]), "", "status of everything lists what is up");
    assert!(
        tests::wait_until(Duration::from_secs(10), || {
            cluster.adm_ok(1, &["status", "r0"]).contains("alpha connection:Connecting")
        }),
        "{}",
        cluster.adm_ok(1, &["status", "r0"])
    );
}

/// Writes chunks in order through qemu-io, one command per chunk, and returns the offsets it
/// acknowledged before `stop_after` acknowledgements (then the target is killed by `kill`).
fn write_until_killed(
    url: &str,
    chunks: u64,
    generation: u64,
    stop_after: usize,
    kill: impl FnOnce(),
) -> Vec<u64> {
    let qemu_io = tests::require_tool("qemu-io", "qemu-utils");
    let stdbuf = tests::require_tool("stdbuf", "coreutils");
    let mut command = Command::new(stdbuf);
    command.arg("-oL").arg(qemu_io).args(["-f", "raw"]);
    for chunk in 0..chunks {
        command.arg("-c").arg(format!(
            "write -P {} {} {}",
            pattern_of(chunk, generation),
            chunk * CHUNK_BYTES,
            CHUNK_BYTES
        ));
    }
    command.arg(url).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = command.spawn().expect("starting qemu-io");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // "wrote 65536/65536 bytes at offset 131072"
            let offset = line.strip_prefix("wrote ").and_then(|l| l.split(" at offset ").nth(1));
            if let Some(Ok(offset)) = offset.map(|o| o.trim().parse::<u64>()) {
                let _ = tx.send(offset);
            }
        }
    });
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < stop_after && Instant::now() < deadline {
        if let Ok(offset) = rx.recv_timeout(Duration::from_millis(100)) {
            acked.push(offset);
        }
    }
    assert!(acked.len() >= stop_after, "qemu-io acknowledged only {} writes", acked.len());
    kill();
    // Whatever qemu-io reports after the kill was acknowledged before it (or never is).
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    while let Ok(offset) = rx.try_recv() {
        acked.push(offset);
    }
    acked
}

fn verify(url: &str, offsets: &[(u64, u64)]) {
    for batch in offsets.chunks(200) {
        let commands: Vec<String> = batch
            .iter()
            .map(|(offset, pattern)| format!("read -P {pattern} {offset} {CHUNK_BYTES}"))
            .collect();
        let output = qemu_io(url, &commands);
        let out = text(&output);
        assert!(
            !out.contains("Pattern verification failed") && !out.contains("failed"),
            "acknowledged data lost or wrong:\n{out}"
        );
        assert_eq!(out.matches("read ").count(), batch.len(), "{out}");
    }
}

fn status_statistics(cluster: &Cluster, index: usize) -> String {
    cluster.adm_ok(index, &["status", "--statistics", "r0"])
}

/// Runs of the failover test (each with a fresh pair and its own kill point); the soak sets
/// TANDEM_FAILOVER_RUNS=20.
fn failover_runs() -> u64 {
    std::env::var("TANDEM_FAILOVER_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

#[test]
fn failover_keeps_every_acknowledged_write_and_resyncs_only_changes() {
    tests::require_slow!();
    let seed: u64 = std::env::var("TANDEM_FAILOVER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos().into())
                .unwrap_or(7)
        });
    println!("failover seed {seed} (TANDEM_FAILOVER_SEED={seed} repeats these kill points)");
    for run in 0..failover_runs() {
        // Kill after 20..=299 acknowledgements: early, in the first extent, or later.
        let stop_after = 20
            + (seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(run.wrapping_mul(1442695040888963407))
                >> 33)
                % 280;
        println!("run {run}: kill -9 after {stop_after} acknowledged writes");
        failover_run(usize::try_from(stop_after).expect("small"));
    }
}

fn failover_run(stop_after: usize) {
    let cluster = Cluster::new();
    let mut alpha = cluster.start(0);
    let _beta = cluster.start(1);
    cluster.bring_up(0);

    // Stream writes through alpha; kill it -9 after 150 acknowledgements.
    let chunks = 400;
    let alpha_pid = alpha.pid();
    let acked = write_until_killed(&cluster.url(0), chunks, 1, stop_after, || {
        // Killed by the PID the harness gave us, as `kill -9 PID` would.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(alpha_pid).expect("pid")),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    alpha.kill9();
    println!("acknowledged writes before the kill: {}", acked.len());

    // Promote beta; every acknowledged write must read back through beta's portal.
    let started = Instant::now();
    cluster.adm_ok(1, &["primary", "r0"]);
    println!("beta promoted {:?} after the kill was noticed", started.elapsed());
    let expected: Vec<(u64, u64)> =
        acked.iter().map(|o| (*o, pattern_of(o / CHUNK_BYTES, 1))).collect();
    verify(&cluster.url(1), &expected);

    // New writes on beta while alpha is away: 2 MiB at 32 MiB.
    let new_region = 32 * 1024 * 1024;
    let out = qemu_io(&cluster.url(1), &[format!("write -P 77 {new_region} 2M")]);
    assert!(text(&out).contains("wrote 2097152/2097152"), "{}", text(&out));

    // Restart alpha: it comes back as Secondary and resyncs from beta.
    let _alpha = cluster.start(0);
    let before = Instant::now();
    cluster.adm_ok(0, &["wait-sync", "--timeout", "60", "r0"]);
    println!("alpha resynced in {:?}", before.elapsed());
    assert_eq!(cluster.adm_ok(0, &["role", "r0"]), "Secondary\n");
    let statistics = status_statistics(&cluster, 0);
    println!("tandemadm status --statistics on alpha after rejoining:\n{statistics}");
    let received_kib =
        statistics.lines().find_map(|l| value_of(l, "received:")).expect("received: counter");
    let resync_blocks = received_kib / 4;
    println!(
        "resync after failover: {resync_blocks} blocks of 4 KiB received by alpha (volume: {} blocks, \
         changed on beta: {} blocks)",
        VOLUME_BYTES / 4096,
        2 * 1024 * 1024 / 4096
    );
    assert!(resync_blocks >= 512, "the 2 MiB written on beta must come over");
    assert!(resync_blocks < VOLUME_BYTES / 4096 / 2, "a full sync is not 'only what changed'");

    // Switch back: alpha holds everything.
    cluster.adm_ok(1, &["secondary", "r0"]);
    cluster.adm_ok(0, &["primary", "r0"]);
    verify(&cluster.url(0), &expected);
    let out = qemu_io(&cluster.url(0), &[format!("read -P 77 {new_region} 2M")]);
    assert!(!text(&out).contains("failed"), "{}", text(&out));
    drop(cluster.dir);
}

#[test]
fn split_brain_is_shown_and_resolved_with_discard_my_data() {
    tests::require_slow!();
    let cluster = Cluster::new();
    let _alpha = cluster.start(0);
    let _beta = cluster.start(1);
    cluster.bring_up(0);
    cluster.adm_ok(0, &["disconnect", "r0"]);
    cluster.adm_ok(1, &["disconnect", "r0"]);
    cluster.adm_ok(1, &["primary", "r0"]);
    let out = qemu_io(&cluster.url(0), &["write -P 11 0 1M".into()]);
    assert!(text(&out).contains("wrote"), "{}", text(&out));
    let out = qemu_io(&cluster.url(1), &["write -P 22 1M 1M".into()]);
    assert!(text(&out).contains("wrote"), "{}", text(&out));
    cluster.adm_ok(1, &["secondary", "r0"]);
    cluster.adm_ok(0, &["connect", "r0"]);
    cluster.adm_ok(1, &["connect", "r0"]);
    let split = tests::wait_until(Duration::from_secs(10), || {
        cluster.adm_ok(1, &["status", "r0"]).contains("alpha connection:StandAlone")
    });
    let status = cluster.adm_ok(1, &["status", "r0"]);
    println!("beta after split brain:\n{status}");
    assert!(split, "split brain must leave the connection StandAlone: {status}");
    // Resolve: beta's changes are thrown away.
    cluster.adm_ok(1, &["connect", "--discard-my-data", "r0"]);
    cluster.adm_ok(0, &["connect", "r0"]);
    cluster.adm_ok(1, &["wait-sync", "--timeout", "30", "r0"]);
    let status = cluster.adm_ok(0, &["status", "r0"]);
    println!("alpha after resolution:\n{status}");
    assert_eq!(
        status,
        "r0 role:Primary\n  disk:UpToDate\n  beta role:Secondary\n    peer-disk:UpToDate\n\n"
    );
    cluster.adm_ok(0, &["secondary", "r0"]);
    cluster.adm_ok(1, &["primary", "r0"]);
    let out = qemu_io(&cluster.url(1), &["read -P 11 0 1M".into(), "read -P 0 1M 1M".into()]);
    assert!(!text(&out).contains("failed"), "beta must hold alpha's data only: {}", text(&out));
}

#[test]
fn a_broken_resource_file_costs_only_its_resources() {
    let dir = tempfile::tempdir().expect("temp dir");
    let res = dir.path().join("res");
    std::fs::create_dir_all(&res).expect("mkdir");
    let disk = dir.path().join("r0.img");
    sparse_file(&disk, VOLUME_BYTES);
    std::fs::write(
        res.join("r0.res"),
        format!(
            "resource r0 {{\n  on alpha {{ node-id 0; address 127.0.0.1:{}; volume 0 {{ device \
             minor 0; disk {}; meta-disk internal; }} }}\n  on beta {{ node-id 1; address \
             127.0.0.1:{}; volume 0 {{ device minor 0; disk /nonexistent; meta-disk internal; \
             }} }}\n}}\n",
            free_port(),
            disk.display(),
            free_port()
        ),
    )
    .expect("r0.res");
    std::fs::write(res.join("r1.res"), "resource r1 {\n  on alpha {\n    bogus-option 1;\n")
        .expect("r1");
    let config = dir.path().join("drbd.conf");
    std::fs::write(&config, "include \"res/*.res\";\n").expect("drbd.conf");
    let socket = dir.path().join("alpha.sock");
    let mut command = Command::new(binary("tandemd"));
    command
        .arg("-c")
        .arg(&config)
        .args(["--node", "alpha", "--portal", &format!("127.0.0.1:{}", free_port())])
        .arg("--control-socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"));
    let mut daemon = Daemon::spawn("alpha", command);
    daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
    let log = daemon.log();
    assert!(log.contains("resource file skipped") && log.contains("r1.res:"), "{log}");
    assert!(log.contains("resources=1"), "r0 is still hosted: {log}");
    let adm = |args: &[&str]| {
        run_ok(Command::new(binary("tandemadm")).arg("-s").arg(&socket).args(args), COMMAND_TIMEOUT)
    };
    adm(&["create-md", "r0"]);
    adm(&["up", "r0"]);
    assert_eq!(adm(&["dstate", "r0"]), "Inconsistent/DUnknown\n");
}

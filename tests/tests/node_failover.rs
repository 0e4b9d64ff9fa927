//! Storage node end to end: two tandemd on loopback driven by tandemadm, QEMU's iSCSI
//! initiator (qemu-io) writing through the primary, a primary killed with -9 mid-stream, the
//! secondary promoted, every acknowledged write read back, the old primary resyncing as
//! secondary, and split brain shown and resolved.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::clients::{output_text, qemu_io};
use tests::storage_pair::{PairOptions, StoragePair};
use tests::{Daemon, binary, free_port, run_ok, run_with_timeout, sparse_file};

const VOLUME_BYTES: u64 = 64 * 1024 * 1024;
const CHUNK_BYTES: u64 = 64 * 1024;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The pair this file tests: no forward links (node_multipath covers them).
fn new_cluster() -> StoragePair {
    StoragePair::with_options(PairOptions {
        volume_bytes: VOLUME_BYTES,
        forward_links: false,
        ..PairOptions::default()
    })
}

fn pattern_of(chunk: u64, generation: u64) -> u64 {
    1 + (chunk * 7 + generation * 13) % 250
}

fn value_of(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

#[test]
fn tandemadm_drives_two_nodes() {
    let cluster = new_cluster();
    if let Some(drbdadm) = tests::find_in_path("drbdadm") {
        let output = run_with_timeout(
            Command::new(&drbdadm)
                .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
                .arg("-c")
                .arg(&cluster.config)
                .args(["dump", "all"]),
            COMMAND_TIMEOUT,
        );
        assert!(
            output.status.success(),
            "drbdadm refuses the test's file: {}",
            output_text(&output)
        );
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
            output_text(&output)
        );
    }
    let _alpha = cluster.start(0);
    let _beta = cluster.start(1);

    let refused = cluster.adm_output(0, &["up", "r0"]);
    assert_eq!(refused.status.code(), Some(10), "up without metadata: {}", output_text(&refused));
    assert!(output_text(&refused).contains("tandemadm create-md r0"), "{}", output_text(&refused));

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
    assert_eq!(cluster.adm(0, &["role", "r0"]), "Primary\n");
    assert_eq!(cluster.adm(0, &["cstate", "r0"]), "Connected\n");
    assert_eq!(cluster.adm(0, &["dstate", "r0"]), "UpToDate/UpToDate\n");
    let status = cluster.adm(0, &["status", "r0"]);
    assert_eq!(
        status,
        "r0 role:Primary\n  disk:UpToDate\n  beta role:Secondary\n    peer-disk:UpToDate\n\n"
    );
    println!("tandemadm status on alpha:\n{status}");
    let status = cluster.adm(1, &["status"]);
    assert_eq!(
        status,
        "r0 role:Secondary\n  disk:UpToDate\n  alpha role:Primary\n    peer-disk:UpToDate\n\n",
        "the secondary shows the primary's role"
    );

    // A waiting tandemadm does not block verbs on the same resource: wait-connect on a
    // disconnected beta returns once `connect` (from another tandemadm) got through.
    cluster.adm(1, &["disconnect", "r0"]);
    assert_eq!(cluster.adm(1, &["cstate", "r0"]), "StandAlone\n");
    let mut waiter = Command::new(binary("tandemadm"))
        .arg("-s")
        .arg(&cluster.nodes[1].socket)
        .args(["wait-connect", "--timeout", "60", "r0"])
        .stdout(Stdio::null())
        .spawn()
        .expect("wait-connect");
    std::thread::sleep(Duration::from_millis(200));
    cluster.adm(1, &["connect", "r0"]);
    let waited = waiter.wait().expect("wait-connect exits");
    assert!(waited.success(), "wait-connect: {waited}");
    cluster.adm(0, &["wait-sync", "--timeout", "20", "r0"]);
    let refused = cluster.adm_output(1, &["primary", "r0"]);
    assert_eq!(refused.status.code(), Some(11), "{}", output_text(&refused));
    assert!(
        output_text(&refused).contains("refusing to become primary"),
        "{}",
        output_text(&refused)
    );

    let events = cluster.adm(1, &["events2", "--now", "r0"]);
    let lines: Vec<&str> = events.lines().collect();
    assert!(lines[0].starts_with("exists resource name:r0 role:Secondary"), "{events}");
    assert!(
        events.contains(
            "exists connection name:r0 peer-node-id:0 conn-name:alpha connection:Connected"
        )
    );
    assert!(events.contains("exists peer-device name:r0 peer-node-id:0 conn-name:alpha volume:0 replication:Established peer-disk:UpToDate"));
    assert_eq!(lines.last(), Some(&"exists -"));

    let usage = cluster.adm_output(0, &["frobnicate", "r0"]);
    assert_eq!(usage.status.code(), Some(3));
    let unknown = cluster.adm_output(0, &["up", "nope"]);
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
    cluster.adm(0, &["secondary", "r0"]);
    cluster.adm(1, &["primary", "r0"]);
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
    cluster.adm(0, &["adjust", "r0"]);
    let text_before = std::fs::read_to_string(&cluster.config).expect("r0.res");
    std::fs::write(&cluster.config, text_before.replace("protocol C;", "protocol B;"))
        .expect("edit");
    let adjust = cluster.adm_output(0, &["adjust", "r0"]);
    assert_eq!(adjust.status.code(), Some(20), "{}", output_text(&adjust));
    assert!(output_text(&adjust).contains("cannot apply new settings"), "{}", output_text(&adjust));
    std::fs::write(&cluster.config, text_before).expect("restore");
    cluster.adm(0, &["adjust", "r0"]);

    assert_eq!(cluster.adm(1, &["role", "r0"]), "Primary\n");
    assert_eq!(cluster.adm(0, &["role", "r0"]), "Secondary\n");

    // create-md never overwrites metadata silently.
    let again = cluster.adm_output(0, &["create-md", "r0"]);
    assert_eq!(again.status.code(), Some(11), "{}", output_text(&again));
    assert!(output_text(&again).contains("resource is up"), "{}", output_text(&again));

    // down: alpha leaves; beta (Primary) keeps serving and sees the peer gone.
    cluster.adm(0, &["down", "r0"]);
    let gone = cluster.adm_output(0, &["status", "r0"]);
    assert_eq!(gone.status.code(), Some(10), "{}", output_text(&gone));
    assert_eq!(cluster.adm(0, &["status"]), "", "status of everything lists what is up");
    assert!(
        tests::wait_until(Duration::from_secs(10), || {
            cluster.adm(1, &["status", "r0"]).contains("alpha connection:Connecting")
        }),
        "{}",
        cluster.adm(1, &["status", "r0"])
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
        let out = output_text(&output);
        assert!(
            !out.contains("Pattern verification failed") && !out.contains("failed"),
            "acknowledged data lost or wrong:\n{out}"
        );
        assert_eq!(out.matches("read ").count(), batch.len(), "{out}");
    }
}

fn status_statistics(cluster: &StoragePair, index: usize) -> String {
    cluster.adm(index, &["status", "--statistics", "r0"])
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
    let cluster = new_cluster();
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
    cluster.adm(1, &["primary", "r0"]);
    println!("beta promoted {:?} after the kill was noticed", started.elapsed());
    let expected: Vec<(u64, u64)> =
        acked.iter().map(|o| (*o, pattern_of(o / CHUNK_BYTES, 1))).collect();
    verify(&cluster.url(1), &expected);

    // New writes on beta while alpha is away: 2 MiB at 32 MiB.
    let new_region = 32 * 1024 * 1024;
    let out = qemu_io(&cluster.url(1), &[format!("write -P 77 {new_region} 2M")]);
    assert!(output_text(&out).contains("wrote 2097152/2097152"), "{}", output_text(&out));

    // Restart alpha: it comes back as Secondary and resyncs from beta.
    let _alpha = cluster.start(0);
    let before = Instant::now();
    cluster.adm(0, &["wait-sync", "--timeout", "60", "r0"]);
    println!("alpha resynced in {:?}", before.elapsed());
    assert_eq!(cluster.adm(0, &["role", "r0"]), "Secondary\n");
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
    cluster.adm(1, &["secondary", "r0"]);
    cluster.adm(0, &["primary", "r0"]);
    verify(&cluster.url(0), &expected);
    let out = qemu_io(&cluster.url(0), &[format!("read -P 77 {new_region} 2M")]);
    assert!(!output_text(&out).contains("failed"), "{}", output_text(&out));
    drop(cluster.dir);
}

#[test]
fn split_brain_is_shown_and_resolved_with_discard_my_data() {
    tests::require_slow!();
    let cluster = new_cluster();
    let _alpha = cluster.start(0);
    let _beta = cluster.start(1);
    cluster.bring_up(0);
    cluster.adm(0, &["disconnect", "r0"]);
    cluster.adm(1, &["disconnect", "r0"]);
    cluster.adm(1, &["primary", "r0"]);
    let out = qemu_io(&cluster.url(0), &["write -P 11 0 1M"]);
    assert!(output_text(&out).contains("wrote"), "{}", output_text(&out));
    let out = qemu_io(&cluster.url(1), &["write -P 22 1M 1M"]);
    assert!(output_text(&out).contains("wrote"), "{}", output_text(&out));
    cluster.adm(1, &["secondary", "r0"]);
    cluster.adm(0, &["connect", "r0"]);
    cluster.adm(1, &["connect", "r0"]);
    let split = tests::wait_until(Duration::from_secs(10), || {
        cluster.adm(1, &["status", "r0"]).contains("alpha connection:StandAlone")
    });
    let status = cluster.adm(1, &["status", "r0"]);
    println!("beta after split brain:\n{status}");
    assert!(split, "split brain must leave the connection StandAlone: {status}");
    // Resolve: beta's changes are thrown away.
    cluster.adm(1, &["connect", "--discard-my-data", "r0"]);
    cluster.adm(0, &["connect", "r0"]);
    cluster.adm(1, &["wait-sync", "--timeout", "30", "r0"]);
    let status = cluster.adm(0, &["status", "r0"]);
    println!("alpha after resolution:\n{status}");
    assert_eq!(
        status,
        "r0 role:Primary\n  disk:UpToDate\n  beta role:Secondary\n    peer-disk:UpToDate\n\n"
    );
    cluster.adm(0, &["secondary", "r0"]);
    cluster.adm(1, &["primary", "r0"]);
    let out = qemu_io(&cluster.url(1), &["read -P 11 0 1M", "read -P 0 1M 1M"]);
    assert!(
        !output_text(&out).contains("failed"),
        "beta must hold alpha's data only: {}",
        output_text(&out)
    );
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

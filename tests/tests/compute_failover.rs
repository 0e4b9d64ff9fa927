//! A guest's disk survives the death of the storage node it was attached through: the tiny
//! guest, booted by `tandem-compute`, writes numbered blocks to a volume replicated by two
//! `tandemd` (with a diskless tiebreaker for quorum, and the promoter on both); the primary is
//! killed with SIGKILL and the secondary promotes itself, five times over, alternating. The agent attached the volume through its path proxy (every portal of the
//! connection_info), so QEMU's initiator logs in again through the survivor. Checked: the guest
//! saw no I/O error, every write it saw complete is on the surviving replica, and the longest
//! gap between two completed writes (the pause the guest saw) is printed per failover.
//!
//! `TANDEM_FAILOVER_ROUNDS=N` sets the number of failovers (default 5).

use std::process::Command;
use std::time::{Duration, Instant};

use tests::guest::{Agent, Channel, boot_guest};
use tests::storage_pair::StoragePair;
use tests::{Daemon, require_slow, require_tool, run_ok, wait_until};

const VOLUME_BYTES: u64 = 64 * 1024 * 1024;
const VOLUME_ID: &str = "5d1c8e2a-7b3f-4c6d-9e0a-1f2b3c4d5e6f";
const BLOCK_BYTES: usize = 512;

/// How long the guest writes before and after each kill.
const WRITE_BEFORE_KILL: Duration = Duration::from_secs(2);
const WRITE_AFTER_PROMOTION: Duration = Duration::from_secs(3);

/// The guest's write loop: block i holds i as 511 zero-padded digits and a newline; after each
/// write is flushed it logs `i uptime`. It stops when /tmp/stop appears.
fn writer_script(disk: &str) -> String {
    format!(
        "(i=0; while [ ! -e /tmp/stop ]; do printf '%0511d\\n' $i | dd of=/dev/{disk} bs=512 \
         seek=$i conv=fsync,notrunc 2>/dev/null || echo ERR $i; \
         echo \"$i $(cut -d' ' -f1 /proc/uptime)\"; i=$((i+1)); done; echo DONE) \
         >/tmp/w.log 2>&1 &"
    )
}

/// `/proc/uptime`'s seconds with two decimals, in milliseconds.
fn uptime_ms(text: &str) -> Option<u64> {
    let (seconds, hundredths) = text.split_once('.')?;
    Some(seconds.parse::<u64>().ok()? * 1000 + hundredths.parse::<u64>().ok()? * 10)
}

/// `(index, uptime_ms)` of every completed write in the guest's log, and any error lines.
fn parse_log(lines: &[String]) -> (Vec<(u64, u64)>, Vec<String>) {
    let mut writes = Vec::new();
    let mut errors = Vec::new();
    for line in lines {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("ERR"), _) => errors.push(line.clone()),
            (Some(index), Some(uptime)) => {
                if let (Ok(index), Some(uptime)) = (index.parse(), uptime_ms(uptime)) {
                    writes.push((index, uptime));
                }
            }
            _ => {}
        }
    }
    (writes, errors)
}

fn guest_log(channel: &mut Channel) -> Vec<String> {
    channel.run_ok("cat /tmp/w.log", Duration::from_secs(30))
}

fn last_index(channel: &mut Channel) -> u64 {
    parse_log(&guest_log(channel)).0.last().map(|(index, _)| *index).unwrap_or(0)
}

#[test]
fn a_guest_keeps_writing_through_primary_failovers() {
    require_slow!();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let qemu_img = require_tool("qemu-img", "qemu-utils qemu-block-extra");
    let rounds: usize = std::env::var("TANDEM_FAILOVER_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(5);

    let pair = StoragePair::with_tiebreaker(VOLUME_BYTES);
    let _tiebreaker = pair.start_tiebreaker();
    let mut daemons: Vec<Option<Daemon>> = vec![Some(pair.start(0)), Some(pair.start(1))];
    pair.bring_up(0);

    let agent = Agent::start(&pair.dir.path().join("agent"), "tcg", &[]);
    let (server, _) = boot_guest(&agent, "vm-failover");
    let info = pair.dir.path().join("connection_info.json");
    std::fs::write(&info, pair.connection_info(0, VOLUME_ID).to_string()).expect("info");
    let attached = agent.cli(&[
        "attach",
        "vm-failover",
        "--connection-info",
        info.to_str().expect("utf-8"),
        "--volume-id",
        VOLUME_ID,
    ]);
    assert!(
        attached["volumeAttachment"]["path_proxy"].is_string(),
        "two portals: attached through the path proxy: {attached}"
    );

    let mut channel = Channel::open(&server);
    let serial: String = VOLUME_ID.chars().take(20).collect();
    let disk = wait_for_disk(&mut channel, &serial);
    channel.run_ok(&writer_script(&disk), Duration::from_secs(30));

    let mut primary = 0;
    let mut pauses_ms = Vec::new();
    for round in 0..rounds {
        std::thread::sleep(WRITE_BEFORE_KILL);
        let before = last_index(&mut channel);
        let survivor = 1 - primary;
        let killed_at = Instant::now();
        daemons[primary].as_mut().expect("running").kill9();
        // Nobody promotes by hand: the survivor's promoter does, with the tiebreaker's vote.
        let promoted = wait_until(Duration::from_secs(30), || {
            pair.adm(survivor, &["role", "r0"]).trim() == "Primary"
        });
        assert!(promoted, "round {round}: the survivor promoted itself");
        let promoted_ms = killed_at.elapsed().as_millis();
        // The guest goes on writing through the survivor.
        let resumed = wait_until(Duration::from_secs(60), || last_index(&mut channel) > before + 5);
        assert!(resumed, "round {round}: the guest writes again after the failover");
        std::thread::sleep(WRITE_AFTER_PROMOTION);

        // The longest gap between completed writes since just before the kill.
        let (writes, errors) = parse_log(&guest_log(&mut channel));
        assert!(errors.is_empty(), "round {round}: the guest saw write errors: {errors:?}");
        let gap_ms = writes
            .windows(2)
            .filter(|pair| pair[0].0 >= before)
            .map(|pair| pair[1].1.saturating_sub(pair[0].1))
            .max()
            .unwrap_or(0);
        println!(
            "compute_failover: round {round}: {} killed, {} promoted itself (seen {promoted_ms} ms after), \
             the guest's longest wait for a write: {gap_ms} ms",
            pair.nodes[primary].name, pair.nodes[survivor].name
        );
        pauses_ms.push(gap_ms);

        // The killed node comes back as secondary and catches up.
        daemons[primary] = None;
        daemons[primary] = Some(pair.start(primary));
        let _ = Command::new(tests::binary("tandemadm"))
            .arg("-s")
            .arg(&pair.nodes[primary].socket)
            .args(["up", "r0"])
            .output();
        pair.adm(survivor, &["wait-connect", "--timeout", "30", "r0"]);
        pair.adm(survivor, &["wait-sync", "--timeout", "60", "r0"]);
        primary = survivor;
    }

    channel.run_ok("touch /tmp/stop", Duration::from_secs(30));
    let done = wait_until(Duration::from_secs(60), || {
        guest_log(&mut channel).iter().any(|line| line == "DONE")
    });
    assert!(done, "the guest's writer stopped");
    let (writes, errors) = parse_log(&guest_log(&mut channel));
    assert!(errors.is_empty(), "the guest saw write errors: {errors:?}");
    let dmesg = channel.run_ok("dmesg | grep -ci 'i/o error' || true", Duration::from_secs(30));
    assert_eq!(dmesg.last().map(String::as_str), Some("0"), "the guest kernel saw no I/O error");

    // Every write the guest saw complete is on the current primary, read by a separate
    // initiator.
    let count = writes.last().expect("writes").0 + 1;
    let readback = pair.dir.path().join("readback.img");
    run_ok(
        Command::new(&qemu_img).args([
            "dd",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("if={}", pair.url(primary)),
            &format!("of={}", readback.display()),
            &format!("bs={BLOCK_BYTES}"),
            &format!("count={count}"),
        ]),
        Duration::from_secs(60),
    );
    let bytes = std::fs::read(&readback).expect("read-back");
    for (index, _) in &writes {
        let start = usize::try_from(*index).expect("index") * BLOCK_BYTES;
        let block = &bytes[start..start + BLOCK_BYTES];
        let expected = format!("{index:0511}\n");
        assert_eq!(block, expected.as_bytes(), "block {index} lost its acknowledged write");
    }
    let shown = agent.show("vm-failover");
    let mut sorted = pauses_ms.clone();
    sorted.sort_unstable();
    println!(
        "compute_failover: {} writes verified; guest pauses over {rounds} failovers: \
         {sorted:?} ms, median {} ms; agent resumes {} (longest paused {} ms)",
        writes.len(),
        sorted[sorted.len() / 2],
        shown["io_error_resumes"],
        shown["io_error_pause_ms_max"],
    );
}

fn wait_for_disk(channel: &mut Channel, serial: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = channel.run_ok(
            &format!(
                "for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = {serial} ] \
                 && echo ${{d##*/}}; done; true"
            ),
            Duration::from_secs(30),
        );
        if let Some(disk) = lines.iter().find(|line| line.starts_with("vd")) {
            return disk.clone();
        }
        assert!(Instant::now() < deadline, "the guest never saw the volume: {lines:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

//! Quorum over a real network: three `tandem-replica` processes, each in a network namespace
//! of its own, linked pairwise by veth pairs (a full mesh): two diskful nodes A (node 0) and
//! B (node 1) and a diskless tiebreaker T (node 2), `--quorum majority`.
//!
//! A is primary; the test cuts A's two links (a partition that isolates the primary) while a
//! write stream runs on A, and checks that A stops acknowledging (suspend-io: its writes stay
//! pending; io-error: they fail) and reports quorum lost, that B, which keeps quorum through
//! the tiebreaker, can be promoted and holds every write A acknowledged, and that after the
//! links come back A steps down to Secondary (DRBD's force-secondary), fails what it held,
//! resyncs from B, and both backing files end identical. The timeline is printed.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test engine_quorum -- --nocapture`

use std::path::Path;
use std::time::{Duration, Instant};

use tests::NetNs;
use tests::replica::Replica;

const SIZE_BYTES: u64 = 64 * 1024 * 1024;
const PORT: u16 = 7789;

/// How long a command may take to answer.
const REPLY: Duration = Duration::from_secs(60);

/// Node `id` inside `ns`, listening on `PORT` of all its addresses, its peers at `peers`.
fn start(
    ns: &NetNs,
    name: &str,
    id: u8,
    peers: &[(u8, &str)],
    dir: &Path,
    extra: &[&str],
) -> Replica {
    let mut command = ns.exec(tests::binary("tandem-replica"));
    command
        .args(["--node-id", &id.to_string()])
        .args(["--listen", &format!("0.0.0.0:{PORT}")])
        .arg("--backing")
        .arg(dir.join(format!("{name}.img")))
        .arg("--meta")
        .arg(dir.join(format!("{name}.md")))
        .args(["--size-bytes", &SIZE_BYTES.to_string()])
        .args(extra)
        .env("RUST_LOG", "info");
    for (peer, address) in peers {
        command.args(["--peer", &format!("{peer}={address}:{PORT}")]);
    }
    Replica::spawn(name, command, dir)
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in `{status}`"))
}

fn scenario(on_no_quorum: &str) {
    tests::require_slow!();
    tests::require_tool("ip", "iproute2");
    let dir = tempfile::tempdir().expect("temp dir");
    let a_ns = NetNs::create("tnd-qa");
    let b_ns = NetNs::create("tnd-qb");
    let t_ns = NetNs::create("tnd-qt");
    let (a_to_b, _) = NetNs::link(&a_ns, "10.214.1.1/24", &b_ns, "10.214.1.2/24");
    let (a_to_t, _) = NetNs::link(&a_ns, "10.214.2.1/24", &t_ns, "10.214.2.2/24");
    let _ = NetNs::link(&b_ns, "10.214.3.1/24", &t_ns, "10.214.3.2/24");
    let quorum = ["--quorum", "majority", "--on-no-quorum", on_no_quorum];
    let diskful: Vec<&str> = quorum.iter().copied().chain(["--diskless-peer", "2"]).collect();
    let tiebreaker: Vec<&str> = quorum.iter().copied().chain(["--diskless"]).collect();
    let mut a = start(&a_ns, "a", 0, &[(1, "10.214.1.2"), (2, "10.214.2.2")], dir.path(), &diskful);
    let mut b = start(&b_ns, "b", 1, &[(0, "10.214.1.1"), (2, "10.214.3.2")], dir.path(), &diskful);
    let mut t =
        start(&t_ns, "t", 2, &[(0, "10.214.2.1"), (1, "10.214.3.1")], dir.path(), &tiebreaker);
    for r in [&mut a, &mut b, &mut t] {
        r.ok("wait-connected 30000", REPLY);
    }
    a.ok("new-current-uuid", REPLY);
    a.ok("primary", REPLY);
    assert_eq!(field(&a.status(), "quorum"), "yes");
    // A second primary is refused while the first one is reachable (here directly).
    b.ok("wait-synced 30000", REPLY);
    std::thread::sleep(Duration::from_millis(300));
    let refused = b.cmd("primary", REPLY);
    assert!(refused.contains("primary"), "b promoted beside primary a: `{refused}`");
    a.ok("write 0 256 1", REPLY);
    a.ok("flush", REPLY);

    // Partition the primary away, then keep writing on it.
    let cut = Instant::now();
    let cut_wall_s = seconds_of_day_now();
    a_ns.set_link(&a_to_b, false);
    a_ns.set_link(&a_to_t, false);
    a.send("stream 256 64 2 4");
    let mut acked_after_cut = Vec::new();
    let mut failed = 0;
    let mut stream_done_ms = None;
    // B notices, keeps quorum with the tiebreaker, and may be promoted once T no longer
    // reports A (a grace period after T noticed the loss).
    let promoted_ms;
    loop {
        let reply = b.cmd("primary", REPLY);
        if reply == "ok" {
            promoted_ms = cut.elapsed().as_millis();
            break;
        }
        assert!(cut.elapsed() < Duration::from_secs(30), "b never promoted: `{reply}`");
        while let Some(line) = a.try_next_line(Duration::from_millis(200)) {
            if line.starts_with("acked") {
                acked_after_cut.push(line);
            } else if line.starts_with("failed") {
                failed += 1;
            } else if line == "done" {
                stream_done_ms = Some(cut.elapsed().as_millis());
            }
        }
    }
    let a_log = a.log_text();
    assert!(a_log.contains("QuorumChanged(false)"), "a never reported quorum lost:\n{a_log}");
    assert_eq!(field(&b.status(), "quorum"), "yes", "b keeps quorum through the tiebreaker");
    // Every write A acknowledged is on B.
    b.ok("check 0 256 1", REPLY);
    b.ok("write 512 64 3", REPLY);
    // Nothing more from A while apart (suspend-io: pending; io-error: failed).
    while let Some(line) = a.try_next_line(Duration::from_millis(500)) {
        if line.starts_with("acked") {
            acked_after_cut.push(line);
        } else if line.starts_with("failed") {
            failed += 1;
        } else if line == "done" {
            stream_done_ms = Some(cut.elapsed().as_millis());
        }
    }
    assert!(acked_after_cut.is_empty(), "the isolated primary acknowledged {acked_after_cut:?}");
    match on_no_quorum {
        "io-error" => {
            assert!(stream_done_ms.is_some() && failed == 64, "io-error fails the stream")
        }
        _ => assert!(stream_done_ms.is_none() && failed == 0, "suspend-io holds the stream"),
    }
    let apart_ms = cut.elapsed().as_millis();

    // Heal: A steps down, what it held fails, it resyncs from B.
    let healed = Instant::now();
    a_ns.set_link(&a_to_b, true);
    a_ns.set_link(&a_to_t, true);
    if stream_done_ms.is_none() {
        loop {
            let line = a.next_line(Duration::from_secs(30));
            assert!(
                !line.starts_with("acked"),
                "a acknowledged a held write after healing: {line}"
            );
            if line.starts_with("failed") {
                failed += 1;
            }
            if line == "done" {
                break;
            }
        }
    }
    let stepped_down_ms = healed.elapsed().as_millis();
    b.ok("wait-synced 30000", REPLY);
    a.ok("wait-synced 30000", REPLY);
    let synced_ms = healed.elapsed().as_millis();
    // Whichever link comes back first, A (which acknowledged nothing apart) is found older,
    // never split (issue 5: A met B before T and both stayed StandAlone).
    for (name, r) in [("a", &a), ("b", &b)] {
        let log = r.log_text();
        assert!(!log.contains("SplitBrain"), "{name} decided a split brain on heal:\n{log}");
    }
    let status = a.status();
    assert_eq!(field(&status, "role"), "Secondary", "a stepped down: {status}");
    assert_eq!(field(&status, "disk"), "UpToDate", "{status}");
    for r in [&mut a, &mut b, &mut t] {
        r.kill9();
    }
    let a_image = std::fs::read(dir.path().join("a.img")).expect("a image");
    let b_image = std::fs::read(dir.path().join("b.img")).expect("b image");
    assert!(a_image == b_image, "replicas differ after the resync");
    println!(
        "engine_quorum ({on_no_quorum}): promotion of B succeeded {promoted_ms} ms after the cut; \
         A's stream: 0 acknowledged, {failed} failed{}; apart {apart_ms} ms; after healing A \
         stepped down in {stepped_down_ms} ms and both were in sync after {synced_ms} ms",
        stream_done_ms.map_or(String::new(), |ms| format!(" (all by {ms} ms after the cut)"))
    );
    // When A noticed: its log's timestamps against the wall clock at the cut.
    let lost_ms = a_log
        .lines()
        .filter(|l| l.contains("QuorumChanged(false)"))
        .filter_map(log_seconds_of_day)
        .map(|t| ((t - cut_wall_s) * 1000.0).round())
        .find(|ms| *ms >= 0.0);
    println!("  A reported quorum lost {lost_ms:?} ms after the cut");
    assert!(lost_ms.is_some_and(|ms| ms < 6000.0), "a noticed the partition late: {lost_ms:?}");
}

fn seconds_of_day_now() -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    (now.as_secs() % 86_400) as f64 + f64::from(now.subsec_micros()) / 1e6
}

/// The time of day of a tracing log line (`2026-11-25T21:03:42.653693Z ...`, ANSI colours
/// around it), in seconds.
fn log_seconds_of_day(line: &str) -> Option<f64> {
    let at = line.find('T')?;
    let clock = line.get(at + 1..at + 16)?;
    let (h, rest) = clock.split_once(':')?;
    let (m, sec) = rest.split_once(':')?;
    Some(
        h.parse::<f64>().ok()? * 3600.0
            + m.parse::<f64>().ok()? * 60.0
            + sec.parse::<f64>().ok()?,
    )
}

#[test]
fn isolated_primary_suspends_io_and_the_majority_promotes() {
    scenario("suspend-io");
}

#[test]
fn isolated_primary_fails_io_and_the_majority_promotes() {
    scenario("io-error");
}

//! Split brain and peer authentication between two real replication engines
//! (`tandem-replica`) over loopback TCP with file backing.
//!
//! Every split-brain case starts from a synced pair with node a primary, disconnects both
//! sides (each StandAlone), writes on a (blocks 0..30, generation 2) and, in most cases, on b
//! after promoting it there (blocks 40..50, generation 3), demotes both and reconnects. Then,
//! by the after-sb-0pri policy both run with:
//! - `disconnect`: both stay StandAlone and report split brain; `connect --discard-my-data` on
//!   the victim resyncs only the blocks either side changed (the union of both bitmaps: 40);
//! - `discard-least-changes` / `discard-younger-primary`: b (fewer changes, promoted after the
//!   split) is discarded automatically; `discard-older-primary`: a is;
//! - `discard-zero-changes`: with only a having written it resolves by itself; with both
//!   having written it disconnects.
//!
//! In each case the victim ends byte-for-byte equal to the survivor on every block touched,
//! and the number of blocks resynced is counted.
//!
//! Authentication: a peer with a wrong `shared-secret` never connects (and the refusal is
//! logged with its reason); with the right secret it connects.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test engine_splitbrain -- --nocapture`

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(30);

/// One `tandem-replica` process driven through its stdin/stdout line protocol.
struct Replica {
    name: String,
    child: Option<Child>,
    stdin: ChildStdin,
    lines: Receiver<String>,
    log: PathBuf,
}

struct Node {
    id: u8,
    port: u16,
    peer_id: u8,
    peer_port: u16,
    backing: PathBuf,
    meta: PathBuf,
}

impl Replica {
    fn start(name: &str, node: &Node, dir: &Path, extra: &[&str]) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let stderr =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut child = Command::new(tests::binary("tandem-replica"))
            .args(["--node-id", &node.id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", node.port)])
            .args(["--peer", &format!("{}=127.0.0.1:{}", node.peer_id, node.peer_port)])
            .arg("--backing")
            .arg(&node.backing)
            .arg("--meta")
            .arg(&node.meta)
            .args(["--size-bytes", &(16 * 1024 * 1024).to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("starting tandem-replica");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut replica = Replica { name: name.to_owned(), child: Some(child), stdin, lines, log };
        let ready = replica.next_line(Duration::from_secs(20));
        assert_eq!(ready, "ready", "{name} did not start:\n{}", replica.log_text());
        replica
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn next_line(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => panic!("{}: no reply within {timeout:?}", self.name),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("{}: exited; log:\n{}", self.name, self.log_text())
            }
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("writing a command");
        self.stdin.flush().expect("flushing a command");
        self.next_line(LONG)
    }

    fn ok(&mut self, line: &str) -> String {
        let reply = self.cmd(line);
        assert!(
            reply.starts_with("ok"),
            "{}: `{line}` answered `{reply}`\nlog:\n{}",
            self.name,
            self.log_text()
        );
        reply
    }

    fn status(&mut self) -> String {
        self.cmd("status")
    }

    fn field(&mut self, field: &str) -> u64 {
        let status = self.status();
        let value = status
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
            .unwrap_or_else(|| panic!("{}: no {field} in `{status}`", self.name));
        value.parse().unwrap_or_else(|_| panic!("{field}={value} is not a number"))
    }

    /// Polls `status` until it contains every needle.
    fn wait_status(&mut self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if needles.iter().all(|n| status.contains(n)) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: status never showed {needles:?}; last: {status}\nlog:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Promotes, retrying until the peer's demotion has reached us.
    fn promote(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = self.cmd("primary");
            if reply == "ok" {
                return;
            }
            assert!(Instant::now() < deadline, "{}: promotion kept failing: {reply}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `check` needs the primary role (reads are served by a primary).
    fn check_as_primary(&mut self, ranges: &[(u64, u64, u64)]) {
        self.promote();
        for (first, count, generation) in ranges {
            let reply = self.cmd(&format!("check {first} {count} {generation}"));
            assert_eq!(reply, "ok", "{}: blocks {first}+{count} gen {generation}", self.name);
        }
        self.ok("secondary");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log_text());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn pair(dir: &Path) -> (Node, Node) {
    let (pa, pb) = (tests::free_port(), tests::free_port());
    let node = |id: u8, port: u16, peer_id: u8, peer_port: u16, name: &str| Node {
        id,
        port,
        peer_id,
        peer_port,
        backing: dir.join(format!("{name}.img")),
        meta: dir.join(format!("{name}.md")),
    };
    (node(0, pa, 1, pb, "a"), node(1, pb, 0, pa, "b"))
}

/// Who keeps its data after the reconnect.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Resolved automatically: the named node is the victim.
    Victim(char),
    /// Not a split brain at all: only a wrote, b resyncs a's blocks.
    PlainResync,
    /// Stays StandAlone with split brain reported; b is then discarded by hand.
    StandAlone,
}

/// Runs one scenario; returns the blocks the victim received by resync.
fn split_brain_case(policy: &str, b_writes: bool, expect: Expect) -> u64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let (node_a, node_b) = pair(dir.path());
    let flags = ["--after-sb-0pri", policy];
    let mut a = Replica::start("a", &node_a, dir.path(), &flags);
    let mut b = Replica::start("b", &node_b, dir.path(), &flags);
    a.ok("wait-connected 20000");
    a.ok("new-current-uuid");
    a.ok("primary");
    a.ok("write 0 64 1");
    a.ok("flush");
    b.ok("wait-synced 20000");

    // The split: each side leaves the other (StandAlone), then both write apart.
    a.ok("disconnect 1");
    b.ok("disconnect 0");
    a.ok("write 0 30 2");
    a.ok("secondary");
    if b_writes {
        b.promote();
        b.ok("write 40 10 3");
        b.ok("secondary");
    }
    a.ok("connect 1");
    b.ok("connect 0");

    let (victim_received, survivor_sent) = match expect {
        Expect::StandAlone => {
            a.wait_status(&["peer1=StandAlone", "split_brain=true"], LONG);
            b.wait_status(&["peer0=StandAlone", "split_brain=true"], LONG);
            // It stays so: nothing is merged behind the operator's back.
            std::thread::sleep(Duration::from_millis(500));
            a.wait_status(&["peer1=StandAlone"], LONG);
            // Manual recovery: b discards its changes.
            b.ok("connect 0 --discard-my-data");
            a.ok("connect 1");
            b.ok("wait-synced 20000");
            a.ok("wait-synced 20000");
            (b.field("resync_received"), a.field("resync_sent"))
        }
        Expect::PlainResync | Expect::Victim('b') => {
            b.ok("wait-synced 20000");
            a.ok("wait-synced 20000");
            (b.field("resync_received"), a.field("resync_sent"))
        }
        Expect::Victim(_) => {
            a.ok("wait-synced 20000");
            b.ok("wait-synced 20000");
            (a.field("resync_received"), b.field("resync_sent"))
        }
    };
    assert_eq!(victim_received, survivor_sent, "{policy}: blocks sent and received differ");
    // Both replicas hold the survivor's data on every block either side touched.
    let survivor_view: Vec<(u64, u64, u64)> = match expect {
        Expect::Victim('a') => vec![(0, 30, 1), (30, 10, 1), (40, 10, 3), (50, 14, 1)],
        _ => vec![(0, 30, 2), (30, 34, 1)],
    };
    a.check_as_primary(&survivor_view);
    b.check_as_primary(&survivor_view);
    let a_log = a.log_text();
    let resolved = a_log.contains("SplitBrainResolved");
    assert_eq!(resolved, matches!(expect, Expect::Victim(_)), "{policy}: log:\n{a_log}");
    victim_received
}

#[test]
fn split_brain_policies_resolve_or_refuse_and_resync_only_changed_blocks() {
    tests::require_slow!();
    let rows = [
        // (after-sb-0pri, b writes too, expected outcome, blocks resynced)
        ("disconnect", true, Expect::StandAlone, 40),
        ("discard-least-changes", true, Expect::Victim('b'), 40),
        ("discard-younger-primary", true, Expect::Victim('b'), 40),
        ("discard-older-primary", true, Expect::Victim('a'), 40),
        ("discard-zero-changes", false, Expect::PlainResync, 30),
        ("discard-zero-changes", true, Expect::StandAlone, 40),
    ];
    for (policy, b_writes, expect, blocks) in rows {
        let received = split_brain_case(policy, b_writes, expect);
        println!(
            "after-sb-0pri {policy}, b wrote: {b_writes}: {expect:?}, victim resynced {received} \
             of 4096 blocks (a changed 30, b changed {})",
            if b_writes { 10 } else { 0 }
        );
        assert_eq!(received, blocks, "{policy}: only the changed blocks travel");
    }
}

#[test]
fn a_wrong_shared_secret_never_connects() {
    tests::require_slow!();
    let dir = tempfile::tempdir().expect("temp dir");
    let (node_a, node_b) = pair(dir.path());
    let right = ["--cram-hmac-alg", "sha256", "--shared-secret", "correct horse"];
    let wrong = ["--cram-hmac-alg", "sha256", "--shared-secret", "battery staple"];
    let mut a = Replica::start("a", &node_a, dir.path(), &right);
    let mut b = Replica::start("b", &node_b, dir.path(), &wrong);
    let reply = a.cmd("wait-connected 3000");
    assert!(!reply.starts_with("ok"), "connected with a wrong secret: {reply}");
    let status = a.status();
    assert!(status.contains("peer1=Connecting/Off/DUnknown"), "{status}");
    let status = b.status();
    assert!(status.contains("peer0=Connecting/Off/DUnknown"), "{status}");
    // Both sides say why, and keep retrying (more than one refusal each).
    for replica in [&a, &b] {
        let log = replica.log_text();
        let refusals = log.matches("peer authentication failed").count();
        assert!(refusals >= 2, "{}: {refusals} refusals logged:\n{log}", replica.name);
    }
    assert!(a.log_text().contains("shared-secret differs"), "{}", a.log_text());
    // No secret at all is refused too (a mismatch of cram-hmac-alg).
    drop(b);
    let b = Replica::start("b-none", &node_b, dir.path(), &[]);
    let reply = a.cmd("wait-connected 2000");
    assert!(!reply.starts_with("ok"), "connected without a secret: {reply}");
    assert!(b.log_text().contains("algorithms differ"), "{}", b.log_text());
    // The right secret connects.
    drop(b);
    let mut b = Replica::start("b-right", &node_b, dir.path(), &right);
    a.ok("wait-connected 20000");
    a.ok("new-current-uuid");
    b.ok("wait-synced 20000");
}

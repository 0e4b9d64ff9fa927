//! One `tandem-replica` process (the replication engine's test binary) driven through its
//! stdin/stdout line protocol: a command per line in, one reply line out (`ok ...`, `status`
//! fields `key=value`, streamed `acked N` lines). Shared by the `engine_*` end-to-end tests.
//!
//! The process's stderr (its tracing log) goes to `DIR/NAME.log`, appended to across restarts
//! under the same name, and is printed when the test panics; the process is killed on drop.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// How long a started replica may take to print `ready`.
const READY_TIMEOUT_MS: u64 = 30_000;
/// How long `status` and a `primary` attempt of [`Replica::promote`] may take to answer.
const STATUS_TIMEOUT_MS: u64 = 30_000;
/// How long [`Replica::promote`] retries while the peers have not yet noticed the old primary's
/// loss (or demotion).
const PROMOTE_TIMEOUT_MS: u64 = 20_000;
/// Pause between polls of [`Replica::wait_status`] and retries of [`Replica::promote`].
const POLL_INTERVAL_MS: u64 = 50;

/// One running `tandem-replica`.
pub struct Replica {
    name: String,
    child: Option<Child>,
    stdin: ChildStdin,
    lines: Receiver<String>,
    log: PathBuf,
}

/// The `tandem-replica` binary (built if needed) with `RUST_LOG=info`; add its arguments, or
/// wrap it (`NetNs::exec`), and pass it to [`Replica::spawn`].
pub fn command() -> Command {
    let mut command = Command::new(crate::binary("tandem-replica"));
    command.env("RUST_LOG", "info");
    command
}

/// A node of a two-node pair on loopback: its arguments to `tandem-replica`.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: u8,
    pub port: u16,
    pub peer_id: u8,
    pub peer_port: u16,
    pub backing: PathBuf,
    pub meta: PathBuf,
    pub size_bytes: u64,
}

impl Node {
    /// [`command`] with this node's identity, listener, peer, files and size.
    pub fn command(&self) -> Command {
        let mut command = command();
        command
            .args(["--node-id", &self.id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--peer", &format!("{}=127.0.0.1:{}", self.peer_id, self.peer_port)])
            .arg("--backing")
            .arg(&self.backing)
            .arg("--meta")
            .arg(&self.meta)
            .args(["--size-bytes", &self.size_bytes.to_string()]);
        command
    }
}

/// Nodes 0 (`a`) and 1 (`b`) on free loopback ports, backing `DIR/a.img`, metadata `DIR/a.md`
/// (likewise for `b`), each of `size_bytes`.
pub fn loopback_pair(dir: &Path, size_bytes: u64) -> (Node, Node) {
    let (pa, pb) = (crate::free_port(), crate::free_port());
    let node = |id: u8, port: u16, peer_id: u8, peer_port: u16, name: &str| Node {
        id,
        port,
        peer_id,
        peer_port,
        backing: dir.join(format!("{name}.img")),
        meta: dir.join(format!("{name}.md")),
        size_bytes,
    };
    (node(0, pa, 1, pb, "a"), node(1, pb, 0, pa, "b"))
}

impl Replica {
    /// Starts `node` with `extra` arguments and waits for `ready`.
    pub fn start(name: &str, node: &Node, dir: &Path, extra: &[&str]) -> Replica {
        let mut command = node.command();
        command.args(extra);
        Replica::spawn(name, command, dir)
    }

    /// Spawns `command` (a [`command`] with its arguments) with piped stdin and stdout and its
    /// stderr appended to `DIR/NAME.log`, and waits for its `ready` line.
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let stderr =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut child = command
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
        let ready = replica.next_line(Duration::from_millis(READY_TIMEOUT_MS));
        assert_eq!(ready, "ready", "{name} did not start:\n{}", replica.log_text());
        replica
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The next stdout line; panics after `timeout` or when the process exited.
    pub fn next_line(&mut self, timeout: Duration) -> String {
        self.try_next_line(timeout)
            .unwrap_or_else(|| panic!("{}: no reply within {timeout:?}", self.name))
    }

    /// The next stdout line, or None after `timeout`; panics when the process exited.
    pub fn try_next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                panic!("{}: exited; log:\n{}", self.name, self.log_text())
            }
        }
    }

    /// Sends one command line without waiting for a reply (`stream` answers with many).
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("writing a command");
        self.stdin.flush().expect("flushing a command");
    }

    /// Sends a command and returns its one reply line.
    pub fn cmd(&mut self, line: &str, timeout: Duration) -> String {
        self.send(line);
        self.next_line(timeout)
    }

    /// [`Replica::cmd`], asserting the reply starts with `ok`.
    pub fn ok(&mut self, line: &str, timeout: Duration) -> String {
        let reply = self.cmd(line, timeout);
        assert!(
            reply.starts_with("ok"),
            "{}: `{line}` answered `{reply}`\nlog:\n{}",
            self.name,
            self.log_text()
        );
        reply
    }

    /// Starts `stream FIRST COUNT GENERATION DEPTH` (COUNT sequential 4 KiB writes, DEPTH in
    /// flight) and reads its output until every write was acknowledged; panics on a failed
    /// write, naming it. Returns the number acknowledged (COUNT).
    pub fn stream_all_acked(
        &mut self,
        first: u64,
        count: u64,
        generation: u64,
        depth: u64,
        timeout: Duration,
    ) -> u64 {
        self.send(&format!("stream {first} {count} {generation} {depth}"));
        let mut acked = 0u64;
        loop {
            let line = self.next_line(timeout);
            if line == "done" {
                break;
            }
            assert!(line.starts_with("acked "), "a write failed: `{line}`\n{}", self.log_text());
            acked += 1;
        }
        assert_eq!(acked, count, "{}: every write of the stream acknowledged", self.name);
        acked
    }

    /// Starts the same stream and returns once `until` writes were acknowledged, with their
    /// block numbers; the stream goes on writing (and its output queues) until the caller stops
    /// the replica, typically with `kill9` to crash it mid-stream.
    pub fn stream_until_acked(
        &mut self,
        first: u64,
        count: u64,
        generation: u64,
        depth: u64,
        until: usize,
        timeout: Duration,
    ) -> BTreeSet<u64> {
        assert!(until as u64 <= count, "cannot wait for more writes than the stream has");
        self.send(&format!("stream {first} {count} {generation} {depth}"));
        let mut acked = BTreeSet::new();
        while acked.len() < until {
            let line = self.next_line(timeout);
            let Some(block) = line.strip_prefix("acked ") else {
                panic!("{}: unexpected stream output `{line}`", self.name);
            };
            acked.insert(block.parse::<u64>().expect("block number"));
        }
        acked
    }

    /// The `status` line.
    pub fn status(&mut self) -> String {
        self.cmd("status", Duration::from_millis(STATUS_TIMEOUT_MS))
    }

    /// The value of `FIELD=value` in `status`.
    pub fn status_value(&mut self, field: &str) -> String {
        let status = self.status();
        status_field(&status, field)
            .unwrap_or_else(|| panic!("{}: no {field} in `{status}`", self.name))
            .to_owned()
    }

    /// The number in `FIELD=N` of `status`.
    pub fn status_field(&mut self, field: &str) -> u64 {
        let value = self.status_value(field);
        value.parse().unwrap_or_else(|_| panic!("{field}={value} is not a number"))
    }

    /// Polls `status` until every one of `needles` is one of its whole words.
    pub fn wait_status(&mut self, needles: &[&str], timeout: Duration) -> String {
        self.wait_status_for(needles, timeout, |status, n| {
            status.split_whitespace().any(|w| w == n)
        })
    }

    /// Polls `status` until it contains every one of `needles` (as substrings: `peer1=StandAlone`
    /// matches whatever the peer's disk and replication state are).
    pub fn wait_status_containing(&mut self, needles: &[&str], timeout: Duration) -> String {
        self.wait_status_for(needles, timeout, |status, n| status.contains(n))
    }

    fn wait_status_for(
        &mut self,
        needles: &[&str],
        timeout: Duration,
        shows: impl Fn(&str, &str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if needles.iter().all(|n| shows(&status, n)) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: status never showed {needles:?}; last: {status}\nlog:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
    }

    /// Promotes, retrying while the peers have not noticed the old primary's loss or demotion
    /// yet (or quorum's grace for it runs).
    pub fn promote(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(PROMOTE_TIMEOUT_MS);
        loop {
            let reply = self.cmd("primary", Duration::from_millis(STATUS_TIMEOUT_MS));
            if reply == "ok" {
                return;
            }
            assert!(Instant::now() < deadline, "{}: promotion kept failing: {reply}", self.name);
            std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
    }

    /// SIGKILL (a crash: no shutdown path runs) and reap; does nothing once stopped.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL on Unix, to a child not reaped yet (its pid is ours).
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log_text());
        }
        self.kill9();
    }
}

/// The value of `NAME=value` among the whitespace-separated words of `status`.
pub fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

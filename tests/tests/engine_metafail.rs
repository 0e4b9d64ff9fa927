//! A failed metadata write with two real replication engines (`tandem-replica`) over loopback
//! TCP: the primary's metadata (the sidecar format, rewritten atomically on every update) lives
//! on a small tmpfs that is filled up. The next activity-log update fails with ENOSPC; instead
//! of panicking the engine treats it as a local disk failure: it detaches (Diskless), logs the
//! error, and every write of the stream is acknowledged through the peer and reads back. Once
//! the file system has room, `attach` does a full resync (a bitmap that failed to persist is
//! never trusted) and the replicas' data are identical.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test engine_metafail -- --nocapture`

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

/// The device: 64 MiB (16384 blocks of 4 KiB, 16 activity-log extents).
const DEVICE_BYTES: u64 = 64 * 1024 * 1024;
const BLOCK_BYTES: u64 = 4096;
/// The primary's metadata file system: room for its metadata file and a rewrite of it.
const SMALL_FS_MIB: u64 = 1;
/// 4 KiB blocks streamed: 16 MiB, four activity-log extents, so the log must grow.
const STREAM_BLOCKS: u64 = 4096;

struct Replica {
    name: String,
    child: Option<Child>,
    stdin: ChildStdin,
    lines: Receiver<String>,
    log: PathBuf,
}

impl Replica {
    fn start(name: &str, args: &[String], dir: &Path) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let stderr =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut child = Command::new(tests::binary("tandem-replica"))
            .args(args)
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

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("writing a command");
        self.stdin.flush().expect("flushing a command");
    }

    fn cmd(&mut self, line: &str, timeout: Duration) -> String {
        self.send(line);
        self.next_line(timeout)
    }

    fn ok(&mut self, line: &str, timeout: Duration) -> String {
        let reply = self.cmd(line, timeout);
        assert!(
            reply.starts_with("ok"),
            "{}: `{line}` answered `{reply}`\nlog:\n{}",
            self.name,
            self.log_text()
        );
        reply
    }

    fn field(&mut self, field: &str) -> String {
        let status = self.cmd("status", Duration::from_secs(5));
        status
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
            .unwrap_or_else(|| panic!("{}: no {field} in `{status}`", self.name))
            .to_owned()
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

/// A tmpfs of its own, unmounted on drop.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(path: PathBuf, size_mib: u64) -> SmallFs {
        std::fs::create_dir_all(&path).expect("mount point");
        let out = tests::run_with_timeout(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
                .arg(&path),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        SmallFs { path }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn args(id: u8, port: u16, peer_port: u16, backing: &Path, meta: &Path) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--node-id".into(),
        id.to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--peer".into(),
        format!("{}=127.0.0.1:{peer_port}", 1 - id),
        "--size-bytes".into(),
        DEVICE_BYTES.to_string(),
        "--on-io-error".into(),
        "detach".into(),
        "--meta-format".into(),
        "sidecar".into(),
    ];
    v.extend(["--backing".into(), backing.display().to_string()]);
    v.extend(["--meta".into(), meta.display().to_string()]);
    v
}

/// Fills the file system under `dir` until it reports ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler file");
    let chunk = vec![0xa5u8; 4096];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = file.sync_all();
    path
}

#[test]
fn a_full_meta_disk_detaches_the_primary_which_keeps_serving_and_fully_resyncs_after_attach() {
    tests::require_slow!();
    tests::require_tool("mount", "mount");
    let dir = tempfile::tempdir().expect("temp dir");
    let small = SmallFs::mount(dir.path().join("small"), SMALL_FS_MIB);
    let (pa, pb) = (tests::free_port(), tests::free_port());
    // The primary's data on the roomy file system, its metadata on the small one.
    let a_backing = dir.path().join("a.img");
    let b_backing = dir.path().join("b.img");
    let a_args = args(0, pa, pb, &a_backing, &small.path.join("a.tmeta"));
    let b_args = args(1, pb, pa, &b_backing, &dir.path().join("b.tmeta"));
    let mut a = Replica::start("a", &a_args, dir.path());
    let mut b = Replica::start("b", &b_args, dir.path());
    let long = Duration::from_secs(60);
    a.ok("wait-connected 20000", long);
    a.ok("new-current-uuid", long);
    a.ok("primary", long);
    a.ok("write 0 64 1", long);
    assert_eq!(a.field("disk"), "UpToDate");

    // The metadata's file system fills up: the stream's first write to a cold extent needs an
    // activity-log update, which fails. Every write is still acknowledged, through the peer.
    let filler = fill(&small.path);
    a.send(&format!("stream 0 {STREAM_BLOCKS} 2 16"));
    let mut acked = 0u64;
    loop {
        let line = a.next_line(long);
        if line == "done" {
            break;
        }
        assert!(line.starts_with("acked "), "a write failed: `{line}`\n{}", a.log_text());
        acked += 1;
    }
    assert_eq!(acked, STREAM_BLOCKS);
    assert_eq!(a.field("disk"), "Diskless", "the failed metadata detached the disk");
    assert_eq!(a.field("role"), "Primary");
    let log = a.log_text();
    assert!(log.contains("metadata update failed"), "the failure is logged:\n{log}");
    assert!(log.contains("No space left on device"), "the log names the error:\n{log}");
    assert!(log.contains("Detached"), "the detach is logged:\n{log}");
    assert!(!log.contains("panicked"), "no panic:\n{log}");
    let marked: u64 = b.field("oos").parse().unwrap();
    assert!(marked > 0, "the peer tracks the detached disk");

    // Every acknowledged write reads back through the diskless primary (from the peer).
    a.ok(&format!("check 0 {STREAM_BLOCKS} 2"), long);

    // Room again: re-attach as Secondary. The metadata that failed is not trusted: a full
    // resync from the peer, not one of the blocks it marked.
    a.ok("secondary", long);
    std::fs::remove_file(&filler).expect("removing the filler");
    a.ok("attach", long);
    a.ok("wait-synced 120000", long);
    assert_eq!(a.field("disk"), "UpToDate");
    let resynced: u64 = a.field("resync_received").parse().unwrap();
    println!("after attach, resync copied {resynced} blocks ({marked} marked by the peer)");
    assert_eq!(resynced, DEVICE_BYTES / BLOCK_BYTES, "a full resync");
    // The data areas (external metadata: the whole files) are identical.
    let a_data = std::fs::read(&a_backing).expect("a's data");
    let b_data = std::fs::read(&b_backing).expect("b's data");
    assert_eq!(a_data.len(), b_data.len());
    let differing = a_data.chunks(4096).zip(b_data.chunks(4096)).filter(|(x, y)| x != y).count();
    assert_eq!(differing, 0, "replicas differ in {differing} blocks after the resync");
    // And the re-attached node serves locally again as primary.
    a.ok("primary", long);
    a.ok(&format!("check 0 {STREAM_BLOCKS} 2"), long);
    assert!(!a.log_text().contains("panicked"));
    assert!(!b.log_text().contains("panicked"));
}

//! Online verify and checksum-based resync between two real engines (`tandem-replica`) over
//! loopback TCP with file backing:
//!
//! 1. bytes flipped in the secondary's backing file behind its back: `verify` reports exactly
//!    those blocks, a disconnect/connect resyncs just those (by checksums: the target's digests
//!    differ there only), the files are then identical and a second verify reports nothing;
//! 2. a verify run from the secondary while the primary streams writes over the whole device
//!    reports nothing (a block written while compared is checked again, never reported);
//! 3. `tandemadm verify` on two tandemd: the status tree shows `replication:VerifyS ...
//!    done:NN.NN`, `status --statistics` the blocks found, disconnect/connect repairs them.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test engine_verify -- --nocapture`

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

const BLOCK: u64 = 4096;
const SIZE_BYTES: u64 = 64 * 1024 * 1024;

/// One `tandem-replica` process driven through its stdin/stdout line protocol.
struct Replica {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    log: PathBuf,
}

impl Replica {
    fn start(name: &str, id: u8, ports: (u16, u16), dir: &Path, extra: &[&str]) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(tests::binary("tandem-replica"))
            .args(["--node-id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", ports.0)])
            .args(["--peer", &format!("{}=127.0.0.1:{}", 1 - id, ports.1)])
            .arg("--backing")
            .arg(dir.join(format!("{name}.img")))
            .arg("--meta")
            .arg(dir.join(format!("{name}.tmeta")))
            .args(["--size-bytes", &SIZE_BYTES.to_string()])
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
        let mut replica = Replica { name: name.to_owned(), child, stdin, lines, log };
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

    fn ok(&mut self, line: &str) -> String {
        self.send(line);
        let reply = self.next_line(Duration::from_secs(120));
        assert!(
            reply.starts_with("ok"),
            "{}: `{line}` answered `{reply}`\nlog:\n{}",
            self.name,
            self.log_text()
        );
        reply
    }

    fn status_field(&mut self, field: &str) -> u64 {
        self.send("status");
        let status = self.next_line(Duration::from_secs(5));
        let value = status
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
            .unwrap_or_else(|| panic!("{}: no {field} in `{status}`", self.name));
        value.parse().unwrap_or_else(|_| panic!("{field}={value} is not a number"))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log_text());
        }
    }
}

/// What `wait-verified` printed: (out-of-sync count, reported blocks, skipped blocks).
fn verify_result(reply: &str) -> (u64, BTreeSet<u64>, u64) {
    let field = |name: &str| {
        reply
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in `{reply}`"))
            .to_owned()
    };
    assert_eq!(field("completed"), "true", "{reply}");
    let mut blocks = BTreeSet::new();
    for run in field("runs").split(',').filter(|r| !r.is_empty()) {
        let (first, count) = run.split_once('+').expect("FIRST+BLOCKS");
        let (first, count): (u64, u64) = (first.parse().unwrap(), count.parse().unwrap());
        blocks.extend(first..first + count);
    }
    (field("oos").parse().unwrap(), blocks, field("skipped").parse().unwrap())
}

fn read_file(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut data)).expect("read image");
    data
}

/// A connected pair with identical (zero) data, `a` primary.
fn pair(dir: &Path, extra_a: &[&str], extra_b: &[&str]) -> (Replica, Replica) {
    let (pa, pb) = (tests::free_port(), tests::free_port());
    let a = Replica::start("a", 0, (pa, pb), dir, extra_a);
    let b = Replica::start("b", 1, (pb, pa), dir, extra_b);
    let (mut a, b) = (a, b);
    a.ok("wait-connected 20000");
    a.ok("new-current-uuid");
    a.ok("primary");
    (a, b)
}

#[test]
fn verify_reports_exactly_the_flipped_blocks_and_a_checksum_resync_repairs_them() {
    tests::require_slow!();
    let dir = tempfile::tempdir().expect("temp dir");
    let algs = ["--verify-alg", "sha256", "--csums-alg", "crc32c"];
    let (mut a, mut b) = pair(dir.path(), &algs, &algs);
    a.ok("write 0 3000 1");
    a.ok("flush");

    // Behind the secondary's back: one byte in each of these blocks of its backing file.
    let flipped: BTreeSet<u64> = [0, 5, 1234, 2999, 9000, 16383].into_iter().collect();
    let image = dir.path().join("b.img");
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
    for (n, block) in flipped.iter().enumerate() {
        let at = block * BLOCK + (n as u64 * 577) % BLOCK;
        let mut byte = [0u8; 1];
        file.seek(SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut byte).unwrap();
        byte[0] ^= 0x40;
        file.seek(SeekFrom::Start(at)).unwrap();
        file.write_all(&byte).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);

    a.ok("verify 1");
    let reply = a.ok("wait-verified 60000");
    println!("verify after flipping {} blocks: {reply}", flipped.len());
    let (found, reported, skipped) = verify_result(&reply);
    assert_eq!(reported, flipped, "verify reports exactly the flipped blocks: {reply}");
    assert_eq!((found, skipped), (flipped.len() as u64, 0));
    // Marked, not resynced: the primary holds them in its bitmap for the peer.
    assert_eq!(a.status_field("oos"), flipped.len() as u64);

    // drbdadm disconnect + connect: the side with the bits resyncs just those, by checksum.
    a.ok("disconnect 1");
    a.ok("connect 1");
    a.ok("wait-synced 60000");
    b.ok("wait-synced 60000");
    assert_eq!(b.status_field("resync_received"), flipped.len() as u64, "just those blocks");
    a.ok("flush");
    assert!(read_file(&dir.path().join("a.img")) == read_file(&image), "images identical");

    a.ok("verify 1");
    let (found, reported, _) = verify_result(&a.ok("wait-verified 60000"));
    assert_eq!((found, reported.len()), (0, 0), "nothing differs after the resync");
    // And from the other side (VerifyS on the secondary).
    b.ok("verify 0");
    let (found, _, _) = verify_result(&b.ok("wait-verified 60000"));
    assert_eq!(found, 0);
}

#[test]
fn verify_under_a_write_stream_reports_no_false_differences() {
    tests::require_slow!();
    let dir = tempfile::tempdir().expect("temp dir");
    // Verify slowly (8 MiB/s) so the whole run overlaps the stream of writes.
    let a_args = ["--verify-alg", "crc32c"];
    let b_args = ["--verify-alg", "crc32c", "--resync-rate-kib", "8192"];
    let (mut a, mut b) = pair(dir.path(), &a_args, &b_args);
    b.ok("verify 0");
    // Sequential writes over the whole device at queue depth 8, twice, while b compares.
    for generation in [1, 2] {
        a.send(&format!("stream 0 16384 {generation} 8"));
        loop {
            let line = a.next_line(Duration::from_secs(60));
            if line == "done" {
                break;
            }
            assert!(line.starts_with("acked "), "unexpected stream output `{line}`");
        }
    }
    let reply = b.ok("wait-verified 60000");
    println!("verify under writes: {reply}");
    let (found, reported, skipped) = verify_result(&reply);
    assert_eq!((found, reported.len()), (0, 0), "no false differences: {reply}");
    assert!(skipped < 16384, "most blocks were compared: {reply}");
    a.ok("check 0 16384 2");
}

/// `tandemadm verify` on two tandemd: the status tree shows `replication:VerifyS ...
/// done:NN.NN` while it runs, `--statistics` counts the blocks found as `out-of-sync:` (KiB),
/// and `disconnect` + `connect` resyncs them.
#[test]
fn tandemadm_verify_shows_progress_and_out_of_sync_like_drbdsetup() {
    tests::require_slow!();
    let dir = tempfile::tempdir().expect("temp dir");
    let names = ["alpha", "beta"];
    let ports = [tests::free_port(), tests::free_port()];
    // A fixed 16 MiB/s verify rate, so the 64 MiB run lasts long enough to be seen.
    let mut text = String::from(
        "resource r0 {\n  net { protocol C; verify-alg sha256; csums-alg crc32c; }\n  \
         disk { c-plan-ahead 0; resync-rate 16M; }\n",
    );
    for (id, name) in names.iter().enumerate() {
        let disk = dir.path().join(format!("{name}.img"));
        tests::sparse_file(&disk, SIZE_BYTES);
        text.push_str(&format!(
            "  on {name} {{\n    node-id {id};\n    address 127.0.0.1:{};\n    volume 0 {{\n      \
             device minor 0;\n      disk {};\n      meta-disk internal;\n    }}\n  }}\n",
            ports[id],
            disk.display()
        ));
    }
    text.push_str("}\n");
    let config = dir.path().join("r0.res");
    std::fs::write(&config, text).expect("writing r0.res");
    let socket = |i: usize| dir.path().join(format!("{}.sock", names[i]));
    let _daemons: Vec<tests::Daemon> = (0..2)
        .map(|i| {
            let mut command = Command::new(tests::binary("tandemd"));
            command
                .arg("-c")
                .arg(&config)
                .args(["--node", names[i]])
                .args(["--portal", &format!("127.0.0.1:{}", tests::free_port())])
                .arg("--control-socket")
                .arg(socket(i))
                .arg("--state-dir")
                .arg(dir.path().join(format!("state-{}", names[i])));
            let mut daemon = tests::Daemon::spawn(names[i], command);
            daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
            daemon
        })
        .collect();
    let adm = |i: usize, args: &[&str]| {
        let mut command = Command::new(tests::binary("tandemadm"));
        command.arg("-s").arg(socket(i)).args(args);
        tests::run_ok(&mut command, Duration::from_secs(30))
    };
    for i in 0..2 {
        adm(i, &["create-md", "r0"]);
        adm(i, &["up", "r0"]);
    }
    adm(0, &["wait-connect", "--timeout", "20", "r0"]);
    adm(0, &["new-current-uuid", "--clear-bitmap", "r0"]);
    adm(0, &["wait-sync", "--timeout", "20", "r0"]);
    adm(0, &["primary", "r0"]);

    // Behind beta's back: three blocks of its disk change.
    let image = dir.path().join("beta.img");
    let mut file = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    for block in [1u64, 4000, 16000] {
        file.seek(SeekFrom::Start(block * BLOCK + 17)).unwrap();
        file.write_all(b"silent corruption").unwrap();
    }
    file.sync_all().unwrap();
    drop(file);

    adm(0, &["verify", "r0"]);
    let mut seen_running = None;
    let start = std::time::Instant::now();
    loop {
        let status = adm(0, &["status", "r0"]);
        if status.contains("replication:VerifyS") {
            seen_running.get_or_insert(status.clone());
        } else if seen_running.is_some() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "verify never ended: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let running = seen_running.expect("status showed the verify");
    println!("tandemadm status during verify:\n{running}");
    let line = running.lines().find(|l| l.contains("replication:VerifyS")).unwrap();
    assert!(line.contains("peer-disk:UpToDate done:"), "{line}");
    let percent: f64 = line.split("done:").nth(1).unwrap().trim().parse().unwrap();
    assert!((0.0..=100.0).contains(&percent), "{line}");
    let beta_status = adm(1, &["status", "r0"]);
    assert!(!beta_status.contains("Verify"), "beta's run ended too: {beta_status}");

    let statistics = adm(0, &["status", "--statistics", "r0"]);
    println!("after verify:\n{statistics}");
    assert!(statistics.contains("out-of-sync:12 "), "3 blocks = 12 KiB: {statistics}");

    adm(0, &["disconnect", "r0"]);
    adm(0, &["connect", "r0"]);
    adm(0, &["wait-sync", "--timeout", "30", "r0"]);
    let statistics = adm(0, &["status", "--statistics", "r0"]);
    assert!(statistics.contains("out-of-sync:0 "), "{statistics}");
    // `meta-disk internal`: each file ends in its own node's metadata (node id, bitmaps), so
    // only the data area is compared; the last MiB holds that metadata (about 40 KiB of it)
    // and none of the blocks this test writes.
    let data_bytes = usize::try_from(SIZE_BYTES - (1 << 20)).unwrap();
    let (alpha, beta) = (read_file(&dir.path().join("alpha.img")), read_file(&image));
    assert!(alpha[..data_bytes] == beta[..data_bytes], "repaired");
}

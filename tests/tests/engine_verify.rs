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
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::replica::{Node, Replica};

const BLOCK: u64 = 4096;
const SIZE_BYTES: u64 = 64 * 1024 * 1024;

/// How long a command may take to answer (a verify of the whole device runs in one).
const REPLY: Duration = Duration::from_secs(120);

/// Node `id` of two on loopback, listening on `ports.0`, its peer on `ports.1`.
fn start(name: &str, id: u8, ports: (u16, u16), dir: &Path, extra: &[&str]) -> Replica {
    let node = Node {
        id,
        port: ports.0,
        peer_id: 1 - id,
        peer_port: ports.1,
        backing: dir.join(format!("{name}.img")),
        meta: dir.join(format!("{name}.tmeta")),
        size_bytes: SIZE_BYTES,
    };
    Replica::start(name, &node, dir, extra)
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
    let a = start("a", 0, (pa, pb), dir, extra_a);
    let b = start("b", 1, (pb, pa), dir, extra_b);
    let (mut a, b) = (a, b);
    a.ok("wait-connected 20000", REPLY);
    a.ok("new-current-uuid", REPLY);
    a.ok("primary", REPLY);
    (a, b)
}

#[test]
fn verify_reports_exactly_the_flipped_blocks_and_a_checksum_resync_repairs_them() {
    tests::require_slow!();
    let dir = tempfile::tempdir().expect("temp dir");
    let algs = ["--verify-alg", "sha256", "--csums-alg", "crc32c"];
    let (mut a, mut b) = pair(dir.path(), &algs, &algs);
    a.ok("write 0 3000 1", REPLY);
    a.ok("flush", REPLY);

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

    a.ok("verify 1", REPLY);
    let reply = a.ok("wait-verified 60000", REPLY);
    println!("verify after flipping {} blocks: {reply}", flipped.len());
    let (found, reported, skipped) = verify_result(&reply);
    assert_eq!(reported, flipped, "verify reports exactly the flipped blocks: {reply}");
    assert_eq!((found, skipped), (flipped.len() as u64, 0));
    // Marked, not resynced: the primary holds them in its bitmap for the peer.
    assert_eq!(a.status_field("oos"), flipped.len() as u64);

    // drbdadm disconnect + connect: the side with the bits resyncs just those, by checksum.
    a.ok("disconnect 1", REPLY);
    a.ok("connect 1", REPLY);
    a.ok("wait-synced 60000", REPLY);
    b.ok("wait-synced 60000", REPLY);
    assert_eq!(b.status_field("resync_received"), flipped.len() as u64, "just those blocks");
    a.ok("flush", REPLY);
    assert!(read_file(&dir.path().join("a.img")) == read_file(&image), "images identical");

    a.ok("verify 1", REPLY);
    let (found, reported, _) = verify_result(&a.ok("wait-verified 60000", REPLY));
    assert_eq!((found, reported.len()), (0, 0), "nothing differs after the resync");
    // And from the other side (VerifyS on the secondary).
    b.ok("verify 0", REPLY);
    let (found, _, _) = verify_result(&b.ok("wait-verified 60000", REPLY));
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
    b.ok("verify 0", REPLY);
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
    let reply = b.ok("wait-verified 60000", REPLY);
    println!("verify under writes: {reply}");
    let (found, reported, skipped) = verify_result(&reply);
    assert_eq!((found, reported.len()), (0, 0), "no false differences: {reply}");
    assert!(skipped < 16384, "most blocks were compared: {reply}");
    a.ok("check 0 16384 2", REPLY);
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

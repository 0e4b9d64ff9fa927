//! End-to-end tests of `tandem-iscsi` with real initiators: libiscsi's tools (iscsi-inq,
//! iscsi-ls, iscsi-test-cu) and QEMU's iSCSI driver (qemu-io).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tests::{Daemon, binary, free_port, require_tool, run_with_timeout};

const TARGET: &str = "iqn.2026-11.org.tandem:e2e";
const INITIATOR: &str = "iqn.2026-11.org.tandem:e2e-initiator";

struct Target {
    daemon: Daemon,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Target {
    fn start(portals: usize, extra: &[&str]) -> Target {
        let dir = tempfile::tempdir().expect("temporary directory");
        let image: PathBuf = dir.path().join("lun0.img");
        let ports: Vec<u16> = (0..portals).map(|_| free_port()).collect();
        let mut command = Command::new(binary("tandem-iscsi"));
        for port in &ports {
            command.args(["--portal", &format!("127.0.0.1:{port}")]);
        }
        command.args([
            "--target",
            TARGET,
            "--lun",
            &format!("0={}", image.display()),
            "--create-size",
            "256M",
        ]);
        command.args(extra);
        let mut daemon = Daemon::spawn("tandem-iscsi", command);
        for port in &ports {
            daemon.wait_for_log(
                &format!("tandem-iscsi: listening on 127.0.0.1:{port}"),
                Duration::from_secs(20),
            );
            daemon.wait_for_port(SocketAddr::from(([127, 0, 0, 1], *port)), Duration::from_secs(5));
        }
        Target { daemon, ports, _dir: dir }
    }

    fn url(&self, index: usize, credentials: &str) -> String {
        format!("iscsi://{credentials}127.0.0.1:{}/{TARGET}/0", self.ports[index])
    }
}

fn iscsi_inq(url: &str, initiator: &str) -> std::process::Output {
    let tool = require_tool("iscsi-inq", "libiscsi-bin");
    run_with_timeout(Command::new(tool).args(["-i", initiator, url]), Duration::from_secs(30))
}

#[test]
fn inquiry_and_discovery_over_tcp() {
    let target = Target::start(2, &[]);
    let output = iscsi_inq(&target.url(0, ""), INITIATOR);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "iscsi-inq failed: {text}\n{}", target.daemon.log());
    assert!(text.contains("Vendor:TANDEM"), "{text}");
    assert!(text.contains("Peripheral Device Type:DIRECT_ACCESS"), "{text}");

    let ls = require_tool("iscsi-ls", "libiscsi-bin");
    let output = run_with_timeout(
        Command::new(ls).arg(format!("iscsi://127.0.0.1:{}", target.ports[0])),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    for port in &target.ports {
        assert!(text.contains(&format!("Target:{TARGET} Portal:127.0.0.1:{port},1")), "{text}");
    }
}

/// A journal record as `iscsi-target/src/driver/atomic_journal.rs` lays it out on disk (a
/// versioned format: little-endian fields, CRC32C of the first 40 bytes at 40).
fn journal_record(state: u32, sequence: u64, offset_bytes: u64, data: &[u8]) -> Vec<u8> {
    let mut record = Vec::new();
    record.extend_from_slice(b"TNDMATJ\n");
    record.extend_from_slice(&1u32.to_le_bytes());
    record.extend_from_slice(&state.to_le_bytes());
    record.extend_from_slice(&sequence.to_le_bytes());
    record.extend_from_slice(&offset_bytes.to_le_bytes());
    record.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
    record.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    let crc = crc32c::crc32c(&record);
    record.extend_from_slice(&crc.to_le_bytes());
    record
}

#[test]
fn a_pending_atomic_write_is_replayed_before_the_target_serves() {
    const HEADER_BYTES: usize = 4096;
    const SLOT_BYTES: usize = 128 * 1024;
    const OFFSET_BYTES: u64 = 3 * 512;
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("lun0.img");
    // The old data, and a journal left by a crash between its own write and the in-place one.
    std::fs::write(&image, vec![0x11u8; 1024 * 1024]).expect("image");
    let new = vec![0xa6u8; SLOT_BYTES];
    let mut journal = vec![0u8; HEADER_BYTES + SLOT_BYTES];
    let record = journal_record(1, 41, OFFSET_BYTES, &new);
    journal[..record.len()].copy_from_slice(&record);
    journal[HEADER_BYTES..].copy_from_slice(&new);
    let journal_path = dir.path().join("lun0.img.atomic-journal");
    std::fs::write(&journal_path, &journal).expect("journal");
    let port = free_port();
    let mut command = Command::new(binary("tandem-iscsi"));
    command.args(["--portal", &format!("127.0.0.1:{port}"), "--target", TARGET]);
    command.args(["--lun", &format!("0={}", image.display())]);
    let mut daemon = Daemon::spawn("tandem-iscsi", command);
    daemon.wait_for_log("replayed atomic write #41", Duration::from_secs(20));
    daemon.wait_for_log("tandem-iscsi: listening on", Duration::from_secs(20));
    // Replayed durably before serving: the range holds all of the new data, the rest is old.
    let bytes = std::fs::read(&image).expect("image");
    let start = usize::try_from(OFFSET_BYTES).unwrap();
    assert!(bytes[start..start + SLOT_BYTES].iter().all(|&b| b == 0xa6), "the whole write");
    assert!(bytes[..start].iter().chain(&bytes[start + SLOT_BYTES..]).all(|&b| b == 0x11));
    // Marked applied (state 2), so a restart does not write it again.
    let journal = std::fs::read(&journal_path).expect("journal");
    assert_eq!(&journal[..44], &journal_record(2, 41, OFFSET_BYTES, &new)[..]);
    drop(daemon);
    // A torn record (bad CRC) is cleared without touching the image.
    let mut torn = journal_record(1, 42, 0, &vec![0x5au8; 4096]);
    torn[20] ^= 1;
    let mut journal = vec![0u8; HEADER_BYTES + SLOT_BYTES];
    journal[..torn.len()].copy_from_slice(&torn);
    std::fs::write(&journal_path, &journal).expect("journal");
    let mut command = Command::new(binary("tandem-iscsi"));
    command.args(["--portal", &format!("127.0.0.1:{port}"), "--target", TARGET]);
    command.args(["--lun", &format!("0={}", image.display())]);
    let mut daemon = Daemon::spawn("tandem-iscsi", command);
    daemon.wait_for_log("discarded a torn record (header CRC)", Duration::from_secs(20));
    daemon.wait_for_log("tandem-iscsi: listening on", Duration::from_secs(20));
    assert_eq!(std::fs::read(&image).expect("image"), bytes, "the image is untouched");
    assert!(std::fs::read(&journal_path).expect("journal")[..HEADER_BYTES].iter().all(|&b| b == 0));
}

#[test]
fn chap_good_and_bad_secrets_and_initiator_acl() {
    let target =
        Target::start(1, &["--chap", "alice:alice-secret-12", "--allow-initiator", INITIATOR]);
    let good = iscsi_inq(&target.url(0, "alice%alice-secret-12@"), INITIATOR);
    assert!(
        good.status.success(),
        "good secret refused: {}",
        String::from_utf8_lossy(&good.stderr)
    );

    let cases = [
        ("alice%wrong-secret-99@", INITIATOR, "wrong secret"),
        ("mallory%alice-secret-12@", INITIATOR, "wrong user"),
        ("", INITIATOR, "no credentials"),
        ("alice%alice-secret-12@", "iqn.2026-11.org.evil:host", "initiator not allowed"),
    ];
    for (credentials, initiator, what) in cases {
        let output = iscsi_inq(&target.url(0, credentials), initiator);
        assert!(!output.status.success(), "{what}: login should fail");
    }
}

#[test]
fn mutual_chap_logs_in() {
    let target = Target::start(
        1,
        &["--chap", "alice:alice-secret-12", "--mutual-chap", "target:target-secret-1"],
    );
    let url = format!(
        "{}?target_user=target&target_password=target-secret-1",
        target.url(0, "alice%alice-secret-12@")
    );
    let output = iscsi_inq(&url, INITIATOR);
    assert!(output.status.success(), "mutual CHAP: {}", String::from_utf8_lossy(&output.stderr));
    let url = format!(
        "{}?target_user=target&target_password=not-the-secret",
        target.url(0, "alice%alice-secret-12@")
    );
    let output = iscsi_inq(&url, INITIATOR);
    assert!(!output.status.success(), "a target with the wrong mutual secret must be refused");
}

fn qemu_io(image_opts: &str, commands: &[&str]) -> String {
    let tool = require_tool("qemu-io", "qemu-utils qemu-block-extra");
    let mut command = Command::new(tool);
    command.args(["--image-opts", image_opts]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = run_with_timeout(&mut command, Duration::from_secs(60));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "qemu-io failed: {text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.contains("failed:"), "{text}");
    text
}

#[test]
fn qemu_writes_patterns_and_reads_them_back_with_and_without_header_digests() {
    tests::require_slow!();
    let target = Target::start(2, &[]);
    for (port, digest) in [(target.ports[0], "none"), (target.ports[1], "crc32c")] {
        let opts = format!(
            "driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target={TARGET},lun=0,header-digest={digest},initiator-name={INITIATOR}"
        );
        qemu_io(
            &opts,
            &[
                "write -P 0xa5 0 1M",
                "write -P 0x5a 1M 4k",
                "write -z 2M 64k",
                "discard 3M 1M",
                "read -P 0xa5 0 1M",
                "read -P 0x5a 1M 4k",
                "read -P 0 2M 64k",
                "read -P 0 3M 1M",
                "flush",
            ],
        );
    }
}

#[test]
fn qemu_img_sees_the_size_and_converts_data() {
    tests::require_slow!();
    let target = Target::start(1, &[]);
    let tool = require_tool("qemu-img", "qemu-utils");
    let url = target.url(0, "");
    let output = run_with_timeout(
        Command::new(&tool).args(["info", "-f", "raw", &url]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && text.contains("256 MiB"), "{text}");
    let output = run_with_timeout(
        Command::new(&tool).args([
            "bench", "-f", "raw", "-t", "none", "-w", "-c", "2000", "-d", "32", "-s", "4096", &url,
        ]),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// Conformance tests that fail against a correct target, by source file, and why. Empty since
/// the standalone file device journals atomic writes up to 128 KiB (WriteAtomic16.Simple writes
/// 1..256 blocks atomically and expects GOOD); kept for the next suite defect.
const KNOWN_TEST_DEFECTS: &[tests::conformance::Explained] = &[];

#[test]
fn libiscsi_conformance_suite_has_no_unexplained_failures_or_skips() {
    tests::require_slow!();
    let target = Target::start(2, &[]);
    let urls = [target.url(0, ""), target.url(1, "")];
    tests::conformance::run_and_check(&urls, &[tests::conformance::DISK_SKIPS], KNOWN_TEST_DEFECTS);
}

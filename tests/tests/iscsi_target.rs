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

#[test]
fn libiscsi_conformance_suite_has_no_failures() {
    tests::require_slow!();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/iscsi-conformance");
    assert!(script.is_file(), "{} is missing", script.display());
    require_tool("iscsi-test-cu", "libiscsi-bin");
    let target = Target::start(2, &[]);
    let log = tempfile::NamedTempFile::new().expect("log file");
    let output = run_with_timeout(
        Command::new("bash")
            .arg(&script)
            .arg(target.url(0, ""))
            .arg(target.url(1, ""))
            .env("CONFORMANCE_LOG", log.path()),
        Duration::from_secs(1500),
    );
    let text = String::from_utf8_lossy(&output.stdout);
    eprintln!("{text}");
    let summary = text.lines().last().unwrap_or_default();
    assert!(summary.contains(" 0 failed"), "conformance: {summary}\n{text}");
    assert!(output.status.success(), "{text}");
}

//! The end-to-end test harness shared by every Tandem test that runs real processes.
//!
//! Tests start the project's own binaries on free loopback ports ([`Daemon`]), drive them with
//! real external clients (iscsi-test-cu, qemu-img, qemu-io, drbdmeta, the OpenStack CLIs) through
//! [`run_with_timeout`], and build throw-away hosts in network namespaces ([`NetNs`]). Every
//! process a test starts is stopped by PID when its handle drops, and its log is printed when the
//! test failed, so a red test explains itself.
//!
//! Slow tests (QEMU guests, network namespaces, the conformance suite) begin with
//! [`require_slow!`]: they run when `TANDEM_SLOW_TESTS=1` (the README's test command and CI set
//! it) and say that they were skipped otherwise.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub mod api_db;
pub mod clients;
pub mod fixture_node;
pub mod guest;
pub mod http;
pub mod openstack;
pub mod replica;
pub mod small_fs;
pub mod storage_pair;
pub mod tandemd_node;

/// The environment variable that enables slow tests.
pub const SLOW_TESTS_VARIABLE: &str = "TANDEM_SLOW_TESTS";

/// How long [`Daemon`]'s drop waits for a process to exit after SIGTERM before SIGKILL.
const STOP_GRACE_MS: u64 = 2_000;

/// How often readiness checks poll.
const POLL_INTERVAL_MS: u64 = 20;

/// True when slow tests should run (`TANDEM_SLOW_TESTS=1`).
pub fn slow_tests_enabled() -> bool {
    std::env::var(SLOW_TESTS_VARIABLE).as_deref() == Ok("1")
}

/// Returns from the calling test unless slow tests are enabled, saying so on stderr.
#[macro_export]
macro_rules! require_slow {
    () => {
        if !$crate::slow_tests_enabled() {
            eprintln!("skipped: slow test; set {}=1 to run it", $crate::SLOW_TESTS_VARIABLE);
            return;
        }
    };
}

/// The directory that holds the workspace (the repository root).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lies in the workspace").into()
}

/// The `shared/` directory that lies beside the repository (benchmark and conformance tools).
pub fn shared_dir() -> PathBuf {
    workspace_root().parent().expect("the repository has a parent directory").join("shared")
}

/// The path of an external tool, or a panic that names the Debian package providing it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    match find_in_path(tool) {
        Some(path) => path,
        None => panic!(
            "required tool `{tool}` is missing: install the Debian package `{package}` \
             (scripts/install-deps installs every tool the tests use)"
        ),
    }
}

/// Looks a program up in `PATH` (and the sbin directories, where root's tools live).
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// The package that builds each binary of the workspace, so a test can ask for a binary by name.
fn package_of_binary(name: &str) -> Option<&'static str> {
    let table: &[(&str, &str)] = &[
        ("tandem-iscsi", "iscsi-target"),
        ("tandem-sim", "drbd-engine"),
        ("tandem-replica", "drbd-engine"),
        ("tandemd", "storage-node"),
        ("tandemadm", "storage-node"),
        ("tandem-api", "volume-api"),
        ("tandem-compute", "compute-agent"),
    ];
    table.iter().find(|(binary, _)| *binary == name).map(|(_, package)| *package)
}

/// The path of a workspace binary, built (once per test process) in the same profile and target
/// directory as the running test, so a test never runs a stale binary.
pub fn binary(name: &str) -> PathBuf {
    // One build per binary and process; a build of one binary never makes a caller that wants
    // another (already built) wait, e.g. a stand-in node answering requests while another test
    // builds tandemd.
    static BUILT: OnceLock<Mutex<std::collections::HashMap<String, std::sync::Arc<OnceLock<()>>>>> =
        OnceLock::new();
    let profile_dir = profile_dir();
    let path = profile_dir.join(name);
    let cell = {
        let built = BUILT.get_or_init(|| Mutex::new(std::collections::HashMap::new()));
        let mut built = built.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        built.entry(name.to_owned()).or_default().clone()
    };
    cell.get_or_init(|| {
        let package = package_of_binary(name).unwrap_or_else(|| {
            panic!("unknown workspace binary `{name}`: add it to package_of_binary")
        });
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command.current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "--package",
            package,
            "--bin",
            name,
        ]);
        if profile_dir.file_name().is_some_and(|profile| profile == "release") {
            command.arg("--release");
        }
        // The binary must land beside this test executable, whatever target dir cargo used.
        if let Some(target_dir) = profile_dir.parent() {
            command.env("CARGO_TARGET_DIR", target_dir);
        }
        let status = command.status().unwrap_or_else(|error| panic!("running cargo: {error}"));
        assert!(status.success(), "cargo build of `{name}` failed");
    });
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// `target/<profile>`: the directory that holds this test executable's `deps/` folder.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe.parent().expect("the test executable lies in a directory");
    let dir = if deps.file_name().is_some_and(|name| name == "deps") {
        deps.parent().expect("deps/ has a parent")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Ports are never handed out twice within
/// one test process, so tests running in parallel threads do not collide.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    let mut handed_out = handed_out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..1_000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
        let port = listener.local_addr().expect("a bound socket has an address").port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no free port found after 1000 attempts");
}

/// A child process of a test, with its stdout and stderr captured to a log file.
///
/// Dropping it stops the process by PID (SIGTERM, then SIGKILL after a grace period) and, when
/// the test is failing (the thread is panicking), prints the log.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `command` with its output captured. Panics when it cannot be started.
    pub fn spawn(name: &str, mut command: Command) -> Daemon {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("tandem-{name}-"))
            .tempdir()
            .expect("creating a log directory");
        let log_path = log_dir.path().join(format!("{name}.log"));
        let log = File::create(&log_path).expect("creating the log file");
        let log_clone = log.try_clone().expect("duplicating the log file handle");
        command.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log_clone));
        command.env("RUST_BACKTRACE", "1");
        // A process group of its own, so that dropping the handle also reaps what the daemon
        // started (QEMU under tandem-compute, say) even when the daemon had to be SIGKILLed.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().unwrap_or_else(|error| {
            panic!("starting {name} ({:?}): {error}", command.get_program())
        });
        Daemon { name: name.to_owned(), child: Some(child), log_path, _log_dir: log_dir }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("the daemon was not reaped yet")
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Waits until `addr` accepts TCP connections; panics (with the log) on timeout or if the
    /// process exits first.
    pub fn wait_for_port(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            self.assert_running_before(deadline, &format!("listening on {addr}"));
        }
    }

    /// Waits until the log contains `needle`; panics (with the log) on timeout or exit.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            self.assert_running_before(deadline, &format!("log line containing {needle:?}"));
        }
    }

    fn assert_running_before(&mut self, deadline: Instant, waiting_for: &str) {
        if let Some(status) = self.try_wait() {
            panic!(
                "{} exited ({status}) while waiting for {waiting_for}\n{}",
                self.name,
                self.log()
            );
        }
        if Instant::now() >= deadline {
            panic!("{} timed out waiting for {waiting_for}\n{}", self.name, self.log());
        }
        thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// Kills the process with SIGKILL (a crash, as `kill -9`) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILLs whatever is left of the daemon's process group (its own children), by the group
    /// id the daemon was started with.
    fn kill_process_group(&self) {
        let Some(child) = self.child.as_ref() else { return };
        if let Ok(pgid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Stops the process with SIGTERM and waits for its exit, escalating to SIGKILL after the
    /// grace period. Returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let status = self.stop();
        self.kill_process_group();
        if thread::panicking() {
            let how = match status {
                Some(status) if status.signal().is_some() => format!("{status}"),
                Some(status) => format!("exit {status}"),
                None => "unknown exit".to_owned(),
            };
            eprintln!(
                "----- log of {} ({how}) -----\n{}\n----- end of log -----",
                self.name,
                self.log()
            );
        }
        self.child = None;
    }
}

/// Runs a command to completion with a time limit. On timeout the process is killed and the
/// test panics with what it printed; the caller checks the exit status itself.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Output {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("starting {:?}: {error}", command.get_program()));
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_thread = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err_thread = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    match status {
        Some(status) => Output { status, stdout, stderr },
        None => panic!(
            "{command:?} timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Runs a command with a time limit and panics with its output unless it succeeded; returns
/// its stdout as text.
pub fn run_ok(command: &mut Command, timeout: Duration) -> String {
    let output = run_with_timeout(command, timeout);
    assert!(
        output.status.success(),
        "{command:?} failed ({})\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A throw-away network namespace: a host of its own for tests that cut links or move
/// addresses. Addresses live only inside namespaces the test created. Deleted on drop.
pub struct NetNs {
    name: String,
}

/// Counts namespaces within this process so names stay unique across parallel tests.
static NETNS_SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl NetNs {
    /// Creates a namespace named `<prefix>-<pid>-<n>` with its loopback up. Needs root and
    /// iproute2.
    pub fn create(prefix: &str) -> NetNs {
        require_tool("ip", "iproute2");
        let serial = NETNS_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{serial}", std::process::id());
        run_ip(&["netns", "add", &name]);
        let namespace = NetNs { name };
        namespace.ip(&["link", "set", "lo", "up"]);
        namespace
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `ip ARGS` inside the namespace and panics when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full);
    }

    /// Links two namespaces with a veth pair and gives each end an address (CIDR, e.g.
    /// "10.77.0.1/24"). Returns the two interface names.
    pub fn link(a: &NetNs, a_cidr: &str, b: &NetNs, b_cidr: &str) -> (String, String) {
        let serial = NETNS_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Interface names are limited to 15 bytes; they only need to be unique per namespace.
        let a_if = format!("veth{serial}a");
        let b_if = format!("veth{serial}b");
        run_ip(&[
            "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns",
            &b.name,
        ]);
        a.ip(&["addr", "add", a_cidr, "dev", &a_if]);
        b.ip(&["addr", "add", b_cidr, "dev", &b_if]);
        a.ip(&["link", "set", &a_if, "up"]);
        b.ip(&["link", "set", &b_if, "up"]);
        (a_if, b_if)
    }

    /// Cuts (`up == false`) or restores an interface of this namespace: a partition.
    pub fn set_link(&self, interface: &str, up: bool) {
        self.ip(&["link", "set", interface, if up { "up" } else { "down" }]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes its veth ends and kills nothing: processes that
        // tests started inside it are stopped by their own Daemon handles first.
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

fn run_ip(args: &[&str]) {
    let mut command = Command::new("ip");
    command.args(args);
    run_ok(&mut command, Duration::from_secs(10));
}

/// Creates a sparse file of `size_bytes` at `path`.
pub fn sparse_file(path: &Path, size_bytes: u64) {
    let file =
        File::create(path).unwrap_or_else(|error| panic!("creating {}: {error}", path.display()));
    file.set_len(size_bytes).expect("sizing a sparse file");
}

/// Polls `condition` until it holds; panics naming `what` when `timeout` passes first.
pub fn wait_for(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(wait_until(timeout, condition), "timed out after {timeout:?} waiting for {what}");
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
}

/// libiscsi's conformance suite (`../shared/tools/iscsi-conformance`) and the tables that
/// explain what it may skip or fail, shared by every test that runs it.
pub mod conformance {
    use super::{require_tool, run_with_timeout, shared_dir};
    use std::process::Command;
    use std::time::Duration;

    /// A skip or known failure: (substring of the `[SKIPPED]` line or the test's source file,
    /// why it is legitimate).
    pub type Explained = (&'static str, &'static str);

    /// Skips any disk LUN may report, each for something a disk LUN legitimately lacks.
    pub const DISK_SKIPS: &[Explained] = &[
        (
            "--allow-sanitize flag is not set",
            "SANITIZE erases the whole LUN; the suite runs it only with -S, which we do not pass",
        ),
        ("Logical unit is not removable", "a virtual disk has no removable medium"),
        ("Media is not removable", "a virtual disk has no removable medium"),
        ("Logical unit is not write-protected", "the LUN is writable; there is no write protect"),
        (
            "LBPPB < 2",
            "we report one logical block per physical block (any 512-byte block can be \
             unmapped); with LBPPB >= 2, GetLBAStatus.UnmapSingle asks GET LBA STATUS at LBA i+1 \
             for a first descriptor at LBA i+LBPPB, which SBC-3 forbids (the first descriptor \
             starts at the requested LBA), so no valid geometry passes both",
        ),
    ];

    /// Skips the storage node's replicated LUN adds to [`DISK_SKIPS`].
    pub const REPLICATED_LUN_SKIPS: &[Explained] = &[
        (
            "Logical unit is fully provisioned",
            "the replicated LUN does not advertise thin provisioning: QEMU 7.2's iscsi driver \
             aborts in its block-status path on 4 KiB-block LUNs with provisioning on \
             (storage-node/src/lun.rs)",
        ),
        (
            "UNMAP is not implemented",
            "follows from the LUN not advertising logical block provisioning (LBPME clear)",
        ),
    ];

    /// Tests that fail on the replicated LUN for a reason that is not a defect, by source file.
    /// None: WriteAtomic16.Simple (1..256 blocks of 4 KiB) passes since every replica journals
    /// its atomic writes (drbd-engine/src/protocol/node/atomic.rs).
    pub const REPLICATED_LUN_DEFECTS: &[Explained] = &[];

    /// Test families the suite runs each test in (ALL, SCSI, LINUX).
    pub const FAMILIES: usize = 3;

    /// What one run of the suite found.
    #[derive(Debug)]
    pub struct Summary {
        pub ran: usize,
        pub failed: usize,
        pub skipped: usize,
        /// The tool's own summary (failed assertions, skips by reason, the totals line).
        pub text: String,
    }

    /// Runs the suite against `urls` (a second URL enables the multipath tests) and fails the
    /// test on any skip outside `skips`, any failure outside `defects` (each at most once per
    /// family), or fewer than 600 tests run.
    pub fn run_and_check(
        urls: &[String],
        skips: &[&[Explained]],
        defects: &[Explained],
    ) -> Summary {
        let script = shared_dir().join("tools/iscsi-conformance");
        assert!(script.is_file(), "{} is missing", script.display());
        require_tool("iscsi-test-cu", "libiscsi-bin");
        let log = tempfile::NamedTempFile::new().expect("log file");
        // Normal mode (-n) so CUnit lists each failed assertion with its source file.
        let output = run_with_timeout(
            Command::new("bash")
                .arg(&script)
                .args(urls)
                .args(["--", "-n"])
                .env("CONFORMANCE_LOG", log.path()),
            Duration::from_secs(1500),
        );
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        eprintln!("{text}");
        let full = std::fs::read_to_string(log.path()).expect("conformance log");
        check_log(&full, text, skips, defects)
    }

    /// The checks of [`run_and_check`] on a finished log.
    pub fn check_log(
        full: &str,
        text: String,
        skips: &[&[Explained]],
        defects: &[Explained],
    ) -> Summary {
        let (ran, failed) = run_summary(full).unwrap_or_else(|| panic!("no run summary:\n{text}"));
        assert!(ran >= 600, "the suite ran {ran} tests only:\n{text}");
        // Skips: every reason must be explained. Lines may be glued to CUnit's output in
        // normal mode, so look for the marker anywhere.
        let mut skipped = 0;
        for (at, _) in full.match_indices("[SKIPPED] ") {
            let reason = full[at..].lines().next().unwrap_or_default();
            skipped += 1;
            assert!(
                skips
                    .iter()
                    .flat_map(|table| table.iter())
                    .any(|(allowed, _)| reason.contains(allowed)),
                "a skip outside the allow-list: {reason}"
            );
        }
        // Failures: only tests on the known-defect list, at most once per family.
        for failure in failed_assertion_files(full) {
            assert!(
                defects.iter().any(|(file, _)| failure == *file),
                "a conformance test failed: {failure}\n{text}"
            );
        }
        assert!(
            failed <= defects.len() * FAMILIES,
            "{failed} tests failed, more than the known defects explain:\n{text}"
        );
        eprintln!(
            "conformance: {ran} tests ran, {failed} known-defect failures, {skipped} allowed skips"
        );
        Summary { ran, failed, skipped, text }
    }

    /// (tests run, tests failed) from CUnit's run summary.
    pub fn run_summary(log: &str) -> Option<(usize, usize)> {
        let line = log.lines().find(|l| l.trim_start().starts_with("tests "))?;
        let numbers: Vec<usize> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        // tests <total> <ran> <passed> <failed> <inactive>
        Some((*numbers.get(1)?, *numbers.get(3)?))
    }

    /// Source files of the failed assertions CUnit lists ("  12. test_x.c:56  - CU_ASSERT...").
    pub fn failed_assertion_files(log: &str) -> Vec<String> {
        let mut files: Vec<String> = log
            .split_whitespace()
            .filter_map(|word| word.split_once(".c:").map(|(file, _)| format!("{file}.c")))
            .filter(|file| file.starts_with("test_"))
            .collect();
        files.sort();
        files.dedup();
        files
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tables_explain_themselves_and_the_log_parsers_work() {
            let tables = [DISK_SKIPS, REPLICATED_LUN_SKIPS, REPLICATED_LUN_DEFECTS];
            for (entry, why) in tables.iter().flat_map(|t| t.iter()) {
                assert!(!entry.is_empty() && why.len() > 20, "{entry}: say why");
            }
            let sample = "  1. test_writeatomic16_simple.c:56  - CU_ASSERT_EQUAL(_r,0)\n\
                          tests    615    615    612      3        0\n";
            assert_eq!(
                failed_assertion_files(sample),
                vec!["test_writeatomic16_simple.c".to_string()]
            );
            assert_eq!(run_summary(sample), Some((615, 3)));
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
    }

    #[test]
    fn missing_tool_names_its_package() {
        let result = std::panic::catch_unwind(|| require_tool("tandem-no-such-tool", "pkg-x"));
        let message = result.expect_err("a missing tool panics");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| message.downcast_ref::<&str>().map(|text| (*text).to_owned()))
            .unwrap_or_default();
        assert!(text.contains("pkg-x"), "message names the package: {text}");
    }

    #[test]
    fn run_with_timeout_captures_output_and_kills_on_timeout() {
        let output = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(5),
        );
        assert_eq!(output.status.code(), Some(3));
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");
        let started = Instant::now();
        let result = std::panic::catch_unwind(|| {
            run_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(300))
        });
        assert!(result.is_err(), "a command over its limit panics");
        assert!(started.elapsed() < Duration::from_secs(5), "and is killed promptly");
    }

    #[test]
    fn daemon_is_stopped_on_drop_and_its_log_is_captured() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo ready; exec sleep 60"]);
        let mut daemon = Daemon::spawn("sleeper", command);
        daemon.wait_for_log("ready", Duration::from_secs(5));
        let pid = daemon.pid();
        drop(daemon);
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| !stat.contains(") Z "))
                .unwrap_or(false);
        assert!(!alive, "the daemon's process is gone after drop");
    }

    #[test]
    fn dropping_a_daemon_reaps_its_children_too() {
        let mut command = Command::new("sh");
        // The child ignores SIGTERM, so only the group kill on drop can stop it.
        command.args(["-c", "trap '' TERM; sleep 60 & echo child $!; wait"]);
        let mut daemon = Daemon::spawn("parent", command);
        daemon.wait_for_log("child ", Duration::from_secs(5));
        let pid: i32 = daemon
            .log()
            .split_whitespace()
            .nth(1)
            .and_then(|pid| pid.parse().ok())
            .expect("the child's pid");
        drop(daemon);
        let gone = wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| stat.contains(") Z "))
                .unwrap_or(true)
        });
        assert!(gone, "the daemon's child {pid} is gone after drop");
    }

    #[test]
    fn daemon_that_exits_early_fails_the_wait() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo dying; exit 7"]);
        let mut daemon = Daemon::spawn("quitter", command);
        let port = free_port();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            daemon.wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(5))
        }));
        assert!(result.is_err());
    }
}

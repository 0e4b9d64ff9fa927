//! The compute agent and the tiny guest for end-to-end tests: `tandem-compute daemon` on a free
//! port driven through its CLI, the guest built by `scripts/build-guest` booted with its serial
//! command channel, and that channel.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{
    Daemon, binary, free_port, require_tool, run_ok, run_with_timeout, wait_until, workspace_root,
};

/// The agent daemon and its HTTP endpoint.
pub struct Agent {
    pub daemon: Daemon,
    pub endpoint: String,
}

impl Agent {
    /// `tandem-compute daemon` on a free port with `extra` arguments.
    pub fn start(state_dir: &Path, accel: &str, extra: &[&str]) -> Agent {
        let port = free_port();
        let mut command = Command::new(binary("tandem-compute"));
        command.args(["daemon", "--listen", &format!("127.0.0.1:{port}"), "--accel", accel]);
        command.arg("--state-dir").arg(state_dir).args(extra);
        let mut daemon = Daemon::spawn("tandem-compute", command);
        daemon.wait_for_log("tandem-compute: listening on", Duration::from_secs(30));
        Agent { daemon, endpoint: format!("http://127.0.0.1:{port}") }
    }

    /// Runs a CLI subcommand against the daemon; returns its JSON output (Null when empty).
    pub fn cli(&self, args: &[&str]) -> Value {
        let output = run_with_timeout(
            Command::new(binary("tandem-compute")).arg("--endpoint").arg(&self.endpoint).args(args),
            Duration::from_secs(60),
        );
        assert!(
            output.status.success(),
            "tandem-compute {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.daemon.log()
        );
        let text = String::from_utf8_lossy(&output.stdout);
        if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON output")
        }
    }

    pub fn show(&self, id: &str) -> Value {
        self.cli(&["show", id])["server"].clone()
    }
}

pub fn guest_dir() -> PathBuf {
    require_tool("cpio", "cpio");
    let dir = workspace_root().join("target/guest");
    run_ok(
        Command::new(workspace_root().join("scripts/build-guest")).arg(&dir),
        Duration::from_secs(300),
    );
    dir
}

/// Boots the tiny guest with its command channel and no disk; returns its id and how long the
/// boot took until the guest said it was ready.
pub fn boot_guest(agent: &Agent, id: &str) -> (Value, Duration) {
    let guest = guest_dir();
    let started = Instant::now();
    let server = agent.cli(&[
        "boot",
        id,
        "--id",
        id,
        "--kernel",
        guest.join("vmlinuz").to_str().expect("utf-8"),
        "--initrd",
        guest.join("initrd.img").to_str().expect("utf-8"),
        "--cmdline",
        "console=ttyS0 quiet panic=-1 tandem.channel",
    ])["server"]
        .clone();
    let console = PathBuf::from(server["paths"]["console_log"].as_str().expect("console path"));
    let ready = wait_until(Duration::from_secs(120), || {
        std::fs::read_to_string(&console).is_ok_and(|text| text.contains("tandem-guest: ready"))
    });
    assert!(ready, "the guest booted: {}", std::fs::read_to_string(&console).unwrap_or_default());
    let console_text = std::fs::read_to_string(&console).expect("console");
    assert!(console_text.contains("disks: )"), "the guest starts without disks: {console_text}");
    (server, started.elapsed())
}

/// How long to leave the guest between commands. Its channel loop reopens ttyS1 for every
/// command and every answer; a line that arrives while nobody holds the tty open is flushed,
/// so the next command waits until the loop is reading again.
pub const GUEST_SETTLE_MS: u64 = 300;

/// The tiny guest's command channel (its second serial port).
pub struct Channel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Channel {
    pub fn open(server: &Value) -> Channel {
        let path = server["paths"]["channel_socket"].as_str().expect("channel path");
        let stream = UnixStream::connect(path).expect("connecting to the guest channel");
        let writer = stream.try_clone().expect("clone");
        let mut channel = Channel { reader: BufReader::new(stream), writer };
        channel.synchronise();
        channel
    }

    /// Sends marker commands until one comes back whole: the guest's loop may not be reading
    /// yet, and a line that arrives while the guest has ttyS1 closed is dropped (see
    /// `GUEST_SETTLE_MS`).
    pub fn synchronise(&mut self) {
        for attempt in 0..40 {
            let marker = format!("tandem-sync-{attempt}");
            self.reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(1_500)))
                .expect("timeout");
            std::thread::sleep(Duration::from_millis(GUEST_SETTLE_MS));
            self.writer
                .write_all(format!("echo {marker}\n").as_bytes())
                .expect("sending to the guest");
            let mut seen_marker = false;
            loop {
                let mut line = String::new();
                match self.reader.read_line(&mut line) {
                    Ok(0) => panic!("guest channel closed"),
                    Ok(_) => {}
                    Err(_) => break,
                }
                let line = line.trim_end_matches(['\r', '\n']);
                seen_marker |= line == marker;
                if seen_marker && line.starts_with("tandem-guest: rc=") {
                    return;
                }
            }
        }
        panic!("the guest's command channel never answered");
    }

    /// Runs `command` in the guest; returns (rc, output lines).
    pub fn run(&mut self, command: &str, timeout: Duration) -> (i32, Vec<String>) {
        assert!(!command.contains('\n'));
        self.reader.get_ref().set_read_timeout(Some(timeout)).expect("timeout");
        std::thread::sleep(Duration::from_millis(GUEST_SETTLE_MS));
        self.writer.write_all(format!("{command}\n").as_bytes()).expect("sending to the guest");
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("guest channel closed; output so far: {lines:?}"),
                Ok(_) => {}
                Err(error) => {
                    panic!("guest command {command:?} timed out ({error}); output: {lines:?}")
                }
            }
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            if let Some(rc) = line.strip_prefix("tandem-guest: rc=") {
                // The tty echoes the command line back first.
                lines.retain(|output| output != command);
                return (rc.trim().parse().expect("numeric rc"), lines);
            }
            lines.push(line);
        }
    }

    pub fn run_ok(&mut self, command: &str, timeout: Duration) -> Vec<String> {
        let (rc, lines) = self.run(command, timeout);
        assert_eq!(rc, 0, "guest command {command:?} failed: {lines:?}");
        lines
    }
}

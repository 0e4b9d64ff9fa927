//! The QEMU process behind an instance: one this agent started, or one it found still running
//! when it started again after a crash (adopted). QEMU outlives a killed agent (it is not the
//! agent's thread), so a restarted agent takes its instances back instead of leaking them.

use std::path::Path;
use std::time::Duration;

/// How often an adopted process (not our child, so not waitable) is checked for exit.
const ADOPTED_EXIT_POLL_MS: u64 = 20;

pub enum Process {
    /// Started by this agent: waited for and killed through the child handle.
    Owned(tokio::process::Child),
    /// Started by an earlier run of the agent.
    Adopted { pid: u32 },
}

impl Process {
    pub fn pid(&self) -> Option<u32> {
        match self {
            Process::Owned(child) => child.id(),
            Process::Adopted { pid } => Some(*pid),
        }
    }

    pub fn has_exited(&mut self) -> bool {
        match self {
            Process::Owned(child) => matches!(child.try_wait(), Ok(Some(_))),
            Process::Adopted { pid } => !is_alive(*pid),
        }
    }

    /// Waits up to `timeout_ms` for the process to exit; returns whether it did.
    pub async fn wait_for_exit(&mut self, timeout_ms: u64) -> bool {
        match self {
            Process::Owned(child) => {
                tokio::time::timeout(Duration::from_millis(timeout_ms), child.wait()).await.is_ok()
            }
            Process::Adopted { pid } => {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
                while is_alive(*pid) {
                    if tokio::time::Instant::now() >= deadline {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(ADOPTED_EXIT_POLL_MS)).await;
                }
                true
            }
        }
    }

    /// SIGKILL, then reap (own child) or wait for it to vanish (adopted).
    pub async fn kill(&mut self) {
        match self {
            Process::Owned(child) => {
                let _ = child.kill().await;
            }
            Process::Adopted { pid } => {
                if let Ok(raw) = i32::try_from(*pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(raw),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = self.wait_for_exit(crate::constants::QEMU_STOP_TIMEOUT_MS).await;
            }
        }
    }
}

/// Whether `pid` exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may itself hold spaces.
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        }
        Err(_) => false,
    }
}

/// Whether `pid` is a live QEMU serving the QMP socket `qmp_socket`: a pid recorded by an
/// earlier run may since belong to any other process, which must never be adopted or killed.
pub fn is_instance_process(pid: u32, qmp_socket: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let socket = qmp_socket.to_string_lossy();
    is_alive(pid)
        && cmdline
            .split(|byte| *byte == 0)
            .any(|argument| String::from_utf8_lossy(argument).contains(socket.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_recognised_by_its_socket_argument_only() {
        // sh keeps its positional arguments in its command line, as QEMU keeps its options.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; true", "sh", "/tmp/tandem-instance-x/qmp.sock"])
            .spawn()
            .expect("sh");
        let pid = child.id();
        // Right after the fork the command line is still the test's until exec replaces it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_instance_process(pid, Path::new("/tmp/tandem-instance-x/qmp.sock")) {
            assert!(std::time::Instant::now() < deadline, "the child is never recognised");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_instance_process(pid, Path::new("/tmp/tandem-instance-y/qmp.sock")));
        assert!(!is_instance_process(u32::MAX - 1, Path::new("/tmp/tandem-instance-x/qmp.sock")));
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(!is_instance_process(pid, Path::new("/tmp/tandem-instance-x/qmp.sock")));
    }
}

//! A tmpfs of its own for a test that needs a file system to fill up (ENOSPC) and then grow:
//! mounted at a path of the test's temporary directory, unmounted on drop. Needs root.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SmallFs {
    pub path: PathBuf,
}

impl SmallFs {
    /// Mounts a tmpfs of `size_mib` MiB at `path` (created if missing).
    pub fn mount(path: PathBuf, size_mib: u64) -> SmallFs {
        std::fs::create_dir_all(&path).expect("mount point");
        let out = crate::run_with_timeout(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
                .arg(&path),
            MOUNT_TIMEOUT,
        );
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        SmallFs { path }
    }

    /// Gives the file system `size_mib` MiB, keeping its files.
    pub fn grow(&self, size_mib: u64) {
        let out = crate::run_with_timeout(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size_mib}m")])
                .arg(&self.path),
            MOUNT_TIMEOUT,
        );
        assert!(out.status.success(), "remount: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

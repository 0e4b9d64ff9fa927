//! Errors are the same whichever path serves a request: every scenario runs with the inline
//! fast path off, on, and on with blocking inline writes, on both engines, and must end with
//! the same `ErrorKind` and errno.
//! The failures are real ones from a small ext4 file system on a loop device: full (ENOSPC)
//! and shut down (EIO, from the FS_IOC_SHUTDOWN ioctl). Needs root, loop devices, mkfs.ext4
//! and mount; skipped with a message otherwise.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use backing_store::{BackingStore, EngineKind, Error, ErrorKind, OpenOptions};
use bytes::Bytes;

const FILE_SYSTEM_BYTES: u64 = 32 * 1024 * 1024;
/// Larger than the file system, so filling the sparse volume must run out of space.
const VOLUME_BYTES: u64 = 4 * FILE_SYSTEM_BYTES;

/// FS_IOC_SHUTDOWN (ext4's EXT4_IOC_SHUTDOWN, xfs's XFS_IOC_GOINGDOWN): _IOR('X', 125, u32).
const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
/// Shut down without flushing the journal: the file system stops as if the disk had died.
const SHUTDOWN_FLAGS_NOLOGFLUSH: u32 = 2;

/// A fresh ext4 file system on a loop device, mounted in a scratch directory; unmounted and
/// detached on drop.
struct Ext4 {
    _scratch: tempfile::TempDir,
    mount_point: PathBuf,
    device: PathBuf,
}

impl Ext4 {
    fn create() -> Result<Ext4, String> {
        let scratch =
            tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
        let image = scratch.path().join("fs.img");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(FILE_SYSTEM_BYTES))
            .map_err(|error| error.to_string())?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let device = run(Command::new("losetup").args(["--find", "--show"]).arg(&image))?;
        let device = PathBuf::from(device.trim());
        let mount_point = scratch.path().join("mnt");
        std::fs::create_dir(&mount_point).map_err(|error| error.to_string())?;
        let file_system = Ext4 { _scratch: scratch, mount_point, device };
        run(Command::new("mount")
            .args(["-t", "ext4"])
            .arg(&file_system.device)
            .arg(&file_system.mount_point))?;
        Ok(file_system)
    }

    fn shut_down(&self) {
        let directory = std::fs::File::open(&self.mount_point).expect("open mount point");
        let flags = SHUTDOWN_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 through the pointer, which is valid for the call; the
        // descriptor is open for the call.
        let result = unsafe { libc::ioctl(directory.as_raw_fd(), FS_IOC_SHUTDOWN, &flags) };
        assert_eq!(result, 0, "FS_IOC_SHUTDOWN failed: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount_point).status();
        let _ = Command::new("losetup").arg("--detach").arg(&self.device).status();
    }
}

fn run(command: &mut Command) -> Result<String, String> {
    let output = command.output().map_err(|error| format!("{command:?}: {error}"))?;
    if !output.status.success() {
        return Err(format!("{command:?}: {}", String::from_utf8_lossy(&output.stderr)));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn prerequisites_missing() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
        return Some("needs root and /dev/loop-control (loop devices)");
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        return Some("needs mkfs.ext4 (e2fsprogs)");
    }
    None
}

/// The comparable part of an outcome: kind and errno, or success.
fn summary<T>(result: &Result<T, Error>) -> Option<(ErrorKind, Option<i32>)> {
    result.as_ref().err().map(|error| (error.kind(), error.raw_os_error()))
}

/// Which paths may serve requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Paths {
    EngineOnly,
    Inline,
    InlineWithBlockingWrites,
}

const PATHS: [Paths; 3] = [Paths::EngineOnly, Paths::Inline, Paths::InlineWithBlockingWrites];

fn open(path: &Path, engine: EngineKind, paths: Paths) -> BackingStore {
    let options = OpenOptions {
        engine,
        direct_io: false,
        create_size_bytes: Some(VOLUME_BYTES),
        read_only: false,
    };
    let store = BackingStore::open(path, &options).expect("open");
    store.set_inline_io(paths != Paths::EngineOnly);
    store.set_inline_blocking_writes(paths == Paths::InlineWithBlockingWrites);
    store
}

type Outcomes = Vec<(&'static str, Option<(ErrorKind, Option<i32>)>)>;

/// Fills the sparse volume with 64 KiB writes until the file system is full.
fn no_space(engine: EngineKind, paths: Paths) -> (Outcomes, u64) {
    let file_system = Ext4::create().expect("ext4 on a loop device");
    let store = open(&file_system.mount_point.join("volume.img"), engine, paths);
    let chunk = Bytes::from(vec![0x6Bu8; 64 * 1024]);
    let outcome =
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(async {
            let mut offset = 0;
            while offset < VOLUME_BYTES {
                store.write(offset, chunk.clone(), false).await?;
                offset += 64 * 1024;
            }
            Ok(())
        });
    (vec![("write into a full file system", summary(&outcome))], store.io_counters().inline_served)
}

/// Reads (of cached and uncached data), writes and a flush after the file system died.
/// Returns the outcomes and how many of them the inline path served.
fn shut_down(engine: EngineKind, paths: Paths) -> (Outcomes, u64) {
    let file_system = Ext4::create().expect("ext4 on a loop device");
    let store = open(&file_system.mount_point.join("volume.img"), engine, paths);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(async {
        store.write(0, Bytes::from(vec![1u8; 1 << 20]), false).await.expect("write");
        store.flush().await.expect("flush");
        // Cached now, so an inline read would be served from the page cache if allowed.
        assert_eq!(store.read(0, 4096).await.expect("read")[..], [1u8; 4096]);
    });
    file_system.shut_down();
    let before = store.io_counters();
    let outcomes = runtime.block_on(async {
        vec![
            ("read of cached data", summary(&store.read(0, 4096).await)),
            ("read of a hole", summary(&store.read(8 << 20, 4096).await)),
            ("write", summary(&store.write(4096, Bytes::from(vec![2u8; 4096]), false).await)),
            ("FUA write", summary(&store.write(0, Bytes::from(vec![2u8; 512]), true).await)),
            ("flush", summary(&store.flush().await)),
        ]
    });
    (outcomes, store.io_counters().inline_served - before.inline_served)
}

#[test]
fn errors_are_the_same_on_both_paths() {
    if let Some(missing) = prerequisites_missing() {
        println!("skipped: {missing}");
        return;
    }
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        let (full_reference, _) = no_space(engine, Paths::EngineOnly);
        assert_eq!(
            full_reference[0].1,
            Some((ErrorKind::NoSpace, Some(libc::ENOSPC))),
            "engine={engine}: filling the file system"
        );
        let (dead_reference, _) = shut_down(engine, Paths::EngineOnly);
        for (what, outcome) in &dead_reference {
            assert_eq!(
                *outcome,
                Some((ErrorKind::Io, Some(libc::EIO))),
                "engine={engine}: {what} on a shut-down file system"
            );
        }
        for paths in PATHS {
            let label = format!("engine={engine} paths={paths:?}");
            let (full, full_inline_served) = no_space(engine, paths);
            assert_eq!(full, full_reference, "{label}: ENOSPC differs between paths");
            let (dead, dead_inline_served) = shut_down(engine, paths);
            assert_eq!(dead, dead_reference, "{label}: EIO differs between paths");
            // The comparison is only worth something if the fast path really produced the
            // errors: the reads fail inline (ext4 checks for shutdown before the page cache),
            // and with blocking writes so do the plain writes, ENOSPC included.
            match paths {
                Paths::EngineOnly => {
                    assert_eq!(full_inline_served + dead_inline_served, 0, "{label}");
                }
                Paths::Inline => assert!(dead_inline_served >= 2, "{label}: {dead_inline_served}"),
                Paths::InlineWithBlockingWrites => {
                    assert!(dead_inline_served >= 3, "{label}: {dead_inline_served}");
                    assert!(full_inline_served > 0, "{label}: no inline write before ENOSPC");
                }
            }
        }
    }
}

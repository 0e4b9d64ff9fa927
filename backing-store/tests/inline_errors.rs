//! Errors are the same whichever path serves a request: every scenario runs with the inline
//! fast path on and off, on both engines, and must end with the same `ErrorKind` and errno.
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

fn open(path: &Path, engine: EngineKind, inline: bool) -> BackingStore {
    let options = OpenOptions {
        engine,
        direct_io: false,
        create_size_bytes: Some(VOLUME_BYTES),
        read_only: false,
    };
    let store = BackingStore::open(path, &options).expect("open");
    store.set_inline_io(inline);
    store
}

type Outcomes = Vec<(&'static str, Option<(ErrorKind, Option<i32>)>)>;

/// Fills the sparse volume with 64 KiB writes until the file system is full.
fn no_space(engine: EngineKind, inline: bool) -> Outcomes {
    let file_system = Ext4::create().expect("ext4 on a loop device");
    let store = open(&file_system.mount_point.join("volume.img"), engine, inline);
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
    vec![("write into a full file system", summary(&outcome))]
}

/// Reads (of cached and uncached data), writes and a flush after the file system died.
fn shut_down(engine: EngineKind, inline: bool) -> (Outcomes, backing_store::IoCounters) {
    let file_system = Ext4::create().expect("ext4 on a loop device");
    let store = open(&file_system.mount_point.join("volume.img"), engine, inline);
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
    let after = store.io_counters();
    let counters = backing_store::IoCounters {
        inline_served: after.inline_served - before.inline_served,
        engine_served: after.engine_served - before.engine_served,
        inline_fallbacks: after.inline_fallbacks - before.inline_fallbacks,
    };
    (outcomes, counters)
}

#[test]
fn errors_are_the_same_on_both_paths() {
    if let Some(missing) = prerequisites_missing() {
        println!("skipped: {missing}");
        return;
    }
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        let full_engine = no_space(engine, false);
        let full_inline = no_space(engine, true);
        assert_eq!(full_engine, full_inline, "engine={engine}: ENOSPC differs between paths");
        assert_eq!(
            full_engine[0].1,
            Some((ErrorKind::NoSpace, Some(libc::ENOSPC))),
            "engine={engine}: filling the file system"
        );

        let (dead_engine, counters_engine) = shut_down(engine, false);
        let (dead_inline, counters_inline) = shut_down(engine, true);
        assert_eq!(dead_engine, dead_inline, "engine={engine}: EIO differs between paths");
        for (what, outcome) in &dead_engine {
            assert_eq!(
                *outcome,
                Some((ErrorKind::Io, Some(libc::EIO))),
                "engine={engine}: {what} on a shut-down file system"
            );
        }
        // The comparison is only worth something if the fast path really produced errors.
        assert_eq!(counters_engine.inline_served, 0, "engine={engine}");
        assert!(
            counters_inline.inline_served >= 2,
            "engine={engine}: the reads should have failed inline: {counters_inline:?}"
        );
    }
}

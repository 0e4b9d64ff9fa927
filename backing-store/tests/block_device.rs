//! The same store on a real block device: a loop device over a scratch file. Needs root and
//! losetup (util-linux); skipped with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use backing_store::{BackingStore, EngineKind, ErrorKind, OpenOptions};
use bytes::Bytes;

const SIZE_BYTES: u64 = 64 * 1024 * 1024;

/// A loop device detached on drop, so a failing test does not leak it.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Option<LoopDevice> {
        let output = Command::new("losetup").args(["--find", "--show"]).arg(file).output().ok()?;
        if !output.status.success() {
            eprintln!("losetup failed: {}", String::from_utf8_lossy(&output.stderr));
            return None;
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Some(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("--detach").arg(&self.path).status();
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|index| seed.wrapping_mul(31).wrapping_add(u8::try_from(index % 253).expect("small")))
        .collect()
}

#[test]
fn loop_device_behaves_like_a_file() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/loop-control").exists() {
        println!("skipped: needs root and /dev/loop-control (loop devices)");
        return;
    }
    for (engine, direct_io) in [
        (EngineKind::Sync, false),
        (EngineKind::Sync, true),
        (EngineKind::Uring, false),
        (EngineKind::Uring, true),
    ] {
        let directory = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch");
        let file = directory.path().join("loop.img");
        std::fs::File::create(&file).and_then(|handle| handle.set_len(SIZE_BYTES)).expect("file");
        let Some(device) = LoopDevice::attach(&file) else {
            println!("skipped: losetup could not attach a loop device");
            return;
        };
        let options = OpenOptions { engine, direct_io, create_size_bytes: None, read_only: false };
        let store = BackingStore::open(&device.path, &options).expect("open loop device");
        let label =
            format!("engine={engine} direct_io={direct_io} device={}", device.path.display());
        assert!(store.is_block_device(), "{label}");
        assert_eq!(store.is_direct_io(), direct_io, "{label}");
        assert_eq!(store.size_bytes(), SIZE_BYTES, "{label}");
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async {
            // (offset, len): aligned, sector-aligned, unaligned, last block.
            for (index, (offset, len)) in [
                (0u64, 4096usize),
                (1 << 20, 1 << 20),
                (512, 1024),
                (1001, 77),
                (SIZE_BYTES - 4096, 4096),
            ]
            .into_iter()
            .enumerate()
            {
                let data = pattern(u8::try_from(index).expect("small"), len);
                store.write(offset, data.clone(), index % 2 == 0).await.expect("write");
                assert!(
                    store.read(offset, len).await.expect("read") == data,
                    "{label}: {offset}+{len}"
                );
            }
            store.flush().await.expect("flush");
            store.discard(1 << 20, 65536).await.expect("discard");
            assert!(
                store.read(1 << 20, 65536).await.expect("read").iter().all(|byte| *byte == 0),
                "{label}"
            );
            store.write_zeroes(0, 4096).await.expect("write_zeroes");
            assert!(
                store.read(0, 4096).await.expect("read").iter().all(|byte| *byte == 0),
                "{label}"
            );
            // Unaligned zeroing: the device refuses fallocate, the fallback writes zeroes.
            store.write_zeroes(1001, 50).await.expect("unaligned write_zeroes");
            assert!(
                store.read(1001, 77).await.expect("read")[..50].iter().all(|byte| *byte == 0),
                "{label}"
            );
            assert_eq!(
                store.mapped_ranges(0, SIZE_BYTES).expect("ranges"),
                vec![(0, SIZE_BYTES, true)]
            );
            let error = store.read(SIZE_BYTES - 1, 2).await.expect_err("past the end");
            assert_eq!(error.kind(), ErrorKind::OutOfRange, "{label}");
            store.resize(SIZE_BYTES).await.expect("same size is fine");
            let error =
                store.resize(SIZE_BYTES * 2).await.expect_err("block devices do not resize");
            assert_eq!(error.kind(), ErrorKind::Unsupported, "{label}");
        });
        drop(store);
        drop(device);
    }
}

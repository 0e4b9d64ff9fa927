//! The file LUN's atomic writes through its journal (`backing_store::atomic_journal`), at the
//! device boundary: a crash with a torn in-place write in a child process, then reopened as
//! tandem-iscsi does; fencing of every write after a failed atomic write; the sizes the device
//! advertises; readers through the driver's lock. The journal's own cases (replay idempotence,
//! torn journal writes, no replay over a later write, record format, bad journal files) are
//! tested in backing-store.

use std::process::Command;
use std::sync::Arc;

use std::path::{Path, PathBuf};

use backing_store::atomic_journal::{AtomicJournal, CrashPoint, Recovery, journal_path};
use backing_store::{BackingStore, OpenOptions};
use bytes::Bytes;

use crate::constants::FILE_ATOMIC_WRITE_BYTES_MAX;
use crate::device::{BlockDevice, IoData, IoOp};
use crate::driver::perform_locked;
use crate::driver::store::StoreDevice;

const IMAGE_BYTES: u64 = 1024 * 1024;
/// The range the crash tests write: one full-size atomic write, not page aligned.
const OFFSET_BYTES: u64 = 3 * 512;
const LENGTH: usize = FILE_ATOMIC_WRITE_BYTES_MAX as usize;
const SLOT_BYTES: u32 = FILE_ATOMIC_WRITE_BYTES_MAX;
const OLD: u8 = 0x11;
const NEW: u8 = 0xa6;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn image_path(dir: &Path) -> PathBuf {
    dir.join("lun.img")
}

fn options() -> OpenOptions {
    OpenOptions { create_size_bytes: Some(IMAGE_BYTES), ..OpenOptions::default() }
}

/// Opens the image with its journal, as tandem-iscsi does.
async fn open(dir: &Path) -> (StoreDevice, Recovery) {
    let store = BackingStore::open(&image_path(dir), &options()).unwrap();
    StoreDevice::new(store).open_journal(&options()).await.unwrap()
}

async fn region(device: &StoreDevice) -> Vec<u8> {
    let length = u32::try_from(LENGTH).unwrap();
    device.read(OFFSET_BYTES, length).await.unwrap().to_vec()
}

/// A new image whose test range holds OLD.
fn prepare(dir: &Path) {
    runtime().block_on(async {
        let (device, recovery) = open(dir).await;
        assert_eq!(recovery, Recovery::Clean);
        device.write(OFFSET_BYTES, Bytes::from(vec![OLD; LENGTH]), true).await.unwrap();
    });
}

/// Runs `crash_child` in a child process that dies at `point` in an atomic write of NEW.
fn crash_at(dir: &Path, point: &str) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["driver::store::journal_tests::crash_child", "--exact", "--nocapture"])
        .env("TANDEM_ATOMIC_CRASH_DIR", dir)
        .env("TANDEM_ATOMIC_CRASH_POINT", point)
        .status()
        .unwrap();
    assert!(!status.success(), "the child was meant to die at {point}");
}

/// Not a test of its own: the child process of the crash tests (does nothing otherwise).
#[test]
fn crash_child() {
    let (Some(dir), Some(point)) = (
        std::env::var_os("TANDEM_ATOMIC_CRASH_DIR"),
        std::env::var("TANDEM_ATOMIC_CRASH_POINT").ok(),
    ) else {
        return;
    };
    let point = match point.as_str() {
        "torn-in-place" => CrashPoint::TornInPlace,
        "in-place" => CrashPoint::InPlace,
        other => panic!("unknown crash point {other}"),
    };
    runtime().block_on(async {
        let store = BackingStore::open(&image_path(Path::new(&dir)), &options()).unwrap();
        let journal_path = journal_path(&image_path(Path::new(&dir)));
        let (mut journal, _) =
            AtomicJournal::open(&journal_path, &store, IMAGE_BYTES, SLOT_BYTES, &options())
                .await
                .unwrap();
        journal.set_crash_point(point);
        let device = StoreDevice::new(store).with_journal(journal);
        let _ = device.write_atomic(OFFSET_BYTES, Bytes::from(vec![NEW; LENGTH]), false).await;
    });
    unreachable!("the atomic write returned instead of crashing at {point:?}");
}

fn is_all(data: &[u8], value: u8) -> bool {
    data.iter().all(|&b| b == value)
}

#[test]
fn a_crash_after_the_journal_write_with_a_torn_in_place_write_is_replayed_whole() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    crash_at(dir.path(), "torn-in-place");
    let rt = runtime();
    // Without the journal the range is a mix: the crash really tore the write.
    let raw = std::fs::read(image_path(dir.path())).unwrap();
    let start = usize::try_from(OFFSET_BYTES).unwrap();
    let torn = &raw[start..start + LENGTH];
    assert!(torn.contains(&NEW) && torn.contains(&OLD), "the crash did not tear the write");
    rt.block_on(async {
        let (device, recovery) = open(dir.path()).await;
        assert!(matches!(recovery, Recovery::Replayed { sequence: 1, .. }), "{recovery}");
        assert!(is_all(&region(&device).await, NEW));
    });
    // Replayed once and marked applied: the next open has nothing to do.
    rt.block_on(async {
        let (device, recovery) = open(dir.path()).await;
        assert_eq!(recovery, Recovery::Clean);
        assert!(is_all(&region(&device).await, NEW));
    });
}

#[test]
fn a_failed_atomic_write_fences_writes_until_a_restart_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let rt = runtime();
    rt.block_on(async {
        // The image refuses writes (read-only handle), the journal takes them: step 2 fails.
        let read_only = OpenOptions { read_only: true, ..options() };
        let store = BackingStore::open(&image_path(dir.path()), &read_only).unwrap();
        let (device, _) = StoreDevice::new(store).open_journal(&options()).await.unwrap();
        let new = Bytes::from(vec![NEW; LENGTH]);
        assert!(device.write_atomic(OFFSET_BYTES, new.clone(), false).await.is_err());
        for error in [
            device.write_atomic(OFFSET_BYTES, new.clone(), false).await,
            device.write(OFFSET_BYTES, new.clone(), false).await,
            device.write_zeroes(OFFSET_BYTES, 512).await,
            device.unmap(OFFSET_BYTES, 512).await,
        ] {
            let error = error.expect_err("fenced").to_string();
            assert!(error.contains("until a restart replays it"), "{error}");
        }
    });
    rt.block_on(async {
        let (device, recovery) = open(dir.path()).await;
        assert!(matches!(recovery, Recovery::Replayed { .. }), "{recovery}");
        assert!(is_all(&region(&device).await, NEW));
        device.write(OFFSET_BYTES, Bytes::from(vec![OLD; 512]), false).await.unwrap();
    });
}

#[test]
fn the_file_device_advertises_the_journal_size_and_the_default_stays_one_page() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (device, _) = open(dir.path()).await;
        assert_eq!(device.atomic_write_max_bytes(), FILE_ATOMIC_WRITE_BYTES_MAX);
        assert_eq!(device.atomic_write_alignment_bytes(), 512);
        let plain = StoreDevice::new(device.store().clone());
        assert_eq!(plain.atomic_write_max_bytes(), 4096);
    });
}

#[test]
fn concurrent_readers_never_see_an_atomic_write_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let (device, _) = open(dir.path()).await;
        let device = Arc::new(device);
        let lock = Arc::new(tokio::sync::RwLock::new(()));
        let length = u32::try_from(LENGTH).unwrap();
        perform_locked(
            &lock,
            &*device,
            IoOp::Write {
                offset_bytes: OFFSET_BYTES,
                data: Bytes::from(vec![0u8; LENGTH]),
                fua: false,
            },
        )
        .await
        .unwrap();
        let writer = {
            let (device, lock) = (device.clone(), lock.clone());
            tokio::spawn(async move {
                for round in 1..=40u8 {
                    let op = IoOp::AtomicWrite {
                        offset_bytes: OFFSET_BYTES,
                        data: Bytes::from(vec![round; LENGTH]),
                        fua: false,
                    };
                    perform_locked(&lock, &*device, op).await.unwrap();
                }
            })
        };
        let mut readers = Vec::new();
        for _ in 0..3 {
            let (device, lock) = (device.clone(), lock.clone());
            readers.push(tokio::spawn(async move {
                let mut reads = 0;
                loop {
                    let op = IoOp::Read { offset_bytes: OFFSET_BYTES, length_bytes: length };
                    let Ok(IoData::Read(data)) = perform_locked(&lock, &*device, op).await else {
                        panic!("read failed");
                    };
                    assert!(is_all(&data, data[0]), "a read saw a mix after {reads} reads");
                    reads += 1;
                    if data[0] == 40 {
                        return reads;
                    }
                }
            }));
        }
        writer.await.unwrap();
        for reader in readers {
            assert!(reader.await.unwrap() >= 1);
        }
    });
}

/// Latency of a 128 KiB WRITE ATOMIC against plain 128 KiB writes, at the device boundary
/// (the iSCSI path in front is the same for both). Prints medians and 99th percentiles.
#[test]
fn atomic_write_latency() {
    if std::env::var("TANDEM_SLOW_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set TANDEM_SLOW_TESTS=1");
        return;
    }
    const ROUNDS: usize = 300;
    let dir =
        tempfile::tempdir_in(std::env::var_os("TANDEM_BENCH_DIR").unwrap_or(".".into())).unwrap();
    runtime().block_on(async {
        let (device, _) = open(dir.path()).await;
        let data = Bytes::from(vec![NEW; LENGTH]);
        for (what, kind) in [("WRITE", 0), ("WRITE FUA", 1), ("WRITE ATOMIC", 2)] {
            let mut samples_us = Vec::with_capacity(ROUNDS);
            for round in 0..ROUNDS {
                // Different offsets, so the page cache does not absorb rewrites of one range.
                let offset = (round as u64 % 7) * LENGTH as u64;
                let start = std::time::Instant::now();
                match kind {
                    0 => device.write(offset, data.clone(), false).await.unwrap(),
                    1 => device.write(offset, data.clone(), true).await.unwrap(),
                    _ => device.write_atomic(offset, data.clone(), false).await.unwrap(),
                }
                samples_us.push(start.elapsed().as_micros());
            }
            samples_us.sort_unstable();
            eprintln!(
                "{what} 128 KiB: median {} us, p99 {} us ({ROUNDS} writes)",
                samples_us[ROUNDS / 2],
                samples_us[ROUNDS * 99 / 100]
            );
        }
    });
}

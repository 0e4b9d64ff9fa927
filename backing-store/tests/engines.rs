//! One behaviour suite, run against every engine with and without O_DIRECT, with the inline
//! fast path on and off: the engines and paths must be interchangeable. Cases are tables; each
//! table row names what it checks.

use std::path::{Path, PathBuf};

use backing_store::constants::IN_FLIGHT_MAX;
use backing_store::{BackingStore, EngineKind, ErrorKind, OpenOptions};
use bytes::Bytes;

const SIZE_BYTES: u64 = 4 * 1024 * 1024;

/// Every configuration the suite runs under: (engine, O_DIRECT, inline fast path).
const CONFIGURATIONS: [(EngineKind, bool, bool); 8] = [
    (EngineKind::Sync, false, false),
    (EngineKind::Sync, false, true),
    (EngineKind::Sync, true, false),
    (EngineKind::Sync, true, true),
    (EngineKind::Uring, false, false),
    (EngineKind::Uring, false, true),
    (EngineKind::Uring, true, false),
    (EngineKind::Uring, true, true),
];

fn scratch_dir() -> tempfile::TempDir {
    // The target directory sits on a real disk file system (ext4 here), unlike a tmpfs /tmp,
    // so O_DIRECT is really exercised.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("create scratch directory")
}

fn open(path: &Path, engine: EngineKind, direct_io: bool, inline: bool) -> BackingStore {
    let options =
        OpenOptions { engine, direct_io, create_size_bytes: Some(SIZE_BYTES), read_only: false };
    let store = BackingStore::open(path, &options).expect("open backing store");
    assert!(store.is_inline_io(), "the inline fast path is on by default");
    store.set_inline_io(inline);
    assert_eq!(store.is_inline_io(), inline);
    assert_eq!(store.engine(), engine, "engine fell back unexpectedly");
    // The scratch directory is on a disk file system, so O_DIRECT must really be in use.
    assert_eq!(store.is_direct_io(), direct_io, "O_DIRECT fell back unexpectedly");
    assert_eq!(store.size_bytes(), SIZE_BYTES);
    store
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime")
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// Runs `check` once per configuration on a fresh file, naming the configuration on failure.
fn for_each_configuration(check: impl Fn(&BackingStore, &Path, &str)) {
    for (engine, direct_io, inline) in CONFIGURATIONS {
        let directory = scratch_dir();
        let path = directory.path().join("backing.img");
        let store = open(&path, engine, direct_io, inline);
        let label = format!(
            "engine={engine} direct_io={direct_io} inline={inline} (O_DIRECT in use: {})",
            store.is_direct_io()
        );
        check(&store, &path, &label);
        let counters = store.io_counters();
        if !inline {
            assert_eq!(counters.inline_served, 0, "{label}: inline path used while off");
            assert_eq!(counters.inline_fallbacks, 0, "{label}: inline path tried while off");
        }
    }
}

#[test]
fn read_after_write() {
    // (offset, len): aligned, sector-aligned, unaligned, crossing 4 KiB and 1 MiB boundaries,
    // touching the last byte.
    let cases: &[(u64, usize)] = &[
        (0, 4096),
        (8192, 65536),
        (512, 512),
        (1000, 3000),
        (4095, 2),
        (1024 * 1024 - 100, 200),
        (SIZE_BYTES - 4096, 4096),
        (SIZE_BYTES - 1, 1),
        (12288, 1024 * 1024),
    ];
    for_each_configuration(|store, path, label| {
        runtime().block_on(async {
            let mut model = vec![0u8; usize::try_from(SIZE_BYTES).expect("size")];
            for (index, &(offset, len)) in cases.iter().enumerate() {
                let data = pattern(index as u64 + 1, len);
                store.write(offset, data.clone(), false).await.expect("write");
                let start = usize::try_from(offset).expect("offset");
                model[start..start + len].copy_from_slice(&data);
                let read = store.read(offset, len).await.expect("read");
                assert!(read == data, "{label}: read-after-write at {offset}+{len}");
            }
            // The bytes are really in the file, as seen by a plain reader.
            store.flush().await.expect("flush");
            let on_disk = std::fs::read(path).expect("read file");
            assert!(on_disk == model, "{label}: file content differs from the model");
            if store.is_inline_io() && !store.is_direct_io() {
                // Every read above follows a write of the same range, so it is in the page
                // cache: the small ones must have been served inline.
                assert!(store.io_counters().inline_served > 0, "{label}: fast path unused");
            }
        });
    });
}

/// A gathered write lands exactly like its pieces written one by one, whichever path runs it
/// (inline, blocking inline, engine; O_DIRECT stores take it as one aligned copy).
#[test]
fn gathered_write_lands_like_its_pieces() {
    use backing_store::constants::{GATHERED_WRITE_BYTES_MAX, GATHERED_WRITE_PIECES_MAX};
    // (offset, piece lengths): whole pages (the engine's bursts), odd lengths, one piece,
    // the most pieces allowed, the largest size allowed, ending at the last byte.
    let cases: Vec<(u64, Vec<usize>)> = vec![
        (0, vec![4096, 4096, 4096]),
        (65536, vec![4096; GATHERED_WRITE_PIECES_MAX.min(GATHERED_WRITE_BYTES_MAX / 4096)]),
        (1_000_000, vec![100, 7, 4096, 1]),
        (4096, vec![8192]),
        (2 * 1024 * 1024, vec![GATHERED_WRITE_BYTES_MAX / 2, GATHERED_WRITE_BYTES_MAX / 2]),
        (SIZE_BYTES - 8192, vec![4096, 4096]),
    ];
    for_each_configuration(|store, path, label| {
        runtime().block_on(async {
            for blocking in [false, true] {
                // Blocking inline writes as the replication engine runs them (ext4 refuses
                // RWF_NOWAIT writes, so only then does the inline path take writes at all).
                store.set_inline_blocking_writes(blocking);
                store.set_inline_write_backoff_ms(0);
                let mut model = std::fs::read(path).expect("read file");
                for (index, (offset, lengths)) in cases.iter().enumerate() {
                    let pieces: Vec<Bytes> = lengths
                        .iter()
                        .enumerate()
                        .map(|(i, len)| {
                            pattern((index * 100 + i) as u64 + u64::from(blocking), *len)
                        })
                        .collect();
                    let mut at = usize::try_from(*offset).expect("offset");
                    for piece in &pieces {
                        model[at..at + piece.len()].copy_from_slice(piece);
                        at += piece.len();
                    }
                    let served_before = store.io_counters().inline_served;
                    store.write_gathered(*offset, pieces).await.expect("gathered write");
                    let inline_taken = store.io_counters().inline_served > served_before;
                    let aligned = lengths.iter().all(|len| len % 4096 == 0);
                    if blocking && store.is_inline_io() && !store.is_direct_io() && aligned {
                        assert!(inline_taken, "{label}: case {index}: not served inline");
                    }
                }
                store.flush().await.expect("flush");
                let on_disk = std::fs::read(path).expect("read file");
                assert!(on_disk == model, "{label}: blocking={blocking}: content differs");
            }
        });
    });
}

/// A gathered write beyond its limits or the end is refused before any I/O.
#[test]
fn gathered_write_limits_are_refused() {
    use backing_store::constants::{GATHERED_WRITE_BYTES_MAX, GATHERED_WRITE_PIECES_MAX};
    let cases: Vec<(&str, u64, Vec<usize>, ErrorKind)> = vec![
        ("too many pieces", 0, vec![1; GATHERED_WRITE_PIECES_MAX + 1], ErrorKind::InvalidArgument),
        ("too many bytes", 0, vec![GATHERED_WRITE_BYTES_MAX, 4096], ErrorKind::InvalidArgument),
        ("past the end", SIZE_BYTES - 4096, vec![4096, 4096], ErrorKind::OutOfRange),
    ];
    for_each_configuration(|store, path, label| {
        runtime().block_on(async {
            let before = std::fs::read(path).expect("read file");
            for (name, offset, lengths, kind) in &cases {
                let pieces: Vec<Bytes> = lengths.iter().map(|len| pattern(3, *len)).collect();
                let error = store.write_gathered(*offset, pieces).await.expect_err(name);
                assert_eq!(error.kind(), *kind, "{label}: {name}");
            }
            assert!(std::fs::read(path).expect("read file") == before, "{label}: file changed");
            assert_eq!(store.in_flight(), 0, "{label}");
        });
    });
}

#[test]
fn fua_write_and_flush() {
    for_each_configuration(|store, path, label| {
        runtime().block_on(async {
            let data = pattern(7, 8192);
            store.write(4096, data.clone(), true).await.expect("FUA write");
            store.write(1, Bytes::from_static(b"xyz"), true).await.expect("unaligned FUA write");
            store.flush().await.expect("flush");
            let on_disk = std::fs::read(path).expect("read file");
            assert_eq!(&on_disk[4096..4096 + 8192], &data[..], "{label}");
            assert_eq!(&on_disk[1..4], b"xyz", "{label}");
            // An empty FUA write is a flush, not an error.
            store.write(0, Bytes::new(), true).await.expect("empty FUA write");
        });
    });
}

#[test]
fn discard_and_write_zeroes_read_zeroes() {
    // (operation, offset, len)
    let cases: &[(&str, u64, u64)] = &[
        ("discard", 0, 65536),
        ("discard", 70000, 5000),
        ("write_zeroes", 131072, 131072),
        ("write_zeroes", 300001, 7),
        ("discard", SIZE_BYTES - 4096, 4096),
    ];
    for_each_configuration(|store, path, label| {
        runtime().block_on(async {
            let everything = pattern(3, usize::try_from(SIZE_BYTES).expect("size"));
            for chunk_start in (0..SIZE_BYTES).step_by(1 << 20) {
                let start = usize::try_from(chunk_start).expect("offset");
                store
                    .write(chunk_start, everything.slice(start..start + (1 << 20)), false)
                    .await
                    .expect("fill");
            }
            let mut model = everything.to_vec();
            for &(operation, offset, len) in cases {
                match operation {
                    "discard" => store.discard(offset, len).await.expect("discard"),
                    _ => store.write_zeroes(offset, len).await.expect("write_zeroes"),
                }
                let start = usize::try_from(offset).expect("offset");
                let end = start + usize::try_from(len).expect("len");
                model[start..end].fill(0);
                let read = store.read(offset, end - start).await.expect("read");
                assert!(
                    read.iter().all(|byte| *byte == 0),
                    "{label}: {operation} at {offset}+{len}"
                );
            }
            assert_eq!(store.size_bytes(), SIZE_BYTES, "{label}: size kept");
            assert_eq!(std::fs::metadata(path).expect("stat").len(), SIZE_BYTES, "{label}");
            let all = store.read(0, model.len()).await.expect("read all");
            assert!(all[..] == model[..], "{label}: neighbours untouched");
            // The discarded 64 KiB at the start is a hole now (ext4 and xfs punch holes).
            let ranges = store.mapped_ranges(0, 65536 * 2).expect("mapped_ranges");
            assert_eq!(ranges.first(), Some(&(0, 65536, false)), "{label}: {ranges:?}");
        });
    });
}

#[test]
fn mapped_ranges_of_sparse_file() {
    for_each_configuration(|store, _path, label| {
        runtime().block_on(async {
            assert_eq!(
                store.mapped_ranges(0, SIZE_BYTES).expect("ranges"),
                vec![(0, SIZE_BYTES, false)],
                "{label}: a new file is one hole"
            );
            store.write(1 << 20, pattern(1, 65536), false).await.expect("write");
            store.flush().await.expect("flush");
            let ranges = store.mapped_ranges(0, SIZE_BYTES).expect("ranges");
            assert_eq!(
                ranges,
                vec![
                    (0, 1 << 20, false),
                    (1 << 20, 65536, true),
                    ((1 << 20) + 65536, SIZE_BYTES - (1 << 20) - 65536, false)
                ],
                "{label}"
            );
            // A window inside the data.
            assert_eq!(
                store.mapped_ranges((1 << 20) + 4096, 4096).expect("ranges"),
                vec![((1 << 20) + 4096, 4096, true)]
            );
            assert_eq!(store.mapped_ranges(0, 0).expect("ranges"), vec![]);
        });
    });
}

#[test]
fn out_of_range_is_rejected_before_io() {
    for_each_configuration(|store, path, label| {
        runtime().block_on(async {
            let before = std::fs::read(path).expect("read file");
            let tail = SIZE_BYTES - 10;
            let results = [
                ("read past end", store.read(tail, 11).await.map(|_| ())),
                ("read at end", store.read(SIZE_BYTES, 1).await.map(|_| ())),
                ("read overflow", store.read(u64::MAX, 1).await.map(|_| ())),
                ("write past end", store.write(tail, pattern(1, 11), false).await),
                ("write overflow", store.write(u64::MAX - 1, pattern(1, 4), true).await),
                ("discard past end", store.discard(tail, 11).await),
                ("write_zeroes past end", store.write_zeroes(0, SIZE_BYTES + 1).await),
                ("discard overflow", store.discard(u64::MAX, u64::MAX).await),
                ("mapped past end", store.mapped_ranges(tail, 11).map(|_| ())),
            ];
            for (what, result) in results {
                let error = result.expect_err(what);
                assert_eq!(error.kind(), ErrorKind::OutOfRange, "{label}: {what}: {error}");
            }
            assert!(std::fs::read(path).expect("read file") == before, "{label}: file untouched");
            assert_eq!(store.size_bytes(), SIZE_BYTES);
            // Exactly up to the end is fine.
            store.write(tail, pattern(1, 10), false).await.expect("write to the end");
            let too_big = backing_store::constants::IO_SIZE_BYTES_MAX + 1;
            let error = store.read(0, too_big).await.expect_err("oversized read");
            assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{label}");
        });
    });
}

#[test]
fn concurrent_io_up_to_the_bound() {
    for (engine, direct_io, inline) in CONFIGURATIONS {
        let directory = scratch_dir();
        let path = directory.path().join("backing.img");
        let store = open(&path, engine, direct_io, inline);
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("runtime");
        runtime.block_on(async {
            // Twice the bound: the excess must wait, not fail, and the bound must hold.
            let requests = IN_FLIGHT_MAX * 2;
            let block_bytes = 4096;
            let mut tasks = Vec::new();
            let overlap_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for index in 0..requests {
                let store = store.clone();
                let overlap_seen = std::sync::Arc::clone(&overlap_seen);
                tasks.push(tokio::spawn(async move {
                    let offset = u64::try_from(index * block_bytes).expect("offset");
                    store.write(offset, pattern(index as u64, block_bytes), index % 7 == 0).await?;
                    let in_flight = store.in_flight();
                    assert!(in_flight <= IN_FLIGHT_MAX);
                    overlap_seen.fetch_max(in_flight, std::sync::atomic::Ordering::Relaxed);
                    let read = store.read(offset, block_bytes).await?;
                    assert!(read == pattern(index as u64, block_bytes), "block {index}");
                    Ok::<(), backing_store::Error>(())
                }));
            }
            let mut in_flight_max_seen = 0;
            while !tasks.iter().all(|task| task.is_finished()) {
                in_flight_max_seen = in_flight_max_seen.max(store.in_flight());
                tokio::task::yield_now().await;
            }
            for task in tasks {
                task.await.expect("task").expect("I/O");
            }
            assert!(in_flight_max_seen <= IN_FLIGHT_MAX);
            // Seen from inside the tasks: others were still in flight when one completed.
            let overlap = overlap_seen.load(std::sync::atomic::Ordering::Relaxed);
            assert!(overlap >= 1, "engine={engine}: requests never overlapped");
            assert_eq!(store.in_flight(), 0, "engine={engine}: every request released its slot");
        });
    }
}

#[test]
fn dropped_futures_release_their_slots() {
    for (engine, direct_io, inline) in CONFIGURATIONS {
        let directory = scratch_dir();
        let path = directory.path().join("backing.img");
        let store = open(&path, engine, direct_io, inline);
        runtime().block_on(async {
            for index in 0..IN_FLIGHT_MAX * 2 {
                // Start a write and abandon it after the first poll.
                let write = store.write(0, pattern(index as u64, 65536), false);
                tokio::select! {
                    biased;
                    _ = write => {}
                    () = std::future::ready(()) => {}
                }
            }
            // The engine finishes abandoned requests on its own; wait for the slots to return.
            for _ in 0..10_000 {
                if store.in_flight() == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(store.in_flight(), 0, "engine={engine}");
            store.write(0, pattern(1, 4096), false).await.expect("store still works");
        });
        drop(store);
    }
}

#[test]
fn resize_grows_and_shrinks() {
    for_each_configuration(|store, path, label| {
        runtime().block_on(async {
            store.write(SIZE_BYTES - 4096, pattern(9, 4096), false).await.expect("write");
            store.resize(SIZE_BYTES * 2).await.expect("grow");
            assert_eq!(store.size_bytes(), SIZE_BYTES * 2, "{label}");
            assert_eq!(std::fs::metadata(path).expect("stat").len(), SIZE_BYTES * 2);
            assert!(store.read(SIZE_BYTES - 4096, 4096).await.expect("read") == pattern(9, 4096));
            assert!(
                store.read(SIZE_BYTES, 4096).await.expect("read grown").iter().all(|b| *b == 0)
            );
            store.resize(4096).await.expect("shrink");
            let error = store.read(4096, 1).await.expect_err("beyond the new end");
            assert_eq!(error.kind(), ErrorKind::OutOfRange, "{label}");
        });
    });
}

#[test]
fn open_errors_and_read_only() {
    let directory = scratch_dir();
    let missing = directory.path().join("missing.img");
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        let options = OpenOptions { engine, ..OpenOptions::default() };
        let error = BackingStore::open(&missing, &options).expect_err("missing file");
        assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
        let error = BackingStore::open(directory.path(), &options).expect_err("a directory");
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
    }
    let path: PathBuf = directory.path().join("ro.img");
    std::fs::write(&path, vec![5u8; 8192]).expect("write file");
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        // An existing file keeps its size even when a create size is given.
        let options = OpenOptions {
            engine,
            read_only: true,
            create_size_bytes: Some(1 << 30),
            ..OpenOptions::default()
        };
        let store = BackingStore::open(&path, &options).expect("open read-only");
        assert_eq!(store.size_bytes(), 8192);
        runtime().block_on(async {
            assert!(store.read(0, 8192).await.expect("read") == vec![5u8; 8192]);
            let errors = [
                store.write(0, pattern(1, 10), false).await,
                store.flush().await,
                store.discard(0, 4096).await,
                store.write_zeroes(0, 4096).await,
                store.resize(4096).await,
            ];
            for error in errors {
                assert_eq!(error.expect_err("read-only").kind(), ErrorKind::ReadOnly);
            }
        });
    }
    assert!(std::fs::read(&path).expect("read") == vec![5u8; 8192]);
}

#[test]
fn engine_kind_parses_and_prints() {
    for (text, kind) in [
        ("uring", EngineKind::Uring),
        ("sync", EngineKind::Sync),
        ("io_uring", EngineKind::Uring),
        ("SYNC", EngineKind::Sync),
    ] {
        assert_eq!(text.parse::<EngineKind>().expect("parse"), kind);
    }
    assert_eq!(EngineKind::Uring.to_string(), "uring");
    assert_eq!(EngineKind::Sync.to_string(), "sync");
    assert!("aio".parse::<EngineKind>().is_err());
}

/// The futures need no tokio runtime at all (completions arrive through a oneshot): a
/// minimal thread-parking executor drives them.
#[test]
fn futures_run_without_a_tokio_runtime() {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        let mut context = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                return output;
            }
            std::thread::park();
        }
    }

    for (engine, direct_io, inline) in CONFIGURATIONS {
        let directory = scratch_dir();
        let store = open(&directory.path().join("backing.img"), engine, direct_io, inline);
        block_on(store.write(8192, pattern(5, 8192), true)).expect("write");
        assert!(block_on(store.read(8192, 8192)).expect("read") == pattern(5, 8192));
        block_on(store.flush()).expect("flush");
    }
}

/// Drops `[offset, offset + len)` of the file from the page cache (the pages must be clean).
fn evict_from_page_cache(path: &Path, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).expect("open for fadvise");
    let offset = libc::off_t::try_from(offset).expect("offset");
    let len = libc::off_t::try_from(len).expect("len");
    // SAFETY: posix_fadvise takes no pointers; the descriptor is open for the call.
    let result =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(result, 0, "posix_fadvise(DONTNEED) failed");
}

/// A read the page cache cannot serve makes the inline attempt answer EAGAIN; the request must
/// then go to the engine and still return the right bytes.
#[test]
fn page_cache_cold_reads_fall_back_to_the_engine() {
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        let directory = scratch_dir();
        let path = directory.path().join("backing.img");
        let store = open(&path, engine, false, true);
        runtime().block_on(async {
            let data = pattern(11, 1 << 20);
            store.write(1 << 20, data.clone(), false).await.expect("write");
            store.flush().await.expect("flush");
            // (offset within the written MiB, len): aligned, unaligned, the largest inline size.
            let cases: &[(usize, usize)] = &[
                (0, 4096),
                (300_000, 777),
                (512 * 1024, backing_store::constants::INLINE_IO_BYTES_MAX),
            ];
            for &(start, len) in cases {
                let offset = (1 << 20) + u64::try_from(start).expect("offset");
                evict_from_page_cache(&path, 0, SIZE_BYTES);
                let before = store.io_counters();
                let read = store.read(offset, len).await.expect("cold read");
                assert!(read == data.slice(start..start + len), "engine={engine}: {offset}+{len}");
                let after = store.io_counters();
                assert_eq!(
                    after.inline_fallbacks,
                    before.inline_fallbacks + 1,
                    "engine={engine}: the cold read at {offset}+{len} did not fall back"
                );
                assert_eq!(after.engine_served, before.engine_served + 1, "engine={engine}");
                assert_eq!(after.inline_served, before.inline_served, "engine={engine}");
                // The engine's read brought the pages in: the same read is now served inline.
                let again = store.read(offset, len).await.expect("warm read");
                assert!(again == read, "engine={engine}");
                assert_eq!(store.io_counters().inline_served, after.inline_served + 1);
            }
        });
    }
}

/// Whether the scratch directory is on ext4, which refuses RWF_NOWAIT for buffered writes.
fn scratch_is_ext4() -> bool {
    const EXT4_SUPER_MAGIC: libc::__fsword_t = 0xEF53;
    let directory = scratch_dir();
    let path = std::ffi::CString::new(directory.path().as_os_str().as_encoded_bytes())
        .expect("path without NUL");
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut statfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and an exclusively borrowed output buffer, both alive for the call.
    let result = unsafe { libc::statfs(path.as_ptr(), &mut statfs) };
    assert_eq!(result, 0, "statfs failed");
    statfs.f_type == EXT4_SUPER_MAGIC
}

/// What takes the fast path and what never does: FUA writes (RWF_DSYNC waits for the device),
/// requests over INLINE_IO_BYTES_MAX, O_DIRECT-aligned requests, everything but reads and
/// writes; on ext4, writes only with blocking inline writes on, and only whole pages.
#[test]
fn fast_path_eligibility() {
    let inline_max = backing_store::constants::INLINE_IO_BYTES_MAX;
    let nowait_writes = !scratch_is_ext4();
    // (what, direct_io, blocking inline writes, expected to be served inline when warm)
    type Case = (&'static str, bool, bool, bool);
    let cases: &[Case] = &[
        ("small read", false, false, true),
        ("largest inline read", false, false, true),
        ("read over the inline limit", false, false, false),
        ("page write", false, false, nowait_writes),
        ("page write", false, true, true),
        ("largest inline write", false, true, true),
        ("write over the inline limit", false, true, false),
        ("unaligned write", false, true, nowait_writes),
        ("FUA write", false, true, false),
        ("flush", false, true, false),
        ("discard", false, true, false),
        ("aligned O_DIRECT read", true, false, false),
        ("aligned O_DIRECT write", true, true, false),
        ("unaligned read on an O_DIRECT store", true, false, true),
    ];
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        for &(what, direct_io, blocking_writes, expect_inline) in cases {
            let directory = scratch_dir();
            let store = open(&directory.path().join("backing.img"), engine, direct_io, true);
            assert!(!store.is_inline_blocking_writes(), "off by default");
            store.set_inline_blocking_writes(blocking_writes);
            runtime().block_on(async {
                store.write(0, pattern(2, 1 << 20), false).await.expect("fill");
                // Warm the page cache for the buffered descriptor.
                drop(std::fs::read(store.path()).expect("read file"));
                let before = store.io_counters();
                match what {
                    "small read" => drop(store.read(4096, 4096).await.expect("read")),
                    "largest inline read" => drop(store.read(0, inline_max).await.expect("read")),
                    "read over the inline limit" => {
                        drop(store.read(0, inline_max + 4096).await.expect("read"));
                    }
                    "page write" => store.write(8192, pattern(3, 4096), false).await.expect("w"),
                    "largest inline write" => {
                        store.write(0, pattern(3, inline_max), false).await.expect("write");
                    }
                    "write over the inline limit" => {
                        store.write(0, pattern(3, inline_max + 4096), false).await.expect("write");
                    }
                    "unaligned write" => {
                        store.write(100, pattern(3, 4096), false).await.expect("w")
                    }
                    "FUA write" => store.write(0, pattern(3, 4096), true).await.expect("write"),
                    "flush" => store.flush().await.expect("flush"),
                    "discard" => store.discard(0, 4096).await.expect("discard"),
                    "aligned O_DIRECT read" => drop(store.read(8192, 4096).await.expect("read")),
                    "aligned O_DIRECT write" => {
                        store.write(8192, pattern(3, 4096), false).await.expect("write");
                    }
                    _ => drop(store.read(8193, 100).await.expect("read")),
                }
                let after = store.io_counters();
                let served_inline = after.inline_served == before.inline_served + 1;
                let served_by_engine = after.engine_served == before.engine_served + 1;
                assert!(
                    served_inline != served_by_engine,
                    "engine={engine}: {what}: counted once: {before:?} -> {after:?}"
                );
                let label = format!("engine={engine} {what} blocking_writes={blocking_writes}");
                assert_eq!(served_inline, expect_inline, "{label}: {after:?}");
                // Whatever served it, the data is right.
                if what.ends_with("write") {
                    let offset = match what {
                        "page write" | "aligned O_DIRECT write" => 8192,
                        "unaligned write" => 100,
                        _ => 0,
                    };
                    let len = match what {
                        "largest inline write" => inline_max,
                        "write over the inline limit" => inline_max + 4096,
                        _ => 4096,
                    };
                    let read = store.read(offset, len).await.expect("read back");
                    assert!(read == pattern(3, len), "{label}: read back");
                }
            });
        }
    }
}

/// Blocking inline writes keep working through many writes (none is lost or torn), and the
/// counters add up.
#[test]
fn blocking_inline_writes_read_back() {
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        let directory = scratch_dir();
        let path = directory.path().join("backing.img");
        let store = open(&path, engine, false, true);
        store.set_inline_blocking_writes(true);
        runtime().block_on(async {
            let blocks = 256;
            for block in 0..blocks {
                let offset = u64::try_from(block * 4096).expect("offset");
                store.write(offset, pattern(block as u64, 4096), false).await.expect("write");
            }
            store.flush().await.expect("flush");
            let on_disk = std::fs::read(&path).expect("read file");
            for block in 0..blocks {
                let start = block * 4096;
                assert!(
                    on_disk[start..start + 4096] == pattern(block as u64, 4096)[..],
                    "engine={engine}: block {block}"
                );
            }
            let counters = store.io_counters();
            // Every write but possibly the first (which learns that RWF_NOWAIT writes are
            // refused) and any suspended after a stall was inline; the flush was not.
            assert!(
                counters.inline_served + counters.engine_served
                    == u64::try_from(blocks).expect("n") + 1,
                "engine={engine}: {counters:?}"
            );
            assert!(counters.inline_served >= 1, "engine={engine}: {counters:?}");
        });
    }
}

//! Large writes of a buffered store bypass the page cache (O_DIRECT) and large reads of data
//! not in the page cache do too, while small requests keep using it: the two paths must stay
//! coherent in every order. One table of steps, run against both engines with the large-I/O
//! path on and off, checked against an in-memory model, plus what the page cache holds.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use backing_store::constants::LARGE_WRITE_DIRECT_BYTES_MIN;
use backing_store::{BackingStore, EngineKind, OpenOptions};
use bytes::Bytes;

const SIZE_BYTES: u64 = 8 * 1024 * 1024;
const MIB: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug)]
enum Step {
    /// Write `len` bytes of pattern `seed` at `offset`; `misaligned` hands the store memory
    /// that is not aligned for O_DIRECT (it must copy, not fail).
    Write { offset: u64, len: usize, seed: u64, fua: bool, misaligned: bool },
    /// Read and compare with the model.
    Read { offset: u64, len: usize },
    /// With the large-I/O path on, the range must not be in the page cache (it was written
    /// with O_DIRECT); off, it must be.
    Uncached { offset: u64, len: usize },
}
use Step::{Read, Uncached, Write};

fn plain(offset: u64, len: usize, seed: u64) -> Step {
    Write { offset, len, seed, fua: false, misaligned: false }
}

/// Each row: what it checks, and the steps.
fn cases() -> Vec<(&'static str, Vec<Step>)> {
    let large = LARGE_WRITE_DIRECT_BYTES_MIN;
    vec![
        (
            "a large write reads back and leaves the page cache alone",
            vec![plain(0, MIB, 1), Uncached { offset: 0, len: MIB }, Read { offset: 0, len: MIB }],
        ),
        (
            "a small write dirties a page inside a large range; a large read sees it",
            vec![
                plain(0, MIB, 2),
                plain(8192, 4096, 3),
                Read { offset: 0, len: MIB },
                Read { offset: 8192, len: 4096 },
            ],
        ),
        (
            "a large write over cached and dirty pages replaces them for small reads",
            vec![
                plain(MIB as u64, 4096, 4),
                plain(MIB as u64 + 65536, 65536, 5),
                Read { offset: MIB as u64, len: 4096 },
                plain(MIB as u64, MIB, 6),
                Read { offset: MIB as u64, len: 4096 },
                Read { offset: MIB as u64 + 65536, len: 65536 },
                Read { offset: MIB as u64, len: MIB },
            ],
        ),
        (
            "just below the threshold stays buffered, at it goes direct",
            vec![
                plain(2 * MIB as u64, large - 4096, 7),
                plain(3 * MIB as u64, large, 8),
                Uncached { offset: 3 * MIB as u64, len: large },
                Read { offset: 2 * MIB as u64, len: 2 * MIB },
            ],
        ),
        (
            "misaligned memory, FUA, and a range that is not block-aligned",
            vec![
                Write { offset: 4 * MIB as u64, len: MIB, seed: 9, fua: false, misaligned: true },
                Write { offset: 5 * MIB as u64, len: MIB, seed: 10, fua: true, misaligned: false },
                plain(6 * MIB as u64 + 100, MIB, 11),
                Read { offset: 4 * MIB as u64, len: 3 * MIB },
            ],
        ),
    ]
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

/// Pages of the range in the page cache, by cachestat(2) (Linux 6.5+).
fn cached_pages(path: &Path, offset: u64, len: usize) -> u64 {
    #[repr(C)]
    struct Range {
        offset: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let file = File::open(path).expect("open for cachestat");
    let range = Range { offset, len: u64::try_from(len).expect("len") };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live repr(C) values for the whole call; the kernel reads
    // `range` and writes at most `size_of::<Stat>()` bytes to `stat`; flags are 0.
    let result = unsafe {
        libc::syscall(451, file.as_raw_fd(), &raw const range, &raw mut stat, 0 as libc::c_uint)
    };
    assert_eq!(result, 0, "cachestat: {}", std::io::Error::last_os_error());
    stat.nr_cache
}

fn run(engine: EngineKind, large_direct: bool, name: &str, steps: &[Step]) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch directory");
    let path = dir.path().join("store.img");
    let options = OpenOptions {
        engine,
        direct_io: false,
        create_size_bytes: Some(SIZE_BYTES),
        read_only: false,
    };
    let store = BackingStore::open(&path, &options).expect("open");
    assert!(!store.is_direct_io(), "a buffered store");
    // The target directory is on a disk file system, which takes O_DIRECT.
    assert!(store.is_large_writes_direct(), "large writes go direct by default");
    store.set_large_writes_direct(large_direct);
    assert_eq!(store.is_large_writes_direct(), large_direct);
    let mut model = vec![0u8; usize::try_from(SIZE_BYTES).expect("size")];
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(async {
        for (i, step) in steps.iter().enumerate() {
            let at = format!("{name} ({engine}, large direct {large_direct}), step {i}: {step:?}");
            match *step {
                Write { offset, len, seed, fua, misaligned } => {
                    let data = pattern(seed, len);
                    let start = usize::try_from(offset).expect("offset");
                    model[start..start + len].copy_from_slice(&data);
                    let bytes = if misaligned {
                        let mut padded = vec![0u8; len + 1];
                        padded[1..].copy_from_slice(&data);
                        Bytes::from(padded).slice(1..)
                    } else {
                        Bytes::from(data)
                    };
                    store.write(offset, bytes, fua).await.unwrap_or_else(|e| panic!("{at}: {e}"));
                }
                Read { offset, len } => {
                    let data =
                        store.read(offset, len).await.unwrap_or_else(|e| panic!("{at}: {e}"));
                    let start = usize::try_from(offset).expect("offset");
                    assert!(data[..] == model[start..start + len], "{at}: data differs");
                }
                Uncached { offset, len } => {
                    let cached = cached_pages(&path, offset, len);
                    if large_direct {
                        assert_eq!(cached, 0, "{at}: written through the page cache");
                    } else {
                        assert!(cached > 0, "{at}: buffered write not in the page cache");
                    }
                }
            }
        }
        // Everything agrees once more through a fresh buffered descriptor of the whole file.
        store.flush().await.expect("flush");
    });
    let on_disk = std::fs::read(&path).expect("read back");
    assert!(on_disk == model, "{name} ({engine}, large direct {large_direct}): file differs");
}

#[test]
fn large_requests_bypass_the_page_cache_coherently() {
    for (name, steps) in cases() {
        for engine in [EngineKind::Sync, EngineKind::Uring] {
            for large_direct in [true, false] {
                run(engine, large_direct, name, &steps);
            }
        }
    }
}

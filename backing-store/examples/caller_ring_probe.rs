//! Measures the alternative to the inline fast path that README.md ("Inline fast path")
//! weighs: submitting to an io_uring owned by the caller's thread (no ring-thread hop) instead
//! of preadv2/pwritev2 with RWF_NOWAIT. One thread, one request at a time, 4 KiB, buffered,
//! on a page-cached file; prints wall and CPU time per request for each way.
//!
//! Run with: `cargo run --release -p backing-store --example caller_ring_probe -- [DIR]`
//! (default DIR /var/tmp; the file system matters: ext4 refuses RWF_NOWAIT writes).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

const FILE_BYTES: u64 = 64 << 20;
const BLOCK_BYTES: usize = 4096;
const BLOCK_BYTES_U32: u32 = 4096;
const BLOCK_BYTES_ISIZE: isize = 4096;
const BLOCK_BYTES_I32: i32 = 4096;
const REQUESTS: u64 = 100_000;

fn thread_cpu_time() -> Duration {
    // SAFETY: timespec is plain old data; all-zero is a valid value.
    let mut time: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes one timespec through the valid, exclusive pointer.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    assert_eq!(result, 0);
    Duration::new(u64::try_from(time.tv_sec).unwrap_or(0), u32::try_from(time.tv_nsec).unwrap_or(0))
}

fn report(name: &str, run: impl FnOnce() -> u64) {
    let cpu_started = thread_cpu_time();
    let started = Instant::now();
    let served = run();
    let wall = started.elapsed();
    let cpu = thread_cpu_time() - cpu_started;
    let per = |time: Duration| time.as_secs_f64() * 1e6 / REQUESTS as f64;
    println!(
        "{name:<44} wall {:>6.2} us/op  caller-thread cpu {:>6.2} us/op  ({served} of {REQUESTS} done)",
        per(wall),
        per(cpu)
    );
}

fn offset(index: u64) -> u64 {
    (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (FILE_BYTES / BLOCK_BYTES as u64))
        * BLOCK_BYTES as u64
}

fn main() {
    let directory = std::env::args().nth(1).unwrap_or_else(|| "/var/tmp".to_owned());
    let scratch = tempfile::tempdir_in(&directory).expect("scratch directory");
    let path = scratch.path().join("probe.img");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("open");
    std::fs::write(&path, vec![0x5Au8; usize::try_from(FILE_BYTES).expect("size")]).expect("fill");
    // Allocated and clean, like a volume that has been written before: no delayed allocation
    // or writeback of the fill itself in the measurements.
    file.sync_all().expect("fsync");
    let fd = file.as_raw_fd();
    let mut buffer = vec![0u8; BLOCK_BYTES];
    let data = vec![0xA5u8; BLOCK_BYTES];
    println!(
        "file {} ({} MiB, page-cached), {REQUESTS} requests of {BLOCK_BYTES} bytes each",
        path.display(),
        FILE_BYTES >> 20
    );

    report("preadv2(RWF_NOWAIT) read", || {
        let mut served = 0;
        for index in 0..REQUESTS {
            let iovec = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: BLOCK_BYTES };
            let position = libc::off_t::try_from(offset(index)).expect("offset");
            // SAFETY: one iovec over `buffer`, exclusively borrowed for the call.
            let result = unsafe { libc::preadv2(fd, &iovec, 1, position, libc::RWF_NOWAIT) };
            served += u64::from(result == BLOCK_BYTES_ISIZE);
        }
        served
    });
    report("pwritev2(RWF_NOWAIT) write", || {
        let mut served = 0;
        for index in 0..REQUESTS {
            let iovec =
                libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: BLOCK_BYTES };
            let position = libc::off_t::try_from(offset(index)).expect("offset");
            // SAFETY: one iovec over `data`, borrowed for the call; the kernel only reads it.
            let result = unsafe { libc::pwritev2(fd, &iovec, 1, position, libc::RWF_NOWAIT) };
            served += u64::from(result == BLOCK_BYTES_ISIZE);
        }
        served
    });
    report("pwritev2 write (blocking)", || {
        let mut served = 0;
        for index in 0..REQUESTS {
            let iovec =
                libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: BLOCK_BYTES };
            let position = libc::off_t::try_from(offset(index)).expect("offset");
            // SAFETY: as above.
            let result = unsafe { libc::pwritev2(fd, &iovec, 1, position, 0) };
            served += u64::from(result == BLOCK_BYTES_ISIZE);
        }
        served
    });

    let mut ring =
        IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(8).expect("io_uring");
    let mut uring = |write: bool| {
        let mut served = 0;
        for index in 0..REQUESTS {
            let entry = if write {
                opcode::Write::new(types::Fd(fd), data.as_ptr(), BLOCK_BYTES_U32)
                    .offset(offset(index))
                    .build()
            } else {
                opcode::Read::new(types::Fd(fd), buffer.as_mut_ptr(), BLOCK_BYTES_U32)
                    .offset(offset(index))
                    .build()
            };
            // SAFETY: the buffers outlive the request: it completes before the next iteration.
            unsafe { ring.submission().push(&entry) }.expect("queue full");
            ring.submit_and_wait(1).expect("io_uring_enter");
            let cqe: io_uring::cqueue::Entry = ring.completion().next().expect("completion");
            served += u64::from(cqe.result() == BLOCK_BYTES_I32);
        }
        served
    };
    report("io_uring on the caller's thread, read", || uring(false));
    report("io_uring on the caller's thread, write", || uring(true));
}

//! Every limit of the backing-store layer, in one place, with the relations between them
//! checked at compile time.

/// Requests admitted at once per store, counted from admission until the engine completes
/// them (also when the caller dropped the future). This is what bounds the kernel's queue and
/// the memory pinned by buffers in flight.
pub const IN_FLIGHT_MAX: usize = 128;

/// Largest single read or write. Reads allocate their buffer up front, so this bounds the
/// memory one request can pin; iSCSI's largest burst (16 MiB) fits.
pub const IO_SIZE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Largest read or write the inline fast path tries on the caller's thread (preadv2/pwritev2
/// with RWF_NOWAIT, buffered descriptor only) before handing it to the engine. A page-cache
/// copy of this size takes a few microseconds, about what the thread hop it saves costs, so
/// the caller's thread (often the only runtime thread) is never held long; larger requests
/// gain little (the copy dominates) and copy in parallel on the engine's threads instead.
/// Chosen by measurement (README, "Inline fast path").
pub const INLINE_IO_BYTES_MAX: usize = 64 * 1024;

/// Whether a new store does blocking inline writes where the file system refuses RWF_NOWAIT
/// writes (`BackingStore::set_inline_blocking_writes`). Off: they may sleep in the kernel
/// (dirty throttling, journal), and the layer promises callers that it never waits on their
/// thread unless asked to. Measured gain when on, and the trade-off: README "Inline fast path".
pub const INLINE_BLOCKING_WRITES_DEFAULT: bool = false;

/// Alignment (the page size) an inline write needs when it is done blocking because the file
/// system refuses RWF_NOWAIT writes: whole pages never read the old page from the disk first.
pub const INLINE_BLOCKING_WRITE_ALIGNMENT_BYTES: usize = 4096;

/// An inline blocking write that slept in the kernel (e.g. dirty-page throttling, the journal)
/// and took longer than this counts as a stall and suspends inline blocking writes for a
/// while. Preemption alone (a busy machine) does not count: it is not a voluntary switch.
pub const INLINE_WRITE_STALL_US_MAX: u64 = 1_000;

/// How long inline blocking writes stay suspended after a stall: at most one stall of the
/// caller's thread per period, whatever the kernel does.
pub const INLINE_WRITE_BACKOFF_MS: u64 = 1_000;

/// Aligned writes of at least this many bytes to a buffered store go through an O_DIRECT
/// descriptor (when the file system accepts one), smaller writes and all reads through the page
/// cache. Why: a 1 MiB write into the page cache cost its writer about 1 ms of CPU here
/// (`perf`: half of the primary's CPU in `copy_folio_from_iter_atomic` at 1m-write-qd8, and the
/// same again on every replica), while O_DIRECT hands the pages to the device without a copy
/// and writes concurrently under ext4's shared inode lock (buffered writers serialise on it).
/// Small writes keep the page cache: there a copy is cheap and O_DIRECT's wait for the device
/// is not (README, "Large writes bypass the page cache"). The kernel keeps the two paths
/// coherent: an O_DIRECT write writes back and invalidates cached pages of its range.
pub const LARGE_WRITE_DIRECT_BYTES_MIN: usize = 256 * 1024;

/// Whether a new buffered store writes large writes with O_DIRECT
/// (`BackingStore::set_large_writes_direct`).
pub const LARGE_WRITES_DIRECT_DEFAULT: bool = true;

/// Worker threads of the portable engine. More threads than cores still pay because the
/// threads mostly sleep in the kernel waiting for the device; this is the portable engine's
/// effective queue depth.
pub const SYNC_WORKER_THREADS_MAX: usize = 16;

/// Worker threads the io_uring engine keeps for the rare operations it does not put on the
/// ring (resize, and discard/write-zeroes fallbacks when the file system refuses fallocate).
pub const URING_HELPER_THREADS_MAX: usize = 1;

/// Rings (each with its own thread) of one io_uring engine; requests are spread round-robin.
pub const URING_RINGS_MAX: usize = 2;

/// Submission queue entries of each ring: every admitted request (all may land on one ring)
/// plus the always-armed eventfd read that wakes the ring thread.
pub const URING_ENTRIES_MAX: u32 = 256;

/// Memory alignment of every buffer the layer allocates: satisfies O_DIRECT on any device
/// (logical blocks are 512 or 4096 bytes) and keeps reads page-aligned.
pub const BUFFER_ALIGNMENT_BYTES: usize = 4096;

/// Bytes of freed I/O buffers kept for reuse, process-wide (see buffer.rs for why).
pub const BUFFER_POOL_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Chunk of zeroes written when neither fallocate mode is supported (last-resort fallback of
/// discard and write_zeroes).
pub const ZERO_CHUNK_BYTES: usize = 1024 * 1024;

const _: () = assert!(IN_FLIGHT_MAX > 0);
const _: () = assert!(SYNC_WORKER_THREADS_MAX > 0 && SYNC_WORKER_THREADS_MAX <= IN_FLIGHT_MAX);
const _: () = assert!(URING_HELPER_THREADS_MAX > 0);
const _: () = assert!(URING_RINGS_MAX > 0 && URING_RINGS_MAX <= IN_FLIGHT_MAX);
// One SQE per admitted request plus the eventfd read; the completion queue is twice the
// submission queue, so completions can never overflow.
const _: () = assert!(URING_ENTRIES_MAX as usize > IN_FLIGHT_MAX);
const _: () = assert!(URING_ENTRIES_MAX.is_power_of_two());
// A single read/write length must fit in an SQE's u32 length field.
const _: () = assert!(IO_SIZE_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(IO_SIZE_BYTES_MAX.is_multiple_of(BUFFER_ALIGNMENT_BYTES));
const _: () = assert!(BUFFER_ALIGNMENT_BYTES.is_power_of_two());
const _: () = assert!(IO_SIZE_BYTES_MAX.is_power_of_two());
const _: () = assert!(BUFFER_POOL_BYTES_MAX >= IO_SIZE_BYTES_MAX);
const _: () = assert!(ZERO_CHUNK_BYTES.is_multiple_of(BUFFER_ALIGNMENT_BYTES));
const _: () = assert!(ZERO_CHUNK_BYTES <= IO_SIZE_BYTES_MAX);
const _: () = assert!(INLINE_IO_BYTES_MAX > 0 && INLINE_IO_BYTES_MAX <= IO_SIZE_BYTES_MAX);
// The inline path only takes buffered writes: none of its writes may count as large.
const _: () = assert!(INLINE_IO_BYTES_MAX < LARGE_WRITE_DIRECT_BYTES_MIN);
const _: () = assert!(LARGE_WRITE_DIRECT_BYTES_MIN.is_multiple_of(BUFFER_ALIGNMENT_BYTES));
const _: () = assert!(LARGE_WRITE_DIRECT_BYTES_MIN <= IO_SIZE_BYTES_MAX);
// Inline reads take their buffers from the same pool as the engines' reads.
const _: () = assert!(INLINE_IO_BYTES_MAX.is_multiple_of(BUFFER_ALIGNMENT_BYTES));
const _: () = assert!(INLINE_BLOCKING_WRITE_ALIGNMENT_BYTES.is_power_of_two());
const _: () = assert!(INLINE_IO_BYTES_MAX.is_multiple_of(INLINE_BLOCKING_WRITE_ALIGNMENT_BYTES));
// The back-off period is long against one stall, so stalls stay a small share of the time.
const _: () = assert!(INLINE_WRITE_BACKOFF_MS * 1000 >= 100 * INLINE_WRITE_STALL_US_MAX);

//! The inline fast path: small buffered reads and writes tried on the caller's thread with
//! preadv2/pwritev2(RWF_NOWAIT) before any engine sees them.
//!
//! Why: a 4 KiB page-cache read or write costs the kernel a few microseconds, while handing it
//! to an engine thread and back (queue, futex or eventfd wake, oneshot wake of the caller's
//! runtime) cost about as much again in CPU and more in latency. RWF_NOWAIT makes the attempt
//! safe for an async caller: the kernel answers EAGAIN instead of waiting for the disk (data
//! not cached, a write that would wait for locks, allocation or writeback), and the request
//! then goes to the engine unchanged. A request is only ever re-run whole: re-reading or
//! re-writing the same bytes at the same offset while the request is still in flight is
//! harmless, so no partial state leaks from a failed attempt into the engine's run.
//!
//! What stays off this path: O_DIRECT (it always waits for the device), FUA writes (RWF_DSYNC
//! waits for the device by definition), requests over `INLINE_IO_BYTES_MAX`, and everything
//! but reads and writes. A file system that refuses RWF_NOWAIT for reads or for writes
//! (EOPNOTSUPP: buffered writes on ext4 and everything on tmpfs, on this 6.18 kernel) is
//! remembered per store, so it costs one failed system call, not one per request.
//!
//! Blocking inline writes (opt-in, `BackingStore::set_inline_blocking_writes`): where the file
//! system refuses RWF_NOWAIT writes (ext4), small page-aligned non-FUA writes are done with a
//! plain pwritev2 on the caller's thread. A page-cache write normally returns in microseconds
//! without touching the disk, but it can wait (dirty-page throttling, the journal, memory
//! reclaim), so this breaks the "never waits" rule above in exchange for removing the thread
//! hop from every write. The damage is bounded: a write that slept in the kernel longer than
//! `INLINE_WRITE_STALL_US_MAX` suspends blocking writes for `INLINE_WRITE_BACKOFF_MS`, so
//! the caller's thread stalls at most once per period.
//!
//! The path decides and runs; it never completes anything itself: `BackingStore::execute`
//! completes an inline result through the same `Completion` an engine would use.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::constants::{
    INLINE_BLOCKING_WRITE_ALIGNMENT_BYTES, INLINE_BLOCKING_WRITES_DEFAULT, INLINE_IO_BYTES_MAX,
    INLINE_WRITE_BACKOFF_MS, INLINE_WRITE_STALL_US_MAX,
};
use crate::file::u64_from;
use crate::file::{BackingFile, Stop};
use crate::request::{Operation, OperationResult, Output};

/// How many requests were served where, since the store was opened. Requests rejected before
/// any I/O (out of range, read-only, oversized) and zero-length ones are not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct IoCounters {
    /// Completed on the caller's thread by the inline fast path (successes and failures).
    pub inline_served: u64,
    /// Handed to the engine, including the inline attempts that would have blocked.
    pub engine_served: u64,
    /// Inline attempts that would have blocked (EAGAIN, e.g. a read not in the page cache) and
    /// went to the engine; a subset of `engine_served`.
    pub inline_fallbacks: u64,
    /// Blocking inline writes that slept in the kernel for longer than
    /// `INLINE_WRITE_STALL_US_MAX` (each suspended blocking
    /// writes for `INLINE_WRITE_BACKOFF_MS`); a subset of `inline_served`. Not measured, so
    /// not counted, while the back-off is 0 (`BackingStore::set_inline_write_backoff_ms`).
    pub inline_write_stalls: u64,
}

/// What the fast path did with a request.
pub(crate) enum Attempt {
    /// Ran inline; complete the request with this result.
    Served(OperationResult),
    /// Not for the fast path, or it would have blocked: give it to the engine.
    Declined(Operation),
}

#[derive(Debug)]
pub(crate) struct InlinePath {
    enabled: AtomicBool,
    /// Cleared the first time the file system answers EOPNOTSUPP to RWF_NOWAIT.
    reads_supported: AtomicBool,
    writes_supported: AtomicBool,
    /// Blocking inline writes asked for (used only where RWF_NOWAIT writes are refused).
    blocking_writes: AtomicBool,
    /// Nanoseconds after `created` until which blocking inline writes are suspended.
    blocking_suspended_until_ns: AtomicU64,
    /// How long a stall suspends blocking inline writes (0: never suspended).
    backoff_ms: AtomicU64,
    created: Instant,
    inline_served: AtomicU64,
    engine_served: AtomicU64,
    inline_fallbacks: AtomicU64,
    inline_write_stalls: AtomicU64,
}

impl InlinePath {
    pub(crate) fn new(enabled: bool) -> InlinePath {
        InlinePath {
            enabled: AtomicBool::new(enabled),
            reads_supported: AtomicBool::new(true),
            writes_supported: AtomicBool::new(true),
            blocking_writes: AtomicBool::new(INLINE_BLOCKING_WRITES_DEFAULT),
            blocking_suspended_until_ns: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(INLINE_WRITE_BACKOFF_MS),
            created: Instant::now(),
            inline_served: AtomicU64::new(0),
            engine_served: AtomicU64::new(0),
            inline_fallbacks: AtomicU64::new(0),
            inline_write_stalls: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_blocking_writes(&self, enabled: bool) {
        self.blocking_writes.store(enabled, Ordering::Relaxed);
    }

    pub(crate) fn set_backoff_ms(&self, backoff_ms: u64) {
        self.backoff_ms.store(backoff_ms, Ordering::Relaxed);
    }

    pub(crate) fn is_blocking_writes(&self) -> bool {
        self.blocking_writes.load(Ordering::Relaxed)
    }

    pub(crate) fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub(crate) fn counters(&self) -> IoCounters {
        IoCounters {
            inline_served: self.inline_served.load(Ordering::Relaxed),
            engine_served: self.engine_served.load(Ordering::Relaxed),
            inline_fallbacks: self.inline_fallbacks.load(Ordering::Relaxed),
            inline_write_stalls: self.inline_write_stalls.load(Ordering::Relaxed),
        }
    }

    /// Counts a request handed to the engine (called once per submitted request).
    pub(crate) fn count_engine(&self) {
        self.engine_served.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `operation` inline when it qualifies and the kernel can do it without waiting.
    pub(crate) fn attempt(&self, file: &BackingFile, operation: Operation) -> Attempt {
        if !self.is_enabled() {
            return Attempt::Declined(operation);
        }
        let stop = match &operation {
            Operation::Read { offset, len } => {
                let (offset, len) = (*offset, *len);
                if len > INLINE_IO_BYTES_MAX
                    || !file.read_uses_buffered(offset, len)
                    || !self.reads_supported.load(Ordering::Relaxed)
                {
                    return Attempt::Declined(operation);
                }
                match file.read_nowait(offset, len) {
                    Ok(data) => return self.served(Ok(Output::Data(data))),
                    Err(stop) => stop,
                }
            }
            Operation::Write { offset, data, fua } => {
                if *fua
                    || data.len() > INLINE_IO_BYTES_MAX
                    || !file.write_uses_buffered(*offset, data.len())
                {
                    return Attempt::Declined(operation);
                }
                if !self.writes_supported.load(Ordering::Relaxed) {
                    if !self.blocking_write_allowed(*offset, data.len()) {
                        return Attempt::Declined(operation);
                    }
                    let result = self.write_blocking(file, *offset, data);
                    return self.served(result.map(|()| Output::Done));
                }
                match file.write_nowait(*offset, data) {
                    Ok(()) => return self.served(Ok(Output::Done)),
                    Err(stop) => stop,
                }
            }
            Operation::Flush
            | Operation::Discard { .. }
            | Operation::WriteZeroes { .. }
            | Operation::Resize { .. } => return Attempt::Declined(operation),
        };
        match stop {
            Stop::Failed(error) => self.served(Err(error)),
            Stop::WouldBlock => {
                self.inline_fallbacks.fetch_add(1, Ordering::Relaxed);
                Attempt::Declined(operation)
            }
            Stop::NoWaitUnsupported => {
                let (supported, kind) = match operation {
                    Operation::Read { .. } => (&self.reads_supported, "reads"),
                    _ => (&self.writes_supported, "writes"),
                };
                if supported.swap(false, Ordering::Relaxed) {
                    tracing::debug!(
                        path = %file.path().display(),
                        "the file system refuses RWF_NOWAIT for buffered {kind}; they go to the \
                         engine (or, when enabled, are written blocking) from now on"
                    );
                }
                if let Operation::Write { offset, data, .. } = &operation
                    && self.blocking_write_allowed(*offset, data.len())
                {
                    let result = self.write_blocking(file, *offset, data);
                    return self.served(result.map(|()| Output::Done));
                }
                Attempt::Declined(operation)
            }
        }
    }

    /// Whether a write may be done blocking inline now: asked for, whole pages, not suspended.
    fn blocking_write_allowed(&self, offset: u64, len: usize) -> bool {
        let alignment = INLINE_BLOCKING_WRITE_ALIGNMENT_BYTES;
        self.is_blocking_writes()
            && offset.is_multiple_of(u64_from(alignment))
            && len.is_multiple_of(alignment)
            && self.elapsed_ns() >= self.blocking_suspended_until_ns.load(Ordering::Relaxed)
    }

    fn write_blocking(
        &self,
        file: &BackingFile,
        offset: u64,
        data: &[u8],
    ) -> Result<(), crate::error::Error> {
        let backoff_ms = self.backoff_ms.load(Ordering::Relaxed);
        if backoff_ms == 0 {
            // Nothing would be suspended, so nothing to measure: the two getrusage calls were
            // 2 of the primary's ~9 system calls per replicated 4 KiB write (strace -c).
            return file.write_buffered_blocking(offset, data);
        }
        let started = Instant::now();
        let sleeps_before = voluntary_context_switches();
        let result = file.write_buffered_blocking(offset, data);
        let took = started.elapsed();
        // A stall is a write that slept in the kernel (a voluntary context switch: throttling,
        // journal, locks, reclaim) for long. Merely being preempted on a busy machine is not
        // the write's doing and does not count.
        let slept = match (sleeps_before, voluntary_context_switches()) {
            (Some(before), Some(after)) => after != before,
            // Cannot tell: a slow write then counts as a stall.
            _ => true,
        };
        if took > Duration::from_micros(INLINE_WRITE_STALL_US_MAX) && slept {
            self.inline_write_stalls.fetch_add(1, Ordering::Relaxed);
            let until = self.elapsed_ns().saturating_add(backoff_ms.saturating_mul(1_000_000));
            self.blocking_suspended_until_ns.fetch_max(until, Ordering::Relaxed);
            tracing::debug!(
                path = %file.path().display(),
                took_us = took.as_micros(),
                backoff_ms,
                "an inline write waited in the kernel; writes go to the engine for a while"
            );
        }
        result
    }

    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn served(&self, result: OperationResult) -> Attempt {
        self.inline_served.fetch_add(1, Ordering::Relaxed);
        Attempt::Served(result)
    }
}

/// Voluntary context switches of the calling thread so far (it slept in the kernel that often).
fn voluntary_context_switches() -> Option<i64> {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage through the valid, exclusively borrowed pointer.
    let result = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (result == 0).then_some(usage.ru_nvcsw)
}

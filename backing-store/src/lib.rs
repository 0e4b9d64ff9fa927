//! The backing-store layer: the only place in Tandem that performs block I/O on backing files
//! or block devices.
//!
//! Architecture Invariant: every request goes through one trait (`engine::Engine::submit`) and
//! ends through one path (`request::Completion::complete`, a oneshot per request), whichever
//! engine runs it: io_uring on a ring thread, or pread/pwrite on worker threads. The futures
//! therefore work on any tokio runtime. At most `constants::IN_FLIGHT_MAX` requests are admitted
//! at once per store; a request keeps its slot until the engine is done with it, even if the
//! caller dropped the future.
//!
//! Inline fast path (`inline.rs`): before a request reaches the engine, small buffered reads
//! and non-FUA writes (up to `constants::INLINE_IO_BYTES_MAX`) are tried on the caller's
//! thread with preadv2/pwritev2(RWF_NOWAIT). The kernel does them only when it can without
//! waiting (page-cache hits; writes where the file system supports it), so the caller's
//! runtime thread never waits for the disk; otherwise (EAGAIN) the request goes to the engine
//! unchanged. This saves the thread hop and both wake-ups, which were about half of the CPU of
//! a 4 KiB request. An inline request holds an in-flight slot and ends through the same
//! `Completion::complete` as an engine's, so the invariant above holds for both paths.
//! `BackingStore::set_inline_io` turns it off; `io_counters` says which path served what.
//! ext4 refuses RWF_NOWAIT for buffered writes, so there only reads take the fast path unless
//! `set_inline_blocking_writes` (off by default) lets small page-aligned writes block on the
//! caller's thread, suspended for a while after any write that slept in the kernel.
//!
//! Requests are checked (range, size, read-only) before they are built, so a rejected request
//! never touches the file.

pub mod atomic_journal;
mod buffer;
pub mod constants;
mod engine;
mod error;
mod file;
mod inline;
mod options;
mod request;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

pub use crate::error::{Error, ErrorKind};
pub use crate::inline::IoCounters;
pub use crate::options::{EngineKind, OpenOptions, ParseEngineKindError};

use crate::constants::{IN_FLIGHT_MAX, SYNC_WORKER_THREADS_MAX};
use crate::engine::Engine;
use crate::engine::sync::SyncEngine;
use crate::engine::uring::UringEngine;
use crate::file::{BackingFile, u64_from};
use crate::inline::{Attempt, InlinePath};
use crate::request::{Completion, Operation, Output, Request};

/// An open backing file or block device. Cheap to clone; all clones share one engine. The
/// engine's threads stop when the last clone is dropped (after finishing what is in flight).
#[derive(Clone)]
pub struct BackingStore {
    inner: Arc<Inner>,
}

struct Inner {
    // Declared first so the engine is dropped (joined) before the file is closed.
    engine: Box<dyn Engine>,
    file: Arc<BackingFile>,
    permits: Arc<Semaphore>,
    inline: InlinePath,
}

// Callers share one store between tasks and threads; keep that true at compile time.
const _: fn() = || {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<BackingStore>();
};

impl fmt::Debug for BackingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackingStore")
            .field("path", &self.inner.file.path())
            .field("engine", &self.inner.engine.kind())
            .field("direct_io", &self.inner.file.is_direct())
            .field("inline_io", &self.inner.inline.is_enabled())
            .field("size_bytes", &self.size_bytes())
            .finish()
    }
}

impl BackingStore {
    /// Opens (and, with `create_size_bytes`, creates as a sparse file) a backing file or block
    /// device. If io_uring is asked for but the kernel refuses it, the sync engine is used and
    /// a warning says why; `engine()` tells which one runs.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<BackingStore, Error> {
        let file = Arc::new(BackingFile::open(path, options)?);
        let spawn_error = |error: std::io::Error| {
            Error::io(format!("cannot start the I/O engine for {}", path.display()), error)
        };
        let engine: Box<dyn Engine> = match options.engine {
            EngineKind::Uring => match UringEngine::new(Arc::clone(&file)) {
                Ok(engine) => Box::new(engine),
                Err(error) => {
                    tracing::warn!(
                        path = %path.display(),
                        %error,
                        "io_uring is unavailable; falling back to the sync engine"
                    );
                    Box::new(
                        SyncEngine::new(Arc::clone(&file), SYNC_WORKER_THREADS_MAX)
                            .map_err(spawn_error)?,
                    )
                }
            },
            EngineKind::Sync => Box::new(
                SyncEngine::new(Arc::clone(&file), SYNC_WORKER_THREADS_MAX).map_err(spawn_error)?,
            ),
        };
        let permits = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
        // On by default: measured to cut CPU per I/O and QD1 latency (README, "Inline fast
        // path"); it only ever applies to buffered requests.
        let inline = InlinePath::new(true);
        Ok(BackingStore { inner: Arc::new(Inner { engine, file, permits, inline }) })
    }

    pub fn path(&self) -> &Path {
        self.inner.file.path()
    }

    /// The engine actually running (io_uring may have fallen back to sync).
    pub fn engine(&self) -> EngineKind {
        self.inner.engine.kind()
    }

    /// Whether O_DIRECT is in use (asked for and accepted by the file system).
    pub fn is_direct_io(&self) -> bool {
        self.inner.file.is_direct()
    }

    /// Turns on (the default, `constants::LARGE_WRITES_DIRECT_DEFAULT`) or off the O_DIRECT
    /// path of a buffered store for aligned writes of at least
    /// `constants::LARGE_WRITE_DIRECT_BYTES_MIN`; no effect where O_DIRECT is refused or was
    /// asked for (then every aligned request uses it).
    pub fn set_large_writes_direct(&self, enabled: bool) {
        self.inner.file.set_large_writes_direct(enabled);
    }

    /// Whether large aligned writes bypass the page cache now.
    pub fn is_large_writes_direct(&self) -> bool {
        self.inner.file.is_large_writes_direct()
    }

    pub fn is_block_device(&self) -> bool {
        self.inner.file.is_block_device()
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.file.is_read_only()
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner.file.size_bytes()
    }

    /// Turns the inline fast path on (the default) or off for this store and all its clones;
    /// requests already running are not affected. Off, every request goes to the engine.
    pub fn set_inline_io(&self, enabled: bool) {
        self.inner.inline.set_enabled(enabled);
    }

    /// Whether the inline fast path is on (it still only serves buffered requests).
    pub fn is_inline_io(&self) -> bool {
        self.inner.inline.is_enabled()
    }

    /// Where the file system refuses RWF_NOWAIT for buffered writes (ext4, tmpfs), do small
    /// page-aligned non-FUA writes with a plain blocking pwritev2 on the caller's thread
    /// (off by default). Removes the thread hop from every such write, but the caller's thread
    /// may then wait in the kernel (dirty throttling, journal); a stall suspends it for
    /// `constants::INLINE_WRITE_BACKOFF_MS`. Needs the inline fast path on.
    pub fn set_inline_blocking_writes(&self, enabled: bool) {
        self.inner.inline.set_blocking_writes(enabled);
    }

    /// How long a blocking inline write that stalled suspends blocking inline writes
    /// (default `constants::INLINE_WRITE_BACKOFF_MS`; 0: never). A caller whose thread does
    /// nothing but this store's I/O (the replication engine) gains nothing from the back-off:
    /// the stall is a lock the file system holds (ext4 allocating blocks for writeback), which
    /// the engine's threads would wait for too, at the price of two thread hops per write.
    /// With 0 the writes are not timed at all (no stalls counted in `io_counters`).
    pub fn set_inline_write_backoff_ms(&self, backoff_ms: u64) {
        self.inner.inline.set_backoff_ms(backoff_ms);
    }

    pub fn is_inline_blocking_writes(&self) -> bool {
        self.inner.inline.is_blocking_writes()
    }

    /// Requests served inline and by the engine so far (for tests and metrics).
    pub fn io_counters(&self) -> IoCounters {
        self.inner.inline.counters()
    }

    /// Requests admitted and not yet completed (at most `IN_FLIGHT_MAX`).
    pub fn in_flight(&self) -> usize {
        IN_FLIGHT_MAX - self.inner.permits.available_permits()
    }

    /// Reads `len` bytes at `offset`. Holes read as zeroes.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, Error> {
        let file = &self.inner.file;
        file.check_io_size("read", len)?;
        file.check_range("read", offset, u64_from(len))?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        match self.execute(Operation::Read { offset, len }).await? {
            Output::Data(data) => {
                assert_eq!(data.len(), len, "engine returned a short read");
                Ok(data)
            }
            Output::Done => panic!("engine answered a read without data"),
        }
    }

    /// Writes `data` at `offset`; with `fua`, the data is on stable storage when this returns
    /// (RWF_DSYNC), without flushing anything else.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Error> {
        let file = &self.inner.file;
        file.check_writable("write")?;
        file.check_io_size("write", data.len())?;
        file.check_range("write", offset, u64_from(data.len()))?;
        if data.is_empty() {
            return if fua { self.flush().await } else { Ok(()) };
        }
        self.execute_done(Operation::Write { offset, data, fua }).await
    }

    /// Makes every completed write durable (fdatasync, which also flushes the device cache).
    pub async fn flush(&self) -> Result<(), Error> {
        self.inner.file.check_writable("flush")?;
        self.execute_done(Operation::Flush).await
    }

    /// Deallocates the range when the file system can (punch hole), keeping the size; the range
    /// reads as zeroes afterwards either way.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        let file = &self.inner.file;
        file.check_writable("discard")?;
        file.check_range("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.execute_done(Operation::Discard { offset, len }).await
    }

    /// Zeroes the range, keeping it allocated when the file system can (zero range).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        let file = &self.inner.file;
        file.check_writable("write_zeroes")?;
        file.check_range("write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.execute_done(Operation::WriteZeroes { offset, len }).await
    }

    /// Extents of `[offset, offset + len)` as `(offset, length, mapped)`, adjacent extents of the
    /// same kind merged, from SEEK_DATA/SEEK_HOLE. Without them (block devices, some file
    /// systems) the whole range is reported mapped. Ranges written with `write_zeroes` may show
    /// as unmapped on file systems that report unwritten extents as holes (ext4, xfs).
    pub fn mapped_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>, Error> {
        self.inner.file.mapped_ranges(offset, len)
    }

    /// Grows or shrinks a regular file (ftruncate). Block devices answer `Unsupported` unless
    /// the size is unchanged. The caller must not have I/O in flight beyond a shrinking end.
    pub async fn resize(&self, new_size_bytes: u64) -> Result<(), Error> {
        self.inner.file.check_writable("resize")?;
        self.execute_done(Operation::Resize { size_bytes: new_size_bytes }).await
    }

    async fn execute_done(&self, operation: Operation) -> Result<(), Error> {
        match self.execute(operation).await? {
            Output::Done => Ok(()),
            Output::Data(_) => panic!("engine returned data for a request without any"),
        }
    }

    async fn execute(&self, operation: Operation) -> Result<Output, Error> {
        let name = operation.name();
        let permit = Arc::clone(&self.inner.permits).acquire_owned().await.map_err(|_| {
            Error::new(ErrorKind::EngineStopped, format!("{name}: the store is shutting down"))
        })?;
        let (completion, receiver) = Completion::new(permit);
        // Both paths end in `completion.complete`: an inline result is delivered through the
        // oneshot exactly like an engine's (the receiver is then ready at its first poll).
        match self.inner.inline.attempt(&self.inner.file, operation) {
            Attempt::Served(result) => completion.complete(result),
            Attempt::Declined(operation) => {
                self.inner.inline.count_engine();
                self.inner.engine.submit(Request { operation, completion });
            }
        }
        receiver.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::EngineStopped,
                format!("{name} on {}: the I/O engine stopped", self.path().display()),
            ))
        })
    }
}

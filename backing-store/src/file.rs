//! The backing file or block device: how it is opened (buffered and, when asked and possible,
//! O_DIRECT), its size, range checks, and the blocking implementation of every operation that
//! the portable engine runs and the io_uring engine falls back to.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;

use crate::buffer::{AlignedBuffer, is_aligned};
use crate::constants::{
    BUFFER_ALIGNMENT_BYTES, IO_SIZE_BYTES_MAX, LARGE_WRITE_DIRECT_BYTES_MIN,
    LARGE_WRITES_DIRECT_DEFAULT, ZERO_CHUNK_BYTES,
};
use crate::error::{Error, ErrorKind};
use crate::options::OpenOptions;
use crate::request::{Operation, OperationResult, Output};

/// Which zeroing request a fallocate chain serves; they try the two modes in opposite order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroingKind {
    /// Deallocate if possible (thin provisioning), else zero.
    Discard,
    /// Zero, keeping the space allocated if possible, else deallocate.
    WriteZeroes,
}

impl ZeroingKind {
    /// fallocate modes to try in order; after both fail as unsupported, zeroes are written.
    pub(crate) fn fallocate_modes(self) -> [i32; 2] {
        let punch_hole = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match self {
            ZeroingKind::Discard => [punch_hole, zero_range],
            ZeroingKind::WriteZeroes => [zero_range, punch_hole],
        }
    }

    pub(crate) fn operation(self, offset: u64, len: u64) -> Operation {
        match self {
            ZeroingKind::Discard => Operation::Discard { offset, len },
            ZeroingKind::WriteZeroes => Operation::WriteZeroes { offset, len },
        }
    }
}

/// errnos after which a fallocate mode is treated as unsupported and the next one is tried.
/// Block devices answer EINVAL for ranges not aligned to their logical block size.
pub(crate) fn is_fallocate_unsupported(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
}

/// Data of a write as it goes to the kernel: the caller's bytes, or an aligned copy when
/// O_DIRECT needs one.
#[derive(Debug)]
pub(crate) enum WriteData {
    Shared(Bytes),
    Aligned(AlignedBuffer),
}

impl WriteData {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            WriteData::Shared(bytes) => bytes,
            WriteData::Aligned(buffer) => buffer.as_ref(),
        }
    }
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuffer({} bytes)", self.len())
    }
}

/// Why a read or write stopped before transferring everything.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The request failed; the same error whichever path ran it.
    Failed(Error),
    /// RWF_NOWAIT: the data is not in the page cache, or the write would have to wait.
    WouldBlock,
    /// RWF_NOWAIT is refused by this file system for this kind of request.
    NoWaitUnsupported,
}

impl Stop {
    /// For transfers without RWF_NOWAIT, which can only fail.
    fn into_error(self) -> Error {
        match self {
            Stop::Failed(error) => error,
            Stop::WouldBlock | Stop::NoWaitUnsupported => {
                panic!("a blocking transfer reported {self:?}")
            }
        }
    }
}

/// O_DIRECT constraints of the open file.
#[derive(Debug, Clone, Copy)]
struct DirectAlignment {
    offset_bytes: usize,
    memory_bytes: usize,
}

/// What the O_DIRECT descriptor serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirectScope {
    /// O_DIRECT was asked for: every aligned read and write.
    All,
    /// A buffered store: aligned writes of at least `LARGE_WRITE_DIRECT_BYTES_MIN` only
    /// (see the constant for why), while `large_writes_direct` is on.
    LargeWrites,
}

#[derive(Debug)]
pub(crate) struct BackingFile {
    path: PathBuf,
    /// Always present: used for everything O_DIRECT cannot take (unaligned I/O, fallocate).
    buffered: File,
    /// Present when the file system accepts O_DIRECT and it was asked for (`DirectScope::All`)
    /// or the store is buffered (`DirectScope::LargeWrites`).
    direct: Option<(File, DirectAlignment)>,
    direct_scope: DirectScope,
    /// Large aligned writes of a buffered store go through `direct` (`DirectScope::LargeWrites`).
    large_writes_direct: AtomicBool,
    is_block_device: bool,
    read_only: bool,
    size_bytes: AtomicU64,
}

impl BackingFile {
    pub(crate) fn open(path: &Path, options: &OpenOptions) -> Result<BackingFile, Error> {
        let shown = path.display();
        let created = match (fs::metadata(path), options.create_size_bytes) {
            (Err(error), Some(size_bytes)) if error.kind() == io::ErrorKind::NotFound => {
                if options.read_only {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("cannot create {shown}: the store is opened read-only"),
                    ));
                }
                create_sparse(path, size_bytes)?
            }
            (Err(error), _) => return Err(Error::io(format!("cannot stat {shown}"), error)),
            (Ok(metadata), _) if metadata.is_dir() => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{shown} is a directory, not a regular file or block device"),
                ));
            }
            (Ok(_), _) => false,
        };
        let buffered = fs::OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(path)
            .map_err(|error| Error::io(format!("cannot open {shown}"), error))?;
        let metadata = buffered
            .metadata()
            .map_err(|error| Error::io(format!("cannot stat {shown}"), error))?;
        let is_block_device = metadata.file_type().is_block_device();
        if !is_block_device && !metadata.file_type().is_file() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{shown} is neither a regular file nor a block device"),
            ));
        }
        let size_bytes = if is_block_device {
            // A block device's size is where SEEK_END lands; its inode says 0.
            (&buffered)
                .seek(SeekFrom::End(0))
                .map_err(|error| Error::io(format!("cannot size {shown}"), error))?
        } else {
            metadata.len()
        };
        let (direct, direct_scope) = if options.direct_io {
            (
                open_direct(path, options.read_only, is_block_device, &buffered, true),
                DirectScope::All,
            )
        } else if options.read_only {
            (None, DirectScope::LargeWrites)
        } else {
            // Quietly: a buffered store without O_DIRECT is what was asked for.
            (open_direct(path, false, is_block_device, &buffered, false), DirectScope::LargeWrites)
        };
        tracing::debug!(
            path = %shown,
            size_bytes,
            created,
            is_block_device,
            direct_io = direct.is_some() && direct_scope == DirectScope::All,
            large_writes_direct = direct.is_some() && direct_scope == DirectScope::LargeWrites,
            "opened backing store"
        );
        Ok(BackingFile {
            path: path.to_owned(),
            buffered,
            direct,
            direct_scope,
            large_writes_direct: AtomicBool::new(LARGE_WRITES_DIRECT_DEFAULT),
            is_block_device,
            read_only: options.read_only,
            size_bytes: AtomicU64::new(size_bytes),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Whether O_DIRECT serves every aligned request (asked for and accepted).
    pub(crate) fn is_direct(&self) -> bool {
        self.direct.is_some() && self.direct_scope == DirectScope::All
    }

    /// Turns the O_DIRECT path for large writes of a buffered store on or off.
    pub(crate) fn set_large_writes_direct(&self, enabled: bool) {
        self.large_writes_direct.store(enabled, Ordering::Relaxed);
    }

    /// Whether large aligned writes bypass the page cache (buffered store, O_DIRECT accepted,
    /// not turned off).
    pub(crate) fn is_large_writes_direct(&self) -> bool {
        self.direct.is_some()
            && self.direct_scope == DirectScope::LargeWrites
            && self.large_writes_direct.load(Ordering::Relaxed)
    }

    /// The O_DIRECT descriptor for a read of this range, if it takes one. A buffered store
    /// reads a large range with O_DIRECT when the page cache does not hold all of it (the
    /// large writes that bypassed it, say): a miss would read through the cache, allocating
    /// and copying every page, for data the initiator holds already.
    fn direct_for_read(&self, offset: u64, len: usize) -> Option<(&File, DirectAlignment)> {
        let (file, alignment) = self.direct.as_ref()?;
        if !range_aligned(offset, len, alignment.offset_bytes) {
            return None;
        }
        let direct = match self.direct_scope {
            DirectScope::All => true,
            DirectScope::LargeWrites => {
                len >= LARGE_WRITE_DIRECT_BYTES_MIN
                    && self.large_writes_direct.load(Ordering::Relaxed)
                    && cached_bytes(&self.buffered, offset, len).is_some_and(|c| c < u64_from(len))
            }
        };
        direct.then_some((file, *alignment))
    }

    /// The O_DIRECT descriptor for a write of this range, if it takes one.
    fn direct_for_write(&self, offset: u64, len: usize) -> Option<(&File, DirectAlignment)> {
        let (file, alignment) = self.direct.as_ref()?;
        let in_scope = match self.direct_scope {
            DirectScope::All => true,
            DirectScope::LargeWrites => {
                len >= LARGE_WRITE_DIRECT_BYTES_MIN
                    && self.large_writes_direct.load(Ordering::Relaxed)
            }
        };
        (in_scope && range_aligned(offset, len, alignment.offset_bytes))
            .then_some((file, *alignment))
    }

    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Rejects requests reaching past the end before anything touches the file.
    pub(crate) fn check_range(&self, operation: &str, offset: u64, len: u64) -> Result<(), Error> {
        let size_bytes = self.size_bytes();
        match offset.checked_add(len) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{operation} of {len} bytes at offset {offset} is beyond the end of {} \
                     ({size_bytes} bytes)",
                    self.path.display()
                ),
            )),
        }
    }

    pub(crate) fn check_writable(&self, operation: &str) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{operation} on {}: the store is opened read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    pub(crate) fn check_io_size(&self, operation: &str, len: usize) -> Result<(), Error> {
        if len > IO_SIZE_BYTES_MAX {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{operation} of {len} bytes exceeds the limit of {IO_SIZE_BYTES_MAX}"),
            ));
        }
        Ok(())
    }

    pub(crate) fn buffered_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    /// The descriptor for a read, and the buffer to read into (always aligned, so either
    /// descriptor works; the returned `Bytes` takes the buffer without a copy).
    pub(crate) fn prepare_read(&self, offset: u64, len: usize) -> (&File, AlignedBuffer) {
        let file = self.direct_for_read(offset, len).map_or(&self.buffered, |(direct, _)| direct);
        (file, AlignedBuffer::for_overwrite(len))
    }

    /// The descriptor for a write, and its data (copied only when O_DIRECT demands an
    /// alignment the caller's buffer lacks).
    pub(crate) fn prepare_write(&self, offset: u64, data: Bytes) -> (&File, WriteData) {
        match self.direct_for_write(offset, data.len()) {
            Some((direct, alignment)) => {
                if is_aligned(data.as_ptr(), alignment.memory_bytes) {
                    (direct, WriteData::Shared(data))
                } else {
                    (direct, WriteData::Aligned(AlignedBuffer::copy_from(&data)))
                }
            }
            None => (&self.buffered, WriteData::Shared(data)),
        }
    }

    pub(crate) fn error_message(&self, operation: &str, offset: u64, len: u64) -> String {
        format!("{operation} of {len} bytes at offset {offset} on {}", self.path.display())
    }

    /// Runs an operation to completion on the calling thread (the portable engine's workers,
    /// and the io_uring engine's helper for what it does not put on the ring).
    pub(crate) fn execute_blocking(&self, operation: Operation) -> OperationResult {
        match operation {
            Operation::Read { offset, len } => self.read_blocking(offset, len).map(Output::Data),
            Operation::Write { offset, data, fua } => {
                self.write_blocking(offset, data, fua).map(|()| Output::Done)
            }
            Operation::Flush => self.flush_blocking().map(|()| Output::Done),
            Operation::Discard { offset, len } => {
                self.zero_blocking(ZeroingKind::Discard, offset, len).map(|()| Output::Done)
            }
            Operation::WriteZeroes { offset, len } => {
                self.zero_blocking(ZeroingKind::WriteZeroes, offset, len).map(|()| Output::Done)
            }
            Operation::Resize { size_bytes } => {
                self.resize_blocking(size_bytes).map(|()| Output::Done)
            }
        }
    }

    fn read_blocking(&self, offset: u64, len: usize) -> Result<Bytes, Error> {
        let (file, buffer) = self.prepare_read(offset, len);
        self.read_transfer(file, buffer, offset, 0).map_err(Stop::into_error)
    }

    fn write_blocking(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Error> {
        let (file, data) = self.prepare_write(offset, data);
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        self.write_transfer(file, data.as_slice(), offset, flags).map_err(Stop::into_error)
    }

    /// Whether a read of this range goes through the buffered descriptor (always, unless
    /// O_DIRECT is in use and the range is aligned for it). Only those can be served inline:
    /// an O_DIRECT read or write waits for the device whatever the flags.
    pub(crate) fn read_uses_buffered(&self, offset: u64, len: usize) -> bool {
        self.direct_for_read(offset, len).is_none()
    }

    /// Whether a write of this range goes through the buffered descriptor; see
    /// `read_uses_buffered` (a buffered store writes large aligned ranges with O_DIRECT).
    pub(crate) fn write_uses_buffered(&self, offset: u64, len: usize) -> bool {
        self.direct_for_write(offset, len).is_none()
    }

    /// The inline fast path's read: preadv2(RWF_NOWAIT) on the buffered descriptor, which
    /// succeeds only from the page cache. The caller checked `uses_buffered`.
    pub(crate) fn read_nowait(&self, offset: u64, len: usize) -> Result<Bytes, Stop> {
        assert!(self.read_uses_buffered(offset, len), "inline read on the O_DIRECT descriptor");
        let buffer = AlignedBuffer::for_overwrite(len);
        self.read_transfer(&self.buffered, buffer, offset, libc::RWF_NOWAIT)
    }

    /// The inline fast path's write: pwritev2(RWF_NOWAIT) on the buffered descriptor. The
    /// caller checked `uses_buffered`.
    pub(crate) fn write_nowait(&self, offset: u64, data: &[u8]) -> Result<(), Stop> {
        assert!(
            self.write_uses_buffered(offset, data.len()),
            "inline write on the O_DIRECT descriptor"
        );
        self.write_transfer(&self.buffered, data, offset, libc::RWF_NOWAIT)
    }

    /// The inline fast path's write where the file system refuses RWF_NOWAIT: a plain
    /// pwritev2 on the buffered descriptor, which may wait (the caller bounds how often).
    pub(crate) fn write_buffered_blocking(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        assert!(
            self.write_uses_buffered(offset, data.len()),
            "inline write on the O_DIRECT descriptor"
        );
        self.write_transfer(&self.buffered, data, offset, 0).map_err(Stop::into_error)
    }

    /// Reads until `buffer` is full. Shared by the blocking and the inline path so both report
    /// errors with the same kinds and messages. A short read is continued; under RWF_NOWAIT
    /// the continuation may then stop with `WouldBlock`.
    fn read_transfer(
        &self,
        file: &File,
        mut buffer: AlignedBuffer,
        offset: u64,
        flags: i32,
    ) -> Result<Bytes, Stop> {
        let len = buffer.len();
        let mut done = 0;
        while done < len {
            let position = offset + u64_from(done);
            match preadv2(file, &mut buffer.as_mut_slice()[done..], position, flags) {
                Ok(0) => {
                    return Err(Stop::Failed(Error::new(
                        ErrorKind::Io,
                        format!(
                            "{}: unexpected end of file at {position}",
                            self.error_message("read", offset, u64_from(len))
                        ),
                    )));
                }
                Ok(count) => done += count,
                Err(error) => self.transfer_error("read", offset, len, flags, error)?,
            }
        }
        Ok(Bytes::from_owner(buffer))
    }

    /// Writes all of `data`; see `read_transfer`.
    fn write_transfer(
        &self,
        file: &File,
        data: &[u8],
        offset: u64,
        flags: i32,
    ) -> Result<(), Stop> {
        let len = data.len();
        let mut done = 0;
        while done < len {
            let position = offset + u64_from(done);
            match pwritev2(file, &data[done..], position, flags) {
                Ok(0) => {
                    return Err(Stop::Failed(Error::new(
                        ErrorKind::Io,
                        format!(
                            "{}: the kernel wrote nothing at {position}",
                            self.error_message("write", offset, u64_from(len))
                        ),
                    )));
                }
                Ok(count) => done += count,
                Err(error) => self.transfer_error("write", offset, len, flags, error)?,
            }
        }
        Ok(())
    }

    /// Classifies a failed transfer call: `Ok` means retry (EINTR).
    fn transfer_error(
        &self,
        operation: &str,
        offset: u64,
        len: usize,
        flags: i32,
        error: io::Error,
    ) -> Result<(), Stop> {
        let nowait = flags & libc::RWF_NOWAIT != 0;
        match error.raw_os_error() {
            Some(libc::EINTR) => Ok(()),
            Some(libc::EAGAIN) if nowait => Err(Stop::WouldBlock),
            // The file system cannot do this without blocking at all (ext4 and tmpfs writes,
            // tmpfs reads on this 6.18 kernel).
            Some(libc::EOPNOTSUPP) if nowait => Err(Stop::NoWaitUnsupported),
            _ => Err(Stop::Failed(Error::io(
                self.error_message(operation, offset, u64_from(len)),
                error,
            ))),
        }
    }

    fn flush_blocking(&self) -> Result<(), Error> {
        // Data written through either descriptor lives in the same inode; one fdatasync covers
        // both (and flushes the device's volatile cache).
        self.buffered
            .sync_data()
            .map_err(|error| Error::io(format!("fdatasync of {}", self.path.display()), error))
    }

    pub(crate) fn zero_blocking(
        &self,
        kind: ZeroingKind,
        offset: u64,
        len: u64,
    ) -> Result<(), Error> {
        let operation = kind.operation(offset, len);
        let message = || self.error_message(operation.name(), offset, len);
        for mode in kind.fallocate_modes() {
            match fallocate(&self.buffered, mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(error) if error.raw_os_error().is_some_and(is_fallocate_unsupported) => {}
                Err(error) => return Err(Error::io(message(), error)),
            }
        }
        // Neither mode works here (e.g. some network file systems): write the zeroes.
        let zeroes = Bytes::from_owner(AlignedBuffer::zeroed(ZERO_CHUNK_BYTES));
        let mut position = offset;
        let end = offset + len;
        while position < end {
            let chunk_bytes = usize::try_from(end - position).unwrap_or(usize::MAX);
            let chunk = zeroes.slice(..chunk_bytes.min(ZERO_CHUNK_BYTES));
            let chunk_len = u64_from(chunk.len());
            self.write_blocking(position, chunk, false)?;
            position += chunk_len;
        }
        Ok(())
    }

    fn resize_blocking(&self, size_bytes: u64) -> Result<(), Error> {
        if self.is_block_device {
            if size_bytes == self.size_bytes() {
                return Ok(());
            }
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot resize block device {} to {size_bytes} bytes: resize the device itself",
                    self.path.display()
                ),
            ));
        }
        self.buffered.set_len(size_bytes).map_err(|error| {
            Error::io(format!("resize of {} to {size_bytes} bytes", self.path.display()), error)
        })?;
        self.size_bytes.store(size_bytes, Ordering::Release);
        Ok(())
    }

    /// Extents of `[offset, offset + len)` as (offset, length, mapped), by SEEK_DATA/SEEK_HOLE.
    /// Files systems without them (and block devices) report everything mapped.
    pub(crate) fn mapped_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, bool)>, Error> {
        self.check_range("mapped_ranges", offset, len)?;
        let end = offset + len;
        let mut ranges: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |start: u64, stop: u64, mapped: bool| {
            if stop <= start {
                return;
            }
            match ranges.last_mut() {
                Some(last) if last.2 == mapped && last.0 + last.1 == start => {
                    last.1 += stop - start
                }
                _ => ranges.push((start, stop - start, mapped)),
            }
        };
        if self.is_block_device {
            push(offset, end, true);
            return Ok(ranges);
        }
        let mut position = offset;
        while position < end {
            let data = match seek(&self.buffered, position, libc::SEEK_DATA) {
                Ok(data) => data,
                // No data at or after position: the rest is a hole.
                Err(error) if error.raw_os_error() == Some(libc::ENXIO) => end,
                Err(error) if error.raw_os_error().is_some_and(is_fallocate_unsupported) => {
                    push(position, end, true);
                    break;
                }
                Err(error) => {
                    return Err(Error::io(self.error_message("SEEK_DATA", offset, len), error));
                }
            };
            let data = data.min(end);
            push(position, data, false);
            position = data;
            if position >= end {
                break;
            }
            let hole = match seek(&self.buffered, position, libc::SEEK_HOLE) {
                Ok(hole) => hole,
                Err(error) if error.raw_os_error() == Some(libc::ENXIO) => end,
                Err(error) => {
                    return Err(Error::io(self.error_message("SEEK_HOLE", offset, len), error));
                }
            };
            // SEEK_HOLE always moves forward from data; guard against a file system that does
            // not, so the loop always makes progress.
            let hole = hole.clamp(position + 1, end);
            push(position, hole, true);
            position = hole;
        }
        Ok(ranges)
    }
}

fn create_sparse(path: &Path, size_bytes: u64) -> Result<bool, Error> {
    let shown = path.display();
    match fs::OpenOptions::new().read(true).write(true).create_new(true).open(path) {
        Ok(file) => {
            file.set_len(size_bytes).map_err(|error| {
                Error::io(format!("cannot size new file {shown} to {size_bytes} bytes"), error)
            })?;
            tracing::info!(path = %shown, size_bytes, "created sparse backing file");
            Ok(true)
        }
        // Someone created it between our stat and open: use theirs.
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(Error::io(format!("cannot create {shown}"), error)),
    }
}

/// The O_DIRECT descriptor, or `None` (with a warning when O_DIRECT was `asked` for; a
/// buffered store that only wanted it for large writes says so at debug level).
fn open_direct(
    path: &Path,
    read_only: bool,
    is_block_device: bool,
    buffered: &File,
    asked: bool,
) -> Option<(File, DirectAlignment)> {
    let shown = path.display();
    let fall_back = |reason: String| {
        if asked {
            tracing::warn!(path = %shown, "{reason}; falling back to buffered I/O");
        } else {
            tracing::debug!(path = %shown, "{reason}; large writes stay buffered");
        }
        None
    };
    let alignment = match direct_alignment(buffered, is_block_device) {
        Ok(Some(alignment)) => alignment,
        Ok(None) => {
            return fall_back(
                "the file system does not support O_DIRECT here (statx reports no direct I/O \
                 alignment)"
                    .to_owned(),
            );
        }
        Err(error) => return fall_back(format!("cannot learn O_DIRECT alignment: {error}")),
    };
    match fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => {
            tracing::debug!(
                path = %shown,
                offset_alignment_bytes = alignment.offset_bytes,
                memory_alignment_bytes = alignment.memory_bytes,
                asked,
                "O_DIRECT enabled"
            );
            Some((file, alignment))
        }
        Err(error) => fall_back(format!("the file system refuses O_DIRECT: {error}")),
    }
}

/// O_DIRECT alignment from statx(STATX_DIOALIGN) (Linux 6.1+), else the logical block size of a
/// block device, else the conservative 4096 bytes. `None` when the file system says it has no
/// direct I/O.
fn direct_alignment(file: &File, is_block_device: bool) -> io::Result<Option<DirectAlignment>> {
    let conservative = DirectAlignment {
        offset_bytes: BUFFER_ALIGNMENT_BYTES,
        memory_bytes: BUFFER_ALIGNMENT_BYTES,
    };
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut statx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call, the path is a valid empty C
    // string (AT_EMPTY_PATH makes statx describe the descriptor) and `statx` is a valid,
    // exclusively borrowed output buffer.
    let result = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut statx,
        )
    };
    if result == 0 && statx.stx_mask & libc::STATX_DIOALIGN != 0 {
        if statx.stx_dio_offset_align == 0 {
            return Ok(None);
        }
        let offset_bytes = usize::try_from(statx.stx_dio_offset_align).unwrap_or(usize::MAX);
        let memory_bytes = usize::try_from(statx.stx_dio_mem_align).unwrap_or(usize::MAX).max(1);
        if !offset_bytes.is_power_of_two()
            || !memory_bytes.is_power_of_two()
            || memory_bytes > BUFFER_ALIGNMENT_BYTES
        {
            return Ok(Some(conservative));
        }
        return Ok(Some(DirectAlignment { offset_bytes, memory_bytes }));
    }
    if is_block_device {
        let mut logical_block_bytes: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which is valid and exclusive.
        let result =
            unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut logical_block_bytes) };
        if result == 0
            && let Ok(bytes) = usize::try_from(logical_block_bytes)
            && bytes.is_power_of_two()
            && bytes <= BUFFER_ALIGNMENT_BYTES
        {
            return Ok(Some(DirectAlignment { offset_bytes: bytes, memory_bytes: bytes }));
        }
    }
    Ok(Some(conservative))
}

fn range_aligned(offset: u64, len: usize, alignment_bytes: usize) -> bool {
    offset.is_multiple_of(u64_from(alignment_bytes)) && len.is_multiple_of(alignment_bytes)
}

pub(crate) fn u64_from(value: usize) -> u64 {
    // usize is at most 64 bits on every target Tandem builds for.
    u64::try_from(value).unwrap_or(u64::MAX)
}

fn preadv2(file: &File, buffer: &mut [u8], offset: u64, flags: i32) -> io::Result<usize> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let iovec = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
    // SAFETY: one iovec describing `buffer`, which stays exclusively borrowed (alive, not
    // otherwise accessed) for the whole call; preadv2 writes at most iov_len bytes into it.
    let result = unsafe { libc::preadv2(file.as_raw_fd(), &iovec, 1, offset, flags) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(result).unwrap_or(0))
}

fn pwritev2(file: &File, data: &[u8], offset: u64, flags: i32) -> io::Result<usize> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let iovec = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
    // SAFETY: one iovec describing `data`, which stays borrowed (and so alive and unchanged) for
    // the whole call; pwritev2 only reads through it despite the `*mut` in iovec's type.
    let result = unsafe { libc::pwritev2(file.as_raw_fd(), &iovec, 1, offset, flags) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(result).unwrap_or(0))
}

/// cachestat(2)'s number on every architecture (new system calls share one table since 424).
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of cachestat(2).
#[repr(C)]
struct CachestatRange {
    offset: u64,
    len: u64,
}

/// `struct cachestat` of cachestat(2).
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Bytes of `[offset, offset + len)` in the page cache (whole pages counted), by cachestat(2)
/// (Linux 6.5+): nothing is read or brought in. `None` when the kernel cannot tell.
fn cached_bytes(file: &File, offset: u64, len: usize) -> Option<u64> {
    let range = CachestatRange { offset, len: u64_from(len) };
    let mut stat = Cachestat::default();
    // SAFETY: both pointers are to live, properly laid out (repr(C)) values for the whole
    // call; the kernel reads `range` and writes at most `size_of::<Cachestat>()` bytes into
    // `stat`; flags must be 0. The descriptor is open for the call.
    let result = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &raw const range,
            &raw mut stat,
            0 as libc::c_uint,
        )
    };
    // SAFETY: sysconf takes no pointers.
    let page_bytes = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    (result == 0).then(|| stat.nr_cache.saturating_mul(page_bytes))
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    loop {
        // SAFETY: fallocate takes no pointers; the descriptor is open for the call.
        let result = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// lseek for SEEK_DATA/SEEK_HOLE. It moves the shared file position, which nothing else uses
/// (all I/O is positional).
fn seek(file: &File, offset: u64, whence: i32) -> io::Result<u64> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek takes no pointers; the descriptor is open for the call.
    let result = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(result).unwrap_or(0))
}

//! Errors of the backing-store layer: one struct with a small `ErrorKind` for control flow, so
//! callers (SCSI sense, Cinder faults, CLI exit codes) translate at their own boundary.

use std::fmt;
use std::io;

/// What went wrong, coarsely enough for a caller to choose a SCSI sense code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request reaches past the end of the store (LBA out of range); rejected before any
    /// I/O was issued.
    OutOfRange,
    /// The file system or device is full (or a quota is exceeded).
    NoSpace,
    /// The device reported an I/O error, or something unclassified failed.
    Io,
    /// The file system or device cannot do this operation (e.g. resizing a block device).
    Unsupported,
    /// The request itself is malformed (too large, zero size where one is needed, ...).
    InvalidArgument,
    /// A write-type request on a store opened read-only, or a read-only file system.
    ReadOnly,
    /// The backing file does not exist and no size to create it was given.
    NotFound,
    /// The process may not open or modify the backing file.
    PermissionDenied,
    /// The engine stopped before completing the request (a bug or a dead engine thread).
    EngineStopped,
}

impl ErrorKind {
    /// The stable lower-case name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Io => "io",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::EngineStopped => "engine_stopped",
        }
    }

    /// Classifies an errno the way callers need it.
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ErrorKind::NoSpace,
            libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY => ErrorKind::Unsupported,
            libc::EINVAL => ErrorKind::InvalidArgument,
            libc::EROFS => ErrorKind::ReadOnly,
            libc::ENOENT => ErrorKind::NotFound,
            libc::EACCES | libc::EPERM => ErrorKind::PermissionDenied,
            _ => ErrorKind::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error of the backing-store layer: a kind, a sentence saying what was attempted, and the
/// operating-system error when there was one.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({kind})")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<io::Error>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), source: None }
    }

    /// Wraps an operating-system error, classifying it by errno.
    pub(crate) fn io(message: impl Into<String>, source: io::Error) -> Error {
        let kind = source.raw_os_error().map_or(ErrorKind::Io, ErrorKind::from_errno);
        Error { kind, message: message.into(), source: Some(source) }
    }

    /// Wraps a negative io_uring completion result (`-errno`).
    pub(crate) fn from_cqe(message: impl Into<String>, result: i32) -> Error {
        assert!(result < 0, "cqe result {result} is not an error");
        Error::io(message, io::Error::from_raw_os_error(-result))
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno behind this error, when the operating system reported one.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(io::Error::raw_os_error)
    }
}

//! How a store is opened: which engine, O_DIRECT or not, create-if-missing, read-only.

use std::fmt;
use std::str::FromStr;

/// The I/O engine behind a store. Both complete through the same path and pass the same tests.
///
/// The default comes from the benchmark in README.md ("Choosing the default engine").
/// If the kernel refuses io_uring (seccomp, old kernel, `kernel.io_uring_disabled`),
/// `BackingStore::open` falls back to the sync engine with a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EngineKind {
    /// io_uring on a dedicated ring thread.
    #[default]
    Uring,
    /// pread/pwrite/fdatasync/fallocate on a small pool of worker threads; works everywhere.
    Sync,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error returned when an engine name is neither "uring" nor "sync".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown I/O engine {0:?}: expected \"uring\" or \"sync\"")]
pub struct ParseEngineKindError(pub String);

impl FromStr for EngineKind {
    type Err = ParseEngineKindError;

    fn from_str(text: &str) -> Result<EngineKind, ParseEngineKindError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "uring" | "io_uring" | "io-uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            _ => Err(ParseEngineKindError(text.to_owned())),
        }
    }
}

/// Options for `BackingStore::open`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenOptions {
    pub engine: EngineKind,
    /// Bypass the page cache (O_DIRECT) when the file system supports it; otherwise open
    /// buffered and log why. Unaligned requests always go through a buffered descriptor.
    pub direct_io: bool,
    /// Create a sparse file of this size when the path does not exist. An existing file keeps
    /// its size.
    pub create_size_bytes: Option<u64>,
    /// Open read-only: every modifying request fails with `ErrorKind::ReadOnly` without
    /// touching the file.
    pub read_only: bool,
}

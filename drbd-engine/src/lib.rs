//! A DRBD-style replicated block device in userspace.
//!
//! Code map:
//! - `bitmap`: per-peer out-of-sync bitmaps, 1 bit per 4 KiB block (`words`/`from_words` for
//!   persistence).
//! - `uuid`: generation identifiers and the connect-time decision table (pure, tested per row
//!   and for antisymmetry).
//! - `protocol`: the peer protocol as a pure state machine (`Node`: `handle_*` inputs, one
//!   ordered `poll_output` queue, `poll_timeout`), frame encoding with crc32c (`frame`), the
//!   logical metadata and its updates (`persist`, `MetadataStore`), the resync rate controller,
//!   DRBD's state names (`states`), block digests (`digest`) and checksum-based resync plus
//!   online verify (`node::verify`).
//! - `meta`: DRBD v09 on-disk metadata encoding (pure).
//! - `sim`: the deterministic simulator and its checkers (`tandem-sim`).
//! - `driver`: the tokio driver (`ReplicatedDevice`) over TCP and `backing_store`.
//!
//! Architecture invariant: `protocol`, `uuid`, `bitmap`, `meta` and `sim` do no I/O and read no
//! clock; only `driver` touches sockets, files and time.
//!
//! Architecture invariant: a write is acknowledged only when every replica that might later be
//! promoted as UpToDate has it (protocol C) or has been fenced (outdated) first; every block a
//! peer may lack is in that peer's bitmap or, after a crash as primary, in a hot activity-log
//! extent.

pub mod bitmap;
pub mod constants;
pub mod driver;
pub mod meta;
pub mod protocol;
pub mod sim;
pub mod uuid;

use constants::NODE_ID_MAX;

/// A node's id within a resource (DRBD's `node-id`), 0..=31.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u8);

impl NodeId {
    pub fn new(id: u8) -> Option<Self> {
        (id <= NODE_ID_MAX).then_some(Self(id))
    }

    pub fn index(self) -> usize {
        assert!(self.0 <= NODE_ID_MAX);
        usize::from(self.0)
    }

    pub fn bit(self) -> u64 {
        1u64 << self.index()
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

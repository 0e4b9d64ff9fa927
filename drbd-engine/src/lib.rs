//! A DRBD-style replicated block device in userspace.
//!
//! The peer protocol (`protocol`) is a pure state machine; the on-disk metadata (`meta`) is pure
//! encoding and decoding; `driver` is the thin tokio layer that owns sockets and the backing
//! store; `sim` drives the same state machine over a simulated network and simulated disks.

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

//! A DRBD-style replicated block device in userspace.
//!
//! The peer protocol (`protocol`) is a pure state machine; the on-disk metadata (`meta`) is pure
//! encoding and decoding; `driver` is the thin tokio layer that owns sockets and the backing
//! store; `sim` drives the same state machine over a simulated network and simulated disks.

pub mod bitmap;
pub mod constants;
pub mod meta;
pub mod uuid;

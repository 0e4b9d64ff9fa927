//! A QMP client: the pure wire protocol ([`protocol`]) and a small tokio driver ([`client`]).
//!
//! A hand-written client rather than the `qapi` crate: `qapi-qmp` generates types for QEMU's
//! whole schema (a long build on two cores) while the agent uses a dozen commands whose
//! arguments it builds as JSON anyway, and QMP itself is JSON lines with ids.

pub mod client;
pub mod protocol;

pub use client::{Qmp, QmpError};
pub use protocol::Event;

//! The peer protocol as a pure state machine, in the style of quinn-proto.
//!
//! Inputs are `Node::handle_*` calls (frames received from a peer, local I/O completions,
//! application requests, role and connection commands, timer ticks), each with `now` passed
//! in. Outputs come from one ordered queue, `Node::poll_output`: frames to transmit, local I/O
//! to submit, metadata to persist, application requests to complete and events. One queue,
//! not one per kind, because order matters across kinds: a metadata update (an activity-log
//! transaction, a new generation UUID, bitmap bits) must be durable before the data write that
//! follows it is submitted. Nothing here reads a clock, touches a socket or opens a file.

pub mod after_sb;
pub mod auth;
mod candidates;
pub mod digest;
pub mod frame;
pub mod node;
pub mod persist;
pub mod quorum;
pub mod resync_controller;
pub mod states;

pub use after_sb::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, AfterSbPolicies};
pub use digest::{DigestAlg, DigestSettings};
pub use node::verify::VerifyProgress;
pub use node::{
    AppRequest, Config, DiskOp, Event, FenceOutcome, Fencing, IoFailed, IoId, Node, OnIoError,
    Output, ReplicationProtocol, RequestError, RequestId, ResyncProgress, StateError, WriteOrigin,
};
pub use persist::{MetaFlags, MetaUpdate, Metadata, MetadataStore, PersistedDisk};
pub use resync_controller::{DynamicControllerConfig, ResyncController, ResyncRate};
pub use states::{ConnectionState, DiskState, ReplicationState, Role};

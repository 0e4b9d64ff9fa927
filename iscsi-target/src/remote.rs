//! Remote ports: a target port of this process whose logical unit lives on another node.
//!
//! Ports and sessions produce SCSI commands with their I_T nexus; the logical unit executes
//! them. On a remote port the two are on different nodes: the connection hands each command
//! (and each LUN reset and each coming and going of an I_T nexus) to the device as a
//! [`ForwardRequest`], the device carries it to the node that holds the logical unit, and that
//! node runs it with [`crate::connection::LuTask`] exactly as if it had arrived on one of its own
//! ports. Persistent reservations, unit attentions, the COMPARE AND WRITE lock and copy results
//! therefore exist once, on the logical unit. Pure data; the transport is the caller's.

use bytes::Bytes;

use crate::scsi::Outcome;
use crate::scsi::pr::Nexus;
use crate::scsi::sense::{Sense, codes};

/// One SCSI command, with everything its data phase brought.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardedCommand {
    /// The target as the executing node names it (the transport may rewrite it).
    pub target_name: String,
    pub lun: u64,
    /// The I_T nexus the command arrived on: initiator port and the remote port's relative
    /// target port identifier, unique across the nodes that serve the logical unit.
    pub nexus: Nexus,
    pub cdb: [u8; 16],
    pub data_out: Bytes,
}

/// What a remote port asks of the logical unit's node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardRequest {
    /// Execute a command; answered with [`ForwardReply::Outcome`].
    Command(ForwardedCommand),
    /// A session logged in on the remote port: the nexus starts without stale unit
    /// attentions and receives the logical unit's unit attentions from now on.
    NexusUp { target_name: String, nexus: Nexus },
    /// The nexus is gone (logout, dropped connection): what SPC-4 ties to an I_T nexus
    /// (RESERVE(6), held copy results, unit attentions) is released.
    NexusLost { target_name: String, nexus: Nexus },
    /// LOGICAL UNIT RESET (or a target reset) on the remote port for these LUNs: every I_T
    /// nexus of the logical unit, on every node, gets its unit attention.
    Reset { target_name: String, luns: Vec<u64>, nexus: Nexus },
}

impl ForwardRequest {
    pub fn target_name(&self) -> &str {
        match self {
            Self::Command(c) => &c.target_name,
            Self::NexusUp { target_name, .. }
            | Self::NexusLost { target_name, .. }
            | Self::Reset { target_name, .. } => target_name,
        }
    }
    pub fn set_target_name(&mut self, name: String) {
        match self {
            Self::Command(c) => c.target_name = name,
            Self::NexusUp { target_name, .. }
            | Self::NexusLost { target_name, .. }
            | Self::Reset { target_name, .. } => *target_name = name,
        }
    }
}

/// Status, sense and Data-In of a forwarded command, as the logical unit produced them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardedOutcome {
    pub status: u8,
    pub sense: Option<Sense>,
    /// Whether the logical unit reports sense in descriptor format (its control mode page).
    pub descriptor_sense: bool,
    /// Untruncated: the port applies its own expected transfer length and residuals.
    pub data: Bytes,
}

impl ForwardedOutcome {
    pub fn new(outcome: Outcome, descriptor_sense: bool) -> Self {
        Self { status: outcome.status, sense: outcome.sense, descriptor_sense, data: outcome.data }
    }
    pub fn outcome(&self) -> Outcome {
        Outcome { status: self.status, sense: self.sense, data: self.data.clone() }
    }
    /// The answer when the request may not have run: NOT READY, ASYMMETRIC ACCESS STATE
    /// TRANSITION, which multipath initiators retry (on this path once the state settles, or
    /// on another), so a lost link never looks like success.
    pub fn retryable() -> Self {
        Self::new(Outcome::check(codes::ALUA_TRANSITION), false)
    }
}

/// The answer to a [`ForwardRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardReply {
    Outcome(ForwardedOutcome),
    /// A notice or reset was applied.
    Done,
}

/// Why a request got no answer from the logical unit's node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// No working link, or it broke while the request was out: the request may or may not
    /// have run.
    #[error("forward link unavailable: {0}")]
    Unavailable(String),
    /// The other node refused it (it does not hold the logical unit any more, bad request).
    #[error("forwarded request refused: {0}")]
    Refused(String),
}

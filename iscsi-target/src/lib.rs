//! An RFC 7143 iSCSI target with SPC-4/SBC-3 disk emulation.
//!
//! Architecture Invariant: everything except [`driver`] is pure protocol logic: no sockets, no
//! tokio, no clock, no files. The driver moves bytes and runs block I/O; the core decides.

pub mod chap;
pub mod connection;
pub mod constants;
pub mod device;
pub mod driver;
pub mod login;
pub mod pdu;
pub mod remote;
pub mod scsi;
pub mod text;

pub use connection::{
    Config, Connection, Event, ForwardTicket, IoRequest, LogicalUnit, LuStep, LuTask,
    PortalAddress, TargetNode,
};
pub use device::{AluaPortGroup, AluaState, BlockDevice, DeviceError, IoData, IoOp, MappedRange};
pub use login::{AuthConfig, Credentials};
pub use remote::{ForwardError, ForwardReply, ForwardRequest, ForwardedCommand, ForwardedOutcome};

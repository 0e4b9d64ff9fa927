//! `tandem-compute`: runs QEMU instances and hot-plugs Tandem volumes into them with QEMU's own
//! iSCSI initiator, nova-compute's part for volumes.
//!
//! Pure decisions ([`connection_info`], [`attach`], [`resume`], [`libvirt`], the command line in
//! [`instance`], the wire format in [`qmp::protocol`]) are kept apart from the code that acts
//! ([`qmp::client`], [`supervisor`], [`api`]).

pub mod api;
pub mod attach;
pub mod connection_info;
pub mod constants;
pub mod instance;
pub mod libvirt;
pub mod qmp;
pub mod resume;
pub mod supervisor;

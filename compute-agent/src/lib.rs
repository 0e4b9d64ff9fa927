//! `tandem-compute`: runs QEMU instances and hot-plugs Tandem volumes into them with QEMU's own
//! iSCSI initiator, nova-compute's part for volumes.
//!
//! Pure decisions ([`connection_info`], [`connector`], [`attach`], [`resume`], [`libvirt`], the
//! path order in [`path_proxy`], the command line in [`instance`], the wire format in [`qmp::protocol`], tandem-api's bodies and
//! answers in [`volume_api`], the retry rule in [`http_client`]) are kept apart from the code
//! that acts ([`qmp::client`], [`supervisor`], [`process`], [`record`], [`api`], the senders in [`http_client`] and
//! [`volume_api`]).

pub mod api;
pub mod attach;
pub mod connection_info;
pub mod connector;
pub mod constants;
pub mod http_client;
pub mod instance;
pub mod libvirt;
pub mod path_proxy;
pub mod process;
pub mod qmp;
pub mod record;
pub mod resume;
pub mod supervisor;
pub mod volume_api;

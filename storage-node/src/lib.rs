//! The storage node: `tandemd` and `tandemadm`.

pub mod api;
pub mod autopromote;
pub mod config;
pub mod constants;
pub mod control;
pub mod diskless;
pub mod dump;
pub mod engine_runtime;
pub mod forward;
pub mod host;
pub mod loader;
pub mod lun;
pub mod metrics;
pub mod node_settings;
pub mod peer_client;
pub mod promoter;
pub mod provision;
pub mod reservations;
pub mod service_ip;
pub mod snapshot;
pub mod status;

//! `tandem-api`: a Cinder v3 compatible block-storage service.
//!
//! Pure cores: `microversion`, `fault`, `status`, `quota`, `scheduler` (no I/O, no clock).
//! Around them: `db` (SQLite or PostgreSQL), `node_client` (the node contract over HTTP), `worker` (long
//! operations off the request path), `api` (the axum boundary).

pub mod api;
pub mod auth;
pub mod constants;
pub mod db;
pub mod fault;
pub mod microversion;
pub mod model;
pub mod node_client;
pub mod pg_cluster;
pub mod quota;
pub mod scheduler;
pub mod status;
pub mod worker;

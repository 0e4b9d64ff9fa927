//! The storage node: `tandemd` and `tandemadm`.

pub mod config;

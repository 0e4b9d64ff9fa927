//! The in-memory out-of-sync bitmap: one bit per 4 KiB block, one bitmap per peer.

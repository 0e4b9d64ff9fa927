//! A resource where this node is `disk none`: a diskless quorum tiebreaker, as DRBD 9 runs one
//! (a third node that votes so that two diskful nodes survive the loss of either). It stores
//! nothing, exports no LUN and never promotes (the engine refuses: `disk:Diskless`).
//!
//! The engine still opens a backing file and metadata (it never reads or writes them for a
//! diskless node), so tandemd gives it small placeholder files in the state directory:
//! `STATE/NAME.VOL.diskless` and `STATE/NAME.VOL.diskless.md`. Their size is not the
//! resource's: the engine does not compare device sizes in a handshake with a diskless end.

use crate::node_settings::NodeSettings;
use drbd_engine::driver::MetaFormat;
use drbd_engine::protocol::quorum::QuorumConfig;
use std::path::PathBuf;

/// The placeholder device's size: one bitmap word's worth of blocks is plenty; the engine
/// keeps a bitmap per peer of this size and never touches the file.
pub const PLACEHOLDER_SIZE_BYTES: u64 = 1024 * 1024;

/// What `tandemadm create-md` says for a diskless node (and does nothing).
pub const CREATE_MD_NOTE: &str = "disk none (diskless tiebreaker): no meta data to create";

const _: () = assert!(PLACEHOLDER_SIZE_BYTES.is_multiple_of(4096));

/// The placeholder backing file of a diskless volume.
pub fn placeholder_path(settings: &NodeSettings, resource: &str, volume: u32) -> PathBuf {
    settings.state_directory.join(format!("{resource}.{volume}.diskless"))
}

/// (size, metadata path, metadata format) for the engine of a diskless volume.
pub fn engine_files(
    settings: &NodeSettings,
    resource: &str,
    volume: u32,
) -> (u64, PathBuf, MetaFormat) {
    let meta = settings.state_directory.join(format!("{resource}.{volume}.diskless.md"));
    (PLACEHOLDER_SIZE_BYTES, meta, MetaFormat::V09External)
}

/// A diskless node is a tiebreaker only when the resource has quorum; without quorum it would
/// be a diskless *client* (I/O through its peers), which tandemd cannot host yet.
pub fn check_tiebreaker(resource: &str, node: &str, quorum: &QuorumConfig) -> Result<(), String> {
    if quorum.enabled() {
        return Ok(());
    }
    Err(format!(
        "{resource}: on {node}: 'disk none' makes this node a diskless quorum tiebreaker, which \
         needs 'options {{ quorum majority; }}' in the resource (a diskless client doing I/O \
         through its peers is not supported yet)"
    ))
}

/// Creates the state directory the placeholders live in (the engine creates the files).
pub fn prepare(settings: &NodeSettings) -> Result<(), String> {
    std::fs::create_dir_all(&settings.state_directory)
        .map_err(|e| format!("state directory {}: {e}", settings.state_directory.display()))
}

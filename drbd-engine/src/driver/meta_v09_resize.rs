//! Online grow of internal metadata (`MetaUpdate::Resize`): the area moves to the new end of
//! the grown backing file, and the data size grows with it.
//!
//! Crash-safe order, so that one valid superblock always describes the metadata:
//! 1. A record beside the backing file (`FILE.tandem-resize`, written and synced with its
//!    directory) names the old file length: until the move is done, a restart must look for
//!    the superblock there, not at the end (DRBD keeps the same fact in drbdmeta's
//!    `/var/lib/drbd/drbd-minor-N.lkbd`, which is how `drbdmeta dump-md` finds metadata that
//!    has not moved yet: "Device seems to have been resized! dumping meta data from the last
//!    known position").
//! 2. The new bitmap area (zeroed, then every page), the initialized activity-log ring and a
//!    transaction holding the hot extents, durable; all of it above the old area.
//! 3. The new superblock in the last 4 KiB, durable: from here on drbdmeta and Tandem read
//!    the new metadata at the end, with the new la-size.
//! 4. The old area (now inside the grown data area) is zeroed and synced, so every replica's
//!    new blocks read the same zeros (the new area is a fresh zero area, see
//!    `protocol::node::resize`).
//! 5. The record goes. A crash between 3 and 5 finds the record at the next open and redoes 4.

use super::{V09Error, V09File, usize_of};
use crate::constants::BLOCK_SIZE_BYTES;
use crate::meta::{MetaLayout, MetaPlacement};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Zeroes go out in writes of this size when the old area is wiped.
const WIPE_CHUNK_BYTES: u64 = 1 << 20;

fn record_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tandem-resize");
    PathBuf::from(name)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

fn write_record(path: &Path, old_len: u64) -> std::io::Result<()> {
    let record = record_path(path);
    let mut file = File::create(&record)?;
    writeln!(file, "{old_len}")?;
    file.sync_all()?;
    sync_parent(&record)
}

fn remove_record(path: &Path) -> std::io::Result<()> {
    let record = record_path(path);
    match std::fs::remove_file(&record) {
        Ok(()) => sync_parent(&record),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_record(path: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(record_path(path)) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn valid_superblock_at(file: &File, len: u64) -> std::io::Result<bool> {
    let Ok(at) = crate::meta::MetaImage::superblock_offset_bytes(MetaPlacement::Internal, len)
    else {
        return Ok(false);
    };
    let mut block = vec![0u8; 4096];
    file.read_exact_at(&mut block, at)?;
    Ok(crate::meta::MetaImage::open(MetaPlacement::Internal, len, &block).is_ok())
}

fn wipe(file: &File, range: std::ops::Range<u64>) -> std::io::Result<()> {
    let zeros = vec![0u8; usize_of(WIPE_CHUNK_BYTES)];
    let mut at = range.start;
    while at < range.end {
        let len = (range.end - at).min(WIPE_CHUNK_BYTES);
        file.write_all_at(&zeros[..usize_of(len)], at)?;
        at += len;
    }
    file.sync_data()
}

/// The device length whose end holds the valid superblock: the file's own length, or the one
/// an interrupted move recorded. Finishes a move that got past its new superblock (step 4).
pub(super) fn recover(path: &Path, file: &File, file_len: u64) -> Result<u64, V09Error> {
    let io = |source| V09Error::Io { path: path.to_owned(), source };
    let Some(old_len) = read_record(path).map_err(io)? else { return Ok(file_len) };
    if old_len == file_len || !valid_superblock_at(file, file_len).map_err(io)? {
        if old_len < file_len && valid_superblock_at(file, old_len).map_err(io)? {
            tracing::warn!(path = %path.display(), old_len, file_len,
                "an online resize was interrupted before its new metadata was durable; using the metadata at the old end");
            return Ok(old_len);
        }
        return Ok(file_len);
    }
    // The new superblock is durable: only the wipe of the old area may be missing. Its
    // geometry comes from the superblock itself (max-peers and ring size never change).
    let mut block = vec![0u8; 4096];
    let at = crate::meta::MetaImage::superblock_offset_bytes(MetaPlacement::Internal, old_len)
        .map_err(|source| V09Error::Meta { path: path.to_owned(), source })?;
    file.read_exact_at(&mut block, at).map_err(io)?;
    if let Ok(opened) = crate::meta::MetaImage::open(MetaPlacement::Internal, old_len, &block) {
        let old = opened.layout;
        wipe(file, old.bm_offset_bytes..old.md_offset_bytes + 4096).map_err(io)?;
    }
    remove_record(path).map_err(io)?;
    Ok(file_len)
}

impl V09File {
    /// Data blocks this replica could hold after an online grow: for internal metadata, the
    /// data area of the backing file at its current length, provided the metadata can move
    /// there (the file grew by at least the new metadata's size); otherwise the current size.
    pub fn usable_blocks(&self) -> Result<u64, V09Error> {
        let current = self.state.size_blocks;
        let layout = *self.image.layout();
        if layout.placement != MetaPlacement::Internal {
            return Ok(current);
        }
        let len = self.file.metadata().map_err(self.io())?.len();
        let Ok(grown) = MetaLayout::internal(len, layout.max_peers, layout.al) else {
            return Ok(current);
        };
        if grown.md_offset_bytes == layout.md_offset_bytes {
            return Ok(current.max(layout.data_blocks().min(grown.data_blocks())));
        }
        if grown.bm_offset_bytes < layout.md_offset_bytes + 4096 {
            return Ok(current);
        }
        Ok(grown.data_blocks().max(current))
    }

    /// The backing file's length (the data store must be told it after a grow).
    pub fn device_bytes(&self) -> Result<u64, V09Error> {
        Ok(self.file.metadata().map_err(self.io())?.len())
    }

    /// `MetaUpdate::Resize` for internal metadata, in the order of the module comment.
    pub(super) fn relocate_internal(&mut self, size_blocks: u64) -> Result<(), V09Error> {
        let path = self.path.clone();
        let meta_error = |source| V09Error::Meta { path: path.clone(), source };
        let io = |source| V09Error::Io { path: path.clone(), source };
        let old = *self.image.layout();
        if old.placement != MetaPlacement::Internal {
            return Err(meta_error(crate::meta::MetaError::InvalidField {
                field: "online resize needs internal metadata",
                value: 0,
            }));
        }
        let len = self.file.metadata().map_err(io)?.len();
        let new_layout = MetaLayout::internal(len, old.max_peers, old.al).map_err(meta_error)?;
        assert!(size_blocks * BLOCK_SIZE_BYTES <= new_layout.data_size_bytes);
        self.state.apply(&crate::protocol::MetaUpdate::Resize { size_blocks });
        let words: Vec<&[u64]> =
            self.state.bitmaps.iter().map(crate::bitmap::Bitmap::words).collect();
        let hot: Vec<u32> = self.image.hot_extents();
        let (image, plan) =
            self.image.relocated(new_layout, size_blocks, &words, &hot).map_err(meta_error)?;
        let old_len = old.md_offset_bytes + 4096;
        write_record(&path, old_len).map_err(io)?;
        wipe(&self.file, new_layout.bm_offset_bytes..new_layout.al_offset_bytes).map_err(io)?;
        self.image = image;
        self.run(&plan)?;
        wipe(&self.file, old.bm_offset_bytes..old_len).map_err(io)?;
        remove_record(&path).map_err(io)?;
        tracing::info!(path = %path.display(), size_blocks, old_len, new_len = len,
            "internal metadata moved to the new end of the backing file");
        Ok(())
    }
}

/// Grows a backing file whose internal metadata sits at its end to `new_len` bytes, so a
/// later `resize` can move the metadata there. Crash-safe: the resize record names the
/// current end first (unless an earlier grow's record already names where the metadata is),
/// so an open before the move still finds the superblock. False if the file is that large.
pub fn grow_backing_file(path: &Path, new_len: u64) -> Result<bool, V09Error> {
    let io = |source| V09Error::Io { path: path.to_owned(), source };
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if new_len <= len {
        return Ok(false);
    }
    if read_record(path).map_err(io)?.is_none() && valid_superblock_at(&file, len).map_err(io)? {
        write_record(path, len).map_err(io)?;
    }
    file.set_len(new_len).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(true)
}

//! An interim external metadata file: the whole logical `Metadata`, checksummed, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory) on every update, so
//! a crash or a torn write leaves either the old or the new state, never a mix.
//!
//! This is the driver's stand-in until `crate::meta::MetaImage` (DRBD's v09 layout, internal
//! or external) is wired in behind the same `MetadataStore` trait; rewriting everything per
//! update costs one small file write and two fsyncs, fine for roles, UUIDs and bitmaps of
//! test-sized volumes, too slow for a bitmap update per write on large ones.

use crate::NodeId;
use crate::bitmap::Bitmap;
use crate::constants::{HISTORY_UUIDS_MAX, NODE_ID_MAX};
use crate::protocol::persist::{MetaFlags, MetaUpdate, Metadata, MetadataStore, PersistedDisk};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Version 2: `HISTORY_UUIDS_MAX` history slots (32) where version 1 had two.
const MAGIC: &[u8; 8] = b"TNDMETA2";
/// Version 1, still read (its two history generations are the newest; the older slots start
/// empty) so an upgrade keeps a node's metadata; the next update writes version 2.
const MAGIC_V1: &[u8; 8] = b"TNDMETA1";
const HISTORY_SLOTS_V1: usize = 2;
const _: () = assert!(HISTORY_SLOTS_V1 <= HISTORY_UUIDS_MAX);

#[derive(Debug, Error)]
pub enum MetaFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: not a Tandem metadata file or damaged (bad magic, length or checksum)")]
    Corrupt(PathBuf),
    #[error("{path}: metadata is for node {found}, not {expected}")]
    WrongNode { path: PathBuf, found: u8, expected: u8 },
    #[error("{path}: metadata describes {found} blocks, the backing store has {expected}")]
    WrongSize { path: PathBuf, found: u64, expected: u64 },
}

pub struct MetaFile {
    path: PathBuf,
    state: Metadata,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> MetaFileError + '_ {
    move |source| MetaFileError::Io { path: path.to_owned(), source }
}

fn encode(meta: &Metadata) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 4]); // crc32c of everything after it
    out.push(meta.node_id.0);
    out.extend_from_slice(&meta.size_blocks.to_le_bytes());
    out.extend_from_slice(&meta.uuids.current.to_le_bytes());
    for h in meta.uuids.history {
        out.extend_from_slice(&h.to_le_bytes());
    }
    for b in meta.uuids.bitmap {
        out.extend_from_slice(&b.to_le_bytes());
    }
    let f = &meta.flags;
    out.push(match f.disk {
        PersistedDisk::Inconsistent => 0,
        PersistedDisk::Outdated => 1,
        PersistedDisk::UpToDate => 2,
    });
    out.push(u8::from(f.primary_indicator));
    out.push(u8::from(f.crashed_primary));
    out.push(u8::from(f.full_sync_required));
    out.extend_from_slice(&f.peer_outdated.to_le_bytes());
    out.extend_from_slice(&(meta.activity_log.len() as u64).to_le_bytes());
    for e in &meta.activity_log {
        out.extend_from_slice(&e.to_le_bytes());
    }
    // Only bitmaps with bits set are stored (a presence mask first): a clean 1 GiB volume's
    // file stays small, so rewriting it per update stays cheap.
    let present = meta
        .bitmaps
        .iter()
        .enumerate()
        .filter(|(_, b)| !b.is_clear())
        .fold(0u64, |mask, (i, _)| mask | (1u64 << i));
    out.extend_from_slice(&present.to_le_bytes());
    for bitmap in meta.bitmaps.iter().filter(|b| !b.is_clear()) {
        for w in bitmap.words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<Metadata> {
    let history_slots = match bytes.get(..8)? {
        magic if magic == MAGIC => HISTORY_UUIDS_MAX,
        magic if magic == MAGIC_V1 => HISTORY_SLOTS_V1,
        _ => return None,
    };
    if bytes.len() < 12 {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    if crc32c::crc32c(&bytes[12..]) != crc {
        return None;
    }
    let mut at = 12usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let slice = bytes.get(at..at + n)?;
        at += n;
        Some(slice)
    };
    let u64_at = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
    let node_id = NodeId::new(take(1)?[0])?;
    let size_blocks = u64_at(take(8)?);
    let mut meta = Metadata::create(node_id, size_blocks);
    meta.uuids.current = u64_at(take(8)?);
    for slot in 0..history_slots {
        meta.uuids.history[slot] = u64_at(take(8)?);
    }
    for slot in 0..=usize::from(NODE_ID_MAX) {
        meta.uuids.bitmap[slot] = u64_at(take(8)?);
    }
    let disk = match take(1)?[0] {
        0 => PersistedDisk::Inconsistent,
        1 => PersistedDisk::Outdated,
        2 => PersistedDisk::UpToDate,
        _ => return None,
    };
    let flag = |b: u8| b == 1;
    let primary_indicator = flag(take(1)?[0]);
    let crashed_primary = flag(take(1)?[0]);
    let full_sync_required = flag(take(1)?[0]);
    let peer_outdated = u64_at(take(8)?);
    meta.flags =
        MetaFlags { disk, primary_indicator, crashed_primary, full_sync_required, peer_outdated };
    let extents = usize::try_from(u64_at(take(8)?)).ok()?;
    if extents > crate::constants::AL_EXTENTS_MAX {
        return None;
    }
    for _ in 0..extents {
        meta.activity_log.push(u64_at(take(8)?));
    }
    let words = usize::try_from(size_blocks.div_ceil(64)).ok()?;
    let present = u64_at(take(8)?);
    for slot in 0..=usize::from(NODE_ID_MAX) {
        if present & (1u64 << slot) == 0 {
            continue;
        }
        let raw = take(words * 8)?;
        let ws = raw.chunks(8).map(u64_at).collect();
        meta.bitmaps[slot] = Bitmap::from_words(size_blocks, ws).ok()?;
    }
    (at == bytes.len()).then_some(meta)
}

impl MetaFile {
    pub fn load(path: &Path) -> Result<Metadata, MetaFileError> {
        let bytes = std::fs::read(path).map_err(io_error(path))?;
        decode(&bytes).ok_or_else(|| MetaFileError::Corrupt(path.to_owned()))
    }

    /// Opens existing metadata, or creates it (`create-md`) when the file does not exist.
    pub fn open_or_create(
        path: &Path,
        node_id: NodeId,
        size_blocks: u64,
    ) -> Result<(Self, Metadata), MetaFileError> {
        let state = if path.exists() {
            let meta = Self::load(path)?;
            if meta.node_id != node_id {
                return Err(MetaFileError::WrongNode {
                    path: path.to_owned(),
                    found: meta.node_id.0,
                    expected: node_id.0,
                });
            }
            if meta.size_blocks != size_blocks {
                return Err(MetaFileError::WrongSize {
                    path: path.to_owned(),
                    found: meta.size_blocks,
                    expected: size_blocks,
                });
            }
            meta
        } else {
            let meta = Metadata::create(node_id, size_blocks);
            write_atomically(path, &encode(&meta))?;
            meta
        };
        Ok((Self { path: path.to_owned(), state: state.clone() }, state))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), MetaFileError> {
    let temp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temp).map_err(io_error(&temp))?;
    file.write_all(bytes).map_err(io_error(&temp))?;
    file.sync_all().map_err(io_error(&temp))?;
    std::fs::rename(&temp, path).map_err(io_error(path))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    Ok(())
}

impl MetaFile {
    /// Applies several updates with one durable write (the driver batches consecutive
    /// `Output::Persist`s: all are durable before any later output is acted upon).
    pub fn apply_all(&mut self, updates: &[MetaUpdate]) -> Result<(), MetaFileError> {
        for update in updates {
            self.state.apply(update);
        }
        write_atomically(&self.path, &encode(&self.state))
    }
}

impl MetadataStore for MetaFile {
    type Error = MetaFileError;

    fn load(&mut self) -> Result<Metadata, MetaFileError> {
        Ok(self.state.clone())
    }

    fn apply(&mut self, update: &MetaUpdate) -> Result<(), MetaFileError> {
        self.state.apply(update);
        write_atomically(&self.path, &encode(&self.state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.tmeta");
        let (mut file, meta) = MetaFile::open_or_create(&path, NodeId(1), 1000).unwrap();
        assert_eq!(meta, Metadata::create(NodeId(1), 1000));
        file.apply(&MetaUpdate::BitmapSet { peer: NodeId(0), first_block: 10, blocks: 20 })
            .unwrap();
        file.apply(&MetaUpdate::ActivityLog { added: vec![0, 3], removed: vec![] }).unwrap();
        let mut flags = meta.flags.clone();
        flags.primary_indicator = true;
        file.apply(&MetaUpdate::Flags(flags)).unwrap();
        let loaded = MetaFile::load(&path).unwrap();
        assert_eq!(loaded.bitmaps[0].count(), 20);
        assert_eq!(loaded.activity_log, vec![0, 3]);
        assert!(loaded.flags.primary_indicator);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(MetaFile::load(&path), Err(MetaFileError::Corrupt(_))));
        assert!(MetaFile::open_or_create(&path, NodeId(1), 1000).is_err());
    }

    /// A version 1 file (two history slots) written before the history grew loads with its
    /// generations, and the next update rewrites it as version 2.
    #[test]
    fn version_1_files_still_load() {
        let mut meta = Metadata::create(NodeId(0), 640);
        meta.uuids.current = 0xC0;
        meta.uuids.history[0] = 0xB0;
        meta.uuids.history[1] = 0xA0;
        meta.uuids.bitmap[1] = 0xB0;
        meta.bitmaps[1].set_range(5, 7).unwrap();
        let v2 = encode(&meta);
        // Version 1's layout: the same fields with two history slots.
        let history_at = 12 + 1 + 8 + 8;
        let mut v1 = v2[..history_at + 8 * HISTORY_SLOTS_V1].to_vec();
        v1.extend_from_slice(&v2[history_at + 8 * HISTORY_UUIDS_MAX..]);
        v1[..8].copy_from_slice(MAGIC_V1);
        let crc = crc32c::crc32c(&v1[12..]);
        v1[8..12].copy_from_slice(&crc.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.tmeta");
        std::fs::write(&path, &v1).unwrap();
        let (mut file, loaded) = MetaFile::open_or_create(&path, NodeId(0), 640).unwrap();
        assert_eq!(loaded, meta);
        file.apply(&MetaUpdate::BitmapSet { peer: NodeId(1), first_block: 0, blocks: 1 }).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..8], MAGIC);
        assert_eq!(MetaFile::load(&path).unwrap().bitmaps[1].count(), 8);
    }
}

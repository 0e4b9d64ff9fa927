//! Metadata in DRBD 9's v09 layout, internal (at the end of the backing file, `meta-disk
//! internal`) or on an external metadata file (drbdmeta's `flex-external`), through
//! `crate::meta::MetaImage`'s encoders: every logical update becomes a write plan whose steps
//! are written and fdatasynced in order, so `drbdmeta ... dump-md` reads what we wrote.
//!
//! Internal metadata shares the backing file with the data: the data goes through
//! `backing-store`, the metadata through this file handle, at disjoint 4 KiB-aligned ranges
//! (everything below `bm_offset` is data, the driver asserts it never goes past), so neither
//! path shares a page with the other.

use crate::NodeId;
use crate::bitmap::Bitmap;
use crate::constants::{HISTORY_UUIDS_MAX, NODE_ID_MAX};
use crate::meta::{
    AlGeometry, MetaError, MetaImage, MetaLayout, MetaPlacement, WritePlan, bitmap_area_bytes,
    md_flags, peer_flags,
};
use crate::protocol::persist::{MetaFlags, MetaUpdate, Metadata, MetadataStore, PersistedDisk};

// The engine's history fits the superblock's slots (DRBD 9 has as many as the engine keeps).
const _: () = assert!(HISTORY_UUIDS_MAX <= crate::meta::constants::HISTORY_UUIDS);
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum V09Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Meta { path: PathBuf, source: MetaError },
    #[error("{path}: metadata describes {found} blocks, the backing store has {expected}")]
    WrongSize { path: PathBuf, found: u64, expected: u64 },
}

/// The smallest metadata device drbdmeta accepts (measured: 69632 bytes accepted, 69120 not).
const DRBDMETA_DEVICE_BYTES_MIN: u64 = 69_632;
/// Zeroes go out in writes of this size when `create-md` clears a bitmap area.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

pub struct V09File {
    path: PathBuf,
    file: File,
    image: MetaImage,
    state: Metadata,
    /// An engine runs on this metadata (`begin_use`): closing it may mark the AL clean.
    in_use: bool,
    /// The same file opened with O_DSYNC (on first use), for activity-log transactions that
    /// only add extents (`apply`).
    dsync: Option<File>,
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("metadata areas fit in memory")
}

impl V09File {
    fn io(&self) -> impl FnOnce(std::io::Error) -> V09Error + '_ {
        move |source| V09Error::Io { path: self.path.clone(), source }
    }

    fn meta_error(path: &Path) -> impl FnOnce(MetaError) -> V09Error + '_ {
        move |source| V09Error::Meta { path: path.to_owned(), source }
    }

    fn run(&self, plan: &WritePlan) -> Result<(), V09Error> {
        for step in &plan.steps {
            for write in step {
                self.file.write_all_at(&write.bytes[..], write.offset_bytes).map_err(self.io())?;
            }
            self.file.sync_data().map_err(self.io())?;
        }
        Ok(())
    }

    /// Like `run`, but each write is durable on its own (O_DSYNC: the kernel syncs just its
    /// range) instead of an fdatasync of the whole file after each step, which on internal
    /// metadata also wrote back every dirty data page of the backing file: 5 to 12 ms per
    /// transaction on the bench machine, with the engine task stalled meanwhile. For plans
    /// whose correctness needs only their own writes durable.
    fn run_own_writes(&mut self, plan: &WritePlan) -> Result<(), V09Error> {
        if self.dsync.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .open(&self.path)
                .map_err(self.io())?;
            self.dsync = Some(file);
        }
        let file = self.dsync.as_ref().expect("opened above");
        for step in &plan.steps {
            for write in step {
                file.write_all_at(&write.bytes[..], write.offset_bytes)
                    .map_err(|source| V09Error::Io { path: self.path.clone(), source })?;
            }
        }
        Ok(())
    }

    /// Opens the metadata file, creating it (`create-md`, max-peers = `max_peers`) if missing.
    /// External metadata only (a file of its own, drbdmeta's `flex-external`).
    pub fn open_or_create(
        path: &Path,
        node_id: NodeId,
        size_blocks: u64,
        max_peers: u32,
        al_extents: u32,
    ) -> Result<(Self, Metadata), V09Error> {
        let io = |source| V09Error::Io { path: path.to_owned(), source };
        if !path.exists() {
            // drbdmeta refuses metadata devices smaller than 68 KiB.
            let md_bytes = (4096
                + AlGeometry::default().ring_bytes()
                + bitmap_area_bytes(size_blocks, max_peers))
            .max(DRBDMETA_DEVICE_BYTES_MIN);
            let layout = MetaLayout::flex_external(md_bytes, max_peers, AlGeometry::default())
                .map_err(Self::meta_error(path))?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io)?;
            file.set_len(md_bytes).map_err(io)?;
            return Self::create_on(path, file, layout, node_id, size_blocks, al_extents);
        }
        let (store, state) = Self::open(path, MetaPlacement::FlexExternal, node_id)?;
        if state.size_blocks != size_blocks {
            return Err(V09Error::WrongSize {
                path: path.to_owned(),
                found: state.size_blocks,
                expected: size_blocks,
            });
        }
        Ok((store, state))
    }

    /// `create-md` for internal metadata (`meta-disk internal`): writes a fresh area at the end
    /// of the existing backing file at `path`, exactly where drbdmeta puts it, and returns the
    /// metadata of a data area of everything below it. The data below is left alone.
    pub fn create_internal(
        path: &Path,
        node_id: NodeId,
        max_peers: u32,
        al_extents: u32,
    ) -> Result<(Self, Metadata), V09Error> {
        let io = |source| V09Error::Io { path: path.to_owned(), source };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let layout = MetaLayout::internal(len, max_peers, AlGeometry::default())
            .map_err(Self::meta_error(path))?;
        let size_blocks = layout.data_blocks();
        Self::create_on(path, file, layout, node_id, size_blocks, al_extents)
    }

    /// Zeroes the bitmap area (an internal area may hold old data), then writes the ring and
    /// the superblock last, each step durable before the next.
    fn create_on(
        path: &Path,
        file: File,
        layout: MetaLayout,
        node_id: NodeId,
        size_blocks: u64,
        al_extents: u32,
    ) -> Result<(Self, Metadata), V09Error> {
        let (image, plan) = MetaImage::create(layout, node_id.0, size_blocks, al_extents)
            .map_err(Self::meta_error(path))?;
        let store = Self {
            path: path.to_owned(),
            file,
            dsync: None,
            image,
            state: Metadata::create(node_id, size_blocks),
            in_use: false,
        };
        let zeros = vec![0u8; usize_of(ZERO_CHUNK_BYTES)];
        let range = store.image.bitmap_range();
        let mut at = range.start;
        while at < range.end {
            let len = (range.end - at).min(ZERO_CHUNK_BYTES);
            store.file.write_all_at(&zeros[..usize_of(len)], at).map_err(store.io())?;
            at += len;
        }
        store.run(&plan)?;
        let state = store.state.clone();
        Ok((store, state))
    }

    /// Whether `path` holds a valid v09 superblock where `placement` puts it (drbdmeta's
    /// "valid meta data" check). A missing or short file has none.
    pub fn probe(path: &Path, placement: MetaPlacement) -> Result<bool, V09Error> {
        let io = |source| V09Error::Io { path: path.to_owned(), source };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(e)),
        };
        let len = file.metadata().map_err(io)?.len();
        let Ok(at) = MetaImage::superblock_offset_bytes(placement, len) else { return Ok(false) };
        let mut block = vec![0u8; 4096];
        if at + 4096 > len {
            return Ok(false);
        }
        file.read_exact_at(&mut block, at).map_err(io)?;
        Ok(MetaImage::open(placement, len, &block).is_ok())
    }

    /// Opens existing metadata (internal: at the end of the backing file at `path`). The data
    /// size is the metadata's (la-size-sect; all of the data area when drbdmeta create-md left
    /// it 0). A superblock without a node id (drbdmeta create-md) takes `node_id`.
    pub fn open(
        path: &Path,
        placement: MetaPlacement,
        node_id: NodeId,
    ) -> Result<(Self, Metadata), V09Error> {
        let io = |source| V09Error::Io { path: path.to_owned(), source };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        // An online grow that a crash interrupted may have left the metadata where it was:
        // `resize` names that place (see `relocate_internal`).
        let len = if placement == MetaPlacement::Internal {
            resize_record::recover(path, &file, file_len)?
        } else {
            file_len
        };
        let at =
            MetaImage::superblock_offset_bytes(placement, len).map_err(Self::meta_error(path))?;
        let mut block = vec![0u8; 4096];
        file.read_exact_at(&mut block, at).map_err(io)?;
        let opened = MetaImage::open(placement, len, &block).map_err(Self::meta_error(path))?;
        let read_range = |range: std::ops::Range<u64>| -> Result<Vec<u8>, V09Error> {
            let mut bytes = vec![0u8; usize_of(range.end - range.start)];
            file.read_exact_at(&mut bytes, range.start).map_err(io)?;
            Ok(bytes)
        };
        let ring = read_range(opened.al_range())?;
        let area = read_range(opened.bitmap_range())?;
        let (image, loaded) =
            MetaImage::load(opened, node_id.0, &ring, &area).map_err(Self::meta_error(path))?;
        let size_blocks = loaded.size_blocks;
        // MetaImage::load refuses a la-size beyond the data area: the engine's I/O, bounded
        // by size_blocks, can never reach the metadata.
        assert!(size_blocks <= image.layout().data_blocks());
        let sb = &loaded.superblock;
        let mut state = Metadata::create(node_id, size_blocks);
        state.uuids.current = sb.current_uuid;
        state.uuids.history.copy_from_slice(&sb.history_uuids[..HISTORY_UUIDS_MAX]);
        let mut peer_outdated = 0u64;
        for n in 0..=usize::from(NODE_ID_MAX) {
            state.uuids.bitmap[n] = sb.peers[n].bitmap_uuid;
            if sb.peers[n].flags & peer_flags::OUTDATED != 0 {
                peer_outdated |= 1u64 << n;
            }
            if let Some(Some(words)) = loaded.bitmaps.get(n) {
                state.bitmaps[n] =
                    Bitmap::from_words(size_blocks, words.clone()).map_err(|_| V09Error::Meta {
                        path: path.to_owned(),
                        source: MetaError::InvalidField { field: "bitmap", value: 0 },
                    })?;
            }
        }
        let consistent = sb.flags & md_flags::CONSISTENT != 0;
        state.flags = MetaFlags {
            disk: match (consistent, sb.flags & md_flags::WAS_UP_TO_DATE != 0) {
                (false, _) => PersistedDisk::Inconsistent,
                (true, false) => PersistedDisk::Outdated,
                (true, true) => PersistedDisk::UpToDate,
            },
            primary_indicator: sb.flags & md_flags::PRIMARY_IND != 0,
            crashed_primary: sb.flags & md_flags::CRASHED_PRIMARY != 0,
            full_sync_required: sb.peers[node_id.index()].flags & peer_flags::FULL_SYNC != 0,
            peer_outdated,
        };
        state.activity_log = loaded.hot_extents.iter().map(|e| u64::from(*e)).collect();
        let store = Self {
            path: path.to_owned(),
            file,
            image,
            state: state.clone(),
            in_use: false,
            dsync: None,
        };
        store.run(&loaded.repair)?;
        Ok((store, state))
    }

    /// Marks the activity log as in use, as DRBD does when it attaches: clears the superblock's
    /// "AL clean" flag, so drbdadm's `apply-al` before a kernel attach replays or resets the
    /// ring instead of trusting it. Closing the store sets it again when that is safe (Drop).
    pub fn begin_use(&mut self) -> Result<(), V09Error> {
        let path = self.path.clone();
        let plan = self
            .image
            .update_superblock(|sb| sb.flags &= !md_flags::AL_CLEAN)
            .map_err(Self::meta_error(&path))?;
        self.run(&plan)?;
        self.in_use = true;
        Ok(())
    }

    /// Usable data bytes of the layout (internal: everything below the bitmap).
    pub fn data_area_bytes(&self) -> u64 {
        self.image.layout().data_size_bytes
    }

    fn plan(&mut self, update: &MetaUpdate) -> Result<WritePlan, MetaError> {
        match update {
            MetaUpdate::Resize { .. } => unreachable!("applied by relocate_internal"),
            MetaUpdate::Uuids(uuids) => self.image.update_superblock(|sb| {
                sb.current_uuid = uuids.current;
                sb.history_uuids[..HISTORY_UUIDS_MAX].copy_from_slice(&uuids.history);
                for (slot, uuid) in sb.peers.iter_mut().zip(uuids.bitmap) {
                    slot.bitmap_uuid = uuid;
                }
            }),
            MetaUpdate::Flags(flags) => {
                let own = self.state.node_id.index();
                self.image.update_superblock(|sb| {
                    let mut f = sb.flags
                        & !(md_flags::CONSISTENT
                            | md_flags::WAS_UP_TO_DATE
                            | md_flags::PRIMARY_IND
                            | md_flags::CRASHED_PRIMARY);
                    f |= match flags.disk {
                        PersistedDisk::Inconsistent => 0,
                        PersistedDisk::Outdated => md_flags::CONSISTENT,
                        PersistedDisk::UpToDate => md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE,
                    };
                    if flags.primary_indicator {
                        f |= md_flags::PRIMARY_IND;
                    }
                    if flags.crashed_primary {
                        f |= md_flags::CRASHED_PRIMARY;
                    }
                    sb.flags = f;
                    for (n, slot) in sb.peers.iter_mut().enumerate() {
                        slot.flags &= !(peer_flags::OUTDATED | peer_flags::FULL_SYNC);
                        if n != own && flags.peer_outdated & (1u64 << n) != 0 {
                            slot.flags |= peer_flags::OUTDATED;
                        }
                        if n == own && flags.full_sync_required {
                            slot.flags |= peer_flags::FULL_SYNC;
                        }
                    }
                })
            }
            MetaUpdate::BitmapSet { peer, first_block, blocks }
            | MetaUpdate::BitmapClear { peer, first_block, blocks } => {
                let words: Vec<&[u64]> = self.state.bitmaps.iter().map(Bitmap::words).collect();
                self.image.bitmap_writes(peer.0, *first_block, *blocks, &words)
            }
            MetaUpdate::ActivityLog { added, removed } => {
                let to_u32 = |v: &Vec<u64>| {
                    v.iter()
                        .map(|e| u32::try_from(*e).expect("extent fits u32"))
                        .collect::<Vec<_>>()
                };
                self.image.al_change(&to_u32(added), &to_u32(removed))
            }
        }
    }

    /// Applies updates in order; each one's plan is durable before the next is planned.
    pub fn apply_all(&mut self, updates: &[MetaUpdate]) -> Result<(), V09Error> {
        for update in updates {
            self.apply(update)?;
        }
        Ok(())
    }
}

impl Drop for V09File {
    /// The engine let go of its metadata (`down` ends its runtime, dropping the store). A
    /// Secondary (no primary flag) has nothing in its activity log that a peer lacks, which is
    /// why apply-al only resets such a ring: mark it clean, as DRBD does on a clean detach, so
    /// drbdmeta and the kernel see clean metadata. A primary's flag stays off: its ring must be
    /// replayed (apply-al) first. Not while unwinding from a panic (a failed metadata write).
    fn drop(&mut self) {
        if !self.in_use || std::thread::panicking() {
            return;
        }
        if self.image.superblock().flags & md_flags::PRIMARY_IND != 0 {
            return;
        }
        let plan = self.image.update_superblock(|sb| sb.flags |= md_flags::AL_CLEAN);
        if let Err(error) =
            plan.map_err(|e| e.to_string()).and_then(|p| self.run(&p).map_err(|e| e.to_string()))
        {
            tracing::warn!(path = %self.path.display(), %error, "marking the activity log clean");
        }
    }
}

impl MetadataStore for V09File {
    type Error = V09Error;

    fn load(&mut self) -> Result<Metadata, V09Error> {
        Ok(self.state.clone())
    }

    fn apply(&mut self, update: &MetaUpdate) -> Result<(), V09Error> {
        if let MetaUpdate::Resize { size_blocks } = update {
            return self.relocate_internal(*size_blocks);
        }
        // The bitmap pages are encoded from the new words, so apply to the logical state first.
        self.state.apply(update);
        let path = self.path.clone();
        let plan = self.plan(update).map_err(Self::meta_error(&path))?;
        match update {
            // An extent joining the log needs only its transaction durable before the writes
            // to it start. One that leaves needs more: the writes to it completed must be
            // durable too (after a crash only the log's extents are resynced), which the
            // whole-file fdatasync gives, as DRBD's flush before an AL write does.
            MetaUpdate::ActivityLog { removed, .. } if removed.is_empty() => {
                self.run_own_writes(&plan)
            }
            _ => self.run(&plan),
        }
    }
}

#[path = "meta_v09_resize.rs"]
mod resize_record;
pub use resize_record::grow_backing_file;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uuid::GenerationUuids;

    #[test]
    fn updates_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("md.img");
        let (mut store, meta) = V09File::open_or_create(&path, NodeId(0), 5000, 1, 61).unwrap();
        assert_eq!(meta, Metadata::create(NodeId(0), 5000));
        let mut uuids = GenerationUuids::just_created();
        uuids.current = 0x1000;
        uuids.bitmap[1] = 0x800;
        uuids.history[..2].copy_from_slice(&[0x600, 0x400]);
        store.apply(&MetaUpdate::Uuids(uuids.clone())).unwrap();
        store
            .apply(&MetaUpdate::BitmapSet { peer: NodeId(1), first_block: 100, blocks: 300 })
            .unwrap();
        store
            .apply(&MetaUpdate::BitmapClear { peer: NodeId(1), first_block: 150, blocks: 10 })
            .unwrap();
        store.apply(&MetaUpdate::ActivityLog { added: vec![0, 1], removed: vec![] }).unwrap();
        let mut flags = meta.flags.clone();
        flags.disk = PersistedDisk::UpToDate;
        flags.primary_indicator = true;
        flags.peer_outdated = 1 << 1;
        store.apply(&MetaUpdate::Flags(flags.clone())).unwrap();
        drop(store);
        let (_, loaded) = V09File::open_or_create(&path, NodeId(0), 5000, 1, 61).unwrap();
        assert_eq!(loaded.uuids, uuids);
        assert_eq!(loaded.flags, flags);
        assert_eq!(loaded.bitmaps[1].count(), 290);
        assert!(loaded.bitmaps[1].test(100) && !loaded.bitmaps[1].test(155));
        let mut hot = loaded.activity_log.clone();
        hot.sort_unstable();
        assert_eq!(hot, vec![0, 1]);
    }
}

//! The v09 superblock, byte-exact with drbdmeta, and Tandem's torn-write protection for it.
//!
//! Field offsets (big-endian, measured by hexdumping files drbdmeta wrote with distinct values
//! through `restore-md`):
//!
//! | offset | field | | offset | field |
//! |---|---|---|---|---|
//! | 0x00 | u64 effective size (la-size-sect) | | 0x50 | u32 bm_bytes_per_bit (4096) |
//! | 0x08 | u64 current UUID | | 0x54 | u32 la-peer-max-bio-size |
//! | 0x10 | u64 reserved x4 | | 0x58 | u32 max peers |
//! | 0x30 | u64 device UUID | | 0x5c | s32 node id (-1 = unset) |
//! | 0x38 | u32 flags | | 0x60 | u32 al stripes |
//! | 0x3c | u32 magic 0x8374026d | | 0x64 | u32 al stripe size (4 KiB units) |
//! | 0x40 | u32 md_size_sect | | 0x68 | u32 reserved x2 |
//! | 0x44 | s32 al_offset (sectors from the superblock) | | 0x70 | 32 peer slots of 32 bytes |
//! | 0x48 | u32 al-extents | | 0x470 | u64 history UUIDs x32 |
//! | 0x4c | s32 bm_offset (sectors from the superblock) | | 0x570 | end; zero to 4 KiB |
//!
//! Peer slot (32 bytes): u64 bitmap UUID, u64 bitmap dagtag, u32 flags, s32 bitmap index
//! (-1 = no bitmap slot), u32 reserved x2.
//!
//! DRBD's superblock has no checksum, and drbdmeta and the kernel write the whole 4 KiB block
//! with zero padding after 0x570. Tandem keeps the DRBD structure at offset 0 untouched (so
//! drbdmeta and the kernel read it) and uses the padding for a second, checksummed copy:
//!
//! ```text
//! sectors 0-2: primary copy (0x000..0x570) ... trailer A at 0x5e0 (magic, seq, crc32c)
//! sectors 3-5: backup copy  (0x600..0xb70) ... trailer B at 0xbe0
//! sectors 6-7: zero
//! ```
//!
//! An update writes the block twice, flushing in between: first with only the copy that does
//! not hold the newest state changed, then with both. A write torn at sector boundaries can
//! only damage the copy that write changed, so one intact copy always remains; its CRC and
//! sequence number identify it. A foreign writer (drbdmeta, kernel DRBD) zeroes the padding,
//! which leaves a primary copy without a trailer and no backup: then the primary is trusted,
//! as DRBD itself trusts it.

use super::constants::{
    AL_EXTENTS_CREATE_MD, BACKUP_COPY_OFFSET, BACKUP_TRAILER_OFFSET, BM_BLOCK_SIZE_BYTES,
    HISTORY_UUIDS, MAX_PEERS_MAX, MD_BLOCK_SIZE_BYTES, MD_MAGIC_09, NODE_SLOTS,
    PRIMARY_TRAILER_OFFSET, SUPERBLOCK_STRUCT_BYTES, TANDEM_TRAILER_BYTES, TANDEM_TRAILER_MAGIC,
    TANDEM_TRAILER_VERSION, UUID_JUST_CREATED,
};
use super::layout::{AlGeometry, MetaLayout, MetaPlacement};
use super::{MetaError, be_u32, be_u64, put_be_u32, put_be_u64};

/// Device flags (the superblock's `flags`), named as `drbdmeta show-gi` explains them.
pub mod md_flags {
    /// "Data consistency flag".
    pub const CONSISTENT: u32 = 0x1;
    /// "Node was/is currently primary"; drbdmeta apply-al only replays the AL when set.
    pub const PRIMARY_IND: u32 = 0x2;
    /// "Data was/is currently up-to-date".
    pub const WAS_UP_TO_DATE: u32 = 0x10;
    /// "This node was a crashed primary, and has not seen its peer since".
    pub const CRASHED_PRIMARY: u32 = 0x40;
    /// "The activity-log was applied, the disk can be attached" (set by create-md, apply-al).
    pub const AL_CLEAN: u32 = 0x80;
    /// "The activity-log was disabled, peer is completely out of sync".
    pub const AL_DISABLED: u32 = 0x100;
    /// "This node was primary when it lost quorum".
    pub const PRIMARY_LOST_QUORUM: u32 = 0x200;
}

/// Per-peer flags (a peer slot's `flags`), named as dump-md comments them.
pub mod peer_flags {
    /// "Node was/is currently connected".
    pub const CONNECTED: u32 = 0x1;
    /// "The peer's disk was out-dated or inconsistent" (dump-md: `<=outdated`).
    pub const OUTDATED: u32 = 0x2;
    /// "A fence policy other the dont-care was used".
    pub const FENCING: u32 = 0x4;
    /// "Node was in the progress of marking all blocks as out of sync".
    pub const FULL_SYNC: u32 = 0x8;
    /// "At least once we saw this node with a backing device attached" (dump-md: `seen`).
    pub const DEVICE_SEEN: u32 = 0x10;
    /// The node is configured (dump-md: `exists`).
    pub const NODE_EXISTS: u32 = 0x1_0000;
}

/// One node's slot in the superblock, indexed by that node's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSlot {
    /// Generation UUID the bitmap for this peer started at (0: no bitmap in use).
    pub bitmap_uuid: u64,
    pub bitmap_dagtag: u64,
    pub flags: u32,
    /// Which of the `max_peers` bitmaps belongs to this node; -1 for none.
    pub bitmap_index: i32,
    /// Kept verbatim so a decode/encode round trip is byte-exact.
    pub reserved: [u32; 2],
}

impl Default for PeerSlot {
    fn default() -> Self {
        Self { bitmap_uuid: 0, bitmap_dagtag: 0, flags: 0, bitmap_index: -1, reserved: [0; 2] }
    }
}

/// The v09 superblock. Generation UUIDs are plain u64; `uuid.rs` owns their meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Last agreed data size in sectors (dump-md `la-size-sect`).
    pub effective_size_sectors: u64,
    pub current_uuid: u64,
    pub reserved_u64: [u64; 4],
    pub device_uuid: u64,
    /// See [`md_flags`].
    pub flags: u32,
    pub md_size_sectors: u32,
    pub al_offset_sectors: i32,
    /// Slots of the activity log (drbd.conf `al-extents`).
    pub al_extents: u32,
    pub bm_offset_sectors: i32,
    pub bm_bytes_per_bit: u32,
    /// Last peer max bio size (dump-md `la-peer-max-bio-size`).
    pub peer_max_bio_size_bytes: u32,
    pub max_peers: u32,
    /// This node's id, -1 until one is assigned.
    pub node_id: i32,
    pub al_stripes: u32,
    pub al_stripe_size_4k: u32,
    pub reserved_u32: [u32; 2],
    /// Indexed by node id.
    pub peers: [PeerSlot; NODE_SLOTS],
    pub history_uuids: [u64; HISTORY_UUIDS],
}

const PEERS_OFFSET: usize = 0x70;
const PEER_SLOT_BYTES: usize = 32;
const HISTORY_OFFSET: usize = PEERS_OFFSET + NODE_SLOTS * PEER_SLOT_BYTES;

fn be_i32(buffer: &[u8], offset: usize) -> i32 {
    i32::from_be_bytes(be_u32(buffer, offset).to_be_bytes())
}

fn put_be_i32(buffer: &mut [u8], offset: usize, value: i32) {
    buffer[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
}

impl Superblock {
    /// The superblock `drbdmeta create-md` writes for this layout: current UUID "just
    /// created", AL clean, no node id, no bitmap slots assigned, al-extents 257, size 0.
    pub fn created(layout: &MetaLayout) -> Self {
        Self {
            effective_size_sectors: 0,
            current_uuid: UUID_JUST_CREATED,
            reserved_u64: [0; 4],
            device_uuid: 0,
            flags: md_flags::AL_CLEAN,
            md_size_sectors: layout.md_size_sectors_u32(),
            al_offset_sectors: layout.al_offset_sectors(),
            al_extents: AL_EXTENTS_CREATE_MD,
            bm_offset_sectors: layout.bm_offset_sectors(),
            bm_bytes_per_bit: u32::try_from(BM_BLOCK_SIZE_BYTES).expect("4096 fits u32"),
            peer_max_bio_size_bytes: 0,
            max_peers: layout.max_peers,
            node_id: -1,
            al_stripes: layout.al.stripes,
            al_stripe_size_4k: layout.al.stripe_size_4k,
            reserved_u32: [0; 2],
            peers: [PeerSlot::default(); NODE_SLOTS],
            history_uuids: [0; HISTORY_UUIDS],
        }
    }

    /// The DRBD structure alone (0x570 bytes).
    pub fn encode(&self) -> [u8; SUPERBLOCK_STRUCT_BYTES] {
        let mut out = [0u8; SUPERBLOCK_STRUCT_BYTES];
        put_be_u64(&mut out, 0x00, self.effective_size_sectors);
        put_be_u64(&mut out, 0x08, self.current_uuid);
        for (i, value) in self.reserved_u64.iter().enumerate() {
            put_be_u64(&mut out, 0x10 + 8 * i, *value);
        }
        put_be_u64(&mut out, 0x30, self.device_uuid);
        put_be_u32(&mut out, 0x38, self.flags);
        put_be_u32(&mut out, 0x3c, MD_MAGIC_09);
        put_be_u32(&mut out, 0x40, self.md_size_sectors);
        put_be_i32(&mut out, 0x44, self.al_offset_sectors);
        put_be_u32(&mut out, 0x48, self.al_extents);
        put_be_i32(&mut out, 0x4c, self.bm_offset_sectors);
        put_be_u32(&mut out, 0x50, self.bm_bytes_per_bit);
        put_be_u32(&mut out, 0x54, self.peer_max_bio_size_bytes);
        put_be_u32(&mut out, 0x58, self.max_peers);
        put_be_i32(&mut out, 0x5c, self.node_id);
        put_be_u32(&mut out, 0x60, self.al_stripes);
        put_be_u32(&mut out, 0x64, self.al_stripe_size_4k);
        put_be_u32(&mut out, 0x68, self.reserved_u32[0]);
        put_be_u32(&mut out, 0x6c, self.reserved_u32[1]);
        for (i, peer) in self.peers.iter().enumerate() {
            let base = PEERS_OFFSET + i * PEER_SLOT_BYTES;
            put_be_u64(&mut out, base, peer.bitmap_uuid);
            put_be_u64(&mut out, base + 8, peer.bitmap_dagtag);
            put_be_u32(&mut out, base + 16, peer.flags);
            put_be_i32(&mut out, base + 20, peer.bitmap_index);
            put_be_u32(&mut out, base + 24, peer.reserved[0]);
            put_be_u32(&mut out, base + 28, peer.reserved[1]);
        }
        for (i, uuid) in self.history_uuids.iter().enumerate() {
            put_be_u64(&mut out, HISTORY_OFFSET + 8 * i, *uuid);
        }
        out
    }

    /// The 4 KiB block exactly as drbdmeta writes it: the structure and zero padding, no
    /// Tandem copy. Use [`SuperblockWriter`] for crash-safe updates.
    pub fn encode_drbd_block(&self) -> Box<[u8; MD_BLOCK_SIZE_BYTES]> {
        let mut block = Box::new([0u8; MD_BLOCK_SIZE_BYTES]);
        block[..SUPERBLOCK_STRUCT_BYTES].copy_from_slice(&self.encode());
        block
    }

    /// Decodes and validates the DRBD structure at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, MetaError> {
        if bytes.len() < SUPERBLOCK_STRUCT_BYTES {
            return Err(MetaError::BufferSize {
                len: bytes.len(),
                expected: SUPERBLOCK_STRUCT_BYTES,
            });
        }
        let magic = be_u32(bytes, 0x3c);
        if magic != MD_MAGIC_09 {
            return Err(MetaError::BadMagic { found: magic, expected: MD_MAGIC_09 });
        }
        let mut peers = [PeerSlot::default(); NODE_SLOTS];
        for (i, peer) in peers.iter_mut().enumerate() {
            let base = PEERS_OFFSET + i * PEER_SLOT_BYTES;
            *peer = PeerSlot {
                bitmap_uuid: be_u64(bytes, base),
                bitmap_dagtag: be_u64(bytes, base + 8),
                flags: be_u32(bytes, base + 16),
                bitmap_index: be_i32(bytes, base + 20),
                reserved: [be_u32(bytes, base + 24), be_u32(bytes, base + 28)],
            };
        }
        let mut history_uuids = [0u64; HISTORY_UUIDS];
        for (i, uuid) in history_uuids.iter_mut().enumerate() {
            *uuid = be_u64(bytes, HISTORY_OFFSET + 8 * i);
        }
        let mut reserved_u64 = [0u64; 4];
        for (i, value) in reserved_u64.iter_mut().enumerate() {
            *value = be_u64(bytes, 0x10 + 8 * i);
        }
        let superblock = Self {
            effective_size_sectors: be_u64(bytes, 0x00),
            current_uuid: be_u64(bytes, 0x08),
            reserved_u64,
            device_uuid: be_u64(bytes, 0x30),
            flags: be_u32(bytes, 0x38),
            md_size_sectors: be_u32(bytes, 0x40),
            al_offset_sectors: be_i32(bytes, 0x44),
            al_extents: be_u32(bytes, 0x48),
            bm_offset_sectors: be_i32(bytes, 0x4c),
            bm_bytes_per_bit: be_u32(bytes, 0x50),
            peer_max_bio_size_bytes: be_u32(bytes, 0x54),
            max_peers: be_u32(bytes, 0x58),
            node_id: be_i32(bytes, 0x5c),
            al_stripes: be_u32(bytes, 0x60),
            al_stripe_size_4k: be_u32(bytes, 0x64),
            reserved_u32: [be_u32(bytes, 0x68), be_u32(bytes, 0x6c)],
            peers,
            history_uuids,
        };
        superblock.validate()?;
        Ok(superblock)
    }

    /// Checks every field whose value later code relies on (sizes, indexes, geometry), so a
    /// garbage block is an error here rather than a panic later.
    pub fn validate(&self) -> Result<(), MetaError> {
        let invalid =
            |field: &'static str, value: i64| Err(MetaError::InvalidField { field, value });
        if u64::from(self.bm_bytes_per_bit) != BM_BLOCK_SIZE_BYTES {
            return invalid("bm_bytes_per_bit", i64::from(self.bm_bytes_per_bit));
        }
        if !(1..=MAX_PEERS_MAX).contains(&self.max_peers) {
            return invalid("max_peers", i64::from(self.max_peers));
        }
        let node_id_max = i32::try_from(NODE_SLOTS).expect("32 fits i32") - 1;
        if !(-1..=node_id_max).contains(&self.node_id) {
            return invalid("node_id", i64::from(self.node_id));
        }
        let geometry = self.al_geometry()?;
        if self.al_extents == 0 || self.al_extents > geometry.al_extents_max() {
            return Err(MetaError::AlExtents {
                al_extents: self.al_extents,
                max: geometry.al_extents_max(),
            });
        }
        if self.md_size_sectors == 0 {
            return invalid("md_size_sectors", 0);
        }
        let bitmap_index_max = i32::try_from(self.max_peers).expect("max_peers <= 31") - 1;
        let mut owners = 0u32;
        for peer in &self.peers {
            if !(-1..=bitmap_index_max).contains(&peer.bitmap_index) {
                return invalid("bitmap_index", i64::from(peer.bitmap_index));
            }
            // Two nodes sharing a bitmap would each see the other's out-of-sync blocks.
            if let Ok(index) = u32::try_from(peer.bitmap_index) {
                if owners & (1 << index) != 0 {
                    return invalid("bitmap_index (shared by two nodes)", i64::from(index));
                }
                owners |= 1 << index;
            }
        }
        Ok(())
    }

    /// The activity-log ring this superblock describes.
    pub fn al_geometry(&self) -> Result<AlGeometry, MetaError> {
        AlGeometry::new(self.al_stripes, self.al_stripe_size_4k)
    }

    /// Whether the offsets and sizes recorded here are the ones `layout` computes: a
    /// superblock from another device size or peer count must not be trusted blindly.
    pub fn matches_layout(&self, layout: &MetaLayout) -> bool {
        self.md_size_sectors == layout.md_size_sectors_u32()
            && self.al_offset_sectors == layout.al_offset_sectors()
            && self.bm_offset_sectors == layout.bm_offset_sectors()
            && self.max_peers == layout.max_peers
            && self.al_stripes == layout.al.stripes
            && self.al_stripe_size_4k == layout.al.stripe_size_4k
    }

    /// The layout this superblock describes on a device of `device_size_bytes` (for external
    /// metadata: the metadata device), verified against the offsets it records. Use this on
    /// attach: a superblock from another size, peer count or ring geometry is refused.
    pub fn layout(
        &self,
        placement: MetaPlacement,
        device_size_bytes: u64,
    ) -> Result<MetaLayout, MetaError> {
        let al = self.al_geometry()?;
        let layout = match placement {
            MetaPlacement::Internal => MetaLayout::internal(device_size_bytes, self.max_peers, al)?,
            MetaPlacement::FlexExternal => {
                MetaLayout::flex_external(device_size_bytes, self.max_peers, al)?
            }
            MetaPlacement::IndexedExternal { index } => {
                MetaLayout::indexed_external(device_size_bytes, index, self.max_peers, al)?
            }
        };
        if !self.matches_layout(&layout) {
            return Err(MetaError::InvalidField {
                field: "md_size_sect/al_offset/bm_offset for this device size",
                value: i64::from(self.md_size_sectors),
            });
        }
        Ok(layout)
    }

    /// The node id owning bitmap slot `bitmap_index`, if any.
    pub fn node_for_bitmap_index(&self, bitmap_index: u32) -> Option<usize> {
        let wanted = i32::try_from(bitmap_index).ok()?;
        self.peers.iter().position(|p| p.bitmap_index == wanted)
    }
}

/// Which copy of the superblock a read trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockCopy {
    /// The DRBD structure at offset 0 (what drbdmeta and the kernel read).
    Primary,
    /// Tandem's backup copy in the padding.
    Backup,
}

/// The result of reading a superblock block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockRead {
    pub superblock: Superblock,
    pub copy: SuperblockCopy,
    /// Tandem's sequence number of the trusted copy; None when a foreign writer (drbdmeta,
    /// kernel DRBD) wrote it.
    pub sequence: Option<u64>,
    /// One copy is damaged or stale (a crash interrupted an update): write the superblock
    /// again before relying on the primary copy being readable by drbdmeta.
    pub needs_repair: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CopyState {
    /// Intact and written by Tandem with this sequence number.
    Tandem(u64, Superblock),
    /// A valid DRBD structure without Tandem's trailer.
    Foreign(Superblock),
    /// All zero: nothing was ever written here (the backup after a foreign write).
    Absent,
    /// Damaged: a torn write, or garbage.
    Damaged,
}

fn encode_trailer(copy: &[u8; SUPERBLOCK_STRUCT_BYTES], sequence: u64) -> [u8; 32] {
    let mut trailer = [0u8; TANDEM_TRAILER_BYTES];
    put_be_u32(&mut trailer, 0, TANDEM_TRAILER_MAGIC);
    put_be_u32(&mut trailer, 4, TANDEM_TRAILER_VERSION);
    put_be_u64(&mut trailer, 8, sequence);
    let crc = trailer_crc(copy, &trailer);
    put_be_u32(&mut trailer, 16, crc);
    trailer
}

/// CRC-32C over the copy and the trailer's magic, version and sequence number.
fn trailer_crc(copy: &[u8], trailer: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(copy), &trailer[..16])
}

fn read_copy(block: &[u8], copy_offset: usize, trailer_offset: usize) -> CopyState {
    let copy = &block[copy_offset..copy_offset + SUPERBLOCK_STRUCT_BYTES];
    let trailer = &block[trailer_offset..trailer_offset + TANDEM_TRAILER_BYTES];
    // Tandem only ever leaves its own trailer or zeros here. Anything else came from another
    // writer (drbdmeta and the kernel zero the padding; a future DRBD might use it): then the
    // copy stands or falls by its DRBD structure alone.
    let tandem_trailer = be_u32(trailer, 0) == TANDEM_TRAILER_MAGIC;
    if !tandem_trailer {
        if copy.iter().all(|&b| b == 0) {
            return CopyState::Absent;
        }
        return match Superblock::decode(copy) {
            Ok(superblock) => CopyState::Foreign(superblock),
            Err(_) => CopyState::Damaged,
        };
    }
    if be_u32(trailer, 4) != TANDEM_TRAILER_VERSION
        || be_u32(trailer, 16) != trailer_crc(copy, trailer)
    {
        return CopyState::Damaged;
    }
    match Superblock::decode(copy) {
        Ok(superblock) => CopyState::Tandem(be_u64(trailer, 8), superblock),
        Err(_) => CopyState::Damaged,
    }
}

/// Reads a superblock block: picks the newest intact copy (see the module comment).
pub fn read_superblock_block(block: &[u8]) -> Result<SuperblockRead, MetaError> {
    if block.len() != MD_BLOCK_SIZE_BYTES {
        return Err(MetaError::BufferSize { len: block.len(), expected: MD_BLOCK_SIZE_BYTES });
    }
    let primary = read_copy(block, 0, PRIMARY_TRAILER_OFFSET);
    let backup = read_copy(block, BACKUP_COPY_OFFSET, BACKUP_TRAILER_OFFSET);
    let pick = |superblock: Superblock, copy, sequence, needs_repair| {
        Ok(SuperblockRead { superblock, copy, sequence, needs_repair })
    };
    use CopyState::{Absent, Damaged, Foreign, Tandem};
    match (primary, backup) {
        (Tandem(a, primary), Tandem(b, backup)) => {
            if b > a {
                pick(backup, SuperblockCopy::Backup, Some(b), true)
            } else {
                let stale = a != b || primary != backup;
                pick(primary, SuperblockCopy::Primary, Some(a), stale)
            }
        }
        (Tandem(a, primary), Absent | Damaged | Foreign(_)) => {
            pick(primary, SuperblockCopy::Primary, Some(a), true)
        }
        // A Tandem backup next to a primary without a valid trailer only exists mid-update:
        // foreign writers zero the backup. The primary may be a torn mix, so trust the backup.
        (Foreign(_) | Damaged | Absent, Tandem(b, backup)) => {
            pick(backup, SuperblockCopy::Backup, Some(b), true)
        }
        (Foreign(primary), Absent) => pick(primary, SuperblockCopy::Primary, None, false),
        // The backup is damaged only by a torn first write over a foreign block, which left the
        // primary intact; nothing needs rewriting (and the padding may not even be ours).
        (Foreign(primary), Damaged | Foreign(_)) => {
            pick(primary, SuperblockCopy::Primary, None, false)
        }
        (Damaged | Absent, Damaged | Absent | Foreign(_)) => {
            // The primary copy alone decides the error: its magic tells "no metadata here"
            // apart from "metadata destroyed".
            match Superblock::decode(&block[..SUPERBLOCK_STRUCT_BYTES]) {
                Err(e @ MetaError::BadMagic { .. }) if !has_trailer(block) => Err(e),
                _ => Err(MetaError::SuperblockUnreadable),
            }
        }
    }
}

fn has_trailer(block: &[u8]) -> bool {
    be_u32(block, PRIMARY_TRAILER_OFFSET) == TANDEM_TRAILER_MAGIC
}

/// The two writes of one superblock update. Write `first`, flush (or FUA), then `second`,
/// flush; only then is the update durable. After a crash anywhere in between,
/// [`read_superblock_block`] returns either the old or the new superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockUpdate {
    pub first: Box<[u8; MD_BLOCK_SIZE_BYTES]>,
    pub second: Box<[u8; MD_BLOCK_SIZE_BYTES]>,
    pub sequence: u64,
}

/// Keeps what is on disk so each update changes one copy at a time.
#[derive(Debug, Clone)]
pub struct SuperblockWriter {
    on_disk: Box<[u8; MD_BLOCK_SIZE_BYTES]>,
    /// The copy holding the newest intact state; the other one is written first.
    newest: SuperblockCopy,
    sequence: u64,
}

impl SuperblockWriter {
    /// Starts from a block read from disk (written by Tandem, drbdmeta or kernel DRBD).
    pub fn open(block: &[u8]) -> Result<(Self, SuperblockRead), MetaError> {
        let read = read_superblock_block(block)?;
        let mut on_disk = Box::new([0u8; MD_BLOCK_SIZE_BYTES]);
        on_disk.copy_from_slice(block);
        let writer = Self { on_disk, newest: read.copy, sequence: read.sequence.unwrap_or(0) };
        Ok((writer, read))
    }

    /// A new superblock block with both copies; the caller writes it once (over a device
    /// that holds no metadata, nothing can be lost by a torn write).
    pub fn create(superblock: &Superblock) -> (Self, Box<[u8; MD_BLOCK_SIZE_BYTES]>) {
        let sequence = 1;
        let mut block = Box::new([0u8; MD_BLOCK_SIZE_BYTES]);
        write_copy(&mut block, SuperblockCopy::Primary, superblock, sequence);
        write_copy(&mut block, SuperblockCopy::Backup, superblock, sequence);
        let writer = Self { on_disk: block.clone(), newest: SuperblockCopy::Primary, sequence };
        (writer, block)
    }

    /// Plans the two writes that replace the on-disk superblock by `superblock`. The writer
    /// assumes both writes reach the disk before the next call (or the process dies and the
    /// next run starts from [`SuperblockWriter::open`]).
    pub fn update(&mut self, superblock: &Superblock) -> SuperblockUpdate {
        self.sequence += 1;
        let stale = match self.newest {
            SuperblockCopy::Primary => SuperblockCopy::Backup,
            SuperblockCopy::Backup => SuperblockCopy::Primary,
        };
        let mut first = self.on_disk.clone();
        write_copy(&mut first, stale, superblock, self.sequence);
        let mut second = first.clone();
        write_copy(&mut second, self.newest, superblock, self.sequence);
        // Sectors 6-7 hold nothing; keep them zero so the block is canonical.
        second[BACKUP_TRAILER_OFFSET + TANDEM_TRAILER_BYTES..].fill(0);
        self.on_disk = second.clone();
        self.newest = SuperblockCopy::Primary;
        SuperblockUpdate { first, second, sequence: self.sequence }
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The block as it is on disk after the last planned update.
    pub fn on_disk(&self) -> &[u8; MD_BLOCK_SIZE_BYTES] {
        &self.on_disk
    }
}

fn write_copy(
    block: &mut [u8; MD_BLOCK_SIZE_BYTES],
    copy: SuperblockCopy,
    superblock: &Superblock,
    sequence: u64,
) {
    let (copy_offset, trailer_offset) = match copy {
        SuperblockCopy::Primary => (0, PRIMARY_TRAILER_OFFSET),
        SuperblockCopy::Backup => (BACKUP_COPY_OFFSET, BACKUP_TRAILER_OFFSET),
    };
    let encoded = superblock.encode();
    block[copy_offset..copy_offset + SUPERBLOCK_STRUCT_BYTES].copy_from_slice(&encoded);
    // The gap between the structure and the trailer stays zero.
    block[copy_offset + SUPERBLOCK_STRUCT_BYTES..trailer_offset].fill(0);
    block[trailer_offset..trailer_offset + TANDEM_TRAILER_BYTES]
        .copy_from_slice(&encode_trailer(&encoded, sequence));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::constants::SECTOR_SIZE_BYTES;
    use proptest::prelude::*;

    fn layout() -> MetaLayout {
        MetaLayout::internal(1 << 30, 2, AlGeometry::default()).unwrap()
    }

    fn sample(seed: u64) -> Superblock {
        let mut sb = Superblock::created(&layout());
        sb.current_uuid = 0x1122_3344_5566_7788 ^ seed;
        sb.effective_size_sectors = 2_096_952;
        sb.device_uuid = 0xdead_beef_cafe_f00d;
        sb.flags = md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE;
        sb.node_id = 3;
        sb.peers[1] = PeerSlot {
            bitmap_uuid: 0xaaaa_bbbb_cccc_ddd1,
            bitmap_dagtag: 0x0102_0304_0506_0708,
            flags: peer_flags::CONNECTED | peer_flags::OUTDATED | peer_flags::DEVICE_SEEN,
            bitmap_index: 0,
            reserved: [0; 2],
        };
        sb.history_uuids[0] = 0x1000 + seed;
        sb
    }

    /// The superblock block drbdmeta wrote for `restore-md` of a dump with these values,
    /// first 0xb0 bytes (the rest: empty peer slots with bitmap index -1, then history).
    const RESTORED_HEAD: &str = "
        0000 0000 001f ff38 1122 3344 5566 7788
        0000 0000 0000 0000 0000 0000 0000 0000
        0000 0000 0000 0000 0000 0000 0000 0000
        dead beef cafe f00d 0000 0091 8374 026d
        0000 00c8 ffff ffc0 0000 0101 ffff ff40
        0000 1000 0010 0000 0000 0002 0000 0003
        0000 0001 0000 0008 0000 0000 0000 0000
        0000 0000 0000 0000 0000 0000 0000 0000
        0000 0000 ffff ffff 0000 0000 0000 0000
        aaaa bbbb cccc ddd1 0102 0304 0506 0708
        0001 0013 0000 0000 0000 0000 0000 0000";

    fn unhex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn encoding_matches_bytes_drbdmeta_wrote() {
        let mut sb = Superblock::created(&layout());
        sb.effective_size_sectors = 2_096_952;
        sb.current_uuid = 0x1122_3344_5566_7788;
        sb.device_uuid = 0xdead_beef_cafe_f00d;
        sb.flags = 0x91;
        sb.peer_max_bio_size_bytes = 1_048_576;
        sb.node_id = 3;
        sb.peers[1] = PeerSlot {
            bitmap_uuid: 0xaaaa_bbbb_cccc_ddd1,
            bitmap_dagtag: 0x0102_0304_0506_0708,
            flags: 0x0001_0013,
            bitmap_index: 0,
            reserved: [0; 2],
        };
        let expected = unhex(RESTORED_HEAD);
        assert_eq!(&sb.encode()[..expected.len()], &expected[..]);
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn created_superblock_has_create_md_values() {
        let sb = Superblock::created(&layout());
        let bytes = sb.encode();
        // From the hexdump of `create-md 2` on a 1 GiB file.
        let expected = unhex(
            "0000 0000 0000 0000 0000 0000 0000 0004
             0000 0000 0000 0000 0000 0000 0000 0000
             0000 0000 0000 0000 0000 0000 0000 0000
             0000 0000 0000 0000 0000 0080 8374 026d
             0000 00c8 ffff ffc0 0000 0101 ffff ff40
             0000 1000 0000 0000 0000 0002 ffff ffff
             0000 0001 0000 0008 0000 0000 0000 0000
             0000 0000 0000 0000 0000 0000 0000 0000
             0000 0000 ffff ffff 0000 0000 0000 0000",
        );
        assert_eq!(&bytes[..expected.len()], &expected[..]);
        assert!(sb.matches_layout(&layout()));
    }

    #[test]
    fn layout_is_recovered_from_the_superblock_and_checked() {
        let sb = sample(0);
        assert_eq!(sb.layout(MetaPlacement::Internal, 1 << 30).unwrap(), layout());
        // The same superblock on a bigger device (grown without resize) does not match.
        assert!(sb.layout(MetaPlacement::Internal, 2 << 30).is_err());
        assert!(sb.layout(MetaPlacement::FlexExternal, 1 << 30).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(Superblock::decode(&[0u8; 4096]), Err(MetaError::BadMagic { .. })));
        assert!(matches!(Superblock::decode(&[0u8; 10]), Err(MetaError::BufferSize { .. })));
        let mut shared = sample(1);
        shared.peers[5].bitmap_index = 0;
        assert!(matches!(
            Superblock::decode(&shared.encode()),
            Err(MetaError::InvalidField { .. })
        ));
        let mut bytes = sample(1).encode();
        put_be_u32(&mut bytes, 0x58, 40);
        assert!(matches!(
            Superblock::decode(&bytes),
            Err(MetaError::InvalidField { field: "max_peers", .. })
        ));
        assert!(read_superblock_block(&[0u8; 4096]).is_err());
        assert!(read_superblock_block(&[0xffu8; 4096]).is_err());
    }

    #[test]
    fn foreign_block_is_trusted_and_clean() {
        let sb = sample(0);
        let read = read_superblock_block(&sb.encode_drbd_block()[..]).unwrap();
        assert_eq!(read.superblock, sb);
        assert_eq!(read.sequence, None);
        assert!(!read.needs_repair);
    }

    #[test]
    fn foreign_data_in_the_padding_does_not_hide_the_drbd_structure() {
        let sb = sample(4);
        let mut block = sb.encode_drbd_block();
        block[0x570..].fill(0xa5);
        let read = read_superblock_block(&block[..]).unwrap();
        assert_eq!(read.superblock, sb);
        assert_eq!(
            (read.copy, read.sequence, read.needs_repair),
            (SuperblockCopy::Primary, None, false)
        );
    }

    /// Every way a 4 KiB write can tear at sector boundaries: any subset of the eight sectors
    /// made it to disk.
    fn tear(old: &[u8; 4096], new: &[u8; 4096], mask: u8) -> [u8; 4096] {
        let sector = usize::try_from(SECTOR_SIZE_BYTES).unwrap();
        let mut out = *old;
        for s in 0..8 {
            if mask & (1 << s) != 0 {
                out[s * sector..(s + 1) * sector]
                    .copy_from_slice(&new[s * sector..(s + 1) * sector]);
            }
        }
        out
    }

    fn check_every_tear(start: &[u8; 4096], old: &Superblock, new: &Superblock) {
        let (mut writer, _) = SuperblockWriter::open(start).unwrap();
        let update = writer.update(new);
        for mask in 0..=255u8 {
            let torn_first = tear(start, &update.first, mask);
            let read = read_superblock_block(&torn_first).unwrap();
            assert!(
                read.superblock == *old || read.superblock == *new,
                "first write torn with mask {mask:#x}"
            );
            let torn_second = tear(&update.first, &update.second, mask);
            let read = read_superblock_block(&torn_second).unwrap();
            assert!(
                read.superblock == *old || read.superblock == *new,
                "second write torn with mask {mask:#x}"
            );
            // A completed second write always yields the new state.
            if mask == 0xff {
                assert_eq!(read.superblock, *new);
                assert!(!read.needs_repair);
                assert_eq!(read.copy, SuperblockCopy::Primary);
            }
        }
        // The fully written block is readable by DRBD: the primary copy alone decodes.
        assert_eq!(Superblock::decode(&update.second[..]).unwrap(), *new);
    }

    #[test]
    fn any_torn_update_leaves_old_or_new_superblock() {
        let old = sample(1);
        let new = sample(2);
        // Starting from a drbdmeta-written block, and from a Tandem-written one.
        check_every_tear(&old.encode_drbd_block(), &old, &new);
        let (_, created) = SuperblockWriter::create(&old);
        check_every_tear(&created, &old, &new);
    }

    #[test]
    fn recovery_from_a_torn_primary_then_updates_safely() {
        let old = sample(1);
        let mid = sample(2);
        let new = sample(3);
        let (mut writer, _) = SuperblockWriter::create(&old);
        let update = writer.update(&mid);
        // Second write torn: only sector 0 of the primary made it.
        let torn = tear(&update.first, &update.second, 0b0000_0001);
        let (mut reopened, read) = SuperblockWriter::open(&torn).unwrap();
        assert_eq!(read.superblock, mid);
        assert_eq!(read.copy, SuperblockCopy::Backup);
        assert!(read.needs_repair);
        // The next update rewrites the damaged primary first; tearing it keeps `mid` readable.
        let repair = reopened.update(&new);
        for mask in 0..=255u8 {
            let read = read_superblock_block(&tear(&torn, &repair.first, mask)).unwrap();
            assert!(read.superblock == mid || read.superblock == new, "mask {mask:#x}");
            let read = read_superblock_block(&tear(&repair.first, &repair.second, mask)).unwrap();
            assert!(read.superblock == mid || read.superblock == new, "mask {mask:#x}");
        }
    }

    fn arbitrary_superblock() -> impl Strategy<Value = Superblock> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            -1i32..32,
            prop::collection::vec((any::<u64>(), any::<u64>(), any::<u32>(), -1i32..2), 32),
            prop::collection::vec(any::<u64>(), 32),
            any::<u64>(),
        )
            .prop_map(|(current, device, flags, node_id, peers, history, size)| {
                let mut sb = Superblock::created(&layout());
                sb.current_uuid = current;
                sb.device_uuid = device;
                sb.flags = flags;
                sb.node_id = node_id;
                sb.effective_size_sectors = size;
                let mut taken = [false; 2];
                for (slot, (uuid, dagtag, flags, index)) in sb.peers.iter_mut().zip(peers) {
                    // Each bitmap index belongs to at most one node.
                    let index = match usize::try_from(index) {
                        Ok(i) if !taken[i] => {
                            taken[i] = true;
                            index
                        }
                        _ => -1,
                    };
                    *slot = PeerSlot {
                        bitmap_uuid: uuid,
                        bitmap_dagtag: dagtag,
                        flags,
                        bitmap_index: index,
                        reserved: [0; 2],
                    };
                }
                sb.history_uuids.copy_from_slice(&history);
                sb
            })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(sb in arbitrary_superblock()) {
            let bytes = sb.encode();
            prop_assert_eq!(Superblock::decode(&bytes).unwrap(), sb.clone());
            let (_, block) = SuperblockWriter::create(&sb);
            let read = read_superblock_block(&block[..]).unwrap();
            prop_assert_eq!(read.superblock, sb);
            prop_assert!(!read.needs_repair);
        }

        #[test]
        fn torn_updates_of_arbitrary_superblocks(
            old in arbitrary_superblock(),
            new in arbitrary_superblock(),
            first_mask in any::<u8>(),
            second_mask in any::<u8>(),
        ) {
            let (mut writer, start) = SuperblockWriter::create(&old);
            let update = writer.update(&new);
            let read = read_superblock_block(&tear(&start, &update.first, first_mask)).unwrap();
            prop_assert!(read.superblock == old || read.superblock == new);
            let read =
                read_superblock_block(&tear(&update.first, &update.second, second_mask)).unwrap();
            prop_assert!(read.superblock == old || read.superblock == new);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 4096)) {
            let _ = read_superblock_block(&bytes);
            let _ = Superblock::decode(&bytes);
        }
    }
}

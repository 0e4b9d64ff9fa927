//! On-disk metadata in DRBD 9's v09 layout: superblock, activity log and per-peer bitmaps.
//!
//! Everything here is pure: functions turn values into 4 KiB blocks and back, and compute where
//! those blocks live. The caller owns the file and decides when to write and flush. The format
//! was measured against `drbdmeta` (drbd-utils 9.22) on plain files; `kernel-notes/
//! drbd-metadata.md` records the measurements and the few places where Tandem adds to the format.
//!
//! Map of the internal layout (end of the backing device, offsets grow to the right):
//!
//! ```text
//! | data ............................ | bitmap area | activity log (ring) | superblock (4 KiB) |
//! 0                          bm_offset^    al_offset^            md_offset^      backing size^
//! ```
//!
//! - [`layout`]: where each area lives for internal and external metadata, and the usable size.
//! - [`superblock`]: the v09 superblock, plus Tandem's torn-write protection (a checksummed
//!   second copy inside the same 4 KiB block that DRBD leaves as padding).
//! - [`activity_log`]: the LRU of hot 4 MiB extents, the on-disk transaction format, and crash
//!   recovery from the ring.
//! - [`create`]: everything a fresh metadata area needs (Tandem's `create-md`).
//! - [`store`]: the whole area as one value ([`MetaImage`]): load from the blocks read, and
//!   turn UUID/flag/bitmap/AL changes into ordered block writes ([`WritePlan`]).
//! - [`bitmap_area`]: the per-peer bitmaps as DRBD interleaves them (32-bit words, peer-major
//!   inside each word position), and which 4 KiB pages a block range touches.

pub mod activity_log;
pub mod bitmap_area;
pub mod constants;
pub mod create;
pub mod layout;
pub mod store;
pub mod superblock;

pub use activity_log::{
    ActivityLog, AlAdmission, AlRecovery, AlSlotUpdate, AlTransaction, AlTransactionKind,
    AlTransactionPlan, encode_initialized_ring, recover_ring,
};
pub use bitmap_area::{
    bitmap_area_bytes, decode_bitmap_area, encode_bitmap_area, encode_bitmap_page,
    pages_for_blocks, pages_for_blocks_of_peer, pages_for_extent,
};
pub use create::{NewMetadata, create_md};
pub use layout::{AlGeometry, MetaLayout, MetaPlacement, bitmap_area_bytes_for_sectors};
pub use store::{BlockWrite, LoadedMetadata, MetaImage, OpenedSuperblock, WritePlan};
pub use superblock::{
    PeerSlot, Superblock, SuperblockCopy, SuperblockRead, SuperblockUpdate, SuperblockWriter,
    md_flags, peer_flags, read_superblock_block,
};

use thiserror::Error;

/// Why metadata could not be laid out, decoded or updated. Bad input is always an error, never
/// a panic: a metadata block read from disk may be garbage.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum MetaError {
    #[error("device of {size_bytes} bytes is too small for metadata needing {needed_bytes} bytes")]
    DeviceTooSmall { size_bytes: u64, needed_bytes: u64 },
    #[error("max-peers {0} is outside DRBD's range 1..=31")]
    MaxPeers(u32),
    #[error(
        "activity-log geometry of {stripes} stripes of {stripe_size_4k} x 4 KiB is outside \
         32 KiB..=32 MiB"
    )]
    AlGeometry { stripes: u32, stripe_size_4k: u32 },
    #[error("al-extents {al_extents} is outside 1..={max} for this activity-log ring")]
    AlExtents { al_extents: u32, max: u32 },
    #[error("buffer of {len} bytes where {expected} bytes are needed")]
    BufferSize { len: usize, expected: usize },
    #[error("bad magic {found:#010x} (expected {expected:#010x})")]
    BadMagic { found: u32, expected: u32 },
    #[error("field {field} holds an invalid value {value}")]
    InvalidField { field: &'static str, value: i64 },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("neither copy of the superblock is readable")]
    SuperblockUnreadable,
    #[error("extent range {first}..={last} is invalid")]
    ExtentRange { first: u32, last: u32 },
    #[error("transaction {tr_number} is not the one in flight")]
    UnexpectedTransaction { tr_number: u32 },
    #[error("block range {first_block}+{blocks} exceeds the {size_blocks} blocks of the bitmap")]
    BlockRange { first_block: u64, blocks: u64, size_blocks: u64 },
}

/// DRBD's checksum: CRC-32C with seed 0 and no final inversion (the kernel's `crc32c(0, ...)`),
/// stored big-endian. Measured: the "initialized" AL block drbdmeta writes carries 0x709cc651,
/// which is this function over the block with the checksum field zeroed.
pub(crate) fn drbd_crc32c(data: &[u8]) -> u32 {
    // The crate computes the standard CRC (seed inverted on entry, result inverted on exit);
    // inverting both sides turns it into the raw register form DRBD uses.
    !crc32c::crc32c_append(!0u32, data)
}

pub(crate) fn be_u16(buffer: &[u8], offset: usize) -> u16 {
    u16::from_be_bytes([buffer[offset], buffer[offset + 1]])
}

pub(crate) fn be_u32(buffer: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buffer[offset..offset + 4]);
    u32::from_be_bytes(bytes)
}

pub(crate) fn be_u64(buffer: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buffer[offset..offset + 8]);
    u64::from_be_bytes(bytes)
}

pub(crate) fn put_be_u16(buffer: &mut [u8], offset: usize, value: u16) {
    buffer[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
}

pub(crate) fn put_be_u32(buffer: &mut [u8], offset: usize, value: u32) {
    buffer[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
}

pub(crate) fn put_be_u64(buffer: &mut [u8], offset: usize, value: u64) {
    buffer[offset..offset + 8].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_value_drbdmeta_writes_into_an_initialized_al_block() {
        // The block drbdmeta create-md writes: magic, tr_number 0, type 0xffff, rest zero.
        let mut block = vec![0u8; 4096];
        put_be_u32(&mut block, 0, constants::AL_MAGIC);
        put_be_u16(&mut block, 12, 0xffff);
        assert_eq!(drbd_crc32c(&block), 0x709c_c651);
    }
}

//! The numbers of DRBD's v09 on-disk format, as measured with drbdmeta 9.22, and the limits the
//! metadata layer enforces. Format constants are fixed by DRBD; limits are named `*_max`/`*_min`.

/// Metadata I/O unit: the superblock block, one AL transaction, one bitmap page.
pub const MD_BLOCK_SIZE_BYTES: usize = 4096;
/// The same unit as a u64, for offset arithmetic.
pub const MD_BLOCK_SIZE_BYTES_U64: u64 = 4096;
/// Sector: the unit of the offsets stored in the superblock, and of a torn write.
pub const SECTOR_SIZE_BYTES: u64 = 512;
/// Data bytes covered by one bitmap bit (superblock field `bm_bytes_per_bit`).
pub const BM_BLOCK_SIZE_BYTES: u64 = 4096;
/// Data blocks (bitmap bits) per activity-log extent: 4 MiB / 4 KiB.
pub const AL_EXTENT_BLOCKS: u64 = 1024;

/// Superblock magic of the v09 format (`DRBD_MD_MAGIC_09`), at byte 0x3c.
pub const MD_MAGIC_09: u32 = 0x8374_026d;
/// Magic of every activity-log transaction block.
pub const AL_MAGIC: u32 = 0x69cb_65a2;

/// Peer slots in the superblock: one per possible node id (DRBD_PEERS_MAX).
pub const NODE_SLOTS: usize = 32;
/// History generation UUIDs stored in the superblock.
pub const HISTORY_UUIDS: usize = 32;
/// Bytes of the v09 superblock structure (before its padding to 4 KiB).
pub const SUPERBLOCK_STRUCT_BYTES: usize = 0x570;
/// The current UUID drbdmeta create-md writes (UUID_JUST_CREATED).
pub const UUID_JUST_CREATED: u64 = 4;

/// Bitmap slots: `create-md` accepts max-peers 1..=31.
pub const MAX_PEERS_MAX: u32 = 31;

/// Slot changes one AL transaction can carry.
pub const AL_UPDATES_PER_TRANSACTION: usize = 64;
/// Slot-table entries one AL transaction carries as context.
pub const AL_CONTEXT_PER_TRANSACTION: usize = 919;
/// An unused slot in the AL's slot table (LC_FREE).
pub const AL_EXTENT_FREE: u32 = u32::MAX;
/// An unused update entry's slot number.
pub const AL_SLOT_NONE: u16 = u16::MAX;
/// al-extents drbdmeta create-md writes into a fresh superblock.
pub const AL_EXTENTS_CREATE_MD: u32 = 257;
/// DRBD 9's default al-extents, used by Tandem unless configured otherwise.
pub const AL_EXTENTS_DEFAULT: u32 = 1237;
/// Slot numbers are 16-bit and 0xffff marks an unused update, so at most 65534 slots exist.
pub const AL_EXTENTS_MAX: u32 = 65534;
/// Default ring: one stripe of 32 KiB (eight 4 KiB transactions).
pub const AL_STRIPES_DEFAULT: u32 = 1;
pub const AL_STRIPE_SIZE_4K_DEFAULT: u32 = 8;
/// drbdmeta refuses rings smaller than 32 KiB ("too small") ...
pub const AL_RING_BYTES_MIN: u64 = 32 * 1024;
/// ... and larger than this (32 MiB measured accepted, 64 MiB "too large").
pub const AL_RING_BYTES_MAX: u64 = 32 * 1024 * 1024;

/// drbdmeta refuses internal metadata on a device smaller than 68 KiB even when the metadata
/// itself is smaller (measured: 69632 bytes accepted, 69120 refused).
pub const INTERNAL_DEVICE_BYTES_MIN: u64 = 68 * 1024;
/// Size of one slot of indexed ("meta-disk DEV [N]") external metadata.
pub const INDEXED_EXTERNAL_SLOT_BYTES: u64 = 128 * 1024 * 1024;

/// Tandem's trailer after each superblock copy: marks the copy as written by Tandem and
/// carries a sequence number and a CRC-32C over the copy ("TNDM").
pub const TANDEM_TRAILER_MAGIC: u32 = 0x544e_444d;
/// Version of the trailer layout.
pub const TANDEM_TRAILER_VERSION: u32 = 1;
/// Bytes of the trailer.
pub const TANDEM_TRAILER_BYTES: usize = 32;
/// Where the primary copy's trailer starts: the end of sector 2, the last sector the DRBD
/// structure touches, so a torn write that changes any of the copy's sectors changes its CRC.
pub const PRIMARY_TRAILER_OFFSET: usize = 0x600 - TANDEM_TRAILER_BYTES;
/// Where the backup copy starts: sector 3, so the two copies share no sector.
pub const BACKUP_COPY_OFFSET: usize = 0x600;
/// Where the backup copy's trailer starts: the end of sector 5.
pub const BACKUP_TRAILER_OFFSET: usize = 0xc00 - TANDEM_TRAILER_BYTES;

const _: () = assert!(SUPERBLOCK_STRUCT_BYTES == 0x70 + NODE_SLOTS * 32 + HISTORY_UUIDS * 8);
const _: () = assert!(SUPERBLOCK_STRUCT_BYTES <= PRIMARY_TRAILER_OFFSET);
const _: () = assert!(BACKUP_COPY_OFFSET + SUPERBLOCK_STRUCT_BYTES <= BACKUP_TRAILER_OFFSET);
const _: () = assert!(BACKUP_TRAILER_OFFSET + TANDEM_TRAILER_BYTES <= MD_BLOCK_SIZE_BYTES);
const _: () = assert!((BACKUP_COPY_OFFSET as u64).is_multiple_of(SECTOR_SIZE_BYTES));
const _: () = assert!(
    36 + AL_UPDATES_PER_TRANSACTION * 6 + AL_CONTEXT_PER_TRANSACTION * 4 == MD_BLOCK_SIZE_BYTES,
    "an AL transaction fills exactly one 4 KiB block"
);
const _: () = assert!(AL_EXTENT_BLOCKS * BM_BLOCK_SIZE_BYTES == 4 * 1024 * 1024);
const _: () = assert!(
    (AL_STRIPES_DEFAULT * AL_STRIPE_SIZE_4K_DEFAULT) as u64 * MD_BLOCK_SIZE_BYTES_U64
        == AL_RING_BYTES_MIN
);
const _: () = assert!(AL_EXTENTS_CREATE_MD <= AL_EXTENTS_DEFAULT);
const _: () = assert!(AL_EXTENTS_DEFAULT as usize <= 7 * AL_CONTEXT_PER_TRANSACTION);
const _: () = assert!(AL_EXTENTS_MAX < AL_SLOT_NONE as u32);
const _: () = assert!(MAX_PEERS_MAX as usize <= NODE_SLOTS);

//! Where the metadata areas live, computed exactly as drbdmeta computes them.
//!
//! Measured on plain files with `drbdmeta --force 0 v09 FILE internal create-md N` and
//! `dump-md` (the `# md_offset/al_offset/bm_offset` comments), for sizes from 68 KiB to 1 TiB
//! and max-peers 1..7:
//! - the superblock occupies the last whole 4 KiB block of the device;
//! - the activity-log ring (stripes x stripe size, 32 KiB by default) sits right below it;
//! - the bitmap sits below the ring. Its size derives from the *whole* device (not the data
//!   area): blocks = ceil(size / 4 KiB), each peer gets ceil(blocks / 64) 64-bit words, and
//!   the total over all peers is rounded up to 4 KiB;
//! - the usable data area is everything below the bitmap.

use super::MetaError;
use super::constants::{
    AL_RING_BYTES_MAX, AL_RING_BYTES_MIN, AL_STRIPE_SIZE_4K_DEFAULT, AL_STRIPES_DEFAULT,
    BM_BLOCK_SIZE_BYTES, INDEXED_EXTERNAL_SLOT_BYTES, INTERNAL_DEVICE_BYTES_MIN, MAX_PEERS_MAX,
    MD_BLOCK_SIZE_BYTES_U64, SECTOR_SIZE_BYTES,
};

/// Where the metadata lives (drbd.conf's `meta-disk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaPlacement {
    /// At the end of the backing device (`meta-disk internal`).
    Internal,
    /// A whole separate device sized for this volume (`meta-disk DEV`, drbdmeta's
    /// `flex-external`).
    FlexExternal,
    /// Slot `index` of 128 MiB on a shared metadata device (`meta-disk DEV [index]`).
    IndexedExternal { index: u32 },
}

/// The activity-log ring: `stripes` stripes of `stripe_size_4k` 4 KiB blocks each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlGeometry {
    pub stripes: u32,
    pub stripe_size_4k: u32,
}

impl Default for AlGeometry {
    fn default() -> Self {
        Self { stripes: AL_STRIPES_DEFAULT, stripe_size_4k: AL_STRIPE_SIZE_4K_DEFAULT }
    }
}

impl AlGeometry {
    /// A ring drbdmeta would accept: 32 KiB up to 32 MiB in total.
    pub fn new(stripes: u32, stripe_size_4k: u32) -> Result<Self, MetaError> {
        let geometry = Self { stripes, stripe_size_4k };
        let ring_bytes = u64::from(stripes)
            .checked_mul(u64::from(stripe_size_4k))
            .and_then(|blocks| blocks.checked_mul(MD_BLOCK_SIZE_BYTES_U64));
        match ring_bytes {
            Some(bytes) if (AL_RING_BYTES_MIN..=AL_RING_BYTES_MAX).contains(&bytes) => Ok(geometry),
            _ => Err(MetaError::AlGeometry { stripes, stripe_size_4k }),
        }
    }

    /// Transaction blocks in the ring.
    pub fn ring_slots(self) -> u32 {
        let slots = self.stripes * self.stripe_size_4k;
        assert!(slots >= 8, "AlGeometry::new guarantees at least 32 KiB");
        slots
    }

    pub fn ring_bytes(self) -> u64 {
        u64::from(self.ring_slots()) * MD_BLOCK_SIZE_BYTES_U64
    }

    /// Physical 4 KiB block (0-based, inside the AL area) that transaction `tr_number` goes to.
    ///
    /// Consecutive transactions go round-robin over the stripes, then advance within each
    /// stripe, so that a striped RAID sees consecutive AL writes on different spindles. Measured
    /// with `--al-stripes 2 --al-stripe-size-kB 16`: drbdmeta's `apply-al` accepts transactions
    /// 3..=10 only at blocks (t % 2) * 4 + (t % 8) / 2 and asserts on a linear placement.
    pub fn block_for_transaction(self, tr_number: u32) -> u32 {
        let position = tr_number % self.ring_slots();
        self.block_for_position(position)
    }

    /// Transaction numbers count modulo this: the largest multiple of the ring size that fits
    /// 32 bits. With a power-of-two ring (the default 8) that is 2^32, plain u32 wrapping, as
    /// DRBD does; with other ring sizes plain wrapping would jump ring positions at the wrap
    /// (2^32 mod 48 != 0) and break the "transaction t sits at position t mod slots" rule.
    pub fn tr_number_modulus(self) -> u64 {
        let slots = u64::from(self.ring_slots());
        (1u64 << 32) / slots * slots
    }

    /// The transaction number after `tr_number`.
    pub fn next_tr_number(self, tr_number: u32) -> u32 {
        let next = (u64::from(tr_number) + 1) % self.tr_number_modulus();
        u32::try_from(next).expect("below the 2^32 modulus")
    }

    /// `a` is newer than `b` in serial-number arithmetic modulo `tr_number_modulus`.
    pub fn tr_number_newer(self, a: u32, b: u32) -> bool {
        let modulus = self.tr_number_modulus();
        let distance = (u64::from(a) + modulus - u64::from(b) % modulus) % modulus;
        distance != 0 && distance < modulus / 2
    }

    /// Physical block of logical ring position `position` (position = tr_number mod slots).
    pub fn block_for_position(self, position: u32) -> u32 {
        assert!(position < self.ring_slots());
        let stripe = position % self.stripes;
        let index_in_stripe = position / self.stripes;
        stripe * self.stripe_size_4k + index_in_stripe
    }

    /// Most slots (al-extents) whose full context still fits the ring with one block to spare
    /// for a torn write: every slot must appear in the context of some intact transaction.
    pub fn al_extents_max(self) -> u32 {
        let per_transaction =
            u32::try_from(super::constants::AL_CONTEXT_PER_TRANSACTION).expect("919 fits u32");
        ((self.ring_slots() - 1) * per_transaction).min(super::constants::AL_EXTENTS_MAX)
    }
}

/// Offsets (absolute bytes on the metadata device) and sizes of every metadata area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaLayout {
    pub placement: MetaPlacement,
    pub max_peers: u32,
    pub al: AlGeometry,
    /// The superblock's 4 KiB block.
    pub md_offset_bytes: u64,
    /// First block of the activity-log ring.
    pub al_offset_bytes: u64,
    /// First byte of the bitmap area.
    pub bm_offset_bytes: u64,
    /// Bytes of the bitmap area (a multiple of 4 KiB).
    pub bm_size_bytes: u64,
    /// The superblock's `md_size_sect`.
    pub md_size_sectors: u64,
    /// Usable data bytes: for internal metadata the area below the bitmap; for external
    /// metadata the most the bitmap area can describe.
    pub data_size_bytes: u64,
}

fn check_max_peers(max_peers: u32) -> Result<(), MetaError> {
    if (1..=MAX_PEERS_MAX).contains(&max_peers) {
        Ok(())
    } else {
        Err(MetaError::MaxPeers(max_peers))
    }
}

fn align_up(value: u64, alignment: u64) -> u64 {
    value.div_ceil(alignment) * alignment
}

/// Bytes of the bitmap area for `data_size_sectors` of data and `max_peers` bitmaps: each peer
/// gets whole 64-bit words, the sum is rounded up to 4 KiB. This is also how dump-md sizes the
/// bitmap it prints for `la-size-sect` (`# bm-bytes`).
pub fn bitmap_area_bytes_for_sectors(data_size_sectors: u64, max_peers: u32) -> u64 {
    let sectors_per_block = BM_BLOCK_SIZE_BYTES / SECTOR_SIZE_BYTES;
    let blocks = data_size_sectors.div_ceil(sectors_per_block);
    let per_peer_bytes = blocks.div_ceil(64) * 8;
    align_up(u64::from(max_peers) * per_peer_bytes, MD_BLOCK_SIZE_BYTES_U64)
}

impl MetaLayout {
    /// Internal metadata at the end of a backing device of `device_size_bytes`.
    pub fn internal(
        device_size_bytes: u64,
        max_peers: u32,
        al: AlGeometry,
    ) -> Result<Self, MetaError> {
        check_max_peers(max_peers)?;
        let al = AlGeometry::new(al.stripes, al.stripe_size_4k)?;
        let device_sectors = device_size_bytes / SECTOR_SIZE_BYTES;
        let bm_size_bytes = bitmap_area_bytes_for_sectors(device_sectors, max_peers);
        let md_size_bytes = MD_BLOCK_SIZE_BYTES_U64 + al.ring_bytes() + bm_size_bytes;
        let whole_blocks_bytes =
            device_size_bytes / MD_BLOCK_SIZE_BYTES_U64 * MD_BLOCK_SIZE_BYTES_U64;
        let needed_bytes = md_size_bytes.max(INTERNAL_DEVICE_BYTES_MIN);
        if whole_blocks_bytes < md_size_bytes || device_size_bytes < INTERNAL_DEVICE_BYTES_MIN {
            return Err(MetaError::DeviceTooSmall { size_bytes: device_size_bytes, needed_bytes });
        }
        let md_offset_bytes = whole_blocks_bytes - MD_BLOCK_SIZE_BYTES_U64;
        let al_offset_bytes = md_offset_bytes - al.ring_bytes();
        let bm_offset_bytes = al_offset_bytes - bm_size_bytes;
        Ok(Self {
            placement: MetaPlacement::Internal,
            max_peers,
            al,
            md_offset_bytes,
            al_offset_bytes,
            bm_offset_bytes,
            bm_size_bytes,
            md_size_sectors: md_size_bytes / SECTOR_SIZE_BYTES,
            data_size_bytes: bm_offset_bytes,
        })
    }

    /// The smallest backing device whose internal data area is exactly `data_size_bytes` (a
    /// multiple of 4 KiB): what to allocate for a volume of that size with internal metadata.
    /// Growing the device by 4 KiB grows the data area by 4 KiB or (when the bitmap needs
    /// another page) by nothing, so every multiple of 4 KiB is reached exactly.
    pub fn internal_device_bytes_for_data(
        data_size_bytes: u64,
        max_peers: u32,
        al: AlGeometry,
    ) -> Result<u64, MetaError> {
        check_max_peers(max_peers)?;
        let al = AlGeometry::new(al.stripes, al.stripe_size_4k)?;
        if data_size_bytes == 0 || !data_size_bytes.is_multiple_of(MD_BLOCK_SIZE_BYTES_U64) {
            return Err(MetaError::InvalidField {
                field: "data size (a positive multiple of 4 KiB)",
                value: i64::try_from(data_size_bytes).unwrap_or(i64::MAX),
            });
        }
        let too_large =
            MetaError::DeviceTooSmall { size_bytes: data_size_bytes, needed_bytes: u64::MAX };
        // A lower bound: the bitmap of the whole device is at least that of the data alone.
        let mut device_bytes = data_size_bytes
            .checked_add(
                MD_BLOCK_SIZE_BYTES_U64
                    + al.ring_bytes()
                    + bitmap_area_bytes_for_sectors(data_size_bytes / SECTOR_SIZE_BYTES, max_peers),
            )
            .ok_or(too_large.clone())?
            .max(INTERNAL_DEVICE_BYTES_MIN);
        loop {
            let layout = Self::internal(device_bytes, max_peers, al)?;
            if layout.data_size_bytes == data_size_bytes {
                return Ok(device_bytes);
            }
            if layout.data_size_bytes > data_size_bytes {
                // Only at the 68 KiB minimum: drbdmeta's smallest device holds more data.
                assert_eq!(device_bytes, INTERNAL_DEVICE_BYTES_MIN, "steps of at most 4 KiB");
                return Err(MetaError::InvalidField {
                    field: "data size (below the smallest internal-metadata device's)",
                    value: i64::try_from(data_size_bytes).unwrap_or(i64::MAX),
                });
            }
            device_bytes = device_bytes
                .checked_add(data_size_bytes - layout.data_size_bytes)
                .ok_or(too_large.clone())?;
        }
    }

    /// External metadata filling a device of `md_device_size_bytes` (drbdmeta `flex-external`):
    /// superblock at 0, ring at 4 KiB, bitmap after the ring up to the end of the device.
    pub fn flex_external(
        md_device_size_bytes: u64,
        max_peers: u32,
        al: AlGeometry,
    ) -> Result<Self, MetaError> {
        check_max_peers(max_peers)?;
        let al = AlGeometry::new(al.stripes, al.stripe_size_4k)?;
        let usable = md_device_size_bytes / MD_BLOCK_SIZE_BYTES_U64 * MD_BLOCK_SIZE_BYTES_U64;
        Self::external(MetaPlacement::FlexExternal, 0, usable, md_device_size_bytes, max_peers, al)
    }

    /// Slot `index` of a shared metadata device of `md_device_size_bytes`: 128 MiB per slot.
    pub fn indexed_external(
        md_device_size_bytes: u64,
        index: u32,
        max_peers: u32,
        al: AlGeometry,
    ) -> Result<Self, MetaError> {
        check_max_peers(max_peers)?;
        let al = AlGeometry::new(al.stripes, al.stripe_size_4k)?;
        let md_offset_bytes = u64::from(index) * INDEXED_EXTERNAL_SLOT_BYTES;
        Self::external(
            MetaPlacement::IndexedExternal { index },
            md_offset_bytes,
            INDEXED_EXTERNAL_SLOT_BYTES,
            md_device_size_bytes,
            max_peers,
            al,
        )
    }

    fn external(
        placement: MetaPlacement,
        md_offset_bytes: u64,
        md_size_bytes: u64,
        md_device_size_bytes: u64,
        max_peers: u32,
        al: AlGeometry,
    ) -> Result<Self, MetaError> {
        let fixed_bytes = MD_BLOCK_SIZE_BYTES_U64 + al.ring_bytes();
        let needed_bytes = md_offset_bytes
            .checked_add(md_size_bytes.max(fixed_bytes + MD_BLOCK_SIZE_BYTES_U64))
            .ok_or(MetaError::DeviceTooSmall {
                size_bytes: md_device_size_bytes,
                needed_bytes: u64::MAX,
            })?;
        if md_device_size_bytes < needed_bytes || md_size_bytes < fixed_bytes {
            return Err(MetaError::DeviceTooSmall {
                size_bytes: md_device_size_bytes,
                needed_bytes,
            });
        }
        let al_offset_bytes = md_offset_bytes + MD_BLOCK_SIZE_BYTES_U64;
        let bm_offset_bytes = al_offset_bytes + al.ring_bytes();
        let bm_size_bytes = md_size_bytes - fixed_bytes;
        // Each peer owns whole 64-bit words; the data it describes is 64 blocks per word.
        let words_per_peer = bm_size_bytes / 8 / u64::from(max_peers);
        let data_size_bytes = words_per_peer * 64 * BM_BLOCK_SIZE_BYTES;
        Ok(Self {
            placement,
            max_peers,
            al,
            md_offset_bytes,
            al_offset_bytes,
            bm_offset_bytes,
            bm_size_bytes,
            md_size_sectors: md_size_bytes / SECTOR_SIZE_BYTES,
            data_size_bytes,
        })
    }

    /// The superblock's `al_offset` field: sectors from the superblock to the ring (negative
    /// for internal metadata).
    pub fn al_offset_sectors(&self) -> i32 {
        relative_sectors(self.al_offset_bytes, self.md_offset_bytes)
    }

    /// The superblock's `bm_offset` field: sectors from the superblock to the bitmap.
    pub fn bm_offset_sectors(&self) -> i32 {
        relative_sectors(self.bm_offset_bytes, self.md_offset_bytes)
    }

    /// The superblock's `md_size_sect` field.
    pub fn md_size_sectors_u32(&self) -> u32 {
        u32::try_from(self.md_size_sectors).expect("metadata of a 64 TiB device fits u32 sectors")
    }

    /// Data blocks (bitmap bits per peer) of the usable data area.
    pub fn data_blocks(&self) -> u64 {
        self.data_size_bytes / BM_BLOCK_SIZE_BYTES
    }

    /// Absolute byte offset of the ring block holding transaction `tr_number`.
    pub fn al_transaction_offset_bytes(&self, tr_number: u32) -> u64 {
        self.al_offset_bytes
            + u64::from(self.al.block_for_transaction(tr_number)) * MD_BLOCK_SIZE_BYTES_U64
    }

    /// Absolute byte offset of bitmap page `page` (see `bitmap_area::pages_for_blocks`).
    pub fn bitmap_page_offset_bytes(&self, page: u64) -> u64 {
        assert!(page * MD_BLOCK_SIZE_BYTES_U64 < self.bm_size_bytes);
        self.bm_offset_bytes + page * MD_BLOCK_SIZE_BYTES_U64
    }

    /// Bitmap pages in the area.
    pub fn bitmap_pages(&self) -> u64 {
        self.bm_size_bytes / MD_BLOCK_SIZE_BYTES_U64
    }
}

fn relative_sectors(target_bytes: u64, md_offset_bytes: u64) -> i32 {
    let sectors = if target_bytes >= md_offset_bytes {
        i64::try_from((target_bytes - md_offset_bytes) / SECTOR_SIZE_BYTES)
    } else {
        i64::try_from((md_offset_bytes - target_bytes) / SECTOR_SIZE_BYTES).map(|s| -s)
    }
    .expect("metadata offsets fit i64");
    i32::try_from(sectors).expect("metadata of a 64 TiB device is within 2^31 sectors")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;

    /// (device bytes, max peers, md_size_sect, md_offset, al_offset, bm_offset) as printed by
    /// `drbdmeta --force 0 v09 FILE internal create-md P; ... dump-md` (drbd-utils 9.22).
    const MEASURED: &[(u64, u32, u64, u64, u64, u64)] = &[
        (MIB, 1, 80, 1044480, 1011712, 1007616),
        (MIB, 7, 80, 1044480, 1011712, 1007616),
        (33 * MIB, 3, 80, 34598912, 34566144, 34562048),
        (33 * MIB, 4, 88, 34598912, 34566144, 34557952),
        (100 * MIB, 2, 88, 104853504, 104820736, 104812544),
        (100 * MIB, 7, 120, 104853504, 104820736, 104796160),
        (1000 * MIB, 7, 512, 1048571904, 1048539136, 1048313856),
        (GIB, 1, 136, 1073737728, 1073704960, 1073672192),
        (GIB, 2, 200, 1073737728, 1073704960, 1073639424),
        (GIB, 7, 520, 1073737728, 1073704960, 1073475584),
        (1025 * MIB, 2, 208, 1074786304, 1074753536, 1074683904),
        (3 * GIB, 4, 840, 3221221376, 3221188608, 3220795392),
        (10 * GIB, 3, 1992, 10737414144, 10737381376, 10736398336),
        (100 * GIB, 7, 44872, 107374178304, 107374145536, 107351207936),
        (1024 * GIB, 4, 262216, 1099511623680, 1099511590912, 1099377373184),
        (128 * MIB + 512, 1, 88, 134213632, 134180864, 134172672),
        (4680 * 4096, 7, 88, 19165184, 19132416, 19124224),
        (4672 * 4096, 7, 80, 19132416, 19099648, 19095552),
        (10888 * 4096, 3, 88, 44593152, 44560384, 44552192),
        (10880 * 4096, 3, 80, 44560384, 44527616, 44523520),
        (GIB + 3000, 2, 208, 1073737728, 1073704960, 1073635328),
        (68 * KIB, 1, 80, 65536, 32768, 28672),
    ];

    #[test]
    fn internal_layout_matches_drbdmeta_measurements() {
        for &(size, peers, md_size_sect, md_offset, al_offset, bm_offset) in MEASURED {
            let layout = MetaLayout::internal(size, peers, AlGeometry::default())
                .unwrap_or_else(|e| panic!("{size} bytes, {peers} peers: {e}"));
            let got = (
                layout.md_size_sectors,
                layout.md_offset_bytes,
                layout.al_offset_bytes,
                layout.bm_offset_bytes,
            );
            assert_eq!(
                got,
                (md_size_sect, md_offset, al_offset, bm_offset),
                "{size} bytes, {peers} peers"
            );
            assert_eq!(layout.data_size_bytes, bm_offset);
        }
    }

    #[test]
    fn device_size_for_an_exact_data_area() {
        for &(data, peers) in &[
            (28 * KIB, 1u32),
            (MIB, 2),
            (GIB, 1),
            (GIB, 2),
            (GIB, 7),
            (10 * GIB + 4096, 3),
            (4672 * 4096, 7),
            (1024 * GIB, 4),
        ] {
            let device =
                MetaLayout::internal_device_bytes_for_data(data, peers, AlGeometry::default())
                    .unwrap();
            let layout = MetaLayout::internal(device, peers, AlGeometry::default()).unwrap();
            assert_eq!(layout.data_size_bytes, data, "{data} bytes, {peers} peers");
            if device > INTERNAL_DEVICE_BYTES_MIN {
                let smaller =
                    MetaLayout::internal(device - 4096, peers, AlGeometry::default()).unwrap();
                assert!(smaller.data_size_bytes < data, "{data} bytes, {peers} peers: minimal");
            }
        }
        assert!(
            MetaLayout::internal_device_bytes_for_data(4095, 1, AlGeometry::default()).is_err()
        );
        assert!(
            MetaLayout::internal_device_bytes_for_data(4096, 1, AlGeometry::default()).is_err()
        );
        assert!(MetaLayout::internal_device_bytes_for_data(0, 1, AlGeometry::default()).is_err());
    }

    #[test]
    fn striped_activity_log_layout_matches_drbdmeta() {
        // create-md --al-stripes 3 --al-stripe-size-kB 64 2 on 1 GiB.
        let al = AlGeometry::new(3, 16).unwrap();
        let layout = MetaLayout::internal(GIB, 2, al).unwrap();
        assert_eq!(layout.md_size_sectors, 520);
        assert_eq!(layout.al_offset_bytes, 1073541120);
        assert_eq!(layout.bm_offset_bytes, 1073475584);
        assert_eq!(layout.al_offset_sectors(), -384);
        assert_eq!(layout.bm_offset_sectors(), -512);
    }

    #[test]
    fn too_small_devices_are_refused_where_drbdmeta_refuses_them() {
        // Measured minimum: 68 KiB for the default ring, md size for bigger rings.
        assert!(MetaLayout::internal(68 * KIB - 512, 1, AlGeometry::default()).is_err());
        assert!(MetaLayout::internal(68 * KIB, 1, AlGeometry::default()).is_ok());
        let big = AlGeometry::new(3, 16).unwrap();
        assert!(MetaLayout::internal(196 * KIB, 1, big).is_err());
        assert!(MetaLayout::internal(200 * KIB, 1, big).is_ok());
        assert!(MetaLayout::internal(0, 1, AlGeometry::default()).is_err());
    }

    #[test]
    fn invalid_parameters_are_errors() {
        assert_eq!(
            MetaLayout::internal(GIB, 0, AlGeometry::default()),
            Err(MetaError::MaxPeers(0))
        );
        assert_eq!(
            MetaLayout::internal(GIB, 32, AlGeometry::default()),
            Err(MetaError::MaxPeers(32))
        );
        assert!(AlGeometry::new(2, 3).is_err());
        assert!(AlGeometry::new(1, 16384).is_err());
        assert!(AlGeometry::new(u32::MAX, u32::MAX).is_err());
        assert!(AlGeometry::new(2, 4).is_ok());
    }

    #[test]
    fn external_layouts_match_drbdmeta() {
        // flex-external on a 1 MiB file: md_size_sect 2048, al 4096, bm 36864.
        let flex = MetaLayout::flex_external(MIB, 2, AlGeometry::default()).unwrap();
        assert_eq!(
            (
                flex.md_size_sectors,
                flex.md_offset_bytes,
                flex.al_offset_bytes,
                flex.bm_offset_bytes
            ),
            (2048, 0, 4096, 36864)
        );
        assert_eq!((flex.al_offset_sectors(), flex.bm_offset_sectors()), (8, 72));
        // index 1 on a 1 GiB file: md_size_sect 262144 at 128 MiB.
        let indexed = MetaLayout::indexed_external(GIB, 1, 2, AlGeometry::default()).unwrap();
        assert_eq!(
            (
                indexed.md_size_sectors,
                indexed.md_offset_bytes,
                indexed.al_offset_bytes,
                indexed.bm_offset_bytes
            ),
            (262144, 134217728, 134221824, 134254592)
        );
        assert!(MetaLayout::indexed_external(GIB, 8, 2, AlGeometry::default()).is_err());
    }

    #[test]
    fn striped_ring_placement_round_robins_over_stripes() {
        let al = AlGeometry::new(2, 4).unwrap();
        let blocks: Vec<u32> = (0..8).map(|t| al.block_for_transaction(t)).collect();
        assert_eq!(blocks, vec![0, 4, 1, 5, 2, 6, 3, 7]);
        let linear = AlGeometry::default();
        let blocks: Vec<u32> = (6..11).map(|t| linear.block_for_transaction(t)).collect();
        assert_eq!(blocks, vec![6, 7, 0, 1, 2]);
        assert_eq!(linear.al_extents_max(), 6433, "the man page's 6433");
    }

    #[test]
    fn transaction_numbers_wrap_at_a_multiple_of_the_ring() {
        let default = AlGeometry::default();
        assert_eq!(default.tr_number_modulus(), 1 << 32);
        assert_eq!(default.next_tr_number(u32::MAX), 0);
        let odd = AlGeometry::new(3, 16).unwrap();
        let last = u32::try_from(odd.tr_number_modulus() - 1).unwrap();
        assert_eq!(odd.next_tr_number(last), 0);
        assert_eq!(
            (odd.block_for_transaction(last) + 1) % odd.ring_slots(),
            odd.block_for_transaction(0),
            "positions stay consecutive across the wrap"
        );
        assert!(odd.tr_number_newer(0, last));
        assert!(!odd.tr_number_newer(last, 0));
        assert!(default.tr_number_newer(5, u32::MAX - 3));
    }

    #[test]
    fn dump_md_bitmap_size_for_la_size() {
        // dump-md printed `# bm-bytes 626688` for la-size-sect 20000000 and 2 peers, and
        // 65536 for 2096952 sectors.
        assert_eq!(bitmap_area_bytes_for_sectors(20_000_000, 2), 626688);
        assert_eq!(bitmap_area_bytes_for_sectors(2_096_952, 2), 65536);
    }
}

//! Online grow of internal metadata: the whole area moves to the new end of the grown backing
//! device, and the data size (la-size) grows with it, as `drbdadm resize` does.
//!
//! A child of `store` so that it can rebuild a `MetaImage` from its parts. Pure: it returns
//! the new image and the writes, the driver executes them in order. Crash safety rests on the
//! order (see `MetaImage::relocated`): the old superblock stays untouched until the new one is
//! durable, so at every moment one valid superblock describes the metadata.

use super::super::activity_log::{ActivityLog, encode_initialized_ring};
use super::super::constants::{
    BM_BLOCK_SIZE_BYTES, MD_BLOCK_SIZE_BYTES, MD_BLOCK_SIZE_BYTES_U64, SECTOR_SIZE_BYTES,
};
use super::super::layout::{MetaLayout, MetaPlacement};
use super::super::superblock::SuperblockWriter;
use super::{BlockWrite, MetaError, MetaImage, WritePlan};

impl MetaImage {
    /// The image after growing the data to `size_blocks` on a backing device that grew to
    /// `new_layout`'s size (internal metadata only), and the plan that writes it: the new
    /// bitmap pages (`bitmaps[n]`: node n's words, already grown to `size_blocks`) and the
    /// initialized activity-log ring with one transaction holding `hot_extents`, then, last
    /// and alone, the new superblock at the new end. Zero the new bitmap area before the
    /// plan; wipe the old area (`self.layout()`) only after it.
    ///
    /// Refused unless the new area lies wholly above the old one (the device grew by at least
    /// the new metadata's size): writing it must not touch the old superblock, which is what
    /// a crash before the new superblock is durable falls back to.
    pub fn relocated(
        &self,
        new_layout: MetaLayout,
        size_blocks: u64,
        bitmaps: &[&[u64]],
        hot_extents: &[u32],
    ) -> Result<(MetaImage, WritePlan), MetaError> {
        let old = self.layout;
        if old.placement != MetaPlacement::Internal || new_layout.placement != old.placement {
            return Err(MetaError::InvalidField {
                field: "resize placement (internal only)",
                value: 0,
            });
        }
        if new_layout.max_peers != old.max_peers || new_layout.al != old.al {
            return Err(MetaError::InvalidField {
                field: "resize geometry (max-peers or ring changed)",
                value: i64::from(new_layout.max_peers),
            });
        }
        let old_end = old.md_offset_bytes + MD_BLOCK_SIZE_BYTES_U64;
        if new_layout.bm_offset_bytes < old_end {
            return Err(MetaError::DeviceTooSmall {
                size_bytes: new_layout.md_offset_bytes + MD_BLOCK_SIZE_BYTES_U64,
                needed_bytes: old_end
                    + (new_layout.md_offset_bytes + MD_BLOCK_SIZE_BYTES_U64
                        - new_layout.bm_offset_bytes),
            });
        }
        if size_blocks < self.size_blocks || size_blocks > new_layout.data_blocks() {
            return Err(MetaError::BlockRange {
                first_block: 0,
                blocks: size_blocks,
                size_blocks: new_layout.data_blocks(),
            });
        }
        let mut superblock = self.superblock.clone();
        superblock.md_size_sectors = new_layout.md_size_sectors_u32();
        superblock.al_offset_sectors = new_layout.al_offset_sectors();
        superblock.bm_offset_sectors = new_layout.bm_offset_sectors();
        superblock.effective_size_sectors = size_blocks * (BM_BLOCK_SIZE_BYTES / SECTOR_SIZE_BYTES);
        superblock.validate()?;
        assert!(superblock.matches_layout(&new_layout));
        let (writer, block) = SuperblockWriter::create(&superblock);
        // The initialized ring holds transaction 0 everywhere; continue at 1, as create-md.
        let activity_log =
            ActivityLog::new(new_layout.al, superblock.al_extents, size_blocks.max(1), 1)?;
        let mut image =
            MetaImage { layout: new_layout, superblock, writer, activity_log, size_blocks };
        let mut plan = WritePlan::default();
        plan.push_step(image.encode_pages(0..new_layout.bitmap_pages(), bitmaps)?);
        let ring = encode_initialized_ring(new_layout.al);
        plan.push_step(
            ring.chunks_exact(MD_BLOCK_SIZE_BYTES)
                .enumerate()
                .map(|(i, chunk)| {
                    let mut bytes = Box::new([0u8; MD_BLOCK_SIZE_BYTES]);
                    bytes.copy_from_slice(chunk);
                    BlockWrite {
                        offset_bytes: new_layout.al_offset_bytes
                            + u64::try_from(i).expect("fits") * MD_BLOCK_SIZE_BYTES_U64,
                        bytes,
                    }
                })
                .collect(),
        );
        if !hot_extents.is_empty() {
            plan.append(image.al_change(hot_extents, &[])?);
        }
        plan.push_step(vec![BlockWrite { offset_bytes: new_layout.md_offset_bytes, bytes: block }]);
        Ok((image, plan))
    }
}

//! Tandem's `create-md`: every block a fresh metadata area needs, in the order to write them.

use std::ops::Range;

use super::MetaError;
use super::activity_log::encode_initialized_ring;
use super::constants::MD_BLOCK_SIZE_BYTES;
use super::layout::MetaLayout;
use super::superblock::{Superblock, SuperblockWriter};

/// A new metadata area. Write order: zero `bitmap_range`, write `al_ring` at
/// `layout.al_offset_bytes`, flush, then `superblock_block` at `layout.md_offset_bytes` and
/// flush. The superblock goes last so a crash during creation leaves no valid superblock
/// over a half-initialized area.
#[derive(Debug, Clone)]
pub struct NewMetadata {
    pub layout: MetaLayout,
    pub superblock: Superblock,
    pub superblock_block: Box<[u8; MD_BLOCK_SIZE_BYTES]>,
    /// Continues with crash-safe updates of this superblock.
    pub writer: SuperblockWriter,
    pub al_ring: Vec<u8>,
}

impl NewMetadata {
    /// Absolute byte range of the bitmap area, to be zeroed (fallocate/punch or writes).
    pub fn bitmap_range(&self) -> Range<u64> {
        self.layout.bm_offset_bytes..self.layout.bm_offset_bytes + self.layout.bm_size_bytes
    }
}

/// What drbdmeta's `create-md` writes (current UUID "just created", AL clean, no node id, no
/// bitmap slots), except that `al_extents` is chosen by the caller (drbdmeta writes 257; DRBD 9
/// and Tandem default to 1237) and the superblock block carries Tandem's backup copy.
pub fn create_md(layout: MetaLayout, al_extents: u32) -> Result<NewMetadata, MetaError> {
    let mut superblock = Superblock::created(&layout);
    superblock.al_extents = al_extents;
    superblock.validate()?;
    let (writer, superblock_block) = SuperblockWriter::create(&superblock);
    Ok(NewMetadata {
        layout,
        superblock,
        superblock_block,
        writer,
        al_ring: encode_initialized_ring(layout.al),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::constants::AL_EXTENTS_DEFAULT;
    use crate::meta::layout::AlGeometry;
    use crate::meta::superblock::read_superblock_block;

    #[test]
    fn created_metadata_reads_back() {
        let layout = MetaLayout::internal(1 << 30, 2, AlGeometry::default()).unwrap();
        let created = create_md(layout, AL_EXTENTS_DEFAULT).unwrap();
        let read = read_superblock_block(&created.superblock_block[..]).unwrap();
        assert_eq!(read.superblock, created.superblock);
        assert_eq!(read.sequence, Some(1));
        assert_eq!(created.al_ring.len(), 32768);
        assert_eq!(created.bitmap_range(), 1073639424..1073704960);
        assert!(create_md(layout, 7000).is_err(), "more slots than the ring can describe");
    }
}

//! A whole metadata area as one value: load it from the blocks a driver read, and turn each
//! logical change (generation UUIDs, flags, bitmap bits, activity-log membership) into the
//! block writes that persist it, in crash-safe order. Still pure: the driver reads and writes.
//!
//! A [`WritePlan`] is a list of steps. The writes of one step may be in flight together; the
//! next step may start only when every write of the previous one is durable (written and
//! flushed, or written with FUA). Superblock updates are two steps (see `superblock`).

use std::ops::Range;

use super::MetaError;
use super::activity_log::{ActivityLog, AlTransactionPlan, recover_ring};
use super::bitmap_area::{decode_bitmap_area, encode_bitmap_page, pages_for_blocks_of_peer};
use super::constants::{
    BM_BLOCK_SIZE_BYTES, INDEXED_EXTERNAL_SLOT_BYTES, MD_BLOCK_SIZE_BYTES, MD_BLOCK_SIZE_BYTES_U64,
    NODE_SLOTS, SECTOR_SIZE_BYTES,
};
use super::create::create_md;
use super::layout::{MetaLayout, MetaPlacement};
use super::superblock::{Superblock, SuperblockRead, SuperblockUpdate, SuperblockWriter};

#[path = "relocate.rs"]
mod relocate;

/// One 4 KiB metadata write at an absolute offset of the metadata device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockWrite {
    pub offset_bytes: u64,
    pub bytes: Box<[u8; MD_BLOCK_SIZE_BYTES]>,
}

/// Writes in steps; a step starts only when the previous one is durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WritePlan {
    pub steps: Vec<Vec<BlockWrite>>,
}

impl WritePlan {
    pub fn is_empty(&self) -> bool {
        self.steps.iter().all(Vec::is_empty)
    }

    /// Every write of every step, in order.
    pub fn writes(&self) -> impl Iterator<Item = &BlockWrite> {
        self.steps.iter().flatten()
    }

    fn push_step(&mut self, step: Vec<BlockWrite>) {
        if !step.is_empty() {
            self.steps.push(step);
        }
    }

    fn append(&mut self, other: WritePlan) {
        for step in other.steps {
            self.push_step(step);
        }
    }
}

/// The superblock has been read; the rest of the area can now be located.
#[derive(Debug, Clone)]
pub struct OpenedSuperblock {
    pub layout: MetaLayout,
    pub read: SuperblockRead,
    writer: SuperblockWriter,
}

impl OpenedSuperblock {
    /// Absolute byte range of the activity-log ring to read next.
    pub fn al_range(&self) -> Range<u64> {
        self.layout.al_offset_bytes..self.layout.al_offset_bytes + self.layout.al.ring_bytes()
    }

    /// Absolute byte range of the bitmap area to read next.
    pub fn bitmap_range(&self) -> Range<u64> {
        self.layout.bm_offset_bytes..self.layout.bm_offset_bytes + self.layout.bm_size_bytes
    }
}

/// What the metadata said when it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedMetadata {
    pub superblock: Superblock,
    /// The data size in 4 KiB blocks: la-size-sect, or the whole data area when drbdmeta
    /// create-md left it 0.
    pub size_blocks: u64,
    /// Indexed by node id: that node's bitmap (ceil(size_blocks / 64) words), None when the
    /// node has no bitmap slot.
    pub bitmaps: Vec<Option<Vec<u64>>>,
    /// Extents the activity log held: after a crash as primary (superblock flag PRIMARY_IND),
    /// mark them out of sync for every peer.
    pub hot_extents: Vec<u32>,
    /// Ring blocks that failed their checksum (a torn transaction) or were misplaced.
    pub al_damaged_blocks: u32,
    /// Execute first when not empty: rewrites a superblock a crash left half-updated.
    pub repair: WritePlan,
}

/// The metadata of one replica, in DRBD 9's v09 layout.
#[derive(Debug, Clone)]
pub struct MetaImage {
    layout: MetaLayout,
    superblock: Superblock,
    writer: SuperblockWriter,
    activity_log: ActivityLog,
    size_blocks: u64,
}

fn superblock_steps(update: SuperblockUpdate, offset_bytes: u64) -> WritePlan {
    WritePlan {
        steps: vec![
            vec![BlockWrite { offset_bytes, bytes: update.first }],
            vec![BlockWrite { offset_bytes, bytes: update.second }],
        ],
    }
}

fn check_node(node: u8) -> Result<usize, MetaError> {
    let index = usize::from(node);
    if index < NODE_SLOTS {
        Ok(index)
    } else {
        Err(MetaError::InvalidField { field: "node id", value: i64::from(node) })
    }
}

impl MetaImage {
    /// Where the superblock block is, before anything else is known.
    pub fn superblock_offset_bytes(
        placement: MetaPlacement,
        device_size_bytes: u64,
    ) -> Result<u64, MetaError> {
        match placement {
            MetaPlacement::Internal => (device_size_bytes / MD_BLOCK_SIZE_BYTES_U64)
                .checked_sub(1)
                .map(|block| block * MD_BLOCK_SIZE_BYTES_U64)
                .ok_or(MetaError::DeviceTooSmall {
                    size_bytes: device_size_bytes,
                    needed_bytes: MD_BLOCK_SIZE_BYTES_U64,
                }),
            MetaPlacement::FlexExternal => Ok(0),
            MetaPlacement::IndexedExternal { index } => {
                Ok(u64::from(index) * INDEXED_EXTERNAL_SLOT_BYTES)
            }
        }
    }

    /// A fresh area for `node_id` with `size_blocks` of data. Zero [`MetaImage::bitmap_range`]
    /// first, then execute the plan (the ring, then the superblock last).
    pub fn create(
        layout: MetaLayout,
        node_id: u8,
        size_blocks: u64,
        al_extents: u32,
    ) -> Result<(Self, WritePlan), MetaError> {
        check_node(node_id)?;
        if size_blocks > layout.data_blocks() {
            return Err(MetaError::BlockRange {
                first_block: 0,
                blocks: size_blocks,
                size_blocks: layout.data_blocks(),
            });
        }
        let created = create_md(layout, al_extents)?;
        let mut superblock = created.superblock;
        superblock.node_id = i32::from(node_id);
        superblock.effective_size_sectors = size_blocks * (BM_BLOCK_SIZE_BYTES / SECTOR_SIZE_BYTES);
        let (writer, block) = SuperblockWriter::create(&superblock);
        let ring: Vec<BlockWrite> = created
            .al_ring
            .chunks_exact(MD_BLOCK_SIZE_BYTES)
            .enumerate()
            .map(|(i, chunk)| {
                let mut bytes = Box::new([0u8; MD_BLOCK_SIZE_BYTES]);
                bytes.copy_from_slice(chunk);
                BlockWrite {
                    offset_bytes: layout.al_offset_bytes
                        + u64::try_from(i).expect("fits") * MD_BLOCK_SIZE_BYTES_U64,
                    bytes,
                }
            })
            .collect();
        let plan = WritePlan {
            steps: vec![
                ring,
                vec![BlockWrite { offset_bytes: layout.md_offset_bytes, bytes: block }],
            ],
        };
        // The initialized ring holds transaction 0 everywhere; continue at 1.
        let activity_log = ActivityLog::new(layout.al, al_extents, size_blocks.max(1), 1)?;
        Ok((Self { layout, superblock, writer, activity_log, size_blocks }, plan))
    }

    /// Reads the superblock block found at [`MetaImage::superblock_offset_bytes`].
    pub fn open(
        placement: MetaPlacement,
        device_size_bytes: u64,
        superblock_block: &[u8],
    ) -> Result<OpenedSuperblock, MetaError> {
        let (writer, read) = SuperblockWriter::open(superblock_block)?;
        let layout = read.superblock.layout(placement, device_size_bytes)?;
        Ok(OpenedSuperblock { layout, read, writer })
    }

    /// Finishes loading with the activity-log ring and the bitmap area as read from disk.
    /// `node_id` is the configured id: adopted if the superblock has none (drbdmeta
    /// create-md), refused if it names another node.
    pub fn load(
        opened: OpenedSuperblock,
        node_id: u8,
        ring: &[u8],
        bitmap_area: &[u8],
    ) -> Result<(Self, LoadedMetadata), MetaError> {
        check_node(node_id)?;
        let OpenedSuperblock { layout, read, mut writer } = opened;
        let mut superblock = read.superblock.clone();
        let mut repair = WritePlan::default();
        if superblock.node_id == -1 {
            superblock.node_id = i32::from(node_id);
        } else if superblock.node_id != i32::from(node_id) {
            return Err(MetaError::InvalidField {
                field: "node id (metadata belongs to another node)",
                value: i64::from(superblock.node_id),
            });
        }
        let sectors_per_block = BM_BLOCK_SIZE_BYTES / SECTOR_SIZE_BYTES;
        let size_blocks = match superblock.effective_size_sectors {
            0 => layout.data_blocks(),
            sectors => sectors.div_ceil(sectors_per_block),
        };
        if size_blocks > layout.data_blocks() {
            return Err(MetaError::BlockRange {
                first_block: 0,
                blocks: size_blocks,
                size_blocks: layout.data_blocks(),
            });
        }
        if superblock.effective_size_sectors == 0 {
            superblock.effective_size_sectors = size_blocks * sectors_per_block;
        }
        if read.needs_repair || superblock != read.superblock {
            repair = superblock_steps(writer.update(&superblock), layout.md_offset_bytes);
        }
        let recovery = recover_ring(ring, layout.al, superblock.al_extents)?;
        let activity_log = ActivityLog::from_recovery(
            layout.al,
            superblock.al_extents,
            size_blocks.max(1),
            &recovery,
        )?;
        if u64::try_from(bitmap_area.len()).ok() != Some(layout.bm_size_bytes) {
            return Err(MetaError::BufferSize {
                len: bitmap_area.len(),
                expected: usize::try_from(layout.bm_size_bytes).unwrap_or(usize::MAX),
            });
        }
        let words = usize::try_from(size_blocks.div_ceil(64)).expect("fits");
        let slots = decode_bitmap_area(bitmap_area, superblock.max_peers, words)?;
        let bitmaps = superblock
            .peers
            .iter()
            .map(|peer| usize::try_from(peer.bitmap_index).ok().map(|index| slots[index].clone()))
            .collect();
        let loaded = LoadedMetadata {
            superblock: superblock.clone(),
            size_blocks,
            bitmaps,
            hot_extents: recovery.hot_extents.clone(),
            al_damaged_blocks: recovery.damaged_blocks,
            repair,
        };
        Ok((Self { layout, superblock, writer, activity_log, size_blocks }, loaded))
    }

    pub fn layout(&self) -> &MetaLayout {
        &self.layout
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn size_blocks(&self) -> u64 {
        self.size_blocks
    }

    /// Absolute byte range of the bitmap area.
    pub fn bitmap_range(&self) -> Range<u64> {
        self.layout.bm_offset_bytes..self.layout.bm_offset_bytes + self.layout.bm_size_bytes
    }

    /// Changes superblock fields (UUIDs, flags, peer slots). The geometry fields must not
    /// change; the result is validated before anything is planned.
    pub fn update_superblock(
        &mut self,
        edit: impl FnOnce(&mut Superblock),
    ) -> Result<WritePlan, MetaError> {
        let mut next = self.superblock.clone();
        edit(&mut next);
        next.validate()?;
        if !next.matches_layout(&self.layout) {
            return Err(MetaError::InvalidField {
                field: "superblock geometry changed",
                value: i64::from(next.md_size_sectors),
            });
        }
        if next == self.superblock {
            return Ok(WritePlan::default());
        }
        self.superblock = next;
        Ok(superblock_steps(self.writer.update(&self.superblock), self.layout.md_offset_bytes))
    }

    /// The bitmap slot of `node`, assigning a free one (a superblock update) if it has none.
    pub fn bitmap_slot(&mut self, node: u8) -> Result<(u32, WritePlan), MetaError> {
        let index = check_node(node)?;
        if let Ok(slot) = u32::try_from(self.superblock.peers[index].bitmap_index) {
            return Ok((slot, WritePlan::default()));
        }
        let used: Vec<i32> = self.superblock.peers.iter().map(|p| p.bitmap_index).collect();
        let free = (0..self.superblock.max_peers)
            .find(|&slot| !used.contains(&i32::try_from(slot).expect("<= 31")))
            .ok_or(MetaError::MaxPeers(self.superblock.max_peers + 1))?;
        let plan = self.update_superblock(|sb| {
            sb.peers[index].bitmap_index = i32::try_from(free).expect("<= 31");
        })?;
        Ok((free, plan))
    }

    /// Persists bits `first_block..first_block + blocks` of `node`'s bitmap. `bitmaps[n]`
    /// holds node `n`'s current words (engine `Bitmap::words()`; empty for nodes without a
    /// bitmap): a 4 KiB page interleaves every slot, so all are needed to encode it.
    pub fn bitmap_writes(
        &mut self,
        node: u8,
        first_block: u64,
        blocks: u64,
        bitmaps: &[&[u64]],
    ) -> Result<WritePlan, MetaError> {
        let end = first_block.checked_add(blocks);
        if end.is_none_or(|end| end > self.size_blocks) {
            return Err(MetaError::BlockRange {
                first_block,
                blocks,
                size_blocks: self.size_blocks,
            });
        }
        let (slot, mut plan) = self.bitmap_slot(node)?;
        let pages = if plan.is_empty() {
            pages_for_blocks_of_peer(slot, first_block, blocks, self.superblock.max_peers)
        } else {
            // A slot just assigned may hold a former owner's bits (drbdmeta forget-peer does
            // not clear them): rewrite every page so the new owner starts from its own words.
            0..self.layout.bitmap_pages()
        };
        let step = self.encode_pages(pages, bitmaps)?;
        plan.push_step(step);
        Ok(plan)
    }

    /// Every bitmap page (a full write-out, e.g. on a clean detach or after a full-sync mark).
    pub fn all_bitmap_writes(&self, bitmaps: &[&[u64]]) -> Result<WritePlan, MetaError> {
        let mut plan = WritePlan::default();
        plan.push_step(self.encode_pages(0..self.layout.bitmap_pages(), bitmaps)?);
        Ok(plan)
    }

    fn encode_pages(
        &self,
        pages: Range<u64>,
        bitmaps: &[&[u64]],
    ) -> Result<Vec<BlockWrite>, MetaError> {
        if bitmaps.len() > NODE_SLOTS {
            return Err(MetaError::InvalidField {
                field: "bitmaps by node",
                value: i64::try_from(bitmaps.len()).unwrap_or(i64::MAX),
            });
        }
        let max_peers = usize::try_from(self.superblock.max_peers).expect("<= 31");
        let mut by_slot: Vec<&[u64]> = vec![&[]; max_peers];
        for (node, peer) in self.superblock.peers.iter().enumerate() {
            if let (Ok(slot), Some(words)) = (usize::try_from(peer.bitmap_index), bitmaps.get(node))
            {
                by_slot[slot] = words;
            }
        }
        pages
            .filter(|&page| page < self.layout.bitmap_pages())
            .map(|page| {
                Ok(BlockWrite {
                    offset_bytes: self.layout.bitmap_page_offset_bytes(page),
                    bytes: encode_bitmap_page(page, &by_slot, self.superblock.max_peers)?,
                })
            })
            .collect()
    }

    /// Records a change of the activity log's membership (the caller's hot set). Extents it
    /// removes must have their bitmap bits durable already.
    pub fn al_change(&mut self, added: &[u32], removed: &[u32]) -> Result<WritePlan, MetaError> {
        let plans = self.activity_log.handle_set_change(added, removed)?;
        let mut plan = WritePlan::default();
        for AlTransactionPlan { tr_number, block, .. } in plans {
            plan.push_step(vec![BlockWrite {
                offset_bytes: self.layout.al_transaction_offset_bytes(tr_number),
                bytes: block,
            }]);
        }
        Ok(plan)
    }

    /// The activity log, for the LRU/admission mode ([`ActivityLog::handle_write_start`]) when
    /// the caller lets the metadata layer choose hot extents instead of using `al_change`.
    pub fn activity_log_mut(&mut self) -> &mut ActivityLog {
        &mut self.activity_log
    }

    pub fn hot_extents(&self) -> Vec<u32> {
        self.activity_log.hot_extents()
    }

    /// Combines plans, keeping their order (a convenience for callers batching changes).
    pub fn concat(plans: impl IntoIterator<Item = WritePlan>) -> WritePlan {
        let mut all = WritePlan::default();
        for plan in plans {
            all.append(plan);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::layout::AlGeometry;
    use crate::meta::superblock::md_flags;

    /// A simulated metadata device: a sparse map of written blocks, with the option to stop
    /// (crash) after any number of steps and to tear the first unfinished write.
    #[derive(Clone, Default)]
    struct Disk {
        blocks: std::collections::HashMap<u64, Box<[u8; MD_BLOCK_SIZE_BYTES]>>,
    }

    impl Disk {
        fn execute(&mut self, plan: &WritePlan) {
            for write in plan.writes() {
                self.blocks.insert(write.offset_bytes, write.bytes.clone());
            }
        }

        fn read(&self, range: Range<u64>) -> Vec<u8> {
            let mut out = Vec::new();
            let mut offset = range.start;
            while offset < range.end {
                match self.blocks.get(&offset) {
                    Some(block) => out.extend_from_slice(&block[..]),
                    None => out.extend_from_slice(&[0u8; MD_BLOCK_SIZE_BYTES]),
                }
                offset += MD_BLOCK_SIZE_BYTES_U64;
            }
            out
        }

        fn load(&self, size: u64, node: u8) -> (MetaImage, LoadedMetadata) {
            let offset = MetaImage::superblock_offset_bytes(MetaPlacement::Internal, size).unwrap();
            let block = self.read(offset..offset + 4096);
            let opened = MetaImage::open(MetaPlacement::Internal, size, &block).unwrap();
            let ring = self.read(opened.al_range());
            let area = self.read(opened.bitmap_range());
            MetaImage::load(opened, node, &ring, &area).unwrap()
        }
    }

    const SIZE: u64 = 1 << 30;

    fn fresh() -> (MetaImage, Disk) {
        let layout = MetaLayout::internal(SIZE, 2, AlGeometry::default()).unwrap();
        let (image, plan) = MetaImage::create(layout, 1, layout.data_blocks(), 1237).unwrap();
        let mut disk = Disk::default();
        disk.execute(&plan);
        (image, disk)
    }

    #[test]
    fn create_then_load() {
        let (image, disk) = fresh();
        let (loaded_image, loaded) = disk.load(SIZE, 1);
        assert_eq!(loaded.superblock, *image.superblock());
        assert_eq!(loaded.size_blocks, 262_119);
        assert!(loaded.bitmaps.iter().all(Option::is_none));
        assert!(loaded.hot_extents.is_empty());
        assert!(loaded.repair.is_empty());
        assert_eq!(loaded_image.size_blocks(), 262_119);
    }

    #[test]
    fn changes_survive_a_reload() {
        let (mut image, mut disk) = fresh();
        let plan = image
            .update_superblock(|sb| {
                sb.current_uuid = 0xABCD_0000_0000_0001;
                sb.flags = md_flags::CONSISTENT | md_flags::PRIMARY_IND;
            })
            .unwrap();
        assert_eq!(plan.steps.len(), 2, "superblock updates take two durable steps");
        disk.execute(&plan);

        let words = usize::try_from(image.size_blocks().div_ceil(64)).unwrap();
        let mut node0 = vec![0u64; words];
        node0[100] = 0xF0;
        let mut node2 = vec![0u64; words];
        node2[4095] = 1 << 6;
        let empty: &[u64] = &[];
        let by_node: Vec<&[u64]> = vec![&node0, empty, &node2];
        let plan = image.bitmap_writes(0, 6400, 64, &by_node).unwrap();
        assert_eq!(plan.steps.len(), 3, "slot assignment (2 steps), then the pages");
        assert_eq!(plan.steps[2].len(), 16, "a new slot rewrites the whole area");
        disk.execute(&plan);
        let plan = image.bitmap_writes(2, 262_086, 1, &by_node).unwrap();
        disk.execute(&plan);
        let plan = image.bitmap_writes(0, 6400, 64, &by_node).unwrap();
        assert_eq!(plan.steps.len(), 1, "an assigned slot writes only its dirty page");
        assert_eq!(plan.steps[0].len(), 1);

        disk.execute(&image.al_change(&[3, 9, 255], &[]).unwrap());
        disk.execute(&image.al_change(&[17], &[9]).unwrap());

        let (_, loaded) = disk.load(SIZE, 1);
        assert_eq!(loaded.superblock.current_uuid, 0xABCD_0000_0000_0001);
        assert_eq!(loaded.bitmaps[0].as_deref(), Some(&node0[..]));
        assert_eq!(loaded.bitmaps[2].as_deref(), Some(&node2[..]));
        assert_eq!(loaded.bitmaps[1], None);
        assert_eq!(loaded.hot_extents, vec![3, 17, 255]);
    }

    #[test]
    fn a_crash_inside_a_superblock_update_is_repaired_on_load() {
        let (mut image, mut disk) = fresh();
        let plan = image.update_superblock(|sb| sb.current_uuid = 0x1234_5678_9ABC_DEF1).unwrap();
        // Only the first step made it.
        disk.execute(&WritePlan { steps: vec![plan.steps[0].clone()] });
        let (_, loaded) = disk.load(SIZE, 1);
        assert_eq!(loaded.superblock.current_uuid, 0x1234_5678_9ABC_DEF1);
        assert!(!loaded.repair.is_empty());
        disk.execute(&loaded.repair);
        let (_, loaded) = disk.load(SIZE, 1);
        assert!(loaded.repair.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Uuid(u64),
        Bits { node: u8, first: u64, blocks: u64 },
        Al { added: Vec<u32>, removed: Vec<u32> },
    }

    fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            any::<u64>().prop_map(Op::Uuid),
            (prop_oneof![Just(0u8), Just(2u8)], 0u64..262_000, 1u64..100)
                .prop_map(|(node, first, blocks)| Op::Bits { node, first, blocks }),
            (prop::collection::vec(0u32..255, 0..80), prop::collection::vec(0u32..255, 0..20))
                .prop_map(|(added, removed)| Op::Al { added, removed }),
        ]
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Model {
        uuid: u64,
        bitmaps: [Vec<u64>; 3],
        hot: std::collections::BTreeSet<u32>,
    }

    fn tear(old: &[u8; 4096], new: &[u8; 4096], sectors: u8) -> Box<[u8; 4096]> {
        let mut out = Box::new(*old);
        for s in 0..8usize {
            if sectors & (1 << s) != 0 {
                out[s * 512..(s + 1) * 512].copy_from_slice(&new[s * 512..(s + 1) * 512]);
            }
        }
        out
    }

    proptest::proptest! {
        /// Any sequence of changes, a crash after any step with the next write torn at any
        /// sectors: the reload shows, for every piece of state, the value before or after the
        /// change in progress, and everything completed before it.
        #[test]
        fn crash_at_any_step_reloads_a_consistent_state(
            ops in proptest::collection::vec(op_strategy(), 1..12),
            crash_pick in 0usize..1000,
            torn_sectors in proptest::prelude::any::<u8>(),
        ) {
            let (mut image, mut disk) = fresh();
            let words = usize::try_from(image.size_blocks().div_ceil(64)).unwrap();
            let mut model = Model {
                uuid: image.superblock().current_uuid,
                bitmaps: [vec![0; words], vec![0; words], vec![0; words]],
                hot: Default::default(),
            };
            // Every step, tagged with the op it belongs to, and the model before/after each op.
            let mut steps: Vec<(usize, Vec<BlockWrite>)> = Vec::new();
            let mut models = vec![model.clone()];
            for (i, op) in ops.iter().enumerate() {
                let plan = match op {
                    Op::Uuid(uuid) => {
                        model.uuid = *uuid;
                        image.update_superblock(|sb| sb.current_uuid = *uuid).unwrap()
                    }
                    Op::Bits { node, first, blocks } => {
                        let blocks = (*blocks).min(image.size_blocks() - first);
                        let bitmap = &mut model.bitmaps[usize::from(*node)];
                        for block in *first..first + blocks {
                            bitmap[usize::try_from(block / 64).unwrap()] ^= 1 << (block % 64);
                        }
                        let by_node: Vec<&[u64]> = model.bitmaps.iter().map(Vec::as_slice).collect();
                        image.bitmap_writes(*node, *first, blocks, &by_node).unwrap()
                    }
                    Op::Al { added, removed } => {
                        for extent in removed {
                            model.hot.remove(extent);
                        }
                        // Slots are limited (1237): this workload never fills them.
                        model.hot.extend(added.iter().copied());
                        image.al_change(added, removed).unwrap()
                    }
                };
                steps.extend(plan.steps.into_iter().map(|step| (i, step)));
                models.push(model.clone());
            }
            let crash_after = crash_pick % (steps.len() + 1);
            for (_, step) in &steps[..crash_after] {
                disk.execute(&WritePlan { steps: vec![step.clone()] });
            }
            let in_progress = steps.get(crash_after).map(|(op, _)| *op);
            if let Some((_, step)) = steps.get(crash_after) {
                // Writes of one step may land in any order; the first one lands torn.
                let write = &step[0];
                let old = disk.read(write.offset_bytes..write.offset_bytes + 4096);
                let mut old_block = [0u8; 4096];
                old_block.copy_from_slice(&old);
                disk.blocks.insert(write.offset_bytes, tear(&old_block, &write.bytes, torn_sectors));
            }
            let (_, loaded) = disk.load(SIZE, 1);
            // Ops before the one in progress are complete; the one in progress is old or new.
            let (before, after) = match in_progress {
                Some(op) => (&models[op], &models[op + 1]),
                None => (models.last().unwrap(), models.last().unwrap()),
            };
            let uuid = loaded.superblock.current_uuid;
            proptest::prop_assert!(uuid == before.uuid || uuid == after.uuid);
            for node in [0usize, 2] {
                let loaded_words = loaded.bitmaps[node].clone().unwrap_or_else(|| vec![0; words]);
                for (w, &word) in loaded_words.iter().enumerate() {
                    proptest::prop_assert!(
                        word == before.bitmaps[node][w] || word == after.bitmaps[node][w],
                        "node {} word {}", node, w
                    );
                }
            }
            let hot: std::collections::BTreeSet<u32> = loaded.hot_extents.iter().copied().collect();
            proptest::prop_assert!(before.hot.intersection(&after.hot).all(|e| hot.contains(e)));
            proptest::prop_assert!(hot.iter().all(|e| before.hot.contains(e) || after.hot.contains(e)));
        }
    }

    #[test]
    fn wrong_node_and_bad_ranges_are_errors() {
        let (mut image, disk) = fresh();
        let offset = MetaImage::superblock_offset_bytes(MetaPlacement::Internal, SIZE).unwrap();
        let opened =
            MetaImage::open(MetaPlacement::Internal, SIZE, &disk.read(offset..offset + 4096))
                .unwrap();
        let ring = disk.read(opened.al_range());
        let area = disk.read(opened.bitmap_range());
        assert!(MetaImage::load(opened, 2, &ring, &area).is_err());
        assert!(image.bitmap_writes(0, 262_119, 1, &[]).is_err());
        assert!(image.bitmap_writes(40, 0, 1, &[]).is_err());
        assert!(image.update_superblock(|sb| sb.max_peers = 3).is_err());
        // Two bitmap slots: a third node has none left.
        image.bitmap_slot(0).unwrap();
        image.bitmap_slot(2).unwrap();
        assert!(image.bitmap_slot(3).is_err());
        assert!(MetaImage::superblock_offset_bytes(MetaPlacement::Internal, 100).is_err());
    }
}

//! The logical metadata a node persists, and the updates the state machine asks for.
//!
//! The state machine never encodes bytes: it emits `MetaUpdate`s in order and assumes each one
//! is durable before the next output is acted upon. `Metadata::apply` is the reference meaning
//! of every update; the simulator keeps a `Metadata` as its "disk", and the file-backed store
//! (DRBD v09 layout, in `crate::meta`) implements `MetadataStore` with its encoders.

use crate::NodeId;
use crate::bitmap::Bitmap;
use crate::constants::{AL_EXTENT_BLOCKS, NODE_ID_MAX};
use crate::uuid::GenerationUuids;

/// What the superblock flags say about the local data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistedDisk {
    Inconsistent,
    Outdated,
    /// Consistent data that was UpToDate when last written (DRBD's MDF_WAS_UP_TO_DATE).
    UpToDate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaFlags {
    pub disk: PersistedDisk,
    /// Set while primary (DRBD's MDF_PRIMARY_IND); found set at attach means a crash as primary.
    pub primary_indicator: bool,
    /// Went down as primary; cleared once a resync has reconciled the activity log.
    pub crashed_primary: bool,
    /// The data may be garbage (a failed local write): only a full sync repairs it.
    pub full_sync_required: bool,
    /// Peers known not to hold UpToDate data (fenced, or sync targets), by node id bit.
    pub peer_outdated: u64,
}

// Updates are short-lived queue entries; boxing the UUID set would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaUpdate {
    Uuids(GenerationUuids),
    Flags(MetaFlags),
    BitmapSet {
        peer: NodeId,
        first_block: u64,
        blocks: u64,
    },
    BitmapClear {
        peer: NodeId,
        first_block: u64,
        blocks: u64,
    },
    /// An activity-log transaction: extents turning hot and extents leaving the log.
    ActivityLog {
        added: Vec<u64>,
        removed: Vec<u64>,
    },
    /// Online grow (`protocol::node::resize`): the data size becomes `size_blocks`, every
    /// bitmap grows with clear bits (the state machine marks what must be resynced), and
    /// internal metadata moves to the new end of the grown backing file.
    Resize {
        size_blocks: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub node_id: NodeId,
    pub size_blocks: u64,
    pub uuids: GenerationUuids,
    pub flags: MetaFlags,
    /// One bitmap per possible peer, indexed by node id; the own slot stays clear.
    pub bitmaps: Vec<Bitmap>,
    /// Hot activity-log extents (extent number = block / AL_EXTENT_BLOCKS).
    pub activity_log: Vec<u64>,
}

impl Metadata {
    /// What `create-md` produces: no data generation yet, Inconsistent, nothing out of sync.
    pub fn create(node_id: NodeId, size_blocks: u64) -> Self {
        Self {
            node_id,
            size_blocks,
            uuids: GenerationUuids::just_created(),
            flags: MetaFlags {
                disk: PersistedDisk::Inconsistent,
                primary_indicator: false,
                crashed_primary: false,
                full_sync_required: false,
                peer_outdated: 0,
            },
            bitmaps: (0..=NODE_ID_MAX).map(|_| Bitmap::new(size_blocks)).collect(),
            activity_log: Vec::new(),
        }
    }

    pub fn apply(&mut self, update: &MetaUpdate) {
        match update {
            MetaUpdate::Uuids(uuids) => self.uuids = uuids.clone(),
            MetaUpdate::Flags(flags) => self.flags = flags.clone(),
            MetaUpdate::BitmapSet { peer, first_block, blocks } => {
                self.bitmaps[peer.index()]
                    .set_range(*first_block, *blocks)
                    .expect("the state machine persists only valid ranges");
            }
            MetaUpdate::BitmapClear { peer, first_block, blocks } => {
                self.bitmaps[peer.index()]
                    .clear_range(*first_block, *blocks)
                    .expect("the state machine persists only valid ranges");
            }
            MetaUpdate::Resize { size_blocks } => {
                assert!(*size_blocks >= self.size_blocks, "the state machine never shrinks");
                self.size_blocks = *size_blocks;
                for bitmap in &mut self.bitmaps {
                    *bitmap = bitmap.grown(*size_blocks);
                }
            }
            MetaUpdate::ActivityLog { added, removed } => {
                self.activity_log.retain(|e| !removed.contains(e));
                for extent in added {
                    if !self.activity_log.contains(extent) {
                        self.activity_log.push(*extent);
                    }
                }
            }
        }
    }

    /// Block range `(first, blocks)` of an activity-log extent, clipped to the device.
    pub fn extent_range(&self, extent: u64) -> Option<(u64, u64)> {
        let first = extent.checked_mul(AL_EXTENT_BLOCKS)?;
        (first < self.size_blocks).then(|| (first, AL_EXTENT_BLOCKS.min(self.size_blocks - first)))
    }
}

/// Where a node's metadata lives. Each `apply` must be durable when it returns (the driver
/// calls it before acting on any later output); an implementation that writes a block must
/// survive that write being torn (two copies or a checksummed transaction log).
pub trait MetadataStore {
    type Error: std::error::Error + Send + Sync + 'static;
    fn load(&mut self) -> Result<Metadata, Self::Error>;
    fn apply(&mut self, update: &MetaUpdate) -> Result<(), Self::Error>;
}

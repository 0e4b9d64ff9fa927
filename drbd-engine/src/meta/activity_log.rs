//! The activity log: which 4 MiB extents may hold writes not yet known to be on every replica.
//!
//! In memory it is a table of `al-extents` slots, each holding an extent number or nothing,
//! managed least-recently-used. A write may touch an extent only while that extent is in the
//! table *on disk*: the first write to a cold extent therefore waits for a 4 KiB transaction
//! recording the change. After a primary crash, the extents in the table are exactly the ones
//! that may differ between the replicas, so only they are resynced.
//!
//! On disk (measured against drbdmeta's `create-md` and `apply-al`; big-endian):
//!
//! | offset | field |
//! |---|---|
//! | 0 | u32 magic 0x69cb65a2 |
//! | 4 | u32 transaction number |
//! | 8 | u32 CRC-32C (seed 0, not inverted) of the whole block with this field zero |
//! | 12 | u16 type: 0 update, 0xffff initialized |
//! | 14 | u16 number of updates (<= 64) |
//! | 16 | u16 context size (the kernel writes al-extents here) |
//! | 18 | u16 first slot of the context window |
//! | 20 | u32 reserved x4 |
//! | 36 | u16 slot number x64 (unused: 0xffff) |
//! | 164 | u32 extent number x64 (unused: 0xffffffff) |
//! | 420 | u32 context x919: extent of slots start.., 0xffffffff for free |
//!
//! Replay (what drbdmeta apply-al does, verified case by case): start with every slot free,
//! apply the valid transactions oldest to newest; for each, first the context window (its
//! length is min(919, al-extents - start), whatever the size field says), then the updates.
//! Unused update entries must hold 0xffff/0xffffffff: drbdmeta 9.22 applies all 64 entries, so
//! zero-filled ones would claim extent 0 in slot 0. Transaction `t` lives at ring position
//! `t mod slots` (see [`AlGeometry::block_for_transaction`]); drbdmeta asserts on anything else.

use std::collections::{BTreeSet, HashMap};

use super::constants::{
    AL_CONTEXT_PER_TRANSACTION, AL_EXTENT_BLOCKS, AL_EXTENT_FREE, AL_MAGIC, AL_SLOT_NONE,
    AL_UPDATES_PER_TRANSACTION, MD_BLOCK_SIZE_BYTES,
};
use super::layout::AlGeometry;
use super::{MetaError, be_u16, be_u32, drbd_crc32c, put_be_u16, put_be_u32};

const TYPE_UPDATE: u16 = 0;
const TYPE_INITIALIZED: u16 = 0xffff;
const SLOTS_OFFSET: usize = 36;
const EXTENTS_OFFSET: usize = SLOTS_OFFSET + 2 * AL_UPDATES_PER_TRANSACTION;
const CONTEXT_OFFSET: usize = EXTENTS_OFFSET + 4 * AL_UPDATES_PER_TRANSACTION;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlTransactionKind {
    /// Slot changes plus a window of the slot table.
    Update,
    /// Written by create-md and apply-al: an empty log, carries nothing.
    Initialized,
}

/// Slot `slot` now holds `extent` (AL_EXTENT_FREE: nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlSlotUpdate {
    pub slot: u16,
    pub extent: u32,
}

/// One 4 KiB activity-log block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    pub tr_number: u32,
    pub kind: AlTransactionKind,
    pub updates: Vec<AlSlotUpdate>,
    /// As the kernel writes it: the number of slots (al-extents). Replay ignores it.
    pub context_size: u16,
    pub context_start_slot: u16,
    /// Extent numbers of slots `context_start_slot..`; on decode always 919 entries.
    pub context: Vec<u32>,
}

impl AlTransaction {
    /// The block create-md writes into every ring position: type "initialized", number 0,
    /// everything else zero.
    pub fn initialized(tr_number: u32) -> Self {
        Self {
            tr_number,
            kind: AlTransactionKind::Initialized,
            updates: Vec::new(),
            context_size: 0,
            context_start_slot: 0,
            context: Vec::new(),
        }
    }

    pub fn encode(&self) -> Result<Box<[u8; MD_BLOCK_SIZE_BYTES]>, MetaError> {
        if self.updates.len() > AL_UPDATES_PER_TRANSACTION {
            return Err(MetaError::InvalidField {
                field: "al updates",
                value: i64::try_from(self.updates.len()).unwrap_or(i64::MAX),
            });
        }
        if self.context.len() > AL_CONTEXT_PER_TRANSACTION {
            return Err(MetaError::InvalidField {
                field: "al context",
                value: i64::try_from(self.context.len()).unwrap_or(i64::MAX),
            });
        }
        let mut block = Box::new([0u8; MD_BLOCK_SIZE_BYTES]);
        put_be_u32(&mut block[..], 0, AL_MAGIC);
        put_be_u32(&mut block[..], 4, self.tr_number);
        match self.kind {
            AlTransactionKind::Initialized => {
                if !self.updates.is_empty() || !self.context.is_empty() {
                    return Err(MetaError::InvalidField {
                        field: "initialized transaction content",
                        value: 1,
                    });
                }
                put_be_u16(&mut block[..], 12, TYPE_INITIALIZED);
            }
            AlTransactionKind::Update => {
                put_be_u16(&mut block[..], 12, TYPE_UPDATE);
                let n_updates = u16::try_from(self.updates.len()).expect("<= 64");
                put_be_u16(&mut block[..], 14, n_updates);
                put_be_u16(&mut block[..], 16, self.context_size);
                put_be_u16(&mut block[..], 18, self.context_start_slot);
                for i in 0..AL_UPDATES_PER_TRANSACTION {
                    let update = self
                        .updates
                        .get(i)
                        .copied()
                        .unwrap_or(AlSlotUpdate { slot: AL_SLOT_NONE, extent: AL_EXTENT_FREE });
                    put_be_u16(&mut block[..], SLOTS_OFFSET + 2 * i, update.slot);
                    put_be_u32(&mut block[..], EXTENTS_OFFSET + 4 * i, update.extent);
                }
                for i in 0..AL_CONTEXT_PER_TRANSACTION {
                    let extent = self.context.get(i).copied().unwrap_or(AL_EXTENT_FREE);
                    put_be_u32(&mut block[..], CONTEXT_OFFSET + 4 * i, extent);
                }
            }
        }
        let crc = drbd_crc32c(&block[..]);
        put_be_u32(&mut block[..], 8, crc);
        Ok(block)
    }

    /// Decodes and checks one block: magic, checksum, type, counts.
    pub fn decode(block: &[u8]) -> Result<Self, MetaError> {
        if block.len() != MD_BLOCK_SIZE_BYTES {
            return Err(MetaError::BufferSize { len: block.len(), expected: MD_BLOCK_SIZE_BYTES });
        }
        let magic = be_u32(block, 0);
        if magic != AL_MAGIC {
            return Err(MetaError::BadMagic { found: magic, expected: AL_MAGIC });
        }
        let stored = be_u32(block, 8);
        let mut copy = [0u8; MD_BLOCK_SIZE_BYTES];
        copy.copy_from_slice(block);
        copy[8..12].fill(0);
        let computed = drbd_crc32c(&copy);
        if stored != computed {
            return Err(MetaError::Checksum { stored, computed });
        }
        let tr_number = be_u32(block, 4);
        match be_u16(block, 12) {
            TYPE_INITIALIZED => Ok(Self::initialized(tr_number)),
            TYPE_UPDATE => {
                let n_updates = usize::from(be_u16(block, 14));
                if n_updates > AL_UPDATES_PER_TRANSACTION {
                    return Err(MetaError::InvalidField {
                        field: "al n_updates",
                        value: i64::try_from(n_updates).unwrap_or(i64::MAX),
                    });
                }
                let updates = (0..n_updates)
                    .map(|i| AlSlotUpdate {
                        slot: be_u16(block, SLOTS_OFFSET + 2 * i),
                        extent: be_u32(block, EXTENTS_OFFSET + 4 * i),
                    })
                    .collect();
                let context = (0..AL_CONTEXT_PER_TRANSACTION)
                    .map(|i| be_u32(block, CONTEXT_OFFSET + 4 * i))
                    .collect();
                Ok(Self {
                    tr_number,
                    kind: AlTransactionKind::Update,
                    updates,
                    context_size: be_u16(block, 16),
                    context_start_slot: be_u16(block, 18),
                    context,
                })
            }
            other => Err(MetaError::InvalidField {
                field: "al transaction type",
                value: i64::from(other),
            }),
        }
    }

    /// Applies this transaction to a slot table (context window first, then updates).
    fn replay_into(&self, slots: &mut [u32]) {
        if self.kind == AlTransactionKind::Initialized {
            return;
        }
        let start = usize::from(self.context_start_slot);
        if start < slots.len() {
            let len = AL_CONTEXT_PER_TRANSACTION.min(slots.len() - start);
            for (slot, extent) in slots[start..start + len].iter_mut().zip(&self.context) {
                *slot = *extent;
            }
        }
        for update in &self.updates {
            // Out-of-range slots come from a different al-extents setting; DRBD ignores them.
            if let Some(slot) = slots.get_mut(usize::from(update.slot)) {
                *slot = update.extent;
            }
        }
    }
}

/// A freshly initialized ring, byte-exact with what create-md and apply-al write.
pub fn encode_initialized_ring(geometry: AlGeometry) -> Vec<u8> {
    let block =
        AlTransaction::initialized(0).encode().expect("an initialized transaction always encodes");
    let slots = usize::try_from(geometry.ring_slots()).expect("ring slots fit usize");
    block.repeat(slots)
}

/// What the ring says after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlRecovery {
    /// The slot table as of the newest intact transaction (AL_EXTENT_FREE: empty slot).
    pub slots: Vec<u32>,
    /// Extents in the table, sorted: after a primary crash, mark them out of sync for every
    /// peer (drbdmeta apply-al does this only when the primary flag is set).
    pub hot_extents: Vec<u32>,
    /// The number the next transaction must carry.
    pub next_tr_number: u32,
    /// Transactions replayed (0 for a freshly initialized ring).
    pub replayed: u32,
    /// Blocks skipped: bad magic or checksum (a torn write), or at the wrong ring position.
    pub damaged_blocks: u32,
}

/// Recovers the slot table from the ring (`geometry.ring_bytes()` bytes, as on disk).
pub fn recover_ring(
    ring: &[u8],
    geometry: AlGeometry,
    al_extents: u32,
) -> Result<AlRecovery, MetaError> {
    let expected = usize::try_from(geometry.ring_bytes()).expect("ring fits memory");
    if ring.len() != expected {
        return Err(MetaError::BufferSize { len: ring.len(), expected });
    }
    if al_extents == 0 || al_extents > geometry.al_extents_max() {
        return Err(MetaError::AlExtents { al_extents, max: geometry.al_extents_max() });
    }
    let positions = geometry.ring_slots();
    let mut entries: Vec<Option<AlTransaction>> = Vec::new();
    let mut damaged_blocks = 0u32;
    let mut initialized_max: Option<u32> = None;
    for position in 0..positions {
        let block_index = usize::try_from(geometry.block_for_position(position)).expect("fits");
        let block =
            &ring[block_index * MD_BLOCK_SIZE_BYTES..(block_index + 1) * MD_BLOCK_SIZE_BYTES];
        match AlTransaction::decode(block) {
            Ok(tr) if tr.kind == AlTransactionKind::Initialized => {
                initialized_max =
                    Some(initialized_max.map_or(tr.tr_number, |m| m.max(tr.tr_number)));
                entries.push(None);
            }
            Ok(tr)
                if tr.tr_number % positions == position
                    && u64::from(tr.tr_number) < geometry.tr_number_modulus() =>
            {
                entries.push(Some(tr))
            }
            _ => {
                damaged_blocks += 1;
                entries.push(None);
            }
        }
    }
    let slots_len = usize::try_from(al_extents).expect("fits");
    let mut slots = vec![AL_EXTENT_FREE; slots_len];
    let len = entries.len();
    let successor_continues = |i: usize, tr: u32| {
        entries[(i + 1) % len]
            .as_ref()
            .is_some_and(|next| next.tr_number == geometry.next_tr_number(tr))
    };
    // The newest transaction ends a run of consecutive numbers; with several runs (only after
    // damage), the one with the highest number in serial-number order wins.
    let mut newest: Option<usize> = None;
    for (i, entry) in entries.iter().enumerate() {
        let Some(tr) = entry else { continue };
        if successor_continues(i, tr.tr_number) {
            continue;
        }
        let better = match newest.and_then(|n| entries[n].as_ref()) {
            None => true,
            Some(best) => geometry.tr_number_newer(tr.tr_number, best.tr_number),
        };
        if better {
            newest = Some(i);
        }
    }
    let Some(newest) = newest else {
        return Ok(AlRecovery {
            slots,
            hot_extents: Vec::new(),
            next_tr_number: initialized_max.map_or(1, |m| geometry.next_tr_number(m)),
            replayed: 0,
            damaged_blocks,
        });
    };
    // Walk back over consecutive predecessors, at most once around the ring.
    let mut run = vec![newest];
    let mut current = newest;
    while run.len() < len {
        let previous = (current + len - 1) % len;
        let (Some(prev), Some(cur)) = (&entries[previous], &entries[current]) else {
            break;
        };
        if geometry.next_tr_number(prev.tr_number) != cur.tr_number {
            break;
        }
        run.push(previous);
        current = previous;
    }
    for &i in run.iter().rev() {
        entries[i].as_ref().expect("run holds decoded entries").replay_into(&mut slots);
    }
    let hot: BTreeSet<u32> = slots.iter().copied().filter(|&e| e != AL_EXTENT_FREE).collect();
    let newest_tr = entries[newest].as_ref().expect("decoded").tr_number;
    Ok(AlRecovery {
        slots,
        hot_extents: hot.into_iter().collect(),
        next_tr_number: geometry.next_tr_number(newest_tr),
        replayed: u32::try_from(run.len()).expect("run <= ring slots"),
        damaged_blocks,
    })
}

/// What a write must wait for before it may touch the backing device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlAdmission {
    /// Every extent of the write is hot on disk: go ahead.
    Ready,
    /// The extents are in the transaction already in flight: go ahead once it is durable.
    AfterTransaction { tr_number: u32 },
    /// Write this transaction (first the bitmap pages of `plan.evicted`), then go ahead.
    Transaction(AlTransactionPlan),
    /// Not now: another transaction is in flight, or every slot has writes in flight.
    /// No reference was taken; retry after a transaction became durable or a write finished.
    Busy,
}

/// A transaction to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransactionPlan {
    pub tr_number: u32,
    /// Block inside the AL area (`MetaLayout::al_transaction_offset_bytes` gives the offset).
    pub ring_block: u32,
    pub block: Box<[u8; MD_BLOCK_SIZE_BYTES]>,
    /// Extents this transaction drops from the log. Their bitmap pages
    /// (`bitmap_area::pages_for_extent`) must be on stable storage before `block` is written:
    /// once the log forgets an extent, only the on-disk bitmap remembers its dirty blocks.
    pub evicted: Vec<u32>,
    pub transaction: AlTransaction,
}

/// The in-memory activity log (LRU over `al-extents` slots) and its transaction writer.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    geometry: AlGeometry,
    /// Extent per slot (AL_EXTENT_FREE when empty), including changes in flight.
    slots: Vec<u32>,
    /// Slots changed by the transaction in flight.
    pending: Vec<bool>,
    extent_slot: HashMap<u32, usize>,
    last_used: Vec<u64>,
    /// Writes in flight per slot; such a slot is never evicted.
    references: Vec<u32>,
    use_clock: u64,
    next_tr_number: u32,
    context_cursor: usize,
    in_flight: Option<u32>,
    /// Extents of the device; extent numbers at or beyond are refused.
    device_extents: u32,
}

impl ActivityLog {
    /// An empty log continuing the ring at `next_tr_number` (from [`recover_ring`]). Starting
    /// empty forgets what the ring held: mark its hot extents out of sync and write their
    /// bitmap pages first, or use [`ActivityLog::from_recovery`].
    pub fn new(
        geometry: AlGeometry,
        al_extents: u32,
        device_blocks: u64,
        next_tr_number: u32,
    ) -> Result<Self, MetaError> {
        if al_extents == 0 || al_extents > geometry.al_extents_max() {
            return Err(MetaError::AlExtents { al_extents, max: geometry.al_extents_max() });
        }
        let n = usize::try_from(al_extents).expect("fits");
        let device_extents =
            u32::try_from(device_blocks.div_ceil(AL_EXTENT_BLOCKS)).map_err(|_| {
                MetaError::InvalidField {
                    field: "device blocks",
                    value: i64::try_from(device_blocks).unwrap_or(i64::MAX),
                }
            })?;
        Ok(Self {
            geometry,
            slots: vec![AL_EXTENT_FREE; n],
            pending: vec![false; n],
            extent_slot: HashMap::new(),
            last_used: vec![0; n],
            references: vec![0; n],
            use_clock: 0,
            next_tr_number: u32::try_from(u64::from(next_tr_number) % geometry.tr_number_modulus())
                .expect("below the 2^32 modulus"),
            context_cursor: 0,
            in_flight: None,
            device_extents,
        })
    }

    /// A log holding the recovered table: nothing is forgotten until evicted normally.
    pub fn from_recovery(
        geometry: AlGeometry,
        al_extents: u32,
        device_blocks: u64,
        recovery: &AlRecovery,
    ) -> Result<Self, MetaError> {
        let mut log = Self::new(geometry, al_extents, device_blocks, recovery.next_tr_number)?;
        if recovery.slots.len() != log.slots.len() {
            return Err(MetaError::AlExtents {
                al_extents: u32::try_from(recovery.slots.len()).unwrap_or(u32::MAX),
                max: al_extents,
            });
        }
        for (slot, &extent) in recovery.slots.iter().enumerate() {
            // A duplicate or out-of-range extent (possible only in a corrupt but checksummed
            // ring) stays out of the table; the caller resyncs it anyway from hot_extents.
            if extent == AL_EXTENT_FREE
                || extent >= log.device_extents
                || log.extent_slot.contains_key(&extent)
            {
                continue;
            }
            log.slots[slot] = extent;
            log.extent_slot.insert(extent, slot);
        }
        Ok(log)
    }

    fn extent_range(&self, first_block: u64, blocks: u64) -> Result<(u32, u32), MetaError> {
        let device_blocks = u64::from(self.device_extents) * AL_EXTENT_BLOCKS;
        let end = first_block.checked_add(blocks);
        if blocks == 0 || end.is_none_or(|end| end > device_blocks) {
            return Err(MetaError::BlockRange { first_block, blocks, size_blocks: device_blocks });
        }
        let first = u32::try_from(first_block / AL_EXTENT_BLOCKS).expect("< device_extents");
        let last =
            u32::try_from((first_block + blocks - 1) / AL_EXTENT_BLOCKS).expect("< device_extents");
        let count = usize::try_from(last - first + 1).expect("fits");
        if count > AL_UPDATES_PER_TRANSACTION.min(self.slots.len()) {
            return Err(MetaError::ExtentRange { first, last });
        }
        Ok((first, last))
    }

    fn touch(&mut self, slot: usize) {
        self.use_clock += 1;
        self.last_used[slot] = self.use_clock;
        self.references[slot] += 1;
    }

    /// A write of `blocks` blocks from `first_block` wants to start.
    pub fn handle_write_start(
        &mut self,
        first_block: u64,
        blocks: u64,
    ) -> Result<AlAdmission, MetaError> {
        let (first, last) = self.extent_range(first_block, blocks)?;
        if (first..=last).all(|e| self.extent_slot.contains_key(&e)) {
            let mut waits = false;
            for extent in first..=last {
                let slot = self.extent_slot[&extent];
                waits |= self.pending[slot];
                self.touch(slot);
            }
            return Ok(match (waits, self.in_flight) {
                (true, Some(tr_number)) => AlAdmission::AfterTransaction { tr_number },
                _ => AlAdmission::Ready,
            });
        }
        if self.in_flight.is_some() {
            return Ok(AlAdmission::Busy);
        }
        let missing: Vec<u32> =
            (first..=last).filter(|e| !self.extent_slot.contains_key(e)).collect();
        // Free slots first, then the least recently used idle ones; one linear scan per
        // missing extent (at most two for a request), no sorting on the write path.
        let mut chosen: Vec<usize> = Vec::with_capacity(missing.len());
        for _ in &missing {
            let eligible = |s: usize| {
                let extent = self.slots[s];
                self.references[s] == 0
                    && !chosen.contains(&s)
                    && (extent == AL_EXTENT_FREE || !(first..=last).contains(&extent))
            };
            let free =
                (0..self.slots.len()).find(|&s| self.slots[s] == AL_EXTENT_FREE && eligible(s));
            let pick = free.or_else(|| {
                (0..self.slots.len()).filter(|&s| eligible(s)).min_by_key(|&s| self.last_used[s])
            });
            match pick {
                Some(slot) => chosen.push(slot),
                None => return Ok(AlAdmission::Busy),
            }
        }
        let candidates = chosen;
        let mut updates = Vec::with_capacity(missing.len());
        let mut evicted = Vec::new();
        for (&extent, &slot) in missing.iter().zip(&candidates) {
            let old = self.slots[slot];
            if old != AL_EXTENT_FREE {
                evicted.push(old);
                self.extent_slot.remove(&old);
            }
            self.slots[slot] = extent;
            self.pending[slot] = true;
            self.extent_slot.insert(extent, slot);
            updates.push(AlSlotUpdate {
                slot: u16::try_from(slot).expect("al-extents <= 65534"),
                extent,
            });
        }
        let n = self.slots.len();
        let start = self.context_cursor;
        let window = AL_CONTEXT_PER_TRANSACTION.min(n - start);
        self.context_cursor = if start + window >= n { 0 } else { start + window };
        let tr_number = self.next_tr_number;
        self.next_tr_number = self.geometry.next_tr_number(tr_number);
        let transaction = AlTransaction {
            tr_number,
            kind: AlTransactionKind::Update,
            updates,
            context_size: u16::try_from(n).expect("al-extents <= 65534"),
            context_start_slot: u16::try_from(start).expect("< al-extents"),
            // The context carries the table *after* this transaction's updates, so replaying
            // context and updates in either order yields the same table.
            context: self.slots[start..start + window].to_vec(),
        };
        let block = transaction.encode()?;
        self.in_flight = Some(tr_number);
        for extent in first..=last {
            let slot = self.extent_slot[&extent];
            self.touch(slot);
        }
        Ok(AlAdmission::Transaction(AlTransactionPlan {
            tr_number,
            ring_block: self.geometry.block_for_transaction(tr_number),
            block,
            evicted,
            transaction,
        }))
    }

    /// Membership decided by the caller (a state machine that keeps its own hot set): drop
    /// `removed`, add `added`, and return the transactions recording that, to be written in
    /// order, each durable before the next. Unknown removals and known additions are no-ops.
    /// Do not mix with [`ActivityLog::handle_write_start`] on the same log: this mode ignores
    /// references and assumes no transaction is in flight.
    pub fn handle_set_change(
        &mut self,
        added: &[u32],
        removed: &[u32],
    ) -> Result<Vec<AlTransactionPlan>, MetaError> {
        if let Some(tr_number) = self.in_flight {
            return Err(MetaError::UnexpectedTransaction { tr_number });
        }
        let mut changes: Vec<AlSlotUpdate> = Vec::new();
        for &extent in removed {
            if let Some(slot) = self.extent_slot.remove(&extent) {
                self.slots[slot] = AL_EXTENT_FREE;
                self.references[slot] = 0;
                changes.push(AlSlotUpdate {
                    slot: u16::try_from(slot).expect("al-extents <= 65534"),
                    extent: AL_EXTENT_FREE,
                });
            }
        }
        let mut free = (0..self.slots.len()).filter(|&s| self.slots[s] == AL_EXTENT_FREE);
        for &extent in added {
            if extent >= self.device_extents {
                return Err(MetaError::ExtentRange { first: extent, last: extent });
            }
            // Already hot, or listed twice in `added`.
            if self.extent_slot.contains_key(&extent) || changes.iter().any(|c| c.extent == extent)
            {
                continue;
            }
            let Some(slot) = free.next() else {
                return Err(MetaError::AlExtents {
                    al_extents: u32::try_from(self.slots.len()).expect("<= 65534"),
                    max: u32::try_from(self.slots.len()).expect("<= 65534"),
                });
            };
            changes.push(AlSlotUpdate {
                slot: u16::try_from(slot).expect("al-extents <= 65534"),
                extent,
            });
        }
        // Slots freed above may be reused right away: their FREE update precedes the reuse in
        // `changes`, and replay applies updates in order. The context of every transaction
        // shows the final table; a crash between the transactions of one call can therefore
        // show this call's changes early, which is safe both ways: an early addition costs a
        // resync too many, and the caller removes an extent only once its bitmap is durable.
        for update in &changes {
            if update.extent != AL_EXTENT_FREE {
                let slot = usize::from(update.slot);
                self.slots[slot] = update.extent;
                self.extent_slot.insert(update.extent, slot);
            }
        }
        let mut plans = Vec::new();
        for chunk in changes.chunks(AL_UPDATES_PER_TRANSACTION) {
            plans.push(self.committed_transaction(chunk.to_vec())?);
        }
        Ok(plans)
    }

    /// Builds the next transaction over the current table; the caller writes it before the
    /// next one.
    fn committed_transaction(
        &mut self,
        updates: Vec<AlSlotUpdate>,
    ) -> Result<AlTransactionPlan, MetaError> {
        let n = self.slots.len();
        let start = self.context_cursor;
        let window = AL_CONTEXT_PER_TRANSACTION.min(n - start);
        self.context_cursor = if start + window >= n { 0 } else { start + window };
        let tr_number = self.next_tr_number;
        self.next_tr_number = self.geometry.next_tr_number(tr_number);
        let transaction = AlTransaction {
            tr_number,
            kind: AlTransactionKind::Update,
            updates,
            context_size: u16::try_from(n).expect("al-extents <= 65534"),
            context_start_slot: u16::try_from(start).expect("< al-extents"),
            context: self.slots[start..start + window].to_vec(),
        };
        let block = transaction.encode()?;
        Ok(AlTransactionPlan {
            tr_number,
            ring_block: self.geometry.block_for_transaction(tr_number),
            block,
            evicted: Vec::new(),
            transaction,
        })
    }

    /// Transaction `tr_number` is on stable storage: writes waiting for it may start.
    pub fn handle_transaction_durable(&mut self, tr_number: u32) -> Result<(), MetaError> {
        if self.in_flight != Some(tr_number) {
            return Err(MetaError::UnexpectedTransaction { tr_number });
        }
        self.in_flight = None;
        self.pending.fill(false);
        Ok(())
    }

    /// A write admitted earlier (Ready, AfterTransaction or Transaction) finished.
    pub fn handle_write_done(&mut self, first_block: u64, blocks: u64) -> Result<(), MetaError> {
        let (first, last) = self.extent_range(first_block, blocks)?;
        let slots: Option<Vec<usize>> =
            (first..=last).map(|e| self.extent_slot.get(&e).copied()).collect();
        let slots = slots.ok_or(MetaError::ExtentRange { first, last })?;
        if slots.iter().any(|&s| self.references[s] == 0) {
            return Err(MetaError::ExtentRange { first, last });
        }
        for slot in slots {
            self.references[slot] -= 1;
        }
        Ok(())
    }

    /// Extents currently in the table (hot, or being made hot), sorted.
    pub fn hot_extents(&self) -> Vec<u32> {
        let mut hot: Vec<u32> = self.extent_slot.keys().copied().collect();
        hot.sort_unstable();
        hot
    }

    pub fn is_hot(&self, extent: u32) -> bool {
        self.extent_slot.contains_key(&extent)
    }

    pub fn in_flight_transaction(&self) -> Option<u32> {
        self.in_flight
    }

    pub fn next_tr_number(&self) -> u32 {
        self.next_tr_number
    }

    pub fn al_extents(&self) -> usize {
        self.slots.len()
    }

    /// Writes in flight across all slots.
    pub fn writes_in_flight(&self) -> u64 {
        self.references.iter().map(|&r| u64::from(r)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB_BLOCKS: u64 = 262_144;

    fn geometry() -> AlGeometry {
        AlGeometry::default()
    }

    /// A simulated ring: AL blocks as the disk holds them.
    struct Ring {
        bytes: Vec<u8>,
    }

    impl Ring {
        fn new() -> Self {
            Self { bytes: encode_initialized_ring(geometry()) }
        }

        fn write(&mut self, plan: &AlTransactionPlan) {
            let start = usize::try_from(plan.ring_block).unwrap() * MD_BLOCK_SIZE_BYTES;
            self.bytes[start..start + MD_BLOCK_SIZE_BYTES].copy_from_slice(&plan.block[..]);
        }

        /// A torn write: only the first `sectors` sectors of the block made it.
        fn write_torn(&mut self, plan: &AlTransactionPlan, sectors: usize) {
            let start = usize::try_from(plan.ring_block).unwrap() * MD_BLOCK_SIZE_BYTES;
            let n = sectors * 512;
            self.bytes[start..start + n].copy_from_slice(&plan.block[..n]);
        }
    }

    fn admit(log: &mut ActivityLog, ring: &mut Ring, extent: u32) -> AlAdmission {
        let admission = log.handle_write_start(u64::from(extent) * AL_EXTENT_BLOCKS, 8).unwrap();
        if let AlAdmission::Transaction(plan) = &admission {
            ring.write(plan);
            log.handle_transaction_durable(plan.tr_number).unwrap();
        }
        log.handle_write_done(u64::from(extent) * AL_EXTENT_BLOCKS, 8).unwrap();
        admission
    }

    #[test]
    fn initialized_ring_matches_create_md() {
        let ring = encode_initialized_ring(geometry());
        assert_eq!(ring.len(), 32768);
        for block in ring.chunks(4096) {
            assert_eq!(
                &block[..16],
                &[0x69, 0xcb, 0x65, 0xa2, 0, 0, 0, 0, 0x70, 0x9c, 0xc6, 0x51, 0xff, 0xff, 0, 0]
            );
            assert!(block[16..].iter().all(|&b| b == 0));
        }
        let recovery = recover_ring(&ring, geometry(), 257).unwrap();
        assert!(recovery.hot_extents.is_empty());
        assert_eq!(recovery.replayed, 0);
        assert_eq!(recovery.next_tr_number, 1);
    }

    #[test]
    fn first_write_to_a_cold_extent_needs_a_transaction_then_hits() {
        let mut log = ActivityLog::new(geometry(), 257, GIB_BLOCKS, 1).unwrap();
        let mut ring = Ring::new();
        let AlAdmission::Transaction(plan) = admit(&mut log, &mut ring, 5) else {
            panic!("cold extent needs a transaction");
        };
        assert_eq!(plan.tr_number, 1);
        assert_eq!(plan.ring_block, 1);
        assert!(plan.evicted.is_empty());
        assert_eq!(admit(&mut log, &mut ring, 5), AlAdmission::Ready);
        let recovery = recover_ring(&ring.bytes, geometry(), 257).unwrap();
        assert_eq!(recovery.hot_extents, vec![5]);
        assert_eq!(recovery.next_tr_number, 2);
    }

    #[test]
    fn writes_wait_for_the_transaction_in_flight() {
        let mut log = ActivityLog::new(geometry(), 257, GIB_BLOCKS, 1).unwrap();
        let AlAdmission::Transaction(plan) = log.handle_write_start(0, 8).unwrap() else {
            panic!()
        };
        // Same extent: wait for the same transaction.
        assert_eq!(
            log.handle_write_start(16, 8).unwrap(),
            AlAdmission::AfterTransaction { tr_number: plan.tr_number }
        );
        // Another cold extent: busy until the first transaction is durable.
        assert_eq!(log.handle_write_start(4096, 8).unwrap(), AlAdmission::Busy);
        assert!(log.handle_transaction_durable(plan.tr_number + 1).is_err());
        log.handle_transaction_durable(plan.tr_number).unwrap();
        assert!(matches!(log.handle_write_start(4096, 8).unwrap(), AlAdmission::Transaction(_)));
    }

    #[test]
    fn a_write_spanning_two_extents_activates_both_in_one_transaction() {
        let mut log = ActivityLog::new(geometry(), 257, GIB_BLOCKS, 1).unwrap();
        let AlAdmission::Transaction(plan) = log.handle_write_start(1020, 8).unwrap() else {
            panic!()
        };
        let extents: Vec<u32> = plan.transaction.updates.iter().map(|u| u.extent).collect();
        assert_eq!(extents, vec![0, 1]);
    }

    #[test]
    fn lru_evicts_the_coldest_idle_extent_and_reports_it() {
        let mut log = ActivityLog::new(geometry(), 3, GIB_BLOCKS, 1).unwrap();
        let mut ring = Ring::new();
        for extent in [10, 11, 12] {
            admit(&mut log, &mut ring, extent);
        }
        admit(&mut log, &mut ring, 10); // 11 is now the least recently used
        let AlAdmission::Transaction(plan) = admit(&mut log, &mut ring, 13) else { panic!() };
        assert_eq!(plan.evicted, vec![11]);
        assert_eq!(log.hot_extents(), vec![10, 12, 13]);
        let recovery = recover_ring(&ring.bytes, geometry(), 3).unwrap();
        assert_eq!(recovery.hot_extents, vec![10, 12, 13]);
    }

    #[test]
    fn extents_with_writes_in_flight_are_never_evicted() {
        let mut log = ActivityLog::new(geometry(), 2, GIB_BLOCKS, 1).unwrap();
        for extent in [0u64, 1] {
            if let AlAdmission::Transaction(plan) =
                log.handle_write_start(extent * 1024, 8).unwrap()
            {
                log.handle_transaction_durable(plan.tr_number).unwrap();
            }
        }
        assert_eq!(log.handle_write_start(2 * 1024, 8).unwrap(), AlAdmission::Busy);
        log.handle_write_done(0, 8).unwrap();
        let AlAdmission::Transaction(plan) = log.handle_write_start(2 * 1024, 8).unwrap() else {
            panic!()
        };
        assert_eq!(plan.evicted, vec![0]);
        assert!(log.handle_write_done(0, 8).is_err(), "extent 0 is no longer held");
    }

    #[test]
    fn bad_requests_are_errors() {
        let mut log = ActivityLog::new(geometry(), 257, GIB_BLOCKS, 1).unwrap();
        assert!(log.handle_write_start(GIB_BLOCKS, 1).is_err());
        assert!(log.handle_write_start(0, 0).is_err());
        assert!(log.handle_write_start(u64::MAX, 2).is_err());
        assert!(log.handle_write_start(0, 65 * 1024).is_err());
        assert!(log.handle_write_done(0, 8).is_err());
        assert!(ActivityLog::new(geometry(), 0, GIB_BLOCKS, 1).is_err());
        assert!(ActivityLog::new(geometry(), 6434, GIB_BLOCKS, 1).is_err());
        assert!(recover_ring(&[0u8; 100], geometry(), 257).is_err());
    }

    #[test]
    fn torn_newest_transaction_falls_back_to_the_previous_one() {
        let mut log = ActivityLog::new(geometry(), 257, GIB_BLOCKS, 1).unwrap();
        let mut ring = Ring::new();
        admit(&mut log, &mut ring, 7);
        let AlAdmission::Transaction(plan) = log.handle_write_start(9 * 1024, 8).unwrap() else {
            panic!()
        };
        for sectors in 0..8 {
            let mut torn = Ring { bytes: ring.bytes.clone() };
            torn.write_torn(&plan, sectors);
            let recovery = recover_ring(&torn.bytes, geometry(), 257).unwrap();
            assert_eq!(recovery.hot_extents, vec![7], "{sectors} sectors written");
            assert_eq!(recovery.next_tr_number, plan.tr_number);
        }
    }

    #[test]
    fn large_al_needs_several_transactions_of_context_and_survives_wrap() {
        // 1237 slots: the context cycles over two transactions; run far past the ring size
        // and past the u32 wrap of transaction numbers.
        let mut log = ActivityLog::new(geometry(), 1237, 64 * GIB_BLOCKS, u32::MAX - 20).unwrap();
        let mut ring = Ring::new();
        for i in 0..3000u32 {
            admit(&mut log, &mut ring, (i * 7919) % 16384);
        }
        let recovery = recover_ring(&ring.bytes, geometry(), 1237).unwrap();
        assert_eq!(recovery.hot_extents, log.hot_extents());
        assert_eq!(recovery.next_tr_number, log.next_tr_number());
        let resumed =
            ActivityLog::from_recovery(geometry(), 1237, 64 * GIB_BLOCKS, &recovery).unwrap();
        assert_eq!(resumed.hot_extents(), log.hot_extents());
    }

    #[test]
    fn a_ring_of_48_blocks_survives_the_transaction_number_wrap() {
        let odd = AlGeometry::new(3, 16).unwrap();
        let start = u32::try_from(odd.tr_number_modulus() - 30).unwrap();
        let mut log = ActivityLog::new(odd, 2000, 64 * GIB_BLOCKS, start).unwrap();
        let mut ring = encode_initialized_ring(odd);
        for i in 0..500u32 {
            let block = u64::from((i * 7919) % 16384) * 1024;
            if let AlAdmission::Transaction(plan) = log.handle_write_start(block, 1).unwrap() {
                let offset = usize::try_from(plan.ring_block).unwrap() * 4096;
                ring[offset..offset + 4096].copy_from_slice(&plan.block[..]);
                log.handle_transaction_durable(plan.tr_number).unwrap();
            }
            log.handle_write_done(block, 1).unwrap();
        }
        assert!(log.next_tr_number() < start, "numbers wrapped");
        let recovery = recover_ring(&ring, odd, 2000).unwrap();
        assert_eq!(recovery.hot_extents, log.hot_extents());
        assert_eq!(recovery.next_tr_number, log.next_tr_number());
        assert_eq!(recovery.replayed, 48);
    }

    #[test]
    fn caller_decided_membership_round_trips_in_batches_of_64() {
        let mut log = ActivityLog::new(geometry(), 1237, 64 * GIB_BLOCKS, 1).unwrap();
        let mut ring = Ring::new();
        let added: Vec<u32> = (0..150).map(|i| i * 3).collect();
        let plans = log.handle_set_change(&added, &[]).unwrap();
        assert_eq!(plans.len(), 3, "150 updates need three transactions");
        for plan in &plans {
            ring.write(plan);
        }
        let removed: Vec<u32> = (0..100).map(|i| i * 3).collect();
        for plan in log.handle_set_change(&[1000, 1001], &removed).unwrap() {
            ring.write(&plan);
        }
        let recovery = recover_ring(&ring.bytes, geometry(), 1237).unwrap();
        assert_eq!(recovery.hot_extents, log.hot_extents());
        assert_eq!(log.hot_extents().len(), 52);
        let full = ActivityLog::new(geometry(), 2, GIB_BLOCKS, 1)
            .unwrap()
            .handle_set_change(&[1, 2, 3], &[]);
        assert!(full.is_err(), "more extents than slots");
    }

    #[test]
    fn striped_ring_round_trips() {
        let striped = AlGeometry::new(2, 4).unwrap();
        let mut log = ActivityLog::new(striped, 100, GIB_BLOCKS, 3).unwrap();
        let mut ring = encode_initialized_ring(striped);
        for extent in 0..150u32 {
            if let AlAdmission::Transaction(plan) =
                log.handle_write_start(u64::from(extent) * 1024, 1).unwrap()
            {
                let start = usize::try_from(plan.ring_block).unwrap() * 4096;
                ring[start..start + 4096].copy_from_slice(&plan.block[..]);
                log.handle_transaction_durable(plan.tr_number).unwrap();
            }
            log.handle_write_done(u64::from(extent) * 1024, 1).unwrap();
        }
        let recovery = recover_ring(&ring, striped, 100).unwrap();
        assert_eq!(recovery.hot_extents, (50..150).collect::<Vec<_>>());
    }

    proptest! {
        /// Any workload, crash after any number of transactions with the last one torn at any
        /// sector: the recovered hot set contains every extent a durable transaction made hot
        /// and that was not evicted by a later durable one, i.e. exactly the log's state as of
        /// the last durable transaction.
        #[test]
        fn recovery_after_a_torn_write_returns_the_last_durable_state(
            al_extents in prop_oneof![Just(3u32), Just(61u32), Just(1237u32)],
            extents in prop::collection::vec(0u32..300, 1..400),
            torn_sectors in 0usize..8,
        ) {
            let mut log = ActivityLog::new(geometry(), al_extents, 300 * 1024, 1).unwrap();
            let mut ring = Ring::new();
            let mut durable_hot = Vec::new();
            let mut last_plan = None;
            for &extent in &extents {
                let block = u64::from(extent) * 1024;
                match log.handle_write_start(block, 1).unwrap() {
                    AlAdmission::Transaction(plan) => {
                        // Keep the previous state: the newest transaction is the torn one.
                        if let Some(previous) = last_plan.replace(plan.clone()) {
                            ring.write(&previous);
                        }
                        durable_hot = log_hot_before(&log, &plan);
                        log.handle_transaction_durable(plan.tr_number).unwrap();
                    }
                    AlAdmission::Ready | AlAdmission::AfterTransaction { .. } => {}
                    AlAdmission::Busy => prop_assert!(false, "single writer never busy"),
                }
                log.handle_write_done(block, 1).unwrap();
            }
            let last = last_plan.expect("the first write needs a transaction");
            ring.write_torn(&last, torn_sectors);
            let start = usize::try_from(last.ring_block).unwrap() * MD_BLOCK_SIZE_BYTES;
            // With a small table the whole change may sit in the sectors that made it: then
            // the "torn" block is the complete one and the new state is the right answer.
            let complete = ring.bytes[start..start + MD_BLOCK_SIZE_BYTES] == last.block[..];
            let recovery = recover_ring(&ring.bytes, geometry(), al_extents).unwrap();
            if complete {
                prop_assert_eq!(recovery.hot_extents, log.hot_extents());
            } else {
                prop_assert_eq!(recovery.hot_extents, durable_hot);
            }
            // And the complete write of the last transaction yields the final state.
            ring.write(&last);
            let recovery = recover_ring(&ring.bytes, geometry(), al_extents).unwrap();
            prop_assert_eq!(recovery.hot_extents, log.hot_extents());
        }

        #[test]
        fn transaction_round_trip(
            tr_number in any::<u32>(),
            updates in prop::collection::vec((0u16..65534, any::<u32>()), 0..=64),
            start in any::<u16>(),
            context in prop::collection::vec(any::<u32>(), 919),
        ) {
            let tr = AlTransaction {
                tr_number,
                kind: AlTransactionKind::Update,
                updates: updates.iter().map(|&(slot, extent)| AlSlotUpdate { slot, extent }).collect(),
                context_size: 1237,
                context_start_slot: start,
                context,
            };
            let block = tr.encode().unwrap();
            prop_assert_eq!(AlTransaction::decode(&block[..]).unwrap(), tr);
        }

        #[test]
        fn random_rings_never_panic(bytes in prop::collection::vec(any::<u8>(), 32768)) {
            let _ = recover_ring(&bytes, geometry(), 1237);
        }
    }

    /// The hot set as it was before `plan` (the log already applied it in memory).
    fn log_hot_before(log: &ActivityLog, plan: &AlTransactionPlan) -> Vec<u32> {
        let added: Vec<u32> = plan.transaction.updates.iter().map(|u| u.extent).collect();
        let mut hot: Vec<u32> = log
            .hot_extents()
            .into_iter()
            .filter(|e| !added.contains(e))
            .chain(plan.evicted.iter().copied())
            .collect();
        hot.sort_unstable();
        hot
    }
}

//! The checker's model of what every block may contain.
//!
//! Every simulated write fills each 512-byte sector with its write id and block number, so any
//! sector read back names the write it came from (id 0: never written, or discarded). For each
//! block the model keeps the writes issued to it in order (the engine serializes overlapping
//! writes, so issue order is apply order). A sector may legally hold the newest *guaranteed*
//! write or anything issued after it (pending, failed or unguaranteed writes may or may not
//! have landed), never anything older.
//!
//! A write is guaranteed once it completed successfully and either reached stable storage (FUA,
//! or an application flush issued after it completed) or no crash that could lose a volatile
//! cache happened since: under protocol C, a power loss anywhere; under A and B, any crash.

use crate::constants::{BLOCK_BYTES as BLOCK, SECTOR_BYTES as SECTOR};

const SECTORS: usize = BLOCK / SECTOR;

/// Fills one block of a write's payload so every sector identifies the write.
pub fn fill_block(buffer: &mut [u8], write_id: u64, block: u64) {
    assert_eq!(buffer.len(), BLOCK);
    for (s, sector) in buffer.chunks_mut(SECTOR).enumerate() {
        sector[0..8].copy_from_slice(&write_id.to_le_bytes());
        sector[8..16].copy_from_slice(&block.to_le_bytes());
        let tag = write_id.wrapping_mul(31).wrapping_add(s as u64);
        for (i, byte) in sector[16..].iter_mut().enumerate() {
            *byte = (tag.wrapping_add(i as u64) & 0xff) as u8;
        }
    }
}

/// The write id a sector carries, or None if the sector is not a well-formed sector of a
/// write to this block (misplaced or corrupted data).
fn decode_sector(sector: &[u8], block: u64, s: usize) -> Option<u64> {
    let id = u64::from_le_bytes(sector[0..8].try_into().expect("8 bytes"));
    if id == 0 {
        return sector.iter().all(|b| *b == 0).then_some(0);
    }
    let mut expected = vec![0u8; SECTOR];
    let placed = u64::from_le_bytes(sector[8..16].try_into().expect("8 bytes"));
    if placed != block {
        return None;
    }
    expected[0..16].copy_from_slice(&sector[0..16]);
    let tag = id.wrapping_mul(31).wrapping_add(s as u64);
    for (i, byte) in expected[16..].iter_mut().enumerate() {
        *byte = (tag.wrapping_add(i as u64) & 0xff) as u8;
    }
    (expected == sector).then_some(id)
}

#[derive(Debug, Clone)]
struct WriteRecord {
    content: u64,
    acked_at_ms: Option<u64>,
    failed: bool,
    stable: bool,
    maybe_lost: bool,
    /// Its only copies may have been in a volatile cache that lost power before the write
    /// was acknowledged (`volatile_loss_before_ack`): once acknowledged, it may be lost.
    lost_before_ack: bool,
}

#[derive(Debug, Clone)]
struct BlockModel {
    baseline: [u64; SECTORS],
    /// After a forced promotion: what else a power loss may leave in each sector of the
    /// block, namely its stable content and the content of every volatile write to it.
    baseline_volatile: Vec<[u64; SECTORS]>,
    writes: Vec<usize>,
}

impl BlockModel {
    /// A block never written: zeros.
    fn fresh() -> Self {
        Self { baseline: [0; SECTORS], baseline_volatile: Vec::new(), writes: Vec::new() }
    }
}

/// One lineage's model. Under fencing dont-care two primaries can write apart; each lineage
/// (the data one node holds) then has its own model, all sharing one write-id space so that a
/// sector's id names the same write everywhere (`sync_ids`).
#[derive(Debug, Clone)]
pub struct Model {
    blocks: Vec<BlockModel>,
    writes: Vec<WriteRecord>,
    unstable: Vec<usize>,
}

impl Model {
    pub fn new(size_blocks: u64) -> Self {
        let n = usize::try_from(size_blocks).expect("small sim disk");
        Self { blocks: vec![BlockModel::fresh(); n], writes: Vec::new(), unstable: Vec::new() }
    }

    /// Number of write ids this model knows (issued here or reserved for another lineage).
    pub fn ids(&self) -> usize {
        self.writes.len()
    }

    /// Reserves the ids other lineages issued, as writes that never reach this lineage: a
    /// sector holding one of them is a violation here (no block lists it).
    pub fn sync_ids(&mut self, count: usize) {
        while self.writes.len() < count {
            let content = self.writes.len() as u64 + 1;
            self.writes.push(WriteRecord {
                content,
                acked_at_ms: None,
                failed: true,
                stable: false,
                maybe_lost: false,
                lost_before_ack: false,
            });
        }
    }

    /// Registers a write and returns its id (content ids start at 1; discards write id 0).
    pub fn issue_write(&mut self, first: u64, blocks: u64, discard: bool) -> u64 {
        let index = self.writes.len();
        let content = if discard { 0 } else { index as u64 + 1 };
        self.writes.push(WriteRecord {
            content,
            acked_at_ms: None,
            failed: false,
            stable: false,
            maybe_lost: false,
            lost_before_ack: false,
        });
        self.grow(first + blocks);
        for b in first..first + blocks {
            self.blocks[usize::try_from(b).expect("small")].writes.push(index);
        }
        self.unstable.push(index);
        index as u64 + 1
    }

    fn record(&mut self, id: u64) -> &mut WriteRecord {
        &mut self.writes[usize::try_from(id - 1).expect("small")]
    }

    pub fn complete_write(&mut self, id: u64, ok: bool, fua: bool, now_ms: u64) {
        let w = self.record(id);
        if ok {
            w.acked_at_ms = Some(now_ms);
            // A stable (FUA) write was durable on every copy before its acknowledgement.
            w.maybe_lost |= w.lost_before_ack && !fua;
            w.stable = fua && !w.maybe_lost;
        } else {
            w.failed = true;
        }
    }

    /// An application flush issued at `issued_ms` completed successfully.
    pub fn complete_flush(&mut self, issued_ms: u64) {
        let writes = &mut self.writes;
        self.unstable.retain(|&i| {
            let w = &mut writes[i];
            if w.stable {
                return false;
            }
            if !w.maybe_lost && w.acked_at_ms.is_some_and(|t| t < issued_ms) {
                w.stable = true;
                return false;
            }
            !w.failed
        });
    }

    /// A crash that may have lost volatile data somewhere.
    pub fn volatile_loss(&mut self) {
        for &i in &self.unstable {
            // Only completed writes sit in a volatile cache; pending ones complete later from
            // a disk that did not lose them, or never (their node went down).
            if !self.writes[i].stable && self.writes[i].acked_at_ms.is_some() {
                self.writes[i].maybe_lost = true;
            }
        }
    }

    /// A power loss hit a node that may hold the only copies of pending write `id` (its
    /// primary has no disk of its own): the write may already sit in that node's volatile
    /// cache with its acknowledgement on the wire, so when that arrives after the power loss
    /// the write is not guaranteed (`volatile_loss` only sees writes acknowledged before).
    pub fn volatile_loss_before_ack(&mut self, id: u64) {
        self.record(id).lost_before_ack = true;
    }

    fn guaranteed(w: &WriteRecord) -> bool {
        w.acked_at_ms.is_some() && !w.failed && (w.stable || !w.maybe_lost)
    }

    /// Blocks this model knows. A block beyond it (the device grew, `sim::resize`) was never
    /// written on this lineage: it is a fresh zero area, as the engine's online grow makes it.
    pub fn size_blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// The device grew to `size_blocks`: the new blocks are a fresh zero area.
    pub fn grow(&mut self, size_blocks: u64) {
        let n = usize::try_from(size_blocks).expect("small sim disk");
        if n > self.blocks.len() {
            self.blocks.resize(n, BlockModel::fresh());
        }
    }

    fn allowed(&self, block: usize, sector: usize, id: u64) -> bool {
        let Some(b) = self.blocks.get(block) else { return id == 0 };
        for &i in b.writes.iter().rev() {
            let w = &self.writes[i];
            if w.content == id {
                return true;
            }
            if Self::guaranteed(w) {
                return false;
            }
        }
        b.baseline[sector] == id || b.baseline_volatile.iter().any(|v| v[sector] == id)
    }

    /// Checks a whole device image; returns the first problem found. An image smaller than
    /// the model (a node that has not grown yet) is checked as if its missing blocks held
    /// zeros: an acknowledged write there is missing from it.
    pub fn check_image(&self, image: &[u8]) -> Result<(), String> {
        let mut padded;
        let mut image = image;
        if image.len() < self.blocks.len() * BLOCK {
            padded = image.to_vec();
            padded.resize(self.blocks.len() * BLOCK, 0);
            image = &padded;
        }
        for (block, data) in image.chunks(BLOCK).enumerate() {
            for (s, sector) in data.chunks(SECTOR).enumerate() {
                let Some(id) = decode_sector(sector, block as u64, s) else {
                    return Err(format!("block {block} sector {s}: corrupt or misplaced data"));
                };
                if !self.allowed(block, s, id) {
                    let last = self.blocks.get(block).and_then(|b| {
                        b.writes
                            .iter()
                            .rev()
                            .find(|&&i| Self::guaranteed(&self.writes[i]))
                            .map(|&i| self.writes[i].content)
                    });
                    return Err(format!(
                        "block {block} sector {s}: holds write {id}, but acknowledged write {last:?} is newer"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks blocks `first..first+blocks` of data returned by a read.
    pub fn check_read(&self, first: u64, data: &[u8]) -> Result<(), String> {
        for (i, block) in data.chunks(BLOCK).enumerate() {
            let b = usize::try_from(first).expect("small") + i;
            for (s, sector) in block.chunks(SECTOR).enumerate() {
                let id = decode_sector(sector, b as u64, s).ok_or_else(|| {
                    format!("read block {b} sector {s}: corrupt or misplaced data")
                })?;
                if !self.allowed(b, s, id) {
                    return Err(format!("read block {b} sector {s}: stale write {id}"));
                }
            }
        }
        Ok(())
    }

    /// An after-sb policy made this image (the survivor's) the truth: as `rebase`, except
    /// that the writes still in flight on the survivor (`in_flight` ids) keep their place.
    pub fn rebase_keeping(&mut self, image: &[u8], stable: &[u8], in_flight: &[u64]) {
        let kept: Vec<Vec<usize>> = self
            .blocks
            .iter()
            .map(|b| {
                b.writes.iter().copied().filter(|i| in_flight.contains(&(*i as u64 + 1))).collect()
            })
            .collect();
        self.rebase(image, stable, std::iter::empty());
        for (b, writes) in self.blocks.iter_mut().zip(kept) {
            b.writes = writes;
        }
    }

    /// A forced promotion declared this image the truth: forget everything before it.
    ///
    /// The image's volatile part may still be lost. Allowing only the image and the stable
    /// content was wrong: a power loss keeps, drops or tears each volatile write on its own
    /// (`SimDisk::power_loss`), so when a block has several unflushed writes in the cache, an
    /// older one may survive while a newer one is lost. The block then holds data that is in
    /// neither the image nor the stable content. It is still data from before the
    /// promotion, which an unflushed image may legally revert to (seed 21176: the cache of
    /// block 2 held writes 396, 397, 399, 400 and then a discard; the image was zeroes, the
    /// stable content write 394, and after the power loss the block held write 400).
    /// So the stable content and every volatile write (`volatile`: first block and data,
    /// as `SimDisk::volatile_writes` returns them) stay allowed, sector by sector.
    pub fn rebase<'a>(
        &mut self,
        image: &[u8],
        stable: &[u8],
        volatile: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) {
        let decode = |data: &[u8], block: usize| {
            let mut ids = [0u64; SECTORS];
            for (s, sector) in data.chunks(SECTOR).enumerate() {
                ids[s] = decode_sector(sector, block as u64, s).unwrap_or(u64::MAX);
            }
            ids
        };
        // The image's size is the truth too: blocks beyond it are a fresh area again.
        self.blocks.truncate(image.len() / BLOCK);
        self.grow((image.len() / BLOCK) as u64);
        for (block, (data, stable)) in image.chunks(BLOCK).zip(stable.chunks(BLOCK)).enumerate() {
            let b = &mut self.blocks[block];
            b.writes.clear();
            b.baseline = decode(data, block);
            b.baseline_volatile = vec![decode(stable, block)];
        }
        for (first, data) in volatile {
            for (k, block_data) in data.chunks(BLOCK).enumerate() {
                let block = usize::try_from(first).expect("small") + k;
                let ids = decode(block_data, block);
                // A volatile write beyond the image: the image's device is smaller now.
                let Some(b) = self.blocks.get_mut(block) else { continue };
                if !b.baseline_volatile.contains(&ids) {
                    b.baseline_volatile.push(ids);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(ids: &[u64]) -> Vec<u8> {
        let mut out = vec![0u8; ids.len() * BLOCK];
        for (b, id) in ids.iter().enumerate() {
            if *id != 0 {
                fill_block(&mut out[b * BLOCK..(b + 1) * BLOCK], *id, b as u64);
            }
        }
        out
    }

    #[test]
    fn acknowledged_writes_must_survive_and_unacknowledged_may_not() {
        let mut m = Model::new(2);
        let w1 = m.issue_write(0, 1, false);
        m.complete_write(w1, true, false, 10);
        let w2 = m.issue_write(0, 1, false);
        assert!(m.check_image(&image(&[w1, 0])).is_ok());
        assert!(m.check_image(&image(&[w2, 0])).is_ok(), "pending write may have landed");
        assert!(m.check_image(&image(&[0, 0])).is_err(), "acked write lost");
        // After a power loss an unflushed acknowledged write may vanish ...
        m.volatile_loss();
        assert!(m.check_image(&image(&[0, 0])).is_ok());
        // ... but not once a flush made a later write stable.
        m.complete_write(w2, true, false, 20);
        let w3 = m.issue_write(0, 1, false);
        m.complete_write(w3, true, false, 30);
        m.complete_flush(31);
        assert!(m.check_image(&image(&[w2, 0])).is_err());
        assert!(m.check_image(&image(&[w3, 0])).is_ok());
        let mut corrupt = image(&[w3, 0]);
        corrupt[100] ^= 1;
        assert!(m.check_image(&corrupt).is_err());
    }

    #[test]
    fn a_grown_device_requires_its_acknowledged_writes_in_the_grown_blocks() {
        let mut m = Model::new(2);
        // Blocks beyond the model are a fresh zero area.
        assert!(m.check_image(&image(&[0, 0, 0])).is_ok());
        let w = m.issue_write(2, 1, false);
        assert_eq!(m.size_blocks(), 3);
        m.complete_write(w, true, false, 10);
        assert!(m.check_image(&image(&[0, 0, w])).is_ok());
        // A replica that has not grown lacks the acknowledged write.
        assert!(m.check_image(&image(&[0, 0])).is_err());
        assert!(m.check_image(&image(&[0, 0, 0])).is_err());
        assert!(m.check_read(3, &image(&[0, 0, 0, 0])[3 * BLOCK..]).is_ok());
    }

    #[test]
    fn after_a_forced_promotion_a_power_loss_may_leave_any_volatile_write() {
        let mut m = Model::new(2);
        let ids: Vec<u64> = (0..4).map(|_| m.issue_write(0, 1, false)).collect();
        // Block 0: stable holds ids[0]; the cache holds ids[1] then ids[2] (the image).
        let cached = [image(&[ids[1]]), image(&[ids[2]])];
        let volatile = cached.iter().map(|data| (0, data.as_slice()));
        m.rebase(&image(&[ids[2], 0]), &image(&[ids[0], 0]), volatile);
        for held in [ids[0], ids[1], ids[2]] {
            // The power loss dropped ids[2] and kept ids[1], or dropped both, or kept both.
            assert!(m.check_image(&image(&[held, 0])).is_ok(), "write {held} is allowed");
        }
        assert!(m.check_image(&image(&[ids[3], 0])).is_err(), "never on the promoted disk");
        assert!(m.check_image(&image(&[0, 0])).is_err(), "older than the stable content");
    }
}

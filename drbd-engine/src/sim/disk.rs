//! A simulated disk with a volatile write cache.
//!
//! A write becomes visible when it completes but stays volatile until a flush that was
//! submitted after its completion finishes (or it was written with FUA). A power loss keeps,
//! drops or tears (persists a sector prefix of) each volatile write; a process crash (kill -9)
//! loses nothing that completed, because the machine's cache survives it.

use super::rng::Rng;
use crate::constants::{BLOCK_BYTES as BLOCK, SECTOR_BYTES as SECTOR};
use std::collections::HashSet;

pub struct SimDisk {
    stable: Vec<u8>,
    /// Completed volatile writes in completion order: (sequence, first block, data).
    cache: Vec<(u64, u64, Vec<u8>)>,
    next_seq: u64,
    /// (block, write id) of every write that ever landed here, volatile or not, as its
    /// sectors name it: the ground truth of what this disk has held (`sim::ground_truth`).
    held: HashSet<(u64, u64)>,
}

impl SimDisk {
    pub fn new(size_blocks: u64) -> Self {
        Self {
            stable: vec![0; usize::try_from(size_blocks).expect("small sim disk") * BLOCK],
            cache: Vec::new(),
            next_seq: 0,
            held: HashSet::new(),
        }
    }

    fn range(first: u64, len: usize) -> std::ops::Range<usize> {
        let start = usize::try_from(first).expect("small sim disk") * BLOCK;
        start..start + len
    }

    /// What a read returns now.
    pub fn read(&self, first: u64, blocks: u64) -> Vec<u8> {
        let len = usize::try_from(blocks).expect("small") * BLOCK;
        let mut data = self.stable[Self::range(first, len)].to_vec();
        let end = first + blocks;
        for (_, wfirst, wdata) in &self.cache {
            let wblocks = (wdata.len() / BLOCK) as u64;
            let wend = wfirst + wblocks;
            let lo = first.max(*wfirst);
            let hi = end.min(wend);
            if lo < hi {
                let dst = usize::try_from(lo - first).expect("small") * BLOCK;
                let src = usize::try_from(lo - wfirst).expect("small") * BLOCK;
                let n = usize::try_from(hi - lo).expect("small") * BLOCK;
                data[dst..dst + n].copy_from_slice(&wdata[src..src + n]);
            }
        }
        data
    }

    /// This disk once held write `id` in `block` (id 0, zeros, every block held at first).
    pub fn has_held(&self, block: u64, id: u64) -> bool {
        id == 0 || self.held.contains(&(block, id))
    }

    /// What survives a power loss that drops every volatile write.
    pub fn read_stable(&self) -> Vec<u8> {
        self.stable.clone()
    }

    /// The completed writes still in the volatile cache (first block, data), oldest first:
    /// a power loss may persist any of them, whole or torn.
    pub fn volatile_writes(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.cache.iter().map(|(_, first, data)| (*first, data.as_slice()))
    }

    pub fn size_blocks(&self) -> u64 {
        (self.stable.len() / BLOCK) as u64
    }

    /// The admin grew the backing device (`lvextend`): the new blocks read as zeros, and
    /// stably so (a new extent is never in the volatile cache).
    pub fn grow(&mut self, size_blocks: u64) {
        let len = usize::try_from(size_blocks).expect("small sim disk") * BLOCK;
        if len > self.stable.len() {
            self.stable.resize(len, 0);
        }
    }

    pub fn write(&mut self, first: u64, data: Vec<u8>, fua: bool) {
        for (k, block) in data.chunks(BLOCK).enumerate() {
            for sector in block.chunks(SECTOR) {
                let id = sector_write_id(sector);
                if id != 0 {
                    self.held.insert((first + k as u64, id));
                }
            }
        }
        if fua {
            let blocks = (data.len() / BLOCK) as u64;
            // Older volatile copies of these blocks must never be flushed over the FUA data.
            self.cache.retain_mut(|(_, wfirst, wdata)| {
                let wblocks = (wdata.len() / BLOCK) as u64;
                !(first <= *wfirst && *wfirst + wblocks <= first + blocks)
            });
            let range = Self::range(first, data.len());
            self.stable[range].copy_from_slice(&data);
            // Partially overlapping older volatile writes stay, but a later flush would put
            // their old bytes over ours: re-apply the FUA data to them.
            for (_, wfirst, wdata) in &mut self.cache {
                let wblocks = (wdata.len() / BLOCK) as u64;
                let lo = first.max(*wfirst);
                let hi = (first + blocks).min(*wfirst + wblocks);
                if lo < hi {
                    let dst = usize::try_from(lo - *wfirst).expect("small") * BLOCK;
                    let src = usize::try_from(lo - first).expect("small") * BLOCK;
                    let n = usize::try_from(hi - lo).expect("small") * BLOCK;
                    wdata[dst..dst + n].copy_from_slice(&data[src..src + n]);
                }
            }
        } else {
            self.cache.push((self.next_seq, first, data));
            self.next_seq += 1;
        }
    }

    /// Marks the point a flush covers: every write completed before now.
    pub fn flush_point(&self) -> u64 {
        self.next_seq
    }

    /// A flush submitted at `point` completed.
    pub fn flush(&mut self, point: u64) {
        let mut kept = Vec::new();
        for (seq, first, data) in std::mem::take(&mut self.cache) {
            if seq < point {
                let range = Self::range(first, data.len());
                self.stable[range].copy_from_slice(&data);
            } else {
                kept.push((seq, first, data));
            }
        }
        self.cache = kept;
    }

    /// Power loss: each volatile write survives, vanishes or is torn at a sector boundary.
    pub fn power_loss(&mut self, rng: &mut Rng, torn_per_million: u64) {
        for (_, first, data) in std::mem::take(&mut self.cache) {
            let roll = rng.below(3);
            if roll == 0 {
                continue;
            }
            let range = Self::range(first, data.len());
            if rng.chance(torn_per_million) {
                // Persist a prefix of sectors of every block of this write.
                let keep = rng.range(1, (BLOCK / SECTOR) as u64 - 1);
                let keep = usize::try_from(keep).expect("small") * SECTOR;
                let base = range.start;
                for (i, block) in data.chunks(BLOCK).enumerate() {
                    let at = base + i * BLOCK;
                    self.stable[at..at + keep].copy_from_slice(&block[..keep]);
                }
            } else if roll == 1 {
                self.stable[range].copy_from_slice(&data);
            }
        }
    }
}

/// The write id a simulated sector names (`model::fill_block`), unchecked.
pub fn sector_write_id(sector: &[u8]) -> u64 {
    u64::from_le_bytes(sector[0..8].try_into().expect("a sector holds 8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_until_flushed_and_fua_not_undone_by_a_later_flush() {
        let mut disk = SimDisk::new(4);
        disk.write(0, vec![1; BLOCK], false);
        let point = disk.flush_point();
        disk.write(1, vec![2; BLOCK], false);
        disk.write(0, vec![3; BLOCK], true);
        disk.flush(point);
        assert_eq!(disk.read(0, 1), vec![3; BLOCK]);
        assert_eq!(disk.read(1, 1), vec![2; BLOCK]);
        let mut rng = Rng::new(1);
        for _ in 0..10 {
            disk.power_loss(&mut rng, 0);
        }
        assert_eq!(disk.read(0, 1), vec![3; BLOCK]);
    }

    #[test]
    fn remembers_every_write_that_landed_even_when_a_power_loss_dropped_it() {
        let mut disk = SimDisk::new(2);
        let mut data = vec![0u8; BLOCK];
        super::super::model::fill_block(&mut data, 7, 1);
        disk.write(1, data, false);
        disk.power_loss(&mut Rng::new(1), 0);
        assert!(disk.has_held(1, 7));
        assert!(!disk.has_held(0, 7), "another block");
        assert!(disk.has_held(0, 0), "zeros: every block's first content");
    }
}

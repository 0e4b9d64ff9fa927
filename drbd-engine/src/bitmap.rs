//! The in-memory out-of-sync bitmap: one bit per 4 KiB block, one bitmap per peer.
//!
//! A set bit means "this block may differ between us and that peer". Bits are set when a write
//! cannot reach the peer (or was never confirmed stable there) and cleared when resync made the
//! block equal again. `words`/`from_words` expose the raw 64-bit words so the metadata layer can
//! persist them (DRBD's on-disk bitmap is little-endian 64-bit words, bit 0 = block 0).

use thiserror::Error;

/// A bitmap request that does not fit the bitmap.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BitmapError {
    #[error("block range {first_block}+{blocks} exceeds the bitmap's {size_blocks} blocks")]
    OutOfRange { first_block: u64, blocks: u64, size_blocks: u64 },
    #[error("{words} words cannot hold a bitmap of {size_blocks} blocks (need {needed})")]
    WrongWordCount { words: usize, size_blocks: u64, needed: usize },
}

#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    size_blocks: u64,
    words: Vec<u64>,
    /// Cached popcount: resync progress asks for it on every step.
    set_count: u64,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitmap({} of {} set)", self.set_count, self.size_blocks)
    }
}

fn words_for(size_blocks: u64) -> usize {
    usize::try_from(size_blocks.div_ceil(64)).expect("bitmap word count fits usize")
}

fn word_index(block: u64) -> usize {
    usize::try_from(block / 64).expect("bitmap word index fits usize")
}

/// A mask of bits `from..to` (to exclusive, to <= 64) within one word.
fn mask(from: u64, to: u64) -> u64 {
    assert!(from < to && to <= 64);
    let high = if to == 64 { u64::MAX } else { (1u64 << to) - 1 };
    high & !((1u64 << from) - 1)
}

impl Bitmap {
    pub fn new(size_blocks: u64) -> Self {
        Self { size_blocks, words: vec![0; words_for(size_blocks)], set_count: 0 }
    }

    /// Rebuilds a bitmap from persisted words. Bits beyond `size_blocks` are ignored (cleared),
    /// because DRBD pads the last word and a stale pad must not count as out of sync.
    pub fn from_words(size_blocks: u64, mut words: Vec<u64>) -> Result<Self, BitmapError> {
        let needed = words_for(size_blocks);
        if words.len() != needed {
            return Err(BitmapError::WrongWordCount { words: words.len(), size_blocks, needed });
        }
        let tail = size_blocks % 64;
        if tail != 0 {
            let last = words.last_mut().expect("tail implies a word");
            *last &= mask(0, tail);
        }
        let set_count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(Self { size_blocks, words, set_count })
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The same bits on a device grown to `size_blocks` (online resize): the new blocks clear.
    pub fn grown(&self, size_blocks: u64) -> Self {
        assert!(size_blocks >= self.size_blocks, "bitmaps only grow");
        let mut words = self.words.clone();
        words.resize(words_for(size_blocks), 0);
        Self::from_words(size_blocks, words).expect("word count computed for the size")
    }

    pub fn size_blocks(&self) -> u64 {
        self.size_blocks
    }

    /// Blocks marked out of sync.
    pub fn count(&self) -> u64 {
        self.set_count
    }

    pub fn is_clear(&self) -> bool {
        self.set_count == 0
    }

    fn check(&self, first_block: u64, blocks: u64) -> Result<(), BitmapError> {
        match first_block.checked_add(blocks) {
            Some(end) if end <= self.size_blocks => Ok(()),
            _ => {
                Err(BitmapError::OutOfRange { first_block, blocks, size_blocks: self.size_blocks })
            }
        }
    }

    /// Applies `f(word, mask)` over the range and returns how many bits changed.
    fn update(&mut self, first_block: u64, blocks: u64, set: bool) -> Result<u64, BitmapError> {
        self.check(first_block, blocks)?;
        let mut changed = 0u64;
        let mut block = first_block;
        let end = first_block + blocks;
        while block < end {
            let from = block % 64;
            let to = (from + (end - block)).min(64);
            let m = mask(from, to);
            let word = &mut self.words[word_index(block)];
            let before = *word;
            if set {
                *word |= m;
            } else {
                *word &= !m;
            }
            changed += u64::from((before ^ *word).count_ones());
            block += to - from;
        }
        if set {
            self.set_count += changed;
        } else {
            self.set_count -= changed;
        }
        assert!(self.set_count <= self.size_blocks);
        Ok(changed)
    }

    /// Marks blocks out of sync; returns how many were newly set.
    pub fn set_range(&mut self, first_block: u64, blocks: u64) -> Result<u64, BitmapError> {
        self.update(first_block, blocks, true)
    }

    /// Marks blocks in sync; returns how many were previously set.
    pub fn clear_range(&mut self, first_block: u64, blocks: u64) -> Result<u64, BitmapError> {
        self.update(first_block, blocks, false)
    }

    pub fn set_all(&mut self) {
        let size = self.size_blocks;
        self.set_range(0, size).expect("whole range fits");
    }

    pub fn test(&self, block: u64) -> bool {
        block < self.size_blocks && self.words[word_index(block)] & (1u64 << (block % 64)) != 0
    }

    /// Whether any block of the range is set.
    pub fn any_in_range(&self, first_block: u64, blocks: u64) -> bool {
        self.next_set(first_block).is_some_and(|b| b < first_block.saturating_add(blocks))
    }

    /// The first set block at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.size_blocks {
            return None;
        }
        let mut index = word_index(from);
        let mut word = self.words[index] & !((1u64 << (from % 64)) - 1);
        loop {
            if word != 0 {
                let block = (index as u64) * 64 + u64::from(word.trailing_zeros());
                return (block < self.size_blocks).then_some(block);
            }
            index += 1;
            if index >= self.words.len() {
                return None;
            }
            word = self.words[index];
        }
    }

    /// The first clear block at or after `from` (or `size_blocks`).
    pub fn next_clear(&self, from: u64) -> u64 {
        let mut block = from;
        while block < self.size_blocks {
            let word = self.words[word_index(block)] >> (block % 64);
            let ones = u64::from((!word).trailing_zeros()).min(64 - block % 64);
            if ones == 0 {
                return block;
            }
            block += ones;
        }
        self.size_blocks
    }

    /// Set runs `(first_block, blocks)` starting at or after `from`.
    pub fn runs_from(&self, from: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut cursor = from;
        std::iter::from_fn(move || {
            let start = self.next_set(cursor)?;
            let end = self.next_clear(start);
            cursor = end;
            Some((start, end - start))
        })
    }

    /// ORs another bitmap of the same size into this one (the handshake merges both sides'
    /// bitmaps so that a block either side marked is resynced).
    pub fn merge(&mut self, other: &Bitmap) {
        assert_eq!(self.size_blocks, other.size_blocks);
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= *theirs;
        }
        self.set_count = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A naive model: the bitmap must agree with a Vec<bool> after any operation sequence.
    #[test]
    fn matches_naive_model() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for size in [1u64, 63, 64, 65, 200, 1000] {
            let mut bitmap = Bitmap::new(size);
            let mut model = vec![false; usize::try_from(size).unwrap()];
            for _ in 0..500 {
                let first = next() % size;
                let blocks = next() % (size - first + 1);
                let set = next() % 2 == 0;
                let changed = if set {
                    bitmap.set_range(first, blocks).unwrap()
                } else {
                    bitmap.clear_range(first, blocks).unwrap()
                };
                let mut model_changed = 0;
                for b in first..first + blocks {
                    let slot = &mut model[usize::try_from(b).unwrap()];
                    if *slot != set {
                        model_changed += 1;
                    }
                    *slot = set;
                }
                assert_eq!(changed, model_changed);
                let count = model.iter().filter(|b| **b).count() as u64;
                assert_eq!(bitmap.count(), count);
                let from = next() % size;
                let expected = (from..size).find(|b| model[usize::try_from(*b).unwrap()]);
                assert_eq!(bitmap.next_set(from), expected);
                for b in 0..size {
                    assert_eq!(bitmap.test(b), model[usize::try_from(b).unwrap()]);
                }
                let run_total: u64 = bitmap.runs_from(0).map(|(_, n)| n).sum();
                assert_eq!(run_total, count);
            }
            let copy = Bitmap::from_words(size, bitmap.words().to_vec()).unwrap();
            assert_eq!(copy, bitmap);
        }
    }

    #[test]
    fn rejects_out_of_range_and_bad_word_counts() {
        let mut bitmap = Bitmap::new(100);
        assert!(bitmap.set_range(90, 11).is_err());
        assert!(bitmap.set_range(u64::MAX, 2).is_err());
        assert_eq!(bitmap.set_range(90, 10), Ok(10));
        assert!(Bitmap::from_words(100, vec![0; 3]).is_err());
        // Padding bits past the end are dropped, not counted.
        let padded = Bitmap::from_words(100, vec![0, u64::MAX]).unwrap();
        assert_eq!(padded.count(), 36);
    }

    #[test]
    fn runs_and_merge() {
        let mut a = Bitmap::new(300);
        a.set_range(10, 5).unwrap();
        a.set_range(60, 10).unwrap();
        let mut b = Bitmap::new(300);
        b.set_range(200, 100).unwrap();
        a.merge(&b);
        let runs: Vec<_> = a.runs_from(0).collect();
        assert_eq!(runs, vec![(10, 5), (60, 10), (200, 100)]);
        assert_eq!(a.runs_from(12).next(), Some((12, 3)));
        assert!(a.any_in_range(0, 11));
        assert!(!a.any_in_range(15, 45));
        assert_eq!(a.count(), 115);
    }
}

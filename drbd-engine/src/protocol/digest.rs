//! Block digests for checksum-based resync (DRBD's `csums-alg`) and online verify
//! (`verify-alg`): the algorithms, their names as drbd.conf spells them, and the per-block
//! digest of a buffer. Pure: bytes in, digests out.

use crate::constants::BLOCK_BYTES;
use sha2::Digest as _;
use thiserror::Error;

/// A digest algorithm both ends always have built in; the requester names it in each request,
/// so the two ends need not agree on a configuration (DRBD refuses to connect on a mismatch;
/// here the side that asks decides and the other obeys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlg {
    /// Fast (hardware-assisted), 32 bits: catches accidental corruption, not an adversary.
    Crc32c,
    /// Cryptographic, 256 bits: equal digests mean equal data for any practical purpose.
    Sha256,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown digest algorithm {0:?} (crc32c or sha256)")]
pub struct UnknownDigestAlg(pub String);

impl DigestAlg {
    pub const ALL: [DigestAlg; 2] = [DigestAlg::Crc32c, DigestAlg::Sha256];

    /// The name drbd.conf uses (the kernel crypto API's).
    pub fn name(self) -> &'static str {
        match self {
            Self::Crc32c => "crc32c",
            Self::Sha256 => "sha256",
        }
    }

    /// Bytes of one block's digest.
    pub fn digest_bytes(self) -> usize {
        match self {
            Self::Crc32c => 4,
            Self::Sha256 => 32,
        }
    }

    pub fn to_wire(self) -> u8 {
        match self {
            Self::Crc32c => 1,
            Self::Sha256 => 2,
        }
    }

    pub fn from_wire(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|alg| alg.to_wire() == value)
    }
}

impl std::fmt::Display for DigestAlg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DigestAlg {
    type Err = UnknownDigestAlg;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|alg| alg.name() == text)
            .ok_or_else(|| UnknownDigestAlg(text.to_owned()))
    }
}

/// DRBD's `net { csums-alg; csums-after-crash-only; verify-alg; }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DigestSettings {
    /// Checksum-based resync: the sync target's blocks are compared by digest first and only
    /// differing blocks are transferred. `None`: every out-of-sync block is transferred.
    pub csums_alg: Option<DigestAlg>,
    /// Use checksums only for the resync after a primary crash (its activity-log extents are
    /// marked "just in case", so most of those blocks are equal); after a network interruption
    /// the marked blocks were written and do differ, so digests would be pure overhead.
    pub csums_after_crash_only: bool,
    /// Online verify; `None`: `verify` is refused, as DRBD refuses it without verify-alg.
    pub verify_alg: Option<DigestAlg>,
}

impl DigestSettings {
    /// The algorithm for a resync starting now, if checksums apply to it.
    pub fn csums_for_resync(&self, after_primary_crash: bool) -> Option<DigestAlg> {
        self.csums_alg.filter(|_| after_primary_crash || !self.csums_after_crash_only)
    }
}

/// The digest of each whole 4 KiB block of `data`, concatenated.
pub fn block_digests(alg: DigestAlg, data: &[u8]) -> Vec<u8> {
    assert!(data.len().is_multiple_of(BLOCK_BYTES), "digests cover whole blocks");
    let mut out = Vec::with_capacity(data.len() / BLOCK_BYTES * alg.digest_bytes());
    for block in data.chunks_exact(BLOCK_BYTES) {
        match alg {
            DigestAlg::Crc32c => out.extend_from_slice(&crc32c::crc32c(block).to_le_bytes()),
            DigestAlg::Sha256 => out.extend_from_slice(&sha2::Sha256::digest(block)),
        }
    }
    out
}

/// Which blocks differ, by comparing two digest lists of `blocks` blocks: one bit per block in
/// 64-bit words (bit k of word w is block 64*w + k). `None` when a list has the wrong length.
pub fn differing_blocks(alg: DigestAlg, blocks: u64, a: &[u8], b: &[u8]) -> Option<Vec<u64>> {
    let n = alg.digest_bytes();
    let count = usize::try_from(blocks).ok()?;
    if a.len() != count.checked_mul(n)? || b.len() != a.len() {
        return None;
    }
    let mut words = vec![0u64; count.div_ceil(64)];
    for (k, (x, y)) in a.chunks_exact(n).zip(b.chunks_exact(n)).enumerate() {
        if x != y {
            words[k / 64] |= 1 << (k % 64);
        }
    }
    Some(words)
}

/// Runs of set bits in a block mask, as (first offset, blocks), for `blocks` blocks.
pub fn mask_runs(mask: &[u64], blocks: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for k in 0..blocks {
        let set = usize::try_from(k / 64)
            .ok()
            .and_then(|w| mask.get(w))
            .is_some_and(|word| word & (1 << (k % 64)) != 0);
        if !set {
            continue;
        }
        match runs.last_mut() {
            Some((first, len)) if *first + *len == k => *len += 1,
            _ => runs.push((k, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for alg in DigestAlg::ALL {
            assert_eq!(alg.name().parse::<DigestAlg>(), Ok(alg));
            assert_eq!(DigestAlg::from_wire(alg.to_wire()), Some(alg));
        }
        assert!("md5".parse::<DigestAlg>().is_err());
        assert_eq!(DigestAlg::from_wire(0), None);
    }

    #[test]
    fn digests_are_per_block_and_see_a_single_bit() {
        for alg in DigestAlg::ALL {
            let data = vec![7u8; 3 * BLOCK_BYTES];
            let mut other = data.clone();
            other[BLOCK_BYTES + 100] ^= 0x10;
            let a = block_digests(alg, &data);
            let b = block_digests(alg, &other);
            assert_eq!(a.len(), 3 * alg.digest_bytes());
            assert_eq!(differing_blocks(alg, 3, &a, &b), Some(vec![0b010]));
            assert_eq!(differing_blocks(alg, 3, &a, &a), Some(vec![0]));
            assert_eq!(differing_blocks(alg, 2, &a, &b), None, "length checked");
        }
        // Known answers: the algorithms are the standard ones, so a peer's digests compare.
        let zero = vec![0u8; BLOCK_BYTES];
        let crc = block_digests(DigestAlg::Crc32c, &zero);
        assert_eq!(crc, crc32c::crc32c(&zero).to_le_bytes());
        let sha = block_digests(DigestAlg::Sha256, &zero);
        assert_eq!(&sha[..4], &[0xad, 0x7f, 0xac, 0xb2]);
    }

    #[test]
    fn runs_of_a_mask() {
        let mask = vec![0b1110_0001u64, 1 << 63, 1];
        assert_eq!(mask_runs(&mask, 130), vec![(0, 1), (5, 3), (127, 2)]);
        assert_eq!(mask_runs(&[], 10), vec![]);
    }

    #[test]
    fn csums_after_crash_only() {
        let mut s = DigestSettings { csums_alg: Some(DigestAlg::Crc32c), ..Default::default() };
        assert_eq!(s.csums_for_resync(false), Some(DigestAlg::Crc32c));
        s.csums_after_crash_only = true;
        assert_eq!(s.csums_for_resync(false), None);
        assert_eq!(s.csums_for_resync(true), Some(DigestAlg::Crc32c));
        assert_eq!(DigestSettings::default().csums_for_resync(true), None);
    }
}

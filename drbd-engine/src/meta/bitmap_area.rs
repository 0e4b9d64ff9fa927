//! The per-peer bitmaps on disk, in DRBD 9's interleaved order.
//!
//! Measured with `restore-md` of a dump whose bitmap[0] started 0x1111111111111111,
//! 0x2222222222222222 and bitmap[1] started 0xAAAAAAAAAAAAAAA1 (2 peers), then hexdumping the
//! bitmap area: `11111111 a1aaaaaa 11111111 aaaaaaaa 22222222 00000000 22222222 00000000`.
//! So the unit of interleaving is a little-endian 32-bit word: 32-bit word `w` of bitmap slot
//! `p` lives at byte `4 * (w * max_peers + p)`; bit `b` of a bitmap is bit `b % 32` of its
//! 32-bit word `b / 32`. Seen as 64-bit words (what dump-md prints and what the engine's
//! `Bitmap::words()` holds, bit 0 = block 0), word `i` is 32-bit words `2i` (low half) and
//! `2i + 1` (high half). With one peer this is plain little-endian 64-bit words.

use std::ops::Range;

use super::MetaError;
use super::constants::{AL_EXTENT_BLOCKS, MD_BLOCK_SIZE_BYTES, MD_BLOCK_SIZE_BYTES_U64};

const WORDS32_PER_PAGE: u64 = MD_BLOCK_SIZE_BYTES_U64 / 4;

/// Bytes of the bitmap area describing `data_blocks` blocks for `max_peers` bitmaps: whole
/// 64-bit words per peer, the total rounded up to 4 KiB.
pub fn bitmap_area_bytes(data_blocks: u64, max_peers: u32) -> u64 {
    let per_peer_bytes = data_blocks.div_ceil(64) * 8;
    (u64::from(max_peers) * per_peer_bytes).div_ceil(MD_BLOCK_SIZE_BYTES_U64)
        * MD_BLOCK_SIZE_BYTES_U64
}

/// 32-bit half `word32` of a bitmap given as 64-bit words, as little-endian bytes; zero past
/// the end (the padding DRBD keeps at the end of each bitmap).
fn half_bytes(words: &[u64], word32: u64) -> [u8; 4] {
    let Ok(index) = usize::try_from(word32 / 2) else {
        return [0; 4];
    };
    let Some(word) = words.get(index) else {
        return [0; 4];
    };
    let bytes = word.to_le_bytes();
    let start = if word32.is_multiple_of(2) { 0 } else { 4 };
    [bytes[start], bytes[start + 1], bytes[start + 2], bytes[start + 3]]
}

fn check_peers(bitmaps: &[&[u64]], max_peers: u32) -> Result<(), MetaError> {
    if max_peers == 0 || max_peers > super::constants::MAX_PEERS_MAX {
        return Err(MetaError::MaxPeers(max_peers));
    }
    let slots = usize::try_from(max_peers).expect("max_peers <= 31");
    if bitmaps.len() > slots {
        return Err(MetaError::InvalidField {
            field: "bitmap count",
            value: i64::try_from(bitmaps.len()).unwrap_or(i64::MAX),
        });
    }
    Ok(())
}

/// Encodes bitmap page `page` (4 KiB, counted from the start of the bitmap area).
/// `bitmaps[i]` holds the 64-bit words of bitmap slot `i`; absent or short slots read as zero.
pub fn encode_bitmap_page(
    page: u64,
    bitmaps: &[&[u64]],
    max_peers: u32,
) -> Result<Box<[u8; MD_BLOCK_SIZE_BYTES]>, MetaError> {
    check_peers(bitmaps, max_peers)?;
    let peers = u64::from(max_peers);
    let mut out = Box::new([0u8; MD_BLOCK_SIZE_BYTES]);
    for (j, chunk) in out.chunks_exact_mut(4).enumerate() {
        let position = page * WORDS32_PER_PAGE + u64::try_from(j).expect("j < 1024");
        let peer = usize::try_from(position % peers).expect("peer < 31");
        if let Some(words) = bitmaps.get(peer) {
            chunk.copy_from_slice(&half_bytes(words, position / peers));
        }
    }
    Ok(out)
}

/// Encodes the whole bitmap area of `area_bytes` (the layout's `bm_size_bytes`).
pub fn encode_bitmap_area(
    bitmaps: &[&[u64]],
    max_peers: u32,
    area_bytes: u64,
) -> Result<Vec<u8>, MetaError> {
    check_peers(bitmaps, max_peers)?;
    if !area_bytes.is_multiple_of(MD_BLOCK_SIZE_BYTES_U64) {
        return Err(MetaError::InvalidField {
            field: "bitmap area bytes",
            value: i64::try_from(area_bytes).unwrap_or(i64::MAX),
        });
    }
    let peers = u64::from(max_peers);
    for words in bitmaps {
        let needed = u64::try_from(words.len()).expect("usize fits u64") * 8 * peers;
        if needed > area_bytes + 8 * peers {
            // More words than the area can hold: the caller mixed up sizes.
            return Err(MetaError::BufferSize {
                len: words.len(),
                expected: usize::try_from(area_bytes / 8 / peers).unwrap_or(usize::MAX),
            });
        }
    }
    let pages = area_bytes / MD_BLOCK_SIZE_BYTES_U64;
    let mut out = Vec::with_capacity(usize::try_from(area_bytes).unwrap_or(0));
    for page in 0..pages {
        out.extend_from_slice(&encode_bitmap_page(page, bitmaps, max_peers)?[..]);
    }
    Ok(out)
}

/// Decodes `max_peers` bitmaps of `words_per_peer` 64-bit words each from the bitmap area.
pub fn decode_bitmap_area(
    area: &[u8],
    max_peers: u32,
    words_per_peer: usize,
) -> Result<Vec<Vec<u64>>, MetaError> {
    check_peers(&[], max_peers)?;
    let peers = usize::try_from(max_peers).expect("max_peers <= 31");
    let needed_words32 = words_per_peer.checked_mul(2).and_then(|w| w.checked_mul(peers));
    match needed_words32 {
        Some(n) if n.checked_mul(4).is_some_and(|bytes| bytes <= area.len()) => {}
        _ => {
            return Err(MetaError::BufferSize {
                len: area.len(),
                expected: words_per_peer.saturating_mul(8).saturating_mul(peers),
            });
        }
    }
    let mut bitmaps = vec![vec![0u64; words_per_peer]; peers];
    for (position, chunk) in area.chunks_exact(4).enumerate() {
        let peer = position % peers;
        let word32 = position / peers;
        let index = word32 / 2;
        if index >= words_per_peer {
            // Interleaved order: once one peer's word is past the end, all later ones are.
            if peer == peers - 1 {
                break;
            }
            continue;
        }
        let half = u64::from(u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
        bitmaps[peer][index] |= if word32.is_multiple_of(2) { half } else { half << 32 };
    }
    Ok(bitmaps)
}

fn page_of_word32_position(position: u64) -> u64 {
    position / WORDS32_PER_PAGE
}

/// Bitmap pages holding the bits of blocks `first_block..first_block + blocks` for every
/// bitmap slot: the pages to write after those bits changed in several bitmaps.
pub fn pages_for_blocks(first_block: u64, blocks: u64, max_peers: u32) -> Range<u64> {
    assert!(max_peers >= 1);
    if blocks == 0 {
        return 0..0;
    }
    let peers = u64::from(max_peers);
    let last_block = first_block + (blocks - 1);
    let first = page_of_word32_position(first_block / 32 * peers);
    let last = page_of_word32_position(last_block / 32 * peers + (peers - 1));
    first..last + 1
}

/// Bitmap pages holding the bits of blocks `first_block..first_block + blocks` of bitmap
/// slot `bitmap_index` only.
pub fn pages_for_blocks_of_peer(
    bitmap_index: u32,
    first_block: u64,
    blocks: u64,
    max_peers: u32,
) -> Range<u64> {
    assert!(bitmap_index < max_peers);
    if blocks == 0 {
        return 0..0;
    }
    let peers = u64::from(max_peers);
    let last_block = first_block + (blocks - 1);
    let first = page_of_word32_position(first_block / 32 * peers + u64::from(bitmap_index));
    let last = page_of_word32_position(last_block / 32 * peers + u64::from(bitmap_index));
    first..last + 1
}

/// Bitmap pages covering activity-log extent `extent` in every bitmap: written before a
/// transaction evicts the extent, so its out-of-sync bits are on disk once the AL forgets it.
pub fn pages_for_extent(extent: u32, max_peers: u32) -> Range<u64> {
    pages_for_blocks(u64::from(extent) * AL_EXTENT_BLOCKS, AL_EXTENT_BLOCKS, max_peers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn interleaving_matches_drbdmeta_restore_md() {
        // bitmap[0] = 0x1111111111111111, 0x2222222222222222, 0x3; bitmap[1] =
        // 0xAAAAAAAAAAAAAAA1, ..., last word 0x8000000000000000 (4096 words each, 2 peers).
        let mut peer0 = vec![0u64; 4096];
        peer0[0] = 0x1111_1111_1111_1111;
        peer0[1] = 0x2222_2222_2222_2222;
        peer0[2] = 3;
        let mut peer1 = vec![0u64; 4096];
        peer1[0] = 0xAAAA_AAAA_AAAA_AAA1;
        peer1[4095] = 0x8000_0000_0000_0000;
        let area = encode_bitmap_area(&[&peer0, &peer1], 2, 65536).unwrap();
        let expected_head: [u8; 0x28] = [
            0x11, 0x11, 0x11, 0x11, 0xa1, 0xaa, 0xaa, 0xaa, 0x11, 0x11, 0x11, 0x11, 0xaa, 0xaa,
            0xaa, 0xaa, 0x22, 0x22, 0x22, 0x22, 0, 0, 0, 0, 0x22, 0x22, 0x22, 0x22, 0, 0, 0, 0, 3,
            0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&area[..0x28], &expected_head);
        assert_eq!(&area[0xfff0..], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80]);
        let decoded = decode_bitmap_area(&area, 2, 4096).unwrap();
        assert_eq!(decoded, vec![peer0, peer1]);
    }

    #[test]
    fn page_ranges() {
        // One peer: 32768 blocks per page.
        assert_eq!(pages_for_blocks(0, 1, 1), 0..1);
        assert_eq!(pages_for_blocks(32767, 2, 1), 0..2);
        assert_eq!(pages_for_blocks(0, 0, 1), 0..0);
        // Two peers: 16384 blocks per page; an extent (1024 blocks) fits one page.
        assert_eq!(pages_for_extent(15, 2), 0..1);
        assert_eq!(pages_for_extent(16, 2), 1..2);
        // Three peers: page boundaries fall inside a word position; the last peer of word
        // position 341 starts page 1 (position 341 * 3 + 2 = 1025 >= 1024).
        assert_eq!(pages_for_blocks(341 * 32, 1, 3), 0..2);
        assert_eq!(pages_for_blocks_of_peer(0, 341 * 32, 1, 3), 0..1);
        assert_eq!(pages_for_blocks_of_peer(2, 341 * 32, 1, 3), 1..2);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(encode_bitmap_page(0, &[&[1], &[2], &[3]], 2).is_err());
        assert!(encode_bitmap_area(&[&[1]], 0, 4096).is_err());
        assert!(encode_bitmap_area(&[&[1]], 1, 100).is_err());
        assert!(decode_bitmap_area(&[0u8; 4096], 2, 300).is_err());
        assert!(encode_bitmap_area(&[&[0u64; 1000]], 1, 4096).is_err());
    }

    proptest! {
        #[test]
        fn round_trip_and_dirty_pages(
            max_peers in 1u32..6,
            data_blocks in 1u64..200_000,
            seed_bits in prop::collection::vec((0usize..6, any::<u64>()), 0..40),
            range in (0u64..200_000, 1u64..5000),
        ) {
            let words_per_peer = usize::try_from(data_blocks.div_ceil(64)).unwrap();
            let peers = usize::try_from(max_peers).unwrap();
            let mut bitmaps = vec![vec![0u64; words_per_peer]; peers];
            for (peer, value) in seed_bits {
                let peer = peer % peers;
                let block = value % data_blocks;
                bitmaps[peer][usize::try_from(block / 64).unwrap()] |= 1 << (block % 64);
            }
            let area_bytes = bitmap_area_bytes(data_blocks, max_peers);
            let refs: Vec<&[u64]> = bitmaps.iter().map(|b| b.as_slice()).collect();
            let area = encode_bitmap_area(&refs, max_peers, area_bytes).unwrap();
            prop_assert_eq!(
                &decode_bitmap_area(&area, max_peers, words_per_peer).unwrap(),
                &bitmaps
            );

            // Changing bits of a block range changes bytes only inside pages_for_blocks, and
            // inside the per-peer range for that peer.
            let (first, len) = range;
            let first = first % data_blocks;
            let len = len.min(data_blocks - first);
            let peer = usize::try_from(first).unwrap() % peers;
            let mut changed = bitmaps.clone();
            for block in first..first + len {
                changed[peer][usize::try_from(block / 64).unwrap()] ^= 1 << (block % 64);
            }
            let refs: Vec<&[u64]> = changed.iter().map(|b| b.as_slice()).collect();
            let area2 = encode_bitmap_area(&refs, max_peers, area_bytes).unwrap();
            let all = pages_for_blocks(first, len, max_peers);
            let mine = pages_for_blocks_of_peer(u32::try_from(peer).unwrap(), first, len, max_peers);
            prop_assert!(all.start <= mine.start && mine.end <= all.end);
            for (page, (a, b)) in area.chunks(4096).zip(area2.chunks(4096)).enumerate() {
                let page = u64::try_from(page).unwrap();
                if a != b {
                    prop_assert!(mine.contains(&page), "page {} changed outside {:?}", page, mine);
                }
                // Single-page encoding agrees with the whole-area encoding.
                prop_assert_eq!(&encode_bitmap_page(page, &refs, max_peers).unwrap()[..], b);
            }
        }
    }
}

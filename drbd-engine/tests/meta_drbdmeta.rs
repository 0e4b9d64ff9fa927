//! Oracle tests: Tandem's metadata code against drbdmeta (drbd-utils) on plain files.
//!
//! (a) drbdmeta writes (create-md, restore-md), Tandem decodes; (b) Tandem writes, drbdmeta's
//! dump-md prints the same values and apply-al replays Tandem's activity log. drbdmeta runs
//! without the kernel module on a plain file; the device argument "-" means "no DRBD minor",
//! which also keeps drbdmeta from taking machine-wide lock files, so tests run in parallel.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::drbdmeta;
use drbd_engine::meta::constants::{AL_EXTENT_BLOCKS, MD_BLOCK_SIZE_BYTES};
use drbd_engine::meta::{
    ActivityLog, AlAdmission, AlGeometry, MetaLayout, PeerSlot, Superblock, SuperblockCopy,
    SuperblockWriter, decode_bitmap_area, encode_bitmap_area, encode_initialized_ring, md_flags,
    peer_flags, read_superblock_block, recover_ring,
};

const GIB: u64 = 1 << 30;

struct Drbdmeta {
    program: PathBuf,
}

impl Drbdmeta {
    /// Runs `drbdmeta --force - v09 FILE PLACEMENT ARGS...`; panics with its output on failure.
    fn run(&self, file: &Path, placement: &str, args: &[&str]) -> String {
        let output = Command::new(&self.program)
            .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
            .args(["--force", "-", "v09"])
            .arg(file)
            .arg(placement)
            .args(args)
            .output()
            .expect("drbdmeta runs");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "drbdmeta {args:?} failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        stdout + &stderr
    }
}

fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buffer = vec![0u8; usize::try_from(len).unwrap()];
    File::open(path).unwrap().read_exact_at(&mut buffer, offset).unwrap();
    buffer
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let file = File::options().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_data().unwrap();
}

/// What dump-md prints, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Dump {
    max_peers: u32,
    md_size_sect: u64,
    md_offset: u64,
    al_offset: u64,
    bm_offset: u64,
    node_id: i32,
    current_uuid: u64,
    flags: u32,
    /// (bitmap index, bitmap uuid, bitmap dagtag, flags) per node slot.
    peers: Vec<(i32, u64, u64, u32)>,
    history_uuids: Vec<u64>,
    al_extents: u32,
    la_size_sect: u64,
    bm_byte_per_bit: u32,
    device_uuid: u64,
    la_peer_max_bio_size: u32,
    al_stripes: u32,
    al_stripe_size_4k: u32,
    bitmaps: Vec<Vec<u64>>,
}

fn hex_u64(token: &str) -> u64 {
    let token = token.trim_end_matches(';');
    u64::from_str_radix(token.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("hex value {token}"))
}

fn parse_dump(text: &str) -> Dump {
    enum Block {
        Top,
        Peer,
        History,
        Bitmap,
    }
    let mut dump = Dump::default();
    let mut block = Block::Top;
    for raw in text.lines() {
        let line = raw.trim();
        // Comments carrying values: "# md_size_sect 200", "# al-extents 257;".
        if let Some(comment) = line.strip_prefix("# ") {
            let words: Vec<&str> = comment.split_whitespace().collect();
            if words.len() == 2 {
                let value = words[1].trim_end_matches(';');
                match words[0] {
                    "md_size_sect" => dump.md_size_sect = value.parse().unwrap(),
                    "md_offset" => dump.md_offset = value.parse().unwrap(),
                    "al_offset" => dump.al_offset = value.parse().unwrap(),
                    "bm_offset" => dump.bm_offset = value.parse().unwrap(),
                    "al-extents" => dump.al_extents = value.parse().unwrap(),
                    _ => {}
                }
            }
            continue;
        }
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        if line == "}" {
            block = Block::Top;
            continue;
        }
        if line.starts_with("peer[") {
            dump.peers.push((0, 0, 0, 0));
            block = Block::Peer;
            continue;
        }
        if line.starts_with("history-uuids") {
            block = Block::History;
            continue;
        }
        if line.starts_with("bitmap[") {
            dump.bitmaps.push(Vec::new());
            block = Block::Bitmap;
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match block {
            Block::Peer => {
                let peer = dump.peers.last_mut().unwrap();
                let value = words[1].trim_end_matches(';');
                match words[0] {
                    "bitmap-index" => peer.0 = value.parse().unwrap(),
                    "bitmap-uuid" => peer.1 = hex_u64(value),
                    "bitmap-dagtag" => peer.2 = hex_u64(value),
                    "flags" => peer.3 = u32::try_from(hex_u64(value)).unwrap(),
                    other => panic!("unexpected peer field {other}"),
                }
            }
            Block::History => dump.history_uuids.extend(words.iter().map(|w| hex_u64(w))),
            Block::Bitmap => {
                let words_out = dump.bitmaps.last_mut().unwrap();
                let mut i = 0;
                while i < words.len() {
                    if words.get(i + 1) == Some(&"times") {
                        let count: usize = words[i].parse().unwrap();
                        let value = hex_u64(words[i + 2]);
                        words_out.extend(std::iter::repeat_n(value, count));
                        i += 3;
                    } else {
                        words_out.push(hex_u64(words[i]));
                        i += 1;
                    }
                }
            }
            Block::Top => {
                let value = words.get(1).map(|v| v.trim_end_matches(';')).unwrap_or("");
                match words[0] {
                    "max-peers" => dump.max_peers = value.parse().unwrap(),
                    "node-id" => dump.node_id = value.parse().unwrap(),
                    "current-uuid" => dump.current_uuid = hex_u64(value),
                    "flags" => dump.flags = u32::try_from(hex_u64(value)).unwrap(),
                    "la-size-sect" => dump.la_size_sect = value.parse().unwrap(),
                    "bm-byte-per-bit" => dump.bm_byte_per_bit = value.parse().unwrap(),
                    "device-uuid" => dump.device_uuid = hex_u64(value),
                    "la-peer-max-bio-size" => dump.la_peer_max_bio_size = value.parse().unwrap(),
                    "al-stripes" => dump.al_stripes = value.parse().unwrap(),
                    "al-stripe-size-4k" => dump.al_stripe_size_4k = value.parse().unwrap(),
                    _ => {}
                }
            }
        }
    }
    dump
}

/// The values dump-md must print for `sb` placed by `layout`, with `bitmaps` (64-bit words
/// per bitmap slot, as many words as dump-md prints).
fn expected_dump(sb: &Superblock, layout: &MetaLayout, bitmaps: Vec<Vec<u64>>) -> Dump {
    Dump {
        max_peers: sb.max_peers,
        md_size_sect: layout.md_size_sectors,
        md_offset: layout.md_offset_bytes,
        al_offset: layout.al_offset_bytes,
        bm_offset: layout.bm_offset_bytes,
        node_id: sb.node_id,
        current_uuid: sb.current_uuid,
        flags: sb.flags,
        peers: sb
            .peers
            .iter()
            .map(|p| (p.bitmap_index, p.bitmap_uuid, p.bitmap_dagtag, p.flags))
            .collect(),
        history_uuids: sb.history_uuids.to_vec(),
        al_extents: sb.al_extents,
        la_size_sect: sb.effective_size_sectors,
        bm_byte_per_bit: sb.bm_bytes_per_bit,
        device_uuid: sb.device_uuid,
        la_peer_max_bio_size: sb.peer_max_bio_size_bytes,
        al_stripes: sb.al_stripes,
        al_stripe_size_4k: sb.al_stripe_size_4k,
        bitmaps,
    }
}

/// Words per bitmap that dump-md prints for la-size-sect: the 4 KiB-rounded bitmap bytes
/// split evenly over the bitmaps.
fn dumped_words_per_peer(la_size_sect: u64, max_peers: u32) -> usize {
    let bytes = drbd_engine::meta::layout::bitmap_area_bytes_for_sectors(la_size_sect, max_peers);
    usize::try_from(bytes / 8 / u64::from(max_peers)).unwrap()
}

/// `--al-stripes N --al-stripe-size-kB K`, or the default ring.
type Stripes = Option<(u32, u32)>;

#[test]
fn create_md_output_is_decoded_byte_for_byte() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    // (device bytes, max peers, optional (al stripes, stripe size KiB))
    let cases: &[(u64, u32, Stripes)] = &[
        (GIB, 2, None),
        (GIB, 1, None),
        (100 << 20, 7, None),
        (GIB + 3000, 3, None),
        (68 << 10, 1, None),
        (GIB, 2, Some((3, 64))),
        (GIB, 4, Some((2, 16))),
    ];
    for (i, &(size, peers, stripes)) in cases.iter().enumerate() {
        let path = sparse_file(dir.path(), &format!("create-{i}.img"), size);
        let mut args = vec!["create-md".to_string()];
        let mut al = AlGeometry::default();
        if let Some((count, kib)) = stripes {
            args.extend([
                "--al-stripes".into(),
                count.to_string(),
                "--al-stripe-size-kB".into(),
                kib.to_string(),
            ]);
            al = AlGeometry::new(count, kib / 4).unwrap();
        }
        args.push(peers.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        drbdmeta.run(&path, "internal", &args);

        let layout = MetaLayout::internal(size, peers, al).unwrap();
        let case = format!("{size} bytes, {peers} peers, stripes {stripes:?}");

        // The superblock block, byte for byte.
        let block = read_at(&path, layout.md_offset_bytes, 4096);
        let expected = Superblock::created(&layout);
        assert_eq!(&block[..], &expected.encode_drbd_block()[..], "{case}");
        let read = read_superblock_block(&block).unwrap();
        assert_eq!(read.superblock, expected, "{case}");
        assert_eq!(read.sequence, None, "{case}: drbdmeta wrote it");
        assert!(read.superblock.matches_layout(&layout), "{case}");

        // The activity-log ring, byte for byte, and nothing hot in it.
        let ring = read_at(&path, layout.al_offset_bytes, al.ring_bytes());
        assert_eq!(ring, encode_initialized_ring(al), "{case}");
        let recovery = recover_ring(&ring, al, expected.al_extents).unwrap();
        assert!(recovery.hot_extents.is_empty(), "{case}");

        // A zeroed bitmap.
        let bitmap = read_at(&path, layout.bm_offset_bytes, layout.bm_size_bytes);
        assert!(bitmap.iter().all(|&b| b == 0), "{case}");

        // dump-md agrees on the offsets Tandem computed.
        let dump = parse_dump(&drbdmeta.run(&path, "internal", &["dump-md"]));
        assert_eq!(
            (dump.md_size_sect, dump.md_offset, dump.al_offset, dump.bm_offset),
            (
                layout.md_size_sectors,
                layout.md_offset_bytes,
                layout.al_offset_bytes,
                layout.bm_offset_bytes
            ),
            "{case}"
        );
    }
}

#[test]
fn external_metadata_created_by_drbdmeta_is_decoded() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    let flex = sparse_file(dir.path(), "flex.img", 129 << 20);
    drbdmeta.run(&flex, "flex-external", &["create-md", "2"]);
    let layout = MetaLayout::flex_external(129 << 20, 2, AlGeometry::default()).unwrap();
    let block = read_at(&flex, layout.md_offset_bytes, 4096);
    assert_eq!(&block[..], &Superblock::created(&layout).encode_drbd_block()[..]);

    let indexed = sparse_file(dir.path(), "indexed.img", GIB);
    drbdmeta.run(&indexed, "1", &["create-md", "3"]);
    let layout = MetaLayout::indexed_external(GIB, 1, 3, AlGeometry::default()).unwrap();
    let block = read_at(&indexed, layout.md_offset_bytes, 4096);
    assert_eq!(&block[..], &Superblock::created(&layout).encode_drbd_block()[..]);
    let ring = read_at(&indexed, layout.al_offset_bytes, 32768);
    assert_eq!(ring, encode_initialized_ring(AlGeometry::default()));
}

/// A superblock with every field non-trivial.
fn busy_superblock(layout: &MetaLayout) -> Superblock {
    let mut sb = Superblock::created(layout);
    sb.effective_size_sectors = layout.data_size_bytes / 512;
    sb.current_uuid = 0x7A3F_19C2_55D0_8E41;
    sb.device_uuid = 0xDEAD_BEEF_CAFE_F00D;
    sb.flags = md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE | md_flags::PRIMARY_IND;
    sb.peer_max_bio_size_bytes = 1 << 20;
    sb.node_id = 1;
    sb.al_extents = 1237;
    sb.peers[0] = PeerSlot {
        bitmap_uuid: 0x5E61_E373_3808_DD22,
        bitmap_dagtag: 0x0000_0000_0012_3456,
        flags: peer_flags::CONNECTED | peer_flags::DEVICE_SEEN | peer_flags::NODE_EXISTS,
        bitmap_index: 0,
        reserved: [0; 2],
    };
    sb.peers[2] = PeerSlot {
        bitmap_uuid: 0x1122_3344_5566_7788,
        bitmap_dagtag: 7,
        flags: peer_flags::OUTDATED | peer_flags::NODE_EXISTS,
        bitmap_index: 1,
        reserved: [0; 2],
    };
    sb.peers[1].flags = peer_flags::NODE_EXISTS;
    for (i, uuid) in sb.history_uuids.iter_mut().enumerate().take(5) {
        *uuid = 0xA000_0000_0000_0000 | u64::try_from(i).unwrap() << 8 | 0x11;
    }
    sb
}

#[test]
fn tandem_metadata_is_read_back_by_dump_md_and_apply_al() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    let size = GIB;
    let path = sparse_file(dir.path(), "tandem.img", size);
    let layout = MetaLayout::internal(size, 2, AlGeometry::default()).unwrap();
    let sb = busy_superblock(&layout);

    // Bitmaps: a few bits, a whole word, the last block of the data area, in both slots.
    let data_blocks = layout.data_blocks();
    let words = usize::try_from(data_blocks.div_ceil(64)).unwrap();
    let mut bitmaps = vec![vec![0u64; words]; 2];
    for block in [0u64, 5, 63, 64, 4095, 100_000, data_blocks - 1] {
        bitmaps[0][usize::try_from(block / 64).unwrap()] |= 1 << (block % 64);
    }
    bitmaps[1][17] = u64::MAX;
    bitmaps[1][words - 1] = 1;
    let refs: Vec<&[u64]> = bitmaps.iter().map(Vec::as_slice).collect();
    write_at(
        &path,
        layout.bm_offset_bytes,
        &encode_bitmap_area(&refs, 2, layout.bm_size_bytes).unwrap(),
    );

    // An activity log with hot extents, written as transactions through the ring (more
    // transactions than ring slots, so it wraps).
    let al = layout.al;
    write_at(&path, layout.al_offset_bytes, &encode_initialized_ring(al));
    let mut log = ActivityLog::new(al, sb.al_extents, data_blocks, 1).unwrap();
    let hot_writes = [3u32, 9, 40, 41, 200, 9, 3, 77, 150, 250, 12];
    for extent in hot_writes {
        let first_block = u64::from(extent) * AL_EXTENT_BLOCKS + 100;
        match log.handle_write_start(first_block, 8).unwrap() {
            AlAdmission::Transaction(plan) => {
                write_at(
                    &path,
                    layout.al_transaction_offset_bytes(plan.tr_number),
                    &plan.block[..],
                );
                log.handle_transaction_durable(plan.tr_number).unwrap();
            }
            AlAdmission::Ready => {}
            other => panic!("unexpected {other:?}"),
        }
        log.handle_write_done(first_block, 8).unwrap();
    }
    let hot: BTreeSet<u32> = hot_writes.into_iter().collect();
    assert_eq!(log.hot_extents(), hot.iter().copied().collect::<Vec<_>>());

    // The superblock, through the crash-safe writer: create, then one update, so the block
    // carries Tandem's backup copy too.
    let mut first = sb.clone();
    first.current_uuid = 0x4;
    let (mut writer, created) = SuperblockWriter::create(&first);
    write_at(&path, layout.md_offset_bytes, &created[..]);
    let update = writer.update(&sb);
    write_at(&path, layout.md_offset_bytes, &update.first[..]);
    write_at(&path, layout.md_offset_bytes, &update.second[..]);

    // Tandem reads back what it wrote.
    let block = read_at(&path, layout.md_offset_bytes, 4096);
    let read = read_superblock_block(&block).unwrap();
    assert_eq!(read.superblock, sb);
    assert_eq!(read.sequence, Some(2));
    let ring = read_at(&path, layout.al_offset_bytes, al.ring_bytes());
    let recovery = recover_ring(&ring, al, sb.al_extents).unwrap();
    assert_eq!(recovery.hot_extents, log.hot_extents());

    // dump-md prints the same values (it pads each bitmap to the 4 KiB-rounded area).
    let dumped_words = dumped_words_per_peer(sb.effective_size_sectors, 2);
    let padded: Vec<Vec<u64>> = bitmaps
        .iter()
        .map(|b| {
            let mut b = b.clone();
            b.resize(dumped_words, 0);
            b
        })
        .collect();
    let dump = parse_dump(&drbdmeta.run(&path, "internal", &["dump-md"]));
    assert_eq!(dump, expected_dump(&sb, &layout, padded.clone()));
    // For the notes: keep a copy of the image Tandem wrote (sparse copy of the metadata).
    if let Some(keep) = std::env::var_os("TANDEM_KEEP_META_IMAGE") {
        let copy = sparse_file(Path::new(&keep).parent().unwrap(), "kept.img", size);
        let md_start = layout.bm_offset_bytes;
        write_at(&copy, md_start, &read_at(&path, md_start, size - md_start));
        std::fs::rename(&copy, &keep).unwrap();
    }

    // apply-al replays Tandem's ring: every hot extent becomes out of sync in every bitmap,
    // nothing else changes except the flag saying the log was applied.
    let output = drbdmeta.run(&path, "internal", &["apply-al"]);
    let after = parse_dump(&drbdmeta.run(&path, "internal", &["dump-md"]));
    let mut expected_bitmaps = padded;
    for bitmap in &mut expected_bitmaps {
        for &extent in &recovery.hot_extents {
            let first_word = usize::try_from(u64::from(extent) * AL_EXTENT_BLOCKS / 64).unwrap();
            bitmap[first_word..first_word + 16].fill(u64::MAX);
        }
    }
    let mut expected_sb = sb.clone();
    expected_sb.flags |= md_flags::AL_CLEAN;
    assert_eq!(
        after,
        expected_dump(&expected_sb, &layout, expected_bitmaps.clone()),
        "apply-al said: {output}"
    );

    // drbdmeta rewrote the superblock without Tandem's trailer and re-initialized the ring;
    // Tandem reads both.
    let block = read_at(&path, layout.md_offset_bytes, 4096);
    let read = read_superblock_block(&block).unwrap();
    assert_eq!(read.superblock, expected_sb);
    assert_eq!((read.copy, read.sequence), (SuperblockCopy::Primary, None));
    let ring = read_at(&path, layout.al_offset_bytes, al.ring_bytes());
    assert!(recover_ring(&ring, al, sb.al_extents).unwrap().hot_extents.is_empty());
    let area = read_at(&path, layout.bm_offset_bytes, layout.bm_size_bytes);
    let decoded = decode_bitmap_area(&area, 2, words).unwrap();
    for (decoded, expected) in decoded.iter().zip(&expected_bitmaps) {
        assert_eq!(decoded[..], expected[..words]);
    }
}

#[test]
fn drbdmeta_writes_of_non_trivial_values_are_decoded() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "restored.img", GIB);
    drbdmeta.run(&path, "internal", &["create-md", "2"]);
    let layout = MetaLayout::internal(GIB, 2, AlGeometry::default()).unwrap();

    // Build a dump text from Tandem's values and let drbdmeta write it.
    let mut sb = busy_superblock(&layout);
    sb.al_extents = 257; // restore-md keeps the al-extents create-md chose (it is a comment)
    let words = dumped_words_per_peer(sb.effective_size_sectors, 2);
    let mut bitmaps = vec![vec![0u64; words]; 2];
    bitmaps[0][0] = 0x8000_0000_0000_0001;
    bitmaps[0][1000] = 0x0123_4567_89AB_CDEF;
    bitmaps[1][words - 1] = 0xF000_0000_0000_000F;
    let mut text = String::from("version \"v09\";\nmax-peers 2;\n");
    text += &format!(
        "node-id {};\ncurrent-uuid 0x{:016X};\nflags 0x{:08X};\n",
        sb.node_id, sb.current_uuid, sb.flags
    );
    for (i, peer) in sb.peers.iter().enumerate() {
        text += &format!(
            "peer[{i}] {{\n bitmap-index {};\n bitmap-uuid 0x{:016X};\n bitmap-dagtag 0x{:016X};\n flags 0x{:08X};\n}}\n",
            peer.bitmap_index, peer.bitmap_uuid, peer.bitmap_dagtag, peer.flags
        );
    }
    text += "history-uuids {\n";
    for uuid in sb.history_uuids {
        text += &format!(" 0x{uuid:016X};");
    }
    text += "\n}\n";
    text += &format!(
        "la-size-sect {};\nbm-byte-per-bit 4096;\ndevice-uuid 0x{:016X};\n\
         la-peer-max-bio-size {};\nal-stripes 1;\nal-stripe-size-4k 8;\n",
        sb.effective_size_sectors, sb.device_uuid, sb.peer_max_bio_size_bytes
    );
    for (i, bitmap) in bitmaps.iter().enumerate() {
        text += &format!("bitmap[{i}] {{\n");
        for word in bitmap {
            text += &format!(" 0x{word:016X};");
        }
        text += "\n}\n";
    }
    let dump_path = dir.path().join("values.dump");
    std::fs::write(&dump_path, text).unwrap();
    drbdmeta.run(&path, "internal", &["restore-md", dump_path.to_str().unwrap()]);

    let block = read_at(&path, layout.md_offset_bytes, 4096);
    let read = read_superblock_block(&block).unwrap();
    assert_eq!(read.superblock, sb);
    let area = read_at(&path, layout.bm_offset_bytes, layout.bm_size_bytes);
    assert_eq!(decode_bitmap_area(&area, 2, words).unwrap(), bitmaps);

    // drbdmeta's `outdate` on Tandem-written metadata: Tandem sees the foreign update.
    let (mut writer, _) = SuperblockWriter::open(&block).unwrap();
    let update = writer.update(&sb);
    write_at(&path, layout.md_offset_bytes, &update.first[..]);
    write_at(&path, layout.md_offset_bytes, &update.second[..]);
    drbdmeta.run(&path, "internal", &["outdate"]);
    let read = read_superblock_block(&read_at(&path, layout.md_offset_bytes, 4096)).unwrap();
    assert_eq!(read.sequence, None, "drbdmeta zeroed Tandem's backup copy");
    assert_eq!(read.superblock.flags, sb.flags & !md_flags::WAS_UP_TO_DATE);
}

#[test]
fn torn_tandem_superblock_update_is_recovered_and_repaired_for_drbdmeta() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "torn.img", GIB);
    drbdmeta.run(&path, "internal", &["create-md", "2"]);
    let layout = MetaLayout::internal(GIB, 2, AlGeometry::default()).unwrap();
    let block = read_at(&path, layout.md_offset_bytes, 4096);
    let (mut writer, read) = SuperblockWriter::open(&block).unwrap();
    let old = read.superblock;
    let new = busy_superblock(&layout);
    let update = writer.update(&new);
    write_at(&path, layout.md_offset_bytes, &update.first[..]);
    // The second write tears after its first sector: the primary copy is a mix.
    write_at(&path, layout.md_offset_bytes, &update.second[..512]);
    let block = read_at(&path, layout.md_offset_bytes, 4096);
    let (mut reopened, read) = SuperblockWriter::open(&block).unwrap();
    assert_eq!(read.superblock, new, "the backup copy holds the update");
    assert!(read.needs_repair);
    assert_ne!(read.superblock, old);
    // Repair: write the recovered state again; drbdmeta then reads it.
    let repair = reopened.update(&read.superblock);
    write_at(&path, layout.md_offset_bytes, &repair.first[..]);
    write_at(&path, layout.md_offset_bytes, &repair.second[..]);
    let dump = parse_dump(&drbdmeta.run(&path, "internal", &["dump-md"]));
    assert_eq!(dump.current_uuid, new.current_uuid);
    assert_eq!(dump.node_id, new.node_id);
    assert_eq!(dump.history_uuids, new.history_uuids.to_vec());
    assert_eq!(read_at(&path, layout.md_offset_bytes, 4096).len(), MD_BLOCK_SIZE_BYTES);
}

#[test]
fn three_bitmaps_interleave_as_dump_md_reads_them() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    // 3 bitmaps: 32-bit positions do not divide a 4 KiB page evenly; an odd device size.
    let size = 300 * (1 << 20) + 12_345;
    let path = sparse_file(dir.path(), "three.img", size);
    let layout = MetaLayout::internal(size, 3, AlGeometry::default()).unwrap();
    let created = drbd_engine::meta::create_md(layout, 1237).unwrap();
    write_at(&path, layout.al_offset_bytes, &created.al_ring);
    let mut sb = created.superblock.clone();
    sb.effective_size_sectors = layout.data_size_bytes / 512;
    sb.node_id = 0;
    for (node, index) in [(1usize, 2i32), (2, 0), (3, 1)] {
        sb.peers[node].bitmap_index = index;
        sb.peers[node].flags = peer_flags::NODE_EXISTS;
    }
    let mut writer = created.writer;
    let update = writer.update(&sb);
    write_at(&path, layout.md_offset_bytes, &update.first[..]);
    write_at(&path, layout.md_offset_bytes, &update.second[..]);

    // Distinct patterns per bitmap, around page boundaries (341/342 word positions).
    let words = dumped_words_per_peer(sb.effective_size_sectors, 3);
    let mut bitmaps = vec![vec![0u64; words]; 3];
    for (p, bitmap) in bitmaps.iter_mut().enumerate() {
        let p64 = u64::try_from(p).unwrap();
        for i in [0usize, 170, 171, 341, 342, 683, words - 1] {
            bitmap[i] = (0x0101_0101_0101_0101 * (p64 + 1)) ^ (u64::try_from(i).unwrap() << 40);
        }
    }
    let refs: Vec<&[u64]> = bitmaps.iter().map(Vec::as_slice).collect();
    write_at(
        &path,
        layout.bm_offset_bytes,
        &encode_bitmap_area(&refs, 3, layout.bm_size_bytes).unwrap(),
    );
    let dump = parse_dump(&drbdmeta.run(&path, "internal", &["dump-md"]));
    assert_eq!(dump, expected_dump(&sb, &layout, bitmaps));
}

/// Executes a plan against a file, flushing after every step as a driver must.
fn execute(path: &Path, plan: &drbd_engine::meta::WritePlan) {
    let file = File::options().write(true).open(path).unwrap();
    for step in &plan.steps {
        for write in step {
            file.write_all_at(&write.bytes[..], write.offset_bytes).unwrap();
        }
        file.sync_data().unwrap();
    }
}

fn load_image(
    path: &Path,
    size: u64,
    node: u8,
) -> (drbd_engine::meta::MetaImage, drbd_engine::meta::LoadedMetadata) {
    use drbd_engine::meta::{MetaImage, MetaPlacement};
    let offset = MetaImage::superblock_offset_bytes(MetaPlacement::Internal, size).unwrap();
    let opened =
        MetaImage::open(MetaPlacement::Internal, size, &read_at(path, offset, 4096)).unwrap();
    let al = opened.al_range();
    let bm = opened.bitmap_range();
    let ring = read_at(path, al.start, al.end - al.start);
    let area = read_at(path, bm.start, bm.end - bm.start);
    MetaImage::load(opened, node, &ring, &area).unwrap()
}

#[test]
fn meta_image_attaches_to_create_md_output_and_drbdmeta_reads_its_changes() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * GIB;
    let path = sparse_file(dir.path(), "image.img", size);
    drbdmeta.run(&path, "internal", &["create-md", "3"]);

    // Attach as node 2: adopts the node id and the full data size, which the repair writes.
    let (mut image, loaded) = load_image(&path, size, 2);
    assert_eq!(loaded.superblock.node_id, 2);
    assert_eq!(loaded.size_blocks, image.layout().data_blocks());
    assert!(loaded.hot_extents.is_empty());
    execute(&path, &loaded.repair);

    // Become primary with a new current UUID, write while node 0 is away, track the AL.
    execute(
        &path,
        &image
            .update_superblock(|sb| {
                sb.current_uuid = 0x0BAD_CAFE_0000_1001;
                sb.peers[0].bitmap_uuid = 0x0BAD_CAFE_0000_1000;
                sb.history_uuids[0] = 0x0000_0000_0000_0004;
                sb.flags = md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE | md_flags::PRIMARY_IND;
            })
            .unwrap(),
    );
    execute(&path, &image.al_change(&[2, 300], &[]).unwrap());
    let words = usize::try_from(image.size_blocks().div_ceil(64)).unwrap();
    let mut node0 = vec![0u64; words];
    let first_block = 2 * AL_EXTENT_BLOCKS + 10;
    for block in first_block..first_block + 70 {
        node0[usize::try_from(block / 64).unwrap()] |= 1 << (block % 64);
    }
    let by_node: Vec<&[u64]> = vec![&node0];
    execute(&path, &image.bitmap_writes(0, first_block, 70, &by_node).unwrap());

    // drbdmeta sees it all.
    let dump = parse_dump(&drbdmeta.run(&path, "internal", &["dump-md"]));
    assert_eq!(dump.node_id, 2);
    assert_eq!(dump.current_uuid, 0x0BAD_CAFE_0000_1001);
    assert_eq!(dump.peers[0].0, 0, "node 0 got bitmap slot 0");
    assert_eq!(dump.peers[0].1, 0x0BAD_CAFE_0000_1000);
    assert_eq!(dump.la_size_sect, image.size_blocks() * 8);
    let dumped = dumped_words_per_peer(dump.la_size_sect, 3);
    let mut expected0 = node0.clone();
    expected0.resize(dumped, 0);
    assert_eq!(dump.bitmaps[0], expected0);
    assert!(dump.bitmaps[1].iter().all(|&w| w == 0));

    // A crash as primary: drbdmeta's apply-al and Tandem's reload agree on what to resync.
    let (_, reloaded) = load_image(&path, size, 2);
    assert_eq!(reloaded.hot_extents, vec![2, 300]);
    assert_eq!(reloaded.bitmaps[0].as_deref(), Some(&node0[..]));
    drbdmeta.run(&path, "internal", &["apply-al"]);
    let after = parse_dump(&drbdmeta.run(&path, "internal", &["dump-md"]));
    for bitmap in after.bitmaps.iter().take(1) {
        for extent in [2usize, 300] {
            assert!(bitmap[extent * 16..extent * 16 + 16].iter().all(|&w| w == u64::MAX));
        }
        let set: u32 = bitmap.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set, 2 * 1024, "only the two hot extents (which cover node 0's bits)");
    }
}

#[test]
fn torn_activity_log_transaction_is_skipped_by_drbdmeta_and_tandem_alike() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    let size = GIB;
    let layout = MetaLayout::internal(size, 1, AlGeometry::default()).unwrap();
    for torn_sectors in [1usize, 2, 7] {
        let path = sparse_file(dir.path(), &format!("torn-al-{torn_sectors}.img"), size);
        let (mut image, plan) =
            drbd_engine::meta::MetaImage::create(layout, 0, layout.data_blocks(), 61).unwrap();
        execute(&path, &plan);
        execute(
            &path,
            &image
                .update_superblock(|sb| {
                    sb.flags = md_flags::CONSISTENT | md_flags::PRIMARY_IND;
                    sb.peers[1].bitmap_index = 0;
                })
                .unwrap(),
        );
        // Thirty transactions (the ring wraps) filling slots 0..=29, then one more that
        // swaps the extent in slot 29: it changes the update list in sector 0 and the context
        // entry of slot 29 in sector 1, so a tear after sector 0 leaves a mixed block.
        for i in 0..30u32 {
            execute(&path, &image.al_change(&[i * 5], &[]).unwrap());
        }
        let before: Vec<u32> = (0..30).map(|i| i * 5).collect();
        let mut after: Vec<u32> = (0..29).map(|i| i * 5).collect();
        after.push(200);
        let last = image.al_change(&[200], &[145]).unwrap();
        let write = &last.steps[0][0];
        write_at(&path, write.offset_bytes, &write.bytes[..torn_sectors * 512]);
        let on_disk = read_at(&path, write.offset_bytes, 4096);
        let expected = if on_disk[..] == write.bytes[..] { &after } else { &before };
        if torn_sectors == 1 {
            assert_eq!(expected, &before, "a one-sector tear leaves a mixed block");
        }
        let (_, loaded) = load_image(&path, size, 0);
        assert_eq!(&loaded.hot_extents, expected, "{torn_sectors} sectors");
        drbdmeta.run(&path, "internal", &["apply-al"]);
        let dump = parse_dump(&drbdmeta.run(&path, "internal", &["dump-md"]));
        let marked: Vec<u32> = (0..u32::try_from(dump.bitmaps[0].len() / 16).unwrap())
            .filter(|&e| {
                let first = usize::try_from(e).unwrap() * 16;
                dump.bitmaps[0][first..first + 16].iter().all(|&w| w == u64::MAX)
            })
            .collect();
        assert_eq!(&marked, expected, "{torn_sectors} sectors: drbdmeta agrees");
    }
}

#[test]
fn flex_external_metadata_written_by_tandem_is_read_by_dump_md() {
    let Some(program) = drbdmeta() else { return };
    let drbdmeta = Drbdmeta { program };
    let dir = tempfile::tempdir().unwrap();
    let md_size = 8 << 20;
    let path = sparse_file(dir.path(), "external.img", md_size);
    let layout = MetaLayout::flex_external(md_size, 2, AlGeometry::default()).unwrap();
    // A 10 GiB data device described by an 8 MiB metadata device.
    let size_blocks = (10u64 << 30) / 4096;
    assert!(size_blocks <= layout.data_blocks());
    let (mut image, plan) =
        drbd_engine::meta::MetaImage::create(layout, 0, size_blocks, 1237).unwrap();
    execute(&path, &plan);
    let words = usize::try_from(size_blocks.div_ceil(64)).unwrap();
    let mut node1 = vec![0u64; words];
    node1[words - 1] = 1 << 63;
    node1[7] = 0x5555;
    let empty: &[u64] = &[];
    let by_node: Vec<&[u64]> = vec![empty, &node1];
    execute(&path, &image.bitmap_writes(1, 0, size_blocks, &by_node).unwrap());
    let dump = parse_dump(&drbdmeta.run(&path, "flex-external", &["dump-md"]));
    assert_eq!((dump.md_size_sect, dump.al_offset, dump.bm_offset), (md_size / 512, 4096, 36864));
    assert_eq!(dump.la_size_sect, size_blocks * 8);
    assert_eq!(dump.peers[1].0, 0);
    let mut expected = node1;
    expected.resize(dumped_words_per_peer(dump.la_size_sect, 2), 0);
    assert_eq!(dump.bitmaps[0], expected);
}

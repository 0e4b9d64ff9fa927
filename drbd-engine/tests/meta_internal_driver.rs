//! Internal metadata (`meta-disk internal`) through the driver's store and the driver itself,
//! against drbdmeta in both directions: what Tandem writes at the end of a backing file,
//! `drbdmeta ... internal dump-md` reads; a file prepared only with drbdmeta (create-md, then
//! restore-md with chosen generation UUIDs and bitmap bits, as kernel DRBD would leave it)
//! attaches in the engine, which resyncs exactly the marked blocks from a peer sharing the
//! UUID history.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::drbdmeta;
use common::driver::{free_port, internal_config, pattern, start_pair};
use drbd_engine::NodeId;
use drbd_engine::driver::meta_v09::V09File;
use drbd_engine::meta::{AlGeometry, MetaLayout, MetaPlacement};
use drbd_engine::protocol::{
    DiskState, MetaUpdate, MetadataStore, PersistedDisk, ReplicationState,
};
use drbd_engine::uuid::GenerationUuids;

const MIB: u64 = 1 << 20;

/// Runs `drbdmeta --force - v09 FILE internal ARGS...`; panics with its output on failure.
fn run(program: &Path, file: &Path, args: &[&str]) -> String {
    let output = Command::new(program)
        .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
        .args(["--force", "-", "v09"])
        .arg(file)
        .arg("internal")
        .args(args)
        .output()
        .expect("drbdmeta runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "drbdmeta {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// The value of the first `KEY VALUE;` line at the top level of a dump (after `skip` lines).
fn field(dump: &str, key: &str) -> String {
    dump.lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{key} in dump:\n{dump}"))
        .trim_end_matches(';')
        .to_owned()
}

/// The `KEY` line of block `peer[N] { }`.
fn peer_field(dump: &str, node: usize, key: &str) -> String {
    let start = dump.find(&format!("peer[{node}] {{")).expect("peer block");
    let block = &dump[start..start + dump[start..].find('}').expect("block end")];
    field(block, key)
}

/// Bitmap words of `bitmap[index]`, with `N times 0x...` runs expanded.
fn bitmap_words(dump: &str, index: usize) -> Vec<u64> {
    let start = dump.find(&format!("bitmap[{index}] {{")).expect("bitmap block");
    let body = &dump[start..start + dump[start..].find('}').expect("block end")];
    let mut words = Vec::new();
    for line in body.lines().skip(1) {
        let line = line.split('#').next().unwrap_or("");
        let tokens: Vec<&str> = line.split_whitespace().map(|t| t.trim_end_matches(';')).collect();
        let mut i = 0;
        while i < tokens.len() {
            if tokens.get(i + 1) == Some(&"times") {
                let count: usize = tokens[i].parse().unwrap();
                let value =
                    u64::from_str_radix(tokens[i + 2].trim_start_matches("0x"), 16).unwrap();
                words.extend(std::iter::repeat_n(value, count));
                i += 3;
            } else {
                words.push(u64::from_str_radix(tokens[i].trim_start_matches("0x"), 16).unwrap());
                i += 1;
            }
        }
    }
    words
}

fn hex(value: &str) -> u64 {
    u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap()
}

fn sparse_file(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

#[test]
fn tandem_internal_metadata_is_read_by_dump_md() {
    let Some(program) = drbdmeta() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let size = 64 * MIB + 4096 * 3 + 1000; // not 4 KiB aligned: the superblock finds its block
    sparse_file(&path, size);
    let layout = MetaLayout::internal(size, 2, AlGeometry::default()).unwrap();
    let file = File::options().write(true).open(&path).unwrap();
    file.write_all_at(&pattern(0, 1), 0).unwrap();
    let last_data_block = layout.data_size_bytes - 4096;
    file.write_all_at(&pattern(9, 1), last_data_block).unwrap();
    // Old garbage where the bitmap goes: create-md must clear it.
    file.write_all_at(&[0xFFu8; 8192], layout.bm_offset_bytes).unwrap();
    drop(file);

    assert!(!V09File::probe(&path, MetaPlacement::Internal).unwrap());
    let (mut store, meta) = V09File::create_internal(&path, NodeId(1), 2, 1237).unwrap();
    assert!(V09File::probe(&path, MetaPlacement::Internal).unwrap());
    assert_eq!(store.data_area_bytes(), layout.data_size_bytes);
    assert_eq!(meta.size_blocks, layout.data_blocks());
    store.begin_use().unwrap();
    let mut uuids = GenerationUuids::just_created();
    uuids.current = 0x7A3F_19C2_55D0_8E40;
    uuids.bitmap[0] = 0x5E61_E373_3808_DD22;
    uuids.history[..2].copy_from_slice(&[0x1111_2222_3333_4444, 0x0000_0000_0000_0004]);
    store.apply(&MetaUpdate::Uuids(uuids.clone())).unwrap();
    store.apply(&MetaUpdate::BitmapSet { peer: NodeId(0), first_block: 128, blocks: 64 }).unwrap();
    store.apply(&MetaUpdate::BitmapSet { peer: NodeId(0), first_block: 5, blocks: 1 }).unwrap();
    store.apply(&MetaUpdate::ActivityLog { added: vec![2], removed: vec![] }).unwrap();
    let mut flags = meta.flags.clone();
    flags.disk = PersistedDisk::UpToDate;
    flags.primary_indicator = true;
    store.apply(&MetaUpdate::Flags(flags)).unwrap();
    drop(store);

    let dump = run(&program, &path, &["dump-md"]);
    println!("{dump}");
    assert_eq!(field(&dump, "# md_offset"), layout.md_offset_bytes.to_string());
    assert_eq!(field(&dump, "# bm_offset"), layout.bm_offset_bytes.to_string());
    assert_eq!(field(&dump, "node-id"), "1");
    assert_eq!(hex(&field(&dump, "current-uuid")), uuids.current);
    // consistent | primary | was up-to-date; "AL clean" cleared while Tandem used the AL.
    assert_eq!(hex(&field(&dump, "flags")), 0x13);
    assert_eq!(field(&dump, "la-size-sect"), (layout.data_size_bytes / 512).to_string());
    assert_eq!(peer_field(&dump, 0, "bitmap-index"), "0");
    assert_eq!(hex(&peer_field(&dump, 0, "bitmap-uuid")), uuids.bitmap[0]);
    let history = &dump[dump.find("history-uuids {").unwrap()..];
    assert!(history.contains("0x1111222233334444; 0x0000000000000004;"), "{history}");
    let words = bitmap_words(&dump, 0);
    assert_eq!(words[0], 1 << 5);
    assert_eq!(words[2], u64::MAX);
    assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 65);
    let gi = run(&program, &path, &["show-gi", "--node-id", "0"]);
    assert!(gi.contains("7A3F19C255D08E40:5E61E3733808DD22:1111222233334444"), "{gi}");
    // The data area was left alone.
    let mut block = vec![0u8; 4096];
    let file = File::open(&path).unwrap();
    file.read_exact_at(&mut block, 0).unwrap();
    assert_eq!(block, pattern(0, 1));
    file.read_exact_at(&mut block, last_data_block).unwrap();
    assert_eq!(block, pattern(9, 1));

    // apply-al (what drbdadm runs before a kernel attach) replays Tandem's hot extent 2.
    run(&program, &path, &["apply-al"]);
    let dump = run(&program, &path, &["dump-md"]);
    let words = bitmap_words(&dump, 0);
    assert!(words[32..48].iter().all(|&w| w == u64::MAX), "extent 2 (blocks 2048..3071)");
    assert_eq!(hex(&field(&dump, "flags")) & 0x80, 0x80, "apply-al marks the AL clean");
    // And Tandem reads drbdmeta's result back.
    let (_, meta) = V09File::open(&path, MetaPlacement::Internal, NodeId(1)).unwrap();
    assert_eq!(meta.uuids, uuids);
    assert!(meta.bitmaps[0].test(2048) && meta.bitmaps[0].test(5) && !meta.bitmaps[0].test(6));
    assert!(meta.activity_log.is_empty());
}

/// A restore-md input with the given values (32 peer slots, 32 history UUIDs).
fn dump_text(
    node_id: u8,
    current: u64,
    flags: u32,
    peer: (usize, u64),
    history: u64,
    la_size_sect: u64,
    bitmap: &[u64],
) -> String {
    let mut text = format!(
        "version \"v09\";\nmax-peers 1;\nnode-id {node_id};\ncurrent-uuid 0x{current:016X};\n\
         flags 0x{flags:08X};\n"
    );
    for i in 0..32 {
        let (index, uuid, peer_flags) = if i == peer.0 { (0, peer.1, 0x10010) } else { (-1, 0, 0) };
        text += &format!(
            "peer[{i}] {{\n bitmap-index {index};\n bitmap-uuid 0x{uuid:016X};\n \
             bitmap-dagtag 0x0000000000000000;\n flags 0x{peer_flags:08X};\n}}\n"
        );
    }
    text += &format!("history-uuids {{\n 0x{history:016X};");
    text += &" 0x0000000000000000;".repeat(31);
    text += &format!(
        "\n}}\nla-size-sect {la_size_sect};\nbm-byte-per-bit 4096;\ndevice-uuid 0x0000000000000000;\n\
         la-peer-max-bio-size 1048576;\nal-stripes 1;\nal-stripe-size-4k 8;\nbitmap[0] {{\n"
    );
    for word in bitmap {
        text += &format!(" 0x{word:016X};");
    }
    text + "\n}\n"
}

/// The "move a volume from kernel DRBD" story at the driver level.
#[test]
fn drbdmeta_prepared_files_attach_and_resync_only_the_marked_blocks() {
    let Some(program) = drbdmeta() else { return };
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let layout = MetaLayout::internal(size, 1, AlGeometry::default()).unwrap();
    let la_size_sect = layout.data_size_bytes / 512;
    let words = usize::try_from(layout.data_blocks().div_ceil(64)).unwrap();
    let (old_uuid, current_uuid) = (0x0DDB_A11C_AFE0_0000u64, 0xC0FF_EE00_1234_5678u64);
    // Blocks 70..80 and 1000 changed on node 0 while node 1 was away.
    let marked: Vec<u64> = (70..80).chain([1000]).collect();
    let mut bitmap = vec![0u64; words];
    for &block in &marked {
        bitmap[usize::try_from(block / 64).unwrap()] |= 1 << (block % 64);
    }
    let paths = [dir.path().join("node0.img"), dir.path().join("node1.img")];
    for (node, path) in paths.iter().enumerate() {
        sparse_file(path, size);
        let file = File::options().write(true).open(path).unwrap();
        for block in 0..1100u64 {
            let seed = if node == 0 && marked.contains(&block) { 0x5A } else { 0 };
            file.write_all_at(&pattern(block, seed), block * 4096).unwrap();
        }
        run(&program, path, &["create-md", "1"]);
        // Node 0: UpToDate, current generation started while node 1 was away, node 1's
        // bitmap says what changed since. Node 1: UpToDate at the old generation.
        let text = if node == 0 {
            dump_text(0, current_uuid, 0x11, (1, old_uuid), old_uuid, la_size_sect, &bitmap)
        } else {
            dump_text(1, old_uuid, 0x11, (0, 0), 0, la_size_sect, &vec![0; words])
        };
        let dump_path = dir.path().join(format!("node{node}.dump"));
        std::fs::write(&dump_path, text).unwrap();
        run(&program, path, &["restore-md", dump_path.to_str().unwrap()]);
    }

    let ports = [free_port(), free_port()];
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let devices =
            start_pair(|node| internal_config(&paths[usize::from(node)], node, ports, size)).await;
        for device in &devices {
            assert_eq!(device.size_bytes(), layout.data_size_bytes, "the data area only");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let source = devices[0].status().await.unwrap();
            let target = devices[1].status().await.unwrap();
            let synced = target.disk == DiskState::UpToDate
                && source.peers.iter().all(|p| {
                    p.replication == ReplicationState::Established && p.out_of_sync_blocks == 0
                })
                && target.resync_blocks_received > 0;
            if synced {
                assert_eq!(target.resync_blocks_received, 11, "only the marked blocks");
                assert!(!source.split_brain && !target.split_brain);
                break;
            }
            assert!(Instant::now() < deadline, "no resync: {source:?}\n{target:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The device ends where the metadata starts.
        let beyond = devices[0].write(layout.data_size_bytes, vec![0u8; 4096].into(), false);
        assert!(beyond.await.is_err(), "a write past the data area is refused");
    });
    drop(runtime);
    let file = File::open(&paths[1]).unwrap();
    let mut block = vec![0u8; 4096];
    for block_number in 0..1100u64 {
        file.read_exact_at(&mut block, block_number * 4096).unwrap();
        let seed = if marked.contains(&block_number) { 0x5A } else { 0 };
        assert_eq!(block, pattern(block_number, seed), "block {block_number} on node 1");
    }
    // Both sides' metadata, as drbdmeta reads it: node 1 took over node 0's generation.
    let target = run(&program, &paths[1], &["dump-md"]);
    assert_eq!(hex(&field(&target, "current-uuid")) & !1, current_uuid & !1);
    assert_eq!(field(&target, "node-id"), "1");
}

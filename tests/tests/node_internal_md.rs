//! `meta-disk internal` end to end: two tandemd keep DRBD 9's v09 metadata at the end of
//! their backing files. After writes through QEMU's iSCSI initiator and `tandemadm down`,
//! `drbdmeta ... internal dump-md` reads consistent generation UUIDs on both files; `up` again
//! resyncs nothing, and a secondary that was down resyncs only what changed meanwhile.

use std::process::Command;
use std::time::Duration;
use tests::clients::{dump_md, qemu_io_ok};
use tests::storage_pair::{PairOptions, StoragePair};
use tests::{binary, run_ok, run_with_timeout};

const VOLUME_BYTES: u64 = 64 * 1024 * 1024;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The pair this file tests: no forward links, 64 MiB backing files.
fn new_pair() -> StoragePair {
    StoragePair::with_options(PairOptions {
        volume_bytes: VOLUME_BYTES,
        forward_links: false,
        ..PairOptions::default()
    })
}

fn field<'a>(dump: &'a str, key: &str) -> &'a str {
    dump.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{key} in\n{dump}"))
        .trim_end_matches(';')
}

/// Set bits in the dump's bitmaps.
fn bits_set(dump: &str) -> u64 {
    let mut bits = 0u64;
    let mut inside = false;
    for line in dump.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with("bitmap[") {
            inside = true;
            continue;
        }
        if line == "}" {
            inside = false;
            continue;
        }
        if !inside {
            continue;
        }
        let tokens: Vec<&str> = line.split_whitespace().map(|t| t.trim_end_matches(';')).collect();
        let mut i = 0;
        while i < tokens.len() {
            let (count, value) = if tokens.get(i + 1) == Some(&"times") {
                i += 3;
                (tokens[i - 3].parse::<u64>().unwrap(), tokens[i - 1])
            } else {
                i += 1;
                (1, tokens[i - 1])
            };
            let word = u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap();
            bits += count * u64::from(word.count_ones());
        }
    }
    bits
}

#[test]
fn internal_metadata_survives_down_up_without_a_full_resync() {
    tests::require_slow!();
    let pair = new_pair();
    let _alpha = pair.start(0);
    let _beta = pair.start(1);
    for i in 0..2 {
        pair.adm(i, &["create-md", "r0"]);
        // drbdmeta sees Tandem's fresh internal metadata.
        let dump = dump_md(&pair.nodes[i].disk);
        assert_eq!(field(&dump, "node-id"), i.to_string(), "{dump}");
        pair.adm(i, &["up", "r0"]);
    }
    pair.adm(0, &["wait-connect", "--timeout", "20", "r0"]);
    pair.adm(0, &["new-current-uuid", "--clear-bitmap", "r0"]);
    pair.adm(0, &["wait-sync", "--timeout", "20", "r0"]);
    pair.adm(0, &["primary", "r0"]);
    assert_eq!(pair.adm(0, &["dstate", "r0"]), "UpToDate/UpToDate\n");

    // The LUN ends where the metadata begins: the last data block is writable, the next is not.
    let data_bytes = {
        let dump = dump_md(&pair.nodes[0].disk);
        field(&dump, "la-size-sect").parse::<u64>().unwrap() * 512
    };
    assert!(data_bytes < VOLUME_BYTES && data_bytes > VOLUME_BYTES - 1024 * 1024);
    // The device's last 128 KiB hold the replicated persistent-reservation state, not LUN data.
    let last = data_bytes - 128 * 1024 - 4096;
    qemu_io_ok(
        &pair.url(0),
        &[
            "write -P 49 0 1M",
            "write -P 50 4M 1M",
            &format!("write -P 51 {last} 4k"),
            &format!("read -P 51 {last} 4k"),
        ],
    );

    // down on both (the primary first: down demotes it), then read both files with drbdmeta.
    pair.adm(0, &["down", "r0"]);
    pair.adm(1, &["down", "r0"]);
    let dumps: Vec<String> = pair.nodes.iter().map(|n| dump_md(&n.disk)).collect();
    for (i, dump) in dumps.iter().enumerate() {
        println!("drbdmeta dump-md of {} after down:\n{dump}", pair.nodes[i].name);
        assert_eq!(field(dump, "node-id"), i.to_string());
        let flags = u32::from_str_radix(field(dump, "flags").trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 0x11, 0x11, "consistent and was up-to-date");
        assert_eq!(flags & 0x82, 0x80, "a clean down: not primary, activity log clean");
        assert!(!dump.contains("unclean"), "a clean down leaves clean metadata");
        assert_eq!(bits_set(dump), 0, "nothing out of sync after a clean down");
        assert_eq!(field(dump, "la-size-sect"), field(&dumps[0], "la-size-sect"));
    }
    let uuid = |dump: &str| {
        u64::from_str_radix(field(dump, "current-uuid").trim_start_matches("0x"), 16).unwrap()
    };
    // DRBD keeps the primary's mark in the lowest bit of the current UUID.
    assert_eq!(uuid(&dumps[0]) & !1, uuid(&dumps[1]) & !1, "one generation on both");
    assert!(uuid(&dumps[0]) > 4, "a real generation, not 'just created'");

    // up again: same generation on both, nothing to resync.
    pair.adm(0, &["up", "r0"]);
    pair.adm(1, &["up", "r0"]);
    pair.adm(0, &["wait-connect", "--timeout", "20", "r0"]);
    pair.adm(1, &["wait-sync", "--timeout", "20", "r0"]);
    assert_eq!(pair.adm(0, &["dstate", "r0"]), "UpToDate/UpToDate\n");
    let received = [pair.resync_received_kib(0), pair.resync_received_kib(1)];
    println!("resync after down/up of both: {} and {} KiB received", received[0], received[1]);
    assert_eq!(received, [0, 0], "no resync after a clean down/up");

    // The secondary goes down, 1 MiB changes on the primary; beta resyncs just that.
    pair.adm(0, &["primary", "r0"]);
    pair.adm(1, &["down", "r0"]);
    qemu_io_ok(&pair.url(0), &["write -P 52 8M 1M"]);
    let alpha_dump = dump_md(&pair.nodes[0].disk);
    assert_eq!(bits_set(&alpha_dump), 256, "alpha's bitmap for beta: 1 MiB of 4 KiB blocks");
    pair.adm(1, &["up", "r0"]);
    pair.adm(1, &["wait-connect", "--timeout", "20", "r0"]);
    pair.adm(1, &["wait-sync", "--timeout", "30", "r0"]);
    let blocks = pair.resync_received_kib(1) / 4;
    println!("resync after beta's down/up: {blocks} blocks of 4 KiB (changed: 256)");
    assert_eq!(blocks, 256, "only what changed while beta was down");

    // Everything reads back through beta once it is primary.
    pair.adm(0, &["secondary", "r0"]);
    pair.adm(1, &["primary", "r0"]);
    qemu_io_ok(
        &pair.url(1),
        &[
            "read -P 49 0 1M",
            "read -P 50 4M 1M",
            "read -P 52 8M 1M",
            &format!("read -P 51 {last} 4k"),
        ],
    );
}

#[test]
fn tandemd_attaches_disks_prepared_only_by_drbdmeta() {
    tests::require_slow!();
    let pair = new_pair();
    let drbdmeta = tests::require_tool("drbdmeta", "drbd-utils");
    for node in &pair.nodes {
        run_ok(
            Command::new(&drbdmeta)
                .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
                .args(["--force", "-", "v09"])
                .arg(&node.disk)
                .args(["internal", "create-md", "1"]),
            COMMAND_TIMEOUT,
        );
    }
    let _alpha = pair.start(0);
    let _beta = pair.start(1);
    // tandemadm create-md sees drbdmeta's metadata as valid and leaves it alone.
    let mut command = Command::new(binary("tandemadm"));
    command.arg("-s").arg(&pair.nodes[0].socket).args(["create-md", "r0"]);
    let refused = run_with_timeout(&mut command, COMMAND_TIMEOUT);
    assert_eq!(refused.status.code(), Some(10), "create-md over drbdmeta's metadata");
    for i in 0..2 {
        pair.adm(i, &["up", "r0"]);
        assert_eq!(pair.adm(i, &["dstate", "r0"]).trim().split('/').next(), Some("Inconsistent"));
    }
    pair.adm(0, &["wait-connect", "--timeout", "20", "r0"]);
    pair.adm(0, &["new-current-uuid", "--clear-bitmap", "r0"]);
    pair.adm(0, &["wait-sync", "--timeout", "20", "r0"]);
    pair.adm(0, &["primary", "r0"]);
    assert_eq!(pair.adm(0, &["dstate", "r0"]), "UpToDate/UpToDate\n");
    qemu_io_ok(&pair.url(0), &["write -P 61 0 64k", "read -P 61 0 64k"]);
    pair.adm(0, &["down", "r0"]);
    pair.adm(1, &["down", "r0"]);
    for (i, node) in pair.nodes.iter().enumerate() {
        let dump = dump_md(&node.disk);
        assert_eq!(field(&dump, "node-id"), i.to_string(), "the node id was adopted");
        assert_ne!(field(&dump, "la-size-sect"), "0", "the data size was recorded");
    }
}

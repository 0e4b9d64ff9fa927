//! Throughput of the metadata code paths that sit on the write path or at attach time.
//! Not a correctness test: it runs only with TANDEM_META_BENCH=1, in a release build:
//! `TANDEM_META_BENCH=1 cargo test -p drbd-engine --release --test meta_bench -- --nocapture`

use std::hint::black_box;
use std::time::Instant;

use drbd_engine::meta::{
    ActivityLog, AlAdmission, AlGeometry, bitmap_area_bytes, decode_bitmap_area,
    encode_bitmap_area, encode_bitmap_page, encode_initialized_ring, recover_ring,
};

const TIB_BLOCKS: u64 = 1 << 28;

fn admit(log: &mut ActivityLog, first_block: u64) {
    match log.handle_write_start(first_block, 8).unwrap() {
        AlAdmission::Transaction(plan) => log.handle_transaction_durable(plan.tr_number).unwrap(),
        AlAdmission::Busy => panic!("a single writer is never busy"),
        AlAdmission::Ready | AlAdmission::AfterTransaction { .. } => {}
    }
    log.handle_write_done(first_block, 8).unwrap();
}

#[test]
fn metadata_throughput() {
    if std::env::var("TANDEM_META_BENCH").as_deref() != Ok("1") {
        eprintln!("skipped: set TANDEM_META_BENCH=1 (and build with --release)");
        return;
    }
    let geometry = AlGeometry::default();
    let mut log = ActivityLog::new(geometry, 1237, TIB_BLOCKS, 1).unwrap();
    for extent in 0..1000u64 {
        admit(&mut log, extent * 1024);
    }
    let n = 1_000_000u64;
    let start = Instant::now();
    for i in 0..n {
        admit(&mut log, (i % 1000) * 1024);
    }
    let hit_ns = start.elapsed().as_secs_f64() * 1e9 / 1e6;
    let misses = 100_000u64;
    let start = Instant::now();
    for i in 0..misses {
        admit(&mut log, (2000 + i) * 1024);
    }
    let miss_ns = start.elapsed().as_secs_f64() * 1e9 / 1e5;
    println!(
        "activity log (1237 slots): hit {hit_ns:.0} ns, miss with eviction and transaction {miss_ns:.0} ns"
    );

    let words = usize::try_from(TIB_BLOCKS / 64).unwrap();
    let bitmaps: Vec<Vec<u64>> = (0..4u32)
        .map(|p| (0..words as u64).map(|w| w.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> p).collect())
        .collect();
    let refs: Vec<&[u64]> = bitmaps.iter().map(Vec::as_slice).collect();
    let area_bytes = bitmap_area_bytes(TIB_BLOCKS, 4);
    let start = Instant::now();
    let area = encode_bitmap_area(&refs, 4, area_bytes).unwrap();
    let encode_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let decoded = decode_bitmap_area(&area, 4, words).unwrap();
    let decode_s = start.elapsed().as_secs_f64();
    assert_eq!(decoded, bitmaps);
    let mib = f64::from(u32::try_from(area_bytes >> 20).unwrap());
    println!(
        "bitmap area of a 1 TiB device, 4 peers ({mib} MiB): encode {:.0} MiB/s, decode {:.0} MiB/s",
        mib / encode_s,
        mib / decode_s
    );
    let start = Instant::now();
    for page in 0..10_000u64 {
        black_box(encode_bitmap_page(page, &refs, 4).unwrap());
    }
    println!("one 4 KiB bitmap page: {:.1} us", start.elapsed().as_secs_f64() * 1e6 / 1e4);
    let ring = encode_initialized_ring(geometry);
    let start = Instant::now();
    for _ in 0..1000 {
        black_box(recover_ring(&ring, geometry, 1237).unwrap());
    }
    println!("recover a 32 KiB ring: {:.1} us", start.elapsed().as_secs_f64() * 1e6 / 1e3);
}

//! On-disk metadata in DRBD 9's v09 layout: superblock, activity log and per-peer bitmaps.

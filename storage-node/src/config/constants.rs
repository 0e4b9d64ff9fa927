//! Limits of the configuration reader.

/// Nesting of `include` (an include loop stops here with an error).
pub const INCLUDE_DEPTH_MAX: usize = 8;
/// Files read for one configuration, includes counted.
pub const INCLUDE_FILES_MAX: usize = 4096;
/// Size of one configuration file.
pub const CONFIG_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// DRBD 9 node ids are 0..=31.
pub const NODE_ID_MAX: u32 = 31;
/// DRBD volume numbers are 0..=65534 (drbdsetup's range).
pub const VOLUME_NUMBER_MAX: u32 = 65534;
/// DRBD minor numbers (drbdsetup's range).
pub const MINOR_MAX: u32 = 1_048_575;

const _: () = assert!(INCLUDE_DEPTH_MAX > 0 && INCLUDE_DEPTH_MAX <= INCLUDE_FILES_MAX);

//! Every limit of the replication engine, in one place.
//!
//! Limits are named `*_max`; the compile-time asserts at the bottom state how they relate, so a
//! change that breaks an assumption fails the build instead of a run.

/// The replication unit: one bit of an out-of-sync bitmap covers one block (DRBD's 4 KiB).
pub const BLOCK_SIZE_BYTES: u64 = 4096;
/// Blocks covered by one activity-log extent (DRBD's 4 MiB extents).
pub const AL_EXTENT_BLOCKS: u64 = 1024;
/// Sectors are the unit of a torn write: a power loss may persist a prefix of a 4 KiB write.
pub const SECTOR_SIZE_BYTES: u64 = 512;
/// The same sizes as `usize`, for buffer arithmetic.
pub const BLOCK_BYTES: usize = 4096;
pub const SECTOR_BYTES: usize = 512;

/// Node ids are 0..NODE_ID_MAX; DRBD 9 allows 32 nodes per resource.
pub const NODE_ID_MAX: u8 = 31;
/// Peers a node replicates to (a full mesh of 32 nodes has 31 peers).
pub const PEERS_MAX: usize = 31;
/// Older generation UUIDs kept per node: DRBD 9's `HISTORY_UUIDS` (one per possible peer,
/// the slots of the v09 superblock). Two, DRBD 8's count, were too few for a mesh: a node
/// pushes several generations between two meetings with a peer (a primary starts one per
/// lost peer, a secondary adopts them and settles bases), a bitmap base may name a
/// generation the peer never held (it missed the announcement), and once the peer's own
/// generation fell out, a node newer than it found it unrelated or split (mesh seeds 4047,
/// 4815) instead of the target of a full sync.
pub const HISTORY_UUIDS_MAX: usize = 32;

/// Largest application request, in blocks (1 MiB, the usual iSCSI MaxBurstLength ceiling).
pub const REQUEST_BLOCKS_MAX: u64 = 256;
/// Largest WRITE ATOMIC, in bytes: one request, one frame and one journal record (the
/// atomic-write journal's slot, `driver::atomic`).
pub const ATOMIC_WRITE_BYTES_MAX: u64 = REQUEST_BLOCKS_MAX * BLOCK_SIZE_BYTES;
/// Application requests accepted but not yet completed.
pub const APP_REQUESTS_MAX: usize = 1024;
/// Completed writes waiting for stable storage on every replica (DRBD's transfer log).
pub const TRANSFER_LOG_ENTRIES_MAX: usize = 8192;
/// Outstanding barriers (flush epochs) per node.
pub const BARRIERS_MAX: usize = 256;
/// Hot extents in the activity log; DRBD's default `al-extents` is 1237.
pub const AL_EXTENTS_MAX: usize = 1237;
/// A request may span two extents, and both must be hot at once.
pub const AL_EXTENTS_MIN: usize = 2;
/// Local I/O submitted on behalf of one peer's incoming frames.
pub const PEER_WRITES_IN_FLIGHT_MAX: usize = 1024;
/// Frames a peer may queue behind an unfinished earlier overlapping write or barrier.
pub const PEER_QUEUE_FRAMES_MAX: usize = 4096;
/// Resync requests (read on the source, write on the target) in flight per peer.
pub const RESYNC_REQUESTS_MAX: usize = 64;
/// Blocks per resync request.
pub const RESYNC_REQUEST_BLOCKS_MAX: u64 = 256;
/// Times online verify checks again a range that writes changed while it was compared (each
/// time in halves, down to single blocks) before it reports the range as skipped.
pub const VERIFY_RECHECKS_MAX: u32 = 12;
/// Frames that may arrive ahead of a missing one before the connection is declared broken.
pub const REORDER_FRAMES_MAX: usize = 256;
/// Bitmap words per bitmap frame of the handshake.
pub const BITMAP_CHUNK_WORDS_MAX: usize = 4096;
/// Largest frame payload: a full request of data plus headers.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 1024 * 1024 + 4096;
/// Largest device the engine accepts, in blocks (64 TiB).
pub const DEVICE_BLOCKS_MAX: u64 = 16 * 1024 * 1024 * 1024;

/// A connection with nothing received for this long is declared dead (DRBD's ping-timeout).
pub const PING_TIMEOUT_MS: u64 = 2_000;
/// An idle connection sends a ping this often.
pub const PING_INTERVAL_MS: u64 = 500;
/// A handshake that has not completed by then is abandoned and retried.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 4_000;
/// Completed writes are closed into an epoch (barrier + flush) at least this often.
pub const BARRIER_INTERVAL_MS: u64 = 100;
/// The resync controller runs once per step (DRBD's SLEEP_TIME of 100 ms).
pub const RESYNC_STEP_MS: u64 = 100;
/// Steps in the dynamic controller's plan (c-plan-ahead in 100 ms units; DRBD allows 300).
pub const RESYNC_PLAN_STEPS_MAX: usize = 300;

const _: () = assert!(BLOCK_SIZE_BYTES.is_multiple_of(SECTOR_SIZE_BYTES));
const _: () =
    assert!(BLOCK_BYTES as u64 == BLOCK_SIZE_BYTES && SECTOR_BYTES as u64 == SECTOR_SIZE_BYTES);
const _: () = assert!(AL_EXTENT_BLOCKS * BLOCK_SIZE_BYTES == 4 * 1024 * 1024);
const _: () = assert!(PEERS_MAX == NODE_ID_MAX as usize);
const _: () = assert!(PEERS_MAX < 64, "peer sets are u64 masks");
const _: () = assert!(
    REQUEST_BLOCKS_MAX * BLOCK_SIZE_BYTES + 4096 <= FRAME_PAYLOAD_BYTES_MAX as u64,
    "a full request fits one data frame"
);
const _: () = assert!(
    RESYNC_REQUEST_BLOCKS_MAX <= REQUEST_BLOCKS_MAX,
    "a resync request fits one data frame"
);
const _: () = assert!(
    BITMAP_CHUNK_WORDS_MAX * 8 + 64 <= FRAME_PAYLOAD_BYTES_MAX,
    "a bitmap chunk fits one frame"
);
const _: () = assert!(PING_INTERVAL_MS * 2 <= PING_TIMEOUT_MS);
const _: () = assert!(PING_TIMEOUT_MS < HANDSHAKE_TIMEOUT_MS);
const _: () =
    assert!(REQUEST_BLOCKS_MAX <= AL_EXTENT_BLOCKS, "a request spans at most two extents");
const _: () = assert!(PEER_WRITES_IN_FLIGHT_MAX <= PEER_QUEUE_FRAMES_MAX);
/// Writes a secondary of a three-or-more-node mesh remembers as "maybe not yet on the other
/// secondaries" until the primary confirms them stable everywhere (`PeersInSync`). The
/// primary confirms in transfer-log order, so its transfer log bounds them; past the limit
/// the oldest is marked out of sync for good (costs a resync, never data).
pub const IN_DOUBT_WRITES_MAX: usize = 2 * TRANSFER_LOG_ENTRIES_MAX;
const _: () = assert!(IN_DOUBT_WRITES_MAX >= TRANSFER_LOG_ENTRIES_MAX);
const _: () = assert!(APP_REQUESTS_MAX <= TRANSFER_LOG_ENTRIES_MAX);
const _: () = assert!(AL_EXTENTS_MIN >= 2 && AL_EXTENTS_MIN <= AL_EXTENTS_MAX);
const _: () = assert!(
    ATOMIC_WRITE_BYTES_MAX <= backing_store::atomic_journal::SLOT_BYTES_MAX as u64,
    "the journal's slot holds the largest atomic write"
);

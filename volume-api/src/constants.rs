//! Every limit of the service, in one place, with the relations between them checked at compile
//! time.

/// Largest volume a request may ask for. Bigger sizes get `badRequest` before any quota or
/// scheduler logic runs, so arithmetic on sizes can never overflow (16 PiB fits in u64 bytes).
pub const VOLUME_SIZE_GIB_MAX: u64 = 16 * 1024 * 1024;
/// Largest request body accepted; Cinder bodies are small JSON documents.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Page size when the client gives no `limit` (Cinder's `osapi_max_limit`).
pub const PAGE_SIZE_MAX: usize = 1000;
/// Metadata items per volume or snapshot, and their key/value lengths (Cinder's own limits).
pub const METADATA_ITEMS_MAX: usize = 128;
pub const METADATA_KEY_BYTES_MAX: usize = 255;
pub const METADATA_VALUE_BYTES_MAX: usize = 255;
/// Names and descriptions (Cinder's column sizes).
pub const NAME_BYTES_MAX: usize = 255;
pub const DESCRIPTION_BYTES_MAX: usize = 255;
/// Replicas of one volume: DRBD's model allows a primary and up to two secondaries here.
pub const REPLICA_COUNT_MAX: u32 = 3;
/// A node is down when no heartbeat arrived for this long (Cinder's `service_down_time`).
pub const HEARTBEAT_TIMEOUT_MS_MAX: u64 = 60_000;
/// How often the poller asks configured nodes for capacity (their heartbeat).
pub const HEARTBEAT_INTERVAL_MS: u64 = 5_000;
/// One call to a node's control API may take this long before the operation is failed.
pub const NODE_CALL_TIMEOUT_MS_MAX: u64 = 30_000;
/// A call whose answer waits for copies of a volume's data (a snapshot; a volume made from a
/// snapshot or another volume, on file systems without reflinks) may take
/// `NODE_CALL_TIMEOUT_MS_MAX` plus a second per this many MiB copied before the node counts
/// as stuck.
pub const NODE_COPY_RATE_MIB_PER_S_MIN: u64 = 8;
/// Background operations (create, extend, delete, snapshot) running at once; more wait.
pub const OPERATIONS_IN_FLIGHT_MAX: usize = 64;
/// A writer of the SQLite file waits this long for another process's write transaction.
pub const SQLITE_BUSY_TIMEOUT_MS_MAX: u64 = 5_000;
/// A background operation owns its volume or snapshot row through a lease this long; the
/// instance running it renews the lease every `OPERATION_LEASE_RENEW_INTERVAL_MS`. When an
/// instance dies, another one resumes its operations once their leases expired.
pub const OPERATION_LEASE_MS: u64 = 10_000;
pub const OPERATION_LEASE_RENEW_INTERVAL_MS: u64 = 2_000;
/// How often every instance looks for operations nobody runs (free or expired leases).
pub const RECONCILE_INTERVAL_MS: u64 = 2_000;
/// Storage nodes the registry accepts.
pub const NODES_MAX: usize = 1024;

const _: () = assert!(HEARTBEAT_INTERVAL_MS * 3 <= HEARTBEAT_TIMEOUT_MS_MAX);
const _: () = assert!(NODE_CALL_TIMEOUT_MS_MAX <= HEARTBEAT_TIMEOUT_MS_MAX);
const _: () = assert!(NODE_COPY_RATE_MIB_PER_S_MIN >= 1);
const _: () = assert!(REPLICA_COUNT_MAX >= 1);
const _: () = assert!(VOLUME_SIZE_GIB_MAX.checked_mul(1 << 30).is_some());
const _: () = assert!(METADATA_KEY_BYTES_MAX <= REQUEST_BODY_BYTES_MAX);
// A lease survives two missed renewals, so a busy instance never loses what it runs.
const _: () = assert!(OPERATION_LEASE_RENEW_INTERVAL_MS * 3 <= OPERATION_LEASE_MS);
const _: () = assert!(RECONCILE_INTERVAL_MS <= OPERATION_LEASE_MS);

//! Every limit and timeout of the compute agent, in one place, with the relations between them
//! checked at compile time.

/// How long to wait for QEMU's QMP greeting after connecting to its socket.
pub const QMP_GREETING_TIMEOUT_MS: u64 = 5_000;

/// The default time limit of one QMP command. QMP answers most commands at once; a command that
/// takes longer than this means QEMU's main loop is stuck.
pub const QMP_COMMAND_TIMEOUT_MS: u64 = 10_000;

/// QEMU's iSCSI driver option `timeout` (seconds): how long libiscsi waits for the login.
/// `blockdev-add` blocks QMP until the login completes, so this bounds how long an unreachable
/// portal can hold the monitor. (It does not fail I/O while libiscsi reconnects to a target
/// that went away: that I/O waits.)
pub const ISCSI_TIMEOUT_S: u64 = 5;

/// The time limit of `blockdev-add` for an iSCSI node: the driver's own timeout plus headroom.
pub const QMP_BLOCKDEV_ADD_TIMEOUT_MS: u64 = ISCSI_TIMEOUT_S * 1_000 + 5_000;

/// How long `device_del` may take to complete (the guest must release the device).
pub const DEVICE_DELETED_TIMEOUT_MS: u64 = 15_000;

/// The longest QMP line the client accepts (query results of a busy VM stay far below).
pub const QMP_LINE_BYTES_MAX: usize = 4 << 20;

/// Commands in flight on one QMP connection.
pub const QMP_IN_FLIGHT_MAX: usize = 64;

/// Events buffered per subscriber before the slowest one starts missing events.
pub const QMP_EVENT_QUEUE_MAX: usize = 256;

/// Hot-plug slots (pcie-root-ports on q35) an instance may reserve.
pub const HOTPLUG_SLOTS_MAX: usize = 16;

/// Hot-plug slots an instance gets when its request names none.
pub const HOTPLUG_SLOTS_DEFAULT: usize = 4;

/// Instances one agent supervises.
pub const INSTANCES_MAX: usize = 64;

/// Guest memory bounds (MiB).
pub const MEMORY_MIB_MIN: u32 = 64;
pub const MEMORY_MIB_MAX: u32 = 64 * 1024;
pub const MEMORY_MIB_DEFAULT: u32 = 256;

/// How long the KVM probe may take to prove that KVM runs guest code.
pub const KVM_PROBE_TIMEOUT_MS: u64 = 3_000;

/// How long a freshly started QEMU may take to create its QMP socket.
pub const QEMU_START_TIMEOUT_MS: u64 = 10_000;

/// How long QEMU may take to exit after `quit` before it is killed.
pub const QEMU_STOP_TIMEOUT_MS: u64 = 5_000;

/// How often the resume watcher probes the portals of a paused instance's failing volumes.
pub const RESUME_PROBE_INTERVAL_MS: u64 = 250;

/// The longest wait between probes after resumes that did not hold.
pub const RESUME_BACKOFF_MS_MAX: u64 = 4_000;

/// The TCP connect limit of one portal probe.
pub const RESUME_PROBE_CONNECT_TIMEOUT_MS: u64 = 500;

/// Consecutive automatic resumes that did not keep the instance running before the watcher
/// gives up and leaves the instance paused for an operator (with the back-off, about a minute).
pub const RESUME_ATTEMPTS_MAX: u32 = 20;

/// How long an instance must run after a resume for the attempt counter to reset.
pub const RESUME_STABLE_MS: u64 = 5_000;

/// The TCP connect limit of one path when the path proxy joins a connection: a dead host's
/// portal costs at most this before the next path is tried.
pub const PATH_CONNECT_TIMEOUT_MS: u64 = 500;

/// The path proxy's copy buffer per direction: a whole 256 KiB burst moves in one read.
pub const PATH_PROXY_BUFFER_BYTES: usize = 256 * 1024;

/// Connections one volume's path proxy joins at once (QEMU opens one session per block node).
pub const PATH_PROXY_CONNECTIONS_MAX: usize = 4;

/// Automatic resumes in a row that did not hold before the resume watcher moves a volume's
/// path proxy to its next path (with the back-off, about two seconds after the first error).
pub const PATH_ROTATE_AFTER_RESUMES: u32 = 3;

/// The most of an initiator's first bytes (its login request) the path proxy keeps to replay
/// on the next path when a target closes before answering.
pub const PATH_PROXY_REPLAY_BYTES_MAX: usize = 64 * 1024;

/// Largest HTTP request body the API accepts.
pub const HTTP_BODY_BYTES_MAX: usize = 1 << 20;

/// The largest HTTP answer body the agent's clients accept (tandem-api's, the daemon's).
pub const HTTP_RESPONSE_BYTES_MAX: usize = 4 << 20;

/// TCP connect limit towards tandem-api (one attempt).
pub const VOLUME_API_CONNECT_TIMEOUT_MS: u64 = 2_000;

/// Limit of one tandem-api request (one attempt). Attachment calls only touch its database.
pub const VOLUME_API_REQUEST_TIMEOUT_MS: u64 = 10_000;

/// Attempts per tandem-api call: a create is repeated only when it never got sent, a
/// delete/complete/update also after a timeout or a 502/503/504.
pub const VOLUME_API_ATTEMPTS_MAX: u32 = 3;

/// Wait before the first retry towards tandem-api, doubled per retry up to the max.
pub const VOLUME_API_RETRY_BACKOFF_MS: u64 = 250;
pub const VOLUME_API_RETRY_BACKOFF_MS_MAX: u64 = 2_000;

/// Attachments whose delete the agent keeps retrying in the background after tandem-api was
/// unreachable during a rollback or a server delete.
pub const PENDING_DELETES_MAX: usize = 256;

/// How often those deletes are retried.
pub const PENDING_DELETE_RETRY_INTERVAL_MS: u64 = 5_000;

/// The longest one tandem-api call can take, every attempt timing out (see
/// `http_client::Policy::worst_case_ms`; checked against it in a test).
pub const VOLUME_API_CALL_MS_MAX: u64 = VOLUME_API_ATTEMPTS_MAX as u64
    * VOLUME_API_REQUEST_TIMEOUT_MS
    + (VOLUME_API_ATTEMPTS_MAX as u64 - 1) * VOLUME_API_RETRY_BACKOFF_MS_MAX;

/// The longest an attach by volume id can take: attachment create, the QMP steps
/// (object-add, blockdev-add, device_add), os-complete, and after a failure the rollback
/// (device_del, blockdev-del, object-del) and the attachment delete.
pub const ATTACH_MS_MAX: u64 = 3 * VOLUME_API_CALL_MS_MAX
    + QMP_COMMAND_TIMEOUT_MS
    + QMP_BLOCKDEV_ADD_TIMEOUT_MS
    + QMP_COMMAND_TIMEOUT_MS
    + DEVICE_DELETED_TIMEOUT_MS
    + 2 * QMP_COMMAND_TIMEOUT_MS;

/// How long the CLI waits for the daemon to answer one request: the longest attach.
pub const HTTP_CLIENT_TIMEOUT_MS: u64 = ATTACH_MS_MAX + 5_000;

/// Connect limit of the CLI towards the daemon.
pub const HTTP_CLIENT_CONNECT_TIMEOUT_MS: u64 = 2_000;

/// Longest accepted names and identifiers (instance ids, volume ids, IQNs).
pub const NAME_BYTES_MAX: usize = 223;

/// The agent's default HTTP port (nova's compute API port).
pub const API_PORT_DEFAULT: u16 = 8774;

/// The default iSCSI port when a portal names none.
pub const ISCSI_PORT_DEFAULT: u16 = 3260;

const _: () = assert!(HOTPLUG_SLOTS_DEFAULT <= HOTPLUG_SLOTS_MAX);
// A pcie-root-port's chassis number is a u8 and slot addresses 0x10.. stay under 0x20 devices.
const _: () = assert!(HOTPLUG_SLOTS_MAX <= 16);
const _: () = assert!(QMP_BLOCKDEV_ADD_TIMEOUT_MS > ISCSI_TIMEOUT_S * 1_000);
const _: () = assert!(RESUME_BACKOFF_MS_MAX >= RESUME_PROBE_INTERVAL_MS);
const _: () = assert!(RESUME_BACKOFF_MS_MAX < RESUME_STABLE_MS);
const _: () = assert!(RESUME_PROBE_CONNECT_TIMEOUT_MS <= RESUME_PROBE_INTERVAL_MS * 4);
const _: () = assert!(MEMORY_MIB_MIN <= MEMORY_MIB_DEFAULT && MEMORY_MIB_DEFAULT <= MEMORY_MIB_MAX);
const _: () = assert!(HTTP_CLIENT_TIMEOUT_MS > ATTACH_MS_MAX);
const _: () = assert!(VOLUME_API_CONNECT_TIMEOUT_MS < VOLUME_API_REQUEST_TIMEOUT_MS);
const _: () = assert!(VOLUME_API_RETRY_BACKOFF_MS <= VOLUME_API_RETRY_BACKOFF_MS_MAX);
// A background retry round never overlaps a call's own back-off much.
const _: () = assert!(PENDING_DELETE_RETRY_INTERVAL_MS >= VOLUME_API_RETRY_BACKOFF_MS_MAX);
const _: () = assert!(VOLUME_API_ATTEMPTS_MAX >= 1 && VOLUME_API_ATTEMPTS_MAX <= 10);
// An unreachable tandem-api must fail an attach well within the CLI's patience.
const _: () = assert!(VOLUME_API_CALL_MS_MAX < HTTP_CLIENT_TIMEOUT_MS / 2);
const _: () = assert!(QMP_IN_FLIGHT_MAX <= QMP_EVENT_QUEUE_MAX);

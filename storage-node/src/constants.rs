//! Limits and defaults of the storage node (tandemd/tandemadm). Every bound a client or the
//! configuration could push on is named here.

/// The IQN prefix a resource's target name derives from: `PREFIX:NAME`.
pub const IQN_PREFIX_DEFAULT: &str = "iqn.2026-11.org.tandem";
/// Where tandemd listens for tandemadm when neither the node file nor a flag says otherwise.
pub const CONTROL_SOCKET_DEFAULT: &str = "/run/tandem/tandemd.sock";
/// Where tandemd keeps per-resource state (up markers, metadata for `meta-disk internal`).
pub const STATE_DIRECTORY_DEFAULT: &str = "/var/lib/tandem";
/// iSCSI's well-known port.
pub const PORTAL_DEFAULT: &str = "0.0.0.0:3260";
/// The replication ports resources created through the HTTP API take (inclusive): DRBD's
/// habit of 7789 upward, one per resource.
pub const REPLICATION_PORTS_DEFAULT: (u16, u16) = (7789, 8788);
/// How long a tandemd waits for a peer tandemd's HTTP API (endpoint reservation, status).
pub const PEER_CALL_TIMEOUT_MS_MAX: u64 = 10_000;
/// The slowest copy of a replica's data (a snapshot, on a file system without reflinks) a call
/// to a peer that makes one allows for: such a call may take `PEER_CALL_TIMEOUT_MS_MAX` plus a
/// second per this many MiB of the resource before the peer counts as stuck.
pub const COPY_RATE_MIB_PER_S_MIN: u64 = 8;
/// Response bodies read from a peer tandemd's API.
pub const PEER_RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// How long a PUT on the secondary waits for the peers and a primary before it answers (the
/// resource is created either way; tandem-api's node calls time out after 30 s).
pub const CREATE_SETTLE_MS_MAX: u64 = 20_000;
/// How long the primary of a new resource keeps waiting for its peers to come up for the
/// initial promotion (tandem-api creates the replicas one after the other).
pub const INITIAL_PROMOTION_WAIT_MS_MAX: u64 = 600_000;
/// The environment variable tandemadm reads the control socket path from.
pub const CONTROL_SOCKET_ENV: &str = "TANDEM_CONTROL_SOCKET";

/// One control request line: verbs and resource names are short, so anything longer is abuse.
pub const CONTROL_REQUEST_BYTES_MAX: usize = 64 * 1024;
/// tandemadm connections served at once; more wait in the kernel's accept backlog.
pub const CONTROL_CONNECTIONS_MAX: usize = 64;
/// Resources one tandemd hosts (each has a TCP listener, an engine task and a LUN).
pub const RESOURCES_MAX: usize = 1024;
/// events2 lines buffered per subscriber before a slow reader is told it lost lines.
pub const EVENTS_BUFFER_MAX: usize = 4096;
/// How often the state watcher samples each resource to log and broadcast changes.
pub const STATE_POLL_INTERVAL_MS: u64 = 50;

/// How long a snapshot waits for the writes in flight to finish before it holds new ones; a
/// LUN whose writes do not finish in that time (a dead peer under protocol C) gets no snapshot.
pub const SNAPSHOT_WRITE_HOLD_WAIT_MS_MAX: u64 = 30_000;
/// How often wait-connect / wait-sync re-check.
pub const WAIT_POLL_INTERVAL_MS: u64 = 50;
/// How long `down` waits for a resource's engine to release its listener, connections and
/// files (its runtime winds down; in-flight backing I/O finishes first).
pub const ENGINE_STOP_TIMEOUT_MS_MAX: u64 = 10_000;
/// Include files one configuration may name after glob expansion.
pub const INCLUDE_FILES_MAX: usize = 4096;
/// Attempts to isolate broken include files (one more file dropped per attempt).
pub const BROKEN_FILE_RETRIES_MAX: usize = 64;

/// Scrapes of `/metrics` served at once (each samples every resource's engine); more get 503.
pub const METRICS_SCRAPES_MAX: usize = 4;
/// The LUN's latency histograms: the first bucket's upper bound, the factor between buckets
/// and their number (25 us .. 13 s: a page-cache hit to a stalled replica).
pub const LATENCY_BUCKET_START_S: f64 = 0.000_025;
pub const LATENCY_BUCKET_FACTOR: f64 = 2.0;
pub const LATENCY_BUCKETS_MAX: u16 = 20;
/// Gratuitous ARP rounds (request + reply each) after a service IP is added, and the pause
/// between them: the first goes out at once, the others cover a lost frame.
pub const GRATUITOUS_ARP_ROUNDS_MAX: u32 = 3;
pub const GRATUITOUS_ARP_INTERVAL_MS: u64 = 200;
/// How often a service IP's driver re-checks the interface (and retries a failed action).
pub const SERVICE_IP_CHECK_INTERVAL_MS: u64 = 1000;
/// How long a stopping tandemd waits for a service IP's driver to finish an `ip addr` it has
/// started, before it removes the address itself.
pub const SERVICE_IP_STOP_WAIT_MS: u64 = 2000;

const _: () = assert!(CONTROL_CONNECTIONS_MAX >= 2, "tandemadm events2 must not block others");
const _: () = assert!(BROKEN_FILE_RETRIES_MAX <= INCLUDE_FILES_MAX);
const _: () = assert!(WAIT_POLL_INTERVAL_MS <= 1000 && STATE_POLL_INTERVAL_MS <= 1000);
const _: () = assert!(CREATE_SETTLE_MS_MAX < 30_000, "answer before tandem-api gives up");
const _: () = assert!(PEER_CALL_TIMEOUT_MS_MAX <= CREATE_SETTLE_MS_MAX);
const _: () = assert!(COPY_RATE_MIB_PER_S_MIN >= 1);
const _: () = assert!(REPLICATION_PORTS_DEFAULT.0 <= REPLICATION_PORTS_DEFAULT.1);
const _: () = assert!(METRICS_SCRAPES_MAX >= 1);
const _: () = assert!(LATENCY_BUCKETS_MAX >= 2 && LATENCY_BUCKETS_MAX <= 64);
const _: () = assert!(GRATUITOUS_ARP_ROUNDS_MAX >= 1 && GRATUITOUS_ARP_ROUNDS_MAX <= 10);
const _: () = assert!(
    GRATUITOUS_ARP_INTERVAL_MS * (GRATUITOUS_ARP_ROUNDS_MAX as u64) <= 5_000,
    "announcements end within seconds of a failover"
);
const _: () = assert!(SERVICE_IP_CHECK_INTERVAL_MS >= STATE_POLL_INTERVAL_MS);
const _: () = assert!(RESOURCES_MAX <= 65_535, "resources become iSCSI targets; keep the set sane");

/// Requests one forward link (secondary -> primary) has out at once: commands from the
/// secondary's iSCSI port past this wait for a slot.
pub const FORWARD_IN_FLIGHT_MAX: usize = 256;
/// Frames queued for a forward link's socket (either side) before senders wait.
pub const FORWARD_QUEUE_FRAMES_MAX: usize = 256;
/// A forwarded request unanswered this long completes with a retryable sense.
pub const FORWARD_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Pause between attempts to (re)connect a forward link.
pub const FORWARD_RECONNECT_INTERVAL_MS: u64 = 500;
/// How long a connection attempt or the hello exchange may take.
pub const FORWARD_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Bytes of one forward frame: a command's whole Data-Out or Data-In plus headers.
pub const FORWARD_FRAME_BYTES_MAX: usize =
    iscsi_target::constants::TRANSFER_BYTES_MAX as usize + 64 * 1024;
/// Bytes of a string in a forward frame (names, IQNs).
pub const FORWARD_STRING_BYTES_MAX: usize = 1024;
/// LUNs one forwarded reset names.
pub const FORWARD_RESET_LUNS_MAX: usize = iscsi_target::constants::LUNS_MAX;
/// Relative target port identifiers each node numbers its ports in: node-id * this + port.
pub const RELATIVE_PORTS_PER_NODE: u16 = 16;
/// Remote I_T nexuses one inbound forward link tracks (to release them when it drops).
pub const FORWARD_NEXUSES_PER_LINK_MAX: usize = iscsi_target::constants::REMOTE_NEXUSES_MAX;

const _: () = assert!(FORWARD_QUEUE_FRAMES_MAX >= 1 && FORWARD_IN_FLIGHT_MAX >= 1);
const _: () = assert!(FORWARD_RECONNECT_INTERVAL_MS < FORWARD_REQUEST_TIMEOUT_MS);
const _: () = assert!(FORWARD_FRAME_BYTES_MAX < u32::MAX as usize);
// Node ids run to 31 (DRBD's limit); the last node's ports must fit a u16 identifier.
const _: () = assert!(32 * RELATIVE_PORTS_PER_NODE as u32 <= u16::MAX as u32);

/// How often each resource's promoter samples the engine. The engine offers no state-change
/// notification, so this bounds how late the promoter sees a change (a status call is one
/// round trip to the engine task; measured cost in the storage-node README).
pub const PROMOTER_POLL_INTERVAL_MS: u64 = 10;
/// How long a promoter-driven demotion (a primary that lost quorum) may take before tandemd
/// logs that it is stuck (suspend-io holds requests until quorum returns; the services are
/// stopped already).
pub const PROMOTER_DEMOTE_WAIT_MS_MAX: u64 = 10_000;
/// Preferred nodes one `promoter` line may name.
pub const PROMOTER_PREFERRED_NODES_MAX: usize = 32;

const _: () = assert!(PROMOTER_POLL_INTERVAL_MS <= STATE_POLL_INTERVAL_MS);
const _: () = assert!(
    PROMOTER_POLL_INTERVAL_MS < crate::promoter::DEFERRED_RETRY_MS * 2,
    "a deferred retry is not held up by the poll"
);

/// tandemd's tokio worker threads at most (`--worker-threads`).
pub const WORKER_THREADS_MAX: usize = 64;
/// Without `--worker-threads`: one worker per this many cores (at least one). A replicated
/// write crosses the iSCSI connection task and the engine task, which a second worker of the
/// same process only passes back and forth (a futex wake per hand-off, and the task moves
/// core); the peer daemon, the kernel's loopback/network and disk work and the initiator need
/// the other cores. Measured on 2 cores with the client and both nodes on the machine
/// (storage-node/bench/replicated-vs-tgt, CPU_STAT=1), one worker instead of two: CPU per
/// 4 KiB write at QD32 20.1 instead of 24.9 us (both nodes), per 1 MiB write at QD8 1.35
/// instead of 1.92 ms.
pub const CORES_PER_WORKER_THREAD: usize = 2;

const _: () = assert!(WORKER_THREADS_MAX >= 1 && CORES_PER_WORKER_THREAD >= 1);

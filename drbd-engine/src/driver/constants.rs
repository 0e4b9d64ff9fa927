//! Limits of the tokio driver (the protocol's own limits are in `crate::constants`).

use crate::constants::FRAME_PAYLOAD_BYTES_MAX;
use crate::protocol::frame::HEADER_BYTES;

/// Application commands queued towards the state machine.
pub const COMMAND_QUEUE_MAX: usize = 1024;
/// Inputs (frames, completions, commands) handled before the outputs are carried out: one
/// round's transmits to a peer leave in one TCP write, so bigger rounds mean fewer system calls,
/// while a bound keeps the latency of the first input of a round low.
pub const INPUT_BATCH_MAX: usize = 64;
/// Bytes of frames a per-round send batch holds before it is handed to the connection's
/// writer (headers and small frames are copied into one buffer, Data payloads are not).
pub const SEND_BATCH_BYTES_MAX: usize = 256 * 1024;
/// I/O vectors per vectored socket write (Linux's IOV_MAX is 1024).
pub const SEND_IOVECS_MAX: usize = 64;
/// The connection reader's buffer: one read system call takes in every frame that has arrived,
/// up to this much; a single larger frame gets room for all of it at once.
pub const RECEIVE_BUFFER_BYTES_MAX: usize = 256 * 1024;
/// Room a read gets at least; with less left, the reader's buffer is renewed (the frames split
/// off it live on, shared, until their writes are done).
pub const RECEIVE_READ_BYTES_MIN: usize = 64 * 1024;
/// Renewed receive buffers a connection's reader keeps for reuse once the frames split off
/// them are gone (a reused buffer's pages are already mapped: no page faults on its reads).
/// Enough for a QD8 stream of 1 MiB writes, whose frames each hold a buffer until written.
pub const RECEIVE_BUFFERS_PARKED_MAX: usize = 8;
/// Application requests in flight (the one that woke the driver included) from which the
/// driver yields once before its round, to gather the rest of a burst (see `Driver::run`);
/// below it (QD1) a yield only cost context switches.
pub const YIELD_REQUESTS_IN_FLIGHT_MIN: usize = 2;
/// How long a primary with one application request in flight waits for its peers' ack on
/// its own thread, yielding to the runtime's socket poll, before it parks. At queue depth 1
/// the thread would otherwise sleep for the tens of microseconds the ack takes, and on a
/// virtual machine an idle vCPU sleeps in the hypervisor (HLT): the peer's send of the ack
/// then pays for waking it (an inter-processor interrupt, 13-14 us measured) and the wake-up
/// takes another 5 us to run. A peer whose pings take longer than this is not waited for hot.
pub const ACK_SPIN_US_MAX: u64 = 200;
/// Largest single write the driver gathers with the adjacent writes of its round into one
/// pwritev (`backing_store::BackingStore::write_gathered`); larger ones go alone.
pub const GATHER_WRITE_BYTES_ONE_MAX: usize = 64 * 1024;
/// Passes a round makes over the disk I/O its outputs started and the outputs those
/// completions led to, before it waits in `select!` again (`Driver::run_started_disk_io`): a
/// chain (write, then its ack, then a barrier's flush...) is short, and a bound keeps one
/// round from starving the others' inputs.
pub const IMMEDIATE_DISK_PASSES_MAX: usize = 4;
/// How long a blocking inline write that stalled in the kernel sends the following writes to
/// the backing store's threads. None: the driver's thread does nothing but this resource's
/// I/O, the stall is a file-system lock (ext4's block allocation for writeback, measured with
/// sched_switch) that those threads wait for too, and with backing-store's default of 1 s a
/// 4k QD32 run spent 4 of its 7 s on the thread pool (16 threads contending for the inode lock).
pub const INLINE_WRITE_BACKOFF_MS: u64 = 0;
/// A fence-peer handler that has not answered by then counts as failed (DRBD waits for its
/// handler indefinitely; a bound keeps a hung script from freezing I/O for ever).
pub const FENCE_HANDLER_TIMEOUT_MS_DEFAULT: u64 = 60_000;

const _: () = assert!(INPUT_BATCH_MAX > 0 && INPUT_BATCH_MAX <= COMMAND_QUEUE_MAX);
const _: () =
    assert!(YIELD_REQUESTS_IN_FLIGHT_MIN >= 2 && YIELD_REQUESTS_IN_FLIGHT_MIN <= COMMAND_QUEUE_MAX);
const _: () = assert!(RECEIVE_BUFFER_BYTES_MAX >= HEADER_BYTES);
/// Out-of-sync runs verify reported that `Status` keeps (the oldest go first).
pub const VERIFY_REPORT_RUNS_MAX: usize = 4096;
const _: () = assert!(RECEIVE_READ_BYTES_MIN >= HEADER_BYTES);
const _: () = assert!(RECEIVE_READ_BYTES_MIN <= RECEIVE_BUFFER_BYTES_MAX);
const _: () = assert!(RECEIVE_BUFFERS_PARKED_MAX >= 1 && RECEIVE_BUFFERS_PARKED_MAX <= 64);
const _: () = assert!(SEND_BATCH_BYTES_MAX <= FRAME_PAYLOAD_BYTES_MAX + HEADER_BYTES);
const _: () = assert!(SEND_IOVECS_MAX >= 2 && SEND_IOVECS_MAX <= 1024);
const _: () = assert!(IMMEDIATE_DISK_PASSES_MAX >= 1 && IMMEDIATE_DISK_PASSES_MAX <= 16);
// A write the driver gathers fits a gathered write, and is whole blocks.
const _: () = assert!(
    GATHER_WRITE_BYTES_ONE_MAX <= backing_store::constants::GATHERED_WRITE_BYTES_MAX
        && (GATHER_WRITE_BYTES_ONE_MAX as u64).is_multiple_of(crate::constants::BLOCK_SIZE_BYTES)
);
// A hot wait is for a loopback or LAN round trip; beyond a millisecond parking is cheaper.
const _: () = assert!(ACK_SPIN_US_MAX > 0 && ACK_SPIN_US_MAX <= 1000);

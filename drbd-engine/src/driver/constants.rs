//! Limits of the tokio driver (the protocol's own limits are in `crate::constants`).

use crate::constants::FRAME_PAYLOAD_BYTES_MAX;
use crate::protocol::frame::HEADER_BYTES;

/// Application commands queued towards the state machine.
pub const COMMAND_QUEUE_MAX: usize = 1024;
/// Inputs (frames, completions, commands) handled before the outputs are carried out: one
/// round's transmits to a peer leave in one TCP write, so bigger rounds mean fewer system calls,
/// while a bound keeps the latency of the first input of a round low.
pub const INPUT_BATCH_MAX: usize = 64;
/// Frames up to this size are copied into the peer's per-round send buffer; larger ones go to
/// the socket on their own (copying a 1 MiB frame costs more than the system call it saves).
pub const COALESCE_FRAME_BYTES_MAX: usize = 64 * 1024;
/// Bytes a per-round send buffer holds before it is handed to the connection's writer.
pub const SEND_BATCH_BYTES_MAX: usize = 256 * 1024;
/// The connection reader's buffer: one read system call takes in every frame that has arrived,
/// up to this much; a single larger frame grows the buffer to the frame's size.
pub const RECEIVE_BUFFER_BYTES_MAX: usize = 256 * 1024;
/// A fence-peer handler that has not answered by then counts as failed (DRBD waits for its
/// handler indefinitely; a bound keeps a hung script from freezing I/O for ever).
pub const FENCE_HANDLER_TIMEOUT_MS_DEFAULT: u64 = 60_000;

const _: () = assert!(INPUT_BATCH_MAX > 0 && INPUT_BATCH_MAX <= COMMAND_QUEUE_MAX);
const _: () = assert!(COALESCE_FRAME_BYTES_MAX <= SEND_BATCH_BYTES_MAX);
const _: () = assert!(RECEIVE_BUFFER_BYTES_MAX >= HEADER_BYTES);
const _: () = assert!(COALESCE_FRAME_BYTES_MAX <= FRAME_PAYLOAD_BYTES_MAX + HEADER_BYTES);
/// Out-of-sync runs verify reported that `Status` keeps (the oldest go first).
pub const VERIFY_REPORT_RUNS_MAX: usize = 4096;

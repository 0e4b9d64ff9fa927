//! Every limit of the target, in one place, with compile-time checks on how they relate.
//!
//! Values the initiator negotiates are clamped to these; values the initiator sends beyond
//! them are refused (login failure, reject or check condition), never trusted.

/// Bytes of a Basic Header Segment (RFC 7143 §11.2.1).
pub const BHS_BYTES: usize = 48;
/// Largest additional header segment we accept: the field counts 4-byte words in one byte.
pub const AHS_BYTES_MAX: usize = 255 * 4;
/// Data segment we declare as our MaxRecvDataSegmentLength: the largest PDU payload we read.
pub const RECV_DATA_SEGMENT_BYTES_MAX: u32 = 256 * 1024;
/// Largest data segment we ever send, whatever the initiator declares.
pub const SEND_DATA_SEGMENT_BYTES_MAX: u32 = 256 * 1024;
/// Largest data segment accepted during login and text negotiation (RFC 7143: 8192 default).
pub const LOGIN_DATA_SEGMENT_BYTES_MAX: u32 = 8192;
/// Largest text accumulated over continued (C bit) login or text PDUs.
pub const TEXT_BYTES_MAX: usize = 64 * 1024;
/// MaxBurstLength we offer (RFC 7143 allows up to 2^24 - 1).
pub const BURST_BYTES_MAX: u32 = 16 * 1024 * 1024 - 512;
/// FirstBurstLength we offer.
pub const FIRST_BURST_BYTES_MAX: u32 = 256 * 1024;
/// Largest transfer of one SCSI command (ExpectedDataTransferLength), also reported in the
/// Block Limits VPD page as the maximum transfer length. libiscsi's conformance suite writes
/// 32 MiB in one command regardless of the reported limit.
pub const TRANSFER_BYTES_MAX: u32 = 32 * 1024 * 1024;
/// Alignment of the buffer a write's data is gathered in from several PDUs (one page): a
/// backing store can write it with O_DIRECT as it is (512 bytes would do on most disks).
pub const TRANSFER_BUFFER_ALIGNMENT_BYTES: usize = 4096;
/// Bytes of data transfers (ExpectedDataTransferLength summed over tasks) one connection may
/// have in flight: bounds the memory an initiator can make us hold. Commands beyond it get
/// TASK SET FULL and are retried by the initiator.
pub const CONNECTION_TRANSFER_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// R2Ts outstanding per task (MaxOutstandingR2T we offer).
pub const OUTSTANDING_R2T_MAX: u32 = 8;
/// Commands in flight per session: the CmdSN window.
pub const COMMANDS_MAX: u32 = 128;
/// Immediate commands (I bit) in flight beyond the window, such as NOP-Out and task management.
pub const IMMEDIATE_COMMANDS_MAX: u32 = 16;
/// Sessions per target process.
pub const SESSIONS_MAX: usize = 1024;
/// I_T nexuses of remote ports (sessions on other nodes whose commands run on this process's
/// logical units) remembered for unit attentions, over all targets.
pub const REMOTE_NEXUSES_MAX: usize = SESSIONS_MAX;
/// Connections per session (we do not support MC/S).
pub const CONNECTIONS_PER_SESSION_MAX: u32 = 1;
/// Login PDUs per login phase: a login that loops longer than this is dropped.
pub const LOGIN_PDUS_MAX: u32 = 32;
/// Logical units per target.
pub const LUNS_MAX: usize = 256;
/// Blocks one UNMAP or WRITE SAME may cover (Block Limits VPD).
pub const UNMAP_BLOCKS_MAX: u32 = 1 << 20;
/// UNMAP block descriptors per command.
pub const UNMAP_DESCRIPTORS_MAX: u32 = 256;
/// Blocks WRITE SAME may cover.
pub const WRITE_SAME_BLOCKS_MAX: u32 = 1 << 22;
/// Blocks COMPARE AND WRITE may cover.
pub const COMPARE_AND_WRITE_BLOCKS_MAX: u8 = 128;
/// Bytes one WRITE ATOMIC(16) may write on a device that keeps it whole across a crash without
/// help: the default of [`crate::device::BlockDevice::atomic_write_max_bytes`] and its
/// alignment, reported in the Block Limits VPD page as the maximum atomic transfer length and
/// (in blocks) as the atomic alignment.
///
/// Why one 4 KiB aligned block: the driver runs an atomic write under the device lock held
/// exclusively, so no other command through the target ever sees it half done, whatever its
/// length. A crash is another matter. A buffered `pwritev2` is copied into the page cache page
/// by page (a killed process can leave a prefix of pages written) and written back page by
/// page; a power loss can tear anything longer than what the disk itself writes atomically,
/// and a 4 KiB aligned page is the largest unit the file systems and disks here write as one.
/// Replication does not widen that: after a primary crash, resync makes the replicas equal,
/// copying whatever the survivor holds, and a survivor that crashed too holds a torn write of
/// its own. A device that journals its atomic writes (the standalone file device,
/// `backing_store::atomic_journal`, or the replicated LUN, whose every replica journals) claims more.
pub const PAGE_ATOMIC_WRITE_BYTES: u32 = 4096;
/// The most bytes one WRITE ATOMIC(16) may write on the standalone file device: what its
/// atomic-write journal keeps whole across a crash (its one slot has this size). 128 KiB is
/// 256 blocks of 512 bytes, the most libiscsi's conformance suite writes atomically there.
pub const FILE_ATOMIC_WRITE_BYTES_MAX: u32 = 128 * 1024;
/// The most bytes one WRITE ATOMIC(16) may write on any device; the SCSI layer clamps a
/// device's claim to it. 1 MiB is 256 blocks of 4 KiB, the replicated LUN's block size: the
/// conformance suite writes 1 to 256 blocks atomically whatever the block size.
pub const ATOMIC_WRITE_BYTES_MAX: u32 = 1024 * 1024;
/// Bytes EXTENDED COPY reads and writes per step: bounds the memory one copy holds.
pub const COPY_CHUNK_BYTES_MAX: u32 = 1024 * 1024;
/// CSCD (copy source/destination) descriptors per EXTENDED COPY parameter list.
pub const COPY_CSCD_DESCRIPTORS_MAX: u16 = 4;
/// Segment descriptors per EXTENDED COPY parameter list.
pub const COPY_SEGMENT_DESCRIPTORS_MAX: u16 = 16;
/// Bytes of the CSCD and segment descriptor lists together (OPERATING PARAMETERS' maximum
/// descriptor list length). It binds before both counts do together: one CSCD descriptor too
/// many fits with one segment and one segment too many with one CSCD (checked below).
pub const COPY_DESCRIPTOR_LIST_BYTES_MAX: u32 = 512;
/// Bytes one segment descriptor may copy (OPERATING PARAMETERS' maximum segment length).
pub const COPY_SEGMENT_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// Bytes one EXTENDED COPY moves at most: follows from the segment count and length limits
/// OPERATING PARAMETERS reports (it has no field of its own).
pub const COPY_BYTES_MAX: u64 = COPY_SEGMENT_DESCRIPTORS_MAX as u64 * COPY_SEGMENT_BYTES_MAX as u64;
/// Copy results held for RECEIVE COPY RESULTS per logical unit; the oldest are dropped.
pub const COPY_RESULTS_HELD_MAX: usize = 64;
/// Persistent-reservation registrations per logical unit.
pub const PR_REGISTRATIONS_MAX: usize = 256;
/// Pending unit attentions kept per I_T nexus.
pub const UNIT_ATTENTIONS_MAX: usize = 16;
/// Bytes of a CHAP challenge we send.
pub const CHAP_CHALLENGE_BYTES: usize = 32;
/// Largest CHAP challenge or response we accept from the initiator, in bytes.
pub const CHAP_VALUE_BYTES_MAX: usize = 1024;
/// Shortest CHAP challenge from the initiator we accept for mutual CHAP.
pub const CHAP_CHALLENGE_BYTES_MIN: usize = 16;
/// A connection silent this long gets a NOP-In ping; silent for another interval, it is closed.
/// A login that makes no progress for one interval is dropped.
pub const KEEPALIVE_INTERVAL_MS: u64 = 15_000;
/// PDUs queued for transmission per connection before the core stops reading input.
pub const TRANSMIT_PDUS_MAX: usize = 4096;
/// Bytes buffered for one socket write: writes are batched up to this.
pub const TRANSMIT_BATCH_BYTES_MAX: usize = 1024 * 1024;

const _: () = assert!(FIRST_BURST_BYTES_MAX <= BURST_BYTES_MAX);
const _: () = assert!(TRANSFER_BUFFER_ALIGNMENT_BYTES.is_power_of_two());
const _: () = assert!(TRANSFER_BYTES_MAX >= FIRST_BURST_BYTES_MAX);
const _: () = assert!(BURST_BYTES_MAX < (1 << 24));
const _: () = assert!(RECV_DATA_SEGMENT_BYTES_MAX < (1 << 24));
const _: () = assert!(LOGIN_DATA_SEGMENT_BYTES_MAX <= RECV_DATA_SEGMENT_BYTES_MAX);
const _: () = assert!(SEND_DATA_SEGMENT_BYTES_MAX >= 512);
const _: () = assert!(RECV_DATA_SEGMENT_BYTES_MAX >= 8192);
const _: () = assert!(COMMANDS_MAX >= 32 && COMMANDS_MAX < (1 << 30));
const _: () = assert!(OUTSTANDING_R2T_MAX >= 1);
const _: () = assert!(CONNECTION_TRANSFER_BYTES_MAX >= 4 * TRANSFER_BYTES_MAX as u64);
const _: () = assert!((TRANSMIT_BATCH_BYTES_MAX as u64) >= RECV_DATA_SEGMENT_BYTES_MAX as u64);
const _: () = assert!(CHAP_CHALLENGE_BYTES >= CHAP_CHALLENGE_BYTES_MIN);
const _: () = assert!(PAGE_ATOMIC_WRITE_BYTES >= 512 && PAGE_ATOMIC_WRITE_BYTES.is_power_of_two());
const _: () = assert!(PAGE_ATOMIC_WRITE_BYTES <= ATOMIC_WRITE_BYTES_MAX);
const _: () = assert!(ATOMIC_WRITE_BYTES_MAX.is_multiple_of(512));
const _: () = assert!(PAGE_ATOMIC_WRITE_BYTES <= FILE_ATOMIC_WRITE_BYTES_MAX);
const _: () = assert!(FILE_ATOMIC_WRITE_BYTES_MAX <= ATOMIC_WRITE_BYTES_MAX);
const _: () = assert!(FILE_ATOMIC_WRITE_BYTES_MAX.is_multiple_of(512));
const _: () = assert!(ATOMIC_WRITE_BYTES_MAX <= TRANSFER_BYTES_MAX);
const _: () = assert!(COPY_CHUNK_BYTES_MAX <= TRANSFER_BYTES_MAX);
const _: () = assert!(COPY_SEGMENT_BYTES_MAX >= COPY_CHUNK_BYTES_MAX);
// Descriptor sizes: 32-byte identification CSCD descriptors, 28-byte block-to-block segments.
// One descriptor too many of either kind still fits the list length, so it is reported as
// TOO MANY ... DESCRIPTORS rather than as a parameter list length error.
const _: () = assert!(
    COPY_DESCRIPTOR_LIST_BYTES_MAX >= (COPY_CSCD_DESCRIPTORS_MAX as u32 + 1) * 32 + 28
        && COPY_DESCRIPTOR_LIST_BYTES_MAX >= 32 + (COPY_SEGMENT_DESCRIPTORS_MAX as u32 + 1) * 28
);
const _: () = assert!(COPY_CSCD_DESCRIPTORS_MAX >= 2 && COPY_SEGMENT_DESCRIPTORS_MAX >= 1);

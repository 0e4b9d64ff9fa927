//! SCSI disk emulation (SPC-4 / SBC-3): CDBs and data-out in, block I/O requests and status,
//! sense and data-in out. Pure: the caller performs the [`IoOp`]s and feeds completions back.

pub mod copy;
pub mod pr;
pub mod pr_image;
pub mod sense;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::constants::{
    ATOMIC_WRITE_BYTES_MAX, COMPARE_AND_WRITE_BLOCKS_MAX, TRANSFER_BYTES_MAX, UNIT_ATTENTIONS_MAX,
    UNMAP_BLOCKS_MAX, UNMAP_DESCRIPTORS_MAX, WRITE_SAME_BLOCKS_MAX,
};
use crate::device::{
    AluaPortGroup, AluaState, DeviceError, IoData, IoOp, LOCAL_PORT_GROUP_ID, MappedRange,
    first_difference,
};
use pr::{Access, Nexus, ProutResult, ReservationState};
use sense::{Sense, codes, status};

/// The geometry and state of the device when a command starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub size_bytes: u64,
    pub block_size_bytes: u32,
    pub thin: bool,
    pub alua: AluaState,
    /// [`crate::device::BlockDevice::atomic_write_max_bytes`].
    pub atomic_write_max_bytes: u32,
    /// [`crate::device::BlockDevice::atomic_write_alignment_bytes`].
    pub atomic_write_alignment_bytes: u32,
}

impl DeviceInfo {
    pub fn blocks(&self) -> u64 {
        self.size_bytes / u64::from(self.block_size_bytes)
    }
}

/// Another logical unit of the target as a command that reaches it sees it: its geometry and
/// whether its reservations let this I_T nexus read and write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OtherLun {
    pub info: DeviceInfo,
    pub readable: bool,
    pub writable: bool,
}

/// Names that identify a logical unit in INQUIRY data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunIdentity {
    pub lun: u64,
    /// Unit serial number (VPD 0x80).
    pub serial: String,
    /// 64-bit NAA registered-extended identifier without the type nibble.
    pub naa_id: u64,
    pub target_name: String,
}

impl LunIdentity {
    /// The identity of LUN `lun` of target `target_name`: names derived from both with
    /// FNV-1a, stable across restarts and nodes without a registry. Any LUN's designators can
    /// be recomputed from its target and number (EXTENDED COPY resolves CSCDs that way).
    pub fn new(target_name: &str, lun: u64) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in target_name.bytes().chain(lun.to_be_bytes()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        Self {
            lun,
            serial: format!("{:016x}", hash),
            naa_id: hash,
            target_name: target_name.to_string(),
        }
    }
    /// The 16-byte NAA registered extended designator (NAA 6) of VPD page 83h.
    pub fn naa_designator(&self) -> [u8; 16] {
        let naa = (0x6u64 << 60) | (self.naa_id & 0x0fff_ffff_ffff_ffff);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&naa.to_be_bytes());
        d[8..].copy_from_slice(&self.naa_id.to_be_bytes());
        d
    }
}

/// State a logical unit shares between all sessions, behind one mutex.
#[derive(Debug, Default)]
pub struct LunShared {
    pub reservations: ReservationState,
    pub unit_attentions: HashMap<Nexus, VecDeque<Sense>>,
    pub write_cache_enabled: bool,
    pub descriptor_sense: bool,
    pub prevent_removal: HashSet<Nexus>,
    /// Results of finished EXTENDED COPY commands held for RECEIVE COPY RESULTS.
    pub copy_results: VecDeque<copy::CopyResult>,
    /// The ALUA state the last command saw: a change queues ASYMMETRIC ACCESS STATE CHANGED
    /// for every I_T nexus. `None` until the first command.
    pub alua_seen: Option<AluaState>,
    /// Version of the last reservation image handed to the device (`pr_image`): grows with
    /// every change, so the device keeps the newest when two PERSISTENT RESERVE OUTs race.
    pub reservations_version: u64,
    /// The device's load number whose reservation image this state was adopted from
    /// ([`crate::device::BlockDevice::persisted_reservations`]); `None` until adopted.
    pub reservations_epoch: Option<u64>,
    /// The capacity the last command saw: a change (an online resize) queues CAPACITY DATA
    /// HAS CHANGED for every I_T nexus. `None` until the first command.
    pub capacity_seen: Option<u64>,
}

impl LunShared {
    pub fn new() -> Self {
        Self { write_cache_enabled: true, ..Self::default() }
    }
    /// Queues a unit attention for `nexus`, dropping the oldest when the queue is full.
    pub fn queue_unit_attention(&mut self, nexus: &Nexus, sense: Sense) {
        let queue = self.unit_attentions.entry(nexus.clone()).or_default();
        if queue.len() >= UNIT_ATTENTIONS_MAX {
            queue.pop_front();
        }
        queue.push_back(sense);
    }
    /// Compares the ALUA state a command sees with the one the previous command saw; on a
    /// change (a promotion or demotion between commands) every I_T nexus in `nexuses` gets
    /// ASYMMETRIC ACCESS STATE CHANGED before its next command (SPC-4 §5.16.2.4). Pure: the
    /// caller passes the state in, no timer is involved.
    pub fn observe_alua(&mut self, state: AluaState, nexuses: &[Nexus]) {
        let previous = self.alua_seen.replace(state);
        if previous.is_some_and(|p| p != state) {
            for n in nexuses {
                self.queue_unit_attention(n, codes::ASYMMETRIC_ACCESS_STATE_CHANGED);
            }
        }
    }
    /// Takes over the reservations a device loaded (load number `epoch`, image `image`), once
    /// per load: after a failover the new primary's logical unit starts from the state the old
    /// one made durable. RESERVE(6) and unit attentions stay (they belong to this node's
    /// nexuses). An image that does not decode leaves no reservations (the device found none).
    pub fn adopt_reservations(&mut self, epoch: u64, image: &[u8]) {
        if self.reservations_epoch == Some(epoch) {
            return;
        }
        self.reservations_epoch = Some(epoch);
        let (version, state) = pr_image::decode(image).unwrap_or_default();
        let reserve6 = self.reservations.reserve6.take();
        self.reservations = ReservationState { reserve6, ..state };
        self.reservations_version = version;
    }

    /// As [`LunShared::observe_alua`] for the capacity: a size that changed between commands
    /// (an online grow) gives every I_T nexus CAPACITY DATA HAS CHANGED (SBC-3 §4.6), so an
    /// initiator re-reads READ CAPACITY.
    pub fn observe_capacity(&mut self, size_bytes: u64, nexuses: &[Nexus]) {
        let previous = self.capacity_seen.replace(size_bytes);
        if previous.is_some_and(|p| p != size_bytes) {
            for n in nexuses {
                self.queue_unit_attention(n, codes::CAPACITY_DATA_HAS_CHANGED);
            }
        }
    }
    /// Clears per-nexus state after a LUN reset and, as SAM-5 requires, tells every I_T
    /// nexus, the one that asked for the reset included.
    pub fn reset(&mut self, nexuses: &[Nexus]) {
        self.reservations.reserve6 = None;
        self.prevent_removal.clear();
        // SPC-4: a logical unit reset discards held copy results.
        self.copy_results.clear();
        for n in nexuses {
            self.queue_unit_attention(n, codes::BUS_DEVICE_RESET);
        }
    }
}

/// Everything a command may look at.
pub struct Context<'a> {
    pub identity: &'a LunIdentity,
    pub info: DeviceInfo,
    pub shared: &'a Mutex<LunShared>,
    pub nexus: &'a Nexus,
    /// LUNs of the target, for REPORT LUNS.
    pub luns: &'a [u64],
    /// Relative port identifiers of the portals, for REPORT TARGET PORT GROUPS (plus
    /// `port_offset`).
    pub ports: &'a [u16],
    /// Added to each of `ports`: the target numbers its ports apart from other nodes'.
    pub port_offset: u16,
    /// The logical unit's ports on other nodes (persistent reservations name them too).
    pub remote_ports: &'a [u16],
    /// Another LUN of the same target as this nexus may use it (EXTENDED COPY between LUNs).
    pub lun_info: &'a dyn Fn(u64) -> Option<OtherLun>,
    /// The logical unit's target port groups (REPORT TARGET PORT GROUPS, VPD page 83h).
    pub port_groups: &'a dyn Fn() -> Vec<AluaPortGroup>,
}

impl Context<'_> {
    /// This target's relative port identifiers.
    pub fn local_ports(&self) -> Vec<u16> {
        self.ports.iter().map(|p| p.saturating_add(self.port_offset)).collect()
    }
    /// Every port of the logical unit: this target's and the remote ones.
    pub fn all_ports(&self) -> Vec<u16> {
        let mut ports = self.local_ports();
        ports.extend_from_slice(self.remote_ports);
        ports
    }
}

/// The final result of a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub sense: Option<Sense>,
    pub data: Bytes,
}

impl Outcome {
    pub fn good() -> Self {
        Self { status: status::GOOD, sense: None, data: Bytes::new() }
    }
    pub fn data(data: impl Into<Bytes>) -> Self {
        Self { status: status::GOOD, sense: None, data: data.into() }
    }
    pub fn check(sense: Sense) -> Self {
        Self { status: status::CHECK_CONDITION, sense: Some(sense), data: Bytes::new() }
    }
    pub fn status(code: u8) -> Self {
        Self { status: code, sense: None, data: Bytes::new() }
    }
}

/// A command either finishes or needs one I/O and resumes with [`resume`].
#[derive(Debug)]
pub enum Step {
    Done(Outcome),
    /// An I/O on the command's own logical unit.
    Io(IoOp, Pending),
    /// An I/O on another logical unit of the same target, by LUN (EXTENDED COPY).
    IoAt(u64, IoOp, Pending),
}

/// What to do when the I/O of a [`Step::Io`] completes.
#[derive(Debug)]
pub enum Pending {
    ReadData,
    Written,
    Compared,
    Verify {
        compare: Bytes,
        repeat_block: bool,
        block_size_bytes: u32,
    },
    WriteChunks {
        offset_bytes: u64,
        remaining_bytes: u64,
        pattern: Bytes,
        fua: bool,
    },
    Unmap {
        ranges: Vec<(u64, u64)>,
    },
    LbaStatus {
        start_lba: u64,
        allocation_length: usize,
        block_size_bytes: u32,
    },
    /// EXTENDED COPY read a chunk, to be written at `relative_bytes` into the segment.
    CopyRead {
        job: Box<copy::CopyJob>,
        relative_bytes: u64,
    },
    /// A PERSISTENT RESERVE OUT's new state is durable: GOOD.
    ReservationsPersisted,
    /// EXTENDED COPY wrote a chunk of `written_bytes`.
    CopyWritten {
        job: Box<copy::CopyJob>,
        written_bytes: u64,
    },
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Truncates response data to the allocation length.
fn truncated(mut data: Vec<u8>, allocation_length: usize) -> Outcome {
    data.truncate(allocation_length);
    Outcome::data(data)
}

fn device_error_sense(error: &DeviceError, writing: bool) -> Sense {
    match error {
        DeviceError::OutOfRange => codes::LBA_OUT_OF_RANGE,
        DeviceError::NoSpace => codes::SPACE_ALLOCATION_FAILED,
        DeviceError::Standby => codes::ALUA_STANDBY,
        DeviceError::Io(_) if writing => codes::WRITE_ERROR,
        DeviceError::Io(_) => codes::UNRECOVERED_READ_ERROR,
    }
}

/// Operation codes.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9c;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
}

/// (opcode, service action, CDB length) of every command we implement, for REPORT SUPPORTED
/// OPERATION CODES and for the CDB length check.
const SUPPORTED: &[(u8, Option<u16>, usize)] = &[
    (op::TEST_UNIT_READY, None, 6),
    (op::REQUEST_SENSE, None, 6),
    (op::READ_6, None, 6),
    (op::WRITE_6, None, 6),
    (op::INQUIRY, None, 6),
    (op::MODE_SELECT_6, None, 6),
    (op::RESERVE_6, None, 6),
    (op::RELEASE_6, None, 6),
    (op::MODE_SENSE_6, None, 6),
    (op::START_STOP_UNIT, None, 6),
    (op::PREVENT_ALLOW, None, 6),
    (op::READ_CAPACITY_10, None, 10),
    (op::READ_10, None, 10),
    (op::WRITE_10, None, 10),
    (op::WRITE_AND_VERIFY_10, None, 10),
    (op::VERIFY_10, None, 10),
    (op::PRE_FETCH_10, None, 10),
    (op::SYNCHRONIZE_CACHE_10, None, 10),
    (op::READ_DEFECT_DATA_10, None, 10),
    (op::WRITE_SAME_10, None, 10),
    (op::UNMAP, None, 10),
    (op::MODE_SELECT_10, None, 10),
    (op::MODE_SENSE_10, None, 10),
    (op::PERSISTENT_RESERVE_IN, Some(0), 10),
    (op::PERSISTENT_RESERVE_IN, Some(1), 10),
    (op::PERSISTENT_RESERVE_IN, Some(2), 10),
    (op::PERSISTENT_RESERVE_IN, Some(3), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(1), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(2), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(3), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(4), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(5), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(6), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(7), 10),
    (op::EXTENDED_COPY, Some(0x00), 16),
    (op::RECEIVE_COPY_RESULTS, Some(0x00), 16),
    (op::RECEIVE_COPY_RESULTS, Some(0x03), 16),
    (op::READ_16, None, 16),
    (op::COMPARE_AND_WRITE, None, 16),
    (op::WRITE_16, None, 16),
    (op::ORWRITE_16, None, 16),
    (op::WRITE_AND_VERIFY_16, None, 16),
    (op::VERIFY_16, None, 16),
    (op::PRE_FETCH_16, None, 16),
    (op::SYNCHRONIZE_CACHE_16, None, 16),
    (op::WRITE_SAME_16, None, 16),
    (op::WRITE_ATOMIC_16, None, 16),
    (op::SERVICE_ACTION_IN_16, Some(0x10), 16),
    (op::SERVICE_ACTION_IN_16, Some(0x12), 16),
    (op::REPORT_LUNS, None, 12),
    (op::MAINTENANCE_IN, Some(0x0a), 12),
    (op::MAINTENANCE_IN, Some(0x0c), 12),
    (op::READ_12, None, 12),
    (op::WRITE_12, None, 12),
    (op::WRITE_AND_VERIFY_12, None, 12),
    (op::VERIFY_12, None, 12),
    (op::READ_DEFECT_DATA_12, None, 12),
];

/// The CDB usage bitmap for REPORT SUPPORTED OPERATION CODES: which bits of each byte the
/// device server looks at.
fn cdb_usage(opcode: u8, service_action: Option<u16>, length: usize) -> Vec<u8> {
    let mut usage = vec![0xffu8; length];
    usage[0] = opcode;
    // The CONTROL byte: only NACA/LINK style bits are meaningful; we report 0x07 like most.
    usage[length - 1] = 0x07;
    match opcode {
        op::READ_10 | op::WRITE_10 | op::WRITE_AND_VERIFY_10 | op::VERIFY_10 => {
            usage[1] = 0xfe;
            usage[6] = 0x1f;
        }
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 | op::VERIFY_12 => {
            usage[1] = 0xfe;
            usage[10] = 0x1f;
        }
        op::READ_16 | op::WRITE_16 | op::WRITE_AND_VERIFY_16 | op::VERIFY_16 => {
            usage[1] = 0xfe;
            usage[14] = 0x1f;
        }
        op::WRITE_ATOMIC_16 => {
            // WRPROTECT, DPO, FUA; GROUP NUMBER.
            usage[1] = 0xf8;
            usage[14] = 0x3f;
        }
        _ => {}
    }
    if let Some(sa) = service_action {
        if matches!(
            opcode,
            op::SERVICE_ACTION_IN_16
                | op::MAINTENANCE_IN
                | op::EXTENDED_COPY
                | op::RECEIVE_COPY_RESULTS
        ) {
            usage[1] = 0x1f;
        } else {
            usage[1] = u8::try_from(sa & 0x1f).unwrap_or(0) | 0x1f;
        }
    }
    usage
}

fn cdb_length(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// Access class for reservation checks.
fn access_of(opcode: u8) -> Access {
    match opcode {
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::SERVICE_ACTION_IN_16
        | op::READ_DEFECT_DATA_10
        | op::READ_DEFECT_DATA_12
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::RECEIVE_COPY_RESULTS => Access::Read,
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_AND_VERIFY_10
        | op::WRITE_AND_VERIFY_12
        | op::WRITE_AND_VERIFY_16
        | op::WRITE_SAME_10
        | op::WRITE_SAME_16
        | op::UNMAP
        | op::COMPARE_AND_WRITE
        | op::ORWRITE_16
        | op::WRITE_ATOMIC_16
        | op::EXTENDED_COPY
        | op::SYNCHRONIZE_CACHE_10
        | op::SYNCHRONIZE_CACHE_16
        | op::MODE_SELECT_6
        | op::MODE_SELECT_10
        | op::START_STOP_UNIT
        | op::RESERVE_6 => Access::Write,
        _ => Access::Free,
    }
}

/// Data-in or data-out bytes the CDB itself asks for (the SCSI transfer length), used for
/// iSCSI residuals. `None` for commands whose length is an allocation length.
pub fn transfer_bytes(cdb: &[u8], block_size_bytes: u32) -> Option<u64> {
    let blocks = |n: u64| Some(n * u64::from(block_size_bytes));
    match cdb[0] {
        op::READ_6 | op::WRITE_6 => blocks(if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) }),
        op::READ_10 | op::WRITE_10 | op::WRITE_AND_VERIFY_10 => blocks(u64::from(be16(&cdb[7..]))),
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 => blocks(u64::from(be32(&cdb[6..]))),
        op::READ_16 | op::WRITE_16 | op::WRITE_AND_VERIFY_16 | op::ORWRITE_16 => {
            blocks(u64::from(be32(&cdb[10..])))
        }
        op::COMPARE_AND_WRITE => blocks(u64::from(cdb[13]) * 2),
        op::WRITE_ATOMIC_16 => blocks(u64::from(be16(&cdb[12..]))),
        _ => None,
    }
}

/// Starts a command. `data_out` holds every byte the initiator sent for it.
pub fn execute(ctx: &Context<'_>, cdb: &[u8; 16], data_out: Bytes) -> Step {
    let opcode = cdb[0];
    // Fast path first: the common I/O commands skip the table lookups below.
    let mut shared = match ctx.shared.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let always = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE);
    if !always
        && let Some(queue) = shared.unit_attentions.get_mut(ctx.nexus)
        && let Some(ua) = queue.pop_front()
    {
        return Step::Done(Outcome::check(ua));
    }
    if !shared.reservations.allows(ctx.nexus, access_of(opcode)) {
        return Step::Done(Outcome::status(status::RESERVATION_CONFLICT));
    }
    let standby = ctx.info.alua == AluaState::Standby;
    if standby
        && !matches!(
            opcode,
            op::INQUIRY
                | op::REPORT_LUNS
                | op::REQUEST_SENSE
                | op::MAINTENANCE_IN
                | op::TEST_UNIT_READY
                | op::PERSISTENT_RESERVE_IN
                | op::PERSISTENT_RESERVE_OUT
                | op::READ_CAPACITY_10
                | op::SERVICE_ACTION_IN_16
                | op::MODE_SENSE_6
                | op::MODE_SENSE_10
        )
    {
        return Step::Done(Outcome::check(codes::ALUA_STANDBY));
    }
    // Control byte: NACA and LINK are not supported.
    let control = cdb[cdb_length(opcode) - 1];
    if control & 0x05 != 0 && !matches!(opcode, 0xc0..=0xff) {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(
            u16::try_from(cdb_length(opcode) - 1).unwrap_or(0),
        )));
    }
    match opcode {
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => {
            drop(shared);
            read(ctx, cdb)
        }
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_AND_VERIFY_10
        | op::WRITE_AND_VERIFY_12
        | op::WRITE_AND_VERIFY_16 => {
            let write_back = shared.write_cache_enabled;
            drop(shared);
            write(ctx, cdb, data_out, write_back)
        }
        op::TEST_UNIT_READY => Step::Done(Outcome::good()),
        op::INQUIRY => Step::Done(inquiry(ctx, cdb)),
        op::REQUEST_SENSE => {
            let descriptor = cdb[1] & 1 != 0;
            let sense = shared
                .unit_attentions
                .get_mut(ctx.nexus)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Sense::new(sense::key::NO_SENSE, 0, 0));
            Step::Done(truncated(sense.encode(descriptor), usize::from(cdb[4])))
        }
        op::REPORT_LUNS => Step::Done(report_luns(ctx, cdb)),
        op::READ_CAPACITY_10 => Step::Done(read_capacity_10(ctx, cdb)),
        op::SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
            0x10 => Step::Done(read_capacity_16(ctx, cdb)),
            0x12 => get_lba_status(ctx, cdb),
            _ => Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1))),
        },
        op::MAINTENANCE_IN => match cdb[1] & 0x1f {
            0x0a => Step::Done(report_target_port_groups(ctx, cdb)),
            0x0c => Step::Done(report_supported_opcodes(cdb)),
            _ => Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1))),
        },
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => Step::Done(mode_sense(ctx, cdb, &shared)),
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            Step::Done(mode_select(cdb, &data_out, &mut shared))
        }
        op::START_STOP_UNIT => {
            // Loading/ejecting a prevented medium is refused; power conditions are ignored.
            if cdb[4] & 0x02 != 0 && cdb[4] & 0x01 == 0 && !shared.prevent_removal.is_empty() {
                return Step::Done(Outcome::check(codes::MEDIUM_REMOVAL_PREVENTED));
            }
            Step::Done(Outcome::good())
        }
        op::PREVENT_ALLOW => {
            if cdb[4] & 0x01 != 0 {
                shared.prevent_removal.insert(ctx.nexus.clone());
            } else {
                shared.prevent_removal.remove(ctx.nexus);
            }
            Step::Done(Outcome::good())
        }
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = if opcode == op::SYNCHRONIZE_CACHE_10 {
                (u64::from(be32(&cdb[2..])), u64::from(be16(&cdb[7..])))
            } else {
                (be64(&cdb[2..]), u64::from(be32(&cdb[10..])))
            };
            if let Some(sense) = check_range(ctx, lba, blocks) {
                return Step::Done(Outcome::check(sense));
            }
            Step::Io(IoOp::Flush, Pending::Written)
        }
        op::PRE_FETCH_10 | op::PRE_FETCH_16 => {
            let (lba, blocks) = if opcode == op::PRE_FETCH_10 {
                (u64::from(be32(&cdb[2..])), u64::from(be16(&cdb[7..])))
            } else {
                (be64(&cdb[2..]), u64::from(be32(&cdb[10..])))
            };
            if let Some(sense) = check_range(ctx, lba, blocks) {
                return Step::Done(Outcome::check(sense));
            }
            Step::Done(Outcome::status(status::CONDITION_MET))
        }
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => verify(ctx, cdb, data_out),
        op::COMPARE_AND_WRITE => compare_and_write(ctx, cdb, data_out),
        op::WRITE_ATOMIC_16 => {
            let write_back = shared.write_cache_enabled;
            drop(shared);
            write_atomic(ctx, cdb, data_out, write_back)
        }
        op::EXTENDED_COPY => {
            let write_back = shared.write_cache_enabled;
            drop(shared);
            copy::extended_copy(ctx, cdb, &data_out, write_back)
        }
        op::RECEIVE_COPY_RESULTS => Step::Done(copy::receive_copy_results(ctx, cdb, &mut shared)),
        op::ORWRITE_16 => or_write(ctx, cdb, data_out),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => write_same(ctx, cdb, data_out),
        op::UNMAP => unmap(ctx, cdb, &data_out),
        op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => Step::Done(read_defect_data(cdb)),
        op::RESERVE_6 => {
            if shared.reservations.reserve6(ctx.nexus) {
                Step::Done(Outcome::good())
            } else {
                Step::Done(Outcome::status(status::RESERVATION_CONFLICT))
            }
        }
        op::RELEASE_6 => {
            shared.reservations.release6(ctx.nexus);
            Step::Done(Outcome::good())
        }
        op::PERSISTENT_RESERVE_IN => Step::Done(persistent_reserve_in(cdb, &shared)),
        op::PERSISTENT_RESERVE_OUT => {
            let before = shared.reservations.clone();
            let outcome = persistent_reserve_out(ctx, cdb, &data_out, &mut shared);
            persist_if_changed(outcome, &before, &mut shared)
        }
        _ => Step::Done(Outcome::check(codes::INVALID_COMMAND_OPERATION_CODE)),
    }
}

/// Continues a command after its I/O completed.
pub fn resume(ctx: &Context<'_>, pending: Pending, result: Result<IoData, DeviceError>) -> Step {
    // A copy turns device errors into COPY ABORTED and records its results itself.
    let pending = match pending {
        Pending::CopyRead { job, relative_bytes } => {
            return copy::resume_read(ctx, job, relative_bytes, result);
        }
        Pending::CopyWritten { job, written_bytes } => {
            return copy::resume_written(ctx, job, written_bytes, result);
        }
        other => other,
    };
    let writing =
        !matches!(pending, Pending::ReadData | Pending::Verify { .. } | Pending::LbaStatus { .. });
    let data = match result {
        Ok(data) => data,
        Err(error) => return Step::Done(Outcome::check(device_error_sense(&error, writing))),
    };
    match pending {
        Pending::ReadData => match data {
            IoData::Read(bytes) => Step::Done(Outcome::data(bytes)),
            _ => Step::Done(Outcome::check(codes::INTERNAL_TARGET_FAILURE)),
        },
        Pending::Written | Pending::ReservationsPersisted => Step::Done(Outcome::good()),
        Pending::Compared => match data {
            IoData::Miscompare(at) => Step::Done(Outcome::check(
                Sense::new(sense::key::MISCOMPARE, 0x1d, 0x00).with_information(at),
            )),
            _ => Step::Done(Outcome::good()),
        },
        Pending::Verify { compare, repeat_block, block_size_bytes } => {
            let IoData::Read(current) = data else {
                return Step::Done(Outcome::check(codes::INTERNAL_TARGET_FAILURE));
            };
            let mismatch = if repeat_block {
                let block = usize::try_from(block_size_bytes).unwrap_or(512);
                current.chunks(block).enumerate().find_map(|(i, chunk)| {
                    first_difference(chunk, &compare[..block.min(compare.len())])
                        .map(|at| i * block + at)
                })
            } else {
                first_difference(&current, &compare)
            };
            match mismatch {
                Some(at) => Step::Done(Outcome::check(
                    codes::MISCOMPARE_DURING_VERIFY.with_information(at as u64),
                )),
                None => Step::Done(Outcome::good()),
            }
        }
        Pending::WriteChunks { offset_bytes, remaining_bytes, pattern, fua } => {
            write_chunks(offset_bytes, remaining_bytes, pattern, fua)
        }
        Pending::Unmap { mut ranges } => match ranges.pop() {
            Some((offset_bytes, length_bytes)) => {
                Step::Io(IoOp::Unmap { offset_bytes, length_bytes }, Pending::Unmap { ranges })
            }
            None => Step::Done(Outcome::good()),
        },
        Pending::CopyRead { .. } | Pending::CopyWritten { .. } => {
            Step::Done(Outcome::check(codes::INTERNAL_TARGET_FAILURE))
        }
        Pending::LbaStatus { start_lba, allocation_length, block_size_bytes } => {
            let IoData::Ranges(ranges) = data else {
                return Step::Done(Outcome::check(codes::INTERNAL_TARGET_FAILURE));
            };
            Step::Done(lba_status_data(
                ctx,
                start_lba,
                allocation_length,
                block_size_bytes,
                &ranges,
            ))
        }
    }
}

fn check_range(ctx: &Context<'_>, lba: u64, blocks: u64) -> Option<Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= ctx.info.blocks() && lba <= ctx.info.blocks() => None,
        _ => Some(codes::LBA_OUT_OF_RANGE),
    }
}

/// Decodes LBA, block count and flags byte of READ/WRITE/VERIFY CDBs.
fn lba_and_blocks(cdb: &[u8]) -> (u64, u64) {
    match cdb[0] {
        op::READ_6 | op::WRITE_6 => {
            let lba = (u64::from(cdb[1] & 0x1f) << 16) | u64::from(be16(&cdb[2..]));
            let blocks = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, blocks)
        }
        op::READ_10 | op::WRITE_10 | op::WRITE_AND_VERIFY_10 | op::VERIFY_10 => {
            (u64::from(be32(&cdb[2..])), u64::from(be16(&cdb[7..])))
        }
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 | op::VERIFY_12 => {
            (u64::from(be32(&cdb[2..])), u64::from(be32(&cdb[6..])))
        }
        _ => (be64(&cdb[2..]), u64::from(be32(&cdb[10..]))),
    }
}

fn read(ctx: &Context<'_>, cdb: &[u8; 16]) -> Step {
    let (lba, blocks) = lba_and_blocks(cdb);
    if cdb[0] != op::READ_6 && cdb[1] & 0xe0 != 0 {
        // RDPROTECT without protection information formatted.
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if let Some(sense) = check_range(ctx, lba, blocks) {
        return Step::Done(Outcome::check(sense));
    }
    if blocks == 0 {
        return Step::Done(Outcome::good());
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let length = blocks * block_size;
    let Ok(length_bytes) = u32::try_from(length) else {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(7)));
    };
    if length_bytes > TRANSFER_BYTES_MAX {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(7)));
    }
    Step::Io(IoOp::Read { offset_bytes: lba * block_size, length_bytes }, Pending::ReadData)
}

fn write(ctx: &Context<'_>, cdb: &[u8; 16], data_out: Bytes, write_back: bool) -> Step {
    let (lba, blocks) = lba_and_blocks(cdb);
    if cdb[0] != op::WRITE_6 && cdb[1] & 0xe0 != 0 {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if let Some(sense) = check_range(ctx, lba, blocks) {
        return Step::Done(Outcome::check(sense));
    }
    if blocks == 0 {
        return Step::Done(Outcome::good());
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let mut data_out = data_out;
    let mut length = blocks * block_size;
    if (data_out.len() as u64) < length {
        // iSCSI EDTL below the CDB's transfer length: write only the whole blocks that came
        // (FCP-4's rule, which libiscsi checks), and the residual tells the initiator.
        length = data_out.len() as u64 / block_size * block_size;
        data_out.truncate(usize::try_from(length).unwrap_or(0));
        if length == 0 {
            return Step::Done(Outcome::good());
        }
    }
    let verify = matches!(
        cdb[0],
        op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16
    );
    let fua = cdb[0] != op::WRITE_6 && cdb[1] & 0x08 != 0;
    // Without a write-back cache every write is written through; WRITE AND VERIFY must be
    // on the medium before it can be verified.
    let fua = fua || verify || !write_back;
    Step::Io(IoOp::Write { offset_bytes: lba * block_size, data: data_out, fua }, Pending::Written)
}

fn verify(ctx: &Context<'_>, cdb: &[u8; 16], data_out: Bytes) -> Step {
    let (lba, blocks) = lba_and_blocks(cdb);
    if cdb[1] & 0xe0 != 0 {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    let bytchk = (cdb[1] >> 1) & 3;
    if bytchk == 2 {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if let Some(sense) = check_range(ctx, lba, blocks) {
        return Step::Done(Outcome::check(sense));
    }
    if blocks == 0 || bytchk == 0 {
        return Step::Done(Outcome::good());
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let expected = if bytchk == 3 { block_size } else { blocks * block_size };
    if data_out.len() as u64 != expected {
        return Step::Done(Outcome::check(Sense::new(sense::key::ILLEGAL_REQUEST, 0x0e, 0x03)));
    }
    let Ok(length_bytes) = u32::try_from(blocks * block_size) else {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(7)));
    };
    if length_bytes > TRANSFER_BYTES_MAX {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(7)));
    }
    Step::Io(
        IoOp::Read { offset_bytes: lba * block_size, length_bytes },
        Pending::Verify {
            compare: data_out,
            repeat_block: bytchk == 3,
            block_size_bytes: ctx.info.block_size_bytes,
        },
    )
}

fn compare_and_write(ctx: &Context<'_>, cdb: &[u8; 16], data_out: Bytes) -> Step {
    let lba = be64(&cdb[2..]);
    let blocks = u64::from(cdb[13]);
    if cdb[1] & 0xe0 != 0 {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if blocks > u64::from(COMPARE_AND_WRITE_BLOCKS_MAX) {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(13)));
    }
    if blocks == 0 && !data_out.is_empty() {
        // A count that wrapped (256 blocks in one byte) comes with data it cannot describe.
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(13)));
    }
    if let Some(sense) = check_range(ctx, lba, blocks) {
        return Step::Done(Outcome::check(sense));
    }
    if blocks == 0 {
        return Step::Done(Outcome::good());
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let length = blocks * block_size;
    if data_out.len() as u64 != 2 * length {
        return Step::Done(Outcome::check(Sense::new(sense::key::ILLEGAL_REQUEST, 0x0e, 0x03)));
    }
    let half = usize::try_from(length).unwrap_or(0);
    let compare = data_out.slice(..half);
    let write = data_out.slice(half..);
    Step::Io(
        IoOp::CompareAndWrite {
            offset_bytes: lba * block_size,
            compare,
            data: write,
            fua: cdb[1] & 0x08 != 0,
        },
        Pending::Compared,
    )
}

/// ORWRITE(16) (SBC-4): reads the blocks, ORs the data-out into them and writes them back.
fn or_write(ctx: &Context<'_>, cdb: &[u8; 16], data_out: Bytes) -> Step {
    let lba = be64(&cdb[2..]);
    let blocks = u64::from(be32(&cdb[10..]));
    if cdb[1] & 0xe0 != 0 {
        // ORPROTECT without protection information.
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if let Some(sense) = check_range(ctx, lba, blocks) {
        return Step::Done(Outcome::check(sense));
    }
    if blocks == 0 {
        return Step::Done(Outcome::good());
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let length = blocks * block_size;
    if data_out.len() as u64 != length {
        return Step::Done(Outcome::check(Sense::new(sense::key::ILLEGAL_REQUEST, 0x0e, 0x03)));
    }
    let Ok(length_bytes) = u32::try_from(length) else {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(10)));
    };
    if length_bytes > TRANSFER_BYTES_MAX {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(10)));
    }
    Step::Io(
        IoOp::OrWrite { offset_bytes: lba * block_size, mask: data_out, fua: cdb[1] & 0x08 != 0 },
        Pending::Written,
    )
}

/// WRITE ATOMIC(16) (SBC-4): a write within the device's atomic limits ([`atomic_limits_blocks`]),
/// run exclusively on the device (see [`IoOp::AtomicWrite`]).
fn write_atomic(ctx: &Context<'_>, cdb: &[u8; 16], data_out: Bytes, write_back: bool) -> Step {
    let lba = be64(&cdb[2..]);
    let atomic_boundary = be16(&cdb[10..]);
    let blocks = u64::from(be16(&cdb[12..]));
    if cdb[1] & 0xe0 != 0 {
        // WRPROTECT without protection information.
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    // Range first: a write beyond the end is LBA OUT OF RANGE whatever its length.
    if let Some(sense) = check_range(ctx, lba, blocks) {
        return Step::Done(Outcome::check(sense));
    }
    if atomic_boundary != 0 {
        // MAXIMUM ATOMIC BOUNDARY SIZE is zero: one atomic operation per command only.
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(10)));
    }
    if blocks == 0 {
        return Step::Done(Outcome::good());
    }
    let (max_blocks, alignment_blocks) = atomic_limits_blocks(&ctx.info);
    if blocks > u64::from(max_blocks) {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(12)));
    }
    if !lba.is_multiple_of(u64::from(alignment_blocks)) {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(2)));
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let length = blocks * block_size;
    if data_out.len() as u64 != length {
        // Unlike WRITE, a short Data-Out cannot be honoured partially: all or nothing.
        return Step::Done(Outcome::check(Sense::new(sense::key::ILLEGAL_REQUEST, 0x0e, 0x03)));
    }
    let fua = cdb[1] & 0x08 != 0 || !write_back;
    Step::Io(
        IoOp::AtomicWrite { offset_bytes: lba * block_size, data: data_out, fua },
        Pending::Written,
    )
}

/// (MAXIMUM ATOMIC TRANSFER LENGTH, ATOMIC ALIGNMENT) in logical blocks: what the device
/// claims, clamped to [`ATOMIC_WRITE_BYTES_MAX`], and at least one logical block each (a
/// device cannot tear less than one block as the initiator sees it).
pub fn atomic_limits_blocks(info: &DeviceInfo) -> (u32, u32) {
    let block = info.block_size_bytes.max(1);
    let max_blocks = (info.atomic_write_max_bytes.min(ATOMIC_WRITE_BYTES_MAX) / block).max(1);
    let alignment_blocks = (info.atomic_write_alignment_bytes / block).clamp(1, max_blocks);
    (max_blocks, alignment_blocks)
}

/// Bytes written per WRITE SAME chunk: big enough to be efficient, small enough to bound memory.
const WRITE_SAME_CHUNK_BYTES: u64 = 1024 * 1024;

fn write_chunks(offset_bytes: u64, remaining_bytes: u64, pattern: Bytes, fua: bool) -> Step {
    if remaining_bytes == 0 {
        return Step::Done(Outcome::good());
    }
    let block = pattern.len() as u64;
    let chunk = remaining_bytes.min((WRITE_SAME_CHUNK_BYTES / block).max(1) * block);
    let mut buffer = BytesMut::with_capacity(usize::try_from(chunk).unwrap_or(0));
    while (buffer.len() as u64) < chunk {
        buffer.extend_from_slice(&pattern);
    }
    Step::Io(
        IoOp::Write { offset_bytes, data: buffer.freeze(), fua },
        Pending::WriteChunks {
            offset_bytes: offset_bytes + chunk,
            remaining_bytes: remaining_bytes - chunk,
            pattern,
            fua,
        },
    )
}

fn write_same(ctx: &Context<'_>, cdb: &[u8; 16], data_out: Bytes) -> Step {
    let sixteen = cdb[0] == op::WRITE_SAME_16;
    let (lba, mut blocks) = if sixteen {
        (be64(&cdb[2..]), u64::from(be32(&cdb[10..])))
    } else {
        (u64::from(be32(&cdb[2..])), u64::from(be16(&cdb[7..])))
    };
    if blocks == 0 && lba <= ctx.info.blocks() {
        // WSNZ is clear: a zero count means "up to the last block".
        blocks = ctx.info.blocks() - lba;
    }
    let flags = cdb[1];
    let unmap = flags & 0x08 != 0;
    let anchor = flags & 0x10 != 0;
    let ndob = sixteen && flags & 0x01 != 0;
    if flags & 0xe0 != 0 {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if anchor {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if unmap && !ctx.info.thin {
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if let Some(sense) = check_range(ctx, lba, blocks) {
        return Step::Done(Outcome::check(sense));
    }
    if blocks > u64::from(WRITE_SAME_BLOCKS_MAX) {
        let byte = if sixteen { 10 } else { 7 };
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(byte)));
    }
    if blocks == 0 {
        return Step::Done(Outcome::good());
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let pattern = if ndob {
        Bytes::from(vec![0u8; usize::try_from(block_size).unwrap_or(512)])
    } else {
        if data_out.len() as u64 != block_size {
            return Step::Done(Outcome::check(Sense::new(sense::key::ILLEGAL_REQUEST, 0x0e, 0x03)));
        }
        data_out
    };
    let offset_bytes = lba * block_size;
    let length_bytes = blocks * block_size;
    let zero = pattern.iter().all(|&b| b == 0);
    // With UNMAP set the blocks are deallocated whatever the data says (as Linux LIO does and
    // libiscsi expects); LBPRZ then makes them read as zeroes.
    if unmap {
        return Step::Io(IoOp::Unmap { offset_bytes, length_bytes }, Pending::Written);
    }
    if zero {
        return Step::Io(IoOp::WriteZeroes { offset_bytes, length_bytes }, Pending::Written);
    }
    write_chunks(offset_bytes, length_bytes, pattern, false)
}

fn unmap(ctx: &Context<'_>, cdb: &[u8; 16], data: &[u8]) -> Step {
    if cdb[1] & 0x01 != 0 {
        // ANCHOR is not supported.
        return Step::Done(Outcome::check(Sense::invalid_field_in_cdb(1)));
    }
    if !ctx.info.thin {
        return Step::Done(Outcome::check(codes::INVALID_COMMAND_OPERATION_CODE));
    }
    let parameter_length = usize::from(be16(&cdb[7..]));
    if parameter_length == 0 {
        return Step::Done(Outcome::good());
    }
    if parameter_length < 8 || data.len() < 8 {
        return Step::Done(Outcome::check(codes::PARAMETER_LIST_LENGTH_ERROR));
    }
    let data = &data[..parameter_length.min(data.len())];
    let descriptor_bytes = usize::from(be16(&data[2..]));
    let available = data.len() - 8;
    let descriptor_bytes = descriptor_bytes.min(available) / 16 * 16;
    if descriptor_bytes / 16 > usize::try_from(UNMAP_DESCRIPTORS_MAX).unwrap_or(0) {
        return Step::Done(Outcome::check(Sense::invalid_field_in_parameter_list(2)));
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let mut ranges = Vec::new();
    for descriptor in data[8..8 + descriptor_bytes].chunks(16) {
        let lba = be64(descriptor);
        let blocks = u64::from(be32(&descriptor[8..]));
        if let Some(sense) = check_range(ctx, lba, blocks) {
            return Step::Done(Outcome::check(sense));
        }
        if blocks > u64::from(UNMAP_BLOCKS_MAX) {
            return Step::Done(Outcome::check(Sense::invalid_field_in_parameter_list(16)));
        }
        if blocks > 0 {
            ranges.push((lba * block_size, blocks * block_size));
        }
    }
    match ranges.pop() {
        Some((offset_bytes, length_bytes)) => {
            Step::Io(IoOp::Unmap { offset_bytes, length_bytes }, Pending::Unmap { ranges })
        }
        None => Step::Done(Outcome::good()),
    }
}

fn get_lba_status(ctx: &Context<'_>, cdb: &[u8; 16]) -> Step {
    let lba = be64(&cdb[2..]);
    let allocation_length = usize::try_from(be32(&cdb[10..])).unwrap_or(0);
    if lba >= ctx.info.blocks() {
        return Step::Done(Outcome::check(codes::LBA_OUT_OF_RANGE));
    }
    if allocation_length == 0 {
        return Step::Done(Outcome::good());
    }
    let block_size = u64::from(ctx.info.block_size_bytes);
    let offset_bytes = lba * block_size;
    Step::Io(
        IoOp::MappedRanges { offset_bytes, length_bytes: ctx.info.size_bytes - offset_bytes },
        Pending::LbaStatus {
            start_lba: lba,
            allocation_length,
            block_size_bytes: ctx.info.block_size_bytes,
        },
    )
}

fn lba_status_data(
    ctx: &Context<'_>,
    start_lba: u64,
    allocation_length: usize,
    block_size_bytes: u32,
    ranges: &[MappedRange],
) -> Outcome {
    let block = u64::from(block_size_bytes);
    let mut out = vec![0u8; 8];
    let mut next = start_lba;
    let descriptors_max = allocation_length.saturating_sub(8) / 16;
    for range in ranges {
        if out.len() / 16 >= descriptors_max.max(1) {
            break;
        }
        let first = range.offset_bytes / block;
        let end = (range.offset_bytes + range.length_bytes).div_ceil(block).min(ctx.info.blocks());
        if end <= next {
            continue;
        }
        let first = first.max(next);
        let count = u32::try_from((end - first).min(u64::from(u32::MAX))).unwrap_or(u32::MAX);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&first.to_be_bytes());
        d[8..12].copy_from_slice(&count.to_be_bytes());
        d[12] = if range.mapped { 0 } else { 1 };
        out.extend_from_slice(&d);
        next = first + u64::from(count);
    }
    if out.len() == 8 {
        // Nothing reported: the whole remainder is mapped.
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&start_lba.to_be_bytes());
        let count = u32::try_from((ctx.info.blocks() - start_lba).min(u64::from(u32::MAX)))
            .unwrap_or(u32::MAX);
        d[8..12].copy_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&d);
    }
    let length = u32::try_from(out.len() - 4).unwrap_or(0);
    out[..4].copy_from_slice(&length.to_be_bytes());
    truncated(out, allocation_length)
}

fn pad_ascii(out: &mut Vec<u8>, text: &str, width: usize) {
    let bytes = text.as_bytes();
    for i in 0..width {
        out.push(*bytes.get(i).unwrap_or(&b' '));
    }
}

fn inquiry(ctx: &Context<'_>, cdb: &[u8; 16]) -> Outcome {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let allocation_length = usize::from(be16(&cdb[3..]));
    if cdb[1] & 0xfe != 0 {
        return Outcome::check(Sense::invalid_field_in_cdb(1));
    }
    if !evpd {
        if page != 0 {
            return Outcome::check(Sense::invalid_field_in_cdb(2));
        }
        let mut d = vec![0u8; 8];
        d[0] = 0x00; // Peripheral qualifier 0, direct-access block device.
        d[1] = 0x00; // Not removable.
        d[2] = 0x06; // SPC-4.
        d[3] = 0x12; // HiSup, response data format 2.
        d[5] = 0x10 | 0x08; // TPGS = implicit ALUA; 3PC: EXTENDED COPY; PROTECT off.
        d[6] = 0x00;
        d[7] = 0x02; // CmdQue.
        pad_ascii(&mut d, "TANDEM", 8);
        pad_ascii(&mut d, "tandem-iscsi", 16);
        pad_ascii(&mut d, "0001", 4);
        d.resize(58, 0);
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
        for v in [0x00a0u16, 0x0960, 0x0460, 0x04c0] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        d.resize(96, 0);
        d[4] = u8::try_from(d.len() - 5).unwrap_or(0);
        return truncated(d, allocation_length);
    }
    let mut d = vec![0u8; 4];
    d[1] = page;
    match page {
        0x00 => d.extend_from_slice(&[0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2]),
        0x8f => d.extend_from_slice(&copy::third_party_copy_vpd()),
        0x80 => d.extend_from_slice(ctx.identity.serial.as_bytes()),
        0x83 => {
            // NAA registered extended (type 3), logical unit.
            d.extend_from_slice(&[0x01, 0x03, 0x00, 0x10]);
            d.extend_from_slice(&ctx.identity.naa_designator());
            // T10 vendor ID, logical unit.
            let mut t10 = Vec::new();
            pad_ascii(&mut t10, "TANDEM", 8);
            t10.extend_from_slice(ctx.identity.serial.as_bytes());
            d.extend_from_slice(&[0x02, 0x01, 0x00, u8::try_from(t10.len()).unwrap_or(0)]);
            d.extend_from_slice(&t10);
            // Relative target port (type 4), target port association, iSCSI.
            d.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0]);
            d.extend_from_slice(&ctx.nexus.relative_port.to_be_bytes());
            // Target port group (type 5).
            d.extend_from_slice(&[0x51, 0x95, 0x00, 0x04, 0, 0]);
            d.extend_from_slice(&local_port_group_id(ctx).to_be_bytes());
            // SCSI name string of the target device (type 8, association 2).
            let mut name = ctx.identity.target_name.clone().into_bytes();
            name.push(0);
            while !name.len().is_multiple_of(4) {
                name.push(0);
            }
            d.extend_from_slice(&[0x53, 0xa8, 0x00, u8::try_from(name.len()).unwrap_or(0)]);
            d.extend_from_slice(&name);
        }
        0xb0 => {
            let mut p = [0u8; 60];
            p[0] = 0x00; // WSNZ clear: WRITE SAME with a zero count runs to the end.
            p[1] = COMPARE_AND_WRITE_BLOCKS_MAX;
            p[2..4].copy_from_slice(&8u16.to_be_bytes()); // Optimal transfer granularity: 4 KiB.
            let max_blocks = TRANSFER_BYTES_MAX / ctx.info.block_size_bytes;
            p[4..8].copy_from_slice(&max_blocks.to_be_bytes());
            p[8..12].copy_from_slice(&(max_blocks / 8).to_be_bytes());
            p[12..16].copy_from_slice(&max_blocks.to_be_bytes());
            if ctx.info.thin {
                p[16..20].copy_from_slice(&UNMAP_BLOCKS_MAX.to_be_bytes());
                p[20..24].copy_from_slice(&UNMAP_DESCRIPTORS_MAX.to_be_bytes());
                p[24..28].copy_from_slice(&8u32.to_be_bytes());
            }
            p[32..40].copy_from_slice(&u64::from(WRITE_SAME_BLOCKS_MAX).to_be_bytes());
            // WRITE ATOMIC(16): maximum atomic transfer length and atomic alignment; no
            // granularity requirement and no atomic boundaries.
            let (atomic_blocks, alignment_blocks) = atomic_limits_blocks(&ctx.info);
            p[40..44].copy_from_slice(&atomic_blocks.to_be_bytes());
            p[44..48].copy_from_slice(&alignment_blocks.to_be_bytes());
            d.extend_from_slice(&p);
        }
        0xb1 => {
            let mut p = [0u8; 60];
            p[1] = 0x01; // Non-rotating medium.
            p[3] = 0x00;
            d.extend_from_slice(&p);
        }
        0xb2 => {
            let mut p = [0u8; 4];
            if ctx.info.thin {
                p[1] = 0x80 | 0x40 | 0x20 | 0x04; // LBPU, LBPWS, LBPWS10, LBPRZ
                p[2] = 0x02; // Thin provisioned.
            }
            d.extend_from_slice(&p);
        }
        _ => return Outcome::check(Sense::invalid_field_in_cdb(2)),
    }
    let length = u16::try_from(d.len() - 4).unwrap_or(0);
    d[2..4].copy_from_slice(&length.to_be_bytes());
    truncated(d, allocation_length)
}

fn report_luns(ctx: &Context<'_>, cdb: &[u8; 16]) -> Outcome {
    let select = cdb[2];
    let allocation_length = usize::try_from(be32(&cdb[6..])).unwrap_or(0);
    if allocation_length < 16 {
        return Outcome::check(Sense::invalid_field_in_cdb(6));
    }
    if select > 2 && !(0x10..=0x12).contains(&select) {
        return Outcome::check(Sense::invalid_field_in_cdb(2));
    }
    let mut d = vec![0u8; 8];
    for &lun in ctx.luns {
        d.extend_from_slice(&crate::connection::encode_lun(lun).to_be_bytes());
    }
    let length = u32::try_from(d.len() - 8).unwrap_or(0);
    d[..4].copy_from_slice(&length.to_be_bytes());
    truncated(d, allocation_length)
}

fn read_capacity_10(ctx: &Context<'_>, cdb: &[u8; 16]) -> Outcome {
    if cdb[8] & 0x01 == 0 && be32(&cdb[2..]) != 0 {
        return Outcome::check(Sense::invalid_field_in_cdb(2));
    }
    let last = ctx.info.blocks().saturating_sub(1);
    let last = u32::try_from(last).unwrap_or(u32::MAX);
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&last.to_be_bytes());
    d.extend_from_slice(&ctx.info.block_size_bytes.to_be_bytes());
    Outcome::data(d)
}

fn read_capacity_16(ctx: &Context<'_>, cdb: &[u8; 16]) -> Outcome {
    let allocation_length = usize::try_from(be32(&cdb[10..])).unwrap_or(0);
    let mut d = vec![0u8; 32];
    d[..8].copy_from_slice(&ctx.info.blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&ctx.info.block_size_bytes.to_be_bytes());
    // Logical blocks per physical block exponent 0: any single block can be unmapped, since
    // the backing store zeroes partial file-system blocks it cannot deallocate.
    d[13] = 0;
    if ctx.info.thin {
        d[14] = 0x80 | 0x40; // LBPME, LBPRZ
    }
    truncated(d, allocation_length)
}

fn report_target_port_groups(ctx: &Context<'_>, cdb: &[u8; 16]) -> Outcome {
    let allocation_length = usize::try_from(be32(&cdb[6..])).unwrap_or(0);
    let extended = (cdb[1] >> 5) == 1;
    let groups = (ctx.port_groups)();
    let mut d = vec![0u8; 4];
    if extended {
        d.extend_from_slice(&[0x10, 0x00, 0x00, 0x00]);
    }
    for group in &groups {
        // PREF marks the group to use: the only one, or the active/optimized one.
        let preferred = groups.len() == 1 || group.state == AluaState::ActiveOptimized;
        d.push(if preferred { 0x80 } else { 0 } | group.state.code());
        d.push(0x80 | 0x04 | 0x01); // T_SUP, S_SUP, AO_SUP
        d.extend_from_slice(&group.group_id.to_be_bytes());
        d.push(0);
        d.push(0x02); // Implicit change.
        d.push(0);
        let local_ports = ctx.local_ports();
        let ports =
            if group.local { local_ports.as_slice() } else { group.relative_ports.as_slice() };
        d.push(u8::try_from(ports.len()).unwrap_or(u8::MAX));
        for port in ports.iter().take(usize::from(u8::MAX)) {
            d.extend_from_slice(&[0, 0]);
            d.extend_from_slice(&port.to_be_bytes());
        }
    }
    let length = u32::try_from(d.len() - 4).unwrap_or(0);
    d[..4].copy_from_slice(&length.to_be_bytes());
    truncated(d, allocation_length)
}

/// The id of the target port group of the port a command arrived on, for VPD page 83h.
fn local_port_group_id(ctx: &Context<'_>) -> u16 {
    // The group of the port the command arrived on: on a remote port (a command forwarded from
    // another node) that is the other node's group, which lists the port's identifier.
    let groups = (ctx.port_groups)();
    let port = ctx.nexus.relative_port;
    let remote = groups.iter().find(|g| !g.local && g.relative_ports.contains(&port));
    let local = groups.iter().find(|g| g.local);
    remote.or(local).map_or(LOCAL_PORT_GROUP_ID, |g| g.group_id)
}

fn report_supported_opcodes(cdb: &[u8; 16]) -> Outcome {
    let options = cdb[2] & 0x07;
    let rctd = cdb[2] & 0x80 != 0;
    let requested_opcode = cdb[3];
    let requested_sa = be16(&cdb[4..]);
    let allocation_length = usize::try_from(be32(&cdb[6..])).unwrap_or(0);
    let timeouts = |out: &mut Vec<u8>| {
        if rctd {
            out.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
    };
    match options {
        0 => {
            let mut d = vec![0u8; 4];
            for &(opcode, sa, length) in SUPPORTED {
                d.push(opcode);
                d.push(0);
                d.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(if sa.is_some() { 0x01 } else { 0 } | if rctd { 0x02 } else { 0 });
                d.extend_from_slice(&u16::try_from(length).unwrap_or(0).to_be_bytes());
                timeouts(&mut d);
            }
            let length = u32::try_from(d.len() - 4).unwrap_or(0);
            d[..4].copy_from_slice(&length.to_be_bytes());
            truncated(d, allocation_length)
        }
        1..=3 => {
            let has_sa = SUPPORTED.iter().any(|&(o, sa, _)| o == requested_opcode && sa.is_some());
            if options == 1 && has_sa {
                return Outcome::check(Sense::invalid_field_in_cdb(2));
            }
            if options == 2 && !has_sa && SUPPORTED.iter().any(|&(o, _, _)| o == requested_opcode) {
                return Outcome::check(Sense::invalid_field_in_cdb(2));
            }
            let found = SUPPORTED.iter().find(|&&(o, sa, _)| {
                o == requested_opcode && (options == 1 || sa.is_none() || sa == Some(requested_sa))
            });
            let mut d = vec![0u8; 4];
            match found {
                Some(&(opcode, sa, length)) => {
                    d[1] = 0x03 | if rctd { 0x80 } else { 0 };
                    let usage = cdb_usage(opcode, sa, length);
                    d[2..4].copy_from_slice(&u16::try_from(usage.len()).unwrap_or(0).to_be_bytes());
                    d.extend_from_slice(&usage);
                    if let Some(sa) = sa {
                        let i = 4 + 1;
                        d[i] = (d[i] & 0xe0) | u8::try_from(sa & 0x1f).unwrap_or(0);
                    }
                    timeouts(&mut d);
                }
                None => d[1] = 0x01,
            }
            truncated(d, allocation_length)
        }
        _ => Outcome::check(Sense::invalid_field_in_cdb(2)),
    }
}

fn read_defect_data(cdb: &[u8; 16]) -> Outcome {
    if cdb[0] == op::READ_DEFECT_DATA_10 {
        let allocation_length = usize::from(be16(&cdb[7..]));
        let d = vec![0, cdb[2] & 0x1f, 0, 0];
        truncated(d, allocation_length)
    } else {
        let allocation_length = usize::try_from(be32(&cdb[6..])).unwrap_or(0);
        let d = vec![0, cdb[1] & 0x1f, 0, 0, 0, 0, 0, 0];
        truncated(d, allocation_length)
    }
}

/// MODE SENSE pages: caching (0x08), control (0x0a), informational exceptions (0x1c).
fn mode_page(page: u8, control: u8, shared: &LunShared) -> Option<Vec<u8>> {
    let changeable = control == 1;
    let default = control == 2;
    match page {
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 18;
            let wce = changeable || default || shared.write_cache_enabled;
            if wce {
                p[2] |= 0x04;
            }
            Some(p)
        }
        0x0a => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 10;
            if changeable {
                p[2] = 0x04; // D_SENSE is changeable.
            } else {
                p[2] = if shared.descriptor_sense && !default { 0x04 } else { 0 };
                p[3] = 0x10; // Unrestricted reordering allowed: QUEUE ALGORITHM MODIFIER 1.
                p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // Busy timeout period.
            }
            Some(p)
        }
        0x1c => {
            let mut p = vec![0u8; 12];
            p[0] = 0x1c;
            p[1] = 10;
            Some(p)
        }
        _ => None,
    }
}

fn mode_sense(ctx: &Context<'_>, cdb: &[u8; 16], shared: &LunShared) -> Outcome {
    let six = cdb[0] == op::MODE_SENSE_6;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = !six && cdb[1] & 0x10 != 0;
    let control = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let allocation_length = if six { usize::from(cdb[4]) } else { usize::from(be16(&cdb[7..])) };
    if control == 3 {
        return Outcome::check(codes::SAVING_PARAMETERS_NOT_SUPPORTED);
    }
    let mut pages = Vec::new();
    if page == 0x3f {
        if subpage != 0 && subpage != 0xff {
            return Outcome::check(Sense::invalid_field_in_cdb(3));
        }
        for p in [0x08, 0x0a, 0x1c] {
            if let Some(bytes) = mode_page(p, control, shared) {
                pages.extend_from_slice(&bytes);
            }
        }
    } else {
        if subpage != 0 {
            return Outcome::check(Sense::invalid_field_in_cdb(3));
        }
        match mode_page(page, control, shared) {
            Some(bytes) => pages.extend_from_slice(&bytes),
            None => return Outcome::check(Sense::invalid_field_in_cdb(2)),
        }
    }
    let mut block_descriptor = Vec::new();
    if !dbd {
        let blocks = ctx.info.blocks();
        if llbaa {
            block_descriptor.extend_from_slice(&blocks.to_be_bytes());
            block_descriptor.extend_from_slice(&[0, 0, 0, 0]);
            block_descriptor.extend_from_slice(&ctx.info.block_size_bytes.to_be_bytes());
        } else {
            block_descriptor
                .extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            block_descriptor.push(0);
            let size = ctx.info.block_size_bytes.to_be_bytes();
            block_descriptor.extend_from_slice(&size[1..4]);
        }
    }
    let mut d = Vec::new();
    if six {
        d.extend_from_slice(&[0, 0x00, 0x10, u8::try_from(block_descriptor.len()).unwrap_or(0)]);
    } else {
        d.extend_from_slice(&[0, 0, 0x00, 0x10, if llbaa { 1 } else { 0 }, 0]);
        d.extend_from_slice(&u16::try_from(block_descriptor.len()).unwrap_or(0).to_be_bytes());
    }
    d.extend_from_slice(&block_descriptor);
    d.extend_from_slice(&pages);
    if six {
        d[0] = u8::try_from(d.len() - 1).unwrap_or(u8::MAX);
    } else {
        let length = u16::try_from(d.len() - 2).unwrap_or(u16::MAX);
        d[..2].copy_from_slice(&length.to_be_bytes());
    }
    truncated(d, allocation_length)
}

fn mode_select(cdb: &[u8; 16], data: &[u8], shared: &mut LunShared) -> Outcome {
    let six = cdb[0] == op::MODE_SELECT_6;
    let length = if six { usize::from(cdb[4]) } else { usize::from(be16(&cdb[7..])) };
    if cdb[1] & 0x01 != 0 {
        return Outcome::check(codes::SAVING_PARAMETERS_NOT_SUPPORTED);
    }
    if length == 0 {
        return Outcome::good();
    }
    let header = if six { 4 } else { 8 };
    let data = &data[..length.min(data.len())];
    if data.len() < header {
        return Outcome::check(codes::PARAMETER_LIST_LENGTH_ERROR);
    }
    let descriptors = if six { usize::from(data[3]) } else { usize::from(be16(&data[6..])) };
    let mut at = header + descriptors;
    while at + 2 <= data.len() {
        let page = data[at] & 0x3f;
        let page_length = usize::from(data[at + 1]);
        if at + 2 + page_length > data.len() {
            return Outcome::check(codes::PARAMETER_LIST_LENGTH_ERROR);
        }
        let body = &data[at + 2..at + 2 + page_length];
        match page {
            0x08 if page_length >= 1 => shared.write_cache_enabled = body[0] & 0x04 != 0,
            0x0a if page_length >= 1 => shared.descriptor_sense = body[0] & 0x04 != 0,
            0x1c => {}
            _ => {
                return Outcome::check(Sense::invalid_field_in_parameter_list(
                    u16::try_from(at).unwrap_or(0),
                ));
            }
        }
        at += 2 + page_length;
    }
    Outcome::good()
}

fn persistent_reserve_in(cdb: &[u8; 16], shared: &LunShared) -> Outcome {
    let action = cdb[1] & 0x1f;
    let allocation_length = usize::from(be16(&cdb[7..]));
    let state = &shared.reservations;
    let mut d = Vec::new();
    match action {
        0 => {
            d.extend_from_slice(&state.generation.to_be_bytes());
            let length = u32::try_from(state.registrations.len() * 8).unwrap_or(0);
            d.extend_from_slice(&length.to_be_bytes());
            for r in &state.registrations {
                d.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        1 => {
            d.extend_from_slice(&state.generation.to_be_bytes());
            match &state.reservation {
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if pr::pr_type::all_registrants(r.reservation_type) {
                        0
                    } else {
                        state.key_of(&r.holder).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, r.reservation_type & 0xf, 0, 0]);
                }
                None => d.extend_from_slice(&0u32.to_be_bytes()),
            }
        }
        2 => {
            d.extend_from_slice(&8u16.to_be_bytes());
            // CRH: RESERVE/RELEASE(6) handled as SPC-4 describes; SIP_C and ATP_C: REGISTER
            // takes SPEC_I_PT and ALL_TG_PT. PTPL_C stays 0: nothing survives power loss.
            d.push(0x10 | 0x08 | 0x04);
            // TMV: the type mask is valid. ALLOW COMMANDS 001b: TEST UNIT READY passes Write
            // Exclusive and Exclusive Access reservations (it is `Access::Free`).
            d.push(0x80 | 0x10);
            d.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
            d.push(0x01);
            d.extend_from_slice(&[0, 0]);
        }
        3 => {
            d.extend_from_slice(&state.generation.to_be_bytes());
            d.extend_from_slice(&[0, 0, 0, 0]);
            for r in &state.registrations {
                let mut e = Vec::new();
                e.extend_from_slice(&r.key.to_be_bytes());
                e.extend_from_slice(&[0, 0, 0, 0]);
                let holder = match &state.reservation {
                    Some(res) if pr::pr_type::all_registrants(res.reservation_type) => {
                        Some(res.reservation_type)
                    }
                    Some(res) if res.holder == r.nexus => Some(res.reservation_type),
                    _ => None,
                };
                let all_tg_pt = if r.all_tg_pt { 0x02 } else { 0 };
                e.push(all_tg_pt | if holder.is_some() { 0x01 } else { 0 });
                e.push(holder.unwrap_or(0) & 0xf);
                e.extend_from_slice(&[0, 0, 0, 0]);
                e.extend_from_slice(&r.nexus.relative_port.to_be_bytes());
                let transport_id = r.nexus.transport_id();
                e.extend_from_slice(&u32::try_from(transport_id.len()).unwrap_or(0).to_be_bytes());
                e.extend_from_slice(&transport_id);
                d.extend_from_slice(&e);
            }
            let length = u32::try_from(d.len() - 8).unwrap_or(0);
            d[4..8].copy_from_slice(&length.to_be_bytes());
        }
        _ => return Outcome::check(Sense::invalid_field_in_cdb(1)),
    }
    truncated(d, allocation_length)
}

fn persistent_reserve_out(
    ctx: &Context<'_>,
    cdb: &[u8; 16],
    data: &[u8],
    shared: &mut LunShared,
) -> Outcome {
    let action = cdb[1] & 0x1f;
    let parameter_length = usize::try_from(be32(&cdb[5..])).unwrap_or(0);
    if action > pr::REGISTER_AND_MOVE {
        return Outcome::check(Sense::invalid_field_in_cdb(1));
    }
    // The list is read whole; anything longer than the most we accept is refused unread.
    if parameter_length > pr::PROUT_PARAMETER_LIST_BYTES_MAX || data.len() < parameter_length {
        return Outcome::check(codes::PARAMETER_LIST_LENGTH_ERROR);
    }
    let params = &data[..parameter_length];
    if action == pr::REGISTER_AND_MOVE {
        let result = shared.reservations.register_and_move(ctx.nexus, params, &ctx.all_ports());
        return prout_outcome(result, shared);
    }
    if action == 0 || action == 6 {
        let result = shared.reservations.register(ctx.nexus, action, params, &ctx.all_ports());
        return prout_outcome(result, shared);
    }
    if parameter_length != pr::PROUT_PARAMETER_BYTES {
        return Outcome::check(codes::PARAMETER_LIST_LENGTH_ERROR);
    }
    let key = be64(data);
    let service_key = be64(&data[8..]);
    let flags = data[20];
    if flags & 0x08 != 0 {
        // SPEC_I_PT is valid for REGISTER only; ALL_TG_PT is ignored here (SPC-4 §6.16.3).
        return Outcome::check(Sense::invalid_field_in_parameter_list(20));
    }
    if flags & 0x01 != 0 {
        // APTPL: persisting through power loss is not supported.
        return Outcome::check(Sense::invalid_field_in_parameter_list(20));
    }
    let result = shared.reservations.prout(ctx.nexus, action, cdb[2], key, service_key);
    prout_outcome(result, shared)
}

/// A PERSISTENT RESERVE OUT that changed the reservations completes only once the device has
/// made the new state durable (on a storage node: on every replica a write would need), so an
/// initiator is never told GOOD for a registration the next primary would not have. Commands
/// that changed nothing (conflicts, errors, idempotent repeats) answer at once.
fn persist_if_changed(outcome: Outcome, before: &ReservationState, shared: &mut LunShared) -> Step {
    let mut persistent = shared.reservations.clone();
    persistent.reserve6 = before.reserve6.clone();
    if outcome.status != status::GOOD || persistent == *before {
        return Step::Done(outcome);
    }
    shared.reservations_version += 1;
    let version = shared.reservations_version;
    let image = Bytes::from(pr_image::encode(&shared.reservations, version));
    Step::Io(IoOp::PersistReservations { version, image }, Pending::ReservationsPersisted)
}

fn prout_outcome(result: ProutResult, shared: &mut LunShared) -> Outcome {
    match result {
        ProutResult::Good(notices) => {
            for (nexus, sense) in notices {
                shared.queue_unit_attention(&nexus, sense);
            }
            Outcome::good()
        }
        ProutResult::Conflict => Outcome::status(status::RESERVATION_CONFLICT),
        ProutResult::Check(sense) => Outcome::check(sense),
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::*;

    #[test]
    fn a_changed_capacity_gives_every_nexus_capacity_data_has_changed() {
        let nexus = |isid| pr::Nexus {
            initiator_name: "iqn.2026-11.test:i".into(),
            isid,
            relative_port: 1,
        };
        let nexuses = [nexus(1), nexus(2)];
        let mut shared = LunShared::new();
        shared.observe_capacity(64 << 20, &nexuses);
        shared.observe_capacity(64 << 20, &nexuses);
        assert!(shared.unit_attentions.is_empty(), "first sight and no change: nothing");
        shared.observe_capacity(128 << 20, &nexuses);
        for n in &nexuses {
            let queue = &shared.unit_attentions[n];
            assert_eq!(queue.iter().collect::<Vec<_>>(), vec![&codes::CAPACITY_DATA_HAS_CHANGED]);
        }
        let sense = codes::CAPACITY_DATA_HAS_CHANGED;
        assert_eq!((sense.key, sense.asc, sense.ascq), (sense::key::UNIT_ATTENTION, 0x2a, 0x09));
    }
}

//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4 and §6.18): the copy manager.
//!
//! Only what a disk target needs: identification CSCD descriptors (type E4h) naming logical
//! units of this target by the designators VPD page 83h reports, and block-to-block segment
//! descriptors (type 02h). The copy reads and writes through the logical units' devices in
//! chunks of at most [`COPY_CHUNK_BYTES_MAX`], so it works on any `BlockDevice`, the replicated
//! one included. Everything else is refused with the sense SPC-4 names for it.

use std::collections::VecDeque;

use super::pr::Nexus;
use super::sense::{Sense, codes, key};
use super::{
    Context, DeviceInfo, LunIdentity, LunShared, Outcome, Pending, Step, be16, be32, be64,
};
use crate::constants::{
    COMMANDS_MAX, COPY_CHUNK_BYTES_MAX, COPY_CSCD_DESCRIPTORS_MAX, COPY_DESCRIPTOR_LIST_BYTES_MAX,
    COPY_RESULTS_HELD_MAX, COPY_SEGMENT_BYTES_MAX, COPY_SEGMENT_DESCRIPTORS_MAX,
};
use crate::device::{DeviceError, IoData, IoOp};

/// Bytes of the EXTENDED COPY parameter list header.
const HEADER_BYTES: usize = 16;
/// Bytes of an identification CSCD descriptor (and every other type code E0h..E9h).
const CSCD_BYTES: usize = 32;
/// Bytes of a block-to-block segment descriptor.
const SEGMENT_BYTES: usize = 28;
/// Descriptor type codes we implement, reported in OPERATING PARAMETERS.
const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;
const CSCD_IDENTIFICATION: u8 = 0xe4;

/// Service actions of RECEIVE COPY RESULTS.
pub mod receive {
    pub const COPY_STATUS: u8 = 0x00;
    pub const OPERATING_PARAMETERS: u8 = 0x03;
}

/// One segment to copy, resolved to logical units and byte ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopySegment {
    pub source_lun: u64,
    pub source_offset_bytes: u64,
    pub destination_lun: u64,
    pub destination_offset_bytes: u64,
    pub length_bytes: u64,
    /// Copy from the end: the destination overlaps the source further on, so copying from the
    /// front would read blocks already overwritten.
    pub backward: bool,
}

/// A copy in progress: what is left and what is done.
#[derive(Debug)]
pub struct CopyJob {
    /// The list identifier whose results are held for RECEIVE COPY RESULTS, if any.
    hold: Option<u8>,
    segments: Vec<CopySegment>,
    index: usize,
    done_in_segment_bytes: u64,
    transferred_bytes: u64,
    fua: bool,
}

/// Held results of a finished EXTENDED COPY, for RECEIVE COPY RESULTS (COPY STATUS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyResult {
    pub nexus: Nexus,
    pub list_id: u8,
    pub succeeded: bool,
    pub segments_processed: u16,
    pub transferred_bytes: u64,
}

/// Keeps `result`, replacing one with the same nexus and list identifier and dropping the
/// oldest beyond [`COPY_RESULTS_HELD_MAX`].
pub fn hold_result(held: &mut VecDeque<CopyResult>, result: CopyResult) {
    held.retain(|r| !(r.nexus == result.nexus && r.list_id == result.list_id));
    if held.len() >= COPY_RESULTS_HELD_MAX {
        held.pop_front();
    }
    held.push_back(result);
}

/// Sense conditions of the copy manager (SPC-4 annex D).
pub mod sense_codes {
    use super::{Sense, key};
    pub const COPY_ABORTED: u8 = 0x0a;
    pub const TOO_MANY_TARGET_DESCRIPTORS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x06);
    pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: Sense =
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x07);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x08);
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: Sense =
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x09);
    /// A CSCD descriptor that names no logical unit we serve, or a segment naming a CSCD
    /// descriptor that does not exist.
    pub const UNREACHABLE_COPY_TARGET: Sense = Sense::new(COPY_ABORTED, 0x08, 0x04);
    /// A copy with the same list identifier is still running for the I_T nexus.
    pub const OPERATION_IN_PROGRESS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x00, 0x16);
    /// A segment the copy target cannot carry out (beyond its capacity); the copy target's
    /// own condition has no ASC of its own under COPY ABORTED.
    pub const SEGMENT_REFUSED: Sense = Sense::new(COPY_ABORTED, 0x00, 0x00);
}

use sense_codes::*;

/// The list identifier an EXTENDED COPY parameter list uses, unless LIST ID USAGE says there
/// is none (11b). Two copies of one I_T nexus may not run under the same one.
pub fn list_id(data: &[u8]) -> Option<u8> {
    (data.len() >= HEADER_BYTES && (data[1] >> 3) & 0x3 != 0b11).then(|| data[0])
}

/// The designators VPD page 83h reports for `identity` with logical-unit association:
/// (designator type, designator). What a CSCD descriptor may name us by.
pub fn designators(identity: &LunIdentity) -> [(u8, Vec<u8>); 2] {
    let mut t10 = Vec::new();
    super::pad_ascii(&mut t10, "TANDEM", 8);
    t10.extend_from_slice(identity.serial.as_bytes());
    [(0x3, identity.naa_designator().to_vec()), (0x1, t10)]
}

/// The LUN of this target a CSCD designator names, if any.
fn resolve(ctx: &Context<'_>, designator_type: u8, designator: &[u8]) -> Option<u64> {
    ctx.luns.iter().copied().find(|&lun| {
        let identity = LunIdentity::new(&ctx.identity.target_name, lun);
        designators(&identity).iter().any(|(t, d)| *t == designator_type && d == designator)
    })
}

/// A CSCD descriptor after parsing: the LUN it names (if we serve it) and the block length it
/// claims (0: unspecified).
struct Cscd {
    lun: Option<u64>,
    block_length_bytes: u32,
    at: usize,
}

fn check(sense: Sense) -> Step {
    Step::Done(Outcome::check(sense))
}

fn parameter_error(byte: usize) -> Step {
    check(Sense::invalid_field_in_parameter_list(u16::try_from(byte).unwrap_or(u16::MAX)))
}

/// EXTENDED COPY (LID1): parses and checks the whole parameter list, then copies segment by
/// segment. Nothing is written unless every descriptor is valid.
pub fn extended_copy(ctx: &Context<'_>, cdb: &[u8; 16], data: &[u8], write_back: bool) -> Step {
    if cdb[1] & 0x1f != 0 {
        // Only the LID1 service action (00h); LID4 (01h) needs ROD tokens we do not offer.
        return check(Sense::invalid_field_in_cdb(1));
    }
    let parameter_length = usize::try_from(be32(&cdb[10..])).unwrap_or(usize::MAX);
    if parameter_length == 0 {
        return Step::Done(Outcome::good());
    }
    if parameter_length < HEADER_BYTES || data.len() < parameter_length {
        return check(codes::PARAMETER_LIST_LENGTH_ERROR);
    }
    let data = &data[..parameter_length];
    let list_id = data[0];
    let list_id_usage = (data[1] >> 3) & 0x3;
    if list_id_usage == 0b01 {
        return parameter_error(1);
    }
    let cscd_bytes = usize::from(be16(&data[2..]));
    let segment_bytes = usize::try_from(be32(&data[8..])).unwrap_or(usize::MAX);
    let inline_bytes = usize::try_from(be32(&data[12..])).unwrap_or(usize::MAX);
    if inline_bytes != 0 {
        // MAXIMUM INLINE DATA LENGTH is zero: no segment descriptor can use inline data.
        return parameter_error(12);
    }
    let Some(lists_end) =
        HEADER_BYTES.checked_add(cscd_bytes).and_then(|n| n.checked_add(segment_bytes))
    else {
        return check(codes::PARAMETER_LIST_LENGTH_ERROR);
    };
    if lists_end > parameter_length
        || cscd_bytes + segment_bytes > usize::try_from(COPY_DESCRIPTOR_LIST_BYTES_MAX).unwrap_or(0)
    {
        return check(codes::PARAMETER_LIST_LENGTH_ERROR);
    }
    // CSCD descriptors.
    let cscd_end = HEADER_BYTES + cscd_bytes;
    let mut cscds = Vec::new();
    let mut at = HEADER_BYTES;
    while at < cscd_end {
        let type_code = data[at];
        if type_code != CSCD_IDENTIFICATION {
            return check(with_pointer(UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, at));
        }
        if cscds.len() >= usize::from(COPY_CSCD_DESCRIPTORS_MAX) {
            return check(TOO_MANY_TARGET_DESCRIPTORS);
        }
        if at + CSCD_BYTES > cscd_end {
            return check(codes::PARAMETER_LIST_LENGTH_ERROR);
        }
        let d = &data[at..at + CSCD_BYTES];
        // LU ID TYPE and NUL are ignored (SPC-4 made them obsolete); the relative initiator
        // port identifier 0 means any port, and we reach our own LUNs through every port.
        if d[1] & 0x1f != 0 {
            // Only block devices (peripheral device type 00h) can be copy targets here.
            return parameter_error(at + 1);
        }
        let designator_type = d[5] & 0x0f;
        let association = (d[5] >> 4) & 0x3;
        let designator_length = usize::from(d[7]);
        if designator_length > 20 {
            return parameter_error(at + 7);
        }
        let lun = if association == 0 {
            resolve(ctx, designator_type, &d[8..8 + designator_length])
        } else {
            None
        };
        if d[28] & 0x04 != 0 {
            // PAD is about stream devices; a block-to-block copy has nothing to pad.
            return parameter_error(at + 28);
        }
        let block_length_bytes =
            (u32::from(d[29]) << 16) | (u32::from(d[30]) << 8) | u32::from(d[31]);
        cscds.push(Cscd { lun, block_length_bytes, at });
        at += CSCD_BYTES;
    }
    // Segment descriptors.
    let mut segments = Vec::new();
    let mut at = cscd_end;
    while at < lists_end {
        if at + 4 > lists_end {
            return check(codes::PARAMETER_LIST_LENGTH_ERROR);
        }
        let type_code = data[at];
        if type_code != SEGMENT_BLOCK_TO_BLOCK {
            return check(with_pointer(UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, at));
        }
        if segments.len() >= usize::from(COPY_SEGMENT_DESCRIPTORS_MAX) {
            return check(TOO_MANY_SEGMENT_DESCRIPTORS);
        }
        if usize::from(be16(&data[at + 2..])) + 4 != SEGMENT_BYTES {
            return parameter_error(at + 2);
        }
        if at + SEGMENT_BYTES > lists_end {
            return check(codes::PARAMETER_LIST_LENGTH_ERROR);
        }
        let d = &data[at..at + SEGMENT_BYTES];
        let (Some(source), Some(destination)) =
            (cscds.get(usize::from(be16(&d[4..]))), cscds.get(usize::from(be16(&d[6..]))))
        else {
            return check(UNREACHABLE_COPY_TARGET);
        };
        let (Some(source_lun), Some(destination_lun)) = (source.lun, destination.lun) else {
            return check(UNREACHABLE_COPY_TARGET);
        };
        let (Some(source_lun_state), Some(destination_lun_state)) =
            ((ctx.lun_info)(source_lun), (ctx.lun_info)(destination_lun))
        else {
            return check(UNREACHABLE_COPY_TARGET);
        };
        // The copy acts for this nexus: another initiator's reservation on a copy target
        // keeps it out just as it would keep out a READ or WRITE.
        if !source_lun_state.readable || !destination_lun_state.writable {
            return Step::Done(Outcome::status(super::sense::status::RESERVATION_CONFLICT));
        }
        let (source_info, destination_info) = (source_lun_state.info, destination_lun_state.info);
        for (cscd, info) in [(source, &source_info), (destination, &destination_info)] {
            if cscd.block_length_bytes != 0 && cscd.block_length_bytes != info.block_size_bytes {
                return parameter_error(cscd.at + 29);
            }
        }
        if source_info.block_size_bytes != destination_info.block_size_bytes {
            // With equal block sizes DC and CAT never matter: no residue can arise.
            return parameter_error(at + 1);
        }
        let block = u64::from(source_info.block_size_bytes);
        let blocks = u64::from(be16(&d[10..]));
        let source_lba = be64(&d[12..]);
        let destination_lba = be64(&d[20..]);
        let length_bytes = blocks * block;
        if length_bytes > u64::from(COPY_SEGMENT_BYTES_MAX) {
            return parameter_error(at + 10);
        }
        let inside = |info: &DeviceInfo, lba: u64| {
            lba.checked_add(blocks).is_some_and(|end| end <= info.blocks())
        };
        if !inside(&source_info, source_lba) || !inside(&destination_info, destination_lba) {
            return check(
                SEGMENT_REFUSED.with_information(u64::try_from(segments.len()).unwrap_or(0)),
            );
        }
        let source_offset_bytes = source_lba * block;
        let destination_offset_bytes = destination_lba * block;
        segments.push(CopySegment {
            source_lun,
            source_offset_bytes,
            destination_lun,
            destination_offset_bytes,
            length_bytes,
            backward: source_lun == destination_lun
                && destination_offset_bytes > source_offset_bytes
                && destination_offset_bytes < source_offset_bytes + length_bytes,
        });
        at += SEGMENT_BYTES;
    }
    let job = CopyJob {
        hold: (list_id_usage == 0b00).then_some(list_id),
        segments,
        index: 0,
        done_in_segment_bytes: 0,
        transferred_bytes: 0,
        // Without a write-back cache every write is written through, as for WRITE.
        fua: !write_back,
    };
    next_chunk(ctx, Box::new(job))
}

fn with_pointer(sense: Sense, byte: usize) -> Sense {
    Sense { field_pointer: Some((false, u16::try_from(byte).unwrap_or(u16::MAX), None)), ..sense }
}

/// Reads the next chunk of the copy, or finishes it.
fn next_chunk(ctx: &Context<'_>, mut job: Box<CopyJob>) -> Step {
    loop {
        let Some(segment) = job.segments.get(job.index) else {
            finish(ctx, &job, true);
            return Step::Done(Outcome::good());
        };
        let remaining = segment.length_bytes - job.done_in_segment_bytes;
        if remaining == 0 {
            job.index += 1;
            job.done_in_segment_bytes = 0;
            continue;
        }
        let chunk = remaining.min(u64::from(COPY_CHUNK_BYTES_MAX));
        let relative = if segment.backward { remaining - chunk } else { job.done_in_segment_bytes };
        let op = IoOp::Read {
            offset_bytes: segment.source_offset_bytes + relative,
            length_bytes: u32::try_from(chunk).unwrap_or(COPY_CHUNK_BYTES_MAX),
        };
        let lun = segment.source_lun;
        return Step::IoAt(lun, op, Pending::CopyRead { job, relative_bytes: relative });
    }
}

/// Records the outcome for RECEIVE COPY RESULTS when the list identifier asked for it.
fn finish(ctx: &Context<'_>, job: &CopyJob, succeeded: bool) {
    let Some(list_id) = job.hold else { return };
    let mut shared = ctx.shared.lock().unwrap_or_else(|p| p.into_inner());
    let result = CopyResult {
        nexus: ctx.nexus.clone(),
        list_id,
        succeeded,
        segments_processed: u16::try_from(job.index).unwrap_or(u16::MAX),
        transferred_bytes: job.transferred_bytes,
    };
    hold_result(&mut shared.copy_results, result);
}

/// Continues a copy after the read of a chunk.
pub fn resume_read(
    ctx: &Context<'_>,
    job: Box<CopyJob>,
    relative_bytes: u64,
    result: Result<IoData, DeviceError>,
) -> Step {
    let data = match result {
        Ok(IoData::Read(data)) => data,
        Ok(_) => return aborted(ctx, &job, codes::INTERNAL_TARGET_FAILURE),
        Err(error) => return aborted(ctx, &job, super::device_error_sense(&error, false)),
    };
    let Some(segment) = job.segments.get(job.index) else {
        return aborted(ctx, &job, codes::INTERNAL_TARGET_FAILURE);
    };
    let op = IoOp::Write {
        offset_bytes: segment.destination_offset_bytes + relative_bytes,
        data,
        fua: job.fua,
    };
    let lun = segment.destination_lun;
    let written_bytes = chunk_bytes(&op);
    Step::IoAt(lun, op, Pending::CopyWritten { job, written_bytes })
}

/// Continues a copy after the write of a chunk.
pub fn resume_written(
    ctx: &Context<'_>,
    mut job: Box<CopyJob>,
    written_bytes: u64,
    result: Result<IoData, DeviceError>,
) -> Step {
    if let Err(error) = result {
        return aborted(ctx, &job, super::device_error_sense(&error, true));
    }
    job.done_in_segment_bytes += written_bytes;
    job.transferred_bytes += written_bytes;
    next_chunk(ctx, job)
}

/// Ends the copy with COPY ABORTED carrying the copy target's condition.
fn aborted(ctx: &Context<'_>, job: &CopyJob, cause: Sense) -> Step {
    finish(ctx, job, false);
    check(Sense { key: COPY_ABORTED, ..cause })
}

/// Bytes a chunk write carries, for [`resume_written`].
fn chunk_bytes(op: &IoOp) -> u64 {
    match op {
        IoOp::Write { data, .. } => data.len() as u64,
        _ => 0,
    }
}

/// RECEIVE COPY RESULTS: OPERATING PARAMETERS and COPY STATUS (LID1).
pub fn receive_copy_results(ctx: &Context<'_>, cdb: &[u8; 16], shared: &mut LunShared) -> Outcome {
    let list_id = cdb[2];
    let allocation_length = usize::try_from(be32(&cdb[10..])).unwrap_or(0);
    let mut d = Vec::new();
    match cdb[1] & 0x1f {
        receive::OPERATING_PARAMETERS => {
            d.resize(44, 0);
            d[4] = 0x01; // SNLID: LIST ID USAGE 11b (no list identifier) is supported.
            d[8..10].copy_from_slice(&COPY_CSCD_DESCRIPTORS_MAX.to_be_bytes());
            d[10..12].copy_from_slice(&COPY_SEGMENT_DESCRIPTORS_MAX.to_be_bytes());
            d[12..16].copy_from_slice(&COPY_DESCRIPTOR_LIST_BYTES_MAX.to_be_bytes());
            d[16..20].copy_from_slice(&COPY_SEGMENT_BYTES_MAX.to_be_bytes());
            // Maximum inline data length, held data limit and maximum stream device transfer
            // size stay zero: no inline data, no held data, no stream devices.
            let concurrent = u16::try_from(COMMANDS_MAX).unwrap_or(u16::MAX);
            d[34..36].copy_from_slice(&concurrent.to_be_bytes());
            d[36] = u8::try_from(COMMANDS_MAX).unwrap_or(u8::MAX);
            // Data segment granularity: segments are whole logical blocks.
            d[37] = u8::try_from(ctx.info.block_size_bytes.trailing_zeros()).unwrap_or(0);
            let implemented = [SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION];
            d[43] = u8::try_from(implemented.len()).unwrap_or(0);
            d.extend_from_slice(&implemented);
        }
        receive::COPY_STATUS => {
            let position = shared
                .copy_results
                .iter()
                .position(|r| r.list_id == list_id && r.nexus == *ctx.nexus);
            // A finished copy's status is returned once; then the list identifier is free.
            let Some(result) = position.and_then(|i| shared.copy_results.remove(i)) else {
                return Outcome::check(Sense::invalid_field_in_cdb(2));
            };
            d.resize(12, 0);
            d[4] = if result.succeeded { 0x01 } else { 0x02 };
            d[5..7].copy_from_slice(&result.segments_processed.to_be_bytes());
            // TRANSFER COUNT UNITS: bytes, or the smallest binary multiple that fits.
            let mut units = 0u8;
            let mut count = result.transferred_bytes;
            while count > u64::from(u32::MAX) && units < 6 {
                count >>= 10;
                units += 1;
            }
            d[7] = units;
            d[8..12].copy_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes());
        }
        _ => return Outcome::check(Sense::invalid_field_in_cdb(1)),
    }
    let available = u32::try_from(d.len() - 4).unwrap_or(0);
    d[..4].copy_from_slice(&available.to_be_bytes());
    super::truncated(d, allocation_length)
}

/// The Third-party Copy VPD page (8Fh) body: one Supported Commands descriptor listing
/// EXTENDED COPY (LID1) and the RECEIVE COPY RESULTS service actions we implement.
pub fn third_party_copy_vpd() -> Vec<u8> {
    let commands: [(u8, &[u8]); 2] = [
        (super::op::EXTENDED_COPY, &[0x00]),
        (super::op::RECEIVE_COPY_RESULTS, &[receive::COPY_STATUS, receive::OPERATING_PARAMETERS]),
    ];
    let mut list = Vec::new();
    for (opcode, actions) in commands {
        list.push(opcode);
        list.push(u8::try_from(actions.len()).unwrap_or(0));
        list.extend_from_slice(actions);
    }
    let mut body = vec![u8::try_from(list.len()).unwrap_or(0)];
    body.extend_from_slice(&list);
    // Third-party copy descriptors are a multiple of four bytes long.
    while !(body.len() + 4).is_multiple_of(4) {
        body.push(0);
    }
    let mut d = Vec::new();
    d.extend_from_slice(&0x0001u16.to_be_bytes());
    d.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
    d.extend_from_slice(&body);
    d
}

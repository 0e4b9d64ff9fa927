//! iSCSI PDU framing (RFC 7143 §11): the 48-byte Basic Header Segment, additional header
//! segments, padded data segments and CRC32C header and data digests.
//!
//! Decoding never trusts a length field: every length is checked against the negotiated
//! limit before any buffer is sized from it.

use bytes::Bytes;

use crate::constants::{AHS_BYTES_MAX, BHS_BYTES};

/// Initiator opcodes (RFC 7143 §11.1.1).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MANAGEMENT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MANAGEMENT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// The reserved tag value "no task" (RFC 7143 §11.2.1.8).
pub const TAG_NONE: u32 = 0xffff_ffff;

/// Digests negotiated for a connection (HeaderDigest / DataDigest = CRC32C).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("data segment of {length_bytes} bytes exceeds the limit of {limit_bytes}")]
    DataSegmentTooLong { length_bytes: usize, limit_bytes: usize },
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data digest mismatch")]
    DataDigest { header: Box<Header> },
    #[error("frame of {length_bytes} bytes is shorter than its header says")]
    Truncated { length_bytes: usize },
}

/// A Basic Header Segment with typed accessors for the fields every PDU shares and raw
/// big-endian accessors for the opcode-specific ones.
#[derive(Clone, PartialEq, Eq)]
pub struct Header(pub [u8; BHS_BYTES]);

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Header(op={:#04x} itt={:#x})", self.opcode(), self.itt())
    }
}

impl Default for Header {
    fn default() -> Self {
        Self([0; BHS_BYTES])
    }
}

impl Header {
    /// A header with the opcode set and every other byte zero.
    pub fn new(opcode: u8) -> Self {
        let mut header = Self::default();
        header.0[0] = opcode & 0x3f;
        header
    }
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn set_flags(&mut self, flags: u8) {
        self.0[1] = flags;
    }
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    pub fn ahs_bytes(&self) -> usize {
        usize::from(self.0[4]) * 4
    }
    pub fn data_segment_bytes(&self) -> usize {
        (usize::from(self.0[5]) << 16) | (usize::from(self.0[6]) << 8) | usize::from(self.0[7])
    }
    /// Sets DataSegmentLength; the caller guarantees it fits 24 bits.
    pub fn set_data_segment_bytes(&mut self, length: usize) {
        assert!(length < (1 << 24), "data segment length {length} does not fit 24 bits");
        let bytes = u32::try_from(length).unwrap_or(0).to_be_bytes();
        self.0[5..8].copy_from_slice(&bytes[1..4]);
    }
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn set_lun(&mut self, lun: u64) {
        self.set_u64(8, lun);
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, itt: u32) {
        self.set_u32(16, itt);
    }
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_be_bytes([self.0[offset], self.0[offset + 1]])
    }
    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[offset..offset + 4]);
        u32::from_be_bytes(b)
    }
    pub fn u64_at(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[offset..offset + 8]);
        u64::from_be_bytes(b)
    }
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.0[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
    }
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.0[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
    }
    pub fn set_u64(&mut self, offset: usize, value: u64) {
        self.0[offset..offset + 8].copy_from_slice(&value.to_be_bytes());
    }
}

/// A received PDU: header, AHS and the data segment without padding or digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub header: Header,
    pub ahs: Bytes,
    pub data: Bytes,
}

fn padded(length: usize) -> usize {
    (length + 3) & !3
}

/// Total bytes of the frame that starts with `bhs` (header, AHS, digests, padded data), or an
/// error if its data segment exceeds `data_limit_bytes`.
pub fn frame_bytes(
    bhs: &[u8; BHS_BYTES],
    digests: Digests,
    data_limit_bytes: usize,
) -> Result<usize, PduError> {
    let header = Header(*bhs);
    let data = header.data_segment_bytes();
    if data > data_limit_bytes {
        return Err(PduError::DataSegmentTooLong {
            length_bytes: data,
            limit_bytes: data_limit_bytes,
        });
    }
    let ahs = header.ahs_bytes();
    debug_assert!(ahs <= AHS_BYTES_MAX);
    let mut total = BHS_BYTES + ahs;
    if digests.header {
        total += 4;
    }
    if data > 0 {
        total += padded(data);
        if digests.data {
            total += 4;
        }
    }
    Ok(total)
}

/// Splits one complete frame (as sized by [`frame_bytes`]) into a [`Pdu`], checking digests.
pub fn decode(frame: Bytes, digests: Digests, data_limit_bytes: usize) -> Result<Pdu, PduError> {
    if frame.len() < BHS_BYTES {
        return Err(PduError::Truncated { length_bytes: frame.len() });
    }
    let mut bhs = [0u8; BHS_BYTES];
    bhs.copy_from_slice(&frame[..BHS_BYTES]);
    let expected = frame_bytes(&bhs, digests, data_limit_bytes)?;
    if frame.len() < expected {
        return Err(PduError::Truncated { length_bytes: frame.len() });
    }
    let header = Header(bhs);
    let ahs_end = BHS_BYTES + header.ahs_bytes();
    let mut position = ahs_end;
    if digests.header {
        let computed = crc32c::crc32c(&frame[..ahs_end]);
        let received = u32::from_le_bytes([
            frame[position],
            frame[position + 1],
            frame[position + 2],
            frame[position + 3],
        ]);
        if computed != received {
            return Err(PduError::HeaderDigest);
        }
        position += 4;
    }
    let data_length = header.data_segment_bytes();
    let data = frame.slice(position..position + data_length);
    if data_length > 0 && digests.data {
        let digest_at = position + padded(data_length);
        let computed = crc32c::crc32c(&frame[position..digest_at]);
        let received = u32::from_le_bytes([
            frame[digest_at],
            frame[digest_at + 1],
            frame[digest_at + 2],
            frame[digest_at + 3],
        ]);
        if computed != received {
            return Err(PduError::DataDigest { header: Box::new(header) });
        }
    }
    let ahs = frame.slice(BHS_BYTES..ahs_end);
    Ok(Pdu { header, ahs, data })
}

/// Appends the wire form of a PDU (header with DataSegmentLength set, digests, padding).
pub fn encode(out: &mut Vec<u8>, header: &Header, data: &[u8], digests: Digests) {
    let mut header = header.clone();
    header.set_data_segment_bytes(data.len());
    header.0[4] = 0;
    out.extend_from_slice(&header.0);
    if digests.header {
        out.extend_from_slice(&crc32c::crc32c(&header.0).to_le_bytes());
    }
    if !data.is_empty() {
        out.extend_from_slice(data);
        let pad = padded(data.len()) - data.len();
        out.extend_from_slice(&[0u8; 3][..pad]);
        if digests.data {
            let crc = crc32c::crc32c_append(crc32c::crc32c(data), &[0u8; 3][..pad]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Appends the header (with digest) of a PDU whose data segment the caller sends separately,
/// followed by [`encode_trailer`]. Lets large data go out without being copied.
pub fn encode_header(out: &mut Vec<u8>, header: &Header, data_length: usize, digests: Digests) {
    let mut header = header.clone();
    header.set_data_segment_bytes(data_length);
    header.0[4] = 0;
    out.extend_from_slice(&header.0);
    if digests.header {
        out.extend_from_slice(&crc32c::crc32c(&header.0).to_le_bytes());
    }
}

/// Appends the padding and data digest that follow a data segment sent on its own.
pub fn encode_trailer(out: &mut Vec<u8>, data: &[u8], digests: Digests) {
    if data.is_empty() {
        return;
    }
    let pad = padded(data.len()) - data.len();
    out.extend_from_slice(&[0u8; 3][..pad]);
    if digests.data {
        let crc = crc32c::crc32c_append(crc32c::crc32c(data), &[0u8; 3][..pad]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
}

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers: is `a` before `b`?
pub fn serial_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

/// `a <= b` in serial number arithmetic.
pub fn serial_le(a: u32, b: u32) -> bool {
    a == b || serial_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(digests: Digests, data_length: usize) {
        let mut header = Header::new(opcode::SCSI_COMMAND);
        header.set_itt(0x1234_5678);
        header.set_lun(1 << 48);
        let data: Vec<u8> = (0..data_length).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let mut wire = Vec::new();
        encode(&mut wire, &header, &data, digests);
        let mut bhs = [0u8; BHS_BYTES];
        bhs.copy_from_slice(&wire[..BHS_BYTES]);
        assert_eq!(frame_bytes(&bhs, digests, 1 << 20).unwrap(), wire.len());
        let pdu = decode(Bytes::from(wire), digests, 1 << 20).unwrap();
        assert_eq!(pdu.header.itt(), 0x1234_5678);
        assert_eq!(pdu.header.lun(), 1 << 48);
        assert_eq!(&pdu.data[..], &data[..]);
    }

    #[test]
    fn pdus_round_trip_with_every_digest_and_padding() {
        for header in [false, true] {
            for data in [false, true] {
                for length in [0, 1, 2, 3, 4, 5, 512, 4097] {
                    roundtrip(Digests { header, data }, length);
                }
            }
        }
    }

    #[test]
    fn corrupted_digests_are_detected() {
        let digests = Digests { header: true, data: true };
        let header = Header::new(opcode::NOP_OUT);
        let mut wire = Vec::new();
        encode(&mut wire, &header, b"hello", digests);
        let mut bad_header = wire.clone();
        bad_header[17] ^= 1;
        assert_eq!(
            decode(Bytes::from(bad_header), digests, 8192).unwrap_err(),
            PduError::HeaderDigest
        );
        let mut bad_data = wire.clone();
        bad_data[BHS_BYTES + 4] ^= 1;
        assert!(matches!(
            decode(Bytes::from(bad_data), digests, 8192).unwrap_err(),
            PduError::DataDigest { .. }
        ));
    }

    #[test]
    fn oversized_data_segment_is_refused_before_reading_it() {
        let mut header = Header::new(opcode::DATA_OUT);
        header.set_data_segment_bytes(9000);
        assert!(matches!(
            frame_bytes(&header.0, Digests::default(), 8192),
            Err(PduError::DataSegmentTooLong { .. })
        ));
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(serial_lt(u32::MAX, 0));
        assert!(serial_lt(5, 6));
        assert!(!serial_lt(6, 5));
        assert!(serial_le(7, 7));
    }
}

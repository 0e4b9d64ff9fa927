//! The session state machine in full feature phase, driven the way the tokio driver drives it:
//! after a scripted login, the fuzz input becomes a sequence of received byte chunks (framed
//! by `pdu::frame_bytes`/`pdu::decode` exactly as `driver::serve` does), well-formed PDUs
//! (valid framing and digests, arbitrary header and data), I/O completions (successes and
//! errors, in any order) answered from an in-memory device, and keepalive ticks.
//!
//! Checked: no panic, every I/O request stays inside the LUN, tasks in flight stay within the
//! command window, and the output of one step is bounded.
#![no_main]

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use iscsi_target::IoRequest;
use iscsi_target::connection::{Config, Connection, LogicalUnit, PortalAddress, TargetNode};
use iscsi_target::constants::{COMMANDS_MAX, IMMEDIATE_COMMANDS_MAX};
use iscsi_target::device::{BlockDevice, DeviceError, IoData, IoOp, MappedRange};
use iscsi_target::login::AuthConfig;
use iscsi_target::pdu::{self, Digests, Header, opcode};
use libfuzzer_sys::fuzz_target;

const TARGET: &str = "iqn.2026-11.org.tandem:fuzz";
const INITIATOR: &str = "iqn.2026-11.org.tandem:fuzzer";
/// Small, so that reads of the whole LUN stay cheap.
const DEVICE_BYTES: u64 = 256 * 512;
/// Output allowed for one step (one received chunk or one completion): a whole-LUN read with
/// its headers several times over, and room for many small responses.
const STEP_OUTPUT_BYTES_MAX: usize = 4 * DEVICE_BYTES as usize + 1024 * 1024;
/// Ops per input, so one input stays fast.
const STEPS_MAX: usize = 256;

struct MemoryDevice {
    data: Mutex<Vec<u8>>,
}

impl MemoryDevice {
    fn perform(&self, op: &IoOp) -> Result<IoData, DeviceError> {
        let mut data = self.data.lock().unwrap();
        let range = |offset: u64, length: u64| {
            assert!(
                offset.checked_add(length).is_some_and(|end| end <= DEVICE_BYTES),
                "I/O outside the LUN: {op:?}"
            );
            let start = usize::try_from(offset).unwrap();
            start..start + usize::try_from(length).unwrap()
        };
        Ok(match op {
            IoOp::Read { offset_bytes, length_bytes } => IoData::Read(Bytes::copy_from_slice(
                &data[range(*offset_bytes, u64::from(*length_bytes))],
            )),
            IoOp::Write { offset_bytes, data: bytes, .. }
            | IoOp::AtomicWrite { offset_bytes, data: bytes, .. } => {
                data[range(*offset_bytes, bytes.len() as u64)].copy_from_slice(bytes);
                IoData::None
            }
            IoOp::Flush | IoOp::PersistReservations { .. } => IoData::None,
            IoOp::Unmap { offset_bytes, length_bytes }
            | IoOp::WriteZeroes { offset_bytes, length_bytes } => {
                data[range(*offset_bytes, *length_bytes)].fill(0);
                IoData::None
            }
            IoOp::MappedRanges { offset_bytes, length_bytes } => {
                range(*offset_bytes, *length_bytes);
                IoData::Ranges(vec![MappedRange {
                    offset_bytes: *offset_bytes,
                    length_bytes: *length_bytes,
                    mapped: true,
                }])
            }
            IoOp::CompareAndWrite { offset_bytes, compare, data: bytes, .. } => {
                let r = range(*offset_bytes, compare.len() as u64);
                if let Some(at) = iscsi_target::device::first_difference(&data[r.clone()], compare)
                {
                    return Ok(IoData::Miscompare(at as u64));
                }
                assert_eq!(bytes.len(), compare.len(), "COMPARE AND WRITE halves differ");
                data[r].copy_from_slice(bytes);
                IoData::None
            }
            IoOp::OrWrite { offset_bytes, mask, .. } => {
                let r = range(*offset_bytes, mask.len() as u64);
                let merged = iscsi_target::device::or_bytes(&data[r.clone()], mask);
                data[r].copy_from_slice(&merged);
                IoData::None
            }
        })
    }
}

impl BlockDevice for MemoryDevice {
    fn size_bytes(&self) -> u64 {
        DEVICE_BYTES
    }
    async fn read(&self, _: u64, _: u32) -> Result<Bytes, DeviceError> {
        unreachable!("the fuzz target performs I/O synchronously")
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), DeviceError> {
        unreachable!()
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        unreachable!()
    }
    async fn unmap(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        unreachable!()
    }
    async fn write_zeroes(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        unreachable!()
    }
    async fn mapped_ranges(&self, _: u64, _: u64) -> Result<Vec<MappedRange>, DeviceError> {
        unreachable!()
    }
}

/// Reads the fuzz input front to back; exhausted input reads as zeroes.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

struct Harness {
    connection: Connection<MemoryDevice>,
    input: BytesMut,
    held: Vec<IoRequest<MemoryDevice>>,
    /// Complete I/O as soon as it is asked for instead of when the input says so.
    complete_at_once: bool,
}

impl Harness {
    /// Frames and handles every complete PDU buffered, like `driver::serve`.
    fn process_input(&mut self) {
        while self.input.len() >= 48 && !self.connection.is_closed() {
            let mut bhs = [0u8; 48];
            bhs.copy_from_slice(&self.input[..48]);
            let digests = self.connection.digests();
            let limit = self.connection.data_segment_limit_bytes();
            let total = match pdu::frame_bytes(&bhs, digests, limit) {
                Ok(total) => total,
                Err(error) => {
                    self.connection.handle_decode_error(&error);
                    return;
                }
            };
            if self.input.len() < total {
                return;
            }
            let frame = self.input.split_to(total).freeze();
            match pdu::decode(frame, digests, limit) {
                Ok(p) => self.connection.handle_pdu(p),
                Err(error) => {
                    self.connection.handle_decode_error(&error);
                    return;
                }
            }
            self.dispatch_io();
        }
    }

    fn dispatch_io(&mut self) {
        while let Some(request) = self.connection.poll_io() {
            // Checked when asked for, not only when performed: held I/O may never run.
            check_inside(&request.op);
            if self.complete_at_once {
                let result = request.device.perform(&request.op);
                self.connection.handle_io_completion(request.itt, request.tag, result);
            } else {
                self.held.push(request);
            }
        }
        let in_flight_max = (COMMANDS_MAX + IMMEDIATE_COMMANDS_MAX) as usize;
        assert!(
            self.connection.tasks_in_flight() <= in_flight_max,
            "{} tasks in flight",
            self.connection.tasks_in_flight()
        );
    }

    /// Takes everything queued for sending; returns its length in bytes.
    fn drain_output(&mut self) -> usize {
        let (mut bytes, mut segments) = (Vec::new(), Vec::new());
        self.connection.poll_transmit(&mut bytes, &mut segments);
        bytes.len() + segments.iter().map(|(_, s)| s.len()).sum::<usize>()
    }
}

fn check_inside(op: &IoOp) {
    let end =
        |offset: u64, length: u64| offset.checked_add(length).is_some_and(|e| e <= DEVICE_BYTES);
    let inside = match op {
        IoOp::Read { offset_bytes, length_bytes } => end(*offset_bytes, u64::from(*length_bytes)),
        IoOp::Write { offset_bytes, data, .. } | IoOp::AtomicWrite { offset_bytes, data, .. } => {
            end(*offset_bytes, data.len() as u64)
        }
        IoOp::Unmap { offset_bytes, length_bytes }
        | IoOp::WriteZeroes { offset_bytes, length_bytes }
        | IoOp::MappedRanges { offset_bytes, length_bytes } => end(*offset_bytes, *length_bytes),
        IoOp::CompareAndWrite { offset_bytes, compare, .. } => {
            end(*offset_bytes, compare.len() as u64)
        }
        IoOp::OrWrite { offset_bytes, mask, .. } => end(*offset_bytes, mask.len() as u64),
        IoOp::Flush | IoOp::PersistReservations { .. } => true,
    };
    assert!(inside, "I/O outside the LUN: {op:?}");
}

fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        iscsi_target::text::push(&mut out, k, v);
    }
    out
}

/// A connection with a session in full feature phase, negotiated as `options` says.
fn logged_in(options: u8) -> Harness {
    let device = Arc::new(MemoryDevice { data: Mutex::new(vec![0; DEVICE_BYTES as usize]) });
    let lun = Arc::new(LogicalUnit::new(TARGET, 0, device));
    let portals = vec![PortalAddress { address: "127.0.0.1:3260".into(), relative_port: 1 }];
    let config = Arc::new(Config::new(
        vec![TargetNode::new(TARGET, vec![lun])],
        AuthConfig::default(),
        portals,
    ));
    let connection = Connection::new(1, config, 1, [7u8; 32], 9);
    let yes_no = |bit: u8| if options & bit != 0 { "Yes" } else { "No" };
    let digest = |bit: u8| if options & bit != 0 { "CRC32C" } else { "None" };
    let pairs = [
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
        ("AuthMethod", "None"),
        ("HeaderDigest", digest(0x01)),
        ("DataDigest", digest(0x02)),
        ("ImmediateData", yes_no(0x04)),
        ("InitialR2T", yes_no(0x08)),
        ("MaxRecvDataSegmentLength", "8192"),
        ("FirstBurstLength", "65536"),
        ("MaxBurstLength", "262144"),
    ];
    let mut h = Header::new(opcode::LOGIN_REQUEST);
    h.0[0] |= 0x40;
    h.set_flags(0x80 | 3);
    h.set_u64(8, 0x0002_3d00_0001 << 16);
    h.set_itt(0);
    h.set_u32(24, 1);
    let mut wire = Vec::new();
    pdu::encode(&mut wire, &h, &text(&pairs), Digests::default());
    let mut harness = Harness {
        connection,
        input: BytesMut::from(&wire[..]),
        held: Vec::new(),
        complete_at_once: options & 0x10 != 0,
    };
    harness.process_input();
    let (mut bytes, mut segments) = (Vec::new(), Vec::new());
    harness.connection.poll_transmit(&mut bytes, &mut segments);
    assert!(segments.is_empty() && bytes.len() >= 48, "one login response");
    let response = Header(bytes[..48].try_into().unwrap());
    assert_eq!(response.u16_at(36), 0, "login succeeds");
    assert!(response.final_bit(), "in full feature phase");
    harness
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut h = logged_in(input.byte());
    // CmdSN the next well-formed command gets when the input asks for a valid one.
    let mut cmd_sn: u32 = 1;
    for _ in 0..STEPS_MAX {
        if input.0.is_empty() || h.connection.is_closed() {
            break;
        }
        let op = input.byte();
        match op % 8 {
            // Raw received bytes, split anywhere.
            0..=2 => {
                let n = usize::from(input.byte()) + usize::from(op >> 3) * 256;
                let chunk = input.take(n).to_vec();
                h.input.extend_from_slice(&chunk);
                h.process_input();
            }
            // A well-formed PDU: arbitrary header and data, valid framing and digests.
            3..=5 => {
                let mut header = [0u8; 48];
                let raw = input.take(48);
                header[..raw.len()].copy_from_slice(raw);
                let mut header = Header(header);
                if op & 0x08 != 0 {
                    header.set_u32(24, cmd_sn);
                    if header.opcode() == opcode::SCSI_COMMAND && !header.immediate() {
                        cmd_sn = cmd_sn.wrapping_add(1);
                    }
                }
                if op & 0x10 != 0 {
                    header.set_lun(iscsi_target::connection::encode_lun(0));
                }
                let length = usize::from(input.byte()) * (if op & 0x20 != 0 { 64 } else { 1 });
                let payload = input.take(length).to_vec();
                let mut wire = Vec::new();
                pdu::encode(&mut wire, &header, &payload, h.connection.digests());
                h.input.extend_from_slice(&wire);
                h.process_input();
            }
            // Complete a held I/O, successfully or not.
            6 => {
                if !h.held.is_empty() {
                    let at = usize::from(input.byte()) % h.held.len();
                    let request = h.held.swap_remove(at);
                    let result = match input.byte() % 8 {
                        0 => Err(DeviceError::OutOfRange),
                        1 => Err(DeviceError::NoSpace),
                        2 => Err(DeviceError::Io("fuzz".into())),
                        3 => Err(DeviceError::Standby),
                        _ => request.device.perform(&request.op),
                    };
                    h.connection.handle_io_completion(request.itt, request.tag, result);
                    h.dispatch_io();
                }
            }
            // Keepalive tick, or the peer goes away.
            _ => {
                if op & 0x80 != 0 {
                    h.connection.handle_disconnect();
                } else {
                    h.connection.handle_idle();
                }
                h.dispatch_io();
            }
        }
        let out = h.drain_output();
        assert!(out <= STEP_OUTPUT_BYTES_MAX, "{out} bytes out for one step");
        while h.connection.poll_event().is_some() {}
    }
    // Whatever is still held completes (a driver finishes in-flight I/O even on close).
    for request in std::mem::take(&mut h.held) {
        let result = request.device.perform(&request.op);
        h.connection.handle_io_completion(request.itt, request.tag, result);
        h.dispatch_io();
        let out = h.drain_output();
        assert!(out <= STEP_OUTPUT_BYTES_MAX, "{out} bytes out for one completion");
    }
});

//! The forward link's frames: pure encoding and decoding, bounded.
//!
//! ```text
//! frame   := body_bytes:u32 body
//! body    := kind:u8 id:u64 payload
//! HELLO   := magic:"TANDEMFW" version:u16 node:str          (client -> server, id 0)
//! WELCOME := node:str                                        (server -> client, id 0)
//! REQUEST := resource:str sender_node_id:u8 request          (client -> server)
//! REPLY   := 0 (done) | 1 outcome | 2 reason:str (refused)  (server -> client, same id)
//! request := type:u8 target:str initiator:str isid:u64 port:u16
//!            [cmd: lun:u64 cdb:[16] data:bytes | reset: count:u16 lun:u64*]
//! outcome := status:u8 descriptor:u8 sense? data:bytes
//! str     := len:u16 utf8      bytes := len:u32 raw
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use iscsi_target::remote::{ForwardReply, ForwardRequest, ForwardedCommand, ForwardedOutcome};
use iscsi_target::scsi::pr::Nexus;
use iscsi_target::scsi::sense::Sense;

use crate::constants::{FORWARD_FRAME_BYTES_MAX, FORWARD_RESET_LUNS_MAX, FORWARD_STRING_BYTES_MAX};

pub const MAGIC: &[u8; 8] = b"TANDEMFW";
pub const VERSION: u16 = 1;

pub mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const REPLY: u8 = 4;
}

mod request_type {
    pub const COMMAND: u8 = 1;
    pub const NEXUS_UP: u8 = 2;
    pub const NEXUS_LOST: u8 = 3;
    pub const RESET: u8 = 4;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello { node: String },
    Welcome { node: String },
    Request { id: u64, resource: String, sender_node_id: u8, request: ForwardRequest },
    Reply { id: u64, reply: Result<ForwardReply, String> },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("truncated frame")]
    Truncated,
    #[error("bad frame: {0}")]
    Bad(&'static str),
}

/// Bytes of the frame whose first bytes are `header`, once its length prefix is here.
pub fn frame_bytes(header: &[u8]) -> Result<Option<usize>, WireError> {
    if header.len() < 4 {
        return Ok(None);
    }
    let body = usize::try_from(u32::from_be_bytes([header[0], header[1], header[2], header[3]]))
        .map_err(|_| WireError::TooLarge(usize::MAX))?;
    if body > FORWARD_FRAME_BYTES_MAX {
        return Err(WireError::TooLarge(body));
    }
    Ok(Some(4 + body))
}

fn put_str(out: &mut BytesMut, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(FORWARD_STRING_BYTES_MAX)];
    out.put_u16(u16::try_from(bytes.len()).unwrap_or(0));
    out.put_slice(bytes);
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(u32::try_from(b.len()).unwrap_or(0));
    out.put_slice(b);
}

fn put_nexus(out: &mut BytesMut, n: &Nexus) {
    put_str(out, &n.initiator_name);
    out.put_u64(n.isid);
    out.put_u16(n.relative_port);
}

fn put_sense(out: &mut BytesMut, sense: &Option<Sense>) {
    let Some(s) = sense else {
        out.put_u8(0);
        return;
    };
    out.put_u8(1);
    out.put_slice(&[s.key, s.asc, s.ascq]);
    match s.information {
        Some(info) => {
            out.put_u8(1);
            out.put_u64(info);
        }
        None => out.put_u8(0),
    }
    match s.field_pointer {
        Some((in_cdb, byte, bit)) => {
            out.put_u8(1);
            out.put_u8(u8::from(in_cdb));
            out.put_u16(byte);
            out.put_u8(bit.map_or(0xff, |b| b & 0x7));
        }
        None => out.put_u8(0),
    }
}

/// Encodes `frame`; payloads larger than the link allows are a caller bug (the iSCSI layer
/// bounds a command's data to `TRANSFER_BYTES_MAX`, which the frame limit covers).
pub fn encode(frame: &Frame) -> Bytes {
    let mut body = BytesMut::with_capacity(64);
    match frame {
        Frame::Hello { node } => {
            body.put_u8(kind::HELLO);
            body.put_u64(0);
            body.put_slice(MAGIC);
            body.put_u16(VERSION);
            put_str(&mut body, node);
        }
        Frame::Welcome { node } => {
            body.put_u8(kind::WELCOME);
            body.put_u64(0);
            put_str(&mut body, node);
        }
        Frame::Request { id, resource, sender_node_id, request } => {
            body.put_u8(kind::REQUEST);
            body.put_u64(*id);
            put_str(&mut body, resource);
            body.put_u8(*sender_node_id);
            let (kind, nexus) = match request {
                ForwardRequest::Command(c) => (request_type::COMMAND, &c.nexus),
                ForwardRequest::NexusUp { nexus, .. } => (request_type::NEXUS_UP, nexus),
                ForwardRequest::NexusLost { nexus, .. } => (request_type::NEXUS_LOST, nexus),
                ForwardRequest::Reset { nexus, .. } => (request_type::RESET, nexus),
            };
            body.put_u8(kind);
            put_str(&mut body, request.target_name());
            put_nexus(&mut body, nexus);
            match request {
                ForwardRequest::Command(c) => {
                    body.put_u64(c.lun);
                    body.put_slice(&c.cdb);
                    put_bytes(&mut body, &c.data_out);
                }
                ForwardRequest::Reset { luns, .. } => {
                    let count = luns.len().min(FORWARD_RESET_LUNS_MAX);
                    body.put_u16(u16::try_from(count).unwrap_or(0));
                    for lun in &luns[..count] {
                        body.put_u64(*lun);
                    }
                }
                _ => {}
            }
        }
        Frame::Reply { id, reply } => {
            body.put_u8(kind::REPLY);
            body.put_u64(*id);
            match reply {
                Ok(ForwardReply::Done) => body.put_u8(0),
                Ok(ForwardReply::Outcome(o)) => {
                    body.put_u8(1);
                    body.put_u8(o.status);
                    body.put_u8(u8::from(o.descriptor_sense));
                    put_sense(&mut body, &o.sense);
                    put_bytes(&mut body, &o.data);
                }
                Err(reason) => {
                    body.put_u8(2);
                    put_str(&mut body, reason);
                }
            }
        }
    }
    assert!(body.len() <= FORWARD_FRAME_BYTES_MAX, "forward frame over the limit");
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    out.put_slice(&body);
    out.freeze()
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.remaining() < n { Err(WireError::Truncated) } else { Ok(()) }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn take(&mut self, n: usize) -> Result<Bytes, WireError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = usize::from(self.u16()?);
        if n > FORWARD_STRING_BYTES_MAX {
            return Err(WireError::Bad("string too long"));
        }
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::Bad("string not UTF-8"))
    }
    fn bytes(&mut self) -> Result<Bytes, WireError> {
        let n = usize::try_from(self.u32()?).map_err(|_| WireError::Bad("length"))?;
        self.take(n)
    }
    fn nexus(&mut self) -> Result<Nexus, WireError> {
        Ok(Nexus { initiator_name: self.string()?, isid: self.u64()?, relative_port: self.u16()? })
    }
    fn sense(&mut self) -> Result<Option<Sense>, WireError> {
        if self.u8()? == 0 {
            return Ok(None);
        }
        let mut sense = Sense::new(self.u8()?, self.u8()?, self.u8()?);
        if self.u8()? == 1 {
            sense.information = Some(self.u64()?);
        }
        if self.u8()? == 1 {
            let in_cdb = self.u8()? != 0;
            let byte = self.u16()?;
            let bit = self.u8()?;
            sense.field_pointer = Some((in_cdb, byte, (bit != 0xff).then_some(bit & 0x7)));
        }
        Ok(Some(sense))
    }
}

/// Decodes one whole frame (length prefix included, as [`frame_bytes`] measured it).
pub fn decode(frame: Bytes) -> Result<Frame, WireError> {
    let total = frame_bytes(&frame)?.ok_or(WireError::Truncated)?;
    if frame.len() != total {
        return Err(WireError::Truncated);
    }
    let mut r = Reader { buf: frame.slice(4..) };
    let kind = r.u8()?;
    let id = r.u64()?;
    let frame = match kind {
        kind::HELLO => {
            if r.take(MAGIC.len())?.as_ref() != MAGIC {
                return Err(WireError::Bad("not a forward link"));
            }
            if r.u16()? != VERSION {
                return Err(WireError::Bad("unknown version"));
            }
            Frame::Hello { node: r.string()? }
        }
        kind::WELCOME => Frame::Welcome { node: r.string()? },
        kind::REQUEST => {
            let resource = r.string()?;
            let sender_node_id = r.u8()?;
            let kind = r.u8()?;
            let target_name = r.string()?;
            let nexus = r.nexus()?;
            let request = match kind {
                request_type::COMMAND => {
                    let lun = r.u64()?;
                    let mut cdb = [0u8; 16];
                    cdb.copy_from_slice(&r.take(16)?);
                    let data_out = r.bytes()?;
                    ForwardRequest::Command(ForwardedCommand {
                        target_name,
                        lun,
                        nexus,
                        cdb,
                        data_out,
                    })
                }
                request_type::NEXUS_UP => ForwardRequest::NexusUp { target_name, nexus },
                request_type::NEXUS_LOST => ForwardRequest::NexusLost { target_name, nexus },
                request_type::RESET => {
                    let count = usize::from(r.u16()?);
                    if count > FORWARD_RESET_LUNS_MAX {
                        return Err(WireError::Bad("too many LUNs"));
                    }
                    let luns = (0..count).map(|_| r.u64()).collect::<Result<_, _>>()?;
                    ForwardRequest::Reset { target_name, luns, nexus }
                }
                _ => return Err(WireError::Bad("unknown request type")),
            };
            Frame::Request { id, resource, sender_node_id, request }
        }
        kind::REPLY => {
            let reply = match r.u8()? {
                0 => Ok(ForwardReply::Done),
                1 => {
                    let status = r.u8()?;
                    let descriptor_sense = r.u8()? != 0;
                    let sense = r.sense()?;
                    let data = r.bytes()?;
                    Ok(ForwardReply::Outcome(ForwardedOutcome {
                        status,
                        sense,
                        descriptor_sense,
                        data,
                    }))
                }
                2 => Err(r.string()?),
                _ => return Err(WireError::Bad("unknown reply type")),
            };
            Frame::Reply { id, reply }
        }
        _ => return Err(WireError::Bad("unknown frame kind")),
    };
    if r.buf.has_remaining() {
        return Err(WireError::Bad("trailing bytes"));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus() -> Nexus {
        Nexus { initiator_name: "iqn.test:init".into(), isid: 0x23d_0000_0001, relative_port: 17 }
    }

    #[test]
    fn every_frame_round_trips() {
        let mut sense = Sense::invalid_field_in_cdb(7).with_information(12);
        sense.field_pointer = Some((true, 7, Some(3)));
        let frames = vec![
            Frame::Hello { node: "beta".into() },
            Frame::Welcome { node: "alpha".into() },
            Frame::Request {
                id: 7,
                resource: "r0".into(),
                sender_node_id: 1,
                request: ForwardRequest::Command(ForwardedCommand {
                    target_name: "iqn.x:r0".into(),
                    lun: 0,
                    nexus: nexus(),
                    cdb: [0x2a; 16],
                    data_out: Bytes::from(vec![5u8; 4096]),
                }),
            },
            Frame::Request {
                id: 8,
                resource: "r0".into(),
                sender_node_id: 1,
                request: ForwardRequest::Reset {
                    target_name: "t".into(),
                    luns: vec![0, 3],
                    nexus: nexus(),
                },
            },
            Frame::Request {
                id: 9,
                resource: "r0".into(),
                sender_node_id: 1,
                request: ForwardRequest::NexusLost { target_name: "t".into(), nexus: nexus() },
            },
            Frame::Reply { id: 7, reply: Ok(ForwardReply::Done) },
            Frame::Reply {
                id: 7,
                reply: Ok(ForwardReply::Outcome(ForwardedOutcome {
                    status: 2,
                    sense: Some(sense),
                    descriptor_sense: true,
                    data: Bytes::from_static(b"abc"),
                })),
            },
            Frame::Reply { id: 1, reply: Err("not primary".into()) },
        ];
        for frame in frames {
            assert_eq!(decode(encode(&frame)), Ok(frame));
        }
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let good = encode(&Frame::Hello { node: "beta".into() });
        for cut in 0..good.len() {
            assert!(decode(good.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut foreign = good.to_vec();
        foreign[13] ^= 0xff;
        assert_eq!(decode(Bytes::from(foreign)), Err(WireError::Bad("not a forward link")));
        let huge = (u32::try_from(FORWARD_FRAME_BYTES_MAX).unwrap() + 1).to_be_bytes();
        assert!(matches!(frame_bytes(&huge), Err(WireError::TooLarge(_))));
    }
}

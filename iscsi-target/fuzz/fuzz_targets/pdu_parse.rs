//! Arbitrary bytes through the PDU framing and decoding code (BHS, AHS, padding, header and
//! data digests) and the text-key parser: bad input must give an error, never a panic.
#![no_main]

use bytes::Bytes;
use iscsi_target::pdu::{self, Digests};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first byte picks the digests in force and the data segment limit; the rest is the
    // received stream.
    let Some((&mode, stream)) = input.split_first() else { return };
    let digests = Digests { header: mode & 1 != 0, data: mode & 2 != 0 };
    let limit_bytes = match mode >> 2 & 3 {
        0 => 8192,
        1 => 256 * 1024,
        2 => 0,
        _ => usize::from(mode),
    };
    // Decoding any prefix must not panic, whatever its length.
    let _ = pdu::decode(Bytes::copy_from_slice(stream), digests, limit_bytes);
    let mut rest = stream;
    while rest.len() >= 48 {
        let mut bhs = [0u8; 48];
        bhs.copy_from_slice(&rest[..48]);
        let Ok(n) = pdu::frame_bytes(&bhs, digests, limit_bytes) else { return };
        assert!(n >= 48, "a frame is at least its header");
        let frame = Bytes::copy_from_slice(&rest[..n.min(rest.len())]);
        match pdu::decode(frame, digests, limit_bytes) {
            Ok(p) => {
                assert_eq!(p.data.len(), p.header.data_segment_bytes());
                assert_eq!(p.ahs.len(), p.header.ahs_bytes());
                let _ = iscsi_target::text::parse(&p.data);
                // What decodes re-encodes to the same frame (no AHS in our encoder).
                if p.ahs.is_empty() {
                    let mut wire = Vec::new();
                    pdu::encode(&mut wire, &p.header, &p.data, digests);
                    assert_eq!(wire.len(), n);
                    let again = pdu::decode(Bytes::from(wire), digests, limit_bytes)
                        .expect("an encoded PDU decodes");
                    assert_eq!(again.header.0[..4], p.header.0[..4]);
                    assert_eq!(again.data, p.data);
                }
            }
            Err(_) if n > rest.len() => return,
            Err(_) => {}
        }
        rest = &rest[n.min(rest.len())..];
    }
});

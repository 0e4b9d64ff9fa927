//! The persistent-reservation state of a logical unit as bytes, so a device can keep it with
//! its data (a storage node writes it into the replicated device, see `storage-node`'s
//! `reservations.rs`) and the node that takes the logical unit over loads the same state.
//!
//! What persists is what SPC-4 says survives an I_T nexus loss and a change of the node
//! serving the logical unit: the registrations (I_T nexus, key, ALL_TG_PT), the persistent
//! reservation (holder and type) and the PRgeneration counter (SPC-4 §6.15.2: it only grows,
//! so an initiator never sees it go back after a failover). RESERVE(6) is tied to one I_T
//! nexus and is not kept.
//!
//! Layout (big endian): magic `TDPR`, format 1 (u16), registration count (u16), image
//! version (u64, grows with every change so the newest of several copies wins), PRgeneration
//! (u32), then each registration (key u64, flags u8: bit 0 ALL_TG_PT, relative port u16, ISID
//! u64, name length u16, name), then the reservation (present u8; the holder's nexus as for a registration; type u8), and a CRC32C of everything before it. A torn or stale copy fails the magic or the checksum.
//! Pure: bytes in, state out.

use super::pr::{ISCSI_NAME_BYTES_MAX, Nexus, Registration, Reservation, ReservationState};
use crate::constants::PR_REGISTRATIONS_MAX;

const MAGIC: &[u8; 4] = b"TDPR";
const FORMAT: u16 = 1;
const HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 4;
const NEXUS_BYTES_MAX: usize = 2 + 8 + 2 + ISCSI_NAME_BYTES_MAX;
const REGISTRATION_BYTES_MAX: usize = 8 + 1 + NEXUS_BYTES_MAX;
const RESERVATION_BYTES_MAX: usize = 1 + NEXUS_BYTES_MAX + 1;
const CHECKSUM_BYTES: usize = 4;

/// The longest image: every registration with the longest iSCSI name, and a reservation.
pub const RESERVATION_IMAGE_BYTES_MAX: usize = HEADER_BYTES
    + PR_REGISTRATIONS_MAX * REGISTRATION_BYTES_MAX
    + RESERVATION_BYTES_MAX
    + CHECKSUM_BYTES;
const _: () = assert!(PR_REGISTRATIONS_MAX <= u16::MAX as usize);
const _: () = assert!(RESERVATION_IMAGE_BYTES_MAX <= 64 * 1024);

/// Why bytes are not a reservation image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("no reservation image here (magic or format)")]
    Absent,
    #[error("reservation image truncated")]
    Truncated,
    #[error("reservation image checksum mismatch (torn write)")]
    Checksum,
    #[error("reservation image malformed: {0}")]
    Malformed(&'static str),
}

fn put_nexus(out: &mut Vec<u8>, nexus: &Nexus) {
    out.extend_from_slice(&nexus.relative_port.to_be_bytes());
    out.extend_from_slice(&nexus.isid.to_be_bytes());
    let name = nexus.initiator_name.as_bytes();
    let name = &name[..name.len().min(ISCSI_NAME_BYTES_MAX)];
    out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(name);
}

/// Encodes the persistent part of `state` as image `version`.
pub fn encode(state: &ReservationState, version: u64) -> Vec<u8> {
    assert!(state.registrations.len() <= PR_REGISTRATIONS_MAX);
    let mut out = Vec::with_capacity(HEADER_BYTES + state.registrations.len() * 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_be_bytes());
    out.extend_from_slice(&u16::try_from(state.registrations.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&state.generation.to_be_bytes());
    for r in &state.registrations {
        out.extend_from_slice(&r.key.to_be_bytes());
        out.push(u8::from(r.all_tg_pt));
        put_nexus(&mut out, &r.nexus);
    }
    match &state.reservation {
        Some(r) => {
            out.push(1);
            put_nexus(&mut out, &r.holder);
            out.push(r.reservation_type);
        }
        None => out.push(0),
    }
    let checksum = crc32c::crc32c(&out);
    out.extend_from_slice(&checksum.to_be_bytes());
    assert!(out.len() <= RESERVATION_IMAGE_BYTES_MAX);
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ImageError> {
        let end = self.at.checked_add(n).ok_or(ImageError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(ImageError::Truncated)?;
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, ImageError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ImageError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ImageError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ImageError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn nexus(&mut self) -> Result<Nexus, ImageError> {
        let relative_port = self.u16()?;
        let isid = self.u64()?;
        let length = usize::from(self.u16()?);
        if length == 0 || length > ISCSI_NAME_BYTES_MAX {
            return Err(ImageError::Malformed("initiator name length"));
        }
        let name = std::str::from_utf8(self.take(length)?)
            .map_err(|_| ImageError::Malformed("initiator name is not UTF-8"))?;
        Ok(Nexus { initiator_name: name.to_owned(), isid, relative_port })
    }
}

/// Decodes an image from the start of `bytes` (trailing bytes, e.g. a slot's padding, are
/// ignored); returns its version and the state (without RESERVE(6), which never persists).
pub fn decode(bytes: &[u8]) -> Result<(u64, ReservationState), ImageError> {
    if bytes.len() < HEADER_BYTES || &bytes[..4] != MAGIC {
        return Err(ImageError::Absent);
    }
    let mut r = Reader { bytes, at: 4 };
    if r.u16()? != FORMAT {
        return Err(ImageError::Absent);
    }
    let count = usize::from(r.u16()?);
    if count > PR_REGISTRATIONS_MAX {
        return Err(ImageError::Malformed("too many registrations"));
    }
    let version = r.u64()?;
    let generation = r.u32()?;
    let mut registrations = Vec::with_capacity(count);
    for _ in 0..count {
        let key = r.u64()?;
        let flags = r.u8()?;
        let nexus = r.nexus()?;
        registrations.push(Registration { nexus, key, all_tg_pt: flags & 1 != 0 });
    }
    let reservation = match r.u8()? {
        0 => None,
        1 => {
            let holder = r.nexus()?;
            let reservation_type = r.u8()?;
            if !super::pr::pr_type::valid(reservation_type) {
                return Err(ImageError::Malformed("reservation type"));
            }
            Some(Reservation { holder, reservation_type })
        }
        _ => return Err(ImageError::Malformed("reservation flag")),
    };
    let end = r.at;
    let stored = r.u32()?;
    if crc32c::crc32c(&bytes[..end]) != stored {
        return Err(ImageError::Checksum);
    }
    let state = ReservationState { generation, registrations, reservation, reserve6: None };
    Ok((version, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::pr::pr_type;

    fn nexus(name: &str, isid: u64, port: u16) -> Nexus {
        Nexus { initiator_name: name.into(), isid, relative_port: port }
    }

    fn sample() -> ReservationState {
        let a = nexus("iqn.2026-11.org.tandem:a", 0x23d_0000_0001, 1);
        let b = nexus("iqn.2026-11.org.tandem:b", 0x23d_0000_0002, 17);
        ReservationState {
            generation: 7,
            registrations: vec![
                Registration { nexus: a.clone(), key: 0xa, all_tg_pt: false },
                Registration { nexus: b, key: 0xb, all_tg_pt: true },
            ],
            reservation: Some(Reservation {
                holder: a,
                reservation_type: pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            }),
            reserve6: None,
        }
    }

    #[test]
    fn round_trips_and_drops_reserve6() {
        let mut state = sample();
        let bytes = encode(&state, 42);
        state.reserve6 = Some(nexus("iqn.x", 1, 1));
        let mut padded = bytes.clone();
        padded.resize(4096, 0);
        let (version, decoded) = decode(&padded).unwrap();
        assert_eq!(version, 42);
        state.reserve6 = None;
        assert_eq!(decoded, state);
        assert_eq!(decode(&encode(&ReservationState::default(), 1)).unwrap().1, Default::default());
    }

    #[test]
    fn torn_stale_and_foreign_bytes_are_refused() {
        let bytes = encode(&sample(), 3);
        let cases: Vec<(Vec<u8>, ImageError)> = vec![
            (vec![0; 4096], ImageError::Absent),
            (bytes[..10].to_vec(), ImageError::Absent),
            (bytes[..bytes.len() - 2].to_vec(), ImageError::Truncated),
            (
                {
                    let mut b = bytes.clone();
                    b[30] ^= 0x40;
                    b
                },
                ImageError::Checksum,
            ),
            (
                {
                    let mut b = bytes.clone();
                    b[4] = 9;
                    b
                },
                ImageError::Absent,
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(decode(&input).map(|_| ()), Err(expected));
        }
    }

    #[test]
    fn the_largest_state_fits_the_bound() {
        let name = "n".repeat(ISCSI_NAME_BYTES_MAX);
        let registrations = (0..PR_REGISTRATIONS_MAX)
            .map(|i| Registration {
                nexus: nexus(&name, i as u64, 1),
                key: i as u64 + 1,
                all_tg_pt: false,
            })
            .collect::<Vec<_>>();
        let holder = registrations[0].nexus.clone();
        let state = ReservationState {
            generation: u32::MAX,
            registrations,
            reservation: Some(Reservation { holder, reservation_type: pr_type::EXCLUSIVE_ACCESS }),
            reserve6: None,
        };
        let bytes = encode(&state, u64::MAX);
        assert_eq!(bytes.len(), RESERVATION_IMAGE_BYTES_MAX);
        assert_eq!(decode(&bytes).unwrap().1, state);
    }
}

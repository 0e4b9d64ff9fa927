//! SCSI status codes and sense data (SPC-4 §4.5), fixed or descriptor format.

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// One sense condition: key, additional sense code and qualifier, and optional fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (e.g. the offset of the first miscompare).
    pub information: Option<u64>,
    /// Sense-key specific field pointer: (is the error in the CDB, byte, bit).
    pub field_pointer: Option<(bool, u16, Option<u8>)>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self { key, asc, ascq, information: None, field_pointer: None }
    }
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at `byte`.
    pub const fn invalid_field_in_cdb(byte: u16) -> Self {
        Self {
            field_pointer: Some((true, byte, None)),
            ..Self::new(key::ILLEGAL_REQUEST, 0x24, 0x00)
        }
    }
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing at `byte`.
    pub const fn invalid_field_in_parameter_list(byte: u16) -> Self {
        Self {
            field_pointer: Some((false, byte, None)),
            ..Self::new(key::ILLEGAL_REQUEST, 0x26, 0x00)
        }
    }
    pub fn with_information(mut self, information: u64) -> Self {
        self.information = Some(information);
        self
    }

    /// Encodes the sense data; `descriptor` selects descriptor format (D_SENSE).
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        let sks = self.field_pointer.map(|(cdb, byte, bit)| {
            let mut b = [0u8; 3];
            b[0] = 0x80 | if cdb { 0x40 } else { 0 };
            if let Some(bit) = bit {
                b[0] |= 0x08 | (bit & 7);
            }
            b[1..3].copy_from_slice(&byte.to_be_bytes());
            b
        });
        if descriptor {
            let mut out = vec![0x72, self.key & 0xf, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(information) = self.information {
                out.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                out.extend_from_slice(&information.to_be_bytes());
            }
            if let Some(sks) = sks {
                out.extend_from_slice(&[0x02, 0x06, 0, 0]);
                out.extend_from_slice(&sks);
                out.push(0);
            }
            out[7] = u8::try_from(out.len() - 8).unwrap_or(0);
            out
        } else {
            let mut out = vec![0u8; 18];
            out[0] = 0x70;
            out[2] = self.key & 0xf;
            if let Some(information) = self.information {
                out[0] |= 0x80;
                let low = u32::try_from(information & 0xffff_ffff).unwrap_or(0);
                out[3..7].copy_from_slice(&low.to_be_bytes());
            }
            out[7] = 10;
            out[12] = self.asc;
            out[13] = self.ascq;
            if let Some(sks) = sks {
                out[15..18].copy_from_slice(&sks);
            }
            out
        }
    }
}

/// The sense conditions this target reports, named after their SPC-4 descriptions.
pub mod codes {
    use super::{Sense, key};
    pub const INVALID_COMMAND_OPERATION_CODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Sense =
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense =
        Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x04);
    pub const MEDIUM_REMOVAL_PREVENTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02);
    pub const ALUA_STANDBY: Sense = Sense::new(key::NOT_READY, 0x04, 0x0b);
    /// LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION: retry later or elsewhere.
    pub const ALUA_TRANSITION: Sense = Sense::new(key::NOT_READY, 0x04, 0x0a);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    pub const POWER_ON_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    pub const BUS_DEVICE_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x03);
    pub const MODE_PARAMETERS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x01);
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x04);
    pub const ASYMMETRIC_ACCESS_STATE_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x06);
    /// SBC-3 §4.6: the logical unit's capacity changed (an online resize).
    pub const CAPACITY_DATA_HAS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x09);
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x05);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Sense =
        Sense::new(key::UNIT_ATTENTION, 0x2f, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_descriptor_formats_carry_key_and_codes() {
        let s = Sense::invalid_field_in_cdb(2).with_information(7);
        let fixed = s.encode(false);
        assert_eq!((fixed[0], fixed[2], fixed[12], fixed[13]), (0xf0, 5, 0x24, 0));
        assert_eq!(&fixed[3..7], &[0, 0, 0, 7]);
        assert_eq!(&fixed[15..18], &[0xc0, 0, 2]);
        let descriptor = s.encode(true);
        assert_eq!(
            (descriptor[0], descriptor[1], descriptor[2], descriptor[3]),
            (0x72, 5, 0x24, 0)
        );
        assert_eq!(usize::from(descriptor[7]), descriptor.len() - 8);
    }
}

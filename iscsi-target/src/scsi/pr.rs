//! Persistent reservations (SPC-4 §5.13) and RESERVE(6)/RELEASE(6), as plain data so the
//! storage node can later replicate the state with the volume.

use super::sense::{Sense, codes};
use crate::constants::PR_REGISTRATIONS_MAX;

/// Longest iSCSI name (RFC 7143 §4.2.7.1).
pub const ISCSI_NAME_BYTES_MAX: usize = 223;
/// Longest iSCSI TransportID we accept: a 4-byte header and the longest format 01h body
/// ("name,i,0x" + 12 hex ISID digits + NUL) padded to a multiple of 4.
pub const PR_TRANSPORT_ID_BYTES_MAX: usize = 252;
/// Fixed part of a PERSISTENT RESERVE OUT parameter list.
pub const PROUT_PARAMETER_BYTES: usize = 24;
/// Shortest TransportID: SPC-4 requires an iSCSI TransportID of at least 24 bytes.
pub const PR_TRANSPORT_ID_BYTES_MIN: usize = 24;
const ISID_SEPARATOR: &str = ",i,0x";
const ISID_HEX_DIGITS_MAX: usize = 12;
const _: () = assert!(
    PR_TRANSPORT_ID_BYTES_MAX
        >= 4 + (ISCSI_NAME_BYTES_MAX + ISID_SEPARATOR.len() + ISID_HEX_DIGITS_MAX + 1).div_ceil(4)
            * 4
);
const _: () = assert!(PR_TRANSPORT_ID_BYTES_MIN <= PR_TRANSPORT_ID_BYTES_MAX);
/// Most TransportIDs one REGISTER with SPEC_I_PT may name.
pub const PR_SPEC_I_PT_TRANSPORT_IDS_MAX: usize = 64;
/// Longest PERSISTENT RESERVE OUT parameter list we read: the fixed part, the TransportID
/// parameter data length and the most TransportIDs SPEC_I_PT may carry.
pub const PROUT_PARAMETER_LIST_BYTES_MAX: usize =
    PROUT_PARAMETER_BYTES + 4 + PR_SPEC_I_PT_TRANSPORT_IDS_MAX * PR_TRANSPORT_ID_BYTES_MAX;
const _: () = assert!(PR_SPEC_I_PT_TRANSPORT_IDS_MAX <= PR_REGISTRATIONS_MAX);
const _: () =
    assert!(PROUT_PARAMETER_LIST_BYTES_MAX >= PROUT_PARAMETER_BYTES + PR_TRANSPORT_ID_BYTES_MAX);
const _: () = assert!(PR_TRANSPORT_ID_BYTES_MAX.is_multiple_of(4));

/// SCSI transport protocol identifier of iSCSI (SPC-4 §7.6.1).
const PROTOCOL_ISCSI: u8 = 0x5;
/// PERSISTENT RESERVE OUT service action REGISTER AND MOVE.
pub const REGISTER_AND_MOVE: u8 = 0x07;

/// An iSCSI TransportID, decoded (SPC-4 §7.6.4.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportId {
    /// Format 00h: an initiator device (all its ports), by iSCSI name.
    Device(String),
    /// Format 01h: one initiator port, by iSCSI name and ISID.
    Port { initiator_name: String, isid: u64 },
}

/// Decodes one iSCSI TransportID from the start of `bytes`; returns it and its length.
/// `None` for anything malformed or of another protocol, which callers answer with INVALID
/// FIELD IN PARAMETER LIST.
pub fn parse_transport_id(bytes: &[u8]) -> Option<(TransportId, usize)> {
    let header = bytes.get(..4)?;
    let format = header[0] >> 6;
    if header[0] & 0x0f != PROTOCOL_ISCSI || header[0] & 0x30 != 0 {
        return None;
    }
    let additional = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let total = 4 + additional;
    if !additional.is_multiple_of(4)
        || !(PR_TRANSPORT_ID_BYTES_MIN..=PR_TRANSPORT_ID_BYTES_MAX).contains(&total)
    {
        return None;
    }
    let body = bytes.get(4..total)?;
    // The name is NUL-terminated; only NUL padding may follow.
    let end = body.iter().position(|&b| b == 0)?;
    if body[end..].iter().any(|&b| b != 0) {
        return None;
    }
    let text = std::str::from_utf8(&body[..end]).ok()?;
    let id = match format {
        0 => {
            if text.contains(',') {
                return None;
            }
            TransportId::Device(valid_name(text)?.to_owned())
        }
        1 => {
            let lower = text.to_ascii_lowercase();
            let at = lower.rfind(ISID_SEPARATOR)?;
            let digits = &text[at + ISID_SEPARATOR.len()..];
            if digits.is_empty()
                || digits.len() > ISID_HEX_DIGITS_MAX
                || !digits.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return None;
            }
            let isid = u64::from_str_radix(digits, 16).ok()?;
            TransportId::Port { initiator_name: valid_name(&text[..at])?.to_owned(), isid }
        }
        _ => return None,
    };
    Some((id, total))
}

fn valid_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= ISCSI_NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b',');
    ok.then_some(name)
}

/// An I_T nexus: the initiator port (name + ISID) and the target port it logged in through.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexus {
    pub initiator_name: String,
    pub isid: u64,
    /// Relative target port identifier (1-based portal index).
    pub relative_port: u16,
}

impl Nexus {
    /// The iSCSI initiator port TransportID (SPC-4 §7.6.4.6, format 01b: name,i,0x ISID).
    pub fn transport_id(&self) -> Vec<u8> {
        let name = format!("{},i,0x{:012x}", self.initiator_name, self.isid);
        let mut body = name.into_bytes();
        body.push(0);
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
        let mut out = vec![0x40 | 0x05, 0];
        out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// Persistent reservation types.
pub mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;
    pub fn valid(t: u8) -> bool {
        matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
    }
    pub fn all_registrants(t: u8) -> bool {
        t == WRITE_EXCLUSIVE_ALL_REGISTRANTS || t == EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub nexus: Nexus,
    pub key: u64,
    /// Made by a REGISTER with ALL_TG_PT (one such registration per target port), reported
    /// by READ FULL STATUS.
    pub all_tg_pt: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The holder; for all-registrants types every registrant holds it and this is the one
    /// that created it.
    pub holder: Nexus,
    pub reservation_type: u8,
}

/// What a command does to the medium, for reservation conflict checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Always allowed (INQUIRY, REPORT LUNS, PERSISTENT RESERVE ...).
    Free,
    Read,
    Write,
}

/// The state one logical unit keeps about reservations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReservationState {
    pub generation: u32,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// SPC-2 RESERVE(6) holder.
    pub reserve6: Option<Nexus>,
}

/// Unit attentions to queue for other nexuses after a PR change.
pub type Notices = Vec<(Nexus, Sense)>;

/// Outcome of a PERSISTENT RESERVE OUT.
#[derive(Debug, PartialEq, Eq)]
pub enum ProutResult {
    Good(Notices),
    Conflict,
    Check(Sense),
}

impl ReservationState {
    pub fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations.iter().find(|r| &r.nexus == nexus).map(|r| r.key)
    }

    fn is_holder(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(r) if pr_type::all_registrants(r.reservation_type) => self.key_of(nexus).is_some(),
            Some(r) => &r.holder == nexus,
            None => false,
        }
    }

    /// Whether `nexus` may run a command with this access now.
    pub fn allows(&self, nexus: &Nexus, access: Access) -> bool {
        if access == Access::Free {
            return true;
        }
        if let Some(holder) = &self.reserve6
            && holder != nexus
        {
            return false;
        }
        let Some(reservation) = &self.reservation else { return true };
        if self.is_holder(nexus) {
            return true;
        }
        let registered = self.key_of(nexus).is_some();
        match reservation.reservation_type {
            pr_type::WRITE_EXCLUSIVE => access == Access::Read,
            pr_type::EXCLUSIVE_ACCESS => false,
            pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | pr_type::WRITE_EXCLUSIVE_ALL_REGISTRANTS => registered || access == Access::Read,
            pr_type::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | pr_type::EXCLUSIVE_ACCESS_ALL_REGISTRANTS => registered,
            _ => false,
        }
    }

    /// RESERVE(6): conflicts with persistent reservations and other holders.
    pub fn reserve6(&mut self, nexus: &Nexus) -> bool {
        if self.reservation.is_some() || !self.registrations.is_empty() {
            return false;
        }
        match &self.reserve6 {
            Some(holder) if holder != nexus => false,
            _ => {
                self.reserve6 = Some(nexus.clone());
                true
            }
        }
    }

    /// RELEASE(6): releasing someone else's reservation is a no-op, not an error.
    pub fn release6(&mut self, nexus: &Nexus) {
        if self.reserve6.as_ref() == Some(nexus) {
            self.reserve6 = None;
        }
    }

    /// Drops what a nexus held when it goes away (only RESERVE(6) state; PR persists).
    pub fn nexus_lost(&mut self, nexus: &Nexus) {
        self.release6(nexus);
    }

    fn others(&self, nexus: &Nexus) -> Vec<Nexus> {
        self.registrations.iter().filter(|r| &r.nexus != nexus).map(|r| r.nexus.clone()).collect()
    }

    /// PERSISTENT RESERVE OUT with service action `action`, scope/type byte `scope_type` and
    /// the 24-byte parameter list values already decoded.
    pub fn prout(
        &mut self,
        nexus: &Nexus,
        action: u8,
        scope_type: u8,
        key: u64,
        service_key: u64,
    ) -> ProutResult {
        let registered_key = self.key_of(nexus);
        let reservation_type = scope_type & 0xf;
        match action {
            0 | 6 => {
                let ignore = action == 6;
                match registered_key {
                    None => {
                        if !ignore && key != 0 {
                            return ProutResult::Conflict;
                        }
                        if service_key != 0 {
                            if self.registrations.len() >= PR_REGISTRATIONS_MAX {
                                return ProutResult::Check(
                                    codes::INSUFFICIENT_REGISTRATION_RESOURCES,
                                );
                            }
                            self.registrations.push(Registration {
                                nexus: nexus.clone(),
                                key: service_key,
                                all_tg_pt: false,
                            });
                        }
                        self.generation = self.generation.wrapping_add(1);
                        ProutResult::Good(Vec::new())
                    }
                    Some(current) => {
                        if !ignore && key != current {
                            return ProutResult::Conflict;
                        }
                        let mut notices = Vec::new();
                        if service_key == 0 {
                            notices = self.unregister(nexus);
                        } else if let Some(r) =
                            self.registrations.iter_mut().find(|r| &r.nexus == nexus)
                        {
                            r.key = service_key;
                        }
                        self.generation = self.generation.wrapping_add(1);
                        ProutResult::Good(notices)
                    }
                }
            }
            1 => {
                if registered_key != Some(key) {
                    return ProutResult::Conflict;
                }
                if scope_type >> 4 != 0 {
                    return ProutResult::Check(Sense::invalid_field_in_cdb(2));
                }
                if !pr_type::valid(reservation_type) {
                    return ProutResult::Check(Sense::invalid_field_in_cdb(2));
                }
                match &self.reservation {
                    None => {
                        self.reservation =
                            Some(Reservation { holder: nexus.clone(), reservation_type });
                        ProutResult::Good(Vec::new())
                    }
                    Some(r) if self.is_holder(nexus) && r.reservation_type == reservation_type => {
                        ProutResult::Good(Vec::new())
                    }
                    Some(_) => ProutResult::Conflict,
                }
            }
            2 => {
                if registered_key != Some(key) {
                    return ProutResult::Conflict;
                }
                let Some(r) = self.reservation.clone() else {
                    return ProutResult::Good(Vec::new());
                };
                if !self.is_holder(nexus) {
                    return ProutResult::Good(Vec::new());
                }
                if r.reservation_type != reservation_type || scope_type >> 4 != 0 {
                    return ProutResult::Check(codes::INVALID_RELEASE_OF_PERSISTENT_RESERVATION);
                }
                self.reservation = None;
                let notices = if matches!(
                    r.reservation_type,
                    pr_type::WRITE_EXCLUSIVE | pr_type::EXCLUSIVE_ACCESS
                ) {
                    Vec::new()
                } else {
                    self.others(nexus)
                        .into_iter()
                        .map(|n| (n, codes::RESERVATIONS_RELEASED))
                        .collect()
                };
                ProutResult::Good(notices)
            }
            3 => {
                if registered_key != Some(key) {
                    return ProutResult::Conflict;
                }
                let notices = self
                    .others(nexus)
                    .into_iter()
                    .map(|n| (n, codes::RESERVATIONS_PREEMPTED))
                    .collect();
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
                ProutResult::Good(notices)
            }
            4 | 5 => {
                if registered_key != Some(key) {
                    return ProutResult::Conflict;
                }
                if !pr_type::valid(reservation_type) && self.reservation.is_some() {
                    return ProutResult::Check(Sense::invalid_field_in_cdb(2));
                }
                let mut notices = Vec::new();
                match self.reservation.clone() {
                    Some(r) if pr_type::all_registrants(r.reservation_type) => {
                        if service_key == 0 {
                            for n in self.others(nexus) {
                                notices.push((n, codes::REGISTRATIONS_PREEMPTED));
                            }
                            self.registrations.retain(|x| &x.nexus == nexus);
                            self.reservation =
                                Some(Reservation { holder: nexus.clone(), reservation_type });
                        } else {
                            let removed = self.remove_key(nexus, service_key);
                            if removed.is_empty() {
                                return ProutResult::Conflict;
                            }
                            notices.extend(
                                removed.into_iter().map(|n| (n, codes::REGISTRATIONS_PREEMPTED)),
                            );
                        }
                    }
                    Some(r) if self.key_of(&r.holder) == Some(service_key) => {
                        let removed = self.remove_key(nexus, service_key);
                        let removed_set = removed.clone();
                        notices.extend(
                            removed.into_iter().map(|n| (n, codes::REGISTRATIONS_PREEMPTED)),
                        );
                        if r.reservation_type != reservation_type || r.holder != *nexus {
                            for n in self.others(nexus) {
                                if !removed_set.contains(&n) {
                                    notices.push((n, codes::RESERVATIONS_RELEASED));
                                }
                            }
                        }
                        self.reservation =
                            Some(Reservation { holder: nexus.clone(), reservation_type });
                    }
                    _ => {
                        if service_key == 0 {
                            return ProutResult::Check(Sense::invalid_field_in_parameter_list(8));
                        }
                        let removed = self.remove_key(nexus, service_key);
                        if removed.is_empty() {
                            return ProutResult::Conflict;
                        }
                        notices.extend(
                            removed.into_iter().map(|n| (n, codes::REGISTRATIONS_PREEMPTED)),
                        );
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                ProutResult::Good(notices)
            }
            _ => ProutResult::Check(Sense::invalid_field_in_cdb(1)),
        }
    }

    /// PERSISTENT RESERVE OUT REGISTER (`action` 0) or REGISTER AND IGNORE EXISTING KEY (6)
    /// with the whole parameter list, so the SPEC_I_PT, ALL_TG_PT and APTPL bits apply
    /// (SPC-4 §5.12.7, §6.16.3). `ports` are the relative identifiers of this target's ports.
    /// SPEC_I_PT and ALL_TG_PT only matter when the sender is not registered yet; the new
    /// registrations are made all together or not at all.
    pub fn register(
        &mut self,
        nexus: &Nexus,
        action: u8,
        params: &[u8],
        ports: &[u16],
    ) -> ProutResult {
        assert!(action == 0 || action == 6, "register() handles REGISTER service actions only");
        let Some(fixed) = params.get(..PROUT_PARAMETER_BYTES) else {
            return ProutResult::Check(codes::PARAMETER_LIST_LENGTH_ERROR);
        };
        let key = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or_default());
        let service_key = u64::from_be_bytes(fixed[8..16].try_into().unwrap_or_default());
        let flags = fixed[20];
        let spec_i_pt = flags & 0x08 != 0;
        let all_tg_pt = flags & 0x04 != 0;
        let ids = if spec_i_pt {
            let Some(length) = params.get(PROUT_PARAMETER_BYTES..PROUT_PARAMETER_BYTES + 4) else {
                return ProutResult::Check(codes::PARAMETER_LIST_LENGTH_ERROR);
            };
            let length = usize::try_from(u32::from_be_bytes(length.try_into().unwrap_or_default()))
                .unwrap_or(usize::MAX);
            if length > PROUT_PARAMETER_LIST_BYTES_MAX
                || params.len() != PROUT_PARAMETER_BYTES + 4 + length
            {
                return ProutResult::Check(codes::PARAMETER_LIST_LENGTH_ERROR);
            }
            &params[PROUT_PARAMETER_BYTES + 4..]
        } else {
            if params.len() != PROUT_PARAMETER_BYTES {
                return ProutResult::Check(codes::PARAMETER_LIST_LENGTH_ERROR);
            }
            &[][..]
        };
        let registered = self.key_of(nexus);
        let ignore = action == 6;
        // Key checks first: a wrong key is a RESERVATION CONFLICT whatever else is asked.
        match registered {
            Some(current) if !ignore && key != current => return ProutResult::Conflict,
            None if !ignore && key != 0 => return ProutResult::Conflict,
            _ => {}
        }
        if flags & 0x01 != 0 {
            // APTPL: persisting through power loss is not supported (PTPL_C = 0).
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(20));
        }
        // SPEC_I_PT is valid for REGISTER only, and only from an unregistered I_T nexus.
        if spec_i_pt && (ignore || registered.is_some()) {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(20));
        }
        if registered.is_some() || service_key == 0 {
            return self.prout(nexus, action, 0, key, service_key);
        }
        let ports_for = |port: u16| -> Vec<u16> {
            if all_tg_pt {
                let mut all = ports.to_vec();
                if !all.contains(&port) {
                    all.push(port);
                }
                all
            } else {
                vec![port]
            }
        };
        let mut new: Vec<Nexus> = ports_for(nexus.relative_port)
            .into_iter()
            .map(|p| Nexus { relative_port: p, ..nexus.clone() })
            .collect();
        let mut at = 0;
        let mut count = 0;
        while at < ids.len() {
            count += 1;
            if count > PR_SPEC_I_PT_TRANSPORT_IDS_MAX {
                return ProutResult::Check(codes::INSUFFICIENT_REGISTRATION_RESOURCES);
            }
            let field = u16::try_from(PROUT_PARAMETER_BYTES + 4 + at).unwrap_or(u16::MAX);
            let Some((id, used)) = parse_transport_id(&ids[at..]) else {
                return ProutResult::Check(Sense::invalid_field_in_parameter_list(field));
            };
            // Format 00h names every port of a device; we cannot know the ports of an
            // initiator that has not logged in, so only format 01h (one port) is accepted.
            let TransportId::Port { initiator_name, isid } = id else {
                return ProutResult::Check(Sense::invalid_field_in_parameter_list(field));
            };
            for p in ports_for(nexus.relative_port) {
                let target =
                    Nexus { initiator_name: initiator_name.clone(), isid, relative_port: p };
                if self.key_of(&target).is_some() {
                    // SPC-4: naming an already registered I_T nexus is an error.
                    return ProutResult::Check(Sense::invalid_field_in_parameter_list(field));
                }
                if !new.contains(&target) {
                    new.push(target);
                }
            }
            at += used;
        }
        if self.registrations.len() + new.len() > PR_REGISTRATIONS_MAX {
            return ProutResult::Check(codes::INSUFFICIENT_REGISTRATION_RESOURCES);
        }
        for n in new {
            self.registrations.push(Registration { nexus: n, key: service_key, all_tg_pt });
        }
        self.generation = self.generation.wrapping_add(1);
        ProutResult::Good(Vec::new())
    }

    /// PERSISTENT RESERVE OUT REGISTER AND MOVE (SPC-4 §5.12.8, §6.16.4): `params` is the
    /// whole parameter list the initiator sent (the CDB's length already applied) and
    /// `ports` the relative identifiers of this target's ports. The caller must hold the
    /// reservation; the reservation moves, same type and scope, to the I_T nexus named by the
    /// TransportID and RELATIVE TARGET PORT IDENTIFIER, which is registered with the service
    /// action reservation key; with UNREG the caller is unregistered.
    pub fn register_and_move(
        &mut self,
        nexus: &Nexus,
        params: &[u8],
        ports: &[u16],
    ) -> ProutResult {
        let Some(fixed) = params.get(..PROUT_PARAMETER_BYTES) else {
            return ProutResult::Check(codes::PARAMETER_LIST_LENGTH_ERROR);
        };
        let key = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or_default());
        let service_key = u64::from_be_bytes(fixed[8..16].try_into().unwrap_or_default());
        let flags = fixed[17];
        let relative_port = u16::from_be_bytes([fixed[18], fixed[19]]);
        let id_length =
            usize::try_from(u32::from_be_bytes(fixed[20..24].try_into().unwrap_or_default()))
                .unwrap_or(usize::MAX);
        if id_length > PR_TRANSPORT_ID_BYTES_MAX {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(20));
        }
        if params.len() != PROUT_PARAMETER_BYTES + id_length {
            return ProutResult::Check(codes::PARAMETER_LIST_LENGTH_ERROR);
        }
        // Only the holder may move the reservation, and only with its own key.
        if self.key_of(nexus) != Some(key) {
            return ProutResult::Conflict;
        }
        let Some(reservation) = self.reservation.clone() else {
            return ProutResult::Conflict;
        };
        // All-registrants reservations have no single holder to move (SPC-4 §5.12.8 answers
        // RESERVATION CONFLICT).
        if pr_type::all_registrants(reservation.reservation_type) || reservation.holder != *nexus {
            return ProutResult::Conflict;
        }
        if flags & 0xfc != 0 || fixed[16] != 0 {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(17));
        }
        if flags & 0x01 != 0 {
            // APTPL: persisting through power loss is not supported (PTPL_C = 0).
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(17));
        }
        if service_key == 0 {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(8));
        }
        let id_field = u16::try_from(PROUT_PARAMETER_BYTES).unwrap_or(0);
        let Some((id, used)) = parse_transport_id(&params[PROUT_PARAMETER_BYTES..]) else {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(id_field));
        };
        if used != id_length {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(20));
        }
        // Format 00h names a device, not the single initiator port a reservation moves to.
        let TransportId::Port { initiator_name, isid } = id else {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(id_field));
        };
        if !ports.contains(&relative_port) {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(18));
        }
        let destination = Nexus { initiator_name, isid, relative_port };
        if destination == *nexus {
            return ProutResult::Check(Sense::invalid_field_in_parameter_list(id_field));
        }
        match self.registrations.iter_mut().find(|r| r.nexus == destination) {
            Some(r) => r.key = service_key,
            None => {
                // UNREG frees the caller's slot, so a full table can still move.
                let unreg = flags & 0x02 != 0;
                if self.registrations.len() >= PR_REGISTRATIONS_MAX && !unreg {
                    return ProutResult::Check(codes::INSUFFICIENT_REGISTRATION_RESOURCES);
                }
                self.registrations.push(Registration {
                    nexus: destination.clone(),
                    key: service_key,
                    all_tg_pt: false,
                });
            }
        }
        self.reservation = Some(Reservation {
            holder: destination,
            reservation_type: reservation.reservation_type,
        });
        if flags & 0x02 != 0 {
            self.registrations.retain(|r| &r.nexus != nexus);
        }
        self.generation = self.generation.wrapping_add(1);
        ProutResult::Good(Vec::new())
    }

    /// Extends registrations made through other nodes' ports to this node's, when this node
    /// takes the logical unit over (a failover). `port_here` maps a relative port identifier
    /// to the one this node serves in its place (same portal index), `None` for its own.
    ///
    /// Why: an initiator without multipath follows the service IP to the new primary and
    /// logs in again through the new primary's port, a different relative target port and so
    /// a different I_T nexus (SPC-4 §5.13.1: a registration belongs to one I_T nexus unless
    /// made with ALL_TG_PT). Its fence keys must keep working there, so each registration
    /// through a port of another node is also made for the same initiator port (name and
    /// ISID) through this node's port, with the same key, unless one exists. The originals
    /// stay (a multipath path through the old node, back as a remote port, keeps its own).
    /// A reservation held through another node's port moves to the corresponding port here:
    /// that is where the holder's commands arrive now. PRgeneration is unchanged (no PERSISTENT
    /// RESERVE OUT ran). Returns how many registrations were added.
    pub fn take_over_ports(&mut self, port_here: impl Fn(u16) -> Option<u16>) -> usize {
        let mut added = 0;
        let existing = self.registrations.clone();
        for r in &existing {
            let Some(port) = port_here(r.nexus.relative_port) else { continue };
            let nexus = Nexus { relative_port: port, ..r.nexus.clone() };
            if self.key_of(&nexus).is_some() || self.registrations.len() >= PR_REGISTRATIONS_MAX {
                continue;
            }
            self.registrations.push(Registration { nexus, key: r.key, all_tg_pt: r.all_tg_pt });
            added += 1;
        }
        if let Some(reservation) = &mut self.reservation
            && let Some(port) = port_here(reservation.holder.relative_port)
        {
            let moved = Nexus { relative_port: port, ..reservation.holder.clone() };
            if self.registrations.iter().any(|r| r.nexus == moved) {
                reservation.holder = moved;
            }
        }
        added
    }

    /// Removes registrations with `key` other than the caller's own; returns the removed nexuses.
    fn remove_key(&mut self, nexus: &Nexus, key: u64) -> Vec<Nexus> {
        let removed: Vec<Nexus> = self
            .registrations
            .iter()
            .filter(|r| r.key == key && &r.nexus != nexus)
            .map(|r| r.nexus.clone())
            .collect();
        self.registrations.retain(|r| !(r.key == key && &r.nexus != nexus));
        if let Some(r) = &self.reservation
            && removed.contains(&r.holder)
            && !pr_type::all_registrants(r.reservation_type)
        {
            self.reservation = None;
        }
        removed
    }

    fn unregister(&mut self, nexus: &Nexus) -> Notices {
        self.registrations.retain(|r| &r.nexus != nexus);
        let mut notices = Vec::new();
        if let Some(r) = self.reservation.clone() {
            let holder_leaves = if pr_type::all_registrants(r.reservation_type) {
                self.registrations.is_empty()
            } else {
                r.holder == *nexus
            };
            if pr_type::all_registrants(r.reservation_type)
                && !self.registrations.is_empty()
                && r.holder == *nexus
            {
                // Another registrant keeps holding an all-registrants reservation.
                if let Some(next) = self.registrations.first() {
                    self.reservation = Some(Reservation {
                        holder: next.nexus.clone(),
                        reservation_type: r.reservation_type,
                    });
                }
            }
            if holder_leaves {
                self.reservation = None;
                if matches!(
                    r.reservation_type,
                    pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY
                        | pr_type::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
                ) {
                    notices = self
                        .others(nexus)
                        .into_iter()
                        .map(|n| (n, codes::RESERVATIONS_RELEASED))
                        .collect();
                }
            }
        }
        notices
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(n: u64) -> Nexus {
        Nexus { initiator_name: format!("iqn.test:{n}"), isid: n, relative_port: 1 }
    }

    #[test]
    fn a_takeover_extends_registrations_and_the_holder_to_this_nodes_port() {
        let mut s = ReservationState::default();
        let a = nexus(1);
        let b = Nexus { relative_port: 17, ..nexus(2) };
        assert_eq!(s.prout(&a, 0, 0, 0, 0xa), ProutResult::Good(vec![]));
        assert_eq!(s.prout(&b, 0, 0, 0, 0xb), ProutResult::Good(vec![]));
        assert_eq!(s.prout(&a, 1, pr_type::EXCLUSIVE_ACCESS, 0xa, 0), ProutResult::Good(vec![]));
        let generation = s.generation;
        // This node serves port 17 in place of port 1.
        let added = s.take_over_ports(|p| (p == 1).then_some(17));
        assert_eq!((added, s.generation), (1, generation));
        let a_here = Nexus { relative_port: 17, ..a.clone() };
        assert_eq!(s.key_of(&a_here), Some(0xa));
        assert_eq!(s.key_of(&a), Some(0xa), "the original stays");
        assert!(s.allows(&a_here, Access::Write), "the holder's commands arrive here now");
        assert!(!s.allows(&b, Access::Read));
        // Idempotent.
        assert_eq!(s.take_over_ports(|p| (p == 1).then_some(17)), 0);
    }

    #[test]
    fn register_reserve_and_access_rules() {
        let mut s = ReservationState::default();
        let (a, b, c) = (nexus(1), nexus(2), nexus(3));
        assert_eq!(s.prout(&a, 0, 0, 0, 0xa), ProutResult::Good(vec![]));
        assert_eq!(s.prout(&b, 0, 0, 0, 0xb), ProutResult::Good(vec![]));
        assert_eq!(
            s.prout(&a, 1, pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 0xa, 0),
            ProutResult::Good(vec![])
        );
        assert!(s.allows(&b, Access::Write));
        assert!(!s.allows(&c, Access::Write));
        assert!(s.allows(&c, Access::Read));
        // Reserving a different type while reserved conflicts.
        assert_eq!(s.prout(&b, 1, pr_type::EXCLUSIVE_ACCESS, 0xb, 0), ProutResult::Conflict);
        // A wrong key conflicts.
        assert_eq!(
            s.prout(&a, 2, pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 0xbad, 0),
            ProutResult::Conflict
        );
        // Preempting the holder moves the reservation.
        assert!(matches!(
            s.prout(&b, 4, pr_type::EXCLUSIVE_ACCESS, 0xb, 0xa),
            ProutResult::Good(_)
        ));
        assert_eq!(s.key_of(&a), None);
        assert!(!s.allows(&a, Access::Read));
        assert!(s.allows(&b, Access::Write));
    }
}

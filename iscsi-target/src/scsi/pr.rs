//! Persistent reservations (SPC-4 §5.13) and RESERVE(6)/RELEASE(6), as plain data so the
//! storage node can later replicate the state with the volume.

use super::sense::{Sense, codes};
use crate::constants::PR_REGISTRATIONS_MAX;

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
                            self.registrations
                                .push(Registration { nexus: nexus.clone(), key: service_key });
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

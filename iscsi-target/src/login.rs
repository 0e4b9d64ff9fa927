//! The login phase (RFC 7143 §6.3, §11.12-13): security stage with CHAP (one-way or mutual),
//! operational stage with key negotiation, and the transition to full feature phase.
//!
//! Pure: the caller passes the random CHAP challenge in and decides what a completed login
//! means for other sessions (reinstatement).

use crate::chap::{self, Algorithm};
use crate::constants::{
    CHAP_CHALLENGE_BYTES, CHAP_CHALLENGE_BYTES_MIN, LOGIN_PDUS_MAX, TEXT_BYTES_MAX,
};
use crate::pdu::{Header, Pdu, opcode};
use crate::text::{self, KeyOutcome, SessionParams};

/// A user name and secret for CHAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub secret: String,
}

/// Who may log in, and how they prove it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Required CHAP credentials of the initiator; `None` means no authentication.
    pub chap: Option<Credentials>,
    /// Credentials the target proves itself with when the initiator asks (mutual CHAP).
    pub mutual_chap: Option<Credentials>,
    /// Initiator names allowed to log in to normal sessions; empty allows everyone.
    pub allowed_initiators: Vec<String>,
}

/// Login status class and detail (RFC 7143 §11.13.5).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const AUTHENTICATION_FAILURE: u16 = 0x0201;
    pub const AUTHORIZATION_FAILURE: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const INITIATOR_ERROR: u16 = 0x0200;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// What a successful login establishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Established {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub target_name: Option<String>,
    pub isid: u64,
    pub tsih: u16,
    pub params: SessionParams,
    /// The CmdSN the initiator will use for its first command in full feature phase.
    pub exp_cmdsn: u32,
    /// StatSN of the next status we send.
    pub stat_sn: u32,
}

/// The result of one login request.
#[derive(Debug)]
pub struct LoginStep {
    pub response: (Header, Vec<u8>),
    pub outcome: LoginOutcome,
}

#[derive(Debug)]
pub enum LoginOutcome {
    Continue,
    /// The login failed: send the response, then close the connection.
    Failed(u16),
    Established(Box<Established>),
}

/// The security stage's CHAP exchange, named after what it expects next.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Chap {
    ExpectAuthMethod,
    ExpectAlgorithm,
    ExpectResponse { algorithm: Algorithm, identifier: u8 },
    Done,
}

/// Lookup of target names, implemented by the target configuration.
pub trait TargetDirectory {
    fn has_target(&self, name: &str) -> bool;
    /// The target's own authentication, which replaces the portal-wide one for normal sessions
    /// to it (a storage node exports each volume with its own CHAP identity).
    fn target_auth(&self, _name: &str) -> Option<AuthConfig> {
        None
    }
    /// Allocates a TSIH for a new session (never 0).
    fn allocate_tsih(&self) -> u16;
}

pub struct Login {
    challenge: [u8; CHAP_CHALLENGE_BYTES],
    identifier: u8,
    first: Option<First>,
    chap: Chap,
    authenticated: bool,
    params: SessionParams,
    current_stage: u8,
    pdus: u32,
    pending_text: Vec<u8>,
    declared_recv_length: bool,
    sent_portal_group: bool,
    stat_sn: u32,
    tpgt: u16,
}

#[derive(Clone, Debug)]
struct First {
    isid: u64,
    tsih: u16,
    cmdsn: u32,
    initiator_name: String,
    target_name: Option<String>,
    session_type: SessionType,
}

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;

impl Login {
    /// `challenge` and `identifier` must come from a good random source: they are what makes a
    /// recorded CHAP response useless for another login.
    pub fn new(
        challenge: [u8; CHAP_CHALLENGE_BYTES],
        identifier: u8,
        tpgt: u16,
        stat_sn: u32,
    ) -> Self {
        Self {
            challenge,
            identifier,
            first: None,
            chap: Chap::ExpectAuthMethod,
            authenticated: false,
            params: SessionParams::default(),
            current_stage: STAGE_SECURITY,
            pdus: 0,
            pending_text: Vec::new(),
            declared_recv_length: false,
            sent_portal_group: false,
            stat_sn,
            tpgt,
        }
    }

    fn response(
        &mut self,
        request: &Header,
        transit: bool,
        csg: u8,
        nsg: u8,
        status: u16,
    ) -> Header {
        let mut h = Header::new(opcode::LOGIN_RESPONSE);
        let mut flags = (csg << 2) | if transit { nsg } else { 0 };
        if transit {
            flags |= 0x80;
        }
        h.set_flags(flags);
        h.0[2] = 0;
        h.0[3] = 0;
        h.0[8..14].copy_from_slice(&request.0[8..14]);
        if let Some(first) = &self.first {
            h.set_u16(14, first.tsih);
        }
        h.set_itt(request.itt());
        h.set_u32(24, self.stat_sn);
        let cmdsn = request.u32_at(24);
        h.set_u32(28, cmdsn);
        // Open the whole command window at once, so the initiator can pipeline from its very
        // first command instead of waiting for a response to widen it.
        h.set_u32(32, cmdsn.wrapping_add(crate::constants::COMMANDS_MAX - 1));
        h.set_u16(36, status);
        h
    }

    fn fail(&mut self, request: &Header, code: u16) -> LoginStep {
        let csg = (request.flags() >> 2) & 3;
        let h = self.response(request, false, csg, 0, code);
        LoginStep { response: (h, Vec::new()), outcome: LoginOutcome::Failed(code) }
    }

    /// Handles one Login Request PDU.
    pub fn handle_request(
        &mut self,
        pdu: &Pdu,
        auth: &AuthConfig,
        targets: &dyn TargetDirectory,
    ) -> LoginStep {
        let request = &pdu.header;
        self.pdus += 1;
        if request.opcode() != opcode::LOGIN_REQUEST || self.pdus > LOGIN_PDUS_MAX {
            return self.fail(request, status::INVALID_DURING_LOGIN);
        }
        let flags = request.flags();
        let transit = flags & 0x80 != 0;
        let continued = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        if transit && continued {
            return self.fail(request, status::INITIATOR_ERROR);
        }
        // Version-min above 0 asks for a protocol we do not speak.
        if request.0[3] > 0 {
            return self.fail(request, status::UNSUPPORTED_VERSION);
        }
        if csg == 2 || csg == STAGE_FULL_FEATURE || csg < self.current_stage {
            return self.fail(request, status::INITIATOR_ERROR);
        }
        if transit && (nsg <= csg || nsg == 2) {
            return self.fail(request, status::INITIATOR_ERROR);
        }
        if self.pending_text.len() + pdu.data.len() > TEXT_BYTES_MAX {
            return self.fail(request, status::INITIATOR_ERROR);
        }
        self.pending_text.extend_from_slice(&pdu.data);
        if continued {
            // The initiator splits its keys over several PDUs: acknowledge and wait for the rest.
            let h = self.response(request, false, csg, 0, status::SUCCESS);
            return LoginStep { response: (h, Vec::new()), outcome: LoginOutcome::Continue };
        }
        let keys = text::parse(&std::mem::take(&mut self.pending_text));
        if self.first.is_none() {
            let initiator_name =
                keys.iter().find(|(k, _)| k == "InitiatorName").map(|(_, v)| v.clone());
            let Some(initiator_name) = initiator_name.filter(|n| !n.is_empty()) else {
                return self.fail(request, status::MISSING_PARAMETER);
            };
            let session_type =
                match keys.iter().find(|(k, _)| k == "SessionType").map(|(_, v)| v.as_str()) {
                    None | Some("Normal") => SessionType::Normal,
                    Some("Discovery") => SessionType::Discovery,
                    Some(_) => return self.fail(request, status::INITIATOR_ERROR),
                };
            let target_name = keys.iter().find(|(k, _)| k == "TargetName").map(|(_, v)| v.clone());
            if session_type == SessionType::Normal {
                match &target_name {
                    None => return self.fail(request, status::MISSING_PARAMETER),
                    Some(name) if !targets.has_target(name) => {
                        return self.fail(request, status::NOT_FOUND);
                    }
                    Some(_) => {}
                }
                let own_auth = target_name.as_deref().and_then(|name| targets.target_auth(name));
                let allowed = &own_auth.as_ref().unwrap_or(auth).allowed_initiators;
                if !allowed.is_empty() && !allowed.iter().any(|a| a == &initiator_name) {
                    return self.fail(request, status::AUTHORIZATION_FAILURE);
                }
            }
            let tsih = request.u16_at(14);
            if tsih != 0 {
                // Adding a connection to an existing session (MC/S) is not supported.
                return self.fail(request, status::SESSION_DOES_NOT_EXIST);
            }
            self.first = Some(First {
                isid: (request.u64_at(8) >> 16) & 0xffff_ffff_ffff,
                tsih,
                cmdsn: request.u32_at(24),
                initiator_name,
                target_name,
                session_type,
            });
        }
        let first = self.first.clone().unwrap_or_else(|| unreachable!("set above"));
        let own_auth = match (first.session_type, &first.target_name) {
            (SessionType::Normal, Some(name)) => targets.target_auth(name),
            _ => None,
        };
        let auth = own_auth.as_ref().unwrap_or(auth);
        let mut out = Vec::new();
        if !self.sent_portal_group && first.session_type == SessionType::Normal {
            text::push(&mut out, "TargetPortalGroupTag", &self.tpgt.to_string());
            self.sent_portal_group = true;
        }
        let mut may_transit = true;
        if csg == STAGE_SECURITY {
            match self.security_keys(&keys, auth, &mut out) {
                Ok(done) => may_transit = done,
                Err(code) => return self.fail(request, code),
            }
        } else {
            if auth.chap.is_some() && !self.authenticated {
                return self.fail(request, status::AUTHENTICATION_FAILURE);
            }
            self.current_stage = STAGE_OPERATIONAL;
        }
        for (key, value) in &keys {
            match key.as_str() {
                "InitiatorName" | "TargetName" | "SessionType" | "InitiatorAlias"
                | "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {}
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {
                    return self.fail(request, status::INITIATOR_ERROR);
                }
                _ => {
                    if text::negotiate_operational(&mut self.params, key, value, &mut out)
                        == KeyOutcome::NotOperational
                    {
                        text::push(&mut out, key, "NotUnderstood");
                    }
                    if key == "MaxRecvDataSegmentLength" {
                        self.declared_recv_length = true;
                    }
                }
            }
        }
        let transit_now = transit && may_transit;
        if transit_now && nsg == STAGE_FULL_FEATURE {
            if !self.declared_recv_length {
                text::push(
                    &mut out,
                    "MaxRecvDataSegmentLength",
                    &crate::constants::RECV_DATA_SEGMENT_BYTES_MAX.to_string(),
                );
            }
            text::finish(&mut self.params);
            let tsih = targets.allocate_tsih();
            if let Some(f) = self.first.as_mut() {
                f.tsih = tsih;
            }
            let h = self.response(request, true, csg, nsg, status::SUCCESS);
            let established = Established {
                session_type: first.session_type,
                initiator_name: first.initiator_name,
                target_name: first.target_name,
                isid: first.isid,
                tsih,
                params: self.params.clone(),
                exp_cmdsn: first.cmdsn,
                stat_sn: self.stat_sn.wrapping_add(1),
            };
            return LoginStep {
                response: (h, out),
                outcome: LoginOutcome::Established(Box::new(established)),
            };
        }
        if transit_now {
            self.current_stage = nsg;
        }
        let h = self.response(request, transit_now, csg, nsg, status::SUCCESS);
        LoginStep { response: (h, out), outcome: LoginOutcome::Continue }
    }

    /// Processes the security keys; returns whether the stage may end now.
    fn security_keys(
        &mut self,
        keys: &[(String, String)],
        auth: &AuthConfig,
        out: &mut Vec<u8>,
    ) -> Result<bool, u16> {
        let get = |name: &str| keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        if self.chap == Chap::ExpectAuthMethod {
            let offered = get("AuthMethod");
            match (&auth.chap, offered) {
                (None, Some(list)) => {
                    if list.split(',').any(|m| m == "None") {
                        text::push(out, "AuthMethod", "None");
                        self.authenticated = true;
                        self.chap = Chap::Done;
                        return Ok(true);
                    }
                    // Only CHAP offered but none configured: accept without challenge.
                    if list.split(',').any(|m| m == "CHAP") {
                        text::push(out, "AuthMethod", "None");
                        self.authenticated = true;
                        self.chap = Chap::Done;
                        return Ok(true);
                    }
                    text::push(out, "AuthMethod", "Reject");
                    return Err(status::AUTHENTICATION_FAILURE);
                }
                (None, None) => {
                    self.authenticated = true;
                    self.chap = Chap::Done;
                    return Ok(true);
                }
                (Some(_), Some(list)) if list.split(',').any(|m| m == "CHAP") => {
                    text::push(out, "AuthMethod", "CHAP");
                    self.chap = Chap::ExpectAlgorithm;
                    return Ok(false);
                }
                (Some(_), _) => return Err(status::AUTHENTICATION_FAILURE),
            }
        }
        match self.chap.clone() {
            Chap::ExpectAlgorithm => {
                let Some(algorithm) = get("CHAP_A").and_then(Algorithm::choose) else {
                    return Err(status::AUTHENTICATION_FAILURE);
                };
                text::push(out, "CHAP_A", &algorithm.number().to_string());
                text::push(out, "CHAP_I", &self.identifier.to_string());
                let challenge = self.challenge;
                text::push(out, "CHAP_C", &chap::encode_hex(&challenge));
                self.chap = Chap::ExpectResponse { algorithm, identifier: self.identifier };
                Ok(false)
            }
            Chap::ExpectResponse { algorithm, identifier } => {
                let Some(expected) = &auth.chap else {
                    return Err(status::AUTHENTICATION_FAILURE);
                };
                let (Some(name), Some(response)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(status::AUTHENTICATION_FAILURE);
                };
                let Some(response) = chap::decode_binary(response) else {
                    return Err(status::AUTHENTICATION_FAILURE);
                };
                let wanted = chap::response(
                    algorithm,
                    identifier,
                    expected.secret.as_bytes(),
                    &self.challenge,
                );
                if name != expected.user || !chap::equal(&response, &wanted) {
                    return Err(status::AUTHENTICATION_FAILURE);
                }
                // Mutual CHAP: the initiator challenges us in the same PDU.
                if let (Some(id), Some(challenge)) = (get("CHAP_I"), get("CHAP_C")) {
                    let Some(mutual) = &auth.mutual_chap else {
                        return Err(status::AUTHENTICATION_FAILURE);
                    };
                    let Ok(id) = id.trim().parse::<u8>() else {
                        return Err(status::AUTHENTICATION_FAILURE);
                    };
                    let Some(challenge) = chap::decode_binary(challenge) else {
                        return Err(status::AUTHENTICATION_FAILURE);
                    };
                    // A reflected challenge would let an attacker use us as an oracle.
                    if challenge.len() < CHAP_CHALLENGE_BYTES_MIN || challenge == self.challenge {
                        return Err(status::AUTHENTICATION_FAILURE);
                    }
                    let answer =
                        chap::response(algorithm, id, mutual.secret.as_bytes(), &challenge);
                    text::push(out, "CHAP_N", &mutual.user);
                    text::push(out, "CHAP_R", &chap::encode_hex(&answer));
                }
                self.authenticated = true;
                self.chap = Chap::Done;
                Ok(true)
            }
            Chap::ExpectAuthMethod | Chap::Done => Ok(self.authenticated),
        }
    }
}

//! The pure protocol core driven through its public boundary (PDUs and I/O completions in,
//! bytes and I/O requests out) with an in-memory device: login and CHAP, R2T flows, digests,
//! task management, ALUA, remote ports (commands forwarded to another node's logical unit)
//! and malformed input.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use iscsi_target::chap::{self, Algorithm};
use iscsi_target::connection::{Config, Connection, Event, LogicalUnit, PortalAddress, TargetNode};
use iscsi_target::device::{
    AluaPortGroup, AluaState, BlockDevice, DeviceError, IoData, IoOp, MappedRange,
};
use iscsi_target::login::{AuthConfig, Credentials};
use iscsi_target::pdu::{self, Digests, Header, Pdu, opcode};
use iscsi_target::scsi::LunIdentity;
use proptest::prelude::*;

const TARGET: &str = "iqn.2026-11.org.tandem:test";
const INITIATOR: &str = "iqn.2026-11.org.tandem:initiator";
const BLOCKS: u64 = 2048;

struct MemoryDevice {
    data: Mutex<Vec<u8>>,
    alua: Mutex<AluaState>,
    /// A peer node's port group to report besides ours.
    peer_group: Mutex<Option<AluaPortGroup>>,
    /// (atomic_write_max_bytes, atomic_write_alignment_bytes) to claim; the trait defaults
    /// when unset.
    atomic_limits_bytes: Mutex<Option<(u32, u32)>>,
    /// A remote port: commands go to another node's logical unit.
    forwarding: Mutex<bool>,
    /// Reservations the device loaded (load number, image), as a promoted storage node's.
    reservations_loaded: Mutex<Option<(u64, Bytes)>>,
}

impl MemoryDevice {
    fn new() -> Self {
        Self {
            data: Mutex::new(vec![0; usize::try_from(BLOCKS * 512).unwrap()]),
            alua: Mutex::new(AluaState::ActiveOptimized),
            peer_group: Mutex::new(None),
            atomic_limits_bytes: Mutex::new(None),
            forwarding: Mutex::new(false),
            reservations_loaded: Mutex::new(None),
        }
    }
    /// Performs an I/O synchronously, the way a driver would asynchronously.
    fn perform(&self, op: IoOp) -> Result<IoData, DeviceError> {
        let mut data = self.data.lock().unwrap();
        let range = |offset: u64, length: u64| {
            let start = usize::try_from(offset).unwrap();
            start..start + usize::try_from(length).unwrap()
        };
        match op {
            IoOp::Read { offset_bytes, length_bytes } => Ok(IoData::Read(Bytes::copy_from_slice(
                &data[range(offset_bytes, u64::from(length_bytes))],
            ))),
            IoOp::Write { offset_bytes, data: bytes, .. }
            | IoOp::AtomicWrite { offset_bytes, data: bytes, .. } => {
                data[range(offset_bytes, bytes.len() as u64)].copy_from_slice(&bytes);
                Ok(IoData::None)
            }
            IoOp::Flush | IoOp::PersistReservations { .. } => Ok(IoData::None),
            IoOp::Unmap { offset_bytes, length_bytes }
            | IoOp::WriteZeroes { offset_bytes, length_bytes } => {
                data[range(offset_bytes, length_bytes)].fill(0);
                Ok(IoData::None)
            }
            IoOp::MappedRanges { offset_bytes, length_bytes } => {
                Ok(IoData::Ranges(vec![MappedRange { offset_bytes, length_bytes, mapped: true }]))
            }
            IoOp::CompareAndWrite { offset_bytes, compare, data: bytes, .. } => {
                let r = range(offset_bytes, compare.len() as u64);
                if let Some(at) = iscsi_target::device::first_difference(&data[r.clone()], &compare)
                {
                    return Ok(IoData::Miscompare(at as u64));
                }
                data[r].copy_from_slice(&bytes);
                Ok(IoData::None)
            }
            IoOp::OrWrite { offset_bytes, mask, .. } => {
                let r = range(offset_bytes, mask.len() as u64);
                let merged = iscsi_target::device::or_bytes(&data[r.clone()], &mask);
                data[r].copy_from_slice(&merged);
                Ok(IoData::None)
            }
        }
    }
}

impl BlockDevice for MemoryDevice {
    fn size_bytes(&self) -> u64 {
        BLOCKS * 512
    }
    fn alua_state(&self) -> AluaState {
        *self.alua.lock().unwrap()
    }
    fn alua_port_groups(&self) -> Vec<AluaPortGroup> {
        let mut groups = vec![AluaPortGroup::local(self.alua_state())];
        groups.extend(self.peer_group.lock().unwrap().clone());
        groups
    }
    fn forwards(&self) -> bool {
        *self.forwarding.lock().unwrap()
    }
    fn reservations_load(&self) -> Option<u64> {
        self.reservations_loaded.lock().unwrap().as_ref().map(|(n, _)| *n)
    }
    fn persisted_reservations(&self) -> Option<Bytes> {
        self.reservations_loaded.lock().unwrap().as_ref().map(|(_, image)| image.clone())
    }
    fn atomic_write_max_bytes(&self) -> u32 {
        self.atomic_limits_bytes.lock().unwrap().map_or(4096, |(max, _)| max)
    }
    fn atomic_write_alignment_bytes(&self) -> u32 {
        self.atomic_limits_bytes.lock().unwrap().map_or(4096, |(_, alignment)| alignment)
    }
    async fn read(&self, _: u64, _: u32) -> Result<Bytes, DeviceError> {
        unreachable!("the tests perform I/O synchronously")
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

/// A scripted initiator around one [`Connection`].
struct Initiator {
    connection: Connection<MemoryDevice>,
    device: Arc<MemoryDevice>,
    digests: Digests,
    cmdsn: u32,
    itt: u32,
    /// Hold I/O requests instead of completing them at once.
    hold_io: bool,
    /// ISID this initiator logs in with (another ISID is another I_T nexus).
    isid: u64,
    /// LUN commands address.
    lun: u64,
    held: Vec<iscsi_target::IoRequest<MemoryDevice>>,
    /// Requests for a remote logical unit, until the test answers them.
    forwarded: Vec<iscsi_target::ForwardTicket<MemoryDevice>>,
}

fn config(auth: AuthConfig) -> (Arc<Config<MemoryDevice>>, Arc<MemoryDevice>) {
    let device = Arc::new(MemoryDevice::new());
    let lun = Arc::new(LogicalUnit::new(TARGET, 0, device.clone()));
    let portals = vec![PortalAddress { address: "127.0.0.1:3260".into(), relative_port: 1 }];
    (Arc::new(Config::new(vec![TargetNode::new(TARGET, vec![lun])], auth, portals)), device)
}

fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        iscsi_target::text::push(&mut out, k, v);
    }
    out
}

fn keys(data: &[u8]) -> Vec<(String, String)> {
    iscsi_target::text::parse(data)
}

fn key<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

impl Initiator {
    fn new(config: Arc<Config<MemoryDevice>>, device: Arc<MemoryDevice>) -> Self {
        Self {
            connection: Connection::new(1, config, 1, [7u8; 32], 9),
            device,
            digests: Digests::default(),
            cmdsn: 1,
            itt: 1,
            hold_io: false,
            held: Vec::new(),
            forwarded: Vec::new(),
            isid: 0x0002_3d00_0001,
            lun: 0,
        }
    }

    /// Sends one PDU (as wire bytes, through the framing code) and returns every PDU sent back.
    fn send(&mut self, header: Header, data: &[u8]) -> Vec<Pdu> {
        let mut wire = Vec::new();
        pdu::encode(&mut wire, &header, data, self.digests);
        self.send_wire(&wire)
    }

    fn send_wire(&mut self, wire: &[u8]) -> Vec<Pdu> {
        let digests = self.connection.digests();
        let limit = self.connection.data_segment_limit_bytes();
        let mut bhs = [0u8; 48];
        bhs.copy_from_slice(&wire[..48]);
        match pdu::frame_bytes(&bhs, digests, limit)
            .and_then(|n| pdu::decode(Bytes::copy_from_slice(&wire[..n]), digests, limit))
        {
            Ok(p) => self.connection.handle_pdu(p),
            Err(e) => self.connection.handle_decode_error(&e),
        }
        self.run_io();
        self.receive()
    }

    fn run_io(&mut self) {
        while let Some(ticket) = self.connection.poll_forward() {
            self.forwarded.push(ticket);
        }
        while let Some(request) = self.connection.poll_io() {
            if self.hold_io {
                self.held.push(request);
                continue;
            }
            // The request names its device: EXTENDED COPY reaches other LUNs.
            let result = request.device.perform(request.op.clone());
            self.connection.handle_io_completion(request.itt, request.tag, result);
        }
    }

    fn release_io(&mut self) -> Vec<Pdu> {
        self.hold_io = false;
        for request in std::mem::take(&mut self.held) {
            let result = request.device.perform(request.op.clone());
            self.connection.handle_io_completion(request.itt, request.tag, result);
        }
        self.run_io();
        self.receive()
    }

    fn receive(&mut self) -> Vec<Pdu> {
        let (mut bytes, mut segments) = (Vec::new(), Vec::new());
        self.connection.poll_transmit(&mut bytes, &mut segments);
        let mut wire = Vec::new();
        let mut at = 0;
        for (position, data) in &segments {
            wire.extend_from_slice(&bytes[at..*position]);
            wire.extend_from_slice(data);
            at = *position;
        }
        wire.extend_from_slice(&bytes[at..]);
        let mut out = Vec::new();
        let mut rest = &wire[..];
        while rest.len() >= 48 {
            let mut bhs = [0u8; 48];
            bhs.copy_from_slice(&rest[..48]);
            // Responses carry digests only once the session is in full feature phase.
            let digests = if Header(bhs).opcode() == opcode::LOGIN_RESPONSE {
                Digests::default()
            } else {
                self.digests
            };
            let n = pdu::frame_bytes(&bhs, digests, 1 << 24).unwrap();
            out.push(
                pdu::decode(Bytes::copy_from_slice(&rest[..n]), digests, 1 << 24)
                    .expect("target PDUs decode"),
            );
            rest = &rest[n..];
        }
        out
    }

    fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, data: &[u8]) -> Pdu {
        let mut h = Header::new(opcode::LOGIN_REQUEST);
        h.0[0] |= 0x40;
        h.set_flags((if transit { 0x80 } else { 0 }) | (csg << 2) | nsg);
        h.set_u64(8, self.isid << 16);
        h.set_itt(0);
        h.set_u32(24, self.cmdsn);
        let mut responses = self.send(h, data);
        assert_eq!(responses.len(), 1, "one login response per request");
        responses.remove(0)
    }

    fn login_status(p: &Pdu) -> u16 {
        p.header.u16_at(36)
    }

    /// Logs in without authentication, negotiating `extra` keys.
    fn login(&mut self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut pairs = vec![
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ];
        pairs.extend_from_slice(extra);
        let response = self.login_pdu(0, 3, true, &text(&pairs));
        assert_eq!(Self::login_status(&response), 0, "login succeeds");
        assert!(response.header.final_bit(), "transits to full feature phase");
        let negotiated = keys(&response.data);
        self.digests = Digests {
            header: key(&negotiated, "HeaderDigest") == Some("CRC32C"),
            data: key(&negotiated, "DataDigest") == Some("CRC32C"),
        };
        negotiated
    }

    fn command(
        &mut self,
        cdb: &[u8],
        read: bool,
        write: bool,
        edtl: u32,
        immediate: &[u8],
        final_bit: bool,
    ) -> (u32, Vec<Pdu>) {
        let mut h = Header::new(opcode::SCSI_COMMAND);
        let mut flags = 0x01;
        if final_bit {
            flags |= 0x80;
        }
        if read {
            flags |= 0x40;
        }
        if write {
            flags |= 0x20;
        }
        h.set_flags(flags);
        let itt = self.itt;
        self.itt += 1;
        h.set_itt(itt);
        h.set_lun(iscsi_target::connection::encode_lun(self.lun));
        h.set_u32(20, edtl);
        h.set_u32(24, self.cmdsn);
        self.cmdsn += 1;
        h.0[32..32 + cdb.len()].copy_from_slice(cdb);
        (itt, self.send(h, immediate))
    }

    fn data_out(
        &mut self,
        itt: u32,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        data: &[u8],
        final_bit: bool,
    ) -> Vec<Pdu> {
        let mut h = Header::new(opcode::DATA_OUT);
        h.set_flags(if final_bit { 0x80 } else { 0 });
        h.set_itt(itt);
        h.set_u32(20, ttt);
        h.set_u32(36, data_sn);
        h.set_u32(40, offset);
        self.send(h, data)
    }

    fn write10(&mut self, lba: u32, data: &[u8], immediate: usize) -> (u32, Vec<Pdu>) {
        let blocks = u16::try_from(data.len() / 512).unwrap();
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let edtl = u32::try_from(data.len()).unwrap();
        self.command(&cdb, false, true, edtl, &data[..immediate], true)
    }

    fn read10(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let (_, responses) = self.command(&cdb, true, false, u32::from(blocks) * 512, &[], true);
        let mut out = Vec::new();
        for p in &responses {
            assert_eq!(
                p.header.opcode(),
                opcode::DATA_IN,
                "reads answer with Data-In: {responses:?}"
            );
            assert_eq!(p.header.u32_at(40) as usize, out.len(), "buffer offsets are in order");
            out.extend_from_slice(&p.data);
        }
        let last = responses.last().expect("data");
        assert_eq!(last.header.flags() & 0x81, 0x81, "status rides on the last Data-In");
        assert_eq!(last.header.0[3], 0, "GOOD");
        out
    }
}

fn status_of(p: &Pdu) -> (u8, Option<(u8, u8, u8)>) {
    assert_eq!(p.header.opcode(), opcode::SCSI_RESPONSE, "a SCSI response: {p:?}");
    let sense =
        (p.data.len() >= 2 + 14).then(|| (p.data[2 + 2] & 0xf, p.data[2 + 12], p.data[2 + 13]));
    (p.header.0[3], sense)
}

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length).map(|i| u8::try_from(i % 251).unwrap() ^ seed).collect()
}

#[test]
fn login_without_auth_negotiates_operational_keys() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    let negotiated = i.login(&[
        ("HeaderDigest", "CRC32C,None"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "999999"),
        ("MaxOutstandingR2T", "1"),
        ("X-Vendor-Key", "1"),
    ]);
    assert_eq!(key(&negotiated, "HeaderDigest"), Some("CRC32C"));
    assert_eq!(key(&negotiated, "FirstBurstLength"), Some("262144"));
    assert_eq!(key(&negotiated, "X-Vendor-Key"), Some("NotUnderstood"));
    assert_eq!(key(&negotiated, "TargetPortalGroupTag"), Some("1"));
    // With a header digest in force, a command still works.
    let data = pattern(4096, 1);
    let (_, responses) = i.write10(0, &data, 4096);
    assert_eq!(status_of(&responses[0]).0, 0);
    assert_eq!(i.read10(0, 8), data);
}

fn chap_login(
    auth: AuthConfig,
    user: &str,
    secret: &str,
    initiator: &str,
    mutual: Option<&[u8]>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let (config, device) = config(auth);
    chap_login_to(config, device, user, secret, initiator, mutual)
}

/// A portal without authentication whose one target has `auth` of its own.
fn config_with_target_auth(auth: AuthConfig) -> (Arc<Config<MemoryDevice>>, Arc<MemoryDevice>) {
    let device = Arc::new(MemoryDevice::new());
    let lun = Arc::new(LogicalUnit::new(TARGET, 0, device.clone()));
    let portals = vec![PortalAddress { address: "127.0.0.1:3260".into(), relative_port: 1 }];
    let target = TargetNode::new(TARGET, vec![lun]).with_auth(auth);
    (Arc::new(Config::new(vec![target], AuthConfig::default(), portals)), device)
}

fn chap_login_to(
    config: Arc<Config<MemoryDevice>>,
    device: Arc<MemoryDevice>,
    user: &str,
    secret: &str,
    initiator: &str,
    mutual: Option<&[u8]>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut i = Initiator::new(config, device);
    let first = i.login_pdu(
        0,
        1,
        false,
        &text(&[("InitiatorName", initiator), ("TargetName", TARGET), ("AuthMethod", "CHAP,None")]),
    );
    if Initiator::login_status(&first) != 0 {
        return (Initiator::login_status(&first), Vec::new(), Vec::new());
    }
    assert_eq!(key(&keys(&first.data), "AuthMethod"), Some("CHAP"));
    let second = i.login_pdu(0, 1, false, &text(&[("CHAP_A", "7,5")]));
    let offered = keys(&second.data);
    let algorithm = Algorithm::from_number(key(&offered, "CHAP_A").unwrap()).unwrap();
    let identifier: u8 = key(&offered, "CHAP_I").unwrap().parse().unwrap();
    let challenge = chap::decode_binary(key(&offered, "CHAP_C").unwrap()).unwrap();
    let response =
        chap::encode_hex(&chap::response(algorithm, identifier, secret.as_bytes(), &challenge));
    let mut pairs = vec![("CHAP_N", user.to_string()), ("CHAP_R", response)];
    if let Some(challenge) = mutual {
        pairs.push(("CHAP_I", "77".into()));
        pairs.push(("CHAP_C", chap::encode_hex(challenge)));
    }
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let third = i.login_pdu(0, 1, true, &text(&pairs));
    (Initiator::login_status(&third), keys(&third.data), Vec::new())
}

fn chap_auth(mutual: bool) -> AuthConfig {
    AuthConfig {
        chap: Some(Credentials { user: "alice".into(), secret: "alice-secret-12".into() }),
        mutual_chap: mutual
            .then(|| Credentials { user: "target".into(), secret: "target-secret-1".into() }),
        allowed_initiators: vec![INITIATOR.into()],
    }
}

#[test]
fn chap_accepts_the_right_secret_and_refuses_wrong_ones() {
    let cases: &[(&str, &str, &str, u16)] = &[
        ("alice", "alice-secret-12", INITIATOR, 0x0000),
        ("alice", "wrong-secret-00", INITIATOR, 0x0201),
        ("mallory", "alice-secret-12", INITIATOR, 0x0201),
        ("alice", "alice-secret-12", "iqn.2026-11.org.evil:host", 0x0202),
    ];
    for &(user, secret, initiator, expected) in cases {
        let (status, _, _) = chap_login(chap_auth(false), user, secret, initiator, None);
        assert_eq!(status, expected, "user {user} secret {secret} initiator {initiator}");
    }
}

/// A target's own CHAP identity (a volume's) is required even where the portal asks for none:
/// the same cases as portal-wide CHAP, and skipping the security stage is refused.
#[test]
fn a_target_with_its_own_chap_identity_needs_it() {
    let cases: &[(&str, &str, &str, u16)] = &[
        ("alice", "alice-secret-12", INITIATOR, 0x0000),
        ("alice", "wrong-secret-00", INITIATOR, 0x0201),
        ("mallory", "alice-secret-12", INITIATOR, 0x0201),
        ("alice", "alice-secret-12", "iqn.2026-11.org.evil:host", 0x0202),
    ];
    for &(user, secret, initiator, expected) in cases {
        let (config, device) = config_with_target_auth(chap_auth(false));
        let (status, _, _) = chap_login_to(config, device, user, secret, initiator, None);
        assert_eq!(status, expected, "user {user} secret {secret} initiator {initiator}");
    }
    let (config, device) = config_with_target_auth(chap_auth(false));
    let mut i = Initiator::new(config, device);
    let response =
        i.login_pdu(1, 3, true, &text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]));
    assert_eq!(Initiator::login_status(&response), 0x0201, "no CHAP, no login");
}

#[test]
fn mutual_chap_proves_the_target() {
    let challenge = [0x5au8; 16];
    let (status, answer, _) =
        chap_login(chap_auth(true), "alice", "alice-secret-12", INITIATOR, Some(&challenge));
    assert_eq!(status, 0);
    assert_eq!(key(&answer, "CHAP_N"), Some("target"));
    let expected = chap::response(Algorithm::Sha256, 77, b"target-secret-1", &challenge);
    assert_eq!(chap::decode_binary(key(&answer, "CHAP_R").unwrap()).unwrap(), expected);
}

#[test]
fn chap_required_refuses_skipping_security() {
    let (config, device) = config(chap_auth(false));
    let mut i = Initiator::new(config, device);
    let response =
        i.login_pdu(1, 3, true, &text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]));
    assert_eq!(Initiator::login_status(&response), 0x0201);
    assert_eq!(i.connection.poll_event(), Some(Event::Close));
}

#[test]
fn login_errors_name_the_problem() {
    let cases: &[(&[(&str, &str)], u16)] = &[
        (&[("TargetName", TARGET)], 0x0207),
        (&[("InitiatorName", INITIATOR), ("TargetName", "iqn.nope:x")], 0x0203),
        (&[("InitiatorName", INITIATOR)], 0x0207),
        (&[("InitiatorName", INITIATOR), ("SessionType", "Bogus")], 0x0200),
    ];
    for (pairs, expected) in cases {
        let (config, device) = config(AuthConfig::default());
        let mut i = Initiator::new(config, device);
        let response = i.login_pdu(1, 3, true, &text(pairs));
        assert_eq!(Initiator::login_status(&response), *expected, "{pairs:?}");
    }
}

#[test]
fn discovery_session_lists_targets() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    let response = i.login_pdu(
        1,
        3,
        true,
        &text(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]),
    );
    assert_eq!(Initiator::login_status(&response), 0);
    let mut h = Header::new(opcode::TEXT_REQUEST);
    h.set_flags(0x80);
    h.set_itt(5);
    h.set_u32(20, 0xffff_ffff);
    h.set_u32(24, 1);
    let responses = i.send(h, &text(&[("SendTargets", "All")]));
    let listed = keys(&responses[0].data);
    assert_eq!(key(&listed, "TargetName"), Some(TARGET));
    assert_eq!(key(&listed, "TargetAddress"), Some("127.0.0.1:3260,1"));
    // SCSI commands are not allowed in a discovery session.
    let (_, responses) = i.command(&[0, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert_eq!(responses[0].header.opcode(), opcode::REJECT);
}

/// A wildcard portal is reported as the address the initiator reached (an initiator cannot dial
/// 0.0.0.0); a specific portal is reported as configured.
#[test]
fn send_targets_reports_a_wildcard_portal_as_the_local_address() {
    let cases = [
        ("0.0.0.0:3260", Some("10.1.2.3:5000"), "10.1.2.3:3260,1"),
        ("[::]:3261", Some("[fd00::7]:5000"), "[fd00::7]:3261,1"),
        ("127.0.0.1:3260", Some("10.1.2.3:5000"), "127.0.0.1:3260,1"),
        ("0.0.0.0:3260", None, "0.0.0.0:3260,1"),
    ];
    for (portal, local, expected) in cases {
        let device = Arc::new(MemoryDevice::new());
        let lun = Arc::new(LogicalUnit::new(TARGET, 0, device.clone()));
        let portals = vec![PortalAddress { address: portal.into(), relative_port: 1 }];
        let config = Arc::new(Config::new(
            vec![TargetNode::new(TARGET, vec![lun])],
            AuthConfig::default(),
            portals,
        ));
        let mut i = Initiator::new(config, device);
        if let Some(local) = local {
            i.connection.set_local_address(local.parse().unwrap());
        }
        let response = i.login_pdu(
            1,
            3,
            true,
            &text(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]),
        );
        assert_eq!(Initiator::login_status(&response), 0);
        let mut h = Header::new(opcode::TEXT_REQUEST);
        h.set_flags(0x80);
        h.set_itt(5);
        h.set_u32(20, 0xffff_ffff);
        h.set_u32(24, 1);
        let responses = i.send(h, &text(&[("SendTargets", "All")]));
        let listed = keys(&responses[0].data);
        assert_eq!(key(&listed, "TargetAddress"), Some(expected), "{portal} via {local:?}");
    }
}

/// Writes 64 KiB through every combination of ImmediateData, InitialR2T and burst sizes,
/// then reads it back.
#[test]
fn r2t_flows_with_and_without_immediate_data_and_initial_r2t() {
    for immediate_data in ["Yes", "No"] {
        for initial_r2t in ["Yes", "No"] {
            for max_burst in ["8192", "262144"] {
                let (config, device) = config(AuthConfig::default());
                let mut i = Initiator::new(config, device);
                i.login(&[
                    ("ImmediateData", immediate_data),
                    ("InitialR2T", initial_r2t),
                    ("MaxBurstLength", max_burst),
                    ("FirstBurstLength", "8192"),
                    ("MaxOutstandingR2T", "2"),
                ]);
                let data = pattern(65536, 3);
                let immediate = if immediate_data == "Yes" { 4096 } else { 0 };
                let unsolicited_end = if initial_r2t == "No" { 8192 } else { immediate };
                let final_on_command = unsolicited_end == immediate;
                let (itt, mut responses) = {
                    let blocks = 128u16;
                    let mut cdb = [0u8; 10];
                    cdb[0] = 0x2a;
                    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
                    i.command(&cdb, false, true, 65536, &data[..immediate], final_on_command)
                };
                let mut sent = immediate;
                let mut data_sn = 0;
                while sent < unsolicited_end {
                    let end = (sent + 4096).min(unsolicited_end);
                    responses.extend(i.data_out(
                        itt,
                        0xffff_ffff,
                        data_sn,
                        u32::try_from(sent).unwrap(),
                        &data[sent..end],
                        end == unsolicited_end,
                    ));
                    data_sn += 1;
                    sent = end;
                }
                let mut guard = 0;
                loop {
                    guard += 1;
                    assert!(guard < 100, "R2T loop does not end");
                    let Some(position) =
                        responses.iter().position(|p| p.header.opcode() == opcode::R2T)
                    else {
                        break;
                    };
                    let r2t = responses.remove(position);
                    let ttt = r2t.header.u32_at(20);
                    let offset = r2t.header.u32_at(40) as usize;
                    let length = r2t.header.u32_at(44) as usize;
                    assert!(
                        length <= max_burst.parse::<usize>().unwrap(),
                        "R2T within MaxBurstLength"
                    );
                    assert_eq!(offset, sent, "R2Ts solicit data in order");
                    let mut sn = 0;
                    let mut at = offset;
                    while at < offset + length {
                        let end = (at + 8192).min(offset + length);
                        responses.extend(i.data_out(
                            itt,
                            ttt,
                            sn,
                            u32::try_from(at).unwrap(),
                            &data[at..end],
                            end == offset + length,
                        ));
                        sn += 1;
                        at = end;
                    }
                    sent = offset + length;
                }
                let status = responses
                    .iter()
                    .find(|p| p.header.opcode() == opcode::SCSI_RESPONSE)
                    .expect("status");
                assert_eq!(status_of(status).0, 0, "{immediate_data} {initial_r2t} {max_burst}");
                assert_eq!(i.read10(0, 128), data, "{immediate_data} {initial_r2t} {max_burst}");
            }
        }
    }
}

#[test]
fn out_of_sequence_data_sn_fails_the_task_not_the_connection() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[("ImmediateData", "No"), ("InitialR2T", "No")]);
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[8] = 2;
    let (itt, responses) = i.command(&cdb, false, true, 1024, &[], false);
    assert!(responses.is_empty());
    let responses = i.data_out(itt, 0xffff_ffff, 5, 0, &[1u8; 512], false);
    let (status, sense) = status_of(&responses[0]);
    assert_eq!((status, sense), (2, Some((0xb, 0x4b, 0))));
    assert!(!i.connection.is_closed());
    assert_eq!(i.read10(0, 1), vec![0u8; 512]);
}

#[test]
fn data_digest_errors_are_rejected_and_close_the_connection() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[("DataDigest", "CRC32C"), ("HeaderDigest", "CRC32C")]);
    let mut h = Header::new(opcode::SCSI_COMMAND);
    h.set_flags(0xa1);
    h.set_itt(1);
    h.set_u32(20, 512);
    h.set_u32(24, 1);
    h.0[32] = 0x2a;
    h.0[40] = 1;
    let mut wire = Vec::new();
    pdu::encode(&mut wire, &h, &[9u8; 512], i.digests);
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    let responses = i.send_wire(&wire);
    assert_eq!(responses[0].header.opcode(), opcode::REJECT);
    assert_eq!(responses[0].header.0[2], pdu::reject_reason::DATA_DIGEST_ERROR);
    assert!(i.connection.is_closed());
}

#[test]
fn abort_task_and_lun_reset() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[("ImmediateData", "No"), ("InitialR2T", "Yes")]);
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[8] = 1;
    let (itt, responses) = i.command(&cdb, false, true, 512, &[], true);
    assert_eq!(responses[0].header.opcode(), opcode::R2T);
    let ttt = responses[0].header.u32_at(20);
    let tmf = |function: u8, referenced: u32, cmdsn: u32| {
        let mut h = Header::new(opcode::TASK_MANAGEMENT_REQUEST);
        h.0[0] |= 0x40;
        h.set_flags(0x80 | function);
        h.set_itt(100 + u32::from(function));
        h.set_u32(20, referenced);
        h.set_u32(24, cmdsn);
        h.set_u32(32, cmdsn - 1);
        h
    };
    let responses = i.send(tmf(1, itt, i.cmdsn), &[]);
    assert_eq!(
        (responses[0].header.opcode(), responses[0].header.0[2]),
        (opcode::TASK_MANAGEMENT_RESPONSE, 0)
    );
    // Data for the aborted task is ignored, and nothing was written.
    assert!(i.data_out(itt, ttt, 0, 0, &[1u8; 512], true).is_empty());
    assert_eq!(i.read10(0, 1), vec![0u8; 512]);
    // Aborting a task that completed reports that it does not exist.
    let responses = i.send(tmf(1, 0x999, i.cmdsn), &[]);
    assert_eq!(responses[0].header.0[2], 1);
    // A LUN reset leaves a unit attention for the nexus.
    let responses = i.send(tmf(5, 0xffff_ffff, i.cmdsn), &[]);
    assert_eq!(responses[0].header.0[2], 0);
    let (_, responses) = i.command(&[0, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]), (2, Some((6, 0x29, 0x03))));
    let (_, responses) = i.command(&[0, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]).0, 0);
}

#[test]
fn commands_outside_the_cmdsn_window_are_ignored() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[]);
    i.cmdsn += 1000;
    let (_, responses) = i.command(&[0, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert!(responses.is_empty(), "too high");
    i.cmdsn -= 1002;
    let (_, responses) = i.command(&[0, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert!(responses.is_empty(), "too low");
    assert_eq!(i.cmdsn, 1, "the next command carries the expected CmdSN again");
    let (_, responses) = i.command(&[0, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]).0, 0);
    // MaxCmdSN leaves room for the whole window.
    let max = responses[0].header.u32_at(32);
    let exp = responses[0].header.u32_at(28);
    assert_eq!(max.wrapping_sub(exp) + 1, iscsi_target::constants::COMMANDS_MAX);
}

#[test]
fn bad_commands_get_check_conditions_with_the_right_sense() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[]);
    let beyond = u32::try_from(BLOCKS).unwrap();
    // (CDB, is a read, EDTL, expected sense key / ASC / ASCQ)
    type Case = (Vec<u8>, bool, u32, (u8, u8, u8));
    let cases: Vec<Case> = vec![
        (vec![0xff, 0, 0, 0, 0, 0], false, 0, (5, 0x20, 0)),
        (
            {
                let mut c = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
                c[2..6].copy_from_slice(&beyond.to_be_bytes());
                c
            },
            true,
            512,
            (5, 0x21, 0),
        ),
        (vec![0x28, 0xe0, 0, 0, 0, 0, 0, 0, 1, 0], true, 512, (5, 0x24, 0)),
        (vec![0x12, 0, 0x80, 0, 0xff, 0], true, 255, (5, 0x24, 0)),
    ];
    for (cdb, read, edtl, expected) in cases {
        let (_, responses) = i.command(&cdb, read, false, edtl, &[], true);
        assert_eq!(status_of(responses.last().unwrap()), (2, Some(expected)), "{cdb:02x?}");
    }
    // An unknown opcode at the iSCSI level is rejected, not fatal.
    let responses = i.send(Header::new(0x1c), &[]);
    assert_eq!(responses[0].header.opcode(), opcode::REJECT);
    assert!(!i.connection.is_closed());
}

#[test]
fn read_residuals_follow_the_expected_transfer_length() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[]);
    // READ(10) of 2 blocks with EDTL of 1 block: overflow of 512, one block of data.
    let (_, responses) = i.command(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], true, false, 512, &[], true);
    let last = responses.last().unwrap();
    assert_eq!(last.header.flags() & 0x06, 0x04);
    assert_eq!(last.header.u32_at(44), 512);
    assert_eq!(responses.iter().map(|p| p.data.len()).sum::<usize>(), 512);
    // EDTL above the transfer: underflow.
    let (_, responses) =
        i.command(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], true, false, 4096, &[], true);
    let last = responses.last().unwrap();
    assert_eq!((last.header.flags() & 0x06, last.header.u32_at(44)), (0x02, 3584));
}

#[test]
fn alua_standby_refuses_io_and_reports_its_state() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device.clone());
    i.login(&[]);
    *device.alua.lock().unwrap() = AluaState::Standby;
    let (_, responses) = i.command(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], true, false, 512, &[], true);
    assert_eq!(status_of(&responses[0]), (2, Some((2, 0x04, 0x0b))));
    let mut cdb = [0u8; 12];
    cdb[0] = 0xa3;
    cdb[1] = 0x0a;
    cdb[9] = 0xff;
    let (_, responses) = i.command(&cdb, true, false, 255, &[], true);
    assert_eq!(responses[0].data[4] & 0x0f, 0x02, "standby state in REPORT TARGET PORT GROUPS");
    // A promotion between commands: INQUIRY still answers, the next other command reports
    // ASYMMETRIC ACCESS STATE CHANGED once, then I/O works.
    *device.alua.lock().unwrap() = AluaState::ActiveOptimized;
    let (_, responses) = i.command(&[0x12, 0, 0, 0, 96, 0], true, false, 96, &[], true);
    let last = responses.last().unwrap();
    assert_eq!(last.header.0[3], 0, "INQUIRY is not held up by the unit attention");
    let tur = [0u8; 6];
    let (_, responses) = i.command(&tur, false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]), (2, Some((6, 0x2a, 0x06))));
    let (_, responses) = i.command(&tur, false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]), (0, None), "the unit attention is reported once");
    assert_eq!(i.read10(0, 1), vec![0u8; 512]);
}

#[test]
fn compare_and_write_compares_then_writes() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[]);
    let old = pattern(512, 1);
    let new = pattern(512, 2);
    i.write10(5, &old, 512);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x89;
    cdb[9] = 5;
    cdb[13] = 1;
    let mut data = new.clone();
    data.extend_from_slice(&new);
    let (_, responses) = i.command(&cdb, false, true, 1024, &data, true);
    assert_eq!(status_of(&responses[0]).1.map(|s| s.0), Some(0xe), "miscompare");
    let mut data = old.clone();
    data.extend_from_slice(&new);
    let (_, responses) = i.command(&cdb, false, true, 1024, &data, true);
    assert_eq!(status_of(&responses[0]).0, 0);
    assert_eq!(i.read10(5, 1), new);
}

#[test]
fn pipelined_commands_complete_out_of_order() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[]);
    i.hold_io = true;
    let mut itts = Vec::new();
    for n in 0..32u32 {
        let (itt, responses) = i.write10(n * 8, &pattern(4096, u8::try_from(n).unwrap()), 4096);
        assert!(responses.is_empty());
        itts.push(itt);
    }
    assert_eq!(i.held.len(), 32, "all 32 writes are in flight at once");
    i.held.reverse();
    let responses = i.release_io();
    let mut done: Vec<u32> = responses.iter().map(|p| p.header.itt()).collect();
    done.sort_unstable();
    assert_eq!(done, itts);
}

fn logged_in() -> Initiator {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[]);
    i
}

proptest! {
    // TANDEM_FUZZ_CASES raises the count for a longer fuzzing run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("TANDEM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        .. ProptestConfig::default()
    })]

    /// Arbitrary bytes as PDUs never panic the framing code or the connection, in login or
    /// in full feature phase, and any I/O they cause stays inside the device.
    #[test]
    fn arbitrary_pdus_never_panic(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 48..600), 1..8), logged in any::<bool>()) {
        let mut i = if logged { logged_in() } else {
            let (config, device) = config(AuthConfig::default());
            Initiator::new(config, device)
        };
        for mut frame in frames {
            // Keep lengths consistent half of the time so the PDU reaches the state machine.
            if frame[1] & 1 == 0 {
                let data = frame.len() - 48;
                frame[4] = 0;
                frame[5] = 0;
                frame[6..8].copy_from_slice(&u16::try_from(data).unwrap().to_be_bytes());
                frame.truncate(48 + data / 4 * 4);
                let d = frame.len() - 48;
                frame[6..8].copy_from_slice(&u16::try_from(d).unwrap().to_be_bytes());
            }
            let digests = i.connection.digests();
            let limit = i.connection.data_segment_limit_bytes();
            let mut bhs = [0u8; 48];
            bhs.copy_from_slice(&frame[..48]);
            match pdu::frame_bytes(&bhs, digests, limit) {
                Ok(n) if n <= frame.len() => match pdu::decode(Bytes::copy_from_slice(&frame[..n]), digests, limit) {
                    Ok(p) => i.connection.handle_pdu(p),
                    Err(e) => i.connection.handle_decode_error(&e),
                },
                Ok(_) => {}
                Err(e) => i.connection.handle_decode_error(&e),
            }
            while let Some(request) = i.connection.poll_io() {
                let inside = match &request.op {
                    IoOp::Read { offset_bytes, length_bytes } => offset_bytes + u64::from(*length_bytes) <= BLOCKS * 512,
                    IoOp::Write { offset_bytes, data, .. } | IoOp::AtomicWrite { offset_bytes, data, .. } => offset_bytes + data.len() as u64 <= BLOCKS * 512,
                    IoOp::Unmap { offset_bytes, length_bytes } | IoOp::WriteZeroes { offset_bytes, length_bytes } | IoOp::MappedRanges { offset_bytes, length_bytes } => offset_bytes + length_bytes <= BLOCKS * 512,
                    IoOp::CompareAndWrite { offset_bytes, compare, .. } => offset_bytes + compare.len() as u64 <= BLOCKS * 512,
                    IoOp::OrWrite { offset_bytes, mask, .. } => offset_bytes + mask.len() as u64 <= BLOCKS * 512,
                    IoOp::Flush | IoOp::PersistReservations { .. } => true,
                };
                prop_assert!(inside, "I/O outside the LUN: {:?}", request.op);
                let result = i.device.perform(request.op.clone());
                i.connection.handle_io_completion(request.itt, request.tag, result);
            }
            let _ = i.receive();
        }
    }
}

#[test]
fn a_login_with_a_reused_isid_reinstates_the_session() {
    let (config, device) = config(AuthConfig::default());
    let mut first = Initiator::new(config.clone(), device.clone());
    first.login(&[]);
    assert_eq!(first.connection.poll_event(), None);
    let mut second = Initiator {
        connection: Connection::new(2, config.clone(), 1, [8u8; 32], 3),
        ..Initiator::new(config, device)
    };
    second.login(&[]);
    assert_eq!(second.connection.poll_event(), Some(Event::Reinstated { old_connection_id: 1 }));
}

#[test]
fn transfers_beyond_the_connection_budget_get_task_set_full() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[("ImmediateData", "No"), ("InitialR2T", "Yes")]);
    let edtl = iscsi_target::constants::TRANSFER_BYTES_MAX;
    let fit = iscsi_target::constants::CONNECTION_TRANSFER_BYTES_MAX / u64::from(edtl);
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    for _ in 0..fit {
        let (_, responses) = i.command(&cdb, false, true, edtl, &[], true);
        assert_eq!(responses[0].header.opcode(), opcode::R2T, "within budget: data is solicited");
    }
    let (_, responses) = i.command(&cdb, false, true, edtl, &[], true);
    assert_eq!(status_of(&responses[0]).0, 0x28, "TASK SET FULL");
}

#[test]
fn silent_initiators_get_a_ping_and_then_the_door() {
    let mut i = logged_in();
    i.connection.handle_idle();
    let ping = i.receive();
    assert_eq!(ping[0].header.opcode(), opcode::NOP_IN);
    assert_ne!(ping[0].header.u32_at(20), 0xffff_ffff, "a ping asks for an answer");
    // The answer keeps the connection.
    let mut h = Header::new(opcode::NOP_OUT);
    h.0[0] |= 0x40;
    h.set_flags(0x80);
    h.set_itt(0xffff_ffff);
    h.set_u32(20, ping[0].header.u32_at(20));
    h.set_u32(24, i.cmdsn);
    assert!(i.send(h, &[]).is_empty());
    i.connection.handle_idle();
    assert!(!i.connection.is_closed());
    // No answer: closed.
    i.connection.handle_idle();
    assert!(i.connection.is_closed());
}

#[test]
fn targets_can_be_exported_and_withdrawn_at_run_time() {
    let (config, device) = config(AuthConfig::default());
    assert!(config.remove_target(TARGET));
    let mut i = Initiator::new(config.clone(), device.clone());
    let response =
        i.login_pdu(1, 3, true, &text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]));
    assert_eq!(Initiator::login_status(&response), 0x0203, "withdrawn target is not found");
    let lun = Arc::new(LogicalUnit::new(TARGET, 0, device.clone()));
    config.add_target(TargetNode::new(TARGET, vec![lun.clone()]));
    let mut i = Initiator::new(config, device);
    i.login(&[]);
    assert_eq!(i.read10(0, 1), vec![0u8; 512]);
    // Reservation state can be copied out (to replicate it) and back in.
    let mut state = lun.reservations();
    state.generation = 7;
    lun.restore_reservations(state.clone());
    assert_eq!(lun.reservations(), state);
}

/// Sense key, ASC, ASCQ.
type Sense3 = (u8, u8, u8);
/// (what, flags, LBA, atomic boundary, blocks, data bytes, expected status and sense)
type AtomicCase = (&'static str, u8, u64, u16, u16, usize, (u8, Option<Sense3>));

/// A target with two LUNs (0 and 1), each on its own memory device: (config, LUN 0, LUN 1).
fn two_lun_config() -> (Arc<Config<MemoryDevice>>, Arc<MemoryDevice>, Arc<MemoryDevice>) {
    let first = Arc::new(MemoryDevice::new());
    let second = Arc::new(MemoryDevice::new());
    let luns = vec![
        Arc::new(LogicalUnit::new(TARGET, 0, first.clone())),
        Arc::new(LogicalUnit::new(TARGET, 1, second.clone())),
    ];
    let portals = vec![PortalAddress { address: "127.0.0.1:3260".into(), relative_port: 1 }];
    let targets = vec![TargetNode::new(TARGET, luns)];
    (Arc::new(Config::new(targets, AuthConfig::default(), portals)), first, second)
}

/// An initiator logged in to a two-LUN target, and the device of LUN 1.
fn two_luns() -> (Initiator, Arc<MemoryDevice>) {
    let (config, first, second) = two_lun_config();
    let mut i = Initiator::new(config, first);
    i.login(&[]);
    (i, second)
}

/// An identification CSCD descriptor naming `lun` of the test target by its NAA designator.
fn cscd(lun: u64) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0] = 0xe4;
    d[4] = 0x01; // Binary code set.
    d[5] = 0x03; // Logical unit association, NAA designator.
    d[7] = 16;
    d[8..24].copy_from_slice(&LunIdentity::new(TARGET, lun).naa_designator());
    d[29..32].copy_from_slice(&[0, 2, 0]); // 512-byte blocks.
    d
}

/// A block-to-block segment descriptor.
fn segment(
    source: u16,
    destination: u16,
    blocks: u16,
    source_lba: u64,
    destination_lba: u64,
) -> Vec<u8> {
    let mut d = vec![0u8; 28];
    d[0] = 0x02;
    d[2..4].copy_from_slice(&24u16.to_be_bytes());
    d[4..6].copy_from_slice(&source.to_be_bytes());
    d[6..8].copy_from_slice(&destination.to_be_bytes());
    d[10..12].copy_from_slice(&blocks.to_be_bytes());
    d[12..20].copy_from_slice(&source_lba.to_be_bytes());
    d[20..28].copy_from_slice(&destination_lba.to_be_bytes());
    d
}

/// An EXTENDED COPY parameter list: header, CSCD descriptors, segment descriptors.
fn copy_list(list_id: u8, usage: u8, cscds: &[Vec<u8>], segments: &[Vec<u8>]) -> Vec<u8> {
    let cscd_bytes: usize = cscds.iter().map(Vec::len).sum();
    let segment_bytes: usize = segments.iter().map(Vec::len).sum();
    let mut d = vec![0u8; 16];
    d[0] = list_id;
    d[1] = usage << 3;
    d[2..4].copy_from_slice(&u16::try_from(cscd_bytes).unwrap().to_be_bytes());
    d[8..12].copy_from_slice(&u32::try_from(segment_bytes).unwrap().to_be_bytes());
    cscds.iter().chain(segments).for_each(|x| d.extend_from_slice(x));
    d
}

impl Initiator {
    /// EXTENDED COPY (LID1) with `list` as its parameter data; returns (status, sense).
    fn extended_copy(&mut self, list: &[u8]) -> (u8, Option<(u8, u8, u8)>) {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x83;
        cdb[10..14].copy_from_slice(&u32::try_from(list.len()).unwrap().to_be_bytes());
        let (_, responses) = self.command(
            &cdb,
            false,
            !list.is_empty(),
            u32::try_from(list.len()).unwrap(),
            list,
            true,
        );
        status_of(responses.last().unwrap())
    }
    /// RECEIVE COPY RESULTS; returns the data (on GOOD) or the sense.
    fn receive_copy_results(&mut self, action: u8, list_id: u8) -> Result<Vec<u8>, (u8, u8, u8)> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x84;
        cdb[1] = action;
        cdb[2] = list_id;
        cdb[10..14].copy_from_slice(&1024u32.to_be_bytes());
        let (_, responses) = self.command(&cdb, true, false, 1024, &[], true);
        let last = responses.last().unwrap();
        if last.header.opcode() == opcode::DATA_IN {
            return Ok(responses.iter().flat_map(|p| p.data.to_vec()).collect());
        }
        match status_of(last) {
            (0, _) => Ok(Vec::new()),
            (_, sense) => Err(sense.unwrap()),
        }
    }
    fn inquiry_vpd(&mut self, page: u8) -> Vec<u8> {
        let (_, responses) =
            self.command(&[0x12, 1, page, 0x04, 0, 0], true, false, 1024, &[], true);
        responses.iter().flat_map(|p| p.data.to_vec()).collect()
    }
}

#[test]
fn extended_copy_copies_between_and_within_luns_and_reports_its_status() {
    let (mut i, second) = two_luns();
    let original = pattern(8 * 512, 3);
    i.write10(0, &original, original.len());
    // LUN 0 blocks 0-7 to LUN 1 blocks 100-107, then LUN 0 blocks 0-7 onto 4-11 (overlapping,
    // so it must copy from the end), with results held under list identifier 7.
    let list = copy_list(
        7,
        0b00,
        &[cscd(0), cscd(1)],
        &[segment(0, 1, 8, 0, 100), segment(0, 0, 8, 0, 4)],
    );
    assert_eq!(i.extended_copy(&list), (0, None));
    assert_eq!(&second.data.lock().unwrap()[100 * 512..108 * 512], &original[..]);
    assert_eq!(i.read10(4, 8), original, "the overlapping copy reads before it overwrites");
    let status = i.receive_copy_results(0x00, 7).expect("copy status");
    assert_eq!(&status[..4], &8u32.to_be_bytes(), "available data");
    assert_eq!(status[4], 0x01, "completed without errors");
    assert_eq!(&status[5..7], &2u16.to_be_bytes(), "segments processed");
    assert_eq!(status[7], 0, "transfer count in bytes");
    assert_eq!(&status[8..12], &(16u32 * 512).to_be_bytes());
    assert_eq!(
        i.receive_copy_results(0x00, 7),
        Err((5, 0x24, 0x00)),
        "a finished copy's status is returned once"
    );
    // LIST ID USAGE 11b holds nothing.
    assert_eq!(
        i.extended_copy(&copy_list(9, 0b11, &[cscd(0)], &[segment(0, 0, 1, 0, 50)])),
        (0, None)
    );
    assert_eq!(i.receive_copy_results(0x00, 9), Err((5, 0x24, 0x00)));
}

#[test]
fn extended_copy_refuses_bad_parameter_lists_without_writing() {
    let good_segment = || segment(0, 1, 8, 0, 100);
    let mut inline = copy_list(1, 0, &[cscd(0), cscd(1)], &[good_segment()]);
    inline[12..16].copy_from_slice(&512u32.to_be_bytes());
    inline.extend_from_slice(&[0u8; 512]);
    let mut foreign = cscd(1);
    foreign[8] ^= 0xff;
    let mut fibre_channel = cscd(0);
    fibre_channel[0] = 0xe0;
    let mut stream = good_segment();
    stream[0] = 0x03;
    let mut big_blocks = cscd(1);
    big_blocks[29..32].copy_from_slice(&[0, 0x10, 0]);
    let mut reserved_usage = copy_list(1, 0, &[cscd(0), cscd(1)], &[good_segment()]);
    reserved_usage[1] = 0b01 << 3;
    let full = copy_list(1, 0, &[cscd(0), cscd(1)], &[good_segment()]);
    // (what is wrong, parameter list, expected sense key / ASC / ASCQ)
    let cases: Vec<(&str, Vec<u8>, Sense3)> = vec![
        ("list cut inside a CSCD descriptor", full[..16 + 31].to_vec(), (5, 0x1a, 0)),
        ("list cut inside a segment descriptor", full[..full.len() - 1].to_vec(), (5, 0x1a, 0)),
        ("header alone, shorter than 16 bytes", full[..8].to_vec(), (5, 0x1a, 0)),
        ("inline data", inline, (5, 0x26, 0)),
        ("reserved LIST ID USAGE", reserved_usage, (5, 0x26, 0)),
        (
            "Fibre Channel CSCD",
            copy_list(1, 0, &[fibre_channel], &[good_segment()]),
            (5, 0x26, 0x07),
        ),
        (
            "stream-to-stream segment",
            copy_list(1, 0, &[cscd(0), cscd(1)], &[stream]),
            (5, 0x26, 0x09),
        ),
        ("too many CSCDs", copy_list(1, 0, &vec![cscd(0); 5], &[good_segment()]), (5, 0x26, 0x06)),
        (
            "too many segments (one CSCD: the list length fits)",
            copy_list(1, 0, &[cscd(0)], &vec![segment(0, 0, 8, 0, 100); 17]),
            (5, 0x26, 0x08),
        ),
        (
            "descriptor lists too long",
            copy_list(1, 0, &vec![cscd(0); 5], &vec![good_segment(); 17]),
            (5, 0x1a, 0),
        ),
        (
            "CSCD naming no LUN of ours",
            copy_list(1, 0, &[cscd(0), foreign], &[good_segment()]),
            (0xa, 0x08, 0x04),
        ),
        (
            "segment naming a missing CSCD",
            copy_list(1, 0, &[cscd(0)], &[good_segment()]),
            (0xa, 0x08, 0x04),
        ),
        (
            "block length unlike the LUN's",
            copy_list(1, 0, &[cscd(0), big_blocks], &[good_segment()]),
            (5, 0x26, 0),
        ),
        (
            "beyond the destination's end",
            copy_list(1, 0, &[cscd(0), cscd(1)], &[segment(0, 1, 8, 0, BLOCKS - 4)]),
            (0xa, 0, 0),
        ),
    ];
    let (mut i, second) = two_luns();
    i.write10(0, &pattern(8 * 512, 5), 8 * 512);
    for (what, list, expected) in cases {
        assert_eq!(i.extended_copy(&list), (2, Some(expected)), "{what}");
        assert!(second.data.lock().unwrap().iter().all(|&b| b == 0), "{what}: nothing written");
    }
    assert_eq!(i.extended_copy(&[]), (0, None), "an empty parameter list is no copy");
    let mut cdb = [0u8; 16];
    cdb[0] = 0x83;
    cdb[1] = 0x01; // LID4
    let (_, responses) = i.command(&cdb, false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]), (2, Some((5, 0x24, 0))));
}

#[test]
fn receive_copy_results_reports_the_copy_managers_limits() {
    let mut i = logged_in();
    let p = i.receive_copy_results(0x03, 0).expect("operating parameters");
    let be16 = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    assert_eq!(usize::try_from(be32(0)).unwrap(), p.len() - 4, "available data");
    assert_eq!(u32::from(be16(8)), 4, "maximum CSCD descriptor count");
    assert_eq!(u32::from(be16(10)), 16, "maximum segment descriptor count");
    assert_eq!(be32(12), 512, "maximum descriptor list length");
    assert_eq!(be32(20), 0, "no inline data");
    assert_eq!(&p[44..], &[0x02, 0xe4], "implemented descriptor type codes");
    assert_eq!(i.receive_copy_results(0x01, 0), Err((5, 0x24, 0)), "RECEIVE DATA is not offered");
    // The Third-party Copy VPD page lists both commands and is itself listed.
    assert!(i.inquiry_vpd(0x00)[4..].contains(&0x8f));
    let page = i.inquiry_vpd(0x8f);
    assert_eq!((page[1], &page[4..6]), (0x8f, &[0u8, 1][..]), "a Supported Commands descriptor");
    assert_eq!(&page[9..16], &[0x83, 1, 0x00, 0x84, 2, 0x00, 0x03]);
}

#[test]
fn write_atomic_honours_its_advertised_limits() {
    let mut i = logged_in();
    let limits = i.inquiry_vpd(0xb0);
    let field = |at: usize| {
        u32::from_be_bytes([limits[at], limits[at + 1], limits[at + 2], limits[at + 3]])
    };
    assert_eq!(field(44), 8, "maximum atomic transfer length: one 4 KiB block");
    assert_eq!(field(48), 8, "atomic alignment: 4 KiB");
    assert_eq!(field(52), 0, "no atomic granularity requirement");
    let atomic =
        |i: &mut Initiator, flags: u8, lba: u64, boundary: u16, blocks: u16, data: &[u8]| {
            let mut cdb = [0u8; 16];
            cdb[0] = 0x9c;
            cdb[1] = flags;
            cdb[2..10].copy_from_slice(&lba.to_be_bytes());
            cdb[10..12].copy_from_slice(&boundary.to_be_bytes());
            cdb[12..14].copy_from_slice(&blocks.to_be_bytes());
            let edtl = u32::try_from(data.len()).unwrap();
            let (_, responses) = i.command(&cdb, false, !data.is_empty(), edtl, data, true);
            status_of(&responses[0])
        };
    let block = pattern(4096, 9);
    // (what, flags, LBA, atomic boundary, blocks, data bytes, expected status and sense)
    let cases: Vec<AtomicCase> = vec![
        ("one aligned 4 KiB block with DPO and FUA", 0x18, 8, 0, 8, 4096, (0, None)),
        ("one 512-byte block", 0, 16, 0, 1, 512, (0, None)),
        ("zero blocks", 0, 0, 0, 0, 0, (0, None)),
        ("misaligned", 0, 1, 0, 1, 512, (2, Some((5, 0x24, 0)))),
        ("longer than the maximum", 0, 0, 0, 16, 8192, (2, Some((5, 0x24, 0)))),
        ("atomic boundary", 0, 0, 4, 8, 4096, (2, Some((5, 0x24, 0)))),
        ("WRPROTECT", 0x20, 0, 0, 8, 4096, (2, Some((5, 0x24, 0)))),
        ("beyond the end", 0, BLOCKS - 8, 0, 16, 8192, (2, Some((5, 0x21, 0)))),
        ("zero blocks past the end", 0, BLOCKS + 8, 0, 0, 0, (2, Some((5, 0x21, 0)))),
    ];
    for (what, flags, lba, boundary, blocks, bytes, expected) in cases {
        let data = &pattern(bytes, 9)[..];
        assert_eq!(atomic(&mut i, flags, lba, boundary, blocks, data), expected, "{what}");
    }
    assert_eq!(i.read10(8, 8), block);
    // The write reaches the driver as an exclusive op, so nothing overlaps it.
    i.hold_io = true;
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9c;
    cdb[13] = 8;
    i.command(&cdb, false, true, 4096, &block, true);
    assert!(matches!(i.held[0].op, IoOp::AtomicWrite { .. }) && i.held[0].op.is_exclusive());
    assert_eq!(status_of(&i.release_io()[0]), (0, None));
}

#[test]
fn write_atomic_follows_what_the_device_claims() {
    // (claimed max and alignment in bytes, reported max and alignment in blocks)
    let claims = [
        ((128 * 1024, 512), (256, 1)),
        // Clamped to ATOMIC_WRITE_BYTES_MAX (1 MiB), and at least one block.
        ((1024 * 1024, 512), (2048, 1)),
        ((4 * 1024 * 1024, 512), (2048, 1)),
        ((100, 100), (1, 1)),
        ((8192, 8192), (16, 16)),
    ];
    for ((max_bytes, alignment_bytes), (max_blocks, alignment_blocks)) in claims {
        let mut i = logged_in();
        *i.device.atomic_limits_bytes.lock().unwrap() = Some((max_bytes, alignment_bytes));
        let limits = i.inquiry_vpd(0xb0);
        let field = |at: usize| {
            u32::from_be_bytes([limits[at], limits[at + 1], limits[at + 2], limits[at + 3]])
        };
        assert_eq!((field(44), field(48)), (max_blocks, alignment_blocks), "{max_bytes}");
    }
    // A journaled device: 1..=256 blocks anywhere, as libiscsi's WriteAtomic16.Simple writes.
    // Data goes as immediate data, so the first burst must hold 128 KiB.
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device);
    i.login(&[("FirstBurstLength", "262144"), ("MaxBurstLength", "262144")]);
    *i.device.atomic_limits_bytes.lock().unwrap() = Some((128 * 1024, 512));
    let atomic = |i: &mut Initiator, lba: u64, blocks: u16| {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9c;
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[12..14].copy_from_slice(&blocks.to_be_bytes());
        let data = pattern(usize::from(blocks) * 512, 5);
        let edtl = u32::try_from(data.len()).unwrap();
        let (_, responses) = i.command(&cdb, false, true, edtl, &data, true);
        status_of(&responses[0])
    };
    for (lba, blocks, expected) in [
        (0, 256, (0, None)),
        (BLOCKS - 3, 3, (0, None)),
        (7, 1, (0, None)),
        (0, 257, (2, Some((5, 0x24, 0)))),
        (BLOCKS - 256, 256, (0, None)),
    ] {
        assert_eq!(atomic(&mut i, lba, blocks), expected, "{blocks} blocks at {lba}");
    }
    assert_eq!(i.read10(u32::try_from(BLOCKS - 256).unwrap(), 256), pattern(256 * 512, 5));
}

#[test]
fn report_target_port_groups_lists_the_peer_group_too() {
    let (config, device) = config(AuthConfig::default());
    let mut i = Initiator::new(config, device.clone());
    i.login(&[]);
    *device.alua.lock().unwrap() = AluaState::Standby;
    *device.peer_group.lock().unwrap() = Some(AluaPortGroup {
        group_id: 2,
        state: AluaState::ActiveOptimized,
        local: false,
        relative_ports: vec![17],
    });
    let mut cdb = [0u8; 12];
    cdb[0] = 0xa3;
    cdb[1] = 0x0a;
    cdb[9] = 0xff;
    let (_, responses) = i.command(&cdb, true, false, 255, &[], true);
    let d = &responses[0].data;
    assert_eq!(&d[..4], &24u32.to_be_bytes(), "two groups of one port each");
    // Ours: standby, not preferred, group 1, relative port 1.
    assert_eq!((d[4], &d[6..8], d[11], &d[14..16]), (0x02, &[0u8, 1][..], 1, &[0u8, 1][..]));
    // The peer's: active/optimized and preferred, group 2, relative port 17.
    assert_eq!((d[16], &d[18..20], d[23], &d[26..28]), (0x80, &[0u8, 2][..], 1, &[0u8, 17][..]));
    // VPD page 83h names our group.
    let page = i.inquiry_vpd(0x83);
    let group =
        page.windows(4).position(|w| w == [0x51, 0x95, 0x00, 0x04]).expect("group designator");
    assert_eq!(&page[group + 6..group + 8], &[0, 1]);
}

#[test]
fn extended_copy_respects_reservations_on_the_luns_it_reaches() {
    let (config, first, second) = two_lun_config();
    let mut owner = Initiator::new(config.clone(), first);
    owner.login(&[]);
    // Another initiator port (ISID) registers and takes a Write Exclusive reservation on LUN 1.
    let mut other = Initiator {
        connection: Connection::new(2, config.clone(), 1, [8u8; 32], 3),
        isid: 0x0002_3d00_0002,
        lun: 1,
        ..Initiator::new(config, second.clone())
    };
    other.login(&[]);
    let prout = |i: &mut Initiator, action: u8, pr_type: u8, key: u64, service_key: u64| {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = action;
        cdb[2] = pr_type;
        cdb[8] = 24;
        let mut data = vec![0u8; 24];
        data[..8].copy_from_slice(&key.to_be_bytes());
        data[8..16].copy_from_slice(&service_key.to_be_bytes());
        let (_, responses) = i.command(&cdb, false, true, 24, &data, true);
        status_of(&responses[0])
    };
    assert_eq!(prout(&mut other, 0x00, 0, 0, 0xabc), (0, None), "REGISTER");
    assert_eq!(prout(&mut other, 0x01, 0x01, 0xabc, 0), (0, None), "RESERVE write exclusive");
    let list = copy_list(1, 0b11, &[cscd(0), cscd(1)], &[segment(0, 1, 8, 0, 100)]);
    assert_eq!(owner.extended_copy(&list), (0x18, None), "RESERVATION CONFLICT on LUN 1");
    assert!(second.data.lock().unwrap().iter().all(|&b| b == 0), "nothing written");
    // The other direction only reads LUN 1, which Write Exclusive allows.
    let list = copy_list(1, 0b11, &[cscd(0), cscd(1)], &[segment(1, 0, 8, 0, 100)]);
    assert_eq!(owner.extended_copy(&list), (0, None));
}

#[test]
fn an_alua_change_is_announced_once_to_every_nexus() {
    let (config, device) = config(AuthConfig::default());
    let mut first = Initiator::new(config.clone(), device.clone());
    first.login(&[]);
    let mut second = Initiator {
        connection: Connection::new(2, config.clone(), 1, [8u8; 32], 3),
        isid: 0x0002_3d00_0002,
        ..Initiator::new(config, device.clone())
    };
    second.login(&[]);
    let tur = |i: &mut Initiator| {
        let (_, responses) = i.command(&[0u8; 6], false, false, 0, &[], true);
        status_of(&responses[0])
    };
    assert_eq!(tur(&mut first), (0, None));
    // Demotion: whichever nexus comes first detects it; both are told, once each.
    *device.alua.lock().unwrap() = AluaState::Standby;
    for i in [&mut second, &mut first] {
        assert_eq!(tur(i), (2, Some((6, 0x2a, 0x06))));
        assert_eq!(tur(i), (0, None));
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("TANDEM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        .. ProptestConfig::default()
    })]

    /// EXTENDED COPY parameter lists built from arbitrary descriptors (valid ones mixed with
    /// garbage) never panic the copy manager, and every I/O it asks for stays inside a LUN.
    #[test]
    fn arbitrary_copy_parameter_lists_never_escape_the_luns(
        cscd_lun in proptest::collection::vec((0u64..3, any::<bool>(), any::<[u8; 32]>()), 0..6),
        segments in proptest::collection::vec(
            (0u16..4, 0u16..4, 0u16..64, 0u64..BLOCKS + 8, 0u64..BLOCKS + 8, any::<bool>(), any::<[u8; 28]>()),
            0..18,
        ),
        usage in 0u8..4,
        cut in any::<u16>(),
    ) {
        let (mut i, _) = two_luns();
        let cscds: Vec<Vec<u8>> = cscd_lun
            .iter()
            .map(|(lun, garbage, bytes)| if *garbage { bytes.to_vec() } else { cscd(*lun) })
            .collect();
        let segments: Vec<Vec<u8>> = segments
            .iter()
            .map(|(s, d, blocks, from, to, garbage, bytes)| {
                if *garbage { bytes.to_vec() } else { segment(*s, *d, *blocks, *from, *to) }
            })
            .collect();
        let mut list = copy_list(1, usage, &cscds, &segments);
        if cut % 4 == 0 {
            list.truncate(usize::from(cut) % (list.len() + 1));
        }
        i.hold_io = true;
        let mut cdb = [0u8; 16];
        cdb[0] = 0x83;
        cdb[10..14].copy_from_slice(&u32::try_from(list.len()).unwrap().to_be_bytes());
        i.command(&cdb, false, !list.is_empty(), u32::try_from(list.len()).unwrap(), &list, true);
        for _ in 0..64 {
            let Some(request) = i.held.pop() else { break };
            let inside = match &request.op {
                IoOp::Read { offset_bytes, length_bytes } => offset_bytes + u64::from(*length_bytes) <= BLOCKS * 512,
                IoOp::Write { offset_bytes, data, .. } => offset_bytes + data.len() as u64 <= BLOCKS * 512,
                other => { prop_assert!(false, "a copy asked for {other:?}"); false }
            };
            prop_assert!(inside, "I/O outside the LUN: {:?}", request.op);
            let result = request.device.perform(request.op.clone());
            i.connection.handle_io_completion(request.itt, request.tag, result);
            while let Some(next) = i.connection.poll_io() {
                i.held.push(next);
            }
        }
        let _ = i.receive();
    }
}

#[test]
fn a_second_copy_under_a_running_list_identifier_is_refused() {
    let (mut i, _) = two_luns();
    let list = |id: u8| copy_list(id, 0b00, &[cscd(0), cscd(1)], &[segment(0, 1, 8, 0, 100)]);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x83;
    cdb[13] = u8::try_from(list(1).len()).unwrap();
    let edtl = u32::from(cdb[13]);
    i.hold_io = true;
    let (first, responses) = i.command(&cdb, false, true, edtl, &list(1), true);
    assert!(responses.is_empty(), "the first copy waits for its read");
    let (_, responses) = i.command(&cdb, false, true, edtl, &list(1), true);
    assert_eq!(status_of(&responses[0]), (2, Some((5, 0x00, 0x16))), "OPERATION IN PROGRESS");
    let (second, responses) = i.command(&cdb, false, true, edtl, &list(2), true);
    assert!(responses.is_empty(), "another list identifier runs");
    // Reads, then writes: two rounds of I/O finish both copies.
    let mut done = i.release_io();
    done.extend(i.release_io());
    let mut finished: Vec<u32> = done.iter().map(|p| p.header.itt()).collect();
    finished.sort_unstable();
    assert_eq!(finished, vec![first, second]);
    assert!(done.iter().all(|p| status_of(p) == (0, None)));
    // Finished, the list identifier is free again.
    i.hold_io = false;
    let (_, responses) = i.command(&cdb, false, true, edtl, &list(1), true);
    assert_eq!(status_of(&responses[0]), (0, None));
}

mod persistent_reservations {
    //! PERSISTENT RESERVE OUT REGISTER AND MOVE and REGISTER with SPEC_I_PT / ALL_TG_PT,
    //! through the replicable reservation state and through a logged-in connection.

    use super::*;
    use iscsi_target::scsi::pr::{
        self, Nexus, ProutResult, ReservationState, TransportId, parse_transport_id,
    };
    use iscsi_target::scsi::pr_image;

    const ILLEGAL_REQUEST: u8 = 0x05;
    /// Relative target ports of the target under test (two portals).
    const PORTS: &[u16] = &[1, 2];

    fn port(name: &str, isid: u64, relative_port: u16) -> Nexus {
        Nexus { initiator_name: name.into(), isid, relative_port }
    }

    /// A format 00h (device name) iSCSI TransportID.
    fn device_id(name: &str) -> Vec<u8> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        while body.len() < 20 || !body.len().is_multiple_of(4) {
            body.push(0);
        }
        let mut out = vec![0x05, 0];
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A format 01h TransportID with `text` as the body (for malformed ones).
    fn raw_port_id(text: &str) -> Vec<u8> {
        let mut id = device_id(text);
        id[0] = 0x45;
        id
    }

    fn move_params(key: u64, service_key: u64, flags: u8, port: u16, id: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&service_key.to_be_bytes());
        p[17] = flags;
        p[18..20].copy_from_slice(&port.to_be_bytes());
        p[20..24].copy_from_slice(&u32::try_from(id.len()).unwrap().to_be_bytes());
        p.extend_from_slice(id);
        p
    }

    fn register_params(key: u64, service_key: u64, flags: u8, ids: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&service_key.to_be_bytes());
        p[20] = flags;
        if flags & 0x08 != 0 {
            let all: Vec<u8> = ids.concat();
            p.extend_from_slice(&u32::try_from(all.len()).unwrap().to_be_bytes());
            p.extend_from_slice(&all);
        }
        p
    }

    fn check(result: ProutResult) -> Option<(u8, u8, u8)> {
        match result {
            ProutResult::Check(sense) => Some((sense.key, sense.asc, sense.ascq)),
            other => panic!("expected CHECK CONDITION, got {other:?}"),
        }
    }

    /// `a` registered with key 0xa holding a reservation of `reservation_type`; `b`
    /// registered with key 0xb.
    fn reserved(reservation_type: u8) -> (ReservationState, Nexus, Nexus) {
        let mut s = ReservationState::default();
        let a = port("iqn.2026-11.org.test:a", 0x23d000001, 1);
        let b = port("iqn.2026-11.org.test:b", 0x23d000002, 1);
        assert_eq!(s.prout(&a, 0, 0, 0, 0xa), ProutResult::Good(vec![]));
        assert_eq!(s.prout(&b, 0, 0, 0, 0xb), ProutResult::Good(vec![]));
        assert_eq!(s.prout(&a, 1, reservation_type, 0xa, 0), ProutResult::Good(vec![]));
        (s, a, b)
    }

    #[test]
    fn transport_ids_parse_both_iscsi_formats_and_refuse_bad_ones() {
        let n = port("iqn.2026-11.org.test:host", 0x0002_3d00_00ff, 1);
        let id = n.transport_id();
        assert_eq!(
            parse_transport_id(&id),
            Some((
                TransportId::Port { initiator_name: n.initiator_name.clone(), isid: n.isid },
                id.len()
            ))
        );
        let dev = device_id("iqn.2026-11.org.test:host");
        assert_eq!(
            parse_transport_id(&dev),
            Some((TransportId::Device("iqn.2026-11.org.test:host".into()), dev.len()))
        );
        let mut fibre = id.clone();
        fibre[0] = 0x40; // protocol 0: Fibre Channel
        let mut long = id.clone();
        long[2..4].copy_from_slice(&4000u16.to_be_bytes());
        let mut odd = id.clone();
        odd[3] += 1;
        let mut short = id.clone();
        short.truncate(id.len() - 4);
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("other protocol", fibre),
            ("format 10b", {
                let mut x = id.clone();
                x[0] = 0x85;
                x
            }),
            ("length over the limit", long),
            ("length not a multiple of 4", odd),
            ("truncated", short),
            ("no ISID", raw_port_id("iqn.2026-11.org.test:host")),
            ("ISID not hex", raw_port_id("iqn.2026-11.org.test:host,i,0xzz")),
            ("ISID too long", raw_port_id("iqn.x:h,i,0x1234567890abc")),
            ("empty name", raw_port_id(",i,0x1")),
            ("comma in a device name", device_id("iqn.x:a,b")),
            ("name too long", device_id(&"a".repeat(224))),
            ("not NUL-terminated", {
                let mut x = raw_port_id("iqn.x:h,i,0x1");
                let last = x.len() - 1;
                x[5..].fill(b'a');
                x[last] = b'a';
                x
            }),
        ];
        for (what, bytes) in bad {
            assert_eq!(parse_transport_id(&bytes), None, "{what}");
        }
    }

    #[test]
    fn register_and_move_moves_the_reservation_and_registers_the_destination() {
        let (mut s, a, _) = reserved(pr::pr_type::EXCLUSIVE_ACCESS);
        let c = port("iqn.2026-11.org.test:c", 0x23d000003, 2);
        let generation = s.generation;
        let p = move_params(0xa, 0xc, 0, 2, &c.transport_id());
        assert_eq!(s.register_and_move(&a, &p, PORTS), ProutResult::Good(vec![]));
        let r = s.reservation.clone().expect("still reserved");
        assert_eq!((r.holder, r.reservation_type), (c.clone(), pr::pr_type::EXCLUSIVE_ACCESS));
        assert_eq!(s.key_of(&c), Some(0xc));
        assert_eq!(s.key_of(&a), Some(0xa), "without UNREG the source stays registered");
        assert_eq!(s.generation, generation.wrapping_add(1));
        assert!(s.allows(&c, pr::Access::Write));
        assert!(!s.allows(&a, pr::Access::Read));

        // Moving back with UNREG unregisters the source; a registered destination gets the
        // service action key.
        let p = move_params(0xc, 0xaa, 0x02, 1, &a.transport_id());
        assert_eq!(s.register_and_move(&c, &p, PORTS), ProutResult::Good(vec![]));
        assert_eq!(s.reservation.as_ref().map(|r| r.holder.clone()), Some(a.clone()));
        assert_eq!(s.key_of(&a), Some(0xaa));
        assert_eq!(s.key_of(&c), None);
    }

    #[test]
    fn register_and_move_refuses_what_spc4_refuses() {
        let c = port("iqn.2026-11.org.test:c", 0x23d000003, 1);
        let good = || move_params(0xa, 0xc, 0, 1, &c.transport_id());
        // (what, reservation type, sender is b, parameter list, expected)
        type Case = (&'static str, u8, bool, Vec<u8>, Option<Option<(u8, u8, u8)>>);
        let we = pr::pr_type::WRITE_EXCLUSIVE;
        let ipl = Some(Some((ILLEGAL_REQUEST, 0x26, 0x00)));
        let length = Some(Some((ILLEGAL_REQUEST, 0x1a, 0x00)));
        let conflict = None;
        let mut wrong_length = good();
        wrong_length.pop();
        let mut big_length = good();
        big_length[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let mut mismatched_id_length = good();
        mismatched_id_length[20..24].copy_from_slice(&28u32.to_be_bytes());
        mismatched_id_length.truncate(24 + 28);
        let cases: Vec<Case> = vec![
            (
                "wrong reservation key",
                we,
                false,
                move_params(0xbad, 0xc, 0, 1, &c.transport_id()),
                conflict,
            ),
            (
                "sender registered but not the holder",
                we,
                true,
                move_params(0xb, 0xc, 0, 1, &c.transport_id()),
                conflict,
            ),
            (
                "all-registrants reservation",
                pr::pr_type::WRITE_EXCLUSIVE_ALL_REGISTRANTS,
                false,
                good(),
                conflict,
            ),
            (
                "zero service action key",
                we,
                false,
                move_params(0xa, 0, 0, 1, &c.transport_id()),
                ipl,
            ),
            ("APTPL", we, false, move_params(0xa, 0xc, 0x01, 1, &c.transport_id()), ipl),
            (
                "reserved flag bits",
                we,
                false,
                move_params(0xa, 0xc, 0x10, 1, &c.transport_id()),
                ipl,
            ),
            (
                "unknown relative target port",
                we,
                false,
                move_params(0xa, 0xc, 0, 9, &c.transport_id()),
                ipl,
            ),
            (
                "moving to the source I_T nexus",
                we,
                false,
                move_params(
                    0xa,
                    0xc,
                    0,
                    1,
                    &port("iqn.2026-11.org.test:a", 0x23d000001, 1).transport_id(),
                ),
                ipl,
            ),
            (
                "device-name TransportID",
                we,
                false,
                move_params(0xa, 0xc, 0, 1, &device_id("iqn.2026-11.org.test:c")),
                ipl,
            ),
            (
                "malformed TransportID",
                we,
                false,
                move_params(0xa, 0xc, 0, 1, &raw_port_id("iqn.x:c,i,0xq")),
                ipl,
            ),
            ("TransportID shorter than its length field", we, false, mismatched_id_length, ipl),
            ("list shorter than the TransportID length", we, false, wrong_length, length),
            ("TransportID length over the limit", we, false, big_length, ipl),
            ("list shorter than 24 bytes", we, false, vec![0u8; 20], length),
        ];
        for (what, reservation_type, from_b, params, expected) in cases {
            let (mut s, a, b) = reserved(reservation_type);
            let before = s.clone();
            let sender = if from_b { b } else { a };
            let result = s.register_and_move(&sender, &params, PORTS);
            match expected {
                None => assert_eq!(result, ProutResult::Conflict, "{what}"),
                Some(sense) => assert_eq!(check(result), sense, "{what}"),
            }
            assert_eq!(s, before, "{what}: nothing changes");
        }
        // Without any reservation there is nothing to move.
        let mut s = ReservationState::default();
        let a = port("iqn.2026-11.org.test:a", 0x23d000001, 1);
        assert_eq!(s.prout(&a, 0, 0, 0, 0xa), ProutResult::Good(vec![]));
        assert_eq!(s.register_and_move(&a, &good(), PORTS), ProutResult::Conflict);
    }

    #[test]
    fn register_with_spec_i_pt_and_all_tg_pt_registers_every_named_port_or_none() {
        let a = port("iqn.2026-11.org.test:a", 0x23d000001, 1);
        let b = port("iqn.2026-11.org.test:b", 0x23d000002, 1);
        let c = port("iqn.2026-11.org.test:c", 0x23d000003, 1);
        // SPEC_I_PT: the sender and each TransportID on the sender's target port.
        let mut s = ReservationState::default();
        let p = register_params(0, 0x77, 0x08, &[b.transport_id(), c.transport_id()]);
        assert_eq!(s.register(&a, 0, &p, PORTS), ProutResult::Good(vec![]));
        for n in [&a, &b, &c] {
            assert_eq!(s.key_of(n), Some(0x77), "{n:?}");
        }
        assert_eq!(s.registrations.len(), 3);
        assert_eq!(s.generation, 1);
        // ALL_TG_PT: every target port, flagged.
        let mut s = ReservationState::default();
        let p = register_params(0, 0x55, 0x04 | 0x08, &[b.transport_id()]);
        assert_eq!(s.register(&a, 0, &p, PORTS), ProutResult::Good(vec![]));
        for n in [&a, &b] {
            for relative_port in PORTS {
                let on = Nexus { relative_port: *relative_port, ..n.clone() };
                assert_eq!(s.key_of(&on), Some(0x55), "{on:?}");
            }
        }
        assert!(s.registrations.iter().all(|r| r.all_tg_pt));
        assert_eq!(s.registrations.len(), 4);
        // ALL_TG_PT is ignored for an already registered sender: only its key changes.
        let p = register_params(0x55, 0x56, 0x04, &[]);
        assert_eq!(s.register(&a, 0, &p, PORTS), ProutResult::Good(vec![]));
        assert_eq!(s.key_of(&a), Some(0x56));
        assert_eq!(s.registrations.len(), 4);
    }

    #[test]
    fn register_with_spec_i_pt_refuses_bad_lists_atomically() {
        let a = port("iqn.2026-11.org.test:a", 0x23d000001, 1);
        let b = port("iqn.2026-11.org.test:b", 0x23d000002, 1);
        let c = port("iqn.2026-11.org.test:c", 0x23d000003, 1);
        let ipl = Some((ILLEGAL_REQUEST, 0x26, 0x00));
        let length = Some((ILLEGAL_REQUEST, 0x1a, 0x00));
        let mut truncated = register_params(0, 0x77, 0x08, &[b.transport_id()]);
        truncated.pop();
        let mut overlong = register_params(0, 0x77, 0x08, &[b.transport_id()]);
        overlong[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
        let too_many: Vec<Vec<u8>> = (0..=pr::PR_SPEC_I_PT_TRANSPORT_IDS_MAX as u64)
            .map(|i| port("iqn.2026-11.org.test:many", i, 1).transport_id())
            .collect();
        // (what, action, parameter list, expected sense)
        let cases: Vec<(&str, u8, Vec<u8>, Option<Sense3>)> = vec![
            (
                "second TransportID malformed",
                0,
                register_params(0, 0x77, 0x08, &[b.transport_id(), raw_port_id("iqn.x:c")]),
                ipl,
            ),
            (
                "device-name TransportID",
                0,
                register_params(0, 0x77, 0x08, &[device_id("iqn.x:c")]),
                ipl,
            ),
            (
                "already registered I_T nexus",
                0,
                register_params(0, 0x77, 0x08, &[c.transport_id(), b.transport_id()]),
                ipl,
            ),
            (
                "SPEC_I_PT with REGISTER AND IGNORE EXISTING KEY",
                6,
                register_params(0, 0x77, 0x08, &[c.transport_id()]),
                ipl,
            ),
            ("APTPL", 0, register_params(0, 0x77, 0x01, &[]), ipl),
            ("list shorter than its TransportID length", 0, truncated, length),
            ("TransportID length over the limit", 0, overlong, length),
            (
                "SPEC_I_PT without the length field",
                0,
                register_params(0, 0x77, 0x00, &[]).into_iter().chain([0]).collect(),
                length,
            ),
            (
                "more TransportIDs than we keep",
                0,
                register_params(0, 0x77, 0x08, &too_many),
                Some((ILLEGAL_REQUEST, 0x55, 0x04)),
            ),
        ];
        for (what, action, params, expected) in cases {
            let mut s = ReservationState::default();
            assert_eq!(s.prout(&b, 0, 0, 0, 0xb), ProutResult::Good(vec![]));
            let before = s.clone();
            assert_eq!(check(s.register(&a, action, &params, PORTS)), expected, "{what}");
            assert_eq!(s, before, "{what}: nothing registered");
        }
        // A registered sender may not use SPEC_I_PT; a wrong key still conflicts first.
        let mut s = ReservationState::default();
        assert_eq!(s.prout(&a, 0, 0, 0, 0xa), ProutResult::Good(vec![]));
        let p = register_params(0xa, 0x77, 0x08, &[c.transport_id()]);
        assert_eq!(check(s.register(&a, 0, &p, PORTS)), ipl);
        let p = register_params(0xbad, 0x77, 0x08, &[c.transport_id()]);
        assert_eq!(s.register(&a, 0, &p, PORTS), ProutResult::Conflict);
    }

    /// PERSISTENT RESERVE OUT / IN through a logged-in connection.
    fn prout(i: &mut Initiator, action: u8, pr_type: u8, params: &[u8]) -> (u8, Option<Sense3>) {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = action;
        cdb[2] = pr_type;
        let length = u32::try_from(params.len()).unwrap();
        cdb[5..9].copy_from_slice(&length.to_be_bytes());
        let (_, responses) = i.command(&cdb, false, true, length, params, true);
        status_of(responses.last().expect("a response"))
    }

    fn prin(i: &mut Initiator, action: u8) -> Vec<u8> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5e;
        cdb[1] = action;
        cdb[7..9].copy_from_slice(&1024u16.to_be_bytes());
        let (_, responses) = i.command(&cdb, true, false, 1024, &[], true);
        responses
            .iter()
            .filter(|p| p.header.opcode() == opcode::DATA_IN)
            .flat_map(|p| p.data.to_vec())
            .collect()
    }

    fn register_params_plain(key: u64, service_key: u64) -> Vec<u8> {
        register_params(key, service_key, 0, &[])
    }

    #[test]
    fn a_reservation_change_completes_only_once_the_device_made_it_durable() {
        let (config, device) = super::config(AuthConfig::default());
        let mut i = Initiator::new(config, device);
        i.login(&[]);
        // REGISTER: no answer until the device has persisted the new image.
        i.hold_io = true;
        let register = register_params_plain(0, 0xa);
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[8] = 24;
        let (_, responses) = i.command(&cdb, false, true, 24, &register, true);
        assert!(responses.is_empty(), "GOOD before the image is durable: {responses:?}");
        assert_eq!(i.held.len(), 1);
        let IoOp::PersistReservations { version, image } = i.held[0].op.clone() else {
            panic!("expected PersistReservations, got {:?}", i.held[0].op);
        };
        let (decoded_version, state) = pr_image::decode(&image).expect("a valid image");
        assert_eq!((version, decoded_version), (1, 1));
        assert_eq!(state.registrations.iter().map(|r| r.key).collect::<Vec<_>>(), vec![0xa]);
        let responses = i.release_io();
        assert_eq!(status_of(responses.last().expect("a response")), (0, None));
        // A command that changes nothing (a wrong key) is answered at once, nothing persisted.
        i.hold_io = true;
        let (_, responses) =
            i.command(&cdb, false, true, 24, &register_params_plain(0xbad, 0xc), true);
        assert_eq!(status_of(responses.last().expect("a response")), (0x18, None));
        assert!(i.held.is_empty());
        // A device that cannot persist (a demoted node) fails the command: never GOOD.
        let (_, responses) =
            i.command(&cdb, false, true, 24, &register_params_plain(0xa, 0xb), true);
        assert!(responses.is_empty());
        let request = i.held.pop().expect("a persist request");
        assert!(matches!(request.op, IoOp::PersistReservations { version: 2, .. }));
        i.connection.handle_io_completion(request.itt, request.tag, Err(DeviceError::Standby));
        let responses = i.receive();
        assert_eq!(status_of(responses.last().expect("a response")).0, 0x02);
    }

    #[test]
    fn a_loaded_image_is_adopted_once_before_the_next_command() {
        let (config, device) = super::config(AuthConfig::default());
        let mut i = Initiator::new(config, device.clone());
        i.login(&[]);
        let holder = port(INITIATOR, i.isid, 1);
        let state = ReservationState {
            generation: 41,
            registrations: vec![pr::Registration {
                nexus: holder.clone(),
                key: 0x55,
                all_tg_pt: false,
            }],
            reservation: Some(pr::Reservation {
                holder,
                reservation_type: pr::pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            }),
            reserve6: None,
        };
        *device.reservations_loaded.lock().unwrap() =
            Some((1, Bytes::from(pr_image::encode(&state, 9))));
        let keys = prin(&mut i, 0);
        assert_eq!(u32::from_be_bytes(keys[..4].try_into().unwrap()), 41, "PRgeneration kept");
        assert_eq!(u64::from_be_bytes(keys[8..16].try_into().unwrap()), 0x55);
        // The next change persists a newer image than the loaded one.
        i.hold_io = true;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = 2; // RELEASE
        cdb[2] = pr::pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY;
        cdb[8] = 24;
        let (_, _) = i.command(&cdb, false, true, 24, &register_params_plain(0x55, 0), true);
        assert!(matches!(i.held[0].op, IoOp::PersistReservations { version: 10, .. }));
        i.release_io();
        // The same load is not adopted twice: the release stays.
        let r = prin(&mut i, 1);
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 0, "no reservation");
    }

    #[test]
    fn register_and_move_over_the_wire_hands_the_reservation_to_another_port() {
        let (config, device) = super::config(AuthConfig::default());
        let mut owner = Initiator::new(config.clone(), device.clone());
        owner.login(&[]);
        let mut other = Initiator {
            connection: Connection::new(2, config.clone(), 1, [8u8; 32], 3),
            isid: 0x0002_3d00_0002,
            ..Initiator::new(config, device)
        };
        other.login(&[]);
        // REPORT CAPABILITIES: CRH, SIP_C and ATP_C; PTPL_C clear;
        // TMV and ALLOW COMMANDS 001b.
        let caps = prin(&mut owner, 2);
        assert_eq!((caps[2], caps[3]), (0x1c, 0x90));
        let register = register_params(0, 0xa, 0, &[]);
        assert_eq!(prout(&mut owner, 0, 0, &register), (0, None));
        assert_eq!(
            prout(&mut owner, 1, pr::pr_type::EXCLUSIVE_ACCESS, &register_params(0xa, 0, 0, &[])),
            (0, None)
        );
        let destination = port(INITIATOR, other.isid, 1);
        let p = move_params(0xa, 0xb, 0x02, 1, &destination.transport_id());
        assert_eq!(prout(&mut owner, 7, 0, &p), (0, None), "REGISTER AND MOVE with UNREG");
        // Moving again from the old holder: it is no longer registered.
        assert_eq!(prout(&mut owner, 7, 0, &p), (0x18, None));
        // READ RESERVATION: the destination's key and the same type.
        let r = prin(&mut other, 1);
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 16);
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 0xb);
        assert_eq!(r[21] & 0x0f, pr::pr_type::EXCLUSIVE_ACCESS);
        // READ FULL STATUS: one registration, the holder, with its TransportID.
        let f = prin(&mut other, 3);
        let descriptors = u32::from_be_bytes(f[4..8].try_into().unwrap()) as usize;
        let d = &f[8..8 + descriptors];
        assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 0xb);
        assert_eq!(d[12] & 0x03, 0x01, "R_HOLDER, not ALL_TG_PT");
        assert_eq!(d[13] & 0x0f, pr::pr_type::EXCLUSIVE_ACCESS);
        let id = destination.transport_id();
        assert_eq!(&d[24..24 + id.len()], id.as_slice());
        assert_eq!(descriptors, 24 + id.len(), "only the destination is registered");
        // The old holder is locked out, the new one may write.
        let mut w = [0u8; 10];
        w[0] = 0x2a;
        w[8] = 1;
        let (_, responses) = owner.command(&w, false, true, 512, &[1u8; 512], true);
        assert_eq!(status_of(responses.last().unwrap()).0, 0x18);
        let (_, responses) = other.command(&w, false, true, 512, &[1u8; 512], true);
        assert_eq!(status_of(responses.last().unwrap()).0, 0);
    }
}

/// Runs a forwarded request on `node`'s logical unit the way its driver would
/// (`driver::execute_forwarded`), with synchronous I/O.
fn execute_remote(
    node: &Arc<Config<MemoryDevice>>,
    request: iscsi_target::ForwardRequest,
) -> Result<iscsi_target::ForwardReply, iscsi_target::ForwardError> {
    use iscsi_target::{ForwardReply, ForwardRequest, LuStep, LuTask};
    let command = match request {
        ForwardRequest::Command(command) => command,
        notice => return node.handle_remote_notice(&notice).map(|()| ForwardReply::Done),
    };
    let (mut task, mut step) = match LuTask::start(node.clone(), command) {
        Ok(started) => started,
        Err(outcome) => return Ok(ForwardReply::Outcome(outcome)),
    };
    loop {
        match step {
            LuStep::Done(outcome) => return Ok(ForwardReply::Outcome(outcome)),
            LuStep::Io { device, op } => step = task.resume(device.perform(op)),
        }
    }
}

impl Initiator {
    /// Answers every forwarded request: run on `node`, or lost with the link when `None`.
    fn answer_forwards(&mut self, node: Option<&Arc<Config<MemoryDevice>>>) -> Vec<Pdu> {
        for ticket in std::mem::take(&mut self.forwarded) {
            let result = match node {
                Some(node) => execute_remote(node, ticket.request),
                None => Err(iscsi_target::ForwardError::Unavailable("link lost".into())),
            };
            self.connection.handle_forward_completion(ticket.itt, ticket.tag, result);
        }
        self.run_io();
        self.receive()
    }

    /// TEST UNIT READY, answered through `node` when this port forwards.
    fn test_unit_ready(&mut self, node: Option<&Arc<Config<MemoryDevice>>>) -> Pdu {
        let (_, mut responses) = self.command(&[0; 6], false, false, 0, &[], true);
        if responses.is_empty() {
            responses = self.answer_forwards(node);
        }
        responses.remove(0)
    }
}

/// The logical unit on node "primary" (ports numbered from 1) and a remote port of it on node
/// "secondary" (its own device, which must stay untouched; ports numbered from 17).
fn primary_and_remote_port() -> (Initiator, Initiator, Arc<Config<MemoryDevice>>, Arc<MemoryDevice>)
{
    let portals = || vec![PortalAddress { address: "127.0.0.1:3260".into(), relative_port: 1 }];
    let primary_device = Arc::new(MemoryDevice::new());
    *primary_device.peer_group.lock().unwrap() = Some(AluaPortGroup {
        group_id: 2,
        state: AluaState::ActiveNonOptimized,
        local: false,
        relative_ports: vec![17],
    });
    let lun = Arc::new(LogicalUnit::new(TARGET, 0, primary_device.clone()));
    let target = TargetNode::new(TARGET, vec![lun]).with_ports(0, vec![17]);
    let primary = Arc::new(Config::new(vec![target], AuthConfig::default(), portals()));
    let secondary_device = Arc::new(MemoryDevice::new());
    *secondary_device.forwarding.lock().unwrap() = true;
    *secondary_device.alua.lock().unwrap() = AluaState::ActiveNonOptimized;
    let lun = Arc::new(LogicalUnit::new(TARGET, 0, secondary_device.clone()));
    let target = TargetNode::new(TARGET, vec![lun]).with_ports(16, vec![1]);
    let secondary = Arc::new(Config::new(vec![target], AuthConfig::default(), portals()));
    let mut local = Initiator::new(primary.clone(), primary_device);
    local.login(&[]);
    let mut remote = Initiator::new(secondary, secondary_device.clone());
    remote.login(&[]);
    // The login told the primary about the remote nexus.
    assert!(
        remote.forwarded.iter().any(|t| matches!(&t.request,
            iscsi_target::ForwardRequest::NexusUp { nexus, .. } if nexus.relative_port == 17)),
        "a NexusUp for port 17"
    );
    remote.answer_forwards(Some(&primary));
    (local, remote, primary, secondary_device)
}

#[test]
fn a_remote_port_runs_its_commands_on_the_primarys_logical_unit() {
    let (mut local, mut remote, primary, secondary_device) = primary_and_remote_port();
    // A write through the remote port waits for the primary, then lands there only.
    let data = pattern(4096, 3);
    let (_, responses) = remote.write10(8, &data, 4096);
    assert!(responses.is_empty(), "nothing answered before the primary did: {responses:?}");
    let responses = remote.answer_forwards(Some(&primary));
    assert_eq!(status_of(&responses[0]), (0, None));
    assert_eq!(local.read10(8, 8), data);
    assert!(secondary_device.data.lock().unwrap().iter().all(|b| *b == 0), "secondary untouched");
    // Data-In comes back with the remote port's own expected length and residuals.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&8u32.to_be_bytes());
    cdb[8] = 8;
    remote.command(&cdb, true, false, 1024, &[], true);
    let responses = remote.answer_forwards(Some(&primary));
    let data_in: Vec<u8> = responses.iter().flat_map(|p| p.data.to_vec()).collect();
    assert_eq!(data_in, data[..1024]);
    let last = responses.last().unwrap();
    assert_eq!((last.header.flags() & 0x04, last.header.u32_at(44)), (0x04, 4096 - 1024));

    // VPD page 83h names the port a command arrived on and that port's group.
    let port_and_group = |port: &mut Initiator| {
        let (_, mut responses) =
            port.command(&[0x12, 0x01, 0x83, 0x01, 0x00, 0x00], true, false, 256, &[], true);
        if responses.is_empty() {
            responses = port.answer_forwards(Some(&primary));
        }
        let page = &responses[0].data;
        let (mut at, mut found) = (4, (0, 0));
        while at + 4 <= page.len() {
            let (kind, length) = (page[at + 1] & 0xf, usize::from(page[at + 3]));
            let value = u16::from_be_bytes([page[at + 4 + length - 2], page[at + 4 + length - 1]]);
            match kind {
                4 => found.0 = value,
                5 => found.1 = value,
                _ => {}
            }
            at += 4 + length;
        }
        found
    };
    assert_eq!(port_and_group(&mut local), (1, 1));
    assert_eq!(port_and_group(&mut remote), (17, 2));

    // One reservation across both ports: RESERVE(6) on the local port blocks the remote one.
    let (_, responses) = local.command(&[0x16, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]).0, 0);
    remote.write10(0, &pattern(512, 1), 512);
    let responses = remote.answer_forwards(Some(&primary));
    assert_eq!(status_of(&responses[0]), (0x18, None), "RESERVATION CONFLICT");
    local.command(&[0x17, 0, 0, 0, 0, 0], false, false, 0, &[], true);

    // A LUN reset on the remote port is answered only once the primary reset the logical
    // unit, and every nexus on both nodes gets its unit attention.
    let mut h = Header::new(opcode::TASK_MANAGEMENT_REQUEST);
    h.0[0] |= 0x40;
    h.set_flags(0x80 | 5);
    h.set_itt(0x77);
    h.set_u32(20, 0xffff_ffff);
    h.set_u32(24, remote.cmdsn);
    assert!(remote.send(h, &[]).is_empty(), "the reset waits for the primary");
    let responses = remote.answer_forwards(Some(&primary));
    assert_eq!(
        (responses[0].header.opcode(), responses[0].header.0[2]),
        (opcode::TASK_MANAGEMENT_RESPONSE, 0)
    );
    for port in [&mut local, &mut remote] {
        let response = port.test_unit_ready(Some(&primary));
        assert_eq!(status_of(&response), (2, Some((6, 0x29, 0x03))), "BUS DEVICE RESET");
        assert_eq!(status_of(&port.test_unit_ready(Some(&primary))).0, 0);
    }

    // Logging out of the remote port releases its nexus on the primary: its RESERVE(6) too.
    remote.command(&[0x16, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    let responses = remote.answer_forwards(Some(&primary));
    assert_eq!(status_of(&responses[0]).0, 0);
    let (_, responses) = local.command(&[0x16, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]).0, 0x18, "the remote nexus holds RESERVE(6)");
    remote.connection.handle_disconnect();
    remote.run_io();
    assert!(
        remote
            .forwarded
            .iter()
            .any(|t| matches!(t.request, iscsi_target::ForwardRequest::NexusLost { .. })),
        "the primary hears the nexus is gone"
    );
    remote.answer_forwards(Some(&primary));
    let (_, responses) = local.command(&[0x16, 0, 0, 0, 0, 0], false, false, 0, &[], true);
    assert_eq!(status_of(&responses[0]).0, 0, "released with the nexus");
}

#[test]
fn a_lost_forward_link_never_completes_a_command_with_success() {
    let (_local, mut remote, primary, _) = primary_and_remote_port();
    remote.write10(0, &pattern(4096, 9), 4096);
    let responses = remote.answer_forwards(None);
    assert_eq!(status_of(&responses[0]), (2, Some((2, 0x04, 0x0a))), "NOT READY, ALUA TRANSITION");
    // A reset that could not reach the logical unit is rejected, not confirmed.
    let mut h = Header::new(opcode::TASK_MANAGEMENT_REQUEST);
    h.0[0] |= 0x40;
    h.set_flags(0x80 | 5);
    h.set_itt(0x78);
    h.set_u32(20, 0xffff_ffff);
    h.set_u32(24, remote.cmdsn);
    remote.send(h, &[]);
    let responses = remote.answer_forwards(None);
    assert_eq!(responses[0].header.0[2], 255, "function rejected");
    // The port falls back to serving locally (standby) once it stops forwarding.
    *remote.device.forwarding.lock().unwrap() = false;
    *remote.device.alua.lock().unwrap() = AluaState::Standby;
    let first = remote.test_unit_ready(None);
    assert_eq!(status_of(&first), (2, Some((6, 0x2a, 0x06))), "ASYMMETRIC ACCESS STATE CHANGED");
    let (_, responses) = remote.write10(0, &pattern(512, 1), 512);
    assert_eq!(status_of(&responses[0]), (2, Some((2, 0x04, 0x0b))), "standby");
    assert!(remote.forwarded.is_empty(), "nothing forwarded any more");
    drop(primary);
}

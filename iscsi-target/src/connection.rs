//! One iSCSI connection (and, since MC/S is not offered, its session): login, full feature
//! phase, SCSI task sequencing and task management. Pure: PDUs and I/O completions in,
//! encoded bytes, I/O requests and events out.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};

use crate::constants::REMOTE_NEXUSES_MAX;
use crate::constants::{
    BHS_BYTES, CHAP_CHALLENGE_BYTES, COMMANDS_MAX, CONNECTION_TRANSFER_BYTES_MAX,
    IMMEDIATE_COMMANDS_MAX, LOGIN_DATA_SEGMENT_BYTES_MAX, LUNS_MAX, RECV_DATA_SEGMENT_BYTES_MAX,
    SEND_DATA_SEGMENT_BYTES_MAX, SESSIONS_MAX, TRANSFER_BUFFER_ALIGNMENT_BYTES, TRANSFER_BYTES_MAX,
};
use crate::device::{AluaState, BlockDevice, DeviceError, IoData, IoOp};
use crate::login::{AuthConfig, Established, Login, LoginOutcome, SessionType, TargetDirectory};
use crate::pdu::{self, Digests, Header, Pdu, TAG_NONE, opcode, reject_reason, serial_lt};
use crate::remote::{
    ForwardError, ForwardReply, ForwardRequest, ForwardedCommand, ForwardedOutcome,
};
use crate::scsi::pr::{Access, Nexus};
use crate::scsi::sense::{self, Sense, codes};
use crate::scsi::{
    self, Context, DeviceInfo, LunIdentity, LunShared, OtherLun, Outcome, Pending, Step,
};
use crate::text::{self, SessionParams};
use std::collections::HashSet;

/// Data-In segments at least this long are handed to the socket without a copy.
const ZERO_COPY_BYTES_MIN: usize = 16 * 1024;

/// The nexus, target and configuration a command runs against.
type ContextParts<D> = (Arc<Nexus>, Option<Arc<TargetNode<D>>>, Arc<Config<D>>);

/// A logical unit: its device, identity and the state shared by every session.
pub struct LogicalUnit<D> {
    pub identity: LunIdentity,
    pub device: Arc<D>,
    pub shared: Mutex<LunShared>,
}

impl<D: BlockDevice> LogicalUnit<D> {
    pub fn new(target_name: &str, lun: u64, device: Arc<D>) -> Self {
        let identity = LunIdentity::new(target_name, lun);
        Self { identity, device, shared: Mutex::new(LunShared::new()) }
    }
    /// A copy of the persistent-reservation state, for replicating it to peers.
    pub fn reservations(&self) -> crate::scsi::pr::ReservationState {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).reservations.clone()
    }
    /// Installs reservation state received from a peer (e.g. on the node that became primary).
    pub fn restore_reservations(&self, state: crate::scsi::pr::ReservationState) {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).reservations = state;
    }
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size_bytes: self.device.size_bytes(),
            block_size_bytes: self.device.block_size_bytes(),
            thin: self.device.thin_provisioned(),
            alua: self.device.alua_state(),
            atomic_write_max_bytes: self.device.atomic_write_max_bytes(),
            atomic_write_alignment_bytes: self.device.atomic_write_alignment_bytes(),
        }
    }
}

/// A target and its logical units. Immutable: to change its LUNs, build a new one and
/// [`Config::add_target`] it; sessions keep the node they logged in to.
pub struct TargetNode<D> {
    pub name: String,
    pub luns: Vec<Arc<LogicalUnit<D>>>,
    lun_ids: Vec<u64>,
    /// Added to each portal's relative port identifier for sessions to this target, so the
    /// ports of one logical unit served by several nodes have distinct identifiers.
    port_offset: u16,
    /// Relative port identifiers of the logical unit's ports on other nodes (remote ports):
    /// persistent reservations with ALL_TG_PT and REGISTER AND MOVE name them too.
    remote_ports: Vec<u16>,
    /// This target's own authentication, replacing the portal-wide one (`Config::auth`).
    auth: Option<AuthConfig>,
}

impl<D: BlockDevice> TargetNode<D> {
    pub fn new(name: impl Into<String>, luns: Vec<Arc<LogicalUnit<D>>>) -> Self {
        assert!(luns.len() <= LUNS_MAX, "too many LUNs for one target");
        let lun_ids = luns.iter().map(|l| l.identity.lun).collect();
        Self {
            name: name.into(),
            luns,
            lun_ids,
            port_offset: 0,
            remote_ports: Vec::new(),
            auth: None,
        }
    }
    /// Gives this target its own authentication (e.g. a volume's CHAP identity): logins to it
    /// need these credentials, whatever the portal-wide ones are.
    pub fn with_auth(mut self, auth: AuthConfig) -> Self {
        self.auth = Some(auth);
        self
    }
    /// Numbers this target's ports from `port_offset` + the portal's identifier, and names
    /// the logical unit's ports on other nodes.
    pub fn with_ports(mut self, port_offset: u16, remote_ports: Vec<u16>) -> Self {
        self.port_offset = port_offset;
        self.remote_ports = remote_ports;
        self
    }
    fn lun(&self, lun_id: u64) -> Option<&Arc<LogicalUnit<D>>> {
        self.luns.iter().find(|l| l.identity.lun == lun_id)
    }
}

/// A portal as SendTargets reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalAddress {
    /// `ip:port` (IPv6 in brackets).
    pub address: String,
    pub relative_port: u16,
}

/// The target configuration plus process-wide registries (TSIHs, sessions, nexuses).
pub struct Config<D> {
    targets: RwLock<Vec<Arc<TargetNode<D>>>>,
    pub auth: AuthConfig,
    pub portals: Vec<PortalAddress>,
    ports: Vec<u16>,
    /// Target portal group tag we report; all portals share one group.
    pub portal_group_tag: u16,
    next_tsih: AtomicU16,
    sessions: Mutex<HashMap<SessionKey, (u64, u16)>>,
    /// I_T nexuses of remote ports (sessions on other nodes whose commands run here), by
    /// target: they get the logical unit's unit attentions like local ones.
    remote_nexuses: Mutex<HashMap<String, HashSet<Nexus>>>,
}

/// Identifies a session for reinstatement: initiator name, ISID and target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub initiator_name: String,
    pub isid: u64,
    pub target_name: String,
}

impl<D: BlockDevice> Config<D> {
    pub fn new(targets: Vec<TargetNode<D>>, auth: AuthConfig, portals: Vec<PortalAddress>) -> Self {
        let ports = portals.iter().map(|p| p.relative_port).collect();
        Self {
            targets: RwLock::new(targets.into_iter().map(Arc::new).collect()),
            auth,
            portals,
            ports,
            portal_group_tag: 1,
            next_tsih: AtomicU16::new(1),
            sessions: Mutex::new(HashMap::new()),
            remote_nexuses: Mutex::new(HashMap::new()),
        }
    }
    /// The target called `name`.
    pub fn target(&self, name: &str) -> Option<Arc<TargetNode<D>>> {
        let targets = self.targets.read().unwrap_or_else(|p| p.into_inner());
        targets.iter().find(|t| t.name == name).cloned()
    }
    /// Every target, in the order they were added.
    pub fn targets(&self) -> Vec<Arc<TargetNode<D>>> {
        self.targets.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Exports a target, replacing one of the same name (new logins see the new LUNs). A node
    /// that becomes primary exports its LUN before it accepts logins for it.
    pub fn add_target(&self, target: TargetNode<D>) {
        let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
        targets.retain(|t| t.name != target.name);
        targets.push(Arc::new(target));
    }
    /// Stops exporting a target to new logins; returns whether it existed.
    pub fn remove_target(&self, name: &str) -> bool {
        let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
        let before = targets.len();
        targets.retain(|t| t.name != name);
        targets.len() != before
    }
    /// Every nexus with a session on `target`, here or on a remote port, for unit attentions.
    fn nexuses(&self, target: &str) -> Vec<Nexus> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut nexuses: Vec<Nexus> = sessions
            .iter()
            .filter(|(k, _)| k.target_name == target)
            .map(|(k, (_, port))| Nexus {
                initiator_name: k.initiator_name.clone(),
                isid: k.isid,
                relative_port: *port,
            })
            .collect();
        drop(sessions);
        let remote = self.remote_nexuses.lock().unwrap_or_else(|p| p.into_inner());
        nexuses.extend(remote.get(target).into_iter().flatten().cloned());
        nexuses
    }

    /// Records a remote port's nexus; `false` when the table is full (the nexus then misses
    /// unit attentions, never commands).
    fn remote_nexus_seen(&self, target: &str, nexus: &Nexus) -> bool {
        let mut remote = self.remote_nexuses.lock().unwrap_or_else(|p| p.into_inner());
        let known = remote.get(target).is_some_and(|set| set.contains(nexus));
        if known {
            return true;
        }
        let count: usize = remote.values().map(HashSet::len).sum();
        if count >= REMOTE_NEXUSES_MAX {
            return false;
        }
        remote.entry(target.to_owned()).or_default().insert(nexus.clone());
        true
    }

    /// Applies a remote port's notice or reset ([`ForwardRequest`] other than a command) to
    /// the target's logical units. Commands run through [`LuTask`].
    pub fn handle_remote_notice(&self, request: &ForwardRequest) -> Result<(), ForwardError> {
        let target = self
            .target(request.target_name())
            .ok_or_else(|| ForwardError::Refused(format!("no target {}", request.target_name())))?;
        match request {
            ForwardRequest::Command(_) => {
                return Err(ForwardError::Refused("a command is not a notice".into()));
            }
            ForwardRequest::NexusUp { nexus, .. } => {
                self.remote_nexus_seen(&target.name, nexus);
                for lun in &target.luns {
                    let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
                    shared.unit_attentions.remove(nexus);
                }
            }
            ForwardRequest::NexusLost { nexus, .. } => {
                self.remote_nexus_lost(&target, nexus);
            }
            ForwardRequest::Reset { luns, .. } => {
                let nexuses = self.nexuses(&target.name);
                for lun in target.luns.iter().filter(|l| luns.contains(&l.identity.lun)) {
                    let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
                    shared.reset(&nexuses);
                }
            }
        }
        Ok(())
    }

    /// Forgets every remote nexus of a link that went down, as if each had logged out.
    pub fn remote_nexuses_lost(&self, lost: &[(String, Nexus)]) {
        for (target_name, nexus) in lost {
            if let Some(target) = self.target(target_name) {
                self.remote_nexus_lost(&target, nexus);
            }
        }
    }

    fn remote_nexus_lost(&self, target: &TargetNode<D>, nexus: &Nexus) {
        {
            let mut remote = self.remote_nexuses.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(set) = remote.get_mut(&target.name) {
                set.remove(nexus);
            }
        }
        for lun in &target.luns {
            let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
            forget_nexus(&mut shared, nexus);
        }
    }
}

/// What SPC-4 ties to an I_T nexus and releases when it goes away.
fn forget_nexus(shared: &mut LunShared, nexus: &Nexus) {
    shared.reservations.nexus_lost(nexus);
    shared.prevent_removal.remove(nexus);
    shared.unit_attentions.remove(nexus);
    // SPC-4: held copy results die with the I_T nexus.
    shared.copy_results.retain(|r| r.nexus != *nexus);
}

impl<D: BlockDevice> TargetDirectory for Config<D> {
    fn has_target(&self, name: &str) -> bool {
        self.target(name).is_some()
    }
    fn target_auth(&self, name: &str) -> Option<AuthConfig> {
        self.target(name).and_then(|t| t.auth.clone())
    }
    fn allocate_tsih(&self) -> u16 {
        loop {
            let tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if tsih != 0 {
                return tsih;
            }
        }
    }
}

/// Hands out target transfer tags, never the reserved 0xffffffff.
fn allocate_ttt(next: &mut u32) -> u32 {
    let ttt = *next;
    *next = next.wrapping_add(1);
    if *next == TAG_NONE {
        *next = 1;
    }
    ttt
}

/// LUN `id` of `target` as `nexus` may use it, for commands that reach other LUNs.
fn lun_info<D: BlockDevice>(
    target: Option<&TargetNode<D>>,
    nexus: &Nexus,
    id: u64,
) -> Option<OtherLun> {
    let lun = target.and_then(|t| t.lun(id))?;
    let shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
    Some(OtherLun {
        info: lun.info(),
        readable: shared.reservations.allows(nexus, Access::Read),
        writable: shared.reservations.allows(nexus, Access::Write),
    })
}

/// SAM LUN encoding: peripheral addressing below 256, flat space addressing above.
pub fn encode_lun(lun: u64) -> u64 {
    if lun < 256 { lun << 48 } else { (0x4000 | (lun & 0x3fff)) << 48 }
}

/// Decodes a LUN field; `None` for addressing methods we never hand out.
pub fn decode_lun(raw: u64) -> Option<u64> {
    let top = raw >> 48;
    if raw & 0x0000_ffff_ffff_ffff != 0 {
        return None;
    }
    match top >> 14 {
        0 if top >> 8 == 0 => Some(top & 0xff),
        1 => Some(top & 0x3fff),
        _ => None,
    }
}

/// An empty buffer for a write's data collected from several PDUs, its start aligned to
/// `TRANSFER_BUFFER_ALIGNMENT_BYTES`: the device gets this buffer as it is, and a backing
/// store writes large writes with O_DIRECT, which needs aligned memory (or copies it again).
fn transfer_buffer(capacity_bytes: usize) -> BytesMut {
    let mut buffer = BytesMut::with_capacity(capacity_bytes + TRANSFER_BUFFER_ALIGNMENT_BYTES);
    let padding = buffer.as_ptr().align_offset(TRANSFER_BUFFER_ALIGNMENT_BYTES);
    buffer.resize(padding, 0);
    drop(buffer.split_to(padding));
    buffer
}

/// A block I/O the driver must perform and report back with [`Connection::handle_io_completion`].
pub struct IoRequest<D> {
    pub itt: u32,
    pub tag: u64,
    pub device: Arc<D>,
    pub op: IoOp,
}

/// A request for the node that holds a logical unit this connection reaches through a remote
/// port ([`BlockDevice::forwards`]). The driver calls [`BlockDevice::forward`] and reports the
/// answer with [`Connection::handle_forward_completion`] (notices too: their answer is
/// ignored).
pub struct ForwardTicket<D> {
    pub itt: u32,
    pub tag: u64,
    pub device: Arc<D>,
    pub request: ForwardRequest,
}

/// A task management request waiting for the logical unit's node.
struct PendingTaskManagement {
    itt: u32,
    function: u8,
}

/// Things the driver must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A session with the same initiator, ISID and target replaced this older connection:
    /// the driver closes that one.
    Reinstated { old_connection_id: u64 },
    /// Flush the transmit buffer, then close the connection.
    Close,
}

#[derive(Debug)]
struct R2tInFlight {
    ttt: u32,
    offset: u32,
    length: u32,
    received: u32,
    next_data_sn: u32,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for Data-Out PDUs.
    Collecting,
    /// Waiting for the I/O tagged `tag`.
    Io { tag: u64, pending: Pending },
    /// Forwarded to the logical unit's node as the request tagged `tag`.
    Forwarded { tag: u64 },
}

struct Task<D> {
    lun: Option<Arc<LogicalUnit<D>>>,
    lun_id: u64,
    cdb: [u8; 16],
    edtl: u32,
    read: bool,
    write: bool,
    data: BytesMut,
    unsolicited_limit: u32,
    unsolicited_done: bool,
    unsolicited_next_data_sn: u32,
    next_r2t_offset: u32,
    r2ts: Vec<R2tInFlight>,
    r2t_sn: u32,
    phase: Phase,
    /// The list identifier of a running EXTENDED COPY that holds its results.
    copy_list_id: Option<u8>,
}

struct Session<D> {
    kind: SessionType,
    target: Option<Arc<TargetNode<D>>>,
    params: SessionParams,
    exp_cmdsn: u32,
    nexus: Arc<Nexus>,
    key: Option<SessionKey>,
}

enum State<D> {
    Login(Box<Login>),
    FullFeature(Box<Session<D>>),
    Closed,
}

pub struct Connection<D> {
    id: u64,
    config: Arc<Config<D>>,
    relative_port: u16,
    state: State<D>,
    stat_sn: u32,
    digests: Digests,
    tasks: HashMap<u32, Task<D>>,
    next_tag: u64,
    next_ttt: u32,
    transmit: Vec<u8>,
    /// Large data segments sent without copying: (position in `transmit` where each goes, data).
    transmit_segments: Vec<(usize, Bytes)>,
    io: VecDeque<IoRequest<D>>,
    forwards: VecDeque<ForwardTicket<D>>,
    /// Task management requests forwarded and not answered yet, by request tag.
    task_management: HashMap<u64, PendingTaskManagement>,
    events: VecDeque<Event>,
    /// Target transfer tag of an unanswered keepalive NOP-In.
    ping_outstanding: Option<u32>,
    /// The address this connection was accepted on: SendTargets reports it in place of a
    /// wildcard portal (0.0.0.0 or [::]), which an initiator cannot connect to.
    local_address: Option<std::net::SocketAddr>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl<D: BlockDevice> Connection<D> {
    /// `id` is unique per process (for reinstatement); `challenge` and `identifier` must be
    /// random.
    pub fn new(
        id: u64,
        config: Arc<Config<D>>,
        relative_port: u16,
        challenge: [u8; CHAP_CHALLENGE_BYTES],
        identifier: u8,
    ) -> Self {
        let tpgt = config.portal_group_tag;
        Self {
            id,
            config,
            relative_port,
            state: State::Login(Box::new(Login::new(challenge, identifier, tpgt, 0))),
            stat_sn: 0,
            digests: Digests::default(),
            tasks: HashMap::new(),
            next_tag: 1,
            next_ttt: 1,
            transmit: Vec::with_capacity(64 * 1024),
            transmit_segments: Vec::new(),
            io: VecDeque::new(),
            forwards: VecDeque::new(),
            task_management: HashMap::new(),
            events: VecDeque::new(),
            ping_outstanding: None,
            local_address: None,
        }
    }

    /// Tells the connection which local address the initiator reached, so SendTargets can
    /// answer a wildcard portal with an address the initiator can use.
    pub fn set_local_address(&mut self, address: std::net::SocketAddr) {
        self.local_address = Some(address);
    }

    /// A portal's address as an initiator should dial it: a wildcard IP is replaced by the
    /// address this connection arrived on (same port), as other targets do.
    fn reported_address(&self, portal: &PortalAddress) -> String {
        let Ok(configured) = portal.address.parse::<std::net::SocketAddr>() else {
            return portal.address.clone();
        };
        match self.local_address {
            Some(local) if configured.ip().is_unspecified() => {
                std::net::SocketAddr::new(local.ip(), configured.port()).to_string()
            }
            _ => portal.address.clone(),
        }
    }

    /// Digests in force for the next PDU read.
    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// The largest data segment the next PDU may carry.
    pub fn data_segment_limit_bytes(&self) -> usize {
        match self.state {
            State::FullFeature(_) => usize::try_from(RECV_DATA_SEGMENT_BYTES_MAX).unwrap_or(8192),
            _ => usize::try_from(LOGIN_DATA_SEGMENT_BYTES_MAX).unwrap_or(8192),
        }
    }

    /// Takes everything waiting to be sent: the encoded bytes and the large data segments
    /// that go between them, each at its position in the bytes.
    pub fn poll_transmit(&mut self, bytes: &mut Vec<u8>, segments: &mut Vec<(usize, Bytes)>) {
        std::mem::swap(bytes, &mut self.transmit);
        std::mem::swap(segments, &mut self.transmit_segments);
        self.transmit.clear();
        self.transmit_segments.clear();
    }

    /// Bytes waiting to be sent.
    pub fn transmit_bytes(&self) -> usize {
        self.transmit.len() + self.transmit_segments.iter().map(|(_, d)| d.len()).sum::<usize>()
    }

    pub fn poll_io(&mut self) -> Option<IoRequest<D>> {
        self.io.pop_front()
    }

    /// The next request for a logical unit's node (remote ports only).
    pub fn poll_forward(&mut self) -> Option<ForwardTicket<D>> {
        self.forwards.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Tasks in flight (for flow control in the driver).
    pub fn tasks_in_flight(&self) -> usize {
        self.tasks.len()
    }

    fn send(&mut self, header: &Header, data: &[u8]) {
        pdu::encode(&mut self.transmit, header, data, self.digests);
    }

    fn close(&mut self) {
        if let State::FullFeature(session) = &self.state {
            if let Some(key) = &session.key {
                let mut sessions = self.config.sessions.lock().unwrap_or_else(|p| p.into_inner());
                if sessions.get(key).map(|v| v.0) == Some(self.id) {
                    sessions.remove(key);
                }
            }
            if let Some(t) = &session.target {
                for lun in &t.luns {
                    let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
                    forget_nexus(&mut shared, &session.nexus);
                    drop(shared);
                    if lun.device.forwards() {
                        // The logical unit's node forgets the nexus too (a lost link does
                        // the same there).
                        let request = ForwardRequest::NexusLost {
                            target_name: t.name.clone(),
                            nexus: (*session.nexus).clone(),
                        };
                        self.forwards.push_back(ForwardTicket {
                            itt: TAG_NONE,
                            tag: 0,
                            device: lun.device.clone(),
                            request,
                        });
                    }
                }
            }
        }
        self.tasks.clear();
        self.io.clear();
        self.task_management.clear();
        self.state = State::Closed;
        self.events.push_back(Event::Close);
    }

    /// The driver calls this when the socket dies, so shared state forgets this nexus.
    pub fn handle_disconnect(&mut self) {
        if !self.is_closed() {
            self.close();
        }
    }

    /// Handles a framing or digest error from [`pdu::decode`].
    pub fn handle_decode_error(&mut self, error: &pdu::PduError) {
        if let pdu::PduError::DataDigest { header } = error {
            // The header is trustworthy: tell the initiator which PDU was lost, then give up,
            // since ErrorRecoveryLevel 0 cannot recover the task.
            self.reject(header, reject_reason::DATA_DIGEST_ERROR);
        }
        self.close();
    }

    fn session_mut(&mut self) -> Option<&mut Session<D>> {
        match &mut self.state {
            State::FullFeature(s) => Some(s),
            _ => None,
        }
    }

    fn window(&self) -> (u32, u32) {
        let exp = match &self.state {
            State::FullFeature(s) => s.exp_cmdsn,
            _ => 0,
        };
        let in_flight = u32::try_from(self.tasks.len()).unwrap_or(COMMANDS_MAX).min(COMMANDS_MAX);
        (exp, exp.wrapping_add(COMMANDS_MAX - 1).wrapping_sub(in_flight))
    }

    fn fill_sequence(&self, header: &mut Header, stat_sn: u32) {
        let (exp, max) = self.window();
        header.set_u32(24, stat_sn);
        header.set_u32(28, exp);
        header.set_u32(32, max);
    }

    fn allocate_ttt(&mut self) -> u32 {
        allocate_ttt(&mut self.next_ttt)
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    fn reject(&mut self, rejected: &Header, reason: u8) {
        let mut h = Header::new(opcode::REJECT);
        h.set_flags(0x80);
        h.0[2] = reason;
        h.set_itt(TAG_NONE);
        let stat_sn = self.next_stat_sn();
        self.fill_sequence(&mut h, stat_sn);
        let body = rejected.0;
        self.send(&h, &body);
    }

    /// The driver calls this after `KEEPALIVE_INTERVAL_MS` without input. The first silence
    /// sends a NOP-In ping (RFC 7143 §11.19); a second one, or a stalled login, closes the
    /// connection so a dead initiator's tasks and reservations do not linger.
    pub fn handle_idle(&mut self) {
        match self.state {
            State::Closed => {}
            State::Login(_) => self.close(),
            State::FullFeature(_) => {
                if self.ping_outstanding.is_some() {
                    self.close();
                    return;
                }
                let ttt = self.allocate_ttt();
                let mut h = Header::new(opcode::NOP_IN);
                h.set_flags(0x80);
                h.set_itt(TAG_NONE);
                h.set_u32(20, ttt);
                // A ping carries the current StatSN without consuming it.
                let stat_sn = self.stat_sn;
                self.fill_sequence(&mut h, stat_sn);
                self.send(&h, &[]);
                self.ping_outstanding = Some(ttt);
            }
        }
    }

    /// Handles one received PDU.
    pub fn handle_pdu(&mut self, pdu: Pdu) {
        // Anything from the initiator proves it alive.
        self.ping_outstanding = None;
        match &mut self.state {
            State::Closed => {}
            State::Login(_) => self.handle_login(&pdu),
            State::FullFeature(_) => self.handle_full_feature(pdu),
        }
    }

    fn handle_login(&mut self, pdu: &Pdu) {
        let State::Login(login) = &mut self.state else { return };
        let step = login.handle_request(pdu, &self.config.auth, &*self.config);
        let (header, data) = step.response;
        // Login responses never carry digests: they are negotiated by this very exchange.
        pdu::encode(&mut self.transmit, &header, &data, Digests::default());
        match step.outcome {
            LoginOutcome::Continue => {}
            LoginOutcome::Failed(_) => {
                self.state = State::Closed;
                self.events.push_back(Event::Close);
            }
            LoginOutcome::Established(established) => self.establish(*established),
        }
    }

    fn establish(&mut self, e: Established) {
        self.stat_sn = e.stat_sn;
        self.digests = Digests { header: e.params.header_digest, data: e.params.data_digest };
        let target = e.target_name.as_deref().and_then(|n| self.config.target(n));
        let port_offset = target.as_ref().map_or(0, |t| t.port_offset);
        let relative_port = self.relative_port.saturating_add(port_offset);
        let nexus = Arc::new(Nexus {
            initiator_name: e.initiator_name.clone(),
            isid: e.isid,
            relative_port,
        });
        let mut key = None;
        if let (SessionType::Normal, Some(name)) = (e.session_type, &e.target_name) {
            let k = SessionKey {
                initiator_name: e.initiator_name.clone(),
                isid: e.isid,
                target_name: name.clone(),
            };
            let mut sessions = self.config.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((old, _)) = sessions.insert(k.clone(), (self.id, relative_port)) {
                self.events.push_back(Event::Reinstated { old_connection_id: old });
            } else if sessions.len() > SESSIONS_MAX {
                sessions.remove(&k);
                drop(sessions);
                self.close();
                return;
            }
            key = Some(k);
            // A new I_T nexus starts without stale unit attentions from an earlier session.
            if let Some(t) = &target {
                for lun in &t.luns {
                    let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
                    shared.unit_attentions.remove(&nexus);
                    drop(shared);
                    if lun.device.forwards() {
                        let request = ForwardRequest::NexusUp {
                            target_name: t.name.clone(),
                            nexus: (*nexus).clone(),
                        };
                        self.forwards.push_back(ForwardTicket {
                            itt: TAG_NONE,
                            tag: 0,
                            device: lun.device.clone(),
                            request,
                        });
                    }
                }
            }
        }
        self.state = State::FullFeature(Box::new(Session {
            kind: e.session_type,
            target,
            params: e.params,
            exp_cmdsn: e.exp_cmdsn,
            nexus,
            key,
        }));
    }

    /// Checks CmdSN of a non-immediate command and advances ExpCmdSN; `false` means drop it.
    fn accept_cmdsn(&mut self, header: &Header) -> bool {
        let cmdsn = header.u32_at(24);
        let immediate = header.immediate();
        let (_, max) = self.window();
        let Some(session) = self.session_mut() else { return false };
        if immediate {
            return true;
        }
        // RFC 7143 §4.2.2.1: commands outside [ExpCmdSN, MaxCmdSN] are silently ignored; with
        // one connection per session an in-window gap can only come from a broken initiator.
        if cmdsn != session.exp_cmdsn || serial_lt(max, cmdsn) {
            return false;
        }
        session.exp_cmdsn = session.exp_cmdsn.wrapping_add(1);
        true
    }

    fn handle_full_feature(&mut self, pdu: Pdu) {
        let op = pdu.header.opcode();
        let discovery =
            matches!(&self.state, State::FullFeature(s) if s.kind == SessionType::Discovery);
        match op {
            opcode::NOP_OUT => self.handle_nop_out(pdu),
            opcode::SCSI_COMMAND if !discovery => self.handle_scsi_command(pdu),
            opcode::DATA_OUT if !discovery => self.handle_data_out(pdu),
            opcode::TASK_MANAGEMENT_REQUEST if !discovery => {
                self.handle_task_management(&pdu.header)
            }
            opcode::TEXT_REQUEST => self.handle_text(&pdu),
            opcode::LOGOUT_REQUEST => self.handle_logout(&pdu.header),
            opcode::SNACK_REQUEST => self.reject(&pdu.header, reject_reason::SNACK_REJECT),
            opcode::LOGIN_REQUEST => {
                self.reject(&pdu.header, reject_reason::PROTOCOL_ERROR);
                self.close();
            }
            opcode::SCSI_COMMAND | opcode::DATA_OUT | opcode::TASK_MANAGEMENT_REQUEST => {
                self.reject(&pdu.header, reject_reason::PROTOCOL_ERROR);
                self.close();
            }
            _ => self.reject(&pdu.header, reject_reason::COMMAND_NOT_SUPPORTED),
        }
    }

    fn handle_nop_out(&mut self, pdu: Pdu) {
        if !self.accept_cmdsn(&pdu.header) {
            return;
        }
        let itt = pdu.header.itt();
        if itt == TAG_NONE {
            return;
        }
        let mut h = Header::new(opcode::NOP_IN);
        h.set_flags(0x80);
        h.set_lun(pdu.header.lun());
        h.set_itt(itt);
        h.set_u32(20, TAG_NONE);
        let stat_sn = self.next_stat_sn();
        self.fill_sequence(&mut h, stat_sn);
        let limit = self.send_segment_limit();
        let echo = &pdu.data[..pdu.data.len().min(limit)];
        self.send(&h, echo);
    }

    fn send_segment_limit(&self) -> usize {
        let initiator = match &self.state {
            State::FullFeature(s) => s.params.initiator_recv_data_segment_bytes,
            _ => 8192,
        };
        usize::try_from(initiator.min(SEND_DATA_SEGMENT_BYTES_MAX)).unwrap_or(8192)
    }

    fn handle_text(&mut self, pdu: &Pdu) {
        if !self.accept_cmdsn(&pdu.header) {
            return;
        }
        let keys = text::parse(&pdu.data);
        let mut out = Vec::new();
        let (kind, target) = match &self.state {
            State::FullFeature(s) => (s.kind, s.target.as_ref().map(|t| t.name.clone())),
            _ => return,
        };
        for (key, value) in &keys {
            if key == "SendTargets" {
                for t in self.config.targets() {
                    let wanted = match value.as_str() {
                        "All" => kind == SessionType::Discovery,
                        "" => target.as_deref() == Some(t.name.as_str()),
                        name => name == t.name,
                    };
                    if !wanted {
                        continue;
                    }
                    text::push(&mut out, "TargetName", &t.name);
                    for p in &self.config.portals {
                        let address = self.reported_address(p);
                        text::push(
                            &mut out,
                            "TargetAddress",
                            &format!("{address},{}", self.config.portal_group_tag),
                        );
                    }
                }
            } else {
                text::push(&mut out, key, "NotUnderstood");
            }
        }
        let limit = self.send_segment_limit();
        out.truncate(limit);
        let mut h = Header::new(opcode::TEXT_RESPONSE);
        h.set_flags(0x80);
        h.set_itt(pdu.header.itt());
        h.set_u32(20, TAG_NONE);
        let stat_sn = self.next_stat_sn();
        self.fill_sequence(&mut h, stat_sn);
        self.send(&h, &out);
    }

    fn handle_logout(&mut self, header: &Header) {
        if !self.accept_cmdsn(header) {
            return;
        }
        let reason = header.flags() & 0x7f;
        let mut h = Header::new(opcode::LOGOUT_RESPONSE);
        h.set_flags(0x80);
        // Recovery (reason 2) needs ErrorRecoveryLevel 2, which we never negotiate.
        h.0[2] = if reason == 2 { 2 } else { 0 };
        h.set_itt(header.itt());
        let stat_sn = self.next_stat_sn();
        self.tasks.clear();
        self.fill_sequence(&mut h, stat_sn);
        self.send(&h, &[]);
        self.close();
    }

    fn find_lun(&self, lun_id: u64) -> Option<Arc<LogicalUnit<D>>> {
        let State::FullFeature(s) = &self.state else { return None };
        s.target.as_ref()?.lun(lun_id).cloned()
    }

    fn handle_scsi_command(&mut self, pdu: Pdu) {
        let header = &pdu.header;
        if !self.accept_cmdsn(header) {
            return;
        }
        let itt = header.itt();
        let flags = header.flags();
        let read = flags & 0x40 != 0;
        let write = flags & 0x20 != 0;
        let final_bit = flags & 0x80 != 0;
        let edtl = header.u32_at(20);
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&header.0[32..48]);
        let lun_id = decode_lun(header.lun()).unwrap_or(u64::MAX);
        let limit = COMMANDS_MAX + IMMEDIATE_COMMANDS_MAX;
        if self.tasks.len() >= usize::try_from(limit).unwrap_or(usize::MAX)
            || self.tasks.contains_key(&itt)
        {
            let reason = if self.tasks.contains_key(&itt) {
                reject_reason::TASK_IN_PROGRESS
            } else {
                reject_reason::OUT_OF_RESOURCES
            };
            self.reject(header, reason);
            return;
        }
        let Some(params) = self.session_mut().map(|s| s.params.clone()) else { return };
        if !write && !pdu.data.is_empty() {
            self.reject(header, reject_reason::PROTOCOL_ERROR);
            return;
        }
        if write
            && (!params.immediate_data && !pdu.data.is_empty()
                || pdu.data.len()
                    > usize::try_from(edtl.min(params.first_burst_bytes)).unwrap_or(0))
        {
            self.reject(header, reject_reason::PROTOCOL_ERROR);
            return;
        }
        let in_flight: u64 = self.tasks.values().map(|t| u64::from(t.edtl)).sum();
        let over_budget = in_flight + u64::from(edtl) > CONNECTION_TRANSFER_BYTES_MAX;
        let lun = self.find_lun(lun_id);
        let too_big = edtl > TRANSFER_BYTES_MAX;
        let unsolicited_limit = if write {
            if params.initial_r2t {
                u32::try_from(pdu.data.len()).unwrap_or(0)
            } else {
                edtl.min(params.first_burst_bytes)
            }
        } else {
            0
        };
        let mut data = BytesMut::new();
        let mut immediate = Bytes::new();
        if write && !too_big && !over_budget {
            if pdu.data.len() == usize::try_from(edtl).unwrap_or(0) {
                // The whole transfer arrived as immediate data: hand its buffer on without a copy.
                immediate = pdu.data.clone();
            } else {
                data = transfer_buffer(usize::try_from(edtl).unwrap_or(0));
                data.extend_from_slice(&pdu.data);
            }
        }
        let received = u32::try_from(pdu.data.len()).unwrap_or(0);
        let task = Task {
            lun,
            lun_id,
            cdb,
            edtl,
            read,
            write,
            data,
            unsolicited_limit,
            unsolicited_done: final_bit,
            unsolicited_next_data_sn: 0,
            next_r2t_offset: if final_bit { received } else { unsolicited_limit },
            r2ts: Vec::new(),
            r2t_sn: 0,
            phase: Phase::Collecting,
            copy_list_id: None,
        };
        self.tasks.insert(itt, task);
        if too_big {
            self.finish(itt, Outcome::check(Sense::invalid_field_in_cdb(0)));
            return;
        }
        if over_budget {
            self.finish(itt, Outcome::status(sense::status::TASK_SET_FULL));
            return;
        }
        if !write || received >= edtl {
            self.start(itt, immediate);
        } else {
            self.solicit(itt);
        }
    }

    /// Sends R2Ts for data not yet requested, up to MaxOutstandingR2T.
    fn solicit(&mut self, itt: u32) {
        let Some(params) = self.session_mut().map(|s| s.params.clone()) else { return };
        let mut outgoing = Vec::new();
        {
            let Some(task) = self.tasks.get_mut(&itt) else { return };
            if !task.unsolicited_done {
                return;
            }
            while task.next_r2t_offset < task.edtl
                && u32::try_from(task.r2ts.len()).unwrap_or(u32::MAX) < params.max_outstanding_r2t
            {
                let length = (task.edtl - task.next_r2t_offset).min(params.max_burst_bytes);
                let ttt = allocate_ttt(&mut self.next_ttt);
                task.r2ts.push(R2tInFlight {
                    ttt,
                    offset: task.next_r2t_offset,
                    length,
                    received: 0,
                    next_data_sn: 0,
                });
                outgoing.push((task.lun_id, ttt, task.r2t_sn, task.next_r2t_offset, length));
                task.r2t_sn = task.r2t_sn.wrapping_add(1);
                task.next_r2t_offset += length;
            }
        }
        for (lun_id, ttt, r2t_sn, offset, length) in outgoing {
            let mut h = Header::new(opcode::R2T);
            h.set_flags(0x80);
            h.set_lun(encode_lun(lun_id));
            h.set_itt(itt);
            h.set_u32(20, ttt);
            let stat_sn = self.stat_sn;
            self.fill_sequence(&mut h, stat_sn);
            h.set_u32(36, r2t_sn);
            h.set_u32(40, offset);
            h.set_u32(44, length);
            self.send(&h, &[]);
        }
    }

    fn handle_data_out(&mut self, pdu: Pdu) {
        let header = &pdu.header;
        let itt = header.itt();
        let ttt = header.u32_at(20);
        let data_sn = header.u32_at(36);
        let offset = header.u32_at(40);
        let length = u32::try_from(pdu.data.len()).unwrap_or(u32::MAX);
        let final_bit = header.final_bit();
        let Some(task) = self.tasks.get_mut(&itt) else {
            // Data for a task that was aborted or already failed: nothing to do.
            return;
        };
        if !task.write || !matches!(task.phase, Phase::Collecting) {
            return;
        }
        let received = u32::try_from(task.data.len()).unwrap_or(u32::MAX);
        let mut error = None;
        if offset != received || offset.checked_add(length).is_none_or(|end| end > task.edtl) {
            error = Some("Data-Out offset out of order or beyond the transfer");
        } else if ttt == TAG_NONE {
            if task.unsolicited_done || offset + length > task.unsolicited_limit {
                error = Some("unsolicited Data-Out beyond FirstBurstLength");
            } else if data_sn != task.unsolicited_next_data_sn {
                error = Some("Data-Out DataSN out of sequence");
            } else {
                task.unsolicited_next_data_sn = task.unsolicited_next_data_sn.wrapping_add(1);
                task.data.extend_from_slice(&pdu.data);
                if final_bit {
                    task.unsolicited_done = true;
                    let got = offset + length;
                    if task.next_r2t_offset > got {
                        // The initiator stopped short of FirstBurstLength: solicit the rest.
                        task.next_r2t_offset = got;
                    }
                }
            }
        } else {
            match task.r2ts.iter_mut().position(|r| r.ttt == ttt) {
                None => error = Some("Data-Out for an unknown R2T"),
                Some(i) => {
                    let r2t = &mut task.r2ts[i];
                    if data_sn != r2t.next_data_sn {
                        error = Some("Data-Out DataSN out of sequence");
                    } else if offset < r2t.offset || offset + length > r2t.offset + r2t.length {
                        error = Some("Data-Out outside its R2T");
                    } else {
                        r2t.next_data_sn = r2t.next_data_sn.wrapping_add(1);
                        r2t.received += length;
                        task.data.extend_from_slice(&pdu.data);
                        if final_bit || r2t.received >= r2t.length {
                            task.r2ts.remove(i);
                        }
                    }
                }
            }
        }
        if let Some(_reason) = error {
            // ErrorRecoveryLevel 0 cannot recover a task with lost or misordered data: end the
            // task with DATA PHASE ERROR (later Data-Out for it is ignored) and keep the
            // connection, so other tasks are not lost with it.
            task.r2ts.clear();
            self.finish(itt, Outcome::check(Sense::new(sense::key::ABORTED_COMMAND, 0x4b, 0x00)));
            return;
        }
        let complete = task.data.len() >= usize::try_from(task.edtl).unwrap_or(usize::MAX);
        if complete {
            self.start(itt, Bytes::new());
        } else {
            self.solicit(itt);
        }
    }

    /// What a SCSI [`Context`] borrows, as cheap clones (no allocation per command).
    fn context_parts(&self) -> Option<ContextParts<D>> {
        let State::FullFeature(s) = &self.state else { return None };
        Some((s.nexus.clone(), s.target.clone(), self.config.clone()))
    }

    /// Runs the SCSI command once all its data is here. `immediate` carries the data when it
    /// arrived whole with the command.
    fn start(&mut self, itt: u32, immediate: Bytes) {
        let Some((nexus, target, config)) = self.context_parts() else { return };
        let luns: &[u64] = target.as_ref().map(|t| t.lun_ids.as_slice()).unwrap_or_default();
        let Some(task) = self.tasks.get_mut(&itt) else { return };
        let mut data_out =
            if immediate.is_empty() { std::mem::take(&mut task.data).freeze() } else { immediate };
        let Some(lun) = task.lun.clone() else {
            let outcome = if task.cdb[0] == scsi::op::INQUIRY {
                // Peripheral qualifier 3: no logical unit at this LUN.
                let mut d = vec![0u8; 36];
                d[0] = 0x7f;
                d[4] = 31;
                Outcome::data(d)
            } else if task.cdb[0] == scsi::op::REPORT_LUNS {
                let mut d = vec![0u8; 8];
                for l in luns {
                    d.extend_from_slice(&encode_lun(*l).to_be_bytes());
                }
                let length = u32::try_from(d.len() - 8).unwrap_or(0);
                d[..4].copy_from_slice(&length.to_be_bytes());
                Outcome::data(d)
            } else {
                Outcome::check(codes::LOGICAL_UNIT_NOT_SUPPORTED)
            };
            self.finish(itt, outcome);
            return;
        };
        let info = lun.info();
        // A write longer than the CDB asks for writes only what the CDB asks for.
        if task.write
            && task.cdb[0] != scsi::op::COMPARE_AND_WRITE
            && let Some(spdtl) = scsi::transfer_bytes(&task.cdb, info.block_size_bytes)
            && (data_out.len() as u64) > spdtl
        {
            data_out.truncate(usize::try_from(spdtl).unwrap_or(0));
        }
        let cdb = task.cdb;
        if cdb[0] == scsi::op::EXTENDED_COPY
            && let Some(list_id) = scsi::copy::list_id(&data_out)
        {
            // A nexus is one connection here (no MC/S), so a copy still running under the
            // same list identifier is one of this connection's tasks; an aborted one is gone.
            let running = self
                .tasks
                .iter()
                .any(|(t, other)| *t != itt && other.copy_list_id == Some(list_id));
            if running {
                let sense = scsi::copy::sense_codes::OPERATION_IN_PROGRESS;
                self.finish(itt, Outcome::check(sense));
                return;
            }
            if let Some(task) = self.tasks.get_mut(&itt) {
                task.copy_list_id = Some(list_id);
            }
        }
        observe_alua(&config, &lun, info.alua);
        observe_capacity(&config, &lun, info.size_bytes);
        if lun.device.forwards() {
            self.forward_command(itt, &lun, &nexus, cdb, data_out);
            return;
        }
        let step = with_context(&config, target.as_deref(), &lun, &nexus, info, |ctx| {
            scsi::execute(ctx, &cdb, data_out)
        });
        self.advance(itt, step, &lun, target.as_deref());
    }

    /// Hands a command for a remote port's logical unit to the driver. Unit attentions this
    /// port raised itself (its ALUA state changed when the link came or went) are reported
    /// first, here; everything else is the logical unit's business.
    fn forward_command(
        &mut self,
        itt: u32,
        lun: &Arc<LogicalUnit<D>>,
        nexus: &Nexus,
        cdb: [u8; 16],
        data_out: Bytes,
    ) {
        let reports_attention =
            !matches!(cdb[0], scsi::op::INQUIRY | scsi::op::REPORT_LUNS | scsi::op::REQUEST_SENSE);
        if reports_attention {
            let attention = {
                let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
                shared.unit_attentions.get_mut(nexus).and_then(VecDeque::pop_front)
            };
            if let Some(sense) = attention {
                self.finish(itt, Outcome::check(sense));
                return;
            }
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        let Some(task) = self.tasks.get_mut(&itt) else { return };
        task.phase = Phase::Forwarded { tag };
        let request = ForwardRequest::Command(ForwardedCommand {
            target_name: lun.identity.target_name.clone(),
            lun: lun.identity.lun,
            nexus: nexus.clone(),
            cdb,
            data_out,
        });
        self.forwards.push_back(ForwardTicket { itt, tag, device: lun.device.clone(), request });
    }

    /// Feeds back the answer to a [`ForwardTicket`]. A command that got no answer ends with a
    /// retryable sense (never GOOD); a task management request that got none is rejected.
    pub fn handle_forward_completion(
        &mut self,
        itt: u32,
        tag: u64,
        result: Result<ForwardReply, ForwardError>,
    ) {
        if let Some(pending) = self.task_management.remove(&tag) {
            let response = if result.is_ok() { 0 } else { 255 };
            self.respond_task_management(pending.itt, pending.function, response);
            return;
        }
        let Some(task) = self.tasks.get(&itt) else { return };
        if !matches!(task.phase, Phase::Forwarded { tag: t } if t == tag) {
            return;
        }
        let outcome = match result {
            Ok(ForwardReply::Outcome(outcome)) => outcome,
            Ok(ForwardReply::Done) | Err(_) => ForwardedOutcome::retryable(),
        };
        self.finish_with(itt, outcome.outcome(), Some(outcome.descriptor_sense));
    }

    fn advance(
        &mut self,
        itt: u32,
        step: Step,
        lun: &Arc<LogicalUnit<D>>,
        target: Option<&TargetNode<D>>,
    ) {
        let (device, op, pending) = match resolve_step(step, lun, target) {
            Ok(io) => io,
            Err(outcome) => return self.finish(itt, outcome),
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        let Some(task) = self.tasks.get_mut(&itt) else { return };
        task.phase = Phase::Io { tag, pending };
        self.io.push_back(IoRequest { itt, tag, device, op });
    }

    /// Feeds back the result of an [`IoRequest`].
    pub fn handle_io_completion(
        &mut self,
        itt: u32,
        tag: u64,
        result: Result<IoData, DeviceError>,
    ) {
        let Some(task) = self.tasks.get_mut(&itt) else { return };
        let matches = matches!(task.phase, Phase::Io { tag: t, .. } if t == tag);
        if !matches {
            return;
        }
        let Phase::Io { pending, .. } = std::mem::replace(&mut task.phase, Phase::Collecting)
        else {
            return;
        };
        let Some(lun) = task.lun.clone() else { return };
        let Some((nexus, target, config)) = self.context_parts() else { return };
        let step = with_context(&config, target.as_deref(), &lun, &nexus, lun.info(), |ctx| {
            scsi::resume(ctx, pending, result)
        });
        self.advance(itt, step, &lun, target.as_deref());
    }

    /// Sends the data and status of a finished task and forgets it.
    fn finish(&mut self, itt: u32, outcome: Outcome) {
        self.finish_with(itt, outcome, None);
    }

    /// [`Connection::finish`], with the sense format given by a remote logical unit.
    fn finish_with(&mut self, itt: u32, outcome: Outcome, descriptor_sense: Option<bool>) {
        let Some(task) = self.tasks.remove(&itt) else { return };
        let Some(params) = self.session_mut().map(|s| s.params.clone()) else { return };
        let block_size = task.lun.as_ref().map(|l| l.device.block_size_bytes()).unwrap_or(512);
        let edtl = u64::from(task.edtl);
        let lun_field = encode_lun(task.lun_id);
        // Residuals (RFC 7143 §11.4.5): compare what the command transfers with EDTL.
        let (mut flags, mut residual) = (0u8, 0u64);
        let mut data = outcome.data;
        if task.read && !data.is_empty() {
            let produced = data.len() as u64;
            if produced > edtl {
                flags |= 0x04;
                residual = produced - edtl;
                data.truncate(usize::try_from(edtl).unwrap_or(0));
            } else if produced < edtl {
                flags |= 0x02;
                residual = edtl - produced;
            }
        } else if task.write {
            let spdtl = scsi::transfer_bytes(&task.cdb, block_size).unwrap_or(edtl);
            if spdtl > edtl {
                flags |= 0x04;
                residual = spdtl - edtl;
            } else if spdtl < edtl {
                flags |= 0x02;
                residual = edtl - spdtl;
            }
        } else if task.read {
            // A read that produced no data (error, zero blocks).
            let spdtl = scsi::transfer_bytes(&task.cdb, block_size);
            match spdtl {
                Some(s) if s > edtl => {
                    flags |= 0x04;
                    residual = s - edtl;
                }
                _ if edtl > 0 => {
                    flags |= 0x02;
                    residual = edtl;
                }
                _ => {}
            }
        } else if !data.is_empty() {
            flags |= 0x04;
            residual = data.len() as u64;
            data = Bytes::new();
        }
        let residual = u32::try_from(residual).unwrap_or(u32::MAX);
        let status_in_data = outcome.sense.is_none() && outcome.status == sense::status::GOOD;
        let mut data_sn = 0u32;
        if !data.is_empty() {
            let segment = self.send_segment_limit();
            let burst = usize::try_from(params.max_burst_bytes).unwrap_or(segment).max(segment);
            let total = data.len();
            let mut offset = 0usize;
            let mut in_burst = 0usize;
            while offset < total {
                let length = segment.min(total - offset).min(burst - in_burst);
                let last = offset + length == total;
                in_burst += length;
                let mut h = Header::new(opcode::DATA_IN);
                let mut f = 0u8;
                if last || in_burst == burst {
                    f |= 0x80;
                    in_burst = 0;
                }
                h.set_lun(lun_field);
                h.set_itt(itt);
                h.set_u32(20, TAG_NONE);
                if last && status_in_data {
                    f |= 0x01 | flags;
                    h.0[3] = outcome.status;
                    let stat_sn = self.next_stat_sn();
                    self.fill_sequence(&mut h, stat_sn);
                    h.set_u32(44, residual);
                } else {
                    let (exp, max) = self.window();
                    h.set_u32(28, exp);
                    h.set_u32(32, max);
                }
                h.set_flags(f);
                h.set_u32(36, data_sn);
                h.set_u32(40, u32::try_from(offset).unwrap_or(0));
                data_sn += 1;
                if length >= ZERO_COPY_BYTES_MIN {
                    let chunk = data.slice(offset..offset + length);
                    pdu::encode_header(&mut self.transmit, &h, length, self.digests);
                    let at = self.transmit.len();
                    pdu::encode_trailer(&mut self.transmit, &chunk, self.digests);
                    self.transmit_segments.push((at, chunk));
                } else {
                    pdu::encode(
                        &mut self.transmit,
                        &h,
                        &data[offset..offset + length],
                        self.digests,
                    );
                }
                offset += length;
            }
            if status_in_data {
                return;
            }
        }
        let descriptor = descriptor_sense.unwrap_or_else(|| {
            task.lun
                .as_ref()
                .map(|l| l.shared.lock().map(|s| s.descriptor_sense).unwrap_or(false))
                .unwrap_or(false)
        });
        let mut h = Header::new(opcode::SCSI_RESPONSE);
        h.set_flags(0x80 | flags);
        h.0[2] = 0;
        h.0[3] = outcome.status;
        h.set_itt(itt);
        let stat_sn = self.next_stat_sn();
        self.fill_sequence(&mut h, stat_sn);
        h.set_u32(36, data_sn.max(task.r2t_sn));
        h.set_u32(44, residual);
        let mut body = Vec::new();
        if let Some(sense) = outcome.sense {
            let encoded = sense.encode(descriptor);
            body.extend_from_slice(&u16::try_from(encoded.len()).unwrap_or(0).to_be_bytes());
            body.extend_from_slice(&encoded);
        }
        self.send(&h, &body);
    }

    fn handle_task_management(&mut self, header: &Header) {
        if !self.accept_cmdsn(header) {
            return;
        }
        let function = header.flags() & 0x7f;
        let lun_id = decode_lun(header.lun()).unwrap_or(u64::MAX);
        let referenced = header.u32_at(20);
        let ref_cmdsn = header.u32_at(32);
        let cmdsn = header.u32_at(24);
        let lun = self.find_lun(lun_id);
        let response = match function {
            1 => {
                let exp_cmdsn = self.window().0;
                if self.tasks.remove(&referenced).is_some() {
                    0
                } else if !serial_lt(ref_cmdsn, exp_cmdsn) && serial_lt(ref_cmdsn, cmdsn) {
                    // RFC 7143 §11.5.1: a command not received yet counts as received and
                    // aborted. One that already completed does not exist any more.
                    0
                } else {
                    1
                }
            }
            2 | 4 => {
                if lun.is_none() {
                    2
                } else {
                    self.tasks.retain(|_, t| t.lun_id != lun_id);
                    0
                }
            }
            3 => 5,
            5 => match lun {
                None => 2,
                Some(lun) => {
                    self.tasks.retain(|_, t| t.lun_id != lun_id);
                    if self.reset_luns(header.itt(), function, &[lun]) {
                        return;
                    }
                    0
                }
            },
            6 | 7 => {
                self.tasks.clear();
                let luns = match &self.state {
                    State::FullFeature(s) => s.target.as_ref().map(|t| t.luns.clone()),
                    _ => None,
                };
                if self.reset_luns(header.itt(), function, &luns.unwrap_or_default()) {
                    return;
                }
                0
            }
            8 => 4,
            _ => 255,
        };
        self.respond_task_management(header.itt(), function, response);
    }

    fn respond_task_management(&mut self, itt: u32, function: u8, response: u8) {
        let mut h = Header::new(opcode::TASK_MANAGEMENT_RESPONSE);
        h.set_flags(0x80);
        h.0[2] = response;
        h.set_itt(itt);
        let stat_sn = self.next_stat_sn();
        self.fill_sequence(&mut h, stat_sn);
        self.send(&h, &[]);
        if function == 7 && response == 0 {
            // A cold reset ends every connection of the initiator to the target.
            self.close();
        }
    }

    /// Resets local logical units at once and forwards the reset of remote ones; `true` when
    /// the response must wait for the logical unit's node.
    fn reset_luns(&mut self, itt: u32, function: u8, luns: &[Arc<LogicalUnit<D>>]) -> bool {
        let mut remote = Vec::new();
        let mut device = None;
        for lun in luns {
            if lun.device.forwards() {
                remote.push(lun.identity.lun);
                device.get_or_insert_with(|| lun.device.clone());
                continue;
            }
            let nexuses = self.config.nexuses(&lun.identity.target_name);
            let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.reset(&nexuses);
        }
        let (Some(device), Some((nexus, Some(target), _))) = (device, self.context_parts()) else {
            return false;
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        self.task_management.insert(tag, PendingTaskManagement { itt, function });
        let request = ForwardRequest::Reset {
            target_name: target.name.clone(),
            luns: remote,
            nexus: (*nexus).clone(),
        };
        self.forwards.push_back(ForwardTicket { itt, tag, device, request });
        true
    }
}

/// Announces an ALUA state change since the previous command to every nexus of the logical
/// unit. The session registry is only consulted when the state did change.
fn observe_alua<D: BlockDevice>(config: &Config<D>, lun: &LogicalUnit<D>, state: AluaState) {
    // A device that (re)loaded the logical unit's reservations (a promotion) hands them over
    // before the command runs, so it sees the state the previous primary made durable.
    if let Some(epoch) = lun.device.reservations_load() {
        let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
        if shared.reservations_epoch != Some(epoch)
            && let Some(image) = lun.device.persisted_reservations()
        {
            shared.adopt_reservations(epoch, &image);
        }
    }
    let changed = lun.shared.lock().unwrap_or_else(|p| p.into_inner()).alua_seen != Some(state);
    if changed {
        let nexuses = config.nexuses(&lun.identity.target_name);
        let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.observe_alua(state, &nexuses);
    }
}

/// Announces a capacity change since the previous command (an online resize) to every nexus
/// of the logical unit; the session registry is only consulted when the size did change.
fn observe_capacity<D: BlockDevice>(config: &Config<D>, lun: &LogicalUnit<D>, size_bytes: u64) {
    let changed =
        lun.shared.lock().unwrap_or_else(|p| p.into_inner()).capacity_seen != Some(size_bytes);
    if changed {
        let nexuses = config.nexuses(&lun.identity.target_name);
        let mut shared = lun.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.observe_capacity(size_bytes, &nexuses);
    }
}

/// Runs `f` with the SCSI [`Context`] of `lun` as `nexus` sees it.
fn with_context<D: BlockDevice, R>(
    config: &Config<D>,
    target: Option<&TargetNode<D>>,
    lun: &LogicalUnit<D>,
    nexus: &Nexus,
    info: DeviceInfo,
    f: impl FnOnce(&Context<'_>) -> R,
) -> R {
    let luns: &[u64] = target.map(|t| t.lun_ids.as_slice()).unwrap_or_default();
    let lun_info = |id: u64| lun_info(target, nexus, id);
    let device = lun.device.clone();
    let port_groups = move || device.alua_port_groups();
    let ctx = Context {
        identity: &lun.identity,
        info,
        shared: &lun.shared,
        nexus,
        luns,
        ports: config.ports.as_slice(),
        port_offset: target.map_or(0, |t| t.port_offset),
        remote_ports: target.map(|t| t.remote_ports.as_slice()).unwrap_or_default(),
        lun_info: &lun_info,
        port_groups: &port_groups,
    };
    f(&ctx)
}

/// The device and I/O a [`Step`] asks for, or the outcome it ends with.
#[allow(clippy::type_complexity)]
fn resolve_step<D: BlockDevice>(
    step: Step,
    lun: &Arc<LogicalUnit<D>>,
    target: Option<&TargetNode<D>>,
) -> Result<(Arc<D>, IoOp, Pending), Outcome> {
    match step {
        Step::Done(outcome) => Err(outcome),
        Step::Io(op, pending) => Ok((lun.device.clone(), op, pending)),
        Step::IoAt(lun_id, op, pending) => match target.and_then(|t| t.lun(lun_id)) {
            Some(other) => Ok((other.device.clone(), op, pending)),
            // The LUN was resolved when the command started; a target replaced since then
            // may have lost it.
            None => Err(Outcome::check(scsi::copy::sense_codes::UNREACHABLE_COPY_TARGET)),
        },
    }
}

/// A command that arrived on a remote port (forwarded by the node that owns the port),
/// executed on this process's logical unit exactly as a local port's command: the same
/// reservations, unit attentions and device lock. Pure, like [`Connection`]: the driver
/// performs each [`LuStep::Io`] and feeds the result to [`LuTask::resume`].
pub struct LuTask<D> {
    config: Arc<Config<D>>,
    target: Arc<TargetNode<D>>,
    lun: Arc<LogicalUnit<D>>,
    nexus: Arc<Nexus>,
    pending: Option<Pending>,
}

/// What a [`LuTask`] needs next.
pub enum LuStep<D> {
    Done(ForwardedOutcome),
    /// Perform `op` on `device` (under the device lock, as for local commands).
    Io {
        device: Arc<D>,
        op: IoOp,
    },
}

impl<D: BlockDevice> LuTask<D> {
    /// Starts `command`; `Err` is the final outcome when the target or LUN is not here.
    pub fn start(
        config: Arc<Config<D>>,
        command: ForwardedCommand,
    ) -> Result<(Self, LuStep<D>), ForwardedOutcome> {
        let not_here =
            || ForwardedOutcome::new(Outcome::check(codes::LOGICAL_UNIT_NOT_SUPPORTED), false);
        let target = config.target(&command.target_name).ok_or_else(not_here)?;
        let lun = target.lun(command.lun).cloned().ok_or_else(not_here)?;
        config.remote_nexus_seen(&target.name, &command.nexus);
        let info = lun.info();
        observe_alua(&config, &lun, info.alua);
        observe_capacity(&config, &lun, info.size_bytes);
        let nexus = Arc::new(command.nexus);
        let step = with_context(&config, Some(&target), &lun, &nexus, info, |ctx| {
            scsi::execute(ctx, &command.cdb, command.data_out)
        });
        let mut task = Self { config, target, lun, nexus, pending: None };
        let step = task.advance(step);
        Ok((task, step))
    }

    /// Continues after the I/O of the last [`LuStep::Io`].
    pub fn resume(&mut self, result: Result<IoData, DeviceError>) -> LuStep<D> {
        let Some(pending) = self.pending.take() else {
            return self.done(Outcome::check(codes::INTERNAL_TARGET_FAILURE));
        };
        let step = with_context(
            &self.config,
            Some(&self.target),
            &self.lun,
            &self.nexus,
            self.lun.info(),
            |ctx| scsi::resume(ctx, pending, result),
        );
        self.advance(step)
    }

    fn advance(&mut self, step: Step) -> LuStep<D> {
        match resolve_step(step, &self.lun, Some(&self.target)) {
            Ok((device, op, pending)) => {
                self.pending = Some(pending);
                LuStep::Io { device, op }
            }
            Err(outcome) => self.done(outcome),
        }
    }

    fn done(&self, outcome: Outcome) -> LuStep<D> {
        let descriptor = self.lun.shared.lock().map(|s| s.descriptor_sense).unwrap_or(false);
        LuStep::Done(ForwardedOutcome::new(outcome, descriptor))
    }
}

/// Bytes of a BHS, re-exported for drivers.
pub const HEADER_BYTES: usize = BHS_BYTES;

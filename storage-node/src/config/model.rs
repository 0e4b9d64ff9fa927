//! The resolved configuration: what the engine and tandemd use. Inheritance is already applied
//! (common -> resource -> volume/connection); typed fields are the options Tandem acts on, the
//! `ignored` maps keep every other accepted setting (each one was named in a warning).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use super::{ConfigError, Location, Warning};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub resources: Vec<Resource>,
    /// `global { ... }` settings as written (Tandem acts on none of them).
    pub global: BTreeMap<String, String>,
    pub warnings: Vec<Warning>,
    /// Every file read, the main one first.
    pub files: Vec<PathBuf>,
}

impl Config {
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|resource| resource.name == name)
    }

    /// The resources that have a node named `node_name`, with that node.
    pub fn resources_on<'a>(
        &'a self,
        node_name: &'a str,
    ) -> impl Iterator<Item = (&'a Resource, &'a Node)> + 'a {
        self.resources
            .iter()
            .filter_map(move |resource| resource.node(node_name).map(|node| (resource, node)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub location: Location,
    /// In definition order; node ids are unique.
    pub nodes: Vec<Node>,
    pub connections: Vec<Connection>,
    /// `options { }` with common's applied.
    pub options: ResourceOptions,
    /// Resource-level `net { }` with common's applied (connections add their own on top).
    pub net: NetOptions,
    /// Resource-level `disk { }` with common's applied (volumes and connections add theirs).
    pub disk: DiskOptions,
    pub handlers: BTreeMap<String, String>,
    pub startup: BTreeMap<String, String>,
}

impl Resource {
    /// The node named `name` (its `on` name or one of its aliases; a floating node's name is its
    /// address as written).
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|node| node.name == name || node.aliases.iter().any(|alias| alias == name))
    }

    /// The `handlers { fence-peer "COMMAND"; }` command line, as written (unquoted).
    pub fn fence_peer_handler(&self) -> Option<&str> {
        self.handlers.get("fence-peer").map(String::as_str)
    }

    pub fn node_by_id(&self, node_id: u32) -> Option<&Node> {
        self.nodes.iter().find(|node| node.node_id == node_id)
    }

    /// This node's section, chosen by `node_name` (see `config::local_node_name`).
    pub fn local_node(&self, node_name: &str) -> Result<&Node, ConfigError> {
        self.node(node_name).ok_or_else(|| {
            ConfigError::new(
                self.location.clone(),
                format!(
                    "in resource {}: no 'on {node_name} {{ ... }}' section for this node (the \
                     node name comes from __DRBD_NODE__ or the host name)",
                    self.name
                ),
            )
        })
    }

    /// Connections that involve `node_name`, each with the peer's side.
    pub fn peers_of<'a>(
        &'a self,
        node_name: &'a str,
    ) -> impl Iterator<Item = (&'a Connection, &'a ConnectionHost)> + 'a {
        let node = self.node(node_name);
        self.connections.iter().filter_map(move |connection| {
            let node = node?;
            let [first, second] = &connection.hosts;
            if first.node_id == node.node_id {
                Some((connection, second))
            } else if second.node_id == node.node_id {
                Some((connection, first))
            } else {
                None
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The `on` name, or for `floating` the address as written.
    pub name: String,
    /// Further names of an `on a b { }` section.
    pub aliases: Vec<String>,
    pub node_id: u32,
    pub address: Option<Endpoint>,
    /// Resolved: resource-level volumes merged under this node's own, by number.
    pub volumes: Vec<Volume>,
    pub floating: bool,
    pub location: Location,
}

impl Node {
    pub fn volume(&self, number: u32) -> Option<&Volume> {
        self.volumes.iter().find(|volume| volume.number == number)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    Ipv4,
    Ipv6,
    Ssocks,
    Sdp,
    Sci,
}

impl AddressFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressFamily::Ipv4 => "ipv4",
            AddressFamily::Ipv6 => "ipv6",
            AddressFamily::Ssocks => "ssocks",
            AddressFamily::Sdp => "sdp",
            AddressFamily::Sci => "sci",
        }
    }

    pub(crate) fn from_word(word: &str) -> Option<AddressFamily> {
        match word {
            "ipv4" => Some(AddressFamily::Ipv4),
            "ipv6" => Some(AddressFamily::Ipv6),
            "ssocks" => Some(AddressFamily::Ssocks),
            "sdp" => Some(AddressFamily::Sdp),
            "sci" => Some(AddressFamily::Sci),
            _ => None,
        }
    }
}

/// `address [FAMILY] IP:PORT` (IPv6 as `[ADDR]:PORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub family: AddressFamily,
    pub address: SocketAddr,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family.as_str(), self.address)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub number: u32,
    pub device: Device,
    pub disk: Disk,
    /// Absent only for diskless volumes (`disk none`).
    pub meta_disk: Option<MetaDisk>,
    /// Resource `disk { }` (with common's) plus this volume's own `disk { }` sections.
    pub disk_options: DiskOptions,
}

/// `device [/dev/drbdN] [minor N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: Option<PathBuf>,
    pub minor: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// `disk none`: a diskless (intentionally) node for this volume.
    None,
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaDisk {
    Internal,
    /// `meta-disk PATH [INDEX]`, or `flexible-meta-disk PATH` / `meta-disk PATH` (no index).
    External {
        path: PathBuf,
        index: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// `connection NAME { }`; None for unnamed, mesh-made and implicit connections.
    pub name: Option<String>,
    pub hosts: [ConnectionHost; 2],
    /// Resource net (with common's) plus the connection's or mesh's own.
    pub net: NetOptions,
    /// Resource disk (with common's) plus the connection's own (peer-device options).
    pub disk: DiskOptions,
    /// Per-volume peer-device options of this connection (`volume N { disk { } }`), merged
    /// over `disk`; volumes not listed use `disk`.
    pub volume_disk: BTreeMap<u32, DiskOptions>,
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionHost {
    pub name: String,
    pub node_id: u32,
    /// The address for this connection (its own `host NAME address ...` or the node's).
    pub address: Option<Endpoint>,
}

macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> Result<$name, String> {
                match text {
                    $($word => Ok($name::$variant),)+
                    _ => Err(format!("invalid {}: {text:?}", stringify!($name))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

word_enum!(
    /// Replication protocol: A (acknowledged when sent), B (when received), C (when written).
    Protocol { A = "A", B = "B", C = "C" }
);
word_enum!(OnCongestion { Block = "block", PullAhead = "pull-ahead", Disconnect = "disconnect" });
word_enum!(OnNoQuorum { IoError = "io-error", SuspendIo = "suspend-io" });
word_enum!(OnIoError { PassOn = "pass_on", CallLocalIoError = "call-local-io-error", Detach = "detach" });
word_enum!(AfterSb1Pri {
    Disconnect = "disconnect",
    Consensus = "consensus",
    DiscardSecondary = "discard-secondary",
    CallPriLostAfterSb = "call-pri-lost-after-sb",
    ViolentlyAs0p = "violently-as0p",
});
word_enum!(AfterSb2Pri {
    Disconnect = "disconnect",
    CallPriLostAfterSb = "call-pri-lost-after-sb",
    ViolentlyAs0p = "violently-as0p",
});

/// Split-brain recovery with no primary.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AfterSb0Pri {
    Disconnect,
    DiscardYoungerPrimary,
    DiscardOlderPrimary,
    DiscardZeroChanges,
    DiscardLeastChanges,
    DiscardLocal,
    DiscardRemote,
    /// `discard-node-NAME`: the named node's changes are discarded.
    DiscardNode(String),
}

impl FromStr for AfterSb0Pri {
    type Err = String;
    fn from_str(text: &str) -> Result<AfterSb0Pri, String> {
        Ok(match text {
            "disconnect" => AfterSb0Pri::Disconnect,
            "discard-younger-primary" => AfterSb0Pri::DiscardYoungerPrimary,
            "discard-older-primary" => AfterSb0Pri::DiscardOlderPrimary,
            "discard-zero-changes" => AfterSb0Pri::DiscardZeroChanges,
            "discard-least-changes" => AfterSb0Pri::DiscardLeastChanges,
            "discard-local" => AfterSb0Pri::DiscardLocal,
            "discard-remote" => AfterSb0Pri::DiscardRemote,
            other => match other.strip_prefix("discard-node-") {
                Some(node) if !node.is_empty() => AfterSb0Pri::DiscardNode(node.to_owned()),
                _ => return Err(format!("invalid after-sb-0pri: {text:?}")),
            },
        })
    }
}

impl fmt::Display for AfterSb0Pri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AfterSb0Pri::Disconnect => "disconnect",
            AfterSb0Pri::DiscardYoungerPrimary => "discard-younger-primary",
            AfterSb0Pri::DiscardOlderPrimary => "discard-older-primary",
            AfterSb0Pri::DiscardZeroChanges => "discard-zero-changes",
            AfterSb0Pri::DiscardLeastChanges => "discard-least-changes",
            AfterSb0Pri::DiscardLocal => "discard-local",
            AfterSb0Pri::DiscardRemote => "discard-remote",
            AfterSb0Pri::DiscardNode(node) => return write!(f, "discard-node-{node}"),
        })
    }
}

/// `quorum off | majority | all | N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quorum {
    Off,
    Majority,
    All,
    Count(u32),
}

impl FromStr for Quorum {
    type Err = String;
    fn from_str(text: &str) -> Result<Quorum, String> {
        match text {
            "off" => Ok(Quorum::Off),
            "majority" => Ok(Quorum::Majority),
            "all" => Ok(Quorum::All),
            number => {
                number.parse().map(Quorum::Count).map_err(|_| format!("invalid quorum: {text:?}"))
            }
        }
    }
}

impl fmt::Display for Quorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quorum::Off => f.write_str("off"),
            Quorum::Majority => f.write_str("majority"),
            Quorum::All => f.write_str("all"),
            Quorum::Count(count) => write!(f, "{count}"),
        }
    }
}

/// `net { }` options Tandem acts on; `None` = not set (the accessors give DRBD 9's defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetOptions {
    pub protocol: Option<Protocol>,
    pub after_sb_0pri: Option<AfterSb0Pri>,
    pub after_sb_1pri: Option<AfterSb1Pri>,
    pub after_sb_2pri: Option<AfterSb2Pri>,
    pub csums_alg: Option<String>,
    pub verify_alg: Option<String>,
    pub cram_hmac_alg: Option<String>,
    pub shared_secret: Option<String>,
    /// `on-congestion`, `congestion-fill` (in sectors) and `congestion-extents`.
    pub on_congestion: Option<OnCongestion>,
    pub congestion_fill_sectors: Option<u64>,
    pub congestion_extents: Option<u32>,
    /// Accepted options Tandem does not act on, as written.
    pub ignored: BTreeMap<String, String>,
}

/// DRBD's `net { fencing ...; }` policy (what the engine's fence handling acts on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FencingPolicy {
    DontCare,
    ResourceOnly,
    ResourceAndStonith,
}

impl NetOptions {
    /// `fencing`, DRBD 9's default `dont-care` when absent. The option table admits only the
    /// three words, so any other text cannot reach here; it reads as the default all the same.
    pub fn fencing(&self) -> FencingPolicy {
        match self.ignored.get("fencing").map(String::as_str) {
            Some("resource-only") => FencingPolicy::ResourceOnly,
            Some("resource-and-stonith") => FencingPolicy::ResourceAndStonith,
            _ => FencingPolicy::DontCare,
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(Protocol::C)
    }
    pub fn after_sb_0pri(&self) -> AfterSb0Pri {
        self.after_sb_0pri.clone().unwrap_or(AfterSb0Pri::Disconnect)
    }
    pub fn after_sb_1pri(&self) -> AfterSb1Pri {
        self.after_sb_1pri.unwrap_or(AfterSb1Pri::Disconnect)
    }
    pub fn after_sb_2pri(&self) -> AfterSb2Pri {
        self.after_sb_2pri.unwrap_or(AfterSb2Pri::Disconnect)
    }
}

/// `disk { }` options Tandem acts on, in DRBD's units; `None` = not set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskOptions {
    pub on_io_error: Option<OnIoError>,
    pub al_extents: Option<u32>,
    pub resync_rate_kib_per_s: Option<u64>,
    /// Tenths of a second; 0 disables the dynamic resync controller.
    pub c_plan_ahead_ds: Option<u32>,
    pub c_fill_target_sectors: Option<u64>,
    pub c_max_rate_kib_per_s: Option<u64>,
    pub c_min_rate_kib_per_s: Option<u64>,
    pub ignored: BTreeMap<String, String>,
}

impl DiskOptions {
    pub fn on_io_error(&self) -> OnIoError {
        self.on_io_error.unwrap_or(OnIoError::Detach)
    }
    pub fn al_extents(&self) -> u32 {
        self.al_extents.unwrap_or(1237)
    }
    pub fn resync_rate_kib_per_s(&self) -> u64 {
        self.resync_rate_kib_per_s.unwrap_or(250)
    }
    pub fn c_plan_ahead_ds(&self) -> u32 {
        self.c_plan_ahead_ds.unwrap_or(20)
    }
    pub fn c_fill_target_sectors(&self) -> u64 {
        self.c_fill_target_sectors.unwrap_or(100)
    }
    pub fn c_max_rate_kib_per_s(&self) -> u64 {
        self.c_max_rate_kib_per_s.unwrap_or(102_400)
    }
    pub fn c_min_rate_kib_per_s(&self) -> u64 {
        self.c_min_rate_kib_per_s.unwrap_or(250)
    }
}

/// `options { }` (resource options) Tandem acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceOptions {
    pub quorum: Option<Quorum>,
    pub on_no_quorum: Option<OnNoQuorum>,
    pub ignored: BTreeMap<String, String>,
}

impl ResourceOptions {
    pub fn quorum(&self) -> Quorum {
        self.quorum.unwrap_or(Quorum::Off)
    }
    pub fn on_no_quorum(&self) -> OnNoQuorum {
        self.on_no_quorum.unwrap_or(OnNoQuorum::SuspendIo)
    }
}

impl Connection {
    /// The peer-device options for one volume of this connection.
    pub fn disk_for_volume(&self, number: u32) -> &DiskOptions {
        self.volume_disk.get(&number).unwrap_or(&self.disk)
    }
}

//! Pure rules for tandem-api's create form, `PUT /v1/resources/{name}`
//! (volume-api/node-control-api.yaml): checking the request, numbering the nodes, choosing a
//! replication port, and writing the resource as a DRBD configuration file. No I/O here: the
//! HTTP side (`api.rs`) gathers the facts (ports in use, peers' endpoints) and acts.
//!
//! The request names peers only by node name and control-API URL, so the nodes agree on the
//! rest among themselves: node ids follow the sorted node names (every node computes the same
//! numbering from the same set), and each node reserves its own replication endpoint
//! (`POST /v1/resources/{name}/replication-endpoint`), which its peers ask for.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Resource and node names: what DRBD allows in practice and a file name can hold.
pub const NAME_BYTES_MAX: usize = 64;
/// Nodes one resource may span (DRBD 9: 32 nodes per resource).
pub const NODES_MAX: usize = 32;
/// An iSCSI name is at most 223 bytes (RFC 7143 section 4.2.7.1).
pub const IQN_BYTES_MAX: usize = 223;
/// CHAP names and secrets: RFC 7143 allows up to 255 bytes for a name; secrets are shorter.
pub const CHAP_FIELD_BYTES_MAX: usize = 255;
/// Peer control-API URLs.
pub const URL_BYTES_MAX: usize = 2048;

const _: () = assert!(NODES_MAX >= 2 && NODES_MAX <= 32, "DRBD 9 node ids are 0..31");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    #[default]
    Secondary,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerRef {
    pub node: String,
    /// The peer's control API base URL (`http://HOST:PORT`).
    pub url: String,
    /// `"none"`: the peer is a diskless tiebreaker (votes for quorum, holds no data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Chap {
    pub username: String,
    pub secret: String,
}

/// tandem-api's `CreateResource`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PutRequest {
    pub size_bytes: u64,
    pub role: Role,
    pub protocol: String,
    pub peers: Vec<PeerRef>,
    pub target_iqn: String,
    pub chap: Chap,
    #[serde(default)]
    pub source: Option<serde_json::Value>,
    /// `"none"`: this node is a diskless tiebreaker of the resource (it votes for quorum,
    /// holds no data, exports no LUN and is never primary; its role must be secondary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// DRBD's `quorum` (`off`, `majority`, `all` or a count); absent: `majority` when the
    /// resource has three nodes or more, else off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<String>,
    /// DRBD's `on-no-quorum` (`io-error` or `suspend-io`); absent: `io-error` where quorum is
    /// on, so a primary cut off from the majority fails its I/O and steps down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_no_quorum: Option<String>,
    /// Run tandemd's promoter for the resource on the diskful nodes: a surviving replica
    /// promotes itself when the primary is lost. Needs quorum (three nodes or more).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_promote: bool,
    /// The promoter's preference among the diskful nodes (tandem-api: the primary first), so
    /// that after the initial promotion the other replicas give way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_nodes: Vec<String>,
}

/// A `disk` field's meaning: `None` for a diskful node, `Some(())` for `"none"`.
fn diskless_field(field: &str, disk: Option<&String>) -> Result<bool, Refusal> {
    match disk.map(String::as_str) {
        None => Ok(false),
        Some("none") => Ok(true),
        Some(other) => Err(Refusal::BadRequest(format!(
            "{field}: only \"none\" (a diskless tiebreaker) or absent (a replica with data), \
             got {other:?}"
        ))),
    }
}

/// The quorum settings of a resource, resolved from a request: what goes into its
/// `options` section, and whether the promoter runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// Nodes that are `disk none` (tiebreakers).
    pub diskless: BTreeSet<String>,
    /// `quorum` value, `None` for off.
    pub quorum: Option<String>,
    /// `on-no-quorum` value (only with quorum).
    pub on_no_quorum: Option<String>,
    pub auto_promote: bool,
    pub preferred_nodes: Vec<String>,
}

/// Checks the quorum-related fields against `nodes` (every node of the resource, with whether
/// it is diskless) and resolves the defaults. Shared by both create forms.
pub fn layout(
    nodes: &[(&str, bool)],
    quorum: Option<&str>,
    on_no_quorum: Option<&str>,
    auto_promote: bool,
    preferred_nodes: &[String],
) -> Result<Layout, Refusal> {
    let bad = |message: String| Err(Refusal::BadRequest(message));
    let total = nodes.len();
    let diskful: Vec<&str> = nodes.iter().filter(|(_, d)| !d).map(|(n, _)| *n).collect();
    if diskful.len() < 2 {
        return bad(format!(
            "a resource needs at least 2 nodes with a disk (diskless tiebreakers only vote), got \
             {}",
            diskful.len()
        ));
    }
    let quorum = match quorum {
        None if total >= 3 => Some("majority".to_owned()),
        None | Some("off") => None,
        Some(word @ ("majority" | "all")) => Some(word.to_owned()),
        Some(count) => match count.parse::<usize>() {
            Ok(n) if (1..=total).contains(&n) => Some(n.to_string()),
            _ => {
                return bad(format!(
                    "quorum must be off, majority, all or a count from 1 to {total} (the \
                     resource's nodes), got {count:?}"
                ));
            }
        },
    };
    let on_no_quorum = match (on_no_quorum, &quorum) {
        (None, None) => None,
        (None, Some(_)) => Some("io-error".to_owned()),
        (Some(word @ ("io-error" | "suspend-io")), Some(_)) => Some(word.to_owned()),
        (Some(word @ ("io-error" | "suspend-io")), None) => {
            return bad(format!("on_no_quorum {word} needs quorum (quorum is off)"));
        }
        (Some(other), _) => {
            return bad(format!("on_no_quorum must be io-error or suspend-io, got {other:?}"));
        }
    };
    if auto_promote && (quorum.is_none() || total < 3) {
        return bad("auto_promote needs quorum and at least 3 nodes (add a diskless tiebreaker, \
             \"disk\": \"none\"): without a majority a survivor cannot tell a dead primary \
             from a cut link"
            .to_owned());
    }
    if !auto_promote && !preferred_nodes.is_empty() {
        return bad("preferred_nodes is only used with auto_promote".to_owned());
    }
    let mut seen = BTreeSet::new();
    for node in preferred_nodes {
        if !diskful.contains(&node.as_str()) {
            return bad(format!(
                "preferred_nodes: {node:?} is not a node of the resource with a disk"
            ));
        }
        if !seen.insert(node) {
            return bad(format!("preferred_nodes: {node:?} named twice"));
        }
    }
    Ok(Layout {
        diskless: nodes.iter().filter(|(_, d)| *d).map(|(n, _)| (*n).to_owned()).collect(),
        quorum,
        on_no_quorum,
        auto_promote,
        preferred_nodes: preferred_nodes.to_vec(),
    })
}

/// The layout of a PUT request to node `me` (checked by [`check`] first).
pub fn layout_of(me: &str, request: &PutRequest) -> Result<Layout, Refusal> {
    let mut nodes = vec![(me, diskless_field("disk", request.disk.as_ref())?)];
    for peer in &request.peers {
        let field = format!("peer {} disk", peer.node);
        nodes.push((peer.node.as_str(), diskless_field(&field, peer.disk.as_ref())?));
    }
    layout(
        &nodes,
        request.quorum.as_deref(),
        request.on_no_quorum.as_deref(),
        request.auto_promote,
        &request.preferred_nodes,
    )
}

/// Where one node replicates a resource, and on what disk (what `replication-endpoint`
/// answers; kept in `endpoints/NAME.json` on the node that reserved it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub node: String,
    pub address: SocketAddr,
    pub disk: PathBuf,
    pub minor: u32,
}

/// Why a request cannot be served: the HTTP status class and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request itself is wrong.
    BadRequest(String),
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

fn printable(text: &str) -> bool {
    text.chars().all(|c| c.is_ascii_graphic())
}

/// The `host:port` of an `http://host:port[/]` URL, the only form peers are reached by.
pub fn url_authority(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?.trim_end_matches('/');
    let valid = !rest.is_empty()
        && url.len() <= URL_BYTES_MAX
        && !rest.contains(['/', '?', '#', '@'])
        && printable(rest)
        && rest.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    valid.then_some(rest)
}

/// Checks a PUT request made to node `me` for resource `name`.
pub fn check(name: &str, me: &str, request: &PutRequest) -> Result<(), Refusal> {
    let bad = |message: String| Err(Refusal::BadRequest(message));
    if !valid_name(name) {
        return bad(format!(
            "bad resource name {name:?} (1 to {NAME_BYTES_MAX} letters, digits, - _ .; not \
             starting with .)"
        ));
    }
    if request.size_bytes == 0 || !request.size_bytes.is_multiple_of(4096) {
        return bad(format!(
            "size_bytes must be a positive multiple of 4096, got {}",
            request.size_bytes
        ));
    }
    if !matches!(request.protocol.as_str(), "A" | "B" | "C") {
        return bad(format!("protocol must be A, B or C, got {:?}", request.protocol));
    }
    if request.peers.is_empty() || request.peers.len() >= NODES_MAX {
        return bad(format!(
            "peers: between 1 and {} other nodes, got {}",
            NODES_MAX - 1,
            request.peers.len()
        ));
    }
    let mut seen = BTreeSet::from([me]);
    for peer in &request.peers {
        if !valid_name(&peer.node) {
            return bad(format!("bad peer node name {:?}", peer.node));
        }
        if !seen.insert(peer.node.as_str()) {
            return bad(format!("peer {:?} named twice (or it is this node, {me})", peer.node));
        }
        if url_authority(&peer.url).is_none() {
            return bad(format!(
                "peer {} has a bad url {:?} (http://HOST:PORT)",
                peer.node, peer.url
            ));
        }
    }
    let iqn = &request.target_iqn;
    let iqn_ok = (iqn.starts_with("iqn.") || iqn.starts_with("eui.") || iqn.starts_with("naa."))
        && iqn.len() <= IQN_BYTES_MAX
        && iqn.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b));
    if !iqn_ok {
        return bad(format!(
            "bad target_iqn {iqn:?} (iqn./eui./naa. form, lower case, at most {IQN_BYTES_MAX} \
             bytes)"
        ));
    }
    for (field, value) in [("username", &request.chap.username), ("secret", &request.chap.secret)] {
        if value.is_empty() || value.len() > CHAP_FIELD_BYTES_MAX || !printable(value) {
            return bad(format!(
                "chap.{field} must be 1 to {CHAP_FIELD_BYTES_MAX} printable characters"
            ));
        }
    }
    source_of(request)?;
    let layout = layout_of(me, request)?;
    if layout.diskless.contains(me) && request.role == Role::Primary {
        return bad(format!(
            "this node ({me}) is diskless (a tiebreaker): its role must be secondary"
        ));
    }
    if layout.diskless.contains(me) && request.source.as_ref().is_some_and(|s| !s.is_null()) {
        return bad("a diskless tiebreaker holds no data: it takes no source".to_owned());
    }
    Ok(())
}

/// Where a new resource's data comes from (tandem-api's `source`); the node holding a replica
/// of the new resource holds one of the source too (tandem-api places them so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A snapshot of another resource.
    Snapshot { resource: String, snapshot: String },
    /// Another resource, as it is now: copied through a snapshot taken for the purpose
    /// ([`clone_snapshot_name`]), so that every replica of the copy is the same point in time.
    Resource { resource: String },
}

/// The source of a create request, checked.
pub fn source_of(request: &PutRequest) -> Result<Option<Source>, Refusal> {
    let bad = |what: &str| Err(Refusal::BadRequest(format!("bad source: {what}")));
    let Some(source) = request.source.as_ref().filter(|s| !s.is_null()) else { return Ok(None) };
    let text = |value: &serde_json::Value, field: &str| -> Option<String> {
        value.get(field)?.as_str().filter(|name| valid_name(name)).map(str::to_owned)
    };
    if let Some(snapshot) = source.get("snapshot") {
        return match (text(snapshot, "resource"), text(snapshot, "snapshot")) {
            (Some(resource), Some(snapshot)) => Ok(Some(Source::Snapshot { resource, snapshot })),
            _ => bad("snapshot needs a valid resource and snapshot name"),
        };
    }
    if let Some(resource) = source.get("resource") {
        return match text(resource, "resource") {
            Some(resource) => Ok(Some(Source::Resource { resource })),
            None => bad("resource needs a valid resource name"),
        };
    }
    bad("expected {\"snapshot\": {...}} or {\"resource\": {...}}")
}

/// The `options` section for a layout's quorum (empty where quorum is off).
pub fn options_section(layout: &Layout) -> String {
    match (&layout.quorum, &layout.on_no_quorum) {
        (Some(quorum), Some(on_no_quorum)) => {
            format!("  options {{\n    quorum {quorum};\n    on-no-quorum {on_no_quorum};\n  }}\n")
        }
        (Some(quorum), None) => format!("  options {{\n    quorum {quorum};\n  }}\n"),
        _ => String::new(),
    }
}

/// The full mesh of more than two nodes (empty for two, which connect without it).
pub fn mesh_section<'a>(nodes: impl IntoIterator<Item = &'a str>) -> String {
    let nodes: Vec<&str> = nodes.into_iter().collect();
    if nodes.len() <= 2 {
        return String::new();
    }
    format!("  connection-mesh {{\n    hosts {};\n  }}\n", nodes.join(" "))
}

/// The snapshot through which resource `name` is cloned from another resource. Each node
/// removes its copy once it has made the new replica from it.
pub fn clone_snapshot_name(name: &str) -> String {
    format!("clone-for-{name}")
}

/// Node ids by node name: the sorted names numbered from 0, so every node of the resource
/// computes the same numbering from the same set without asking the others.
pub fn node_ids<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u32> {
    let sorted: BTreeSet<&str> = names.into_iter().collect();
    sorted.into_iter().zip(0u32..).map(|(name, id)| (name.to_owned(), id)).collect()
}

/// The first port of `range` (inclusive) not in `taken` that `bindable` accepts.
pub fn choose_port(
    range: (u16, u16),
    taken: &BTreeSet<u16>,
    mut bindable: impl FnMut(u16) -> bool,
) -> Option<u16> {
    (range.0..=range.1).find(|port| !taken.contains(port) && bindable(*port))
}

/// A path DRBD's syntax can carry without quoting.
fn plain_path(path: &std::path::Path) -> Result<String, String> {
    let text = path.to_str().ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
    if text.is_empty() || !text.starts_with('/') || !printable(text) || text.contains(['"', ';']) {
        return Err(format!(
            "{text:?}: disk paths must be absolute, without spaces, quotes or ';'"
        ));
    }
    Ok(text.to_owned())
}

/// The resource file in DRBD syntax (drbdadm accepts it), checked by the same reader tandemd
/// loads it with, so a request never becomes a broken file.
pub fn render(
    name: &str,
    protocol: &str,
    endpoints: &[Endpoint],
    ids: &BTreeMap<String, u32>,
) -> Result<String, String> {
    render_with(name, protocol, endpoints, ids, &Layout::default())
}

/// [`render`] with diskless nodes, quorum and, with more than two nodes, the connection mesh
/// (DRBD connects more than two `on` sections only as a connection section says).
pub fn render_with(
    name: &str,
    protocol: &str,
    endpoints: &[Endpoint],
    ids: &BTreeMap<String, u32>,
    layout: &Layout,
) -> Result<String, String> {
    let mut text = format!(
        "# Created through tandemd's HTTP API (PUT /v1/resources/{name}); do not edit: delete \
         the volume instead.\nresource {name} {{\n  net {{\n    protocol {protocol};\n  }}\n"
    );
    text.push_str(&options_section(layout));
    let mut sorted: Vec<&Endpoint> = endpoints.iter().collect();
    sorted.sort_by_key(|e| ids.get(&e.node).copied().unwrap_or(u32::MAX));
    for endpoint in sorted {
        let id = ids
            .get(&endpoint.node)
            .ok_or_else(|| format!("node {} has no node id", endpoint.node))?;
        if layout.diskless.contains(&endpoint.node) {
            text.push_str(&format!(
                "  on {} {{\n    node-id {id};\n    address {};\n    volume 0 {{\n      device \
                 minor {};\n      disk none;\n    }}\n  }}\n",
                endpoint.node, endpoint.address, endpoint.minor,
            ));
            continue;
        }
        text.push_str(&format!(
            "  on {} {{\n    node-id {id};\n    address {};\n    volume 0 {{\n      device minor \
             {};\n      disk {};\n      meta-disk internal;\n    }}\n  }}\n",
            endpoint.node,
            endpoint.address,
            endpoint.minor,
            plain_path(&endpoint.disk)?
        ));
    }
    text.push_str(&mesh_section(ids.keys().map(String::as_str)));
    text.push_str("}\n");
    crate::config::parse_str(&format!("{name}.res"), &text, std::path::Path::new("/"))
        .map_err(|e| e.to_string())?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> PutRequest {
        PutRequest {
            size_bytes: 1 << 30,
            role: Role::Primary,
            protocol: "C".into(),
            peers: vec![PeerRef {
                node: "beta".into(),
                url: "http://127.0.0.1:8781".into(),
                ..Default::default()
            }],
            target_iqn: "iqn.2010-10.org.openstack:volume-1".into(),
            chap: Chap { username: "user".into(), secret: "secret-123456".into() },
            ..Default::default()
        }
    }

    #[test]
    fn put_requests_are_checked_with_clear_errors() {
        assert_eq!(check("volume-1", "alpha", &request()), Ok(()));
        type Change = Box<dyn Fn(&mut PutRequest)>;
        let cases: Vec<(&str, Change, &str)> = vec![
            ("../x", Box::new(|_| {}), "bad resource name"),
            ("v", Box::new(|r| r.size_bytes = 0), "positive multiple of 4096"),
            ("v", Box::new(|r| r.size_bytes = 4095), "positive multiple of 4096"),
            ("v", Box::new(|r| r.protocol = "D".into()), "protocol must be A, B or C"),
            ("v", Box::new(|r| r.peers.clear()), "between 1 and 31"),
            ("v", Box::new(|r| r.peers[0].node = "alpha".into()), "named twice"),
            ("v", Box::new(|r| r.peers[0].node = "a b".into()), "bad peer node name"),
            ("v", Box::new(|r| r.peers[0].url = "https://x:1".into()), "bad url"),
            ("v", Box::new(|r| r.peers[0].url = "http://x".into()), "bad url"),
            ("v", Box::new(|r| r.peers[0].url = "http://x:1/p".into()), "bad url"),
            ("v", Box::new(|r| r.target_iqn = "volume-1".into()), "bad target_iqn"),
            ("v", Box::new(|r| r.target_iqn = "iqn.X Y".into()), "bad target_iqn"),
            ("v", Box::new(|r| r.chap.secret = String::new()), "chap.secret"),
            ("v", Box::new(|r| r.chap.username = "a b".into()), "chap.username"),
        ];
        for (name, change, needle) in cases {
            let mut r = request();
            change(&mut r);
            match check(name, "alpha", &r) {
                Err(Refusal::BadRequest(message)) => {
                    assert!(message.contains(needle), "{needle}: {message}")
                }
                other => panic!("{needle}: {other:?}"),
            }
        }
        let mut clone = request();
        let cases = [
            (
                serde_json::json!({"resource": {"resource": "volume-0"}}),
                Ok(Some(Source::Resource { resource: "volume-0".into() })),
            ),
            (
                serde_json::json!({"snapshot": {"resource": "volume-0", "snapshot": "snapshot-1"}}),
                Ok(Some(Source::Snapshot {
                    resource: "volume-0".into(),
                    snapshot: "snapshot-1".into(),
                })),
            ),
            (serde_json::Value::Null, Ok(None)),
            (serde_json::json!({"resource": {"resource": "../etc"}}), Err(())),
            (serde_json::json!({"snapshot": {"resource": "volume-0"}}), Err(())),
            (serde_json::json!({"image": "x"}), Err(())),
        ];
        for (source, expected) in cases {
            clone.source = Some(source.clone());
            let got = source_of(&clone).map_err(|refusal| {
                assert!(matches!(refusal, Refusal::BadRequest(_)), "{source}: {refusal:?}");
            });
            assert_eq!(got, expected, "{source}");
            assert_eq!(check("v", "alpha", &clone).is_ok(), expected.is_ok(), "{source}");
        }
        assert!(valid_name(&clone_snapshot_name(&"v".repeat(NAME_BYTES_MAX - 10))));
    }

    /// alpha (this node, primary), beta and a diskless tie, with the promoter.
    fn with_tiebreaker() -> PutRequest {
        let mut r = request();
        r.peers.push(PeerRef {
            node: "tie".into(),
            url: "http://127.0.0.1:8782".into(),
            disk: Some("none".into()),
        });
        r.auto_promote = true;
        r.preferred_nodes = vec!["alpha".into(), "beta".into()];
        r
    }

    #[test]
    fn tiebreakers_quorum_and_promoter_are_checked_with_clear_errors() {
        let layout = layout_of("alpha", &with_tiebreaker()).expect("valid");
        assert_eq!(layout.diskless, BTreeSet::from(["tie".to_owned()]));
        assert_eq!(layout.quorum.as_deref(), Some("majority"), "majority by default with 3");
        assert_eq!(layout.on_no_quorum.as_deref(), Some("io-error"));
        assert!(layout.auto_promote);
        assert_eq!(check("v", "alpha", &with_tiebreaker()), Ok(()));
        // Two nodes: quorum stays off, as before.
        assert_eq!(layout_of("alpha", &request()).expect("valid"), Layout::default());
        type Change = Box<dyn Fn(&mut PutRequest)>;
        let cases: Vec<(&str, Change, &str)> = vec![
            ("alpha", Box::new(|r| r.peers[1].disk = Some("/x".into())), "only \"none\""),
            (
                "alpha",
                Box::new(|r| {
                    r.disk = Some("none".into());
                    r.peers[1].disk = None;
                    r.preferred_nodes.clear();
                }),
                "its role must be secondary",
            ),
            ("alpha", Box::new(|r| r.peers[0].disk = Some("none".into())), "at least 2 nodes"),
            ("alpha", Box::new(|r| r.quorum = Some("off".into())), "auto_promote needs quorum"),
            ("alpha", Box::new(|r| r.quorum = Some("4".into())), "count from 1 to 3"),
            ("alpha", Box::new(|r| r.quorum = Some("most".into())), "quorum must be"),
            ("alpha", Box::new(|r| r.on_no_quorum = Some("panic".into())), "on_no_quorum must"),
            ("alpha", Box::new(|r| r.preferred_nodes.push("tie".into())), "with a disk"),
            ("alpha", Box::new(|r| r.preferred_nodes.push("beta".into())), "named twice"),
            (
                "alpha",
                Box::new(|r| {
                    r.auto_promote = false;
                }),
                "only used with auto_promote",
            ),
            (
                "alpha",
                Box::new(|r| {
                    r.peers.pop();
                    r.preferred_nodes.clear();
                }),
                "at least 3 nodes",
            ),
            (
                "alpha",
                Box::new(|r| {
                    r.auto_promote = false;
                    r.preferred_nodes.clear();
                    r.quorum = Some("off".into());
                    r.on_no_quorum = Some("io-error".into());
                }),
                "needs quorum (quorum is off)",
            ),
        ];
        for (me, change, needle) in cases {
            let mut r = with_tiebreaker();
            change(&mut r);
            match check("v", me, &r) {
                Err(Refusal::BadRequest(message)) => {
                    assert!(message.contains(needle), "{needle}: {message}")
                }
                other => panic!("{needle}: {other:?}"),
            }
        }
        // The tiebreaker's own request: secondary, diskless, no source.
        let mut tie = with_tiebreaker();
        tie.role = Role::Secondary;
        tie.disk = Some("none".into());
        tie.peers[1] = PeerRef {
            node: "gamma".into(),
            url: "http://127.0.0.1:8783".into(),
            ..Default::default()
        };
        tie.preferred_nodes = vec!["beta".into(), "gamma".into()];
        assert_eq!(check("v", "alpha", &tie), Ok(()));
        tie.source = Some(serde_json::json!({"resource": {"resource": "volume-0"}}));
        assert!(
            matches!(check("v", "alpha", &tie), Err(Refusal::BadRequest(m)) if m.contains("no source"))
        );
        // Old request files (no new fields) still read, and a request without the new fields
        // is written as before.
        let old = serde_json::to_string(&request()).expect("json");
        assert!(!old.contains("auto_promote") && !old.contains("quorum"), "{old}");
        assert_eq!(serde_json::from_str::<PutRequest>(&old).expect("reads"), request());
    }

    #[test]
    fn tiebreaker_resources_render_with_quorum_mesh_and_disk_none() {
        let endpoint = |node: &str, port: u16| Endpoint {
            node: node.into(),
            address: format!("127.0.0.1:{port}").parse().expect("addr"),
            disk: format!("/srv/{node}.img").into(),
            minor: 0,
        };
        let endpoints = [endpoint("alpha", 7789), endpoint("beta", 7790), endpoint("tie", 7791)];
        let ids = node_ids(["alpha", "beta", "tie"]);
        let layout = layout_of("alpha", &with_tiebreaker()).expect("valid");
        let text = render_with("v", "C", &endpoints, &ids, &layout).expect("renders");
        assert!(text.contains("quorum majority;") && text.contains("on-no-quorum io-error;"));
        assert!(text.contains("connection-mesh {\n    hosts alpha beta tie;"), "{text}");
        let config =
            crate::config::parse_str("v.res", &text, std::path::Path::new("/")).expect("ok");
        let resource = &config.resources[0];
        assert_eq!(resource.nodes.len(), 3);
        assert!(!text.contains("/srv/tie.img"), "a tiebreaker has no disk: {text}");
        assert!(text.contains("/srv/alpha.img") && text.contains("/srv/beta.img"));
    }

    #[test]
    fn every_node_numbers_the_same_set_the_same_way() {
        let from_alpha = node_ids(["alpha", "gamma", "beta"]);
        let from_gamma = node_ids(["gamma", "beta", "alpha"]);
        assert_eq!(from_alpha, from_gamma);
        assert_eq!(from_alpha["alpha"], 0);
        assert_eq!(from_alpha["beta"], 1);
        assert_eq!(from_alpha["gamma"], 2);
    }

    #[test]
    fn ports_skip_taken_and_unbindable_ones() {
        let taken = BTreeSet::from([7789, 7790]);
        assert_eq!(choose_port((7789, 7800), &taken, |p| p != 7791), Some(7792));
        assert_eq!(choose_port((7789, 7790), &taken, |_| true), None);
        assert_eq!(choose_port((65535, 65535), &BTreeSet::new(), |_| true), Some(65535));
    }

    /// `text` is what `tests/data/config/valid/NAME` holds (`TANDEM_BLESS=1` rewrites it).
    fn assert_fixture(name: &str, text: &str) {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/config/valid")
            .join(name);
        if std::env::var("TANDEM_BLESS").as_deref() == Ok("1") {
            std::fs::write(&fixture, text).expect("blessing the fixture");
        }
        let stored = std::fs::read_to_string(&fixture).unwrap_or_default();
        assert_eq!(stored, text, "{} is stale: TANDEM_BLESS=1 rewrites it", fixture.display());
    }

    #[test]
    fn rendered_files_are_drbd_syntax_tandemd_reads_back() {
        let endpoints = [
            Endpoint {
                node: "beta".into(),
                address: "127.0.0.2:7789".parse().expect("addr"),
                disk: "/var/lib/tandem/volumes/v.img".into(),
                minor: 0,
            },
            Endpoint {
                node: "alpha".into(),
                address: "127.0.0.1:7790".parse().expect("addr"),
                disk: "/srv/v.img".into(),
                minor: 1,
            },
        ];
        let ids = node_ids(["alpha", "beta"]);
        let text = render("volume-1", "B", &endpoints, &ids).expect("renders");
        let config =
            crate::config::parse_str("volume-1.res", &text, std::path::Path::new("/")).expect("ok");
        let resource = &config.resources[0];
        assert_eq!(resource.name, "volume-1");
        let alpha = resource.node("alpha").expect("alpha");
        assert_eq!(alpha.node_id, 0);
        assert_eq!(alpha.address.as_ref().map(|a| a.address), Some(endpoints[1].address));
        assert_eq!(resource.node("beta").expect("beta").node_id, 1);
        assert_eq!(resource.net.protocol(), crate::config::Protocol::B);
        // The oracle tests (tests/config.rs: drbdadm dump, dump-xml and `up` dry runs) read
        // this fixture; it must stay exactly what the API writes.
        assert_fixture("api-created.res", &text);
        let mut bad = endpoints.clone();
        bad[0].disk = "/tmp/a b.img".into();
        assert!(render("volume-1", "C", &bad, &ids).expect_err("space").contains("disk paths"));
    }

    /// What tandem-api asks for when a third node is up: two replicas and a diskless quorum
    /// tiebreaker, with the automatic promoter. The oracle tests read the fixture (drbdadm
    /// dump, dump-xml and `up` dry runs), so the mesh and the `disk none` volume are checked
    /// against drbd-utils too.
    #[test]
    fn a_rendered_tiebreaker_resource_is_drbd_syntax_tandemd_reads_back() {
        let endpoint = |node: &str, address: &str, disk: &str| Endpoint {
            node: node.into(),
            address: address.parse().expect("addr"),
            disk: disk.into(),
            minor: 0,
        };
        let endpoints = [
            endpoint("alpha", "127.0.0.1:7789", "/var/lib/tandem/volumes/volume-2.img"),
            endpoint("beta", "127.0.0.2:7789", "/var/lib/tandem/volumes/volume-2.img"),
            endpoint("gamma", "127.0.0.3:7789", ""),
        ];
        let nodes = [("alpha", false), ("beta", false), ("gamma", true)];
        let preferred = ["alpha".to_owned(), "beta".to_owned()];
        let layout = layout(&nodes, None, None, true, &preferred).expect("a valid layout");
        assert_eq!(layout.quorum.as_deref(), Some("majority"), "three nodes default to majority");
        let ids = node_ids(["alpha", "beta", "gamma"]);
        let text = render_with("volume-2", "C", &endpoints, &ids, &layout).expect("renders");
        let config =
            crate::config::parse_str("volume-2.res", &text, std::path::Path::new("/")).expect("ok");
        let resource = &config.resources[0];
        assert_eq!(resource.nodes.len(), 3);
        assert_fixture("api-created-tiebreaker.res", &text);
    }
}

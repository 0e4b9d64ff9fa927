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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRef {
    pub node: String,
    /// The peer's control API base URL (`http://HOST:PORT`).
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chap {
    pub username: String,
    pub secret: String,
}

/// tandem-api's `CreateResource`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    pub size_bytes: u64,
    pub role: Role,
    pub protocol: String,
    pub peers: Vec<PeerRef>,
    pub target_iqn: String,
    pub chap: Chap,
    #[serde(default)]
    pub source: Option<serde_json::Value>,
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
    let mut text = format!(
        "# Created through tandemd's HTTP API (PUT /v1/resources/{name}); do not edit: delete \
         the volume instead.\nresource {name} {{\n  net {{\n    protocol {protocol};\n  }}\n"
    );
    let mut sorted: Vec<&Endpoint> = endpoints.iter().collect();
    sorted.sort_by_key(|e| ids.get(&e.node).copied().unwrap_or(u32::MAX));
    for endpoint in sorted {
        let id = ids
            .get(&endpoint.node)
            .ok_or_else(|| format!("node {} has no node id", endpoint.node))?;
        text.push_str(&format!(
            "  on {} {{\n    node-id {id};\n    address {};\n    volume 0 {{\n      device minor \
             {};\n      disk {};\n      meta-disk internal;\n    }}\n  }}\n",
            endpoint.node,
            endpoint.address,
            endpoint.minor,
            plain_path(&endpoint.disk)?
        ));
    }
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
            peers: vec![PeerRef { node: "beta".into(), url: "http://127.0.0.1:8781".into() }],
            target_iqn: "iqn.2010-10.org.openstack:volume-1".into(),
            chap: Chap { username: "user".into(), secret: "secret-123456".into() },
            source: None,
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
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/config/valid/api-created.res");
        if std::env::var("TANDEM_BLESS").as_deref() == Ok("1") {
            std::fs::write(&fixture, &text).expect("blessing the fixture");
        }
        let stored = std::fs::read_to_string(&fixture).unwrap_or_default();
        assert_eq!(stored, text, "{} is stale: TANDEM_BLESS=1 rewrites it", fixture.display());
        let mut bad = endpoints.clone();
        bad[0].disk = "/tmp/a b.img".into();
        assert!(render("volume-1", "C", &bad, &ids).expect_err("space").contains("disk paths"));
    }
}

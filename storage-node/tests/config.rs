//! drbd.conf parsing, data-driven:
//! - `tests/data/config/valid/*.res` and `valid/*/drbd.conf` parse, and the resolved model
//!   renders exactly as the `.expected` file next to them (`TANDEM_BLESS=1` rewrites those);
//! - `tests/data/config/invalid/*.res` fail with the message on their first line
//!   (`# error: LINE: MESSAGE`, LINE relative to the named file);
//! - the oracle: drbdadm (drbd-utils) accepts every valid file and rejects every invalid one,
//!   and its `dump-xml`/`dump` agree with Tandem's model on resource and host names, node ids,
//!   addresses, protocol, devices and disks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use storage_node::config::{self, Config, Disk, MetaDisk};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/config")
}

fn valid_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(data_dir().join("valid")).expect("valid dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|extension| extension == "res") {
            files.push(path);
        } else if path.join("drbd.conf").is_file() {
            files.push(path.join("drbd.conf"));
        }
    }
    // Configuration examples shipped with the crate are held to the same standard.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc");
    if let Ok(entries) = std::fs::read_dir(examples) {
        files.extend(
            entries
                .map(|entry| entry.expect("entry").path())
                .filter(|path| path.extension().is_some_and(|extension| extension == "res")),
        );
    }
    files.sort();
    assert!(files.len() >= 5, "valid configuration files missing");
    files
}

fn invalid_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir().join("invalid"))
        .expect("invalid dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "res"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "invalid configuration files missing");
    files
}

fn short(file: &str) -> String {
    Path::new(file)
        .file_name()
        .map_or_else(|| file.to_owned(), |name| name.to_string_lossy().into_owned())
}

/// A stable, readable rendering of everything the engine gets from a configuration.
fn render(config: &Config) -> String {
    let mut out = String::new();
    for (key, value) in &config.global {
        writeln!(out, "global {key}={value}").unwrap();
    }
    for resource in &config.resources {
        writeln!(
            out,
            "resource {} ({}:{})",
            resource.name,
            short(&resource.location.file),
            resource.location.line
        )
        .unwrap();
        let options = &resource.options;
        writeln!(
            out,
            "  options quorum={} on-no-quorum={} ignored={:?}",
            options.quorum(),
            options.on_no_quorum(),
            options.ignored
        )
        .unwrap();
        let net = &resource.net;
        writeln!(
            out,
            "  net protocol={} after-sb={}/{}/{} csums={:?} verify={:?} cram={:?} secret={:?} ignored={:?}",
            net.protocol(),
            net.after_sb_0pri(),
            net.after_sb_1pri(),
            net.after_sb_2pri(),
            net.csums_alg,
            net.verify_alg,
            net.cram_hmac_alg,
            net.shared_secret,
            net.ignored
        )
        .unwrap();
        let disk = &resource.disk;
        writeln!(
            out,
            "  disk on-io-error={} al-extents={} resync-rate={}KiB/s c-plan-ahead={} c-fill-target={}s c-max-rate={} c-min-rate={} ignored={:?}",
            disk.on_io_error(),
            disk.al_extents(),
            disk.resync_rate_kib_per_s(),
            disk.c_plan_ahead_ds(),
            disk.c_fill_target_sectors(),
            disk.c_max_rate_kib_per_s(),
            disk.c_min_rate_kib_per_s(),
            disk.ignored
        )
        .unwrap();
        if !resource.handlers.is_empty() {
            writeln!(out, "  handlers {:?}", resource.handlers).unwrap();
        }
        if !resource.startup.is_empty() {
            writeln!(out, "  startup {:?}", resource.startup).unwrap();
        }
        for node in &resource.nodes {
            let address =
                node.address.map_or_else(|| "-".to_owned(), |address| address.to_string());
            let floating = if node.floating { " floating" } else { "" };
            let aliases = if node.aliases.is_empty() {
                String::new()
            } else {
                format!(" aliases={:?}", node.aliases)
            };
            writeln!(
                out,
                "  node {} id={} address={address}{floating}{aliases}",
                node.name, node.node_id
            )
            .unwrap();
            for volume in &node.volumes {
                let path = volume
                    .device
                    .path
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |path| path.display().to_string());
                let disk = match &volume.disk {
                    Disk::None => "none".to_owned(),
                    Disk::Path(path) => path.display().to_string(),
                };
                let meta = match &volume.meta_disk {
                    None => "-".to_owned(),
                    Some(MetaDisk::Internal) => "internal".to_owned(),
                    Some(MetaDisk::External { path, index: Some(index) }) => {
                        format!("{}[{index}]", path.display())
                    }
                    Some(MetaDisk::External { path, index: None }) => {
                        format!("{} (flexible)", path.display())
                    }
                };
                let differs = if volume.disk_options == resource.disk {
                    String::new()
                } else {
                    format!(
                        " disk-options: resync-rate={}KiB/s al-extents={} on-io-error={}",
                        volume.disk_options.resync_rate_kib_per_s(),
                        volume.disk_options.al_extents(),
                        volume.disk_options.on_io_error()
                    )
                };
                writeln!(
                    out,
                    "    volume {} device={path} minor={} disk={disk} meta-disk={meta}{differs}",
                    volume.number, volume.device.minor
                )
                .unwrap();
            }
        }
        for connection in &resource.connections {
            let [first, second] = &connection.hosts;
            let end = |host: &config::ConnectionHost| {
                format!(
                    "{}({})@{}",
                    host.name,
                    host.node_id,
                    host.address
                        .map_or_else(|| "-".to_owned(), |address| address.address.to_string())
                )
            };
            let name =
                connection.name.as_ref().map_or_else(String::new, |name| format!(" name={name}"));
            writeln!(
                out,
                "  connection {} -- {}{name} protocol={} after-sb-0pri={} secret={:?} resync-rate={}KiB/s",
                end(first),
                end(second),
                connection.net.protocol(),
                connection.net.after_sb_0pri(),
                connection.net.shared_secret,
                connection.disk.resync_rate_kib_per_s()
            )
            .unwrap();
            for (number, disk) in &connection.volume_disk {
                writeln!(
                    out,
                    "    volume {number} resync-rate={}KiB/s c-plan-ahead={} c-max-rate={}",
                    disk.resync_rate_kib_per_s(),
                    disk.c_plan_ahead_ds(),
                    disk.c_max_rate_kib_per_s()
                )
                .unwrap();
            }
        }
    }
    for warning in &config.warnings {
        writeln!(
            out,
            "warning {}:{}: {}",
            short(&warning.location.file),
            warning.location.line,
            warning.message
        )
        .unwrap();
    }
    out
}

#[test]
fn valid_files_resolve_as_expected() {
    let bless = std::env::var("TANDEM_BLESS").as_deref() == Ok("1");
    let mut failures = Vec::new();
    for path in valid_files() {
        let config = match config::parse_file(&path) {
            Ok(config) => config,
            Err(error) => {
                failures.push(format!("{}: rejected: {error}", path.display()));
                continue;
            }
        };
        let rendered = render(&config);
        // Files shipped outside the test data keep their expectations in shipped/.
        let expected_path = if path.starts_with(data_dir()) {
            path.with_extension("expected")
        } else {
            data_dir()
                .join("shipped")
                .join(path.with_extension("expected").file_name().expect("file name"))
        };
        if bless {
            std::fs::write(&expected_path, &rendered).expect("write expected");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if rendered != expected {
            failures.push(format!(
                "{}: resolved model differs from {} (TANDEM_BLESS=1 rewrites it)\n--- got:\n{rendered}--- expected:\n{expected}",
                path.display(),
                expected_path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn expected_error(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read");
    let first = text.lines().next().unwrap_or_default();
    first
        .strip_prefix("# error: ")
        .unwrap_or_else(|| {
            panic!("{}: first line must be '# error: LINE: MESSAGE'", path.display())
        })
        .to_owned()
}

#[test]
fn invalid_files_fail_with_their_message() {
    let mut failures = Vec::new();
    for path in invalid_files() {
        let expected = expected_error(&path);
        match config::parse_file(&path) {
            Ok(_) => {
                failures.push(format!("{}: accepted, expected error {expected}", path.display()))
            }
            Err(error) => {
                // Messages name other files by the path they were opened with; strip the
                // directory so expectations do not depend on the checkout location.
                let directory = format!("{}/", data_dir().join("invalid").display());
                let got =
                    format!("{}: {}", error.location.line, error.message.replace(&directory, ""));
                let named_file = short(&error.location.file);
                let got = if named_file == short(&path.to_string_lossy()) {
                    got
                } else {
                    format!("{named_file}:{got}")
                };
                if got != expected {
                    failures.push(format!(
                        "{}:\n  got      {got}\n  expected {expected}",
                        path.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn parse_str_and_node_selection() {
    let text = "resource r { on alpha { node-id 0; address 10.0.0.1:7789; volume 0 { device minor 3; disk /dev/a; meta-disk internal; } }\n\
                on beta gamma { node-id 1; address 10.0.0.2:7789; volume 0 { device minor 3; disk none; } } }";
    let config = config::parse_str("inline.res", text, Path::new(".")).expect("parse");
    let resource = config.resource("r").expect("resource");
    assert_eq!(resource.local_node("alpha").expect("alpha").node_id, 0);
    assert_eq!(resource.local_node("gamma").expect("alias").name, "beta");
    let error = resource.local_node("delta").expect_err("unknown node");
    assert!(
        error.to_string().starts_with("inline.res:1: in resource r: no 'on delta { ... }' section"),
        "{error}"
    );
    let peers: Vec<_> = resource.peers_of("alpha").map(|(_, peer)| peer.name.clone()).collect();
    assert_eq!(peers, ["beta"]);
    assert_eq!(config.resources_on("beta").count(), 1);
}

// ---------------------------------------------------------------- the drbdadm oracle

fn drbdadm() -> PathBuf {
    for directory in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let candidate = Path::new(directory).join("drbdadm");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("drbdadm not found: install the Debian package drbd-utils");
}

fn run_drbdadm(verb: &str, path: &Path) -> std::process::Output {
    Command::new(drbdadm())
        .args(["-c"])
        .arg(path)
        .args([verb, "all"])
        // Silences drbdadm's kernel module probe; no module is needed to parse.
        .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
        // drbdadm must not take itself for one of the hosts (it would check that the address
        // is local); the files never name this machine.
        .env_remove(config::NODE_NAME_ENV)
        .output()
        .expect("run drbdadm")
}

/// (volume number, minor, disk, meta-disk)
type VolumeFacts = (u32, u32, String, String);
/// (address, volumes)
type HostFacts = (String, Vec<VolumeFacts>);

/// What both sides must agree on, per resource.
#[derive(Debug, Default, PartialEq, Eq)]
struct Facts {
    /// host -> (address, [(volume, minor, disk, meta-disk)])
    hosts: BTreeMap<String, HostFacts>,
    /// sorted host pair -> protocol
    connections: BTreeMap<(String, String), String>,
}

fn facts_of(config: &Config) -> BTreeMap<String, Facts> {
    let mut all = BTreeMap::new();
    for resource in &config.resources {
        let mut facts = Facts::default();
        for node in &resource.nodes {
            let address = node
                .address
                .map(|address| format!("{} {}", address.family.as_str(), address.address))
                .unwrap_or_default();
            let volumes = node
                .volumes
                .iter()
                .map(|volume| {
                    let disk = match &volume.disk {
                        Disk::None => "none".to_owned(),
                        Disk::Path(path) => path.display().to_string(),
                    };
                    let meta = match &volume.meta_disk {
                        None | Some(MetaDisk::Internal) => "internal".to_owned(),
                        Some(MetaDisk::External { path, .. }) => path.display().to_string(),
                    };
                    (volume.number, volume.device.minor, disk, meta)
                })
                .collect();
            facts.hosts.insert(node.name.clone(), (address, volumes));
        }
        for connection in &resource.connections {
            let name_of = |host: &config::ConnectionHost| host.name.clone();
            let mut pair = [name_of(&connection.hosts[0]), name_of(&connection.hosts[1])];
            pair.sort();
            let [first, second] = pair;
            facts.connections.insert((first, second), connection.net.protocol().to_string());
        }
        all.insert(resource.name.clone(), facts);
    }
    all
}

/// A minimal reader for drbdadm's dump-xml: elements, attributes, text. Enough for its output.
#[derive(Debug, Default)]
struct Element {
    name: String,
    attributes: BTreeMap<String, String>,
    children: Vec<Element>,
    text: String,
}

impl Element {
    fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |child| child.name == name)
    }
    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|child| child.name == name)
    }
    fn attribute(&self, name: &str) -> &str {
        self.attributes.get(name).map_or("", String::as_str)
    }
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn parse_xml(text: &str) -> Element {
    let mut stack = vec![Element { name: "#root".to_owned(), ..Element::default() }];
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        let text_part = rest[..open].trim();
        if !text_part.is_empty() {
            stack.last_mut().expect("open element").text.push_str(&unescape(text_part));
        }
        let close = rest[open..].find('>').expect("unterminated tag") + open;
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let element = stack.pop().expect("element");
            assert_eq!(element.name, name.trim(), "mismatched XML");
            stack.last_mut().expect("parent").children.push(element);
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let mut element = Element::default();
        let mut parts = tag.splitn(2, char::is_whitespace);
        element.name = parts.next().unwrap_or_default().to_owned();
        let mut attributes = parts.next().unwrap_or_default();
        while let Some(equals) = attributes.find("=\"") {
            let key = attributes[..equals].trim().to_owned();
            let value_start = equals + 2;
            let value_end =
                attributes[value_start..].find('"').expect("attribute end") + value_start;
            element.attributes.insert(key, unescape(&attributes[value_start..value_end]));
            attributes = &attributes[value_end + 1..];
        }
        if self_closing {
            stack.last_mut().expect("parent").children.push(element);
        } else {
            stack.push(element);
        }
    }
    assert_eq!(stack.len(), 1, "unclosed XML elements");
    stack.pop().expect("root")
}

fn net_protocol(sections: &Element) -> Option<String> {
    sections
        .children("section")
        .filter(|section| section.attribute("name") == "net")
        .flat_map(|section| section.children("option"))
        .filter(|option| option.attribute("name") == "protocol")
        .map(|option| option.attribute("value").to_owned())
        .last()
}

fn facts_from_xml(xml: &Element) -> BTreeMap<String, Facts> {
    let config = xml.child("config").expect("<config>");
    let common_protocol = config.child("common").and_then(net_protocol);
    let mut all = BTreeMap::new();
    for resource in config.children("resource") {
        let mut facts = Facts::default();
        let resource_protocol = net_protocol(resource).or_else(|| common_protocol.clone());
        let address_of = |host: &Element| {
            // Hosts whose addresses live in their connections (LINSTOR's style) show "(null)".
            if host.child("address").is_some_and(|address| address.attribute("family") == "(null)")
            {
                return String::new();
            }
            host.child("address")
                .map(|address| {
                    format!(
                        "{} {}:{}",
                        address.attribute("family"),
                        bracket(&address.text, address.attribute("family")),
                        address.attribute("port")
                    )
                })
                .unwrap_or_default()
        };
        for host in resource.children("host") {
            let volumes = host
                .children("volume")
                .map(|volume| {
                    let number = volume.attribute("vnr").parse().expect("vnr");
                    let minor = volume
                        .child("device")
                        .map(|device| device.attribute("minor").parse().expect("minor"))
                        .expect("device");
                    let disk =
                        volume.child("disk").map(|disk| disk.text.clone()).unwrap_or_default();
                    let meta = volume
                        .child("meta-disk")
                        .map(|meta| meta.text.clone())
                        .unwrap_or_else(|| "internal".to_owned());
                    (number, minor, disk, meta)
                })
                .collect();
            facts.hosts.insert(xml_host_name(host), (address_of(host), volumes));
        }
        for connection in resource.children("connection") {
            // Multi-path connections list their hosts per path; the first path names them.
            let hosts_parent = connection.child("path").unwrap_or(connection);
            let mut names: Vec<String> = hosts_parent.children("host").map(xml_host_name).collect();
            names.sort();
            assert_eq!(names.len(), 2, "connection with {} hosts", names.len());
            let protocol = net_protocol(connection)
                .or_else(|| resource_protocol.clone())
                .unwrap_or_else(|| "C".to_owned());
            facts.connections.insert((names[0].clone(), names[1].clone()), protocol);
        }
        all.insert(resource.attribute("name").to_owned(), facts);
    }
    all
}

fn bracket(address: &str, family: &str) -> String {
    if family == "ipv6" { format!("[{address}]") } else { address.to_owned() }
}

/// dump-xml names a host section by all its names ("alpha alpha.example.org") and leaves
/// floating hosts unnamed; Tandem names a node by its first name and a floating one by its
/// address.
fn xml_host_name(host: &Element) -> String {
    if host.attribute("floating") == "1" {
        let address = host.child("address").expect("floating address");
        return format!(
            "{}:{}",
            bracket(&address.text, address.attribute("family")),
            address.attribute("port")
        );
    }
    host.attribute("name").split_whitespace().next().unwrap_or_default().to_owned()
}

#[test]
fn drbdadm_agrees_with_tandem() {
    let mut failures = Vec::new();
    for path in valid_files() {
        let ours =
            config::parse_file(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let output = run_drbdadm("dump-xml", &path);
        if !output.status.success() {
            failures.push(format!(
                "{}: drbdadm rejects it: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            ));
            continue;
        }
        let xml = parse_xml(&String::from_utf8_lossy(&output.stdout));
        let theirs = facts_from_xml(&xml);
        let mine = facts_of(&ours);
        if mine != theirs {
            failures.push(format!(
                "{}: models differ\n  tandem:  {mine:?}\n  drbdadm: {theirs:?}",
                path.display()
            ));
        }
        // Node ids are not in dump-xml; drbdadm's text dump has them (and auto-assigns them for
        // 8.4-style two-node files). Tandem reads the dump too: the same model must come out.
        let dump = run_drbdadm("dump", &path);
        assert!(dump.status.success(), "{}: drbdadm dump failed", path.display());
        let dumped = config::parse_str(
            "dump",
            &String::from_utf8_lossy(&dump.stdout),
            Path::new("/nonexistent"),
        )
        .unwrap_or_else(|error| {
            panic!("{}: Tandem cannot read drbdadm's dump: {error}", path.display())
        });
        for (resource, dumped_resource) in ours.resources.iter().zip(&dumped.resources) {
            let ids = |resource: &config::Resource| -> Vec<(String, u32)> {
                resource.nodes.iter().map(|node| (node.name.clone(), node.node_id)).collect()
            };
            if ids(resource) != ids(dumped_resource) {
                failures.push(format!(
                    "{}: node ids differ from drbdadm's dump: {:?} vs {:?}",
                    path.display(),
                    ids(resource),
                    ids(dumped_resource)
                ));
            }
            if facts_of(&ours).get(&resource.name) != facts_of(&dumped).get(&dumped_resource.name) {
                failures.push(format!(
                    "{}: resource {} reads differently from drbdadm's dump",
                    path.display(),
                    resource.name
                ));
            }
        }
        if ours.resources.len() != dumped.resources.len() {
            failures.push(format!(
                "{}: {} resources, drbdadm's dump has {}",
                path.display(),
                ours.resources.len(),
                dumped.resources.len()
            ));
        }
    }
    for path in invalid_files() {
        let text = std::fs::read_to_string(&path).expect("read");
        if text.lines().nth(1).is_some_and(|line| line.starts_with("# tandem-only")) {
            continue;
        }
        let output = run_drbdadm("dump", &path);
        if output.status.success() {
            failures.push(format!("{}: drbdadm accepts it; mark it '# tandem-only: WHY' on line 2 if Tandem refuses it on purpose", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One node's view of a resource, as `drbdadm -d up` would configure the kernel.
#[derive(Debug, Default, PartialEq, Eq)]
struct LocalView {
    node_id: u32,
    /// (minor, volume, diskless)
    minors: Vec<(u32, u32, bool)>,
    /// (peer id, peer name, protocol)
    peers: Vec<(u32, String, String)>,
    /// (peer id, local address, peer address)
    paths: Vec<(u32, String, String)>,
    /// (minor, backing disk)
    attached: Vec<(u32, String)>,
    /// (peer id, volume, [resync-rate KiB/s, c-plan-ahead, c-fill-target sectors, c-max-rate,
    /// c-min-rate]) for the options set in the file
    peer_devices: Vec<(u32, u32, [Option<u64>; 5])>,
    /// (peer id, volume) kept without a bitmap: a `disk none` peer, a tiebreaker that only
    /// votes (drbdadm: `peer-device-options --bitmap=no`; Tandem: the engine's diskless peers)
    no_bitmap: Vec<(u32, u32)>,
}

/// drbdadm echoes values as written ("50M"); scale them like drbdsetup (bare = default unit).
fn scale(value: &str, unit_bytes: u64) -> u64 {
    let split = value.find(|character: char| !character.is_ascii_digit()).unwrap_or(value.len());
    let number: u64 = value[..split].parse().expect("number");
    let suffix_bytes = match &value[split..] {
        "" => return number,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "s" => 512,
        other => panic!("unknown suffix {other}"),
    };
    number * suffix_bytes / unit_bytes
}

fn view_from_dry_run(output: &str) -> LocalView {
    let mut view = LocalView::default();
    for line in output.lines() {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        // drbdadm prints the helper's full path when it found it outside PATH.
        if let Some(first) = words.first_mut() {
            *first = first.rsplit('/').next().unwrap_or(first);
        }
        let option = |name: &str| {
            words
                .iter()
                .find_map(|word| word.strip_prefix(&format!("--{name}=")[..]).map(str::to_owned))
        };
        match words.as_slice() {
            ["drbdsetup", "new-resource", _, id, ..] => view.node_id = id.parse().expect("node id"),
            ["drbdsetup", "new-minor", _, minor, volume, ..] => view.minors.push((
                minor.parse().expect("minor"),
                volume.parse().expect("volume"),
                words.contains(&"--diskless"),
            )),
            ["drbdsetup", "new-peer", _, id, ..] => view.peers.push((
                id.parse().expect("peer id"),
                option("_name").unwrap_or_default(),
                option("protocol").unwrap_or_else(|| "C".to_owned()),
            )),
            ["drbdsetup", "new-path", _, id, local, peer, ..] => {
                view.paths.push((
                    id.parse().expect("peer id"),
                    (*local).to_owned(),
                    (*peer).to_owned(),
                ));
            }
            ["drbdsetup", "peer-device-options", _, peer, volume, ..] => {
                let kib = |name: &str| option(name).map(|value| scale(&value, 1024));
                let (peer, volume) = (peer.parse().expect("peer"), volume.parse().expect("volume"));
                let set = [
                    kib("resync-rate"),
                    option("c-plan-ahead").map(|value| scale(&value, 1)),
                    option("c-fill-target").map(|value| scale(&value, 512)),
                    kib("c-max-rate"),
                    kib("c-min-rate"),
                ];
                if set.iter().any(Option::is_some) {
                    view.peer_devices.push((peer, volume, set));
                }
                if option("bitmap").as_deref() == Some("no") {
                    view.no_bitmap.push((peer, volume));
                }
            }
            ["drbdsetup", "attach", minor, disk, ..] => {
                view.attached.push((minor.parse().expect("minor"), (*disk).to_owned()));
            }
            _ => {}
        }
    }
    view.minors.sort();
    view.peers.sort();
    view.paths.sort();
    view.attached.sort();
    view.peer_devices.sort();
    view.no_bitmap.sort();
    view
}

fn tandem_view(resource: &config::Resource, node_name: &str) -> LocalView {
    let node = resource.local_node(node_name).expect("local node");
    let endpoint = |address: Option<config::Endpoint>| {
        address
            .map(|address| format!("{}:{}", address.family.as_str(), address.address))
            .unwrap_or_default()
    };
    let mut view = LocalView { node_id: node.node_id, ..LocalView::default() };
    for volume in &node.volumes {
        view.minors.push((volume.device.minor, volume.number, volume.disk == Disk::None));
        if let Disk::Path(path) = &volume.disk {
            view.attached.push((volume.device.minor, path.display().to_string()));
        }
    }
    for (connection, peer) in resource.peers_of(node_name) {
        view.peers.push((peer.node_id, peer.name.clone(), connection.net.protocol().to_string()));
        let local =
            connection.hosts.iter().find(|host| host.node_id == node.node_id).expect("local end");
        view.paths.push((peer.node_id, endpoint(local.address), endpoint(peer.address)));
        for volume in &node.volumes {
            let disk = connection.disk_for_volume(volume.number);
            let set = [
                disk.resync_rate_kib_per_s,
                disk.c_plan_ahead_ds.map(u64::from),
                disk.c_fill_target_sectors,
                disk.c_max_rate_kib_per_s,
                disk.c_min_rate_kib_per_s,
            ];
            // drbdadm prints peer-device-options only when some option is set.
            if set.iter().any(Option::is_some) {
                view.peer_devices.push((peer.node_id, volume.number, set));
            }
            let peer_volume = resource
                .node(&peer.name)
                .and_then(|n| n.volumes.iter().find(|v| v.number == volume.number));
            if peer_volume.is_some_and(|v| v.disk == Disk::None) {
                view.no_bitmap.push((peer.node_id, volume.number));
            }
        }
    }
    view.minors.sort();
    view.peers.sort();
    view.paths.sort();
    view.attached.sort();
    view.peer_devices.sort();
    view.no_bitmap.sort();
    view
}

/// Node selection: for every node on the loopback address, drbdadm pretending to be that node
/// (`__DRBD_NODE__`) and dry-running `up` must configure what Tandem's model says that node has.
#[test]
fn drbdadm_dry_run_up_agrees_on_each_nodes_view() {
    let mut failures = Vec::new();
    let mut views_checked = 0;
    for path in valid_files() {
        let config = config::parse_file(&path).expect("parse");
        for resource in &config.resources {
            for node in &resource.nodes {
                let loopback = node.address.is_some_and(|address| {
                    address.address.ip().is_loopback() && address.address.is_ipv4()
                });
                if !loopback {
                    continue;
                }
                let output = Command::new(drbdadm())
                    .arg("-d")
                    .arg("-c")
                    .arg(&path)
                    .args(["up", &resource.name])
                    .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
                    .env(config::NODE_NAME_ENV, &node.name)
                    .output()
                    .expect("run drbdadm");
                if !output.status.success() {
                    failures.push(format!(
                        "{} {} as {}: drbdadm failed: {}",
                        path.display(),
                        resource.name,
                        node.name,
                        String::from_utf8_lossy(&output.stderr)
                    ));
                    continue;
                }
                // The dry run prints the commands on stdout (older drbd-utils on stderr).
                let printed = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                let theirs = view_from_dry_run(&printed);
                let ours = tandem_view(resource, &node.name);
                views_checked += 1;
                if theirs != ours {
                    failures.push(format!(
                        "{} {} as {}:\n  tandem:  {ours:?}\n  drbdadm: {theirs:?}",
                        path.display(),
                        resource.name,
                        node.name
                    ));
                }
            }
        }
    }
    assert!(views_checked >= 4, "too few loopback nodes to compare ({views_checked})");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The fence-peer plumbing the engine's handler support will read: `net { fencing ...; }`
/// (common, resource and connection level) and `handlers { fence-peer "..."; }` reach the
/// model, typed, with the command line as written.
#[test]
fn fencing_policy_and_fence_peer_handler_reach_the_model() {
    let text = r#"
common {
  net { fencing resource-only; }
  handlers {
    fence-peer "/usr/lib/drbd/crm-fence-peer.9.sh --timeout 30";
    unfence-peer "/usr/lib/drbd/crm-unfence-peer.9.sh";
  }
}
resource r0 {
  on a { node-id 0; address 127.0.0.1:7789; volume 0 { device minor 0; disk /dev/x; meta-disk internal; } }
  on b { node-id 1; address 127.0.0.2:7789; volume 0 { device minor 0; disk /dev/x; meta-disk internal; } }
}
resource r1 {
  net { fencing resource-and-stonith; }
  on a { node-id 0; address 127.0.0.1:7790; volume 0 { device minor 1; disk /dev/y; meta-disk internal; } }
  on b { node-id 1; address 127.0.0.2:7790; volume 0 { device minor 1; disk /dev/y; meta-disk internal; } }
}
resource r2 {
  net { fencing dont-care; }
  on a { node-id 0; address 127.0.0.1:7791; volume 0 { device minor 2; disk /dev/z; meta-disk internal; } }
  on b { node-id 1; address 127.0.0.2:7791; volume 0 { device minor 2; disk /dev/z; meta-disk internal; } }
}
"#;
    let config = config::parse_str("fencing.res", text, Path::new("/")).expect("parses");
    let expected = [
        ("r0", config::FencingPolicy::ResourceOnly),
        ("r1", config::FencingPolicy::ResourceAndStonith),
        ("r2", config::FencingPolicy::DontCare),
    ];
    for (name, policy) in expected {
        let resource = config.resource(name).expect("resource");
        assert_eq!(resource.net.fencing(), policy, "{name}");
        for (connection, _) in resource.peers_of("a") {
            assert_eq!(connection.net.fencing(), policy, "{name}: the connection inherits it");
        }
        assert_eq!(
            resource.fence_peer_handler(),
            Some("/usr/lib/drbd/crm-fence-peer.9.sh --timeout 30"),
            "{name}: common's handler"
        );
    }
    let bare = config::parse_str(
        "bare.res",
        "resource r { on a { node-id 0; address 127.0.0.1:7789; volume 0 { device minor 0; \
         disk /dev/x; meta-disk internal; } }\n on b { node-id 1; address 127.0.0.2:7789; \
         volume 0 { device minor 0; disk /dev/x; meta-disk internal; } } }\n",
        Path::new("/"),
    )
    .expect("parses");
    assert_eq!(bare.resources[0].net.fencing(), config::FencingPolicy::DontCare);
    assert_eq!(bare.resources[0].fence_peer_handler(), None);
    if let Some(drbdadm) =
        ["/usr/sbin/drbdadm", "/sbin/drbdadm"].iter().find(|p| Path::new(p).exists())
    {
        let file = std::env::temp_dir().join(format!("tandem-fencing-{}.res", std::process::id()));
        std::fs::write(&file, text).expect("writing");
        let output = Command::new(drbdadm)
            .arg("-c")
            .arg(&file)
            .args(["dump", "all"])
            .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
            .env_remove(config::NODE_NAME_ENV)
            .output()
            .expect("drbdadm");
        let _ = std::fs::remove_file(&file);
        assert!(output.status.success(), "drbdadm: {}", String::from_utf8_lossy(&output.stderr));
    }
}

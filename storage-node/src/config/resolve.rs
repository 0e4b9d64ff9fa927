//! From statements to the resolved model: keyword checks, 8.4/9 placement, inheritance,
//! node ids, connections. Errors are worded like drbdadm's where drbdadm has a message.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;

use super::constants::{MINOR_MAX, NODE_ID_MAX, VOLUME_NUMBER_MAX};
use super::model::{
    AddressFamily, Config, Connection, ConnectionHost, Device, Disk, DiskOptions, Endpoint,
    MetaDisk, NetOptions, Node, Resource, ResourceOptions, Volume,
};
use super::options::{self, CheckedOption, Section, scaled, unit_of};
use super::tree::{Statement, Word};
use super::{ConfigError, Location, Warning};

/// Options of one section in the order written; later ones win when merged.
type OptionList = Vec<CheckedOption>;

#[derive(Debug, Default, Clone)]
struct Sections {
    net: Option<(OptionList, Location)>,
    disk: Option<(OptionList, Location)>,
    options: Option<(OptionList, Location)>,
    startup: Option<(OptionList, Location)>,
    handlers: Option<(OptionList, Location)>,
    /// 8.4's `protocol X;` outside `net { }`.
    loose_net: OptionList,
}

impl Sections {
    fn slot(&mut self, section: Section) -> &mut Option<(OptionList, Location)> {
        match section {
            Section::Net => &mut self.net,
            Section::Disk => &mut self.disk,
            Section::Options => &mut self.options,
            Section::Startup => &mut self.startup,
            Section::Handlers | Section::Global => &mut self.handlers,
        }
    }

    fn list(&self, section: Section) -> OptionList {
        let slot = match section {
            Section::Net => &self.net,
            Section::Disk => &self.disk,
            Section::Options => &self.options,
            Section::Startup => &self.startup,
            Section::Handlers | Section::Global => &self.handlers,
        };
        let mut list = if section == Section::Net { self.loose_net.clone() } else { Vec::new() };
        if let Some((options, _)) = slot {
            list.extend(options.iter().cloned());
        }
        list
    }
}

#[derive(Debug, Default, Clone)]
struct RawVolume {
    device: Option<Device>,
    disk: Option<Disk>,
    meta_disk: Option<MetaDisk>,
    disk_options: OptionList,
    location: Option<Location>,
}

#[derive(Debug)]
struct RawHost {
    names: Vec<String>,
    floating: bool,
    node_id: Option<(u32, Location)>,
    address: Option<Endpoint>,
    volumes: BTreeMap<u32, RawVolume>,
    location: Location,
}

#[derive(Debug)]
struct RawConnectionHost {
    name: String,
    address: Option<Endpoint>,
    port: Option<u16>,
    location: Location,
}

#[derive(Debug)]
struct RawConnection {
    name: Option<String>,
    hosts: Vec<RawConnectionHost>,
    net: OptionList,
    disk: OptionList,
    volume_disk: BTreeMap<u32, OptionList>,
    location: Location,
}

struct Resolver {
    warnings: Vec<Warning>,
    common: Sections,
    common_seen: Option<Location>,
    global: BTreeMap<String, String>,
    global_seen: Option<Location>,
    resources: Vec<Resource>,
    /// (node name, minor) -> where it was first used, across resources.
    minors: HashMap<(String, u32), Location>,
}

pub(crate) fn resolve(statements: &[Statement]) -> Result<Config, ConfigError> {
    let mut resolver = Resolver {
        warnings: Vec::new(),
        common: Sections::default(),
        common_seen: None,
        global: BTreeMap::new(),
        global_seen: None,
        resources: Vec::new(),
        minors: HashMap::new(),
    };
    // common applies to every resource wherever it appears in the file, so read it first.
    for statement in statements {
        if statement.keyword() == "common" {
            resolver.common(statement)?;
        }
    }
    for statement in statements {
        let keyword = statement.keyword();
        match keyword {
            "common" => {}
            "global" => resolver.global(statement)?,
            "resource" => resolver.resource(statement)?,
            "skip" => {}
            _ if keyword.starts_with("require-drbd-module-version-") => {
                resolver.warn(&statement.location, format!("'{keyword}' is ignored by Tandem"));
            }
            _ => {
                return Err(error(
                    &statement.location,
                    format!(
                        "Parse error: 'global | common | resource | skip | include' expected, but \
                         got '{keyword}'"
                    ),
                ));
            }
        }
    }
    Ok(Config {
        resources: resolver.resources,
        global: resolver.global,
        warnings: resolver.warnings,
        files: Vec::new(),
    })
}

fn error(location: &Location, message: impl Into<String>) -> ConfigError {
    ConfigError::new(location.clone(), message)
}

fn block(statement: &Statement) -> Result<&[Statement], ConfigError> {
    statement.block.as_deref().ok_or_else(|| {
        error(
            &statement.location,
            format!("Parse error: '{{' expected after '{}', but got ';'", statement.keyword()),
        )
    })
}

fn no_block(statement: &Statement) -> Result<(), ConfigError> {
    if statement.block.is_some() {
        return Err(error(
            &statement.location,
            format!("Parse error: ';' expected after '{}', but got '{{'", statement.keyword()),
        ));
    }
    Ok(())
}

fn one_argument<'a>(statement: &'a Statement, what: &str) -> Result<&'a Word, ConfigError> {
    match statement.arguments() {
        [word] => Ok(word),
        [] => Err(error(
            &statement.location,
            format!("Parse error: {what} expected after '{}'", statement.keyword()),
        )),
        [_, extra, ..] => Err(error(
            &extra.location,
            format!("Parse error: '{{' or ';' expected, but got '{}'", extra.text),
        )),
    }
}

fn parse_number<T>(word: &Word, what: &str, max: u32) -> Result<T, ConfigError>
where
    T: std::str::FromStr + Into<u64> + Copy,
{
    match word.text.parse::<T>() {
        Ok(value) if value.into() <= u64::from(max) => Ok(value),
        _ => Err(error(
            &word.location,
            format!("Parse error: {what} (0..{max}) expected, but got '{}'", word.text),
        )),
    }
}

impl Resolver {
    fn warn(&mut self, location: &Location, message: impl Into<String>) {
        self.warnings.push(Warning { location: location.clone(), message: message.into() });
    }

    fn warn_ignored(&mut self, section: Section, option: &CheckedOption) {
        if option.used {
            return;
        }
        let message = match (section, option.name.as_str()) {
            (Section::Net, "allow-two-primaries") if option.value == "yes" => {
                "net option 'allow-two-primaries yes' is refused: Tandem allows one primary at a \
                 time; it is ignored"
                    .to_owned()
            }
            (Section::Handlers, name) => format!("handler '{name}' is not run by Tandem (ignored)"),
            (section, name) => format!("{} option '{name}' is ignored by Tandem", section.name()),
        };
        self.warn(&option.location, message);
    }

    fn global(&mut self, statement: &Statement) -> Result<(), ConfigError> {
        if let Some(first) = &self.global_seen {
            return Err(conflict(&statement.location, "global section 'global'", first));
        }
        self.global_seen = Some(statement.location.clone());
        for option in block(statement)? {
            let checked = options::check(Section::Global, option)?;
            self.warn_ignored(Section::Global, &checked);
            self.global.insert(checked.name, checked.value);
        }
        Ok(())
    }

    fn common(&mut self, statement: &Statement) -> Result<(), ConfigError> {
        if let Some(first) = &self.common_seen {
            return Err(conflict(&statement.location, "common section 'common'", first));
        }
        self.common_seen = Some(statement.location.clone());
        let mut sections = Sections::default();
        for item in block(statement)? {
            if !self.section_statement(&mut sections, item, "common")? {
                return Err(error(
                    &item.location,
                    format!(
                        "Parse error: 'disk | net | options | startup | handlers' expected, but \
                         got '{}'",
                        item.keyword()
                    ),
                ));
            }
        }
        self.common = sections;
        Ok(())
    }

    /// Handles `net { }`, `disk { }`, `options { }`, `startup { }`, `handlers { }` and 8.4's
    /// loose `protocol X;`. Returns false when the statement is none of these.
    fn section_statement(
        &mut self,
        sections: &mut Sections,
        statement: &Statement,
        owner: &str,
    ) -> Result<bool, ConfigError> {
        let keyword = statement.keyword();
        if keyword == "protocol" && statement.block.is_none() {
            let checked = options::check(Section::Net, statement)?;
            sections.loose_net.push(checked);
            return Ok(true);
        }
        let Some(section) = Section::from_keyword(keyword) else { return Ok(false) };
        let Some(items) = statement.block.as_deref() else { return Ok(false) };
        if !statement.arguments().is_empty() {
            return Err(error(
                &statement.location,
                format!(
                    "Parse error: '{{' expected after '{keyword}', but got '{}'",
                    statement.arguments()[0].text
                ),
            ));
        }
        let mut list = Vec::with_capacity(items.len());
        for item in items {
            let checked = options::check(section, item)?;
            self.warn_ignored(section, &checked);
            list.push(checked);
        }
        let slot = sections.slot(section);
        if let Some((_, first)) = slot {
            let what = format!("{keyword} section '{owner}:{keyword}'");
            return Err(conflict(&statement.location, &what, first));
        }
        *slot = Some((list, statement.location.clone()));
        Ok(true)
    }

    fn resource(&mut self, statement: &Statement) -> Result<(), ConfigError> {
        let name_word = one_argument(statement, "a resource name")?;
        let name = name_word.text.clone();
        let items = block(statement)?;
        if let Some(first) = self.resources.iter().find(|resource| resource.name == name) {
            let first = first.location.clone();
            return Err(conflict(
                &statement.location,
                &format!("resource section '{name}'"),
                &first,
            ));
        }
        let mut sections = Sections::default();
        let mut volumes: BTreeMap<u32, RawVolume> = BTreeMap::new();
        let mut hosts: Vec<RawHost> = Vec::new();
        let mut connections: Vec<RawConnection> = Vec::new();
        let mut meshes: Vec<(Vec<Word>, OptionList, Location)> = Vec::new();
        for item in items {
            if self.section_statement(&mut sections, item, &name)? {
                continue;
            }
            match item.keyword() {
                "volume" => self.volume_statement(&mut volumes, item)?,
                "device" | "disk" | "meta-disk" | "flexible-meta-disk" => {
                    // 8.4 style: the implicit volume 0.
                    let volume = volumes.entry(0).or_default();
                    volume.location.get_or_insert_with(|| item.location.clone());
                    volume_field(volume, item)?;
                }
                "on" => hosts.push(self.host(item, false)?),
                "floating" => hosts.push(self.host(item, true)?),
                "connection" => connections.push(self.connection(item)?),
                "connection-mesh" => meshes.push(self.mesh(item)?),
                "skip" => {}
                "proxy" if item.block.is_some() => {
                    self.warn(
                        &item.location,
                        "'proxy' (DRBD Proxy) settings are ignored by Tandem",
                    );
                }
                "stacked-on-top-of" => {
                    return Err(error(
                        &item.location,
                        "stacked resources (stacked-on-top-of) are refused: Tandem does not \
                         stack resources",
                    ));
                }
                other => {
                    return Err(error(
                        &item.location,
                        format!(
                            "Parse error: 'on | floating | volume | connection | connection-mesh | \
                             net | disk | options | startup | handlers | device | disk | \
                             meta-disk' expected, but got '{other}'"
                        ),
                    ));
                }
            }
        }
        let resource =
            self.build(&name, statement, &sections, &volumes, hosts, connections, meshes)?;
        self.resources.push(resource);
        Ok(())
    }

    fn volume_statement(
        &mut self,
        volumes: &mut BTreeMap<u32, RawVolume>,
        statement: &Statement,
    ) -> Result<(), ConfigError> {
        let number_word = one_argument(statement, "a volume number")?;
        let number: u32 = parse_number(number_word, "a volume number", VOLUME_NUMBER_MAX)?;
        let items = block(statement)?;
        if let Some(existing) = volumes.get(&number).and_then(|volume| volume.location.clone()) {
            return Err(conflict(&statement.location, &format!("volume '{number}'"), &existing));
        }
        let mut volume =
            RawVolume { location: Some(statement.location.clone()), ..RawVolume::default() };
        for item in items {
            if item.keyword() == "disk" && item.block.is_some() {
                for option in block(item)? {
                    let checked = options::check(Section::Disk, option)?;
                    self.warn_ignored(Section::Disk, &checked);
                    volume.disk_options.push(checked);
                }
                continue;
            }
            match item.keyword() {
                "device" | "disk" | "meta-disk" | "flexible-meta-disk" => {
                    volume_field(&mut volume, item)?
                }
                other => {
                    return Err(error(
                        &item.location,
                        format!(
                            "Parse error: 'device | disk | meta-disk' expected, but got '{other}'"
                        ),
                    ));
                }
            }
        }
        volumes.insert(number, volume);
        Ok(())
    }

    fn host(&mut self, statement: &Statement, floating: bool) -> Result<RawHost, ConfigError> {
        let items = block(statement)?;
        let mut host = RawHost {
            names: Vec::new(),
            floating,
            node_id: None,
            address: None,
            volumes: BTreeMap::new(),
            location: statement.location.clone(),
        };
        if floating {
            let endpoint = parse_address(statement.arguments(), &statement.location)?;
            host.names.push(endpoint.address.to_string());
            host.address = Some(endpoint);
        } else {
            if statement.arguments().is_empty() {
                return Err(error(
                    &statement.location,
                    "Parse error: a host name expected after 'on'",
                ));
            }
            host.names = statement.arguments().iter().map(|word| word.text.clone()).collect();
        }
        for item in items {
            match item.keyword() {
                "node-id" => {
                    no_block(item)?;
                    let word = one_argument(item, "a node id")?;
                    let node_id: u32 = parse_number(word, "a node id", NODE_ID_MAX)?;
                    host.node_id = Some((node_id, item.location.clone()));
                }
                "address" => {
                    no_block(item)?;
                    if floating {
                        return Err(error(
                            &item.location,
                            "Parse error: a floating section takes its address in its header",
                        ));
                    }
                    host.address = Some(parse_address(item.arguments(), &item.location)?);
                }
                "volume" => self.volume_statement(&mut host.volumes, item)?,
                "device" | "disk" | "meta-disk" | "flexible-meta-disk" if item.block.is_none() => {
                    let volume = host.volumes.entry(0).or_default();
                    volume.location.get_or_insert_with(|| item.location.clone());
                    volume_field(volume, item)?;
                }
                "skip" => {}
                "proxy" => self.warn(&item.location, "'proxy' (DRBD Proxy) is ignored by Tandem"),
                other => {
                    return Err(error(
                        &item.location,
                        format!(
                            "Parse error: 'node-id | address | volume | device | disk | \
                             meta-disk' expected, but got '{other}'"
                        ),
                    ));
                }
            }
        }
        Ok(host)
    }

    fn connection(&mut self, statement: &Statement) -> Result<RawConnection, ConfigError> {
        let name = match statement.arguments() {
            [] => None,
            [name] => {
                // drbdadm says the same and drops the name; Tandem keeps it for messages only.
                self.warn(
                    &statement.location,
                    format!("explicitly named connections are deprecated; the name '{}' is only used in messages", name.text),
                );
                Some(name.text.clone())
            }
            [_, extra, ..] => {
                return Err(error(
                    &extra.location,
                    format!("Parse error: '{{' expected, but got '{}'", extra.text),
                ));
            }
        };
        let mut connection = RawConnection {
            name,
            hosts: Vec::new(),
            net: Vec::new(),
            disk: Vec::new(),
            volume_disk: BTreeMap::new(),
            location: statement.location.clone(),
        };
        let mut paths = 0;
        for item in block(statement)? {
            match (item.keyword(), item.block.as_deref()) {
                ("host", None) => connection.hosts.push(connection_host(item)?),
                ("path", Some(hosts)) => {
                    paths += 1;
                    let mut path_hosts = Vec::new();
                    for host in hosts {
                        if host.keyword() != "host" {
                            return Err(error(
                                &host.location,
                                format!(
                                    "Parse error: 'host' expected, but got '{}'",
                                    host.keyword()
                                ),
                            ));
                        }
                        path_hosts.push(connection_host(host)?);
                    }
                    if path_hosts.len() != 2 {
                        return Err(error(
                            &item.location,
                            "a path needs exactly two 'host' statements",
                        ));
                    }
                    if paths == 1 && connection.hosts.is_empty() {
                        connection.hosts = path_hosts;
                    } else if paths == 2 {
                        self.warn(
                            &item.location,
                            "more than one path per connection: Tandem uses the first",
                        );
                    }
                }
                ("net", Some(options)) => {
                    for option in options {
                        let checked = options::check(Section::Net, option)?;
                        self.warn_ignored(Section::Net, &checked);
                        connection.net.push(checked);
                    }
                }
                ("disk", Some(options)) => {
                    for option in options {
                        let checked = options::check(Section::Disk, option)?;
                        self.warn_ignored(Section::Disk, &checked);
                        connection.disk.push(checked);
                    }
                }
                ("volume", Some(items)) => {
                    // Peer-device options for one volume of this connection.
                    let number_word = one_argument(item, "a volume number")?;
                    let number: u32 =
                        parse_number(number_word, "a volume number", VOLUME_NUMBER_MAX)?;
                    let mut list = Vec::new();
                    for volume_item in items {
                        let Some(options) = volume_item
                            .block
                            .as_deref()
                            .filter(|_| volume_item.keyword() == "disk")
                        else {
                            return Err(error(
                                &volume_item.location,
                                format!(
                                    "Parse error: 'disk' expected, but got '{}'",
                                    volume_item.keyword()
                                ),
                            ));
                        };
                        for option in options {
                            let checked = options::check(Section::Disk, option)?;
                            self.warn_ignored(Section::Disk, &checked);
                            list.push(checked);
                        }
                    }
                    connection.volume_disk.insert(number, list);
                }
                ("skip", _) => {}
                (other, _) => {
                    return Err(error(
                        &item.location,
                        format!(
                            "Parse error: 'host | path | net | disk | volume' expected, but got '{other}'"
                        ),
                    ));
                }
            }
        }
        if connection.hosts.len() != 2 {
            return Err(error(
                &statement.location,
                format!("a connection needs exactly two hosts, but has {}", connection.hosts.len()),
            ));
        }
        Ok(connection)
    }

    fn mesh(
        &mut self,
        statement: &Statement,
    ) -> Result<(Vec<Word>, OptionList, Location), ConfigError> {
        let mut hosts = Vec::new();
        let mut net = Vec::new();
        for item in block(statement)? {
            match (item.keyword(), item.block.as_deref()) {
                ("hosts", None) => hosts.extend(item.arguments().iter().cloned()),
                ("net", Some(options)) => {
                    for option in options {
                        let checked = options::check(Section::Net, option)?;
                        self.warn_ignored(Section::Net, &checked);
                        net.push(checked);
                    }
                }
                (other, _) => {
                    return Err(error(
                        &item.location,
                        format!("Parse error: 'hosts | net' expected, but got '{other}'"),
                    ));
                }
            }
        }
        if hosts.len() < 2 {
            return Err(error(&statement.location, "a connection-mesh needs at least two hosts"));
        }
        Ok((hosts, net, statement.location.clone()))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        name: &str,
        statement: &Statement,
        sections: &Sections,
        volumes: &BTreeMap<u32, RawVolume>,
        hosts: Vec<RawHost>,
        connections: Vec<RawConnection>,
        meshes: Vec<(Vec<Word>, OptionList, Location)>,
    ) -> Result<Resource, ConfigError> {
        let location = statement.location.clone();
        let common = self.common.clone();
        let merged = |section: Section| -> OptionList {
            let mut list = common.list(section);
            list.extend(sections.list(section));
            list
        };
        let net_list = merged(Section::Net);
        let disk_list = merged(Section::Disk);
        let options_list = merged(Section::Options);
        if hosts.is_empty() {
            return Err(error(
                &location,
                format!("in resource {name}: no 'on HOST {{ ... }}' sections"),
            ));
        }
        // Node ids: all given, or (8.4 style, two nodes) none given and assigned in order.
        let given = hosts.iter().filter(|host| host.node_id.is_some()).count();
        if given == 0 && hosts.len() > 2 {
            return Err(error(
                &hosts[0].location,
                format!(
                    "in resource {name}, on {} {{ ... }}: 'node-id' keyword missing.",
                    hosts[0].names[0]
                ),
            ));
        }
        let mut nodes: Vec<Node> = Vec::with_capacity(hosts.len());
        let mut ids: HashMap<u32, Location> = HashMap::new();
        let mut addresses: HashMap<SocketAddr, Location> = HashMap::new();
        for (index, host) in hosts.iter().enumerate() {
            let node_id = match (&host.node_id, given) {
                (Some((node_id, node_id_location)), _) => {
                    if let Some(first) = ids.get(node_id) {
                        return Err(conflict(
                            node_id_location,
                            &format!("node-id '{name}:{node_id}'"),
                            first,
                        ));
                    }
                    ids.insert(*node_id, node_id_location.clone());
                    *node_id
                }
                (None, 0) => u32::try_from(index).unwrap_or(u32::MAX),
                (None, _) => {
                    return Err(error(
                        &host.location,
                        format!(
                            "in resource {name}, on {} {{ ... }}: 'node-id' keyword missing.",
                            host.names[0]
                        ),
                    ));
                }
            };
            // Nodes may leave their address to the connections (LINSTOR writes files so).
            if let Some(address) = host.address {
                if let Some(first) = addresses.get(&address.address) {
                    return Err(error(
                        &host.location,
                        format!(
                            "in resource {name} {}:{} is used for both endpoints (first at {first})",
                            address.family.as_str(),
                            address.address
                        ),
                    ));
                }
                addresses.insert(address.address, host.location.clone());
            }
            for other in &nodes {
                if let Some(clash) = host.names.iter().find(|candidate| {
                    other.name == **candidate || other.aliases.contains(candidate)
                }) {
                    return Err(conflict(
                        &host.location,
                        &format!("host section '{name}:{clash}'"),
                        &other.location,
                    ));
                }
            }
            let volumes = self.node_volumes(name, host, volumes, &disk_list)?;
            nodes.push(Node {
                name: host.names[0].clone(),
                aliases: host.names[1..].to_vec(),
                node_id,
                address: host.address,
                volumes,
                floating: host.floating,
                location: host.location.clone(),
            });
        }
        let mut resolved_connections = Vec::new();
        for connection in &connections {
            let mut ends = Vec::with_capacity(2);
            for host in &connection.hosts {
                let Some(node) = nodes
                    .iter()
                    .find(|node| node.name == host.name || node.aliases.contains(&host.name))
                else {
                    return Err(error(
                        &host.location,
                        format!(
                            "in resource {name}, connection: host '{}' has no 'on {} {{ ... }}' section",
                            host.name, host.name
                        ),
                    ));
                };
                let mut address = host.address.or(node.address);
                if let (Some(port), Some(endpoint)) = (host.port, address.as_mut()) {
                    endpoint.address.set_port(port);
                }
                if address.is_none() {
                    return Err(error(
                        &host.location,
                        format!(
                            "in resource {name}, connection: host '{}' has no address (give \
                             'host {} address IP:PORT' or an address in its 'on' section)",
                            host.name, host.name
                        ),
                    ));
                }
                ends.push(ConnectionHost {
                    name: node.name.clone(),
                    node_id: node.node_id,
                    address,
                });
            }
            let [first, second] = <[ConnectionHost; 2]>::try_from(ends)
                .map_err(|_| error(&connection.location, "a connection needs exactly two hosts"))?;
            if first.node_id == second.node_id {
                return Err(error(
                    &connection.location,
                    format!(
                        "in resource {name}: a connection from host '{}' to itself",
                        first.name
                    ),
                ));
            }
            let mut net = net_list.clone();
            net.extend(connection.net.iter().cloned());
            let mut disk = disk_list.clone();
            disk.extend(connection.disk.iter().cloned());
            let volume_disk = connection
                .volume_disk
                .iter()
                .map(|(number, options)| {
                    let mut merged = disk.clone();
                    merged.extend(options.iter().cloned());
                    (*number, disk_options(&merged))
                })
                .collect();
            push_connection(
                &mut resolved_connections,
                Connection {
                    name: connection.name.clone(),
                    hosts: [first, second],
                    net: net_options(&net),
                    disk: disk_options(&disk),
                    volume_disk,
                    location: connection.location.clone(),
                },
                name,
            )?;
        }
        for (mesh_hosts, mesh_net, mesh_location) in &meshes {
            let mut members = Vec::new();
            for word in mesh_hosts {
                let Some(node) = nodes
                    .iter()
                    .find(|node| node.name == word.text || node.aliases.contains(&word.text))
                else {
                    return Err(error(
                        &word.location,
                        format!(
                            "in resource {name}, connection-mesh: host '{}' has no 'on {} {{ ... }}' section",
                            word.text, word.text
                        ),
                    ));
                };
                members.push(node);
            }
            let mut net = net_list.clone();
            net.extend(mesh_net.iter().cloned());
            for (index, first) in members.iter().enumerate() {
                for second in &members[index + 1..] {
                    // A pair both in a mesh and in a connection section would make drbdadm
                    // create the same peer twice, which the kernel refuses: reject it here.
                    push_connection(
                        &mut resolved_connections,
                        Connection {
                            name: None,
                            hosts: [connection_end(first, name)?, connection_end(second, name)?],
                            net: net_options(&net),
                            disk: disk_options(&disk_list),
                            volume_disk: BTreeMap::new(),
                            location: mesh_location.clone(),
                        },
                        name,
                    )?;
                }
            }
        }
        if connections.is_empty() && meshes.is_empty() {
            if nodes.len() == 2 {
                resolved_connections.push(Connection {
                    name: None,
                    hosts: [connection_end(&nodes[0], name)?, connection_end(&nodes[1], name)?],
                    net: net_options(&net_list),
                    disk: disk_options(&disk_list),
                    volume_disk: BTreeMap::new(),
                    location: location.clone(),
                });
            } else if nodes.len() > 2 {
                self.warn(
                    &location,
                    format!(
                        "resource {name}: use explicit 'connection' sections (or a \
                         'connection-mesh' section) with more than two 'on' sections; no \
                         connections are made"
                    ),
                );
            }
        }
        let to_map = |list: OptionList| -> BTreeMap<String, String> {
            list.into_iter().map(|option| (option.name, option.value)).collect()
        };
        Ok(Resource {
            name: name.to_owned(),
            location,
            nodes,
            connections: resolved_connections,
            options: resource_options(&options_list),
            net: net_options(&net_list),
            disk: disk_options(&disk_list),
            handlers: to_map(merged(Section::Handlers)),
            startup: to_map(merged(Section::Startup)),
        })
    }

    /// Merges resource-level volumes under the host's own, field by field, and checks each.
    fn node_volumes(
        &mut self,
        resource: &str,
        host: &RawHost,
        resource_volumes: &BTreeMap<u32, RawVolume>,
        disk_list: &OptionList,
    ) -> Result<Vec<Volume>, ConfigError> {
        let mut numbers: Vec<u32> =
            resource_volumes.keys().chain(host.volumes.keys()).copied().collect();
        numbers.sort_unstable();
        numbers.dedup();
        let mut volumes = Vec::with_capacity(numbers.len());
        let host_name = &host.names[0];
        for number in numbers {
            let base = resource_volumes.get(&number);
            let own = host.volumes.get(&number);
            let device = own
                .and_then(|volume| volume.device.clone())
                .or_else(|| base.and_then(|volume| volume.device.clone()));
            let disk = own
                .and_then(|volume| volume.disk.clone())
                .or_else(|| base.and_then(|volume| volume.disk.clone()));
            let meta_disk = own
                .and_then(|volume| volume.meta_disk.clone())
                .or_else(|| base.and_then(|volume| volume.meta_disk.clone()));
            let location = own
                .and_then(|volume| volume.location.clone())
                .or_else(|| base.and_then(|volume| volume.location.clone()))
                .unwrap_or_else(|| host.location.clone());
            let missing = |keyword: &str| {
                error(
                    &host.location,
                    format!(
                        "in resource {resource}, on {host_name} {{ ... }}, volume {number}: '{keyword}' keyword missing."
                    ),
                )
            };
            let device = device.ok_or_else(|| missing("device"))?;
            let disk = disk.ok_or_else(|| missing("disk"))?;
            if meta_disk.is_none() && disk != Disk::None {
                return Err(missing("meta-disk"));
            }
            for name in &host.names {
                let key = (name.clone(), device.minor);
                if let Some(first) = self.minors.get(&key) {
                    return Err(conflict(
                        &location,
                        &format!("device-minor '{name}:{}'", device.minor),
                        first,
                    ));
                }
                self.minors.insert(key, location.clone());
            }
            let mut options = disk_list.clone();
            if let Some(base) = base {
                options.extend(base.disk_options.iter().cloned());
            }
            if let Some(own) = own {
                options.extend(own.disk_options.iter().cloned());
            }
            volumes.push(Volume {
                number,
                device,
                disk,
                meta_disk,
                disk_options: disk_options(&options),
            });
        }
        Ok(volumes)
    }
}

fn conflict(location: &Location, what: &str, first: &Location) -> ConfigError {
    error(location, format!("conflicting use of {what} ... (first used at {first})"))
}

fn push_connection(
    connections: &mut Vec<Connection>,
    connection: Connection,
    resource: &str,
) -> Result<(), ConfigError> {
    let ids = [connection.hosts[0].node_id, connection.hosts[1].node_id];
    if let Some(first) = connections.iter().find(|existing| {
        let existing_ids = [existing.hosts[0].node_id, existing.hosts[1].node_id];
        existing_ids.contains(&ids[0]) && existing_ids.contains(&ids[1])
    }) {
        return Err(conflict(
            &connection.location,
            &format!(
                "connection '{resource}:{}-{}'",
                connection.hosts[0].name, connection.hosts[1].name
            ),
            &first.location,
        ));
    }
    connections.push(connection);
    Ok(())
}

fn connection_end(node: &Node, resource: &str) -> Result<ConnectionHost, ConfigError> {
    if node.address.is_none() {
        return Err(error(
            &node.location,
            format!(
                "in resource {resource}, on {} {{ ... }}: 'address' keyword missing.",
                node.name
            ),
        ));
    }
    Ok(ConnectionHost { name: node.name.clone(), node_id: node.node_id, address: node.address })
}

/// `host NAME [address [FAMILY] IP:PORT] [port PORT] [via proxy ...]`.
fn connection_host(statement: &Statement) -> Result<RawConnectionHost, ConfigError> {
    no_block(statement)?;
    let arguments = statement.arguments();
    let Some(name) = arguments.first() else {
        return Err(error(&statement.location, "Parse error: a host name expected after 'host'"));
    };
    let mut host = RawConnectionHost {
        name: name.text.clone(),
        address: None,
        port: None,
        location: statement.location.clone(),
    };
    let mut rest = &arguments[1..];
    while let Some(word) = rest.first() {
        match word.text.as_str() {
            "address" => {
                let family_given =
                    rest.get(1).is_some_and(|word| AddressFamily::from_word(&word.text).is_some());
                let take = if family_given { 3 } else { 2 };
                if rest.len() < take {
                    return Err(error(
                        &word.location,
                        "Parse error: an address expected after 'address'",
                    ));
                }
                host.address = Some(parse_address(&rest[1..take], &word.location)?);
                rest = &rest[take..];
            }
            "port" => {
                let Some(port) = rest.get(1).and_then(|word| word.text.parse::<u16>().ok()) else {
                    return Err(error(
                        &word.location,
                        "Parse error: a port number expected after 'port'",
                    ));
                };
                host.port = Some(port);
                rest = &rest[2..];
            }
            "via" => break,
            other => {
                return Err(error(
                    &word.location,
                    format!("Parse error: 'address | port | via' expected, but got '{other}'"),
                ));
            }
        }
    }
    Ok(host)
}

/// `[FAMILY] IP:PORT`, IPv6 as `[ADDR]:PORT`.
fn parse_address(words: &[Word], location: &Location) -> Result<Endpoint, ConfigError> {
    let (family, text) = match words {
        [address] => (None, address),
        [family, address] => match AddressFamily::from_word(&family.text) {
            Some(family) => (Some(family), address),
            None => {
                return Err(error(
                    &family.location,
                    format!(
                        "Parse error: 'ipv4 | ipv6 | ssocks | sdp | sci' expected, but got '{}'",
                        family.text
                    ),
                ));
            }
        },
        [] => return Err(error(location, "Parse error: an address (IP:PORT) expected")),
        [_, _, extra, ..] => {
            return Err(error(
                &extra.location,
                format!("Parse error: ';' expected, but got '{}'", extra.text),
            ));
        }
    };
    let address: SocketAddr = text.text.parse().map_err(|_| {
        error(
            &text.location,
            format!(
                "Parse error: an address as IP:PORT (IPv6 as [ADDR]:PORT) expected, but got '{}'",
                text.text
            ),
        )
    })?;
    let family =
        family.unwrap_or(if address.is_ipv6() { AddressFamily::Ipv6 } else { AddressFamily::Ipv4 });
    let consistent = match family {
        AddressFamily::Ipv6 => address.is_ipv6(),
        _ => address.is_ipv4(),
    };
    if !consistent {
        return Err(error(
            &text.location,
            format!("address '{}' does not match address family {}", text.text, family.as_str()),
        ));
    }
    Ok(Endpoint { family, address })
}

/// `device`, `disk PATH|none`, `meta-disk`, `flexible-meta-disk` into a raw volume.
fn volume_field(volume: &mut RawVolume, statement: &Statement) -> Result<(), ConfigError> {
    no_block(statement)?;
    let arguments = statement.arguments();
    match statement.keyword() {
        "device" => volume.device = Some(parse_device(arguments, &statement.location)?),
        "disk" => {
            let word = one_argument(statement, "a disk (a path or 'none')")?;
            volume.disk = Some(if word.text == "none" {
                Disk::None
            } else {
                Disk::Path(PathBuf::from(&word.text))
            });
        }
        "meta-disk" | "flexible-meta-disk" => {
            if arguments.is_empty() {
                return Err(error(
                    &statement.location,
                    format!("Parse error: a value expected after '{}'", statement.keyword()),
                ));
            }
            let joined: String = arguments.iter().map(|word| word.text.as_str()).collect();
            volume.meta_disk = Some(parse_meta_disk(&joined, &statement.location)?);
        }
        other => unreachable!("volume_field called for {other}"),
    }
    Ok(())
}

fn parse_device(words: &[Word], location: &Location) -> Result<Device, ConfigError> {
    let minor_of = |word: &Word| -> Result<u32, ConfigError> {
        parse_number(word, "a minor number", MINOR_MAX)
    };
    match words {
        [minor, number] if minor.text == "minor" => {
            Ok(Device { path: None, minor: minor_of(number)? })
        }
        [path, minor, number] if minor.text == "minor" => {
            Ok(Device { path: Some(PathBuf::from(&path.text)), minor: minor_of(number)? })
        }
        [path] => {
            let minor = path
                .text
                .strip_prefix("/dev/drbd")
                .and_then(|digits| digits.parse::<u32>().ok())
                .filter(|minor| *minor <= MINOR_MAX)
                .ok_or_else(|| {
                    error(
                        &path.location,
                        format!("Parse error: device name must be /dev/drbdX, or give the minor: 'device {} minor N'", path.text),
                    )
                })?;
            Ok(Device { path: Some(PathBuf::from(&path.text)), minor })
        }
        _ => Err(error(
            location,
            "Parse error: 'device [PATH] minor N' or 'device /dev/drbdN' expected",
        )),
    }
}

fn parse_meta_disk(text: &str, location: &Location) -> Result<MetaDisk, ConfigError> {
    if text == "internal" {
        return Ok(MetaDisk::Internal);
    }
    if let Some(open) = text.find('[') {
        let index_text = text[open + 1..].strip_suffix(']');
        let index = index_text.and_then(|digits| digits.parse::<u32>().ok()).ok_or_else(|| {
            error(
                location,
                format!("Parse error: meta-disk PATH [INDEX] expected, but got '{text}'"),
            )
        })?;
        return Ok(MetaDisk::External { path: PathBuf::from(&text[..open]), index: Some(index) });
    }
    Ok(MetaDisk::External { path: PathBuf::from(text), index: None })
}

fn last_value<'a>(list: &'a OptionList, name: &str) -> Option<&'a str> {
    list.iter().rev().find(|option| option.name == name).map(|option| option.value.as_str())
}

fn ignored(list: &OptionList) -> BTreeMap<String, String> {
    list.iter()
        .filter(|option| !option.used)
        .map(|option| (option.name.clone(), option.value.clone()))
        .collect()
}

fn typed<T: std::str::FromStr>(list: &OptionList, name: &str) -> Option<T> {
    last_value(list, name).and_then(|value| value.parse().ok())
}

fn scaled_value(list: &OptionList, name: &str) -> Option<u64> {
    last_value(list, name).and_then(|value| scaled(value, unit_of(name)))
}

fn net_options(list: &OptionList) -> NetOptions {
    NetOptions {
        protocol: typed(list, "protocol"),
        after_sb_0pri: typed(list, "after-sb-0pri"),
        after_sb_1pri: typed(list, "after-sb-1pri"),
        after_sb_2pri: typed(list, "after-sb-2pri"),
        csums_alg: last_value(list, "csums-alg").map(str::to_owned),
        verify_alg: last_value(list, "verify-alg").map(str::to_owned),
        cram_hmac_alg: last_value(list, "cram-hmac-alg").map(str::to_owned),
        shared_secret: last_value(list, "shared-secret").map(str::to_owned),
        on_congestion: typed(list, "on-congestion"),
        congestion_fill_sectors: scaled_value(list, "congestion-fill"),
        congestion_extents: scaled_value(list, "congestion-extents")
            .and_then(|value| u32::try_from(value).ok()),
        ignored: ignored(list),
    }
}

fn disk_options(list: &OptionList) -> DiskOptions {
    DiskOptions {
        on_io_error: typed(list, "on-io-error"),
        al_extents: scaled_value(list, "al-extents").and_then(|value| u32::try_from(value).ok()),
        resync_rate_kib_per_s: scaled_value(list, "resync-rate"),
        c_plan_ahead_ds: scaled_value(list, "c-plan-ahead")
            .and_then(|value| u32::try_from(value).ok()),
        c_fill_target_sectors: scaled_value(list, "c-fill-target"),
        c_max_rate_kib_per_s: scaled_value(list, "c-max-rate"),
        c_min_rate_kib_per_s: scaled_value(list, "c-min-rate"),
        ignored: ignored(list),
    }
}

fn resource_options(list: &OptionList) -> ResourceOptions {
    ResourceOptions {
        quorum: typed(list, "quorum"),
        on_no_quorum: typed(list, "on-no-quorum"),
        ignored: ignored(list),
    }
}

//! Node settings DRBD has no words for, kept out of the resource files so those stay pure DRBD:
//! the iSCSI portal, the control socket, the state directory, the IQN prefix, CHAP, and the
//! node name override. They come from a small node file (`tandemd --node-file FILE`) and/or
//! flags; flags win.
//!
//! ```text
//! # /etc/tandem/node.conf
//! portal          192.0.2.10:3260
//! control-socket  /run/tandem/tandemd.sock
//! state-dir       /var/lib/tandem
//! iqn-prefix      iqn.2026-11.org.tandem
//! chap            initiator-user:secret
//! mutual-chap     target-user:secret
//! node            node-a
//! api-listen      127.0.0.1:8780
//! api-token       a-long-random-secret
//! replication-address 192.0.2.10   # where resources created through the API listen
//! replication-ports   7789-8788    # ports they take, one per resource
//! metrics-listen  0.0.0.0:9943     # Prometheus /metrics without the API token
//! service-ip      r0 192.0.2.100/24 dev eth0   # moves with r0's primary (one line each)
//! promoter        r0 preferred-nodes alpha,beta  # r0 promotes itself (needs quorum)
//! reservations    r0 local     # r0's LUN is its whole device (see below)
//! ```
//!
//! `reservations RESOURCE local` is for a volume that comes from kernel DRBD (or any device
//! whose initiator data fills it to the end): by default the last 128 KiB of a resource's
//! device hold its replicated persistent reservations (`reservations.rs`) and the LUN is that
//! much smaller; with `local` the LUN is the whole device and PERSISTENT RESERVE state lives
//! in this node's memory only (as tgt keeps it), lost on restart and failover.

use crate::constants::{
    CONTROL_SOCKET_DEFAULT, IQN_PREFIX_DEFAULT, PORTAL_DEFAULT, REPLICATION_PORTS_DEFAULT,
    STATE_DIRECTORY_DEFAULT,
};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub portal: SocketAddr,
    pub control_socket: PathBuf,
    pub state_directory: PathBuf,
    pub iqn_prefix: String,
    /// CHAP the initiator must answer: (user, secret).
    pub chap: Option<(String, String)>,
    /// Mutual CHAP: what the target answers with.
    pub mutual_chap: Option<(String, String)>,
    /// Overrides `__DRBD_NODE__` and the host name.
    pub node: Option<String>,
    /// Where the HTTP control API listens (off when absent).
    pub api_listen: Option<SocketAddr>,
    /// The bearer token the HTTP control API requires.
    pub api_token: Option<String>,
    /// Reported to tandem-api (Cinder's availability zone); "nova" like Cinder's default.
    pub availability_zone: String,
    /// The IP resources created through the HTTP API replicate on (their DRBD `address`);
    /// the API's own IP when absent and specific.
    pub replication_address: Option<std::net::IpAddr>,
    /// The ports (inclusive) those resources take, one each; DRBD's habit is 7789 upward.
    pub replication_ports: (u16, u16),
    /// Where `GET /metrics` is served without a token (off when absent).
    pub metrics_listen: Option<SocketAddr>,
    /// Per-resource service IPs (`service-ip` lines, one per resource).
    pub service_ips: Vec<crate::service_ip::ServiceIpConfig>,
    /// Resources whose promoter runs on this node (`promoter` lines, one per resource).
    pub promoters: Vec<crate::autopromote::PromoterSettings>,
    /// Resources whose persistent reservations stay in memory (`reservations R local`), so
    /// their LUN is the whole device.
    pub local_reservations: Vec<String>,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            portal: PORTAL_DEFAULT.parse().expect("the default portal parses"),
            control_socket: CONTROL_SOCKET_DEFAULT.into(),
            state_directory: STATE_DIRECTORY_DEFAULT.into(),
            iqn_prefix: IQN_PREFIX_DEFAULT.into(),
            chap: None,
            mutual_chap: None,
            node: None,
            api_listen: None,
            api_token: None,
            availability_zone: "nova".into(),
            replication_address: None,
            replication_ports: REPLICATION_PORTS_DEFAULT,
            metrics_listen: None,
            service_ips: Vec::new(),
            promoters: Vec::new(),
            local_reservations: Vec::new(),
        }
    }
}

impl NodeSettings {
    /// The target name of a resource: `PREFIX:NAME`.
    pub fn target_name(&self, resource: &str) -> String {
        format!("{}:{}", self.iqn_prefix, resource)
    }

    /// Applies one setting (from a file line or a flag).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let credentials = |value: &str| -> Result<(String, String), String> {
            match value.split_once(':') {
                Some((user, secret)) if !user.is_empty() && !secret.is_empty() => {
                    Ok((user.to_owned(), secret.to_owned()))
                }
                _ => Err(format!("{key} wants USER:SECRET")),
            }
        };
        match key {
            "portal" => {
                self.portal = value
                    .parse()
                    .map_err(|_| format!("portal wants ADDRESS:PORT, got '{value}'"))?;
            }
            "control-socket" => self.control_socket = value.into(),
            "state-dir" => self.state_directory = value.into(),
            "iqn-prefix" => {
                if !value.starts_with("iqn.") && !value.starts_with("eui.") {
                    return Err(format!("iqn-prefix must start with iqn. or eui., got '{value}'"));
                }
                self.iqn_prefix = value.to_owned();
            }
            "chap" => self.chap = Some(credentials(value)?),
            "mutual-chap" => self.mutual_chap = Some(credentials(value)?),
            "node" => self.node = Some(value.to_owned()),
            "api-listen" => {
                self.api_listen = Some(
                    value
                        .parse()
                        .map_err(|_| format!("api-listen wants ADDRESS:PORT, got '{value}'"))?,
                );
            }
            "availability-zone" => self.availability_zone = value.to_owned(),
            "replication-address" => {
                self.replication_address = Some(
                    value
                        .parse()
                        .map_err(|_| format!("replication-address wants an IP, got '{value}'"))?,
                );
            }
            "replication-ports" => {
                let range = value
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
                    .filter(|(a, b): &(u16, u16)| *a > 0 && a <= b);
                self.replication_ports = range.ok_or_else(|| {
                    format!("replication-ports wants MIN-MAX (1-65535), got '{value}'")
                })?;
            }
            "metrics-listen" => {
                self.metrics_listen =
                    Some(value.parse().map_err(|_| {
                        format!("metrics-listen wants ADDRESS:PORT, got '{value}'")
                    })?);
            }
            "service-ip" => {
                let config = crate::service_ip::ServiceIpConfig::parse(value)?;
                if self.service_ips.iter().any(|c| c.resource == config.resource) {
                    return Err(format!("service-ip: {} has one already", config.resource));
                }
                self.service_ips.push(config);
            }
            "promoter" => {
                let config = crate::autopromote::PromoterSettings::parse(value)?;
                if self.promoters.iter().any(|c| c.resource == config.resource) {
                    return Err(format!("promoter: {} has one already", config.resource));
                }
                self.promoters.push(config);
            }
            "reservations" => {
                let mut words = value.split_whitespace();
                let (Some(resource), Some(mode), None) = (words.next(), words.next(), words.next())
                else {
                    return Err(format!(
                        "reservations wants RESOURCE local|replicated, got '{value}'"
                    ));
                };
                self.local_reservations.retain(|name| name != resource);
                match mode {
                    "local" => self.local_reservations.push(resource.to_owned()),
                    "replicated" => {}
                    _ => {
                        return Err(format!(
                            "reservations {resource}: '{mode}' is neither local nor replicated"
                        ));
                    }
                }
            }
            "api-token" => {
                if value.len() < 16 {
                    return Err("api-token must be at least 16 characters".into());
                }
                self.api_token = Some(value.to_owned());
            }
            _ => {
                return Err(format!(
                    "unknown setting '{key}' (known: portal, control-socket, state-dir, \
                     iqn-prefix, chap, mutual-chap, node, api-listen, api-token, availability-zone, replication-address, \
                     replication-ports, metrics-listen, service-ip, promoter, reservations)"
                ));
            }
        }
        Ok(())
    }

    /// The IP API-created resources replicate on: `replication-address`, else the API's IP.
    pub fn replication_ip(&self) -> Result<std::net::IpAddr, String> {
        if let Some(ip) = self.replication_address {
            return Ok(ip);
        }
        match self.api_listen {
            Some(api) if !api.ip().is_unspecified() => Ok(api.ip()),
            _ => Err("no replication address: set replication-address in the node file (or \
                      --replication-address), or give --api-listen a specific IP"
                .into()),
        }
    }

    /// Applies a node file's text; errors name `name:line`.
    pub fn apply_file(&mut self, name: &str, text: &str) -> Result<(), String> {
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = match line.split_once(char::is_whitespace) {
                Some((key, value)) => (key, value.trim().trim_end_matches(';').trim()),
                None => return Err(format!("{name}:{}: '{line}' has no value", index + 1)),
            };
            self.set(key, value).map_err(|e| format!("{name}:{}: {e}", index + 1))?;
        }
        if self.mutual_chap.is_some() && self.chap.is_none() {
            return Err(format!("{name}: mutual-chap needs chap"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_file_sets_everything_and_defaults_stay() {
        let mut settings = NodeSettings::default();
        assert_eq!(settings.target_name("r0"), "iqn.2026-11.org.tandem:r0");
        settings
            .apply_file(
                "node.conf",
                "# comment\nportal 127.0.0.1:3261\ncontrol-socket /tmp/t.sock  # why\n\
                 state-dir /tmp/state;\niqn-prefix iqn.2030-01.com.example\nchap u:s\nnode a\n",
            )
            .expect("valid");
        assert_eq!(settings.portal, "127.0.0.1:3261".parse().expect("addr"));
        assert_eq!(settings.control_socket, PathBuf::from("/tmp/t.sock"));
        assert_eq!(settings.state_directory, PathBuf::from("/tmp/state"));
        assert_eq!(settings.target_name("r1"), "iqn.2030-01.com.example:r1");
        assert_eq!(settings.chap, Some(("u".into(), "s".into())));
        assert_eq!(settings.node.as_deref(), Some("a"));
        assert_eq!(settings.metrics_listen, None);
        settings
            .apply_file(
                "node.conf",
                "metrics-listen 0.0.0.0:9943\nservice-ip r0 10.9.0.100/24 dev eth0\n\
                 service-ip r1 10.9.0.101/24 dev eth0\n",
            )
            .expect("valid");
        assert_eq!(settings.metrics_listen, Some("0.0.0.0:9943".parse().expect("addr")));
        let ips: Vec<String> = settings.service_ips.iter().map(|c| c.cidr()).collect();
        assert_eq!(ips, ["10.9.0.100/24", "10.9.0.101/24"]);
        assert!(settings.local_reservations.is_empty(), "replicated by default");
        settings
            .apply_file(
                "node.conf",
                "reservations r0 local\nreservations r1 local\nreservations r1 replicated\n",
            )
            .expect("valid");
        assert_eq!(settings.local_reservations, ["r0"], "the last line for a resource wins");
    }

    #[test]
    fn bad_node_files_name_the_line() {
        let cases = [
            ("portal nowhere", "node.conf:1: portal wants ADDRESS:PORT"),
            ("\nbogus 1", "node.conf:2: unknown setting 'bogus'"),
            ("chap user", "node.conf:1: chap wants USER:SECRET"),
            ("portal", "node.conf:1: 'portal' has no value"),
            ("iqn-prefix foo", "node.conf:1: iqn-prefix must start with iqn."),
            ("mutual-chap a:b", "node.conf: mutual-chap needs chap"),
            ("replication-ports 9-3", "node.conf:1: replication-ports wants MIN-MAX"),
            ("replication-ports 0-3", "node.conf:1: replication-ports wants MIN-MAX"),
            ("replication-address x", "node.conf:1: replication-address wants an IP"),
            ("metrics-listen 9943", "node.conf:1: metrics-listen wants ADDRESS:PORT"),
            ("service-ip r0 10.0.0.1/24", "node.conf:1: service-ip wants 'RESOURCE"),
            (
                "service-ip r0 10.0.0.1/24 dev e0\nservice-ip r0 10.0.0.2/24 dev e0",
                "node.conf:2: service-ip: r0 has one already",
            ),
            ("reservations r0", "node.conf:1: reservations wants RESOURCE local|replicated"),
            ("reservations r0 off", "node.conf:1: reservations r0: 'off' is neither local"),
        ];
        for (text, expected) in cases {
            let error = NodeSettings::default().apply_file("node.conf", text).expect_err(text);
            assert!(error.starts_with(expected), "{text}: {error}");
        }
    }
}

//! Service IP: an optional IPv4 address per resource that moves with the primary, for
//! initiators without multipath. On promotion tandemd adds it to a local interface and
//! announces it with gratuitous ARP (so initiators and switches learn the new MAC at once
//! instead of after their neighbour entry ages out, 55 s measured); on demotion or `down` it
//! removes it; at start an address left over from a crash is removed (a restarted tandemd
//! brings resources back as Secondary).
//!
//! ```text
//! # node file (resource files stay pure DRBD)
//! service-ip r0 10.9.0.100/24 dev eth0
//! ```
//!
//! The iSCSI portal must listen on the wildcard address (0.0.0.0:3260, the default), so it
//! answers on the service IP the moment the address exists: the target binds its listeners
//! once at start, and a listener bound to a specific address cannot take an address that
//! appears later. tandemd refuses a specific portal address together with a service IP.
//!
//! Pure parts: [`ServiceIpConfig::parse`], [`decide`] (wanted + present -> action) and
//! [`arp_frame`]. The driver ([`ServiceIps`]) runs one task per resource that reconciles the
//! wanted state (set from the role) with the interface: `ip addr add|del` (iproute2, as
//! Pacemaker's IPaddr2 does: one exec per role change) and an AF_PACKET socket for the ARP
//! frames (written here rather than running `arping`, so no extra package is needed and the
//! first announcement leaves within microseconds of the address).

use crate::constants::{
    GRATUITOUS_ARP_INTERVAL_MS, GRATUITOUS_ARP_ROUNDS_MAX, SERVICE_IP_CHECK_INTERVAL_MS,
    SERVICE_IP_STOP_WAIT_MS,
};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// One `service-ip RESOURCE ADDRESS/PREFIX dev INTERFACE` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceIpConfig {
    pub resource: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub device: String,
}

impl ServiceIpConfig {
    /// Parses `RESOURCE ADDRESS/PREFIX dev INTERFACE`.
    pub fn parse(value: &str) -> Result<ServiceIpConfig, String> {
        let usage =
            || format!("service-ip wants 'RESOURCE IPV4/PREFIX dev INTERFACE', got '{value}'");
        let words: Vec<&str> = value.split_whitespace().collect();
        let [resource, cidr, "dev", device] = words.as_slice() else { return Err(usage()) };
        let (address, prefix) = cidr.split_once('/').ok_or_else(usage)?;
        let address: Ipv4Addr = address.parse().map_err(|_| {
            format!("service-ip: '{address}' is not an IPv4 address (IPv6 is not supported yet)")
        })?;
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| format!("service-ip: prefix '/{prefix}' is not 1-32"))?;
        if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
            return Err(format!("service-ip: {address} cannot be a host address"));
        }
        // Interface names are at most 15 bytes (IFNAMSIZ - 1) and never contain '/'.
        if device.is_empty() || device.len() > 15 || device.contains('/') {
            return Err(format!("service-ip: '{device}' is not an interface name"));
        }
        Ok(ServiceIpConfig {
            resource: (*resource).to_owned(),
            address,
            prefix_len,
            device: (*device).to_owned(),
        })
    }

    /// `ADDRESS/PREFIX`, as `ip addr` takes it.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

/// What the driver does to the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Add the address, then announce it with gratuitous ARP.
    Add,
    Remove,
}

/// Wanted is "this node is Primary for the resource"; present is "the interface holds the
/// address". Only a difference asks for an action.
pub fn decide(wanted: bool, present: bool) -> Option<Action> {
    match (wanted, present) {
        (true, false) => Some(Action::Add),
        (false, true) => Some(Action::Remove),
        _ => None,
    }
}

const ETHERNET_BROADCAST: [u8; 6] = [0xff; 6];
const ETHERTYPE_ARP: u16 = 0x0806;
/// An Ethernet header (14 bytes) and an ARP packet for IPv4 over Ethernet (28 bytes).
pub const ARP_FRAME_BYTES: usize = 42;

/// A gratuitous ARP frame announcing that `ip` is at `mac`: sender and target IP are both
/// `ip`, sent to the broadcast address. `reply == false` gives the request form (`arping -U`),
/// `true` the reply form (`arping -A`); Linux neighbour tables take either, some switches and
/// old stacks only one, so the driver sends both.
pub fn arp_frame(mac: [u8; 6], ip: Ipv4Addr, reply: bool) -> [u8; ARP_FRAME_BYTES] {
    let mut frame = [0u8; ARP_FRAME_BYTES];
    frame[0..6].copy_from_slice(&ETHERNET_BROADCAST);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&(if reply { 2u16 } else { 1u16 }).to_be_bytes());
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&ip.octets());
    // The target hardware address: zero in a request (it is what a request asks for), our own
    // in the reply form, as arping does.
    if reply {
        frame[32..38].copy_from_slice(&mac);
    }
    frame[38..42].copy_from_slice(&ip.octets());
    frame
}

/// Whether `device` holds `address` now.
fn address_present(config: &ServiceIpConfig) -> std::io::Result<bool> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addresses.into_iter().any(|entry| {
        // A labelled address shows as `dev:label`; the address is on `dev` either way.
        let on_device = entry.interface_name == config.device
            || entry.interface_name.starts_with(&format!("{}:", config.device));
        on_device
            && entry
                .address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .is_some_and(|a| a.ip() == config.address)
    }))
}

/// The interface's MAC address.
fn mac_of(device: &str) -> std::io::Result<[u8; 6]> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    addresses
        .into_iter()
        .filter(|entry| entry.interface_name == device)
        .find_map(|entry| entry.address.as_ref().and_then(|a| a.as_link_addr()?.addr()))
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{device}: no MAC address"))
        })
}

/// Sends one round of gratuitous ARP (request and reply form) for the address on its device.
pub fn announce(config: &ServiceIpConfig) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let index = nix::net::if_::if_nametoindex(config.device.as_str())?;
    let mac = mac_of(&config.device)?;
    // Protocol 0: this socket only sends (it receives nothing, so costs nothing).
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Packet,
        nix::sys::socket::SockType::Raw,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value of it.
    let mut destination: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    destination.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(u16::MAX);
    destination.sll_protocol = ETHERTYPE_ARP.to_be();
    destination.sll_ifindex = i32::try_from(index)
        .map_err(|_| std::io::Error::other(format!("interface index {index} out of range")))?;
    destination.sll_halen = 6;
    destination.sll_addr[..6].copy_from_slice(&ETHERNET_BROADCAST);
    for reply in [false, true] {
        let frame = arp_frame(mac, config.address, reply);
        // SAFETY: the socket is open for the whole call; `frame` and `destination` live on
        // this stack frame across the call and the lengths passed are exactly theirs.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&destination).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(u32::MAX),
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `ip addr add|del ADDRESS/PREFIX dev DEVICE`.
async fn ip_addr(verb: &str, config: &ServiceIpConfig) -> Result<(), String> {
    let output = tokio::process::Command::new("ip")
        .args(["addr", verb, &config.cidr(), "dev", &config.device])
        .output()
        .await
        .map_err(|e| format!("running ip (iproute2): {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "ip addr {verb} {} dev {}: {}",
        config.cidr(),
        config.device,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

struct Entry {
    config: ServiceIpConfig,
    wanted: watch::Sender<bool>,
    /// Whether the address is on the interface, as the driver last saw or made it.
    assigned: Arc<AtomicBool>,
}

/// The service IPs of this node, one reconciling task per resource (started by [`start`]).
///
/// [`start`]: ServiceIps::start
pub struct ServiceIps {
    entries: BTreeMap<String, Entry>,
    /// Set once by [`ServiceIps::release_all`]: from then on no role change adds an address
    /// and the drivers end, so none can re-add one after the stop removed it.
    stopping: Arc<AtomicBool>,
    drivers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl ServiceIps {
    pub fn new(configs: &[ServiceIpConfig]) -> ServiceIps {
        let entries = configs
            .iter()
            .map(|config| {
                let entry = Entry {
                    config: config.clone(),
                    // Not wanted until the resource is seen Primary: a leftover address is
                    // removed at start.
                    wanted: watch::Sender::new(false),
                    assigned: Arc::new(AtomicBool::new(false)),
                };
                (config.resource.clone(), entry)
            })
            .collect();
        ServiceIps {
            entries,
            stopping: Arc::new(AtomicBool::new(false)),
            drivers: Mutex::default(),
        }
    }

    /// The configured service IPs.
    pub fn configs(&self) -> impl Iterator<Item = &ServiceIpConfig> {
        self.entries.values().map(|e| &e.config)
    }

    /// Spawns the reconciling tasks (call once, inside the runtime).
    pub fn start(&self) {
        let mut drivers = self.drivers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for entry in self.entries.values() {
            drivers.push(tokio::spawn(reconcile(
                entry.config.clone(),
                entry.wanted.subscribe(),
                entry.assigned.clone(),
                self.stopping.clone(),
            )));
        }
    }

    /// Tells the driver whether this node is Primary for `resource` (cheap; only a change
    /// wakes the task).
    pub fn set_primary(&self, resource: &str, primary: bool) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Some(entry) = self.entries.get(resource) {
            entry.wanted.send_if_modified(|wanted| std::mem::replace(wanted, primary) != primary);
        }
    }

    /// Whether any service IP is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes every configured address this node holds (tandemd is stopping: nothing will
    /// answer on it, and a peer promoted later must not find it taken).
    ///
    /// The drivers end first: one woken by a promotion just before the stop may be running
    /// `ip addr add`, and would otherwise put the address back after it was removed here.
    pub async fn release_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for entry in self.entries.values() {
            entry.wanted.send_replace(false);
        }
        let drivers = std::mem::take(
            &mut *self.drivers.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for driver in drivers {
            let wait = Duration::from_millis(SERVICE_IP_STOP_WAIT_MS);
            if tokio::time::timeout(wait, driver).await.is_err() {
                tracing::warn!(
                    "service IP: a driver did not end within {SERVICE_IP_STOP_WAIT_MS} ms"
                );
            }
        }
        for entry in self.entries.values() {
            let config = &entry.config;
            if address_present(config).unwrap_or(true) {
                match ip_addr("del", config).await {
                    Ok(()) => tracing::info!(resource = %config.resource,
                        address = %config.cidr(), "service IP removed (stopping)"),
                    Err(error) => {
                        tracing::error!(resource = %config.resource, "service IP: {error}")
                    }
                }
            }
            entry.assigned.store(false, Ordering::Relaxed);
        }
    }

    /// `(ADDRESS/PREFIX, device, assigned)` of a resource's service IP, for metrics.
    pub fn sample(&self, resource: &str) -> Option<(String, String, bool)> {
        self.entries
            .get(resource)
            .map(|e| (e.config.cidr(), e.config.device.clone(), e.assigned.load(Ordering::Relaxed)))
    }
}

/// One resource's driver: makes the interface match the wanted state, re-checking every
/// [`SERVICE_IP_CHECK_INTERVAL_MS`] (an administrator may have removed the address) and
/// retrying failed actions at that pace.
async fn reconcile(
    config: ServiceIpConfig,
    mut wanted: watch::Receiver<bool>,
    assigned: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
) {
    let resource = config.resource.clone();
    loop {
        if stopping.load(Ordering::SeqCst) {
            return; // release_all removes the address once every driver has ended
        }
        let want = *wanted.borrow_and_update();
        let present = match address_present(&config) {
            Ok(present) => present,
            Err(error) => {
                tracing::error!(%resource, %error, "service IP: cannot list interface addresses");
                false
            }
        };
        match decide(want, present) {
            Some(Action::Add) => match ip_addr("add", &config).await {
                Ok(()) => {
                    assigned.store(true, Ordering::Relaxed);
                    tracing::info!(%resource, address = %config.cidr(), device = %config.device,
                        "service IP added");
                    tokio::spawn(announce_rounds(config.clone(), wanted.clone()));
                }
                Err(error) => tracing::error!(%resource, "service IP: {error}"),
            },
            Some(Action::Remove) => match ip_addr("del", &config).await {
                Ok(()) => {
                    assigned.store(false, Ordering::Relaxed);
                    tracing::info!(%resource, address = %config.cidr(), device = %config.device,
                        "service IP removed");
                }
                Err(error) => tracing::error!(%resource, "service IP: {error}"),
            },
            None => assigned.store(present, Ordering::Relaxed),
        }
        tokio::select! {
            changed = wanted.changed() => {
                if changed.is_err() {
                    return; // the node is shutting down
                }
            }
            () = tokio::time::sleep(Duration::from_millis(SERVICE_IP_CHECK_INTERVAL_MS)) => {}
        }
    }
}

/// Gratuitous ARP right away, then a few more rounds (a lost frame or a switch still learning
/// must not leave initiators on the old MAC), stopping early when the address is no longer
/// wanted.
async fn announce_rounds(config: ServiceIpConfig, wanted: watch::Receiver<bool>) {
    for round in 0..GRATUITOUS_ARP_ROUNDS_MAX {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(GRATUITOUS_ARP_INTERVAL_MS)).await;
        }
        if !*wanted.borrow() {
            return;
        }
        if let Err(error) = announce(&config) {
            tracing::warn!(resource = %config.resource, %error, "service IP: gratuitous ARP");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_or_say_what_is_wrong() {
        let ok = ServiceIpConfig::parse("r0 10.9.0.100/24 dev eth0").expect("valid");
        assert_eq!(
            ok,
            ServiceIpConfig {
                resource: "r0".into(),
                address: Ipv4Addr::new(10, 9, 0, 100),
                prefix_len: 24,
                device: "eth0".into()
            }
        );
        assert_eq!(ok.cidr(), "10.9.0.100/24");
        for (bad, needle) in [
            ("r0 10.9.0.100/24 eth0", "wants 'RESOURCE IPV4/PREFIX dev INTERFACE'"),
            ("r0 10.9.0.100 dev eth0", "wants"),
            ("r0 fd00::1/64 dev eth0", "not an IPv4 address"),
            ("r0 10.9.0.100/33 dev eth0", "not 1-32"),
            ("r0 10.9.0.100/0 dev eth0", "not 1-32"),
            ("r0 0.0.0.0/24 dev eth0", "cannot be a host address"),
            ("r0 10.0.0.1/8 dev a-very-long-interface", "not an interface name"),
        ] {
            let error = ServiceIpConfig::parse(bad).expect_err(bad);
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }

    #[test]
    fn only_a_difference_between_role_and_interface_acts() {
        assert_eq!(decide(true, false), Some(Action::Add));
        assert_eq!(decide(false, true), Some(Action::Remove));
        assert_eq!(decide(true, true), None);
        assert_eq!(decide(false, false), None);
    }

    #[test]
    fn arp_frames_announce_the_address() {
        let mac = [0x02, 0, 0, 0, 0, 0x2a];
        let ip = Ipv4Addr::new(10, 9, 0, 100);
        let request = arp_frame(mac, ip, false);
        let expected_head = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x2a, 0x08, 0x06, 0, 1, 0x08, 0,
            6, 4, 0, 1,
        ];
        assert_eq!(request[..22], expected_head);
        assert_eq!(request[22..28], mac, "sender MAC");
        assert_eq!(request[28..32], ip.octets(), "sender IP");
        assert_eq!(request[32..38], [0; 6], "a request asks for the target MAC");
        assert_eq!(request[38..42], ip.octets(), "target IP = sender IP: gratuitous");
        let reply = arp_frame(mac, ip, true);
        assert_eq!(reply[20..22], [0, 2]);
        assert_eq!(reply[32..38], mac);
        assert_eq!(reply[38..42], ip.octets());
    }

    #[tokio::test]
    async fn wanted_state_changes_only_on_a_change() {
        let ips =
            ServiceIps::new(&[ServiceIpConfig::parse("r0 10.9.0.100/24 dev lo").expect("ok")]);
        let mut rx = ips.entries["r0"].wanted.subscribe();
        ips.set_primary("r0", false);
        assert!(!rx.has_changed().expect("open"), "false -> false wakes nobody");
        ips.set_primary("r0", true);
        assert!(rx.has_changed().expect("open"));
        assert!(*rx.borrow_and_update());
        ips.set_primary("other", true); // not configured: ignored
        assert_eq!(ips.sample("r0"), Some(("10.9.0.100/24".into(), "lo".into(), false)));
        assert_eq!(ips.sample("other"), None);
    }

    #[tokio::test]
    async fn a_stopping_node_adds_no_address() {
        let ips =
            ServiceIps::new(&[ServiceIpConfig::parse("r0 10.9.0.101/24 dev lo").expect("ok")]);
        ips.release_all().await;
        let mut rx = ips.entries["r0"].wanted.subscribe();
        ips.set_primary("r0", true); // a promotion racing the stop
        assert!(!rx.has_changed().expect("open"), "the stop wins: nothing re-adds the address");
        assert!(!*rx.borrow_and_update());
    }
}

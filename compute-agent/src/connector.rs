//! This host's Cinder connector (what nova-compute hands to Cinder through os-brick) and the
//! initiator name QEMU logs in with, as pure functions: the caller supplies the host name and
//! the random bytes.

use serde_json::{Value, json};

use crate::constants::NAME_BYTES_MAX;

/// The IQN prefix of generated initiator names (RFC 3720 `iqn.YYYY-MM.reversed-domain`).
pub const INITIATOR_IQN_PREFIX: &str = "iqn.2026-11.org.tandem:compute";

/// A host name reduced to the characters an IQN allows (lower-case letters, digits, `-`, `.`),
/// never empty, bounded so the whole IQN stays within [`NAME_BYTES_MAX`].
pub fn iqn_safe_host(host: &str) -> String {
    let mut safe: String = host
        .trim()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .take(63)
        .collect();
    safe = safe.trim_matches(['-', '.']).to_owned();
    if safe.is_empty() { "host".to_owned() } else { safe }
}

/// A fresh initiator name for this host: the prefix, the host name and 48 random bits, the way
/// open-iscsi's `iscsi-iname` makes one per host, so two hosts never share an initiator name
/// (a target's ACLs and session reinstatement tell initiators apart by it).
pub fn generate_initiator_iqn(host: &str, random: [u8; 6]) -> String {
    let suffix: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    let iqn = format!("{INITIATOR_IQN_PREFIX}:{}:{suffix}", iqn_safe_host(host));
    assert!(iqn.len() <= NAME_BYTES_MAX, "the host part is bounded");
    iqn
}

/// Whether `iqn` is an initiator name QEMU and targets accept.
pub fn is_valid_initiator_iqn(iqn: &str) -> bool {
    !iqn.is_empty()
        && iqn.len() <= NAME_BYTES_MAX
        && (iqn.starts_with("iqn.") || iqn.starts_with("eui.") || iqn.starts_with("naa."))
        && iqn.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
}

/// This host as the connector describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub initiator_iqn: String,
    /// The compute host's name (Nova's `CONF.host`); tandem-api records it as `attached_host`.
    pub host: String,
    /// The address storage nodes see this host at (Nova's `my_ip`).
    pub ip: String,
}

/// The connector in the shape nova-compute sends (os-brick's `get_connector_properties`):
/// QEMU's own initiator and `multipath: true`, because the agent reads every path of the
/// connection_info (`target_portals`): the resume watcher probes them all after an I/O error.
/// `do_local_attach: false` says the host does not attach the volume itself (QEMU does).
pub fn connector(identity: &HostIdentity) -> Value {
    json!({
        "initiator": identity.initiator_iqn,
        "host": identity.host,
        "ip": identity.ip,
        "platform": std::env::consts::ARCH,
        "os_type": std::env::consts::OS,
        "multipath": true,
        "enforce_multipath": false,
        "do_local_attach": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_become_iqn_safe() {
        let cases = [
            ("compute-1", "compute-1"),
            ("Compute_1.Example.ORG", "compute-1.example.org"),
            ("  spaced name \n", "spaced-name"),
            ("", "host"),
            ("---", "host"),
            ("ünïcode", "n-code"),
        ];
        for (host, expected) in cases {
            assert_eq!(iqn_safe_host(host), expected, "{host:?}");
        }
        assert_eq!(iqn_safe_host(&"x".repeat(500)).len(), 63);
    }

    #[test]
    fn generated_initiators_are_valid_and_differ_per_host_and_draw() {
        let a = generate_initiator_iqn("compute-1", [0, 1, 2, 3, 4, 0xff]);
        assert_eq!(a, "iqn.2026-11.org.tandem:compute:compute-1:0001020304ff");
        let b = generate_initiator_iqn("compute-2", [0, 1, 2, 3, 4, 0xff]);
        let c = generate_initiator_iqn("compute-1", [9, 1, 2, 3, 4, 0xff]);
        assert!(a != b && a != c);
        for iqn in [&a, &b, &c, &generate_initiator_iqn(&"Z/".repeat(300), [0; 6])] {
            assert!(is_valid_initiator_iqn(iqn), "{iqn}");
        }
        for bad in ["", "compute", "iqn.x y", "iqn.a/b", &format!("iqn.{}", "a".repeat(300))] {
            assert!(!is_valid_initiator_iqn(bad), "{bad:?}");
        }
    }

    #[test]
    fn connector_has_what_cinder_reads() {
        let identity = HostIdentity {
            initiator_iqn: "iqn.2026-11.org.tandem:compute:h:00".into(),
            host: "h".into(),
            ip: "10.0.0.7".into(),
        };
        let connector = connector(&identity);
        assert_eq!(connector["initiator"], "iqn.2026-11.org.tandem:compute:h:00");
        assert_eq!(connector["host"], "h");
        assert_eq!(connector["ip"], "10.0.0.7");
        assert_eq!(connector["multipath"], true);
        assert_eq!(connector["os_type"], std::env::consts::OS);
        assert_eq!(connector["platform"], std::env::consts::ARCH);
    }
}

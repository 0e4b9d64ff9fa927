//! The libvirt domain XML that Nova's libvirt driver writes for a network iSCSI volume (QEMU's
//! own initiator, `<disk type='network'>`), so a Tandem volume can be handed to libvirt
//! unchanged; plus the `<secret>` it references and a minimal domain to validate both with
//! libvirt's own schema (`virt-xml-validate`).

use std::fmt::Write as _;

use crate::connection_info::IscsiConnection;

/// How the `<auth>` element names its libvirt secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `<secret type='iscsi' usage='...'/>`: by its usage target.
    Usage(String),
    /// `<secret type='iscsi' uuid='...'/>`: by UUID (what Nova itself does).
    Uuid(String),
}

/// Options of one disk element.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// The guest device name, e.g. `vdb`.
    pub target_dev: String,
    /// The secret the CHAP password lives in; `None` uses `tandem-volume-<volume_id>` by usage.
    pub secret: Option<SecretRef>,
}

/// Escapes text for an XML attribute or element.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            other => out.push(other),
        }
    }
    out
}

/// The default secret usage name of a volume.
pub fn default_secret_usage(connection: &IscsiConnection) -> String {
    format!("tandem-volume-{}", connection.volume_id.as_deref().unwrap_or("unknown"))
}

/// The `<disk>` element for `connection`.
pub fn disk_xml(connection: &IscsiConnection, options: &DiskOptions) -> String {
    let path = &connection.primary;
    let mut xml = String::new();
    xml.push_str("<disk type='network' device='disk'>\n");
    let discard = if connection.discard { " discard='unmap'" } else { "" };
    let _ = writeln!(xml, "  <driver name='qemu' type='raw' cache='none' io='native'{discard}/>");
    let _ = writeln!(
        xml,
        "  <source protocol='iscsi' name='{}'>",
        escape(&format!("{}/{}", path.iqn, path.lun))
    );
    let _ = writeln!(
        xml,
        "    <host name='{}' port='{}'/>",
        escape(&path.portal.host),
        path.portal.port
    );
    xml.push_str("  </source>\n");
    if let Some(chap) = &connection.chap {
        let secret = options
            .secret
            .clone()
            .unwrap_or_else(|| SecretRef::Usage(default_secret_usage(connection)));
        let (attribute, value) = match &secret {
            SecretRef::Usage(usage) => ("usage", usage),
            SecretRef::Uuid(uuid) => ("uuid", uuid),
        };
        let _ = writeln!(xml, "  <auth username='{}'>", escape(&chap.username));
        let _ = writeln!(xml, "    <secret type='iscsi' {attribute}='{}'/>", escape(value));
        xml.push_str("  </auth>\n");
    }
    let _ = writeln!(xml, "  <target dev='{}' bus='virtio'/>", escape(&options.target_dev));
    if connection.read_only {
        xml.push_str("  <readonly/>\n");
    }
    if let Some(volume_id) = &connection.volume_id {
        let _ = writeln!(xml, "  <serial>{}</serial>", escape(volume_id));
    }
    xml.push_str("</disk>\n");
    xml
}

/// The libvirt `<secret>` definition that holds a volume's CHAP password (its value is set
/// separately with `virsh secret-set-value`, as Nova does).
pub fn secret_xml(usage: &str) -> String {
    format!(
        "<secret ephemeral='no' private='yes'>\n  <description>Tandem volume CHAP secret</description>\n  \
         <usage type='iscsi'>\n    <target>{}</target>\n  </usage>\n</secret>\n",
        escape(usage)
    )
}

/// A minimal `type='qemu'` domain holding `disk`, so `virt-xml-validate` can check the disk
/// against libvirt's domain schema (libvirt has no schema for a lone `<disk>`).
pub fn validation_domain_xml(disk: &str) -> String {
    let indented: String = disk.lines().map(|line| format!("    {line}\n")).collect();
    format!(
        "<domain type='qemu'>\n  <name>tandem-disk-check</name>\n  <memory unit='MiB'>256</memory>\n  \
         <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n  <devices>\n{indented}    \
         <controller type='usb' model='none'/>\n  </devices>\n</domain>\n"
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn connection() -> IscsiConnection {
        IscsiConnection::parse(&json!({"driver_volume_type": "iscsi", "data": {
            "target_iqn": "iqn.2026-11.org.tandem:vol-1", "target_portal": "10.1.2.3:3260",
            "target_lun": 2, "auth_method": "CHAP", "auth_username": "o'neil",
            "auth_password": "pw", "volume_id": "vol-1"}}))
        .expect("valid")
    }

    #[test]
    fn disk_has_nova_shape() {
        let xml = disk_xml(&connection(), &DiskOptions { target_dev: "vdb".into(), secret: None });
        for needle in [
            "<disk type='network' device='disk'>",
            "<driver name='qemu' type='raw' cache='none' io='native'/>",
            "<source protocol='iscsi' name='iqn.2026-11.org.tandem:vol-1/2'>",
            "<host name='10.1.2.3' port='3260'/>",
            "<auth username='o&apos;neil'>",
            "<secret type='iscsi' usage='tandem-volume-vol-1'/>",
            "<target dev='vdb' bus='virtio'/>",
            "<serial>vol-1</serial>",
        ] {
            assert!(xml.contains(needle), "missing {needle} in\n{xml}");
        }
        assert!(!xml.contains("pw"), "the password never appears in domain XML");
        let by_uuid = disk_xml(
            &connection(),
            &DiskOptions {
                target_dev: "vdc".into(),
                secret: Some(SecretRef::Uuid("3e5a1c2b-0000-4000-8000-000000000001".into())),
            },
        );
        assert!(by_uuid.contains("uuid='3e5a1c2b-0000-4000-8000-000000000001'"));
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
        assert!(secret_xml("x&y").contains("<target>x&amp;y</target>"));
    }
}

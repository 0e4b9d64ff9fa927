//! `tandemadm dump`: a resource written back in drbd.conf syntax, as Tandem understood it
//! (resolved addresses, node ids, volumes and protocol; settings Tandem ignores are left out).
//! The output is accepted by `drbdadm -c FILE dump`.

use crate::config::{Disk, MetaDisk, Resource};
use std::fmt::Write;

pub fn render(resource: &Resource) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# resource {} on {}", resource.name, resource.location);
    let _ = writeln!(out, "resource {} {{", resource.name);
    let _ = writeln!(out, "    net {{\n        protocol {};\n    }}", resource.net.protocol());
    for node in &resource.nodes {
        let _ = writeln!(out, "    on {} {{", node.name);
        let _ = writeln!(out, "        node-id {};", node.node_id);
        if let Some(address) = &node.address {
            let _ =
                writeln!(out, "        address {} {};", address.family.as_str(), address.address);
        }
        for volume in &node.volumes {
            let _ = writeln!(out, "        volume {} {{", volume.number);
            let _ = writeln!(out, "            device minor {};", volume.device.minor);
            match &volume.disk {
                Disk::Path(path) => {
                    let _ = writeln!(out, "            disk {};", path.display());
                }
                Disk::None => out.push_str("            disk none;\n"),
            }
            match &volume.meta_disk {
                Some(MetaDisk::External { path, index: Some(index) }) => {
                    let _ = writeln!(out, "            meta-disk {} [{index}];", path.display());
                }
                Some(MetaDisk::External { path, index: None }) => {
                    let _ = writeln!(out, "            meta-disk {};", path.display());
                }
                Some(MetaDisk::Internal) | None => {
                    out.push_str("            meta-disk internal;\n")
                }
            }
            out.push_str("        }\n");
        }
        out.push_str("    }\n");
    }
    for connection in &resource.connections {
        out.push_str("    connection {\n");
        for host in &connection.hosts {
            match &host.address {
                Some(address) => {
                    let _ = writeln!(
                        out,
                        "        host {} address {} {};",
                        host.name,
                        address.family.as_str(),
                        address.address
                    );
                }
                None => {
                    let _ = writeln!(out, "        host {};", host.name);
                }
            }
        }
        let _ = writeln!(
            out,
            "        net {{\n            protocol {};\n        }}",
            connection.net.protocol()
        );
        out.push_str("    }\n");
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_reads_back_into_the_same_model() {
        let text = "resource r0 {\n  net { protocol B; }\n  volume 0 { device minor 3; disk /tmp/r0.img; \
                    meta-disk /tmp/r0.meta; }\n  on a { node-id 0; address 127.0.0.1:7789; }\n  \
                    on b { node-id 1; address 127.0.0.2:7789; }\n}\n";
        let config =
            crate::config::parse_str("r0.res", text, std::path::Path::new("/tmp")).expect("valid");
        let rendered = render(&config.resources[0]);
        let again = crate::config::parse_str("dump", &rendered, std::path::Path::new("/tmp"))
            .unwrap_or_else(|e| panic!("{e}\n{rendered}"));
        let (first, second) = (&config.resources[0], &again.resources[0]);
        assert_eq!(first.nodes.len(), second.nodes.len());
        for (x, y) in first.nodes.iter().zip(&second.nodes) {
            assert_eq!(
                (&x.name, x.node_id, &x.address, &x.volumes),
                (&y.name, y.node_id, &y.address, &y.volumes)
            );
        }
        assert_eq!(second.net.protocol(), crate::config::Protocol::B, "{rendered}");
    }
}

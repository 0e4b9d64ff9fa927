//! The harness's network-namespace helpers: two throw-away hosts linked by veth reach each other
//! and are cut apart by taking a link down, which is what partition tests rely on.

use std::process::Command;
use std::time::Duration;

use tests::{NetNs, require_slow, require_tool, run_with_timeout};

fn ping(from: &NetNs, address: &str) -> bool {
    let mut command = from.exec("ping");
    command.args(["-c", "1", "-W", "1", address]);
    run_with_timeout(&mut command, Duration::from_secs(5)).status.success()
}

#[test]
fn linked_namespaces_reach_each_other_until_partitioned() {
    require_slow!();
    require_tool("ip", "iproute2");
    require_tool("ping", "iputils-ping");
    let a = NetNs::create("tnd-h");
    let b = NetNs::create("tnd-h");
    let (a_if, _b_if) = NetNs::link(&a, "10.213.0.1/24", &b, "10.213.0.2/24");
    assert!(ping(&a, "10.213.0.2"), "a reaches b over the veth link");
    a.set_link(&a_if, false);
    assert!(!ping(&a, "10.213.0.2"), "a cut link partitions the hosts");
    a.set_link(&a_if, true);
    assert!(
        tests::wait_until(Duration::from_secs(5), || ping(&a, "10.213.0.2")),
        "restoring the link heals the partition"
    );
    let name = a.name().to_owned();
    drop(a);
    let listed = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&name),
        "a dropped namespace is deleted"
    );
}

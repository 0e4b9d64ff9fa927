//! drbd-utils' `__DRBD_NODE__` override of the node name. Alone in its test binary because it
//! changes the process environment, which other threads (spawning drbdadm) would read.

use storage_node::config;

#[test]
fn node_name_comes_from_drbd_node_env_or_hostname() {
    // SAFETY: this binary runs this single test, so no other thread reads the environment.
    unsafe { std::env::set_var(config::NODE_NAME_ENV, "beta") };
    assert_eq!(config::local_node_name().expect("name"), "beta");
    // An empty override is no override (drbd-utils ignores it too).
    // SAFETY: as above.
    unsafe { std::env::set_var(config::NODE_NAME_ENV, "") };
    let hostname = config::local_node_name().expect("hostname");
    // SAFETY: as above.
    unsafe { std::env::remove_var(config::NODE_NAME_ENV) };
    assert_eq!(config::local_node_name().expect("hostname"), hostname);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname file");
    assert_eq!(hostname, kernel.trim());
}

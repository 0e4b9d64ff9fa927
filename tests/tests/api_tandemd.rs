//! tandem-api on real tandemd nodes (no fixture): `openstack volume create` lands as a
//! replicated resource on two tandemd processes (tandem-api's `PUT` on the primary's node, then
//! the secondary's), the primary exports it, and QEMU's iSCSI initiator writes and reads through
//! the connection_info tandem-api hands out; `openstack volume delete` removes both replicas.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::tandemd_node::TandemdNode;
use tests::{Daemon, binary, free_port, require_tool, run_with_timeout, wait_for};

const NODE_TOKEN: &str = "node-token-0123456789";
/// The size of every volume this test creates (`--size 1`).
const VOLUME_BYTES: u64 = 1 << 30;

/// A request carrying `token` both ways tandem-api and tandemd take one.
fn http(addr: SocketAddr, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let bearer = format!("Bearer {token}");
    let headers =
        [("X-Auth-Token", token), ("Authorization", &bearer), ("Content-Type", "application/json")];
    tests::http::json(addr, method, path, &headers, Some(body))
}

/// The openstack CLI from the shared venv.
fn openstack() -> PathBuf {
    tests::openstack::venv().join("bin/openstack")
}

fn run_openstack(program: &Path, endpoint: &str, args: &[&str]) -> String {
    let mut command = Command::new(program);
    command
        .args(["--os-auth-type", "none", "--os-endpoint", endpoint])
        .args(args)
        .env("HOME", program.parent().and_then(Path::parent).expect("venv"));
    let output = run_with_timeout(&mut command, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("$ openstack {}\n{stdout}{}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "openstack {args:?} failed");
    stdout
}

/// tandem-api on SQLite in `dir` over `nodes`, once it reports every node's cinder-volume up.
fn start_api(dir: &Path, nodes: &[TandemdNode]) -> (Daemon, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut command = Command::new(binary("tandem-api"));
    command
        .args(["--listen", &addr.to_string(), "--database"])
        .arg(dir.join("api.sqlite"))
        .args(["--node-token", NODE_TOKEN]);
    for node in nodes {
        command.args(["--node", &format!("{}=http://{}", node.name, node.api)]);
    }
    command.stdin(Stdio::null());
    let mut api = Daemon::spawn("tandem-api", command);
    api.wait_for_port(addr, Duration::from_secs(60));
    wait_for("every tandemd node up in tandem-api", Duration::from_secs(30), || {
        let (_, body) = http(addr, "GET", "/v3/demo/os-services", "admin:demo", "");
        body["services"].as_array().is_some_and(|s| {
            let up = s.iter().filter(|s| s["binary"] == "cinder-volume" && s["state"] == "up");
            up.count() == nodes.len()
        })
    });
    (api, addr)
}

#[test]
fn openstack_volume_create_lands_on_two_real_tandemd() {
    tests::require_slow!();
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let openstack = openstack();
    let dir = tempfile::tempdir().expect("temp dir");
    let nodes = [
        TandemdNode::start(dir.path(), "node-a", "127.0.61.1", NODE_TOKEN),
        TandemdNode::start(dir.path(), "node-b", "127.0.61.2", NODE_TOKEN),
    ];
    let (_api, addr) = start_api(dir.path(), &nodes);

    let endpoint = format!("http://{addr}/v3/demo");
    let out = run_openstack(
        &openstack,
        &endpoint,
        &["volume", "create", "--size", "1", "-f", "value", "-c", "id", "v1"],
    );
    let id = out.trim().to_owned();
    wait_for("volume available", Duration::from_secs(90), || {
        let (_, body) = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), "admin:demo", "");
        assert_ne!(body["volume"]["status"], "error", "{body}");
        body["volume"]["status"] == "available"
    });

    // Both tandemd nodes hold the resource, connected, one Primary.
    let (_, volume) = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), "admin:demo", "");
    println!("volume: {volume:#}");
    let mut roles = Vec::new();
    for node in &nodes {
        let (status, list) = http(node.api, "GET", "/v1/resources", NODE_TOKEN, "");
        assert_eq!(status, 200, "{list}");
        let resources = list.as_array().cloned().unwrap_or_default();
        assert_eq!(resources.len(), 1, "{} hosts one resource: {list}", node.name);
        let resource = &resources[0];
        assert_eq!(resource["size_bytes"], 1u64 << 30, "{resource}");
        assert_eq!(resource["peers"][0]["connection"], "Connected", "{resource}");
        roles.push(resource["role"].as_str().unwrap_or_default().to_owned());
        let name = resource["name"].as_str().unwrap_or_default();
        assert!(node.state.join(format!("resources/{name}.res")).exists());
    }
    roles.sort();
    assert_eq!(roles, ["primary", "secondary"]);

    // connection_info from tandem-api; QEMU writes and reads through it.
    qemu_io_on(
        &qemu_io,
        addr,
        &id,
        &[
            "write -P 0x3c 0 4M",
            "read -P 0x3c 0 4M",
            "write -P 0x7e 1020M 4M",
            "read -P 0x7e 1020M 4M",
        ],
    );

    // Replicated: the secondary is in sync with what was written.
    for node in &nodes {
        let (_, list) = http(node.api, "GET", "/v1/resources", NODE_TOKEN, "");
        assert_eq!(list[0]["peers"][0]["out_of_sync_bytes"], 0, "{list}");
        assert_eq!(list[0]["disk_state"], "UpToDate", "{list}");
    }

    // A snapshot is one point in time on both replicas, taken while an initiator keeps
    // writing (512 MiB on, alternating patterns): the replicas' copies are byte-identical and
    // hold what was written before it. A volume made from it holds that data on both replicas
    // (no initial sync needed), and so does a clone of a live volume.
    let writing = std::sync::atomic::AtomicBool::new(true);
    let mut rounds_during_snapshot = 0u32;
    let snapshot_id = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut rounds = 0u32;
            while writing.load(std::sync::atomic::Ordering::Acquire) {
                let pattern = format!("write -P {} 512M 16M", 0x40 + rounds % 16);
                qemu_io_on(&qemu_io, addr, &id, &[pattern.as_str()]);
                rounds += 1;
            }
            rounds
        });
        let out = run_openstack(
            &openstack,
            &endpoint,
            &["volume", "snapshot", "create", "--volume", &id, "-f", "value", "-c", "id", "s1"],
        );
        let snapshot_id = out.trim().to_owned();
        wait_for("snapshot available", Duration::from_secs(90), || {
            let path = format!("/v3/demo/snapshots/{snapshot_id}");
            let (_, body) = http(addr, "GET", &path, "admin:demo", "");
            assert_ne!(body["snapshot"]["status"], "error", "{body}");
            body["snapshot"]["status"] == "available"
        });
        writing.store(false, std::sync::atomic::Ordering::Release);
        rounds_during_snapshot = writer.join().expect("writer");
        snapshot_id
    });
    println!(
        "snapshot taken while the initiator wrote ({rounds_during_snapshot} rounds of 16 MiB)"
    );
    assert!(rounds_during_snapshot >= 2, "the writes went on across the snapshot");
    let snapshot_files: Vec<PathBuf> = nodes
        .iter()
        .filter_map(|node| file_named(&node.state, &format!("@snapshot-{snapshot_id}")))
        .collect();
    assert_eq!(snapshot_files.len(), 2, "a copy on each replica: {snapshot_files:?}");
    assert_same_content(&snapshot_files[0], &snapshot_files[1]);
    qemu_io_on(&qemu_io, addr, &id, &["write -P 0x99 0 4M"]);
    let from_snapshot = create_volume(
        &openstack,
        &endpoint,
        addr,
        &["--snapshot", &snapshot_id, "--size", "1", "v2"],
    );
    qemu_io_on(&qemu_io, addr, &from_snapshot, &["read -P 0x3c 0 4M", "read -P 0x7e 1020M 4M"]);
    let clone = create_volume(&openstack, &endpoint, addr, &["--source", &id, "--size", "1", "v3"]);
    qemu_io_on(&qemu_io, addr, &clone, &["read -P 0x99 0 4M", "read -P 0x7e 1020M 4M"]);
    for node in &nodes {
        let left = file_named(&node.state, "@clone-for-");
        assert!(left.is_none(), "the snapshot a clone was made through is removed: {left:?}");
    }
    for volume in [&from_snapshot, &clone] {
        let replicas: Vec<PathBuf> = nodes
            .iter()
            .filter_map(|node| file_named(&node.state, &format!("volume-{volume}.img")))
            .collect();
        assert_eq!(replicas.len(), 2, "{replicas:?}");
        assert_same_content(&replicas[0], &replicas[1]);
        for node in &nodes {
            let (_, list) = http(node.api, "GET", "/v1/resources", NODE_TOKEN, "");
            let resource = list
                .as_array()
                .and_then(|l| l.iter().find(|r| r["name"] == format!("volume-{volume}")).cloned())
                .expect("the resource");
            assert_eq!(resource["peers"][0]["out_of_sync_bytes"], 0, "{resource}");
        }
    }
    for volume in [&from_snapshot, &clone] {
        run_openstack(&openstack, &endpoint, &["volume", "delete", volume]);
    }
    run_openstack(&openstack, &endpoint, &["volume", "snapshot", "delete", &snapshot_id]);
    wait_for("snapshot gone", Duration::from_secs(60), || {
        nodes.iter().all(|node| file_named(&node.state, "@snapshot-").is_none())
    });
    wait_for("the copies gone", Duration::from_secs(60), || {
        nodes.iter().all(|node| {
            let (_, list) = http(node.api, "GET", "/v1/resources", NODE_TOKEN, "");
            list.as_array().is_some_and(|l| l.len() == 1)
        })
    });

    // Extend online (the nodes grow every replica's file, then the primary grows the device):
    // the initiator reads the new size, old data stays, the new end is writable.
    run_openstack(&openstack, &endpoint, &["volume", "set", "--size", "2", &id]);
    wait_for("volume extended", Duration::from_secs(120), || {
        let (_, body) = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), "admin:demo", "");
        assert_ne!(body["volume"]["status"], "error", "{body}");
        body["volume"]["status"] == "available" && body["volume"]["size"] == 2
    });
    qemu_io_on(
        &qemu_io,
        addr,
        &id,
        &["read -P 0x99 0 4M", "write -P 0xa5 2044M 4M", "read -P 0xa5 2044M 4M"],
    );
    wait_for("both replicas at 2 GiB", Duration::from_secs(10), || {
        nodes.iter().all(|node| {
            let (_, list) = http(node.api, "GET", "/v1/resources", NODE_TOKEN, "");
            list.to_string().contains(&format!("\"size_bytes\":{}", 2u64 << 30))
        })
    });

    run_openstack(&openstack, &endpoint, &["volume", "delete", &id]);
    wait_for("the volume gone from both nodes", Duration::from_secs(60), || {
        nodes.iter().all(|node| {
            let (_, list) = http(node.api, "GET", "/v1/resources", NODE_TOKEN, "");
            list.as_array().is_some_and(Vec::is_empty)
        })
    });
}

/// Creates a volume with `args` (after `volume create`) and waits until it is available.
fn create_volume(openstack: &Path, endpoint: &str, addr: SocketAddr, args: &[&str]) -> String {
    let mut all = vec!["volume", "create", "-f", "value", "-c", "id"];
    all.extend_from_slice(args);
    let id = run_openstack(openstack, endpoint, &all).trim().to_owned();
    wait_for("volume available", Duration::from_secs(120), || {
        let (_, body) = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), "admin:demo", "");
        assert_ne!(body["volume"]["status"], "error", "{body}");
        body["volume"]["status"] == "available"
    });
    id
}

/// Runs qemu-io `commands` on volume `id` through the connection_info tandem-api gives out;
/// fails the test when any of them fails (a pattern read back differently included).
fn qemu_io_on(qemu_io: &Path, addr: SocketAddr, id: &str, commands: &[&str]) {
    let (status, body) = http(
        addr,
        "POST",
        &format!("/v3/demo/volumes/{id}/action"),
        "admin:demo",
        r#"{"os-initialize_connection": {"connector": {"initiator": "iqn.1994-05.com.example:c1", "multipath": "False"}}}"#,
    );
    assert_eq!(status, 200, "{body}");
    let data = &body["connection_info"]["data"];
    let url = format!(
        "iscsi://{}%{}@{}/{}/{}",
        data["auth_username"].as_str().expect("auth_username"),
        data["auth_password"].as_str().expect("auth_password"),
        data["target_portal"].as_str().expect("target_portal"),
        data["target_iqn"].as_str().expect("target_iqn"),
        data["target_lun"]
    );
    let mut command = Command::new(qemu_io);
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = run_with_timeout(command.arg(&url), Duration::from_secs(120));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    println!("$ qemu-io {commands:?} iscsi://USER%PASS@{}/...\n{text}", data["target_portal"]);
    assert!(output.status.success() && !text.contains("fail"), "qemu-io: {text}");
}

/// The first file under `dir` (recursively) whose name contains `needle`.
fn file_named(dir: &Path, needle: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = file_named(&path, needle) {
                return Some(found);
            }
        } else {
            let name = entry.file_name().to_string_lossy().into_owned();
            // A volume's atomic-write journal sits beside it under a longer name.
            if name.contains(needle) && !name.ends_with(".atomic-journal") {
                return Some(path);
            }
        }
    }
    None
}

/// The data extents of `file` (SEEK_DATA/SEEK_HOLE): everything else reads as zeros.
fn data_extents(file: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let length = file.metadata().expect("meta").len();
    let seek = |offset: u64, whence: i32| -> Option<u64> {
        // SAFETY: lseek on an open descriptor only moves its offset.
        let at = unsafe { libc::lseek(file.as_raw_fd(), i64::try_from(offset).ok()?, whence) };
        u64::try_from(at).ok()
    };
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < length {
        let Some(start) = seek(offset, libc::SEEK_DATA) else { break };
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(length).min(length);
        extents.push((start, end));
        offset = end;
    }
    extents
}

/// Fails unless the volume data of two replicas' files (their first `VOLUME_BYTES`) are the
/// same bytes wherever either has data (holes read as zeros), so two sparse 1 GiB replicas
/// compare in moments. What follows the data is each node's own DRBD metadata
/// (`meta-disk internal`: node id, bitmaps), which differs by design.
fn assert_same_content(a: &Path, b: &Path) {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (std::fs::File::open(a).expect("open"), std::fs::File::open(b).expect("open"));
    let length = fa.metadata().expect("meta").len();
    assert_eq!(length, fb.metadata().expect("meta").len(), "{} and {}", a.display(), b.display());
    assert!(length >= VOLUME_BYTES, "{} is smaller than the volume", a.display());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for (start, end) in data_extents(&fa).into_iter().chain(data_extents(&fb)) {
        let end = end.min(VOLUME_BYTES);
        let mut offset = start;
        while offset < end {
            let n = usize::try_from((end - offset).min(1 << 20)).expect("chunk");
            fa.read_exact_at(&mut ba[..n], offset).expect("read");
            fb.read_exact_at(&mut bb[..n], offset).expect("read");
            assert!(
                ba[..n] == bb[..n],
                "{} and {} differ near byte {offset}",
                a.display(),
                b.display()
            );
            offset += n as u64;
        }
    }
}

/// The role of `resource` on `node` as its control API reports it ("" when unreachable).
fn role_on(node: &TandemdNode, resource: &str) -> String {
    let (status, body) =
        http(node.api, "GET", &format!("/v1/resources/{resource}"), NODE_TOKEN, "");
    if status != 200 {
        return String::new();
    }
    body["role"].as_str().unwrap_or_default().to_owned()
}

/// Three tandemd: tandem-api places a volume's two replicas on two of them and makes the third
/// the diskless tiebreaker with the promoter on (quorum majority). The tiebreaker holds no
/// data and is not in the connection_info; killing the primary makes the other replica promote
/// itself (no `tandemadm primary`, no API call); the restarted node rejoins as Secondary; the
/// volume's delete removes the resource from all three nodes, the tiebreaker's included.
#[test]
fn a_volume_on_three_tandemd_gets_a_tiebreaker_and_fails_over_by_itself() {
    tests::require_slow!();
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nodes = [
        TandemdNode::start(dir.path(), "node-a", "127.0.62.1", NODE_TOKEN),
        TandemdNode::start(dir.path(), "node-b", "127.0.62.2", NODE_TOKEN),
        TandemdNode::start(dir.path(), "node-c", "127.0.62.3", NODE_TOKEN),
    ];
    let (api, addr) = start_api(dir.path(), &nodes);
    let (status, body) =
        http(addr, "POST", "/v3/demo/volumes", "admin:demo", r#"{"volume": {"size": 1}}"#);
    assert_eq!(status, 202, "{body}");
    let id = body["volume"]["id"].as_str().expect("id").to_owned();
    let resource = format!("volume-{id}");
    wait_for("volume available", Duration::from_secs(90), || {
        let (_, body) = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), "admin:demo", "");
        assert_ne!(body["volume"]["status"], "error", "{body}");
        body["volume"]["status"] == "available"
    });
    assert!(api.log().contains("diskless tiebreaker on"), "tandem-api says so:\n{}", api.log());

    // Which node is what: the tiebreaker is Diskless, one replica Primary, one Secondary.
    let disk_of = |node: &TandemdNode| {
        let (_, body) = http(node.api, "GET", &format!("/v1/resources/{resource}"), NODE_TOKEN, "");
        body["disk_state"].as_str().unwrap_or_default().to_owned()
    };
    let tie = nodes.iter().position(|n| disk_of(n) == "Diskless").expect("a diskless node");
    let primary = nodes.iter().position(|n| role_on(n, &resource) == "primary").expect("primary");
    let secondary = 3 - tie - primary;
    assert_ne!(tie, primary);
    assert_eq!(role_on(&nodes[secondary], &resource), "secondary");
    wait_for("the secondary UpToDate", Duration::from_secs(30), || {
        disk_of(&nodes[secondary]) == "UpToDate"
    });
    let adm = |node: &TandemdNode, args: &[&str]| {
        let mut command = Command::new(binary("tandemadm"));
        command.arg("-s").arg(node.socket()).args(args);
        let output = run_with_timeout(&mut command, Duration::from_secs(30));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let tie_status = adm(&nodes[tie], &["status", &resource]);
    println!("tandemadm status on the tiebreaker {}:\n{tie_status}", nodes[tie].name);
    assert!(
        tie_status.lines().any(|l| l.split_whitespace().any(|w| w == "disk:Diskless")),
        "the tiebreaker is diskless:\n{tie_status}"
    );
    assert!(tie_status.contains("role:Secondary"), "{tie_status}");
    assert!(
        file_named(&nodes[tie].state, &format!("{resource}.img")).is_none(),
        "the tiebreaker holds no replica"
    );
    for index in [primary, secondary] {
        let file = nodes[index].state.join(format!("resources/{resource}.promoter"));
        assert!(file.exists(), "the promoter is recorded on {}", nodes[index].name);
    }
    let text = std::fs::read_to_string(nodes[tie].state.join(format!("resources/{resource}.res")))
        .expect("the tiebreaker's resource file");
    assert!(text.contains("quorum majority;") && text.contains("connection-mesh"), "{text}");

    // connection_info names the replicas' portals only; data written through it survives the
    // failover.
    let (status, body) = http(
        addr,
        "POST",
        &format!("/v3/demo/volumes/{id}/action"),
        "admin:demo",
        r#"{"os-initialize_connection": {"connector": {"initiator": "iqn.1994-05.com.example:c1", "multipath": "True"}}}"#,
    );
    assert_eq!(status, 200, "{body}");
    let info = body["connection_info"]["data"].to_string();
    assert!(!info.contains(&nodes[tie].portal.to_string()), "no tiebreaker portal: {info}");
    assert!(info.contains(&nodes[primary].portal.to_string()), "{info}");
    qemu_io_on(&qemu_io, addr, &id, &["write -P 0x5a 0 4M"]);

    // Extend online: the replicas grow; the tiebreaker (no data) does not hold it up.
    let (status, body) = http(
        addr,
        "POST",
        &format!("/v3/demo/volumes/{id}/action"),
        "admin:demo",
        r#"{"os-extend": {"new_size": 2}}"#,
    );
    assert_eq!(status, 202, "{body}");
    wait_for("volume extended", Duration::from_secs(120), || {
        let (_, body) = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), "admin:demo", "");
        assert_ne!(body["volume"]["status"], "error", "{body}");
        body["volume"]["status"] == "available" && body["volume"]["size"] == 2
    });
    qemu_io_on(&qemu_io, addr, &id, &["read -P 0x5a 0 4M", "write -P 0xa5 2044M 4M"]);

    // kill -9 the primary: the secondary promotes itself.
    let killed = std::time::Instant::now();
    nodes[primary].daemon.kill9();
    wait_for("the survivor promoted itself", Duration::from_secs(30), || {
        role_on(&nodes[secondary], &resource) == "primary"
    });
    let takeover = killed.elapsed();
    println!(
        "{} promoted itself {} ms after the kill of {}",
        nodes[secondary].name,
        takeover.as_millis(),
        nodes[primary].name
    );
    // The promoter logs its promotion once the promote returned, so the role can show first.
    nodes[secondary]
        .daemon
        .wait_for_log(&format!("promoter {resource}: role:Primary"), Duration::from_secs(10));
    assert_eq!(role_on(&nodes[tie], &resource), "secondary", "a tiebreaker never promotes");
    let survivor = adm(&nodes[secondary], &["status", &resource]);
    println!("tandemadm status on the survivor:\n{survivor}");

    // The old primary comes back as Secondary and resyncs; the survivor stays Primary.
    nodes[primary].restart();
    wait_for("the old primary UpToDate again", Duration::from_secs(60), || {
        disk_of(&nodes[primary]) == "UpToDate"
    });
    assert_eq!(role_on(&nodes[primary], &resource), "secondary");
    assert_eq!(role_on(&nodes[secondary], &resource), "primary");
    // Its promoter came back with it (recorded with the resource, not in a node file).
    let promoter_on = format!("promoter {resource}: on");
    nodes[primary].daemon.wait_for_log(&promoter_on, Duration::from_secs(10));

    // Delete: gone from all three nodes, with the promoter's record.
    let (status, body) = http(addr, "DELETE", &format!("/v3/demo/volumes/{id}"), "admin:demo", "");
    assert_eq!(status, 202, "{body}");
    wait_for("the volume gone from all three nodes", Duration::from_secs(60), || {
        nodes.iter().all(|node| {
            let (_, list) = http(node.api, "GET", "/v1/resources", NODE_TOKEN, "");
            list.as_array().is_some_and(Vec::is_empty)
        })
    });
    for node in &nodes {
        let left = file_named(&node.state, &resource);
        assert!(left.is_none(), "{} keeps {left:?}", node.name);
    }
}

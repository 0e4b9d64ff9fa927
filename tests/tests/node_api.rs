//! tandemd's HTTP control API end to end: two nodes, a resource created, synced, promoted,
//! inspected and deleted over HTTP with a bearer token, cross-checked with tandemadm; and
//! tandem-api's create form (`PUT`, peers by name and URL): the nodes reserve replication
//! endpoints from each other, number themselves, write a DRBD file drbdadm accepts, create
//! metadata and sparse disks, connect, skip the initial sync and promote; qemu-io writes and
//! reads through the returned export; retries, conflicts, bad input and delete.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tests::{Daemon, binary, free_port, run_ok, run_with_timeout};

const TOKEN: &str = "test-token-0123456789";
const SIZE_BYTES: u64 = 16 * 1024 * 1024;

/// A request with an optional bearer token; returns (status, body text).
fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("Authorization", bearer));
    }
    let reply = tests::http::request(address, method, path, &headers, Some(body));
    (reply.status, reply.text)
}

struct Node {
    name: &'static str,
    api: SocketAddr,
    portal: SocketAddr,
    socket: std::path::PathBuf,
    state: std::path::PathBuf,
    _daemon: Daemon,
}

fn start(dir: &Path, name: &'static str) -> Node {
    let config = dir.join("drbd.conf");
    if !config.exists() {
        std::fs::write(&config, "global { usage-count no; }\n").expect("config");
    }
    start_with(dir, name, &config, &[])
}

/// A tandemd with the HTTP API on `config`, plus `extra` flags.
fn start_with(dir: &Path, name: &'static str, config: &Path, extra: &[&str]) -> Node {
    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let portal = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let socket = dir.join(format!("{name}.sock"));
    let state = dir.join(format!("state-{name}"));
    let mut command = Command::new(binary("tandemd"));
    command
        .arg("-c")
        .arg(config)
        .args(["--node", name, "--portal", &portal.to_string()])
        .arg("--control-socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .args(["--api-listen", &api.to_string(), "--api-token", TOKEN])
        .args(extra);
    let mut daemon = Daemon::spawn(name, command);
    daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
    Node { name, api, portal, socket, state, _daemon: daemon }
}

#[test]
fn http_api_creates_promotes_and_deletes_a_replicated_volume() {
    let dir = tempfile::tempdir().expect("temp dir");
    let nodes = [start(dir.path(), "alpha"), start(dir.path(), "beta")];
    let (a, b) = (&nodes[0], &nodes[1]);

    let (status, _) = http(a.api, "GET", "/v1/resources", None, "");
    assert_eq!(status, 401, "no token, no answer");
    let (status, _) = http(a.api, "GET", "/v1/resources", Some("wrong-token-123456"), "");
    assert_eq!(status, 401);
    let (status, body) = http(a.api, "GET", "/v1/openapi.json", Some(TOKEN), "");
    assert_eq!(status, 200);
    assert!(body.contains("\"openapi\""), "{body}");

    let ports = [free_port(), free_port()];
    let create = format!(
        r#"{{"name":"vol1","size_bytes":16777216,"nodes":[
            {{"name":"alpha","node_id":0,"address":"127.0.0.1:{}","disk":"{}/alpha/vol1.img"}},
            {{"name":"beta","node_id":1,"address":"127.0.0.1:{}","disk":"{}/beta/vol1.img"}}]}}"#,
        ports[0],
        dir.path().display(),
        ports[1],
        dir.path().display()
    );
    for node in &nodes {
        let (status, body) = http(node.api, "POST", "/v1/resources", Some(TOKEN), &create);
        assert_eq!(status, 201, "create on {}: {body}", node.name);
        assert!(body.contains("\"target_iqn\":\"iqn.2026-11.org.tandem:vol1\""), "{body}");
    }
    let (status, body) = http(a.api, "POST", "/v1/resources", Some(TOKEN), &create);
    assert_eq!(status, 200, "creating the same resource again is idempotent: {body}");
    let (status, body) =
        http(a.api, "POST", "/v1/resources", Some(TOKEN), &create.replace("16777216", "33554432"));
    assert_eq!(status, 409, "same name, other size: {body}");
    // A second resource on the same portal, added while tandemd runs.
    let ports2 = [free_port(), free_port()];
    let create2 = create
        .replace("vol1", "vol2")
        .replace(&ports[0].to_string(), &ports2[0].to_string())
        .replace(&ports[1].to_string(), &ports2[1].to_string());
    for node in &nodes {
        let (status, body) = http(node.api, "POST", "/v1/resources", Some(TOKEN), &create2);
        assert_eq!(status, 201, "create vol2 on {}: {body}", node.name);
    }
    if let Some(iscsi_ls) = tests::find_in_path("iscsi-ls") {
        let listing = run_ok(
            Command::new(iscsi_ls).arg(format!("iscsi://{}", a.portal)),
            Duration::from_secs(20),
        );
        assert!(
            listing.contains("iqn.2026-11.org.tandem:vol1")
                && listing.contains("iqn.2026-11.org.tandem:vol2"),
            "both targets on one portal: {listing}"
        );
    }
    let (status, body) = http(a.api, "GET", "/v1/resources", Some(TOKEN), "");
    assert_eq!(status, 200);
    assert!(body.contains("\"name\":\"vol1\"") && body.contains("\"name\":\"vol2\""), "{body}");
    let (status, body) = http(
        a.api,
        "POST",
        "/v1/resources",
        Some(TOKEN),
        r#"{"name":"../x","size_bytes":4096,"nodes":[]}"#,
    );
    assert_eq!(status, 400, "{body}");

    let (status, body) =
        http(a.api, "POST", "/v1/resources/vol1/skip-initial-sync", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(a.api, "POST", "/v1/resources/vol1/promote", Some(TOKEN), "{}");
    assert_eq!(status, 204, "{body}");
    // tandem-api's ResourceStatus fields (volume-api/node-control-api.yaml).
    let (status, body) = http(a.api, "GET", "/v1/resources/vol1", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["role"], "primary", "{body}");
    assert_eq!(json["disk_state"], "UpToDate", "{body}");
    assert_eq!(json["size_bytes"], 16_777_216, "{body}");
    assert_eq!(json["export"]["target_iqn"], "iqn.2026-11.org.tandem:vol1", "{body}");
    assert_eq!(json["export"]["portal"], a.portal.to_string(), "{body}");
    assert_eq!(json["export"]["lun"], 0, "{body}");
    let (_, body) = http(b.api, "GET", "/v1/resources/vol1", Some(TOKEN), "");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["role"], "secondary", "{body}");
    assert!(json["export"].is_null(), "a secondary does not export: {body}");
    // tandem-api's PUT form is covered by node_provision.rs; an empty body is a clear 400.
    let (status, body) = http(a.api, "PUT", "/v1/resources/vol9", Some(TOKEN), "{}");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("missing field"), "{body}");
    let (status, body) = http(b.api, "POST", "/v1/resources/vol1/promote", Some(TOKEN), "");
    assert_eq!(status, 409, "the peer is primary: {body}");
    assert!(body.contains("refusing to become primary"), "{body}");
    // Online resize exists now: a body without a size is a clear 400 (node_resize grows).
    let (status, body) = http(a.api, "POST", "/v1/resources/vol1/resize", Some(TOKEN), "{}");
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(a.api, "GET", "/v1/node", Some(TOKEN), "");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["name"], "alpha", "{body}");
    assert_eq!(json["availability_zone"], "nova", "{body}");
    assert!(json["total_bytes"].as_u64().unwrap_or(0) > 0, "{body}");
    assert!(json["free_bytes"].as_u64().is_some(), "{body}");

    // tandemadm sees the same resource.
    let status_text = run_ok(
        Command::new(binary("tandemadm")).arg("-s").arg(&a.socket).args(["status", "vol1"]),
        Duration::from_secs(20),
    );
    assert_eq!(
        status_text,
        "vol1 role:Primary\n  disk:UpToDate\n  beta role:Secondary\n    peer-disk:UpToDate\n\n"
    );

    for node in &nodes {
        let (status, body) = http(node.api, "DELETE", "/v1/resources/vol1", Some(TOKEN), "");
        assert_eq!(status, 204, "delete on {}: {body}", node.name);
        let (status, _) = http(node.api, "GET", "/v1/resources/vol1", Some(TOKEN), "");
        assert_eq!(status, 404);
    }
    assert!(!dir.path().join("alpha/vol1.img").exists(), "delete removes the backing file");
}

// ------------------------------------------------------------------ tandem-api's PUT form

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A tandemd whose API-created resources replicate on `replication_ip` (one loopback address
/// per node and test, so the reservations of parallel tests never meet).
fn start_replicating(
    dir: &Path,
    name: &'static str,
    replication_ip: &str,
    config_text: &str,
) -> Node {
    let config = dir.join(format!("{name}.conf"));
    std::fs::write(&config, config_text).expect("config");
    start_with(dir, name, &config, &["--replication-address", replication_ip])
}

fn put_body(role: &str, peer: &Node, iqn: &str, size_bytes: u64) -> String {
    format!(
        r#"{{"size_bytes":{size_bytes},"role":"{role}","protocol":"C",
            "peers":[{{"node":"{}","url":"http://{}"}}],
            "target_iqn":"{iqn}","chap":{{"username":"user-1","secret":"secret-0123456"}},
            "source":null}}"#,
        peer.name, peer.api
    )
}

fn wait_for_role(node: &Node, name: &str, role: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let reached = tests::wait_until(Duration::from_secs(30), || {
        let (status, body) =
            http(node.api, "GET", &format!("/v1/resources/{name}"), Some(TOKEN), "");
        if status != 200 {
            return false;
        }
        last = json(&body);
        last["role"] == role && last["disk_state"] == "UpToDate"
    });
    assert!(reached, "{} never became {role} UpToDate: {last}", node.name);
    last
}

#[test]
fn put_creates_a_replicated_volume_on_two_tandemd() {
    let dir = tempfile::tempdir().expect("temp dir");
    // beta hosts one resource of the administrator's own; the API must leave it alone.
    let admin_res = format!(
        "resource mine {{\n  on beta {{ node-id 0; address 127.0.51.2:{}; volume 0 {{ device \
         minor 9; disk {}/mine.img; meta-disk internal; }} }}\n  on gamma {{ node-id 1; \
         address 127.0.51.3:7789; volume 0 {{ device minor 9; disk /x.img; meta-disk \
         internal; }} }}\n}}\n",
        free_port(),
        dir.path().display()
    );
    let alpha =
        start_replicating(dir.path(), "alpha", "127.0.51.1", "global { usage-count no; }\n");
    let beta = start_replicating(dir.path(), "beta", "127.0.51.2", &admin_res);
    let name = "volume-5e0f";
    let iqn = "iqn.2010-10.org.openstack:volume-5e0f";
    let path = format!("/v1/resources/{name}");

    // Bad input: clear 4xx, never a 5xx.
    let (status, body) =
        http(alpha.api, "PUT", &path, None, &put_body("primary", &beta, iqn, SIZE_BYTES));
    assert_eq!(status, 401, "{body}");
    for (bad_path, bad_body, expected, needle) in [
        (path.as_str(), "{", 400, "bad request body"),
        (path.as_str(), "{}", 400, "missing field"),
        (
            "/v1/resources/.hidden",
            &put_body("primary", &beta, iqn, SIZE_BYTES)[..],
            400,
            "bad resource name",
        ),
        (path.as_str(), &put_body("primary", &beta, iqn, 4095)[..], 400, "multiple of 4096"),
        (
            path.as_str(),
            &put_body("primary", &beta, "not-an-iqn", SIZE_BYTES)[..],
            400,
            "bad target_iqn",
        ),
        (path.as_str(), &put_body("primary", &alpha, iqn, SIZE_BYTES)[..], 400, "named twice"),
        (
            path.as_str(),
            &put_body("primary", &beta, iqn, SIZE_BYTES)
                .replace(r#""source":null"#, r#""source":{"resource":{"resource":"volume-1"}}"#)[..],
            409,
            "no replica on this node",
        ),
    ] {
        let (status, body) = http(alpha.api, "PUT", bad_path, Some(TOKEN), bad_body);
        assert_eq!(status, expected, "{bad_body}: {body}");
        assert!(
            json(&body)["error"].as_str().is_some_and(|e| e.contains(needle)),
            "{needle}: {body}"
        );
    }
    let (status, body) =
        http(beta.api, "POST", "/v1/resources/mine/replication-endpoint", Some(TOKEN), "");
    assert_eq!(status, 409, "the administrator's resource is not the API's: {body}");
    let (status, body) = http(
        beta.api,
        "PUT",
        "/v1/resources/mine",
        Some(TOKEN),
        &put_body("primary", &alpha, iqn, SIZE_BYTES),
    );
    assert_eq!(status, 409, "{body}");
    let (status, body) = http(beta.api, "DELETE", "/v1/resources/mine", Some(TOKEN), "");
    assert_eq!(status, 409, "{body}");

    // tandem-api's order: the primary first, then the secondary.
    let primary_body = put_body("primary", &beta, iqn, SIZE_BYTES);
    let (status, body) = http(alpha.api, "PUT", &path, Some(TOKEN), &primary_body);
    assert_eq!(status, 201, "{body}");
    let export = json(&body);
    assert_eq!(export["portal"], alpha.portal.to_string(), "{body}");
    assert_eq!(export["target_iqn"], iqn, "{body}");
    assert_eq!(export["lun"], 0, "{body}");
    let (status, body) = http(alpha.api, "PUT", &path, Some(TOKEN), &primary_body);
    assert_eq!(status, 200, "the same request again: {body}");
    assert_eq!(json(&body), export);
    let (status, body) = http(
        alpha.api,
        "PUT",
        &path,
        Some(TOKEN),
        &put_body("primary", &beta, iqn, 2 * SIZE_BYTES),
    );
    assert_eq!(status, 409, "same name, other size: {body}");

    let secondary_body = put_body("secondary", &alpha, iqn, SIZE_BYTES);
    let (status, body) = http(beta.api, "PUT", &path, Some(TOKEN), &secondary_body);
    assert_eq!(status, 201, "{body}");
    assert_eq!(json(&body)["portal"], beta.portal.to_string(), "{body}");

    let shown = wait_for_role(&alpha, name, "primary");
    assert_eq!(shown["size_bytes"], SIZE_BYTES, "{shown}");
    assert_eq!(shown["export"]["target_iqn"], iqn, "{shown}");
    assert_eq!(shown["export"]["portal"], alpha.portal.to_string(), "{shown}");
    assert_eq!(shown["peers"][0]["name"], "beta", "{shown}");
    assert_eq!(shown["peers"][0]["peer_disk"], "UpToDate", "{shown}");
    assert_eq!(shown["peers"][0]["out_of_sync_bytes"], 0, "no initial sync: {shown}");
    let shown = wait_for_role(&beta, name, "secondary");
    assert!(shown["export"].is_null(), "{shown}");

    // What the nodes wrote: DRBD files drbdadm accepts, sparse disks of the requested size.
    for node in [&alpha, &beta] {
        let res = node.state.join(format!("resources/{name}.res"));
        let text = std::fs::read_to_string(&res).expect("the resource file");
        assert!(text.contains("on alpha {\n    node-id 0;\n    address 127.0.51.1:"), "{text}");
        assert!(text.contains("on beta {\n    node-id 1;\n    address 127.0.51.2:"), "{text}");
        if let Some(drbdadm) = tests::find_in_path("drbdadm") {
            let output = run_with_timeout(
                Command::new(drbdadm)
                    .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
                    .arg("-c")
                    .arg(&res)
                    .args(["dump", "all"]),
                Duration::from_secs(30),
            );
            assert!(
                output.status.success(),
                "drbdadm refuses {}: {}",
                res.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let disk = node.state.join(format!("volumes/{name}.img"));
        let metadata = std::fs::metadata(&disk).expect("the backing file");
        // The volume, the replicated reservation state (128 KiB) and DRBD's internal metadata
        // at the end (4 KiB superblock, 32 KiB activity log, one 4 KiB bitmap page), so the
        // LUN has exactly SIZE_BYTES.
        assert_eq!(metadata.len(), SIZE_BYTES + 128 * 1024 + 40 * 1024);
        use std::os::unix::fs::MetadataExt;
        assert!(metadata.blocks() * 512 < SIZE_BYTES / 2, "the backing file is sparse");
    }
    let (status, body) = http(beta.api, "PUT", &path, Some(TOKEN), &secondary_body);
    assert_eq!(status, 200, "retry on the secondary: {body}");

    if tests::slow_tests_enabled() {
        let qemu_io = tests::require_tool("qemu-io", "qemu-utils");
        // The volume's target takes the CHAP identity of the create request, and only it.
        let url = format!("iscsi://user-1%secret-0123456@{}/{iqn}/0", alpha.portal);
        let output = run_with_timeout(
            Command::new(&qemu_io)
                .args(["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M"])
                .arg(&url),
            Duration::from_secs(60),
        );
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && !text.contains("fail"), "qemu-io through {url}: {text}");
        for refused in [
            format!("iscsi://{}/{iqn}/0", alpha.portal),
            format!("iscsi://user-1%wrong-secret-99@{}/{iqn}/0", alpha.portal),
        ] {
            let output = run_with_timeout(
                Command::new(&qemu_io).args(["-f", "raw", "-c", "read 0 4k"]).arg(&refused),
                Duration::from_secs(60),
            );
            assert!(!output.status.success(), "{refused} must not log in");
        }
    }

    // Delete on both: 204, then 404 (tandem-api takes both as success); nothing left behind.
    for node in [&alpha, &beta] {
        let (status, body) = http(node.api, "DELETE", &path, Some(TOKEN), "");
        assert_eq!(status, 204, "delete on {}: {body}", node.name);
        let (status, _) = http(node.api, "DELETE", &path, Some(TOKEN), "");
        assert_eq!(status, 404);
        let (status, _) = http(node.api, "GET", &path, Some(TOKEN), "");
        assert_eq!(status, 404);
        for leftover in [
            format!("resources/{name}.res"),
            format!("resources/{name}.json"),
            format!("volumes/{name}.img"),
            format!("endpoints/{name}.json"),
            format!("{name}.0.md"),
        ] {
            assert!(!node.state.join(&leftover).exists(), "{} left {leftover}", node.name);
        }
    }
    // The same name again works (new endpoints, fresh disks).
    let (status, body) = http(alpha.api, "PUT", &path, Some(TOKEN), &primary_body);
    assert_eq!(status, 201, "{body}");
    let (status, body) = http(beta.api, "PUT", &path, Some(TOKEN), &secondary_body);
    assert_eq!(status, 201, "{body}");
    wait_for_role(&alpha, name, "primary");
}

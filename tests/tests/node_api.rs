//! tandemd's HTTP control API end to end: two nodes, a resource created, synced, promoted,
//! inspected and deleted over HTTP with a bearer token, cross-checked with tandemadm.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tests::{Daemon, binary, free_port, run_ok};

const TOKEN: &str = "test-token-0123456789";

fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connecting to the API");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("sending");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reading");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

struct Node {
    name: &'static str,
    api: SocketAddr,
    portal: SocketAddr,
    socket: std::path::PathBuf,
    _daemon: Daemon,
}

fn start(dir: &Path, name: &'static str) -> Node {
    let config = dir.join("drbd.conf");
    if !config.exists() {
        std::fs::write(&config, "global { usage-count no; }\n").expect("config");
    }
    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let portal = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let socket = dir.join(format!("{name}.sock"));
    let mut command = Command::new(binary("tandemd"));
    command
        .arg("-c")
        .arg(&config)
        .args(["--node", name, "--portal", &portal.to_string()])
        .arg("--control-socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join(format!("state-{name}")))
        .args(["--api-listen", &api.to_string(), "--api-token", TOKEN]);
    let mut daemon = Daemon::spawn(name, command);
    daemon.wait_for_log("tandemd: ready", Duration::from_secs(20));
    Node { name, api, portal, socket, _daemon: daemon }
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
    let (status, body) = http(a.api, "PUT", "/v1/resources/vol9", Some(TOKEN), "{}");
    assert_eq!(status, 501, "{body}");
    let (status, body) = http(b.api, "POST", "/v1/resources/vol1/promote", Some(TOKEN), "");
    assert_eq!(status, 409, "the peer is primary: {body}");
    assert!(body.contains("refusing to become primary"), "{body}");
    let (status, _) = http(a.api, "POST", "/v1/resources/vol1/resize", Some(TOKEN), "{}");
    assert_eq!(status, 501);
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

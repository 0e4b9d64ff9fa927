//! tandem-api over HTTP without storage nodes: version discovery, microversion negotiation,
//! Cinder's fault bodies for bad input (never a 5xx), project isolation, admin-only actions,
//! the volume status machine through the action endpoint, and records surviving a kill -9.
//! Every test runs on both database backends: SQLite (a file) and PostgreSQL (a private
//! cluster started by the test, with TANDEM_SLOW_TESTS=1).

use serde_json::json;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::api_db::Database;
use tests::http::{Reply, request as http};
use tests::{Daemon, binary, free_port};

fn start(db: &Database) -> (Daemon, SocketAddr) {
    start_with(db, &[])
}

fn start_with(db: &Database, extra: &[&str]) -> (Daemon, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(binary("tandem-api"));
    command
        .args(["--listen", &addr.to_string(), "--database", &db.location()])
        .args(extra)
        .stdin(Stdio::null());
    let mut daemon = Daemon::spawn("tandem-api", command);
    daemon.wait_for_port(addr, Duration::from_secs(60));
    (daemon, addr)
}

const ADMIN: (&str, &str) = ("X-Auth-Token", "admin:demo");
const MEMBER: (&str, &str) = ("X-Auth-Token", "alice:demo");
const OTHER: (&str, &str) = ("X-Auth-Token", "bob:other");

/// Asserts a Cinder fault of `code` named `name`.
fn assert_fault(r: &Reply, code: u16, name: &str, what: &str) {
    assert_eq!(r.status, code, "{what}: {}", r.body);
    assert_eq!(r.body[name]["code"], code, "{what}: {}", r.body);
    assert!(r.body[name]["message"].is_string(), "{what}: {}", r.body);
}

fn wait_status(addr: SocketAddr, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), &[ADMIN], None);
        if r.body["volume"]["status"] == status {
            return;
        }
        assert!(Instant::now() < deadline, "volume {id} never reached {status}: {}", r.body);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn discovery_faults_isolation_status_machine_and_restart_on_sqlite() {
    discovery_faults_isolation_status_machine_and_restart(&Database::sqlite());
}

#[test]
fn discovery_faults_isolation_status_machine_and_restart_on_postgres() {
    tests::require_slow!();
    discovery_faults_isolation_status_machine_and_restart(&Database::postgres());
}

#[test]
fn static_tokens_scope_members_and_let_admins_act_on_sqlite() {
    static_tokens_scope_members_and_let_admins_act(&Database::sqlite());
}

#[test]
fn static_tokens_scope_members_and_let_admins_act_on_postgres() {
    tests::require_slow!();
    static_tokens_scope_members_and_let_admins_act(&Database::postgres());
}

fn discovery_faults_isolation_status_machine_and_restart(db: &Database) {
    let (mut daemon, addr) = start(db);

    // Version discovery.
    let r = http(addr, "GET", "/", &[], None);
    assert_eq!(r.status, 300);
    assert_eq!(r.body["versions"][0]["version"], "3.67");
    assert_eq!(r.body["versions"][0]["min_version"], "3.0");
    for path in ["/v3", "/v3/"] {
        assert_eq!(http(addr, "GET", path, &[], None).status, 200, "{path}");
    }
    let r = http(
        addr,
        "GET",
        "/v3/demo/volumes",
        &[ADMIN, ("OpenStack-API-Version", "volume 3.50")],
        None,
    );
    assert!(r.headers.contains("openstack-api-version: volume 3.50"), "{}", r.headers);
    assert!(r.headers.contains("vary: openstack-api-version"), "{}", r.headers);
    assert_fault(
        &http(
            addr,
            "GET",
            "/v3/demo/volumes",
            &[ADMIN, ("OpenStack-API-Version", "volume 3.68")],
            None,
        ),
        406,
        "computeFault",
        "above max",
    );
    assert_fault(
        &http(
            addr,
            "GET",
            "/v3/demo/volumes",
            &[ADMIN, ("OpenStack-API-Version", "volume x")],
            None,
        ),
        400,
        "badRequest",
        "malformed version",
    );
    assert_eq!(
        http(
            addr,
            "GET",
            "/v3/demo/volumes",
            &[ADMIN, ("X-OpenStack-Volume-API-Version", "3.10")],
            None
        )
        .status,
        200
    );
    assert_eq!(http(addr, "GET", "/openapi.yaml", &[], None).status, 200);

    // A volume with no storage node anywhere is accepted, then goes to error (no valid backend).
    let r = http(
        addr,
        "POST",
        "/v3/demo/volumes",
        &[ADMIN],
        Some(r#"{"volume": {"size": 1, "name": "v", "metadata": {"k": "v"}}}"#),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["volume"]["status"], "creating");
    let id = r.body["volume"]["id"].as_str().unwrap().to_string();
    wait_status(addr, &id, "error");

    // Bad input: 4xx with Cinder's fault body, never a 5xx.
    let post = |path: &str, body: &str| http(addr, "POST", path, &[ADMIN], Some(body));
    let vol_action = format!("/v3/demo/volumes/{id}/action");
    let cases: Vec<(Reply, u16, &str, &str)> = vec![
        (post("/v3/demo/volumes", ""), 400, "badRequest", "missing body"),
        (post("/v3/demo/volumes", "{"), 400, "badRequest", "broken JSON"),
        (post("/v3/demo/volumes", "[]"), 400, "badRequest", "array body"),
        (post("/v3/demo/volumes", r#"{"volume": 1}"#), 400, "badRequest", "volume not an object"),
        (post("/v3/demo/volumes", r#"{"volume": {}}"#), 400, "badRequest", "no size"),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": -1}}"#),
            400,
            "badRequest",
            "negative size",
        ),
        (post("/v3/demo/volumes", r#"{"volume": {"size": 0}}"#), 400, "badRequest", "zero size"),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": 1.5}}"#),
            400,
            "badRequest",
            "fractional size",
        ),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": "ten"}}"#),
            400,
            "badRequest",
            "size not a number",
        ),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": 18446744073709551616}}"#),
            400,
            "badRequest",
            "size beyond u64",
        ),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": 999999}}"#),
            413,
            "overLimit",
            "over the gigabytes quota",
        ),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": 1, "name": 7}}"#),
            400,
            "badRequest",
            "name not a string",
        ),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": 1, "metadata": {"k": 1}}}"#),
            400,
            "badRequest",
            "metadata value not a string",
        ),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": 1}, "extra": 1}"#),
            400,
            "badRequest",
            "unknown top-level key",
        ),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": 1, "volume_type": "nope"}}"#),
            404,
            "itemNotFound",
            "unknown type",
        ),
        (
            post("/v3/demo/volumes", r#"{"volume": {"size": 1, "availability_zone": "mars"}}"#),
            400,
            "badRequest",
            "unknown zone",
        ),
        (
            post(
                "/v3/demo/volumes",
                r#"{"volume": {"snapshot_id": "00000000-0000-4000-8000-00000000beef"}}"#,
            ),
            404,
            "itemNotFound",
            "unknown snapshot",
        ),
        (
            http(
                addr,
                "PUT",
                &format!("/v3/demo/volumes/{id}"),
                &[ADMIN],
                Some(r#"{"volume": {"size": 5}}"#),
            ),
            400,
            "badRequest",
            "update of an unknown field",
        ),
        (
            http(
                addr,
                "GET",
                "/v3/demo/volumes/00000000-0000-4000-8000-000000000000",
                &[ADMIN],
                None,
            ),
            404,
            "itemNotFound",
            "unknown id",
        ),
        (
            http(addr, "GET", "/v3/demo/volumes/not-even-a-uuid", &[ADMIN], None),
            404,
            "itemNotFound",
            "garbage id",
        ),
        (post(&vol_action, "{}"), 400, "badRequest", "no action"),
        (post(&vol_action, r#"{"os-frobnicate": null}"#), 400, "badRequest", "unknown action"),
        (
            post(&vol_action, r#"{"os-extend": {"new_size": "x"}}"#),
            400,
            "badRequest",
            "extend size not a number",
        ),
        (
            post(&vol_action, r#"{"os-extend": {"new_size": 1}}"#),
            400,
            "badRequest",
            "extend not growing",
        ),
        (post(&vol_action, r#"{"os-reserve": null}"#), 400, "badRequest", "reserve from error"),
        (
            post(&vol_action, r#"{"os-initialize_connection": {}}"#),
            400,
            "badRequest",
            "no connector",
        ),
        (
            post(&vol_action, r#"{"os-reset_status": {"status": "sideways"}}"#),
            400,
            "badRequest",
            "unknown status",
        ),
        (
            post("/v3/demo/snapshots", r#"{"snapshot": {"volume_id": 5}}"#),
            400,
            "badRequest",
            "volume_id not a string",
        ),
        (
            post("/v3/demo/attachments", r#"{"attachment": {"volume_uuid": "x"}}"#),
            404,
            "itemNotFound",
            "attachments below 3.27",
        ),
        (
            http(addr, "PATCH", "/v3/demo/volumes", &[ADMIN], None),
            405,
            "badMethod",
            "unsupported method",
        ),
        (
            http(addr, "GET", "/v3/demo/no-such-collection", &[ADMIN], None),
            404,
            "itemNotFound",
            "unknown path",
        ),
        (http(addr, "GET", "/v3/volumes", &[], None), 401, "unauthorized", "no project at all"),
        (
            http(
                addr,
                "PUT",
                "/v3/demo/os-quota-sets/demo",
                &[ADMIN],
                Some(r#"{"quota_set": {"bogus": 1}}"#),
            ),
            400,
            "badRequest",
            "unknown quota",
        ),
        (
            http(
                addr,
                "PUT",
                "/v3/demo/os-quota-sets/demo",
                &[ADMIN],
                Some(r#"{"quota_set": {"volumes": -2}}"#),
            ),
            400,
            "badRequest",
            "quota below -1",
        ),
    ];
    for (reply, code, name, what) in &cases {
        assert!(reply.status < 500, "{what}: {}", reply.body);
        assert_fault(reply, *code, name, what);
    }

    // Project isolation: another project sees nothing of demo's and cannot touch it.
    let other = |m: &str, p: &str, b: Option<&str>| http(addr, m, p, &[OTHER], b);
    assert_fault(
        &other("GET", &format!("/v3/other/volumes/{id}"), None),
        404,
        "itemNotFound",
        "other project show",
    );
    assert_fault(
        &other("DELETE", &format!("/v3/other/volumes/{id}"), None),
        404,
        "itemNotFound",
        "other project delete",
    );
    assert_fault(
        &other("POST", &format!("/v3/other/volumes/{id}/action"), Some(r#"{"os-reserve": null}"#)),
        404,
        "itemNotFound",
        "other project action",
    );
    assert_eq!(other("GET", "/v3/other/volumes/detail", None).body, json!({"volumes": []}));
    assert_fault(
        &other("GET", "/v3/other/os-quota-sets/demo", None),
        403,
        "forbidden",
        "other project's quota",
    );

    // Admin-only actions.
    assert_fault(
        &http(addr, "POST", "/v3/demo/types", &[MEMBER], Some(r#"{"volume_type": {"name": "x"}}"#)),
        403,
        "forbidden",
        "member type-create",
    );
    assert_fault(
        &http(
            addr,
            "POST",
            &vol_action,
            &[MEMBER],
            Some(r#"{"os-reset_status": {"status": "available"}}"#),
        ),
        403,
        "forbidden",
        "member reset_status",
    );
    assert_fault(
        &http(addr, "GET", "/v3/demo/os-services", &[MEMBER], None),
        403,
        "forbidden",
        "member services",
    );

    // The status machine through the legacy attach actions.
    let act = |body: &str| http(addr, "POST", &vol_action, &[ADMIN], Some(body)).status;
    assert_eq!(act(r#"{"os-reset_status": {"status": "available"}}"#), 202);
    assert_eq!(act(r#"{"os-begin_detaching": null}"#), 400, "begin_detaching needs in-use");
    assert_eq!(act(r#"{"os-reserve": null}"#), 202);
    wait_status(addr, &id, "reserved");
    assert_eq!(act(r#"{"os-reserve": null}"#), 400, "reserve twice");
    assert_eq!(
        act(
            r#"{"os-attach": {"instance_uuid": "4d6c0d3c-8e54-4ab4-b18a-6a5a2f1cd6ee", "mountpoint": "/dev/vdb"}}"#
        ),
        202
    );
    wait_status(addr, &id, "in-use");
    let shown = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), &[ADMIN], None).body;
    assert_eq!(shown["volume"]["attachments"][0]["device"], "/dev/vdb", "{shown}");
    assert_fault(
        &http(addr, "DELETE", &format!("/v3/demo/volumes/{id}"), &[ADMIN], None),
        400,
        "badRequest",
        "delete while attached",
    );
    assert_eq!(act(r#"{"os-begin_detaching": null}"#), 202);
    wait_status(addr, &id, "detaching");
    assert_eq!(act(r#"{"os-roll_detaching": null}"#), 202);
    wait_status(addr, &id, "in-use");
    assert_eq!(act(r#"{"os-detach": {}}"#), 202);
    wait_status(addr, &id, "available");
    assert_eq!(act(r#"{"os-set_bootable": {"bootable": "true"}}"#), 200);

    // Quota usage counts the volume; the quota shape is what openstackclient needs.
    let q = http(addr, "GET", "/v3/demo/os-quota-sets/demo?usage=True", &[ADMIN], None).body;
    assert_eq!(q["quota_set"]["volumes"], json!({"limit": 10, "in_use": 1, "reserved": 0}), "{q}");

    // kill -9 and restart on the same database: the record is still there.
    daemon.kill9();
    drop(daemon);
    let (_daemon, addr) = start(db);
    let shown = http(addr, "GET", &format!("/v3/demo/volumes/{id}"), &[ADMIN], None).body;
    assert_eq!(shown["volume"]["status"], "available", "{shown}");
    assert_eq!(shown["volume"]["bootable"], "true", "{shown}");
    assert_eq!(shown["volume"]["metadata"], json!({"k": "v"}));
}

fn static_tokens_scope_members_and_let_admins_act(db: &Database) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokens.json");
    std::fs::write(
        &config,
        r#"{"tokens": [
            {"token": "member-token", "user_id": "alice", "project_id": "demo", "roles": ["member"]},
            {"token": "admin-token", "user_id": "ops", "project_id": "ops", "roles": ["admin"]}]}"#,
    )
    .unwrap();
    let (_daemon, addr) = start_with(db, &["--auth-config", config.to_str().unwrap()]);
    let member = [("X-Auth-Token", "member-token")];
    let bearer = [("Authorization", "Bearer member-token")];
    let admin = [("X-Auth-Token", "admin-token")];
    assert_fault(
        &http(addr, "GET", "/v3/demo/volumes", &[], None),
        401,
        "unauthorized",
        "no token",
    );
    assert_fault(
        &http(addr, "GET", "/v3/demo/volumes", &[("X-Auth-Token", "admin:demo")], None),
        401,
        "unauthorized",
        "noauth token",
    );
    assert_eq!(http(addr, "GET", "/v3/demo/volumes", &member, None).status, 200);
    assert_eq!(
        http(addr, "GET", "/v3/volumes", &bearer, None).status,
        200,
        "project from the token"
    );
    assert_fault(
        &http(addr, "GET", "/v3/ops/volumes", &member, None),
        403,
        "forbidden",
        "member in another project's URL",
    );
    let r = http(addr, "POST", "/v3/volumes", &member, Some(r#"{"volume": {"size": 1}}"#));
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["volume"]["os-vol-tenant-attr:tenant_id"], "demo");
    assert_fault(
        &http(addr, "POST", "/v3/demo/types", &member, Some(r#"{"volume_type": {"name": "t"}}"#)),
        403,
        "forbidden",
        "member type-create",
    );
    assert_eq!(
        http(addr, "POST", "/v3/ops/types", &admin, Some(r#"{"volume_type": {"name": "t"}}"#))
            .status,
        200
    );
    // An admin acts on any project named in the URL.
    let listed = http(addr, "GET", "/v3/demo/volumes", &admin, None);
    assert_eq!(listed.body["volumes"].as_array().map(Vec::len), Some(1), "{}", listed.body);
}

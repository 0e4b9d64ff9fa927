//! The compute agent attaching nova's way: `tandem-compute daemon --volume-api` gets the
//! connection_info from tandem-api itself. A volume created through tandem-api's REST API is
//! attached to an instance by its id only (`{"volumeAttachment": {"volumeId": V}}`): tandem-api
//! shows it `in-use` with an attachment for the instance and this host's connector, QEMU's
//! initiator writes through it (`qemu-io` over QMP) and the host reads the bytes back over iSCSI;
//! detach gives it back `available`. Hot-plugs that fail (a wrong CHAP secret on the target, an
//! export that is down, tandem-api itself down) leave the volume `available` with no attachment
//! and no QEMU block node; so does an `os-complete` that fails after the hot-plug. Attach/detach
//! cycles by volume id (two nodes, so through the path proxy) leak no attachment record, QEMU
//! node, secret, iSCSI session or proxy listener. A booted
//! guest gets the volume as a virtio disk whose serial is the volume id, and releases it.
//!
//! The storage node is a `tests::fixture_node` stand-in (a sparse file exported by the real
//! `tandem-iscsi`): it can re-export a resource with a wrong CHAP secret or take the export
//! down, which is how the failure cases are made.
//!
//! `TANDEM_COMPUTE_API_CYCLES=N` sets the number of attach/detach cycles (default 100, the
//! number in a row issue 9 asks for).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::fixture_node::{Export, FixtureNode, NODE_TOKEN};
use tests::{
    Daemon, binary, free_port, require_slow, require_tool, run_ok, run_with_timeout, wait_until,
    workspace_root,
};

/// What the agent authenticates with: tandem-api's noauth token `user:project`.
const AGENT_TOKEN: &str = "nova:demo";
/// The test's own token with tandem-api's noauth.
const ADMIN_TOKEN: &str = "admin:demo";
/// Bearer tokens for tandem-api's `--auth-config`: the agent is a project member, the test an
/// admin.
const AGENT_BEARER_TOKEN: &str = "compute-host-token-7f3a";
const ADMIN_BEARER_TOKEN: &str = "ops-token-19c2";
const MICROVERSION: (&str, &str) = ("OpenStack-API-Version", "volume 3.44");

// ---------------------------------------------------------------------------------------------
// tandem-api.

/// A request with a JSON body; returns (status, JSON body or Null).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, Value) {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    let body = body.map(Value::to_string);
    tests::http::json(addr, method, path, &all, body.as_deref())
}

/// How tandem-api authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// `--auth noauth`: tokens are `user:project`.
    NoAuth,
    /// `--auth-config`: static bearer tokens.
    Bearer,
}

struct Api {
    addr: SocketAddr,
    daemon: Daemon,
    /// The storage nodes; a volume has one replica per node.
    nodes: Vec<FixtureNode>,
    node_names: Vec<String>,
    dir: tempfile::TempDir,
    auth: Auth,
}

impl Api {
    /// tandem-api on SQLite with one fixture node and one replica per volume.
    fn start(auth: Auth) -> Api {
        Api::start_with_nodes(auth, &["node-a"])
    }

    /// tandem-api on SQLite with these fixture nodes and one replica per node: with two, the
    /// connection_info lists two portals and the agent attaches through its path proxy.
    fn start_with_nodes(auth: Auth, names: &[&str]) -> Api {
        // Built before any node call: a build inside a node request would outlast the API's
        // timeout.
        binary("tandem-iscsi");
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes: Vec<FixtureNode> =
            names.iter().map(|name| FixtureNode::start(name, &dir.path().join(name))).collect();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        if auth == Auth::Bearer {
            let tokens = json!({"tokens": [
                {"token": AGENT_BEARER_TOKEN, "user_id": "nova", "project_id": "demo",
                 "roles": ["member"]},
                {"token": ADMIN_BEARER_TOKEN, "user_id": "ops", "project_id": "demo",
                 "roles": ["admin"]},
            ]});
            std::fs::write(dir.path().join("tokens.json"), tokens.to_string()).expect("tokens");
        }
        let node_names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let daemon = Api::spawn(dir.path(), &node_names, &nodes, addr, auth);
        Api { addr, daemon, nodes, node_names, dir, auth }
    }

    /// The test's admin credentials for `auth`.
    fn admin_header(auth: Auth) -> (&'static str, &'static str) {
        match auth {
            Auth::NoAuth => ("X-Auth-Token", ADMIN_TOKEN),
            Auth::Bearer => ("X-Auth-Token", ADMIN_BEARER_TOKEN),
        }
    }

    fn admin(&self) -> (&'static str, &'static str) {
        Api::admin_header(self.auth)
    }

    /// The token file the agent reads (bearer) or the noauth token (in the environment).
    fn agent_token(&self) -> &'static str {
        match self.auth {
            Auth::NoAuth => AGENT_TOKEN,
            Auth::Bearer => AGENT_BEARER_TOKEN,
        }
    }

    fn spawn(
        dir: &Path,
        names: &[String],
        nodes: &[FixtureNode],
        addr: SocketAddr,
        auth: Auth,
    ) -> Daemon {
        let mut command = Command::new(binary("tandem-api"));
        command
            .args(["--listen", &addr.to_string(), "--database"])
            .arg(dir.join("api.sqlite"))
            .args(["--node-token", NODE_TOKEN, "--replica-count", &nodes.len().to_string()])
            .stdin(Stdio::null());
        for (name, node) in names.iter().zip(nodes) {
            command.args(["--node", &format!("{name}={}", node.url)]);
        }
        if auth == Auth::Bearer {
            command.arg("--auth-config").arg(dir.join("tokens.json"));
        }
        let admin = Api::admin_header(auth);
        let mut daemon = Daemon::spawn("tandem-api", command);
        daemon.wait_for_port(addr, Duration::from_secs(60));
        let up = wait_until(Duration::from_secs(30), || {
            let (_, body) = http(addr, "GET", "/v3/demo/os-services", &[admin], None);
            body["services"].as_array().is_some_and(|services| {
                services.iter().any(|s| s["binary"] == "cinder-volume" && s["state"] == "up")
            })
        });
        assert!(up, "the fixture node came up in tandem-api: {}", daemon.log());
        daemon
    }

    /// Stops tandem-api (the agent then cannot reach it).
    fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Starts tandem-api again on the same address and database.
    fn restart(&mut self) {
        self.daemon =
            Api::spawn(self.dir.path(), &self.node_names, &self.nodes, self.addr, self.auth);
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v3/demo", self.addr)
    }

    /// Creates a volume through the REST API and waits until it is available.
    fn create_volume(&self, name: &str) -> String {
        let body = json!({"volume": {"size": 1, "name": name}});
        let (status, created) =
            http(self.addr, "POST", "/v3/demo/volumes", &[self.admin()], Some(&body));
        assert_eq!(status, 202, "volume create: {created}");
        let id = created["volume"]["id"].as_str().expect("volume id").to_owned();
        let available = wait_until(Duration::from_secs(60), || {
            let volume = self.volume(&id);
            assert_ne!(volume["status"], "error", "{volume}");
            volume["status"] == "available"
        });
        assert!(available, "volume {id} became available: {}", self.volume(&id));
        id
    }

    fn volume(&self, id: &str) -> Value {
        let (status, body) =
            http(self.addr, "GET", &format!("/v3/demo/volumes/{id}"), &[self.admin()], None);
        assert_eq!(status, 200, "{body}");
        body["volume"].clone()
    }

    /// Every attachment record of the project (any status), with details.
    fn attachments(&self) -> Vec<Value> {
        let (status, body) = http(
            self.addr,
            "GET",
            "/v3/demo/attachments/detail",
            &[self.admin(), MICROVERSION],
            None,
        );
        assert_eq!(status, 200, "{body}");
        body["attachments"].as_array().expect("list").clone()
    }

    /// Asserts the volume is back: available, no attachment in the volume or in the list.
    fn assert_available_and_unattached(&self, id: &str) {
        let volume = self.volume(id);
        assert_eq!(volume["status"], "available", "{volume}");
        assert_eq!(volume["attachments"], json!([]), "{volume}");
        let records: Vec<_> =
            self.attachments().into_iter().filter(|a| a["volume_id"] == id).collect();
        assert!(records.is_empty(), "no attachment record is left: {records:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A fault-injecting proxy in front of tandem-api.

/// What the proxy does to the agent's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Forwards everything.
    None,
    /// Answers `os-complete` with 503 (tandem-api failing after the hot-plug).
    FailComplete,
    /// Answers `os-complete` and attachment deletes with 503 (tandem-api going away mid-attach).
    FailCompleteAndDeletes,
    /// Drops connection_info from the answer of an attachment create (a Cinder that answers a
    /// create like a reserve), so the agent must update the attachment with its connector.
    StripConnectionInfo,
}

struct Proxy {
    addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    /// `METHOD PATH` of every request the agent sent, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fault = Arc::new(Mutex::new(Fault::None));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (shared_fault, shared_seen) = (fault.clone(), seen.clone());
        tests::http::serve(listener, move |request| {
            let fault = *shared_fault.lock().expect("lock");
            proxy_one(request, upstream, fault, &shared_seen)
        });
        Proxy { addr, fault, seen }
    }

    fn set_fault(&self, fault: Fault) {
        *self.fault.lock().expect("lock") = fault;
        self.seen.lock().expect("lock").clear();
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Forwards one request to tandem-api (the token and microversion headers only), unless
/// `fault` says to fail it.
fn proxy_one(
    request: &tests::http::Request,
    upstream: SocketAddr,
    fault: Fault,
    seen: &Mutex<Vec<String>>,
) -> (u16, Value) {
    let (method, path) = (request.method.as_str(), request.path.as_str());
    seen.lock().expect("lock").push(format!("{method} {path}"));
    let body = Some(&request.body).filter(|b| !b.is_null());
    let complete = body.is_some_and(|b| b.get("os-complete").is_some());
    let fail = match fault {
        Fault::FailComplete => complete,
        Fault::FailCompleteAndDeletes => complete || method == "DELETE",
        Fault::None | Fault::StripConnectionInfo => false,
    };
    if fail {
        return (
            503,
            json!({"serviceUnavailable": {"code": 503, "message": "injected by the test"}}),
        );
    }
    let headers: Vec<(&str, &str)> = request
        .headers
        .iter()
        .filter(|(name, _)| name == "x-auth-token" || name == "openstack-api-version")
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let (status, mut reply) = http(upstream, method, path, &headers, body);
    if fault == Fault::StripConnectionInfo && method == "POST" && path.ends_with("/attachments") {
        reply["attachment"]["connection_info"] = Value::Null;
    }
    (status, reply)
}

// ---------------------------------------------------------------------------------------------
// The agent and QEMU.

struct Agent {
    daemon: Daemon,
    endpoint: String,
}

impl Agent {
    /// The agent with tandem-api at `volume_api`; the noauth token goes in the environment, a
    /// bearer token in a file.
    fn start(api: &Api, volume_api: &str) -> Agent {
        let state_dir = api.dir.path().join("compute");
        let port = free_port();
        let mut command = Command::new(binary("tandem-compute"));
        command
            .args(["daemon", "--listen", &format!("127.0.0.1:{port}"), "--accel", "tcg"])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--host", "compute-test", "--volume-api", volume_api])
            .env_remove("TANDEM_VOLUME_API_TOKEN");
        match api.auth {
            Auth::NoAuth => {
                command.env("TANDEM_VOLUME_API_TOKEN", api.agent_token());
            }
            Auth::Bearer => {
                let file = api.dir.path().join("agent-token");
                std::fs::write(&file, format!("{}\n", api.agent_token())).expect("token file");
                command.arg("--volume-api-token-file").arg(file);
            }
        }
        let mut daemon = Daemon::spawn("tandem-compute", command);
        daemon.wait_for_log("tandem-compute: listening on", Duration::from_secs(30));
        Agent { daemon, endpoint: format!("http://127.0.0.1:{port}") }
    }

    /// Runs a CLI subcommand; returns whether it succeeded, its JSON output (Null when empty)
    /// and its stderr.
    fn try_cli(&self, args: &[&str]) -> (bool, Value, String) {
        let output = run_with_timeout(
            Command::new(binary("tandem-compute")).arg("--endpoint").arg(&self.endpoint).args(args),
            Duration::from_secs(120),
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON")
        };
        (output.status.success(), value, String::from_utf8_lossy(&output.stderr).into_owned())
    }

    fn cli(&self, args: &[&str]) -> Value {
        let (ok, value, stderr) = self.try_cli(args);
        assert!(ok, "tandem-compute {args:?} failed: {stderr}\n{}", self.daemon.log());
        value
    }

    fn cli_error(&self, args: &[&str]) -> String {
        let (ok, value, stderr) = self.try_cli(args);
        assert!(!ok, "tandem-compute {args:?} should fail: {value}");
        stderr
    }

    /// Boots an instance with no OS (firmware only) and `slots` hot-plug slots.
    fn boot_without_os(&self, id: &str, slots: usize) -> Value {
        let server =
            self.cli(&["boot", id, "--id", id, "--hotplug-slots", &slots.to_string()])["server"]
                .clone();
        assert_eq!(server["status"], "ACTIVE", "{server}");
        server
    }
}

/// A synchronous QMP client on the instance's operator monitor, to inspect QEMU independently
/// of the agent.
struct Monitor {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Monitor {
    fn open(server: &Value) -> Monitor {
        let path = server["paths"]["operator_qmp_socket"].as_str().expect("operator QMP path");
        let stream = UnixStream::connect(path).expect("connecting to the operator monitor");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut monitor = Monitor { reader: BufReader::new(stream), writer };
        let mut greeting = String::new();
        monitor.reader.read_line(&mut greeting).expect("greeting");
        assert!(greeting.contains("QMP"), "{greeting}");
        monitor.execute("qmp_capabilities", json!({}));
        monitor
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let message = json!({ "execute": command, "arguments": arguments });
        self.writer.write_all(format!("{message}\n").as_bytes()).expect("QMP write");
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("QMP read");
            let reply: Value = serde_json::from_str(&line).expect("QMP JSON");
            if let Some(value) = reply.get("return") {
                return value.clone();
            }
            assert!(reply.get("error").is_none(), "{command}: {reply}");
        }
    }

    fn names_under(&mut self, path: &str, prefix: &str) -> Vec<String> {
        let listing = self.execute("qom-list", json!({ "path": path }));
        listing
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|entry| entry["name"].as_str())
            .filter(|name| name.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    /// What the agent created in QEMU: block nodes, secrets and disk devices.
    fn tandem_objects(&mut self) -> Vec<String> {
        let nodes = self.execute("query-named-block-nodes", json!({}));
        let mut names: Vec<String> = nodes
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|node| node["node-name"].as_str())
            .filter(|name| name.starts_with("tandem-"))
            .map(str::to_owned)
            .collect();
        names.extend(self.names_under("/objects", "tandem-secret"));
        names.extend(self.names_under("/machine/peripheral", "tandem-disk"));
        names
    }
}

/// Established TCP connections to `port` on this host (/proc/net/tcp{,6}): iSCSI sessions.
fn established_connections_to(port: u16) -> usize {
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 4 {
                continue;
            }
            let remote_port =
                fields[2].rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if remote_port == Some(port) && fields[3] == "01" {
                count += 1;
            }
        }
    }
    count
}

/// The port of a `host:port` portal.
fn portal_port(portal: &str) -> u16 {
    portal.rsplit(':').next().and_then(|port| port.parse().ok()).expect("portal with a port")
}

/// Attaches `volume_id` by id only; returns the agent's view of the attachment.
fn attach_by_id(agent: &Agent, server: &str, volume_id: &str) -> Value {
    agent.cli(&["attach", server, "--volume-id", volume_id])["volumeAttachment"].clone()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn attach_by_volume_id_goes_through_tandem_api_and_every_failure_gives_the_volume_back() {
    require_slow!();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let mut api = Api::start(Auth::NoAuth);
    let agent = Agent::start(&api, &api.endpoint());
    let info = agent.cli(&["info"]);
    let initiator = info["connector"]["initiator"].as_str().expect("initiator").to_owned();
    assert!(
        initiator.starts_with("iqn.2026-11.org.tandem:compute:compute-test:"),
        "a per-host initiator name: {info}"
    );
    assert_eq!(info["connector"]["multipath"], true, "{info}");
    assert_eq!(info["volume_api"], api.endpoint(), "{info}");

    let volume = api.create_volume("c1");
    let server = agent.boot_without_os("srv-1", 1);
    let mut monitor = Monitor::open(&server);

    // Attach by id only: in-use in tandem-api, with an attachment for this instance and host.
    let started = Instant::now();
    let attached = attach_by_id(&agent, "srv-1", &volume);
    println!("attach by volume id took {} ms", started.elapsed().as_millis());
    let attachment_id = attached["attachment_id"].as_str().expect("attachment id").to_owned();
    assert_eq!(attached["volumeId"], volume.as_str());
    let shown = api.volume(&volume);
    assert_eq!(shown["status"], "in-use", "{shown}");
    assert_eq!(shown["attachments"][0]["server_id"], "srv-1", "{shown}");
    assert_eq!(shown["attachments"][0]["attachment_id"], attachment_id.as_str(), "{shown}");
    assert_eq!(shown["attachments"][0]["host_name"], "compute-test", "{shown}");
    let records = api.attachments();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["status"], "attached", "{record}");
    assert_eq!(record["instance"], "srv-1", "{record}");
    assert_eq!(record["connector"]["initiator"], initiator.as_str(), "{record}");
    assert_eq!(record["connector"]["host"], "compute-test", "{record}");
    let info = &record["connection_info"];
    let port = portal_port(info["target_portal"].as_str().expect("portal"));
    assert_eq!(established_connections_to(port), 1, "one iSCSI session");

    // QEMU's initiator (logged in with the CHAP credentials from tandem-api) writes a pattern;
    // the host reads it back over iSCSI with the same credentials.
    let node = attached["names"]["node_name"].as_str().expect("node name").to_owned();
    monitor.execute(
        "human-monitor-command",
        json!({ "command-line": format!("qemu-io {node} \"write -P 0xa5 2M 1M\"") }),
    );
    let qemu_log = PathBuf::from(server["paths"]["qemu_log"].as_str().expect("qemu log"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&qemu_log).is_ok_and(|t| t.contains("wrote 1048576/1048576"))
        }),
        "qemu-io wrote through the attached volume: {}",
        std::fs::read_to_string(&qemu_log).unwrap_or_default()
    );
    let url = format!(
        "iscsi://{}%{}@{}/{}/0",
        info["auth_username"].as_str().expect("CHAP user"),
        info["auth_password"].as_str().expect("CHAP secret"),
        info["target_portal"].as_str().expect("portal"),
        info["target_iqn"].as_str().expect("iqn"),
    );
    let readback = api.dir.path().join("readback.img");
    run_ok(
        Command::new(&qemu_img).args([
            "dd",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("if={url}"),
            &format!("of={}", readback.display()),
            "bs=1M",
            "skip=2",
            "count=3",
        ]),
        Duration::from_secs(60),
    );
    let bytes = std::fs::read(&readback).expect("read back");
    assert_eq!(bytes.len(), 1 << 20);
    assert!(bytes.iter().all(|&byte| byte == 0xa5), "the host reads QEMU's pattern");

    // The same volume twice is refused by the agent before tandem-api is asked.
    let twice = agent.cli_error(&["attach", "srv-1", "--volume-id", &volume]);
    assert!(twice.contains("409"), "{twice}");
    assert_eq!(api.volume(&volume)["status"], "in-use");

    // Detach: unplugged, attachment deleted, available.
    agent.cli(&["detach", "srv-1", &volume]);
    api.assert_available_and_unattached(&volume);
    assert_eq!(monitor.tandem_objects(), Vec::<String>::new());
    assert!(wait_until(Duration::from_secs(5), || established_connections_to(port) == 0));

    // An unknown volume: tandem-api's 404, nothing plugged.
    let unknown = agent.cli_error(&["attach", "srv-1", "--volume-id", "no-such-volume"]);
    assert!(unknown.contains("404"), "{unknown}");

    // Failures in the hot-plug: the target refuses tandem-api's CHAP secret, or is down.
    for (export, needle) in [(Export::WrongChap, "blockdev-add"), (Export::Down, "blockdev-add")] {
        api.nodes[0].set_export(&volume, export);
        let error = agent.cli_error(&["attach", "srv-1", "--volume-id", &volume]);
        assert!(error.contains(needle), "{export:?}: {error}");
        api.assert_available_and_unattached(&volume);
        assert_eq!(monitor.tandem_objects(), Vec::<String>::new(), "{export:?}");
        assert_eq!(agent.cli(&["attachments", "srv-1"])["volumeAttachments"], json!([]));
        assert!(
            wait_until(Duration::from_secs(5), || established_connections_to(port) == 0),
            "{export:?}: no session is left"
        );
        println!("{export:?}: rolled back: {}", error.trim());
    }
    api.nodes[0].set_export(&volume, Export::Normal);

    // tandem-api down: a clear 503 after bounded retries, nothing plugged; back up, the same
    // attach works.
    api.stop();
    let started = Instant::now();
    let error = agent.cli_error(&["attach", "srv-1", "--volume-id", &volume]);
    println!("attach with tandem-api down failed in {} ms", started.elapsed().as_millis());
    assert!(error.contains("503") && error.contains("serviceUnavailable"), "{error}");
    assert!(error.contains("3 attempts"), "the error says how often it tried: {error}");
    assert_eq!(monitor.tandem_objects(), Vec::<String>::new());
    api.restart();
    api.assert_available_and_unattached(&volume);
    attach_by_id(&agent, "srv-1", &volume);
    assert_eq!(api.volume(&volume)["status"], "in-use");

    // Deleting the server gives its volumes back, as Nova does.
    agent.cli(&["delete", "srv-1"]);
    api.assert_available_and_unattached(&volume);
    assert!(wait_until(Duration::from_secs(5), || established_connections_to(port) == 0));
}

#[test]
fn attach_detach_cycles_by_volume_id_leak_nothing() {
    require_slow!();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let cycles: usize = std::env::var("TANDEM_COMPUTE_API_CYCLES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(100);
    // This time tandem-api takes static bearer tokens, the agent's read from a file. Two
    // nodes, so the connection_info lists two portals and every attach goes through a path
    // proxy, whose listener must go with the detach too.
    let api = Api::start_with_nodes(Auth::Bearer, &["node-a", "node-b"]);
    let agent = Agent::start(&api, &api.endpoint());
    let volume = api.create_volume("cycled");
    let server = agent.boot_without_os("srv-cycles", 1);
    let mut monitor = Monitor::open(&server);
    let objects_before = monitor.tandem_objects();
    let records_before = api.attachments().len();
    assert_eq!(records_before, 0);

    let mut port = None;
    let mut attach_ms = Vec::new();
    for cycle in 0..cycles {
        let started = Instant::now();
        let attached = attach_by_id(&agent, "srv-cycles", &volume);
        attach_ms.push(u64::try_from(started.elapsed().as_millis()).expect("ms"));
        assert!(attached["attachment_id"].is_string(), "{attached}");
        let proxy: SocketAddr = attached["path_proxy"]
            .as_str()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("cycle {cycle}: attached through a path proxy: {attached}"));
        let record = api.attachments();
        assert_eq!(record.len(), 1, "cycle {cycle}: one record while attached: {record:?}");
        let this_port =
            portal_port(record[0]["connection_info"]["target_portal"].as_str().expect("portal"));
        port = Some(this_port);
        assert_eq!(established_connections_to(this_port), 1, "cycle {cycle}: one session");
        assert_eq!(api.volume(&volume)["status"], "in-use", "cycle {cycle}");
        assert_eq!(monitor.tandem_objects().len(), objects_before.len() + 2, "node + secret");

        agent.cli(&["detach", "srv-cycles", &volume]);
        assert_eq!(api.volume(&volume)["status"], "available", "cycle {cycle}");
        assert_eq!(monitor.tandem_objects(), objects_before, "cycle {cycle}: nothing in QEMU");
        assert!(
            wait_until(Duration::from_secs(5), || established_connections_to(this_port) == 0),
            "cycle {cycle}: the iSCSI session is gone"
        );
        assert!(
            std::net::TcpStream::connect_timeout(&proxy, Duration::from_secs(1)).is_err(),
            "cycle {cycle}: the path proxy on {proxy} stopped listening"
        );
    }
    api.assert_available_and_unattached(&volume);
    assert_eq!(api.attachments().len(), records_before, "no attachment record leaked");
    assert_eq!(monitor.tandem_objects(), objects_before, "no QEMU node or secret leaked");
    assert_eq!(established_connections_to(port.expect("at least one cycle")), 0);
    assert_eq!(agent.cli(&["attachments", "srv-cycles"])["volumeAttachments"], json!([]));
    attach_ms.sort_unstable();
    println!(
        "{cycles} attach/detach cycles by volume id: attach median {} ms, max {} ms",
        attach_ms[attach_ms.len() / 2],
        attach_ms[attach_ms.len() - 1]
    );

    // Stopping the agent (SIGTERM) stops its instances, which it keeps no record of across a
    // restart, so it gives their volumes back.
    attach_by_id(&agent, "srv-cycles", &volume);
    assert_eq!(api.volume(&volume)["status"], "in-use");
    let mut agent = agent;
    let status = agent.daemon.stop();
    assert!(status.is_some_and(|status| status.success()), "clean exit: {status:?}");
    api.assert_available_and_unattached(&volume);
}

#[test]
fn a_failure_after_the_hot_plug_unplugs_before_the_volume_goes_back() {
    require_slow!();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let api = Api::start(Auth::NoAuth);
    let proxy = Proxy::start(api.addr);
    let agent = Agent::start(&api, &format!("http://{}/v3/demo", proxy.addr));
    let volume = api.create_volume("faulty");
    let server = agent.boot_without_os("srv-faults", 1);
    let mut monitor = Monitor::open(&server);

    // os-complete fails (503, repeated up to the bound): the agent unplugs, then deletes the
    // attachment, and the volume is available again.
    proxy.set_fault(Fault::FailComplete);
    let error = agent.cli_error(&["attach", "srv-faults", "--volume-id", &volume]);
    assert!(error.contains("attachment complete") && error.contains("503"), "{error}");
    let seen = proxy.seen();
    let completes = seen.iter().filter(|r| r.starts_with("POST") && r.ends_with("/action")).count();
    assert_eq!(completes, 3, "os-complete is repeatable, tried up to the bound: {seen:?}");
    assert!(seen.last().is_some_and(|r| r.starts_with("DELETE /v3/demo/attachments/")), "{seen:?}");
    api.assert_available_and_unattached(&volume);
    assert_eq!(monitor.tandem_objects(), Vec::<String>::new(), "unplugged");
    assert_eq!(agent.cli(&["attachments", "srv-faults"])["volumeAttachments"], json!([]));

    // os-complete fails and so does the rollback's delete (tandem-api going away): the attach
    // fails with QEMU holding nothing, and the agent deletes the attachment in the background
    // once tandem-api answers again.
    proxy.set_fault(Fault::FailCompleteAndDeletes);
    let error = agent.cli_error(&["attach", "srv-faults", "--volume-id", &volume]);
    assert!(error.contains("keeps retrying"), "{error}");
    assert_eq!(monitor.tandem_objects(), Vec::<String>::new(), "unplugged");
    assert_eq!(api.volume(&volume)["status"], "attaching", "until the delete gets through");
    let pending = agent.cli(&["info"])["pending_attachment_deletes"].clone();
    assert_eq!(pending.as_array().map(Vec::len), Some(1), "{pending}");
    proxy.set_fault(Fault::None);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || api.volume(&volume)["status"] == "available"),
        "the agent deleted the attachment once tandem-api answered: {}",
        agent.daemon.log()
    );
    println!("the background delete got through after {} ms", started.elapsed().as_millis());
    api.assert_available_and_unattached(&volume);
    assert_eq!(agent.cli(&["info"])["pending_attachment_deletes"], json!([]));

    // A create answered without connection_info: the agent updates the attachment with its
    // connector (nova's two-step flow) and attaches with what that returns.
    proxy.set_fault(Fault::StripConnectionInfo);
    let attached = attach_by_id(&agent, "srv-faults", &volume);
    let seen = proxy.seen();
    assert!(seen.iter().any(|r| r.starts_with("PUT /v3/demo/attachments/")), "{seen:?}");
    assert_eq!(api.volume(&volume)["status"], "in-use");
    assert_eq!(monitor.tandem_objects().len(), 2, "node and secret");
    assert!(attached["attachment_id"].is_string(), "{attached}");

    proxy.set_fault(Fault::None);
    agent.cli(&["detach", "srv-faults", &volume]);
    api.assert_available_and_unattached(&volume);
    assert_eq!(monitor.tandem_objects(), Vec::<String>::new());
    agent.cli(&["delete", "srv-faults"]);
}

#[test]
fn a_guest_gets_the_volume_as_a_virtio_disk_with_its_id_as_serial_and_releases_it() {
    require_slow!();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("cpio", "cpio");
    let guest = workspace_root().join("target/guest");
    run_ok(
        Command::new(workspace_root().join("scripts/build-guest")).arg(&guest),
        Duration::from_secs(300),
    );
    let api = Api::start(Auth::NoAuth);
    let agent = Agent::start(&api, &api.endpoint());
    let volume = api.create_volume("guest-disk");
    let server = agent.cli(&[
        "boot",
        "guest",
        "--id",
        "guest",
        "--kernel",
        guest.join("vmlinuz").to_str().expect("utf-8"),
        "--initrd",
        guest.join("initrd.img").to_str().expect("utf-8"),
        "--cmdline",
        "console=ttyS0 quiet panic=-1 tandem.channel",
    ])["server"]
        .clone();
    let console = PathBuf::from(server["paths"]["console_log"].as_str().expect("console"));
    assert!(
        wait_until(Duration::from_secs(120), || {
            std::fs::read_to_string(&console).is_ok_and(|t| t.contains("tandem-guest: ready"))
        }),
        "the guest booted: {}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    let mut monitor = Monitor::open(&server);

    let attached = attach_by_id(&agent, "guest", &volume);
    assert_eq!(attached["frontend"], "virtioblk", "{attached}");
    let device = attached["names"]["device_id"].as_str().expect("device id").to_owned();
    let serial = monitor.execute(
        "qom-get",
        json!({"path": format!("/machine/peripheral/{device}"), "property": "serial"}),
    );
    assert_eq!(serial, json!(volume), "Nova's disk serial is the volume id");
    assert_eq!(api.volume(&volume)["status"], "in-use");

    // device_del completes only when the guest lets go (DEVICE_DELETED).
    agent.cli(&["detach", "guest", &volume]);
    api.assert_available_and_unattached(&volume);
    assert_eq!(monitor.tandem_objects(), Vec::<String>::new());
    agent.cli(&["delete", "guest"]);
}

/// Whether `pid` is a live process (not a zombie).
fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.starts_with(" Z")))
}

/// Runs qemu-io on `node` through the operator monitor and waits for `expect` to appear once
/// more in QEMU's log, where qemu-io prints; false when it never does.
fn qemu_io(monitor: &mut Monitor, server: &Value, node: &str, command: &str, expect: &str) -> bool {
    let log = PathBuf::from(server["paths"]["qemu_log"].as_str().expect("qemu log"));
    let count = || std::fs::read_to_string(&log).map_or(0, |text| text.matches(expect).count());
    let before = count();
    monitor.execute(
        "human-monitor-command",
        json!({ "command-line": format!("qemu-io {node} \"{command}\"") }),
    );
    wait_until(Duration::from_secs(10), || count() > before)
}

#[test]
fn an_agent_killed_with_sigkill_takes_its_running_instances_back() {
    require_slow!();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let api = Api::start(Auth::NoAuth);
    let mut agent = Agent::start(&api, &api.endpoint());
    let volume = api.create_volume("survivor");
    let server = agent.boot_without_os("srv-adopt", 2);
    let pid = server["pid"].as_u64().expect("pid");
    let attached = attach_by_id(&agent, "srv-adopt", &volume);
    let node = attached["names"]["node_name"].as_str().expect("node name").to_owned();
    let mut monitor = Monitor::open(&server);
    let objects = monitor.tandem_objects();
    assert!(qemu_io(&mut monitor, &server, &node, "write -P 0x5a 0 1M", "wrote 1048576/1048576"));

    // A crash of the agent alone: QEMU runs on, and the next agent takes it back as it is.
    agent.daemon.kill9();
    assert!(process_alive(pid), "QEMU outlives the agent");
    let mut agent = Agent::start(&api, &api.endpoint());
    let shown = agent.cli(&["show", "srv-adopt"])["server"].clone();
    assert_eq!(shown["status"], "ACTIVE", "{shown}");
    assert_eq!(shown["pid"].as_u64(), Some(pid), "the same QEMU, not a new one: {shown}");
    let volumes = shown["volume_attachments"].as_array().expect("attachments").clone();
    assert_eq!(volumes.len(), 1, "{shown}");
    assert_eq!(volumes[0]["volume_id"], volume.as_str());
    assert_eq!(volumes[0]["status"], "attached");
    assert_eq!(monitor.tandem_objects(), objects, "nothing plugged in twice");
    assert_eq!(api.volume(&volume)["status"], "in-use");
    assert!(
        qemu_io(&mut monitor, &server, &node, "read -P 0x5a 0 1M", "read 1048576/1048576"),
        "the data is still there"
    );
    // The adopted attachment detaches like any other, and a new one gets fresh names.
    agent.cli(&["detach", "srv-adopt", &volume]);
    api.assert_available_and_unattached(&volume);
    let again = attach_by_id(&agent, "srv-adopt", &volume);
    assert_ne!(again["names"]["node_name"], node.as_str(), "no name is reused: {again}");
    assert_eq!(api.volume(&volume)["status"], "in-use");

    // A crash that takes QEMU down too: the instance comes back SHUTOFF with its volume still
    // recorded (and in-use in tandem-api, as Nova keeps a stopped server's volumes); start
    // plugs it in again and delete gives it back.
    drop(monitor);
    agent.daemon.kill9();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(wait_until(Duration::from_secs(10), || !process_alive(pid)), "QEMU is gone");
    let agent = Agent::start(&api, &api.endpoint());
    let shown = agent.cli(&["show", "srv-adopt"])["server"].clone();
    assert_eq!(shown["status"], "SHUTOFF", "{shown}");
    assert_eq!(shown["volume_attachments"].as_array().map(Vec::len), Some(1), "{shown}");
    assert_eq!(api.volume(&volume)["status"], "in-use");
    agent.cli(&["start", "srv-adopt"]);
    let shown = agent.cli(&["show", "srv-adopt"])["server"].clone();
    assert_eq!(shown["status"], "ACTIVE", "{shown}");
    let mut monitor = Monitor::open(&shown);
    let node = shown["volume_attachments"][0]["names"]["node_name"].as_str().expect("node");
    assert!(
        qemu_io(&mut monitor, &shown, node, "read -P 0x5a 0 1M", "read 1048576/1048576"),
        "re-attached with its data"
    );
    drop(monitor);
    agent.cli(&["delete", "srv-adopt"]);
    api.assert_available_and_unattached(&volume);
}

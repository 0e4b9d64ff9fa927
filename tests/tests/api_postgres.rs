//! Two tandem-api instances on one PostgreSQL database, as behind a load balancer: racing
//! requests through both never break the volume status machine or a quota, a background
//! operation runs in one instance only, and when one instance is killed with SIGKILL in the
//! middle of an operation, the other one finishes it.
//!
//! The racing-requests test also runs with two instances on one SQLite file. PostgreSQL is a
//! private cluster the test starts (Debian's initdb/pg_ctl on a free port).
//! The storage nodes are `FakeNode`s: in-memory stand-ins for the node control contract
//! (volume-api/node-control-api.yaml) that count every call, so a test can tell whether an
//! operation ran once or twice.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::http::json as http;
use tests::{Daemon, binary, free_port, wait_for};
use volume_api::pg_cluster::PgCluster;

const NODE_TOKEN: &str = "fake-node-token";
const ADMIN: (&str, &str) = ("X-Auth-Token", "admin:demo");

// ---------------------------------------------------------------------------------------------
// A storage node stand-in that counts calls.

struct FakeNode {
    url: String,
    /// `"PUT /v1/resources/volume-..."` -> how many times it was called.
    calls: Arc<Mutex<HashMap<String, u32>>>,
    /// Milliseconds every resource create, resize and delete waits before answering: a slow
    /// node.
    create_delay_ms: Arc<AtomicU64>,
}

impl FakeNode {
    fn start(name: &str) -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let create_delay_ms = Arc::new(AtomicU64::new(0));
        let (calls_seen, delay, name) = (calls.clone(), create_delay_ms.clone(), name.to_owned());
        tests::http::serve(listener, move |request| {
            let key = format!("{} {}", request.method, request.path);
            *calls_seen.lock().unwrap().entry(key).or_insert(0) += 1;
            answer(request, &name, &delay)
        });
        FakeNode { url, calls, create_delay_ms }
    }

    fn delay_operations(&self, delay: Duration) {
        self.create_delay_ms.store(u64::try_from(delay.as_millis()).unwrap(), Ordering::SeqCst);
    }

    /// How often `PUT /v1/resources/{resource}` (create) was called.
    fn creates_of(&self, resource: &str) -> u32 {
        let key = format!("PUT /v1/resources/{resource}");
        self.calls.lock().unwrap().get(&key).copied().unwrap_or(0)
    }
}

/// The fake node's reply: creates and deletes succeed after the configured delay.
fn answer(request: &tests::http::Request, name: &str, delay: &AtomicU64) -> (u16, Value) {
    let (method, path) = (request.method.as_str(), request.path.as_str());
    let resource_path = path.starts_with("/v1/resources/") && !path.contains("/snapshots/");
    if request.bearer.as_deref() != Some(NODE_TOKEN) {
        (401, json!({"error": "bad token"}))
    } else if method == "GET" && path == "/v1/node" {
        let tib: u64 = 1 << 40;
        (
            200,
            json!({"name": name, "availability_zone": "nova", "total_bytes": tib, "free_bytes": tib}),
        )
    } else if method == "PUT" && resource_path {
        std::thread::sleep(Duration::from_millis(delay.load(Ordering::SeqCst)));
        let iqn = &request.body["target_iqn"];
        (200, json!({"portal": "127.0.0.1:3260", "target_iqn": iqn, "lun": 0}))
    } else if method == "DELETE" {
        if resource_path {
            std::thread::sleep(Duration::from_millis(delay.load(Ordering::SeqCst)));
        }
        (204, Value::Null)
    } else {
        (200, json!({}))
    }
}

// ---------------------------------------------------------------------------------------------
// tandem-api instances.

/// One tandem-api on `database` (what `--database` takes) with both fake nodes registered;
/// returns once it sees both nodes up.
fn start_api(database: &str, nodes: &[FakeNode]) -> (Daemon, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(binary("tandem-api"));
    command
        .args(["--listen", &addr.to_string(), "--database", database])
        .args(["--node-token", NODE_TOKEN])
        .args(["--node", &format!("node-a={}", nodes[0].url)])
        .args(["--node", &format!("node-b={}", nodes[1].url)]);
    let mut daemon = Daemon::spawn("tandem-api", command);
    daemon.wait_for_port(addr, Duration::from_secs(60));
    wait_for("both nodes up", Duration::from_secs(30), || {
        let (_, body) = http(addr, "GET", "/v3/demo/os-services", &[ADMIN], None);
        body["services"].as_array().is_some_and(|s| {
            s.iter().filter(|s| s["binary"] == "cinder-volume" && s["state"] == "up").count() == 2
        })
    });
    (daemon, addr)
}

fn volume(addr: SocketAddr, id: &str) -> Value {
    http(addr, "GET", &format!("/v3/demo/volumes/{id}"), &[ADMIN], None).1["volume"].clone()
}

fn create_volume(addr: SocketAddr, project: &str, token: &str) -> (u16, Value) {
    http(
        addr,
        "POST",
        &format!("/v3/{project}/volumes"),
        &[("X-Auth-Token", token)],
        Some(r#"{"volume": {"size": 1}}"#),
    )
}

fn wait_available(addr: SocketAddr, id: &str, timeout: Duration) {
    wait_for(&format!("volume {id} available"), timeout, || {
        let v = volume(addr, id);
        assert_ne!(v["status"], "error", "{v}");
        v["status"] == "available"
    });
}

// ---------------------------------------------------------------------------------------------

#[test]
fn two_instances_serialise_conflicting_requests_and_run_each_operation_once() {
    tests::require_slow!();
    let db = PgCluster::start().unwrap();
    two_instances_on_one_database(&db.url());
}

/// The same with two instances on one SQLite file (several processes on one host).
#[test]
fn two_instances_on_one_sqlite_file_behave_the_same() {
    tests::require_slow!();
    let dir = tempfile::tempdir().unwrap();
    two_instances_on_one_database(&dir.path().join("api.sqlite").display().to_string());
}

fn two_instances_on_one_database(database: &str) {
    let nodes = [FakeNode::start("node-a"), FakeNode::start("node-b")];
    let (_api1, addr1) = start_api(database, &nodes);
    let (_api2, addr2) = start_api(database, &nodes);
    let both = [addr1, addr2];

    // A slow create through instance 1: instance 2 reconciles every 2 s meanwhile and must not
    // run it too (the lease is instance 1's and renewed).
    nodes.iter().for_each(|n| n.delay_operations(Duration::from_secs(5)));
    let (status, body) = create_volume(addr1, "demo", "admin:demo");
    assert_eq!(status, 202, "{body}");
    let id = body["volume"]["id"].as_str().unwrap().to_string();
    assert_eq!(volume(addr2, &id)["status"], "creating", "both instances share the record");
    wait_available(addr2, &id, Duration::from_secs(30));
    nodes.iter().for_each(|n| n.delay_operations(Duration::ZERO));
    for node in &nodes {
        assert_eq!(node.creates_of(&format!("volume-{id}")), 1, "create ran more than once");
    }

    // 50 concurrent os-reserve on that volume, alternating between the instances: exactly one
    // wins, the others get Cinder's 400, nobody a 5xx.
    let started = Instant::now();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (addr, id) = (both[i % 2], &id);
                s.spawn(move || {
                    http(
                        addr,
                        "POST",
                        &format!("/v3/demo/volumes/{id}/action"),
                        &[ADMIN],
                        Some(r#"{"os-reserve": null}"#),
                    )
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("{database}: 50 concurrent os-reserve through 2 instances: {:?}", started.elapsed());
    assert_eq!(statuses.iter().filter(|s| **s == 202).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 49, "{statuses:?}");
    assert_eq!(volume(addr1, &id)["status"], "reserved");

    // A quota of 5 volumes and 20 concurrent creates through both instances: exactly 5 pass.
    let (status, body) = http(
        addr2,
        "PUT",
        "/v3/demo/os-quota-sets/quota",
        &[ADMIN],
        Some(r#"{"quota_set": {"volumes": 5}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let replies: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let addr = both[i % 2];
                s.spawn(move || create_volume(addr, "quota", "alice:quota"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("{database}: 20 concurrent creates against a quota of 5: {:?}", started.elapsed());
    let accepted: Vec<String> = replies
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, b)| b["volume"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(accepted.len(), 5, "{replies:?}");
    assert!(replies.iter().all(|(s, _)| *s == 202 || *s == 413), "{replies:?}");
    let (_, listed) =
        http(addr1, "GET", "/v3/quota/volumes", &[("X-Auth-Token", "alice:quota")], None);
    assert_eq!(listed["volumes"].as_array().map(Vec::len), Some(5), "{listed}");
    // Each accepted create ran exactly once on each node, whichever instance took it.
    for id in &accepted {
        wait_available(addr1, id, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(3));
    for id in &accepted {
        for node in &nodes {
            assert_eq!(node.creates_of(&format!("volume-{id}")), 1, "volume {id}");
        }
    }
}

#[test]
fn an_instance_killed_mid_operation_is_finished_by_the_other() {
    tests::require_slow!();
    let db = PgCluster::start().unwrap();
    let nodes = [FakeNode::start("node-a"), FakeNode::start("node-b")];
    let (mut api1, addr1) = start_api(&db.url(), &nodes);
    let (api2, addr2) = start_api(&db.url(), &nodes);

    // Killed mid-create: instance 2 resumes the create once instance 1's lease expired.
    nodes.iter().for_each(|n| n.delay_operations(Duration::from_secs(3)));
    let (status, body) = create_volume(addr1, "demo", "admin:demo");
    assert_eq!(status, 202, "{body}");
    let id = body["volume"]["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    api1.kill9();
    drop(api1);
    let killed_at = Instant::now();
    nodes.iter().for_each(|n| n.delay_operations(Duration::ZERO));
    wait_available(addr2, &id, Duration::from_secs(60));
    eprintln!("create finished by the surviving instance {:?} after the kill", killed_at.elapsed());
    assert!(api2.log().contains(&format!("resuming creating of volume {id}")), "{}", api2.log());

    // Killed mid-delete: the same, and the record goes.
    let (mut api1, addr1) = start_api(&db.url(), &nodes);
    let (status, body) = create_volume(addr1, "demo", "admin:demo");
    assert_eq!(status, 202, "{body}");
    let second = body["volume"]["id"].as_str().unwrap().to_string();
    wait_available(addr1, &second, Duration::from_secs(30));
    nodes.iter().for_each(|n| n.delay_operations(Duration::from_secs(3)));
    let (status, body) =
        http(addr1, "DELETE", &format!("/v3/demo/volumes/{second}"), &[ADMIN], None);
    assert_eq!(status, 202, "{body}");
    std::thread::sleep(Duration::from_millis(500));
    api1.kill9();
    drop(api1);
    nodes.iter().for_each(|n| n.delay_operations(Duration::ZERO));
    assert_eq!(volume(addr2, &second)["status"], "deleting");
    wait_for("volume deleted by the surviving instance", Duration::from_secs(60), || {
        http(addr2, "GET", &format!("/v3/demo/volumes/{second}"), &[ADMIN], None).0 == 404
    });
    assert!(
        api2.log().contains(&format!("resuming deleting of volume {second}")),
        "{}",
        api2.log()
    );
}

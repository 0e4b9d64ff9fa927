//! TEST FIXTURE, NOT THE PRODUCT: a stand-in for tandemd's node control API
//! (volume-api/node-control-api.yaml) for the tests of tandem-api and tandem-compute that
//! need many volumes quickly, or faults a real node cannot be told to make. Each resource is a
//! sparse file exported by the real `tandem-iscsi` binary with the CHAP identity tandem-api
//! chose; there is no replication (each "replica" is an independent file). Snapshots and clones
//! are sparse copies. The real tandemd path is tested by `api_tandemd.rs`.
//!
//! Faults it can make: fail every create (507, a full or broken node), answer creates, resizes
//! and deletes slowly, and re-export a resource with a wrong CHAP secret or not at all.

use crate::{binary, free_port, http};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bearer token the fixture accepts (what tests pass tandem-api for its nodes).
pub const NODE_TOKEN: &str = "fixture-node-token";

/// The capacity every fixture node reports.
const CAPACITY_BYTES: u64 = 100 << 30;

/// How long a fresh export may take to listen.
const EXPORT_START_TIMEOUT_MS: u64 = 20_000;

/// How the fixture exports a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Export {
    /// With the CHAP secret tandem-api chose.
    Normal,
    /// With another secret: every login with tandem-api's credentials fails.
    WrongChap,
    /// Not at all: the portal refuses connections.
    Down,
}

struct Resource {
    file: PathBuf,
    size_bytes: u64,
    iqn: String,
    chap: (String, String),
    port: u16,
    child: Option<Child>,
}

impl Resource {
    fn export(&mut self, export: Export) {
        self.unexport();
        if export == Export::Down {
            return;
        }
        let secret = if export == Export::WrongChap {
            "not-the-secret-0000".to_owned()
        } else {
            self.chap.1.clone()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.file.with_extension("log"))
            .expect("fixture log");
        let child = Command::new(binary("tandem-iscsi"))
            .args(["--portal", &format!("127.0.0.1:{}", self.port), "--target", &self.iqn])
            .arg("--lun")
            .arg(format!("0={}", self.file.display()))
            .args(["--chap", &format!("{}:{secret}", self.chap.0)])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting tandem-iscsi");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_millis(EXPORT_START_TIMEOUT_MS);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tandem-iscsi did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn unexport(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn export_json(&self) -> Value {
        json!({"portal": format!("127.0.0.1:{}", self.port), "target_iqn": self.iqn, "lun": 0})
    }
}

struct State {
    name: String,
    dir: PathBuf,
    /// When set, resource creation fails with 507.
    fail_creates: bool,
    resources: HashMap<String, Resource>,
}

/// One stand-in storage node on a loopback port.
pub struct FixtureNode {
    pub url: String,
    state: Arc<Mutex<State>>,
    /// Milliseconds every resource create or resize waits before starting: a slow node.
    delay_ms: Arc<AtomicU64>,
}

impl FixtureNode {
    /// Starts a node called `name` keeping its files in `dir`.
    pub fn start(name: &str, dir: &Path) -> FixtureNode {
        std::fs::create_dir_all(dir).expect("fixture dir");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            fail_creates: false,
            resources: HashMap::new(),
        }));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (shared, delay) = (state.clone(), delay_ms.clone());
        http::serve(listener, move |request| {
            if request.bearer.as_deref() != Some(NODE_TOKEN) {
                return (401, json!({"error": "bad token"}));
            }
            let creating = request.method == "PUT"
                && request.path.starts_with("/v1/resources/")
                && !request.path.contains("/snapshots/");
            if creating || request.path.ends_with("/resize") {
                std::thread::sleep(Duration::from_millis(delay.load(Ordering::SeqCst)));
            }
            let mut state = shared.lock().expect("fixture lock");
            handle(&mut state, &request.method, &request.path, &request.body)
        });
        FixtureNode { url, state, delay_ms }
    }

    /// Makes every later create and resize wait `delay` first.
    pub fn delay_creates(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).expect("delay in ms fits u64");
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes every later create fail (or succeed again).
    pub fn fail_creates(&self, fail: bool) {
        self.state.lock().expect("fixture lock").fail_creates = fail;
    }

    /// Re-exports the resource of `volume_id` as `export` says.
    pub fn set_export(&self, volume_id: &str, export: Export) {
        let mut state = self.state.lock().expect("fixture lock");
        let resource =
            state.resources.get_mut(&format!("volume-{volume_id}")).expect("the volume's resource");
        resource.export(export);
    }

    /// Files the node holds for resources and snapshots.
    pub fn images(&self) -> Vec<PathBuf> {
        let dir = self.state.lock().expect("fixture lock").dir.clone();
        std::fs::read_dir(dir)
            .expect("fixture dir")
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|x| x == "img"))
            .collect()
    }
}

impl Drop for FixtureNode {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|error| error.into_inner());
        for resource in state.resources.values_mut() {
            resource.unexport();
        }
    }
}

/// Copies keeping holes: a plain copy of a sparse multi-GiB file would write every zero.
fn sparse_copy(from: &Path, to: &Path) -> Result<(), String> {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|error| error.to_string())?;
    if status.success() { Ok(()) } else { Err(format!("cp failed: {status}")) }
}

fn not_found() -> (u16, Value) {
    (404, json!({"error": "no such resource"}))
}

fn handle(state: &mut State, method: &str, path: &str, request: &Value) -> (u16, Value) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["v1", "node"]) => {
            let used: u64 = state.resources.values().map(|r| r.size_bytes).sum();
            (
                200,
                json!({"name": state.name, "availability_zone": "nova", "total_bytes": CAPACITY_BYTES,
                       "free_bytes": CAPACITY_BYTES.saturating_sub(used)}),
            )
        }
        ("PUT", ["v1", "resources", name]) => create(state, name, request),
        ("GET", ["v1", "resources", name]) => match state.resources.get(*name) {
            Some(r) => (
                200,
                json!({"name": name, "role": "primary", "disk_state": "UpToDate",
                       "size_bytes": r.size_bytes, "export": r.export_json()}),
            ),
            None => not_found(),
        },
        ("DELETE", ["v1", "resources", name]) => match state.resources.remove(*name) {
            Some(mut r) => {
                r.unexport();
                let _ = std::fs::remove_file(&r.file);
                (204, Value::Null)
            }
            None => not_found(),
        },
        ("POST", ["v1", "resources", name, "resize"]) => {
            let Some(size) = request["size_bytes"].as_u64() else {
                return (400, json!({"error": "fixture: resize without size_bytes"}));
            };
            let Some(r) = state.resources.get_mut(*name) else { return not_found() };
            let resized = std::fs::OpenOptions::new()
                .write(true)
                .open(&r.file)
                .and_then(|file| file.set_len(size));
            if let Err(error) = resized {
                return (500, json!({"error": error.to_string()}));
            }
            r.size_bytes = size;
            // tandem-iscsi reads the size when it starts: export again.
            r.export(Export::Normal);
            (204, Value::Null)
        }
        ("POST", ["v1", "resources", _, "promote" | "demote"]) => (204, Value::Null),
        ("PUT", ["v1", "resources", name, "snapshots", snap]) => match state.resources.get(*name) {
            Some(r) => match sparse_copy(&r.file, &state.dir.join(format!("{name}.{snap}.img"))) {
                Ok(()) => (201, json!({})),
                Err(error) => (500, json!({"error": error})),
            },
            None => not_found(),
        },
        ("DELETE", ["v1", "resources", name, "snapshots", snap]) => {
            let _ = std::fs::remove_file(state.dir.join(format!("{name}.{snap}.img")));
            (204, Value::Null)
        }
        _ => (404, json!({"error": format!("fixture: no route {method} {path}")})),
    }
}

fn create(state: &mut State, name: &str, request: &Value) -> (u16, Value) {
    if let Some(r) = state.resources.get(name) {
        return (200, r.export_json());
    }
    if state.fail_creates {
        return (507, json!({"error": "fixture told to fail"}));
    }
    let (Some(size_bytes), Some(iqn), Some(user), Some(secret)) = (
        request["size_bytes"].as_u64(),
        request["target_iqn"].as_str(),
        request["chap"]["username"].as_str(),
        request["chap"]["secret"].as_str(),
    ) else {
        return (400, json!({"error": "fixture: incomplete create"}));
    };
    let file = state.dir.join(format!("{name}.img"));
    let source = match &request["source"] {
        Value::Object(src) if src.contains_key("snapshot") => {
            let snap = &src["snapshot"];
            Some(state.dir.join(format!(
                "{}.{}.img",
                snap["resource"].as_str().unwrap_or_default(),
                snap["snapshot"].as_str().unwrap_or_default()
            )))
        }
        Value::Object(src) if src.contains_key("resource") => Some(
            state
                .dir
                .join(format!("{}.img", src["resource"]["resource"].as_str().unwrap_or_default())),
        ),
        _ => None,
    };
    if let Some(from) = source
        && let Err(error) = sparse_copy(&from, &file)
    {
        return (500, json!({"error": error}));
    }
    let sized =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&file).and_then(
            |f| {
                let len = f.metadata()?.len();
                f.set_len(size_bytes.max(len))
            },
        );
    if let Err(error) = sized {
        return (500, json!({"error": error.to_string()}));
    }
    let mut resource = Resource {
        file,
        size_bytes,
        iqn: iqn.to_owned(),
        chap: (user.to_owned(), secret.to_owned()),
        port: free_port(),
        child: None,
    };
    resource.export(Export::Normal);
    let reply = resource.export_json();
    state.resources.insert(name.to_owned(), resource);
    (201, reply)
}

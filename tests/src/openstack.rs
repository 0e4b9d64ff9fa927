//! The real OpenStack clients (python-cinderclient and python-openstackclient from PyPI) in a
//! venv under `target/`, created on first use and reused by every later test and run.

use crate::{require_tool, run_with_timeout, workspace_root};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// How long creating the venv may take (python3 -m venv).
const VENV_TIMEOUT_MS: u64 = 120_000;
/// How long installing the clients may take (PyPI downloads on a slow link).
const PIP_TIMEOUT_MS: u64 = 900_000;

/// Serialises creation between the tests of one binary running in parallel.
static CREATING: Mutex<()> = Mutex::new(());

/// The venv's directory; `bin/cinder` and `bin/openstack` exist when this returns.
pub fn venv() -> PathBuf {
    let _guard = CREATING.lock().unwrap_or_else(|error| error.into_inner());
    let venv = workspace_root().join("target/openstack-venv");
    if venv.join("bin/cinder").is_file() && venv.join("bin/openstack").is_file() {
        return venv;
    }
    let python = require_tool("python3", "python3");
    let out = run_with_timeout(
        Command::new(&python).args(["-m", "venv"]).arg(&venv),
        Duration::from_millis(VENV_TIMEOUT_MS),
    );
    assert!(out.status.success(), "python3 -m venv: {}", String::from_utf8_lossy(&out.stderr));
    let out = run_with_timeout(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "python-cinderclient",
            "python-openstackclient",
        ]),
        Duration::from_millis(PIP_TIMEOUT_MS),
    );
    assert!(out.status.success(), "pip install: {}", String::from_utf8_lossy(&out.stderr));
    venv
}

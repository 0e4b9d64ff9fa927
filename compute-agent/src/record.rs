//! What the agent keeps on disk about a running instance so that a restarted agent can take it
//! back: the QEMU pid and every volume attachment with its connection_info. Written whole to a
//! temporary file and renamed over the old one, so a crash leaves the old or the new record,
//! never half of one. The file holds CHAP secrets (in connection_info): mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::attach::{AttachmentNames, Frontend};

const RECORD_FILE: &str = "record.json";

/// Bigger records are refused when read back: no instance has that many attachments.
const RECORD_BYTES_MAX: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub created_unix_s: u64,
    /// The QEMU process while the instance runs.
    pub pid: Option<u32>,
    pub attachments: Vec<AttachmentRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub volume_id: String,
    pub attachment_id: Option<String>,
    pub connection_info: Value,
    pub names: AttachmentNames,
    pub slot: usize,
    pub frontend: Frontend,
    pub attach_ms: u64,
    /// The local port of the volume's path proxy, which QEMU reconnects to (absent in records
    /// of volumes attached without one, and in records older than the proxy).
    #[serde(default)]
    pub path_proxy_port: Option<u16>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(RECORD_FILE)
}

/// Replaces the record in `dir`.
pub fn save(dir: &Path, record: &InstanceRecord) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let temporary = dir.join(format!("{RECORD_FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path(dir))
}

/// The record in `dir`: `Ok(None)` when there is none.
pub fn load(dir: &Path) -> Result<Option<InstanceRecord>, String> {
    let file = path(dir);
    match std::fs::metadata(&file) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("{}: {error}", file.display())),
        Ok(meta) if meta.len() > RECORD_BYTES_MAX => {
            return Err(format!("{}: larger than {RECORD_BYTES_MAX} bytes", file.display()));
        }
        Ok(_) => {}
    }
    let text = std::fs::read(&file).map_err(|error| format!("{}: {error}", file.display()))?;
    serde_json::from_slice(&text).map(Some).map_err(|error| format!("{}: {error}", file.display()))
}

/// Forgets the record (the instance is not to come back).
pub fn remove(dir: &Path) {
    let _ = std::fs::remove_file(path(dir));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_record_round_trips_privately_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(load(dir.path()), Ok(None));
        let record = InstanceRecord {
            created_unix_s: 7,
            pid: Some(1234),
            attachments: vec![AttachmentRecord {
                volume_id: "v1".into(),
                attachment_id: Some("a1".into()),
                connection_info: serde_json::json!({"data": {"auth_password": "s3cret"}}),
                names: AttachmentNames::new(3, "tandem-port0".into(), true),
                slot: 0,
                frontend: Frontend::NodeOnly,
                path_proxy_port: Some(40123),
                attach_ms: 12,
            }],
        };
        save(dir.path(), &record).expect("save");
        assert_eq!(load(dir.path()), Ok(Some(record.clone())));
        let mode = std::fs::metadata(path(dir.path())).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "CHAP secrets stay private");
        std::fs::write(path(dir.path()), b"{not json").expect("write");
        assert!(load(dir.path()).is_err());
        remove(dir.path());
        assert_eq!(load(dir.path()), Ok(None));
    }
}

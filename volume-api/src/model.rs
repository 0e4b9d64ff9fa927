//! The records the service keeps. They are stored as JSON documents in the database, keyed by id
//! and project, so the schema stays small and identical on SQLite and PostgreSQL.

use crate::status::{AttachStatus, VolumeStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

pub type Metadata = BTreeMap<String, String>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Volume {
    pub id: String,
    pub project_id: String,
    pub user_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub size_gib: u64,
    pub status: VolumeStatus,
    pub attach_status: AttachStatus,
    pub replication_status: String,
    pub volume_type_id: String,
    pub availability_zone: String,
    pub metadata: Metadata,
    pub bootable: bool,
    pub snapshot_id: Option<String>,
    pub source_volid: Option<String>,
    pub created_at: String,
    pub updated_at: Option<String>,
    /// Nodes holding a replica, the primary first. Empty until scheduled.
    pub nodes: Vec<String>,
    /// The diskless tiebreaker node (a quorum vote that lets the replicas fail over on
    /// their own), when the volume has two replicas and a third node was available.
    #[serde(default)]
    pub tiebreaker: Option<String>,
    /// The resource name on the nodes.
    pub resource: String,
    pub target_iqn: String,
    pub chap_username: String,
    pub chap_secret: String,
    /// Where the node exports the LUN, per node, as the node reported it (primary first).
    pub portals: Vec<String>,
    /// The status a long operation started from (an extend of an attached volume returns to
    /// in-use).
    pub status_before: Option<VolumeStatus>,
    /// The size an extend in progress grows to, recorded before the nodes are asked so a
    /// restart can finish it (resizing is idempotent on the nodes).
    #[serde(default)]
    pub extend_to_gib: Option<u64>,
    /// Why the last operation failed, for the operator.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub id: String,
    pub volume_id: String,
    pub project_id: String,
    pub instance_uuid: Option<String>,
    pub attached_host: Option<String>,
    pub mountpoint: Option<String>,
    pub attach_mode: String,
    /// reserved, attaching, attached, detaching, detached.
    pub attach_status: String,
    pub connector: Option<Value>,
    pub attach_time: Option<String>,
    pub detach_time: Option<String>,
    pub created_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub id: String,
    pub project_id: String,
    pub user_id: String,
    pub volume_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub size_gib: u64,
    /// creating, available, deleting, error, error_deleting.
    pub status: String,
    pub metadata: Metadata,
    pub created_at: String,
    pub updated_at: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VolumeType {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub is_public: bool,
    pub extra_specs: BTreeMap<String, String>,
}

/// A storage node as the registry knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub name: String,
    /// Base URL of its control API, e.g. `http://10.0.0.5:8780`.
    pub url: String,
    pub availability_zone: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Milliseconds since the Unix epoch of the last heartbeat.
    pub heartbeat_ms: u64,
    pub enabled: bool,
}

/// Name of the type every volume gets when none is asked for, as Cinder's.
pub const DEFAULT_TYPE_NAME: &str = "__DEFAULT__";
pub const DEFAULT_TYPE_ID: &str = "00000000-0000-4000-8000-000000000001";

/// A random version-4 UUID in its usual text form.
pub fn new_uuid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// True for the text form of any UUID (Cinder ids are UUIDs; anything else cannot exist).
pub fn looks_like_uuid(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) { *c == b'-' } else { c.is_ascii_hexdigit() }
        })
}

/// A random secret from an alphabet without look-alikes, as Cinder's `generate_password`.
pub fn new_secret(length: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    (0..length).map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())])).collect()
}

/// Cinder's timestamp form, `2026-11-25T15:55:00.000000`, from milliseconds since the epoch.
pub fn format_timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let micros = (ms % 1000) * 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000000");
        assert_eq!(format_timestamp(1_795_622_100_123), "2026-11-25T15:55:00.123000");
        assert_eq!(format_timestamp(951_782_400_000), "2000-02-29T00:00:00.000000");
    }

    #[test]
    fn uuids() {
        let id = new_uuid();
        assert!(looks_like_uuid(&id), "{id}");
        assert_eq!(&id[14..15], "4");
        assert!(!looks_like_uuid("not-a-uuid"));
        assert!(!looks_like_uuid("g0000000-0000-4000-8000-000000000001"));
        assert_eq!(new_secret(16).len(), 16);
    }
}

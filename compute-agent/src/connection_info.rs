//! Cinder's iSCSI `connection_info`, parsed and checked once at the boundary.
//!
//! Cinder hands it out in two shapes: `os-initialize_connection` nests the target under `data`
//! (`{"driver_volume_type": "iscsi", "data": {...}}`), while the 3.44 attachments API flattens
//! the `data` keys to the top level beside `attachment_id`. Both are accepted.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::constants::{ISCSI_PORT_DEFAULT, NAME_BYTES_MAX};

/// Why a connection_info was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConnectionInfoError {
    #[error("connection_info must be a JSON object")]
    NotAnObject,
    #[error("driver_volume_type {0:?} is not supported (only \"iscsi\")")]
    UnsupportedDriver(String),
    #[error("connection_info lacks {0}")]
    Missing(&'static str),
    #[error("connection_info field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// A `host:port` iSCSI portal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Portal {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Portal {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(formatter, "[{}]:{}", self.host, self.port)
        } else {
            write!(formatter, "{}:{}", self.host, self.port)
        }
    }
}

impl Portal {
    /// Parses `host:port`, `[v6]:port`, `host` (port 3260) and Cinder's `host:port,tpgt`.
    pub fn parse(text: &str) -> Result<Portal, ConnectionInfoError> {
        let invalid = |reason: &str| ConnectionInfoError::Invalid {
            field: "target_portal",
            reason: format!("{reason}: {text:?}"),
        };
        // Some drivers append the portal group tag; it plays no part in the login.
        let text_no_tag = text.split(',').next().unwrap_or("");
        let (host, port) = if let Some(rest) = text_no_tag.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| invalid("unclosed '['"))?;
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(invalid("junk after ']'")),
            }
        } else {
            match text_no_tag.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(invalid("IPv6 needs [brackets]"));
                }
                Some((host, port)) => (host, Some(port)),
                None => (text_no_tag, None),
            }
        };
        if host.is_empty() || host.len() > NAME_BYTES_MAX {
            return Err(invalid("empty or overlong host"));
        }
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:_%".contains(c)) {
            return Err(invalid("host has characters outside a hostname or address"));
        }
        let port = match port {
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(invalid("bad port")),
            },
            None => ISCSI_PORT_DEFAULT,
        };
        Ok(Portal { host: host.to_owned(), port })
    }
}

/// CHAP credentials the initiator presents.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Chap {
    // The password never reaches a log line.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("Chap").field("username", &self.username).finish_non_exhaustive()
    }
}

/// One path to the volume: portal, target and LUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IscsiPath {
    pub portal: Portal,
    pub iqn: String,
    pub lun: u32,
}

/// A checked iSCSI connection_info.
#[derive(Debug, Clone, PartialEq)]
pub struct IscsiConnection {
    /// The primary path (`target_portal`/`target_iqn`/`target_lun`).
    pub primary: IscsiPath,
    /// Every path Cinder offers (`target_portals`/...), the primary first, no duplicates.
    pub paths: Vec<IscsiPath>,
    pub chap: Option<Chap>,
    pub volume_id: Option<String>,
    pub read_only: bool,
    pub discard: bool,
}

impl IscsiConnection {
    /// Parses either shape of connection_info.
    pub fn parse(value: &Value) -> Result<IscsiConnection, ConnectionInfoError> {
        let object = value.as_object().ok_or(ConnectionInfoError::NotAnObject)?;
        let driver = object.get("driver_volume_type").and_then(Value::as_str).unwrap_or("iscsi");
        if !driver.eq_ignore_ascii_case("iscsi") {
            return Err(ConnectionInfoError::UnsupportedDriver(driver.to_owned()));
        }
        let data = match object.get("data") {
            Some(data) => data.as_object().ok_or(ConnectionInfoError::Invalid {
                field: "data",
                reason: "not an object".into(),
            })?,
            None => object,
        };
        let text = |key: &'static str| -> Result<Option<&str>, ConnectionInfoError> {
            match data.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(text)) => Ok(Some(text.as_str())),
                Some(_) => {
                    Err(ConnectionInfoError::Invalid { field: key, reason: "not a string".into() })
                }
            }
        };
        let portal = text("target_portal")?.ok_or(ConnectionInfoError::Missing("target_portal"))?;
        let iqn = text("target_iqn")?.ok_or(ConnectionInfoError::Missing("target_iqn"))?;
        let lun = parse_lun("target_lun", data.get("target_lun"))?;
        let primary = IscsiPath { portal: Portal::parse(portal)?, iqn: check_iqn(iqn)?, lun };

        let mut paths = vec![primary.clone()];
        if let Some(portals) = data.get("target_portals").and_then(Value::as_array) {
            let iqns = data.get("target_iqns").and_then(Value::as_array);
            let luns = data.get("target_luns").and_then(Value::as_array);
            for (index, portal) in portals.iter().enumerate() {
                let portal = portal.as_str().ok_or(ConnectionInfoError::Invalid {
                    field: "target_portals",
                    reason: "not a list of strings".into(),
                })?;
                let iqn = match iqns.and_then(|list| list.get(index)) {
                    Some(iqn) => check_iqn(iqn.as_str().ok_or(ConnectionInfoError::Invalid {
                        field: "target_iqns",
                        reason: "not a list of strings".into(),
                    })?)?,
                    None => primary.iqn.clone(),
                };
                let lun = match luns.and_then(|list| list.get(index)) {
                    Some(lun) => parse_lun("target_luns", Some(lun))?,
                    None => primary.lun,
                };
                let path = IscsiPath { portal: Portal::parse(portal)?, iqn, lun };
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
        }

        let chap = match text("auth_method")? {
            None => None,
            Some(method) if method.eq_ignore_ascii_case("none") => None,
            Some(method) if method.eq_ignore_ascii_case("chap") => {
                let username =
                    text("auth_username")?.ok_or(ConnectionInfoError::Missing("auth_username"))?;
                let password =
                    text("auth_password")?.ok_or(ConnectionInfoError::Missing("auth_password"))?;
                if username.is_empty() || password.is_empty() {
                    return Err(ConnectionInfoError::Invalid {
                        field: "auth_username",
                        reason: "CHAP needs a username and a password".into(),
                    });
                }
                Some(Chap { username: username.to_owned(), password: password.to_owned() })
            }
            Some(other) => {
                return Err(ConnectionInfoError::Invalid {
                    field: "auth_method",
                    reason: format!("{other:?} is not CHAP"),
                });
            }
        };
        let volume_id = text("volume_id")?.map(str::to_owned);
        if let Some(volume_id) = &volume_id {
            check_name("volume_id", volume_id)?;
        }
        let read_only = text("access_mode")?.is_some_and(|mode| mode == "ro");
        let discard = data.get("discard").and_then(Value::as_bool).unwrap_or(false);
        Ok(IscsiConnection { primary, paths, chap, volume_id, read_only, discard })
    }
}

fn parse_lun(field: &'static str, value: Option<&Value>) -> Result<u32, ConnectionInfoError> {
    let invalid = |reason: &str| ConnectionInfoError::Invalid { field, reason: reason.into() };
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(number)) => number
            .as_u64()
            .and_then(|lun| u32::try_from(lun).ok())
            .filter(|lun| *lun < 16_384)
            .ok_or_else(|| invalid("not a LUN in 0..16383")),
        // Some drivers send LUNs as strings.
        Some(Value::String(text)) => text
            .parse::<u32>()
            .ok()
            .filter(|lun| *lun < 16_384)
            .ok_or_else(|| invalid("not a LUN in 0..16383")),
        Some(_) => Err(invalid("not a number")),
    }
}

fn check_iqn(iqn: &str) -> Result<String, ConnectionInfoError> {
    let valid = !iqn.is_empty()
        && iqn.len() <= NAME_BYTES_MAX
        && (iqn.starts_with("iqn.") || iqn.starts_with("eui.") || iqn.starts_with("naa."))
        && iqn.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c));
    if valid {
        Ok(iqn.to_owned())
    } else {
        Err(ConnectionInfoError::Invalid {
            field: "target_iqn",
            reason: format!("{iqn:?} is not an iqn./eui./naa. name"),
        })
    }
}

/// Ids and names: printable ASCII without quotes or slashes, so they are safe in QOM ids, XML
/// and URLs.
pub fn check_name(field: &'static str, name: &str) -> Result<(), ConnectionInfoError> {
    let valid = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(())
    } else {
        Err(ConnectionInfoError::Invalid {
            field,
            reason: format!("{name:?}: use 1..{NAME_BYTES_MAX} of [A-Za-z0-9._-]"),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn nested() -> Value {
        json!({
            "driver_volume_type": "iscsi",
            "data": {
                "target_discovered": false,
                "target_iqn": "iqn.2026-11.org.tandem:vol-1",
                "target_portal": "10.0.0.5:3260",
                "target_lun": 1,
                "target_iqns": ["iqn.2026-11.org.tandem:vol-1", "iqn.2026-11.org.tandem:vol-1"],
                "target_portals": ["10.0.0.5:3260", "10.0.0.6:3261"],
                "target_luns": [1, 1],
                "auth_method": "CHAP",
                "auth_username": "u",
                "auth_password": "p4ssw0rd",
                "volume_id": "6b1c0d5e-1f0a-4c9a-9a43-3f6d3c5a2b11",
                "access_mode": "rw",
                "encrypted": false
            }
        })
    }

    #[test]
    fn nested_and_flattened_shapes_parse_alike() {
        let nested = nested();
        let mut flat = nested["data"].clone();
        flat["driver_volume_type"] = json!("iscsi");
        flat["attachment_id"] = json!("a-1");
        let a = IscsiConnection::parse(&nested).expect("nested");
        let b = IscsiConnection::parse(&flat).expect("flat");
        assert_eq!(a, b);
        assert_eq!(a.primary.portal, Portal { host: "10.0.0.5".into(), port: 3260 });
        assert_eq!(a.primary.lun, 1);
        assert_eq!(a.paths.len(), 2, "the duplicate of the primary path is dropped");
        assert_eq!(a.paths[1].portal.port, 3261);
        assert_eq!(a.chap.as_ref().map(|chap| chap.username.as_str()), Some("u"));
        assert!(!format!("{a:?}").contains("p4ssw0rd"), "Debug output hides the CHAP secret");
    }

    #[test]
    fn portals() {
        let cases: &[(&str, Option<(&str, u16)>)] = &[
            ("10.0.0.1:3260", Some(("10.0.0.1", 3260))),
            ("10.0.0.1", Some(("10.0.0.1", 3260))),
            ("10.0.0.1:3261,1", Some(("10.0.0.1", 3261))),
            ("[fd00::1]:3260", Some(("fd00::1", 3260))),
            ("[fd00::1]", Some(("fd00::1", 3260))),
            ("storage-1.example:860", Some(("storage-1.example", 860))),
            ("fd00::1:3260", None),
            ("10.0.0.1:0", None),
            ("10.0.0.1:99999", None),
            (":3260", None),
            ("[fd00::1", None),
            ("host name:3260", None),
            ("", None),
        ];
        for (text, expected) in cases {
            let parsed = Portal::parse(text).ok().map(|portal| (portal.host, portal.port));
            let expected = expected.map(|(host, port)| (host.to_owned(), port));
            assert_eq!(parsed, expected, "{text:?}");
        }
        assert_eq!(Portal::parse("[fd00::1]:3260").expect("v6").to_string(), "[fd00::1]:3260");
    }

    #[test]
    fn bad_inputs_are_named_errors() {
        let mut cases: Vec<(Value, &str)> = Vec::new();
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut value = nested();
            edit(&mut value);
            value
        };
        cases.push((json!([]), "JSON object"));
        cases.push((with(&|v| v["driver_volume_type"] = json!("rbd")), "rbd"));
        cases.push((
            with(&|v| {
                v["data"].as_object_mut().map(|d| d.remove("target_iqn")).map(drop).unwrap_or(())
            }),
            "target_iqn",
        ));
        cases.push((with(&|v| v["data"]["target_iqn"] = json!("vol-1")), "target_iqn"));
        cases.push((with(&|v| v["data"]["target_iqn"] = json!("iqn.x'y")), "target_iqn"));
        cases.push((with(&|v| v["data"]["target_lun"] = json!(-1)), "target_lun"));
        cases.push((with(&|v| v["data"]["target_lun"] = json!(70000)), "target_lun"));
        cases.push((with(&|v| v["data"]["auth_method"] = json!("kerberos")), "auth_method"));
        cases.push((with(&|v| v["data"]["auth_password"] = Value::Null), "auth_password"));
        cases.push((with(&|v| v["data"]["target_portals"] = json!([3260])), "target_portals"));
        cases.push((with(&|v| v["data"]["volume_id"] = json!("a/b")), "volume_id"));
        cases.push((with(&|v| v["data"]["target_portal"] = json!(5)), "target_portal"));
        for (value, field) in cases {
            let error = IscsiConnection::parse(&value).expect_err(&value.to_string());
            assert!(error.to_string().contains(field), "{error} should name {field}");
        }
    }

    #[test]
    fn optional_fields() {
        let value = json!({"data": {"target_iqn": "iqn.a:b", "target_portal": "h", "target_lun": "3",
                                    "access_mode": "ro", "discard": true}});
        let parsed = IscsiConnection::parse(&value).expect("minimal");
        assert_eq!(parsed.primary.lun, 3);
        assert!(parsed.read_only && parsed.discard && parsed.chap.is_none());
        assert_eq!(parsed.paths.len(), 1);
    }
}

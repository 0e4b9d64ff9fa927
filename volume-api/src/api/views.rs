//! Cinder's JSON shapes for each record, by microversion.

use crate::microversion::Microversion;
use crate::model::{Attachment, Snapshot, Volume, VolumeType};
use serde_json::{Map, Value, json};

fn links(base_url: &str, collection: &str, id: &str) -> Value {
    let bookmark = base_url.replacen("/v3", "", 1);
    json!([
        {"rel": "self", "href": format!("{base_url}/{collection}/{id}")},
        {"rel": "bookmark", "href": format!("{bookmark}/{collection}/{id}")},
    ])
}

pub fn volume_summary(v: &Volume, base_url: &str) -> Value {
    json!({"id": v.id, "name": v.name, "links": links(base_url, "volumes", &v.id)})
}

/// The `attachments` entries of a volume (the legacy view inside the volume).
fn volume_attachments(v: &Volume, attachments: &[Attachment]) -> Value {
    attachments
        .iter()
        .filter(|a| a.attach_status == "attached")
        .map(|a| {
            json!({
                "server_id": a.instance_uuid,
                "attachment_id": a.id,
                "attached_at": a.attach_time,
                "host_name": a.attached_host,
                "volume_id": v.id,
                "device": a.mountpoint,
                "id": v.id,
            })
        })
        .collect()
}

pub fn volume_detail(
    v: &Volume,
    attachments: &[Attachment],
    type_name: &str,
    version: Microversion,
    is_admin: bool,
    base_url: &str,
) -> Value {
    let mut out = json!({
        "id": v.id,
        "name": v.name,
        "description": v.description,
        "size": v.size_gib,
        "status": v.status.as_str(),
        "attachments": volume_attachments(v, attachments),
        "availability_zone": v.availability_zone,
        "bootable": if v.bootable { "true" } else { "false" },
        "encrypted": false,
        "created_at": v.created_at,
        "updated_at": v.updated_at,
        "volume_type": type_name,
        "snapshot_id": v.snapshot_id,
        "source_volid": v.source_volid,
        "metadata": v.metadata,
        "links": links(base_url, "volumes", &v.id),
        "user_id": v.user_id,
        "os-vol-tenant-attr:tenant_id": v.project_id,
        "replication_status": v.replication_status,
        "consistencygroup_id": null,
        "multiattach": false,
        "migration_status": null,
    });
    let Value::Object(map) = &mut out else { unreachable!() };
    if is_admin {
        let host = v.nodes.first().map(|n| format!("{n}@tandem#tandem"));
        map.insert("os-vol-host-attr:host".into(), json!(host));
        map.insert("os-vol-mig-status-attr:migstat".into(), Value::Null);
        map.insert("os-vol-mig-status-attr:name_id".into(), Value::Null);
    }
    if version.at_least(3, 13) {
        map.insert("group_id".into(), Value::Null);
    }
    if version.at_least(3, 21) && is_admin {
        map.insert("provider_id".into(), json!(v.resource));
    }
    if version.at_least(3, 48) {
        map.insert("shared_targets".into(), json!(false));
        map.insert("service_uuid".into(), Value::Null);
    }
    if version.at_least(3, 61) && is_admin {
        map.insert("cluster_name".into(), Value::Null);
    }
    if version.at_least(3, 63) {
        map.insert("volume_type_id".into(), json!(v.volume_type_id));
    }
    if version.at_least(3, 65) {
        map.insert("consumes_quota".into(), json!(true));
    }
    out
}

pub fn snapshot(s: &Snapshot, version: Microversion) -> Value {
    let mut out = json!({
        "id": s.id,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "name": s.name,
        "description": s.description,
        "volume_id": s.volume_id,
        "status": s.status,
        "size": s.size_gib,
        "metadata": s.metadata,
        "os-extended-snapshot-attributes:progress": if s.status == "available" { "100%" } else { "0%" },
        "os-extended-snapshot-attributes:project_id": s.project_id,
    });
    let Value::Object(map) = &mut out else { unreachable!() };
    if version.at_least(3, 14) {
        map.insert("group_snapshot_id".into(), Value::Null);
    }
    if version.at_least(3, 41) {
        map.insert("user_id".into(), json!(s.user_id));
    }
    if version.at_least(3, 65) {
        map.insert("consumes_quota".into(), json!(true));
    }
    out
}

pub fn attachment_summary(a: &Attachment) -> Value {
    json!({"id": a.id, "status": a.attach_status, "instance": a.instance_uuid, "volume_id": a.volume_id})
}

pub fn attachment_detail(a: &Attachment, connection_info: Option<Value>) -> Value {
    json!({
        "id": a.id,
        "status": a.attach_status,
        "instance": a.instance_uuid,
        "volume_id": a.volume_id,
        "attached_at": a.attach_time,
        "detached_at": a.detach_time,
        "attach_mode": a.attach_mode,
        "connection_info": connection_info,
        "connector": a.connector,
    })
}

pub fn volume_type(t: &VolumeType) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "description": t.description,
        "is_public": t.is_public,
        "os-volume-type-access:is_public": t.is_public,
        "extra_specs": t.extra_specs,
        "qos_specs_id": null,
    })
}

/// connection_info as Cinder's LVM/iSCSI driver returns it from `initialize_connection`:
/// `{"driver_volume_type": "iscsi", "data": {...}}`. Portals are listed primary first; the
/// multipath lists name every replica's portal.
pub fn iscsi_connection_info(v: &Volume, access_mode: &str) -> Value {
    let portal = v.portals.first().cloned().unwrap_or_default();
    let iqns: Vec<&str> = v.portals.iter().map(|_| v.target_iqn.as_str()).collect();
    let luns: Vec<u32> = v.portals.iter().map(|_| 0).collect();
    json!({
        "driver_volume_type": "iscsi",
        "data": {
            "target_discovered": false,
            "target_iqn": v.target_iqn,
            "target_portal": portal,
            "target_lun": 0,
            "target_iqns": iqns,
            "target_portals": v.portals,
            "target_luns": luns,
            "volume_id": v.id,
            "access_mode": access_mode,
            "encrypted": false,
            "auth_method": "CHAP",
            "auth_username": v.chap_username,
            "auth_password": v.chap_secret,
            "qos_specs": null,
            "cacheable": false,
            "discard": false,
        }
    })
}

/// The attachments API's form: the `data` keys at top level, plus the driver type and the
/// attachment id (what Nova reads).
pub fn flattened_connection_info(v: &Volume, access_mode: &str, attachment_id: &str) -> Value {
    let nested = iscsi_connection_info(v, access_mode);
    let mut out: Map<String, Value> = match nested.get("data") {
        Some(Value::Object(map)) => map.clone(),
        _ => Map::new(),
    };
    out.insert("driver_volume_type".into(), json!("iscsi"));
    out.insert("attachment_id".into(), json!(attachment_id));
    Value::Object(out)
}

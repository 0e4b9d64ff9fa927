//! Quotas, limits, availability zones, services (the storage nodes), extensions, and the node
//! registry (`os-tandem-nodes`, a Tandem extension: nodes register and heartbeat there).

use super::volumes::usage;
use super::{
    ApiResult, AppState, Ctx, body_object, boolish, only_keys, opt_string, reply, reply_empty,
    take_object,
};
use crate::constants::NODES_MAX;
use crate::db::Table;
use crate::fault::Fault;
use crate::model::{Node, format_timestamp};
use crate::quota;
use crate::scheduler::is_up;
use crate::worker::now_ms;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde_json::{Map, Value, json};
use std::sync::Arc;

fn target_project(ctx: &Ctx) -> Result<String, Fault> {
    let target = ctx.param("target_project").to_string();
    if target != ctx.project() && !ctx.is_admin() {
        return Err(Fault::admin_only());
    }
    Ok(target)
}

pub async fn quota_show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let target = target_project(&ctx)?;
    let with_usage = match ctx.query("usage") {
        None => false,
        Some(v) => {
            boolish(&json!(v)).ok_or_else(|| Fault::invalid_input("usage must be a boolean"))?
        }
    };
    let (limits, used) =
        state.read(|tx| Ok((quota::limits(&tx.quota_overrides(&target)?), usage(tx, &target)?)))?;
    let mut set = Map::new();
    set.insert("id".into(), json!(target));
    for (name, limit) in &limits {
        let value = if with_usage {
            json!({"limit": limit, "in_use": used.in_use(name), "reserved": 0})
        } else {
            json!(limit)
        };
        set.insert(name.clone(), value);
    }
    reply(200, json!({ "quota_set": set }))
}

pub async fn quota_defaults(ctx: Ctx) -> ApiResult {
    let target = target_project(&ctx)?;
    let mut set = Map::new();
    set.insert("id".into(), json!(target));
    for (name, limit) in quota::DEFAULTS {
        set.insert(name.into(), json!(limit));
    }
    reply(200, json!({ "quota_set": set }))
}

pub async fn quota_update(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    ctx.require_admin()?;
    let target = ctx.param("target_project").to_string();
    let fields = take_object(body_object(body)?, "quota_set", &[])?;
    let mut updates = Vec::new();
    for (k, v) in &fields {
        if k == "tenant_id" || k == "id" {
            continue;
        }
        if !quota::is_resource(k) {
            return Err(Fault::BadRequest(format!("Bad key(s) in quota set: {k}")));
        }
        let n = match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse::<i64>().ok(),
            _ => None,
        }
        .filter(|n| *n >= -1)
        .ok_or_else(|| {
            Fault::invalid_input(format!("Quota value for {k} must be an integer of at least -1."))
        })?;
        updates.push((k.clone(), n));
    }
    let limits = state.transaction(|tx| {
        for (k, n) in &updates {
            tx.set_quota(&target, k, *n)?;
        }
        Ok(quota::limits(&tx.quota_overrides(&target)?))
    })?;
    reply(200, json!({ "quota_set": limits }))
}

pub async fn quota_delete(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    ctx.require_admin()?;
    state.db().delete_quotas(ctx.param("target_project"))?;
    reply_empty(200)
}

pub async fn limits(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let (limits, used) = state.read(|tx| {
        Ok((quota::limits(&tx.quota_overrides(ctx.project())?), usage(tx, ctx.project())?))
    })?;
    let l = |k: &str| limits.get(k).copied().unwrap_or(-1);
    reply(
        200,
        json!({"limits": {"rate": [], "absolute": {
            "maxTotalVolumes": l("volumes"),
            "maxTotalSnapshots": l("snapshots"),
            "maxTotalVolumeGigabytes": l("gigabytes"),
            "maxTotalBackups": l("backups"),
            "maxTotalBackupGigabytes": l("backup_gigabytes"),
            "totalVolumesUsed": used.volumes,
            "totalSnapshotsUsed": used.snapshots,
            "totalGigabytesUsed": used.gigabytes,
            "totalBackupsUsed": 0,
            "totalBackupGigabytesUsed": 0,
        }}}),
    )
}

fn availability_zones_list(state: &AppState) -> Result<Vec<Value>, Fault> {
    Ok(super::volumes::availability_zones(state)?
        .into_iter()
        .map(|z| json!({"zoneName": z, "zoneState": {"available": true}}))
        .collect())
}

pub async fn availability_zones(State(state): State<Arc<AppState>>, _ctx: Ctx) -> ApiResult {
    reply(200, json!({ "availabilityZoneInfo": availability_zones_list(&state)? }))
}

pub async fn services(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    ctx.require_admin()?;
    let nodes: Vec<Node> = state.db().list(Table::Nodes, None)?;
    let now = now_ms();
    let mut out = vec![json!({
        "binary": "cinder-scheduler",
        "host": state.settings.host,
        "zone": state.settings.default_availability_zone,
        "status": "enabled",
        "state": "up",
        "updated_at": format_timestamp(now),
        "disabled_reason": null,
    })];
    for n in &nodes {
        out.push(json!({
            "binary": "cinder-volume",
            "host": format!("{}@tandem", n.name),
            "zone": n.availability_zone,
            "status": if n.enabled { "enabled" } else { "disabled" },
            "state": if is_up(n, now) { "up" } else { "down" },
            "updated_at": if n.heartbeat_ms > 0 { Some(format_timestamp(n.heartbeat_ms)) } else { None },
            "disabled_reason": null,
            "replication_status": "disabled",
            "active_backend_id": null,
            "frozen": false,
        }));
    }
    let binary = ctx.query("binary");
    let host = ctx.query("host");
    out.retain(|s| binary.is_none_or(|b| s["binary"] == b) && host.is_none_or(|h| s["host"] == h));
    if ctx.version.at_least(3, 7) {
        for s in &mut out {
            s["cluster"] = Value::Null;
        }
    }
    reply(200, json!({ "services": out }))
}

pub async fn extensions(_ctx: Ctx) -> ApiResult {
    reply(200, json!({ "extensions": [] }))
}

fn node_view(n: &Node, now: u64) -> Value {
    json!({
        "name": n.name,
        "url": n.url,
        "availability_zone": n.availability_zone,
        "total_bytes": n.total_bytes,
        "free_bytes": n.free_bytes,
        "enabled": n.enabled,
        "state": if is_up(n, now) { "up" } else { "down" },
    })
}

pub async fn nodes_list(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    ctx.require_admin()?;
    let nodes: Vec<Node> = state.db().list(Table::Nodes, None)?;
    let now = now_ms();
    reply(200, json!({ "nodes": nodes.iter().map(|n| node_view(n, now)).collect::<Vec<_>>() }))
}

/// Registers a node or records its heartbeat (the same call: PUT is idempotent).
pub async fn node_register(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    ctx.require_admin()?;
    let name = ctx.param("node_name").to_string();
    let fields = take_object(body_object(body)?, "node", &[])?;
    only_keys(&fields, &["url", "availability_zone", "total_bytes", "free_bytes", "enabled"])?;
    let url = opt_string(&fields, "url", 255)?.ok_or_else(|| {
        Fault::BadRequest("Missing required element 'url' in request body.".into())
    })?;
    if !url.starts_with("http://") {
        return Err(Fault::invalid_input("url must start with http://"));
    }
    let bytes = |k: &str| -> Result<u64, Fault> {
        match fields.get(k) {
            None | Some(Value::Null) => Ok(0),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| Fault::invalid_input(format!("{k} must be a non-negative integer"))),
        }
    };
    let enabled = match fields.get("enabled") {
        None => true,
        Some(v) => boolish(v).ok_or_else(|| Fault::invalid_input("enabled must be a boolean"))?,
    };
    let now = now_ms();
    let node = Node {
        name: name.clone(),
        url,
        availability_zone: opt_string(&fields, "availability_zone", 255)?
            .unwrap_or_else(|| state.settings.default_availability_zone.clone()),
        total_bytes: bytes("total_bytes")?,
        free_bytes: bytes("free_bytes")?,
        heartbeat_ms: now,
        enabled,
    };
    state.transaction(|tx| {
        if tx.get_for_update::<Node>(Table::Nodes, &name)?.is_none()
            && tx.list::<Node>(Table::Nodes, None)?.len() >= NODES_MAX
        {
            return Err(Fault::OverLimit(format!("At most {NODES_MAX} nodes can be registered.")));
        }
        Ok(tx.put(Table::Nodes, &name, "", None, "", &node)?)
    })?;
    reply(200, json!({ "node": node_view(&node, now) }))
}

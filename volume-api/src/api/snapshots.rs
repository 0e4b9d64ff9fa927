//! `/snapshots`: create (asynchronous), list, detail, show, update, delete, metadata.

use super::volumes::{check_quota, load as load_volume};
use super::{
    ApiResult, AppState, Ctx, body_object, boolish, metadata, metadata_body, only_keys, opt_string,
    reply, reply_empty, take_object, views,
};
use crate::constants::{DESCRIPTION_BYTES_MAX, NAME_BYTES_MAX, PAGE_SIZE_MAX};
use crate::db::Table;
use crate::fault::Fault;
use crate::model::Volume;
use crate::model::{self, Snapshot};
use crate::quota;
use crate::status::{self, Action, Facts, VolumeStatus};
use crate::worker::{self, now_text, update_snapshot};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde_json::{Value, json};
use std::sync::Arc;

fn load(state: &AppState, ctx: &Ctx, id: &str) -> Result<Snapshot, Fault> {
    let s = state
        .db()
        .get::<Snapshot>(Table::Snapshots, id)?
        .ok_or_else(|| Fault::snapshot_not_found(id))?;
    if s.project_id != ctx.project() && !ctx.is_admin() {
        return Err(Fault::snapshot_not_found(id));
    }
    Ok(s)
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let fields = take_object(body_object(body)?, "snapshot", &[])?;
    only_keys(
        &fields,
        &[
            "volume_id",
            "force",
            "name",
            "description",
            "display_name",
            "display_description",
            "metadata",
        ],
    )?;
    let volume_id = opt_string(&fields, "volume_id", 36)?.ok_or_else(|| {
        Fault::BadRequest("Missing required element 'volume_id' in request body.".into())
    })?;
    let force = match fields.get("force") {
        None | Some(Value::Null) => false,
        Some(v) => boolish(v).ok_or_else(|| Fault::invalid_input("force must be a boolean"))?,
    };
    let name = opt_string(&fields, "name", NAME_BYTES_MAX)?.or(opt_string(
        &fields,
        "display_name",
        NAME_BYTES_MAX,
    )?);
    let description = opt_string(&fields, "description", DESCRIPTION_BYTES_MAX)?.or(opt_string(
        &fields,
        "display_description",
        DESCRIPTION_BYTES_MAX,
    )?);
    let meta = metadata(fields.get("metadata"), "metadata")?.unwrap_or_default();
    let v = load_volume(&state, &ctx, &volume_id)?;
    let size = i64::try_from(v.size_gib).unwrap_or(i64::MAX);
    let s = Snapshot {
        id: model::new_uuid(),
        project_id: ctx.project().to_string(),
        user_id: ctx.principal.user_id.clone(),
        volume_id: v.id.clone(),
        name,
        description,
        size_gib: v.size_gib,
        status: "creating".into(),
        metadata: meta,
        created_at: now_text(),
        updated_at: None,
    };
    // Quota, the volume's status (locked: no delete or extend slips in) and the insert with
    // its operation's lease, in one transaction.
    state.transaction(|tx| {
        tx.lock_project(ctx.project())?;
        let v = tx
            .get_for_update::<Volume>(Table::Volumes, &volume_id)?
            .ok_or_else(|| Fault::volume_not_found(&volume_id))?;
        status::transition(v.status, Action::Snapshot, Facts::default())
            .map_err(|e| Fault::invalid_volume(e.0))?;
        if v.status == VolumeStatus::InUse && !force {
            return Err(Fault::invalid_volume(
                "Volume status must be available to create a snapshot without force, but current status is: in-use.",
            ));
        }
        check_quota(
            tx,
            ctx.project(),
            quota::Delta { snapshots: 1, gigabytes: size, ..quota::Delta::default() },
        )?;
        tx.put(Table::Snapshots, &s.id, &s.project_id, Some(&s.volume_id), &s.created_at, &s)?;
        worker::take_lease(tx, &state, Table::Snapshots, &s.id)
    })?;
    worker::create_snapshot(&state, s.id.clone());
    reply(202, json!({ "snapshot": views::snapshot(&s, ctx.version) }))
}

fn select(state: &AppState, ctx: &Ctx) -> Result<Vec<Snapshot>, Fault> {
    let all_tenants = ctx.query("all_tenants").and_then(|v| boolish(&json!(v))).unwrap_or(false)
        && ctx.is_admin();
    let scope = if all_tenants { None } else { Some(ctx.project()) };
    let mut list: Vec<Snapshot> = state.db().list(Table::Snapshots, scope)?;
    for (k, value) in &ctx.query {
        match k.as_str() {
            "volume_id" => list.retain(|s| &s.volume_id == value),
            "status" => list.retain(|s| &s.status == value),
            "name" | "display_name" => list.retain(|s| s.name.as_deref() == Some(value.as_str())),
            _ => {}
        }
    }
    list.reverse();
    if let Some(marker) = ctx.query("marker") {
        let pos = list
            .iter()
            .position(|s| s.id == marker)
            .ok_or_else(|| Fault::NotFound(format!("Marker {marker} could not be found.")))?;
        list.drain(..=pos);
    }
    let limit = match ctx.query("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| Fault::invalid_input("limit must be a non-negative integer"))?
            .min(PAGE_SIZE_MAX),
        None => PAGE_SIZE_MAX,
    };
    list.truncate(limit);
    Ok(list)
}

pub async fn list_summary(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let list = select(&state, &ctx)?;
    reply(
        200,
        json!({ "snapshots": list.iter().map(|s| views::snapshot(s, ctx.version)).collect::<Vec<_>>() }),
    )
}

pub async fn list_detail(state: State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    list_summary(state, ctx).await
}

pub async fn show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let s = load(&state, &ctx, ctx.param("snapshot_id"))?;
    reply(200, json!({ "snapshot": views::snapshot(&s, ctx.version) }))
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let s = load(&state, &ctx, ctx.param("snapshot_id"))?;
    let fields = take_object(body_object(body)?, "snapshot", &[])?;
    only_keys(&fields, &["name", "description", "display_name", "display_description"])?;
    if fields.is_empty() {
        return Err(Fault::BadRequest(
            "Invalid input for field/attribute snapshot. Value should have at least one property."
                .into(),
        ));
    }
    let name = opt_string(&fields, "name", NAME_BYTES_MAX)?.or(opt_string(
        &fields,
        "display_name",
        NAME_BYTES_MAX,
    )?);
    let description = opt_string(&fields, "description", DESCRIPTION_BYTES_MAX)?.or(opt_string(
        &fields,
        "display_description",
        DESCRIPTION_BYTES_MAX,
    )?);
    let has = |k: &str| fields.contains_key(k);
    let s = update_snapshot(&state, &s.id, |s| {
        if has("name") || has("display_name") {
            s.name = name;
        }
        if has("description") || has("display_description") {
            s.description = description;
        }
    })?
    .ok_or_else(|| Fault::snapshot_not_found(ctx.param("snapshot_id")))?;
    reply(200, json!({ "snapshot": views::snapshot(&s, ctx.version) }))
}

pub async fn delete(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let s = load(&state, &ctx, ctx.param("snapshot_id"))?;
    if !matches!(s.status.as_str(), "available" | "error" | "error_deleting") {
        return Err(Fault::BadRequest(format!(
            "Invalid snapshot: Snapshot status must be available or error, but is {}.",
            s.status
        )));
    }
    state.transaction(|tx| {
        // Locked first: a create from this snapshot either committed (and is seen below) or
        // waits and then finds it deleting.
        worker::change_snapshot(
            tx,
            &state,
            &s.id,
            Some(&["available", "error", "error_deleting"]),
            |s| s.status = "deleting".into(),
        )?;
        // A volume being created from this snapshot still needs it.
        let vols: Vec<Volume> = tx.list(Table::Volumes, Some(&s.project_id))?;
        if vols.iter().any(|v| {
            v.snapshot_id.as_deref() == Some(s.id.as_str()) && v.status == VolumeStatus::Creating
        }) {
            return Err(Fault::BadRequest(
                "Invalid snapshot: a volume is being created from it.".into(),
            ));
        }
        Ok(())
    })?;
    worker::delete_snapshot(&state, s.id);
    reply_empty(202)
}

pub async fn metadata_show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let s = load(&state, &ctx, ctx.param("snapshot_id"))?;
    reply(200, json!({ "metadata": s.metadata }))
}

async fn metadata_set(
    state: Arc<AppState>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
    replace: bool,
) -> ApiResult {
    let s = load(&state, &ctx, ctx.param("snapshot_id"))?;
    let merged = metadata_body::merged(&s.metadata, body, replace)?;
    let s = update_snapshot(&state, &s.id, |s| s.metadata = merged)?
        .ok_or_else(|| Fault::snapshot_not_found(&s.id))?;
    reply(200, json!({ "metadata": s.metadata }))
}

pub async fn metadata_merge(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    metadata_set(state, ctx, body, false).await
}

pub async fn metadata_replace(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    metadata_set(state, ctx, body, true).await
}

pub async fn metadata_item_show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let s = load(&state, &ctx, ctx.param("snapshot_id"))?;
    let key = ctx.param("key");
    let value = metadata_body::existing(&s.metadata, key)?;
    reply(200, json!({ "meta": { key: value } }))
}

pub async fn metadata_item_put(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let s = load(&state, &ctx, ctx.param("snapshot_id"))?;
    let key = ctx.param("key").to_string();
    let value = metadata_body::item_value(&s.metadata, &key, body)?;
    update_snapshot(&state, &s.id, |s| {
        s.metadata.insert(key.clone(), value.clone());
    })?;
    reply(200, json!({ "meta": { key: value } }))
}

pub async fn metadata_item_delete(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let s = load(&state, &ctx, ctx.param("snapshot_id"))?;
    let key = ctx.param("key").to_string();
    metadata_body::existing(&s.metadata, &key)?;
    update_snapshot(&state, &s.id, |s| {
        s.metadata.remove(&key);
    })?;
    reply(200, json!({}))
}

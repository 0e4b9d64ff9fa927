//! `/volumes`: create, list, show, update, delete, metadata and the `action` endpoint.

use super::views;
use super::{
    ApiResult, AppState, Ctx, body_object, boolish, metadata, metadata_body, only_keys, opt_string,
    reply, reply_empty, size_gib, take_object,
};
use crate::constants::{DESCRIPTION_BYTES_MAX, NAME_BYTES_MAX, PAGE_SIZE_MAX};
use crate::db::{Table, Tx};
use crate::fault::Fault;
use crate::model::{self, Attachment, Snapshot, Volume, VolumeType};
use crate::quota;
use crate::status::{self, Action, AttachStatus, Facts, VolumeStatus};
use crate::worker::{self, now_text, update_volume, update_volume_from};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// The volume `id` as the caller may see it: other projects' volumes do not exist for members.
pub fn load(state: &AppState, ctx: &Ctx, id: &str) -> Result<Volume, Fault> {
    let v =
        state.db().get::<Volume>(Table::Volumes, id)?.ok_or_else(|| Fault::volume_not_found(id))?;
    if v.project_id != ctx.project() && !ctx.is_admin() {
        return Err(Fault::volume_not_found(id));
    }
    Ok(v)
}

/// Attachments of a volume that still hold it (not detached).
pub fn live_attachments(state: &AppState, volume_id: &str) -> Result<Vec<Attachment>, Fault> {
    let all: Vec<Attachment> = state.db().list_by_parent(Table::Attachments, volume_id)?;
    Ok(all.into_iter().filter(|a| a.attach_status != "detached").collect())
}

pub fn type_by_id_or_name(state: &AppState, key: &str) -> Result<Option<VolumeType>, Fault> {
    if let Some(t) = state.db().get::<VolumeType>(Table::VolumeTypes, key)? {
        return Ok(Some(t));
    }
    let all: Vec<VolumeType> = state.db().list(Table::VolumeTypes, None)?;
    Ok(all.into_iter().find(|t| t.name == key))
}

fn type_name(state: &AppState, id: &str) -> String {
    state
        .db()
        .get::<VolumeType>(Table::VolumeTypes, id)
        .ok()
        .flatten()
        .map(|t| t.name)
        .unwrap_or_default()
}

pub fn detail(state: &AppState, ctx: &Ctx, v: &Volume) -> Result<Value, Fault> {
    let attachments = live_attachments(state, &v.id)?;
    Ok(views::volume_detail(
        v,
        &attachments,
        &type_name(state, &v.volume_type_id),
        ctx.version,
        ctx.is_admin(),
        &ctx.base_url,
    ))
}

/// Usage of a project for quota checks: every volume and snapshot record counts.
pub fn usage(tx: &mut Tx<'_>, project: &str) -> Result<quota::Usage, Fault> {
    let volumes: Vec<Volume> = tx.list(Table::Volumes, Some(project))?;
    let snaps: Vec<Snapshot> = tx.list(Table::Snapshots, Some(project))?;
    let size = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Ok(quota::Usage {
        volumes: i64::try_from(volumes.len()).unwrap_or(i64::MAX),
        gigabytes: volumes.iter().map(|v| size(v.size_gib)).sum::<i64>()
            + snaps.iter().map(|s| size(s.size_gib)).sum::<i64>(),
        snapshots: i64::try_from(snaps.len()).unwrap_or(i64::MAX),
    })
}

/// Checks that `delta` fits the project's quota. Call it in the transaction that writes the
/// change, after `Tx::lock_project`, so concurrent requests (in any instance) cannot both fit
/// into the last free unit.
pub fn check_quota(tx: &mut Tx<'_>, project: &str, delta: quota::Delta) -> Result<(), Fault> {
    let limits = quota::limits(&tx.quota_overrides(project)?);
    quota::check(&limits, usage(tx, project)?, delta).map_err(|e| Fault::OverLimit(e.to_string()))
}

pub fn availability_zones(state: &AppState) -> Result<Vec<String>, Fault> {
    let nodes: Vec<model::Node> = state.db().list(Table::Nodes, None)?;
    let mut zones: Vec<String> = nodes.into_iter().map(|n| n.availability_zone).collect();
    zones.push(state.settings.default_availability_zone.clone());
    zones.sort();
    zones.dedup();
    Ok(zones)
}

/// Cinder's create keys; others are ignored, as Cinder's schema allows additional properties
/// inside `volume`.
const CREATE_KEYS_REJECTED_WHEN_SET: &[&str] =
    &["imageRef", "image_id", "backup_id", "consistencygroup_id", "group_id"];

pub async fn create(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let vol = take_object(body_object(body)?, "volume", &["OS-SCH-HNT:scheduler_hints"])?;
    for key in CREATE_KEYS_REJECTED_WHEN_SET {
        if vol.get(*key).is_some_and(|v| !v.is_null()) {
            return Err(Fault::BadRequest(format!(
                "Invalid input for field/attribute {key}. Tandem does not support it."
            )));
        }
    }
    let multiattach = match vol.get("multiattach") {
        None | Some(Value::Null) => false,
        Some(m) => {
            boolish(m).ok_or_else(|| Fault::invalid_input("multiattach must be a boolean"))?
        }
    };
    if multiattach {
        return Err(Fault::BadRequest(
            "Invalid input for field/attribute multiattach. Multiattach volumes are not supported."
                .into(),
        ));
    }
    let name = opt_string(&vol, "name", NAME_BYTES_MAX)?.or(opt_string(
        &vol,
        "display_name",
        NAME_BYTES_MAX,
    )?);
    let description = opt_string(&vol, "description", DESCRIPTION_BYTES_MAX)?.or(opt_string(
        &vol,
        "display_description",
        DESCRIPTION_BYTES_MAX,
    )?);
    let snapshot_id = opt_string(&vol, "snapshot_id", 36)?;
    let source_volid = opt_string(&vol, "source_volid", 36)?;
    if snapshot_id.is_some() && source_volid.is_some() {
        return Err(Fault::invalid_input("snapshot_id and source_volid are mutually exclusive"));
    }
    let meta = metadata(vol.get("metadata"), "metadata")?.unwrap_or_default();
    // The source decides the minimum size and, absent a size, the size.
    let mut source_size = None;
    let mut source_volume = None;
    if let Some(sid) = &snapshot_id {
        let snap = state.db().get::<Snapshot>(Table::Snapshots, sid)?;
        let snap = snap
            .filter(|s| s.project_id == ctx.project() || ctx.is_admin())
            .ok_or_else(|| Fault::snapshot_not_found(sid))?;
        if snap.status != "available" {
            return Err(Fault::BadRequest(format!(
                "Invalid snapshot: Originating snapshot status must be one of 'available' values, but is {}.",
                snap.status
            )));
        }
        source_size = Some(snap.size_gib);
        source_volume = state.db().get::<Volume>(Table::Volumes, &snap.volume_id)?;
    }
    if let Some(vid) = &source_volid {
        let src = load(&state, &ctx, vid)?;
        status::transition(src.status, Action::Clone, Facts::default())
            .map_err(|e| Fault::invalid_volume(e.0))?;
        source_size = Some(src.size_gib);
        source_volume = Some(src);
    }
    let size = match (vol.get("size"), source_size) {
        (None | Some(Value::Null), Some(s)) => s,
        (value, _) => size_gib(value, "size")?,
    };
    if let Some(min) = source_size.filter(|min| size < *min) {
        return Err(Fault::invalid_input(format!(
            "Volume size '{size}'GB cannot be smaller than the source size {min}GB."
        )));
    }
    let volume_type = match opt_string(&vol, "volume_type", NAME_BYTES_MAX)? {
        Some(t) => type_by_id_or_name(&state, &t)?.ok_or_else(|| Fault::type_not_found(&t))?,
        None => match &source_volume {
            Some(src) => state
                .db()
                .get::<VolumeType>(Table::VolumeTypes, &src.volume_type_id)?
                .ok_or_else(|| Fault::type_not_found(&src.volume_type_id))?,
            None => state
                .db()
                .get::<VolumeType>(Table::VolumeTypes, model::DEFAULT_TYPE_ID)?
                .ok_or_else(|| Fault::type_not_found(model::DEFAULT_TYPE_NAME))?,
        },
    };
    let zone = match opt_string(&vol, "availability_zone", NAME_BYTES_MAX)? {
        Some(z) => {
            if !availability_zones(&state)?.contains(&z) {
                return Err(Fault::BadRequest(format!(
                    "Invalid input received: Availability zone '{z}' is invalid."
                )));
            }
            z
        }
        None => source_volume
            .as_ref()
            .map(|s| s.availability_zone.clone())
            .unwrap_or_else(|| state.settings.default_availability_zone.clone()),
    };
    let id = model::new_uuid();
    let now = now_text();
    let v = Volume {
        id: id.clone(),
        project_id: ctx.project().to_string(),
        user_id: ctx.principal.user_id.clone(),
        name,
        description,
        size_gib: size,
        status: VolumeStatus::Creating,
        attach_status: AttachStatus::Detached,
        replication_status: "disabled".into(),
        volume_type_id: volume_type.id.clone(),
        availability_zone: zone,
        metadata: meta,
        bootable: false,
        snapshot_id,
        source_volid,
        created_at: now,
        updated_at: None,
        nodes: Vec::new(),
        tiebreaker: None,
        resource: format!("volume-{id}"),
        target_iqn: format!("iqn.2026-11.org.tandem:volume-{id}"),
        chap_username: model::new_secret(20),
        chap_secret: model::new_secret(16),
        portals: Vec::new(),
        status_before: None,
        extend_to_gib: None,
        error: None,
    };
    // Quota check, insert and the create operation's lease in one transaction: racing
    // creates in any instance cannot both take the last unit of quota, and no reconciler
    // can start the operation before this instance does.
    let size_i64 = i64::try_from(size).unwrap_or(i64::MAX);
    state.transaction(|tx| {
        tx.lock_project(ctx.project())?;
        if let Some(sid) = &v.snapshot_id {
            // Locked and checked again: a concurrent delete of the snapshot waits or wins.
            let snap = tx.get_for_update::<Snapshot>(Table::Snapshots, sid)?;
            if snap.is_none_or(|s| s.status != "available") {
                return Err(Fault::BadRequest(
                    "Invalid snapshot: Originating snapshot status must be available.".into(),
                ));
            }
        }
        check_quota(
            tx,
            ctx.project(),
            quota::Delta {
                volumes: 1,
                gigabytes: size_i64,
                snapshots: 0,
                volume_size_gib: size_i64,
            },
        )?;
        tx.put(Table::Volumes, &v.id, &v.project_id, None, &v.created_at, &v)?;
        worker::take_lease(tx, &state, Table::Volumes, &v.id)
    })?;
    worker::create_volume(&state, id);
    reply(202, json!({ "volume": detail(&state, &ctx, &v)? }))
}

/// The volumes a list request selects: project scope, filters, sort and pagination.
fn select(state: &AppState, ctx: &Ctx) -> Result<(Vec<Volume>, bool), Fault> {
    let all_tenants = ctx.query("all_tenants").and_then(|v| boolish(&json!(v))).unwrap_or(false)
        && ctx.is_admin();
    let scope = if all_tenants {
        ctx.query("project_id").map(str::to_string)
    } else {
        Some(ctx.project().to_string())
    };
    let mut vols: Vec<Volume> = state.db().list(Table::Volumes, scope.as_deref())?;
    for (key, value) in &ctx.query {
        match key.as_str() {
            "name" | "display_name" => vols.retain(|v| v.name.as_deref() == Some(value.as_str())),
            "name~" => {
                vols.retain(|v| v.name.as_deref().is_some_and(|n| n.contains(value.as_str())))
            }
            "status" => vols.retain(|v| v.status.as_str() == value),
            "availability_zone" => vols.retain(|v| &v.availability_zone == value),
            "bootable" => {
                let b = boolish(&json!(value))
                    .ok_or_else(|| Fault::invalid_input("bootable must be a boolean"))?;
                vols.retain(|v| v.bootable == b)
            }
            "metadata" => {
                let wanted: Map<String, Value> = serde_json::from_str(value)
                    .map_err(|_| Fault::invalid_input("metadata filter must be a JSON object"))?;
                vols.retain(|v| {
                    wanted
                        .iter()
                        .all(|(k, w)| v.metadata.get(k).map(|x| json!(x)) == Some(w.clone()))
                });
            }
            "volume_type" => {
                let t = type_by_id_or_name(state, value)?.map(|t| t.id).unwrap_or_default();
                vols.retain(|v| v.volume_type_id == t)
            }
            _ => {}
        }
    }
    // sort=key:dir,key:dir or sort_key/sort_dir; newest first by default, as Cinder.
    let mut keys: Vec<(String, bool)> = Vec::new();
    if let Some(sort) = ctx.query("sort") {
        for part in sort.split(',') {
            let (k, d) = part.split_once(':').unwrap_or((part, "desc"));
            keys.push((k.trim().to_string(), parse_dir(d)?));
        }
    } else if let Some(k) = ctx.query("sort_key") {
        keys.push((k.to_string(), parse_dir(ctx.query("sort_dir").unwrap_or("desc"))?));
    }
    keys.push(("created_at".into(), true));
    keys.push(("id".into(), true));
    for (k, _) in &keys {
        if !matches!(
            k.as_str(),
            "created_at"
                | "id"
                | "name"
                | "display_name"
                | "size"
                | "status"
                | "updated_at"
                | "availability_zone"
        ) {
            return Err(Fault::invalid_input(format!("Invalid sort key {k}")));
        }
    }
    vols.sort_by(|a, b| {
        for (k, desc) in &keys {
            let ord = match k.as_str() {
                "name" | "display_name" => a.name.cmp(&b.name),
                "size" => a.size_gib.cmp(&b.size_gib),
                "status" => a.status.as_str().cmp(b.status.as_str()),
                "updated_at" => a.updated_at.cmp(&b.updated_at),
                "availability_zone" => a.availability_zone.cmp(&b.availability_zone),
                "id" => a.id.cmp(&b.id),
                _ => a.created_at.cmp(&b.created_at),
            };
            let ord = if *desc { ord.reverse() } else { ord };
            if ord.is_ne() {
                return ord;
            }
        }
        std::cmp::Ordering::Equal
    });
    if let Some(marker) = ctx.query("marker") {
        let pos = vols
            .iter()
            .position(|v| v.id == marker)
            .ok_or_else(|| Fault::NotFound(format!("Marker {marker} could not be found.")))?;
        vols.drain(..=pos);
    }
    if let Some(offset) = ctx.query("offset") {
        let n: usize = offset
            .parse()
            .map_err(|_| Fault::invalid_input("offset must be a non-negative integer"))?;
        vols.drain(..n.min(vols.len()));
    }
    let limit = match ctx.query("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| Fault::invalid_input("limit must be a non-negative integer"))?
            .min(PAGE_SIZE_MAX),
        None => PAGE_SIZE_MAX,
    };
    let more = vols.len() > limit;
    vols.truncate(limit);
    Ok((vols, more && limit > 0))
}

fn parse_dir(d: &str) -> Result<bool, Fault> {
    match d.trim() {
        "desc" => Ok(true),
        "asc" => Ok(false),
        other => Err(Fault::invalid_input(format!("Invalid sort direction {other}"))),
    }
}

fn next_link(ctx: &Ctx, path: &str, vols: &[Volume]) -> Option<Value> {
    let last = vols.last()?;
    let limit = ctx.query("limit").unwrap_or("1000");
    Some(
        json!([{"rel": "next", "href": format!("{}/{path}?limit={limit}&marker={}", ctx.base_url, last.id)}]),
    )
}

pub async fn list_summary(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let (vols, more) = select(&state, &ctx)?;
    let mut body = json!({"volumes": vols.iter().map(|v| views::volume_summary(v, &ctx.base_url)).collect::<Vec<_>>()});
    if more {
        body["volumes_links"] = next_link(&ctx, "volumes", &vols).unwrap_or(Value::Null);
    }
    reply(200, body)
}

pub async fn list_detail(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let (vols, more) = select(&state, &ctx)?;
    let details = vols.iter().map(|v| detail(&state, &ctx, v)).collect::<Result<Vec<_>, _>>()?;
    let mut body = json!({ "volumes": details });
    if more {
        body["volumes_links"] = next_link(&ctx, "volumes/detail", &vols).unwrap_or(Value::Null);
    }
    reply(200, body)
}

pub async fn show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    reply(200, json!({ "volume": detail(&state, &ctx, &v)? }))
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    let fields = take_object(body_object(body)?, "volume", &[])?;
    only_keys(
        &fields,
        &["name", "description", "display_name", "display_description", "metadata"],
    )?;
    if fields.is_empty() {
        return Err(Fault::BadRequest(
            "Invalid input for field/attribute volume. Value should have at least one property."
                .into(),
        ));
    }
    status::transition(v.status, Action::Update, Facts::default())
        .map_err(|e| Fault::invalid_volume(e.0))?;
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
    let meta = metadata(fields.get("metadata"), "metadata")?;
    let has = |k: &str| fields.contains_key(k);
    let v = update_volume(&state, &v.id, |v| {
        if has("name") || has("display_name") {
            v.name = name;
        }
        if has("description") || has("display_description") {
            v.description = description;
        }
        if let Some(m) = meta {
            v.metadata = m;
        }
    })?
    .ok_or_else(|| Fault::volume_not_found(ctx.param("volume_id")))?;
    reply(200, json!({ "volume": detail(&state, &ctx, &v)? }))
}

pub async fn delete(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    let flag = |name: &str| -> Result<bool, Fault> {
        match ctx.query(name) {
            None => Ok(false),
            Some(s) => boolish(&json!(s))
                .ok_or_else(|| Fault::invalid_input(format!("{name} must be a boolean"))),
        }
    };
    let cascade = flag("cascade")?;
    let force = flag("force")?;
    if force {
        ctx.require_admin()?;
    }
    let attachments = live_attachments(&state, &v.id)?.len();
    let snaps: Vec<Snapshot> = state.db().list_by_parent(Table::Snapshots, &v.id)?;
    if cascade
        && snaps
            .iter()
            .any(|s| !matches!(s.status.as_str(), "available" | "error" | "error_deleting"))
    {
        return Err(Fault::invalid_volume(
            "Snapshots must be available or error to be deleted with cascade.",
        ));
    }
    let facts =
        Facts { other_attachments: attachments, snapshots: if cascade { 0 } else { snaps.len() } };
    let next = match status::transition(v.status, Action::Delete, facts) {
        Ok(next) => next,
        // A forced delete takes any status but an attached one.
        Err(_) if force && attachments == 0 && (cascade || snaps.is_empty()) => {
            VolumeStatus::Deleting
        }
        Err(e) => return Err(Fault::invalid_volume(e.0)),
    };
    // The volume's move and its snapshots' in one step; the volume's delete operation owns
    // them all (a cascading delete removes the snapshots itself).
    state.transaction(|tx| {
        worker::change_volume(tx, &state, &v.id, Some(v.status), |v| v.status = next)?;
        if cascade {
            for s in &snaps {
                worker::change_snapshot(tx, &state, &s.id, None, |s| s.status = "deleting".into())?;
                tx.release(Table::Snapshots, &s.id, &state.instance_id)?;
            }
        } else if tx.count_by_parent(Table::Snapshots, &v.id)? > 0 {
            return Err(Fault::invalid_volume("Volume still has dependent snapshots."));
        }
        Ok(())
    })?;
    worker::delete_volume(&state, v.id);
    reply_empty(202)
}

// ---- metadata ----

pub async fn metadata_show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    reply(200, json!({ "metadata": v.metadata }))
}

async fn metadata_set(
    state: Arc<AppState>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
    replace: bool,
) -> ApiResult {
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    let merged = metadata_body::merged(&v.metadata, body, replace)?;
    let v = update_volume(&state, &v.id, |v| v.metadata = merged)?
        .ok_or_else(|| Fault::volume_not_found(&v.id))?;
    reply(200, json!({ "metadata": v.metadata }))
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
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    let key = ctx.param("key");
    let value = metadata_body::existing(&v.metadata, key)?;
    reply(200, json!({ "meta": { key: value } }))
}

pub async fn metadata_item_put(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    let key = ctx.param("key").to_string();
    let value = metadata_body::item_value(&v.metadata, &key, body)?;
    update_volume(&state, &v.id, |v| {
        v.metadata.insert(key.clone(), value.clone());
    })?;
    reply(200, json!({ "meta": { key: value } }))
}

pub async fn metadata_item_delete(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    let key = ctx.param("key").to_string();
    metadata_body::existing(&v.metadata, &key)?;
    update_volume(&state, &v.id, |v| {
        v.metadata.remove(&key);
    })?;
    reply(200, json!({}))
}

// ---- actions ----

fn apply(state: &AppState, v: &Volume, action: Action, facts: Facts) -> Result<Volume, Fault> {
    let next =
        status::transition(v.status, action, facts).map_err(|e| Fault::invalid_volume(e.0))?;
    let live = facts.other_attachments;
    update_volume_from(state, &v.id, v.status, |v| {
        v.status = next;
        v.attach_status = status::attach_status_for(next, live);
    })
}

fn connector_of(args: &Value) -> Result<Map<String, Value>, Fault> {
    match args.get("connector") {
        Some(Value::Object(c)) => Ok(c.clone()),
        Some(_) => Err(Fault::BadRequest(
            "Invalid input for field/attribute connector. Value should be an object.".into(),
        )),
        None => Err(Fault::BadRequest("Must specify 'connector'.".into())),
    }
}

pub fn require_exported(v: &Volume) -> Result<(), Fault> {
    if v.portals.is_empty() {
        return Err(Fault::invalid_volume(format!(
            "Volume {} is not exported (status {}).",
            v.id, v.status
        )));
    }
    Ok(())
}

pub async fn action(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let v = load(&state, &ctx, ctx.param("volume_id"))?;
    let body = body_object(body)?;
    if body.len() != 1 {
        return Err(Fault::BadRequest(
            "There is either no action or more than one action in the request body.".into(),
        ));
    }
    let Some((name, args)) = body.into_iter().next() else { unreachable!() };
    let args_obj = || -> Result<Map<String, Value>, Fault> {
        match &args {
            Value::Object(m) => Ok(m.clone()),
            Value::Null => Ok(Map::new()),
            _ => Err(Fault::BadRequest(format!(
                "Invalid input for field/attribute {name}. Value should be an object."
            ))),
        }
    };
    let live = live_attachments(&state, &v.id)?;
    match name.as_str() {
        "os-extend" => {
            let a = args_obj()?;
            only_keys(&a, &["new_size"])?;
            let new_size = size_gib(a.get("new_size"), "new_size")?;
            if new_size <= v.size_gib {
                return Err(Fault::invalid_input(format!(
                    "New size for extend must be greater than current size. (current: {}, extended: {new_size}).",
                    v.size_gib
                )));
            }
            if v.status == VolumeStatus::InUse && !ctx.version.at_least(3, 42) {
                return Err(Fault::invalid_volume(
                    "Volume status must be available to extend, but current status is: in-use.",
                ));
            }
            let next = status::transition(v.status, Action::Extend, Facts::default())
                .map_err(|e| Fault::invalid_volume(e.0))?;
            let add = i64::try_from(new_size - v.size_gib).unwrap_or(i64::MAX);
            let before = v.status;
            state.transaction(|tx| {
                tx.lock_project(&v.project_id)?;
                check_quota(
                    tx,
                    &v.project_id,
                    quota::Delta {
                        gigabytes: add,
                        volume_size_gib: i64::try_from(new_size).unwrap_or(i64::MAX),
                        ..quota::Delta::default()
                    },
                )?;
                worker::change_volume(tx, &state, &v.id, Some(before), |v| {
                    v.status = next;
                    v.status_before = Some(before);
                    v.extend_to_gib = Some(new_size);
                })
            })?;
            worker::extend_volume(&state, v.id, new_size);
            reply_empty(202)
        }
        "os-reset_status" => {
            ctx.require_admin()?;
            let a = args_obj()?;
            only_keys(&a, &["status", "attach_status", "migration_status"])?;
            let new_status =
                match a.get("status") {
                    None => None,
                    Some(Value::String(s)) => Some(s.parse::<VolumeStatus>().map_err(|_| {
                        Fault::invalid_input(format!("'{s}' is not a valid status"))
                    })?),
                    Some(_) => return Err(Fault::invalid_input("status must be a string")),
                };
            let new_attach = match a.get("attach_status") {
                None => None,
                Some(Value::String(s)) if s == "attached" => Some(AttachStatus::Attached),
                Some(Value::String(s)) if s == "detached" => Some(AttachStatus::Detached),
                Some(_) => {
                    return Err(Fault::invalid_input("attach_status must be attached or detached"));
                }
            };
            if new_status.is_none() && new_attach.is_none() {
                return Err(Fault::BadRequest(
                    "Must specify 'status', 'attach_status' or 'migration_status' for update."
                        .into(),
                ));
            }
            update_volume(&state, &v.id, |v| {
                if let Some(s) = new_status {
                    v.status = s;
                }
                if let Some(a) = new_attach {
                    v.attach_status = a;
                }
            })?;
            reply_empty(202)
        }
        "os-reserve" => {
            apply(
                &state,
                &v,
                Action::Reserve,
                Facts { other_attachments: live.len(), snapshots: 0 },
            )?;
            reply_empty(202)
        }
        "os-unreserve" => {
            apply(
                &state,
                &v,
                Action::Unreserve,
                Facts { other_attachments: live.len(), snapshots: 0 },
            )?;
            reply_empty(202)
        }
        "os-begin_detaching" => {
            apply(
                &state,
                &v,
                Action::BeginDetaching,
                Facts { other_attachments: live.len(), snapshots: 0 },
            )?;
            reply_empty(202)
        }
        "os-roll_detaching" => {
            apply(
                &state,
                &v,
                Action::RollDetaching,
                Facts { other_attachments: live.len(), snapshots: 0 },
            )?;
            reply_empty(202)
        }
        "os-initialize_connection" => {
            let a = args_obj()?;
            connector_of(&Value::Object(a))?;
            require_exported(&v)?;
            if matches!(
                v.status,
                VolumeStatus::Creating
                    | VolumeStatus::Deleting
                    | VolumeStatus::Error
                    | VolumeStatus::ErrorDeleting
                    | VolumeStatus::Maintenance
            ) {
                return Err(Fault::invalid_volume(format!(
                    "Volume {} cannot be connected in status {}.",
                    v.id, v.status
                )));
            }
            reply(200, json!({ "connection_info": views::iscsi_connection_info(&v, "rw") }))
        }
        "os-terminate_connection" => {
            let a = args_obj()?;
            connector_of(&Value::Object(a))?;
            reply_empty(202)
        }
        "os-attach" => {
            let a = args_obj()?;
            only_keys(&a, &["instance_uuid", "host_name", "mountpoint", "mode"])?;
            let mode = opt_string(&a, "mode", 2)?.unwrap_or_else(|| "rw".into());
            if mode != "rw" && mode != "ro" {
                return Err(Fault::invalid_input("mode must be rw or ro"));
            }
            let instance = opt_string(&a, "instance_uuid", 36)?;
            let host = opt_string(&a, "host_name", NAME_BYTES_MAX)?;
            if instance.is_none() && host.is_none() {
                return Err(Fault::invalid_input("instance_uuid or host_name must be given"));
            }
            let mountpoint = opt_string(&a, "mountpoint", NAME_BYTES_MAX)?;
            let live_count = live.len();
            let next = status::transition(
                v.status,
                Action::Attach,
                Facts { other_attachments: live_count, snapshots: 0 },
            )
            .map_err(|e| Fault::invalid_volume(e.0))?;
            let now = now_text();
            let attachment = Attachment {
                id: model::new_uuid(),
                volume_id: v.id.clone(),
                project_id: v.project_id.clone(),
                instance_uuid: instance,
                attached_host: host,
                mountpoint,
                attach_mode: mode,
                attach_status: "attached".into(),
                connector: None,
                attach_time: Some(now.clone()),
                detach_time: None,
                created_at: now,
            };
            // The status move and the attachment record in one step.
            state.transaction(|tx| {
                worker::change_volume(tx, &state, &v.id, Some(v.status), |v| {
                    v.status = next;
                    v.attach_status = AttachStatus::Attached;
                })?;
                Ok(tx.put(
                    Table::Attachments,
                    &attachment.id,
                    &attachment.project_id,
                    Some(&v.id),
                    &attachment.created_at,
                    &attachment,
                )?)
            })?;
            reply_empty(202)
        }
        "os-detach" => {
            let a = args_obj()?;
            only_keys(&a, &["attachment_id"])?;
            let target = match opt_string(&a, "attachment_id", 36)? {
                Some(id) => live
                    .iter()
                    .find(|x| x.id == id)
                    .cloned()
                    .ok_or_else(|| Fault::attachment_not_found(&id))?,
                None if live.len() == 1 => live[0].clone(),
                None if live.is_empty() => {
                    return Err(Fault::invalid_volume("Volume is not attached."));
                }
                None => {
                    return Err(Fault::invalid_volume(
                        "Volume has several attachments: attachment_id is required.",
                    ));
                }
            };
            let others = live.len() - 1;
            let next = status::transition(
                v.status,
                Action::Detach,
                Facts { other_attachments: others, snapshots: 0 },
            )
            .map_err(|e| Fault::invalid_volume(e.0))?;
            state.transaction(|tx| {
                worker::change_volume(tx, &state, &v.id, Some(v.status), |v| {
                    v.status = next;
                    v.attach_status = status::attach_status_for(next, others);
                })?;
                Ok(tx.delete(Table::Attachments, &target.id)?)
            })?;
            reply_empty(202)
        }
        "os-set_bootable" => {
            let a = args_obj()?;
            only_keys(&a, &["bootable"])?;
            let b = a
                .get("bootable")
                .and_then(boolish)
                .ok_or_else(|| Fault::invalid_input("bootable must be a boolean"))?;
            update_volume(&state, &v.id, |v| v.bootable = b)?;
            reply_empty(200)
        }
        other => Err(Fault::BadRequest(format!("There is no such action: {other}"))),
    }
}

//! `/attachments` (3.27+, complete with 3.44): the attach flow Nova uses. Creating without a
//! connector reserves the volume; a connector (at create or update) returns connection_info in
//! the attachments API's flattened form; `os-complete` marks it attached; delete detaches.

use super::volumes::{live_attachments, load, require_exported};
use super::{
    ApiResult, AppState, Ctx, body_object, boolish, only_keys, opt_string, reply, reply_empty,
    take_object, views,
};
use crate::db::{Table, Tx};
use crate::fault::Fault;
use crate::model::{self, Attachment, Volume};
use crate::status::{self, Action, Facts};
use crate::worker::{change_volume, now_text};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde_json::{Map, Value, json};
use std::sync::Arc;

fn require_version(ctx: &Ctx, minor: u32) -> Result<(), Fault> {
    if ctx.version.at_least(3, minor) {
        Ok(())
    } else {
        Err(Fault::NotFound(format!(
            "The attachments API needs microversion 3.{minor} or later; the request used {}.",
            ctx.version
        )))
    }
}

fn load_attachment(state: &AppState, ctx: &Ctx, id: &str) -> Result<Attachment, Fault> {
    let a = state
        .db()
        .get::<Attachment>(Table::Attachments, id)?
        .ok_or_else(|| Fault::attachment_not_found(id))?;
    if a.project_id != ctx.project() && !ctx.is_admin() {
        return Err(Fault::attachment_not_found(id));
    }
    Ok(a)
}

fn connector_arg(map: &Map<String, Value>) -> Result<Option<Value>, Fault> {
    match map.get("connector") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(c)) if c.is_empty() => Ok(None),
        Some(Value::Object(c)) => {
            // Connectors carry booleans as strings too ("multipath": "False"); check they parse.
            if let Some(m) = c.get("multipath") {
                boolish(m)
                    .ok_or_else(|| Fault::invalid_input("connector multipath must be a boolean"))?;
            }
            Ok(Some(Value::Object(c.clone())))
        }
        Some(_) => Err(Fault::BadRequest(
            "Invalid input for field/attribute connector. Value should be an object.".into(),
        )),
    }
}

fn detail(state: &AppState, a: &Attachment) -> Result<Value, Fault> {
    let info = match &a.connector {
        Some(_) if a.attach_status != "detached" => {
            let v = state.db().get::<Volume>(Table::Volumes, &a.volume_id)?;
            v.map(|v| views::flattened_connection_info(&v, &a.attach_mode, &a.id))
        }
        _ => None,
    };
    Ok(views::attachment_detail(a, info))
}

/// Moves the volume to attaching and records the connector, in the caller's transaction.
fn connect(
    tx: &mut Tx<'_>,
    state: &AppState,
    v: &Volume,
    a: &mut Attachment,
    connector: Value,
) -> Result<(), Fault> {
    require_exported(v)?;
    let others = live_in(tx, &v.id)?.iter().filter(|x| x.id != a.id).count();
    let next = status::transition(
        v.status,
        Action::BeginAttaching,
        Facts { other_attachments: others, snapshots: 0 },
    )
    .map_err(|e| Fault::invalid_volume(e.0))?;
    change_volume(tx, state, &v.id, Some(v.status), |v| v.status = next)?;
    a.connector = Some(connector);
    a.attach_status = "attaching".into();
    a.attached_host = a
        .connector
        .as_ref()
        .and_then(|c| c.get("host"))
        .and_then(|h| h.as_str())
        .map(str::to_string);
    a.mountpoint = a
        .connector
        .as_ref()
        .and_then(|c| c.get("mountpoint"))
        .and_then(|h| h.as_str())
        .map(str::to_string);
    Ok(())
}

/// Attachments of a volume that still hold it, read in the caller's transaction.
fn live_in(tx: &mut Tx<'_>, volume_id: &str) -> Result<Vec<Attachment>, Fault> {
    let all: Vec<Attachment> = tx.list_by_parent(Table::Attachments, volume_id)?;
    Ok(all.into_iter().filter(|a| a.attach_status != "detached").collect())
}

fn put_attachment(tx: &mut Tx<'_>, a: &Attachment) -> Result<(), Fault> {
    Ok(tx.put(Table::Attachments, &a.id, &a.project_id, Some(&a.volume_id), &a.created_at, a)?)
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    require_version(&ctx, 27)?;
    let fields = take_object(body_object(body)?, "attachment", &[])?;
    only_keys(&fields, &["volume_uuid", "instance_uuid", "connector", "mode"])?;
    let volume_id = opt_string(&fields, "volume_uuid", 36)?.ok_or_else(|| {
        Fault::BadRequest("Missing required element 'volume_uuid' in request body.".into())
    })?;
    let instance = opt_string(&fields, "instance_uuid", 255)?;
    let mode = opt_string(&fields, "mode", 2)?.unwrap_or_else(|| "rw".into());
    if mode != "rw" && mode != "ro" {
        return Err(Fault::invalid_input("mode must be rw or ro"));
    }
    let connector = connector_arg(&fields)?;
    let v = load(&state, &ctx, &volume_id)?;
    let now = now_text();
    let mut a = Attachment {
        id: model::new_uuid(),
        volume_id: v.id.clone(),
        project_id: v.project_id.clone(),
        instance_uuid: instance,
        attached_host: None,
        mountpoint: None,
        attach_mode: mode,
        attach_status: "reserved".into(),
        connector: None,
        attach_time: None,
        detach_time: None,
        created_at: now,
    };
    // Reserve, connect and record in one transaction: any failure leaves the volume as it was,
    // and a racing reserve (in any instance) finds the volume moved and fails.
    let a = state.transaction(|tx| {
        let v = tx
            .get_for_update::<Volume>(Table::Volumes, &v.id)?
            .ok_or_else(|| Fault::volume_not_found(&v.id))?;
        if !live_in(tx, &v.id)?.is_empty() {
            return Err(Fault::invalid_volume(format!(
                "Volume {} is already attached and multiattach is not supported.",
                v.id
            )));
        }
        let next = status::transition(v.status, Action::Reserve, Facts::default())
            .map_err(|e| Fault::invalid_volume(e.0))?;
        if connector.is_some() {
            require_exported(&v)?;
        }
        let v = change_volume(tx, &state, &v.id, Some(v.status), |v| v.status = next)?
            .ok_or_else(|| Fault::volume_not_found(&v.id))?;
        if let Some(c) = connector {
            connect(tx, &state, &v, &mut a, c)?;
        }
        put_attachment(tx, &a)?;
        Ok(a)
    })?;
    reply(200, json!({ "attachment": detail(&state, &a)? }))
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    require_version(&ctx, 27)?;
    let mut a = load_attachment(&state, &ctx, ctx.param("attachment_id"))?;
    let fields = take_object(body_object(body)?, "attachment", &[])?;
    only_keys(&fields, &["connector"])?;
    let connector = connector_arg(&fields)?
        .ok_or_else(|| Fault::BadRequest("Must specify 'connector'.".into()))?;
    if !matches!(a.attach_status.as_str(), "reserved" | "attaching" | "attached") {
        return Err(Fault::BadRequest(format!("Invalid attachment status {}.", a.attach_status)));
    }
    let v = load(&state, &ctx, &a.volume_id)?;
    let a = state.transaction(|tx| {
        let was_attached = a.attach_status == "attached";
        if was_attached {
            // Refreshing the connection of an attached volume changes nothing but the connector.
            a.connector = Some(connector);
        } else {
            connect(tx, &state, &v, &mut a, connector)?;
        }
        put_attachment(tx, &a)?;
        Ok(a)
    })?;
    reply(200, json!({ "attachment": detail(&state, &a)? }))
}

pub async fn action(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    require_version(&ctx, 44)?;
    let mut a = load_attachment(&state, &ctx, ctx.param("attachment_id"))?;
    let body = body_object(body)?;
    only_keys(&body, &["os-complete"])?;
    if !body.contains_key("os-complete") {
        return Err(Fault::BadRequest(
            "There is either no action or more than one action in the request body.".into(),
        ));
    }
    let v = load(&state, &ctx, &a.volume_id)?;
    if a.attach_status != "attached" {
        let others = live_attachments(&state, &v.id)?.iter().filter(|x| x.id != a.id).count();
        let next = status::transition(
            v.status,
            Action::Attach,
            Facts { other_attachments: others, snapshots: 0 },
        )
        .map_err(|e| Fault::invalid_volume(e.0))?;
        state.transaction(|tx| {
            change_volume(tx, &state, &v.id, Some(v.status), |v| {
                v.status = next;
                v.attach_status = status::AttachStatus::Attached;
            })?;
            a.attach_status = "attached".into();
            a.attach_time = Some(now_text());
            put_attachment(tx, &a)
        })?;
    }
    reply_empty(204)
}

pub async fn delete(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    require_version(&ctx, 27)?;
    let a = load_attachment(&state, &ctx, ctx.param("attachment_id"))?;
    // The volume's move and the attachment's removal in one step, checked under the lock.
    state.transaction(|tx| {
        if let Some(v) = tx.get_for_update::<Volume>(Table::Volumes, &a.volume_id)? {
            let others = live_in(tx, &v.id)?.iter().filter(|x| x.id != a.id).count();
            let next = status::transition(
                v.status,
                Action::Detach,
                Facts { other_attachments: others, snapshots: 0 },
            )
            .map_err(|e| Fault::invalid_volume(e.0))?;
            change_volume(tx, &state, &v.id, Some(v.status), |v| {
                v.status = next;
                v.attach_status = status::attach_status_for(next, others);
            })?;
        }
        Ok(tx.delete(Table::Attachments, &a.id)?)
    })?;
    let rest: Vec<Attachment> = state.db().list_by_parent(Table::Attachments, &a.volume_id)?;
    reply(
        200,
        json!({ "attachments": rest.iter().map(views::attachment_summary).collect::<Vec<_>>() }),
    )
}

fn select(state: &AppState, ctx: &Ctx) -> Result<Vec<Attachment>, Fault> {
    let all_tenants = ctx.query("all_tenants").and_then(|v| boolish(&json!(v))).unwrap_or(false)
        && ctx.is_admin();
    let scope = if all_tenants { None } else { Some(ctx.project()) };
    let mut list: Vec<Attachment> = state.db().list(Table::Attachments, scope)?;
    for (k, value) in &ctx.query {
        match k.as_str() {
            "volume_id" => list.retain(|a| &a.volume_id == value),
            "instance_id" => list.retain(|a| a.instance_uuid.as_deref() == Some(value.as_str())),
            "status" => list.retain(|a| &a.attach_status == value),
            _ => {}
        }
    }
    Ok(list)
}

pub async fn list_summary(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    require_version(&ctx, 27)?;
    let list = select(&state, &ctx)?;
    reply(
        200,
        json!({ "attachments": list.iter().map(views::attachment_summary).collect::<Vec<_>>() }),
    )
}

pub async fn list_detail(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    require_version(&ctx, 27)?;
    let list = select(&state, &ctx)?;
    let out = list.iter().map(|a| detail(&state, a)).collect::<Result<Vec<_>, _>>()?;
    reply(200, json!({ "attachments": out }))
}

pub async fn show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    require_version(&ctx, 27)?;
    let a = load_attachment(&state, &ctx, ctx.param("attachment_id"))?;
    reply(200, json!({ "attachment": detail(&state, &a)? }))
}

//! `/types`: volume types and their extra specs. The specs `tandem:replica_count` and
//! `tandem:protocol` choose a volume's replication (see `scheduler::replication`).

use super::volumes::type_by_id_or_name;
use super::{
    ApiResult, AppState, Ctx, body_object, boolish, only_keys, opt_string, reply, reply_empty,
    take_object, views,
};
use crate::constants::{
    DESCRIPTION_BYTES_MAX, METADATA_ITEMS_MAX, METADATA_KEY_BYTES_MAX, METADATA_VALUE_BYTES_MAX,
    NAME_BYTES_MAX,
};
use crate::db::Table;
use crate::fault::Fault;
use crate::model::{self, Volume, VolumeType};
use crate::scheduler;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

fn load(state: &AppState, ctx: &Ctx, key: &str) -> Result<VolumeType, Fault> {
    let t = type_by_id_or_name(state, key)?.ok_or_else(|| Fault::type_not_found(key))?;
    if !t.is_public && !ctx.is_admin() {
        return Err(Fault::type_not_found(key));
    }
    Ok(t)
}

fn specs(value: Option<&Value>) -> Result<BTreeMap<String, String>, Fault> {
    let map = match value {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(Fault::BadRequest(
                "Invalid input for field/attribute extra_specs. Value should be an object.".into(),
            ));
        }
    };
    if map.len() > METADATA_ITEMS_MAX {
        return Err(Fault::OverLimit("Maximum number of extra specs exceeded.".into()));
    }
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(Fault::BadRequest(format!(
                    "Invalid input for field/attribute {k}. Value should be a string."
                )));
            }
        };
        if k.is_empty() || k.len() > METADATA_KEY_BYTES_MAX || v.len() > METADATA_VALUE_BYTES_MAX {
            return Err(Fault::BadRequest(format!(
                "Invalid input for field/attribute {k}. Too long or empty."
            )));
        }
        scheduler::validate_spec(k, &v).map_err(|e| Fault::invalid_input(e.to_string()))?;
        out.insert(k.clone(), v);
    }
    Ok(out)
}

fn save(state: &AppState, t: &VolumeType) -> Result<(), Fault> {
    Ok(state.db().put(Table::VolumeTypes, &t.id, "", None, &t.id, t)?)
}

pub async fn list(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let all: Vec<VolumeType> = state.db().list(Table::VolumeTypes, None)?;
    let visible: Vec<Value> =
        all.iter().filter(|t| t.is_public || ctx.is_admin()).map(views::volume_type).collect();
    reply(200, json!({ "volume_types": visible }))
}

pub async fn show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    reply(
        200,
        json!({ "volume_type": views::volume_type(&load(&state, &ctx, ctx.param("type_id"))?) }),
    )
}

pub async fn show_default(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    reply(
        200,
        json!({ "volume_type": views::volume_type(&load(&state, &ctx, model::DEFAULT_TYPE_ID)?) }),
    )
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    ctx.require_admin()?;
    let fields = take_object(body_object(body)?, "volume_type", &[])?;
    only_keys(
        &fields,
        &["name", "description", "os-volume-type-access:is_public", "is_public", "extra_specs"],
    )?;
    let name =
        opt_string(&fields, "name", NAME_BYTES_MAX)?.filter(|n| !n.trim().is_empty()).ok_or_else(
            || Fault::BadRequest("Missing required element 'name' in request body.".into()),
        )?;
    let description = opt_string(&fields, "description", DESCRIPTION_BYTES_MAX)?;
    let is_public = match fields.get("os-volume-type-access:is_public").or(fields.get("is_public"))
    {
        None | Some(Value::Null) => true,
        Some(v) => boolish(v).ok_or_else(|| Fault::invalid_input("is_public must be a boolean"))?,
    };
    let extra_specs = specs(fields.get("extra_specs"))?;
    if type_by_id_or_name(&state, &name)?.is_some() {
        return Err(Fault::Conflict(format!("Volume Type {name} already exists.")));
    }
    let t = VolumeType { id: model::new_uuid(), name, description, is_public, extra_specs };
    save(&state, &t)?;
    reply(200, json!({ "volume_type": views::volume_type(&t) }))
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    ctx.require_admin()?;
    let mut t = load(&state, &ctx, ctx.param("type_id"))?;
    let fields = take_object(body_object(body)?, "volume_type", &[])?;
    only_keys(&fields, &["name", "description", "is_public"])?;
    if let Some(name) = opt_string(&fields, "name", NAME_BYTES_MAX)? {
        if name != t.name && type_by_id_or_name(&state, &name)?.is_some() {
            return Err(Fault::Conflict(format!("Volume Type {name} already exists.")));
        }
        t.name = name;
    }
    if fields.contains_key("description") {
        t.description = opt_string(&fields, "description", DESCRIPTION_BYTES_MAX)?;
    }
    if let Some(v) = fields.get("is_public") {
        t.is_public =
            boolish(v).ok_or_else(|| Fault::invalid_input("is_public must be a boolean"))?;
    }
    save(&state, &t)?;
    reply(200, json!({ "volume_type": views::volume_type(&t) }))
}

pub async fn delete(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    ctx.require_admin()?;
    let t = load(&state, &ctx, ctx.param("type_id"))?;
    if t.id == model::DEFAULT_TYPE_ID {
        return Err(Fault::BadRequest("Default volume type can not be deleted.".into()));
    }
    let vols: Vec<Volume> = state.db().list(Table::Volumes, None)?;
    if vols.iter().any(|v| v.volume_type_id == t.id) {
        return Err(Fault::BadRequest(format!(
            "Target volume type is still in use. Volume Type {} deletion is not allowed with volumes present with the type.",
            t.id
        )));
    }
    state.db().delete(Table::VolumeTypes, &t.id)?;
    reply_empty(202)
}

pub async fn specs_show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let t = load(&state, &ctx, ctx.param("type_id"))?;
    reply(200, json!({ "extra_specs": t.extra_specs }))
}

pub async fn specs_merge(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    ctx.require_admin()?;
    let mut t = load(&state, &ctx, ctx.param("type_id"))?;
    let mut body: Map<String, Value> = body_object(body)?;
    only_keys(&body, &["extra_specs"])?;
    let new = specs(body.remove("extra_specs").as_ref().or(Some(&Value::Null)))?;
    if new.is_empty() {
        return Err(Fault::BadRequest(
            "Missing required element 'extra_specs' in request body.".into(),
        ));
    }
    t.extra_specs.extend(new.clone());
    save(&state, &t)?;
    reply(200, json!({ "extra_specs": new }))
}

pub async fn spec_show(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    let t = load(&state, &ctx, ctx.param("type_id"))?;
    let key = ctx.param("key");
    let value = t.extra_specs.get(key).ok_or_else(|| {
        Fault::NotFound(format!("Volume Type {} has no extra specs with key {key}.", t.id))
    })?;
    reply(200, json!({ key: value }))
}

pub async fn spec_put(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    ctx.require_admin()?;
    let mut t = load(&state, &ctx, ctx.param("type_id"))?;
    let key = ctx.param("key").to_string();
    let body = body_object(body)?;
    let new = specs(Some(&Value::Object(body)))?;
    if new.len() != 1 || !new.contains_key(&key) {
        return Err(Fault::BadRequest("Request body and URI mismatch".into()));
    }
    t.extra_specs.extend(new.clone());
    save(&state, &t)?;
    reply(200, json!(new))
}

pub async fn spec_delete(State(state): State<Arc<AppState>>, ctx: Ctx) -> ApiResult {
    ctx.require_admin()?;
    let mut t = load(&state, &ctx, ctx.param("type_id"))?;
    let key = ctx.param("key");
    if t.extra_specs.remove(key).is_none() {
        return Err(Fault::NotFound(format!(
            "Volume Type {} has no extra specs with key {key}.",
            t.id
        )));
    }
    save(&state, &t)?;
    reply_empty(202)
}

/// The default type, created on first start.
pub fn ensure_default(state: &AppState) -> Result<(), Fault> {
    if state.db().get::<VolumeType>(Table::VolumeTypes, model::DEFAULT_TYPE_ID)?.is_none() {
        save(
            state,
            &VolumeType {
                id: model::DEFAULT_TYPE_ID.into(),
                name: model::DEFAULT_TYPE_NAME.into(),
                description: Some("Default Volume Type".into()),
                is_public: true,
                extra_specs: BTreeMap::new(),
            },
        )?;
    }
    Ok(())
}

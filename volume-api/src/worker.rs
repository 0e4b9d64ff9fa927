//! Long operations run here, off the request path: the API answers 202 at once and the status
//! moves when the nodes are done. Each operation records where its pieces go *before* asking
//! the nodes, and the node contract is idempotent, so an operation cut short by a crash is
//! simply run again at start-up (`reconcile`), and a failure removes the pieces it made.

use crate::api::AppState;
use crate::db::Table;
use crate::fault::Fault;
use crate::model::{Node, Snapshot, Volume, format_timestamp};
use crate::node_client::{Chap, CreateResource, NodeError, Peer, Role, Source};
use crate::scheduler;
use crate::status::{self, VolumeStatus};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn now_text() -> String {
    format_timestamp(now_ms())
}

/// Reads, changes and writes back one volume under the database lock. Returns the new record,
/// or None when the volume is gone.
pub fn update_volume(
    state: &AppState,
    id: &str,
    change: impl FnOnce(&mut Volume),
) -> Result<Option<Volume>, Fault> {
    let db = state.db();
    let Some(mut v) = db.get::<Volume>(Table::Volumes, id)? else { return Ok(None) };
    change(&mut v);
    v.updated_at = Some(now_text());
    db.put(Table::Volumes, &v.id, &v.project_id, None, &v.created_at, &v)?;
    Ok(Some(v))
}

/// Like `update_volume`, but only when the volume is still in `expected`, the status the caller
/// checked its transition against: two racing requests cannot both move the same volume.
pub fn update_volume_from(
    state: &AppState,
    id: &str,
    expected: VolumeStatus,
    change: impl FnOnce(&mut Volume),
) -> Result<Volume, Fault> {
    let db = state.db();
    let mut v = db.get::<Volume>(Table::Volumes, id)?.ok_or_else(|| Fault::volume_not_found(id))?;
    if v.status != expected {
        return Err(Fault::invalid_volume(format!(
            "Volume status changed from {expected} to {} while the request ran; retry.",
            v.status
        )));
    }
    change(&mut v);
    v.updated_at = Some(now_text());
    db.put(Table::Volumes, &v.id, &v.project_id, None, &v.created_at, &v)?;
    Ok(v)
}

pub fn update_snapshot(
    state: &AppState,
    id: &str,
    change: impl FnOnce(&mut Snapshot),
) -> Result<Option<Snapshot>, Fault> {
    let db = state.db();
    let Some(mut s) = db.get::<Snapshot>(Table::Snapshots, id)? else { return Ok(None) };
    change(&mut s);
    s.updated_at = Some(now_text());
    db.put(Table::Snapshots, &s.id, &s.project_id, Some(&s.volume_id), &s.created_at, &s)?;
    Ok(Some(s))
}

fn nodes_named(state: &AppState, names: &[String]) -> Result<Vec<Node>, String> {
    let db = state.db();
    names
        .iter()
        .map(|n| match db.get::<Node>(Table::Nodes, n) {
            Ok(Some(node)) => Ok(node),
            Ok(None) => Err(format!("node {n} is not registered")),
            Err(e) => Err(e.to_string()),
        })
        .collect()
}

fn spawn(state: &Arc<AppState>, what: String, job: impl Future<Output = ()> + Send + 'static) {
    let permits = state.operations.clone();
    tokio::spawn(async move {
        let Ok(_permit) = permits.acquire_owned().await else { return };
        tracing::info!("operation started: {what}");
        job.await;
        tracing::info!("operation finished: {what}");
    });
}

pub fn create_volume(state: &Arc<AppState>, id: String) {
    let s = state.clone();
    spawn(state, format!("create volume {id}"), async move {
        match run_create(&s, &id).await {
            Ok(()) => {}
            Err(message) => {
                tracing::warn!("create volume {id} failed: {message}");
                cleanup_volume(&s, &id).await;
                let _ = update_volume(&s, &id, |v| {
                    v.status =
                        status::complete(VolumeStatus::Creating, VolumeStatus::Creating, false);
                    v.error = Some(message);
                    v.portals.clear();
                });
            }
        }
    });
}

/// Placement, then the resource on every chosen node (primary first).
async fn run_create(state: &Arc<AppState>, id: &str) -> Result<(), String> {
    let v = state
        .db()
        .get::<Volume>(Table::Volumes, id)
        .map_err(|e| e.to_string())?
        .ok_or("volume vanished")?;
    if v.status != VolumeStatus::Creating {
        return Ok(());
    }
    let source = if let Some(snapshot_id) = &v.snapshot_id {
        let snap = state
            .db()
            .get::<Snapshot>(Table::Snapshots, snapshot_id)
            .map_err(|e| e.to_string())?
            .ok_or("source snapshot vanished")?;
        let parent = state
            .db()
            .get::<Volume>(Table::Volumes, &snap.volume_id)
            .map_err(|e| e.to_string())?
            .ok_or("source volume vanished")?;
        Some((
            Source::Snapshot {
                resource: parent.resource.clone(),
                snapshot: format!("snapshot-{}", snap.id),
            },
            parent.nodes,
        ))
    } else if let Some(source_id) = &v.source_volid {
        let parent = state
            .db()
            .get::<Volume>(Table::Volumes, source_id)
            .map_err(|e| e.to_string())?
            .ok_or("source volume vanished")?;
        Some((Source::Resource { resource: parent.resource.clone() }, parent.nodes))
    } else {
        None
    };
    let specs = state
        .db()
        .get::<crate::model::VolumeType>(Table::VolumeTypes, &v.volume_type_id)
        .map_err(|e| e.to_string())?
        .map(|t| t.extra_specs)
        .unwrap_or_default();
    let replication = scheduler::replication(&specs, state.settings.default_replica_count);
    let size_bytes = v.size_gib.checked_mul(1 << 30).ok_or("size overflows")?;
    let chosen = if v.nodes.is_empty() {
        let chosen = match &source {
            // Clones live where their source lives: the data is local there.
            Some((_, nodes)) => nodes.clone(),
            None => {
                let all: Vec<Node> =
                    state.db().list(Table::Nodes, None).map_err(|e| e.to_string())?;
                scheduler::choose(
                    &all,
                    now_ms(),
                    size_bytes,
                    replication.replica_count,
                    Some(&v.availability_zone),
                )
                .map_err(|e| e.to_string())?
            }
        };
        // Recorded before any node is asked, so a crash from here on knows what to clean up.
        update_volume(state, id, |v| v.nodes = chosen.clone()).map_err(|e| e.to_string())?;
        chosen
    } else {
        v.nodes.clone()
    };
    let nodes = nodes_named(state, &chosen)?;
    let mut portals = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        let request = CreateResource {
            size_bytes,
            role: if index == 0 { Role::Primary } else { Role::Secondary },
            protocol: replication.protocol,
            peers: nodes
                .iter()
                .filter(|n| n.name != node.name)
                .map(|n| Peer { node: n.name.clone(), url: n.url.clone() })
                .collect(),
            target_iqn: v.target_iqn.clone(),
            chap: Chap { username: v.chap_username.clone(), secret: v.chap_secret.clone() },
            source: source.as_ref().map(|(s, _)| s.clone()),
        };
        let export =
            state.nodes.create(node, &v.resource, &request).await.map_err(|e| e.to_string())?;
        portals.push(export.portal);
    }
    let updated = update_volume(state, id, |v| {
        if v.status == VolumeStatus::Creating {
            v.status = status::complete(VolumeStatus::Creating, VolumeStatus::Creating, true);
            v.portals = portals;
            v.error = None;
        }
    })
    .map_err(|e| e.to_string())?;
    if updated.is_none() {
        // Deleted while being created: take the pieces back.
        delete_pieces(state, &v.resource, &nodes, &[]).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn delete_pieces(
    state: &Arc<AppState>,
    resource: &str,
    nodes: &[Node],
    snapshots: &[String],
) -> Result<(), NodeError> {
    let mut first_error = None;
    for node in nodes {
        for snap in snapshots {
            if let Err(e) = state.nodes.delete_snapshot(node, resource, snap).await {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = state.nodes.delete(node, resource).await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Best-effort removal of whatever a failed create left on its nodes.
async fn cleanup_volume(state: &Arc<AppState>, id: &str) {
    let Ok(Some(v)) = state.db().get::<Volume>(Table::Volumes, id) else { return };
    let Ok(nodes) = nodes_named(state, &v.nodes) else { return };
    if let Err(e) = delete_pieces(state, &v.resource, &nodes, &[]).await {
        tracing::warn!("cleanup of volume {id} incomplete: {e}");
    }
}

pub fn extend_volume(state: &Arc<AppState>, id: String, new_size_gib: u64) {
    let s = state.clone();
    spawn(state, format!("extend volume {id} to {new_size_gib} GiB"), async move {
        let result = async {
            let v = s
                .db()
                .get::<Volume>(Table::Volumes, &id)
                .map_err(|e| e.to_string())?
                .ok_or("volume vanished")?;
            let nodes = nodes_named(&s, &v.nodes)?;
            let size_bytes = new_size_gib.checked_mul(1 << 30).ok_or("size overflows")?;
            for node in &nodes {
                s.nodes.resize(node, &v.resource, size_bytes).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }
        .await;
        let _ = update_volume(&s, &id, |v| {
            let before = v.status_before.take().unwrap_or(VolumeStatus::Available);
            v.extend_to_gib = None;
            match result {
                Ok(()) => {
                    v.size_gib = new_size_gib;
                    v.status = status::complete(VolumeStatus::Extending, before, true);
                }
                Err(message) => {
                    v.status = status::complete(VolumeStatus::Extending, before, false);
                    v.error = Some(message);
                }
            }
        });
    });
}

/// Deletes the volume's pieces (and, with cascade, its snapshots'), then its record.
pub fn delete_volume(state: &Arc<AppState>, id: String) {
    let s = state.clone();
    spawn(state, format!("delete volume {id}"), async move {
        let result = async {
            let v = s
                .db()
                .get::<Volume>(Table::Volumes, &id)
                .map_err(|e| e.to_string())?
                .ok_or("volume vanished")?;
            let snaps: Vec<Snapshot> =
                s.db().list_by_parent(Table::Snapshots, &id).map_err(|e| e.to_string())?;
            let names: Vec<String> = snaps.iter().map(|sn| format!("snapshot-{}", sn.id)).collect();
            let nodes = nodes_named(&s, &v.nodes)?;
            delete_pieces(&s, &v.resource, &nodes, &names).await.map_err(|e| e.to_string())?;
            let db = s.db();
            for sn in &snaps {
                db.delete(Table::Snapshots, &sn.id).map_err(|e| e.to_string())?;
            }
            for a in db
                .list_by_parent::<crate::model::Attachment>(Table::Attachments, &id)
                .map_err(|e| e.to_string())?
            {
                db.delete(Table::Attachments, &a.id).map_err(|e| e.to_string())?;
            }
            db.delete(Table::Volumes, &id).map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        }
        .await;
        if let Err(message) = result {
            tracing::warn!("delete volume {id} failed: {message}");
            let _ = update_volume(&s, &id, |v| {
                v.status = status::complete(VolumeStatus::Deleting, VolumeStatus::Deleting, false);
                v.error = Some(message);
            });
        }
    });
}

pub fn create_snapshot(state: &Arc<AppState>, id: String) {
    let s = state.clone();
    spawn(state, format!("create snapshot {id}"), async move {
        let name = format!("snapshot-{id}");
        let result = async {
            let snap = s
                .db()
                .get::<Snapshot>(Table::Snapshots, &id)
                .map_err(|e| e.to_string())?
                .ok_or("snapshot vanished")?;
            let v = s
                .db()
                .get::<Volume>(Table::Volumes, &snap.volume_id)
                .map_err(|e| e.to_string())?
                .ok_or("volume vanished")?;
            let nodes = nodes_named(&s, &v.nodes)?;
            for node in &nodes {
                if let Err(e) = s.nodes.snapshot(node, &v.resource, &name).await {
                    for n in &nodes {
                        let _ = s.nodes.delete_snapshot(n, &v.resource, &name).await;
                    }
                    return Err(e.to_string());
                }
            }
            Ok::<(), String>(())
        }
        .await;
        let _ = update_snapshot(&s, &id, |sn| {
            if sn.status == "creating" {
                sn.status = if result.is_ok() { "available".into() } else { "error".into() };
            }
        });
        if let Err(message) = result {
            tracing::warn!("create snapshot {id} failed: {message}");
        }
    });
}

pub fn delete_snapshot(state: &Arc<AppState>, id: String) {
    let s = state.clone();
    spawn(state, format!("delete snapshot {id}"), async move {
        let result = async {
            let snap = s
                .db()
                .get::<Snapshot>(Table::Snapshots, &id)
                .map_err(|e| e.to_string())?
                .ok_or("snapshot vanished")?;
            let parent =
                s.db().get::<Volume>(Table::Volumes, &snap.volume_id).map_err(|e| e.to_string())?;
            if let Some(v) = parent {
                let nodes = nodes_named(&s, &v.nodes)?;
                for node in &nodes {
                    s.nodes
                        .delete_snapshot(node, &v.resource, &format!("snapshot-{id}"))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            s.db().delete(Table::Snapshots, &id).map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        }
        .await;
        if let Err(message) = result {
            tracing::warn!("delete snapshot {id} failed: {message}");
            let _ = update_snapshot(&s, &id, |sn| sn.status = "error_deleting".into());
        }
    });
}

/// Resumes what a previous run left half done: every contract call is idempotent, so the
/// operation is simply run again.
pub fn reconcile(state: &Arc<AppState>) -> Result<(), Fault> {
    let volumes: Vec<Volume> = state.db().list(Table::Volumes, None)?;
    for v in volumes {
        match v.status {
            VolumeStatus::Creating => create_volume(state, v.id),
            VolumeStatus::Deleting => delete_volume(state, v.id),
            VolumeStatus::Extending => match v.extend_to_gib {
                Some(size) => extend_volume(state, v.id, size),
                // Without the target size there is nothing to replay: the operator sees it.
                None => {
                    update_volume(state, &v.id, |v| {
                        v.status = VolumeStatus::ErrorExtending;
                        v.error = Some("extend interrupted by a restart of tandem-api".into());
                    })?;
                }
            },
            _ => {}
        }
    }
    let snaps: Vec<Snapshot> = state.db().list(Table::Snapshots, None)?;
    for s in snaps {
        match s.status.as_str() {
            "creating" => create_snapshot(state, s.id),
            "deleting" => delete_snapshot(state, s.id),
            _ => {}
        }
    }
    Ok(())
}

/// Asks every registered node for its capacity; an answer is its heartbeat.
pub async fn heartbeat_loop(state: Arc<AppState>) {
    let mut ticker =
        tokio::time::interval(Duration::from_millis(crate::constants::HEARTBEAT_INTERVAL_MS));
    loop {
        ticker.tick().await;
        let nodes: Vec<Node> = match state.db().list(Table::Nodes, None) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("listing nodes: {e}");
                continue;
            }
        };
        for node in nodes {
            let s = state.clone();
            // Each node is polled on its own task so a slow node delays nobody.
            tokio::spawn(async move {
                match s.nodes.info(&node).await {
                    Ok(info) => {
                        let db = s.db();
                        if let Ok(Some(mut n)) = db.get::<Node>(Table::Nodes, &node.name) {
                            n.total_bytes = info.total_bytes;
                            n.free_bytes = info.free_bytes;
                            n.availability_zone = info.availability_zone;
                            n.heartbeat_ms = now_ms();
                            let _ = db.put(Table::Nodes, &n.name, "", None, "", &n);
                        }
                    }
                    Err(e) => tracing::debug!("heartbeat of {}: {e}", node.name),
                }
            });
        }
    }
}

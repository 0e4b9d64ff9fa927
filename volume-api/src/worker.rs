//! Long operations run here, off the request path: the API answers 202 at once and the status
//! moves when the nodes are done. Each operation records where its pieces go *before* asking
//! the nodes, and the node contract is idempotent, so an operation cut short by a crash is
//! simply run again (`reconcile`), and a failure removes the pieces it made.
//!
//! Several instances may share one database: an operation runs only in the instance holding
//! its row's lease (taken in the same transaction that moved the record into the background
//! status, renewed while it runs, released at the end), and every instance's reconciler
//! resumes rows whose lease expired, so a killed instance's work is finished by another.

use crate::api::AppState;
use crate::db::{Table, Tx};
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

/// Statuses a background operation owns: entering one takes the row's lease for this
/// instance, and a reconciler resumes a row left in one with no live lease.
pub fn volume_status_is_background(status: VolumeStatus) -> bool {
    matches!(status, VolumeStatus::Creating | VolumeStatus::Deleting | VolumeStatus::Extending)
}

pub fn snapshot_status_is_background(status: &str) -> bool {
    matches!(status, "creating" | "deleting")
}

/// Takes the lease of a row that just entered a background status. Forced: the record was
/// in a status no operation owns (checked under the row lock), so a lease still on the row
/// is a finished operation's that was not released yet.
pub fn take_lease(tx: &mut Tx<'_>, state: &AppState, table: Table, id: &str) -> Result<(), Fault> {
    let now = now_ms();
    let until = now + crate::constants::OPERATION_LEASE_MS;
    tx.claim(table, id, &state.instance_id, now, until, true)?;
    Ok(())
}

/// Reads, changes and writes back one volume in the caller's transaction, the row locked
/// from the read to the commit. `expected`, when given, is the status the caller checked its
/// transition against: when the volume moved meanwhile, nothing is written and the request
/// fails, so two racing requests (in this process or another) cannot both move it.
pub fn change_volume(
    tx: &mut Tx<'_>,
    state: &AppState,
    id: &str,
    expected: Option<VolumeStatus>,
    change: impl FnOnce(&mut Volume),
) -> Result<Option<Volume>, Fault> {
    let Some(mut v) = tx.get_for_update::<Volume>(Table::Volumes, id)? else { return Ok(None) };
    if let Some(expected) = expected
        && v.status != expected
    {
        return Err(Fault::invalid_volume(format!(
            "Volume status changed from {expected} to {} while the request ran; retry.",
            v.status
        )));
    }
    let before = v.status;
    change(&mut v);
    v.updated_at = Some(now_text());
    tx.put(Table::Volumes, &v.id, &v.project_id, None, &v.created_at, &v)?;
    if v.status != before && volume_status_is_background(v.status) {
        take_lease(tx, state, Table::Volumes, id)?;
    }
    Ok(Some(v))
}

/// `change_volume` as its own transaction. Returns the new record, or None when the volume
/// is gone.
pub fn update_volume(
    state: &AppState,
    id: &str,
    change: impl FnOnce(&mut Volume) + Send,
) -> Result<Option<Volume>, Fault> {
    state.transaction(|tx| change_volume(tx, state, id, None, change))
}

/// `change_volume` with compare-and-set against `expected`, as its own transaction.
pub fn update_volume_from(
    state: &AppState,
    id: &str,
    expected: VolumeStatus,
    change: impl FnOnce(&mut Volume) + Send,
) -> Result<Volume, Fault> {
    state
        .transaction(|tx| change_volume(tx, state, id, Some(expected), change))?
        .ok_or_else(|| Fault::volume_not_found(id))
}

/// The snapshot counterpart of `change_volume`: `expected` lists the statuses the caller
/// checked against; entering a background status takes the lease.
pub fn change_snapshot(
    tx: &mut Tx<'_>,
    state: &AppState,
    id: &str,
    expected: Option<&[&str]>,
    change: impl FnOnce(&mut Snapshot),
) -> Result<Option<Snapshot>, Fault> {
    let Some(mut s) = tx.get_for_update::<Snapshot>(Table::Snapshots, id)? else {
        return Ok(None);
    };
    if let Some(expected) = expected
        && !expected.contains(&s.status.as_str())
    {
        return Err(Fault::BadRequest(format!(
            "Invalid snapshot: Snapshot status must be {}, but is {}.",
            expected.join(" or "),
            s.status
        )));
    }
    let before = s.status.clone();
    change(&mut s);
    s.updated_at = Some(now_text());
    tx.put(Table::Snapshots, &s.id, &s.project_id, Some(&s.volume_id), &s.created_at, &s)?;
    if s.status != before && snapshot_status_is_background(&s.status) {
        take_lease(tx, state, Table::Snapshots, id)?;
    }
    Ok(Some(s))
}

pub fn update_snapshot(
    state: &AppState,
    id: &str,
    change: impl FnOnce(&mut Snapshot) + Send,
) -> Result<Option<Snapshot>, Fault> {
    state.transaction(|tx| change_snapshot(tx, state, id, None, change))
}

fn nodes_named(state: &AppState, names: &[String]) -> Result<Vec<Node>, String> {
    let mut db = state.db();
    names
        .iter()
        .map(|n| match db.get::<Node>(Table::Nodes, n) {
            Ok(Some(node)) => Ok(node),
            Ok(None) => Err(format!("node {n} is not registered")),
            Err(e) => Err(e.to_string()),
        })
        .collect()
}

/// Runs a background operation on a row whose lease this instance holds: renews the lease
/// while the operation waits for a slot and runs, and gives it back at the end.
fn spawn(
    state: &Arc<AppState>,
    table: Table,
    id: &str,
    what: String,
    job: impl Future<Output = ()> + Send + 'static,
) {
    let permits = state.operations.clone();
    let s = state.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let work = async {
            let Ok(_permit) = permits.acquire_owned().await else { return };
            tracing::info!("operation started: {what}");
            job.await;
            tracing::info!("operation finished: {what}");
        };
        tokio::select! {
            () = work => {}
            () = renew_lease(&s, table, &id) => {}
        }
        // Given back only when the record left its background status: if it is still in one,
        // another operation took the row over meanwhile (a forced delete of a volume being
        // created, say) and runs under this instance's lease, or this one failed without
        // recording it, and the lease's expiry lets a reconciler run it again.
        let me = s.instance_id.clone();
        let released = s.transaction(|tx| {
            let busy = match table {
                Table::Volumes => tx
                    .get::<Volume>(table, &id)?
                    .is_some_and(|v| volume_status_is_background(v.status)),
                _ => tx
                    .get::<Snapshot>(table, &id)?
                    .is_some_and(|sn| snapshot_status_is_background(&sn.status)),
            };
            if !busy {
                tx.release(table, &id, &me)?;
            }
            Ok(())
        });
        if let Err(e) = released {
            tracing::warn!("releasing the lease on {id}: {e}");
        }
    });
}

/// Keeps this instance's lease on a row alive; never returns.
async fn renew_lease(state: &AppState, table: Table, id: &str) {
    let mut ticker = tokio::time::interval(Duration::from_millis(
        crate::constants::OPERATION_LEASE_RENEW_INTERVAL_MS,
    ));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let now = now_ms();
        let until = now + crate::constants::OPERATION_LEASE_MS;
        match state
            .transaction(|tx| Ok(tx.claim(table, id, &state.instance_id, now, until, false)?))
        {
            Ok(true) => {}
            Ok(false) => {
                // Gone (deleted) or taken over after this instance stalled past the lease:
                // the operation finishes anyway, and every node call it makes is idempotent.
                tracing::info!("lease on {id} no longer held by this instance");
                std::future::pending::<()>().await;
            }
            Err(e) => tracing::warn!("renewing the lease on {id}: {e}"),
        }
    }
}

pub fn create_volume(state: &Arc<AppState>, id: String) {
    let s = state.clone();
    spawn(state, Table::Volumes, &id.clone(), format!("create volume {id}"), async move {
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
    let (chosen, tiebreaker) = if v.nodes.is_empty() {
        let all: Vec<Node> = state.db().list(Table::Nodes, None).map_err(|e| e.to_string())?;
        let chosen = match &source {
            // Clones live where their source lives: the data is local there.
            Some((_, nodes)) => nodes.clone(),
            None => scheduler::choose(
                &all,
                now_ms(),
                size_bytes,
                replication.replica_count,
                Some(&v.availability_zone),
            )
            .map_err(|e| e.to_string())?,
        };
        let tiebreaker =
            scheduler::choose_tiebreaker(&all, now_ms(), &chosen, Some(&v.availability_zone));
        match &tiebreaker {
            Some(node) => tracing::info!(
                "volume {id}: replicas on {}, diskless tiebreaker on {node}: a surviving replica \
                 takes over automatically when the primary dies",
                chosen.join(", ")
            ),
            None if chosen.len() == 2 => tracing::warn!(
                "volume {id}: replicas on {}, no third node for a tiebreaker: failover is manual \
                 (promote the survivor); register a third storage node for automatic failover",
                chosen.join(", ")
            ),
            None => {}
        }
        // Recorded before any node is asked, so a crash from here on knows what to clean up.
        update_volume(state, id, |v| {
            v.nodes = chosen.clone();
            v.tiebreaker = tiebreaker.clone();
        })
        .map_err(|e| e.to_string())?;
        (chosen, tiebreaker)
    } else {
        (v.nodes.clone(), v.tiebreaker.clone())
    };
    let nodes = nodes_named(state, &chosen)?;
    let tiebreaker_node = match &tiebreaker {
        Some(name) => nodes_named(state, std::slice::from_ref(name))?.pop(),
        None => None,
    };
    // Three nodes or more: quorum (majority, the nodes' default) and the promoter.
    let auto_promote = nodes.len() + usize::from(tiebreaker_node.is_some()) >= 3;
    let preferred_nodes: Vec<String> = if auto_promote { chosen.clone() } else { Vec::new() };
    let everyone: Vec<(&Node, bool)> =
        tiebreaker_node.iter().map(|n| (n, true)).chain(nodes.iter().map(|n| (n, false))).collect();
    let mut portals = Vec::new();
    // The tiebreaker first (it answers at once), then the primary and the secondaries: the
    // primary's initial promotion waits for every peer, the tiebreaker included.
    for (node, diskless) in &everyone {
        let request = CreateResource {
            size_bytes,
            role: if node.name == chosen[0] { Role::Primary } else { Role::Secondary },
            protocol: replication.protocol,
            peers: everyone
                .iter()
                .filter(|(n, _)| n.name != node.name)
                .map(|(n, diskless)| Peer {
                    node: n.name.clone(),
                    url: n.url.clone(),
                    disk: diskless.then(|| "none".to_owned()),
                })
                .collect(),
            target_iqn: v.target_iqn.clone(),
            chap: Chap { username: v.chap_username.clone(), secret: v.chap_secret.clone() },
            source: if *diskless { None } else { source.as_ref().map(|(s, _)| s.clone()) },
            disk: diskless.then(|| "none".to_owned()),
            auto_promote,
            preferred_nodes: preferred_nodes.clone(),
        };
        let export =
            state.nodes.create(node, &v.resource, &request).await.map_err(|e| e.to_string())?;
        // Only replicas with data serve I/O: the tiebreaker's portal is not the volume's.
        if !diskless {
            portals.push(export.portal);
        }
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
        let all: Vec<Node> = everyone.iter().map(|(n, _)| (*n).clone()).collect();
        delete_pieces(state, &v.resource, &all, &[]).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Every node with a piece of the volume: the replicas and the tiebreaker.
fn with_tiebreaker(v: &Volume) -> Vec<String> {
    v.nodes.iter().chain(v.tiebreaker.iter()).cloned().collect()
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
    let Ok(nodes) = nodes_named(state, &with_tiebreaker(&v)) else { return };
    if let Err(e) = delete_pieces(state, &v.resource, &nodes, &[]).await {
        tracing::warn!("cleanup of volume {id} incomplete: {e}");
    }
}

pub fn extend_volume(state: &Arc<AppState>, id: String, new_size_gib: u64) {
    let s = state.clone();
    spawn(
        state,
        Table::Volumes,
        &id.clone(),
        format!("extend volume {id} to {new_size_gib} GiB"),
        async move {
            let result = async {
                let v = s
                    .db()
                    .get::<Volume>(Table::Volumes, &id)
                    .map_err(|e| e.to_string())?
                    .ok_or("volume vanished")?;
                let nodes = nodes_named(&s, &v.nodes)?;
                let size_bytes = new_size_gib.checked_mul(1 << 30).ok_or("size overflows")?;
                // Every replica's backing file grows first; then the primary (whichever node
                // it is) grows the device online across them, secondaries have nothing left.
                for node in &nodes {
                    s.nodes
                        .grow_backing(node, &v.resource, size_bytes)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                for node in &nodes {
                    s.nodes
                        .resize(node, &v.resource, size_bytes)
                        .await
                        .map_err(|e| e.to_string())?;
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
        },
    );
}

/// Deletes the volume's pieces (and, with cascade, its snapshots'), then its record.
pub fn delete_volume(state: &Arc<AppState>, id: String) {
    let s = state.clone();
    spawn(state, Table::Volumes, &id.clone(), format!("delete volume {id}"), async move {
        let result = async {
            let v = s
                .db()
                .get::<Volume>(Table::Volumes, &id)
                .map_err(|e| e.to_string())?
                .ok_or("volume vanished")?;
            let snaps: Vec<Snapshot> =
                s.db().list_by_parent(Table::Snapshots, &id).map_err(|e| e.to_string())?;
            let names: Vec<String> = snaps.iter().map(|sn| format!("snapshot-{}", sn.id)).collect();
            let nodes = nodes_named(&s, &with_tiebreaker(&v))?;
            delete_pieces(&s, &v.resource, &nodes, &names).await.map_err(|e| e.to_string())?;
            // The records go in one step: no reader sees a volume without its snapshots.
            s.transaction(|tx| {
                tx.get_for_update::<Volume>(Table::Volumes, &id)?;
                for sn in &snaps {
                    tx.delete(Table::Snapshots, &sn.id)?;
                }
                for a in tx.list_by_parent::<crate::model::Attachment>(Table::Attachments, &id)? {
                    tx.delete(Table::Attachments, &a.id)?;
                }
                tx.delete(Table::Volumes, &id)?;
                Ok(())
            })
            .map_err(|e| e.to_string())?;
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
    spawn(state, Table::Snapshots, &id.clone(), format!("create snapshot {id}"), async move {
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
                if let Err(e) = s.nodes.snapshot(node, &v.resource, &name, v.size_gib << 30).await {
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
    spawn(state, Table::Snapshots, &id.clone(), format!("delete snapshot {id}"), async move {
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

/// Resumes operations nobody runs: rows in a background status whose lease is free or
/// expired (their instance died, or this is the first start after a crash). Every contract
/// call is idempotent, so the operation is simply run again. Each row is claimed under its
/// lock first, so of several instances reconciling at once exactly one resumes it.
pub fn reconcile(state: &Arc<AppState>) -> Result<(), Fault> {
    let now = now_ms();
    let until = now + crate::constants::OPERATION_LEASE_MS;
    let me = state.instance_id.clone();
    let volumes: Vec<Volume> = state.read(|tx| Ok(tx.list_unleased(Table::Volumes, now)?))?;
    for v in volumes.into_iter().filter(|v| volume_status_is_background(v.status)) {
        let claimed = state.transaction(|tx| {
            let Some(current) = tx.get_for_update::<Volume>(Table::Volumes, &v.id)? else {
                return Ok(None);
            };
            let ours = volume_status_is_background(current.status)
                && tx.claim(Table::Volumes, &v.id, &me, now, until, false)?;
            Ok(ours.then_some(current))
        })?;
        let Some(v) = claimed else { continue };
        tracing::info!("resuming {} of volume {} (no live lease)", v.status, v.id);
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
                    state.transaction(|tx| Ok(tx.release(Table::Volumes, &v.id, &me)?))?;
                }
            },
            _ => {}
        }
    }
    let snaps: Vec<Snapshot> = state.read(|tx| Ok(tx.list_unleased(Table::Snapshots, now)?))?;
    for sn in snaps.into_iter().filter(|s| snapshot_status_is_background(&s.status)) {
        let claimed = state.transaction(|tx| {
            let Some(current) = tx.get_for_update::<Snapshot>(Table::Snapshots, &sn.id)? else {
                return Ok(None);
            };
            // A cascading volume delete removes its snapshots itself.
            let parent_deleting = tx
                .get::<Volume>(Table::Volumes, &current.volume_id)?
                .is_some_and(|v| v.status == VolumeStatus::Deleting);
            let ours = snapshot_status_is_background(&current.status)
                && !(current.status == "deleting" && parent_deleting)
                && tx.claim(Table::Snapshots, &sn.id, &me, now, until, false)?;
            Ok(ours.then_some(current))
        })?;
        let Some(sn) = claimed else { continue };
        tracing::info!("resuming {} of snapshot {} (no live lease)", sn.status, sn.id);
        match sn.status.as_str() {
            "creating" => create_snapshot(state, sn.id),
            "deleting" => delete_snapshot(state, sn.id),
            _ => {}
        }
    }
    Ok(())
}

/// Runs `reconcile` now and then every `RECONCILE_INTERVAL_MS`, so operations of an instance
/// that died are finished by the survivors.
pub async fn reconcile_loop(state: Arc<AppState>) {
    let mut ticker =
        tokio::time::interval(Duration::from_millis(crate::constants::RECONCILE_INTERVAL_MS));
    loop {
        ticker.tick().await;
        if let Err(e) = reconcile(&state) {
            tracing::warn!("reconciling: {e}");
        }
    }
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
                        // Every instance polls; the last answer wins, which is what a
                        // heartbeat means.
                        let stored = s.transaction(|tx| {
                            if let Some(mut n) =
                                tx.get_for_update::<Node>(Table::Nodes, &node.name)?
                            {
                                n.total_bytes = info.total_bytes;
                                n.free_bytes = info.free_bytes;
                                n.availability_zone = info.availability_zone;
                                n.heartbeat_ms = now_ms();
                                tx.put(Table::Nodes, &n.name, "", None, "", &n)?;
                            }
                            Ok(())
                        });
                        if let Err(e) = stored {
                            tracing::warn!("storing heartbeat of {}: {e}", node.name);
                        }
                    }
                    Err(e) => tracing::debug!("heartbeat of {}: {e}", node.name),
                }
            });
        }
    }
}

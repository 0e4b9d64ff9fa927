//! Snapshots on the control API (`PUT`/`DELETE /v1/resources/{name}/snapshots/{snapshot}`)
//! and the data of resources created from a snapshot or from another resource.
//!
//! A snapshot is taken by the resource's primary for every replica at once: it holds new
//! writes at the LUN (`Slot::write_gate`), flushes (the local disk and a barrier every peer
//! acknowledges, so every write acknowledged so far is on every replica), has each peer copy
//! its replica (`?local=true`) while it copies its own, and lets writes go again. So the copies
//! are one crash-consistent point in time on every replica, and a resource made from them needs
//! no initial sync. A secondary asked for a snapshot passes the request to the primary. Writes
//! wait for as long as the copies take: milliseconds with reflinks, the time to copy the data
//! extents on file systems without them (`snapshot.rs`).

use super::{ApiState, Failure, error, fail, not_found};
use crate::constants::{PEER_CALL_TIMEOUT_MS_MAX, SNAPSHOT_WRITE_HOLD_WAIT_MS_MAX};
use crate::host::{Slot, api_request_path};
use crate::peer_client;
use crate::provision::{self, PutRequest, Source};
use crate::snapshot;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use drbd_engine::protocol::{ConnectionState, DiskState, Role};
use serde::Deserialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Deserialize)]
pub(super) struct SnapshotQuery {
    /// Set by the primary: copy this replica now (the primary holds the writes).
    #[serde(default)]
    local: bool,
}

/// The backing file of `name` on this node.
fn disk_of(slot: &Slot) -> Result<PathBuf, Failure> {
    slot.plan()
        .map(|plan| plan.driver.backing_path.clone())
        .map_err(|e| fail(StatusCode::CONFLICT, format!("resource {}: {e}", slot.name)))
}

/// The resource's data bytes (what a copy of a replica reads at most).
fn data_bytes_of(slot: &Slot) -> u64 {
    slot.size_bytes.load(std::sync::atomic::Ordering::Acquire)
}

/// Copies `disk` to its snapshot `snap` on a blocking thread.
async fn copy_replica(disk: PathBuf, snap: &str) -> Result<snapshot::CloneKind, Failure> {
    let target = snapshot::path(&disk, snap);
    let joined = tokio::task::spawn_blocking(move || snapshot::clone_file(&disk, &target)).await;
    match joined {
        Ok(Ok(kind)) => Ok(kind),
        Ok(Err(e)) => {
            Err(fail(StatusCode::INSUFFICIENT_STORAGE, format!("copying the replica: {e}")))
        }
        Err(e) => Err(fail(StatusCode::INTERNAL_SERVER_ERROR, format!("copy task: {e}"))),
    }
}

fn taken(snap: &str, status: StatusCode) -> Response {
    (status, Json(json!({ "name": snap }))).into_response()
}

/// `PUT /v1/resources/{name}/snapshots/{snapshot}` (idempotent: 200 when it exists).
pub(super) async fn put(
    State(state): State<ApiState>,
    Path((name, snap)): Path<(String, String)>,
    Query(query): Query<SnapshotQuery>,
) -> Response {
    match take(&state, &name, &snap, query.local).await {
        Ok(status) => taken(&snap, status),
        Err(failure) => failure.into_response(),
    }
}

/// Takes snapshot `snap` of `name` (see the module comment); the status to answer with.
pub(super) async fn take(
    state: &ApiState,
    name: &str,
    snap: &str,
    local: bool,
) -> Result<StatusCode, Failure> {
    if !provision::valid_name(name) || !snapshot::valid_name(snap) {
        return Err(fail(StatusCode::BAD_REQUEST, format!("bad name {name:?} or {snap:?}")));
    }
    let host = &state.host;
    let slot = host
        .slot(name)
        .ok_or_else(|| fail(StatusCode::NOT_FOUND, format!("no resource {name} on this node")))?;
    let disk = disk_of(&slot)?;
    if snapshot::path(&disk, snap).exists() {
        return Ok(StatusCode::OK);
    }
    let device = slot
        .device()
        .ok_or_else(|| fail(StatusCode::CONFLICT, format!("resource {name} is not up")))?;
    let view = host
        .view(&slot)
        .await
        .ok_or_else(|| fail(StatusCode::CONFLICT, format!("resource {name} is not up")))?;
    let up_to_date = view.volumes.iter().all(|v| v.disk == DiskState::UpToDate);
    if local {
        if view.role == Role::Primary || !up_to_date {
            return Err(fail(
                StatusCode::CONFLICT,
                format!("resource {name}: only an UpToDate secondary copies on a primary's word"),
            ));
        }
        copy_replica(disk, snap).await?;
        return Ok(StatusCode::CREATED);
    }
    let request = std::fs::read(api_request_path(&host.settings, name))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<PutRequest>(&bytes).ok());
    let peers = request.map(|r| r.peers).unwrap_or_default();
    if view.role != Role::Primary {
        // The primary takes it for every replica; pass the request on.
        let primary = view
            .peers
            .iter()
            .find(|p| p.role == Role::Primary)
            .and_then(|p| peers.iter().find(|peer| peer.node == p.name))
            .ok_or_else(|| {
                fail(
                    StatusCode::CONFLICT,
                    format!("resource {name} has no primary this node can reach: no snapshot"),
                )
            })?;
        let path = format!("/v1/resources/{name}/snapshots/{snap}");
        // The primary answers once every replica is copied; its own calls to the peers,
        // which copy at the same time, give up first.
        let timeout_ms = peer_client::copy_call_timeout_ms(data_bytes_of(&slot))
            .saturating_add(PEER_CALL_TIMEOUT_MS_MAX);
        let url = &primary.url;
        peer_client::call_within::<serde_json::Value>(
            timeout_ms,
            url,
            &state.token,
            "PUT",
            &path,
            None,
        )
        .await
        .map_err(|e| fail(StatusCode::BAD_GATEWAY, e.to_string()))?;
        return Ok(StatusCode::CREATED);
    }
    let in_sync = up_to_date
        && view.peers.iter().all(|p| {
            p.connection == ConnectionState::Connected
                && p.volumes.iter().all(|v| v.peer_disk == DiskState::UpToDate)
        });
    if !in_sync {
        return Err(fail(
            StatusCode::CONFLICT,
            format!("resource {name}: every replica must be connected and UpToDate"),
        ));
    }
    if view.peers.iter().any(|p| !peers.iter().any(|peer| peer.node == p.name)) {
        return Err(fail(
            StatusCode::CONFLICT,
            format!(
                "resource {name} was not created through the API: its peers' control API is \
                 unknown, so their replicas cannot be copied"
            ),
        ));
    }
    let started = Instant::now();
    let hold = tokio::time::timeout(
        Duration::from_millis(SNAPSHOT_WRITE_HOLD_WAIT_MS_MAX),
        slot.write_gate.write(),
    )
    .await
    .map_err(|_| {
        fail(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("resource {name}: writes in flight did not finish; try again"),
        )
    })?;
    let result = async {
        device.flush().await.map_err(|e| {
            (fail(StatusCode::SERVICE_UNAVAILABLE, format!("flush: {e}")), Vec::new())
        })?;
        // Every replica copies at once: writes wait for the slowest copy, not for the sum.
        let timeout_ms = peer_client::copy_call_timeout_ms(data_bytes_of(&slot));
        let path = format!("/v1/resources/{name}/snapshots/{snap}?local=true");
        let peer_copies = futures_util::future::join_all(peers.iter().map(|peer| {
            let path = &path;
            async move {
                peer_client::call_within::<serde_json::Value>(
                    timeout_ms,
                    &peer.url,
                    &state.token,
                    "PUT",
                    path,
                    None,
                )
                .await
                .map(|_| peer.clone())
            }
        }));
        let (answers, own) = tokio::join!(peer_copies, copy_replica(disk.clone(), snap));
        let copied: Vec<_> = answers.iter().filter_map(|a| a.as_ref().ok().cloned()).collect();
        if let Some(Err(e)) = answers.into_iter().find(Result::is_err) {
            return Err((fail(StatusCode::BAD_GATEWAY, e.to_string()), copied));
        }
        let kind = own.map_err(|f| (f, copied))?;
        Ok(kind)
    }
    .await;
    drop(hold);
    let held_ms = started.elapsed().as_millis();
    match result {
        Ok(kind) => {
            tracing::info!(resource = %name, "snapshot {snap}: writes held {held_ms} ms ({kind:?})");
            Ok(StatusCode::CREATED)
        }
        Err((failure, copied)) => {
            for peer in copied {
                let path = format!("/v1/resources/{name}/snapshots/{snap}");
                let _ = peer_client::call::<serde_json::Value>(
                    &peer.url,
                    &state.token,
                    "DELETE",
                    &path,
                    None,
                )
                .await;
            }
            let _ = std::fs::remove_file(snapshot::path(&disk, snap));
            tracing::warn!(resource = %name, "snapshot {snap} failed: {}", failure.message);
            Err(failure)
        }
    }
}

/// `DELETE /v1/resources/{name}/snapshots/{snapshot}`: this replica's copy (idempotent).
pub(super) async fn delete(
    State(state): State<ApiState>,
    Path((name, snap)): Path<(String, String)>,
) -> Response {
    if !provision::valid_name(&name) || !snapshot::valid_name(&snap) {
        return error(StatusCode::BAD_REQUEST, format!("bad name {name:?} or {snap:?}"));
    }
    let Some(slot) = state.host.slot(&name) else { return not_found(&name) };
    let disk = match disk_of(&slot) {
        Ok(disk) => disk,
        Err(failure) => return failure.into_response(),
    };
    match std::fs::remove_file(snapshot::path(&disk, &snap)) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("removing the snapshot: {e}")),
    }
}

/// Refuses, before anything is recorded or reserved, a create whose source this node cannot
/// read: the source resource has no replica here, or the snapshot is not here.
pub(super) fn check_source(state: &ApiState, request: &PutRequest) -> Result<(), Failure> {
    let Ok(Some(source)) = provision::source_of(request) else { return Ok(()) };
    let resource = match &source {
        Source::Snapshot { resource, .. } | Source::Resource { resource } => resource,
    };
    let slot = state.host.slot(resource).ok_or_else(|| {
        fail(StatusCode::CONFLICT, format!("source {resource} has no replica on this node"))
    })?;
    if let Source::Snapshot { snapshot: snap, .. } = &source
        && !snapshot::path(&disk_of(&slot)?, snap).exists()
    {
        return Err(fail(
            StatusCode::CONFLICT,
            format!("snapshot {snap} of {resource} is not on this node"),
        ));
    }
    Ok(())
}

/// Fills the new backing file `disk` of resource `name` from its source: a snapshot of another
/// resource on this node, or another resource through a snapshot taken for the purpose (the
/// first node to ask takes it on every replica of the source; each node removes its copy once
/// used).
pub(super) async fn fill_from_source(
    state: &ApiState,
    name: &str,
    source: &Source,
    disk: &std::path::Path,
    backing_bytes: u64,
) -> Result<(), Failure> {
    let (resource, snap, temporary) = match source {
        Source::Snapshot { resource, snapshot } => (resource, snapshot.clone(), false),
        Source::Resource { resource } => (resource, provision::clone_snapshot_name(name), true),
    };
    let slot = state.host.slot(resource).ok_or_else(|| {
        fail(StatusCode::CONFLICT, format!("source {resource} has no replica on this node"))
    })?;
    let source_disk = disk_of(&slot)?;
    // The source's data: its metadata, if internal, lies beyond and is not copied.
    let data_bytes = data_bytes_of(&slot);
    if data_bytes == 0 {
        return Err(fail(StatusCode::CONFLICT, format!("source {resource} is not up")));
    }
    let from = snapshot::path(&source_disk, &snap);
    if temporary && !from.exists() {
        take(state, resource, &snap, false).await?;
    }
    if !from.exists() {
        return Err(fail(
            StatusCode::CONFLICT,
            format!("snapshot {snap} of {resource} is not on this node"),
        ));
    }
    if let Some(parent) = disk.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| fail(StatusCode::INSUFFICIENT_STORAGE, format!("{e}")))?;
    }
    let target = disk.to_path_buf();
    let copied = tokio::task::spawn_blocking(move || {
        // Filled beside the disk and renamed into place: a disk that exists is complete.
        let mut filling = target.as_os_str().to_owned();
        filling.push(".filling");
        let filling = PathBuf::from(filling);
        let _ = std::fs::remove_file(&filling);
        snapshot::clone_file(&from, &filling)?;
        let file = std::fs::OpenOptions::new().write(true).open(&filling)?;
        // Cut to the source's data, then grown to this resource's data and metadata: the rest
        // of a bigger volume reads as zeros on every replica, and the metadata area holds no
        // superblock, so this resource gets metadata of its own (create-md).
        file.set_len(data_bytes)?;
        file.set_len(backing_bytes.max(data_bytes))?;
        file.sync_all()?;
        std::fs::rename(&filling, &target)
    })
    .await;
    match copied {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(fail(StatusCode::INSUFFICIENT_STORAGE, format!("copying {snap}: {e}")));
        }
        Err(e) => return Err(fail(StatusCode::INTERNAL_SERVER_ERROR, format!("copy task: {e}"))),
    }
    if temporary {
        let _ = std::fs::remove_file(snapshot::path(&source_disk, &snap));
    }
    Ok(())
}

/// Removes every snapshot file of the replica on `disk` (the resource is being deleted).
pub(super) fn remove_all(disk: &std::path::Path) {
    for file in snapshot::list(disk) {
        let _ = std::fs::remove_file(file);
    }
}

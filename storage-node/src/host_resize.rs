//! `tandemadm resize [--size SIZE] RES` and the control API's resize: DRBD's online grow.
//!
//! Every replica's backing file grows first: by hand (`truncate -s`), or here with `--size`
//! (the file grows so the device holds SIZE bytes after the metadata moved, crash-safely:
//! `drbd_engine::driver::meta_v09::grow_backing_file`). On the primary the engine then
//! negotiates the new size with the connected peers (the smallest usable size, never a
//! shrink) and every replica moves its internal metadata to the new end. The LUN's capacity
//! follows the device, and the iSCSI target gives open sessions CAPACITY DATA HAS CHANGED.

use super::{Host, Slot, VerbResult, explain_state_error, fail, max_peers};
use crate::control::{Reply, exit};
use drbd_engine::driver::MetaFormat;
use drbd_engine::meta::{AlGeometry, MetaLayout};
use drbd_engine::protocol::Role;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

impl Host {
    /// Grows this node's backing file so the device can hold `size_bytes` (never shrinks);
    /// true if it grew. The size is the device's, as `drbdadm resize --size` takes it (the
    /// HTTP API adds the persistent-reservation area to a volume's size first).
    pub fn grow_backing(&self, slot: &Slot, size_bytes: u64) -> Result<bool, (i32, String)> {
        let plan = slot.plan().map_err(|e| (exit::CONFIG_INVALID, e))?;
        let driver = &plan.driver;
        let path = &driver.backing_path;
        let grown = if driver.meta_format == MetaFormat::V09Internal {
            let file_bytes = MetaLayout::internal_device_bytes_for_data(
                size_bytes,
                max_peers(driver),
                AlGeometry::default(),
            )
            .map_err(|e| {
                (exit::EXEC_ERROR, format!("internal metadata for {size_bytes} bytes: {e}"))
            })?;
            drbd_engine::driver::meta_v09::grow_backing_file(path, file_bytes)
                .map_err(|e| (exit::EXEC_ERROR, format!("growing the backing file: {e}")))?
        } else {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if len >= size_bytes {
                false
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(size_bytes).and_then(|()| f.sync_all()))
                    .map_err(|e| (exit::EXEC_ERROR, format!("{}: {e}", path.display())))?;
                true
            }
        };
        if grown {
            tracing::info!(resource = %slot.name, path = %path.display(), size_bytes,
                "backing file grown for a resize");
        }
        Ok(grown)
    }

    pub(super) async fn resize(
        &self,
        slot: &Arc<Slot>,
        size_bytes: Option<u64>,
        out: &mpsc::UnboundedSender<Reply>,
    ) -> VerbResult {
        let line = |text: String| {
            let _ = out.send(Reply::Line { text });
        };
        let name = &slot.name;
        let current = slot.device().map_or(0, |d| d.size_bytes());
        if let Some(size) = size_bytes.filter(|size| *size < current) {
            return fail(
                exit::STATE_CHANGE_FAILED,
                format!(
                    "{name}: refusing to shrink from {} KiB to {} KiB: online resize only grows",
                    current / 1024,
                    size / 1024
                ),
            );
        }
        if let Some(size) = size_bytes {
            self.grow_backing(slot, size)?;
        }
        let Some(device) = slot.device() else {
            if size_bytes.is_some() {
                line(format!(
                    "{name}: backing file grown; the resource is down: after 'tandemadm up \
                     {name}' run 'tandemadm resize {name}' on the primary"
                ));
                return Ok(());
            }
            return fail(
                exit::CONFIG_INVALID,
                format!("resource is down; run 'tandemadm up {name}' first"),
            );
        };
        let status = device.status().await.map_err(|e| (exit::EXEC_ERROR, e.to_string()))?;
        if status.role != Role::Primary {
            if size_bytes.is_some() {
                line(format!(
                    "{name}: backing file grown here; run 'tandemadm resize {name}' on the primary \
                     once every replica's file has grown"
                ));
                return Ok(());
            }
            return fail(
                exit::STATE_CHANGE_FAILED,
                format!("{name}: resize runs on the primary (this node is {})", status.role),
            );
        }
        // Initiator writes wait while the device grows and the persistent-reservation area
        // moves from the old end to the new one (it sits at the device's end, below nothing
        // the initiator may write).
        let gate = slot.write_gate.write().await;
        let (old, new) =
            device.resize().await.map_err(|e| explain_state_error(name, "resize", e))?;
        if new > old
            && slot.reservation_area()
            && let Err(error) = slot.reservations.relocate(&device, old, new).await
        {
            tracing::error!(resource = %name, %error,
                    "moving the persistent reservations to the new end failed");
            return fail(
                exit::EXEC_ERROR,
                format!(
                    "{name}: resized from {} KiB to {} KiB, but moving the persistent \
                         reservations failed: {error}",
                    old / 1024,
                    new / 1024
                ),
            );
        }
        drop(gate);
        slot.size_bytes.store(new, Ordering::Release);
        if let Some(size) = size_bytes.filter(|size| new < *size) {
            return fail(
                exit::EXEC_ERROR,
                format!(
                    "{name}: the device holds {} KiB, not {} KiB: a connected peer's backing file \
                     has not grown yet; run 'tandemadm resize --size {size} {name}' there, then \
                     'tandemadm resize {name}' here",
                    new / 1024,
                    size / 1024
                ),
            );
        }
        if new == old {
            line(format!(
                "{name}: size unchanged at {} KiB (grow every replica's backing file first)",
                old / 1024
            ));
        } else {
            line(format!("{name}: resized from {} KiB to {} KiB", old / 1024, new / 1024));
        }
        Ok(())
    }
}

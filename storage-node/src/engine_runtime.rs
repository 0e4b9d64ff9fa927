//! One resource's replication engine on a runtime of its own, so that `down` can take back
//! everything the engine holds.
//!
//! `ReplicatedDevice::start` spawns its tasks (the replication listener's accept loop, one
//! reader and one writer per peer connection, the driver owning the backing store and the
//! metadata file) on whatever runtime it is called from, and hands back no way to stop the
//! accept loop. Run on tandemd's shared runtime, those tasks outlive `down`: the listener keeps
//! its port and the next `up` fails with "address in use". Here each resource gets a
//! single-threaded runtime on a thread of its own; `stop` ends that runtime, which drops every
//! task it ran and with them the listener, the peer sockets and the files, and returns once
//! they are closed. The device handle works from any runtime (it is channels), so the iSCSI
//! side keeps calling it from tandemd's main runtime.

use crate::constants::ENGINE_STOP_TIMEOUT_MS_MAX;
use drbd_engine::driver::{DeviceError, DriverConfig, ReplicatedDevice};
use std::time::Duration;
use tokio::sync::oneshot;

/// A running engine and the means to stop it.
pub struct EngineRuntime {
    /// Dropping or sending ends the runtime's `block_on`, which lets the thread drop it.
    stop: Option<oneshot::Sender<()>>,
    /// Fires after the runtime (and every task and file it held) is gone.
    stopped: Option<oneshot::Receiver<()>>,
}

/// Why the engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot start the engine's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the engine's thread ended before it started")]
    Vanished,
}

impl EngineRuntime {
    /// Starts `driver` on a new runtime (thread name `engine-NAME`) and returns its handle.
    pub async fn start(
        name: &str,
        driver: DriverConfig,
    ) -> Result<(ReplicatedDevice, EngineRuntime), StartError> {
        let (started_tx, started_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let thread_name: String = format!("engine-{name}").chars().take(15).collect();
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let runtime =
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = started_tx.send(Err(StartError::Runtime(error)));
                            return;
                        }
                    };
                let started = runtime.block_on(ReplicatedDevice::start(driver));
                let running = started.is_ok();
                let device = started.map(|(device, _task)| device).map_err(StartError::from);
                if started_tx.send(device).is_ok() && running {
                    // Serve until told to stop (or until the handle is dropped).
                    let _ = runtime.block_on(stop_rx);
                }
                // Dropping the runtime drops every task spawned on it: the accept loop and its
                // listener, the connections, the driver with the backing store and metadata.
                drop(runtime);
                let _ = stopped_tx.send(());
            })
            .map_err(StartError::Runtime)?;
        let device = started_rx.await.map_err(|_| StartError::Vanished)??;
        Ok((device, EngineRuntime { stop: Some(stop_tx), stopped: Some(stopped_rx) }))
    }

    /// Stops the engine and waits until its listener, connections and files are released.
    /// Returns false when that took longer than `ENGINE_STOP_TIMEOUT_MS_MAX` (the thread
    /// still finishes on its own).
    pub async fn stop(mut self) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(stopped) = self.stopped.take() else { return true };
        let timeout = Duration::from_millis(ENGINE_STOP_TIMEOUT_MS_MAX);
        // An error means the thread ended without saying so (it panicked): nothing is held.
        tokio::time::timeout(timeout, stopped).await.is_ok()
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        // Not stopped explicitly: let the thread wind the runtime down in the background.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

//! One resource's replication engine, with the means to take back everything it holds.
//!
//! `ReplicatedDevice::start` spawns tasks for the engine's whole life (the replication
//! listener's accept loop, one reader and one writer per peer connection, the driver owning
//! the backing store and the metadata file) and hands back no way to stop them: the listener
//! would keep its port and the next `up` fail with "address in use". So the engine starts with
//! `start_scoped`: every task it spawns goes into a `TaskScope`, and `stop` aborts them and
//! returns once they are dropped, which closes the listener, the peer sockets and the files.
//!
//! The tasks run on the runtime `start` is called from: tandemd's, the one serving the iSCSI
//! connections. Before, each resource had a single-threaded runtime on a thread of its own, so
//! every request crossed threads twice (the command to the engine's thread, the completion
//! back), each crossing a wakeup of a parked thread: with 4 KiB writes at QD32 that was about
//! a quarter of the primary's CPU (futex wakes and context switches in `perf`), and on this
//! two-core machine the CPU per I/O decides the speed (figures in the storage-node README).
//! The driver's blocking work (page-cache writes, metadata fsyncs) now runs on a worker of the
//! shared runtime; the other worker keeps serving meanwhile.

use crate::constants::ENGINE_STOP_TIMEOUT_MS_MAX;
use drbd_engine::driver::{DeviceError, DriverConfig, ReplicatedDevice, TaskScope};
use std::time::Duration;

/// A running engine and the means to stop it.
pub struct EngineRuntime {
    /// Every task of the engine; `None` once stopped.
    tasks: Option<TaskScope>,
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
    /// Starts `driver` on the current runtime and returns its handle. (`name`, the resource's,
    /// is for the log.)
    pub async fn start(
        name: &str,
        driver: DriverConfig,
    ) -> Result<(ReplicatedDevice, EngineRuntime), StartError> {
        let tasks = TaskScope::default();
        match ReplicatedDevice::start_scoped(driver, &tasks).await {
            Ok(device) => Ok((device, EngineRuntime { tasks: Some(tasks) })),
            Err(error) => {
                // Nothing may outlive a failed start (a listener bound before the failure).
                tasks.shutdown().await;
                tracing::debug!(resource = name, %error, "engine did not start");
                Err(error.into())
            }
        }
    }

    /// Stops the engine and waits until its listener, connections and files are released.
    /// Returns false when that took longer than `ENGINE_STOP_TIMEOUT_MS_MAX` (the tasks are
    /// aborted all the same and finish being dropped on their own).
    pub async fn stop(mut self) -> bool {
        let Some(tasks) = self.tasks.take() else { return true };
        let timeout = Duration::from_millis(ENGINE_STOP_TIMEOUT_MS_MAX);
        tokio::time::timeout(timeout, tasks.shutdown()).await.is_ok()
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        // Not stopped explicitly: the runtime drops the aborted tasks in the background.
        if let Some(tasks) = self.tasks.take() {
            tasks.abort();
        }
    }
}

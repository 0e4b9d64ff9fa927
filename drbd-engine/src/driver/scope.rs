//! The tasks of one running engine, so that a host can run several engines on its own runtime
//! and still take back everything one of them holds.
//!
//! An engine spawns tasks for its whole life: the driver (backing store, metadata file), the
//! replication listener's accept loop, one reader and one writer per peer connection, dials and
//! fence handlers. Started with [`ReplicatedDevice::start_scoped`](super::ReplicatedDevice),
//! every one of them goes into the engine's `TaskScope`; [`TaskScope::shutdown`] aborts them
//! and returns once each is dropped, so the listener's port, the sockets and the files are
//! closed. A task spawned after that (by a task finishing its last poll) is dropped unstarted.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::task::JoinSet;

/// A set of tasks that end together. Cloning shares the set.
#[derive(Clone, Default)]
pub struct TaskScope {
    inner: Arc<Mutex<ScopeState>>,
}

#[derive(Default)]
struct ScopeState {
    tasks: JoinSet<()>,
    closed: bool,
}

impl TaskScope {
    fn lock(&self) -> MutexGuard<'_, ScopeState> {
        // A panic while holding the lock leaves the set itself consistent.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `task` on the current runtime as part of this scope (dropped at once when the
    /// scope is shut down already).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        // Finished tasks leave the set here, so reconnects do not grow it.
        while state.tasks.try_join_next().is_some() {}
        state.tasks.spawn(task);
    }

    /// Tasks still in the set (finished ones count until the next `spawn` reaps them).
    pub fn len(&self) -> usize {
        self.lock().tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Aborts every task and waits until all of them are dropped.
    pub async fn shutdown(&self) {
        let mut tasks = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.tasks)
        };
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// Aborts every task without waiting (for `Drop`): the runtime drops them soon after.
    pub fn abort(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_drops_every_task_and_refuses_new_ones() {
        let scope = TaskScope::default();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        // The task holds `held_tx` until it is dropped: the receiver errs only then.
        scope.spawn(async move {
            let _held = held_tx;
            std::future::pending::<()>().await;
        });
        assert_eq!(scope.len(), 1);
        scope.shutdown().await;
        assert!(held_rx.await.is_err(), "the task was dropped");
        let (late_tx, late_rx) = tokio::sync::oneshot::channel::<()>();
        scope.spawn(async move {
            let _ = late_tx.send(());
        });
        assert!(late_rx.await.is_err(), "a task spawned after shutdown never runs");
        assert!(scope.is_empty());
    }
}

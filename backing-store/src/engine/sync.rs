//! The portable engine: blocking pread/pwritev2/fdatasync/fallocate on a pool of worker
//! threads. It is also the io_uring engine's helper for operations kept off the ring.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::file::BackingFile;
use crate::options::EngineKind;
use crate::request::Request;

use super::Engine;

#[derive(Debug)]
struct Queue {
    requests: VecDeque<Request>,
    /// Set on drop: workers finish what is queued, then exit.
    closing: bool,
}

#[derive(Debug)]
struct Shared {
    file: Arc<BackingFile>,
    queue: Mutex<Queue>,
    available: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A worker panicking while holding the lock leaves the queue itself consistent (push
        // and pop are single calls), so the poison flag carries no information.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug)]
pub(crate) struct SyncEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl SyncEngine {
    pub(crate) fn new(file: Arc<BackingFile>, threads: usize) -> std::io::Result<SyncEngine> {
        assert!(threads > 0);
        let shared = Arc::new(Shared {
            file,
            queue: Mutex::new(Queue { requests: VecDeque::new(), closing: false }),
            available: Condvar::new(),
        });
        let mut engine = SyncEngine { shared, workers: Vec::with_capacity(threads) };
        for index in 0..threads {
            let shared = Arc::clone(&engine.shared);
            // On failure, `engine` drops here and joins the workers already started.
            let worker = std::thread::Builder::new()
                .name(format!("backing-sync-{index}"))
                .spawn(move || run_worker(&shared))?;
            engine.workers.push(worker);
        }
        Ok(engine)
    }
}

fn run_worker(shared: &Shared) {
    loop {
        let request = {
            let mut queue = shared.lock();
            loop {
                if let Some(request) = queue.requests.pop_front() {
                    break request;
                }
                if queue.closing {
                    return;
                }
                queue =
                    shared.available.wait(queue).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        let Request { operation, completion } = request;
        completion.complete(shared.file.execute_blocking(operation));
    }
}

impl Engine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn submit(&self, request: Request) {
        let mut queue = self.shared.lock();
        assert!(!queue.closing, "submit on a closing engine");
        queue.requests.push_back(request);
        drop(queue);
        self.shared.available.notify_one();
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.available.notify_all();
        for worker in self.workers.drain(..) {
            // A panicked worker already dropped its request's Completion, which the caller
            // sees as EngineStopped; nothing more to do here.
            let _ = worker.join();
        }
    }
}

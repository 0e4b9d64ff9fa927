//! Requests and the single completion path every engine uses.
//!
//! A request carries its operation and a `Completion`: the oneshot sender the caller's future
//! waits on plus the in-flight permit. Completing (or dropping) the `Completion` is the only
//! way a request ends, so the in-flight bound holds even when callers drop their futures, and
//! the futures work on any tokio runtime (or none: a oneshot needs no reactor).

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::error::Error;

/// What a request asks of the engine. Ranges were checked against the store's size and
/// permissions before the request was built. `WriteGathered` writes several buffers back to
/// back from `offset` (`BackingStore::write_gathered`): one pwritev instead of a system call
/// per buffer; never FUA.
#[derive(Debug)]
pub(crate) enum Operation {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Bytes, fua: bool },
    WriteGathered { offset: u64, pieces: Vec<Bytes> },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
    Resize { size_bytes: u64 },
}

impl Operation {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Operation::Read { .. } => "read",
            Operation::Write { .. } => "write",
            Operation::WriteGathered { .. } => "write_gathered",
            Operation::Flush => "flush",
            Operation::Discard { .. } => "discard",
            Operation::WriteZeroes { .. } => "write_zeroes",
            Operation::Resize { .. } => "resize",
        }
    }
}

/// What a completed request hands back.
#[derive(Debug)]
pub(crate) enum Output {
    Done,
    Data(Bytes),
}

pub(crate) type OperationResult = Result<Output, Error>;

/// The one completion path: engines call `complete` exactly once per request.
#[derive(Debug)]
pub(crate) struct Completion {
    sender: oneshot::Sender<OperationResult>,
    /// Released when the engine is done with the request, not when the caller stops waiting.
    permit: OwnedSemaphorePermit,
}

impl Completion {
    pub(crate) fn new(
        permit: OwnedSemaphorePermit,
    ) -> (Completion, oneshot::Receiver<OperationResult>) {
        let (sender, receiver) = oneshot::channel();
        (Completion { sender, permit }, receiver)
    }

    pub(crate) fn complete(self, result: OperationResult) {
        let Completion { sender, permit } = self;
        // The engine is done with the request: free its slot before waking the caller, so a
        // caller that sees the result also sees the slot free.
        drop(permit);
        // The caller may have dropped its future; the result is then discarded on purpose.
        let _ = sender.send(result);
    }
}

#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) operation: Operation,
    pub(crate) completion: Completion,
}

//! The driver's side of WRITE ATOMIC (`protocol::node::atomic`): each replica writes an
//! atomic `DiskOp` through its own atomic-write journal, a side file next to the backing
//! file (`BACKING.atomic-journal`, one slot of `ATOMIC_WRITE_BYTES_MAX`), and replays a
//! pending record when the engine starts, before the disk serves anything.

use super::{DiskFuture, DiskOp, DriverConfig, IoFailed, IoId};
use crate::constants::{ATOMIC_WRITE_BYTES_MAX, BLOCK_SIZE_BYTES};
use backing_store::atomic_journal::{AtomicJournal, JournalError, Recovery, journal_path};
use backing_store::{BackingStore, EngineKind, OpenOptions};
use std::sync::Arc;

/// Opens (and recovers) the journal of `store` for its first `data_bytes`, or `None` where a
/// side file cannot live (a block device as backing) or no disk is used (a diskless node).
/// Then atomic writes are plain writes and the device claims one block as its atomic limit.
pub(super) async fn open_journal(
    config: &DriverConfig,
    store: &BackingStore,
    data_bytes: u64,
) -> Result<Option<Arc<AtomicJournal>>, JournalError> {
    if config.quorum.diskless || store.is_block_device() {
        return Ok(None);
    }
    // io_uring whatever the data's engine: one ring thread rather than the sync engine's
    // pool per resource, for a file that sees one write at a time (the slot), and rarely.
    // A kernel that refuses io_uring gets the sync engine (BackingStore::open falls back).
    let options = OpenOptions {
        engine: EngineKind::Uring,
        direct_io: config.direct_io,
        create_size_bytes: None,
        read_only: false,
    };
    let slot_bytes = u32::try_from(ATOMIC_WRITE_BYTES_MAX).expect("1 MiB fits u32");
    let path = journal_path(&config.backing_path);
    let (journal, recovery) =
        AtomicJournal::open(&path, store, data_bytes, slot_bytes, &options).await?;
    if recovery != Recovery::Clean {
        tracing::warn!(journal = %path.display(), %recovery, "atomic-write journal recovered");
    }
    Ok(Some(Arc::new(journal)))
}

/// The largest atomic write the device keeps whole, in bytes.
pub(super) fn atomic_write_max_bytes(journal: Option<&Arc<AtomicJournal>>) -> u64 {
    journal.map_or(BLOCK_SIZE_BYTES, |j| u64::from(j.slot_bytes()))
}

/// An atomic write as a journaled disk future, or the op back when it is not one (or there
/// is no journal: a plain write then, see `open_journal`).
pub(super) fn journaled(
    journal: Option<&Arc<AtomicJournal>>,
    store: &BackingStore,
    id: IoId,
    op: DiskOp,
) -> Result<DiskFuture, DiskOp> {
    let (Some(journal), DiskOp::Write { offset_blocks, data, atomic: true, .. }) = (journal, &op)
    else {
        return Err(op);
    };
    let (journal, store, offset_bytes, data) =
        (journal.clone(), store.clone(), offset_blocks * BLOCK_SIZE_BYTES, data.clone());
    Ok(Box::pin(async move {
        // Durable when it completes, FUA or not: the journal writes each step FUA.
        let result =
            journal.write(&store, offset_bytes, data).await.map(|()| None).map_err(|error| {
                tracing::error!(%error, "atomic write failed");
                IoFailed
            });
        (id, result)
    }))
}

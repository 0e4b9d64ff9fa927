//! Incremental bookkeeping for the write path's two per-input checks.
//!
//! After every input the node completes the application writes that are done (local disk and
//! every peer it waits for) and drops the transfer-log entries that are stable everywhere. A
//! busy primary has a few dozen writes in flight but thousands of transfer-log entries (an
//! epoch is closed every `BARRIER_INTERVAL_MS`), and scanning both on every input was about a
//! tenth of the primary's CPU. Instead, every change that can make a write completable or an
//! entry collectable records its id here, and the pump looks at those ids only.
//!
//! The ids come back sorted and without duplicates, so writes complete and entries are dropped
//! in exactly the order a full scan of the (id-ordered) maps would have produced: the outputs
//! are the same as before, which keeps simulator runs identical seed for seed.

/// Ids of writes and transfer-log entries to re-check at the next pump.
#[derive(Debug, Default)]
pub(crate) struct Candidates {
    writes: Vec<u64>,
    transfer_log: Vec<u64>,
}

impl Candidates {
    /// The application write `id` may have become completable.
    pub(crate) fn write(&mut self, id: u64) {
        self.writes.push(id);
    }

    /// The transfer-log entry `id` may have become collectable.
    pub(crate) fn transfer_log(&mut self, id: u64) {
        self.transfer_log.push(id);
    }

    /// The recorded write ids, ascending and unique; the set is empty afterwards.
    pub(crate) fn take_writes(&mut self) -> Vec<u64> {
        sorted_unique(&mut self.writes)
    }

    /// The recorded transfer-log ids, ascending and unique; the set is empty afterwards.
    pub(crate) fn take_transfer_log(&mut self) -> Vec<u64> {
        sorted_unique(&mut self.transfer_log)
    }

    /// Whether `id` is recorded as a write candidate (for the consistency check).
    pub(crate) fn has_write(&self, id: u64) -> bool {
        self.writes.contains(&id)
    }

    /// Whether `id` is recorded as a transfer-log candidate (for the consistency check).
    pub(crate) fn has_transfer_log(&self, id: u64) -> bool {
        self.transfer_log.contains(&id)
    }
}

fn sorted_unique(ids: &mut Vec<u64>) -> Vec<u64> {
    let mut taken = std::mem::take(ids);
    taken.sort_unstable();
    taken.dedup();
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_back_sorted_unique_and_once() {
        let mut c = Candidates::default();
        for id in [5, 3, 5, 9, 3] {
            c.write(id);
            c.transfer_log(id + 100);
        }
        assert!(c.has_write(9) && !c.has_write(4));
        assert!(c.has_transfer_log(103) && !c.has_transfer_log(3));
        assert_eq!(c.take_writes(), vec![3, 5, 9]);
        assert_eq!(c.take_transfer_log(), vec![103, 105, 109]);
        assert!(c.take_writes().is_empty());
        assert!(c.take_transfer_log().is_empty());
    }
}

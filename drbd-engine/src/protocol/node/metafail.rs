//! A metadata write that failed (a child module of `node`; `node.rs` and `diskless.rs` carry
//! one-line hooks).
//!
//! The driver persists every `Output::Persist` before it acts on any later output ("durable
//! before anything after it happens"). When that fails (ENOSPC on the file system of an
//! external meta-disk, EIO on the backing file) the node cannot keep the promise, so, as
//! DRBD does for a metadata I/O error whatever `on-io-error` says (its `pass_on` only covers
//! data I/O), the disk is detached: `Failed`, then `Diskless`, serving through an UpToDate
//! peer when there is one (see `diskless`), failing I/O with `NoUpToDateData` otherwise.
//!
//! What was queued behind the failed updates was decided on the premise that they were
//! durable, so it is not carried out as if they were:
//! - later `Persist`s are dropped (the disk is gone; memory keeps them, below);
//! - a later `DiskIo` is not submitted but fails at once (DRBD: no local disk, the bio
//!   errors). A data write whose activity-log or bitmap update did not persist therefore
//!   never reaches the disk, and the disk stays consistent with its on-disk metadata as of the
//!   last update that did persist (plus I/O submitted before, covered by earlier updates).
//!   The writes complete through the peers that have them, as after any detach;
//! - a later success (`Complete` with `Ok(None)`: a write or flush) only stands if an
//!   UpToDate peer is still connected to have it; with none, the only copy would sit on a disk
//!   whose metadata may not know it, so it fails (`RequestError::Io`);
//! - frames and events go out in their order, before what the detach sends: a primary's peers
//!   get its data, then `Frame::Detached` and `OutOfSync` for every write in doubt.
//!
//! The bitmap after a failed metadata write: the in-memory metadata (kept as the detach
//! snapshot) holds every update, the on-disk one only those before the failure, and a torn
//! write may have left one area half-written. From the detach on, the peers track what this
//! disk lacks. But the on-disk bitmap cannot be trusted for what was marked before: a bit
//! that failed to persist would make a later resync skip a block. So `attach` after a
//! metadata failure does a full resync: every block is marked out of sync for every diskful
//! peer (the handshake merges both ends' bitmaps, so the copy goes whichever way the UUIDs
//! say), and the whole superblock (UUIDs, flags) is rewritten, so disk and memory agree again.
//! A daemon restarted in between loads the on-disk metadata instead: no data write reached
//! the disk without its activity-log and bitmap updates (the `DiskIo` rule above), and a
//! primary that detached with a peer is behind the generation it handed that peer, so the
//! peer resyncs it. What such a restart can lose is a bit this node kept for a third party
//! (an `OutOfSync` a diskless peer sent): the other peers were sent it too.

use super::*;

impl Node {
    /// The driver failed to persist the `Persist` outputs it polled last. `next_output` is the
    /// output it polled after them (if any), which it must not carry out itself; what the node
    /// wants done instead comes from `poll_output` as usual.
    pub fn handle_metadata_failed(&mut self, now_ms: u64, next_output: Option<Output>) {
        self.advance(now_ms);
        let mut held: VecDeque<Output> = next_output.into_iter().collect();
        held.extend(self.outputs.drain(..));
        let mut failed_ios = Vec::new();
        let mut successes = Vec::new();
        for output in held {
            match output {
                Output::Persist(_) => {} // applied in memory; the disk is going away
                Output::DiskIo { id, .. } => failed_ios.push(id),
                Output::Complete { request, result: Ok(None) } => {
                    // Placed in order now, judged once the detach settled who has the data.
                    successes.push((request, self.outputs.len()));
                    self.outputs.push_back(Output::Complete { request, result: Ok(None) });
                }
                other => self.outputs.push_back(other),
            }
        }
        self.diskless.meta_failed = true;
        // Metadata errors detach whatever `on-io-error` says (DRBD's `pass_on` is for data).
        self.local_io_failed_internally();
        if !self.diskless_can_serve() {
            for (request, at) in successes {
                let failed = Output::Complete { request, result: Err(RequestError::Io) };
                self.outputs[at] = failed;
            }
        }
        for id in failed_ios {
            self.handle_disk_completion(now_ms, id, Err(IoFailed));
        }
        self.pump();
    }

    /// `attach` after a metadata failure: nothing on disk is trusted; mark everything for a
    /// full resync and rewrite the superblock so disk and memory agree (see the module doc).
    pub(super) fn metafail_full_resync(&mut self) {
        let blocks = self.meta.size_blocks;
        for peer in self.config.peers.clone() {
            if !self.is_diskless_peer(peer) && blocks > 0 {
                self.persist(MetaUpdate::BitmapSet { peer, first_block: 0, blocks });
            }
        }
        self.persist(MetaUpdate::Uuids(self.meta.uuids.clone()));
        // Not `full_sync_required`: that says this disk holds nothing worth keeping, and a
        // detached disk may hold the newest data (a primary that lost its peer, then its
        // metadata); the full bitmap resyncs every block in whichever direction the UUIDs say.
        self.persist(MetaUpdate::Flags(self.meta.flags.clone()));
    }
}

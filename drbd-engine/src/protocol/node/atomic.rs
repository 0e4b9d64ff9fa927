//! WRITE ATOMIC through replication, as hooks of `Node`.
//!
//! An atomic write of up to `REQUEST_BLOCKS_MAX` blocks must leave every replica that could
//! become primary with all of it or none of it after any crash, and with all of it once it was
//! acknowledged. The state machine keeps it one request end to end and only marks it:
//!
//! - the primary queues it like any write (`AppRequest::WriteAtomic`), so the activity log,
//!   transfer log, conflicts, epochs and completion rules are the ordinary ones;
//! - it goes to each peer as one `Frame::AtomicData` (never split), and to the local disk as
//!   one `DiskOp::Write { atomic: true }`;
//! - each node's driver writes an atomic `DiskOp` through its own atomic-write journal
//!   (`backing_store::atomic_journal`: the data into a side file durably, then in place
//!   durably, then the record marked applied), and replays a pending record when it starts,
//!   before the disk serves anything. So each disk on its own holds all or none, whenever it
//!   crashes, and a completed journal write is durable (FUA), so a WriteAck for it means the
//!   peer holds all of it.
//!
//! The crash cases (P primary, S secondary, W the atomic write):
//! - P crashes before W completes: S received the whole frame and journaled it (all), or did
//!   not get all of the frame (none: a cut frame fails its checksum and is never applied). P
//!   replays its own journal on restart (all or none there too). If S is promoted, P rejoins
//!   as its sync target and the activity-log extents covering W are copied from S; if P
//!   stays primary, S resyncs those extents from P. Either way the final state is the sync
//!   source's, which is whole; the target is Inconsistent (cannot be promoted) until the
//!   resync has finished, so half a resync is never a state anyone serves from.
//! - S crashes: P completes W once its own journal write is done (the peer is gone) and marks
//!   W's blocks out of sync for S; S replays its journal on restart and then receives P's W
//!   by resync.
//! - W acknowledged: every UpToDate replica's journal write completed (protocol C waits for
//!   the WriteAcks), durable, so it survives any later crash and failover.
//!
//! A replica without a journal (a block device as backing: no side file) writes atomic frames
//! as plain writes; the driver then claims only one block as the device's atomic limit.

use super::{AppWrite, Frame, Incoming, Node, RequestError, RequestId};
use super::{ReplicationState, Role, blocks_of};
use bytes::Bytes;

/// The frame that carries an application write to a peer: `AtomicData` for WRITE ATOMIC.
pub(super) fn data_frame(id: u64, first: u64, fua: bool, data: Bytes, atomic: bool) -> Frame {
    if atomic {
        Frame::AtomicData { id, offset_blocks: first, fua, data }
    } else {
        Frame::Data { id, offset_blocks: first, fua, data }
    }
}

impl Node {
    /// `AppRequest::WriteAtomic`: queued like a write (after the caller's role, quorum and
    /// in-flight checks), marked atomic.
    pub(super) fn accept_atomic_write(
        &mut self,
        request: RequestId,
        offset_blocks: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), RequestError> {
        let blocks = blocks_of(data.len()).ok_or(RequestError::Misaligned(data.len()))?;
        // One request at most: it must stay one frame and one journal record.
        self.check_range(offset_blocks, blocks)?;
        let id = self.next_write;
        self.queue_write(request, offset_blocks, data, fua);
        let write: &mut AppWrite = self.app_writes.get_mut(&id).expect("just queued");
        assert_eq!(write.request, request);
        write.atomic = true;
        Ok(())
    }

    /// `Frame::AtomicData` from peer `i`: handled as `Frame::Data`, and written through the
    /// journal.
    pub(super) fn handle_atomic_data(
        &mut self,
        i: usize,
        id: u64,
        offset_blocks: u64,
        fua: bool,
        data: Bytes,
    ) {
        let syncing_or_established = matches!(
            self.peers[i].replication,
            ReplicationState::Established
                | ReplicationState::SyncTarget
                | ReplicationState::PausedSyncT
        );
        if self.role == Role::Primary || !syncing_or_established {
            self.protocol_error(i, "unexpected AtomicData".into());
            return;
        }
        let blocks = super::blocks_of(data.len()).unwrap_or(0);
        // The same bookkeeping as a Data frame's: the mesh's view of which secondaries hold
        // the write, and a diskless primary's record of the writes this peer received.
        self.mesh_data_received(i, offset_blocks, data.len());
        self.enqueue_incoming(i, id, offset_blocks, data, fua, false);
        if self.peers[i].connection != crate::protocol::ConnectionState::Connected {
            // Refused (and the connection dropped, its queue cleared) by enqueue_incoming:
            // comparing queue lengths missed it when writes were queued before.
            return;
        }
        self.diskless_note_peer_write(i, offset_blocks, blocks);
        let Some(Incoming::Write { id: queued_id, atomic, .. }) = self.peers[i].queue.back_mut()
        else {
            unreachable!("enqueue_incoming appends a write")
        };
        assert_eq!(*queued_id, id);
        *atomic = true;
        if self.receive_ack_wanted(i) {
            self.send(i, Frame::RecvAck { id });
        }
    }
}

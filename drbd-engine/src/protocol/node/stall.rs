//! A promotion waits for every peer's report path to be live (a child module of `node`; the
//! hook is in `quorum_check_promote`).
//!
//! With quorum, a node is promoted only when no connected peer reports another primary
//! (`Frame::Quorum`). A connection can be `Connected` while nothing of it arrives in order:
//! a lost frame leaves a gap that holds every later frame in the reorder buffer until the
//! ping timeout ends the connection. The peer's report of a primary promoted meanwhile is
//! then stuck behind the gap, and "no report of a primary" means nothing: that primary may
//! hold quorum through the same peer and acknowledge writes that our promotion would
//! overwrite later (seed 1060 of `tandem-sim --nodes 3 --diskful 3`). DRBD 9 asks every
//! connected peer in a two-phase state change, which times out on such a link; here the
//! promotion is refused until the link is live again or has been dropped.

use super::*;

/// Longest in-order silence of a live connection: a peer sends at least a ping every
/// `PING_INTERVAL_MS`; the rest covers network delay and timer jitter.
pub(super) const PROMOTE_PEER_SILENCE_MS_MAX: u64 =
    crate::constants::PING_INTERVAL_MS + crate::constants::PING_INTERVAL_MS / 2;
const _: () = assert!(
    PROMOTE_PEER_SILENCE_MS_MAX > crate::constants::PING_INTERVAL_MS,
    "a live link that only pings must pass"
);
const _: () = assert!(
    PROMOTE_PEER_SILENCE_MS_MAX < crate::constants::PING_TIMEOUT_MS,
    "a stalled link must be caught before the ping timeout drops it"
);

/// Longest a live connection holds frames behind a gap: far longer than frames overtake each
/// other by (network delay), shorter than a ping interval.
pub(super) const PROMOTE_PEER_GAP_MS_MAX: u64 = crate::constants::PING_INTERVAL_MS / 2;
const _: () = assert!(PROMOTE_PEER_GAP_MS_MAX < PROMOTE_PEER_SILENCE_MS_MAX);

impl Node {
    /// A connected peer whose report path has stalled: frames wait behind a gap that did not
    /// fill, or nothing arrived in order for longer than a live link allows. Its silence cannot count as "no
    /// other primary" for a promotion.
    pub(super) fn quorum_stalled_reporter(&self) -> Option<NodeId> {
        self.peers
            .iter()
            .find(|p| {
                // A gap in the reorder buffer alone is no stall: frames overtake each other
                // on a live link too, and the gap fills within the network delay.
                let gap = !p.reorder.is_empty()
                    && p.last_received_ms + PROMOTE_PEER_GAP_MS_MAX < self.now_ms;
                p.connection == ConnectionState::Connected
                    && (gap || p.last_received_ms + PROMOTE_PEER_SILENCE_MS_MAX < self.now_ms)
            })
            .map(|p| p.id)
    }

    /// Mesh primary losing a diskful peer: its quorum rests on a link that has stalled, so
    /// no write can be acknowledged through it now (no ack arrives) and the generation it
    /// would start for the lost peer waits (`quorum_deferred_generation` starts it once this
    /// primary acknowledges again). In a partition that isolates the primary every link goes
    /// silent at once and the ping timeout ends them one input apart: a generation started
    /// at the first loss, on the strength of a peer whose loss is a millisecond away, forked
    /// from the one the survivors started when they promoted, and the reconnect was a split
    /// brain although the old primary never acknowledged a write in it (seeds 430, 1802,
    /// 1922 of `tandem-sim --nodes 3 --diskful 3`). Without it the survivors' generation is
    /// newer and the old primary, whose marks stay in its bitmap, becomes their sync target.
    pub(super) fn mesh_generation_stalled(&self) -> bool {
        self.quorum_stalled_reporter().is_some()
    }
}

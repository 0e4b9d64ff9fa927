//! Runs the deterministic simulator over a few hundred seeds (a longer soak is slow-gated).
//! A failure prints each failing seed's violation and its one-line reproducer.

use drbd_engine::sim;

fn run(first: u64, count: u64, nodes: usize) {
    let mut failures = Vec::new();
    for seed in first..first + count {
        let report = sim::run_seed(seed, nodes);
        if !report.violations.is_empty() {
            failures.push(format!(
                "seed {seed}: {}\n  reproduce: {}",
                report.violations.join("; "),
                sim::reproduce_command(seed, nodes)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn three_hundred_seeds_without_violations() {
    run(1, 300, 2);
}

/// Two diskful nodes and a diskless tiebreaker with quorum majority: partitions that
/// isolate the primary, quorum loss and return, crashes.
#[test]
fn three_hundred_three_node_seeds_without_violations() {
    run(1, 300, 3);
}

/// Seeds that once failed (seed, nodes, what it exposed); they run on every `cargo test`.
const REGRESSION_SEEDS: &[(u64, usize, &str)] = &[
    (
        21176,
        2,
        "checker: after a forced promotion, a power loss left an older volatile write that was \
         in neither the promoted image nor its stable content",
    ),
    (
        102572,
        2,
        "engine: a discard-my-data given before a promotion discarded the writes the forced \
         primary acknowledged afterwards; sim: a forced promotion kept the cluster manager's \
         stale knowledge that the (down) peer was promoted apart, so the fence handler \
         answered peer-is-primary",
    ),
    (
        31,
        2,
        "engine: the primary's disk failed while a write waited for the ack of a peer behind \
         an unnoticed partition; the detach dropped the peer and the write was acknowledged \
         although its only copy was on the detached disk (first seen with the primary disk \
         failures of sim/more_faults.rs)",
    ),
    (
        30,
        3,
        "engine: a primary whose disk failed under quorum (suspend-io) held its writes forever: \
         detached, it connects to no one, so quorum never returned and it could not be demoted",
    ),
    (
        1093,
        3,
        "engine: a read that finished after its primary detached (and so lost quorum) was \
         served; reads finishing or held past a detach fail now",
    ),
    (
        100305,
        2,
        "sim: a primary disk failure was injected while a partition nobody had noticed kept \
         the peer SyncTarget (the source already counted it UpToDate): a double failure",
    ),
    (
        2,
        3,
        "engine: the diskless tiebreaker, down while the primary committed an online grow, \
         kept the old size for good: the handshake's size check skips diskless ends; a diskless \
         node takes a diskful peer's larger size in the handshake now (first seen with the \
         resize events of sim/resize.rs)",
    ),
    (
        499,
        3,
        "engine: the tiebreaker reconnected while the primary negotiated an online grow; its \
         handshake carried the old size and the commit skipped it (not Established), so it \
         stayed at the old size while connected; a resize is refused now when a handshake, \
         resync or verify started during the negotiation",
    ),
    (
        585,
        3,
        "engine: a primary whose disk had failed (detached) ran a resize: nothing could be \
         persisted, but the commit grew the tiebreaker to a size no diskful node had; a \
         detached node refuses to resize now (also when its disk fails during the negotiation, \
         seed 164 once primary disk failures ran under quorum)",
    ),
    (164, 3, "engine: as 585, the primary's disk failed while its resize was being negotiated"),
    (
        100263,
        2,
        "sim: the final checks ran with a ResizeCommit still on the wire (sent as a verify \
         ended), so the secondary had not grown yet; engine: a resize is refused while a verify \
         runs, as its message said (a verify keeps the connection Established inside)",
    ),
    (
        11989,
        2,
        "checker: the ghost record ignored the writes a secondary took alone for a primary whose \
         disk had failed (detached), so a forced promotion of that stale disk later made a real \
         split brain the checker called one-sided",
    ),
    (
        2103,
        2,
        "engine: under protocol A a primary whose disk had failed acknowledged writes once \
         sent, into a partition nobody had noticed yet: the send buffer was their only copy; a \
         detached primary's writes wait for the peer's RecvAck (barrier ack for those in flight \
         at the detach) now",
    ),
    (
        5601,
        2,
        "engine: as 2103, the peer had lost power before the detached primary sent the writes",
    ),
    (
        1428,
        2,
        "checker: the resync target's ResyncFinished (it comes after the source's) cleared \
         the ghost marks the source made since, for writes the link lost right after ResyncDone",
    ),
    (
        344,
        2,
        "engine: a primary that lost its peer under fencing started its generation before the \
         handler answered exit code 6 (peer is primary): a false split brain on reconnect",
    ),
    (1969, 2, "engine: as 344, the handler failed and the primary lost power while frozen"),
    (
        2785,
        2,
        "engine: as 344, and the promoted peer's own writes were still frozen behind its fence",
    ),
    (
        3602,
        2,
        "engine: with 344's fix, an old primary outdated by exit code 6 kept bits in the shared \
         generation and stayed the source of the promoted peer (refused, StandAlone for good): \
         the operator's discard-my-data was ignored within one generation",
    ),
    (
        5603,
        2,
        "engine: with 344's fix, a primary whose generation was deferred met a re-attached peer \
         whose bitmap covered everything: bits on both sides within one generation were a split \
         brain; the primary is the source",
    ),
    (
        8752,
        2,
        "engine: with 3602's fix, a stale discard-my-data (left from an earlier split brain) \
         made the verify source, the only side with bits, the target of the flipped node",
    ),
    (
        9204,
        2,
        "engine: a primary that lost its peer started a generation for the writes the peer had \
         confirmed but not barrier-acked, forking from the peer's forced one: a split brain",
    ),
];

#[test]
fn regression_seeds_without_violations() {
    for (seed, nodes, exposed) in REGRESSION_SEEDS {
        let report = sim::run_seed(*seed, *nodes);
        assert!(
            report.violations.is_empty(),
            "seed {seed} ({exposed}): {}\n  reproduce: {}",
            report.violations.join("; "),
            sim::reproduce_command(*seed, *nodes)
        );
    }
}

/// The resize events (`sim::resize`) run: grows are committed, replicas grow by the commit or
/// on a handshake, and writes to the grown blocks are acknowledged (and so checked), in both
/// modes.
#[test]
fn resize_events_grow_the_device_under_faults() {
    for nodes in [2, 3] {
        let mut total = sim::Report::default();
        for seed in 1..=60 {
            total.add(&sim::run_seed(seed, nodes));
        }
        let r = &total.resize;
        assert!(r.committed > 5, "{nodes} nodes: {}", r.summary());
        assert!(r.replicas_grown > 5, "{nodes} nodes: {}", r.summary());
        assert!(r.grown_writes_acked > 100, "{nodes} nodes: {}", r.summary());
        assert!(r.refused > 0, "{nodes} nodes: {}", r.summary());
    }
}

/// With quorum (`--nodes 3`) a primary whose disk failed keeps quorum through its UpToDate
/// peer and the tiebreaker and serves through the peer (the checkers judge what it returns).
#[test]
fn a_detached_primary_serves_under_quorum() {
    let mut total = sim::Report::default();
    for seed in 1..=60 {
        total.add(&sim::run_seed(seed, 3));
    }
    assert!(total.detached_primary_requests > 0, "{}", total.summary());
}

/// A further batch of seeds with the slow tests (1,000 by default, which keeps CI short); the
/// documented soak raises it:
/// `TANDEM_SLOW_TESTS=1 TANDEM_SIM_SOAK_SEEDS=20000 cargo test --release -p drbd-engine --test simulator -- soak`
/// or, equivalently, `tandem-sim --seed 10000 --count 20000`.
#[test]
fn soak_seeds() {
    if std::env::var("TANDEM_SLOW_TESTS").as_deref() != Ok("1") {
        println!("skipped: set TANDEM_SLOW_TESTS=1");
        return;
    }
    let first =
        std::env::var("TANDEM_SIM_FIRST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let count =
        std::env::var("TANDEM_SIM_SOAK_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000);
    run(first, count, 2);
    run(first, count, 3);
}

/// Three diskful nodes (`tandem-sim --nodes 3 --diskful 3`): seeds that once failed (seed,
/// what it exposed); they run on every `cargo test`.
const MESH_REGRESSION_SEEDS: &[(u64, &str)] = &[
    (
        469,
        "engine: a secondary cut off from the primary and the other secondary kept its UpToDate \
         disk while they wrote on without it, then regained quorum through the other secondary \
         (Inconsistent, or stalled in its handshake) and was promoted with stale data; a \
         secondary outdates itself when it loses quorum now. Then: a secondary left \
         Inconsistent by a lost sync source, Established with the primary, was never resynced",
    ),
    (
        293,
        "engine: a verify between two secondaries started on one that did not know yet that \
         the third node was primary (its connection stalled by a lost frame); the verify \
         target checks too now",
    ),
    (
        17,
        "engine: a secondary skipped clearing its bits for a peer the primary reported in sync \
         (their handshake was running) and nothing ever cleared them: the two secondaries \
         deferred their resync forever; the bits are settled after every input now",
    ),
    (
        1574,
        "engine: a Consistent secondary of an old generation met an Inconsistent one of a \
         newer generation (a sync target whose source was lost); the disks turned the \
         direction round, the stale copy overwrote the newer partial data and both ended \
         UpToDate; such a sync between secondaries is deferred until a current node returns",
    ),
    (
        1631,
        "engine: two writers: an Outdated secondary became UpToDate by being the sync source \
         of another Outdated one and was promoted beside the node that had counted both out of \
         its quorum; an Outdated source stays Outdated and its target ends Outdated now",
    ),
    (
        1724,
        "engine: a restarted (Consistent) secondary of an old generation became UpToDate as the \
         sync source of a node left Inconsistent by a newer primary, which was then promoted \
         without the newer writes; a Consistent source becomes UpToDate only when every other \
         diskful peer is connected or known outdated",
    ),
    (
        141,
        "engine: replicas differed after healing: a sync target took a third node's blocks \
         without marking them for the crashed primary it was in sync with; a target marks \
         received resync blocks for the diskful peers it does not replicate with now",
    ),
    (
        36,
        "engine: with that marking, a secondary holding bits for the primary of its own \
         generation (both sides with bits) was taken for a split brain; the primary is the \
         source of both bitmaps now",
    ),
    (
        43,
        "engine: with that marking, two secondaries of one generation both holding bits picked \
         the lower node id as the source, an Outdated node over an UpToDate one that held the \
         newest writes; the UpToDate side is the source now",
    ),
    (
        37,
        "engine: a sync target that was still Established with a third node took blocks that \
         node lacked and later found itself in sync with it; the target marks what it receives \
         for every diskful peer except those its source reports fully in sync with it \
         (ResyncPeersInSync)",
    ),
    (
        59,
        "engine: liveness: nodes that stayed Consistent or Outdated as sync sources never became \
         UpToDate; a Consistent secondary whose handshakes with every diskful peer are done \
         becomes UpToDate and its peers follow",
    ),
    (
        1915,
        "engine: a node took a peer's Inconsistent state (a third node's sync target) for \
         outdated and left it out of its quorum for good, and a promotion lost an acknowledged \
         write; only our own sync target's Inconsistent state counts as outdated in a mesh",
    ),
    (
        258,
        "engine: a handshake whose Hello was older than the node's state (a resync with a third \
         node finished in between) made the two ends decide from different facts; a stale Hello \
         re-handshakes now. (Its later history needed the fix for seed 47 too.)",
    ),
    (
        47,
        "engine: a detached primary announced its old disk's generation; a source that had \
         adopted the generation of the detach went back to the old one, and the stale disk, \
         attached again, became the sync source of the writes made while it was detached",
    ),
    (
        1231,
        "engine: as 47 (a detached primary announcing its old generation), ending in a promoted \
         node missing an acknowledged write",
    ),
    (
        564,
        "engine: a detached primary wrote without a diskful peer but started no generation for \
         it, and its OutOfSync for a lost peer arrived before the announcement that the peer \
         was gone (the stale 'in sync' dropped the bits); the peer that missed the writes \
         became the sync source of the one that held them",
    ),
    (
        795,
        "engine: a sync target of a newer primary kept its old generation until the resync \
         ended; the primary died mid-resync and an Outdated third node of that old generation \
         fully synced it back to old data, both UpToDate; the target takes the generation at \
         the start of the resync now",
    ),
    (
        412,
        "engine: a resync between two secondaries kept running after the third node was \
         promoted and replicated to its source only; a block read for the resync before a \
         primary's write landed went out old and the write's bit was cleared with the resync \
         ack; such a resync is ended (and deferred) once a primary replicates now",
    ),
    (
        1060,
        "engine: a node was promoted while its only peer's connection was stalled by a lost \
         frame, so that peer's report of the primary it followed never arrived; that primary \
         acknowledged a write the new one overwrote. Promotion waits for live report paths \
         now; then a primary and a secondary of one generation each holding bits for the \
         other took it for split brain: the primary is the source of the union now",
    ),
    (
        1983,
        "engine: a secondary still Connected to a primary that had already dropped it (a \
         partition the primary noticed first) trusted that primary's old report of both \
         secondaries in sync and declared NoSync with the other secondary, which held writes \
         the primary sent it alone before losing quorum; the report counts only while the \
         primary's link is live now",
    ),
    (
        1412,
        "UpToDate replicas differed after healing (first at block 0); passes since two \
         secondaries outdated only by losing their primary and quorum together, of one \
         generation and both in sync with it, become UpToDate through their resync (engine_mesh's \
         fix, mesh7); the history no longer reaches the divergence",
    ),
    (
        1922,
        "engine: a primary isolated by a partition lost its links one input apart; at the \
         first loss it started a generation for the lost peer on the strength of the other, \
         whose link had been silent as long and dropped a millisecond later; the survivors \
         promoted (a generation of their own) and the reconnect was a split brain although the \
         old primary acknowledged nothing in its generation; a quorum that rests on a stalled \
         link defers the generation now (seeds 430, 1753 and 1802 the same)",
    ),
    (430, "engine: as 1922 (a generation started on a stalled link's quorum, then split brain)"),
    (1802, "engine: as 1922"),
    (1753, "engine: as 1922, ending in a split brain between the two survivors"),
    (
        1263,
        "engine: a sync target took its source's generation at the end of the resync but not \
         the source's bitmap UUID for a third node it held bits for (the source had started \
         that generation for it mid-resync); its short history soon lost the generation the \
         third node held and the two were found split; a target inherits the source's bases \
         for the third nodes out of its reach now (node/mesh_gen.rs)",
    ),
    (
        1497,
        "engine: a secondary adopted the primary's new generation (tracking a peer the primary \
         lost) while Established with that peer, and stayed Established with it: the peer \
         never got the writes it missed and verify found them; a node Established with a \
         diskful peer it tracks by a bitmap base handshakes again now",
    ),
    (
        457,
        "engine: as 1497, the node later promoted announced the peer in sync and the peer \
         adopted the new generation without the writes it missed (NoSync with a third node \
         that held them)",
    ),
    (
        61,
        "engine: liveness: a primary's resync to a fenced peer had nothing to copy and ended \
         before the peer's State (Inconsistent) arrived, which then counted as a third node's \
         sync target, so the fence was never settled and I/O stayed frozen; that State settles \
         the fence of a peer we finished a resync to on the same connection now",
    ),
    (
        151,
        "engine: a primary announced a peer in sync whose link had been silent since before \
         its last writes (partitioned, ping timeout not reached), and the other secondary \
         dropped its bits for it: verify found the writes missing; a peer whose link is \
         silent for longer than a live link allows is not announced in sync now",
    ),
    (
        172,
        "engine: an Outdated secondary flagged for losing its primary with writes in doubt \
         was the bitmap source over an UpToDate secondary of the same generation that had \
         just resynced from the primary, and overwrote the newer blocks; between two \
         secondaries a direction from the crash flag turns towards the UpToDate side now",
    ),
    (
        939,
        "simulator: a NoSync between byte-identical replicas was reported because the ghost \
         record counts a primary's mark as a change even when the write never reached its \
         disk (held without quorum), and csums-alg skipped the equal blocks; identical data \
         passes now (475, 1227, 1689 the same)",
    ),
    (
        1222,
        "engine (with online grows in the mesh, issue 5): a secondary took a primary's writes \
         that skipped a peer cut off from the primary but still Established with it, and \
         stayed Established: verify found the blocks missing there; a secondary holding bits \
         for an Established diskful peer handshakes again now (not while it is a sync target)",
    ),
    (
        449,
        "simulator: the size check after healing ran 1 ms after the primary committed a grow, \
         its ResizeCommit frames still on the wire; healing waits until every node that is up \
         has the same size now (1294 and 1811 the same)",
    ),
    (
        1145,
        "engine (online grows in the mesh): a node grew on a larger peer's Hello and took the \
         new blocks from it, then met the third node, still smaller, with no bits and equal \
         generations and decided NoSync, leaving that node's new area as it was; the larger \
         side of a handshake marks the new blocks for the smaller peer now, and the smaller \
         counts them as the peer's bits",
    ),
    (
        1920,
        "engine: a node promoted again on the connection of its earlier term found its old \
         MeshTargets unchanged and sent none; the secondary, whose source had been another \
         primary meanwhile, marked every write for the other secondary and their resync was \
         deferred forever (liveness); a primary's announcements are forgotten when it is not \
         primary",
    ),
    (
        1813,
        "engine: a secondary held writes in doubt (the other secondary never got them) on its \
         disk, lost power, and later met the other secondary without the primary: no bits on \
         either side, NoSync, different data; a mesh secondary keeps its in-doubt writes' \
         extents in its activity log and marks them for every diskful peer on an unclean \
         restart",
    ),
    (
        1420,
        "engine (the first fix of 1813): a secondary restarted uncleanly became the sync source \
         by its restart marks alone and spread blocks its power loss had taken back; it tells \
         its peers it is unclean (Frame::UncleanSecondary) and a clean peer of its generation \
         is the source (706 and 1265 the same)",
    ),
    (
        2276,
        "engine (the first fix of 1813): a secondary whose activity log was full of extents \
         with writes in doubt marked a new in-doubt write in the bitmap instead, and the bits \
         went when the primary reported the peer in sync; such a write stays in doubt in \
         memory now",
    ),
    (
        2201,
        "engine (after 1813's activity log): resyncs chased each other around the mesh; a \
         sync source reported a peer in sync (no bits for it) that had meanwhile been a third \
         node's sync target on the same connection and held bits for the source, so the \
         target skipped its marks for that peer and 7 blocks differed between UpToDate \
         replicas; a peer that becomes a third node's sync target is never reported in sync \
         on that connection now",
    ),
    (
        2383,
        "checker: a primary crashed with writes stuck behind a stalled link to a peer it \
         counted in sync; the ghost never recorded them for that peer, a node resynced from \
         it inherited the clean record and the true split brain with a node force-promoted \
         later was called false; a crash with writes pending now marks every peer",
    ),
    (
        12598,
        "engine: node 1 sent its Hello and took the primary's new generation in the same \
         millisecond; node 2, of the old generation, decided NoSync from the stale Hello \
         and was Established with it while node 1 dropped the connection; each end now \
         decides only after the peer confirms its Hello still holds (HelloHolds)",
    ),
    (
        3554,
        "engine: a node grown by a third node's Hello, Established with a peer that had not \
         grown, became primary and wrote beyond that peer's device; the peer refused the \
         write (protocol error) and then sent its protocol B receipt on the closed \
         connection, and its engine asserted; a refused Data frame now ends the handling",
    ),
    (
        10102,
        "checker: a primary crashed with a write pending before its peers took its first \
         generation from the announcement still on the wire; the crash mark stayed for peers \
         that joined that generation right after, a resync handed it on and a correct NoSync \
         between two copies of it was flagged; a peer taking the generation clears the mark",
    ),
    (
        4910,
        "engine (after 1813's activity log): a node took a generation from a primary's \
         resync, lost the source, was fully synced from a sibling generation and pushed the \
         lost generation into its history; the old primary of that generation then met it \
         in a split brain although only the primary had diverged; a target keeps its old \
         generation only if the source's past holds it",
    ),
    (
        5773,
        "engine: a third node was promoted while two secondaries verified each other; its \
         writes reached them over separate streams, one end read a block before such a write \
         and the other after it, and 4 blocks were reported out of sync; a verify between \
         secondaries ends at each end when a primary appears now (the one checked at its \
         start only), and a VerifyT that ended answers further requests as unreliable",
    ),
    (
        5349,
        "engine: two primaries of one generation met (one promoted on a link that had just \
         died, the other with the third node), each holding a third node's resync marks for \
         the other, and were found in a split brain although neither wrote apart; with \
         quorum that is no split brain now: the handshake ends, the primary without quorum \
         steps down, and the next one resyncs it",
    ),
    (
        4047,
        "engine: the primary lost node 2 and started a generation for it while its link to \
         node 1 was already partitioned (unnoticed for 2 s), so node 1 never adopted it; when \
         the primary lost node 1 it took that generation as node 1's bitmap base, a \
         generation node 1 never held, its 2-entry history then forgot node 1's own, and the \
         two met as Unrelated; the history keeps 32 generations now (DRBD 9's \
         HISTORY_UUIDS), so node 1 is found behind and becomes a full sync target",
    ),
    (
        4815,
        "engine: node 2 adopted the primary's generation for lost node 1 with its own old \
         generation as node 1's base (one node 1 never held) after a settled base pushed \
         into its 2-entry history had evicted node 1's generation; node 1 and node 2 met as \
         split brain although node 2's data descended from node 1's; the history keeps 32 \
         generations now (DRBD 9's HISTORY_UUIDS), so node 1 becomes a full sync target",
    ),
    (
        8475,
        "engine: node 1 was promoted on a link to node 0 that had just died and was never \
         confirmed, node 2 with node 0 wrote in the generation node 1 held (its bitmap base for \
         node 1 was older); node 1, still primary, met node 0 holding node 2's acknowledged \
         write and became its sync source by the primary's rule; an unconfirmed primary is an \
         unclean peer now: it is the target and steps down",
    ),
    (
        12713,
        "engine: a sync source reported a peer in sync through a link partitioned a second \
         earlier, behind which that peer had been promoted and written; the target took the \
         source's older data over those writes without marking them for the peer, and the two \
         reconnected with no sync (UpToDate replicas differed); a peer whose link is silent \
         for longer than a live one allows is never reported in sync now",
    ),
    (
        7229,
        "engine: a node resynced a peer, then took a third node's data, which that node \
         reported the peer to hold through a link silent for 400 ms; the node skipped its \
         marks for the peer it had itself just changed, and the two stayed Established without \
         bits while block 4 differed (a verify reported it); a sync target marks what it \
         receives for a peer it resynced on the current connection without reporting the \
         source in sync to it, whatever the source reports",
    ),
    (
        6322,
        "checker and engine: a primary's writes apart from a peer whose bits a restart had \
         already set produced no BitmapSet, so the ghost missed them and the split brain with \
         a node force-promoted meanwhile looked false (the ghost now also records a \
         primary's acknowledged write its bitmap marks for a peer); later two nodes that \
         tracked each other from one base, one's generation in the other's history, were \
         found split: a generation in the peer's history decides before equal bases now \
         (DRBD's rules 60/80 before 90)",
    ),
    (
        10997,
        "engine: a primary started the generation it had deferred (quorum on a stalled \
         link) in the input its pending demotion completed, and stepped down before \
         announcing it; the secondary in sync kept the old generation and met the demoted \
         node later in a split brain; the generation is announced before the role changes",
    ),
    (
        14209,
        "engine: a node promoted apart from a peer started its generation when its peers \
         confirmed it, with nothing written; a node force-promoted meanwhile had moved on \
         from the same base and the two met as a split brain although one held nothing new; \
         with three diskful nodes the generation starts with the first write a peer misses \
         now (DRBD 9's NEW_CUR_UUID)",
    ),
    (
        19101,
        "engine: node 1 lost its connection to primary node 0 with writes in doubt and marked \
         them for node 2; node 0 still waited for node 2 to confirm them (a lost frame held \
         node 2's link, pings alive) and, when node 1 connected again, announced node 2 in \
         sync, so node 1 dropped the marks; node 0 then lost node 2, node 1 adopted its \
         generation without them and, promoted, resynced node 2 from its bits: 13 \
         acknowledged writes missed on node 2; a primary does not announce in sync to a \
         peer a node that has not confirmed the writes sent before that peer connected now",
    ),
    (
        20368,
        "engine (liveness): node 0 became the sync target of Outdated node 1 and took its \
         Outdated state while Established with UpToDate node 2, which was promoted later; \
         the primary saw node 0 in sync and the secondaries' resync waited while it \
         replicated, so node 0 stayed Outdated; a target left below UpToDate handshakes \
         again with the UpToDate peers it holds no bits for (or a primary) now",
    ),
    (
        17691,
        "simulator: with no primary and no UpToDate node the operator forced node 1, whose \
         promotion waited for its peers' answers, then forced node 2 meanwhile; node 1 \
         committed later and both wrote (two forced lineages); the operator now waits for a \
         pending promotion before forcing another",
    ),
    (
        14888,
        "checker: the second end of a handshake found NoSync with a peer the ghost record \
         called diverged; the pair was byte-identical when the first end decided NoSync, and \
         the first end's writes submitted since were still on their way; the second end's \
         NoSync is now checked against the first end's data at its decision",
    ),
    (
        33276,
        "sim: the epilogue's verify, cut off when the links it healed broke (frames lost in the \
         partition), was started again between two secondaries after an operator forced a \
         third node primary (all Outdated): the engine rightly refuses that; the primary \
         verifies now, and the flipped node is never the one forced",
    ),
    (
        46593,
        "engine: the primary's HelloHolds to node 2 was lost, so node 2 never took the writes \
         node 1 held in doubt for it; node 1 and node 2 met without bits and the Outdated \
         node 2 became UpToDate from node 1 without them; a handshake marks the writes in \
         doubt for its peer now",
    ),
    (
        5361,
        "engine: node 0 was promoted as its link to node 1 went silent; node 2 lost it with \
         its writes in doubt and resynced from node 1, which reported node 0 in sync over the \
         link silent for half a second; node 2 took node 1's older blocks unmarked for node 0 \
         and the two met with no sync; a target marks for a primary it lost with writes in \
         doubt now, whatever its source reports of it",
    ),
    (
        17224,
        "checker: force-promoted node 0 resynced node 1 (no block to send) as node 1 crashed; \
         node 0's report of the end cleared the ground truth's forced-promotion record, but \
         node 1 never took node 0's generation, and the split brain with it (resynced from \
         node 2, force-promoted from the same parent) was judged false; a pair holds the \
         same generation only once the target took it (or the handshake found no sync) now",
    ),
    // 1624 exposed the same bug as 1574 until a detached primary's OutOfSync frames were
    // coalesced (fewer frames, so other random draws): the seed now runs a different history
    // that ended in the pattern of seed 1724 (a promoted node missing an acknowledged write,
    // fixed since: the entry above), so it is not a regression seed any more.
];

#[test]
fn mesh_regression_seeds_without_violations() {
    for (seed, exposed) in MESH_REGRESSION_SEEDS {
        let report = sim::mesh::run_seed_mesh(*seed);
        assert!(
            report.violations.is_empty(),
            "seed {seed} ({exposed}): {}\n  reproduce: {}",
            report.violations.join("; "),
            sim::mesh::reproduce_command_mesh(*seed)
        );
    }
}

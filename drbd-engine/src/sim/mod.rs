//! The deterministic simulator (TigerBeetle's VOPR is the model).
//!
//! One seed decides everything: the fault rates of this run (swarm testing), the workload, the
//! network (loss, delay and so reordering, duplication, corruption, partitions), the disks
//! (latency, I/O errors, power loss that drops or tears volatile writes, kill -9 that keeps
//! them), crashes and restarts, promote/demote (forced too), disconnect/reconnect, and the
//! resource's fencing policy (dont-care, resource-only or resource-and-stonith), online grow
//! of the device (`resize`: backing devices grow, then `resize` on the primary). A safety
//! phase with faults is followed by a liveness phase in which the cluster is healed and must
//! converge.
//!
//! Promotion apart: once a live primary and an UpToDate secondary have both noticed that they
//! lost each other (a partition or a disconnect), the cluster manager may promote the
//! secondary (not forced) after a delay that races the old primary's fence-peer handler. The
//! handler is simulated as an out-of-band channel plus the cluster manager's knowledge (see
//! `World::fence_done` for the DRBD exit code of each outcome): it outdates the secondary
//! first (the promotion is then refused: Outdated), or finds it promoted (exit code 6: the old
//! primary outdates itself and fails what it froze, or, with resource-and-stonith, is shot).
//! Under dont-care nothing stops the promotion: two primaries write apart.
//!
//! Checkers:
//! - acknowledged writes: whenever a node is promoted with UpToDate data, every block on it
//!   holds the newest guaranteed write or a later one (`model`); every read is checked too.
//!   Under resource-only and resource-and-stonith one model holds the writes every primary
//!   acknowledged: all of them must be on whichever node is promoted next. Under dont-care
//!   the model forks into lineages when a primary writes without a peer that is later
//!   promoted (or two primaries write apart): a write is required only on the lineage that
//!   acknowledged it, and a split-brain recovery (discard-my-data on the victim) makes the
//!   victim adopt the survivor's lineage, forgiving the victim's writes;
//! - convergence: after healing, all replicas are connected, UpToDate and byte-identical, and
//!   that image satisfies the model;
//! - split brain: every handshake decision agrees with a ghost record of which node holds
//!   changes the other may lack (split brain iff both do, as two primaries under dont-care
//!   make it: expected, and counted); unrelated data never happens;
//! - no assertion fires (a panic anywhere is a violation);
//! - liveness: the healed cluster finishes its resync within a deadline.
//!
//! `Report` counts what a run exercised (promotions, promotions apart and how they ended,
//! fence-peer exit codes, old primaries shot, split brains, lineage forks).

pub mod congestion;
pub mod disk;
pub mod disk_fail;
mod ground_truth;
pub mod mesh;
pub mod model;
pub mod more_faults;
pub mod resize;
pub mod rng;
pub mod verify;

use crate::NodeId;
use crate::constants::BLOCK_BYTES as BLOCK;
use crate::protocol::node::{
    AppRequest, Config, DiskOp, Event, FenceOutcome, Fencing, IoFailed, IoId, Node, Output,
    Promotion, ReplicationProtocol, RequestId, StateError,
};
use crate::protocol::quorum::{OnNoQuorum, QuorumConfig, QuorumPolicy};
use crate::protocol::{
    AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, AfterSbPolicies, ConnectionState, DiskState,
    DynamicControllerConfig, MetaUpdate, Metadata, PersistedDisk, ReplicationState, ResyncRate,
    Role,
};
use crate::uuid::SyncDecision;
use disk::SimDisk;
use model::Model;
use rng::Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

const TICK_MS: u64 = 2;
const LIVENESS_DEADLINE_MS: u64 = 120_000;
const APP_IN_FLIGHT_MAX: usize = 16;
/// The setup's first promotion, when cluster-wide, runs events in steps of this until it
/// finishes: at most the steps that cover twice the engine's confirm timeout.
const SETUP_PROMOTION_STEP_MS: u64 = 100;
const SETUP_PROMOTION_STEPS_MAX: u64 =
    2 * crate::constants::PING_TIMEOUT_MS / SETUP_PROMOTION_STEP_MS;
/// Attempts of the setup's first promotion (a peer may refuse while it reconnects).
const SETUP_PROMOTION_ATTEMPTS_MAX: u32 = 5;

/// Who started a promotion that waits for the peers' answers.
#[derive(Debug, Clone, Copy)]
enum Promoting {
    /// The setup's first promotion (of node 0).
    Initial,
    /// The operator or cluster manager, with a primary gone.
    Operator { force: bool },
    /// A split promotion while `old`, a live primary, is cut off.
    Split { old: usize },
}

/// Fault rates and shape of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Swarm {
    pub nodes: usize,
    pub size_blocks: u64,
    pub protocol: ReplicationProtocol,
    pub al_extents: usize,
    pub resync_rate: ResyncRate,
    pub net_delay_ms_max: u64,
    pub loss_ppm: u64,
    pub duplicate_ppm: u64,
    pub corrupt_ppm: u64,
    pub partition_ppm_per_tick: u64,
    pub disk_latency_ms_max: u64,
    pub disk_error_ppm: u64,
    pub crash_ppm_per_tick: u64,
    pub power_loss_share_ppm: u64,
    pub torn_ppm: u64,
    pub promote_demote_ppm_per_tick: u64,
    pub force_promote_ppm_per_tick: u64,
    pub admin_disconnect_ppm_per_tick: u64,
    pub write_ppm_per_tick: u64,
    pub fua_ppm: u64,
    pub flush_ppm: u64,
    pub initial_full_sync: bool,
    pub safety_ms: u64,
    /// The resource's fencing policy (DRBD's `fencing`).
    pub fencing: Fencing,
    /// Chance that the cluster manager promotes a secondary cut off from a live primary, per
    /// such episode (partition or disconnect noticed by both).
    pub split_promote_ppm: u64,
    /// How long after both noticed the loss that promotion comes (races the fence handler).
    pub split_promote_delay_ms_max: u64,
    pub fence_delay_ms_max: u64,
    /// Three or more nodes: the last one is a diskless tiebreaker.
    pub tiebreaker: bool,
    /// DRBD's `quorum` (off with two nodes) and `on-no-quorum`.
    pub quorum: QuorumPolicy,
    pub on_no_quorum: OnNoQuorum,
    /// Chance per tick that the primary is cut off from every other node, and for how long.
    pub isolate_primary_ppm_per_tick: u64,
    pub isolate_ms_max: u64,
    /// The resource's `after-sb-0pri/1pri/2pri` policies.
    pub after_sb: AfterSbPolicies,
    /// Both nodes have `cram-hmac-alg` with one shared secret.
    pub shared_secret: bool,
    /// The secrets differ until the operator fixes them when healing: no connection may be
    /// made before.
    pub secret_mismatch: bool,
}

impl Swarm {
    pub fn from_rng(rng: &mut Rng, nodes: usize) -> Self {
        let pick = |rng: &mut Rng, choices: &[u64]| choices[rng.index(choices.len())];
        let protocol = match rng.below(10) {
            0 => ReplicationProtocol::A,
            1 => ReplicationProtocol::B,
            _ => ReplicationProtocol::C,
        };
        let resync_rate = if rng.below(2) == 0 {
            ResyncRate::Fixed { rate_kib_per_s: pick(rng, &[4_096, 40_960, 409_600]) }
        } else {
            ResyncRate::Dynamic(DynamicControllerConfig {
                plan_ahead_steps: u32::try_from(rng.range(1, 30)).expect("small"),
                fill_target_kib: pick(rng, &[128, 1024, 8192]),
                max_rate_kib_per_s: pick(rng, &[8_192, 102_400, 1_024_000]),
                min_rate_kib_per_s: pick(rng, &[0, 250, 4096]),
            })
        };
        Self {
            nodes,
            size_blocks: pick(rng, &[64, 512, 2048, 3000]),
            protocol,
            al_extents: usize::try_from(rng.range(2, 4)).expect("small"),
            resync_rate,
            net_delay_ms_max: pick(rng, &[1, 5, 20]),
            loss_ppm: pick(rng, &[0, 0, 100, 2_000]),
            duplicate_ppm: pick(rng, &[0, 1_000, 20_000]),
            corrupt_ppm: pick(rng, &[0, 0, 100, 1_000]),
            partition_ppm_per_tick: pick(rng, &[0, 100, 1_000]),
            disk_latency_ms_max: pick(rng, &[0, 1, 5]),
            disk_error_ppm: pick(rng, &[0, 0, 0, 50, 500]),
            crash_ppm_per_tick: pick(rng, &[0, 100, 500, 2_000]),
            power_loss_share_ppm: pick(rng, &[0, 500_000, 1_000_000]),
            torn_ppm: pick(rng, &[0, 300_000]),
            promote_demote_ppm_per_tick: pick(rng, &[0, 200, 1_000]),
            force_promote_ppm_per_tick: pick(rng, &[0, 0, 500]),
            admin_disconnect_ppm_per_tick: pick(rng, &[0, 100, 500]),
            write_ppm_per_tick: pick(rng, &[100_000, 500_000, 1_000_000]),
            fua_ppm: pick(rng, &[0, 100_000]),
            flush_ppm: pick(rng, &[20_000, 100_000]),
            initial_full_sync: rng.below(3) == 0,
            safety_ms: pick(rng, &[3_000, 8_000, 15_000]),
            fencing: match rng.below(3) {
                0 => Fencing::DontCare,
                1 => Fencing::ResourceOnly,
                _ => Fencing::ResourceAndStonith,
            },
            split_promote_ppm: pick(rng, &[0, 300_000, 1_000_000]),
            split_promote_delay_ms_max: pick(rng, &[50, 400, 1_500]),
            fence_delay_ms_max: pick(rng, &[20, 200, 600]),
            tiebreaker: false,
            quorum: QuorumPolicy::Off,
            on_no_quorum: OnNoQuorum::SuspendIo,
            isolate_primary_ppm_per_tick: 0,
            isolate_ms_max: 0,
            after_sb: AfterSbPolicies::default(),
            shared_secret: false,
            secret_mismatch: false,
        }
        // The split-brain knobs read the stream without advancing it, so quorum's draws (three
        // nodes and more only) come after them as before.
        .with_split_brain_knobs(rng)
        .with_quorum(rng, nodes)
    }

    /// Three nodes and more: quorum majority with a diskless tiebreaker, and partitions that
    /// isolate the primary. Drawn after everything else, so two-node seeds run as before.
    /// Quorum replaces fencing here, as DRBD recommends (dont-care, but a strict model: every
    /// acknowledged write must be on whoever is promoted next).
    fn with_quorum(mut self, rng: &mut Rng, nodes: usize) -> Self {
        if nodes < 3 {
            return self;
        }
        self.tiebreaker = true;
        self.quorum = QuorumPolicy::Majority;
        self.fencing = Fencing::DontCare;
        self.on_no_quorum =
            if rng.below(2) == 0 { OnNoQuorum::SuspendIo } else { OnNoQuorum::IoError };
        self.isolate_primary_ppm_per_tick = [0, 200, 1_000][rng.index(3)];
        self.isolate_ms_max = [300, 3_000, 8_000][rng.index(3)];
        self
    }

    /// The node with no disk, if any.
    pub fn diskless_node(&self) -> Option<usize> {
        self.tiebreaker.then(|| self.nodes - 1)
    }

    /// Draws the split-brain and authentication knobs from a stream of their own, so that the
    /// other knobs and the rest of the run stay what they were for every seed.
    fn with_split_brain_knobs(mut self, rng: &Rng) -> Self {
        let mut own = Rng::new(rng.clone().next_u64() ^ 0x5b1e_a57a_b0a7_d00d);
        let pick = |rng: &mut Rng, len: usize| rng.index(len);
        // Two seeds in five keep DRBD's default (disconnect everywhere: manual recovery).
        if own.below(5) >= 2 {
            // discard-local/-remote only make sense between two nodes.
            let zero = if self.nodes == 2 { AfterSb0Pri::ALL.len() } else { 5 };
            self.after_sb = AfterSbPolicies {
                zero_primaries: AfterSb0Pri::ALL[pick(&mut own, zero)],
                one_primary: AfterSb1Pri::ALL[pick(&mut own, AfterSb1Pri::ALL.len())],
                two_primaries: AfterSb2Pri::ALL[pick(&mut own, AfterSb2Pri::ALL.len())],
            };
        }
        self.shared_secret = own.below(2) == 0;
        self.secret_mismatch = self.shared_secret && own.below(8) == 0;
        self
    }
}

#[derive(Debug)]
enum Ev {
    Tick,
    Deliver {
        to: usize,
        from: usize,
        bytes: Vec<u8>,
    },
    Closed {
        to: usize,
        from: usize,
        conn: u64,
    },
    DiskDone {
        node: usize,
        incarnation: u64,
        io: IoId,
        op: DiskOp,
        error: bool,
        flush_point: u64,
    },
    Timer {
        node: usize,
        incarnation: u64,
        at: u64,
    },
    Connect {
        a: usize,
        b: usize,
    },
    Restart {
        node: usize,
    },
    FenceDone {
        node: usize,
        incarnation: u64,
        peer: usize,
    },
    /// The cluster manager promotes `node` while `old` (a live primary) is cut off from it.
    SplitPromote {
        node: usize,
        old: usize,
    },
    Reconnect {
        node: usize,
        peer: usize,
        discard: bool,
    },
    /// Ends a partition that isolated `node`.
    HealIsolation {
        node: usize,
    },
    /// Online grow (`resize`).
    Resize(resize::ResizeEv),
}

#[derive(Debug)]
enum Pending {
    /// `first..end`: the blocks written (for the resize checker).
    Write {
        id: u64,
        fua: bool,
        first: u64,
        end: u64,
    },
    Flush {
        issued_ms: u64,
    },
    Read {
        first: u64,
    },
}

struct SimNode {
    node: Option<Node>,
    incarnation: u64,
    disk: SimDisk,
    meta: Metadata,
    timer_at: Option<u64>,
    /// Writes submitted and not completed: (io, first block, data, fua).
    in_flight_writes: BTreeMap<u64, (u64, Vec<u8>, bool)>,
    restart_scheduled: bool,
    /// The role as of the last output drained (see `drain`).
    role_seen: Role,
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<String>,
    pub writes_acked: u64,
    pub crashes: u64,
    pub split_brains: u64,
    pub resyncs: u64,
    pub promotions: u64,
    pub sim_ms: u64,
    /// Episodes in which the cluster manager tried to promote a secondary cut off from a live
    /// primary, and how they ended.
    pub split_promotions: u64,
    pub split_promotions_done: u64,
    /// Refused because the old primary's fence handler had outdated the secondary first.
    pub split_promotions_refused: u64,
    /// Done while the old primary was still primary (two primaries, dont-care only).
    pub dual_primaries: u64,
    /// fence-peer handler results by exit code: index 0..=4 is exit code 3..=7.
    pub fence_exit_codes: [u64; 5],
    /// Handler attempts that found the peer still connected and tried again.
    pub fence_retries: u64,
    /// Old primaries shot by the cluster (resource-and-stonith, peer already promoted).
    pub old_primaries_shot: u64,
    /// Lineages forked because two nodes wrote apart under dont-care.
    pub lineage_forks: u64,
    pub verify: verify::VerifyReport,
    pub more: more_faults::MoreFaultsReport,
    /// Runs with quorum enabled (the summary names the quorum counters only then).
    pub quorum_runs: u64,
    /// Primaries that lost quorum, and got it back.
    pub quorum_losses: u64,
    pub quorum_regains: u64,
    /// Promotions refused for want of quorum (or because a peer reported another primary).
    pub promotions_refused_no_quorum: u64,
    /// Partitions that isolated the primary.
    pub primary_isolations: u64,
    /// Requests failed with no quorum (io-error, or force-secondary).
    pub requests_failed_no_quorum: u64,
    /// Split brains resolved by an after-sb policy (no operator).
    pub split_brains_auto_resolved: u64,
    /// Split brains decided where one side holds nothing the other lacks (`ground_truth`),
    /// forced promotions included.
    pub split_brains_one_sided: u64,
    /// `call-pri-lost-after-sb` handler calls.
    pub primary_lost_calls: u64,
    /// Connection attempts refused by peer authentication (mismatched shared secrets).
    pub auth_refusals: u64,
    /// Disks detached after an I/O error (`disk_fail`).
    pub disk_detaches: u64,
    /// Requests a primary completed successfully while its disk was detached (through its
    /// UpToDate peer).
    pub detached_primary_requests: u64,
    /// Online grow (`resize`).
    pub resize: resize::ResizeReport,
    /// Slow links and congestion policies (`congestion`).
    pub congestion: congestion::CongestionReport,
}

impl Report {
    /// Adds another run's counters (violations are not summed).
    pub fn add(&mut self, other: &Report) {
        self.writes_acked += other.writes_acked;
        self.crashes += other.crashes;
        self.split_brains += other.split_brains;
        self.resyncs += other.resyncs;
        self.promotions += other.promotions;
        self.sim_ms += other.sim_ms;
        self.split_promotions += other.split_promotions;
        self.split_promotions_done += other.split_promotions_done;
        self.split_promotions_refused += other.split_promotions_refused;
        self.dual_primaries += other.dual_primaries;
        for (a, b) in self.fence_exit_codes.iter_mut().zip(other.fence_exit_codes) {
            *a += b;
        }
        self.fence_retries += other.fence_retries;
        self.old_primaries_shot += other.old_primaries_shot;
        self.lineage_forks += other.lineage_forks;
        self.verify.add(&other.verify);
        self.more.add(&other.more);
        self.quorum_runs += other.quorum_runs;
        self.quorum_losses += other.quorum_losses;
        self.quorum_regains += other.quorum_regains;
        self.promotions_refused_no_quorum += other.promotions_refused_no_quorum;
        self.primary_isolations += other.primary_isolations;
        self.requests_failed_no_quorum += other.requests_failed_no_quorum;
        self.split_brains_auto_resolved += other.split_brains_auto_resolved;
        self.split_brains_one_sided += other.split_brains_one_sided;
        self.primary_lost_calls += other.primary_lost_calls;
        self.auth_refusals += other.auth_refusals;
        self.disk_detaches += other.disk_detaches;
        self.detached_primary_requests += other.detached_primary_requests;
        self.resize.add(&other.resize);
        self.congestion.add(&other.congestion);
    }

    /// One line of counters.
    pub fn summary(&self) -> String {
        let f = self.fence_exit_codes;
        format!(
            "{} writes acked, {} crashes, {} promotions, {} resyncs, {} split brains detected \
             ({} one-sided by the replicas' data), \
             {} partitions with promotion ({} promoted, {} refused Outdated, {} with the old primary still primary), \
             fence-peer exit codes 3/4/5/6/7: {}/{}/{}/{}/{} ({} retries), {} old primaries shot, \
             {} lineage forks, {}, {} ms simulated; {} split brains resolved by after-sb policies \
             ({} pri-lost-after-sb calls), {} connections refused by authentication, \
             {} disks detached ({} requests served by a detached primary); {}; {}; {}",
            self.writes_acked,
            self.crashes,
            self.promotions,
            self.resyncs,
            self.split_brains,
            self.split_brains_one_sided,
            self.split_promotions,
            self.split_promotions_done,
            self.split_promotions_refused,
            self.dual_primaries,
            f[0],
            f[1],
            f[2],
            f[3],
            f[4],
            self.fence_retries,
            self.old_primaries_shot,
            self.lineage_forks,
            self.verify.summary(),
            self.sim_ms,
            self.split_brains_auto_resolved,
            self.primary_lost_calls,
            self.auth_refusals,
            self.disk_detaches,
            self.detached_primary_requests,
            self.more.summary(),
            self.resize.summary(),
            self.congestion.summary()
        ) + &self.quorum_summary()
    }

    fn quorum_summary(&self) -> String {
        if self.quorum_runs == 0 {
            return String::new();
        }
        format!(
            "; quorum ({} runs): {} primary isolations, {} quorum losses by a primary, {} regained, \
             {} promotions refused without quorum, {} requests failed without quorum",
            self.quorum_runs,
            self.primary_isolations,
            self.quorum_losses,
            self.quorum_regains,
            self.promotions_refused_no_quorum,
            self.requests_failed_no_quorum
        )
    }
}

pub struct World {
    seed: u64,
    rng: Rng,
    swarm: Swarm,
    now_ms: u64,
    events: BinaryHeap<Reverse<(u64, u64)>>,
    payloads: BTreeMap<u64, Ev>,
    next_event: u64,
    nodes: Vec<SimNode>,
    /// Per unordered pair (a < b): current sim connection id.
    conns: BTreeMap<(usize, usize), u64>,
    connecting: BTreeMap<(usize, usize), bool>,
    partitioned: BTreeMap<(usize, usize), bool>,
    next_conn: u64,
    /// One model per lineage (see `Model`); `lineage[i]` is the one node i's data belongs to.
    /// Under fencing resource-only/resource-and-stonith there is only ever lineage 0: every
    /// write any primary acknowledged must be on whichever node is promoted next.
    models: Vec<Model>,
    lineage: Vec<usize>,
    /// Under dont-care: what node b is guaranteed to hold since a primary of its lineage
    /// started writing without it (a copy of that lineage's model at that moment).
    stale: Vec<Option<Model>>,
    /// Write ids issued so far, over all lineages.
    write_count: usize,
    /// promoted_apart[a][b]: the cluster manager promoted a while it was not in sync with b
    /// (what a fence handler asking the cluster manager learns: a's data is the newer one).
    promoted_apart: PairMatrix,
    /// fenced[b]: a fence handler outdated (or shot) b, so it must not be promoted.
    fenced: Vec<bool>,
    /// split_planned[p][s]: this episode of s being cut off from primary p was decided on.
    split_planned: PairMatrix,
    pending: BTreeMap<u64, (usize, u64, Pending)>,
    next_request: u64,
    /// dirty[a][b]: a holds changes b may lack (ghost record for the split-brain checker).
    dirty: Vec<Vec<bool>>,
    /// The ghost record when each pair's current connection started: both handshake decisions
    /// are made from the state exchanged then (writes wait while a handshake runs), even if
    /// one side finishes first and writes again.
    dirty_at_connect: BTreeMap<(usize, usize), (PairMatrix, PairMatrix)>,
    /// (decider, peer) -> (conn, image): the decider's data when it found NoSync on that
    /// connection by byte-identical data against the ghost record (`no_sync_identical`).
    no_sync_images: BTreeMap<(usize, usize), (u64, Vec<u8>)>,
    discard_requested: Vec<Vec<bool>>,
    /// auto_victim[a][b]: an after-sb policy made a the victim of b, until they are in sync
    /// again (the split-brain checker's licence to discard a's changes, as a discard-my-data).
    auto_victim: PairMatrix,
    /// Per pair: the first end's after-sb verdict (node, discarded_local), to check that the
    /// other end reaches the mirror image.
    auto_verdicts: BTreeMap<(usize, usize), (usize, bool)>,
    /// auto_fork_pending[victim][survivor]: see `survivor_lineage`.
    auto_fork_pending: PairMatrix,
    last_primary: Option<usize>,
    healing: bool,
    /// Quorum checkers: when each node was last promoted and last acknowledged a write
    /// (any two primaries interleaving acknowledgements is a violation), whether its last
    /// quorum event said it has quorum, and since when each node has been cut off from all.
    promoted_at: Vec<Option<u64>>,
    /// A node was promoted with `--force` in this run: only then may two nodes with quorum
    /// on meet in a split brain (issue 5).
    forced_promotion: bool,
    last_ack_at: Vec<Option<u64>>,
    quorum_seen: Vec<bool>,
    isolated_since: Vec<Option<u64>>,
    check_on_first_completion: Vec<bool>,
    /// A cluster-wide promotion of each node waiting for its peers (`Promotion::Pending`),
    /// and what started it: its outcome is handled at `Event::PromotionFinished`.
    promoting: Vec<Option<Promoting>>,
    /// Why the setup's last attempt to promote node 0 failed (it retries).
    initial_promotion_error: Option<StateError>,
    trace: bool,
    violations: Vec<String>,
    report: Report,
    verify: verify::VerifyState,
    more: more_faults::MoreFaultsState,
    disk_failures: disk_fail::DiskFailures,
    /// Three diskful nodes: each node's current sync source (`mesh`).
    mesh_sync_source: Vec<Option<usize>>,
    /// Three diskful nodes: `[crashed][peer]`, the ghost-record mark of a crash with writes
    /// pending, until the peer takes the crashed node's generation or the node restarts.
    mesh_crash_marks: Vec<Vec<Option<mesh::CrashMark>>>,
    resize: resize::ResizeSimState,
    congestion: congestion::CongestionState,
    ground_truth: ground_truth::GroundTruth,
}

/// A per-ordered-pair flag: `m[a][b]`.
type PairMatrix = Vec<Vec<bool>>;

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn nid(i: usize) -> NodeId {
    NodeId(u8::try_from(i).expect("few sim nodes"))
}

impl World {
    pub fn new(seed: u64, nodes: usize) -> Self {
        let mut rng = Rng::new(seed);
        let swarm = Swarm::from_rng(&mut rng, nodes);
        let size = swarm.size_blocks;
        let sim_nodes = (0..nodes)
            .map(|i| SimNode {
                node: None,
                incarnation: 0,
                disk: SimDisk::new(size),
                meta: Metadata::create(nid(i), size),
                timer_at: None,
                in_flight_writes: BTreeMap::new(),
                restart_scheduled: false,
                role_seen: Role::Secondary,
            })
            .collect();
        Self {
            seed,
            rng,
            swarm,
            now_ms: 0,
            events: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            next_event: 0,
            nodes: sim_nodes,
            conns: BTreeMap::new(),
            connecting: BTreeMap::new(),
            partitioned: BTreeMap::new(),
            next_conn: 1,
            models: vec![Model::new(size)],
            lineage: vec![0; nodes],
            stale: vec![None; nodes],
            write_count: 0,
            promoted_apart: vec![vec![false; nodes]; nodes],
            fenced: vec![false; nodes],
            split_planned: vec![vec![false; nodes]; nodes],
            pending: BTreeMap::new(),
            next_request: 1,
            dirty: vec![vec![false; nodes]; nodes],
            dirty_at_connect: BTreeMap::new(),
            no_sync_images: BTreeMap::new(),
            discard_requested: vec![vec![false; nodes]; nodes],
            auto_victim: vec![vec![false; nodes]; nodes],
            auto_verdicts: BTreeMap::new(),
            auto_fork_pending: vec![vec![false; nodes]; nodes],
            last_primary: None,
            healing: false,
            promoted_at: vec![None; nodes],
            forced_promotion: false,
            last_ack_at: vec![None; nodes],
            quorum_seen: vec![true; nodes],
            isolated_since: vec![None; nodes],
            check_on_first_completion: vec![false; nodes],
            promoting: vec![None; nodes],
            initial_promotion_error: None,
            trace: std::env::var("TANDEM_SIM_TRACE").is_ok_and(|v| v == "1"),
            violations: Vec::new(),
            report: Report { seed, ..Report::default() },
            verify: verify::VerifyState::new(seed),
            more: more_faults::MoreFaultsState::new(seed),
            disk_failures: disk_fail::DiskFailures::new(seed),
            mesh_sync_source: vec![None; nodes],
            mesh_crash_marks: vec![vec![None; nodes]; nodes],
            resize: resize::ResizeSimState::new(seed, size),
            congestion: congestion::CongestionState::new(seed, nodes),
            ground_truth: ground_truth::GroundTruth::default(),
        }
    }

    fn quorum_config(&self, i: usize) -> QuorumConfig {
        let diskless = self.swarm.diskless_node();
        QuorumConfig {
            quorum: self.swarm.quorum,
            on_no_quorum: self.swarm.on_no_quorum,
            minimum_redundancy: QuorumPolicy::Off,
            diskless: diskless == Some(i),
            diskless_peers: diskless.filter(|d| *d != i).map(nid).into_iter().collect(),
        }
    }

    fn is_diskless(&self, i: usize) -> bool {
        self.swarm.diskless_node() == Some(i)
    }

    fn quorum_on(&self) -> bool {
        self.swarm.quorum != QuorumPolicy::Off
    }

    /// Under dont-care without quorum, two primaries may write apart (lineages fork); with
    /// quorum that must never happen, so the one strict model applies.
    fn forks_lineages(&self) -> bool {
        self.swarm.fencing == Fencing::DontCare && !self.quorum_on()
    }

    pub fn swarm(&self) -> &Swarm {
        &self.swarm
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        let id = self.next_event;
        self.next_event += 1;
        self.events.push(Reverse((at, id)));
        self.payloads.insert(id, ev);
    }

    fn log(&self, text: impl FnOnce() -> String) {
        if self.trace {
            println!("t={} {}", self.now_ms, text());
        }
    }

    fn violation(&mut self, text: String) {
        self.violations.push(format!("t={}ms: {text}", self.now_ms));
    }

    fn config(&mut self, i: usize) -> Config {
        let congestion = self.congestion_config();
        Config {
            peers: (0..self.swarm.nodes).filter(|j| *j != i).map(nid).collect(),
            protocol: self.swarm.protocol,
            fencing: self.swarm.fencing,
            resync_rate: self.swarm.resync_rate,
            al_extents: self.swarm.al_extents,
            random_seed: self.seed ^ ((i as u64) << 40) ^ (self.nodes[i].incarnation << 48),
            digests: self.digest_settings(),
            quorum: self.quorum_config(i),
            // discard-local/discard-remote name a node: its peer words it the other way round.
            after_sb: if i == 0 {
                self.swarm.after_sb
            } else {
                self.swarm.after_sb.seen_from_peer()
            },
            congestion,
            ..Config::default()
        }
    }

    fn start_node(&mut self, i: usize) {
        self.log(|| format!("node {i} start"));
        let config = self.config(i);
        let node = Node::new(config, self.nodes[i].meta.clone(), self.now_ms);
        self.nodes[i].node = Some(node);
        self.nodes[i].restart_scheduled = false;
        self.nodes[i].role_seen = Role::Secondary;
        // Its handshakes judge the record from here on, whatever its peers take later.
        for mark in &mut self.mesh_crash_marks[i] {
            *mark = None;
        }
        self.drain(i, true);
    }

    /// Runs the whole scenario; the report lists violations (empty when the seed passes).
    pub fn run(mut self) -> Report {
        for i in 0..self.swarm.nodes {
            self.start_node(i);
        }
        self.schedule(0, Ev::Tick);
        if self.quorum_on() {
            self.report.quorum_runs = 1;
        }
        self.setup_initial_state();
        let safety_end = self.swarm.safety_ms;
        let mut heal_started = false;
        while self.violations.is_empty() {
            let Some(Reverse((at, id))) = self.events.pop() else { break };
            let ev = self.payloads.remove(&id).expect("scheduled");
            self.now_ms = at;
            if !heal_started && at >= safety_end {
                heal_started = true;
                self.start_healing();
            }
            if heal_started && at >= safety_end + LIVENESS_DEADLINE_MS {
                let state = self.describe();
                self.violation(format!(
                    "liveness: cluster did not converge after healing: {state}"
                ));
                break;
            }
            self.dispatch(ev);
            if heal_started && self.converged() && self.verify_epilogue() {
                self.final_checks();
                break;
            }
        }
        self.report.sim_ms = self.now_ms;
        self.report.disk_detaches = self.disk_failures.detaches;
        self.report.violations = self.violations;
        self.report
    }

    fn setup_initial_state(&mut self) {
        // Bring the fresh replicas up the two ways an operator does: declare them identical
        // (new-current-uuid --clear-bitmap) or force one primary and run the initial full sync.
        if !self.swarm.initial_full_sync || self.quorum_on() {
            // Connect everyone first, synchronously, so the clear-bitmap precondition holds
            // (and, with quorum, so that the first promotion has it).
            // Setup runs without faults: the volume is created on a healthy cluster.
            self.healing = true;
            for a in 0..self.swarm.nodes {
                for b in a + 1..self.swarm.nodes {
                    self.connect_pair(a, b);
                }
            }
            for _ in 0..50 {
                let established = self.nodes.iter().all(|n| {
                    n.node.as_ref().is_some_and(|x| {
                        x.peer_ids()
                            .iter()
                            .all(|p| x.replication_state(*p) == Some(ReplicationState::Established))
                    })
                });
                if established {
                    break;
                }
                self.settle(100);
            }
            // With quorum the first promotion is cluster-wide: it and the frames before it
            // travel the healthy cluster too (one lost frame stalls its link, and the
            // promotion times out waiting for the answer behind it).
            self.healing = self.quorum_on();
        }
        if !self.swarm.initial_full_sync {
            let result = self.nodes[0]
                .node
                .as_mut()
                .expect("up")
                .handle_new_current_uuid_clear_bitmap(self.now_ms);
            if let Err(e) = result {
                self.violation(format!("new-current-uuid --clear-bitmap refused: {e}"));
            }
            self.drain(0, false);
        }
        // A cluster-wide promotion may be refused for a moment (a peer in a handshake after
        // a reconnect): the operator retries, as `drbdadm primary` is retried.
        for attempt in 1..=SETUP_PROMOTION_ATTEMPTS_MAX {
            let result = self.nodes[0]
                .node
                .as_mut()
                .expect("up")
                .handle_promote(self.now_ms, self.swarm.initial_full_sync);
            self.promote_result(0, Promoting::Initial, result);
            self.drain(0, false);
            // The peers answer within the confirm timeout.
            for _ in 0..SETUP_PROMOTION_STEPS_MAX {
                if self.promoting[0].is_none() {
                    break;
                }
                self.settle(SETUP_PROMOTION_STEP_MS);
            }
            if self.promoting[0].is_some() {
                self.violation("initial promotion did not finish".into());
                break;
            }
            match self.initial_promotion_error.take() {
                None => break,
                Some(e) if attempt == SETUP_PROMOTION_ATTEMPTS_MAX => {
                    self.violation(format!("initial promotion refused: {e}"));
                }
                Some(e) => {
                    self.log(|| format!("initial promotion refused, retrying: {e}"));
                    self.settle(SETUP_PROMOTION_STEP_MS);
                }
            }
        }
        self.healing = false;
    }

    /// What `handle_promote` returned (or `Event::PromotionFinished` told) for node `i`.
    fn promote_result(&mut self, i: usize, kind: Promoting, result: Result<Promotion, StateError>) {
        let result = match result {
            Ok(Promotion::Pending) => {
                self.promoting[i] = Some(kind);
                return;
            }
            Ok(Promotion::Done) => Ok(()),
            Err(e) => Err(e),
        };
        match kind {
            Promoting::Initial => match result {
                Ok(()) => {
                    self.last_primary = Some(i);
                    self.promoted_at[i] = Some(self.now_ms);
                    self.report.promotions += 1;
                }
                Err(e) => self.initial_promotion_error = Some(e),
            },
            Promoting::Operator { force } => match result {
                Ok(()) => self.promoted(i, force),
                Err(
                    StateError::NoQuorum(_)
                    | StateError::PeerRefused(_)
                    | StateError::PeerPromoting(_),
                ) => self.report.promotions_refused_no_quorum += 1,
                Err(_) => {}
            },
            Promoting::Split { old } => self.split_promote_result(i, old, result),
        }
    }

    /// Runs events for a while (used only during setup).
    fn settle(&mut self, duration_ms: u64) {
        let until = self.now_ms + duration_ms;
        while let Some(Reverse((at, id))) = self.events.peek().copied() {
            if at > until {
                break;
            }
            self.events.pop();
            let ev = self.payloads.remove(&id).expect("scheduled");
            self.now_ms = at;
            self.dispatch(ev);
        }
        self.now_ms = until;
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Tick => self.tick(),
            Ev::Deliver { to, from, bytes } => {
                if let Some(node) = self.nodes[to].node.as_mut() {
                    node.handle_receive(self.now_ms, nid(from), &bytes);
                    self.drain(to, false);
                }
            }
            Ev::Closed { to, from, conn } => {
                if let Some(node) = self.nodes[to].node.as_mut() {
                    node.handle_transport_closed(self.now_ms, nid(from), conn);
                    self.drain(to, false);
                }
            }
            Ev::DiskDone { node, incarnation, io, op, error, flush_point } => {
                self.disk_done(node, incarnation, io, op, error, flush_point);
            }
            Ev::Timer { node, incarnation, at } => {
                let n = &mut self.nodes[node];
                if n.incarnation == incarnation && n.timer_at == Some(at) {
                    n.timer_at = None;
                    if let Some(state) = n.node.as_mut() {
                        state.handle_timeout(self.now_ms);
                        self.drain(node, false);
                    }
                }
            }
            Ev::Connect { a, b } => {
                self.connecting.insert(pair(a, b), false);
                let up = self.nodes[a].node.as_ref().is_some_and(|n| n.wants_connection(nid(b)))
                    && self.nodes[b].node.as_ref().is_some_and(|n| n.wants_connection(nid(a)));
                if up && !self.partitioned.get(&pair(a, b)).copied().unwrap_or(false) {
                    self.connect_pair(a, b);
                }
            }
            Ev::Restart { node } => {
                if self.nodes[node].node.is_none() {
                    self.start_node(node);
                }
            }
            Ev::FenceDone { node, incarnation, peer } => self.fence_done(node, incarnation, peer),
            Ev::SplitPromote { node, old } => self.split_promote(node, old),
            Ev::HealIsolation { node } => {
                for j in 0..self.swarm.nodes {
                    if j != node {
                        self.partitioned.insert(pair(node, j), false);
                    }
                }
                self.log(|| format!("node {node} isolation healed"));
            }
            Ev::Reconnect { node, peer, discard } => {
                if let Some(n) = self.nodes[node].node.as_mut() {
                    if discard {
                        self.discard_requested[node][peer] = true;
                    }
                    let _ = n.handle_connect(self.now_ms, nid(peer), discard);
                    self.drain(node, false);
                }
            }
            Ev::Resize(ev) => self.resize_dispatch(ev),
        }
    }

    fn connect_pair(&mut self, a: usize, b: usize) {
        if self.swarm.shared_secret && !self.authenticate(a, b) {
            return;
        }
        let conn = self.next_conn;
        self.log(|| format!("connect {a}-{b} conn {conn}"));
        self.next_conn += 1;
        self.conns.insert(pair(a, b), conn);
        self.congestion_connection_reset(a, b);
        self.dirty_at_connect
            .insert(pair(a, b), (self.dirty.clone(), self.discard_requested.clone()));
        for (x, y) in [(a, b), (b, a)] {
            self.resize_before_connect(x);
            if let Some(node) = self.nodes[x].node.as_mut() {
                node.handle_connected(self.now_ms, nid(y), conn);
            }
        }
        self.drain(a, false);
        self.drain(b, false);
    }

    /// The cram-hmac-alg exchange before a connection (the driver runs the same steps over
    /// TCP). Mismatched secrets must never authenticate; the pair keeps retrying, as DRBD.
    fn authenticate(&mut self, a: usize, b: usize) -> bool {
        use crate::protocol::auth::{self, Authenticator};
        // Until healing, the operator's typo: node b holds another secret.
        let mismatch = self.swarm.secret_mismatch && !self.healing;
        let secret_b: &[u8] = if mismatch { b"typo-secret" } else { b"sim-secret" };
        // Challenges from a stream of their own: the run's other choices stay as they were.
        let mut own = Rng::new(self.seed ^ self.next_conn.rotate_left(32));
        let mut challenge = || {
            let mut c = [0u8; auth::CHALLENGE_BYTES];
            for chunk in c.chunks_mut(8) {
                chunk.copy_from_slice(&own.next_u64().to_le_bytes());
            }
            c
        };
        let (ca, cb) = (challenge(), challenge());
        self.next_conn += 1;
        let mut x = Authenticator::new(Some(b"sim-secret"), nid(a), nid(b), ca);
        let mut y = Authenticator::new(Some(secret_b), nid(b), nid(a), cb);
        let (rx, ry) = auth::exchange(&mut x, &mut y);
        match (rx.is_ok() && ry.is_ok(), mismatch) {
            (true, false) => true,
            (true, true) => {
                self.violation(format!("nodes {a} and {b} authenticated with different secrets"));
                false
            }
            (false, true) => {
                self.report.auth_refusals += 1;
                self.log(|| format!("auth {a}-{b} refused: {rx:?} / {ry:?}"));
                false
            }
            (false, false) => {
                self.violation(format!("nodes {a} and {b} refused the same secret: {rx:?} {ry:?}"));
                false
            }
        }
    }

    fn tick(&mut self) {
        self.schedule(self.now_ms + TICK_MS, Ev::Tick);
        let n = self.swarm.nodes;
        // Reconnect pairs that both want a connection.
        for a in 0..n {
            for b in a + 1..n {
                let key = pair(a, b);
                let wants = self.nodes[a].node.as_ref().is_some_and(|x| x.wants_connection(nid(b)))
                    && self.nodes[b].node.as_ref().is_some_and(|x| x.wants_connection(nid(a)));
                let connected_both = self.nodes[a].node.as_ref().is_some_and(|x| {
                    x.connection_state(nid(b)) == Some(crate::protocol::ConnectionState::Connected)
                }) && self.nodes[b].node.as_ref().is_some_and(|x| {
                    x.connection_state(nid(a)) == Some(crate::protocol::ConnectionState::Connected)
                });
                if wants && !connected_both && !self.connecting.get(&key).copied().unwrap_or(false)
                {
                    self.connecting.insert(key, true);
                    let delay = self.rng.range(5, 100);
                    self.schedule(self.now_ms + delay, Ev::Connect { a, b });
                }
            }
        }
        if self.quorum_on() {
            self.track_isolation();
        }
        if self.healing {
            return;
        }
        self.workload();
        self.faults();
        self.congestion_tick();
    }

    fn primary(&self) -> Option<usize> {
        (0..self.swarm.nodes)
            .find(|&i| self.nodes[i].node.as_ref().is_some_and(|n| n.role() == Role::Primary))
    }

    fn workload(&mut self) {
        let Some(p) = self.primary() else { return };
        if self.pending.len() >= APP_IN_FLIGHT_MAX
            || !self.rng.chance(self.swarm.write_ppm_per_tick)
        {
            return;
        }
        // The primary's device, grown or not (`resize`).
        let size = self.nodes[p].node.as_ref().expect("primary is up").size_blocks();
        let request = self.next_request;
        self.next_request += 1;
        let incarnation = self.nodes[p].incarnation;
        let roll = self.rng.below(1_000_000);
        let (req, pending) = if roll < self.swarm.flush_ppm {
            (AppRequest::Flush, Pending::Flush { issued_ms: self.now_ms })
        } else if roll < self.swarm.flush_ppm + 80_000 {
            let blocks = self.rng.range(1, 8).min(size);
            let first = self.rng.below(size - blocks + 1);
            (AppRequest::Read { offset_blocks: first, blocks }, Pending::Read { first })
        } else {
            let blocks = self.rng.range(1, 8).min(size);
            // Most writes go to a hot area so that overlaps and conflicts are common.
            let hot = (size / 8).max(blocks);
            let first = if self.rng.below(3) > 0 {
                self.rng.below(hot - blocks + 1)
            } else {
                self.rng.below(size - blocks + 1)
            };
            let first = self.resize_write_first(size, blocks).unwrap_or(first);
            let discard = self.rng.below(50) == 0;
            let fua = !discard && self.rng.chance(self.swarm.fua_ppm);
            let id = self.issue_write(p, first, blocks, discard);
            self.log(|| {
                format!("node {p} issue {request:?} write {id} blocks {first}+{blocks} discard={discard} fua={fua}")
            });
            let end = first + blocks;
            if discard {
                self.ground_truth_discard(first, end);
                (
                    AppRequest::Discard { offset_blocks: first, blocks },
                    Pending::Write { id, fua, first, end },
                )
            } else {
                let mut data = vec![0u8; usize::try_from(blocks).expect("small") * BLOCK];
                for (k, chunk) in data.chunks_mut(BLOCK).enumerate() {
                    model::fill_block(chunk, id, first + k as u64);
                }
                (
                    AppRequest::Write { offset_blocks: first, data: data.into(), fua },
                    Pending::Write { id, fua, first, end },
                )
            }
        };
        self.pending.insert(request, (p, incarnation, pending));
        self.nodes[p].node.as_mut().expect("primary is up").handle_request(
            self.now_ms,
            RequestId(request),
            req,
        );
        self.drain(p, false);
    }

    fn faults(&mut self) {
        let n = self.swarm.nodes;
        for i in 0..n {
            if self.nodes[i].node.is_some() && self.rng.chance(self.swarm.crash_ppm_per_tick) {
                let power = self.rng.chance(self.swarm.power_loss_share_ppm);
                self.crash(i, power);
                let delay = self.rng.range(10, 3_000);
                self.nodes[i].restart_scheduled = true;
                self.schedule(self.now_ms + delay, Ev::Restart { node: i });
            }
        }
        for a in 0..n {
            for b in a + 1..n {
                if self.rng.chance(self.swarm.partition_ppm_per_tick) {
                    let entry = self.partitioned.entry((a, b)).or_insert(false);
                    *entry = !*entry;
                    let now = *entry;
                    self.log(|| format!("partition {a}-{b} = {now}"));
                }
                if self.rng.chance(self.swarm.admin_disconnect_ppm_per_tick)
                    && let Some(node) = self.nodes[a].node.as_mut()
                {
                    let _ = node.handle_disconnect(self.now_ms, nid(b));
                    self.drain(a, false);
                    let delay = self.rng.range(10, 1_000);
                    self.schedule(
                        self.now_ms + delay,
                        Ev::Reconnect { node: a, peer: b, discard: false },
                    );
                }
            }
        }
        self.plan_split_promotions();
        if self.swarm.isolate_primary_ppm_per_tick > 0
            && self.rng.chance(self.swarm.isolate_primary_ppm_per_tick)
            && let Some(p) = self.primary()
        {
            self.isolate(p);
        }
        if self.rng.chance(self.swarm.promote_demote_ppm_per_tick) {
            match self.primary() {
                Some(p) => {
                    self.log(|| format!("node {p} demote"));
                    let _ = self.nodes[p].node.as_mut().expect("up").handle_demote(self.now_ms);
                    self.drain(p, false);
                }
                None => self.try_promote(false),
            }
        }
        if self.primary().is_none() && self.rng.chance(self.swarm.force_promote_ppm_per_tick) {
            self.try_promote(true);
        }
        self.verify_faults();
        self.more_faults();
        self.resize_faults();
        // A detached node gets its disk re-attached (a restart) after a while.
        for i in 0..n {
            if self.is_diskless(i) {
                continue;
            }
            if !self.nodes[i].restart_scheduled
                && self.nodes[i].node.as_ref().is_some_and(|x| {
                    x.disk_state() == DiskState::Diskless && x.role() == Role::Secondary
                })
            {
                if self.reattach(i) {
                    continue;
                }
                self.nodes[i].restart_scheduled = true;
                self.crash(i, false);
                let delay = self.rng.range(10, 500);
                self.schedule(self.now_ms + delay, Ev::Restart { node: i });
            } else if self.nodes[i]
                .node
                .as_ref()
                .is_some_and(|x| x.disk_state() == DiskState::Diskless && x.role() == Role::Primary)
                && self.demote_diskless_primary_now()
            {
                let _ = self.nodes[i].node.as_mut().expect("up").handle_demote(self.now_ms);
                self.drain(i, false);
            }
        }
    }

    /// Once both a primary p and an UpToDate secondary s noticed that they lost each other
    /// (a partition or a disconnect), the cluster manager may promote s after a while. It
    /// waits for both to notice, as a cluster manager's membership timeout is longer than
    /// DRBD's ping timeout; until then the old primary is still replicating to s, or blocked.
    fn plan_split_promotions(&mut self) {
        let n = self.swarm.nodes;
        for p in 0..n {
            for s in 0..n {
                if p == s {
                    continue;
                }
                let (Some(a), Some(b)) = (self.nodes[p].node.as_ref(), self.nodes[s].node.as_ref())
                else {
                    continue;
                };
                let connected = a.connection_state(nid(s)) == Some(ConnectionState::Connected)
                    || b.connection_state(nid(p)) == Some(ConnectionState::Connected);
                if a.role() != Role::Primary || (connected && !self.split_planned[p][s]) {
                    continue;
                }
                if connected {
                    // Connected again: the next loss is a new episode.
                    self.split_planned[p][s] = false;
                    continue;
                }
                let candidate =
                    b.role() == Role::Secondary && b.disk_state() == DiskState::UpToDate;
                if self.split_planned[p][s] || !candidate {
                    continue;
                }
                self.split_planned[p][s] = true;
                if self.rng.chance(self.swarm.split_promote_ppm) {
                    self.report.split_promotions += 1;
                    let delay = self.rng.range(0, self.swarm.split_promote_delay_ms_max);
                    self.schedule(self.now_ms + delay, Ev::SplitPromote { node: s, old: p });
                }
            }
        }
    }

    fn try_promote(&mut self, force: bool) {
        if self.primary().is_some() {
            return;
        }
        if force && self.promoting.iter().any(Option::is_some) {
            // An operator who forces a primary waits for a promotion still asking its peers:
            // forcing a second node meanwhile made two forced lineages once the first one
            // committed (seed 17691: node 1 asked at 12456 ms and committed at 13649 ms, node
            // 2 was forced at 13166 ms), the operator error described below.
            return;
        }
        let flipped = self.epilogue_flipped_node();
        let candidates: Vec<usize> = (0..self.swarm.nodes)
            .filter(|&i| {
                Some(i) != flipped
                    && self.nodes[i].node.as_ref().is_some_and(|n| {
                        if force {
                            n.disk_state().has_data() && n.disk_state() != DiskState::UpToDate
                        } else {
                            n.disk_state() == DiskState::UpToDate
                        }
                    })
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let i = candidates[self.rng.index(candidates.len())];
        if force {
            // An operator forces a primary only when no UpToDate node is reachable, and then
            // outdates the others (their disks, if down) so that none of them is later promoted
            // as UpToDate with a different history: that would be two forced lineages, an
            // operator error no engine can repair.
            let up_to_date_up = (0..self.swarm.nodes).any(|j| {
                self.nodes[j].node.as_ref().is_some_and(|n| n.disk_state() == DiskState::UpToDate)
            });
            if up_to_date_up {
                return;
            }
            for j in 0..self.swarm.nodes {
                if j == i {
                    continue;
                }
                match self.nodes[j].node.as_mut() {
                    Some(n) => {
                        let _ = n.handle_outdate(self.now_ms);
                        self.drain(j, false);
                    }
                    None => {
                        if self.nodes[j].meta.flags.disk == PersistedDisk::UpToDate {
                            let mut flags = self.nodes[j].meta.flags.clone();
                            flags.disk = PersistedDisk::Outdated;
                            self.nodes[j].meta.apply(&MetaUpdate::Flags(flags));
                        }
                    }
                }
            }
        }
        let result = self.nodes[i].node.as_mut().expect("up").handle_promote(self.now_ms, force);
        self.log(|| format!("node {i} promote force={force}: {result:?}"));
        self.promote_result(i, Promoting::Operator { force }, result);
        self.drain(i, false);
    }

    /// Bookkeeping and checks after node i was promoted.
    fn promoted(&mut self, i: usize, force: bool) {
        self.report.promotions += 1;
        // The engine drops a pending discard-my-data on promotion (as DRBD does).
        for j in 0..self.swarm.nodes {
            self.discard_requested[i][j] = false;
        }
        self.promoted_at[i] = Some(self.now_ms);
        self.last_primary = Some(i);
        self.forced_promotion |= force;
        if force {
            self.ground_truth_forced(i);
        }
        let mut apart_from_primary = false;
        for j in 0..self.swarm.nodes {
            if j == i {
                continue;
            }
            let in_sync = self.nodes[i].node.as_ref().is_some_and(|n| {
                verify::in_sync_state(n.replication_state(nid(j)))
                    && n.peer_disk_state(nid(j)) == Some(DiskState::UpToDate)
            });
            if !in_sync {
                self.promoted_apart[i][j] = true;
                apart_from_primary |=
                    self.nodes[j].node.as_ref().is_some_and(|n| n.role() == Role::Primary);
            }
        }
        let image = self.device_image(i);
        if force {
            // The operator declared this data the truth; writes it lacks are forgiven, and
            // every other node now lacks our new generation.
            let stable = self.nodes[i].disk.read_stable();
            let volatile = self.nodes[i].disk.volatile_writes();
            self.models[self.lineage[i]].rebase(&image, &stable, volatile);
            self.stale[i] = None;
            // The operator outdated every other node and declared this data the truth: what
            // the cluster manager knew about a peer promoted apart from us (its data is the
            // newer one) no longer holds, so a fence-peer handler must not answer "peer is
            // primary" for it any more (seed 102572).
            for j in 0..self.swarm.nodes {
                self.promoted_apart[j][i] = false;
            }
            for j in 0..self.swarm.nodes {
                if j != i {
                    self.set_dirty(i, j);
                }
            }
            return;
        }
        if self.forks_lineages() {
            // Nothing stops a primary from writing without its peer: a node promoted while it
            // lacks such writes, or while another primary writes apart from it, starts a
            // lineage of its own. Writes acknowledged on one lineage are required only there;
            // the split-brain recovery decides which lineage survives.
            let base = self.stale[i].take();
            if base.is_some() || apart_from_primary {
                let mut fork = base.unwrap_or_else(|| self.models[self.lineage[i]].clone());
                fork.sync_ids(self.write_count);
                if self.swarm.protocol != ReplicationProtocol::C {
                    // Writes in flight to us were acknowledged without reaching our disk.
                    fork.volatile_loss();
                }
                self.models.push(fork);
                self.lineage[i] = self.models.len() - 1;
                self.report.lineage_forks += 1;
                self.log(|| format!("node {i} forks lineage {}", self.lineage[i]));
            }
        }
        if self.quorum_on() {
            // With quorum a promotion on a stale view can succeed, but that primary serves
            // nothing until its peers confirm it (and never, if they follow another): check
            // its data when it completes its first request.
            self.check_on_first_completion[i] = true;
            return;
        }
        if let Err(problem) = self.models[self.lineage[i]].check_image(&image) {
            self.violation(format!(
                "node {i} promoted with UpToDate data missing an acknowledged write: {problem}"
            ));
        }
    }

    /// Ghost record: a holds changes b may lack. Under dont-care, b's lineage copy is taken
    /// when a starts writing without it, so b stays checked against what it must hold.
    fn set_dirty(&mut self, a: usize, b: usize) {
        if !self.dirty[a][b]
            && self.forks_lineages()
            && self.lineage[a] == self.lineage[b]
            && self.stale[b].is_none()
        {
            let mut snapshot = self.models[self.lineage[a]].clone();
            if self.swarm.protocol != ReplicationProtocol::C {
                // Under A and B acknowledged writes may still have been on their way to b.
                snapshot.volatile_loss();
            }
            self.stale[b] = Some(snapshot);
        }
        self.dirty[a][b] = true;
    }

    /// Ghost record, besides the primary's `BitmapSet` outputs: node i acknowledged a write
    /// of blocks `first..end` as primary while its bitmap for a peer covers some of them, so
    /// that peer may lack the write. The engine persists a mark only when it sets a bit: for
    /// a peer whose bits were all set already (its restart had marked everything for its
    /// peers) there was no output, the primary's writes apart from that peer went
    /// unrecorded, and the split brain with it, force-promoted meanwhile, looked false
    /// (mesh seed 6322).
    fn acked_apart(&mut self, i: usize, first: u64, end: u64) {
        if self.nodes[i].role_seen != Role::Primary || self.detached_disk(i) {
            return;
        }
        for j in 0..self.swarm.nodes {
            let marked = |meta: &Metadata| (first..end).any(|b| meta.bitmaps[j].test(b));
            if j != i && !self.is_diskless(j) && marked(&self.nodes[i].meta) {
                self.ground_truth_acked_apart(i, j);
            }
            if j != i && !self.dirty[i][j] && !self.is_diskless(j) && marked(&self.nodes[i].meta) {
                self.set_dirty(i, j);
                self.log(|| format!("node {i} dirty for {j}: acknowledged blocks {first}..{end}"));
            }
        }
    }

    /// a and b hold the same data again (a resync finished or the handshake found no
    /// difference): forget everything recorded about their separation.
    fn in_sync(&mut self, a: usize, b: usize) {
        self.ground_truth_in_sync(a, b);
        for (x, y) in [(a, b), (b, a)] {
            self.dirty[x][y] = false;
            self.discard_requested[x][y] = false;
            self.auto_victim[x][y] = false;
            self.promoted_apart[x][y] = false;
            self.stale[x] = None;
            self.fenced[x] = false;
        }
    }

    /// Registers a write issued on node `p` in its lineage's model; every other model
    /// reserves the id.
    fn issue_write(&mut self, p: usize, first: u64, blocks: u64, discard: bool) -> u64 {
        let count = self.write_count;
        for m in self.models.iter_mut().chain(self.stale.iter_mut().flatten()) {
            m.sync_ids(count);
        }
        let id = self.models[self.lineage[p]].issue_write(first, blocks, discard);
        self.write_count += 1;
        assert_eq!(id, self.write_count as u64, "one write-id space over all lineages");
        for (l, m) in self.models.iter_mut().enumerate() {
            if l != self.lineage[p] {
                m.sync_ids(self.write_count);
            }
        }
        id
    }

    /// A crash that may have lost volatile data: every lineage may be affected.
    fn volatile_loss(&mut self) {
        for m in self.models.iter_mut().chain(self.stale.iter_mut().flatten()) {
            m.volatile_loss();
        }
    }

    fn crash(&mut self, i: usize, power_loss: bool) {
        if self.nodes[i].node.is_none() {
            return;
        }
        self.report.crashes += 1;
        self.log(|| format!("node {i} crash power_loss={power_loss}"));
        self.nodes[i].node = None;
        self.promoting[i] = None;
        self.nodes[i].incarnation += 1;
        self.nodes[i].timer_at = None;
        // Writes the disk had accepted may or may not have been performed.
        for (_, (first, data, fua)) in std::mem::take(&mut self.nodes[i].in_flight_writes) {
            if self.rng.below(2) == 0 {
                self.nodes[i].disk.write(first, data, fua);
            }
        }
        if power_loss {
            let torn = self.swarm.torn_ppm;
            self.nodes[i].disk.power_loss(&mut self.rng, torn);
        }
        if power_loss || self.swarm.protocol != ReplicationProtocol::C {
            self.volatile_loss();
        }
        if power_loss {
            // A primary without a disk of its own writes only to its sources: a write of its
            // still pending may already be in this node's lost cache, acknowledged on the
            // wire (seed 1399: the peer acked write 269 and lost power 3 ms before the ack
            // arrived; the model counted 269 guaranteed although its only copy was gone).
            let lost: Vec<(usize, u64)> = self
                .pending
                .values()
                .filter_map(|(node, _, pending)| match pending {
                    Pending::Write { id, .. } if *node != i && self.runs_without_disk(*node) => {
                        Some((self.lineage[*node], *id))
                    }
                    _ => None,
                })
                .collect();
            for (lineage, id) in lost {
                self.models[lineage].volatile_loss_before_ack(id);
            }
        }
        self.mesh_crash_with_writes_pending(i);
        // Its application requests die with it (their writes stay "maybe landed").
        self.pending.retain(|_, (node, _, _)| *node != i);
        for j in 0..self.swarm.nodes {
            if let Some(conn) = self.conns.remove(&pair(i, j))
                && !self.partitioned.get(&pair(i, j)).copied().unwrap_or(false)
            {
                let delay = self.rng.range(1, 50);
                self.schedule(self.now_ms + delay, Ev::Closed { to: j, from: i, conn });
            }
        }
    }

    fn drain(&mut self, i: usize, constructing: bool) {
        loop {
            let Some(node) = self.nodes[i].node.as_mut() else { return };
            let Some(output) = node.poll_output() else { break };
            // The role as of this output, from the ordered RoleChanged events: a demotion that
            // finishes in the same input (the connection broke, the last write completed) comes
            // after the bitmap bits that input set as primary.
            let role = self.nodes[i].role_seen;
            match output {
                Output::Transmit { peer, frame } => self.transmit(i, peer.index(), frame.to_vec()),
                Output::Disconnect { peer, conn_id } => {
                    let j = peer.index();
                    if self.conns.get(&pair(i, j)) == Some(&conn_id) {
                        let conn = conn_id;
                        self.conns.remove(&pair(i, j));
                        if !self.partitioned.get(&pair(i, j)).copied().unwrap_or(false) {
                            let delay = self.rng.range(1, 20);
                            self.schedule(self.now_ms + delay, Ev::Closed { to: j, from: i, conn });
                        }
                    }
                }
                Output::DiskIo { id, op } => {
                    match &op {
                        DiskOp::Read { offset_blocks, blocks } => {
                            self.resize_check_io(i, *offset_blocks, *blocks);
                        }
                        DiskOp::Write { offset_blocks, data, .. } => {
                            let blocks = (data.len() / BLOCK) as u64;
                            self.resize_check_io(i, *offset_blocks, blocks);
                        }
                        DiskOp::Flush => {}
                    }
                    let latency = self.rng.range(0, self.swarm.disk_latency_ms_max);
                    let error = (!self.healing
                        && self.may_fail_disk(i)
                        && self.rng.chance(self.swarm.disk_error_ppm))
                        || self.more_disk_error(i);
                    let flush_point = self.nodes[i].disk.flush_point();
                    if let DiskOp::Write { offset_blocks, data, fua, .. } = &op {
                        self.nodes[i]
                            .in_flight_writes
                            .insert(id.0, (*offset_blocks, data.to_vec(), *fua));
                    }
                    let incarnation = self.nodes[i].incarnation;
                    self.schedule(
                        self.now_ms + latency,
                        Ev::DiskDone { node: i, incarnation, io: id, op, error, flush_point },
                    );
                }
                Output::Persist(update) => {
                    // A secondary that marks a primary whose disk is detached holds that
                    // primary's writes alone: they reach no other disk (seed 11989).
                    if let MetaUpdate::BitmapSet { peer, .. } = &update
                        && !constructing
                        && ((role == Role::Primary && !self.detached_disk(i))
                            || (self.detached_disk(peer.index())
                                && self.nodes[peer.index()]
                                    .node
                                    .as_ref()
                                    .is_some_and(|n| n.role() == Role::Primary)))
                    {
                        self.set_dirty(i, peer.index());
                        self.log(|| format!("node {i} dirty for {peer} via {update:?}"));
                    } else if !matches!(update, MetaUpdate::ActivityLog { .. }) {
                        self.log(|| format!("node {i} persist {update:?}"));
                    }
                    self.nodes[i].meta.apply(&update);
                    if let MetaUpdate::Uuids(uuids) = &update {
                        self.mesh_took_generation(i, uuids.current);
                    }
                }
                Output::Complete { request, result } => {
                    self.log(|| format!("node {i} complete {request:?} ok={}", result.is_ok()));
                    self.complete(i, request.0, result)
                }
                Output::Event(event) => {
                    self.log(|| format!("node {i} event {event:?}"));
                    if let Event::RoleChanged(role) = event {
                        self.nodes[i].role_seen = role;
                    }
                    self.event(i, event)
                }
            }
        }
        let node = self.nodes[i].node.as_ref().expect("still up");
        let deadline = node.poll_timeout();
        if deadline != self.nodes[i].timer_at {
            self.nodes[i].timer_at = deadline;
            if let Some(at) = deadline {
                let incarnation = self.nodes[i].incarnation;
                self.schedule(at.max(self.now_ms), Ev::Timer { node: i, incarnation, at });
            }
        }
    }

    /// Disk failures are injected only where they cannot destroy the last copy of data: not on
    /// a sync source or a node holding changes its peers lack (losing the only copy is a double
    /// failure); the primary only when the seed says so (`disk_fail`).
    fn may_fail_disk(&self, i: usize) -> bool {
        let Some(n) = self.nodes[i].node.as_ref() else { return false };
        self.disk_failure_allowed(i)
            && n.peer_ids()
                .iter()
                .all(|p| n.replication_state(*p) != Some(ReplicationState::SyncSource))
            && !self.dirty[i].iter().any(|d| *d)
    }

    fn transmit(&mut self, from: usize, to: usize, mut bytes: Vec<u8>) {
        let key = pair(from, to);
        if !self.conns.contains_key(&key) || self.partitioned.get(&key).copied().unwrap_or(false) {
            return;
        }
        let faults = !self.healing;
        if faults && self.rng.chance(self.swarm.loss_ppm) {
            return;
        }
        if faults && self.rng.chance(self.swarm.corrupt_ppm) {
            let at = self.rng.index(bytes.len());
            bytes[at] ^= 1 << self.rng.below(8);
        }
        let copies = if faults && self.rng.chance(self.swarm.duplicate_ppm) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.range(0, self.swarm.net_delay_ms_max)
                + self.congestion_delay_ms(from, to, bytes.len());
            self.schedule(self.now_ms + delay, Ev::Deliver { to, from, bytes: bytes.clone() });
        }
    }

    fn disk_done(
        &mut self,
        i: usize,
        incarnation: u64,
        io: IoId,
        op: DiskOp,
        error: bool,
        flush_point: u64,
    ) {
        if self.nodes[i].incarnation != incarnation || self.nodes[i].node.is_none() {
            return;
        }
        self.nodes[i].in_flight_writes.remove(&io.0);
        if error {
            self.log(|| format!("node {i} disk error on {io:?}"));
        }
        let result = if error {
            Err(IoFailed)
        } else {
            match op {
                DiskOp::Read { offset_blocks, blocks } => {
                    Ok(Some(self.nodes[i].disk.read(offset_blocks, blocks)))
                }
                DiskOp::Write { offset_blocks, data, fua, .. } => {
                    self.nodes[i].disk.write(offset_blocks, data.to_vec(), fua);
                    Ok(None)
                }
                DiskOp::Flush => {
                    self.nodes[i].disk.flush(flush_point);
                    Ok(None)
                }
            }
        };
        self.nodes[i].node.as_mut().expect("checked").handle_disk_completion(
            self.now_ms,
            io,
            result,
        );
        self.drain(i, false);
    }

    fn complete(
        &mut self,
        i: usize,
        request: u64,
        result: Result<Option<Vec<u8>>, crate::protocol::RequestError>,
    ) {
        let Some((node, _, pending)) = self.pending.remove(&request) else {
            self.violation(format!("node {i} completed unknown request {request}"));
            return;
        };
        if node != i {
            self.violation(format!("request {request} of node {node} completed by node {i}"));
            return;
        }
        self.check_quorum_completion(i, &result);
        if result.is_ok() && self.detached_disk(i) {
            self.report.detached_primary_requests += 1;
        }
        match (pending, result) {
            (Pending::Write { id, fua, first, end }, result) => {
                if result.is_ok() {
                    self.acked_apart(i, first, end);
                    self.report.writes_acked += 1;
                    self.check_single_writer(i);
                    self.resize_check_ack(i, first, end);
                }
                // Under protocols A and B a FUA write is acknowledged before the peer has it:
                // only protocol C's FUA is stable on every replica at completion.
                let stable = fua && self.swarm.protocol == ReplicationProtocol::C;
                let l = self.lineage[i];
                self.models[l].complete_write(id, result.is_ok(), stable, self.now_ms);
            }
            (Pending::Flush { issued_ms }, Ok(_)) => {
                let l = self.lineage[i];
                self.models[l].complete_flush(issued_ms);
            }
            (Pending::Flush { .. }, Err(_)) => {}
            (Pending::Read { first }, Ok(Some(data))) => {
                if let Err(problem) = self.models[self.lineage[i]].check_read(first, &data) {
                    self.violation(format!("node {i}: {problem}"));
                }
            }
            (Pending::Read { .. }, _) => {}
        }
    }

    fn event(&mut self, i: usize, event: Event) {
        self.verify_event(i, &event);
        self.congestion_event(i, &event);
        self.resize_event(i, &event);
        match event {
            Event::PromotionFinished(result) => {
                self.log(|| format!("node {i} promotion finished: {result:?}"));
                match self.promoting[i].take() {
                    Some(kind) => self.promote_result(i, kind, result.map(|()| Promotion::Done)),
                    None => self.violation(format!("node {i}: a promotion nobody started ended")),
                }
            }
            Event::QuorumChanged(have) => {
                self.quorum_seen[i] = have;
                let primary = self.nodes[i].role_seen == Role::Primary;
                if primary && !have {
                    self.report.quorum_losses += 1;
                } else if primary {
                    self.report.quorum_regains += 1;
                }
            }
            Event::FencePeer { peer } => {
                self.ground_truth_fence_started(i, peer.index());
                let delay = self.rng.range(1, 200);
                let incarnation = self.nodes[i].incarnation;
                self.schedule(
                    self.now_ms + delay,
                    Ev::FenceDone { node: i, incarnation, peer: peer.index() },
                );
            }
            Event::HandshakeDecided { peer, decision } => {
                self.check_decision(i, peer.index(), decision)
            }
            Event::SplitBrain { peer } => {
                self.report.split_brains += 1;
                self.resolve_standalone(i, peer.index());
            }
            Event::SplitBrainResolved { peer, policy, discarded_local } => {
                self.split_brain_resolved(i, peer.index(), policy, discarded_local);
            }
            Event::PrimaryLostAfterSplitBrain { .. } => {
                // The handler's usual action: give up the primary role (the connection stays
                // StandAlone and the split brain is resolved by hand).
                self.report.primary_lost_calls += 1;
                if let Some(n) = self.nodes[i].node.as_mut() {
                    let _ = n.handle_demote(self.now_ms);
                }
            }
            Event::SyncRefused { peer, reason } => self.sync_refused(i, peer.index(), reason),
            Event::Detached => {
                self.detached(i);
                self.disk_failures.detaches += 1;
            }
            Event::UnrelatedData { peer } => {
                self.violation(format!("node {i} and {peer} reported unrelated data"));
            }
            Event::ResyncFinished { peer, .. } => {
                let j = peer.index();
                self.report.resyncs += 1;
                // The target reports the end after its source, when the source's ResyncDone
                // arrives: the source's report already recorded the two in sync, and what the
                // source marked for the target since (writes in flight when the link failed
                // right after ResyncDone, seed 1428) the target still lacks. Clearing again
                // here forgot the source's changes, and the split brain that followed (the
                // target promoted apart) looked wrong.
                let as_target = self.mesh_sync_source[i] == Some(j);
                self.mesh_resync_finished(i, j);
                if as_target {
                    self.ground_truth_same_generation(i, j);
                } else {
                    self.in_sync(i, j);
                }
            }
            Event::ReplicationStateChanged { peer, state } => {
                let j = peer.index();
                if state == ReplicationState::SyncSource && self.mesh_sync_source[i] == Some(j) {
                    // A resync the other way that never finished: we are the source now.
                    self.mesh_sync_source[i] = None;
                }
                if state == ReplicationState::SyncTarget {
                    self.mesh_sync_source[i] = Some(j);
                    self.survivor_lineage(i, j);
                    // Our data becomes a copy of the source's: its lineage is ours now (after
                    // a split brain this is where the victim's writes are forgiven).
                    self.lineage[i] = self.lineage[j];
                    self.stale[i] = None;
                    // Whatever we wrote apart is discarded: the source lacks nothing of ours.
                    self.stale[j] = None;
                } else if state == ReplicationState::Established
                    && self.lineage[i] != self.lineage[j]
                {
                    // In sync without a resync: neither wrote since the lineages forked, so
                    // they hold the same requirements; keep the latest primary's.
                    let keep = if self.last_primary == Some(i) { i } else { j };
                    let l = self.lineage[keep];
                    self.lineage[i] = l;
                    self.lineage[j] = l;
                }
            }
            _ => {}
        }
    }

    /// Node i decided NoSync with j against the ghost record: right if their data is
    /// byte-identical as the handshake decides. That is now, or, for the second end, when
    /// the first decided NoSync on this connection: from then on the first end writes again
    /// and its writes reach i over this connection, behind the handshake (the reason
    /// `dirty_at_connect` exists). Comparing i with j's present disk flagged those writes in
    /// flight as a divergence (seed 14888 of `tandem-sim --nodes 3 --diskful 3`: node 0 and
    /// node 2 were byte-identical when node 0 decided NoSync at 6807 ms and submitted its
    /// queued writes; node 2 decided at 6816 ms before they arrived, and the checker saw
    /// exactly their blocks differ). The first end's image is kept only for that one
    /// connection; i's data must equal it byte for byte.
    fn no_sync_identical(&mut self, i: usize, j: usize) -> bool {
        let Some(conn) = self.conns.get(&pair(i, j)).copied() else {
            return self.data_identical(i, j);
        };
        let first_end_image = match self.no_sync_images.remove(&(j, i)) {
            Some((c, image)) if c == conn => Some(image),
            _ => None,
        };
        if self.data_identical(i, j) {
            if first_end_image.is_none() {
                self.no_sync_images.insert((i, j), (conn, self.device_image(i)));
            }
            return true;
        }
        self.nodes[i].node.is_some()
            && first_end_image.is_some_and(|image| image == self.device_image(i))
    }

    /// Nodes i and j hold the same bytes in their data areas (both up, same size).
    fn data_identical(&self, i: usize, j: usize) -> bool {
        self.nodes[i].node.is_some()
            && self.nodes[j].node.is_some()
            && self.nodes[i].meta.size_blocks == self.nodes[j].meta.size_blocks
            && self.device_image(i) == self.device_image(j)
    }

    /// The operator's manual split-brain recovery: the node that is not the latest primary
    /// discards its changes.
    fn resolve_standalone(&mut self, i: usize, j: usize) {
        let victim = if self.last_primary == Some(i) { j } else { i };
        let survivor = if victim == i { j } else { i };
        // `drbdadm secondary` first: a primary cannot discard its data (two primaries meet
        // here after a promotion apart under dont-care).
        if let Some(n) = self.nodes[victim].node.as_mut()
            && n.role() == Role::Primary
        {
            let _ = n.handle_demote(self.now_ms);
            self.drain(victim, false);
        }
        let delay = self.rng.range(10, 500);
        self.schedule(
            self.now_ms + delay,
            Ev::Reconnect { node: victim, peer: survivor, discard: true },
        );
        self.schedule(
            self.now_ms + delay,
            Ev::Reconnect { node: survivor, peer: victim, discard: false },
        );
    }

    fn check_decision(&mut self, i: usize, j: usize, decision: SyncDecision) {
        use SyncDecision::*;
        let (dirty, discard) = self
            .dirty_at_connect
            .get(&pair(i, j))
            .cloned()
            .unwrap_or_else(|| (self.dirty.clone(), self.discard_requested.clone()));
        let mine = dirty[i][j];
        let theirs = dirty[j][i];
        // With quorum, a primary that lost it marks the writes it could not replicate without
        // having acknowledged them; the peer promoted meanwhile overwrites them (the model
        // checks that no acknowledged write is lost), so either direction may be right.
        let discarding = discard[i][j]
            || discard[j][i]
            || self.quorum_on()
            || self.auto_victim[i][j]
            || self.auto_victim[j][i];
        // With quorum, two nodes never both acknowledge writes apart: a primary without
        // quorum acknowledged nothing since, so its changes never make a split brain (issue
        // 5), unless an operator forced a promotion.
        let quorum_excludes_split = self.quorum_on() && !self.forced_promotion;
        // Under a fencing policy that freezes I/O, a primary that lost its peer acknowledges
        // nothing until the fence-peer handler outdated (or shot) it, and starts no
        // generation before: when the handler never did (exit code 6, or failures and then
        // a crash while frozen), its marks are writes acknowledged before the loss only
        // under protocol A or B (on their way to the peer, lost at any failover) and
        // otherwise by nobody, and the peer promoted meanwhile overwrites them (as with
        // quorum, the model checks that no acknowledged write is lost).
        let unacked = |x: usize, y: usize| self.ground_truth_fence_unsettled(x, y);
        // The ghost record counts every mark of a primary as a change, also those of the
        // writes a lost peer confirmed but had not reported stable (no barrier ack): a
        // two-node primary marks them in its old generation and starts a new one only with
        // its first write apart, so the peer promoted meanwhile is newer and its source
        // (seeds 9204, 288). A target that acknowledged no write apart from its source loses
        // nothing acknowledged apart (the model checks that no acknowledged write is lost),
        // nor does one whose data holds no change the source lacks.
        let loses_nothing = |x: usize, y: usize| self.ground_truth_target_loses_nothing(x, y);
        let ok = match decision {
            SplitBrain => mine && theirs && !quorum_excludes_split,
            Unrelated => false,
            // The ghost record is conservative: a primary's mark counts as a change even when
            // the write never reached its disk (held without quorum), and csums-alg lets a
            // resync skip the blocks that turned out equal. Byte-identical replicas hold
            // nothing apart, whatever the record says (mesh seed 939).
            NoSync => (!mine && !theirs) || self.no_sync_identical(i, j),
            BitmapSource | FullSource => {
                !theirs || discarding || unacked(j, i) || loses_nothing(j, i)
            }
            BitmapTarget | FullTarget => {
                !mine || discarding || unacked(i, j) || loses_nothing(i, j)
            }
        };
        if !ok {
            self.violation(format!(
                "node {i} decided {decision:?} with peer {j}, but ghost says node {i} diverged={mine}, node {j} diverged={theirs}"
            ));
        }
        if decision == SplitBrain && ok {
            self.ground_truth_split_brain(i, j);
        }
        if decision == NoSync {
            self.in_sync(i, j);
            self.ground_truth_same_generation(i, j);
        }
    }

    /// An after-sb policy resolved a split brain between i and j. Checks that nothing is
    /// discarded unless a policy other than `disconnect` applies, that the two ends chose
    /// mirror images, and licenses the victim's discard for the decision checker.
    fn split_brain_resolved(&mut self, i: usize, j: usize, policy: &str, discarded_local: bool) {
        self.log(|| format!("node {i} after-sb {policy}: discarded_local={discarded_local}"));
        let p = self.swarm.after_sb;
        if p == AfterSbPolicies::default() || policy == "disconnect" {
            self.violation(format!(
                "node {i} resolved a split brain with {j} by {policy:?} although the policies are {p:?}"
            ));
        }
        let (victim, survivor) = if discarded_local { (i, j) } else { (j, i) };
        self.auto_victim[victim][survivor] = true;
        self.auto_fork_pending[victim][survivor] = true;
        match self.auto_verdicts.remove(&pair(i, j)) {
            Some((other, theirs)) if other != i => {
                if theirs == discarded_local {
                    self.violation(format!(
                        "nodes {i} and {other} disagree on the split-brain victim (both discarded_local={theirs})"
                    ));
                }
            }
            // First end (or a handshake whose other end never finished).
            _ => {
                self.auto_verdicts.insert(pair(i, j), (i, discarded_local));
                self.report.split_brains_auto_resolved += 1;
            }
        }
    }

    /// The victim of an after-sb policy becomes SyncTarget: if one lineage holds both sides'
    /// writes, the victim's writes since the split are discarded, so the survivor's data as
    /// it is now becomes the truth (writes still in flight on it keep their place); the victim
    /// then adopts it, and from then on every acknowledged write is required again.
    fn survivor_lineage(&mut self, victim: usize, survivor: usize) {
        if !std::mem::take(&mut self.auto_fork_pending[victim][survivor])
            || self.lineage[victim] != self.lineage[survivor]
        {
            return;
        }
        let in_flight: Vec<u64> = self
            .pending
            .values()
            .filter_map(|(node, _, p)| match p {
                Pending::Write { id, .. } if *node == survivor => Some(*id),
                _ => None,
            })
            .collect();
        let image = self.device_image(survivor);
        let stable = self.nodes[survivor].disk.read_stable();
        let mut fork = self.models[self.lineage[survivor]].clone();
        fork.rebase_keeping(&image, &stable, &in_flight);
        self.stale[survivor] = None;
        self.models.push(fork);
        self.lineage[survivor] = self.models.len() - 1;
        self.report.lineage_forks += 1;
        self.log(|| format!("node {survivor} survives on lineage {}", self.lineage[survivor]));
    }

    /// The simulated fence-peer handler of node i for `peer` returns. It reaches the peer
    /// over an out-of-band channel (and asks the cluster manager, which knows whom it
    /// promoted), as crm-fence-peer.sh or drbd-peer-outdater do. Each result is one of the
    /// handler exit codes of the DRBD user guide ("The peer fencing interface"):
    /// - 3, peer already Inconsistent: `drbdadm outdate` there left it Inconsistent;
    /// - 4, peer outdated: `drbdadm outdate` there succeeded (it is a secondary that noticed
    ///   the loss); a later promotion of it must be refused;
    /// - 5, peer unreachable: the peer node is down; the cluster manager's constraint marks
    ///   its disk Outdated so it is not promoted when it returns;
    /// - 6, peer is primary: the peer is primary, or was promoted while apart from us (its
    ///   data is the newer); under resource-and-stonith the cluster then shoots this old
    ///   primary instead of returning; under resource-only this node outdates itself and the
    ///   cluster manager demotes it. A promoted peer that is down since still gets this
    ///   answer: the cluster manager remembers whom it promoted, and its data stays the newer
    ///   until the two resync, or until an operator forces *this* node primary (that
    ///   outdates every other node and declares this data the truth, so the knowledge is
    ///   dropped in `promoted`);
    /// - 7, peer stonithed (resource-and-stonith only): the peer is alive but cannot be
    ///   outdated (it has not noticed the loss yet); the handler shoots it and marks its disk
    ///   Outdated. Under resource-only the handler waits and tries again instead.
    fn fence_done(&mut self, i: usize, incarnation: u64, peer: usize) {
        let still_pending = self.nodes[i].incarnation == incarnation
            && self.nodes[i].node.as_ref().is_some_and(|n| n.fence_pending(nid(peer)));
        if !still_pending || self.more_fence_fails(i, incarnation, peer) {
            return;
        }
        let stonith = self.swarm.fencing == Fencing::ResourceAndStonith;
        let promoted = self.promoted_apart[peer][i];
        let now_ms = self.now_ms;
        let answer = self.nodes[peer].node.as_mut().map(|n| {
            if n.role() == Role::Primary || promoted {
                Ok(FenceOutcome::PeerIsPrimary)
            } else {
                n.handle_outdate(now_ms).map(|()| {
                    if n.disk_state() == DiskState::Inconsistent {
                        FenceOutcome::PeerInconsistent
                    } else {
                        FenceOutcome::PeerOutdated
                    }
                })
            }
        });
        let outcome = match answer {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => {
                if stonith {
                    let power_loss = self.rng.below(2) == 0;
                    self.crash(peer, power_loss);
                    self.schedule_restart(peer);
                    self.outdate_down_node(peer);
                    FenceOutcome::PeerStonithed
                } else {
                    self.report.fence_retries += 1;
                    let delay = self.rng.range(10, self.swarm.fence_delay_ms_max.max(10));
                    self.schedule(
                        self.now_ms + delay,
                        Ev::FenceDone { node: i, incarnation, peer },
                    );
                    return;
                }
            }
            None if promoted => FenceOutcome::PeerIsPrimary,
            None => {
                self.outdate_down_node(peer);
                FenceOutcome::PeerUnreachable
            }
        };
        self.log(|| format!("node {i} fence-peer {peer}: {outcome:?}"));
        let code = match outcome {
            FenceOutcome::PeerInconsistent => 3,
            FenceOutcome::PeerOutdated => 4,
            FenceOutcome::PeerUnreachable => 5,
            FenceOutcome::PeerIsPrimary => 6,
            FenceOutcome::PeerStonithed => 7,
            FenceOutcome::Failed => unreachable!("the simulated handler always answers"),
        };
        self.report.fence_exit_codes[code - 3] += 1;
        if code != 6 {
            self.fenced[peer] = true;
        }
        if self.nodes[peer].node.is_some() {
            self.drain(peer, false);
        }
        if outcome != FenceOutcome::PeerIsPrimary {
            self.ground_truth_fence_settled(i, peer);
        }
        if outcome == FenceOutcome::PeerIsPrimary && stonith {
            // The cluster sides with the node it promoted and shoots the one that lost.
            self.report.old_primaries_shot += 1;
            let power_loss = self.rng.below(2) == 0;
            self.crash(i, power_loss);
            self.schedule_restart(i);
            return;
        }
        if let Some(n) = self.nodes[i].node.as_mut() {
            n.handle_fence_outcome(self.now_ms, nid(peer), outcome);
            self.drain(i, false);
        }
        if outcome == FenceOutcome::PeerIsPrimary
            && let Some(n) = self.nodes[i].node.as_mut()
        {
            // The cluster manager demotes the primary that lost the race.
            let _ = n.handle_demote(self.now_ms);
            self.drain(i, false);
        }
    }

    /// What a fence handler (or an operator) does to a node that is down: mark its disk
    /// Outdated so that it cannot be promoted with data it may lack.
    fn outdate_down_node(&mut self, j: usize) {
        if self.nodes[j].node.is_none() && self.nodes[j].meta.flags.disk == PersistedDisk::UpToDate
        {
            let mut flags = self.nodes[j].meta.flags.clone();
            flags.disk = PersistedDisk::Outdated;
            self.nodes[j].meta.apply(&MetaUpdate::Flags(flags));
        }
    }

    fn schedule_restart(&mut self, i: usize) {
        let delay = self.rng.range(10, 3_000);
        self.nodes[i].restart_scheduled = true;
        self.schedule(self.now_ms + delay, Ev::Restart { node: i });
    }

    /// The cluster manager promotes `s` (not forced) while `old`, a live primary, is cut off
    /// from it: the classic failure fencing exists for.
    fn split_promote(&mut self, s: usize, old: usize) {
        if self.nodes[s].node.as_ref().is_none_or(|n| n.role() == Role::Primary) {
            return;
        }
        let result = self.nodes[s].node.as_mut().expect("up").handle_promote(self.now_ms, false);
        self.log(|| format!("node {s} split promote (old primary {old}): {result:?}"));
        self.promote_result(s, Promoting::Split { old }, result);
        self.drain(s, false);
    }

    fn split_promote_result(&mut self, s: usize, old: usize, result: Result<(), StateError>) {
        match result {
            Ok(()) => {
                self.report.split_promotions_done += 1;
                if self.fenced[s] {
                    self.violation(format!(
                        "node {s} was promoted although the fence handler had outdated it"
                    ));
                }
                let old_is_primary =
                    self.nodes[old].node.as_ref().is_some_and(|n| n.role() == Role::Primary);
                if old_is_primary {
                    self.report.dual_primaries += 1;
                }
                if self.swarm.protocol != ReplicationProtocol::C {
                    // Under A and B the old primary acknowledged writes that may not have
                    // reached us; DRBD documents that such a failover can lose them.
                    self.volatile_loss();
                }
                self.promoted(s, false);
            }
            Err(StateError::NoUpToDateData(DiskState::Outdated)) => {
                self.report.split_promotions_refused += 1;
            }
            Err(
                StateError::NoQuorum(_)
                | StateError::PeerIsPrimary(_)
                | StateError::PeerRefused(_)
                | StateError::PeerPromoting(_),
            ) if self.quorum_on() => {
                self.report.promotions_refused_no_quorum += 1;
            }
            Err(_) => {}
        }
    }

    fn start_healing(&mut self) {
        self.healing = true;
        self.resize_heal();
        self.partitioned.clear();
        for i in 0..self.swarm.nodes {
            if self.nodes[i].node.is_none() {
                self.start_node(i);
            }
        }
        // Reconnect every pair an operator left StandAlone.
        for a in 0..self.swarm.nodes {
            for b in 0..self.swarm.nodes {
                if a != b
                    && self.nodes[a].node.as_ref().is_some_and(|n| {
                        n.connection_state(nid(b))
                            == Some(crate::protocol::ConnectionState::StandAlone)
                    })
                {
                    let delay = self.rng.range(1, 50);
                    self.schedule(
                        self.now_ms + delay,
                        Ev::Reconnect { node: a, peer: b, discard: false },
                    );
                }
            }
        }
    }

    /// Cuts `p` off from every other node for a while (a partition that isolates it).
    fn isolate(&mut self, p: usize) {
        if (0..self.swarm.nodes)
            .all(|j| j == p || self.partitioned.get(&pair(p, j)).copied().unwrap_or(false))
        {
            return;
        }
        self.report.primary_isolations += 1;
        self.log(|| format!("node {p} isolated"));
        for j in 0..self.swarm.nodes {
            if j != p {
                self.partitioned.insert(pair(p, j), true);
            }
        }
        let duration = self.rng.range(10, self.swarm.isolate_ms_max.max(10));
        self.schedule(self.now_ms + duration, Ev::HealIsolation { node: p });
    }

    /// Ground truth for the isolation checker: since when each node reaches no live node.
    fn track_isolation(&mut self) {
        for i in 0..self.swarm.nodes {
            let reaches_someone = (0..self.swarm.nodes).any(|j| {
                j != i
                    && self.nodes[j].node.is_some()
                    && !self.partitioned.get(&pair(i, j)).copied().unwrap_or(false)
            });
            if reaches_someone || self.nodes[i].node.is_none() {
                self.isolated_since[i] = None;
            } else if self.isolated_since[i].is_none() {
                self.isolated_since[i] = Some(self.now_ms);
            }
        }
    }

    /// Quorum checkers on every completion: nothing completes successfully on a node whose
    /// last quorum event said it lost quorum, nor on a primary isolated for longer than it
    /// takes to notice (two ping timeouts).
    fn check_quorum_completion(
        &mut self,
        i: usize,
        result: &Result<Option<Vec<u8>>, crate::protocol::RequestError>,
    ) {
        if !self.quorum_on() {
            return;
        }
        match result {
            Err(crate::protocol::RequestError::NoQuorum) => {
                self.report.requests_failed_no_quorum += 1;
            }
            Err(_) => {}
            Ok(_) => {
                if std::mem::take(&mut self.check_on_first_completion[i]) {
                    let image = self.device_image(i);
                    if let Err(problem) = self.models[self.lineage[i]].check_image(&image) {
                        self.violation(format!(
                            "node {i}, promoted, served with UpToDate data missing an \
                             acknowledged write: {problem}"
                        ));
                    }
                }
                if !self.quorum_seen[i] {
                    self.violation(format!(
                        "node {i} completed a request successfully after it lost quorum"
                    ));
                }
                let notice_ms = 2 * crate::constants::PING_TIMEOUT_MS;
                // DRBD's last man standing: with no other diskful node able to become
                // primary (UpToDate with quorum), the isolated node rightly keeps quorum.
                let rival = (0..self.swarm.nodes).any(|j| {
                    j != i
                        && !self.is_diskless(j)
                        && self.nodes[j].node.as_ref().is_some_and(|n| {
                            n.disk_state() == DiskState::UpToDate && n.has_quorum()
                        })
                });
                if let Some(since) = self.isolated_since[i]
                    && rival
                    && since + notice_ms < self.now_ms
                {
                    self.violation(format!(
                        "node {i}, isolated since t={since}ms, completed a request successfully"
                    ));
                }
            }
        }
    }

    /// No two primaries acknowledge writes interleaved: once another node acknowledged a
    /// write after this node's promotion, this node must acknowledge nothing more.
    fn check_single_writer(&mut self, i: usize) {
        if self.quorum_on() {
            let promoted = self.promoted_at[i].unwrap_or(0);
            for j in 0..self.swarm.nodes {
                if j != i
                    && let Some(t) = self.last_ack_at[j]
                    && t > promoted
                {
                    self.violation(format!(
                        "two writers: node {j} acknowledged a write at t={t}ms, after node {i} \
                         was promoted (t={promoted}ms), and node {i} acknowledges one now"
                    ));
                }
            }
        }
        self.last_ack_at[i] = Some(self.now_ms);
    }

    fn converged(&mut self) -> bool {
        // Detached nodes are re-attached; stuck Outdated pairs get a forced primary.
        for i in 0..self.swarm.nodes {
            let Some(n) = self.nodes[i].node.as_ref() else { return false };
            if n.disk_state() == DiskState::Diskless && !self.is_diskless(i) {
                if n.role() == Role::Primary {
                    let _ = self.nodes[i].node.as_mut().expect("up").handle_demote(self.now_ms);
                    self.drain(i, false);
                } else {
                    self.crash(i, false);
                    self.start_node(i);
                }
                return false;
            }
        }
        // The diskless tiebreaker has no data: Diskless is its converged state.
        let good_disk = |i: usize| {
            if self.is_diskless(i) { DiskState::Diskless } else { DiskState::UpToDate }
        };
        let all_established = (0..self.swarm.nodes).all(|i| {
            let n = self.nodes[i].node.as_ref().expect("checked");
            n.disk_state() == good_disk(i)
                && n.requests_in_flight() == 0
                && n.is_quiescent()
                && n.peer_ids().iter().all(|p| {
                    n.replication_state(*p) == Some(ReplicationState::Established)
                        && n.peer_disk_state(*p) == Some(good_disk(p.index()))
                })
        });
        let all_established =
            all_established && self.mesh_roles_settled() && self.resize_sizes_settled();
        if !all_established {
            let stuck_outdated = (0..self.swarm.nodes).filter(|i| !self.is_diskless(*i)).all(|i| {
                let n = self.nodes[i].node.as_ref().expect("checked");
                n.disk_state() == DiskState::Outdated
                    && n.peer_ids()
                        .iter()
                        .all(|p| n.replication_state(*p) == Some(ReplicationState::Established))
            });
            if stuck_outdated && self.primary().is_none() {
                self.try_promote(true);
            }
            return false;
        }
        // Nothing on the wire either: a frame still in flight may change what the checks
        // compare (a ResizeCommit sent as a verify ended reached its peer after the size
        // check had run, seed 100263).
        !self.payloads.values().any(|ev| matches!(ev, Ev::Deliver { .. }))
    }

    fn final_checks(&mut self) {
        self.resize_final_checks();
        if !self.violations.is_empty() {
            return;
        }
        let size = self.nodes[0].meta.size_blocks;
        let first = self.nodes[0].disk.read(0, size);
        for i in 1..self.swarm.nodes {
            if self.is_diskless(i) {
                continue;
            }
            let other = self.nodes[i].disk.read(0, size);
            if other != first {
                let block = first
                    .chunks(BLOCK)
                    .zip(other.chunks(BLOCK))
                    .position(|(a, b)| a != b)
                    .expect("images differ somewhere");
                self.violation(format!(
                    "UpToDate replicas 0 and {i} differ after healing (first at block {block})"
                ));
                return;
            }
        }
        if let Err(problem) = self.models[self.lineage[0]].check_image(&first) {
            self.violation(format!("after healing: {problem}"));
        }
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            match &n.node {
                None => out.push_str(&format!("[node {i} down] ")),
                Some(node) => {
                    out.push_str(&format!(
                        "[node {i} {} {} {}",
                        node.role(),
                        node.disk_state(),
                        node.debug_summary()
                    ));
                    for p in node.peer_ids() {
                        out.push_str(&format!(
                            " peer {p}: {:?}/{:?}/{:?} oos={}",
                            node.connection_state(p),
                            node.replication_state(p),
                            node.peer_disk_state(p),
                            node.out_of_sync_blocks(p)
                        ));
                    }
                    out.push_str("] ");
                }
            }
        }
        out
    }
}

/// Runs one seed, turning a panic anywhere into a violation.
pub fn run_seed(seed: u64, nodes: usize) -> Report {
    run_world(seed, || World::new(seed, nodes).run())
}

/// Runs one world, reporting a panic as the seed's violation.
fn run_world(seed: u64, run: impl FnOnce() -> Report + std::panic::UnwindSafe) -> Report {
    let outcome = std::panic::catch_unwind(run);
    match outcome {
        Ok(report) => report,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "non-string panic".into());
            Report {
                seed,
                violations: vec![format!("assertion fired: {text}")],
                ..Report::default()
            }
        }
    }
}

/// The one-line reproducer for a seed.
pub fn reproduce_command(seed: u64, nodes: usize) -> String {
    let nodes = if nodes == 2 { String::new() } else { format!(" --nodes {nodes}") };
    format!("cargo run -p drbd-engine --bin tandem-sim -- --seed {seed} --count 1{nodes}")
}

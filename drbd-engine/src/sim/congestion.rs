//! Congestion (issue 5: `on-congestion pull-ahead`), drawn per seed from a stream of its own
//! (so a seed without it runs exactly as before):
//! - slow links: for a while the links out of one node carry only so many bytes per
//!   millisecond, so frames queue behind each other (each one is delivered when the link has
//!   carried the ones before it, plus the usual jitter), and the queue drains after the episode;
//! - under protocol A, the resource's congestion policy: `pull-ahead` (most seeds),
//!   `disconnect` or `block`, with a small `congestion-fill` and sometimes
//!   `congestion-extents`.
//!
//! Two nodes and two diskful nodes with a tiebreaker only; the three-diskful mesh keeps its
//! seeds. The main checkers judge it (every acknowledged write on the next node promoted,
//! replicas byte-identical after healing, split-brain decisions, liveness), and since a Behind
//! node is Outdated it can be promoted only by force, which the model accounts for.

use super::{Event, World};
use crate::protocol::ReplicationState;
use crate::protocol::node::{CongestionConfig, OnCongestion, ReplicationProtocol};
use crate::sim::rng::Rng;

/// What a seed does with congestion.
#[derive(Debug, Clone, Default)]
pub struct CongestionSwarm {
    /// The resource's policy (default `block` with no threshold: off).
    pub config: CongestionConfig,
    /// Chance per tick that the links out of a random node turn slow, and for how long.
    pub slow_ppm_per_tick: u64,
    pub slow_ms_max: u64,
    /// A slow link's rate.
    pub slow_bytes_per_ms: u64,
}

impl CongestionSwarm {
    pub fn from_seed(seed: u64, protocol: ReplicationProtocol) -> Self {
        let mut rng = Rng::new(seed ^ 0x636f_6e67_6573_7469);
        // Two seeds in three keep the base mix.
        if rng.below(3) != 0 {
            return Self::default();
        }
        let mut swarm = Self {
            config: CongestionConfig::default(),
            slow_ppm_per_tick: [200, 1_000, 5_000][rng.index(3)],
            slow_ms_max: [200, 1_000, 3_000][rng.index(3)],
            slow_bytes_per_ms: [64, 256, 1_024][rng.index(3)],
        };
        if protocol == ReplicationProtocol::A {
            swarm.config = CongestionConfig {
                on_congestion: match rng.below(6) {
                    0 => OnCongestion::Block,
                    1 => OnCongestion::Disconnect,
                    _ => OnCongestion::PullAhead,
                },
                fill_bytes: [4_096, 16_384, 65_536][rng.index(3)],
                extents: (rng.below(3) == 0).then_some(2),
            };
        }
        swarm
    }
}

/// Counters of a run (summed over seeds by `Report::add`).
#[derive(Debug, Default, Clone)]
pub struct CongestionReport {
    pub slow_episodes: u64,
    /// Primaries that went Ahead of a peer, and resyncs that followed on the same connection.
    pub aheads: u64,
    pub ahead_resyncs: u64,
}

impl CongestionReport {
    pub fn add(&mut self, other: &CongestionReport) {
        self.slow_episodes += other.slow_episodes;
        self.aheads += other.aheads;
        self.ahead_resyncs += other.ahead_resyncs;
    }

    pub fn summary(&self) -> String {
        format!(
            "{} slow-link episodes, {} pull-aheads ({} resynced from Ahead)",
            self.slow_episodes, self.aheads, self.ahead_resyncs
        )
    }
}

/// Longest a frame waits behind earlier ones on a slow link.
const LINK_QUEUE_MS_MAX: u64 = crate::constants::PING_TIMEOUT_MS / 2;
const _: () = assert!(LINK_QUEUE_MS_MAX + 100 < crate::constants::PING_TIMEOUT_MS);

#[derive(Debug)]
pub(super) struct CongestionState {
    swarm: Option<CongestionSwarm>,
    seed: u64,
    rng: Rng,
    /// Per node: its outgoing links are slow until then.
    slow_until_ms: Vec<u64>,
    /// Per ordered pair (from, to): the link is busy carrying earlier frames until then.
    busy_until_ms: Vec<Vec<u64>>,
    /// Per ordered pair (node, peer): node was Ahead of peer (a SyncSource next is from Ahead).
    ahead: Vec<Vec<bool>>,
}

impl CongestionState {
    pub(super) fn new(seed: u64, nodes: usize) -> Self {
        Self {
            swarm: None,
            seed,
            rng: Rng::new(seed ^ 0x736c_6f77_6c69_6e6b),
            slow_until_ms: vec![0; nodes],
            busy_until_ms: vec![vec![0; nodes]; nodes],
            ahead: vec![vec![false; nodes]; nodes],
        }
    }
}

impl World {
    /// This run's congestion draw: none for the three-diskful mesh (its seeds keep their
    /// histories).
    fn congestion_swarm(&mut self) -> &CongestionSwarm {
        if self.congestion.swarm.is_none() {
            let mesh = self.swarm.nodes >= 3 && !self.swarm.tiebreaker;
            let swarm = if mesh {
                CongestionSwarm::default()
            } else {
                CongestionSwarm::from_seed(self.congestion.seed, self.swarm.protocol)
            };
            self.congestion.swarm = Some(swarm);
        }
        self.congestion.swarm.as_ref().expect("drawn")
    }

    /// The engine's congestion settings for this run.
    pub(super) fn congestion_config(&mut self) -> CongestionConfig {
        self.congestion_swarm().config
    }

    /// Each tick of the safety phase: maybe start a slow-link episode.
    pub(super) fn congestion_tick(&mut self) {
        let (ppm, ms_max) = {
            let swarm = self.congestion_swarm();
            (swarm.slow_ppm_per_tick, swarm.slow_ms_max)
        };
        if ppm == 0 || !self.congestion.rng.chance(ppm) {
            return;
        }
        let node = self.congestion.rng.index(self.swarm.nodes);
        let until = self.now_ms + self.congestion.rng.range(50, ms_max.max(51));
        if self.congestion.slow_until_ms[node] < until {
            self.congestion.slow_until_ms[node] = until;
            self.report.congestion.slow_episodes += 1;
            self.log(|| format!("node {node} links slow until {until}"));
        }
    }

    /// Extra delivery delay of a frame of `bytes` bytes from `from` to `to`: the time the link
    /// still needs for earlier frames, plus this one's own time while the link is slow. Frames
    /// do not overtake a queue that is draining (FIFO, as TCP). Outside episodes and while
    /// healing, only a queue left from an episode delays.
    pub(super) fn congestion_delay_ms(&mut self, from: usize, to: usize, bytes: usize) -> u64 {
        let rate = match self.congestion.swarm.as_ref() {
            Some(swarm) if swarm.slow_ppm_per_tick > 0 => swarm.slow_bytes_per_ms,
            _ => return 0,
        };
        let now = self.now_ms;
        let busy = &mut self.congestion.busy_until_ms[from][to];
        let mut start = (*busy).max(now);
        if now < self.congestion.slow_until_ms[from] && !self.healing {
            start += u64::try_from(bytes).unwrap_or(u64::MAX) / rate.max(1);
        }
        // A real sender blocks on a full socket buffer: the queue is bounded, and well under
        // the ping timeout (a congested link is slow, not dead). The bound moves with `now`,
        // so the queue stays in order.
        start = start.min(now + LINK_QUEUE_MS_MAX);
        *busy = start;
        start - now
    }

    /// A node restarted: its old connections' queues are gone.
    pub(super) fn congestion_connection_reset(&mut self, a: usize, b: usize) {
        self.congestion.busy_until_ms[a][b] = 0;
        self.congestion.busy_until_ms[b][a] = 0;
    }

    pub(super) fn congestion_event(&mut self, i: usize, event: &Event) {
        if let Event::ReplicationStateChanged { peer, state } = event {
            let j = peer.index();
            match state {
                ReplicationState::Ahead => {
                    self.congestion.ahead[i][j] = true;
                    self.report.congestion.aheads += 1;
                }
                ReplicationState::SyncSource if self.congestion.ahead[i][j] => {
                    self.congestion.ahead[i][j] = false;
                    self.report.congestion.ahead_resyncs += 1;
                }
                _ => self.congestion.ahead[i][j] = false,
            }
        }
    }
}

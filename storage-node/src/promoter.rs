//! The promoter: per resource, when this node makes itself primary and when it gives the role
//! up. drbd-reactor's promoter is the model: a node whose data is UpToDate, that has quorum and
//! sees no primary anywhere, waits a delay that is shorter the better a candidate it is, looks
//! again, and promotes; a primary that loses quorum demotes so its services stop.
//!
//! Pure: the daemon feeds an [`Observation`] (sampled from the engine, with `now_ms`) on every
//! state change and at [`Promoter::deadline_ms`], and carries out the [`Action`] it gets back.
//! The staggered delays make simultaneous attempts rare; they do not make them safe. Safety is
//! the engine's: a promotion needs quorum and is refused while any peer is primary, so when two
//! nodes try at once at most one becomes primary and the other's attempt fails, which the
//! promoter answers with a back-off.

use drbd_engine::protocol::Role;

/// How much later each position down the preferred-nodes list tries (a node not on the list
/// comes after every listed one).
pub const PREFERRED_STEP_MS: u64 = 150;

/// The best promotion score a node can have (see `ResourceView::promotion_score`: 10100 for
/// UpToDate data plus one per connected UpToDate peer, at most 99).
pub const PROMOTION_SCORE_MAX: u32 = 10_199;

/// The most a weaker score adds to the delay, so a lone survivor still promotes quickly.
pub const SCORE_DEFICIT_MAX_MS: u64 = 1_000;

/// How long to wait after a failed attempt before watching again.
pub const RETRY_BACKOFF_MS: u64 = 500;

/// Failed attempts in a row after which back-off stops growing.
pub const BACKOFF_DOUBLINGS_MAX: u32 = 4;

/// How soon to try again after a refusal the engine lifts by itself: a peer still reports the
/// lost primary (its grace period), or quorum is not confirmed yet. Short, because the wait
/// ends at a moment the promoter cannot see, and every millisecond after it is failover time.
pub const DEFERRED_RETRY_MS: u64 = 20;

const _: () = assert!(DEFERRED_RETRY_MS < RETRY_BACKOFF_MS);

const _: () = assert!(PREFERRED_STEP_MS * 2 < SCORE_DEFICIT_MAX_MS);

/// What the promoter needs to know about the resource, sampled at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub now_ms: u64,
    pub role: Role,
    /// `primary` without --force would be accepted: UpToDate data and no peer primary.
    pub may_promote: bool,
    /// DRBD's promotion_score (0 when promotion is impossible).
    pub promotion_score: u32,
    /// The resource has quorum (always true where quorum is off).
    pub quorum: bool,
    /// A connected peer could promote too (it has UpToDate data and is not primary). Without
    /// one there is nobody to give way to, so the preference delay is skipped: after a
    /// primary's death the lone survivor promotes at once.
    pub rivals: bool,
}

/// What the daemon should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Become primary, then start the services (the iSCSI export, the service IP).
    Promote,
    /// Stop the services, then become secondary.
    Demote { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing to do until the resource becomes promotable.
    Watching,
    /// Promotable since a while; promote at `due_ms` if it still is.
    Waiting { due_ms: u64 },
    /// A promotion was handed to the daemon; its result is pending.
    Attempting,
    /// An attempt failed; watch again from `until_ms`.
    BackingOff { until_ms: u64 },
    /// An attempt was deferred by the engine; at `until_ms` try again at once if still
    /// promotable (this node already waited its turn).
    Deferred { until_ms: u64 },
}

/// One resource's promoter on this node.
#[derive(Debug, Clone)]
pub struct Promoter {
    /// Where this node stands in the resource's preferred-nodes list (0 = first).
    position: u64,
    phase: Phase,
    failures_in_row: u32,
}

impl Promoter {
    /// A promoter for `node`, given the resource's preferred nodes in order (may be empty).
    pub fn new(node: &str, preferred_nodes: &[String]) -> Promoter {
        let position =
            preferred_nodes.iter().position(|n| n == node).unwrap_or(preferred_nodes.len());
        Promoter {
            position: u64::try_from(position).unwrap_or(u64::MAX / PREFERRED_STEP_MS),
            phase: Phase::Watching,
            failures_in_row: 0,
        }
    }

    /// How long a promotable node waits before trying, given its score.
    pub fn delay_ms(&self, promotion_score: u32) -> u64 {
        let deficit = u64::from(PROMOTION_SCORE_MAX.saturating_sub(promotion_score));
        self.position.saturating_mul(PREFERRED_STEP_MS) + deficit.min(SCORE_DEFICIT_MAX_MS)
    }

    /// When the daemon must observe again even if nothing changes.
    pub fn deadline_ms(&self) -> Option<u64> {
        match self.phase {
            Phase::Waiting { due_ms } => Some(due_ms),
            Phase::BackingOff { until_ms } | Phase::Deferred { until_ms } => Some(until_ms),
            Phase::Watching | Phase::Attempting => None,
        }
    }

    /// Takes in the resource's state; returns what to do, if anything.
    pub fn observe(&mut self, o: &Observation) -> Option<Action> {
        if o.role == Role::Primary {
            self.phase = Phase::Watching;
            self.failures_in_row = 0;
            if !o.quorum {
                return Some(Action::Demote { reason: "quorum lost".into() });
            }
            return None;
        }
        let promotable = o.may_promote && o.quorum && o.promotion_score > 0;
        match self.phase {
            Phase::Attempting => None,
            Phase::BackingOff { until_ms } | Phase::Deferred { until_ms }
                if o.now_ms < until_ms =>
            {
                None
            }
            Phase::Deferred { .. } if promotable => {
                self.phase = Phase::Attempting;
                Some(Action::Promote)
            }
            Phase::Deferred { .. } => {
                self.phase = Phase::Watching;
                None
            }
            Phase::BackingOff { .. } | Phase::Watching => {
                self.phase = if promotable {
                    let delay_ms = if o.rivals { self.delay_ms(o.promotion_score) } else { 0 };
                    Phase::Waiting { due_ms: o.now_ms + delay_ms }
                } else {
                    Phase::Watching
                };
                self.fire_if_due(o.now_ms)
            }
            Phase::Waiting { .. } if !promotable => {
                self.phase = Phase::Watching;
                None
            }
            Phase::Waiting { .. } => self.fire_if_due(o.now_ms),
        }
    }

    fn fire_if_due(&mut self, now_ms: u64) -> Option<Action> {
        match self.phase {
            Phase::Waiting { due_ms } if now_ms >= due_ms => {
                self.phase = Phase::Attempting;
                Some(Action::Promote)
            }
            _ => None,
        }
    }

    /// The last [`Action::Promote`] was refused for a reason that passes by itself (see
    /// [`DEFERRED_RETRY_MS`]): try again soon, without counting a failure.
    pub fn promotion_deferred(&mut self, now_ms: u64) {
        assert!(self.phase == Phase::Attempting, "a result without an attempt");
        self.phase = Phase::Deferred { until_ms: now_ms + DEFERRED_RETRY_MS };
    }

    /// The outcome of the last [`Action::Promote`].
    pub fn promotion_finished(&mut self, now_ms: u64, succeeded: bool) {
        assert!(self.phase == Phase::Attempting, "a result without an attempt");
        if succeeded {
            self.failures_in_row = 0;
            self.phase = Phase::Watching;
        } else {
            let doublings = self.failures_in_row.min(BACKOFF_DOUBLINGS_MAX);
            self.failures_in_row = self.failures_in_row.saturating_add(1);
            self.phase = Phase::BackingOff { until_ms: now_ms + (RETRY_BACKOFF_MS << doublings) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(now_ms: u64, role: Role, may_promote: bool, score: u32, quorum: bool) -> Observation {
        Observation { now_ms, role, may_promote, promotion_score: score, quorum, rivals: true }
    }

    #[test]
    fn a_lone_candidate_does_not_wait_for_its_turn() {
        let mut p = Promoter::new("beta", &["alpha".to_owned(), "beta".to_owned()]);
        let alone = Observation { rivals: false, ..obs(5, SEC, true, 10_100, true) };
        assert_eq!(p.observe(&alone), Some(Action::Promote));
        // With a rival in view it waits its turn.
        let mut p = Promoter::new("beta", &["alpha".to_owned(), "beta".to_owned()]);
        assert_eq!(p.observe(&obs(5, SEC, true, 10_100, true)), None);
        assert_eq!(p.deadline_ms(), Some(5 + p.delay_ms(10_100)));
    }

    const SEC: Role = Role::Secondary;
    const PRI: Role = Role::Primary;

    #[test]
    fn delays_order_candidates_by_preference_then_score() {
        let preferred = ["alpha".to_owned(), "beta".to_owned()];
        let alpha = Promoter::new("alpha", &preferred);
        let beta = Promoter::new("beta", &preferred);
        let gamma = Promoter::new("gamma", &preferred);
        // The same score: list order decides.
        assert!(alpha.delay_ms(10_101) < beta.delay_ms(10_101));
        assert!(beta.delay_ms(10_101) < gamma.delay_ms(10_101));
        // A connected UpToDate peer more: earlier.
        assert!(alpha.delay_ms(10_102) < alpha.delay_ms(10_101));
        // Consistent (not UpToDate) data waits longer than any UpToDate node with the same rank.
        assert!(alpha.delay_ms(10_000) > alpha.delay_ms(10_100));
        // A lone best node waits under a second.
        assert!(alpha.delay_ms(10_100) < 1_000);
    }

    /// Each row: observation fed, then the action expected.
    #[test]
    fn a_secondary_promotes_after_its_delay_if_still_promotable() {
        let mut p = Promoter::new("alpha", &[]);
        let delay = p.delay_ms(10_100);
        let rows: &[(Observation, Option<Action>)] = &[
            (obs(0, SEC, false, 0, true), None),
            (obs(10, SEC, true, 10_100, true), None),
            (obs(10 + delay - 1, SEC, true, 10_100, true), None),
            (obs(10 + delay, SEC, true, 10_100, true), Some(Action::Promote)),
            // While the attempt runs, nothing more.
            (obs(10 + delay + 5, SEC, true, 10_100, true), None),
        ];
        for (i, (o, want)) in rows.iter().enumerate() {
            assert_eq!(&p.observe(o), want, "row {i}: {o:?}");
        }
        assert_eq!(p.deadline_ms(), None);
        p.promotion_finished(10 + delay + 20, true);
        assert_eq!(p.observe(&obs(10 + delay + 30, PRI, false, 0, true)), None);
    }

    #[test]
    fn becoming_unpromotable_cancels_the_wait() {
        let mut p = Promoter::new("alpha", &[]);
        assert_eq!(p.observe(&obs(0, SEC, true, 10_100, true)), None);
        let due = p.deadline_ms().expect("waiting");
        // Another node became primary meanwhile.
        assert_eq!(p.observe(&obs(due - 1, SEC, false, 0, true)), None);
        assert_eq!(p.observe(&obs(due, SEC, false, 0, true)), None);
        assert_eq!(p.deadline_ms(), None);
        // Quorum lost meanwhile: the same.
        assert_eq!(p.observe(&obs(due + 1, SEC, true, 10_100, true)), None);
        let due = p.deadline_ms().expect("waiting again");
        assert_eq!(p.observe(&obs(due, SEC, true, 10_100, false)), None);
    }

    #[test]
    fn no_quorum_never_promotes_and_a_primary_without_quorum_demotes() {
        let mut p = Promoter::new("alpha", &[]);
        for t in [0, 10_000, 20_000] {
            assert_eq!(p.observe(&obs(t, SEC, true, 10_199, false)), None);
        }
        assert_eq!(p.observe(&obs(30_000, PRI, false, 0, true)), None);
        assert_eq!(
            p.observe(&obs(30_001, PRI, false, 0, false)),
            Some(Action::Demote { reason: "quorum lost".into() })
        );
    }

    #[test]
    fn a_deferred_attempt_retries_soon_and_does_not_grow_the_back_off() {
        let mut p = Promoter::new("beta", &["alpha".to_owned(), "beta".to_owned()]);
        let delay = p.delay_ms(10_100);
        assert!(delay > DEFERRED_RETRY_MS);
        assert_eq!(p.observe(&obs(0, SEC, true, 10_100, true)), None);
        let mut now = delay;
        for _ in 0..5 {
            assert_eq!(p.observe(&obs(now, SEC, true, 10_100, true)), Some(Action::Promote));
            p.promotion_deferred(now);
            let until = p.deadline_ms().expect("retrying");
            assert_eq!(until - now, DEFERRED_RETRY_MS);
            assert_eq!(p.observe(&obs(until - 1, SEC, true, 10_100, true)), None);
            // No second wait for its turn: it already waited.
            now = until;
        }
        // A real failure after deferrals still starts the back-off at its first step.
        assert_eq!(p.observe(&obs(now, SEC, true, 10_100, true)), Some(Action::Promote));
        p.promotion_finished(now, false);
        assert_eq!(p.deadline_ms(), Some(now + RETRY_BACKOFF_MS));
        // Deferred, then no longer promotable (someone else won): back to watching.
        let mut q = Promoter::new("alpha", &[]);
        assert_eq!(q.observe(&obs(0, SEC, true, 10_199, true)), Some(Action::Promote));
        q.promotion_deferred(0);
        assert_eq!(q.observe(&obs(DEFERRED_RETRY_MS, SEC, false, 0, true)), None);
        assert_eq!(q.deadline_ms(), None);
    }

    #[test]
    fn failed_attempts_back_off_with_a_cap() {
        let mut p = Promoter::new("alpha", &[]);
        let mut now = 0;
        let mut backoffs = Vec::new();
        for _ in 0..8 {
            assert_eq!(p.observe(&obs(now, SEC, true, 10_199, true)), Some(Action::Promote));
            p.promotion_finished(now, false);
            let until = p.deadline_ms().expect("backing off");
            backoffs.push(until - now);
            assert_eq!(p.observe(&obs(until - 1, SEC, true, 10_199, true)), None);
            now = until;
        }
        assert_eq!(backoffs[0], RETRY_BACKOFF_MS);
        assert_eq!(backoffs[1], 2 * RETRY_BACKOFF_MS);
        let cap = RETRY_BACKOFF_MS << BACKOFF_DOUBLINGS_MAX;
        assert_eq!(*backoffs.last().expect("backoffs"), cap);
        assert!(backoffs.iter().all(|b| *b <= cap));
    }
}

//! When to resume an instance that QEMU paused on a volume's I/O error, as a pure state
//! machine: events and probe results in (with `now` passed in), actions out.
//!
//! A disk with `werror=stop`/`rerror=stop` pauses the whole VM when a request fails (the guest
//! sees no error); `cont` makes QEMU retry the failed requests. Resuming while the target is
//! still away only pauses the VM again, so the watcher first probes the failing volumes'
//! portals and resumes once they answer. This is the hook failover builds on: a promoted
//! secondary that answers on the same portal (service IP) ends the pause.

use std::collections::BTreeSet;

use crate::constants::{
    RESUME_ATTEMPTS_MAX, RESUME_BACKOFF_MS_MAX, RESUME_PROBE_INTERVAL_MS, RESUME_STABLE_MS,
};

/// The wait before the next probe after `attempts` resumes that did not hold: doubling from
/// the probe interval up to [`RESUME_BACKOFF_MS_MAX`]. A portal that accepts connections can
/// still fail I/O (a promoted node that logs initiators in before it exports the LUN), so a
/// TCP probe alone cannot tell; backing off keeps such a volume from burning every attempt in
/// a second.
pub fn backoff_ms(attempts: u32) -> u64 {
    let shift = attempts.min(16);
    (RESUME_PROBE_INTERVAL_MS << shift).min(RESUME_BACKOFF_MS_MAX)
}

/// What the driver must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing until the next event or `poll` time.
    Wait,
    /// Probe the portals of the failing volumes and report with `handle_probe`.
    Probe,
    /// Send `cont`; report the outcome with `handle_resumed` (RESUME event) or `handle_cont_failed`.
    Cont,
    /// Leave the instance paused for an operator; the action is reported once.
    GiveUp,
}

/// Where the instance stands, as the watcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Paused by someone else (an operator's `stop`): never resumed automatically.
    PausedOther,
    /// Paused on an I/O error; waiting to probe at `next_probe_ms`.
    PausedIoError {
        next_probe_ms: u64,
    },
    ProbeInFlight,
    /// The portals answered: `cont` is due.
    ContReady,
    /// `cont` was handed to the driver; waiting for RESUME.
    ContSent,
    GaveUp,
}

/// The resume decision for one instance.
#[derive(Debug, Clone)]
pub struct ResumeWatcher {
    phase: Phase,
    /// Node names of volumes that reported I/O errors since the instance last ran stably.
    failing_nodes: BTreeSet<String>,
    /// Automatic resumes that did not keep the instance running for [`RESUME_STABLE_MS`].
    attempts: u32,
    resumed_at_ms: Option<u64>,
    paused_at_ms: Option<u64>,
    /// Total automatic resumes, and the longest pause they ended (for the API).
    pub resumes_total: u64,
    pub pause_ms_max: u64,
}

impl Default for ResumeWatcher {
    fn default() -> Self {
        ResumeWatcher {
            phase: Phase::Running,
            failing_nodes: BTreeSet::new(),
            attempts: 0,
            resumed_at_ms: None,
            paused_at_ms: None,
            resumes_total: 0,
            pause_ms_max: 0,
        }
    }
}

impl ResumeWatcher {
    /// A BLOCK_IO_ERROR for node `node_name`.
    pub fn handle_io_error(&mut self, node_name: &str) {
        self.failing_nodes.insert(node_name.to_owned());
    }

    /// The VM stopped; `io_error` tells whether QEMU's run state is `io-error`.
    pub fn handle_stopped(&mut self, io_error: bool, now_ms: u64) {
        if !io_error {
            if !matches!(self.phase, Phase::GaveUp) {
                self.phase = Phase::PausedOther;
            }
            return;
        }
        if matches!(self.phase, Phase::GaveUp) {
            return;
        }
        let stable = self
            .resumed_at_ms
            .is_none_or(|resumed_at_ms| now_ms.saturating_sub(resumed_at_ms) >= RESUME_STABLE_MS);
        if stable {
            self.attempts = 0;
        }
        self.paused_at_ms.get_or_insert(now_ms);
        // The first probe goes out at once (a short blip may already be over); after resumes
        // that did not hold, it waits longer each time.
        let delay_ms = if self.attempts == 0 { 0 } else { backoff_ms(self.attempts) };
        self.phase = Phase::PausedIoError { next_probe_ms: now_ms + delay_ms };
    }

    /// The VM runs again (a RESUME event, ours or anyone's).
    pub fn handle_resumed(&mut self, now_ms: u64) {
        if matches!(self.phase, Phase::ContSent) {
            self.resumes_total += 1;
            self.attempts += 1;
            if let Some(paused_at_ms) = self.paused_at_ms {
                self.pause_ms_max = self.pause_ms_max.max(now_ms.saturating_sub(paused_at_ms));
            }
        } else {
            // Someone else resumed it: their decision, start afresh.
            self.attempts = 0;
        }
        self.paused_at_ms = None;
        self.resumed_at_ms = Some(now_ms);
        self.phase = Phase::Running;
    }

    /// The outcome of a probe of every failing volume's portals.
    pub fn handle_probe(&mut self, reachable: bool, now_ms: u64) {
        if !matches!(self.phase, Phase::ProbeInFlight) {
            return;
        }
        self.phase = if reachable {
            Phase::ContReady
        } else {
            Phase::PausedIoError { next_probe_ms: now_ms + backoff_ms(self.attempts) }
        };
    }

    /// `cont` failed (QMP error): try again after a probe interval.
    pub fn handle_cont_failed(&mut self, now_ms: u64) {
        if matches!(self.phase, Phase::ContSent) {
            self.phase = Phase::PausedIoError { next_probe_ms: now_ms + RESUME_PROBE_INTERVAL_MS };
        }
    }

    /// The next action; call after every input and when the deadline from `next_poll_ms` passes.
    pub fn poll(&mut self, now_ms: u64) -> Action {
        match self.phase {
            Phase::PausedIoError { .. } if self.attempts >= RESUME_ATTEMPTS_MAX => {
                self.phase = Phase::GaveUp;
                Action::GiveUp
            }
            Phase::PausedIoError { next_probe_ms } if now_ms >= next_probe_ms => {
                self.phase = Phase::ProbeInFlight;
                Action::Probe
            }
            Phase::ContReady => {
                self.phase = Phase::ContSent;
                Action::Cont
            }
            _ => Action::Wait,
        }
    }

    /// When `poll` should run again without new input (None: only on input).
    pub fn next_poll_ms(&self) -> Option<u64> {
        match self.phase {
            Phase::PausedIoError { next_probe_ms } => Some(next_probe_ms),
            _ => None,
        }
    }

    /// Node names with I/O errors since the last stable run (which portals to probe).
    pub fn failing_nodes(&self) -> &BTreeSet<String> {
        &self.failing_nodes
    }

    /// Automatic resumes in a row that did not keep the instance running.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Forget the failing nodes once the instance runs stably (called by the driver after
    /// a resume has held for [`RESUME_STABLE_MS`]; harmless at any time while running).
    pub fn clear_failing_if_stable(&mut self, now_ms: u64) {
        if matches!(self.phase, Phase::Running)
            && self.resumed_at_ms.is_none_or(|at| now_ms.saturating_sub(at) >= RESUME_STABLE_MS)
        {
            self.failing_nodes.clear();
        }
    }

    /// True while the watcher holds the instance paused on an I/O error.
    pub fn is_paused_on_io_error(&self) -> bool {
        matches!(
            self.phase,
            Phase::PausedIoError { .. } | Phase::ProbeInFlight | Phase::ContReady | Phase::ContSent
        )
    }

    pub fn gave_up(&self) -> bool {
        matches!(self.phase, Phase::GaveUp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_pause_is_probed_until_reachable_then_resumed_once() {
        let mut watcher = ResumeWatcher::default();
        assert_eq!(watcher.poll(0), Action::Wait);
        watcher.handle_io_error("tandem-node1");
        watcher.handle_stopped(true, 1_000);
        assert!(watcher.is_paused_on_io_error());
        assert_eq!(watcher.poll(1_000), Action::Probe, "the first probe goes out at once");
        assert_eq!(watcher.poll(1_000), Action::Wait, "one probe at a time");
        watcher.handle_probe(false, 1_010);
        assert_eq!(watcher.next_poll_ms(), Some(1_010 + RESUME_PROBE_INTERVAL_MS));
        assert_eq!(watcher.poll(1_011), Action::Wait, "not before the interval");
        assert_eq!(watcher.poll(1_010 + RESUME_PROBE_INTERVAL_MS), Action::Probe);
        watcher.handle_probe(true, 1_400);
        assert_eq!(watcher.poll(1_400), Action::Cont);
        assert_eq!(watcher.poll(1_401), Action::Wait, "cont is issued once");
        watcher.handle_resumed(1_450);
        assert!(!watcher.is_paused_on_io_error());
        assert_eq!(watcher.resumes_total, 1);
        assert_eq!(watcher.pause_ms_max, 450);
        assert!(watcher.failing_nodes().contains("tandem-node1"));
        watcher.clear_failing_if_stable(1_450 + RESUME_STABLE_MS);
        assert!(watcher.failing_nodes().is_empty());
    }

    #[test]
    fn an_operator_pause_is_never_undone() {
        let mut watcher = ResumeWatcher::default();
        watcher.handle_stopped(false, 5);
        for now_ms in [5, 1_000, 100_000] {
            assert_eq!(watcher.poll(now_ms), Action::Wait);
        }
        // Probe results and cont failures that arrive late change nothing.
        watcher.handle_probe(true, 10);
        watcher.handle_cont_failed(10);
        assert_eq!(watcher.poll(10), Action::Wait);
    }

    #[test]
    fn a_failed_cont_is_retried_after_a_probe() {
        let mut watcher = ResumeWatcher::default();
        watcher.handle_stopped(true, 0);
        assert_eq!(watcher.poll(0), Action::Probe);
        watcher.handle_probe(true, 1);
        assert_eq!(watcher.poll(1), Action::Cont);
        watcher.handle_cont_failed(2);
        assert_eq!(watcher.poll(2), Action::Wait);
        assert_eq!(watcher.poll(2 + RESUME_PROBE_INTERVAL_MS), Action::Probe);
    }

    #[test]
    fn flapping_volumes_end_in_give_up_but_stable_runs_reset_the_count() {
        let mut watcher = ResumeWatcher::default();
        let mut now_ms = 0;
        let cycle = |watcher: &mut ResumeWatcher, now_ms: &mut u64, run_ms: u64| {
            watcher.handle_stopped(true, *now_ms);
            *now_ms += RESUME_BACKOFF_MS_MAX;
            let action = watcher.poll(*now_ms);
            if action != Action::Probe {
                return action;
            }
            watcher.handle_probe(true, *now_ms);
            assert_eq!(watcher.poll(*now_ms), Action::Cont);
            watcher.handle_resumed(*now_ms);
            *now_ms += run_ms;
            Action::Cont
        };
        // Long stable runs between errors never give up.
        for _ in 0..(RESUME_ATTEMPTS_MAX * 3) {
            assert_eq!(cycle(&mut watcher, &mut now_ms, RESUME_STABLE_MS), Action::Cont);
        }
        // Immediate re-failures do, after RESUME_ATTEMPTS_MAX tries.
        let mut outcomes = Vec::new();
        for _ in 0..(RESUME_ATTEMPTS_MAX + 2) {
            outcomes.push(cycle(&mut watcher, &mut now_ms, 1));
        }
        let conts = outcomes.iter().filter(|action| **action == Action::Cont).count();
        assert_eq!(u32::try_from(conts).expect("small"), RESUME_ATTEMPTS_MAX);
        assert!(outcomes.contains(&Action::GiveUp));
        assert!(watcher.gave_up());
        assert_eq!(watcher.poll(now_ms + 1_000_000), Action::Wait, "GiveUp is reported once");
    }

    #[test]
    fn resumes_that_do_not_hold_back_off() {
        assert_eq!(backoff_ms(0), RESUME_PROBE_INTERVAL_MS);
        assert_eq!(backoff_ms(1), RESUME_PROBE_INTERVAL_MS * 2);
        assert_eq!(backoff_ms(1_000), RESUME_BACKOFF_MS_MAX);
        let mut watcher = ResumeWatcher::default();
        watcher.handle_stopped(true, 0);
        assert_eq!(watcher.poll(0), Action::Probe);
        watcher.handle_probe(true, 0);
        assert_eq!(watcher.poll(0), Action::Cont);
        watcher.handle_resumed(10);
        // It fails again at once: the next probe waits.
        watcher.handle_stopped(true, 20);
        assert_eq!(watcher.poll(20), Action::Wait);
        assert_eq!(watcher.next_poll_ms(), Some(20 + backoff_ms(1)));
        assert_eq!(watcher.poll(20 + backoff_ms(1)), Action::Probe);
    }

    #[test]
    fn someone_elses_resume_is_accepted() {
        let mut watcher = ResumeWatcher::default();
        watcher.handle_stopped(true, 0);
        assert_eq!(watcher.poll(0), Action::Probe);
        watcher.handle_resumed(3);
        assert_eq!(watcher.resumes_total, 0, "not ours");
        watcher.handle_probe(true, 4);
        assert_eq!(watcher.poll(4), Action::Wait, "a stale probe result does not cont");
    }
}

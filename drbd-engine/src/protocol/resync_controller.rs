//! How much to resync per step: a fixed rate, or a dynamic controller in the spirit of DRBD's
//! c-plan-ahead / c-fill-target / c-max-rate / c-min-rate.
//!
//! The dynamic controller aims to keep `fill_target_kib` of resync data in flight. Each step it
//! measures the error (target minus in flight minus what is already planned), spreads the
//! correction evenly over the next `plan_ahead_steps` steps, and requests this step's share
//! plus what the peer acknowledged since the last step (to keep the pipe as full as it was).
//! Spreading over a plan avoids the oscillation a plain proportional step would cause on a
//! link whose latency is several steps long. The result is clamped to `max_rate`, and to
//! `min_rate` while application I/O competes, so resync yields to the application.

use crate::constants::{RESYNC_PLAN_STEPS_MAX, RESYNC_STEP_MS};
use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicControllerConfig {
    /// c-plan-ahead, in 100 ms steps (DRBD default 20 = 2 s).
    pub plan_ahead_steps: u32,
    /// c-fill-target: resync data to keep in flight.
    pub fill_target_kib: u64,
    /// c-max-rate.
    pub max_rate_kib_per_s: u64,
    /// c-min-rate: the rate resync keeps while application I/O is active (0 = no throttle).
    pub min_rate_kib_per_s: u64,
}

impl Default for DynamicControllerConfig {
    fn default() -> Self {
        // DRBD 9's c-plan-ahead (2 s), c-max-rate (100 MiB/s) and c-min-rate (250 KiB/s); the
        // fill target is larger than DRBD's because our resync requests are larger.
        Self {
            plan_ahead_steps: 20,
            fill_target_kib: 1024,
            max_rate_kib_per_s: 100 * 1024,
            min_rate_kib_per_s: 250,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncRate {
    Fixed { rate_kib_per_s: u64 },
    Dynamic(DynamicControllerConfig),
}

#[derive(Debug, Clone)]
pub struct ResyncController {
    rate: ResyncRate,
    plan: VecDeque<i64>,
    planned_total_kib: i64,
}

fn per_step(rate_kib_per_s: u64) -> i64 {
    i64::try_from(rate_kib_per_s.saturating_mul(RESYNC_STEP_MS) / 1000).unwrap_or(i64::MAX).max(1)
}

impl ResyncController {
    pub fn new(rate: ResyncRate) -> Self {
        let steps = match rate {
            ResyncRate::Fixed { .. } => 0,
            ResyncRate::Dynamic(c) => usize::try_from(c.plan_ahead_steps)
                .unwrap_or(usize::MAX)
                .clamp(1, RESYNC_PLAN_STEPS_MAX),
        };
        Self { rate, plan: std::iter::repeat_n(0, steps).collect(), planned_total_kib: 0 }
    }

    /// KiB of resync requests to issue in the coming step.
    pub fn step(&mut self, acked_kib_last_step: u64, in_flight_kib: u64, app_busy: bool) -> u64 {
        match self.rate {
            ResyncRate::Fixed { rate_kib_per_s } => {
                u64::try_from(per_step(rate_kib_per_s)).expect("positive")
            }
            ResyncRate::Dynamic(c) => {
                let steps = i64::try_from(self.plan.len()).expect("bounded");
                let want = i64::try_from(c.fill_target_kib).unwrap_or(i64::MAX / 4);
                let in_flight = i64::try_from(in_flight_kib).unwrap_or(i64::MAX / 4);
                let correction = want - in_flight - self.planned_total_kib;
                let share = correction / steps;
                for slot in self.plan.iter_mut() {
                    *slot += share;
                }
                self.planned_total_kib += share * steps;
                let now = self.plan.pop_front().expect("plan has steps");
                self.plan.push_back(0);
                self.planned_total_kib -= now;
                let acked = i64::try_from(acked_kib_last_step).unwrap_or(i64::MAX / 4);
                let mut request = (acked + now).max(0);
                request = request.min(per_step(c.max_rate_kib_per_s));
                if app_busy && c.min_rate_kib_per_s > 0 {
                    request = request.min(per_step(c.min_rate_kib_per_s));
                }
                u64::try_from(request).expect("non-negative")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_is_rate_times_step() {
        let mut c = ResyncController::new(ResyncRate::Fixed { rate_kib_per_s: 10_240 });
        assert_eq!(c.step(0, 0, false), 1024);
        assert_eq!(c.step(500, 9999, true), 1024);
    }

    /// A simulated link with a latency of `latency_steps`: the controller must fill it to the
    /// target without exceeding max rate, and settle (no growing oscillation).
    #[test]
    fn dynamic_controller_converges_to_fill_target() {
        for latency_steps in [1usize, 3, 10] {
            let config = DynamicControllerConfig {
                plan_ahead_steps: 20,
                fill_target_kib: 4096,
                max_rate_kib_per_s: 100_000,
                min_rate_kib_per_s: 0,
            };
            let mut c = ResyncController::new(ResyncRate::Dynamic(config));
            let mut pipe: VecDeque<u64> = std::iter::repeat_n(0, latency_steps).collect();
            let mut in_flight = 0u64;
            let mut acked = 0u64;
            let mut history = Vec::new();
            for _ in 0..400 {
                let request = c.step(acked, in_flight, false);
                assert!(request <= 10_000, "max rate respected");
                in_flight += request;
                pipe.push_back(request);
                acked = pipe.pop_front().unwrap();
                in_flight -= acked;
                history.push(in_flight);
            }
            let tail = &history[300..];
            for level in tail {
                let error = level.abs_diff(4096);
                assert!(error <= 4096 / 5, "latency {latency_steps}: in flight {level}");
            }
        }
    }

    #[test]
    fn app_io_throttles_to_min_rate() {
        let config = DynamicControllerConfig {
            plan_ahead_steps: 5,
            fill_target_kib: 100_000,
            max_rate_kib_per_s: 1_000_000,
            min_rate_kib_per_s: 1000,
        };
        let mut c = ResyncController::new(ResyncRate::Dynamic(config));
        assert_eq!(c.step(0, 0, true), 100);
        assert!(c.step(0, 0, false) > 100);
    }
}

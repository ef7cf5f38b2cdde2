//! Watching the engine from outside it: a step that never ends, or a device that fails every job.
//!
//! The broker's heartbeats are answered by the I/O threads, so a worker whose engine thread hangs (a CUDA
//! kernel that never returns, a deadlock inside libtorch) keeps its connection and its jobs for ever. And a
//! worker whose device is broken fails each job in milliseconds and acknowledges the failure, draining the
//! queue into `job.failed` replies faster than any healthy worker takes jobs. Neither is the jobs' fault: the
//! worker should give its jobs back and leave, so that its supervisor restarts or replaces it.
//!
//! [`EngineHealth`] is shared by the engine thread and the async side:
//! - the engine thread marks when each call into the batch begins and ends ([`EngineHealth::busy`]); a
//!   watchdog task on the runtime (not on the engine thread, which is the one that hangs) trips the health
//!   when a call has run past `--engine-step-timeout-s`;
//! - the engine thread judges each job's outcome before it hands it out ([`EngineHealth::judge`]): an engine
//!   failure (`generation_failed`: the engine or the device, not the input) counts, a success resets the
//!   count, anything else (a cancel, a prompt too long) says nothing about the device. The N-th engine
//!   failure in a row trips the health *before* its outcome would leave the thread, and is withheld. The
//!   N-1 before it were answered `job.failed` as usual: one bad job fails alone, only a run of them says the
//!   device is broken.
//!
//! Once tripped, nothing more leaves the engine thread: the withheld job and every job still in the engine
//! end without an outcome, the session answers none of them and acknowledges none of them, so the broker
//! gives them to another worker when this one's channel closes; the session stops consuming, and
//! `worker serve` exits non-zero with the reason ([`Unhealthy`]).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use shared::ErrorCode;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::job::Outcome;
use super::metrics;

/// The watchdog's bounds, from `--engine-step-timeout-s` and `--max-engine-failures`; `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchSettings {
    pub step_timeout: Option<Duration>,
    pub max_failures: Option<NonZeroU32>,
}

/// The command line's defaults.
pub const DEFAULT_STEP_TIMEOUT_S: u64 = 120;
pub const DEFAULT_MAX_ENGINE_FAILURES: u32 = 3;

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            step_timeout: Some(Duration::from_secs(DEFAULT_STEP_TIMEOUT_S)),
            max_failures: NonZeroU32::new(DEFAULT_MAX_ENGINE_FAILURES),
        }
    }
}

/// Why the worker gave up on its engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unhealthy {
    #[error(
        "an engine step has run for {elapsed_ms} ms, past --engine-step-timeout-s ({limit_s} s): the engine \
         is hung"
    )]
    StepTimeout { elapsed_ms: u64, limit_s: u64 },
    #[error(
        "{count} jobs in a row failed in the engine (--max-engine-failures {count}), the last with: {last}"
    )]
    Failures { count: u32, last: String },
}

impl Unhealthy {
    /// The metric label.
    fn reason(&self) -> &'static str {
        match self {
            Self::StepTimeout { .. } => "step_timeout",
            Self::Failures { .. } => "engine_failures",
        }
    }
}

/// What the engine thread does with a job's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the session, which answers it.
    Answer,
    /// Drop it: the job goes back to the queue unanswered (the engine is unhealthy).
    Withhold,
}

/// The engine's health, shared by the engine thread, the watchdog and the session.
#[derive(Debug)]
pub struct EngineHealth {
    settings: WatchSettings,
    /// When the call into the batch in progress began; `None` between calls.
    busy_since: Mutex<Option<Instant>>,
    /// Engine failures since the last success.
    failures: AtomicU32,
    unhealthy: OnceLock<Unhealthy>,
    tripped: CancellationToken,
}

impl EngineHealth {
    pub fn new(settings: WatchSettings) -> Self {
        Self {
            settings,
            busy_since: Mutex::new(None),
            failures: AtomicU32::new(0),
            unhealthy: OnceLock::new(),
            tripped: CancellationToken::new(),
        }
    }

    fn busy_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // Held for an assignment or a read only; a poisoned lock still holds a valid value.
        self.busy_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one call into the batch (a step, a submission) under the watchdog's eye. `call` must not
    /// unwind (the engine thread catches panics inside it), or the call would look busy for ever.
    pub fn busy<T>(&self, call: impl FnOnce() -> T) -> T {
        *self.busy_since() = Some(Instant::now());
        let out = call();
        *self.busy_since() = None;
        out
    }

    /// How long the call in progress has run, at `now`; `None` when the engine is between calls.
    pub fn busy_for(&self, now: Instant) -> Option<Duration> {
        self.busy_since()
            .map(|since| now.saturating_duration_since(since))
    }

    /// Takes `paused` off the call in progress: time the whole process stood still (stopped by SIGSTOP or
    /// `docker pause`, a suspended host) is not time the engine spent hung.
    pub fn excuse(&self, paused: Duration) {
        if let Some(since) = self.busy_since().as_mut() {
            *since += paused;
        }
    }

    /// The watchdog's check: trips the health when the call in progress has run past the bound. Returns
    /// whether the health is tripped (for whatever reason), after which there is nothing left to watch.
    pub fn check(&self, now: Instant) -> bool {
        if let (Some(limit), Some(elapsed)) = (self.settings.step_timeout, self.busy_for(now))
            && elapsed > limit
        {
            self.trip(Unhealthy::StepTimeout {
                elapsed_ms: elapsed.as_millis() as u64,
                limit_s: limit.as_secs(),
            });
        }
        self.unhealthy().is_some()
    }

    /// Judges a job's outcome on the engine thread, before it is handed out (see the module's doc).
    pub fn judge(&self, outcome: &Outcome) -> Verdict {
        if self.unhealthy().is_some() {
            return Verdict::Withhold;
        }
        match outcome {
            Ok(_) => {
                self.failures.store(0, Ordering::Relaxed);
                metrics::engine_failures_in_a_row(0);
                Verdict::Answer
            }
            Err(error) if error.code == ErrorCode::GenerationFailed => {
                let count = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                metrics::engine_failure(count);
                match self.settings.max_failures {
                    Some(max) if count >= max.get() => {
                        self.trip(Unhealthy::Failures {
                            count,
                            last: error.message.clone(),
                        });
                        Verdict::Withhold
                    }
                    _ => Verdict::Answer,
                }
            }
            Err(_) => Verdict::Answer,
        }
    }

    /// Gives up on the engine (the first reason is the one kept and reported).
    pub fn trip(&self, why: Unhealthy) {
        if self.unhealthy.set(why.clone()).is_ok() {
            tracing::error!(reason = %why, "the engine is unhealthy; this worker stops taking jobs");
            metrics::engine_unhealthy(why.reason());
        }
        self.tripped.cancel();
    }

    /// Why the engine was given up on, once it was.
    pub fn unhealthy(&self) -> Option<&Unhealthy> {
        self.unhealthy.get()
    }

    /// Resolves when the health trips.
    pub fn tripped(&self) -> WaitForCancellationFutureOwned {
        self.tripped.clone().cancelled_owned()
    }
}

/// How late a watchdog tick must be to say the whole process stood still rather than the runtime being
/// busy.
const STOOD_STILL: Duration = Duration::from_secs(2);

/// Watches for a call into the batch past `--engine-step-timeout-s`, from the runtime, until the health
/// trips or the engine thread and every handle to it are gone. Needs a Tokio runtime.
pub fn spawn_watchdog(health: &Arc<EngineHealth>) {
    let Some(limit) = health.settings.step_timeout else {
        return;
    };
    let weak = Arc::downgrade(health);
    // Checked a few times per bound, so a hang is noticed within about a quarter of it past the bound.
    let period = (limit / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last = Instant::now();
        loop {
            tick.tick().await;
            let Some(health) = weak.upgrade() else {
                return;
            };
            let now = Instant::now();
            // A tick this late means the watchdog stood still too: the process was stopped, not the
            // engine hung. Its engine resumes where it was; without this it would be blamed on resume.
            let late = now.saturating_duration_since(last).saturating_sub(period);
            if late > STOOD_STILL {
                tracing::warn!(
                    stood_still_ms = late.as_millis() as u64,
                    "the process stood still (stopped or paused); the engine is not blamed for it"
                );
                health.excuse(late);
            }
            last = now;
            if health.check(now) {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::ErrorBody;

    fn failed(code: ErrorCode) -> Outcome {
        Err(ErrorBody::new(code, "x"))
    }

    fn succeeded() -> Outcome {
        Ok(super::super::generator::solo::completion(" ok".into(), 1))
    }

    fn health(max_failures: u32, step_timeout_ms: u64) -> EngineHealth {
        EngineHealth::new(WatchSettings {
            step_timeout: Some(Duration::from_millis(step_timeout_ms)).filter(|d| !d.is_zero()),
            max_failures: NonZeroU32::new(max_failures),
        })
    }

    #[test]
    fn the_nth_engine_failure_in_a_row_is_withheld_and_trips_and_the_ones_before_it_are_answered() {
        let h = health(3, 0);
        assert_eq!(h.judge(&failed(ErrorCode::GenerationFailed)), Verdict::Answer);
        assert_eq!(h.judge(&failed(ErrorCode::GenerationFailed)), Verdict::Answer);
        assert!(h.unhealthy().is_none());
        assert_eq!(h.judge(&failed(ErrorCode::GenerationFailed)), Verdict::Withhold);
        assert!(matches!(
            h.unhealthy(),
            Some(Unhealthy::Failures { count: 3, .. })
        ));
        // Once tripped, nothing leaves the engine thread, successes included.
        assert_eq!(h.judge(&succeeded()), Verdict::Withhold);
        assert_eq!(h.judge(&failed(ErrorCode::Cancelled)), Verdict::Withhold);
    }

    #[test]
    fn a_success_resets_the_count_and_the_inputs_own_failures_do_not_count() {
        let h = health(2, 0);
        assert_eq!(h.judge(&failed(ErrorCode::GenerationFailed)), Verdict::Answer);
        assert_eq!(h.judge(&succeeded()), Verdict::Answer);
        assert_eq!(h.judge(&failed(ErrorCode::GenerationFailed)), Verdict::Answer);
        // A prompt too long or a cancel neither counts nor proves the device works.
        assert_eq!(h.judge(&failed(ErrorCode::ContextOverflow)), Verdict::Answer);
        assert_eq!(h.judge(&failed(ErrorCode::Cancelled)), Verdict::Answer);
        assert!(h.unhealthy().is_none());
        assert_eq!(h.judge(&failed(ErrorCode::GenerationFailed)), Verdict::Withhold);
    }

    #[test]
    fn zero_max_failures_never_trips() {
        let h = health(0, 0);
        for _ in 0..100 {
            assert_eq!(h.judge(&failed(ErrorCode::GenerationFailed)), Verdict::Answer);
        }
        assert!(h.unhealthy().is_none());
    }

    #[test]
    fn a_call_past_the_bound_trips_and_calls_within_it_or_between_calls_do_not() {
        let h = health(0, 1000);
        let start = Instant::now();
        assert!(!h.check(start + Duration::from_secs(60)), "idle is not hung");
        h.busy(|| {
            assert!(!h.check(Instant::now()));
            assert!(h.busy_for(Instant::now()).is_some());
        });
        assert_eq!(h.busy_for(Instant::now()), None);
        *h.busy_since() = Some(start);
        assert!(h.check(start + Duration::from_millis(1500)));
        assert!(matches!(
            h.unhealthy(),
            Some(Unhealthy::StepTimeout { limit_s: 1, .. })
        ));
    }

    #[test]
    fn time_the_process_stood_still_is_not_counted_against_the_call() {
        let h = health(0, 1000);
        let start = Instant::now();
        *h.busy_since() = Some(start);
        // Stopped for a minute half a second into the call, then resumed.
        h.excuse(Duration::from_secs(60));
        assert!(!h.check(start + Duration::from_millis(60_500)));
        assert!(
            h.check(start + Duration::from_millis(61_500)),
            "still hung past the bound afterwards"
        );
    }

    #[tokio::test]
    async fn the_watchdog_trips_a_hung_call_from_off_the_engine_thread() {
        let h = Arc::new(health(0, 100));
        spawn_watchdog(&h);
        let hung = h.clone();
        // The "engine thread": a call that does not return until told.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || hung.busy(|| wait.recv()));
        tokio::time::timeout(Duration::from_secs(5), h.tripped())
            .await
            .expect("tripped within the bound and a check period");
        assert!(matches!(h.unhealthy(), Some(Unhealthy::StepTimeout { .. })));
        release.send(()).unwrap();
        thread.join().unwrap().unwrap();
    }
}

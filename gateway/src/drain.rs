//! How fast the queue drains, measured: the rate at which jobs leave the `queued` state (the `{ns}:taken`
//! counter, shared by every replica), over the last half minute. A full queue's `Retry-After` is the time
//! the workers need, at that rate, to take the jobs over the bound: advice a client can act on, where a
//! constant would be a guess.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::store::JobStore;

/// Samples kept: one a second, so the rate is over the last 30 s.
const SAMPLES: usize = 30;
/// Bounds on the advice: a client should neither hammer nor give up.
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);
/// The advice while nothing drains: no worker takes jobs, or none was measured yet.
const STALLED_RETRY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct DrainRate {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl DrainRate {
    /// Records the counter of jobs taken as read now.
    pub fn sample(&self, taken: u64) {
        self.sample_at(Instant::now(), taken);
    }

    fn sample_at(&self, at: Instant, taken: u64) {
        if let Ok(mut samples) = self.samples.lock() {
            samples.push_back((at, taken));
            while samples.len() > SAMPLES {
                samples.pop_front();
            }
        }
    }

    /// Jobs taken per second over the samples kept; `None` before two samples a second apart.
    pub fn per_second(&self) -> Option<f64> {
        let samples = self.samples.lock().ok()?;
        let (first, last) = (samples.front()?, samples.back()?);
        let elapsed = last.0.duration_since(first.0).as_secs_f64();
        (elapsed >= 1.0).then(|| last.1.saturating_sub(first.1) as f64 / elapsed)
    }

    /// How long until the workers, at the measured rate, have taken `excess` jobs; [`STALLED_RETRY`] when
    /// nothing drains.
    pub fn retry_after(&self, excess: u64) -> Duration {
        match self.per_second() {
            Some(rate) if rate > 0.0 => {
                Duration::from_secs_f64(excess.max(1) as f64 / rate).clamp(MIN_RETRY, MAX_RETRY)
            }
            _ => STALLED_RETRY,
        }
    }

    /// Samples the counter every second until `cancel`.
    pub async fn run(&self, store: JobStore, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            if let Ok(figures) = store.figures().await {
                self.sample(figures.taken);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advice_is_the_excess_over_the_measured_rate() {
        let drain = DrainRate::default();
        let t0 = Instant::now();
        assert_eq!(drain.per_second(), None);
        drain.sample_at(t0, 100);
        drain.sample_at(t0 + Duration::from_secs(10), 150);
        assert_eq!(drain.per_second(), Some(5.0));
        // 50 jobs over the bound at 5 jobs/s: 10 s.
        assert_eq!(drain.retry_after(50), Duration::from_secs(10));
        // Never under a second, never over five minutes.
        assert_eq!(drain.retry_after(1), MIN_RETRY);
        assert_eq!(drain.retry_after(1_000_000), MAX_RETRY);
    }

    #[test]
    fn a_queue_that_does_not_drain_gets_a_long_wait() {
        let drain = DrainRate::default();
        let t0 = Instant::now();
        drain.sample_at(t0, 7);
        drain.sample_at(t0 + Duration::from_secs(5), 7);
        assert_eq!(drain.retry_after(3), Duration::from_secs(30));
    }
}

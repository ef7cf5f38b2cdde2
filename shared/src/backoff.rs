//! Delays between reconnection attempts, for every process that reconnects: the worker to the broker, the
//! gateway to the broker and to Redis pub/sub. Exponential from a base up to a cap, with jitter so that a
//! fleet cut off together does not come back in lockstep. One implementation, on `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The delays of one connection's attempts; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Steps double from `base` to `max`; each delay is its step plus up to as much again (jitter).
    pub fn new(base: Duration, max: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        let max = max.max(base);
        let builder = ExponentialBuilder::default()
            .with_min_delay(base)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// After a success the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_from_the_base_and_never_pass_twice_the_cap() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(base, max);
        let delays: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= base && delays[0] <= base * 2, "{:?}", delays[0]);
        assert!(delays.iter().all(|d| *d <= max * 2), "{delays:?}");
        assert!(delays[19] >= max, "the steps reach the cap: {delays:?}");
    }

    #[test]
    fn reset_starts_over() {
        let base = Duration::from_millis(100);
        let mut b = Backoff::new(base, Duration::from_secs(5));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= base * 2);
    }
}

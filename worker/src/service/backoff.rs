//! Delays between reconnection attempts: doubling from a base up to a cap, with jitter so that a fleet of
//! workers cut off together does not reconnect in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Self {
            base,
            max: max.max(base),
            next: base,
        }
    }

    /// The delay before the next attempt: between half and all of the current step.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    /// After a success the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_grow_but_never_pass_the_cap(base_ms in 1u64..1000, max_ms in 1u64..20_000, n in 1usize..40) {
            let (base, max) = (Duration::from_millis(base_ms), Duration::from_millis(max_ms));
            let mut b = Backoff::new(base, max);
            for _ in 0..n {
                let d = b.next_delay();
                prop_assert!(d <= max.max(base));
                prop_assert!(d >= base / 2);
            }
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
